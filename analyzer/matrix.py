"""Service matrix of a filter chain (as fffuu computes it): which source address ranges can
open a TCP connection to which destination ranges on one port. Orchestration over the
netfilter layer's match sets (netfilter/matchsets.py) and the engine's packet sets;
report/matrix.py renders the result.

The chain is evaluated symbolically, jumps included, for the first packet of a TCP connection
(ctstate NEW, flags SYN) from port 10000 to the given port with every other field left open.
Matches synack only bounds make the answer a closure: ``upper`` (default) counts a packet as
accepted if it may be, ``lower`` only if it certainly is. Interfaces: an IP assignment
(parse/ipassmt.py; fffuu's ``lo = [127.0.0.0/8]`` when none is given) says which sources each
input interface carries. ``ifaces="exact"`` (default) keeps ``-i``/``-o`` exact over packets
that respect the assignment and asks whether *some* pair of interfaces lets a packet through;
``ifaces="abstract"`` reproduces fffuu: ``-i X`` becomes ``-s <X's addresses>`` (fffuu's
iiface_rewrite when the assignment is disjoint and names every interface of the chain, else its
iiface_constrain) and every other interface match is abstracted away (upper closure), which
can only add edges. Addresses are then split into classes no rule tells apart: two addresses
are in one class when they reach, and are reached by, the same addresses.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from analyzer.model.rules import (
    AddrMatch, CtStateMatch, IfaceMatch, IpRangeMatch, Jump, PortMatch, ProtoMatch, Reject,
    TcpFlagsMatch, Verdict,
)
from analyzer.netfilter.matchsets import Bounds, MatchCompiler

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
    sport: int = SPORT
    ifaces: str = "exact"           # "exact" | "abstract" (fffuu's interface abstraction)
    ipassmt: str = ""               # where the IP assignment came from
    iface_rewrite: str = ""         # abstract: "rewrite" or "constrain" (fffuu's two modes)
    table: str = "filter"
    routed: bool = False            # output interfaces follow the routes (-o tied to destinations)
    sources: list = field(default_factory=list)       # AddrClass
    destinations: list = field(default_factory=list)  # AddrClass
    edges: list = field(default_factory=list)          # (src class name, dst class name)
    approximate: list = field(default_factory=list)    # labels of rules only bounded


class _Eval:
    def __init__(self, ruleset, comp: MatchCompiler, closure: str, rule_bounds=None,
                 table: str = "filter", skip=None):
        self.rs, self.comp, self.closure, self.table = ruleset, comp, closure, table
        self.skip = skip or (lambda rule: False)
        self.base = None  # set: user chains are evaluated once, on these packets (see chain)
        self._transfer: dict = {}
        self.rule_bounds = rule_bounds or comp.rule
        self.approx: dict = {}

    def _bounds(self, rule):
        b = self.rule_bounds(rule)
        if not b.exact:
            self.approx[rule.label] = rule
        # may: the packets that can go the rule's way; must: those that certainly leave here
        return (b.over, b.under) if self.closure == "upper" else (b.under, b.over)

    def chain(self, name: str, pkts, depth: int = 0):
        """(accepted, returned) packets of ``pkts`` entering chain ``name`` of the table.

        Every step intersects, subtracts or unions rule sets with the packets that entered,
        so a chain's answer for any input S is S intersected with its answer for all packets:
        a user chain is evaluated once, on ``self.base`` (the packets the question is about),
        and each jump to it costs two intersections (mac chains of 1,000 source rules are
        walked once instead of with every caller's packet set)."""
        c = self.rs.chain(self.table, name)
        if c is None or c.builtin or self.base is None or depth > 32:
            return self._chain(name, pkts, depth)
        f = self._transfer.get(name)
        if f is None:
            f = self._transfer[name] = self._chain(name, self.base, depth)
        return pkts & f[0], pkts & f[1]

    def _chain(self, name: str, pkts, depth: int = 0):
        sp = self.comp.space
        c = self.rs.chain(self.table, name)
        acc, ret, rem = sp.empty(), sp.empty(), pkts
        if c is None or depth > 32:
            return acc, ret
        for r in c.rules:
            if rem.is_empty():
                break
            t = r.target
            if t is None or (not t.terminal and not isinstance(t, (Jump, Verdict))):
                continue  # LOG, MARK, ...: the verdict comes later (rewrites are not followed)
            if self.skip(r):
                continue
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


class _Unfolded(_Eval):
    """fffuu's evaluation: the chain unfolded into one first-match list (each rule ANDed with
    the jumps that lead to it and the negated RETURNs before it) whose unknown matches are then
    closed rule by rule: an ACCEPT keeps the packets it may match, a DROP only those it
    certainly matches. Coarser than `_Eval` (a DROP behind a jump on an unknown match is lost
    even for packets that certainly took the jump); kept to compare with fffuu."""

    def chain(self, name: str, pkts, depth: int = 0):
        sp = self.comp.space
        self.acc, self.rem = sp.empty(), pkts
        u = self.comp.universe
        self._walk(name, u, u, 0)
        return self.acc, sp.empty()

    def _walk(self, name, cu, co, depth):
        """Walk chain ``name`` whose rules hold under the path condition (cu certainly, co
        maybe); updates the first-match state. Returns at the end of the chain."""
        c = self.rs.chain(self.table, name)
        if c is None or depth > 32:
            return
        for r in c.rules:
            if self.rem.is_empty():
                return
            t = r.target
            if t is None or (not t.terminal and not isinstance(t, (Jump, Verdict))):
                continue
            if self.skip(r):
                continue
            b = self.rule_bounds(r)
            if not b.exact:
                self.approx[r.label] = r
            ru, ro = cu & b.under, co & b.over
            may, must = (ro, ru) if self.closure == "upper" else (ru, ro)
            if isinstance(t, Verdict) and t.verdict == "RETURN":
                cu, co = cu - b.over, co - b.under
            elif isinstance(t, Jump):
                self._walk(t.chain, ru, ro, depth + 1)
                if t.goto:
                    cu, co = cu - b.over, co - b.under
            elif isinstance(t, Reject) or (isinstance(t, Verdict) and t.verdict == "DROP"):
                self.rem = self.rem - must
            elif (isinstance(t, Verdict) and t.verdict == "ACCEPT") or self.closure == "upper":
                self.acc = self.acc | (self.rem & may)  # ACCEPT; QUEUE, NFQUEUE...: may accept
                self.rem = self.rem - may
            else:
                self.rem = self.rem - must
        if c.builtin and (c.policy or "ACCEPT") == "ACCEPT":
            self.acc = self.acc | self.rem
        if c.builtin:
            self.rem = self.comp.space.empty()


def reachable_rules(ruleset, chain: str, table: str = "filter"):
    """The rules of ``table`` a packet entering ``chain`` can meet (jumps followed)."""
    seen, todo, out = {chain}, [chain], []
    while todo:
        c = ruleset.chain(table, todo.pop())
        for r in (c.rules if c else ()):
            out.append(r)
            t = r.target
            if isinstance(t, Jump) and t.chain not in seen:
                seen.add(t.chain)
                todo.append(t.chain)
    return out


def _name(prefix: str, i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(ord("a") + r) + s
    return f"{prefix}{s}"


def assume_ipassmt(comp: MatchCompiler, pkts, ipassmt):
    """``pkts`` less the spoofed packets: those arriving on an interface of the assignment with
    a source address it does not assign to that interface (fffuu's precondition for rewriting
    ``-i IFACE`` into source ranges)."""
    sp = comp.space
    for name, ranges in ipassmt.ifaces:
        srcs = sp.union(sp.range("src", _addr(ipassmt.family, lo), _addr(ipassmt.family, hi))
                        for lo, hi in ranges)
        pkts = pkts - (sp.iface("iif", name) - srcs)
    return pkts


def assume_routes(comp: MatchCompiler, pkts, routes):
    """``pkts`` whose output interface is the one the routes send their destination to: a
    forwarded packet leaves where the routing decision sends it (what fffuu's --routingtbl
    rewrites ``-o IFACE`` with). ``routes`` is an assignment of destinations to interfaces."""
    sp = comp.space
    routed = sp.empty()
    for name, ranges in routes.ifaces:
        dsts = sp.union(sp.range("dst", _addr(routes.family, lo), _addr(routes.family, hi))
                        for lo, hi in ranges)
        routed = routed | (sp.iface("oif", name) & dsts)
    return pkts & routed


def _routed_chain(table: str, chain: str) -> bool:
    """Chains whose packets have been through the routing decision (an output interface)."""
    return chain in ("FORWARD", "OUTPUT", "POSTROUTING")


def _addr(family, v):
    return ipaddress.IPv4Address(v) if family == 4 else ipaddress.IPv6Address(v)


def _layout():
    """The engine's variable order with the output interface just above the destination and
    the input interface just above the source: a firewall like TUM's splits by interface first
    (``-o IF -j filter_IF``, ``-i IF -s NET -j mac_IF``), and the accepted sets then share
    their address subtrees (2-7x faster than the default order on the TUM dumps). The
    destination stays above the source (`_partition` walks it first)."""
    from analyzer.engine.packetset import LAYOUT
    head = ("family", "proto", "oif", "dst", "dport", "iif", "src")
    width = {f: w for f, w in LAYOUT if isinstance(f, str)}
    return tuple((f, width[f]) for f in head) + tuple(
        (f, w) for f, w in LAYOUT if f not in head)


def compiler(ruleset, ipassmt=None, routes=None) -> MatchCompiler:
    """A MatchCompiler whose space also knows the assignment's (and the routes') interfaces."""
    from analyzer.engine.packetset import PacketSpace
    sp = PacketSpace(layout=_layout())
    for a in (ipassmt, routes):
        if a is not None:
            sp.declare_interfaces(n for n in a.names() if not n.endswith("+"))
    return MatchCompiler(ruleset, sp)


def tcp_excluded(rule, sport: int, dport: int, fffuu: bool = False) -> bool:
    """True when a match of the rule, as written, rules out every TCP packet from ``sport`` to
    ``dport`` (``-p udp``, ``--dport 53``, ...): the rule, and any chain it jumps to, can be
    skipped for the service matrix without compiling it. With ``fffuu``, only matches fffuu
    parses count (to fffuu ``-p sctp`` is unknown, so it may match)."""
    for m in rule.matches:
        if m.negated or (fffuu and not fffuu_parses(m)):
            continue
        if isinstance(m, ProtoMatch) and m.number not in (0, 6):
            return True
        if isinstance(m, PortMatch):
            if m.mod not in ("tcp", "multiport"):
                return True  # -m udp/sctp/... --dport: implies that protocol
            ports = {"src": (sport,), "dst": (dport,), "any": (sport, dport)}[m.direction]
            if not any(lo <= p <= hi for p in ports for lo, hi in m.ranges):
                return True
    return False


def service_matrix(ruleset, chain: str = "FORWARD", dport: int = 22, closure: str = "upper",
                   ipassmt=None, sport: int = SPORT, ifaces: str = "exact",
                   table: str = "filter", comp: MatchCompiler | None = None,
                   routes=None) -> Matrix:
    """The service matrix of ``chain`` for TCP ``sport`` -> ``dport``. Pass the same ``comp``
    (`compiler(ruleset, ipassmt, routes)`) to several calls to compile each rule once.
    ``routes`` (`assignment_from_routes`): each output interface's destinations; a routed
    chain's packets then leave by the interface their destination is routed to (fffuu's
    --routingtbl: ``-o IFACE`` rewritten to those destinations under ``ifaces="abstract"``)."""
    from analyzer.parse.ipassmt import generic
    fam = ruleset.family
    if ipassmt is None or ipassmt.family != fam:
        ipassmt = generic(fam)
    rules = reachable_rules(ruleset, chain, table)
    comp = comp or compiler(ruleset, ipassmt, routes)
    fffuu = ifaces == "abstract"
    if routes is not None and (routes.family != fam or not _routed_chain(table, chain)):
        routes = None
    skip = _memo(lambda r: tcp_excluded(r, sport, dport, fffuu))
    sp = comp.space
    # the first packet of a new TCP connection: ctstate NEW and the flags exactly SYN, as
    # fffuu's packet_assume_new (else '--tcp-flags FIN,SYN,RST,ACK SYN -j REJECT' is passed by
    # a NEW packet with other flags, which no connection opens with)
    pkts = base = (comp.universe & sp.where(proto=6, sport=sport, dport=dport,
                                            tcp_flags=sp.flag_value("tcp_flags", "SYN"))
                   & sp.any_flag("ctstate", "NEW"))
    m = Matrix(chain, dport, closure, fam, sport=sport, ifaces=ifaces, ipassmt=ipassmt.origin,
               table=table, routed=routes is not None)
    if ifaces == "abstract":
        m.iface_rewrite = "rewrite" if rewrite_applies(ipassmt, rules) else "constrain"
        ev = _Unfolded(ruleset, comp, closure, _abstract(comp, ipassmt, m.iface_rewrite, routes).rule,
                       table, skip)
    else:
        pkts = assume_ipassmt(comp, pkts, ipassmt)
        if routes is not None:  # kept out of ``base``: the chains' answers stay small
            pkts = assume_routes(comp, pkts, routes)
        ev = _Eval(ruleset, comp, closure, table=table, skip=skip)
        ev.base = base
    acc, _ = ev.chain(chain, pkts)
    pairs = acc.project(("family", "src", "dst"))
    if closure == "lower":  # certainly accepted for every value of the other fields
        refused = (pkts - acc).project(("family", "src", "dst"))
        pairs = pkts.project(("family", "src", "dst")) - refused
    m.sources, m.edges = _partition(pairs, fam)
    m.destinations = m.sources
    m.approximate = sorted(ev.approx)
    return m


def _memo(f):
    cache: dict = {}

    def g(rule):
        k = id(rule)
        if k not in cache:
            cache[k] = f(rule)
        return cache[k]
    return g


def _abstract(comp, ipassmt, mode, routes=None):
    """One `_AbstractIfaces` per compiler, mode and routes (its rule bounds do not depend on
    the port)."""
    key = ("abstract", id(ipassmt), mode, id(routes))
    a = comp._cache.get(key)
    if a is None:
        a = comp._cache[key] = _AbstractIfaces(comp, ipassmt, mode, routes)
    return a


def rewrite_applies(ipassmt, rules) -> bool:
    """fffuu rewrites ``-i X`` into X's source addresses only when no two interfaces share an
    address (ipassmt_sanity_disjoint) and every interface the chain names is assigned
    (ipassmt_sanity_defined); otherwise it only adds the addresses as a constraint."""
    names = {m.name for r in rules for m in r.matches if isinstance(m, IfaceMatch)}
    if not names <= set(ipassmt.names()):
        return False
    spans = sorted((lo, hi, n) for n, rs in ipassmt.ifaces for lo, hi in rs)
    return all(a[1] < b[0] or a[2] == b[2] for a, b in zip(spans, spans[1:]))


# what fffuu's parser turns into primitives (haskell_tool/lib/Network/IPTables/Parser.hs,
# knownMatch): anything else, a comment included, is an unknown match to it
FFFUU_PROTOCOLS = frozenset({"tcp", "udp", "icmp", "icmpv6", "ipv6-icmp", "esp", "ah", "gre"})


def fffuu_parses(m) -> bool:
    if isinstance(m, (AddrMatch, IpRangeMatch, TcpFlagsMatch)):
        return True
    if isinstance(m, ProtoMatch):
        return m.name in FFFUU_PROTOCOLS
    if isinstance(m, PortMatch):
        return m.mod in ("tcp", "udp", "multiport")
    if isinstance(m, CtStateMatch):
        return m.mod in ("state", "conntrack")
    return False


class _AbstractIfaces:
    """Rule bounds with fffuu's interface abstraction: ``-i X`` of an assigned interface is
    ``-s <X's addresses>`` (rewrite: exactly; constrain: as an upper bound, the interface
    itself unknown), every other interface match is unknown (under = {}, over = all)."""

    def __init__(self, comp: MatchCompiler, ipassmt, mode: str, routes=None):
        self.comp, self.ipassmt, self.mode, self.routes = comp, ipassmt, mode, routes
        self._cache: dict = {}

    def _srcs(self, name):
        sp, fam = self.comp.space, self.ipassmt.family
        return sp.union(sp.range("src", _addr(fam, lo), _addr(fam, hi))
                        for lo, hi in self.ipassmt.get(name)) & self.comp.universe

    def iface(self, m) -> Bounds:
        u, empty = self.comp.universe, self.comp.space.empty()
        if m.direction == "in" and self.ipassmt.get(m.name) is not None:
            s = self._srcs(m.name)
            if self.mode == "rewrite":
                s = u - s if m.negated else s
                return Bounds(s, s, True)
            # constrain: -i X && src in X;  ! (-i X && src in X) = ! -i X || src not in X
            return Bounds(u - s, u, False) if m.negated else Bounds(empty, s, False)
        if m.direction == "out" and self.routes is not None and self.routes.get(m.name) is not None:
            sp, fam = self.comp.space, self.routes.family  # fffuu's oiface_rewrite
            s = sp.union(sp.range("dst", _addr(fam, lo), _addr(fam, hi))
                         for lo, hi in self.routes.get(m.name)) & u
            s = u - s if m.negated else s
            return Bounds(s, s, True)
        return Bounds(empty, u, False)

    def rule(self, rule) -> Bounds:
        b = self._cache.get(id(rule))
        if b is not None:
            return b[1]
        comp = self.comp
        under, over, exact = comp.universe, comp.universe, True
        unknown = Bounds(comp.space.empty(), comp.universe, False)
        for mt in rule.matches:
            if isinstance(mt, IfaceMatch):
                mb = self.iface(mt)
            elif fffuu_parses(mt):
                mb = comp.match(mt)
            else:
                mb = unknown
            if mb is None:
                continue
            under, over, exact = under & mb.under, over & mb.over, exact and mb.exact
        b = Bounds(under, over, exact)
        self._cache[id(rule)] = (rule, b)
        return b


# ------------------------------------------------------------------------------ spoofing check

@dataclass
class IfaceSpoofing:
    """One input interface: the sources it is assigned, and those the chain accepts from it
    anyway (empty: certified, no spoofed packet gets through)."""
    name: str
    assigned: list          # [(lo, hi)] ints
    spoofed: list           # [(lo, hi)] ints: accepted sources outside ``assigned``
    witness: object = None  # Flow: a spoofed packet the chain accepts
    exact: bool = True      # the witness is accepted by a concrete walk too (else only may be)


@dataclass
class Spoofing:
    chain: str
    family: int
    ipassmt: str
    closure: str
    ifaces: list = field(default_factory=list)
    approximate: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def spoofing_check(ruleset, chain: str, ipassmt, closure: str = "upper",
                   table: str = "filter", comp: MatchCompiler | None = None,
                   routes=None) -> Spoofing:
    """fffuu's spoofing check, exact over interfaces: for each interface of the assignment,
    the source addresses outside its assignment that the chain accepts on a new connection
    arriving there (any destination, protocol, output interface; a TCP packet is a SYN).
    ``closure="upper"`` counts a packet as accepted if a bounded match may let it through."""
    fam = ruleset.family
    comp = comp or compiler(ruleset, ipassmt, routes)
    sp = comp.space
    syn = sp.where(tcp_flags=sp.flag_value("tcp_flags", "SYN"))
    pkts = base = comp.universe & sp.any_flag("ctstate", "NEW") & ((comp.universe - sp.eq("proto", 6)) | syn)
    if table == "filter" and chain == "FORWARD":
        # what arrives on loopback is local traffic: it is delivered (INPUT), never forwarded
        pkts = pkts - sp.iface("iif", "lo")
    if routes is not None and routes.family == fam and _routed_chain(table, chain):
        pkts = assume_routes(comp, pkts, routes)
    ev = _Eval(ruleset, comp, closure, table=table)
    ev.base = base
    acc, _ = ev.chain(chain, pkts)
    rules = reachable_rules(ruleset, chain, table)
    out = Spoofing(chain, fam, ipassmt.origin, closure, approximate=sorted(ev.approx))
    named = {m.name for r in rules for m in r.matches if isinstance(m, IfaceMatch)}
    missing = sorted(n for n in named if n not in ipassmt.names() and not n.endswith("+"))
    if missing:
        out.warnings.append(f"interfaces the chain names but the assignment does not: {', '.join(missing)} "
                            "(not checked)")
    for name, ranges in ipassmt.ifaces:
        srcs = sp.union(sp.range("src", _addr(fam, lo), _addr(fam, hi)) for lo, hi in ranges)
        spoofed = acc & sp.iface("iif", name) - srcs
        entry = IfaceSpoofing(name, list(ranges), [])
        if not spoofed.is_empty():
            entry.spoofed = _source_ranges(spoofed.project(("family", "src")), fam)
            entry.witness = spoofed.pick_flow()
            entry.exact = _walk_accepts(ruleset, chain, entry.witness, table)
        out.ifaces.append(entry)
    return out


def _source_ranges(src_set, family):
    """The source addresses of a set (projected on family and src) as merged ranges."""
    sp = src_set.space
    fix = {sp._vars["family"][0]: family == 6}
    if family == 4:
        fix.update({v: False for v in sp._vars["src"][:96]})
    parts: list = []
    w = 32 if family == 4 else 128
    _split(sp.bdd.let(fix, src_set.node), sp._vars["src"][-w:], parts)
    out: list = []
    for lo, hi, leaf in parts:
        if leaf == sp.bdd.false:
            continue
        if out and out[-1][1] + 1 == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _walk_accepts(ruleset, chain, flow, table="filter") -> bool:
    """Whether a concrete walk of ``flow`` through the chain accepts it (the witness check)."""
    from analyzer.netfilter.env import Namespace
    from analyzer.netfilter.walk import Branch, Conntrack, Packet, Walker
    from analyzer.engine.packetset import TCP_FLAG_BITS
    flags = sum(TCP_FLAG_BITS[f] for f in flow.tcp_flags) if flow.proto == 6 else 0
    pkt = Packet(4 if flow.src.version == 4 else 6, flow.proto, flow.src, flow.dst,
                 flow.sport if flow.proto in (6, 17, 132, 33, 136) else None,
                 flow.dport if flow.proto in (6, 17, 132, 33, 136) else None,
                 iif=flow.iif, oif=flow.oif, tcp_flags=flags,
                 icmp_type=flow.icmp_type if flow.proto in (1, 58) else None,
                 icmp_code=flow.icmp_code if flow.proto in (1, 58) else None)
    br = Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport))
    outs = Walker(ruleset, Namespace()).run_table(br, table, chain)
    return bool(outs) and all(o.disposition is None and not o.approx for o in outs)


