"""Policy layer, adapter: the one module that asks the flow engine questions.

A target is one dump (explain.py walks its namespace) or one environment (crosshost.py follows
connections across namespaces). ``explore`` splits a set of flows into classes that every rule
the walks met treats alike (engine.partition), one witness walked per class, and returns each
class's fate in every target. When explain/crosshost change their API, only this module changes.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from analyzer.engine.packetset import PacketSet, PacketSpace
from analyzer.engine.partition import field_ranges, partition
from analyzer.model.rules import AddrMatch, IpRangeMatch, PortMatch, ProtoMatch
from analyzer.netfilter.trace import Kind
from analyzer.netfilter.walk import PROTO_NAME, Packet, Walker
from analyzer.source import Span

PORT_PROTOS = (6, 17, 132)
_MOD_PROTO = {"tcp": 6, "udp": 17, "sctp": 132, "dccp": 33, "udplite": 136}
REACHED = ("forwarded", "delivered-locally", "sent", "tproxy", "delivered")


class TargetError(ValueError):
    """A question the target cannot answer (a flow without a start namespace, ...)."""


@dataclass(frozen=True, slots=True)
class End:
    """Where one branch of a flow ends (a statistic DNAT has one branch per backend)."""

    disposition: str            # forwarded | delivered | sent | dropped | rejected | refused | ...
    reached: bool
    namespace: str | None = None
    address: object = None      # destination after every translation
    port: int | None = None
    interface: str | None = None
    listener: str | None = None
    prob: float | None = None
    translated: bool = False
    symmetric: bool | None = None   # the reply comes back through the translation (None: no reply)
    detail: str = ""
    backend: tuple | None = None    # (address, port) the destination was translated to

    def signature(self) -> tuple:
        """What makes two ends the same fate: an untranslated packet's own destination is not
        part of it (packets to 10.0.0.1 and 10.0.0.2 that are both forwarded share a fate)."""
        where = (str(self.address), self.port) if self.translated or self.namespace else None
        return (self.disposition, self.namespace, where, self.interface, self.listener, self.translated,
                self.symmetric)

    def text(self) -> str:
        where = f"{self.address}:{self.port}" if self.port is not None else f"{self.address}"
        s = self.disposition
        if self.namespace:
            s += f" in '{self.namespace}'"
        if self.reached:
            s += f" at {where}"
            if self.listener:
                s += f" (listener {self.listener})"
            if self.interface:
                s += f" out {self.interface}"
        if self.symmetric is False:
            s += ", the reply bypasses the translation"
        if self.prob is not None and self.prob < 0.999:
            s += f" p={self.prob:.3f}"
        return s


@dataclass
class Fate:
    """What one target does with one witness flow: its ends, and the trace that shows why."""

    ends: tuple[End, ...]
    trace_text: str
    trace_json: dict
    findings: tuple = ()        # diagnostics the walk raised (environment: NAT001-NAT004)
    decisive: Span | None = None    # the rule that decided (last rule with a line on the first path)
    rules: tuple = ()           # (where, path, line) of every rule step, in order
    approximate: bool = False
    translation: Span | None = None  # the rule that translated the destination, if one did

    def signature(self) -> tuple:
        return tuple(sorted(e.signature() for e in self.ends)) + (
            tuple(sorted({d.code for d in self.findings})),)

    def summary(self) -> str:
        return "; ".join(dict.fromkeys(e.text() for e in self.ends)) or "no outcome"


@dataclass
class FlowClass:
    packets: PacketSet
    _text: str | None
    witness: Packet
    fates: list[Fate]
    describe: object = None     # packets -> text, set by explore (describing costs; done on demand)

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.describe(self.packets) if self.describe else ""
        return self._text


# ------------------------------------------------------------------ targets
class _Recorder(Walker):
    """A walker that remembers the rules it evaluated and the big indexed chains it entered: only
    those rules' matches can tell apart the packets of the class being walked."""

    log: list = None

    def _match_rule(self, rule, br, hook):
        self.log[0].append(rule)
        return super()._match_rule(rule, br, hook)

    def _rules_for(self, table, chain, pkt):
        c, cand = super()._rules_for(table, chain, pkt)
        if c is not None and len(c.rules) >= 32:
            self.log[1].append(c)
        return c, cand


