"""Explain an open flow on any dump: classes, outcome groups and CPU time (user+sys of this
process, the figure to judge on a shared machine), with the load average before and after.

    python benchmarks/bench_open.py DUMP --flow 'tcp 0.0.0.0/0 -> 131.159.14.0/24:22'
        [--from-iface eth0] [--addr CIDR@IFACE ...] [--route '...' ...] [--limit N] [--by fate|path] [--json]

The TUM firewall of the iptables-semantics corpus (issue 7: open-address explain on the largest
firewall there): ../shared/corpus/iptables/iptables-semantics/IPPartEval__TUM_Net__iptables-save-2015-09-03_15-56-50
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dump")
    ap.add_argument("--flow", required=True)
    ap.add_argument("--from-iface", default="eth0")
    ap.add_argument("--addr", action="append", default=[])
    ap.add_argument("--route", action="append", default=[])
    ap.add_argument("--limit", type=int, default=20000, help="most classes (as explain's --max-classes)")
    ap.add_argument("--by", choices=("fate", "path"), default="fate", help="grouping (explain --group-by)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(C.REPO_ROOT))
    from analyzer.netfilter.env import Namespace
    from analyzer.parse import load_path
    from analyzer.parse.flow import parse_flow_spec
    from analyzer.symbolic import explain_open

    load = os.getloadavg()
    c0 = time.process_time()
    rs = load_path(args.dump, lazy=True).ruleset
    load_cpu = time.process_time() - c0
    ns = Namespace()
    for a in args.addr:
        cidr, _, iface = a.partition("@")
        ns.add_addr(cidr, iface)
    for r in args.route:
        ns.add_route(r)
    spec = parse_flow_spec(args.flow, iif=args.from_iface)
    c0, t0 = time.process_time(), time.perf_counter()
    res = explain_open(rs, spec, ns, limit=args.limit, described=0, by=args.by)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    load_after = os.getloadavg()
    rows = [
        (f"open flow '{args.flow}' ({os.path.basename(args.dump)})", f"{cpu:.2f} s CPU", "",
         "complete" if res.complete else f"stopped at {args.limit} classes"),
        ("  wall clock", f"{wall:.2f} s", "", ""),
        (f"  classes / outcome groups (grouped by {res.by})", f"{res.classes} / {len(res.groups)}", "", ""),
        ("  CPU per class", f"{cpu / max(1, res.classes) * 1000:.2f} ms", "", ""),
        ("  load (lazy parse) CPU", f"{load_cpu:.2f} s", "", ""),
        ("  load average before / after", f"{load[0]:.1f} / {load_after[0]:.1f}", "", ""),
    ]
    C.emit({"flow": args.flow, "dump": args.dump, "cpu_s": cpu, "wall_s": wall, "classes": res.classes,
            "groups": len(res.groups), "by": res.by, "complete": res.complete, "load_before": load[0],
            "load_after": load_after[0]}, C.render_table(rows), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
