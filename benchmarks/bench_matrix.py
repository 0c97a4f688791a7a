#!/usr/bin/env python3
"""Benchmark: `synack matrix` on every dump of the iptables-semantics corpus (fffuu's own test
inputs, the TUM firewall among them), filter FORWARD, TCP ports 22 and 80 in one run, as fffuu
computes them by default.

Target: <= 2.0 s CPU time (user + sys of the `synack matrix` process: import, parse, both
matrices) per dump; fffuu takes about 40 s on the TUM FORWARD chains. CPU time is what a
shared machine does not inflate; wall time is printed next to it. Each dump runs in its own
process, best of --repeat. Prints a table, or JSON with --json; --strict exits 2 when a target
is missed.

    python benchmarks/bench_matrix.py                       # every dump, default mode
    python benchmarks/bench_matrix.py --fffuu               # fffuu's abstraction (--fffuu)
    python benchmarks/bench_matrix.py --only TUM --ipassmt tests/data/fffuu/ipassmt_tumi8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("SYNACK_CORPUS", REPO.parent / "shared" / "corpus"))
DUMPS = CORPUS / "iptables" / "iptables-semantics"
TARGET_S = 2.0


def run(cmd: list[str]) -> tuple[int, float, float, int]:
    """(exit code, CPU s of the child, wall s, peak RSS KiB)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    _, status, ru = os.wait4(p.pid, 0)
    p.stderr.close()
    wall = time.perf_counter() - t
    return os.waitstatus_to_exitcode(status), ru.ru_utime + ru.ru_stime, wall, ru.ru_maxrss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="only dumps whose name contains this")
    ap.add_argument("--repeat", type=int, default=1, help="runs per dump, best kept (default 1)")
    ap.add_argument("--fffuu", action="store_true", help="pass --fffuu (fffuu's abstraction)")
    ap.add_argument("--ipassmt", help="pass --ipassmt FILE (also runs the spoofing check)")
    ap.add_argument("--chain", default="FORWARD")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--strict", action="store_true", help="exit 2 when a dump misses the target")
    args = ap.parse_args(argv)
    if not DUMPS.is_dir():
        print(f"no corpus at {DUMPS} (set SYNACK_CORPUS)", file=sys.stderr)
        return 1
    extra = ["--fffuu"] if args.fffuu else []
    if args.ipassmt:
        extra += ["--ipassmt", str(Path(args.ipassmt).resolve())]
    rows = []
    for dump in sorted(DUMPS.iterdir()):
        if args.only and args.only not in dump.name:
            continue
        cmd = [sys.executable, "-m", "analyzer", "matrix", str(dump), "--chain", args.chain,
               "--dport", "22", "--dport", "80", *extra]
        best = None
        for _ in range(max(1, args.repeat)):
            r = run(cmd)
            if best is None or r[1] < best[1]:
                best = r
        rc, cpu, wall, rss = best
        rows.append({"dump": dump.name, "rules": sum(1 for ln in dump.open(errors="replace")
                                                     if ln.startswith("-A ")),
                     "exit": rc, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
                     "rss_mb": round(rss / 1024, 1),
                     "result": "n/a" if rc != 0 else ("PASS" if cpu <= TARGET_S else "MISS")})
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"target_cpu_s": TARGET_S, "loadavg": load, "mode": extra, "dumps": rows},
                         indent=2))
    else:
        print(f"synack matrix --chain {args.chain} --dport 22 --dport 80 {' '.join(extra)}  "
              f"(target {TARGET_S} s CPU; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
        print(f"{'dump':<78} {'rules':>6} {'CPU s':>7} {'wall s':>7} {'MB':>6}  result")
        for r in rows:
            note = r["result"] if r["exit"] == 0 else f"exit {r['exit']} (no {args.chain} chain / IPv6-only?)"
            print(f"{r['dump'][:78]:<78} {r['rules']:>6} {r['cpu_s']:>7.2f} {r['wall_s']:>7.2f} "
                  f"{r['rss_mb']:>6.0f}  {note}")
        ok = [r for r in rows if r["exit"] == 0]
        if ok:
            print(f"max CPU {max(r['cpu_s'] for r in ok):.2f} s over {len(ok)} dumps; "
                  f"{sum(r['result'] == 'MISS' for r in ok)} miss the target")
    missed = any(r["result"] == "MISS" for r in rows)
    return 2 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