def _recorder(ruleset, ns, log) -> _Recorder:
    w = _Recorder(ruleset, ns)
    w.log = log
    return w


class DumpTarget:
    kind = "dump"

    def __init__(self, ruleset, ns, label: str, files=(), res=None):
        self.ruleset, self.ns, self.label, self.files, self.res = ruleset, ns, label, files, res

    def namespaces(self):
        return [self.ns]

    def default_src(self, sel, family):
        return kernel_source(self.ns, sel, family) if sel.local else None

    def walk(self, pkt: Packet, sel) -> tuple[Fate, list]:
        from analyzer.explain import explain_flow, render_text
        from analyzer.report.explain_json import explain_json

        log = ([], [])
        rs = self.ruleset
        if rs.family != pkt.family and self.res is not None and hasattr(self.res, "for_family"):
            other = self.res.for_family(pkt.family)   # a dump holding both families
            rs = other.ruleset if other is not None else rs
        w = _recorder(rs, self.ns, log)
        if sel.local:
            pkt = replace(pkt, uid=sel.uid, gid=sel.gid, mark=sel.mark)
            where = "generated locally"
        else:
            pkt = replace(pkt, iif=sel.iif, mark=sel.mark)
            where = f"arrives on {sel.iif}" if sel.iif else "arrives on an unnamed interface"
        outs = explain_flow(rs, pkt, self.ns, local=sel.local, walker=w)
        ends = []
        for o in outs:
            p = o.forward.pkt
            translated = bool(o.forward.ct.dnat) or p.dst != pkt.dst or p.dport != pkt.dport
            sym = None
            if o.reply is not None:
                sym = bool(o.reply_ok) if o.client_sees is not None else False
            ends.append(End(o.disposition, o.disposition in REACHED, None, p.dst, p.dport,
                            p.oif if o.disposition in ("forwarded", "sent") else None, None,
                            o.forward.prob, translated, sym, o.detail,
                            (p.dst, p.dport) if translated else None))
        first = outs[0].forward.steps if outs else []
        rules = tuple((s.where, s.path, s.line) for o in outs for s in o.forward.steps if s.line)
        return Fate(tuple(ends), render_text(pkt, outs, where), explain_json(pkt, outs, local=sel.local),
                    (), _decisive(first), rules, any(o.confidence != "EXACT" for o in outs),
                    _translation(first)), log

    def lint(self, select, ignore=()):
        from analyzer.checks import CheckContext, run_checks, selected
        res = self.res
        if res is None:
            return run_checks(CheckContext(self.ruleset, self.files, partial=False), select, ignore)
        diags = [d for d in getattr(res, "all_diagnostics", res.diagnostics) if selected(d.code, None, select, ignore)]
        for r in (res.families() if hasattr(res, "families") else (res,)):   # both families of one dump
            diags += run_checks(CheckContext(r.ruleset, r.files, partial=False), select, ignore)
        return diags

    def chain_of(self, span):
        for r in self.ruleset.rules():
            if r.span.path == span.path and r.span.line == span.line:
                return r.table, r.chain
        return None