def assignment_from_routes(ns, family: int):
    """The IP assignment a host's routes imply (fffuu's routing_ipassmt): each interface is
    assigned the addresses its routes send out of it, longest prefix first, i.e. the sources
    a reverse-path check would accept on it. Local addresses are not special (a packet that
    arrives with one of the host's own addresses as source is routed like any other)."""
    from analyzer.parse.ipassmt import IpAssignment
    top = 1 << (32 if family == 4 else 128)
    routes = [r for r in ns.routes if r.dest.version == family and r.kind == "unicast"]
    cuts = {0, top}
    for r in routes:
        cuts.update((int(r.dest.network_address), int(r.dest.broadcast_address) + 1))
    cuts = sorted(cuts)
    per: dict = {}
    for lo, hi in zip(cuts, cuts[1:]):
        a = _addr(family, lo)
        best = None
        for r in routes:
            if a in r.dest and (best is None or (r.dest.prefixlen, -r.metric) > (best.dest.prefixlen, -best.metric)):
                best = r
        if best is None:
            continue
        dev = best.dev or (ns.gateway_device(best.via) if best.via is not None else None)
        if dev:
            per.setdefault(dev, []).append((lo, hi - 1))
    names = sorted(per)
    return IpAssignment.of(family, [(n, per[n]) for n in names], "routes (each interface: the "
                           "addresses routed out of it)")


