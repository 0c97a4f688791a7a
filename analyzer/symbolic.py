"""Explain a flow with open parts (addresses as prefixes or ranges, ports, protocol, input
interface): every packet it stands for, in classes the rules treat alike, grouped by outcome.

Path refinement (engine/partition.py ``explore``): a witness of the packets not yet explained
is walked concretely (explain.py) with concolic open fields (netfilter/symbolic.py); every
decision of that walk is noted as a packet set, and the packets deciding alike are its class.
Only the rules on the way are ever asked, so a 10,000-service dump costs the rules each class
meets, not all of them. Classes with the same outcome are reported together.
"""
from __future__ import annotations

import contextlib
import enum
import ipaddress
import operator
from dataclasses import dataclass, field

from analyzer.engine.partition import explore, intervals, masks
from analyzer.model.packet import CT_INPUT
from analyzer.model.packet import PROTO_NAME, Packet  # noqa: F401 (re-exported)
from analyzer.netfilter.trace import Kind, Route
from analyzer.netfilter.symbolic import (
    OPEN_INTS, RecordingWalker, flow_flags_follow, flow_set, flow_space, noting_namespace, proto_class,
    witness,
)
from analyzer.parse.flow import FlowSpec, parse_flow_spec  # noqa: F401 (re-exported)

#: how many ranges a group description lists per field before "and N more"
SHOWN_RANGES = 8


@dataclass
class Group:
    description: str
    witness: Packet
    outcomes: list
    classes: int
    packets: object = None  # the engine PacketSet of every packet in the group
    approximate: list = field(default_factory=list)  # why the classes may be too wide
    assumes: list = field(default_factory=list)  # what the walks assumed (e.g. -m recent)

    @property
    def is_approximate(self) -> bool:
        """Its classes may be too wide, or an outcome of its witness is APPROXIMATE."""
        return bool(self.approximate) or any(o.confidence == "APPROXIMATE" for o in self.outcomes)

    def lazy_packets(self, build, parts=None) -> None:
        """``packets`` built by ``build()`` on first use (a fate group of 10,000 services is a
        BDD of ~450,000 nodes: seconds, that a run without descriptions never needs); ``parts``:
        what it is built from (`setwalk.Part`s and sets), which `describe_group` reads."""
        self.__dict__["_packets"] = None
        self.__dict__["_build"] = build
        self.__dict__["_parts"] = parts


def _get_packets(self):
    if self.__dict__.get("_packets") is None and self.__dict__.get("_build") is not None:
        self.__dict__["_packets"] = self.__dict__.pop("_build")()
    return self.__dict__.get("_packets")


def _set_packets(self, value):
    self.__dict__["_packets"] = value
    self.__dict__.pop("_build", None)
    self.__dict__.pop("_parts", None)  # what it was built from is not this set


# `Group.packets` is a field of the dataclass above, read and written through this property
# (set after the class is made, so the dataclass keeps it as a field with its default)
Group.packets = property(_get_packets, _set_packets)


def signature(outcomes) -> tuple:
    """What tells two classes' outcomes apart: dispositions, the rules crossed and what they did
    (without the addresses they translate to), the reply's fate."""
    return tuple((o.disposition, tuple(_step_kind(s) for s in o.forward.steps),
                  o.reply.disposition if o.reply is not None else None, o.reply_ok)
                 for o in outcomes)


def _step_kind(s) -> tuple:
    """A step without the packet's own values: where, the action and its typed fact; the route a forwarding decision took."""
    k = s.kind
    if k is Kind.MARK or k is Kind.CONNMARK:
        return s.where, k  # not the mark written: an open mark's own bits are the packet's
    if k is Kind.ROUTE and s.fact in (Route.FORWARD, Route.OUTPUT, Route.SPECIAL):
        return s.where, k, s.fact, s.value
    return s.where, k, s.fact if isinstance(s.fact, (enum.Enum, bool)) else None


def explain_classes(ruleset, spec: FlowSpec, ns, local: bool = False, limit: int = 20000,
                    assumed: list | None = None, progress=None):
    """The packets of ``spec`` in classes the walk cannot tell apart: ``([Explored], rest)``,
    each class with its witness's values and outcomes; ``rest`` the packets left when ``limit``
    classes were reached (empty when every packet is explained). Also returns the space."""
    with _cyclic_gc_paused():
        return _explain_classes(ruleset, spec, ns, local, limit, assumed, progress)


@contextlib.contextmanager
def _cyclic_gc_paused():
    """The walks allocate millions of short-lived objects and almost no reference cycles (a
    collection after the 4,416 classes of a 10,000-service flow's :80 part finds 5 objects):
    the cyclic GC only costs time there (~5%), so it pauses for an exploration, as it does for
    lint --env's walks (checks/reply.py).

    What the exploration kept is then frozen out of the collector's reach (`gc.freeze`), as
    the parse does with the model and lint --env with its trips: left young, it would all be
    scanned by the first collection after (millions of objects, 0.4 s after the 10k flow's
    fate grouping, in whatever allocates next) and again as it ages. A cycle among it is
    never collected: none may hold the packet space (its BDD manager and every set, ~250 MB
    for a 10,000-service flow), which is freed with the answer by reference counting
    (tests/test_setwalk.py checks it; a recorder once kept the walker's bound method, and with
    it every exploration's space for the process's life)."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.freeze()
            gc.enable()


def _explain_classes(ruleset, spec: FlowSpec, ns, local: bool, limit: int, assumed: list | None, progress):
    from analyzer.explain import explain_flow

    space = flow_space(ruleset, ns, spec)
    universe = flow_set(space, spec, local)
    t = spec.template
    prefer = {"proto": 6, "sport": 40000, "dport": 80}
    for f in ("src", "dst"):
        prefer[f] = int(getattr(t, f))
    for f in OPEN_INTS:
        if f in spec.open:
            prefer[f] = int(getattr(t, f) or 0)
    nsw, walker = _recording_walker(ruleset, ns, spec)

    def make(v):
        return witness(spec, v, space)

    def walk(pkt):
        flow_flags_follow(spec, pkt)
        return explain_flow(ruleset, pkt, nsw, local=local, walker=walker)

    fixed = _fixed_fields(t, spec.open)
    classes, rest = _explore_protos(universe, make, walk, limit, prefer, fixed, spec, progress)
    _assumed(walker, assumed)
    return classes, rest, space


def _recording_walker(ruleset, ns, spec: FlowSpec):
    """The noting namespace and the recording walker an exploration of ``spec`` walks with."""
    nsw = noting_namespace(ns)
    # the flow's sources: the peer model's route back to the client tells its address from others
    nsw.flow_sources = tuple((int(lo), int(hi)) for lo, hi in spec.src)
    return nsw, RecordingWalker(ruleset, nsw)


def _fixed_fields(t: Packet, open_fields) -> dict:
    """The header fields every packet explored has the template's value of (explore's ``fixed``)."""
    return {f: (int(getattr(t, f)) if f in ("src", "dst") else getattr(t, f))
            for f in ("src", "dst", "sport", "dport", "proto") if f not in open_fields and getattr(t, f) is not None}


def _assumed(walker, out: list | None) -> None:
    """What the walks assumed, for the caller to print (``-m recent``)."""
    if out is not None and walker.recent_assumed:
        from analyzer.netfilter.walk import RECENT_ASSUMPTION
        out.append(RECENT_ASSUMPTION)


def explain_open_flow(ruleset, spec: FlowSpec, ns, local: bool = False, limit: int = 20000,
                      progress=None, described: int | None = None):
    """Returns (groups, complete): one group per distinct outcome signature; ``complete`` is False
    when ``limit`` classes did not cover every packet (the rest is not explained; `explain_open`
    returns it too). ``progress(n)`` after each class; ``described``: describe only the first
    so many groups (their packets as ranges cost a projection each; None: all)."""
    res = explain_open(ruleset, spec, ns, local, limit, progress, described)
    return res.groups, res.complete


@dataclass
class OpenResult:
    """An open flow explained: its groups, how many classes, and the packets left unexplained
    when the class limit stopped the exploration (``rest``, empty when ``complete``)."""

    groups: list
    classes: int
    limit: int
    rest: object
    space: object
    by: str = "path"  # how the packets are grouped: "path" (rules crossed) or "fate" (explain_fate)
    fallback: str | None = None  # fate was asked but did not apply: why (then ``by`` is "path")

    @property
    def complete(self) -> bool:
        return self.rest.is_empty()

    def unexplained_example(self, spec: FlowSpec) -> Packet | None:
        """One packet of the flow no class explains (None when complete)."""
        if self.complete:
            return None
        return _plain(witness(spec, self.rest.pick(), self.space))


def explain_open(ruleset, spec: FlowSpec, ns, local: bool = False, limit: int = 20000,
                 progress=None, described: int | None = None, by: str = "fate") -> OpenResult:
    """`explain_open_flow` with the count of classes and the unexplained rest. ``by``: "fate"
    groups the packets by what happens to them (`explain_fate`, where it applies; else as
    "path"), "path" by the rules they cross (one group per outcome signature)."""
    fallback = None
    if by == "fate":
        why: list = []
        res = explain_fate(ruleset, spec, ns, local, limit, progress, described, why)
        if res is not None:
            return res
        fallback = why[0] if why else "fate grouping does not apply to this flow"
    assumed: list = []
    classes, rest, space = explain_classes(ruleset, spec, ns, local, limit, assumed, progress)
    groups: dict = {}
    for c in classes:
        sig = signature(c.result)
        g = groups.get(sig)
        if g is None:
            groups[sig] = Group("", _plain(witness(spec, c.witness, space)), c.result, 1, c.packets,
                                list(c.lost))
        else:
            g.classes += 1
            g.packets = g.packets | c.packets
            g.approximate += [r for r in c.lost if r not in g.approximate]
    result = list(groups.values())
    for g in result[:described]:
        g.description = describe(g.packets, spec, space)
    for g in result:
        g.assumes = list(assumed)
    return OpenResult(result, len(classes), limit, rest, space, fallback=fallback)


# ------------------------------------------------------------------------------------------
# grouped by fate: the PREROUTING hook walked over sets, the rest path by path

def fate(o) -> tuple:
    """What happens to one outcome's connection, in the words of the summary: how the first
    packet ends, whether its destination and source were translated here, how the reply ends
    and whether the client sees it as dialled. Not the rules crossed, nor the addresses."""
    return (o.disposition, bool(o.forward.ct.dnat), bool(o.forward.ct.snat),
            o.reply.disposition if o.reply is not None else None, o.reply_ok)


class _OriginalRead(Exception):
    """A walk after the hook decided on a connection's original destination (a `Ghost`)."""


