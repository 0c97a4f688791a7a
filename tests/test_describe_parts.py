"""A fate group described from the set walk's parts (analyzer/describe_parts.py) says what
`symbolic.describe` says of the group's set, to the character: on random parts built by hand
(pinned values, shared sets, exclusions that empty a part or take a value out), on the
random rulesets of the fate property test, on a generated kube-proxy node, and on corpus
dumps. Each checks that the parts did answer (not only the set it falls back to).
"""
from __future__ import annotations

import ipaddress
import os
import random
from pathlib import Path

import pytest

from analyzer.describe_parts import fast_text
from analyzer.engine.packetset import PacketSpace
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.setwalk import Part, _materialize
from analyzer.parse import load_ruleset
from analyzer.parse.flow import parse_flow_spec
from analyzer.symbolic import describe, describe_group, explain_open

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("SYNACK_CORPUS", ROOT.parent / "shared" / "corpus")) / "iptables"


def _same_text(res, spec) -> int:
    """Every group's description from its parts is the set's; returns how many the parts
    answered themselves."""
    answered = 0
    for g in res.groups:
        parts = g.__dict__.get("_parts")
        mine = describe_group(g, spec, res.space)
        assert mine == describe(g.packets, spec, res.space), (spec.text(), g.witness.tuple_str())
        answered += parts is not None and fast_text(parts, spec, res.space) is not None
    return answered


# ------------------------------------------------------------------ random parts, built by hand

FLOWS = {4: "10.0.0.0/28 -> 10.0.1.0/29", 6: "fd00::/124 -> fd00:1::/125"}


def _random_parts(rnd: random.Random, sp: PacketSpace, family: int = 4) -> list:
    """Parts as the set walk leaves them: ``dst``/``dport``/``proto`` pinned (some parts
    ``src`` too), the other fields a set shared by many (a box, or two boxes: not a product),
    and now and then exclusions of source addresses, some of them every source the part has;
    and, unlike the set walk's, a few whose set tests the source they pin."""
    def addr(k, net=0):
        return ipaddress.ip_address(f"10.0.{net}.{k}" if family == 4 else f"fd00:{net}::{k:x}")

    shared = []
    for _ in range(rnd.randint(1, 3)):
        lo = rnd.randint(0, 15)
        hi = rnd.randint(lo, min(15, lo + rnd.choice([0, 1, 3, 15])))
        g = sp.range("src", addr(lo), addr(hi)) & sp.range("sport", *sorted(rnd.sample(range(1000, 1010), 2)))
        if rnd.random() < 0.3:  # two boxes: the sources and ports are not a product
            g = g | (sp.eq("src", addr(rnd.randint(0, 15))) & sp.eq("sport", rnd.randint(0, 5)))
        shared.append((g, lo, hi))
    parts = []
    for _ in range(rnd.randint(2, 12)):
        g, lo, hi = rnd.choice(shared)
        pins = {"family": family, "proto": rnd.choice([6, 6, 17]), "dst": addr(rnd.randint(0, 7), 1),
                "dport": rnd.choice([80, 443, 53])}
        excl = None
        if rnd.random() < 0.2:
            pins["src"] = addr(rnd.randint(0, 15))
            if rnd.random() < 0.7:  # else a set that still tests the pinned field (the parts cannot say)
                g = g.exists("src")
        elif rnd.random() < 0.5:
            # some of the part's sources, or all of them (the part is then empty)
            vals = range(lo, hi + 1) if rnd.random() < 0.3 else rnd.sample(range(0, 16), rnd.randint(1, 3))
            excl = {("src",): {(addr(k),) for k in vals}}
        parts.append(Part(pins, sp._set(sp._at(g.node, {"family": 0 if family == 4 else 1})), excl))
    return parts


@pytest.mark.parametrize("family", [4, 6])
def test_random_parts_describe_as_their_set(family):
    spec = parse_flow_spec(FLOWS[family], iif="eth0")
    answered = 0
    sp = PacketSpace()
    for seed in range(300):
        parts = _random_parts(random.Random(seed), sp, family)
        packets = _materialize(sp, parts)
        if packets.is_empty():
            continue
        mine = fast_text(parts, spec, sp)
        if mine is not None:
            answered += 1
            assert mine == describe(packets, spec, sp), seed
    assert answered > 100, answered