class EnvTarget:
    kind = "env"

    def __init__(self, env, label: str):
        self.env, self.label = env, label

    def namespaces(self):
        return [s.net for s in self.env.namespaces.values()]

    def default_src(self, sel, family):
        spec = self.env.namespaces.get(sel.start or "")
        return None if spec is None else kernel_source(spec.net, sel, family)

    def walk(self, pkt: Packet, sel) -> tuple[Fate, list]:
        from analyzer import crosshost as ch
        from analyzer.checks import nat
        from analyzer.report.explain_json import trips_json
        from analyzer.report.trip_text import render_trips

        if not sel.start or sel.start not in self.env.namespaces:
            raise TargetError(f"an environment flow needs 'from: NAMESPACE' (one of: {', '.join(self.env.namespaces)})")
        log = ([], [])

        class _World(ch.World):
            def walker(self, ns, family):
                key = f"{ns}/{family}"
                if key not in self.walkers:
                    spec = self.env.namespaces[ns]
                    rs = spec.ruleset if family == 4 else spec.ruleset6
                    self.walkers[key] = _recorder(rs or ch._empty_ruleset(family), spec.net, log)
                return self.walkers[key]

        world = _World(self.env)
        pkt = replace(pkt, mark=sel.mark)
        # every outcome (statistic endpoints, uncertain matches)
        trips = ch.follow_all(world, sel.start, pkt, uid=sel.uid, gid=sel.gid)
        per = [nat.findings(world, t) for t in trips]
        diags = nat.outcome_findings(world, trips) if len(trips) > 1 else per[0]
        text, doc = render_trips(trips, diags), trips_json(trips, diags)
        ends = [self._end(t, d, getattr(t, "prob", None)) for t, d in zip(trips, per)]
        steps = [s for h in trips[0].request.hops for s in h.steps]
        rules = tuple((s.where, s.path, s.line) for t in trips for h in t.request.hops for s in h.steps if s.line)
        approx = any(t.request.approximate or (t.reply is not None and t.reply.approximate) for t in trips)
        return Fate(tuple(ends), text, doc, tuple(diags), _decisive(steps), rules, approx,
                    _translation(steps)), log

    def _end(self, trip, diags, prob=None) -> End:
        req = trip.request
        leg, lst = trip, trip.listener
        # a proxy that opens a second connection: the flow really ends where that one ends
        while leg.second_leg is not None and leg.request.end == "delivered":
            leg = leg.second_leg
            lst = leg.listener
        r = leg.request
        p = r.end_packet
        reached = r.end == "delivered" and not any(d.code == "NAT003" for d in diags)
        translated = any(h.ct is not None and h.ct.dnat for h in req.hops)
        backend = None
        if translated:
            e = getattr(trip, "endpoint", None)
            if e is None:
                h = next(h for h in reversed(req.hops) if h.ct is not None and h.ct.dnat)
                e = h.packet_out
            backend = (e.dst, e.dport)
        sym = None
        if trip.reply is not None:
            sym = not any(d.code in ("NAT001", "NAT002") for d in diags)
        elif req.end == "dropped" and any(d.code == "NAT001" for d in diags):
            sym = False
        return End(r.end, reached, r.end_ns, p.dst if p is not None else None,
                   p.dport if p is not None else None, None,
                   (lst.name or str(lst.port)) if lst is not None else None, prob, translated, sym,
                   r.detail, backend)

    def lint(self, select, ignore=()):
        from analyzer.checks import CheckContext, run_checks, selected
        diags = [d for d in self.env.diagnostics if selected(d.code, None, select, ignore)]
        for spec in self.env.namespaces.values():
            for rs in (spec.ruleset, spec.ruleset6):
                if rs is not None:
                    diags += [d for d in run_checks(CheckContext(rs, ()), select, ignore)
                              if not d.code.startswith("NAT")]
        diags += [d for d in run_checks(CheckContext(None, (), extra={"env": self.env}), select, ignore)
                  if d.code.startswith("NAT")]
        return diags

    def namespace_of(self, path):
        for name, spec in self.env.namespaces.items():
            if path in spec.dumps:
                return name
        return None

    def chain_of(self, span):
        for spec in self.env.namespaces.values():
            for rs in (spec.ruleset, spec.ruleset6):
                for r in (rs.rules() if rs is not None else ()):
                    if r.span.path == span.path and r.span.line == span.line:
                        return r.table, r.chain
        return None


def _decisive(steps) -> Span | None:
    for s in reversed(steps):
        if s.line and s.path:
            return Span(s.path, s.line, 1, 2)
    return None


_TRANSLATING = frozenset({Kind.DNAT, Kind.REDIRECT, Kind.NETMAP, Kind.TPROXY})


def _translation(steps) -> Span | None:
    for s in steps:
        if s.rule is not None and s.kind in _TRANSLATING:
            return Span(s.path, s.line, 1, 2)
    return None


