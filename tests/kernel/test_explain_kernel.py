"""The kernel judges `synack explain`: one table of cases, each a router (or host) dump, a
topology and one TCP flow. synack predicts from the same dump, addresses and routes; then the
flow runs in real namespaces and the two must agree on:

- the outcome the client gets (ok / timeout / refused ...) and the source of its reply;
- where the first packet arrived: the server's local address/port and the peer it saw
  (the peer reveals SNAT/MASQUERADE);
- the router's conntrack entry: original and reply tuples (or no entry at all);
- which rules the first packet and its reply crossed: per table, the rules whose counters
  moved equal the rules synack's steps say matched.

Topology (IPv4; IPv6 uses fd01::/64 and fd02::/64 the same way)::

    client 10.0.1.2 (sk1a) -- (sk1b) 10.0.1.1 router 10.0.2.1 (sk2b) -- (sk2a) 10.0.2.2 server

The router's default route points at the server side (``default via 10.0.2.2 dev sk2b``), so
service VIPs are routable the way they are on a node. A case with ``local=True`` originates the
flow in the router itself (OUTPUT path).

Each case runs in two phases. Phase 1 has no listener: the server's (or the router's) kernel
answers the SYN with RST, so the router sees exactly the first packet and one reply, which is
what rule counters and conntrack are compared on. Phase 2 starts the listeners and makes a
real connection, compared on outcome, server view and client view.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import pytest

from analyzer.explain import explain_flow
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.walk import parse_flow
from analyzer.parse import load_ruleset

pytestmark = pytest.mark.kernel

V4 = {"client": "10.0.1.2", "r_c": "10.0.1.1", "r_s": "10.0.2.1", "server": "10.0.2.2", "plen": 24,
      "default": "default via 10.0.2.2 dev sk2b", "kdefault": "default via 10.0.2.2 dev sk2b"}
V6 = {"client": "fd01::2", "r_c": "fd01::1", "r_s": "fd02::1", "server": "fd02::2", "plen": 64,
      "default": "::/0 via fd02::2 dev sk2b", "kdefault": "::/0 via fd02::2 dev sk2b"}

NAT_EMPTY = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
            ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n"


@dataclass(frozen=True)
class Case:
    id: str
    dump: str
    dst: str
    dport: int
    expect: str                       # synack's disposition (guards the case itself)
    listen: tuple = (("server", 8080),)  # (namespace, port) listeners of phase 2
    local: bool = False               # flow generated in the router (OUTPUT path)
    uid: int | None = None
    ipv6: bool = False
    router_addrs: tuple = ()          # extra (cidr, iface) of the router
    backends: tuple = ("nft",)
    outcomes: int = 1                 # how many outcomes synack predicts
    kernel_outcome: str | None = None  # phase-2 client outcome when not "ok"


KUBE_NAT = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-WEB - [0:0]
:KUBE-SEP-WEB1 - [0:0]
:KUBE-SEP-WEB2 - [0:0]
:KUBE-EXT-WEB - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web" -m tcp --dport 30080 -j KUBE-EXT-WEB
-A KUBE-EXT-WEB -m comment --comment "masquerade traffic for default/web external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-WEB -j KUBE-SVC-WEB
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web cluster IP" -m tcp --dport 80 -j KUBE-SVC-WEB
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-WEB ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-WEB -m comment --comment "default/web -> 10.0.2.2:8080" -m statistic --mode random --probability {p} -j KUBE-SEP-WEB1
-A KUBE-SVC-WEB -m comment --comment "default/web -> 10.0.2.2:8081" -j KUBE-SEP-WEB2
-A KUBE-SEP-WEB1 -s 10.0.2.2/32 -m comment --comment "default/web" -j KUBE-MARK-MASQ
-A KUBE-SEP-WEB1 -p tcp -m comment --comment "default/web" -m tcp -j DNAT --to-destination 10.0.2.2:8080
-A KUBE-SEP-WEB2 -s 10.0.2.2/32 -m comment --comment "default/web" -j KUBE-MARK-MASQ
-A KUBE-SEP-WEB2 -p tcp -m comment --comment "default/web" -m tcp -j DNAT --to-destination 10.0.2.2:8081
COMMIT
"""