#: what a lost reason says when a walk decided on the original destination (concolic.Ghost)
GHOST_READ = "a decision on the original destination"


class FateMismatch(RuntimeError):
    """A group's witness, walked on its own, did not end as the group's fate says (a bug)."""


def explain_fate(ruleset, spec: FlowSpec, ns, local: bool = False, limit: int = 20000,
                 progress=None, described: int | None = None, why: list | None = None) -> "OpenResult | None":
    """The packets of ``spec`` grouped by fate (`fate` of each of their outcomes), or None when
    this exploration does not apply (the caller explores path by path).

    The PREROUTING hook is walked over the whole set (netfilter/setwalk.py): each way through
    it (an `Exit`: which input packets, how they leave, translated or not) is exact for all of
    its packets, so a 10,000-service fan-out costs one set operation per rule instead of one
    walk per service. The packets leaving the hook, the translated ones (over-approximated:
    `_after`) and the others apart, are then explored path by path from there
    (pipeline.AFTER_PREROUTING, the reply included), a table the set walk follows decided as
    a whole (RecordingWalker.summaries); a connection's original destination is then a
    `Ghost`: a walk that decides on it makes the flow fall back (``why`` says so). Each input
    packet's fates are those of the classes its exits lead to (`_before`); the packets with
    the same set of fates are one group, and one witness per group is walked again from the
    start, concretely, for its trace and findings, and must end as the group says
    (`FateMismatch` otherwise).

    Applies to a flow arriving on one interface (not ``--local``), IPv4 or IPv6 (IPv6: what
    ip6_rcv_core drops first is a group of its own), a connection's first packet (no
    conntrack state, connmark or TCP flags given or open), and rules the set walk follows
    exactly (setwalk.Unsupported otherwise). When it returns None, ``why`` (a list) gets the
    reason, in a user's words."""
    from analyzer.netfilter.setwalk import Exit, SetWalker, Unsupported

    refused = fate_refused(spec, local)
    if refused is not None:
        if why is not None:
            why.append(refused)
        return None
    t = spec.template
    with _cyclic_gc_paused():
        space = flow_space(ruleset, ns, spec)
        universe = flow_set(space, spec, local)
        nsw, walker = _recording_walker(ruleset, ns, spec)
        walker.summaries = True
        mark = None if "mark" in spec.open else int(t.mark or 0)
        icmp = (t.icmp_type, t.icmp_code or 0) if "proto" not in spec.open and t.proto in (1, 58) \
            and t.icmp_type is not None else (8 if t.family == 4 else 128, 0)  # an open protocol's: echo request
        sw = SetWalker(ruleset, ns, space, t.family, t.iif, mark, walker.backend,
                       tcp_flags=int(t.tcp_flags or 0), icmp=icmp, shared=walker.__dict__.setdefault("_setwalk", {}))
        # IPv6: ip6_rcv_core drops some packets before any hook (pipeline.ip6_header_checks)
        dropped = _ip6_header_dropped(space, t) & universe if t.family == 6 else space.empty()
        try:
            exits = sw.hook(universe - dropped, "PREROUTING", walker.ct_in_use)
        except Unsupported as e:
            if why is not None:
                why.append(f"the PREROUTING hook has a rule the set walk does not follow ({e})")
            return None
        walker.recent_assumed = walker.recent_assumed or sw.recent_assumed
        if not dropped.is_empty():
            exits.append(Exit(sw._parts(dropped), space, 1.0, "DROP", False, (), mark))
        try:
            return _fate_groups(ruleset, spec, ns, nsw, walker, space, universe, exits, mark, limit,
                                progress, described)
        except _OriginalRead as e:
            if why is not None:
                why.append(str(e))
            return None


def _ip6_header_dropped(space, t):
    """The IPv6 packets ip6_rcv_core drops before any hook, as pipeline.ip6_header_checks
    decides them for a packet arriving on ``t.iif``: a loopback source or destination, a
    multicast source, a multicast destination of scope 0 or 1 (none on lo)."""
    from analyzer.netfilter.pipeline import _MC6_DROPPED_SCOPES

    if t.iif == "lo":
        return space.empty()
    lo6, mc6 = ipaddress.ip_network("::1/128"), ipaddress.ip_network("ff00::/8")
    return space.union([space.prefix("src", lo6), space.prefix("dst", lo6), space.prefix("src", mc6),
                        *(space.prefix("dst", n) for n in _MC6_DROPPED_SCOPES)]) & space.family(6)


def fate_refused(spec: FlowSpec, local: bool = False) -> str | None:
    """Why `explain_fate` does not apply to ``spec`` before any rule is read (None: it may)."""
    t = spec.template
    if local:
        return "the flow is generated locally (--local); fate grouping follows a flow arriving on an interface"
    if not t.iif or "iif" in spec.open:
        return "the input interface is open (no --from-iface, or a wildcard); fate grouping needs one interface"
    given = sorted(f for f in ("ctstate", "connmark", "tcp_flags") if f in spec.open or getattr(spec, f))
    if given or (t.proto == 6 and t.tcp_flags != 0x02):
        what = ", ".join({"tcp_flags": "flags"}.get(f, f) for f in given) or "flags"
        return f"fate grouping covers a connection's first packet, and this flow gives or opens {what}"
    return None


