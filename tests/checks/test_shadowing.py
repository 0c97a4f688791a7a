"""FLT001/FLT002 against brute force: random chains, every finding checked by concrete walks
(netfilter/walk.py) of random packets: a shadowed rule is never evaluated as matching, and
removing a redundant rule changes no packet's verdict."""
from __future__ import annotations

import ipaddress
import random

import pytest

from analyzer.checks import CheckContext, run_checks
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.walk import Branch, Conntrack, Packet, Walker
from analyzer.parse import load_ruleset

SRCS = [None, "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "192.168.0.0/16"]
PKT_SRCS = ["10.1.2.3", "10.1.9.9", "10.9.9.9", "192.168.1.1", "172.16.0.1"]
PORTS = [None, "22", "80", "22:80", "443"]


def _cond(rnd) -> str:
    parts = []
    src = rnd.choice(SRCS)
    if src:
        parts.append(("! " if rnd.random() < 0.2 else "") + f"-s {src}")
    proto = rnd.choice([None, "tcp", "udp"])
    if proto:
        parts.append(f"-p {proto}")
        port = rnd.choice(PORTS)
        if port:
            parts.append(f"-m {proto} --dport {port}")
    return " ".join(parts)


def random_dump(rnd) -> str:
    lines = ["*filter", f":INPUT {rnd.choice(['ACCEPT', 'DROP'])} [0:0]", ":FORWARD ACCEPT [0:0]",
             ":OUTPUT ACCEPT [0:0]", ":USER - [0:0]"]
    for _ in range(rnd.randint(3, 9)):
        tgt = rnd.choice(["ACCEPT", "DROP", "DROP", "RETURN", "USER", "ACCEPT"])
        lines.append(f"-A INPUT {_cond(rnd)} -j {tgt}".replace("  ", " "))
    for _ in range(rnd.randint(1, 3)):
        lines.append(f"-A USER {_cond(rnd)} -j {rnd.choice(['ACCEPT', 'DROP', 'RETURN'])}".replace("  ", " "))
    return "\n".join(lines + ["COMMIT", ""])


def packets(rnd, n=250):
    for _ in range(n):
        proto = rnd.choice([6, 17, 1])
        src = ipaddress.ip_address(rnd.choice(PKT_SRCS))
        dst = ipaddress.ip_address("192.0.2.1")
        if proto == 1:
            yield Packet(4, 1, src, dst, icmp_type=8, icmp_code=0, tcp_flags=0)
        else:
            yield Packet(4, proto, src, dst, rnd.choice([1234, 40000]), rnd.choice([22, 50, 80, 443, 8080]),
                         tcp_flags=0x02 if proto == 6 else 0)


def walk(rs, pkt):
    w = Walker(rs, Namespace())
    br = Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport))
    out = w.run_table(br, "filter", "INPUT")
    return [(b.disposition, [s.where for s in b.steps]) for b in out]


@pytest.mark.parametrize("seed", range(60))
def test_findings_agree_with_concrete_walks(seed):
    rnd = random.Random(seed)
    text = random_dump(rnd)
    res = load_ruleset((text, "r.rules"))
    rs = res.ruleset
    found = run_checks(CheckContext(rs, res.files), select=["FLT"])
    shadowed = {d.message.split(":")[0] + ":" + ":".join(d.message.split(":")[1:4]) for d in found if d.code == "FLT001"}
    redundant = [d for d in found if d.code == "FLT002"]
    pkts = list(packets(random.Random(seed + 1000)))
    for pkt in pkts:
        for _, steps in walk(rs, pkt):
            assert not (set(steps) & shadowed), (text, pkt, shadowed)
    for d in redundant:
        line = d.span.line
        without = "\n".join(x for i, x in enumerate(text.splitlines(), 1) if i != line) + "\n"
        rs2 = load_ruleset((without, "r.rules")).ruleset
        for pkt in pkts:
            assert [x for x, _ in walk(rs, pkt)] == [x for x, _ in walk(rs2, pkt)], (text, d.message, pkt)
    for d in found:
        assert d.witness


