#!/usr/bin/env python3
"""Benchmark: ``synack diff`` of two consecutive kube-proxy syncs of the 10,000-service dump.

The second sync adds one ClusterIP service (with endpoints) and removes one endpoint of another
ClusterIP service; everything else is the same cluster, rendered again (rules of unchanged
services keep their text; lines move). The target: the diff names exactly the flows of those two
services (their ClusterIP:port), in <= 10 s.

    python benchmarks/bench_diff.py                 # 10,000 services, best of 3
    python benchmarks/bench_diff.py --services 2000 --json
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from gen_kubeproxy import Service, ServicePort, build_cluster, kube_proxy_rules, render_save  # noqa: E402

TARGET_SECONDS = 10.0


def two_syncs(services: int, seed: int = 0):
    """(old text, new text, the added service, the service that lost an endpoint)."""
    cluster = build_cluster(services, seed=seed)
    old = render_save(kube_proxy_rules(cluster))
    nxt = copy.deepcopy(cluster)
    shrink = next(s for s in nxt.services[2:] if s.type == "ClusterIP" and len(s.endpoints) >= 3
                  and len(s.ports) == 1 and not s.affinity)
    shrink.endpoints = shrink.endpoints[:-1]
    used = {s.cluster_ip for s in nxt.services}
    ip = next(f"10.96.{a}.{b}" for a in range(200, 255) for b in range(2, 255) if f"10.96.{a}.{b}" not in used)
    added = Service("payments-000", "bench-added", "ClusterIP", ip, [ServicePort("", "tcp", 8080, 8080)],
                    endpoints=[("10.244.7.201", 7), ("10.244.9.202", 9)])
    nxt.services.append(added)
    new = render_save(kube_proxy_rules(nxt))
    return old, new, added, shrink


def expected_flows(added, shrink) -> set:
    return {(added.cluster_ip, p.port) for p in added.ports} | {(shrink.cluster_ip, p.port) for p in shrink.ports}


def named_flows(doc) -> set:
    """(dst, dport) of each changed class's witness."""
    out = set()
    for c in doc["changes"]:
        w = c["witness"].split(" -> ")[1]
        addr, _, port = w.rpartition(":")
        out.add((addr, int(port)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    old, new, added, shrink = two_syncs(args.services, args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="synack-bench-diff-"))
    po, pn = tmp / "sync1.rules", tmp / "sync2.rules"
    po.write_text(old)
    pn.write_text(new)
    cmd = [sys.executable, "-m", "analyzer", "diff", str(po), str(pn), "-o", "json",
           "--addr", "10.244.0.1/24@cni0", "--addr", "192.168.0.10/24@eth0",
           "--route", "default via 192.168.0.1 dev eth0", "--route", "10.244.0.0/16 via 10.244.0.1 dev cni0"]
    best, best_cpu, doc, rc = None, None, None, None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCH_DIR.parent)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        best_cpu = cpu if best_cpu is None else min(best_cpu, cpu)
        rc = p.returncode
        if rc not in (0, 1):
            sys.stderr.write(p.stderr)
            return 1
        doc = json.loads(p.stdout)
        best = dt if best is None else min(best, dt)
    want = expected_flows(added, shrink)
    got = named_flows(doc)
    exact = got == want
    result = {"services": args.services, "lines_old": old.count("\n"), "lines_new": new.count("\n"),
              "seconds_best": round(best, 3), "cpu_seconds_best": round(best_cpu, 3),
              "load_average": round(__import__("os").getloadavg()[0], 2), "target_seconds": TARGET_SECONDS,
              "time_ok": best <= TARGET_SECONDS, "exit_code": rc,
              "rule_changes": len(doc["rule_changes"]), "classes_explored": doc["classes_explored"],
              "changes": [(c["kind"], c["packets"], c["entry"]) for c in doc["changes"]],
              "expected_flows": sorted(f"{a}:{p}" for a, p in want),
              "named_flows": sorted(f"{a}:{p}" for a, p in got), "exact": exact}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"synack diff, two kube-proxy syncs of {args.services} services "
              f"({result['lines_old']} -> {result['lines_new']} lines), best of {args.repeat}")
        print(f"  time            {best:.2f} s wall, {best_cpu:.2f} s CPU (target <= {TARGET_SECONDS:.0f} s: "
              f"{'PASS' if result['time_ok'] else 'MISS'}); load average {result['load_average']}")
        print(f"  rule changes    {result['rule_changes']}; classes explored {result['classes_explored']}")
        for k, pk, e in result["changes"]:
            print(f"  change          {k}: {pk} ({e})")
        print(f"  expected flows  {', '.join(result['expected_flows'])}")
        print(f"  named flows     {', '.join(result['named_flows'])}  ({'EXACT' if exact else 'MISMATCH'})")
    return 0 if exact and result["time_ok"] else 2


if __name__ == "__main__":
    raise SystemExit(main())
