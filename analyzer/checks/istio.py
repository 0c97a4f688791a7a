"""Checks layer, sidecar family (IST): the traffic capture rules that Istio's istio-iptables / CNI
(and other sidecar injectors) write in a pod's nat table, checked by walking the proxy's own
packets and by comparing the ports that capture rules exclude and include.
"""
from __future__ import annotations

import ipaddress
from dataclasses import fields
from typing import Iterator

from analyzer.checks import CheckContext, check
from analyzer.checks._paths import host_of, related_steps
from analyzer.checks.chains import table_graph
from analyzer.diagnostics import APPROXIMATE, Diagnostic, EXACT, Related, Severity
from analyzer.model.packet import hostport
from analyzer.model.rules import (
    AddrMatch, CommentMatch, Jump, MarkMatch, OwnerMatch, PortMatch, Redirect, Rule, Tproxy, Verdict,
)
from analyzer.netfilter.trace import Kind
from analyzer.netfilter.walk import Branch, Conntrack, Packet, Walker
from analyzer.checks._paths import node_namespace

ERROR, WARNING = Severity.ERROR, Severity.WARNING
ISTIO_PROXY_UID = 1337  # istio-proxy's uid and gid (istio-iptables --proxy-uid/--proxy-gid default)


def _redirects_from_output(ctx, nat) -> list[Rule]:
    g = table_graph(ctx, nat)
    return [r for c in nat.chains.values() if "OUTPUT" in g.hooks.get(c.name, ())
            for r in c.rules if isinstance(r.target, Redirect)]


def _owner_ids(nat) -> set[int]:
    return {m.lo for r in nat.rules() for m in r.matches
            if isinstance(m, OwnerMatch) and m.option in ("uid", "gid")}


def _socket_marks(rs) -> set[int]:
    """Marks a proxy's sockets may carry (SO_MARK): ambient's ztunnel is exempted by mark
    (`-m mark ! --mark 0x539/0xfff -j REDIRECT`), not by owner."""
    return {m.value for t in rs.tables.values() for r in t.rules() for m in r.matches
            if isinstance(m, MarkMatch) and m.kind == "mark"}


@check(code="IST001", name="redirect-without-owner-exemption", severity=ERROR)
def redirect_without_owner_exemption(ctx: CheckContext) -> Iterator[Diagnostic]:
    """nat OUTPUT REDIRECTs the proxy's own connections back to the proxy (a redirect loop).

    Why it matters: a sidecar captures the application's outbound TCP with REDIRECT to its
    own port; its own upstream connections must be exempted by owner (Istio:
    `-m owner --uid-owner 1337 -j RETURN`), or each one is redirected into the proxy again,
    which loops until it runs out of connections or file descriptors.
    Fix: RETURN the proxy's uid (and gid) in the output capture chain before any REDIRECT.
    """
    rs = ctx.ruleset
    nat = rs.tables.get("nat") if rs is not None else None
    if nat is None:
        return
    if not any(isinstance(r.target, Redirect) for r in nat.rules()):
        return
    redirects = _redirects_from_output(ctx, nat)
    if not redirects:
        return
    g = table_graph(ctx, nat)
    ids = sorted(_owner_ids(nat) | {ISTIO_PROXY_UID})
    marks = sorted(_socket_marks(rs) | {0})
    # destinations and ports the capture path names: the loop must hold for one of them
    dsts, ports = [], [80]
    for red in redirects:
        for r in g.path("OUTPUT", red.chain) + [red]:
            for m in r.matches:
                if isinstance(m, AddrMatch) and m.direction == "dst" and not m.negated:
                    a = host_of(m.networks)
                    if a is not None and a.version == rs.family and not a.is_loopback:
                        dsts.append(a)
                elif isinstance(m, PortMatch) and m.direction == "dst" and not m.negated:
                    ports.append(m.ranges[0][0])
    default = ipaddress.ip_address("10.96.0.10" if rs.family == 4 else "fd00:10:96::a")
    dsts = list(dict.fromkeys(dsts + [default]))
    src = ipaddress.ip_address("10.244.0.5" if rs.family == 4 else "fd00:10:244::5")
    ns = node_namespace(rs.family)
    w = Walker(rs, ns)
    for dst in dsts:
        for port in dict.fromkeys(ports):
            looped = []
            for u, mark in ((u, mk) for u in ids for mk in marks):
                pkt = Packet(rs.family, 6, src, dst, 40000, port, oif="eth0", uid=u, gid=u, mark=mark)
                br = Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport))
                hit = [b for b in w.run_table(br, "nat", "OUTPUT")
                       if any(s.kind is Kind.REDIRECT for s in b.steps)]
                if not hit:
                    break  # this uid is exempt: it can be the proxy's
                looped.append((u, hit[0]))
            else:
                u, b = next(((u, b) for u, b in looped if u == ISTIO_PROXY_UID), looped[0])
                step = next(s for s in b.steps if s.kind is Kind.REDIRECT)
                red = step.rule
                to = step.after
                tested = "uid/gid " + ", ".join(str(i) for i in ids)
                if len(marks) > 1:
                    tested += " with socket mark " + ", ".join(f"{m:#x}" for m in marks)
                yield ctx.diag(
                    "IST001",
                    f"{red.label}: nat OUTPUT redirects every local process's TCP to "
                    + (f"{hostport(to.dst, to.dport)}" if to.dport is not None else f"{to.dst}") + f", the proxy's own connections included: "
                    f"no owner or mark match exempts any of {tested}, so the proxy's upstream "
                    f"connection to {dst}:{port} is redirected back into the proxy (a loop)",
                    red.option_span(red.target),
                    hint=f"add '-m owner --uid-owner {ISTIO_PROXY_UID} -j RETURN' (and --gid-owner) "
                         "to the output capture chain before the REDIRECT",
                    related=related_steps(rs, b),
                    witness=f"{b.ct.original.tuple_str()} from the proxy (uid {u}, gid {u})",
                    confidence=APPROXIMATE if b.approx else EXACT)
                return


