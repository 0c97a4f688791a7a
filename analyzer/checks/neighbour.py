"""Checks layer, chains family (CHN): IPv6 neighbour discovery dropped by ip6tables.

Uses the netfilter walk (netfilter.neighbour): a link-local neighbour solicitation and its
advertisement through the host's own hooks, as the kernel sends them (untracked).
"""
from __future__ import annotations

import ipaddress
from typing import Iterator

from analyzer.checks import CheckContext, check
from analyzer.diagnostics import Diagnostic, Related, Severity
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.neighbour import advertisement, solicitation, walk_nd
from analyzer.netfilter.trace import Assumption, Kind

# the witness exchange: a neighbour on the link resolves this host's link-local address
TARGET, SOLICITOR = ipaddress.ip_address("fe80::1"), ipaddress.ip_address("fe80::2")


def _deciding(rs, br):
    """The rule (or chain policy) that ended ``br``: (label, span)."""
    for s in reversed(br.steps):
        if s.rule is not None:
            return s.rule.label, s.rule.span
        if s.kind is Kind.POLICY:
            chain = rs.chain(s.table, s.chain)
            return f"{s.table}:{s.chain}:policy {chain.policy}", chain.span
    return None, None


def _assumes_loopback(br) -> bool:
    """Whether this outcome needs a rule matching '-i lo' / '-o lo' to match: neighbour discovery
    never crosses lo, so such an outcome cannot happen."""
    from analyzer.model.rules import IfaceMatch

    return any(isinstance(a, Assumption) and a.assumes_match and
               any(isinstance(x, IfaceMatch) and x.name == "lo" and not x.negated for x in a.rule.matches)
               for a in br.approx)


@check(code="CHN013", name="neighbour-discovery-dropped", severity=Severity.ERROR)
def neighbour_discovery_dropped(ctx: CheckContext) -> Iterator[Diagnostic]:
    """ip6tables drops the host's neighbour discovery: INPUT drops neighbour solicitations, or
    OUTPUT drops the advertisements that answer them (neighbours cannot resolve the host); or
    OUTPUT drops its own solicitations, or INPUT the advertisements that answer them (the host
    cannot resolve its neighbours).

    Why it matters: IPv6 resolves link-layer addresses with ICMPv6 (types 135/136), which crosses
    ip6tables (ARP never crosses iptables), untracked, so a stateful INPUT that accepts only
    ESTABLISHED,RELATED drops it. Neighbours cannot resolve the host: as a router it forwards
    nothing, as a server it is unreachable, and the clients' SYNs are never sent.
    Fix: accept ICMPv6 neighbour-solicitation and neighbour-advertisement in INPUT (and OUTPUT).
    """
    rs = ctx.ruleset
    if getattr(rs, "family", 4) != 6 or ctx.partial or rs.chain("filter", "INPUT") is None:
        return
    from analyzer.netfilter.walk import Walker

    w = Walker(rs, Namespace())
    others = "neighbours cannot resolve this host's addresses, so nothing is sent to it or through it"
    own = "this host cannot resolve its neighbours (its router included), so it sends nothing to them"
    for pkt, hooks, what, why in (
            (solicitation(TARGET, SOLICITOR, None), ("PREROUTING", "INPUT"),
             "neighbour solicitations (ICMPv6 type 135) arriving", others),
            (advertisement(TARGET, SOLICITOR, None), ("OUTPUT", "POSTROUTING"),
             "the neighbour advertisements (ICMPv6 type 136) that answer them, leaving", others),
            (solicitation(SOLICITOR, TARGET, None), ("OUTPUT", "POSTROUTING"),
             "its own neighbour solicitations (ICMPv6 type 135) leaving", own),
            (advertisement(SOLICITOR, TARGET, None), ("PREROUTING", "INPUT"),
             "the neighbour advertisements (ICMPv6 type 136) that answer its own solicitations, "
             "arriving", own)):
        brs = [b for b in walk_nd(w, pkt, hooks) if not _assumes_loopback(b)]
        if not brs or any(b.disposition is None for b in brs):
            continue  # some outcome gets through: not certain enough to report
        label, span = _deciding(rs, brs[0])
        if span is None:
            continue
        yield ctx.diag(
            "CHN013",
            f"{label} drops {what} ({pkt.tuple_str()}): {why}",
            span,
            hint="accept them first: -A INPUT -p ipv6-icmp --icmpv6-type neighbour-solicitation -j ACCEPT "
                 "(and neighbour-advertisement; OUTPUT too if it filters)",
            related=tuple(Related(f"the {b.pkt.tuple_str()} ends here", s) for b in brs[1:2]
                          for _, s in [_deciding(rs, b)] if s is not None))
        return
