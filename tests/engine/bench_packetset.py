#!/usr/bin/env python3
"""Benchmark of the engine's packet-set layer on a service-style workload (not a test).

Workload: N sets ``family=4 & proto=6 & dst=10.96.X.Y/32 & dport=P`` (distinct X.Y, P from
kube-proxy's common service ports), OR them into one set, then AND a concrete flow with each
set and with the union.  Run::

    python tests/engine/bench_packetset.py                  # cudd, every layout
    python tests/engine/bench_packetset.py --backend autoref -n 2000

Layouts compared (all keep each field contiguous, MSB first, mark/connmark interleaved):

    default   family proto dst dport src sport ... ctstate      (LAYOUT)
    src-first family proto src sport dst dport ...
    5-tuple   family proto src dst sport dport ...
    port-first family proto dport dst src sport ...
    meta-top  family proto iif oif mark/connmark ctstate ... dst dport src sport ...

plus "hi-zero" (default layout, but IPv4 high address bits pinned to 0 in every set, the
encoding the engine does *not* use) and "sifted" (CUDD's sifting run on the final union).
"""
from __future__ import annotations

import argparse
import gc
import ipaddress
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from analyzer.engine import LAYOUT, Flow, PacketSpace  # noqa: E402

PORTS = (80, 8080, 443, 8443, 9090, 3000, 5000, 6379, 5432, 9200, 27017, 8000, 7000, 11211)


def _reorder(first: list[str]) -> tuple:
    rest = [e for e in LAYOUT if (e[0] if isinstance(e[0], str) else e[0][0]) not in first]
    by_name = {(e[0] if isinstance(e[0], str) else e[0][0]): e for e in LAYOUT}
    return tuple(by_name[n] for n in first) + tuple(rest)


LAYOUTS = {
    "default": LAYOUT,
    "src-first": _reorder(["family", "proto", "src", "sport", "dst", "dport"]),
    "5-tuple": _reorder(["family", "proto", "src", "dst", "sport", "dport"]),
    "port-first": _reorder(["family", "proto", "dport", "dst", "src", "sport"]),
    "meta-top": _reorder(["family", "proto", "iif", "oif", "mark", "ctstate", "dst", "dport",
                          "src", "sport"]),
}


def workload(n: int, seed: int = 1):
    rng = random.Random(seed)
    hosts = rng.sample(range(65536), n)
    nets = [ipaddress.IPv4Network((0x0A600000 | h, 32)) for h in hosts]
    ports = [rng.choice(PORTS) for _ in range(n)]
    return nets, ports


def bench(layout_name: str, backend: str, n: int, hi_zero: bool = False, sift: bool = False) -> dict:
    space = PacketSpace(LAYOUTS[layout_name], backend=backend)
    nets, ports = workload(n)
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        sets = [space.where(proto=6, dst=net, dport=p) for net, p in zip(nets, ports)]
        if hi_zero:
            sets = [space._set(s.node & space._rep_u) for s in sets]
        t_where = time.perf_counter() - t0

        t0 = time.perf_counter()
        parts = [space.prefix("dst", net) & space.eq("proto", 6) & space.eq("dport", p)
                 for net, p in zip(nets[:2000], ports[:2000])]
        t_parts = (time.perf_counter() - t0) / len(parts)
        assert hi_zero or parts == sets[:2000]
        del parts

        # one /32 + port set, repeatedly, on fresh addresses (no cache hits on the result)
        fresh = [ipaddress.IPv4Network((0x0AF00000 | i, 32)) for i in range(2000)]
        samples = []
        for i in range(0, 2000, 100):
            t0 = time.perf_counter()
            for net in fresh[i:i + 100]:
                s = space.where(proto=6, dst=net, dport=443)
                if hi_zero:
                    s.node & space._rep_u
            samples.append((time.perf_counter() - t0) / 100)
        t_one = statistics.median(samples)

        t0 = time.perf_counter()
        union = space.union(sets)
        t_or = time.perf_counter() - t0

        t0 = time.perf_counter()
        nodes = [s.node for s in sets]
        while len(nodes) > 1:
            nodes = [nodes[i] | nodes[i + 1] if i + 1 < len(nodes) else nodes[i]
                     for i in range(0, len(nodes), 2)]
        t_tree = time.perf_counter() - t0
        assert nodes[0] == union.node

        k = n // 2
        f = Flow("10.1.2.3", str(nets[k].network_address), sport=40000, dport=ports[k])
        t0 = time.perf_counter()
        one = space.from_flow(f)
        t_flow = time.perf_counter() - t0
        t0 = time.perf_counter()
        hits = sum(not (one & s).is_empty() for s in sets)
        t_and = time.perf_counter() - t0
        assert hits >= 1, hits
        t0 = time.perf_counter()
        assert not (one & union).is_empty()
        t_and_union = time.perf_counter() - t0
        t0 = time.perf_counter()
        witness = union.pick_flow()
        t_pick = time.perf_counter() - t0
        assert witness in union
        size = union.node.dag_size
        sifted = None
        if sift and backend == "cudd":
            t0 = time.perf_counter()
            space.bdd.reorder()
            sifted = (union.node.dag_size, time.perf_counter() - t0)
    finally:
        gc.enable()
    return dict(layout=layout_name + (" hi-zero" if hi_zero else ""), backend=backend, n=n,
                where_us=t_where / n * 1e6, parts_us=t_parts * 1e6, one_us=t_one * 1e6,
                or_ms=t_or * 1e3, tree_ms=t_tree * 1e3, size=size,
                flow_us=t_flow * 1e6, and_each_us=t_and / n * 1e6, and_union_us=t_and_union * 1e6,
                pick_us=t_pick * 1e6, sifted=sifted)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cudd", choices=["cudd", "autoref"])
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--layout", action="append", choices=sorted(LAYOUTS))
    ap.add_argument("--repeat", type=int, default=3, help="best of R runs (timings are noisy)")
    ap.add_argument("--sift", action="store_true", help="also time CUDD sifting on the union")
    args = ap.parse_args(argv)
    runs = [(name, False) for name in args.layout or LAYOUTS]
    if not args.layout:
        runs.append(("default", True))
    rows = []
    for name, hi_zero in runs:
        results = [bench(name, args.backend, args.n, hi_zero=hi_zero,
                         sift=args.sift and name == "default" and not hi_zero and r == 0)
                   for r in range(args.repeat)]
        best = {k: min(r[k] for r in results) if isinstance(v, float) else v
                for k, v in results[0].items()}
        rows.append(best)
    head = (f"{'layout':18} {'where':>7} {'3 ops':>7} {'one':>6} {'OR':>8} {'OR tree':>8} {'nodes':>7} "
            f"{'flow':>6} {'AND each':>8} {'AND U':>6} {'pick':>6}")
    print(f"backend={args.backend} n={args.n}  (us per set unless ms)")
    print(head)
    for r in rows:
        print(f"{r['layout']:18} {r['where_us']:7.1f} {r['parts_us']:7.1f} {r['one_us']:6.1f} "
              f"{r['or_ms']:6.0f}ms {r['tree_ms']:6.0f}ms {r['size']:7d} {r['flow_us']:6.0f} "
              f"{r['and_each_us']:8.2f} {r['and_union_us']:6.0f} {r['pick_us']:6.0f}")
        if r["sifted"]:
            print(f"{'':18} after sifting: {r['sifted'][0]} nodes in {r['sifted'][1] * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