def load_target(path: str, addresses=(), routes=(), sysctls=None):
    """A dump or an environment file (``.yaml``/``.yml``), read for flow questions."""
    from analyzer.netfilter.env import EnvError
    from analyzer.parse import load_ruleset
    from analyzer.parse.envfile import load_environment

    if path.endswith((".yaml", ".yml")):
        return EnvTarget(load_environment(path), path)
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            text = f.read()
    except OSError as e:
        raise EnvError(f"cannot read {path}: {e.strerror}") from None
    res = load_ruleset([(text, path)])
    return DumpTarget(res.ruleset, make_namespace(addresses, routes, sysctls), path, res.files, res)


def make_namespace(addresses=(), routes=(), sysctls=None):
    from analyzer.netfilter.env import Namespace
    ns = Namespace()
    for a in addresses:
        cidr, _, iface = str(a).partition("@")
        ns.add_addr(cidr, iface or "eth0")
    for r in routes:
        ns.add_route(str(r))
    ns.sysctls.update({str(k): int(v) for k, v in (sysctls or {}).items()})
    return ns


# ------------------------------------------------------------------ flow sets
def family_of(sel) -> int:
    for n in (sel.src or ()) + (sel.dst or ()):
        return n.version
    return 4


#: where a flow with no destination given (or a negated one) is taken to go, to pick its source
_ANY_DST = {4: ipaddress.IPv4Address("192.0.2.1"), 6: ipaddress.IPv6Address("2001:db8::1")}


def kernel_source(net, sel, family: int):
    """The source a process of namespace ``net`` gets for the selector's flow when the policy
    gives none: the kernel's choice for its first destination network (Namespace.source_address,
    RFC 6724 for IPv6: a global destination never gets a link-local source), or for a global
    address when no destination is given. One source for the whole flow (several destination
    networks that would get different sources are a known limit, docs/policy.md).

    >>> from analyzer.netfilter.env import Namespace
    >>> from analyzer.policy.spec import FlowSel
    >>> ns = Namespace(); ns.add_addr("fe80::c/64", "eth0"); ns.add_addr("2001:db8:1::2/64", "eth0")
    >>> str(kernel_source(ns, FlowSel(), 6)), str(kernel_source(ns, FlowSel(dst=(ipaddress.ip_network("fe80::/64"),)), 6))
    ('2001:db8:1::2', 'fe80::c')
    """
    nets = [n for n in (sel.dst or ()) if n.version == family] if not sel.dst_negated else []
    return net.source_address(nets[0].network_address if nets else _ANY_DST[family])


def flow_set(space: PacketSpace, sel, family: int, default_src=None) -> PacketSet:
    """The policy's flow selector as a packet set (ports constrain port protocols only)."""
    u = space.family(family)
    if sel.protos is not None:
        u &= space.union(space.eq("proto", p) for p in sel.protos)
    for fld, nets, neg in (("src", sel.src, sel.src_negated), ("dst", sel.dst, sel.dst_negated)):
        if nets is None:
            if fld == "src" and default_src is not None:
                u &= space.eq("src", default_src)
            continue
        s = space.union(space.prefix(fld, n) for n in nets)
        u &= (~s if neg else s)
    ported = space.union(space.eq("proto", p) for p in PORT_PROTOS)
    for fld, rs in (("sport", sel.sport), ("dport", sel.dport)):
        if rs is not None:
            u &= (ported & space.ports(fld, list(rs))) | (u - ported)
    return u


def match_set(space: PacketSpace, rule) -> PacketSet:
    """The header part of a rule's matches as one packet set (other matches: any packet)."""
    s = space.universe()
    for m in rule.matches:
        if isinstance(m, AddrMatch):
            x = space.union(space.prefix(m.direction, n) for n in m.networks)
        elif isinstance(m, IpRangeMatch):
            x = space.range(m.direction, m.lo, m.hi)
        elif isinstance(m, ProtoMatch):
            if not m.number:
                continue
            x = space.eq("proto", m.number)
        elif isinstance(m, PortMatch):
            proto = _MOD_PROTO.get(m.mod)
            if m.direction == "any":
                x = space.ports("sport", list(m.ranges)) | space.ports("dport", list(m.ranges))
            else:
                x = space.ports("sport" if m.direction == "src" else "dport", list(m.ranges))
            if proto:
                x &= space.eq("proto", proto)
        else:
            continue
        s &= (~x if m.negated else x)
    return s


