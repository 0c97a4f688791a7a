"""Flows with open protocol/ports: the BDD partition groups every packet by outcome."""
from __future__ import annotations

from pathlib import Path

from analyzer.netfilter.env import Namespace
from analyzer.parse import load_path
from analyzer.symbolic import explain_open_flow, parse_flow_spec

ROOT = Path(__file__).resolve().parent.parent


def groups_for(dump, flow, **ns_addrs):
    rs = load_path(str(ROOT / dump)).ruleset
    ns = Namespace()
    for iface, cidr in ns_addrs.items():
        ns.add_addr(cidr, iface)
    spec = parse_flow_spec(flow)
    from dataclasses import replace
    spec = replace(spec, template=replace(spec.template, iif="eth0"))
    return explain_open_flow(rs, spec, ns)


def test_open_port_splits_the_redirected_port_from_the_rest():
    groups, complete = groups_for("samples/seed2-sidecar-pod.rules", "tcp 10.6.2.2 -> 10.7.3.3", eth0="10.7.3.3/24")
    assert complete
    by = {g.description: g for g in groups}
    assert sorted(by) == ["dport 0-8079, 8081-65535", "dport 8080"]
    assert by["dport 8080"].outcomes[0].forward.pkt.dport == 15001
    other = by["dport 0-8079, 8081-65535"]
    assert other.outcomes[0].forward.pkt.dport == other.witness.dport


def test_open_protocol_separates_tcp_from_other_protocols():
    groups, complete = groups_for("samples/env/kubeproxy-node.rules", "10.1.1.1 -> 10.96.0.10", cni0="10.244.0.1/24")
    assert complete and len(groups) == 2
    assert groups[0].description == "proto tcp; dport 80"
    dnat = [s for s in groups[0].outcomes[0].forward.steps if s.verdict.startswith("DNAT")]
    assert dnat and "10.244.0.5:8080" in dnat[0].verdict
    assert not any(s.verdict.startswith("DNAT") for s in groups[1].outcomes[0].forward.steps)


def test_flow_spec_reports_open_fields():
    assert parse_flow_spec("udp 10.0.0.1:53 -> 10.0.0.2").open == {"dport"}
    assert parse_flow_spec("tcp 10.0.0.1:1 -> 10.0.0.2:2").open == frozenset()


def test_a_flow_without_ports_has_none():
    from analyzer.netfilter.walk import parse_flow

    p = parse_flow("icmp 10.0.0.1 -> 10.0.0.2")
    assert (p.proto, p.sport, p.dport, p.icmp_type) == (1, None, None, 8)
    assert parse_flow("tcp 10.0.0.1 -> 10.0.0.2:80").sport == 40000
    assert parse_flow("tcp 10.0.0.1:5 -> 10.0.0.2").dport is None