# ------------------------------------------------------------------- partition by BDD walks

def _kids(u):
    """(else, then) cofactors of a node, complement edges accounted for."""
    lo, hi = u.low, u.high
    return (~lo, ~hi) if u.negated else (lo, hi)


def _split(u, names: tuple, out: list, i: int = 0, prefix: int = 0) -> None:
    """Cut the values of the MSB-first variables ``names`` into intervals on which ``u``'s
    cofactor is one node: appends ``(lo, hi, node)``. A variable ``u`` skips is free: both of
    its values lead to the same node, which still splits the interval (bits below it are
    tested)."""
    n = len(names)
    index = _split.index.get(names)
    if index is None:
        index = _split.index[names] = {v: k for k, v in enumerate(names)}
    stack = [(u, i, prefix)]
    while stack:
        u, i, prefix = stack.pop()
        j = index.get(u.var, n) if u.var is not None else n
        if j == n:
            lo = prefix << (n - i)
            out.append((lo, lo + (1 << (n - i)) - 1, u))
        elif j > i:  # bit i free
            stack.append((u, i + 1, prefix * 2 + 1))
            stack.append((u, i + 1, prefix * 2))
        else:
            lo_k, hi_k = _kids(u)
            stack.append((hi_k, i + 1, prefix * 2 + 1))
            stack.append((lo_k, i + 1, prefix * 2))
    # callers sort; the stack pops low halves first, so ``out`` is ascending already


