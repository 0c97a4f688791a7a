"""`-m set` with `ipset save` contents: synack's verdict per flow equals what the kernel does
with the same sets loaded in the router's namespace (ipset is per network namespace)."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from analyzer.explain import explain_flow
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.walk import parse_flow
from analyzer.parse import load_path
from analyzer.parse.ipset import load_ipsets

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "samples" / "explain" / "ipset.rules"
SETS = ROOT / "samples" / "explain" / "ipset-allowed.save"

# (client address, destination port) -> (synack disposition, what the client sees)
CASES = [
    (("10.0.1.2", 8080), ("forwarded", "ok")),        # source in allowed-clients
    (("10.0.3.2", 8080), ("dropped", "timeout")),     # source not in the set: policy DROP
    (("10.0.1.2", 9090), ("rejected", "refused")),    # dst,dst in blocked-ports: tcp-reset
]


def predict(src, dport, sets):
    ns = Namespace()
    ns.add_addr("10.0.1.1/24", "r1")
    ns.add_addr("10.0.3.1/24", "r3")
    ns.add_addr("10.0.2.1/24", "r2")
    ns.ipsets.update(sets)
    pkt = replace(parse_flow(f"tcp {src}:41000 -> 10.0.2.2:{dport}"), iif="r1" if src.startswith("10.0.1.") else "r3")
    (oc,) = explain_flow(load_path(str(RULES)).ruleset, pkt, ns)
    assert oc.confidence == "EXACT"
    return oc.disposition


@pytest.mark.skipif(shutil.which("ipset") is None, reason="ipset is not installed")
def test_ipset_verdicts_agree_with_the_kernel(lab):
    sets, diags = load_ipsets(SETS.read_text(), str(SETS))
    assert diags == []
    client, client3 = lab.netns("client"), lab.netns("client3")
    router, server = lab.netns("router", forwarding=True), lab.netns("server")
    lab.veth(client, router, addr_a="10.0.1.2/24", addr_b="10.0.1.1/24", name_b="r1")
    lab.veth(client3, router, addr_a="10.0.3.2/24", addr_b="10.0.3.1/24", name_b="r3")
    lab.veth(server, router, addr_a="10.0.2.2/24", addr_b="10.0.2.1/24", name_b="r2")
    client.route("default via 10.0.1.1")
    client3.route("default via 10.0.3.1")
    server.route("default via 10.0.2.1")
    router.run(["ipset", "restore"], input=SETS.read_text())
    router.iptables_restore(RULES.read_text(), backend="nft")
    server.listen_tcp("0.0.0.0", 8080)
    server.listen_tcp("0.0.0.0", 9090)
    for (src, dport), (want, seen) in CASES:
        assert predict(src, dport, sets) == want
        who = client if src.startswith("10.0.1.") else client3
        res = who.connect_tcp("10.0.2.2", dport, timeout=1.5)
        assert res.outcome == seen, (src, dport, res)