# --------------------------------------------------------------------------- IST002
def _intercepts(table, r: Rule, memo: dict) -> bool:
    """Whether a rule sends matching packets to a proxy: REDIRECT/TPROXY, or a jump to a chain
    that does so on its way (``memo``: chain -> answer, one pass per table)."""
    t = r.target
    if isinstance(t, (Redirect, Tproxy)):
        return True
    if isinstance(t, Jump):
        if t.chain not in memo:
            memo[t.chain] = False  # a loop intercepts nothing more
            c = table.chains.get(t.chain)
            memo[t.chain] = c is not None and any(_intercepts(table, x, memo) for x in c.rules)
        return memo[t.chain]
    return False


def _excludes(r: Rule) -> bool:
    return isinstance(r.target, Verdict) and r.target.verdict in ("RETURN", "ACCEPT")


def _rest_key(r: Rule):
    """The rule's matches other than destination ports and comments, comparable across rules."""
    out = []
    for m in r.matches:
        if isinstance(m, CommentMatch) or (isinstance(m, PortMatch) and m.direction == "dst" and not m.negated):
            continue
        out.append((type(m).__name__,) + tuple(getattr(m, f.name) for f in fields(m)
                                               if f.name not in ("col", "end_col", "mod")))
    return tuple(sorted(out, key=repr))


def _dports(r: Rule):
    for m in r.matches:
        if isinstance(m, PortMatch) and m.direction == "dst" and not m.negated:
            return m.ranges
    return None


def _overlap(a, b) -> list[tuple[int, int]]:
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return out


@check(code="IST002", name="capture-ports-collide", severity=WARNING)
def capture_ports_collide(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A port both excluded from and included in sidecar capture: the earlier rule wins.

    Why it matters: istio-iptables writes one RETURN per excluded port and one capture rule
    per included port (`--dport N -j ISTIO_IN_REDIRECT`); a port in both lists (or an
    exclusion that overlaps the proxy's own capture) is decided by rule order, not by the
    configuration's intent: the later rule never sees those packets.
    Fix: keep the port in one list only (excludeInboundPorts / includeInboundPorts, and
    their outbound twins).
    """
    rs = ctx.ruleset
    for tname in ("nat", "mangle"):
        t = rs.tables.get(tname) if rs is not None else None
        if t is None or not any(isinstance(r.target, (Redirect, Tproxy)) for r in t.rules()):
            continue
        memo: dict = {}
        for c in t.chains.values():
            seen: list[tuple[Rule, bool, tuple]] = []
            for r in c.rules:
                ports = _dports(r)
                exc, inc = _excludes(r), _intercepts(t, r, memo)
                if ports is None or not (exc or inc):
                    continue
                key = _rest_key(r)
                for e, e_exc, e_key in seen:
                    if e_key != key or e_exc == exc:
                        continue
                    both = _overlap(_dports(e), ports)
                    if not both:
                        continue
                    txt = ", ".join(str(lo) if lo == hi else f"{lo}:{hi}" for lo, hi in both)
                    first, later = ("excludes", "captures") if e_exc else ("captures", "excludes")
                    pkt = f"tcp 10.244.0.9:40000 -> 10.244.0.5:{both[0][0]}"
                    yield ctx.diag(
                        "IST002",
                        f"{r.label}: port {txt} is both excluded from and included in capture: "
                        f"{e.label} {first} it first, so this rule, which {later} it, never applies",
                        r.span, hint=f"keep port {txt} in one of the two port lists",
                        related=(Related(f"{first} port {txt} first here", e.span),),
                        witness=pkt)
                    break
                seen.append((r, exc, key))