def test_an_exclusion_of_every_source_empties_the_part():
    """A part whose every source is excluded holds no packet: its pinned destination is not
    one of the group's (the projections of its set alone would list it)."""
    sp = PacketSpace()
    spec = parse_flow_spec(FLOWS[4], iif="eth0")
    one = ipaddress.ip_address("10.0.0.3")
    g = sp._set(sp._at((sp.eq("src", one) & sp.eq("sport", 1000)).node, {"family": 0}))
    pins = {"family": 4, "proto": 6, "dport": 80}
    parts = [Part(dict(pins, dst=ipaddress.ip_address("10.0.1.1")), g),
             Part(dict(pins, dst=ipaddress.ip_address("10.0.1.2")), g, {("src",): {(one,)}})]
    text = fast_text(parts, spec, sp)
    assert text == describe(_materialize(sp, parts), spec, sp)
    assert "dst 10.0.1.1;" in text


# ------------------------------------------------------------------ explain by fate

def _open(rs, ns, flow, iif="eth0"):
    spec = parse_flow_spec(flow, iif=iif)
    return explain_open(rs, spec, ns, limit=300, described=0, by="fate"), spec


def test_generated_kube_proxy_node_describes_its_groups_from_parts():
    """The shape of the 10,000-service flow, on 150 services: the hairpin group (every part
    pins the source), the pod sources (each service's endpoints excluded from its sources),
    the masqueraded ClusterIPs: each read from its parts, as its set says it."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gen_kubeproxy import generate

    ns = Namespace()
    ns.add_addr("192.168.0.2/24", "eth0")
    ns.add_route("default via 192.168.0.1 dev eth0")
    ns.add_route("10.244.0.0/16 via 192.168.0.3 dev eth0")
    rs = load_ruleset((generate(services=150, seed=3), "kp.rules"), lazy=True).ruleset
    res, spec = _open(rs, ns, "10.0.0.0/8 -> 10.96.0.0/12")
    assert res.by == "fate" and len(res.groups) >= 5
    # (a group of one part, the packets no service took with the services' points excluded,
    # is described from its set: one part is one set)
    excluded = [g for g in res.groups if len(g.__dict__["_parts"]) > 1
                and any(isinstance(x, Part) and x.excl for x in g.__dict__["_parts"])]
    assert excluded and all(fast_text(g.__dict__["_parts"], spec, res.space) is not None for g in excluded)
    assert _same_text(res, spec) >= 3


def _v6(a: str) -> ipaddress.IPv6Address:
    """An IPv4 address in IPv6 clothes: its high 16 bits after fd00:, its low 16 bits last."""
    v = int(ipaddress.IPv4Address(a))
    return ipaddress.IPv6Address(0xfd00 << 112 | (v >> 16) << 96 | (v & 0xFFFF))


def _v6_len(n: int) -> int:
    """The prefix length of an IPv4 /n in `_v6`'s form (the bits between are always zero)."""
    return 16 + n if n <= 16 else 96 + n


def test_ipv6_kube_proxy_node_describes_its_groups_from_parts():
    """The same node in IPv6 (ip6tables-save, every address in `_v6`'s form: pods, services
    and the node in /64s of their own): 128-bit values read from the parts as from the set."""
    import re
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gen_kubeproxy import generate

    def six(m):
        a, n, port = m.groups()
        return f"{_v6(a)}/{_v6_len(int(n))}" if n else f"[{_v6(a)}]{port}" if port else str(_v6(a))

    text = re.sub(r"(?<![\w.:])(\d+\.\d+\.\d+\.\d+)(?:/(\d+)|(:\d+(?:-\d+)?))?", six,
                  generate(services=60, seed=3)).replace("by iptables-save", "by ip6tables-save") \
        .replace("icmp-port-unreachable", "icmp6-port-unreachable")
    ns = Namespace()
    ns.add_addr(f"{_v6('192.168.0.2')}/{_v6_len(24)}", "eth0")
    ns.add_route(f"default via {_v6('192.168.0.1')} dev eth0")
    ns.add_route(f"{_v6('10.244.0.0')}/{_v6_len(16)} via {_v6('192.168.0.3')} dev eth0")
    rs = load_ruleset((text, "kp6.rules"), lazy=True).ruleset
    assert rs.family == 6
    res, spec = _open(rs, ns, f"{_v6('10.0.0.0')}/{_v6_len(8)} -> {_v6('10.96.0.0')}/{_v6_len(12)}")
    assert res.by == "fate" and len(res.groups) >= 5
    assert any(isinstance(x, Part) and x.excl for g in res.groups for x in g.__dict__["_parts"])
    assert _same_text(res, spec) >= 3


