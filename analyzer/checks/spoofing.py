"""Checks layer, filter-semantics family (FLT): spoofing protection, as fffuu checks it. Given
which source addresses each input interface may carry (an IP assignment; in an environment,
the one the namespace's routes imply), a forwarding chain that accepts a new connection
arriving on an interface from a source outside its assignment lets spoofed packets through.
The sets come from analyzer/matrix.py's spoofing_check (exact over interfaces)."""
from __future__ import annotations

from typing import Iterator

from analyzer.checks import CheckContext, check
from analyzer.diagnostics import APPROXIMATE, Diagnostic, EXACT, Severity
from analyzer.model.rules import IfaceMatch

CHAIN = "FORWARD"


def _names_input_ifaces(ruleset, chain: str) -> bool:
    from analyzer.matrix import reachable_rules
    return any(isinstance(m, IfaceMatch) and m.direction == "in"
               for r in reachable_rules(ruleset, chain) for m in r.matches)


@check(code="FLT003", name="accepts-spoofed-source", severity=Severity.WARNING)
def accepts_spoofed_source(ctx: CheckContext) -> Iterator[Diagnostic]:
    """The forward chain accepts packets arriving on an interface with a source address that
    interface is not assigned (routed elsewhere): spoofed sources get through.

    Why it matters: anyone behind that interface can send as a host of another network (an
    internal server, a management range), and every rule that trusts a source address trusts
    them too.
    Fix: drop what arrives on the interface from outside its addresses before the accepting
    rules (``-i IF ! -s NET -j DROP``, or rp_filter=1 on it).

    Runs on ``lint --env`` for each namespace that forwards (ip_forward=1), has routes, and
    whose filter FORWARD chain names input interfaces: each interface is assigned the addresses
    routed out of it; an interface under strict rp_filter (1) is protected by routing already. ``synack matrix DUMP --ipassmt FILE`` runs the same check on a dump.
    """
    env = ctx.extra.get("env")
    if env is None:
        return
    from analyzer.matrix import assignment_from_routes, spoofing_check
    from analyzer.parse.ipassmt import render_ranges
    for name, spec in env.namespaces.items():
        if not spec.net.routes:
            continue
        for rs in (spec.ruleset, spec.ruleset6):
            if rs is None or rs.chain("filter", CHAIN) is None or not _names_input_ifaces(rs, CHAIN):
                continue
            key = "net.ipv4.ip_forward" if rs.family == 4 else "net.ipv6.conf.all.forwarding"
            if not spec.net.sysctl(key, 0):
                continue
            assmt = assignment_from_routes(spec.net, rs.family)
            if not assmt.ifaces:
                continue
            result = spoofing_check(rs, CHAIN, assmt, routes=assmt)
            chain = rs.chain("filter", CHAIN)
            span = chain.span or (chain.rules[0].span if chain.rules else None)
            for i in result.ifaces:
                if not i.spoofed:
                    continue
                if rs.family == 4 and max(spec.net.sysctl("net.ipv4.conf.all.rp_filter", 0),
                                          spec.net.sysctl(f"net.ipv4.conf.{i.name}.rp_filter", 0)) == 1:
                    continue  # strict reverse-path filter: the routing decision drops them first
                yield ctx.diag(
                    "FLT003",
                    f"namespace '{name}': filter {CHAIN} accepts new connections arriving on {i.name} "
                    f"from {render_ranges(i.spoofed, rs.family)}, which {i.name} is not assigned "
                    f"(its routes: {render_ranges(i.assigned, rs.family)})",
                    span,
                    hint=f"drop what arrives on {i.name} from outside its addresses first, e.g. "
                         f"-I {CHAIN} -i {i.name} ! -s <its network> -j DROP, or set "
                         f"net.ipv4.conf.{i.name}.rp_filter=1",
                    confidence=EXACT if i.exact else APPROXIMATE,
                    witness=str(i.witness) + ("" if i.exact else " (may be accepted: a bounded match decides)"),
                )