KUBE_NO_ENDPOINTS = NAT_EMPTY + """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment "default/empty has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
COMMIT
"""

DNAT_MASQ = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d 10.0.1.1/32 -p tcp --dport 80 -j DNAT --to-destination 10.0.2.2:8080
-A POSTROUTING -o sk2b -m conntrack --ctstate DNAT -j MASQUERADE
COMMIT
"""

DNAT_ONLY = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d 10.99.0.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.2.2:8080
COMMIT
"""

SNAT = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 10.0.1.0/24 -o sk2b -j SNAT --to-source 10.0.2.100
COMMIT
"""

REDIRECT = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""

FWD_DROP = NAT_EMPTY + """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"""

FWD_RESET = NAT_EMPTY + """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p tcp -m tcp --dport 8080 --tcp-flags SYN,RST,ACK SYN -j REJECT --reject-with tcp-reset
COMMIT
"""

MARKS = """*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 8081 -j MARK --set-mark 0x2
-A PREROUTING -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x1/0xff
COMMIT
""" + NAT_EMPTY + """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m mark --mark 0x2 -j DROP
-A FORWARD -m mark --mark 0x1/0xf -j ACCEPT
COMMIT
"""

NOTRACK = """*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p tcp -m tcp --dport 80 -j NOTRACK
-A PREROUTING -p tcp -m tcp --sport 80 -j NOTRACK
COMMIT
""" + DNAT_ONLY.replace("10.99.0.1/32", "10.0.2.2/32")

LOCAL_DNAT = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A OUTPUT -d 10.96.0.30/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.2.2:8080
COMMIT
"""

OWNER = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:SIDECAR_OUTPUT - [0:0]
-A OUTPUT -p tcp -j SIDECAR_OUTPUT
-A SIDECAR_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A SIDECAR_OUTPUT -d 10.0.2.2/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.2.2:8081
COMMIT
"""

CTSTATE = NAT_EMPTY + """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -p tcp -m conntrack --ctstate NEW -m tcp --dport 8080 -j ACCEPT
COMMIT
"""

CTSTATE_DNAT = DNAT_ONLY + """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate DNAT -j ACCEPT
COMMIT
"""

GOTO = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:SVC - [0:0]
:SVC_B - [0:0]
-A PREROUTING -d 10.99.0.1/32 -p tcp -j SVC
-A PREROUTING -d 10.99.0.1/32 -p tcp -j DNAT --to-destination 10.0.2.2:8082
-A SVC -s 10.0.1.0/24 -g SVC_B
-A SVC -p tcp -j DNAT --to-destination 10.0.2.2:8083
-A SVC_B -p tcp -m tcp --dport 81 -j RETURN
-A SVC_B -p tcp -j DNAT --to-destination 10.0.2.2:8080
COMMIT
"""

MULTIPORT = NAT_EMPTY + """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p tcp -m multiport --sports 8000:9000,22 -j ACCEPT
-A FORWARD -p tcp -m multiport --dports 22,8080:8090 -j ACCEPT
COMMIT
"""