CORPUS_FLOWS = [
    ("kube-proxy-nodes/unknown__flannel-kubeproxy-iptables__k8s-worker1.save", "0.0.0.0/0 -> 10.96.0.0/16"),
    ("kube-proxy-nodes/unknown__flannel-kubeproxy-iptables__k8s-worker1.save", "10.0.0.0/8 -> 10.0.0.0/8"),
    ("kube-proxy-nodes/k8s-ctr-2026__flannel-kubeproxy__iptables-nft-save.txt", "0.0.0.0/0 -> 10.96.0.0/16"),
    ("kube-proxy-nodes/unknown__centos7-flannel-kubeproxy__master-01_healthy.save", "0.0.0.0/0 -> 10.2.0.0/16"),
    ("kube-proxy/proxier_test__TestTracePackets.rules", "0.0.0.0/0 -> 172.30.0.0/16"),
    ("kube-proxy/proxier_test__TestGetChainLinesMultipleTables.save", "0.0.0.0/0 -> 10.247.0.0/16"),
]


@pytest.mark.parametrize("dump, flow", CORPUS_FLOWS, ids=[f"{Path(d).stem}:{f}" for d, f in CORPUS_FLOWS])
def test_corpus_fate_groups_describe_from_parts_as_from_sets(dump, flow):
    path = CORPUS / dump
    if not path.exists():
        pytest.skip("corpus not present")
    rs = load_ruleset((path.read_text(errors="replace"), str(path))).ruleset
    ns = Namespace()
    ns.add_addr("192.168.0.2/24", "eth0")
    ns.add_route("default via 192.168.0.1 dev eth0")
    res, spec = _open(rs, ns, flow)
    assert res.by == "fate"
    assert _same_text(res, spec) >= 2


