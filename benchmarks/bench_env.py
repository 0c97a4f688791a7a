"""`synack lint --env` of three kube-proxy nodes: every service, every endpoint, both directions.

Target (issue 7): <= 30 s and <= 2 GB for an environment of three kube-proxy nodes (10,000
services, 3 endpoints each, one endpoint per node), covering every service from a client pod on
node0, every endpoint (kube-proxy's statistic branches), request and reply.

The environment (written to the cache directory, deterministic in its arguments):

- node0, node1, node2: the generator's kube-proxy dump of one cluster as each node writes it
  (``local_node`` differs: externalTrafficPolicy=Local rules), eth0 on one switch, cni0 a bridge,
  routes to the other nodes' pod /24s; br_netfilter on (kube-proxy's requirement);
- pods0, pods1, pods2: the endpoints of each node (one namespace per node holding every pod
  address of that node, 10.244.N.2-201; no ``listeners:`` so every port accepts);
- client: a pod on node0's bridge (10.244.0.254), the one client namespace.

    python benchmarks/bench_env.py [--services 10000] [--repeat 1] [--json]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

NODES = 3
PODS_PER_NODE = 200


def build_env(services: int, seed: int, bridge_nf: int = 1) -> str:
    """Write the three dumps and the environment file; return the environment's path."""
    from gen_kubeproxy import build_cluster, kube_proxy_rules, render_save

    key = f"env3-{services}svc-s{seed}-brnf{bridge_nf}-{C._generator_fingerprint()}"
    out = C.CACHE_DIR / key
    env_path = out / "env.yaml"
    if env_path.is_file():
        return str(env_path)
    out.mkdir(parents=True, exist_ok=True)
    cluster = build_cluster(services, seed=seed, endpoints_per_service=3, nodes=NODES)
    for i, svc in enumerate(cluster.services):
        if svc.name == "kubernetes":
            continue  # the API server is outside the cluster network: it leaves the environment
        # three endpoints, one per node
        svc.endpoints = [(f"10.244.{n}.{2 + i % PODS_PER_NODE}", n) for n in range(NODES)]
    lines = ["# three kube-proxy nodes (benchmarks/bench_env.py)", "clients: [client]", "namespaces:"]
    for n in range(NODES):
        cluster.local_node = n
        (out / f"node{n}.rules").write_text(render_save(kube_proxy_rules(cluster)))
        routes = [f'"10.244.{m}.0/24 via 192.168.0.{10 + m} dev eth0"' for m in range(NODES) if m != n]
        lines += [f"  node{n}:", f"    iptables: node{n}.rules",
                  f"    addresses: [192.168.0.{10 + n}/24@eth0, 10.244.{n}.1/24@cni0]",
                  f"    routes: [{', '.join(routes)}]",
                  f"    sysctls: {{net.ipv4.ip_forward: 1, net.bridge.bridge-nf-call-iptables: {bridge_nf}}}"]
        addrs = ", ".join(f"10.244.{n}.{h}/24@eth0" for h in range(2, 2 + PODS_PER_NODE))
        lines += [f"  pods{n}:", f"    addresses: [{addrs}]", f'    routes: ["default via 10.244.{n}.1"]']
    lines += ["  client:", "    addresses: [10.244.0.254/24@eth0]", '    routes: ["default via 10.244.0.1"]',
              "links:", "  - segment: [" + ", ".join(f"node{n}:eth0" for n in range(NODES)) + "]"]
    for n in range(NODES):
        ports = [f"pods{n}:eth0"] + (["client:eth0"] if n == 0 else [])
        lines.append(f"  - bridge: {{namespace: node{n}, name: cni0, ports: [{', '.join(ports)}]}}")
    env_path.write_text("\n".join(lines) + "\n")
    return str(env_path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--bridge-nf", type=int, default=1, choices=(0, 1),
                    help="bridge-nf-call-iptables on the nodes (0: every same-node endpoint is NAT001)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", metavar="FILE",
                    help="write synack's JSON output there (to compare findings before/after a change)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="synack's --jobs (default: not given, synack's own default: one process per CPU)")
    ap.add_argument("--pss", action="store_true",
                    help="measure the process tree's memory as summed PSS (exact sharing; reading it "
                         "slows the run) instead of summed RSS (an upper bound)")
    args = ap.parse_args(argv)
    env = build_env(args.services, args.seed, args.bridge_nf)
    cmd = C.synack_cmd("lint", "--env", env, "-o", "json", "--select", "NAT",
                       *(("--jobs", str(args.jobs)) if args.jobs is not None else ()))
    best, _ = C.best_of(args.repeat, lambda: C.run_timed(cmd, cwd=C.REPO_ROOT, tree_memory="pss" if args.pss else True))
    if best.returncode not in (0, 1):
        sys.stderr.write(best.stderr)
        return 1
    import json

    doc = json.loads(best.stdout)
    if args.save:
        with open(args.save, "w") as f:
            f.write(best.stdout)
    cov = doc.get("coverage", {})
    codes: dict[str, int] = {}
    for d in doc["diagnostics"]:
        codes[d["code"]] = codes.get(d["code"], 0) + 1
    t = C.Target("time", best.seconds, 30.0, " s")
    # the memory of the whole process tree (synack and the workers it forks): summed RSS (an
    # upper bound: pages the workers share copy-on-write count once per process), or with --pss
    # summed PSS
    tree_mb = max(best.tree_kib, best.maxrss_kib) / 1024.0
    mem_label = "summed PSS" if args.pss else "summed RSS, an upper bound"
    m = C.Target("peak memory", tree_mb, 2048.0, " MB")
    rows = [("environment", env, "", ""),
            ("flows (services x clients)", str(cov.get("flows")), "", ""),
            ("outcomes (endpoint branches)", str(cov.get("outcomes")), "", ""),
            ("replies followed", str(cov.get("replies_followed")), "", ""),
            ("findings", ", ".join(f"{k} {v}" for k, v in sorted(codes.items())) or "none", "", ""),
            ("synack lint --env, wall", f"{best.seconds:.1f} s", "<= 30 s", t.verdict),
            ("CPU (user+sys, every process)", f"{best.cpu_seconds:.1f} s", "", ""),
            (f"peak memory of the process tree ({mem_label})", f"{tree_mb:.0f} MB", "<= 2048 MB", m.verdict),
            ("  largest process (ru_maxrss)", f"{best.maxrss_mb:.0f} MB", "", ""),
            ("load average (1, 5, 15 min)", " ".join(f"{x:.1f}" for x in os.getloadavg()), "", "")]
    C.emit({"env": env, "coverage": cov, "findings": codes, "time": t.as_dict(), "cpu_seconds": best.cpu_seconds,
            "memory": m.as_dict(), "largest_process_rss_mb": best.maxrss_mb, "jobs": args.jobs,
            "load": os.getloadavg()},
           C.render_table(rows), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