def test_the_property_test_sees_findings():
    """The random chains do produce findings of both kinds (else the test above proves nothing)."""
    codes = set()
    for seed in range(60):
        res = load_ruleset((random_dump(random.Random(seed)), "r.rules"))
        codes |= {d.code for d in run_checks(CheckContext(res.ruleset, res.files), select=["FLT"])}
    assert {"FLT001", "FLT002"} <= codes


def test_a_jump_to_a_chain_that_decides_everything_shadows_what_follows():
    text = """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:SSH - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j SSH
-A INPUT -p tcp -m tcp --dport 22 -s 10.0.0.0/8 -j ACCEPT
-A SSH -s 192.0.2.0/24 -j ACCEPT
-A SSH -j DROP
COMMIT
"""
    res = load_ruleset((text, "r.rules"))
    [d] = run_checks(CheckContext(res.ruleset, res.files), select=["FLT001"])
    assert d.message.startswith("filter:INPUT:rule:2") and "filter:INPUT:rule:1" in d.message


def test_a_mark_rewrite_ends_the_segment():
    text = """*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -m mark --mark 0x1 -j ACCEPT
-A PREROUTING -j MARK --set-mark 0x1
-A PREROUTING -m mark --mark 0x1 -j ACCEPT
COMMIT
"""
    res = load_ruleset((text, "r.rules"))
    assert run_checks(CheckContext(res.ruleset, res.files), select=["FLT001"]) == []


@pytest.mark.parametrize("filler", [0, 60])
def test_a_destination_rule_shadowed_by_port_rules_in_a_big_chain(filler):
    """In a chain of more than BIG_CHAIN rules the candidates are looked up by destination and
    port: a rule pinned to a destination but no port can be taken by earlier port-only rules,
    which its lookup left out (found in a small chain, missed in a big one)."""
    rules = [f"-A INPUT -d 10.9.0.{i}/32 -p udp -m udp --dport 53 -j ACCEPT" for i in range(filler)]
    rules += ["-A INPUT -p tcp -m tcp --dport 80 -j DROP",
              "-A INPUT -p tcp -m tcp ! --dport 80 -j DROP",
              "-A INPUT -d 192.0.2.1/32 -p tcp -j ACCEPT"]
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                      *rules, "COMMIT", ""])
    res = load_ruleset((text, "r.rules"))
    [d] = run_checks(CheckContext(res.ruleset, res.files), select=["FLT001"])
    assert d.message.startswith(f"filter:INPUT:rule:{filler + 3}")
    assert f"filter:INPUT:rule:{filler + 1}" in d.message and f"filter:INPUT:rule:{filler + 2}" in d.message


@pytest.mark.parametrize("seed", range(60))
def test_a_big_chain_finds_what_the_small_one_finds(seed):
    """The random chains again, behind 60 rules no packet of theirs can match (other
    destinations): past BIG_CHAIN rules candidates are looked up by destination and port, and
    the findings must stay those of the small chain."""
    def findings(text, offset):
        res = load_ruleset((text, "r.rules"))
        out = set()
        for d in run_checks(CheckContext(res.ruleset, res.files), select=["FLT"]):
            where = d.message.split(":")
            if where[1] == "INPUT":
                out.add((d.code, int(where[3]) - offset))
        return out
    rnd = random.Random(seed + 7)  # some rules pinned to the packets' one destination: keyed by it
    lines = [x.replace("-A INPUT ", "-A INPUT -d 192.0.2.1/32 ", 1) if rnd.random() < 0.4 else x
             for x in random_dump(random.Random(seed)).splitlines()]
    text = "\n".join(lines) + "\n"
    at = next(i for i, x in enumerate(lines) if x.startswith("-A "))
    filler = [f"-A INPUT -d 10.9.{i // 250}.{i % 250}/32 -p udp -m udp --dport 53 -j ACCEPT" for i in range(60)]
    big = "\n".join(lines[:at] + filler + lines[at:]) + "\n"
    assert findings(big, 60) - {(c, i) for c, i in findings(big, 60) if i <= 0} == findings(text, 0)
