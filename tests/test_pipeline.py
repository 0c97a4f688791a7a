"""The kernel's path through a namespace as data (analyzer/netfilter/pipeline.py)."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from pathlib import Path

import pytest

from analyzer.model.packet import Packet, with_ifaces
from analyzer.netfilter import pipeline
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.trace import Route
from analyzer.netfilter.walk import Walker
from analyzer.parse import load_ruleset

ROOT = Path(__file__).resolve().parent.parent
A = ipaddress.ip_address


def test_design_doc_shows_the_paths_as_written():
    doc = (ROOT / "docs" / "design.md").read_text()
    assert pipeline.markdown() in doc


def test_every_stage_names_a_kernel_function():
    for name, _ in pipeline.NAMES:
        for s in getattr(pipeline, name):
            assert re.fullmatch(r"[a-z_][a-z0-9_]*", s.kernel), (name, s)


def test_hooks_in_the_kernel_order():
    def hooks(path):
        return [s.name for s in path if s.name.isupper()]
    assert hooks(pipeline.ARRIVE) == ["PREROUTING"]
    assert hooks(pipeline.FORWARD) == ["FORWARD", "POSTROUTING"]
    assert hooks(pipeline.LOCAL_IN) == ["INPUT"]
    assert hooks(pipeline.LOCAL_OUT) == ["OUTPUT", "POSTROUTING"]
    assert hooks(pipeline.LOOPBACK) == ["PREROUTING", "INPUT"]
    assert hooks(pipeline.BRIDGED) == ["PREROUTING", "FORWARD", "POSTROUTING"]


def test_with_ifaces_is_replace():
    p = Packet(4, 6, A("10.0.0.1"), A("10.0.0.2"), 1, 2, "eth0", "eth1", 7, 0x12, None, None, 5, 6)
    assert with_ifaces(p, None, "lo") == replace(p, iif=None, oif="lo")
    assert with_ifaces(p, "a", "b") == replace(p, iif="a", oif="b")


def _walker(rules: str, *addrs, routes=(), sysctls=None) -> Walker:
    ns = Namespace()
    for a in addrs:
        ns.add_addr(*a.split("@"))
    for r in routes:
        ns.add_route(r)
    for k, v in (sysctls or {}).items():
        ns.sysctls[k] = v
    return Walker(load_ruleset((rules, "t.rules")).ruleset, ns)


FILTER = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
         "-A FORWARD -p tcp --dport 80 -j ACCEPT\nCOMMIT\n"


def _run(w, pkt, iif, **kw):
    return pipeline.run(w, None, "x", pkt, iif, None, **kw)


def test_arrive_forwards_through_forward_and_postrouting():
    w = _walker(FILTER, "10.0.0.1/24@eth0", "10.0.1.1/24@eth1", sysctls={"net.ipv4.ip_forward": 1})
    [b] = _run(w, Packet(4, 6, A("10.0.0.5"), A("10.0.1.5"), 40000, 80), "eth0")
    assert (b.disposition, b.pkt.oif, b.next_hop) == ("forwarded", "eth1", A("10.0.1.5"))
    [b] = _run(w, Packet(4, 6, A("10.0.0.5"), A("10.0.1.5"), 40000, 22), "eth0")
    assert b.disposition == "dropped" and any(":FORWARD:policy" in s.where for s in b.steps)


def test_ip_forward_off_stops_before_the_forward_chain():
    w = _walker(FILTER, "10.0.0.1/24@eth0", "10.0.1.1/24@eth1", sysctls={"net.ipv4.ip_forward": 0})
    [b] = _run(w, Packet(4, 6, A("10.0.0.5"), A("10.0.1.5"), 40000, 80), "eth0")
    assert (b.disposition, b.detail) == ("dropped", "net.ipv4.ip_forward=0: not forwarded")
    assert not any("FORWARD" in s.where for s in b.steps)


def test_martian_source_is_dropped_before_routing():
    w = _walker(FILTER, "10.0.0.1/24@eth0")
    [b] = _run(w, Packet(4, 6, A("10.0.0.1"), A("10.0.0.1"), 40000, 80), "eth0")
    assert b.disposition == "dropped" and b.detail.startswith("martian source")


def test_local_out_to_a_local_address_loops_back_on_lo():
    w = _walker(FILTER, "10.0.0.1/24@eth0")
    [b] = _run(w, Packet(4, 6, A("10.0.0.1"), A("10.0.0.1"), 40000, 80), None)
    assert (b.disposition, b.pkt.iif) == ("delivered", "lo")
    assert any(s.verdict == "loopback: back in on lo" for s in b.steps)


def test_evolve_sets_every_field_as_replace_does():
    from analyzer.model.packet import evolve, _PACKET_FIELDS
    p = Packet(4, 6, A("10.0.0.1"), A("10.0.0.2"), 1, 2, "eth0", "eth1", 7, 0x12, None, None, 5, 6)
    values = {"family": 6, "proto": 17, "src": A("::1"), "dst": A("::2"), "sport": 9, "dport": 10,
              "iif": "a", "oif": "b", "mark": 3, "tcp_flags": 0x10, "icmp_type": 8, "icmp_code": 0,
              "uid": 1, "gid": 2, "connmark": 4, "ctstate": 0x02}
    assert set(values) == set(_PACKET_FIELDS)  # a new Packet field needs a value here
    for f, v in values.items():
        q = evolve(p, **{f: v})
        assert q == replace(p, **{f: v}) and hash(q) == hash(replace(p, **{f: v}))
    assert evolve(p, **values) == replace(p, **values)


def test_address_match_by_integer_bounds_is_ipaddress_containment():
    # the walker compares a concrete address's integer with each network's bounds: the same
    # answer as ``address in network`` over both families, several networks, negation
    import random

    from analyzer.model.rules import AddrMatch
    from analyzer.netfilter.walk import Branch, Conntrack

    rnd = random.Random(7)
    w = _walker("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")

    def net(version):
        bits = 32 if version == 4 else 128
        plen = rnd.choice([0, 1, 8, 16, 24, 31, bits - 1, bits, rnd.randrange(bits + 1)])
        addr = rnd.getrandbits(bits)
        cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
        return cls((addr, plen), strict=False)

    for _ in range(3000):
        nets = tuple(net(rnd.choice((4, 6))) for _ in range(rnd.randint(1, 3)))
        near = rnd.choice(nets)
        bits = near.max_prefixlen
        pick = rnd.choice([int(near.network_address), int(near.broadcast_address),
                           int(near.network_address) - 1, int(near.broadcast_address) + 1, rnd.getrandbits(bits)])
        a = ipaddress.ip_address(pick % (1 << bits)) if bits == 32 else ipaddress.IPv6Address(pick % (1 << bits))
        for direction in ("src", "dst"):
            for neg in (False, True):
                m = AddrMatch(1, 2, neg, direction, nets)
                p = Packet(a.version, 6, a, a, 1, 2)
                want = any(a in n for n in nets if n.version == a.version) != neg
                assert w._match(m, Branch(p, Conntrack(p)), "INPUT") is want, (nets, a, neg)


def _trips(trips):  # Trip and Journey compare by identity: their fields by value
    def journey(j):
        return None if j is None else (j.hops, j.end, j.end_ns, j.end_packet, j.detail, j.order)
    return [(t.flow, t.start, journey(t.request), journey(t.reply), t.client_sees,
             None if t.second_leg is None else _trips([t.second_leg]), t.listener, t.unfollowed, t.prob)
            for t in trips]


def test_lint_env_walks_shared_memo_branches_with_the_same_trips():
    # travel_all reads the World memo's branches without copying them (no Cilium): every trip
    # must be what the copying walk gives
    from analyzer.crosshost import World, follow_all
    from analyzer.checks.reply import service_destinations
    from analyzer.parse.envfile import load_environment

    env = load_environment(str(ROOT / "samples" / "env" / "kubeproxy-hairpin-broken.yaml"))
    flows = []
    for name, spec in env.namespaces.items():
        for (addr, proto, port), _ in service_destinations(spec):
            flows.append(Packet(addr.version, proto, None, addr, 40000, port))
    assert flows
    shared, copied = World(env), World(env)
    plain_walk = World.walk
    copied.walk = lambda *a, **kw: plain_walk(copied, *a, **{**kw, "fresh": True})
    for client in env.clients or list(env.namespaces):
        src = next(a.ip for _, a in env.namespaces[client].net.local_addresses() if not a.ip.is_loopback)
        for f in flows:
            f = replace(f, src=src)
            for _ in range(2):  # the second time from the memo
                assert _trips(follow_all(shared, client, f)) == _trips(follow_all(copied, client, f))
    assert shared.memo_hits


def test_world_memo_key_holds_every_conntrack_field():
    """The World memo answers a namespace walk by its key: an entry field left out of it would
    let an entry that walks differently (a confirmed one skips nat) take another's outcomes."""
    import dataclasses
    import ipaddress as ipa

    from analyzer.crosshost import _ct_key
    from analyzer.netfilter.walk import Conntrack, Packet

    pkt = Packet(4, 6, ipa.ip_address("10.0.0.1"), ipa.ip_address("10.0.0.2"), 40000, 80)
    ct = Conntrack(pkt)
    other = {bool: lambda v: not v, int: lambda v: v + 1, type(None): lambda v: "ESTABLISHED",
             str: lambda v: v + "x"}
    for f in dataclasses.fields(Conntrack):
        v = getattr(ct, f.name)
        changed = dataclasses.replace(pkt, sport=1) if f.name == "original" else \
            ipa.ip_address("10.9.9.9") if f.name in ("reply_src", "reply_dst") else other[type(v)](v)
        assert _ct_key(dataclasses.replace(ct, **{f.name: changed})) != _ct_key(ct), f.name


