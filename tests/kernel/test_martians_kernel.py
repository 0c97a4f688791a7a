"""The kernel judges the addresses it refuses before any rule but PREROUTING's:

- a packet arriving with a source or destination ip_route_input_slow calls a martian (a
  multicast, limited-broadcast, 0.0.0.0 or loopback source; a 0.0.0.0, loopback or multicast
  destination) crosses raw/mangle/nat PREROUTING and then goes nowhere: neither FORWARD nor
  INPUT sees it. synack must say "dropped" at the routing decision, and forward the control
  packet and the rest of 0.0.0.0/8 (a valid range since Linux 5.3, which this test found);
- a local socket whose source the output route refuses (a loopback source on a route out of a
  real interface) fails with EINVAL and sends nothing.

Topology: client 10.0.1.2 (sk1a) -- (sk1b) 10.0.1.1 router 10.0.2.1 (sk2b) -- (sk2a) 10.0.2.2
server, the router's default route via the server. The client injects each packet as an
Ethernet frame (AF_PACKET) to the router's MAC, so that its own stack does not refuse the
addresses first.
"""
from __future__ import annotations

import json
import time

import pytest

from analyzer.explain import explain_flow
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.trace import Route
from analyzer.netfilter.walk import parse_flow
from analyzer.parse import load_ruleset

pytestmark = pytest.mark.kernel

RULES = """*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 80
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 80
-A FORWARD -p tcp -m tcp --dport 80
-A OUTPUT -p tcp -m tcp --dport 80
COMMIT
"""

# (id, source, destination, what synack must say: the Route fact that ends it, None = forwarded)
ARRIVING = [
    ("control", "10.0.1.2", "10.0.2.2", None),
    ("zero-source", "0.0.0.0", "10.0.2.2", Route.MARTIAN_SOURCE),
    ("zeronet-source-routed", "0.0.0.5", "10.0.2.2", None),
    ("loopback-source", "127.0.0.5", "10.0.2.2", Route.MARTIAN_SOURCE),
    ("multicast-source", "224.0.0.5", "10.0.2.2", Route.MARTIAN_SOURCE),
    ("broadcast-source", "255.255.255.255", "10.0.2.2", Route.MARTIAN_SOURCE),
    ("zero-destination", "10.0.1.2", "0.0.0.0", Route.MARTIAN_DESTINATION),
    ("loopback-destination", "10.0.1.2", "127.0.0.5", Route.MARTIAN_DESTINATION),
    ("multicast-destination", "10.0.1.2", "239.1.2.3", Route.MARTIAN_DESTINATION),
]

# one TCP SYN as an Ethernet frame on the client's interface, addressed to the router's MAC
# (IPv4 or IPv6, by the source address)
_SEND_FRAME = r"""
import json, socket, struct, sys
c = json.loads(sys.argv[1])
def csum(data):
    if len(data) % 2:
        data += b"\0"
    t = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
v6 = ":" in c["src"]
fam = socket.AF_INET6 if v6 else socket.AF_INET
src, dst = socket.inet_pton(fam, c["src"]), socket.inet_pton(fam, c["dst"])
tcp = struct.pack("!HHIIBBHHH", c["sport"], 80, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
pseudo = struct.pack("!IxxxB", len(tcp), 6) if v6 else struct.pack("!BBH", 0, 6, len(tcp))
tcp = tcp[:16] + struct.pack("!H", csum(src + dst + pseudo + tcp)) + tcp[18:]
if v6:
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, src, dst)
else:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
mac = lambda m: bytes.fromhex(m.replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((c["ifname"], 0))
s.send(mac(c["dst_mac"]) + mac(c["src_mac"]) + (b"\x86\xdd" if v6 else b"\x08\x00") + ip + tcp)
"""


def _router_view() -> Namespace:
    ns = Namespace()
    ns.add_addr("10.0.1.1/24", "sk1b")
    ns.add_addr("10.0.2.1/24", "sk2b")
    ns.add_route("default via 10.0.2.2 dev sk2b")
    return ns