def rule_atoms(space: PacketSpace, rule, bounds: dict) -> list[PacketSet]:
    """A rule separates the packets its header matches take from the others: one atom, the
    conjunction (a rule whose address matches but port does not is no reason to split). The
    per-field boundaries are kept to describe classes."""
    for m in rule.matches:
        if isinstance(m, AddrMatch):
            for n in m.networks:
                bounds.setdefault(m.direction, set()).update(
                    {int(n.network_address), int(n.broadcast_address) + 1})
        elif isinstance(m, IpRangeMatch):
            bounds.setdefault(m.direction, set()).update({int(m.lo), int(m.hi) + 1})
        elif isinstance(m, ProtoMatch) and m.number:
            bounds.setdefault("proto", set()).update({m.number, m.number + 1})
        elif isinstance(m, PortMatch):
            proto = _MOD_PROTO.get(m.mod)
            if proto:
                bounds.setdefault("proto", set()).update({proto, proto + 1})
            fields = ("sport",) if m.direction == "src" else ("dport",) if m.direction == "dst" else ("sport", "dport")
            for f in fields:
                bounds.setdefault(f, set()).update(b for lo, hi in m.ranges for b in (lo, hi + 1))
    s = match_set(space, rule)
    return [] if s.is_full() else [s]


def _net_atoms(space, namespaces, bounds) -> list[PacketSet]:
    """Routing separates destinations by route prefix and local address."""
    atoms = []
    for ns in namespaces:
        nets = [r.dest for r in ns.routes] + [a.network for _, a in ns.local_addresses()]
        nets += [ipaddress.ip_network(a.ip) for _, a in ns.local_addresses()]
        for n in nets:
            atoms.append(space.prefix("dst", n))
            bounds.setdefault("dst", set()).update({int(n.network_address), int(n.broadcast_address) + 1})
        for _, a in ns.local_addresses():  # a local process sends from one of them
            bounds.setdefault("src", set()).update({int(a.ip), int(a.ip) + 1})
    return atoms


_INDEXED: dict = {}     # id(chain) -> (chain, destinations, dst-bucket parts, port-bucket parts)


def decoded_proto(rule) -> int | None:
    """The protocol number a decoded rule's positive ``-p`` pins (None: any, ``-p all`` too)."""
    return next((m.number for m in rule.matches if isinstance(m, ProtoMatch) and not m.negated and m.number), None)


def _indexed_parts(chain, family: int = 4):
    """The big-chain index's buckets as the walker builds them (`walk.ChainIndex`, the same
    `chain_index_key` of each rule): the bucketed destinations, and for each rule bucketed by
    destination (by destination port) the header its key and its protocol pin. Read from the
    rule itself, not from its text, so that whatever the walker buckets is covered here."""
    from analyzer.netfilter.walk import chain_index_key

    hit = _INDEXED.get(id(chain))
    if hit is None or hit[0] is not chain:
        dsts, by_dst, by_port = set(), [], []
        for r in chain.rules:
            d, port = chain_index_key(r, family)
            if d is None and port is None:
                continue  # looked at by every walk: never skipped
            # the protocol narrows the set when the rule is decoded; a lazily parsed rule is not
            # decoded for it (12,955 KUBE-SERVICES rules: 1.3 s), its set is then wider (sound)
            proto = None if r.pending is not None else decoded_proto(r)
            c = {"proto": proto} if proto is not None else {}
            if port is not None:
                c["dport"] = (port, port)
            if d is not None:
                dsts.add(d)
                by_dst.append({"dst": d, **c})
            else:
                by_port.append(c)
        hit = _INDEXED[id(chain)] = (chain, dsts, by_dst, by_port)
        while len(_INDEXED) > 16:
            _INDEXED.pop(next(iter(_INDEXED)))
    return hit