def _fate_groups(ruleset, spec, ns, nsw, walker, space, universe, exits, mark, limit, progress, described):
    from dataclasses import replace

    from analyzer.engine.concolic import ghost_address, Ghost
    from analyzer.explain import explain_flow
    from analyzer.model.packet import evolve
    from analyzer.netfilter.walk import Branch, Conntrack

    t = spec.template
    ended = [e for e in exits if e.action is not None]
    going = {False: [e for e in exits if e.action is None and not e.dnat],
             True: [e for e in exits if e.action is None and e.dnat]}
    pb = _PartSets(space, t.family)
    images: dict = {False: {}, True: {}}  # per mark, a superset of the packets leaving by those exits
    q = {k: _after(es, space, pb, images[k]) for k, es in going.items()}
    marked = mark is not None and any(e.mark != mark for es in going.values() for e in es)
    # the fields the hook may have written are open in the packets after it: the mark (MARK),
    # and the destination and its port of the translated ones (DNAT)
    after_open = {False: spec.open | ({"mark"} if marked else set()),
                  True: spec.open | {"dst", "dport"} | ({"mark"} if marked else set())}
    g_dst, g_dport = ghost_address("original destination", t.family), Ghost(0, "original destination port", 16)
    prefer = {"proto": 6, "sport": 40000, "dport": 80, "src": int(t.src), "dst": int(t.dst)}
    assumed: list = []

    def explore_after(translated: bool, budget: int, base: int):
        after_spec = replace(spec, open=frozenset(after_open[translated]))

        def make(v):
            return witness(after_spec, v, space)

        def walk(pkt):
            orig = evolve(pkt, mark=t.mark) if mark is not None else pkt
            if translated:
                orig = evolve(orig, dst=g_dst, dport=g_dport if pkt.dport is not None else None)
            ct = Conntrack(orig, pkt.dst, pkt.dport, pkt.src, pkt.sport, in_use=walker.ct_in_use)
            ct.dnat = translated
            return explain_flow(ruleset, pkt, nsw, walker=walker, resume=Branch(pkt, ct, [], 1.0, []))

        return _explore_protos(q[translated], make, walk, budget, prefer, _fixed_fields(t, after_open[translated]), spec,
                               None if progress is None else (lambda n: progress(base + n)))

    classes = {}
    rest = space.empty()
    count = 0
    for translated in (False, True):
        if q[translated].is_empty():
            classes[translated] = []
            continue
        got, left = explore_after(translated, limit - count, count)
        classes[translated] = got
        count += len(got)
        if not left.is_empty():
            rest = rest | pb.union(_before(going[translated], [(None, left)], translated, pb, images[translated])[None])
    _assumed(walker, assumed)
    for c in classes[True]:
        if any(GHOST_READ in r for r in c.lost):
            raise _OriginalRead("a rule after the DNAT reads the original destination (e.g. -m conntrack "
                                "--ctorigdst), which fate grouping does not keep per packet")
    # each input packet's fates: those of the classes its exits lead to
    by_fate: dict = {}
    lost: dict = {}
    for translated in (False, True):
        for c in classes[translated]:
            f = _fates_of(c)
            hit = by_fate.get((translated, f))
            by_fate[(translated, f)] = c.packets if hit is None else hit | c.packets
            lost.setdefault(f, []).extend(r for r in c.lost if r not in lost.get(f, ()))
    pre: dict = {}
    for translated in (False, True):
        targets = [(f, cls) for (tr, f), cls in by_fate.items() if tr == translated]
        for f, xs in _before(going[translated], targets, translated, pb, images[translated]).items():
            pre.setdefault(f, []).extend(xs)
    for e in ended:
        # the fate the walk gives a packet that ends in the hook (walk.Walker._end): no
        # translation yet (a DNAT ends the hook's last table), no reply; a statistic rule may
        # end some connections of a packet here and let the others go on (one group, both fates)
        pre.setdefault((_ended_fate(e),), []).extend(e.parts)
    if not rest.is_empty():
        # packets explored by no class (the limit): the fates' sets, built, split what is left
        fates = {f: pb.union(items) for f, items in pre.items()}
        cells: dict = {frozenset(): [universe - rest]}
        for f, a in fates.items():
            nxt: dict = {}
            for key, (s,) in cells.items():
                inside = s & a
                for k, part in ((key | {f}, inside), (key, s - inside)):
                    if not part.is_empty():
                        nxt[k] = [nxt[k][0] | part] if k in nxt else [part]
            cells = nxt
        covered = None
    else:
        # every packet's fates, from the parts the set walk left (no set built per fate)
        cells = _cells([(x, f) for f, xs in pre.items() for x in xs], pb)
        covered = pb.union(x for xs in cells.values() for x in xs) if sum(map(len, cells.values())) <= _CHECKED_CELLS \
            else None
    if frozenset() in cells or covered is not None and covered != universe:
        raise FateMismatch("packets of the flow left the PREROUTING hook by no way the set walk found")
    # one group per set of fates (classes with fates (A, B) and with A alone and B alone lead
    # to the same set)
    merged: dict = {}
    for key, xs in cells.items():
        want = frozenset(x for f in key for x in f)
        keys, have = merged.get(want, (frozenset(), []))
        merged[want] = (keys | key, have + xs)
    groups = []
    # most classes first (a group's packet count would cost a walk of its BDD, seconds for
    # the union of 10,000 services), then by their fates
    size = {want: sum(1 for tr in (False, True) for c in classes[tr] if _fates_of(c) in keys)
            + sum(1 for e in ended if (_ended_fate(e),) in keys)  # the ways the hook ended them
            for want, (keys, _) in merged.items()}
    for want, (key, xs) in sorted(merged.items(), key=lambda kv: (-size[kv[0]], repr(sorted(kv[0], key=repr)))):
        # the witness: preferred values among the group's first parts (all of a small group's)
        v = pb.pick(xs[:_WITNESS_CELLS], prefer)
        w = _plain(witness(spec, v, space))
        outcomes = explain_flow(ruleset, w, ns)
        got = {fate(o) for o in outcomes}
        if got != want:
            raise FateMismatch(f"the witness {w.tuple_str()} ends {sorted(got, key=repr)}, its group "
                               f"{sorted(want, key=repr)}")
        reasons = [r for f in key for r in lost.get(f, ())]
        g = Group("", w, outcomes, size[want], None, reasons)
        g.lazy_packets(lambda xs=xs: pb.union(xs), xs)  # built on first use (JSON, tests; describe if it must)
        g.assumes = list(assumed)
        groups.append(g)
    for g in groups[:described]:
        g.description = describe_group(g, spec, space)
    return OpenResult(groups, count + len(ended), limit, rest, space, by="fate")


def _fates_of(c) -> tuple:
    """The fates of an explored class's outcomes, in a stable order."""
    return tuple(sorted({fate(o) for o in c.result}, key=repr))


def _ended_fate(e) -> tuple:
    """The fate the walk gives a packet a verdict of the set walk ended (Exit.action) in the
    hook: its disposition (walk.disposition), no translation yet, no reply."""
    from analyzer.netfilter.walk import disposition

    return (disposition(e.action), False, False, None, None)


def _many_excluded(x) -> bool:
    """Whether the part ``x`` excludes more than a few points (building them is dear)."""
    return bool(x.excl) and sum(len(v) for v in x.excl.values()) > 64


def _after(exits, space, pb, images: dict | None = None):
    """The packets leaving the hook by ``exits``, their marks included (``images``, when given,
    gets them per mark, without it: ``{mark: set}``). Translated exits are
    taken together, over-approximated: per mark and set of rewritten fields, every address
    and port written with every packet's other fields (the union of the exact images, one
    per exit, would be a BDD of ~900,000 nodes for 28,000 endpoints, and every exploration
    step on it slow). Packets of the over-approximation that no exit makes are explored too,
    harmlessly: a class holds for all its packets, and `_before` counts only real images."""
    from analyzer.netfilter.setwalk import Part

    by: dict = {}
    for e in exits:
        by.setdefault((e.mark, tuple(map(_first, e.consts)) if e.dnat else None), []).append(e)
    out = []
    for (m, fields), es in by.items():
        parts = [x for e in es for x in e.parts]
        if fields is None:
            # a part with many exclusions is taken without them (a superset: kube-proxy's
            # 11,000 service points are not built)
            got = pb.union(x if not _many_excluded(x) else Part(x.pins, x.g, None, x.origin) for x in parts)
        else:
            consts: set = set()
            for e in es:  # how many distinct, up to the first beyond _HULL_ABOVE
                consts.add(e.consts)
                if len(consts) > _HULL_ABOVE:
                    break
            if len(consts) <= _HULL_ABOVE:
                got = pb.points(consts) & pb.forgotten(parts, fields)
            else:
                # thousands of endpoints: every address written or pinned by its prefix
                # (HULL_PREFIX), with every port written: a coarser superset, a few sets
                got = pb.hull(e.consts for e in es) & pb.forgotten(parts, fields, hull=True)
        if images is not None:
            images[m] = images[m] | got if m in images else got
        out.append(got if m is None else got & space.eq("mark", m))
    return _union(out) if out else space.empty()


_first = operator.itemgetter(0)


def _prefix_key(a) -> tuple:
    """The address ``a``'s prefix of HULL_PREFIX bits as a key (``_PartSets._hulled`` of two
    addresses with the same key is the same network): ints, cheaper to hash than addresses."""
    if a.__class__ is ipaddress.IPv4Address:
        return 4, a._ip >> (32 - HULL_PREFIX[4])
    return a.version, int(a) >> (a.max_prefixlen - HULL_PREFIX[a.version])


#: the header fields above the source in the BDD order (engine.packetset.LAYOUT)
_TOP_FIELDS = ("family", "proto", "dst", "dport")

#: `_after` takes the translated packets of more than this many DNAT targets by the prefixes of
#: their addresses (HULL_PREFIX bits), not address by address
_HULL_ABOVE = 64
HULL_PREFIX = {4: 16, 6: 64}


def _union(sets):
    """The OR of many sets, pairwise (for tens of thousands, ~1.5x faster than a left fold)."""
    sets = list(sets)
    if not sets:
        raise ValueError("no sets")
    while len(sets) > 1:
        sets = [sets[i] | sets[i + 1] if i + 1 < len(sets) else sets[i] for i in range(0, len(sets), 2)]
    return sets[0]