def test_random_rulesets_describe_their_fate_groups_from_parts():
    """The fate property test's random rulesets and flows (an open mark among them): every
    group's description from its parts is its set's."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    from test_fate_property import EXAMPLES, FLOWS, fate_rulesets
    from test_symbolic_property import _namespace

    stats = {"fate": 0, "answered": 0}

    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(text=fate_rulesets(), flow=st.sampled_from(FLOWS), iif=st.sampled_from(["eth0", "eth1"]))
    def check(text, flow, iif):
        res = load_ruleset((text, "gen.rules"))
        hypothesis.assume(not res.errors)
        got, spec = _open(res.ruleset, _namespace(), flow, iif)
        if got.by == "fate":
            stats["fate"] += 1
            stats["answered"] += _same_text(got, spec)

    check()
    assert stats["fate"] and stats["answered"], stats


def test_a_part_excluding_points_of_several_fields_is_read_as_its_set():
    """A part that excludes (proto, dst, dport) points (what the set walk leaves of the packets
    no one-point rule took) among other parts: the parts' answer is its set's."""
    sp = PacketSpace()
    spec = parse_flow_spec(FLOWS[4], iif="eth0")
    g = sp._set(sp._at((sp.range("src", "10.0.0.0", "10.0.0.15") & sp.eq("sport", 1000)).node, {"family": 0}))
    pins = {"family": 4, "proto": 6}
    dst = [ipaddress.ip_address(f"10.0.1.{k}") for k in range(8)]
    # every port of 10.0.1.7 but 80 left; 10.0.1.6 only port 443 excluded
    big = Part(dict(pins), g, {("dport", "dst", "proto"): {(80, dst[7], 6), (443, dst[6], 6)}})
    parts = [big, Part(dict(pins, dst=dst[2], dport=53), g)]
    text = fast_text(parts, spec, sp)
    assert text is not None and text == describe(_materialize(sp, parts), spec, sp)


def test_excluded_points_outside_a_part_are_trimmed_and_the_text_is_the_sets():
    """A part excluding (dport, dst, proto) points, some in its set and some not (kube-proxy's
    packets that no service took exclude every service's points): `trimmed` keeps exactly those
    in the set, and the description, of the part alone or among others, is its set's."""
    from analyzer.describe_parts import describe_parts, trimmed

    spec = parse_flow_spec(FLOWS[4], iif="eth0")
    sp = PacketSpace()
    rnd = random.Random(7)
    for _ in range(60):
        dports = rnd.sample([53, 80, 443, 8080], rnd.randint(1, 4))
        g = sp._set(sp._at((sp.range("src", "10.0.0.0", f"10.0.0.{rnd.randint(0, 15)}") & sp.eq("proto", 6)
                            & sp.range("dst", "10.0.1.0", f"10.0.1.{rnd.randint(0, 7)}") & sp.ports("dport", dports)).node,
                           {"family": 0}))
        points = {(rnd.choice([53, 80, 443, 8080]), ipaddress.ip_address(f"10.0.1.{rnd.randint(0, 7)}"), rnd.choice([6, 17]))
                  for _ in range(rnd.randint(1, 12))}
        big = Part({"family": 4}, g, {("dport", "dst", "proto"): set(points)})
        inside = {p for p in points if not (sp._set(g.node) & sp.where(dport=p[0], dst=p[1], proto=p[2])).is_empty()}
        got = trimmed(big, sp)
        assert (got.excl or {}).get(("dport", "dst", "proto"), set()) == inside
        assert _materialize(sp, [got]) == _materialize(sp, [big])
        for parts in ([big], [big, Part({"family": 4, "proto": 6, "dst": ipaddress.ip_address("10.0.1.9"), "dport": 22}, g)]):
            want = _materialize(sp, parts)
            if not want.is_empty():
                assert describe_parts(parts, spec, sp, lambda: want) == describe(want, spec, sp)


@pytest.mark.parametrize("family", [4, 6])
def test_describe_projections_answer_as_project(family):
    """`symbolic._project` (an IPv4 set projected without its representative form) answers
    what `describe` asks of `PacketSet.project`: whether two sets' values of a field are
    equal, and which packets of the flow have those values."""
    from analyzer.symbolic import _project

    sp = PacketSpace()
    flow = _materialize(sp, _random_parts(random.Random(99), sp, family)) | sp.where(
        proto=6, src=("10.0.0.0/28" if family == 4 else "fd00::/124"))
    rnd = random.Random(5)
    sets = [sp.empty(), flow]
    for seed in range(40):
        s = _materialize(sp, _random_parts(random.Random(seed), sp, family))
        sets.append(s if rnd.random() < 0.7 else s & flow)
    for f in ("proto", "src", "sport", "dst", "dport", "mark", "ctstate"):
        for a in sets:
            pa = _project(a, f)
            assert flow & pa == flow & a.project(f)
            for b in sets[:12]:
                assert (pa == _project(b, f)) == (a.project(f) == b.project(f))


def test_one_part_excluding_many_points_describes_as_its_set():
    """One part excluding (dport, dst, proto) points (kube-proxy's packets that no service
    took): `one_part_text` answers without building the exclusions, as the set says it: a
    field-by-field text, or "every packet of the flow that no other group holds"; and says
    nothing when the rest of the flow is a box (the points a whole product: "except ...")."""
    from analyzer.describe_parts import describe_parts, one_part_text
    from analyzer.netfilter.symbolic import flow_set

    spec = parse_flow_spec(FLOWS[4], iif="eth0")
    sp = PacketSpace()
    flow = flow_set(sp, spec)
    rnd = random.Random(11)
    said = {"text": 0, "rest": 0, "none": 0}
    for _ in range(80):
        dsts = [ipaddress.ip_address(f"10.0.1.{k}") for k in rnd.sample(range(8), rnd.randint(1, 4))]
        dports, protos = rnd.sample([53, 80, 443, 8080], rnd.randint(1, 3)), rnd.sample([6, 17], rnd.randint(1, 2))
        base = flow
        if rnd.random() < 0.5:  # less some sources or ports
            base = base - sp.range("src", "10.0.0.0", f"10.0.0.{rnd.randint(0, 15)}")
        if rnd.random() < 0.3:
            base = base & sp.where(proto=rnd.choice([6, 17]))
        if rnd.random() < 0.3:  # only the excluded ports and protocols: some destinations are all excluded
            base = base & sp.ports("dport", dports) & sp.ports("proto", protos)
        g = sp._set(sp._at(base.node, {"family": 0}))
        points = {(p, d, q) for p in dports for d in dsts for q in protos}
        if rnd.random() < 0.6:  # not every combination
            points = set(rnd.sample(sorted(points, key=str), rnd.randint(1, len(points))))
        x = Part({"family": 4}, g, {("dport", "dst", "proto"): points})
        want = describe(_materialize(sp, [x]), spec, sp)
        got = one_part_text(x, spec, sp)
        said["none" if got is None else "rest" if got.startswith("every packet") else "text"] += 1
        assert got is None or got == want, (got, want)
        assert describe_parts([x], spec, sp, None) == want
    assert said["text"] and said["rest"] and said["none"], said
