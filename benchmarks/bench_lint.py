"""Full `synack lint` of the 10,000-service kube-proxy dump (structure plus every semantic check).

Target (issue 11): <= 10 s and <= 1 GB for the whole command. Also prints, in process, the CPU
time of the parse and of each check family, since wall time is only meaningful on an idle
machine.

    python benchmarks/bench_lint.py [--dump FILE] [--services 10000] [--repeat 3] [--json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

TARGET_S, TARGET_MB = 10.0, 1024


def in_process(dump: str) -> dict:
    sys.path.insert(0, str(C.REPO_ROOT))
    from analyzer.checks import CheckContext, load_all
    from analyzer.parse import load_ruleset

    t = time.process_time()
    with open(dump) as f:
        res = load_ruleset((f.read(), dump))
    out = {"parse_cpu_s": round(time.process_time() - t, 2)}
    ctx = CheckContext(res.ruleset, res.files)
    fam: dict = defaultdict(float)
    for code, info in sorted(load_all().items()):
        t = time.process_time()
        list(info.func(ctx))
        fam[code[:3]] += time.process_time() - t
    out["checks_cpu_s"] = {k: round(v, 2) for k, v in sorted(fam.items())}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump")
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    dump = str(C.ensure_dump(args.dump, services=args.services, seed=args.seed))
    best, runs = C.best_of(args.repeat, lambda: C.run_timed(C.synack_cmd("lint", dump), cwd=C.REPO_ROOT))
    # lint exits 1 when it reports findings: that is a result, not a failure
    if best.returncode not in (0, 1):
        sys.stderr.write(best.stderr)
        return 1
    mb = best.maxrss_kib / 1024
    cpu = in_process(dump)
    report = {"dump": dump, "lint_wall_s": round(best.seconds, 2), "all_runs_s": [round(r.seconds, 2) for r in runs],
              "peak_rss_mb": round(mb), **cpu}
    rows = [("synack lint (whole command, best of %d)" % len(runs), f"{best.seconds:.2f} s", f"<= {TARGET_S:.0f} s",
             "PASS" if best.seconds <= TARGET_S else "MISS"),
            ("peak RSS", f"{mb:.0f} MB", f"<= {TARGET_MB} MB", "PASS" if mb <= TARGET_MB else "MISS"),
            ("parse, in process (CPU)", f"{cpu['parse_cpu_s']:.2f} s", "", "")]
    rows += [(f"{k} checks (CPU)", f"{v:.2f} s", "", "") for k, v in cpu["checks_cpu_s"].items()]
    C.emit(report, C.render_table(rows), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
