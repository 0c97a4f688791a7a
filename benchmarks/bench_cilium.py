#!/usr/bin/env python3
"""Benchmark: parse a 10,000-service Cilium `service list` (text and JSON) in-process.

Target: each parse <= 1.0 s (best of --repeat), the model only (no lint). The target applies
to the process's CPU time, which a shared machine does not inflate; the wall-clock time is
printed next to it (on an idle machine the two agree). Prints a table, or JSON with --json;
--strict exits 2 when a target is missed.

    python benchmarks/bench_cilium.py                 # generates 10,000 services
    python benchmarks/bench_cilium.py --services 50000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_cilium  # noqa: E402

from analyzer.parse.cilium import parse_cilium  # noqa: E402

TARGET_S = 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--strict", action="store_true")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        prefix = os.path.join(d, "svc")
        gen_cilium.main(["--services", str(a.services), "--out", prefix])
        rows = []
        for kind in ("txt", "json"):
            text = open(f"{prefix}.{kind}").read()
            best = wall = res = None
            for _ in range(a.repeat):
                t, w = time.process_time(), time.perf_counter()
                res = parse_cilium(text, f"svc.{kind}")
                dt, dw = time.process_time() - t, time.perf_counter() - w
                best = dt if best is None else min(best, dt)
                wall = dw if wall is None else min(wall, dw)
            n = len(res.dump.services)
            rows.append({"input": f"service list ({'text' if kind == 'txt' else 'JSON'})", "frontends": n,
                         "backends": sum(len(s.backends) for s in res.dump.services),
                         "lines": text.count("\n"), "cpu_seconds": round(best, 3), "wall_seconds": round(wall, 3),
                         "target": TARGET_S,
                         "ok": best <= TARGET_S and not res.errors})
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'input':<26}{'frontends':>10}{'backends':>10}{'lines':>9}{'cpu s':>8}{'wall s':>8}  target (cpu)")
        for r in rows:
            print(f"{r['input']:<26}{r['frontends']:>10}{r['backends']:>10}{r['lines']:>9}"
                  f"{r['cpu_seconds']:>8.3f}{r['wall_seconds']:>8.3f}  "
                  f"<= {r['target']} s {'PASS' if r['ok'] else 'MISS'}")
    return 2 if a.strict and not all(r["ok"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
