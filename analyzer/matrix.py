"""Service matrix of a filter chain (as fffuu computes it): which source address ranges can
open a TCP connection to which destination ranges on one port. Orchestration over the
netfilter layer's match sets (netfilter/matchsets.py) and the engine's packet sets;
report/matrix.py renders the result.

The chain is evaluated symbolically, jumps included, for new TCP packets from port 10000 to
the given port with every other field left open. Matches synack only bounds make the answer
a closure: ``upper`` (default) counts a packet as accepted if it may be, ``lower`` only if
it certainly is. Addresses are then split into classes that every rule treats alike: two
sources are in one class when they reach the same destinations, and likewise for
destinations; each class is named by its address ranges.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from analyzer.engine.packetset import PacketSet
from analyzer.model.rules import (
    AddrMatch, IpRangeMatch, Jump, Reject, Verdict,
)
from analyzer.netfilter.matchsets import MatchCompiler

SPORT = 10000  # fffuu's service matrix source port


@dataclass
class AddrClass:
    name: str
    ranges: list  # [(lo, hi)] ipaddress objects, merged
    rep: object   # a representative address

    def cidrs(self) -> list[str]:
        out = []
        for lo, hi in self.ranges:
            out += [str(n) for n in ipaddress.summarize_address_range(lo, hi)]
        return out

    def render(self, limit: int = 12) -> str:
        parts = []
        for lo, hi in self.ranges:
            nets = list(ipaddress.summarize_address_range(lo, hi))
            parts.append(str(nets[0]) if len(nets) == 1 else f"{lo} .. {hi}")
        more = f" u ... ({len(parts) - limit} more ranges)" if len(parts) > limit else ""
        return "{" + " u ".join(parts[:limit]) + more + "}"


@dataclass
class Matrix:
    chain: str
    dport: int
    closure: str
    family: int
    sources: list = field(default_factory=list)       # AddrClass
    destinations: list = field(default_factory=list)  # AddrClass
    edges: list = field(default_factory=list)          # (src class name, dst class name)
    approximate: list = field(default_factory=list)    # labels of rules only bounded


class _Eval:
    def __init__(self, ruleset, comp: MatchCompiler, closure: str):
        self.rs, self.comp, self.closure = ruleset, comp, closure
        self.approx: dict = {}

    def _bounds(self, rule):
        b = self.comp.rule(rule)
        if not b.exact:
            self.approx[rule.label] = rule
        # may: the packets that can go the rule's way; must: those that certainly leave here
        return (b.over, b.under) if self.closure == "upper" else (b.under, b.over)

    def chain(self, name: str, pkts, depth: int = 0):
        """(accepted, returned) packets of ``pkts`` entering chain ``name`` of filter."""
        sp = self.comp.space
        c = self.rs.chain("filter", name)
        acc, ret, rem = sp.empty(), sp.empty(), pkts
        if c is None or depth > 32:
            return acc, ret
        for r in c.rules:
            if rem.is_empty():
                break
            t = r.target
            if t is None or (not t.terminal and not isinstance(t, (Jump, Verdict))):
                continue  # LOG, MARK, ...: the verdict comes later (rewrites are not followed)
            may, must = self._bounds(r)
            if isinstance(t, Verdict) and t.verdict == "ACCEPT":
                acc = acc | (rem & may)
            elif isinstance(t, Verdict) and t.verdict == "RETURN":
                ret = ret | (rem & may)
            elif isinstance(t, Jump):
                a, back = self.chain(t.chain, rem & may, depth + 1)
                acc = acc | a
                if t.goto:
                    ret = ret | back
                else:
                    rem = (rem - (rem & must)) | back
                    continue
            elif not (isinstance(t, Reject) or (isinstance(t, Verdict) and t.verdict == "DROP")):
                if self.closure == "upper":  # QUEUE, NFQUEUE, ...: may accept
                    acc = acc | (rem & may)
            rem = rem - (rem & must)
        if c.builtin:
            if (c.policy or "ACCEPT") == "ACCEPT":
                acc = acc | rem | ret
            return acc, sp.empty()
        return acc, ret | rem


def _boundaries(ruleset, family: int) -> list[int]:
    """Every address where some rule's address match starts or stops."""
    top = (1 << (32 if family == 4 else 128))
    b = {0, top}
    for r in ruleset.rules():
        for m in r.matches:
            if isinstance(m, AddrMatch):
                for n in m.networks:
                    if n.version == family:
                        b.add(int(n.network_address))
                        b.add(int(n.broadcast_address) + 1)
            elif isinstance(m, IpRangeMatch) and m.lo.version == family:
                b.add(int(m.lo))
                b.add(int(m.hi) + 1)
    return sorted(x for x in b if x <= top)