@pytest.mark.parametrize("src, dst, end, fact", [
    ("10.0.0.5", "10.0.1.5", "forwarded", None),
    ("0.0.0.5", "10.0.1.5", "forwarded", None),          # 0.0.0.0/8 is routed since Linux 5.3
    ("0.0.0.0", "10.0.1.5", "dropped", Route.MARTIAN_SOURCE),
    ("127.0.0.5", "10.0.1.5", "dropped", Route.MARTIAN_SOURCE),
    ("224.0.0.5", "10.0.1.5", "dropped", Route.MARTIAN_SOURCE),
    ("255.255.255.255", "10.0.1.5", "dropped", Route.MARTIAN_SOURCE),
    ("10.0.0.5", "0.0.0.0", "dropped", Route.MARTIAN_DESTINATION),
    ("10.0.0.5", "127.0.0.5", "dropped", Route.MARTIAN_DESTINATION),
    ("10.0.0.5", "239.1.2.3", "dropped", Route.MARTIAN_DESTINATION),
    ("127.0.0.5", "127.0.0.6", "dropped", Route.MARTIAN_DESTINATION),  # the destination is asked first
])
def test_early_martians_in_the_kernel_order(src, dst, end, fact):
    """ip_route_input_slow's first checks (tests/kernel/test_martians_kernel.py replays them)."""
    w = _walker(FILTER.replace("FORWARD DROP", "FORWARD ACCEPT"), "10.0.0.1/24@eth0", "10.0.1.1/24@eth1",
                sysctls={"net.ipv4.ip_forward": 1})
    [b] = _run(w, Packet(4, 6, A(src), A(dst), 40000, 80), "eth0")
    facts = [s.fact for s in b.steps if isinstance(s.fact, Route) and s.fact.drops]
    assert (b.disposition, facts) == (end, [fact] if fact else []), b.detail
    if (src, dst) == ("10.0.0.5", "127.0.0.5"):
        w.ns.sysctls["net.ipv4.conf.eth0.route_localnet"] = 1
        [b] = _run(w, Packet(4, 6, A(src), A(dst), 40000, 80), "eth0")
        assert b.disposition == "delivered", b.detail  # route_localnet: 127.0.0.5 is ours, delivered