_split.index = {}


def _partition(pairs, family: int, prefix: str = ""):
    """Classes of addresses no rule tells apart, from the accepted (src, dst) pairs: two
    addresses are in one class when they reach, and are reached by, the same addresses.
    Returns (classes, edges). The dst bits come before the src bits in the BDD, so one walk
    over the dst bits gives each destination's column (the set of sources reaching it) as a
    node; a source's row is then which of those few columns hold it."""
    sp = pairs.space
    bdd = sp.bdd
    w = 32 if family == 4 else 128
    fix = {sp._vars["family"][0]: family == 6}
    if family == 4:  # IPv4: the high 96 bits of both addresses are zero in the representative
        fix.update({v: False for f in ("src", "dst") for v in sp._vars[f][:96]})
    node = bdd.let(fix, pairs.node)
    dvars, svars = sp._vars["dst"][-w:], sp._vars["src"][-w:]
    dcuts: list = []
    _split(node, dvars, dcuts)
    cols, col_of = {}, []
    for lo, hi, c in dcuts:
        col_of.append((lo, hi, cols.setdefault(c, len(cols))))
    # each column's sources, as intervals, then one sweep over all their bounds
    members = []
    for c in cols:
        parts: list = []
        _split(c, svars, parts)
        members.append([(lo, hi) for lo, hi, leaf in parts if leaf != bdd.false])
    events = {0}
    for rs in members:
        for lo, hi in rs:
            events.update((lo, hi + 1))
    for lo, hi, _ in col_of:
        events.update((lo, hi + 1))
    cuts = sorted(x for x in events if x < (1 << w))
    # walk the cuts with a pointer into every interval list
    ptr = [0] * len(members)
    cptr = 0
    addr = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    groups: dict = {}
    order: list = []
    for k, lo in enumerate(cuts):
        hi = (cuts[k + 1] if k + 1 < len(cuts) else 1 << w) - 1
        row = []
        for m, rs in enumerate(members):
            p = ptr[m]
            while p < len(rs) and rs[p][1] < lo:
                p += 1
            ptr[m] = p
            row.append(p < len(rs) and rs[p][0] <= lo)
        while col_of[cptr][1] < lo:
            cptr += 1
        key = (col_of[cptr][2], tuple(row))
        rs = groups.get(key)
        if rs is None:
            rs = groups[key] = []
            order.append(key)
        if rs and int(rs[-1][1]) + 1 == lo:
            rs[-1] = (rs[-1][0], addr(hi))
        else:
            rs.append((addr(lo), addr(hi)))
    classes = [AddrClass(_name(prefix, i), groups[key], groups[key][0][0]) for i, key in enumerate(order)]
    edges = [(classes[i].name, classes[j].name)
             for i, (_, row) in enumerate(order) for j, (col, _) in enumerate(order) if row[col]]
    return classes, edges
