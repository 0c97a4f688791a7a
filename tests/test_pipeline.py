"""The kernel's path through a namespace as data (analyzer/netfilter/pipeline.py)."""
from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from pathlib import Path

from analyzer.model.packet import Packet, with_ifaces
from analyzer.netfilter import pipeline
from analyzer.netfilter.env import Namespace
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