def _before(exits, targets, translated: bool, pb, images: dict | None = None) -> dict:
    """The input packets whose way out of the hook (one of ``exits``) lands in each of
    ``targets`` ((key, packets), ...), as `setwalk.Part`s: ``{key: [...]}``. An exit's packets leave with its mark (Exit.mark) and,
    translated, with the constants its DNAT wrote (Exit.consts); every other field is the
    input's own. For a part (fields pinned, the rest ``g``), the packets of a target at its
    image's pinned values (`_PartSets.cofactor`) meet ``g``: no set is built per exit, and the
    56,000 exits of a 10,000-service hook share a few ``g``s, their operations cached.

    A target that is T AND R (`_PartSets._product`: T over the header fields above the
    source, which a DNAT writes, R over the others) is decided per image of those fields
    first (`_PartSets.lands`, once per exit), then R at the part's other pins (`_PartSets.low`,
    cached by their values): the exits' parts are not asked one target at a time.

    ``images`` (`_after`'s, when given): per mark, a superset of the packets leaving by the
    exits of that mark. When it lies inside the R of every target it meets (each a product),
    a part whose image is in a target's T is in it whole: the part itself, no set operation
    (`_whole`; the 56,000 exits of a 10,000-service hook, 84,000 parts, are then one `lands`
    each, remembered by the image's /24 and port)."""
    from analyzer.netfilter.setwalk import Part

    out: dict = {k: [] for k, _ in targets}
    sel: dict = {}
    split, splits = pb.pin_split, pb._split
    low_at, op, lands = pb.low, pb.op, pb.lands
    # a part with no pin below the header fields lands in products as its set ANDed with each
    # R: remembered by (the landing's id, the set's node); the landings are kept alive here,
    # their ids unique
    kept: dict = {}  # id of a landing -> (it, whether every target in it is a product there)
    same: dict = {}
    whole: dict = {}  # mark -> `_whole` of its images
    false = pb._false
    for e in exits:
        per = sel.get(e.mark)
        if per is None:
            per = sel[e.mark] = pb.plan([(k, s) for k, s in ((k, t if e.mark is None else t.restrict("mark", e.mark))
                                                             for k, t in targets) if not s.is_empty()])
            whole[e.mark] = _whole(per, None if images is None else images.get(e.mark))
        if not per:
            continue
        fast = whole[e.mark]
        consts = e.consts if translated else ()
        top = land = prev = into = None
        for p in e.parts:
            pins = p.pins
            if into is not None and (pins is prev or pins.get("dst") is prev.get("dst") and pins.get("dport") is
                                     prev.get("dport") and pins.get("proto") is prev.get("proto")):
                # the last part's header pins (the same objects): its image, landing whole as it did
                if p.g._node != false:
                    for k in into:
                        out[k].append(p)
                continue
            prev = pins
            hit = splits.get(id(pins))  # (`pin_split`, its cache looked up here first)
            ptop, plow, was = hit if hit is not None else split(pins)
            if was is not pins:
                ptop, plow, _ = split(pins)
            if ptop != top:  # (the parts of one exit mostly share it)
                top, land = ptop, lands(per, ptop, consts)
                hit = kept.get(id(land))
                if hit is None:
                    hit = kept[id(land)] = (land, all(rest is not None for _, _, rest in land),
                                            None if fast is None else
                                            [k for k, _, _ in land if k not in fast]
                                            if all(rest is not None for k, _, rest in land if k not in fast) else None)
                products, into = hit[1], hit[2]
            if into is not None:
                if p.g._node != false:
                    for k in into:
                        out[k].append(p)  # (its packets' images are in R: p & R is p)
                continue
            if not plow and products:
                key = (id(land), int(p.g._node))
                got = same.get(key)
                if got is None:
                    got = same[key] = []
                    for k, _, rest in land:
                        g = op(p.g, rest)
                        if g is not None:
                            got.append((k, g))
                for k, g in got:
                    # exclusions (fields not pinned) kept: shared, never changed
                    out[k].append(Part(pins, g, p.excl, p.origin))
                continue
            for k, s, rest in land:
                if rest is None:  # not a product at this image: the cofactor at every pin
                    cof = pb.cofactor(s, pb.image(pins, consts), pins, consts)
                elif plow:
                    cof = low_at(rest, plow)
                else:
                    cof = rest
                if cof is None:
                    continue
                g = op(p.g, cof)
                if g is not None:
                    out[k].append(Part(pins, g, p.excl, p.origin))
    return out


def _whole(per, img) -> set | None:
    """When every target of ``per`` (`_PartSets.plan`) either never meets ``img`` (packets
    leaving the hook) or is a product whose R holds all of ``img``, the keys of the former (a
    part of ``img`` in the T of one of the others is in it whole); else None."""
    if img is None:
        return None
    never = set()
    for k, s, prod, _ in per:
        if img.isdisjoint(s):
            never.add(k)
        elif not (prod and img <= prod[1]):
            return None
    return never


#: a fate grouping with at most this many parts checks that they cover the flow (one BDD of
#: all of them)
_CHECKED_CELLS = 2000
#: a group's witness is picked among its first this many parts (all of a small group's)
_WITNESS_CELLS = 256


def _cells(items, pb) -> dict:
    """The input packets by set of fates, as parts: ``{frozenset of fates: [parts or sets]}``,
    from ``items`` ((part, fate): the input packets `_before` found for a fate).

    A packet is in several items only through a statistic rule (one item per world it goes
    on in), and then all of them have the same `setwalk.Part.origin`: an item without origin
    is its own cell, with its one fate. The items of one origin cover it (every world has a
    way out for each of its packets): all of one fate, the origin is the cell; otherwise the
    origin is split by the values its items pin or exclude beyond it (kube-proxy's ``-s EP/32``
    of an endpoint's own chain: the hairpin), one field at most, each value and the rest
    apart, by a partition of their shared sets (`_PartSets.partition`, cached). An origin of
    any other shape is built as sets and split by them."""
    out: dict = {}
    by_origin: dict = {}
    alone: dict = {}  # fate -> its cell's list (a fate's frozenset built once)
    for x, f in items:
        o = x.origin
        if o is None:
            xs = alone.get(f)
            if xs is None:
                xs = alone[f] = out.setdefault(frozenset({f}), [])
            xs.append(x)
        else:
            hit = by_origin.get(id(o))
            if hit is None:
                by_origin[id(o)] = (o, [(x, f)])
            else:
                hit[1].append((x, f))
    from analyzer.netfilter.setwalk import Part

    for o, its in by_origin.values():
        for key, x in _origin_cells(o, its, pb, Part):
            xs = out.get(key)
            if xs is None:
                out[key] = [x]
            else:
                xs.append(x)
    return out


def _origin_cells(o, its, pb, Part, general: bool = False):
    """`_cells` of one origin's items ``its`` ((part, fate), ...): ``[(frozenset of fates, part or set), ...]``
    (``general``: never the shortcut for pinned rows first and one free set, for tests)."""
    f0 = its[0][1]
    for _, f in its:
        if f is not f0 and f != f0:
            break
    else:
        return [(pb.one(f0), Part(o.pins, o.g))]
    extra = set()
    opins = o.pins
    for x, _ in its:
        if x.excl:
            for k in x.excl:
                if len(k) != 1:
                    return pb.split([(pb.union([x]), f) for x, f in its])
                extra.add(k[0])
        if x.pins is not opins:
            extra.update(x.pins.keys() - opins.keys())
    if len(extra) > 1:
        return pb.split([(pb.union([x]), f) for x, f in its])
    if not extra:
        return [(k, Part(opins, g)) for g, k in pb.partition([(x.g, f) for x, f in its])]
    fld = extra.pop()
    # each item as (its set, fate, (its set's node, id of the fate): their key in `partition`,
    # its value of fld as an int or None, the ints it excludes). An item whose set and fate an
    # earlier one in `partition`'s list has changes nothing there (`_PartSets.split`): each
    # list below keeps the first of those only, and asks `at` once for them
    values: dict = {}  # int -> the value, in the order the items give them
    rows = []
    by_value: dict = {}  # int -> the pinned rows' (set, fate, key) of that value, their keys once
    free: dict = {}  # the free rows' key -> (set, fate, the ints every one of them excludes)
    ordered = True  # every pinned row before every free row
    taken, taken_ints = [], set()  # the free rows' excluded values: their sets, as ints
    for x, f in its:
        v = x.pins.get(fld)
        gk = (int(x.g._node), id(f))
        if v is not None:
            vk = int(v)
            values.setdefault(vk, v)
            rows.append((x.g, f, gk, vk, ()))
            ordered = ordered and not free
            at = by_value.get(vk)
            if at is None:
                by_value[vk] = {gk: (x.g, f)}
            elif gk not in at:
                at[gk] = (x.g, f)
        else:
            eks = set()
            xs = (x.excl or {}).get((fld,), ())
            for (v,) in xs:
                vk = int(v)
                values.setdefault(vk, v)
                eks.add(vk)
            rows.append((x.g, f, gk, None, eks))
            taken.append(xs)
            taken_ints |= eks
            hit = free.get(gk)
            free[gk] = (x.g, f, eks if hit is None else hit[2] & eks)
    out = []
    at_ = pb.at
    if ordered and len(free) <= 1 and not general:
        # the pinned rows of a value, then the one free set at it unless every free row
        # excludes the value: the list the loop below makes, without a pass over every row
        (fk, (fg, ff, fex)), = free.items() if free else ((None, (None, None, ())),)
        for vk, v in values.items():
            mine = by_value.get(vk, {})
            at, key = list(mine.values()), list(mine)
            if fk is not None and vk not in fex:
                c = at_(fg, fld, v, vk)
                if c is not None:
                    ck = (int(c._node), fk[1])
                    if ck not in mine:
                        at.append((c, ff))
                        key.append(ck)
            pins = dict(opins)
            pins[fld] = v
            out += [(k, Part(pins, g)) for g, k in pb.partition(at, tuple(key))]
    else:
        for vk, v in values.items():
            at, key = [], []
            seen, asked = set(), set()  # the items' keys in the list; the free rows' keys asked `at`
            for g, f, gk, pk, eks in rows:
                if pk is not None:
                    if pk == vk and gk not in seen:
                        seen.add(gk)
                        at.append((g, f))
                        key.append(gk)
                elif vk not in eks and gk not in asked:
                    asked.add(gk)
                    c = at_(g, fld, v, vk)
                    if c is not None:
                        ck = (int(c._node), gk[1])
                        if ck not in seen:
                            seen.add(ck)
                            at.append((c, f))
                            key.append(ck)
            pins = dict(opins)
            pins[fld] = v
            out += [(k, Part(pins, g)) for g, k in pb.partition(at, tuple(key))]
    # every value apart: (the free rows' sets of them, when they hold them all: their tuples
    # are hashed already)
    excl = {(fld,): set().union(*taken) if len(taken_ints) == len(values) else {(v,) for v in values.values()}}
    for g, k in pb.partition([(g, f) for g, f, _ in free.values()], tuple(free)):
        x = Part(dict(opins), g, excl)
        w = pb.preferred(g)
        # (`_PartSets.left`: its preferred packet is left unless it has one of the values)
        if w is not None and (w[fld] not in values or pb.left(x)):
            out.append((k, x))
    return out


