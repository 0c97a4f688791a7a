#!/usr/bin/env python3
"""Deterministic generator of a Cilium node's `cilium-dbg service list` (1.15+ layout: /TCP
suffixes, backend states) and the same services as `cilium-dbg service list -o json`.

Each service gets a ClusterIP frontend with 1-4 backends; every fifth also a NodePort on
0.0.0.0 and on the node address (what kube-proxy replacement shows), so N services give about
1.4 N frontends.

    python benchmarks/gen_cilium.py --services 10000 --out /tmp/svc   # /tmp/svc.txt, /tmp/svc.json
"""
from __future__ import annotations

import argparse
import json
import random


def services(n: int, seed: int = 0):
    rnd = random.Random(seed)
    sid = 0
    for i in range(n):
        vip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        port = rnd.choice((80, 443, 8080, 53, 9090))
        proto = "UDP" if port == 53 and rnd.random() < 0.5 else "TCP"
        backends = [(f"10.244.{rnd.randrange(256)}.{rnd.randrange(1, 255)}", port + 8000 if port != 53 else 53,
                     rnd.choice(("active",) * 18 + ("terminating", "quarantined")))
                    for _ in range(rnd.randrange(1, 5))]
        fronts = [(vip, port, "ClusterIP")]
        if i % 5 == 0:
            np = 30000 + i % 2768
            fronts += [("0.0.0.0", np, "NodePort"), ("192.168.1.10", np, "NodePort")]
        for addr, p, typ in fronts:
            sid += 1
            yield sid, addr, p, proto, typ, backends


def to_text(rows) -> str:
    out = [f"{'ID':<7}{'Frontend':<26}{'Service Type':<15}Backend"]
    for sid, addr, port, proto, typ, backends in rows:
        for j, (ip, bport, state) in enumerate(backends):
            head = f"{sid:<7}{f'{addr}:{port}/{proto}':<26}{typ:<15}" if j == 0 else " " * 48
            out.append(f"{head}{j + 1} => {ip}:{bport}/{proto} ({state})")
    return "\n".join(out) + "\n"


def to_json(rows) -> str:
    doc = []
    for sid, addr, port, proto, typ, backends in rows:
        spec = {"id": sid, "frontend-address": {"ip": addr, "port": port, "protocol": proto, "scope": "external"},
                "flags": {"type": typ, "trafficPolicy": "Cluster", "extTrafficPolicy": "Cluster",
                          "intTrafficPolicy": "Cluster", "name": f"svc{sid}", "namespace": "default"},
                "backend-addresses": [{"ip": ip, "port": bport, "protocol": proto, "state": st, "weight": 100,
                                       "preferred": True} for ip, bport, st in backends]}
        doc.append({"spec": spec, "status": {"realized": spec}})
    return json.dumps(doc, indent=2) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.txt and PREFIX.json")
    a = ap.parse_args(argv)
    rows = list(services(a.services, a.seed))
    with open(a.out + ".txt", "w") as f:
        f.write(to_text(rows))
    with open(a.out + ".json", "w") as f:
        f.write(to_json(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