IPV6_DNAT = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d fd00:96::10/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [fd02::2]:8080
-A POSTROUTING -o sk2b -m conntrack --ctstate DNAT -j MASQUERADE
COMMIT
""" + """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -d fd02::2/128 -p tcp -m tcp --dport 8080 -j ACCEPT
COMMIT
"""

CASES = [
    Case("kube-clusterip", KUBE_NAT.format(p="1.00000000000"), "10.96.0.10", 80, "forwarded",
         listen=(("server", 8080), ("server", 8081)), backends=("nft", "legacy")),
    Case("kube-clusterip-second-endpoint", KUBE_NAT.format(p="0.00000000000"), "10.96.0.10", 80,
         "forwarded", listen=(("server", 8080), ("server", 8081))),
    Case("kube-clusterip-random", KUBE_NAT.format(p="0.50000000000"), "10.96.0.10", 80, "forwarded",
         listen=(("server", 8080), ("server", 8081)), outcomes=2),
    Case("kube-nodeport-addrtype-local", KUBE_NAT.format(p="1.00000000000"), "10.0.1.1", 30080,
         "forwarded", listen=(("server", 8080), ("server", 8081)), backends=("nft", "legacy")),
    Case("kube-clusterip-from-node", KUBE_NAT.format(p="1.00000000000"), "10.96.0.10", 80, "sent",
         listen=(("server", 8080), ("server", 8081)), local=True),
    Case("kube-no-endpoints-reject", KUBE_NO_ENDPOINTS, "10.96.0.20", 80, "rejected",
         kernel_outcome="refused", backends=("nft", "legacy")),
    Case("dnat-masquerade", DNAT_MASQ, "10.0.1.1", 80, "forwarded", backends=("nft", "legacy")),
    Case("dnat-without-masquerade", DNAT_ONLY, "10.99.0.1", 80, "forwarded"),
    Case("snat", SNAT, "10.0.2.2", 8080, "forwarded", router_addrs=(("10.0.2.100/24", "sk2b"),),
         backends=("nft", "legacy")),
    Case("redirect-to-sidecar", REDIRECT, "10.0.2.2", 8080, "delivered-locally",
         listen=(("router", 15001), ("server", 8080))),
    Case("redirect-return-exempt", REDIRECT, "10.0.2.2", 22, "forwarded",
         listen=(("router", 15001), ("server", 22))),
    Case("forward-policy-drop", FWD_DROP, "10.0.2.2", 8080, "dropped", kernel_outcome="timeout",
         backends=("nft", "legacy")),
    # the SYN is accepted, its SYN+ACK (sport 22) falls to the DROP policy
    Case("forward-policy-drops-reply", FWD_DROP, "10.0.2.2", 22, "forwarded",
         listen=(("server", 22),), backends=("nft", "legacy"), kernel_outcome="timeout"),
    Case("forward-reject-tcp-reset", FWD_RESET, "10.0.2.2", 8080, "rejected",
         kernel_outcome="refused", backends=("nft", "legacy")),
    Case("mark-then-drop", MARKS, "10.0.2.2", 8081, "dropped", listen=(("server", 8081),),
         kernel_outcome="timeout"),
    Case("mark-then-accept", MARKS, "10.0.2.2", 8080, "forwarded"),
    Case("notrack-skips-nat", NOTRACK, "10.0.2.2", 80, "forwarded",
         listen=(("server", 80), ("server", 8080))),
    Case("local-process-dnat", LOCAL_DNAT, "10.96.0.30", 80, "sent", local=True),
    Case("owner-uid-exempt", OWNER, "10.0.2.2", 8080, "sent", local=True, uid=1337,
         listen=(("server", 8080), ("server", 8081))),
    Case("owner-uid-redirected", OWNER, "10.0.2.2", 8080, "sent", local=True, uid=1000,
         listen=(("server", 8080), ("server", 8081))),
    Case("ctstate-new-accepted", CTSTATE, "10.0.2.2", 8080, "forwarded",
         backends=("nft", "legacy")),
    Case("ctstate-new-dropped", CTSTATE, "10.0.2.2", 9090, "dropped", listen=(("server", 9090),),
         kernel_outcome="timeout"),
    Case("ctstate-dnat-accepted", CTSTATE_DNAT, "10.99.0.1", 80, "forwarded"),
    Case("goto-then-dnat", GOTO, "10.99.0.1", 80, "forwarded",
         listen=(("server", 8080), ("server", 8082), ("server", 8083))),
    Case("goto-return-skips-caller", GOTO, "10.99.0.1", 81, "forwarded",
         listen=(("server", 8080), ("server", 8082), ("server", 8083))),
    Case("multiport-accept", MULTIPORT, "10.0.2.2", 8085, "forwarded", listen=(("server", 8085),)),
    Case("multiport-miss-dropped", MULTIPORT, "10.0.2.2", 9000, "dropped",
         listen=(("server", 9000),), kernel_outcome="timeout"),
    Case("ipv6-dnat-masquerade", IPV6_DNAT, "fd00:96::10", 80, "forwarded", ipv6=True,
         backends=("nft", "legacy")),
]

PARAMS = [pytest.param(c, b, id=f"{c.id}-{b}") for c in CASES for b in c.backends]
_RULE_STEP = re.compile(r"^([a-z]+):([^:]+):rule:(\d+)$")
_SPORTS = iter(range(41000, 60000, 7))


def _tables(dump: str) -> list[str]:
    return re.findall(r"^\*(\w+)", dump, re.M)


def _namespace(case: Case, net: dict) -> Namespace:
    """synack's view of the router: exactly the addresses and routes the lab gives it."""
    ns = Namespace()
    ns.add_addr(f"{net['r_c']}/{net['plen']}", "sk1b")
    ns.add_addr(f"{net['r_s']}/{net['plen']}", "sk2b")
    for cidr, iface in case.router_addrs:
        ns.add_addr(cidr, iface)
    ns.add_route(net["default"])
    return ns