class _PartSets:
    """Sets of the input packets of one exploration as the set walk leaves them
    (`setwalk.Part`s: fields pinned, the rest a set shared by many) and the operations
    `_after` and `_before` need on them, cached: the cofactors of a class's packets at the
    pinned values of an exit's image, the AND of two shared sets, the points a DNAT wrote."""

    def __init__(self, space, family: int):
        self.space = space
        self.family = family
        self._picks: dict = {}  # a set's node -> (its preferred packet, the set): `left`
        self._bit = {"family": 0 if family == 4 else 1}
        self._cof: dict = {}
        self._ops: dict = {}
        self._parts: dict = {}
        self._hulls: dict = {}
        self._products: dict = {}
        self._half: dict = {}
        self._cut = None
        self._member: dict = {}
        self._nets: dict = {}
        self._vars: dict = {}
        self._keep: list = []
        self._split: dict = {}
        self._lows: dict = {}
        self._cuts: dict = {}
        self._addr: dict = {}
        self._wrapped: dict = {}
        self._ones: dict = {}
        self._lands: dict = {}  # (plan's id, protocol, destination >> 8) -> `_by_port`
        self._false = space._false
        self._dst_last = space._last_level["dst"]

    @staticmethod
    def image(pins: dict, consts: tuple) -> dict:
        """The image's pinned values, as ints: ``pins``, the DNAT's ``consts`` written over them
        (the family apart)."""
        vals = {f: int(v) for f, v in pins.items() if f != "family"}
        for f, v in consts:
            vals[f] = int(v)
        return vals

    def cofactor(self, s, vals: dict, pins: dict, consts: tuple):
        """``s`` (no mark) at the image's pinned values ``vals`` (`image` of ``pins`` and
        ``consts``); None when empty."""
        prod = self._products.get(int(s.node))
        if prod is None:
            prod = self._products[int(s.node)] = self._product(s)
        if prod and all(f in vals for f in prod[2] if f != "family"):
            # s = T(header fields above the source) AND R(the others): the image is in T or
            # not (decided once per value of the bits T tests), and then s at it is R
            top, rest, masks = prod
            key = (int(s.node), *(vals.get(f, self._bit["family"]) & m for f, m in masks.items()))
            inside = self._member.get(key)
            if inside is None:
                inside = self._member[key] = self._inside(top, vals)
            if not inside:
                return None
            for f, v in pins.items():
                if f not in _TOP_FIELDS:  # (a DNAT writes only header fields above the source)
                    rest = self.at(rest, f, v)
                    if rest is None:
                        return None
            return rest
        key = (int(s.node), tuple(vals.items()))
        hit = self._cof.get(key, False)
        if hit is not False:
            return hit
        sp = self.space
        objs = {f: v for f, v in pins.items() if f != "family"}
        objs.update(consts)
        node = sp._cofactor(s.node, objs, self.family)
        hit = None if node == sp._false else sp._set(node)
        self._cof[key] = hit
        self._keep.append(s)
        return hit

    def pin_split(self, pins: dict) -> tuple:
        """``pins`` as (the pins of the header fields above the source, the family aside; the
        other pins), each a tuple of (field, value) in the pins' order, and the pins: cached by
        the dict's identity (the parts of one service share theirs; the dict is kept)."""
        hit = self._split.get(id(pins))
        if hit is None or hit[2] is not pins:
            top, low = [], []
            for f, v in pins.items():
                if f not in _TOP_FIELDS:
                    low.append((f, v))
                elif f != "family":
                    top.append((f, v))
            hit = self._split[id(pins)] = (tuple(top), tuple(low), pins)
        return hit

    def plan(self, per) -> list:
        """The targets ``per`` ((key, set), ...) as `lands` asks them: ``[(key, set, product
        or False, the fields its T tests but the family), ...]``."""
        out = []
        for k, s in per:
            prod = self._products.get(int(s.node))
            if prod is None:
                prod = self._products[int(s.node)] = self._product(s)
            if prod:
                out.append((k, s, prod, {f for f in prod[2] if f != "family"}))
            else:
                out.append((k, s, False, None))
        return out

    def lands(self, plan, top: tuple, consts: tuple) -> list:
        """Of the targets ``plan`` (`plan`), those the image of a part with the pins ``top``
        (`pin_split`) and a DNAT's ``consts`` may land in: ``[(key, set, rest), ...]``,
        ``rest`` the set's R (`_product`) when its T holds the image (a part's packets land
        there as R at its other pins), None when the set is not a product at this image (the
        caller takes the cofactor at every pin).

        An image with its protocol, destination and port pinned whose /24 no target's T
        tells apart below its first 24 bits (`_by_port`: the T's remembered first halves,
        `_inside`) lands as every image of that /24 and port: the answer is remembered by
        them (28,000 endpoints in a few hundred /24s, a few ports: one answer for many
        exits; the list is shared, not to be changed)."""
        t = dict(top)
        if consts:
            t.update(consts)  # (what the DNAT wrote over the pins)
        dst, dport, proto = t.get("dst"), t.get("dport"), t.get("proto")
        if dst is not None and dport is not None and proto is not None:
            dst, dport = int(dst), int(dport)
            k1 = (id(plan), int(proto), dst >> 8)
            by_port = self._lands.get(k1)
            if by_port is None:
                by_port = self._lands[k1] = self._by_port(plan, {f: int(v) for f, v in t.items()})
            if by_port is not False:
                got = by_port.get(dport)
                if got is None:
                    got = by_port[dport] = self._lands_at(plan, {f: int(v) for f, v in t.items()})
                return got
        return self._lands_at(plan, {f: int(v) for f, v in t.items()})

    def _by_port(self, plan, vals: dict):
        """A dict to remember `lands` of the images of ``vals``' protocol and /24 by their port,
        when no target of ``plan`` tests the destination's last byte at them (False otherwise).
        Every target's T tests only the protocol, destination and port (`_product`), so with
        those pinned whether an image is in it is the second half of `_inside`, which reads the
        last byte only where the first half's node still tests the destination."""
        for _, _, prod, _ in plan:
            if not prod:
                continue
            mid = self._first_half(prod[0], vals)
            if mid is None or (mid != self._false and mid.level <= self._dst_last):
                return False
        self._keep.append(plan)  # (its id is in the key)
        return {}

    def _lands_at(self, plan, vals: dict) -> list:
        """`lands` at the image ``vals`` (field -> int)."""
        got = []
        for k, s, prod, need in plan:
            if prod and vals.keys() >= need:
                if self._inside(prod[0], vals):
                    got.append((k, s, prod[1]))
            else:
                got.append((k, s, None))
        return got

    def low(self, rest, low: tuple):
        """``rest`` at the pins ``low`` ((field, value), ...; fields below the header ones above
        the source), None when empty: `at`, field by field, the whole cached by the values."""
        if len(low) == 1:  # (at is cached)
            return self.at(rest, *low[0])
        key = (int(rest._node), low)
        hit = self._lows.get(key, False)
        if hit is False:
            hit = rest
            for f, v in low:
                hit = self.at(hit, f, v)
                if hit is None:
                    break
            self._lows[key] = hit
        return hit

    def op(self, a, b):
        """``a & b``, None when empty, cached by the nodes."""
        key = (int(a._node), int(b._node))
        hit = self._ops.get(key)
        if hit is None:
            got = a & b
            hit = self._ops[key] = (got if not got.is_empty() else None, a, b)
        return hit[0]

    def _inside(self, top, vals: dict) -> bool:
        """Whether the image ``vals`` is in ``top`` (a set over the header fields above the
        source): a descent in two halves, each remembered, split after the destination's first
        24 bits, where a class of prefixes and ports stops testing the address: 28,000
        endpoints in a few hundred /24s then share both halves."""
        sp = self.space
        dst = vals.get("dst")
        if dst is None or vals.get("proto") is None:
            return sp._at(top._node, dict(vals, family=self._bit["family"])) != sp._false
        mid = self._first_half(top, vals)
        if mid is None:
            return sp._at(top._node, dict(vals, family=self._bit["family"])) != sp._false
        if mid == sp._false:
            return False
        k2 = (int(mid), dst & 0xFF if mid.level <= sp._last_level["dst"] else None, vals.get("dport"))
        hit = self._half.get(k2)
        if hit is None:
            node = sp._at(mid, dict(vals, family=self._bit["family"]))
            hit = self._half[k2] = (node is not None and node != sp._false, mid)
        return hit[0]

    def _first_half(self, top, vals: dict):
        """`_inside`'s first half: ``top`` descended by the image ``vals`` (its protocol and
        destination given) down to the destination's last 8 bits, remembered by (``top``, the
        protocol, the destination's first 24 bits); None where ``top`` tests a field ``vals``
        does not give above there."""
        k1 = (int(top._node), vals["proto"], vals["dst"] >> 8)
        mid = self._half.get(k1, False)
        if mid is False:
            sp = self.space
            cut = self._cut
            if cut is None:  # the level of the destination's 8th bit from the end (IPv4; IPv6 alike)
                cut = self._cut = sp.bdd.level_of_var(sp._vars["dst"][-8])
            mid = self._half[k1] = sp._at_until(top._node, dict(vals, family=self._bit["family"]), cut)
            self._keep.append(top)
        return mid

    def _product(self, s):
        """``(T, R, {field: mask of the bits T tests})`` when ``s`` is T AND R, T over the header
        fields above the source (family, protocol, destination and its port), R over the
        others; False otherwise (or when T tests no bit: then nothing is saved)."""
        sp = self.space
        if s.is_empty():
            return False
        below = tuple(f for f in sp.fields if f not in _TOP_FIELDS)
        top = s.exists(below)
        rest = sp._set(sp._at(s.exists(_TOP_FIELDS[1:]).node, self._bit))
        if (top & rest) != s:
            return False
        masks: dict = {}
        for v in sp.bdd.support(top.node):
            f, bit = sp._var_bit[v]
            if f in _TOP_FIELDS:  # (and the universe's own constraint, on the conntrack state)
                masks[f] = masks.get(f, 0) | (1 << bit)
        if not masks:
            return False
        self._keep.append(s)
        return top, rest, masks

    def at(self, g, field: str, value, v: int | None = None):
        """``g`` at ``field == value`` (None: empty), cached (``v``: ``int(value)``, when the
        caller has it). An address: the descent through the field in two halves
        (`_addr_at`), each remembered, where it is all ``g`` tests from its root down to the
        field's end."""
        if v is None:
            v = int(value)
        if field == "src" or field == "dst":
            node = self._addr_at(g._node, field, v)
            if node is not None:
                return self._wrap(node)
        key = (int(g._node), field, v)
        hit = self._cof.get(key, False)
        if hit is not False:
            return hit
        sp = self.space
        node = sp._cofactor(g._node, {field: value}, self.family)
        self._keep.append(g)
        hit = self._cof[key] = None if node == sp._false else sp._set(node)
        return hit

    def _wrap(self, node):
        """The set of ``node`` (None: empty), one per node (kept: its id stays its own)."""
        hit = self._wrapped.get(int(node), False)
        if hit is False:
            hit = self._wrapped[int(node)] = None if node == self.space._false else self.space._set(node)
            self._keep.append(node)
        return hit

    def _addr_at(self, node, field: str, v: int):
        """``node`` at the address ``field == v`` by a descent in two halves: its bits but the
        last 8 (remembered by them: endpoints share their /24s), then the last 8 (remembered by
        the node reached, where it still tests them). None when ``node`` tests a field above
        ``field`` (the caller takes `PacketSpace._cofactor`)."""
        sp = self.space
        lev = node.level
        last = sp._last_level[field]
        if lev > last:
            return node
        cut = self._cuts.get(field)
        if cut is None:
            cut = self._cuts[field] = _low_byte_level(sp, field)
        if lev < sp._level[field] or not cut:
            return None
        k1 = (int(node), field, v >> 8)
        mid = self._addr.get(k1)
        if mid is None:
            mid = self._addr[k1] = sp._at_until(node, {field: v}, cut)
            self._keep.append(node)
        if mid.level > last:
            return mid
        k2 = (int(mid), field, v & 0xFF)
        hit = self._addr.get(k2)
        if hit is None:
            hit = self._addr[k2] = sp._at_until(mid, {field: v}, last + 1)
            self._keep.append(mid)
        return hit

    def left(self, x) -> bool:
        """Whether the part ``x`` holds a packet: its set's preferred packet, if its exclusions
        leave it, else its set built (a rest that a statistic rule's worlds pinned entirely,
        e.g. the only protocol of the flow, is no cell)."""
        from analyzer.netfilter.setwalk import _excludes

        w = self.preferred(x.g)
        if w is None:
            return False
        return not _excludes(x.excl, w) or not self.union([x]).is_empty()

    def preferred(self, g) -> dict | None:
        """``g.pick()``, remembered by its node (None: ``g`` is empty)."""
        w = self._picks.get(int(g._node))
        if w is None:
            w = self._picks[int(g._node)] = (g.pick(), g)
        return w[0]

    def one(self, f) -> frozenset:
        """``frozenset({f})``, one per fate (by its id; the fate kept)."""
        hit = self._ones.get(id(f))
        if hit is None or hit[1] is not f:
            hit = self._ones[id(f)] = (frozenset({f}), f)
        return hit[0]

    def partition(self, items, key: tuple | None = None) -> list:
        """The sets ``items`` ((set, fate), ...) cover, split by the fates of the items that
        hold each packet: ``[(set, frozenset of fates), ...]``, cached (the service chains of
        one shape share their sets) by ``key``, the items' (set's node, id of the fate)."""
        if key is None:
            key = tuple([(int(g._node), id(f)) for g, f in items])
        hit = self._parts.get(key)
        if hit is None:  # (the sets and fates kept: their ids are the key)
            hit = self._parts[key] = ([(g, k) for k, g in self.split(items)], items)
        return hit[0]

    def split(self, items) -> list:
        """`partition`, uncached: ``[(frozenset of fates, set), ...]``."""
        cells: dict = {}
        for g, f in items:
            nxt: dict = {}
            rest = g
            for k, c in cells.items():
                inside = c & g
                for kk, part in ((k | {f}, inside), (k, c - inside)):
                    if not part.is_empty():
                        nxt[kk] = nxt[kk] | part if kk in nxt else part
                rest = rest - c
            if not rest.is_empty():
                kk = frozenset({f})
                nxt[kk] = nxt[kk] | rest if kk in nxt else rest
            cells = nxt
        return list(cells.items())

    def forget(self, x, fields: tuple, hull: bool = False):
        """``x`` with ``fields`` free (a Part: unpinned, or quantified out of its ``g``); its
        exclusions dropped (a superset). ``hull``: a pinned address is widened to its prefix
        (HULL_PREFIX bits; the part is then a set), for `_after`'s superset."""
        from analyzer.netfilter.setwalk import Part

        pins = {f: v for f, v in x.pins.items() if f not in fields}
        free = tuple(f for f in fields if f not in x.pins)
        g = x.g.exists(free) if free else x.g
        if hull and any(f in ("src", "dst") for f in pins):
            key = (int(g.node), tuple((f, self._hulled(v) if f in ("src", "dst") else v) for f, v in pins.items()))
            hit = self._hulls.get(key)
            if hit is None:
                sp = self.space
                hit = self._hulls[key] = sp.where(**{f: v for f, v in key[1] if f != "family"}) & sp._set(g.node)
            return hit
        return Part(pins, g)

    def forgotten(self, parts, fields: tuple, hull: bool = False) -> object:
        """``union(forget(x, fields, hull) for x in parts)``, each distinct forgotten part
        (its ``g`` and the pins it keeps, an address hulled by its prefix) built once: the
        84,000 parts of 28,000 endpoints forget into a few."""
        keys: dict = {}  # id(pins) -> the pins kept, hulled, as a key (pins dicts are shared)
        seen: dict = {}  # (g's node, that key) -> a part
        for x in parts:
            pins = x.pins
            pk = keys.get(id(pins))
            if pk is None:
                pk = keys[id(pins)] = (pins, self._kept(pins, fields, hull))
            k = (int(x.g._node), pk[1])
            if k not in seen:
                seen[k] = x
        out = []
        for x in seen.values():
            out.append(self.forget(x, fields, hull))
        return self.union(out)

    def _kept(self, pins: dict, fields: tuple, hull: bool) -> tuple:
        """What `forget` of a part with ``pins`` depends on besides its ``g``, as a key: which
        of ``fields`` are pinned, and the pins kept (an address by its `_hulled` prefix with
        ``hull``)."""
        out = [(f in pins) for f in fields]
        for f, v in pins.items():
            if f in fields:
                continue
            if hull and (f == "src" or f == "dst"):
                v = _prefix_key(v)
            out.append((f, v))
        return tuple(out)

    def _hulled(self, v):
        bits = HULL_PREFIX[v.version]
        key = (v.version, int(v) >> (v.max_prefixlen - bits))
        hit = self._nets.get(key)
        if hit is None:
            hit = self._nets[key] = ipaddress.ip_network((v, bits), strict=False)
        return hit

    def hull(self, consts) -> object:
        """A superset of the points ``consts``: per field, every value written (an address by
        its prefix), in every combination."""
        sp = self.space
        per: dict = {}  # field -> {value, or an address's _prefix_key: a value}
        for c in consts:
            for f, v in c:
                vs = per.get(f)
                if vs is None:
                    vs = per[f] = {}
                vs.setdefault(_prefix_key(v) if f == "src" or f == "dst" else v, v)
        out = sp._u_family[self.family]
        for f, vs in per.items():
            if f == "src" or f == "dst":
                vs = {self._hulled(v): None for v in vs.values()}
            out = out & _union([sp.where(**{f: v}).node for v in vs])
        return sp._set(out)

    def points(self, consts) -> object:
        """The union of the points ``consts`` (((field, value), ...), ...) of this family."""
        from analyzer.netfilter.setwalk import _point_node

        sp = self.space
        node = _union([_point_node(sp, dict(c), sp._true) for c in consts]) if consts else sp._false
        return sp._set(node & sp._u_family[self.family])

    def pick(self, items, prefer: dict) -> dict:
        """``self.union(items).pick(prefer)``, without building the exclusions of a part that
        excludes many points (`_many_excluded`) when its own preferred packet is not excluded:
        the preferred packet of a union is the preferred one among its pieces' own."""
        from analyzer.netfilter.setwalk import Part, _excludes

        many = [x for x in items if isinstance(x, Part) and _many_excluded(x)]
        if not many:
            return self.union(items).pick(prefer)
        best = [self.union([x for x in items if not (isinstance(x, Part) and _many_excluded(x))])]
        for x in many:
            v = self.union([Part(x.pins, x.g, None, x.origin)]).pick(prefer)
            if v is None:
                continue  # (an empty part)
            if _excludes(x.excl, v):
                return self.union(items).pick(prefer)  # its preferred packet is excluded: build it
            best.append(self._packet(v))
        return _union(best).pick(prefer)

    def _packet(self, v: dict):
        """The one packet ``v`` (a pick: every field's value) as a set."""
        from analyzer.netfilter.setwalk import _point_node

        sp = self.space
        mk = ipaddress.IPv4Address if self.family == 4 else ipaddress.IPv6Address
        vals = {f: (mk(x) if f in ("src", "dst") else x) for f, x in v.items() if f != "family"}
        return sp._set(_point_node(sp, vals, sp._true) & sp._u_family[self.family])

    def union(self, items) -> object:
        """The set of packets of ``items`` (Parts and sets): the parts by `setwalk._materialize`."""
        from analyzer.netfilter.setwalk import Part, _materialize

        parts, node = [], self.space._false
        for x in items:
            if isinstance(x, Part):
                parts.append(x)
            else:
                node = node | x.node
        return self.space._set(node | _materialize(self.space, parts).node)


