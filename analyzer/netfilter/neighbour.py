"""Netfilter layer: IPv6 neighbour discovery through ip6tables.

ARP never crosses iptables, but ICMPv6 neighbour solicitations (type 135) and advertisements
(136) are IP packets: they cross the ip6tables hooks like any other, as UNTRACKED (conntrack
leaves ND alone: nf_conntrack_icmpv6_error marks types 130-137 and 143 untracked), so an INPUT
chain that accepts only ESTABLISHED,RELATED drops them. A router that drops the solicitation
for its own address is unreachable as a next hop: the client never sends its first packet.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from analyzer.model.packet import Packet
from analyzer.netfilter.trace import Kind

NS, NA = 135, 136


def solicited_node(target) -> ipaddress.IPv6Address:
    """The multicast address a solicitation for ``target`` is sent to (RFC 4291 2.7.1).

    >>> solicited_node(ipaddress.ip_address("fd01::1"))
    IPv6Address('ff02::1:ff00:1')
    """
    return ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | (int(target) & 0xFFFFFF))


@dataclass
class NeighbourCheck:
    """One neighbour exchange: the solicitation and the advertisement through this namespace."""

    ok: bool
    summary: str
    steps: list = field(default_factory=list)    # walk.Step of both packets
    approx: list = field(default_factory=list)

    @property
    def crosses_rules(self) -> bool:
        return any(s.rule is not None for s in self.steps)


def walk_nd(w, pkt: Packet, hooks: tuple[str, ...]) -> list:
    """Every outcome (walk.Branch) of one ND packet through ``hooks``: untracked, as conntrack
    leaves ND."""
    from analyzer.netfilter.walk import KERNEL_SOCKET, Branch, Conntrack

    if "OUTPUT" in hooks:  # sent by the kernel's ndisc socket
        pkt = replace(pkt, uid=KERNEL_SOCKET, gid=KERNEL_SOCKET)
    ct = Conntrack(pkt, untracked=True, in_use=w.ct_in_use)
    brs = [Branch(pkt, ct)]
    for hook in hooks:
        brs = w.hook(brs, hook)
    return brs


def solicitation(target, solicitor, iif: str | None) -> Packet:
    return Packet(6, 58, solicitor, solicited_node(target), iif=iif, tcp_flags=0, icmp_type=NS, icmp_code=0)


def advertisement(target, solicitor, oif: str | None) -> Packet:
    return Packet(6, 58, target, solicitor, oif=oif, tcp_flags=0, icmp_type=NA, icmp_code=0)


def _walk(w, pkt: Packet, hooks: tuple[str, ...]):
    brs = walk_nd(w, pkt, hooks)
    # several outcomes (an uncertain match): the exchange works only if every one passes
    bad = [b for b in brs if b.disposition is not None]
    pick = bad[0] if bad else brs[0]
    return pick, not bad, [a for b in brs for a in b.approx]


def _walker(ruleset, ns, walker=None):
    if walker is not None:
        return walker
    from analyzer.netfilter.walk import Walker
    return Walker(ruleset, ns)


def answers_solicitation(ruleset, ns, iface: str, target, solicitor, walker=None) -> NeighbourCheck:
    """Would this namespace answer a neighbour solicitation for its address ``target`` arriving
    on ``iface`` from ``solicitor``? The NS (to ``target``'s solicited-node group) crosses
    PREROUTING and INPUT; the NA (to ``solicitor``) crosses OUTPUT and POSTROUTING."""
    w = _walker(ruleset, ns, walker)
    ns_pkt = solicitation(target, solicitor, iface)
    b1, ok1, ap1 = _walk(w, ns_pkt, ("PREROUTING", "INPUT"))
    steps = list(b1.steps)
    if not ok1:
        return NeighbourCheck(False, f"{_last_rule(b1)} drops the neighbour solicitation for {target} "
                                     f"from {solicitor} on {iface}", steps, ap1)
    na_pkt = advertisement(target, solicitor, iface)
    b2, ok2, ap2 = _walk(w, na_pkt, ("OUTPUT", "POSTROUTING"))
    steps += b2.steps
    if not ok2:
        return NeighbourCheck(False, f"{_last_rule(b2)} drops the neighbour advertisement of {target} "
                                     f"to {solicitor} on {iface}", steps, ap1 + ap2)
    return NeighbourCheck(True, f"{target} answers neighbour solicitations from {solicitor} on {iface}",
                          steps, ap1 + ap2)


def resolves_neighbour(ruleset, ns, iface: str, target, source, walker=None) -> NeighbourCheck:
    """Can this namespace resolve the neighbour ``target`` on ``iface``, soliciting from its own
    address ``source``? The NS leaves through OUTPUT and POSTROUTING; the NA arrives through
    PREROUTING and INPUT."""
    w = _walker(ruleset, ns, walker)
    ns_pkt = Packet(6, 58, source, solicited_node(target), oif=iface, tcp_flags=0, icmp_type=NS, icmp_code=0)
    b1, ok1, ap1 = _walk(w, ns_pkt, ("OUTPUT", "POSTROUTING"))
    steps = list(b1.steps)
    if not ok1:
        return NeighbourCheck(False, f"{_last_rule(b1)} drops this host's neighbour solicitation for "
                                     f"{target} on {iface}", steps, ap1)
    na_pkt = Packet(6, 58, target, source, iif=iface, tcp_flags=0, icmp_type=NA, icmp_code=0)
    b2, ok2, ap2 = _walk(w, na_pkt, ("PREROUTING", "INPUT"))
    steps += b2.steps
    if not ok2:
        return NeighbourCheck(False, f"{_last_rule(b2)} drops the neighbour advertisement from {target} "
                                     f"on {iface}", steps, ap1 + ap2)
    return NeighbourCheck(True, f"{target} is resolved on {iface}", steps, ap1 + ap2)


@dataclass
class Leg:
    """One crossing of one ND packet: which namespace, which hooks, with which packet."""

    ns: str
    what: str          # e.g. "the solicitation leaves client"
    walker: object
    pkt: Packet
    hooks: tuple[str, ...]


@dataclass
class Exchange:
    """A neighbour exchange between two namespaces (and a bridge between them): ``ok``, else
    the leg that failed and the rule or policy that dropped it (``dropped_by``)."""

    ok: bool
    summary: str
    legs: list = field(default_factory=list)    # (what, namespace, [walk.Step]) of every leg walked
    approx: list = field(default_factory=list)
    failed: Leg | None = None
    dropped_by: str = ""


def exchange(sender: tuple, owner: tuple, target, source, bridge: tuple | None = None) -> Exchange:
    """IPv6 neighbour discovery between two namespaces, as the kernel does it when ``sender``
    first sends a packet to the on-link next hop ``target`` that ``owner`` holds, with an empty
    neighbour cache (ndisc_solicit -> ndisc_send_ns; ndisc_recv_ns -> ndisc_send_na):

    1. the solicitation (type 135, hop limit 255, from ``source``, to ``target``'s solicited-node
       group) leaves the sender: OUTPUT, POSTROUTING (ndisc_send_skb: NF_INET_LOCAL_OUT);
    2. it crosses the bridge between them when the bridge's namespace runs ip6tables on bridged
       frames (br_netfilter): PREROUTING, FORWARD, POSTROUTING;
    3. it enters the owner: PREROUTING, INPUT (ip6_mc_input -> ip6_input);
    4. the advertisement (type 136, from ``target``, to ``source``) leaves the owner: OUTPUT,
       POSTROUTING; 5. crosses the bridge; 6. enters the sender: PREROUTING, INPUT.

    ``sender``/``owner``: (namespace name, walker, interface); ``bridge``: (namespace name,
    walker, bridge interface) or None. Every ND packet is UNTRACKED (nf_conntrack_icmpv6_error):
    the nat chains never see it. An uncertain match that forks a leg fails the exchange when any
    of its outcomes drops (APPROXIMATE)."""
    s_ns, s_w, s_if = sender
    o_ns, o_w, o_if = owner
    group = solicited_node(target)
    nsol = Packet(6, 58, source, group, tcp_flags=0, icmp_type=NS, icmp_code=0)
    nadv = Packet(6, 58, target, source, tcp_flags=0, icmp_type=NA, icmp_code=0)
    legs = [Leg(s_ns, f"the solicitation for {target} leaves {s_ns} on {s_if}", s_w,
                replace(nsol, oif=s_if), ("OUTPUT", "POSTROUTING"))]
    if bridge is not None:
        b_ns, b_w, b_if = bridge
        legs.append(Leg(b_ns, f"the solicitation is bridged by {b_ns} ({b_if})", b_w,
                        replace(nsol, iif=b_if, oif=b_if), ("PREROUTING", "FORWARD", "POSTROUTING")))
    legs += [Leg(o_ns, f"the solicitation arrives in {o_ns} on {o_if}", o_w, replace(nsol, iif=o_if),
                 ("PREROUTING", "INPUT")),
             Leg(o_ns, f"the advertisement of {target} leaves {o_ns} on {o_if}", o_w, replace(nadv, oif=o_if),
                 ("OUTPUT", "POSTROUTING"))]
    if bridge is not None:
        legs.append(Leg(b_ns, f"the advertisement is bridged by {b_ns} ({b_if})", b_w,
                        replace(nadv, iif=b_if, oif=b_if), ("PREROUTING", "FORWARD", "POSTROUTING")))
    legs.append(Leg(s_ns, f"the advertisement arrives in {s_ns} on {s_if}", s_w, replace(nadv, iif=s_if),
                    ("PREROUTING", "INPUT")))
    walked, approx = [], []
    for leg in legs:
        br, ok, ap = _walk(leg.walker, leg.pkt, leg.hooks)
        walked.append((leg.what, leg.ns, list(br.steps)))
        approx += [f"{leg.ns}: {a}" for a in ap]
        if not ok:
            rule = _deciding(br)
            return Exchange(False, f"{leg.what}; {leg.ns}'s {rule} drops it", walked, approx, leg, rule)
    return Exchange(True, f"{target} ({o_ns}) answers {s_ns}'s neighbour solicitation on {s_if} "
                          f"(from {source})", walked, approx)


def link_local(ns, iface: str):
    """The namespace's own link-local address on ``iface`` if the environment lists one, else
    None (the kernel gives every interface one; which is not known)."""
    for a in ns.addrs.get(iface or "", []):
        if a.version == 6 and a.ip.is_link_local:
            return a.ip
    return None


#: the link-local address assumed for an interface the environment lists none for (the kernel
#: derives one from the MAC address or a stable secret; any fe80::/64 address behaves the same
#: for rules that match fe80::/10)
ASSUMED_LINK_LOCAL = ipaddress.IPv6Address("fe80::ff:fe00:1")


def solicitation_source(ns, iface: str, pkt_src):
    """Where a solicitation comes from (ndisc_solicit): the source address of the packet waiting
    for the neighbour when it is an address of this interface (ipv6_chk_addr_and_flags with the
    device, strict), else the interface's link-local address (ndisc_send_ns: ipv6_get_lladdr).
    Returns (address, assumed): ``assumed`` when the link-local address is not listed."""
    for a in ns.addrs.get(iface or "", []):
        if a.version == 6 and a.ip == pkt_src:
            return pkt_src, False
    ll = link_local(ns, iface)
    return (ll, False) if ll is not None else (ASSUMED_LINK_LOCAL, True)


def _deciding(br) -> str:
    """The rule or policy that ended ``br``, as the trace prints it, with its dump line."""
    for s in reversed(br.steps):
        if s.rule is not None or s.kind is Kind.POLICY or s.kind is Kind.RETURN:
            at = f" ({s.path}:{s.line})" if s.line else ""
            return f"{s.where}:{s.verdict}{at}"
    return "a rule"


def _last_rule(br) -> str:
    for s in reversed(br.steps):
        if s.rule is not None or s.kind is Kind.POLICY or s.kind is Kind.RETURN:
            return f"{s.where}:{s.verdict}"
    return "a rule"


def own_address(ns, iface: str, peer):
    """This namespace's global IPv6 address on ``iface`` in ``peer``'s subnet (what a neighbour
    on that link resolves), or None."""
    for a in ns.addrs.get(iface or "", []):
        if a.version == 6 and not a.ip.is_link_local and peer in a.network:
            return a.ip
    return None