def _predict(case: Case, net: dict, sport: int):
    rs = load_ruleset((case.dump, f"{case.id}.rules")).ruleset
    src = net["r_s"] if case.local else net["client"]
    fmt = "[{}]:{}" if case.ipv6 else "{}:{}"
    flow = parse_flow(f"tcp {fmt.format(src, sport)} -> {fmt.format(case.dst, case.dport)}")
    flow = replace(flow, uid=case.uid) if case.local else replace(flow, iif="sk1b")
    outcomes = explain_flow(rs, flow, _namespace(case, net), local=case.local)
    assert len(outcomes) == case.outcomes, [o.disposition for o in outcomes]
    for o in outcomes:
        assert o.disposition == case.expect, (o.disposition, o.detail)
    return outcomes


def _matched_rules(outcome, table: str, reply: bool = True) -> set:
    """Rules synack says the first packet (and its reply) matched in ``table``."""
    steps = list(outcome.forward.steps)
    if reply and outcome.reply:
        steps += outcome.reply.steps
    got = set()
    for s in steps:
        m = _RULE_STEP.match(s.where)
        if m and m.group(1) == table:
            got.add((m.group(2), int(m.group(3))))
    return got


def _port_exact(outcome) -> bool:
    return not any("random-fully" in s.verdict for s in outcome.forward.steps)


def _build(lab, case: Case, backend: str):
    net = V6 if case.ipv6 else V4
    c, r, s = lab.netns("client"), lab.netns("router", forwarding=True), lab.netns("server")
    plen = net["plen"]
    lab.veth(c, r, addr_a=f"{net['client']}/{plen}", addr_b=f"{net['r_c']}/{plen}",
             static_neighbors=True)   # sk1a / sk1b
    lab.veth(s, r, addr_a=f"{net['server']}/{plen}", addr_b=f"{net['r_s']}/{plen}",
             static_neighbors=True)   # sk2a / sk2b
    for cidr, iface in case.router_addrs:
        r.addr(iface, cidr)
    if case.ipv6:
        c.route(["::/0", "via", net["r_c"]])
        s.route(["::/0", "via", net["r_s"]])
    else:
        c.route(f"default via {net['r_c']}")
        s.route(f"default via {net['r_s']}")
    r.route(net["kdefault"].split())
    r.iptables_restore(case.dump, backend=backend, ipv6=case.ipv6)
    return net, {"client": c, "router": r, "server": s}


def _connect(case: Case, nss: dict, net: dict, sport: int, timeout: float):
    src_ns = nss["router"] if case.local else nss["client"]
    src = net["r_s"] if case.local else net["client"]
    return src_ns.connect_tcp(case.dst, case.dport, src=src, src_port=sport, timeout=timeout,
                              uid=case.uid)


