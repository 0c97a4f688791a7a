"""Netfilter layer: IPv6 neighbour discovery through ip6tables.

ARP never crosses iptables, but ICMPv6 neighbour solicitations (type 135) and advertisements
(136) are IP packets: they cross the ip6tables hooks like any other, as UNTRACKED (conntrack
leaves ND alone: nf_conntrack_icmpv6_error marks types 130-137 and 143 untracked), so an INPUT
chain that accepts only ESTABLISHED,RELATED drops them. A router that drops the solicitation
for its own address is unreachable as a next hop: the client never sends its first packet.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from analyzer.model.packet import Packet

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
        return any(":rule:" in s.where for s in self.steps)


def walk_nd(w, pkt: Packet, hooks: tuple[str, ...]) -> list:
    """Every outcome (walk.Branch) of one ND packet through ``hooks``: untracked, as conntrack
    leaves ND."""
    from analyzer.netfilter.walk import Branch, Conntrack

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


def _last_rule(br) -> str:
    for s in reversed(br.steps):
        if s.where not in ("conntrack", "route") and not s.where.startswith("stages:"):
            return f"{s.where}:{s.verdict}"
    return "a rule"


def own_address(ns, iface: str, peer):
    """This namespace's global IPv6 address on ``iface`` in ``peer``'s subnet (what a neighbour
    on that link resolves), or None."""
    for a in ns.addrs.get(iface or "", []):
        if a.version == 6 and not a.ip.is_link_local and peer in a.network:
            return a.ip
    return None
