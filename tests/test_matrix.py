"""synack matrix: the service matrix against brute force (concrete walks of random packets over
random chains), and the command's outputs."""
from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path

import pytest

from analyzer.cli import main
from analyzer.matrix import SPORT, service_matrix
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.walk import Branch, Conntrack, Packet, Walker
from analyzer.parse import load_ruleset

ROOT = Path(__file__).resolve().parents[1]
NETS = [None, "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "192.168.0.0/16", "10.1.2.0/24"]
HOSTS = ["10.1.2.3", "10.1.2.9", "10.1.9.9", "10.9.9.9", "192.168.1.1", "172.16.0.1", "8.8.8.8"]


def _cond(rnd):
    parts = []
    for opt in ("-s", "-d"):
        n = rnd.choice(NETS)
        if n:
            parts.append(("! " if rnd.random() < 0.2 else "") + f"{opt} {n}")
    if rnd.random() < 0.6:
        proto = rnd.choice(["tcp", "udp"])
        parts.append(f"-p {proto}")
        port = rnd.choice([None, "22", "80", "20:30"])
        if port:
            parts.append(f"-m {proto} --dport {port}")
    return " ".join(parts)


def random_dump(rnd, cond=_cond, rules=(2, 8), targets=("ACCEPT", "DROP", "REJECT", "USER", "RETURN")):
    """A random filter table: FORWARD rules of conditions ``cond`` jumping to ``targets`` (or a
    user chain USER)."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", f":FORWARD {rnd.choice(['ACCEPT', 'DROP'])} [0:0]",
             ":OUTPUT ACCEPT [0:0]", ":USER - [0:0]"]
    for _ in range(rnd.randint(*rules)):
        lines.append(f"-A FORWARD {cond(rnd)} -j {rnd.choice(targets)}")
    for _ in range(rnd.randint(1, 3)):
        lines.append(f"-A USER {cond(rnd)} -j {rnd.choice(['ACCEPT', 'DROP', 'RETURN'])}")
    return "\n".join(lines + ["COMMIT", ""]).replace("  ", " ")


def accepted(rs, src, dst, dport):
    pkt = Packet(4, 6, ipaddress.ip_address(src), ipaddress.ip_address(dst), SPORT, dport,
                 iif="eth0", oif="eth1")
    br = Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport))
    [out] = Walker(rs, Namespace()).run_table(br, "filter", "FORWARD")
    return out.disposition is None


def class_of(m, addr):
    a = ipaddress.ip_address(addr)
    return next(c.name for c in m.sources if any(lo <= a <= hi for lo, hi in c.ranges))


@pytest.mark.parametrize("seed", range(40))
def test_matrix_agrees_with_concrete_walks(seed):
    rnd = random.Random(seed)
    text = random_dump(rnd)
    rs = load_ruleset((text, "r.rules")).ruleset
    for dport in (22, 80):
        m = service_matrix(rs, "FORWARD", dport)
        assert not m.approximate
        edges = set(m.edges)
        for src in HOSTS:
            for dst in HOSTS:
                want = accepted(rs, src, dst, dport)
                assert ((class_of(m, src), class_of(m, dst)) in edges) == want, (text, src, dst, dport)


def test_classes_partition_the_address_space():
    rs = load_ruleset((random_dump(random.Random(3)), "r.rules")).ruleset
    m = service_matrix(rs, "FORWARD", 22)
    total = sum(int(hi) - int(lo) + 1 for c in m.sources for lo, hi in c.ranges)
    assert total == 2 ** 32


def test_matrix_command_outputs(capsys):
    dump = str(ROOT / "samples" / "checks" / "FLT001" / "bad.rules")
    assert main(["matrix", dump, "--chain", "INPUT", "--dport", "22"]) == 0
    text = capsys.readouterr().out
    # loopback (fffuu's default assignment lo = [127.0.0.0/8]) and the bastion reach everything
    assert "b |-> {127.0.0.0/8 u 192.0.2.10/32}" in text and "(b,a)" in text
    assert main(["matrix", dump, "--chain", "INPUT", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == "1.1" and ["b", "a"] in doc["matrices"][0]["edges"]
    assert doc["spoofing"] is None
    assert main(["matrix", dump, "--chain", "INPUT", "-o", "dot"]) == 0
    assert capsys.readouterr().out.startswith('digraph "service matrix tcp/22"')
    assert main(["matrix", dump, "--chain", "NOPE"]) == 2


def test_matrix_dot_is_the_matrix_as_a_table_and_svg_draws_it(capsys):
    import shutil
    dump = str(ROOT / "samples" / "checks" / "FLT001" / "bad.rules")
    assert main(["matrix", dump, "--chain", "INPUT", "--dport", "22", "--dport", "443", "-o", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.count("digraph") == 2 and 'TOOLTIP="b -&gt; a"' in dot and "192.0.2.10/32" in dot
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    assert main(["matrix", dump, "--chain", "INPUT", "-o", "svg"]) == 0
    assert "<svg" in capsys.readouterr().out


# ----------------------------------------------------- interfaces tied to addresses by routes
ROUTES = ["10.0.0.0/8 dev lan0", "192.168.0.0/16 dev dmz0", "default via 203.0.113.1 dev wan0"]
ROUTED = {"10": "lan0", "192": "dmz0"}
IF_NETS = [None, "10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "8.0.0.0/8"]


def _route_of(addr):
    return ROUTED.get(addr.split(".")[0], "wan0")


def _iface_cond(rnd):
    parts = []
    for opt in ("-i", "-o"):
        if rnd.random() < 0.5:
            parts.append(("! " if rnd.random() < 0.2 else "") + f"{opt} {rnd.choice(['lan0', 'dmz0', 'wan0'])}")
    for opt in ("-s", "-d"):
        n = rnd.choice(IF_NETS)
        if n:
            parts.append(f"{opt} {n}")
    return " ".join(parts)


@pytest.mark.parametrize("seed", range(25))
def test_matrix_with_routes_agrees_with_walks_on_the_routed_interfaces(seed):
    """With the host's routes, a packet arrives on an interface whose routes hold its source
    (or one no route names) and leaves by the one its destination is routed to: an edge exists
    exactly when some such walk accepts."""
    from analyzer.matrix import assignment_from_routes
    rnd = random.Random(1000 + seed)
    text = random_dump(rnd, _iface_cond, (2, 7), ("ACCEPT", "DROP", "USER"))
    rs = load_ruleset((text, "r.rules")).ruleset
    ns = Namespace()
    ns.add_addr("203.0.113.2/30", "wan0")
    for r in ROUTES:
        ns.add_route(r)
    routes = assignment_from_routes(ns, 4)
    m = service_matrix(rs, "FORWARD", 22, ipassmt=routes, routes=routes)
    assert m.routed and not m.approximate
    edges = set(m.edges)
    hosts = ["10.1.2.3", "10.9.9.9", "192.168.1.1", "8.8.8.8", "9.9.9.9"]
    for src in hosts:
        for dst in hosts:
            walked = False
            for iif in (_route_of(src), "other0"):
                pkt = Packet(4, 6, ipaddress.ip_address(src), ipaddress.ip_address(dst), SPORT, 22,
                             iif=iif, oif=_route_of(dst))
                br = Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport))
                [out] = Walker(rs, Namespace()).run_table(br, "filter", "FORWARD")
                walked = walked or out.disposition is None
            assert ((class_of(m, src), class_of(m, dst)) in edges) == walked, (text, src, dst)