def _pick(outcomes, dst, dport):
    """The predicted outcome whose translated destination is the one the kernel chose."""
    for o in outcomes:
        if str(o.forward.pkt.dst) == dst and o.forward.pkt.dport == dport:
            return o
    raise AssertionError(f"kernel chose {dst}:{dport}, not among synack's outcomes "
                         f"{[o.forward.pkt.tuple_str() for o in outcomes]}")


def _ct_entry(router, case: Case, src: str, sport: int):
    entries = router.conntrack(family="ipv6" if case.ipv6 else "ipv4", proto="tcp")
    mine = [e for e in entries if e.original.src == src and e.original.sport == sport]
    assert len(mine) <= 1, mine
    return mine[0] if mine else None


@pytest.mark.parametrize("case, backend", PARAMS)
def test_explain_agrees_with_kernel(lab, require, case: Case, backend: str):
    require(backend, "conntrack")
    if case.uid is not None:
        require("setpriv")
    net, nss = _build(lab, case, backend)
    router = nss["router"]
    src = net["r_s"] if case.local else net["client"]
    short = 0.5

    servers = {(n, p): nss[n].listen_tcp("::" if case.ipv6 else "0.0.0.0", p)
               for n, p in case.listen}

    # ---- phase 1: the reply is dropped at the far end (the client's INPUT, or the server's
    # OUTPUT for a flow the router originates), so the router sees the first packet and at most
    # one reply, and the connection stays in conntrack (an RST would end it).
    if case.local:
        nss["server"].iptables("-A OUTPUT -j DROP", ipv6=case.ipv6)
    else:
        nss["client"].iptables("-A INPUT -j DROP", ipv6=case.ipv6)
    sport1 = next(_SPORTS)
    outcomes1 = _predict(case, net, sport1)
    res1 = _connect(case, nss, net, sport1, short)
    assert res1.outcome == "timeout", res1  # the sink swallowed every answer
    entry = _ct_entry(router, case, src, sport1)
    ct0 = outcomes1[0].forward.ct
    tracked = case.expect in ("forwarded", "delivered-locally", "sent") \
        and ct0.in_use and not ct0.untracked
    if not tracked:
        assert entry is None, f"synack predicts no conntrack entry; kernel has {entry.raw}"
        oc = outcomes1[0]
    else:
        assert entry is not None, "synack predicts a conntrack entry; the kernel has none"
        oc = _pick(outcomes1, entry.reply.src, entry.reply.sport)
        ct = oc.forward.ct
        assert (entry.original.src, entry.original.sport, entry.original.dst, entry.original.dport) \
            == (str(ct.original.src), ct.original.sport, str(ct.original.dst), ct.original.dport)
        want = (str(ct.reply_src), ct.reply_sport, str(ct.reply_dst), ct.reply_dport)
        got = (entry.reply.src, entry.reply.sport, entry.reply.dst, entry.reply.dport)
        if not _port_exact(oc):
            want, got = want[:3], got[:3]
        assert got == want, f"conntrack reply tuple: kernel {entry.raw}"
        assert entry.dnat == ct.dnat and entry.snat == ct.snat
    for table in _tables(case.dump):
        counters = router.rule_counters(table, backend=backend, ipv6=case.ipv6)
        crossed = {k for k, n in counters.items() if n}
        assert crossed == _matched_rules(oc, table, reply=not case.local), \
            f"{table}: kernel counted {sorted(crossed)}; synack steps " \
            f"{[s.where + ':' + s.verdict for s in oc.forward.steps]}"

    # ---- phase 2: a real connection.
    if case.local:
        nss["server"].iptables("-F OUTPUT", ipv6=case.ipv6)
    else:
        nss["client"].iptables("-F INPUT", ipv6=case.ipv6)
    router.conntrack_flush()
    sport2 = next(_SPORTS)
    outcomes2 = _predict(case, net, sport2)
    res2 = _connect(case, nss, net, sport2, short if case.kernel_outcome == "timeout" else 2.0)
    predicted = {_client_outcome(o) for o in outcomes2}
    assert res2.outcome in predicted, (res2, predicted)
    assert res2.outcome == (case.kernel_outcome or "ok")  # the case tests what it says
    if res2.outcome != "ok":
        assert not any(srv.connections() for srv in servers.values())
        return
    assert res2.outcome == "ok", res2
    conns = [(key, c) for key, srv in servers.items() for c in srv.connections()]
    assert len(conns) == 1, conns
    (where, _), conn = conns[0]
    oc = _pick(outcomes2, _norm(conn.local[0]), conn.local[1])
    pkt = oc.forward.pkt
    expected_ns = "router" if oc.disposition == "delivered-locally" else "server"
    assert where == expected_ns
    assert _norm(conn.peer[0]) == str(pkt.src), f"server saw peer {conn.peer}, synack {pkt.tuple_str()}"
    if _port_exact(oc):
        assert conn.peer[1] == pkt.sport
    # the client's view: the reply comes from what it dialled (reverse translation)
    assert oc.reply_ok is True
    assert (_norm(res2.peer[0]), res2.peer[1]) == (str(oc.client_sees.src), oc.client_sees.sport)