def _classes(acc, field: str, bounds: list[int], family: int, prefix: str) -> list[AddrClass]:
    addr = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    groups: dict = {}
    order = []
    for lo, hi in zip(bounds, bounds[1:]):
        rep = addr(lo)
        key = acc.restrict(field, rep)
        if key not in groups:
            groups[key] = []
            order.append(key)
        rs = groups[key]
        if rs and int(rs[-1][1]) + 1 == lo:
            rs[-1] = (rs[-1][0], addr(hi - 1))
        else:
            rs.append((rep, addr(hi - 1)))
    out = []
    for i, key in enumerate(order):
        out.append(AddrClass(_name(prefix, i), groups[key], groups[key][0][0]))
    return out


def _name(prefix: str, i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(ord("a") + r) + s
    return f"{prefix}{s}"


def service_matrix(ruleset, chain: str = "FORWARD", dport: int = 22, closure: str = "upper") -> Matrix:
    comp = MatchCompiler(ruleset)
    sp = comp.space
    fam = ruleset.family
    pkts = comp.universe & sp.where(proto=6, sport=SPORT, dport=dport) & sp.any_flag("ctstate", "NEW")
    # packets between hosts: not looped back (else '-i lo -j ACCEPT' would open everything)
    pkts = pkts - sp.iface("iif", "lo") - sp.iface("oif", "lo")
    ev = _Eval(ruleset, comp, closure)
    acc, _ = ev.chain(chain, pkts)
    pairs = acc.project(("family", "src", "dst"))
    if closure == "lower":  # certainly accepted for every value of the other fields
        refused = (pkts - acc).project(("family", "src", "dst"))
        pairs = pkts.project(("family", "src", "dst")) - refused
    bounds = _boundaries(ruleset, fam)
    m = Matrix(chain, dport, closure, fam)
    # one partition for both sides, as fffuu prints it: classes of addresses no rule tells apart
    both = _classes(_Pair(pairs), "src", bounds, fam, "")
    m.sources = m.destinations = both
    for s in both:
        row = _cofactor(pairs, "src", s.rep)
        for d in both:
            if not _cofactor(row, "dst", d.rep).is_empty():
                m.edges.append((s.name, d.name))
    m.approximate = sorted(ev.approx)
    return m


def _cofactor(ps, field: str, addr):
    """``ps.restrict(field, addr)``, fast for IPv4: the set's high 96 address bits are free for
    IPv4 packets, so fixing the 32 low variables is the whole cofactor (no re-pinning of the
    high bits, which is most of restrict's cost on 4,000-rule dumps)."""
    if addr.version != 4:
        return ps.restrict(field, addr)
    sp = ps.space
    v = int(addr)
    low = sp._vars[field][-32:]  # MSB first, as the engine lays address bits out
    return PacketSet(sp, sp.bdd.let({x: bool(v >> (31 - i) & 1) for i, x in enumerate(low)}, ps.node))


class _Pair:
    """Cofactors of an address on both sides: addresses are in one class only when they reach,
    and are reached by, the same addresses."""

    def __init__(self, pairs):
        self.pairs = pairs

    def restrict(self, field, rep):
        return (_cofactor(self.pairs, "src", rep), _cofactor(self.pairs, "dst", rep))
