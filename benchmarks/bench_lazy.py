"""Lazy decode of the rules an open-flow explain reads: the kube-proxy chains of the 10,000-service
dump (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*, KUBE-MARK-MASQ), loaded as `synack explain` loads it
(`load_ruleset(lazy=True)`), then every rule's options decoded on first use. CPU time of this
process (user + sys), with the cyclic GC on and paused (as explain's walks pause it), and the load
average.

    python benchmarks/bench_lazy.py [DUMP] [--repeat N] [--check]

``--check`` also parses the dump eagerly and compares every decoded rule and the diagnostics.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

PREFIXES = ("KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "KUBE-MARK-MASQ")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump", nargs="?")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="compare with the eager parse")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(C.REPO_ROOT))
    from analyzer.parse import load_ruleset

    path = str(C.ensure_dump(args.dump))
    with open(path) as f:
        text = f.read()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for _ in range(args.repeat):
        # explain's walks pause the cyclic GC (symbolic._cyclic_gc_paused): both ways measured
        for gc_on in (True, False):
            t = time.process_time()
            res = load_ruleset((text, path), lazy=True)
            load = time.process_time() - t
            nat = res.ruleset.tables["nat"]
            rules = [r for name, c in nat.chains.items() if name.startswith(PREFIXES) for r in c.rules]
            if not gc_on:
                gc.disable()
            t = time.process_time()
            for r in rules:
                r.matches
            took = time.process_time() - t
            gc.enable()
            print(f"load {load:.3f} s; {len(rules):,} rules decoded in {took:.3f} s CPU "
                  f"({took / len(rules) * 1e6:.1f} us a rule), GC {'on' if gc_on else 'off'}; "
                  f"late diagnostics {len(res.late_diagnostics())}; load average {os.getloadavg()[0]:.2f}")
            del res, nat, rules
    if args.check:
        eager = load_ruleset((text, path), lazy=False)
        lazy = load_ruleset((text, path), lazy=True)
        want = {(r.table, r.chain, r.span.line): r for r in eager.ruleset.rules()}
        n = extra = 0
        for b in lazy.ruleset.rules():
            a = want.pop((b.table, b.chain, b.span.line), None)
            if a is None:  # refused whole, or of the other family: the eager parse drops it
                assert (b.matches, b.target) == ((), None), b
                extra += 1
                continue
            assert (a.matches, a.target) == (b.matches, b.target), (a, b)
            n += 1
        assert not want, list(want)[:3]
        # the eager parse adds "used N more times" to a repeated value's message: code and place
        assert sorted(repr((d.code, d.span)) for d in eager.diagnostics) == \
            sorted(repr((d.code, d.span)) for d in lazy.diagnostics + lazy.late_diagnostics())
        print(f"check: {n:,} rules equal to the eager parse's; {extra:,} rules it drops kept empty")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