def _indexed_space(space: PacketSpace, chain, cache: dict, field: str, family: int = 4) -> PacketSet:
    """An over-approximation of the packets the destination-bucketed (``field`` dst) or the
    port-bucketed (dport) rules of an indexed chain can match (each rule's destination, protocol and port as far as its text
    pins them). ``cache``: per exploration (sets belong to one packet space)."""
    hit = cache.get((id(chain), field))
    if hit is None or hit[0] is not chain:
        parts = _indexed_parts(chain, family)[2 if field == "dst" else 3]
        hit = cache[(id(chain), field)] = (chain, space.union(space.where(**c) for c in parts))
    return hit[1]


def witness_packet(v: dict, family: int) -> Packet:
    mk = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    proto = v["proto"]
    ported = proto in PORT_PROTOS
    return Packet(family, proto, mk(v["src"]), mk(v["dst"]), v["sport"] if ported else None,
                  v["dport"] if ported else None, tcp_flags=0x02 if proto == 6 else 0,
                  icmp_type=(8 if family == 4 else 128) if proto in (1, 58) else None,
                  icmp_code=0 if proto in (1, 58) else None)


def describe(cls: PacketSet, bounds: dict, family: int) -> str:
    """A class as text: protocols, address ranges (as CIDRs), port ranges."""
    width = 32 if family == 4 else 128
    mk = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    protos = field_ranges(cls, "proto", bounds.get("proto", ()), 8)
    ptxt = "any protocol" if protos == [(0, 255)] else ",".join(
        PROTO_NAME.get(lo, str(lo)) if lo == hi else f"{lo}-{hi}" for lo, hi in protos)

    def addrs(f):
        rs = field_ranges(cls, f, bounds.get(f, ()), width)
        if rs == [(0, (1 << width) - 1)]:
            return "any"
        nets = [str(n) for lo, hi in rs for n in ipaddress.summarize_address_range(mk(lo), mk(hi))]
        nets = [n.rsplit("/", 1)[0] if n.endswith("/32" if family == 4 else "/128") else n for n in nets]
        return ",".join(nets[:6]) + (f",... ({len(nets)} ranges)" if len(nets) > 6 else "")

    def ports(f):
        rs = field_ranges(cls, f, bounds.get(f, ()), 16)
        if rs == [(0, 65535)]:
            return ""
        return ":" + ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in rs[:8]) + \
            (",..." if len(rs) > 8 else "")

    return f"{ptxt} {addrs('src')}{ports('sport')} -> {addrs('dst')}{ports('dport')}"


@dataclass
class Exploration:
    classes: list[FlowClass]
    complete: bool
    bounds: dict
    family: int

    def describe(self, packets: PacketSet) -> str:
        return describe(packets, self.bounds, self.family)

    def describer(self):
        """packets -> text without a reference back to this exploration (a cycle through BDD
        nodes would let the collector free the BDD manager before its nodes)."""
        import functools
        return functools.partial(describe, bounds=self.bounds, family=self.family)

    def merged(self, key) -> list[FlowClass]:
        """Classes with the same key as one class (their union, the first witness), described anew:
        as few header-space classes as the fates allow."""
        out: dict = {}
        for c in self.classes:
            k = key(c)
            if k is None:
                continue
            if k in out:
                out[k].packets = out[k].packets | c.packets
            else:
                out[k] = FlowClass(c.packets, None, c.witness, c.fates, self.describer())
        return list(out.values())


def _index_atoms(space, cls, pkt, indexes, u_cache) -> list:
    out = []
    multi = {}
    for fld, value in (("dst", pkt.dst), ("dport", pkt.dport)):
        if fld == "dport" and value is None:
            continue
        if not (cls - space.eq(fld, value)).is_empty():
            multi[fld] = value      # the class has other values: buckets may differ inside it
    if not multi:
        return []
    for chain in {id(c): c for c in indexes}.values():
        for fld, value in multi.items():
            u = _indexed_space(space, chain, u_cache, fld, pkt.family)
            if (cls & u).is_empty():
                continue  # no skipped rule can match any packet of the class
            if not (cls - u).is_empty():
                out.append(u)  # first split off what no bucketed rule can match
            else:
                out.append(space.eq(fld, value))
    return out


