"""Instructions one phase of the open flow executes, counted by valgrind: a measure of small
speed changes that the shared VM's drifting clock cannot give.

CPU time on the shared 2-core VM drifts by 10-30% between runs of the same code, so a change
worth 3% cannot be seen by timing it. valgrind's cachegrind counts the instructions a process
executes (``--cache-sim=no``: counting only, ~30x slower); the same code on the same input
gives the same count, give or take the hash seed (string hashes change dict layouts), so each
phase is counted under a few ``PYTHONHASHSEED`` values and the mean is printed, the parse's
own count subtracted (the same input parsed by the same code).

    python benchmarks/bench_instructions.py [--services 1000] [--phase hook|open] [--seeds 3]
        [--flow '10.0.0.0/8 -> 10.96.0.0/12'] [--tree PATH] [--json]

``hook``: the PREROUTING set walk alone (`SetWalker.hook`); ``open``: the whole open flow
grouped by fate (`explain_open`, as `bench_explain.py` times it, descriptions apart). ``--tree``
counts another checkout (e.g. ``git worktree add /tmp/base main``) to compare A/B. Counts are
not times: memory-bound work (cache misses) costs more time per instruction on a large dump,
so confirm a change on the 10,000-service dump with `bench_explain.py` too. Needs valgrind.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

#: the child: parse the dump, then run one phase (nothing for "load")
CHILD = r"""
import gc, sys
sys.path.insert(0, sys.argv[1])
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.symbolic import flow_set, flow_space
from analyzer.netfilter.setwalk import SetWalker
from analyzer.parse import load_ruleset
from analyzer.parse.flow import parse_flow_spec
from analyzer.symbolic import explain_open
phase, dump, flow = sys.argv[2], sys.argv[3], sys.argv[4]  # (every import above: not counted in a phase)
rs = load_ruleset((open(dump).read(), dump), lazy=True).ruleset
ns = Namespace()
ns.add_addr("192.168.0.2/24", "eth0")
ns.add_route("default via 192.168.0.1 dev eth0")
ns.add_route("10.244.0.0/16 via 192.168.0.3 dev eth0")
spec = parse_flow_spec(flow, iif="eth0")
if phase == "hook":
    gc.disable()
    space = flow_space(rs, ns, spec)
    universe = flow_set(space, spec)
    SetWalker(rs, ns, space, 4, "eth0", 0, None, tcp_flags=2, shared={}).hook(universe, "PREROUTING", True)
elif phase == "open":
    explain_open(rs, spec, ns, limit=10**6, described=0, by="fate")
"""


def count(tree: str, phase: str, dump: str, flow: str, seed: int, child: str) -> int:
    """The instructions the child executes (valgrind's ``I refs``)."""
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                          sys.executable, child, tree, phase, dump, flow],
                         env=env, capture_output=True, text=True, check=True).stderr
    m = re.search(r"I\s+refs:\s+([\d,]+)", out)
    if m is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{out[-2000:]}")
    return int(m.group(1).replace(",", ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump")
    ap.add_argument("--services", type=int, default=1000, help="generated dump's size (default 1000: ~15 s a count)")
    ap.add_argument("--phase", choices=("hook", "open"), default="hook")
    ap.add_argument("--flow", default="10.0.0.0/8 -> 10.96.0.0/12")
    ap.add_argument("--seeds", type=int, default=3, help="hash seeds counted (the mean is printed)")
    ap.add_argument("--tree", default=str(C.REPO_ROOT), help="the checkout whose analyzer is counted")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        sys.stderr.write("valgrind is not installed (apt install valgrind)\n")
        return 1
    dump = str(C.ensure_dump(args.dump, services=args.services))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
        child = f.name
    try:
        net = []
        for seed in range(1, args.seeds + 1):
            load = count(args.tree, "load", dump, args.flow, seed, child)
            net.append(count(args.tree, args.phase, dump, args.flow, seed, child) - load)
    finally:
        os.unlink(child)
    mean = sum(net) // len(net)
    label = f"{args.phase} of '{args.flow}' on {os.path.basename(dump)} (instructions, mean of {len(net)} hash seed(s))"
    rows = [(label, f"{mean / 1e6:,.1f} M", "", ""),
            ("  per seed", ", ".join(f"{n / 1e6:,.1f} M" for n in net), "", ""),
            ("  tree", args.tree, "", "")]
    C.emit({"phase": args.phase, "flow": args.flow, "dump": dump, "tree": args.tree, "instructions": mean,
            "per_seed": net}, C.render_table(rows), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