def _low_byte_level(sp, field: str) -> int:
    """The level of ``field``'s first bit of its last 8 (bit 7), 0 when the space does not
    order the field's bits from the most significant down (no two-halves descent then)."""
    levels = [(sp.bdd.level_of_var(v), sp._var_bit[v][1]) for v in sp._vars[field]]
    if [b for _, b in sorted(levels)] != sorted((b for _, b in levels), reverse=True):
        return 0
    return min(lev for lev, b in levels if b < 8)


def _explore_protos(universe, make, walk, limit, prefer, fixed, spec, progress):
    """`explore`, one protocol kind at a time when the protocol is open (the walk builds
    ports, ICMP types and TCP flags from it)."""
    if "proto" not in spec.open:
        return explore(universe, make, walk, limit, prefer, fixed, progress)
    space = universe.space
    classes, rest = [], universe
    while not rest.is_empty() and len(classes) < limit:
        p = rest.pick(prefer)["proto"]
        part = rest & proto_class(space, p)
        base = len(classes)
        got, left = explore(part, make, walk, limit - len(classes), prefer, fixed,
                            None if progress is None else (lambda n: progress(base + n)))
        classes += got
        rest = (rest - part) | left
        if not left.is_empty():
            break
    return classes, rest


def outcome_kind(g: Group, translations: bool = False) -> str:
    """A group's outcomes in a few words, for the summary (``forwarded, reply as dialled``);
    with ``translations`` (groups by fate, which tell them apart) whether the connection was
    translated here too (``forwarded, DNAT+SNAT, reply as dialled``)."""
    parts = []
    for o in g.outcomes:
        word = o.disposition or "?"
        if translations:
            nat = "+".join(w for w, on in (("DNAT", o.forward.ct.dnat), ("SNAT", o.forward.ct.snat)) if on)
            word += f", {nat}" if nat else ""
        if o.reply_ok is True:
            word += ", reply as dialled"
        elif o.reply_ok is False:
            word += ", reply NOT as dialled"
        elif o.reply is not None and o.client_sees is None:
            word += f", reply {o.reply.disposition}"
        if word not in parts:
            parts.append(word)
    return " | ".join(parts)