def test_output_route_refuses_a_loopback_source_out_of_a_real_interface():
    w = _walker(FILTER, "10.0.0.1/24@eth0", routes=["default via 10.0.0.254 dev eth0"])
    [b] = pipeline.run(w, None, "x", Packet(4, 6, A("127.0.0.1"), A("10.9.9.9"), 40000, 80), None, None)
    assert b.disposition == "not-sent" and "EINVAL" in b.detail and b.steps[-1].fact is Route.OUTPUT_REFUSED
    [b] = pipeline.run(w, None, "x", Packet(4, 6, A("127.0.0.1"), A("127.0.0.1"), 40000, 80), None, None)
    assert b.disposition == "delivered"  # out of lo: allowed
    w.ns.sysctls["net.ipv4.conf.eth0.route_localnet"] = 1
    [b] = pipeline.run(w, None, "x", Packet(4, 6, A("127.0.0.1"), A("10.9.9.9"), 40000, 80), None, None)
    assert b.disposition == "sent"


def test_tproxy_does_not_take_a_packet_past_the_input_route_martians():
    """TPROXY assigns a local socket in PREROUTING, but ip_rcv_finish still routes the packet:
    a multicast destination is dropped there (a cilium node's '-j TPROXY' on every TCP packet
    made the corpus sweep deliver 10.0.0.1 -> 224.0.0.1 and then refuse the reply)."""
    rules = ("*mangle\n:PREROUTING ACCEPT [0:0]\n"
             "-A PREROUTING -p tcp -m tcp --dport 80 -j TPROXY --on-port 15001 --on-ip 127.0.0.1 "
             "--tproxy-mark 0x1/0x1\nCOMMIT\n")
    w = _walker(rules, "10.0.0.1/24@eth0", "10.0.1.1/24@eth1", sysctls={"net.ipv4.ip_forward": 1})
    [b] = _run(w, Packet(4, 6, A("10.0.0.5"), A("224.0.0.1"), 40000, 80), "eth0")
    assert b.disposition == "dropped" and b.steps[-1].fact is Route.MARTIAN_DESTINATION, b.detail
    [b] = _run(w, Packet(4, 6, A("10.0.0.5"), A("10.0.1.5"), 40000, 80), "eth0")
    assert b.disposition == "delivered", b.detail