def _build(lab):
    c, r, s = lab.netns("client"), lab.netns("router", forwarding=True), lab.netns("server")
    lab.veth(c, r, addr_a="10.0.1.2/24", addr_b="10.0.1.1/24")   # sk1a / sk1b
    lab.veth(s, r, addr_a="10.0.2.2/24", addr_b="10.0.2.1/24")   # sk2a / sk2b
    c.route("default via 10.0.1.1")
    s.route("default via 10.0.2.1")
    r.route("default via 10.0.2.2 dev sk2b".split())
    r.sysctl({"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.sk1b.rp_filter": 0})
    r.iptables_restore(RULES)
    return c, r, s


@pytest.mark.parametrize("case", ARRIVING, ids=[c[0] for c in ARRIVING])
def test_martian_arrivals_agree_with_kernel(lab, case):
    """The frame crosses PREROUTING in both; FORWARD sees it exactly when synack forwards it."""
    name, src, dst, fact = case
    rs = load_ruleset((RULES, "martians.rules")).ruleset
    flow = parse_flow(f"tcp {src}:40000 -> {dst}:80")
    from dataclasses import replace
    (oc,) = explain_flow(rs, replace(flow, iif="sk1b"), _router_view())
    ends = [s.fact for s in oc.forward.steps if s.fact in (Route.MARTIAN_SOURCE, Route.MARTIAN_DESTINATION)]
    if fact is None:
        assert oc.disposition == "forwarded" and not ends, (oc.disposition, oc.detail)
    else:
        assert oc.disposition == "dropped" and ends == [fact], (oc.disposition, oc.detail)
    c, r, _ = _build(lab)
    c.run([lab.python, "-c", _SEND_FRAME, json.dumps(
        {"src": src, "dst": dst, "sport": 40000, "ifname": "sk1a", "src_mac": c.mac("sk1a"),
         "dst_mac": r.mac("sk1b")})])
    deadline = time.monotonic() + 2.0  # the frame crosses the router in softirq, asynchronously
    while r.rule_counters("raw").get(("PREROUTING", 1), 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    raw, flt = r.rule_counters("raw"), r.rule_counters("filter")
    assert raw[("PREROUTING", 1)] == 1, "the frame never reached the router's PREROUTING"
    forwarded, delivered = flt[("FORWARD", 1)] == 1, flt[("INPUT", 1)] == 1
    assert not delivered
    assert forwarded == (oc.disposition == "forwarded"), (
        f"kernel: {'forwarded' if forwarded else 'not forwarded'}; synack: {oc.disposition} {oc.detail}")


# (id, source to bind or None, destination, does synack refuse it)
LOCAL = [
    ("control", None, "10.0.2.2", False),
    ("loopback-source-out-of-sk2b", "127.0.0.1", "10.0.2.2", True),
]


@pytest.mark.parametrize("case", LOCAL, ids=[c[0] for c in LOCAL])
def test_output_route_refusals_agree_with_kernel(lab, case):
    """connect() from the router itself: EINVAL exactly where synack says nothing is sent."""
    name, bind, dst, refused = case
    rs = load_ruleset((RULES, "martians.rules")).ruleset
    (oc,) = explain_flow(rs, parse_flow(f"tcp {bind or '10.0.2.1'}:40000 -> {dst}:80", local=True),
                         _router_view(), local=True)
    said = [s.fact for s in oc.forward.steps if s.fact is Route.OUTPUT_REFUSED]
    assert (oc.disposition == "not-sent") == refused and bool(said) == refused, (oc.disposition, oc.detail)
    _, r, s = _build(lab)
    if not refused:
        s.listen_tcp("10.0.2.2", 80)
    res = r.connect_tcp(dst, 80, src=bind, timeout=1.0, data=None)
    if refused:
        assert res.outcome == "error" and res.error == "EINVAL", res
        assert r.rule_counters("filter").get(("OUTPUT", 1), 0) == 0, "a packet left despite EINVAL"
    else:
        assert res.outcome == "ok", res


# IPv6: ip6_rcv_core drops some before any hook (the raw PREROUTING counter stays 0), a multicast
# destination after PREROUTING, ip6_forward an unspecified or link-local source before FORWARD. (id, source, destination, synack's ending fact, crosses PREROUTING)
ARRIVING6 = [
    ("control", "fd01::2", "fd02::2", None, True),
    ("loopback-source", "::1", "fd02::2", Route.MARTIAN_SOURCE, False),
    ("loopback-destination", "fd01::2", "::1", Route.MARTIAN_DESTINATION, False),
    ("multicast-source", "ff02::1", "fd02::2", Route.MARTIAN_SOURCE, False),
    ("interface-local-multicast-destination", "fd01::2", "ff01::1", Route.MARTIAN_DESTINATION, False),
    ("scope-0-multicast-destination", "fd01::2", "ff00::1", Route.MARTIAN_DESTINATION, False),
    ("site-multicast-destination", "fd01::2", "ff05::1:3", Route.MARTIAN_DESTINATION, True),
    ("unspecified-source", "::", "fd02::2", Route.MARTIAN_SOURCE, True),      # ip6_forward, before FORWARD
    ("link-local-source", "fe80::5", "fd02::2", Route.MARTIAN_SOURCE, True),  # ip6_forward: ICMPv6 unreachable
    ("v4-mapped-source", "::ffff:10.0.1.2", "fd02::2", None, True),          # forwarded (only TCP refuses it)
]

@pytest.mark.parametrize("case", ARRIVING6, ids=[c[0] for c in ARRIVING6])
def test_ipv6_martians_agree_with_kernel(lab, case):
    """PREROUTING sees the frame exactly when synack walks it there; FORWARD exactly when synack
    forwards it."""
    from dataclasses import replace
    name, src, dst, fact, prerouting = case
    rs = load_ruleset((RULES, "martians6.rules"), family=6).ruleset
    ns = Namespace()
    ns.add_addr("fd01::1/64", "sk1b")
    ns.add_addr("fd02::1/64", "sk2b")
    ns.add_route("::/0 via fd02::2 dev sk2b")
    (oc,) = explain_flow(rs, replace(parse_flow(f"tcp [{src}]:40000 -> [{dst}]:80"), iif="sk1b"), ns)
    ends = [s.fact for s in oc.forward.steps if s.fact in (Route.MARTIAN_SOURCE, Route.MARTIAN_DESTINATION)]
    crossed = any(s.where.startswith("raw:PREROUTING") for s in oc.forward.steps)
    assert (ends == ([fact] if fact else [])) and crossed == prerouting, (oc.disposition, oc.detail)
    c, r, s = lab.netns("client"), lab.netns("router", forwarding=True), lab.netns("server")
    lab.veth(c, r, addr_a="fd01::2/64", addr_b="fd01::1/64")
    lab.veth(s, r, addr_a="fd02::2/64", addr_b="fd02::1/64")
    r.route(["::/0", "via", "fd02::2", "dev", "sk2b"])
    r.iptables_restore(RULES, ipv6=True)
    c.run([lab.python, "-c", _SEND_FRAME, json.dumps(
        {"src": src, "dst": dst, "sport": 40000, "ifname": "sk1a", "src_mac": c.mac("sk1a"),
         "dst_mac": r.mac("sk1b")})])
    time.sleep(0.5)  # the frame crosses the router in softirq, asynchronously
    raw, flt = r.rule_counters("raw", ipv6=True), r.rule_counters("filter", ipv6=True)
    assert (raw[("PREROUTING", 1)] == 1) == prerouting, f"kernel PREROUTING saw {raw[('PREROUTING', 1)]} packet(s)"
    assert flt[("INPUT", 1)] == 0
    assert (flt[("FORWARD", 1)] == 1) == (oc.disposition == "forwarded"), (
        f"kernel FORWARD saw {flt[('FORWARD', 1)]}; synack: {oc.disposition} {oc.detail}")