def tally(groups, findings=None, translations: bool = False) -> list[tuple[str, bool, int, int, int]]:
    """Per kind of outcome (`outcome_kind`, and whether APPROXIMATE): how many classes and groups
    end that way and how many of those groups have findings, most classes first."""
    t: dict = {}
    for k, g in enumerate(groups):
        key = (outcome_kind(g, translations), g.is_approximate)
        c = t.setdefault(key, [0, 0, 0])
        c[0] += g.classes
        c[1] += 1
        if findings is not None and findings[k]:
            c[2] += 1
    order = sorted(t.items(), key=lambda kv: (-kv[1][0], kv[0][0] + (" [APPROXIMATE]" if kv[0][1] else "")))
    return [(kind, approx, nc, ng, nf) for (kind, approx), (nc, ng, nf) in order]


def summary_lines(groups, findings=None, translations: bool = False) -> list[str]:
    """One line per kind of outcome: how many classes and groups end that way (most first)."""
    return [f"  {nc:>7,} class(es) in {ng:,} group(s): {kind}" + (" [APPROXIMATE]" if approx else "")
            + (f"  ({nf:,} group(s) with findings)" if nf else "")
            for kind, approx, nc, ng, nf in tally(groups, findings, translations)]


def _plain(pkt: Packet) -> Packet:
    """The witness without its concolic tags (for reports and JSON)."""
    from dataclasses import replace

    from analyzer.engine.concolic import plain

    def addr(a):
        return a if a is None or type(a) in (ipaddress.IPv4Address, ipaddress.IPv6Address) \
            else ipaddress.ip_address(plain(a._ip)) if a.version == 4 else ipaddress.IPv6Address(plain(a._ip))
    return replace(pkt, proto=plain(pkt.proto), src=addr(pkt.src), dst=addr(pkt.dst),
                   sport=plain(pkt.sport), dport=plain(pkt.dport), iif=plain(pkt.iif),
                   **{f: plain(getattr(pkt, f)) for f in OPEN_INTS})


def _addr_text(lo: int, hi: int, family: int) -> str:
    mk = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    a, b = mk(lo), mk(hi)
    if a == b:
        return str(a)
    nets = list(ipaddress.summarize_address_range(a, b))
    if len(nets) == 1:
        return str(nets[0])
    return f"{a}-{b}"


def _iface_text(rs, space) -> str:
    """Interface ids as names: ids no rule or address names are "other" interfaces."""
    from analyzer.engine.packetset import IFACE_NONE, IFACE_OTHER

    ids = {i for lo, hi in rs for i in range(lo, hi + 1)}
    known = space._iface_by_id  # id -> (name or wildcard prefix, is wildcard)
    if ids >= set(range(1, 256)):
        return "any"
    names = [("other " + n + "+") if wild else n for i, (n, wild) in sorted(known.items()) if i in ids
             for n, wild in [(n, wild)]]
    if IFACE_NONE in ids:
        names.insert(0, "none")
    if ids - set(known) - {IFACE_NONE}:
        names.append("any other" if IFACE_OTHER in ids else "other")
    return ", ".join(names)


