"""Netfilter layer: a rule's matches as packet sets (engine/packetset.py BDDs), bounded.

Each rule compiles to ``(under, over)``: the packets it certainly matches and the packets it
may match. Matches the engine models exactly (addresses, protocol, ports, interfaces, TCP
flags, ICMP type/code, marks, conntrack state, address ranges) give ``under == over``;
the others (statistic, limit, addrtype, sets, ...) give ``under = {}`` and ``over = all``, so
whatever a check proves from the bounds holds for the kernel too, and ``exact`` says where
it is only that sound bound (APPROXIMATE).

This is the lint-side compiler the semantic checks (shadowing, the service matrix) use until
the engine's own match compiler lands; it knows tables and chains only through rules.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from analyzer.engine.packetset import CTSTATE_BITS, PacketSet, PacketSpace
from analyzer.model.rules import (
    AddrMatch, CommentMatch, CtStateMatch, IcmpMatch, IfaceMatch, IpRangeMatch, MarkMatch,
    PortMatch, ProtoMatch, Rule, TcpFlagsMatch,
)

PROTO_OF_MODULE = {"tcp": 6, "udp": 17, "sctp": 132, "dccp": 33, "udplite": 136}


@dataclass(frozen=True, slots=True)
class Bounds:
    under: PacketSet
    over: PacketSet
    exact: bool


class MatchCompiler:
    """Compiles rules of one ruleset over one PacketSpace (interfaces declared up front)."""

    def __init__(self, ruleset, space: PacketSpace | None = None):
        self.space = space or PacketSpace()
        names = sorted({m.name for r in ruleset.rules() for m in r.matches
                        if isinstance(m, IfaceMatch)}, key=lambda n: (n.endswith("+"), n))
        plain = [n for n in names if not n.endswith("+")]
        if plain:
            self.space.declare_interfaces(plain)
        self.universe = self.space.family(ruleset.family)
        self.family = ruleset.family
        self._cache: dict = {}
        self._rules: dict = {}

    def rule(self, rule: Rule) -> Bounds:
        b = self._rules.get(id(rule))
        if b is None:
            under, over, exact = self.universe, self.universe, True
            for m in rule.matches:
                mb = self.match(m)
                if mb is None:
                    continue
                under, over = under & mb.under, over & mb.over
                exact = exact and mb.exact
            b = self._rules[id(rule)] = (rule, Bounds(under, over, exact))
        return b[1]

    def match(self, m) -> Bounds | None:
        """None for a match that never narrows (a comment)."""
        if isinstance(m, CommentMatch):
            return None
        key = (type(m),) + tuple(getattr(m, f.name) for f in fields(m) if f.name not in ("col", "end_col"))
        try:
            hit = self._cache.get(key)
        except TypeError:  # an unhashable field: compile every time
            hit, key = None, None
        if hit is None:
            s = self._exact(m)
            if s is None:
                hit = Bounds(self.space.empty(), self.universe, False)
            else:
                s = s & self.universe
                if m.negated:
                    s = self.universe - s
                hit = Bounds(s, s, True)
            if key is not None:
                self._cache[key] = hit
        return hit

    def _exact(self, m) -> PacketSet | None:
        sp = self.space
        if isinstance(m, AddrMatch):
            nets = [n for n in m.networks if n.version == self.family]
            return sp.union(sp.prefix(m.direction, n) for n in nets)
        if isinstance(m, ProtoMatch):
            return self.universe if m.number == 0 else sp.eq("proto", m.number)
        if isinstance(m, IfaceMatch):
            return sp.iface("iif" if m.direction == "in" else "oif", m.name)
        if isinstance(m, PortMatch):
            base = sp.eq("proto", PROTO_OF_MODULE[m.mod]) if m.mod in PROTO_OF_MODULE else \
                sp.union(sp.eq("proto", p) for p in (6, 17, 132, 33, 136))
            if m.direction == "any":
                return base & (sp.ports("sport", m.ranges) | sp.ports("dport", m.ranges))
            return base & sp.ports("sport" if m.direction == "src" else "dport", m.ranges)
        if isinstance(m, TcpFlagsMatch):
            return sp.eq("proto", 6) & sp.masked("tcp_flags", m.comp, m.mask)
        if isinstance(m, IcmpMatch):
            s = sp.eq("proto", 1 if m.family == 4 else 58)
            if m.type is not None:
                s &= sp.eq("icmp_type", m.type)
                if m.code is not None:
                    s &= sp.eq("icmp_code", m.code)
            return s
        if isinstance(m, MarkMatch):
            return sp.masked("mark" if m.kind == "mark" else "connmark", m.value, m.mask)
        if isinstance(m, CtStateMatch):
            known = [s for s in m.states if s in CTSTATE_BITS]
            if len(known) != len(m.states):
                return None
            return sp.any_flag("ctstate", known) if known else sp.empty()
        if isinstance(m, IpRangeMatch):
            if m.lo.version != self.family:
                return sp.empty()
            return sp.range("src" if m.direction == "src" else "dst", m.lo, m.hi)
        # -m owner is only bounded: a packet without a socket (forwarded in POSTROUTING, a
        # kernel RST) fails --uid-owner yet passes ! --uid-owner, which a uid field cannot say
        return None
