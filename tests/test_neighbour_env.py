"""IPv6 neighbour discovery between environment namespaces (netfilter.neighbour.exchange,
crosshost) and CHN013's four directions. The kernel side: tests/kernel/test_neighbour_kernel.py."""
from __future__ import annotations

import ipaddress
from pathlib import Path

from analyzer.checks import CheckContext, load_all, run_checks
from analyzer.crosshost import World, follow_all
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.neighbour import ASSUMED_LINK_LOCAL, solicitation, solicitation_source, walk_nd
from analyzer.netfilter.walk import Walker, parse_flow
from analyzer.parse import load_ruleset
from analyzer.parse.envfile import load_environment

ROOT = Path(__file__).resolve().parent.parent
ENV = ROOT / "samples" / "env"
A = ipaddress.ip_address
FLOW = "tcp [fd01::2]:40000 -> [fd02::2]:80"


def _trip(name: str, flow: str = FLOW, start: str = "client"):
    [trip] = follow_all(World(load_environment(str(ENV / f"{name}.yaml"))), start, parse_flow(flow))
    return trip


def _rules(text: str):
    return load_ruleset((text, "t.rules"), family=6).ruleset


def test_router_dropping_solicitations_is_no_next_hop():
    req = _trip("ipv6-router-nd-dropped").request
    assert (req.end, req.end_ns, len(req.hops)) == ("no-neighbour", "client", 1)
    assert "the solicitation arrives in router on eth0; router's filter:INPUT:policy:DROP" in req.detail
    assert req.hops[0].disposition == "no-neighbour"


def test_client_dropping_advertisements_never_sends():
    req = _trip("ipv6-client-na-dropped").request
    assert (req.end, req.end_ns) == ("no-neighbour", "client")
    assert "the advertisement arrives in client on eth0; client's filter:INPUT:policy:DROP" in req.detail


def test_bridge_with_br_netfilter_filters_neighbour_discovery():
    req = _trip("ipv6-bridge-nd-dropped", "tcp [fd03::a]:40000 -> [fd03::b]:80", "pod-a").request
    assert (req.end, req.end_ns) == ("no-neighbour", "pod-a")
    assert "bridged by node (br0); node's filter:FORWARD:policy:DROP" in req.detail


def test_accepted_exchange_and_what_the_caches_learn():
    trip = _trip("ipv6-router-nd-accepted")
    assert trip.request.end == "delivered" and trip.reply.end == "delivered"

    def solicits(j):
        return [s.verdict.split(";")[0] for h in j.hops for s in h.steps
                if s.where == "neighbour" and " solicits " in s.verdict]
    # the router forwards: it solicits from a link-local address, not the client's source
    assert solicits(trip.request) == ["client solicits fd01::1 on eth0 from fd01::2",
                                      "router solicits fd02::2 on eth1 from fe80::ff:fe00:1 (a link-local "
                                      "address: the environment lists none for router:eth1)"]
    # the server learned the router's link-local address, not fd02::1: it must solicit that; the
    # router learned fd01::2 from the client's solicitation: no exchange for the last hop
    assert solicits(trip.reply) == ["server solicits fd02::1 on eth0 from fd02::2"]


def test_solicitation_source_is_the_packet_source_on_the_link_else_link_local():
    ns = Namespace()
    ns.add_addr("fd01::1/64", "eth0")
    ns.add_addr("fd02::1/64", "eth1")
    assert solicitation_source(ns, "eth0", A("fd01::1")) == (A("fd01::1"), False)
    assert solicitation_source(ns, "eth0", A("fd02::1")) == (ASSUMED_LINK_LOCAL, True)
    ns.add_addr("fe80::1/64", "eth0")
    assert solicitation_source(ns, "eth0", A("fd09::9")) == (A("fe80::1"), False)


def test_hop_limit_is_decided_for_neighbour_discovery():
    rs = _rules("*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                "-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-eq 255 -j ACCEPT\nCOMMIT\n")
    [b] = walk_nd(Walker(rs, Namespace()), solicitation(A("fd01::1"), A("fd01::2"), "eth0"),
                  ("PREROUTING", "INPUT"))
    assert b.disposition is None and not b.approx
    rs = _rules("*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                "-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m hl --hl-lt 255 -j ACCEPT\nCOMMIT\n")
    [b] = walk_nd(Walker(rs, Namespace()), solicitation(A("fd01::1"), A("fd01::2"), "eth0"),
                  ("PREROUTING", "INPUT"))
    assert b.disposition == "dropped" and not b.approx


def test_chn013_flags_a_host_that_drops_the_answers_to_its_own_solicitations():
    load_all()
    rs = _rules((ENV / "ipv6-client-na-dropped.rules").read_text())
    diags = [d for d in run_checks(CheckContext(rs)) if d.code == "CHN013"]
    assert len(diags) == 1
    assert "neighbour advertisements (ICMPv6 type 136) that answer its own solicitations" in diags[0].message


def test_chn013_discards_an_outcome_that_needs_lo_to_match():
    # the walk cannot tell the interface of the solicitation: '-i lo' forks; the outcome that
    # assumes it matches is one neighbour discovery never has (typed Assumption, not its text)
    from analyzer.netfilter.trace import Assumption

    load_all()
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            "-A INPUT -i lo -j ACCEPT\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
            "-A INPUT -j DROP\nCOMMIT\n")
    rs = _rules(text)
    w = Walker(rs, Namespace())
    brs = walk_nd(w, solicitation(ipaddress.ip_address("fe80::1"), ipaddress.ip_address("fe80::2"), None),
                  ("PREROUTING", "INPUT"))
    assumed = [a for b in brs for a in b.approx if isinstance(a, Assumption)]
    assert any(a.assumes_match and a.rule.index == 1 for a in assumed)
    diags = [d for d in run_checks(CheckContext(rs)) if d.code == "CHN013"]
    assert diags and "filter:INPUT:rule:3" in diags[0].message


def test_owner_match_sees_the_kernel_socket_of_neighbour_discovery():
    from analyzer.netfilter.neighbour import advertisement

    def out(rule):
        rs = _rules(f"*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT {rule}\nCOMMIT\n")
        [b] = walk_nd(Walker(rs, Namespace()), advertisement(A("fd01::1"), A("fd01::2"), "eth0"),
                      ("OUTPUT", "POSTROUTING"))
        assert not b.approx
        return b.disposition
    assert out("-m owner --uid-owner 0 -j DROP") is None
    assert out("-m owner ! --uid-owner 0 -j DROP") == "dropped"
    assert out("-m owner --socket-exists -j DROP") == "dropped"