def describe(packets, spec: FlowSpec, space) -> str:
    """The open fields of ``packets`` as ranges and prefixes (``src 10.0.0.0/8; dport 80``).
    Each field is listed on its own: a group is not always every combination of them. A part
    of the flow whose every field on its own takes every value the flow allows (every protocol
    and port but TCP port 80) is said by what it leaves out, when that is every combination of
    its fields (``every packet of the flow except: proto tcp; dport 80``), else as the packets
    no other group holds (the rest said field by field would leave out packets it holds)."""
    flow = flow_set(space, spec)
    fields = [f for f in spec.open if f in space.fields]
    text = _fields_text(packets, spec, space)
    if text and any(_project(packets, f) != _project(flow, f) for f in fields):
        return text
    rest = flow - packets
    if rest.is_empty():
        return "every packet of the flow"
    box = flow
    for f in fields:
        box = box & _project(rest, f)
    if box == rest:
        # the fields the rest takes every value of say nothing about it
        other = _fields_text(rest, spec, space, {f for f in fields if _project(rest, f) == _project(flow, f)})
        if other:
            return f"every packet of the flow except: {other}"
    return "every packet of the flow that no other group holds"


def describe_group(g: Group, spec: FlowSpec, space) -> str:
    """`describe` of a group's packets; a fate group's read from the set walk's parts, its set
    built only when they cannot say it (describe_parts: the same text, without the seconds a
    group of 10,000 services' set takes to build and project)."""
    parts = g.__dict__.get("_parts")
    if parts is None:
        return describe(g.packets, spec, space)
    from analyzer.describe_parts import describe_parts

    return describe_parts(parts, spec, space, lambda: g.packets)


def _project(s, f: str):
    """``s.project(f)`` as `describe` uses it (compared with another's, ANDed with the flow's
    packets): an IPv4 set's fields other than ``f`` quantified as they are, its high address
    bits left free, where `PacketSet.project` first pins them (its representative form:
    rebuilding a set of tens of thousands of nodes, for each field). The same answers: two
    such projections are equal when the values are, and the flow (IPv4) meets them alike."""
    sp = s.space
    if f == "ctstate" or (s.node & sp._fam[6]) != sp._false:
        return s.project(f)
    others = tuple(n for g in sp.fields if g != f for n in sp._vars[g])
    return sp._set(sp._exist(others, s.node) & sp._u)


def _fields_text(packets, spec: FlowSpec, space, skip=frozenset(), view=None) -> str:
    """`describe` field by field (but ``skip``): '' when each open field takes every value.
    ``view`` (describe_parts.Projections) gives the fields' values instead of ``packets``."""
    t = spec.template
    parts = []
    for f in ("proto", "src", "sport", "dst", "dport", "iif", *OPEN_INTS):
        if f not in spec.open or f in skip:
            continue
        if f in ("mark", "connmark", "tcp_flags", "ctstate"):
            text = _masks_text(packets if view is None else view.values(f), f, spec)
            if text:
                parts.append(f"{f} {text}")
            continue
        rs, complete = intervals(packets, f, SHOWN_RANGES) if view is None else view.intervals(f, SHOWN_RANGES)
        if f == "proto":
            if rs == [(0, 255)]:
                continue
            text = ", ".join(PROTO_NAME.get(lo, str(lo)) if lo == hi else f"{lo}-{hi}" for lo, hi in rs)
        elif f in ("src", "dst"):
            full = (0, (1 << (32 if t.family == 4 else 128)) - 1)
            text = ", ".join(_addr_text(lo, hi, t.family) for lo, hi in rs)
            if rs == [full]:
                text = "any"
        elif f == "iif":
            text = _iface_text(rs, space)
        else:
            if rs == [(0, 65535)]:
                continue
            text = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in rs)
        if not complete:
            text += ", ... (more)"
        parts.append(f"{f} {text}")
    return "; ".join(parts)


def _masks_text(packets, f: str, spec) -> str:
    """A mark, TCP flags or conntrack state field of ``packets`` as value/mask pairs (what
    ``-m mark --mark V/M`` and ``--tcp-flags`` test), or state names; '' when any value."""
    from analyzer.engine.packetset import TCP_FLAG_BITS

    if f == "ctstate":
        names = [n for n in spec.ctstate if not (packets & packets.space.eq("ctstate", CT_INPUT[n])).is_empty()]
        return "" if len(names) == len(spec.ctstate) else ",".join(n for n in names)
    cubes, complete = masks(packets, f, SHOWN_RANGES)
    if cubes == [(0, 0)]:
        return "any" if f != "tcp_flags" else ""
    # the complement within the values the flow allows, when it says it in fewer words
    allowed = flow_set(packets.space, spec).exists([g for g in packets.space.fields if g != f])
    other, other_complete = masks(allowed - packets.exists([g for g in packets.space.fields if g != f]),
                                  f, SHOWN_RANGES)
    if other_complete and not other:
        return ""  # every value the flow allows
    neg = other_complete and (not complete or len(other) < len(cubes))
    if neg:
        cubes, complete = other, other_complete
    if f == "tcp_flags":
        def names(bits):
            return ",".join(n for n, b in TCP_FLAG_BITS.items() if bits & b) or "NONE"
        text = ", ".join(names(v) if m == 0xFF else f"{names(v)} of {names(m)}" for v, m in cubes)
    else:
        text = ", ".join(f"{v:#x}" if m == 0xFFFFFFFF else f"{v:#x}/{m:#x}" for v, m in cubes)
    text += "" if complete else ", ... (more)"
    return f"any but {text}" if neg else text


def witness_extras(w: Packet, spec) -> str:
    """The witness's values of the open fields beyond the tuple (`` mark 0x4000 ctstate NEW``)."""
    from analyzer.model.packet import tcp_flag_names

    out = ""
    for f in OPEN_INTS:
        if f not in spec.open:
            continue
        v = getattr(w, f)
        if f == "ctstate":
            out += " ctstate " + next((n for n, b in CT_INPUT.items() if b == v), str(v))
        elif f == "tcp_flags":
            out += f" flags {tcp_flag_names(v)}"
        elif f in ("mark", "connmark"):
            out += f" {f} {v:#x}"
        else:
            out += f" {f} {v}"
    return out


#: how the header names each grouping (OpenResult.by)
GROUPED_BY = {"fate": "by fate", "path": "by rules crossed"}


def render_groups(spec: FlowSpec, groups, complete: bool, where: str, shown: int | None = None,
                  limit: int | None = None, unexplained: Packet | None = None, findings=None,
                  by: str = "path", fallback: str | None = None, classes: int | None = None) -> str:
    """The groups as text: how they are grouped (``by``, and why not by fate when it was asked:
    ``fallback``), a summary by kind of outcome, then the first ``shown`` groups with their
    traces (None: all), and what was left out, said plainly. ``classes``: how many classes were
    explored (default: the groups' sum, which is that count when grouped by path)."""
    from analyzer.explain import render_text

    n = sum(g.classes for g in groups) if classes is None else classes
    out = [f"flow: {spec.text()} ({where}); open: {', '.join(sorted(spec.open))}",
           f"{len(groups):,} group(s) {GROUPED_BY[by]} over {n:,} class(es) of packets" + ("" if complete else
           f" (APPROXIMATE: stopped at the limit of {limit or n:,} classes (--max-classes); the remaining "
           f"packets are not explained" + (f", e.g. {unexplained.tuple_str()}" if unexplained else "") + ")")]
    if fallback:
        out.append(f"grouped by rules crossed, not by fate: {fallback}")
    out += [f"assumes: {a}" for a in (groups[0].assumes if groups else [])]
    if len(groups) > 1:
        # grouped by fate, a class counts in every group one of whose fates is its own
        shared = sum(g.classes for g in groups) != n
        out += ["by outcome" + (" (a class counts in every group that has its fate)" if shared else "") + ":",
                *summary_lines(groups, findings, by == "fate")]
    out.append("")
    show = groups if shown is None else groups[:shown]
    for k, g in enumerate(show, 1):
        out.append(f"=== group {k}: {g.description}  (witness {g.witness.tuple_str()}"
                   + (f" iif {g.witness.iif}" if "iif" in spec.open and g.witness.iif else "")
                   + witness_extras(g.witness, spec) + ")")
        for r in g.approximate:
            out.append(f"APPROXIMATE: the classes of this group may be too wide: {r}")
        out.append(render_text(g.witness, g.outcomes, where).rstrip())
        out.append("")
    if len(show) < len(groups):
        rest = groups[len(show):]
        out.append(f"... {len(rest):,} more group(s) ({sum(g.classes for g in rest):,} class(es)) not shown "
                   f"(--show-groups N shows more, 0 all; -o json lists every group)")
    return "\n".join(out).rstrip() + "\n"