def _client_outcome(oc) -> str:
    """What the client's connect()/read should report if synack's outcome is right."""
    if oc.disposition == "dropped":
        return "timeout"
    if oc.disposition == "rejected":
        # an RST and an ICMP port unreachable both end connect() with ECONNREFUSED
        return "refused" if oc.detail in ("", "tcp-reset", "icmp-port-unreachable",
                                          "icmp6-port-unreachable") else "unreachable"
    if oc.disposition == "no-route":
        return "unreachable"
    if oc.reply is None or oc.reply.disposition not in ("sent", "delivered-locally"):
        return "timeout"  # the SYN+ACK never reaches the client; it retransmits its SYN
    return "ok" if oc.reply_ok else "timeout"


def _norm(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") else addr


HAIRPIN = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:VIP-SERVICES - [0:0]
-A PREROUTING -j VIP-SERVICES
-A VIP-SERVICES -d 10.0.0.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.3:8080
{masq}COMMIT
"""


@pytest.mark.parametrize("masq", [False, True], ids=["hairpin-no-masquerade", "hairpin-masquerade"])
def test_hairpin_on_a_bridge(lab, require, masq: bool):
    """Seed scenario 1: client and backend share the host's bridge. Without SNAT the backend
    answers the client directly, from its own address: the client resets it and times out."""
    require("nft", "conntrack")
    dump = HAIRPIN.format(masq="-A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE\n"
                          if masq else "")
    c, h, s = lab.netns("client"), lab.netns("host", forwarding=True), lab.netns("server")
    vc = lab.veth(c, h, addr_a="10.0.0.2/24")
    vs = lab.veth(s, h, addr_a="10.0.0.3/24")
    try:
        lab.bridge(h, "br0", ports=[vc.b, vs.b], nf_call_iptables=False, addr="10.0.0.1/24")
    except Exception as exc:  # br_netfilter absent: the sysctl does not exist
        pytest.skip(f"bridge: {exc}")
    c.route("default via 10.0.0.1")
    s.route("default via 10.0.0.1")
    h.iptables_restore(dump, backend="nft")
    ns = Namespace()
    ns.add_addr("10.0.0.1/24", "br0")
    rs = load_ruleset((dump, "hairpin.rules")).ruleset
    flow = replace(parse_flow("tcp 10.0.0.2:42424 -> 10.0.0.1:80"), iif="br0")
    (oc,) = explain_flow(rs, flow, ns)
    assert oc.reply_ok is masq
    srv = s.listen_tcp("0.0.0.0", 8080)
    res = c.connect_tcp("10.0.0.1", 80, src_port=42424, timeout=1.0)
    assert res.outcome == _client_outcome(oc), res
    if masq:
        conn = srv.wait_connections(1)[0]
        assert (conn.peer[0], conn.local) == (str(oc.forward.pkt.src), ("10.0.0.3", 8080))
