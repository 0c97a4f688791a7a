"""Open marks, conntrack state, TCP flags and owner on corpus dumps: how many classes each open
field makes and what they cost (CPU seconds in process, the dump loaded lazily as `synack
explain` loads it). Needs the corpus (SYNACK_CORPUS, default ../shared/corpus).

    python benchmarks/bench_open_fields.py
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analyzer.netfilter.env import Namespace  # noqa: E402
from analyzer.parse import load_path  # noqa: E402
from analyzer.symbolic import explain_classes, explain_open_flow, parse_flow_spec  # noqa: E402

CORPUS = Path(os.environ.get("SYNACK_CORPUS", ROOT.parent / "shared" / "corpus"))
CALICO = ("iptables/calico/aks-kubenet-calico__filter-list-rules.txt",
          {"eth0": "10.240.0.4/16", "cbr0": "10.244.0.1/24"}, "cali112d888c0c2")
WORKER = ("iptables/kube-proxy-nodes/unknown__flannel-kubeproxy-iptables__k8s-worker1.save",
          {"eth0": "192.168.0.21/24", "cni0": "10.244.1.1/24"}, "eth0")
CASES = [
    (CALICO, "tcp 10.244.1.5 -> 10.244.0.0/24:80"),
    (CALICO, "tcp 10.244.1.5 -> 10.244.0.0/24:80 mark any"),
    (CALICO, "tcp 10.244.1.5 -> 10.244.0.0/24:80 mark any ctstate any"),
    (CALICO, "tcp 10.244.1.5 -> 10.244.0.0/24:80 mark any ctstate any flags any"),
    (WORKER, "tcp 10.0.0.0/8 -> 10.96.0.0/12:80"),
    (WORKER, "tcp 10.0.0.0/8 -> 10.96.0.0/12:80 mark any ctstate any connmark any"),
]


def main() -> None:
    print(f"load average {os.getloadavg()[0]:.1f} (a shared machine: CPU time is the figure to read)")
    print("| dump | flow | classes | groups | complete | CPU s |")
    print("|---|---|---|---|---|---|")
    for (path, addrs, iif), flow in CASES:
        p = CORPUS / path
        if not p.exists():
            print(f"skip {path}: corpus not present")
            continue
        rs = load_path(str(p), lazy=True).ruleset
        ns = Namespace()
        for iface, cidr in addrs.items():
            ns.add_addr(cidr, iface)
        ns.add_route(f"default via {addrs['eth0'].rsplit('.', 1)[0]}.1 dev eth0")
        spec = parse_flow_spec(flow, iif=iif)
        t0 = time.process_time()
        classes, rest, _ = explain_classes(rs, spec, ns)
        groups, complete = explain_open_flow(rs, spec, ns)
        cpu = (time.process_time() - t0) / 2
        print(f"| {Path(path).name[:40]} | `{flow}` | {len(classes)} | {len(groups)} | {complete} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