def explore(targets: list, sel, universe: PacketSet | None = None, space: PacketSpace | None = None,
            limit: int = 256, family: int | None = None, seeds=()) -> Exploration:
    """Split the flows into classes no rule met on the way tells apart; walk one witness per
    class in every target. ``complete`` is False when the class limit stopped the refinement
    (then a class may hold packets whose fate differs from its witness's: APPROXIMATE)."""
    family = family or family_of(sel)
    space = space or PacketSpace()
    src = None
    if universe is None:
        if sel.src is None:
            src = targets[0].default_src(sel, family)
            if targets[0].kind == "env" and sel.start not in targets[0].env.namespaces:
                raise TargetError(f"unknown namespace '{sel.start}' in 'from:' (one of: "
                                  f"{', '.join(targets[0].env.namespaces)})" if sel.start else
                                  "an environment flow needs 'from: NAMESPACE'")
            if targets[0].kind == "env" and src is None:
                raise TargetError(f"namespace '{sel.start}' has no IPv{family} address to send from; give 'src:'")
        universe = flow_set(space, sel, family, src)
    bounds: dict = {}
    if sel.protos:
        bounds["proto"] = {b for p in sel.protos for b in (p, p + 1)}
    for f, nets in (("src", sel.src), ("dst", sel.dst)):
        for n in nets or ():
            bounds.setdefault(f, set()).update({int(n.network_address), int(n.broadcast_address) + 1})
    for f, rs in (("sport", sel.sport), ("dport", sel.dport)):
        for lo, hi in rs or ():
            bounds.setdefault(f, set()).update({lo, hi + 1})
    if sel.src is None and src is not None:
        bounds.setdefault("src", set()).update({int(src), int(src) + 1})
    if universe.is_empty():
        return Exploration([], True, bounds, family)
    prefer = [space.eq("sport", 40000), space.eq("proto", 6), space.eq("dport", 80),
              space.range("dport", 1, 65535), space.range("sport", 1024, 65535),
              space.prefix("src", ipaddress.ip_network("10.0.0.0/8" if family == 4 else "fd00::/8")),
              space.prefix("dst", ipaddress.ip_network("10.0.0.0/8" if family == 4 else "fd00::/8"))]
    base_atoms = []
    for t in targets:
        base_atoms += _net_atoms(space, t.namespaces(), bounds)
    # seeds: sets the caller already knows to differ (diff: the space of each changed rule)
    work, done = list(reversed(partition(universe, seeds, limit).classes)) if seeds else [universe], []
    complete = True
    atom_cache: dict = {}
    u_cache: dict = {}
    while work:
        cls = work.pop()
        v = cls.pick(prefer=prefer)
        pkt = witness_packet(v, family)
        fates, atoms = [], list(base_atoms)
        for t in targets:
            fate, (rules, indexes) = t.walk(pkt, sel)
            fates.append(fate)
            for rule in {id(r): r for r in rules}.values():  # rules hash by value: slow
                a = atom_cache.get(id(rule))
                if a is None:
                    a = atom_cache[id(rule)] = (rule, rule_atoms(space, rule, bounds))
                atoms += a[1]
            if indexes:
                # a big chain was looked up by this witness's destination (and port): rules of
                # other buckets were skipped. Packets none of those rules can match walk like the
                # witness; the others are peeled off one destination (port) at a time
                atoms += _index_atoms(space, cls, pkt, indexes, u_cache)
        parts = partition(cls, atoms, limit).classes
        if len(parts) == 1 or len(done) + len(work) + len(parts) > limit:
            complete = complete and len(parts) == 1
            done.append(FlowClass(cls, None, pkt, fates))
        else:
            work.extend(reversed(parts))
    ex = Exploration(done, complete, bounds, family)
    for c in done:
        c.describe = ex.describer()
    return ex
