"""Netfilter layer: a table traversal over a *set* of packets.

The concolic walk (symbolic.py) explores an open flow path by path: one class of packets per
path, so a 10,000-service dump's fan-out (kube-proxy's KUBE-SERVICES, one chain per service and
endpoint) makes one class per service and endpoint, each walked on its own. This walk carries
the whole set instead: each rule splits it (``S & match``, ``S - match``), a jump runs the called
chain on the part that matched and the part that comes back joins the rest, a statistic
branch splits the world (both parts, each with its probability), MARK rewrites the mark of the
part that matched (kept per thread: the flow's mark is fixed), and DNAT to one address (and
port) ends the table with that part's destination rewritten (`Exit.consts`). Two uses:

- `SetWalker.hook`: the PREROUTING hook for a connection's first packet. Each way out is an
  `Exit`: the input packets that take it, the packets as they leave, and what the hook did;
  symbolic.explain_fate explores the packets after the hook concolically and groups the input
  packets by fate.
- `SetWalker.table` with ``effects=False``: one table traversal after the hook, decided for
  every packet at once by how it leaves the table (symbolic.RecordingWalker._summary).

It models only what it can follow exactly, in the walk's semantics (walk.Walker._match and
_apply_target): header matches (addresses, iprange, protocol, ports, addrtype with the
namespace's addresses, via `symbolic.match_header`), ``-i``/``-o`` against known interfaces,
``-m mark``, ``-m statistic --mode random``, ``-m recent`` (RECENT_ASSUMPTION),
``--tcp-flags``/``--icmp-type`` and ``--ctstate`` with known values, comments; jumps, gotos,
RETURN, ACCEPT, DROP, REJECT, policies, MARK, and DNAT to a single address and port; a rule
whose target changes nothing (none, LOG, ...) is skipped whatever it matches. Anything else
raises `Unsupported`, and the caller walks path by path as before: a set walk never guesses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from analyzer.model.rules import (
    AddrMatch, AddrTypeMatch, CommentMatch, CtStateMatch, IcmpMatch, IfaceMatch, IpRangeMatch, Jump, MarkMatch, Nat,
    OpaqueMatch, OtherTarget, PortMatch, ProtoMatch, Reject, SetMark, StatisticMatch, TcpFlagsMatch, Verdict,
)
from analyzer.model.packet import PORT_PROTOS
from analyzer.parse import options as O
from analyzer.netfilter import stages as STAGES

#: how deep chains may call each other before the set walk gives up (the kernel refuses loops)
MAX_DEPTH = 64


class Unsupported(Exception):
    """The set walk cannot follow this rule exactly (the caller explores path by path)."""


@dataclass(slots=True)
class Thread:
    """Packets travelling together in one world: ``packets`` as they are now, ``prob`` the
    probability of the statistic branches that led here (1.0: every packet goes this way)."""

    packets: object
    prob: float = 1.0
    # the packet mark of every packet of the thread, when the flow's mark is fixed (then MARK
    # and -m mark are decided per thread, without a set operation); None: the mark is an open
    # input field of ``packets``
    mark: int | None = None
    dnat: tuple | None = None  # (input parts, constants written): the DNAT that ended the nat table


class Part:
    """Packets with ``pins`` (fields fixed to one value each: ``{field: value}``, the value as
    `PacketSpace.where` takes it, ``family`` as 4 or 6) whose other fields are ``g``, a set that
    does not depend on the pinned fields (their cofactor). A thread's packets are a tuple of
    disjoint parts: a rule's ``-d IP/32 -p tcp --dport N`` pins three fields by one descent
    (`PacketSpace._at`) where a set operation would build and AND a cube, and the 10,000 service
    chains behind kube-proxy's KUBE-SERVICES then share their other fields' sets (one node each:
    "source in 10.0.0.0/8", "not a pod"), whose operations are cached (`SetWalker._op`).

    ``excl``: points excluded from the part, ``{fields: {values, ...}}``: the packets that the
    earlier rules of a run of one-point rules took (their jumps may return packets, as parts
    of their own), kept as a lookup until a rule needs the set (`SetWalker._flush`). Only a
    part in a chain's list of packets still going on has them; a part with exclusions is
    never in two threads (the walk hands it from one rule's misses to the next).

    ``origin``: the part as it was before the first statistic rule that split it between worlds
    (None: it was never split). The same input packet is in several worlds only through such a
    split, so parts of different origins (or none) are disjoint, and a packet's fates are
    those of the parts of one origin (symbolic._cells)."""

    __slots__ = ("pins", "g", "excl", "origin")

    def __init__(self, pins: dict, g, excl: dict | None = None, origin: "Part | None" = None):
        self.pins = pins
        self.g = g
        self.excl = excl
        self.origin = origin


class Exit:
    """One way through the hook: ``before`` the input packets that take it (over the fields
    as they arrived), ``after`` the same packets as they leave the hook, except their packet
    mark, which is ``mark`` for all of them (None: the mark is an open input field, unchanged,
    in ``after``), ``prob`` the share of their connections that go this way, ``action``: None
    (the packet goes on) or how it ended ("DROP", "REJECT ..."); ``dnat``: whether a DNAT
    changed the destination on the way, ``consts`` what it wrote ((field, value), ...). ``prob``
    is informative only: two statistic worlds that join again (a statistic jump to a chain that
    returns) travel as one thread of their common probability. Translated: then
    ``after`` is None, the packets being ``before`` with those fields rewritten
    (``before.assign_all(consts)``, not built: the caller takes them together).

    ``parts``: ``before`` as the set walk carries it (`Part`s, in ``space``); ``before`` is built
    from them on first use (a 10,000-service hook has 56,000 exits, and a caller that reads
    their parts builds none)."""

    __slots__ = ("_before", "parts", "space", "prob", "action", "dnat", "consts", "mark")

    def __init__(self, parts: tuple, space, prob: float, action: str | None, dnat: bool, consts: tuple = (),
                 mark: int | None = None):
        self._before = None
        self.parts = parts
        self.space = space
        self.prob, self.action, self.dnat, self.consts, self.mark = prob, action, dnat, consts, mark

    @property
    def before(self):
        """The input packets of ``parts``, as one set."""
        if self._before is None:
            self._before = _materialize(self.space, self.parts)
        return self._before

    @property
    def after(self):
        return None if self.dnat else self.before

    def image(self):
        """The packets as they leave the hook (``after``, built for a translated exit), their
        mark aside (``mark``)."""
        return self.after if not self.dnat else self.before.assign_all(self.consts)

    def __repr__(self) -> str:
        return (f"Exit(prob={self.prob}, action={self.action!r}, dnat={self.dnat}, consts={self.consts}, "
                f"mark={self.mark}, parts={None if self.parts is None else len(self.parts)})")


def _materialize(space, parts) -> object:
    """The set of packets of ``parts``: their fixed values (less their exclusions) united per
    shared ``g`` first, by a left fold (each OR walks only the new cube's path), then ANDed
    with it once; parts with the same values and set count once (the exits of one service's
    endpoints share them)."""
    groups: dict = {}
    for p in parts:
        hit = groups.setdefault((int(p.g.node), p.pins["family"]), (p.g, {}))
        excl = () if not p.excl else tuple((k, frozenset(v)) for k, v in p.excl.items())
        hit[1][(tuple(p.pins.items()), excl)] = p
    node = space._false
    for (_, fam), (g, ps) in groups.items():
        acc = space._false
        for p in ps.values():
            pt = _point_node(space, p.pins, space._true)
            if p.excl:
                pt = pt & ~_points_node(space, p.excl)
            acc = acc | pt
        node = node | (g.node & acc & space._fam[fam])
    return space._set(node)


def _points_node(space, excl: dict):
    """The OR of the points of an exclusion lookup (``{fields: {values, ...}}``), each key's
    points in the order of their values from the deepest down (each OR then adds a path beside
    the last one: ~1.4x faster than in a set's order for 11,000 points)."""
    node = space._false
    level = space._level
    for key, values in excl.items():
        order = sorted(range(len(key)), key=lambda i: level[key[i]])
        for vs in sorted(values, key=lambda vs: tuple(int(vs[i]) for i in order), reverse=True):
            node = _point_node(space, dict(zip(key, vs)), space._true) | node
    return node


def _excludes(excl: dict, v: dict) -> bool:
    """Whether the exclusion lookup ``excl`` (`Part.excl`) takes out the packet ``v`` (a pick:
    field -> int)."""
    for fields, values in excl.items():
        if len(fields) == 1:  # (an endpoint's own source: one field, one value)
            at = v[fields[0]]
            for (x,) in values:
                if int(x) == at:
                    return True
            continue
        at = tuple(v[f] for f in fields)
        if len(values) > 64:  # (kube-proxy's 11,000 service points: their ints, hashed once)
            hit = _INT_POINTS.get(id(values))
            if hit is None or hit[0] is not values or hit[1] != len(values):
                if len(_INT_POINTS) >= 16:
                    _INT_POINTS.clear()
                hit = _INT_POINTS[id(values)] = (values, len(values), {tuple(map(int, vs)) for vs in values})
            if at in hit[2]:
                return True
        elif any(tuple(map(int, vs)) == at for vs in values):
            return True
    return False


#: id(an exclusion lookup's values) -> (the values, how many, their ints): `_excludes` of a big
#: lookup. An exclusion only ever grows (`SetWalker._exclude`), so its size says it is unchanged;
#: the values are kept (their id stays theirs). Bounded: cleared past 16 lookups.
_INT_POINTS: dict = {}


def _remarked(mark: int, marks) -> int:
    """``mark`` after MARK's rewrites ``((mask, value), ...)`` in order: the kernel's
    ``new = (old & ~mask) ^ value`` (xt_MARK; `SetMark`)."""
    for mask, value in marks:
        mark = ((mark & ~mask) ^ value) & 0xFFFFFFFF
    return mark


def _verdict_action(t):
    """How a rule's target ends a packet, as the set walk says it (None: ACCEPT, "DROP",
    "REJECT ..."); False for any other target."""
    if isinstance(t, Reject):
        return f"REJECT {t.with_}"
    if isinstance(t, Verdict) and t.verdict in ("ACCEPT", "DROP"):
        return None if t.verdict == "ACCEPT" else "DROP"
    return False


def _or_all(space, nodes: list):
    """The OR of ``nodes``, pairwise."""
    if not nodes:
        return space._false
    while len(nodes) > 1:
        nodes = [nodes[i] | nodes[i + 1] if i + 1 < len(nodes) else nodes[i] for i in range(0, len(nodes), 2)]
    return nodes[0]


def _point_node(space, values: dict, node):
    """``node`` AND the cube of ``values`` (field -> value as `PacketSpace.where` takes it; a
    ``family`` entry is skipped: the caller has it), built bottom-up from the space's cached
    8-bit pieces (no family constraint: an IPv4 address is its low 32 bits)."""
    level = space._level
    for f in sorted(values, key=level.__getitem__, reverse=True):
        if f == "family":
            continue
        v = values[f]
        if f in ("src", "dst"):
            node = space._bits(f, 96, 32, int(v), node) if v.version == 4 else space._bits(f, 0, 128, int(v), node)
        else:
            node = space._bits(f, 0, space.widths[f], v, node)
    return node


class SetWalker:
    """Set walks of the tables of one hook, for the packets of one flow (``space``): the
    namespace ``ns`` gives addrtype's local addresses; ``iif`` is the flow's input interface
    when it is fixed (``-i`` is then decided once), None when it is an open field (then
    `Unsupported`); ``mark`` the flow's fixed packet mark (None: open, then MARK is
    `Unsupported`: the input mark would be lost)."""

    def __init__(self, ruleset, ns, space, family: int, iif: str | None, mark: int | None,
                 backend: str | None = None, *, oif: str | None = None, ctstates: frozenset | None = None,
                 effects: bool = True, tcp_flags: int | None = None, icmp: tuple | None = None,
                 shared: dict | None = None):
        self.rs = ruleset
        self.ns = ns
        self.space = space
        self.family = family
        self.iif = iif
        self.mark = mark
        self.backend = backend if backend is not None else getattr(ruleset, "backend", None)
        self._sets: dict = {}
        # what depends on the packets' space, family and namespace only (header matches,
        # points, set operations): ``shared`` by every set walk of one exploration (the table
        # summaries of symbolic.RecordingWalker are dozens of walks over the same chains)
        key = (id(space), family, id(ns))
        hit = shared.get(key) if shared is not None else None
        if hit is None or hit[-1] is not space:
            hit = ({}, {}, {}, {}, {}, {}, [], {}, space)
            if shared is not None:
                shared[key] = hit
        self._headers, self._ports, self._memo, self._points, self._support, self._at_memo, self._keep, \
            self._witness, _ = hit
        self.recent_assumed = False  # a -m recent match was decided under walk.RECENT_ASSUMPTION
        # what a table summary (symbolic.RecordingWalker) knows of the packets for sure: the
        # output interface, the conntrack states the rules see; ``effects`` False: a rule that
        # would change a packet (MARK, DNAT) or split the world (statistic) is Unsupported
        self.oif = oif
        self.ctstates = ctstates
        self.effects = effects
        # the flow's fixed TCP flags, and ICMP (type, code) of its ICMP packets: --tcp-flags and
        # --icmp-type are then decided once (None: not known, Unsupported)
        self.tcp_flags = tcp_flags
        self.icmp = icmp
        self._full_set = space.universe()  # a match that holds for every packet
        self._full = self._full_set.node
        self._shapes: dict = {}  # id(chain) -> its endpoint shape or None (`_endpoint_shape`)
        self._marks: dict = {}  # id(chain) -> its MARK rewrites or None (`_marks_only`)
        self._addrs: dict = {}  # dotted quads read from lines (_line_address)
        self._probs: dict = {}  # statistic probabilities read from lines (_statistic_line)
        self._jumps: dict = {}  # jumps read from lines (_jump)

    # ------------------------------------------------------------------ the hook
    def hook(self, universe, hook: str, ct_in_use: bool) -> list[Exit]:
        """Every way through ``hook`` for the packets of ``universe`` (a connection's first
        packet, state NEW: the caller checks that the conntrack lookup decides it alike for all
        of them)."""
        threads = [Thread(self._parts(universe), 1.0, self.mark)]
        ended: list[Thread] = []
        ends: list[str] = []
        for stage in STAGES.stages(hook, self.backend):
            table = stage.table
            if table is None or self.rs.chain(table, hook) is None:
                continue  # the conntrack lookup (decided by the caller), or a table without this hook
            if table == "nat" and not ct_in_use:
                continue  # no conntrack entry: the nat hooks pass every packet untouched
            nxt = []
            for th in threads:
                if th.dnat is not None:
                    # the set is over the translated header from here on: what the input
                    # packets were is only known as a whole (Exit.before), not split again
                    raise Unsupported(f"{table} {hook} after a DNAT in the same hook")
                for t, action in self._first_packet_table(th, table, hook):
                    if action is None:
                        nxt.append(t)
                    else:
                        ended.append(t)
                        ends.append(action)
            threads = nxt
        out = [self._exit(t, None) for t in threads]
        out += [self._exit(t, a) for t, a in zip(ended, ends)]
        return [e for e in out if e.parts]

    def _first_packet_table(self, th: Thread, table: str, hook: str):
        """`table` for a connection's first packet in the hook: the conntrack states its rules
        see are known (walk.Walker._ctstates): none yet in raw (it runs before the conntrack
        lookup: INVALID), NEW after it."""
        known = self.ctstates
        self.ctstates = frozenset({"INVALID"}) if table == "raw" else frozenset({"NEW"})
        try:
            return self._table(th, table, hook)
        finally:
            self.ctstates = known

    def _exit(self, t: Thread, action: str | None) -> Exit:
        if t.dnat is None:
            return Exit(t.packets, self.space, t.prob, action, False, (), t.mark)
        before, consts = t.dnat
        return Exit(before, self.space, t.prob, action, True, consts, t.mark)

    # ------------------------------------------------------------------ one table
    def table(self, th: Thread, table: str, hook: str) -> list[tuple[Thread, str | None]]:
        """The threads leaving the builtin chain ``hook`` of ``table``: (thread, None) goes on
        to the next table, (thread, action) ended here. ``th.packets`` is a `PacketSet`, and
        so are the packets of the threads returned."""
        sp = self.space
        th = Thread(self._parts(th.packets), th.prob, th.mark, th.dnat)
        return [(Thread(_materialize(sp, t.packets), t.prob, t.mark, t.dnat), a)
                for t, a in self._table(th, table, hook)]

    def _table(self, th: Thread, table: str, hook: str) -> list:
        chain = self.rs.chain(table, hook)
        out: list = []
        back = self._chain([th], table, hook, chain, out, 0)
        pol = chain.policy or "ACCEPT"
        for t in back:  # off the end of the builtin chain, or RETURN there: the policy
            out.append((t, None if pol == "ACCEPT" else pol))
        done = []
        for t, a in out:
            parts = self._settled(t.packets)
            if parts:
                # (a translated thread's input packets are its DNAT's: settled alike)
                done.append((t if parts is t.packets else
                             Thread(parts, t.prob, t.mark, None if t.dnat is None else (parts, t.dnat[1])), a))
        return done

    def _chain(self, threads: list, table: str, hook: str, chain, out: list, depth: int) -> list:
        """Run ``chain`` on ``threads``; returns the threads that come back to the caller
        (RETURN or the end of the chain); threads that end (verdict, NAT) go to ``out``."""
        if depth > MAX_DEPTH:
            raise Unsupported(f"chains nested deeper than {MAX_DEPTH} (a loop?)")
        endpoints = self.effects and self.mark is not None and table == "nat" and hook in ("PREROUTING", "OUTPUT")
        if endpoints:
            done = self._endpoint(threads, chain, table, out)
            if done is not None:
                return done
        back: list = []
        rules = chain.rules
        k, n = 0, len(rules)
        while k < n:
            rule = rules[k]
            k += 1
            if not threads:
                break
            got = None
            if self.effects and rule.pending is not None:
                # not decoded yet: kube-proxy's endpoint rule or service rule read from its line
                # (`_statistic_line`, `_point_line`)
                if " --dport " in rule.text:
                    line = self._point_line(rule, table, hook)
                    if line is not None:
                        got = self._split_by(line[0], threads)
                        t, callee = line[1], line[2]
                else:
                    line = self._statistic_line(rule, table)
                    if line is None and self._rcheck_line(rule, table):
                        # kube-proxy's session affinity: no entry yet (walk.RECENT_ASSUMPTION),
                        # the rule matches no packet, as `_compile` decides it
                        self.recent_assumed = True
                        continue
                    if line is not None:
                        if endpoints and depth < MAX_DEPTH:
                            rest = self._endpoint(threads, line[2], table, out, line[0])
                            if rest is not None:
                                threads = rest  # (kube-proxy's endpoint rule and chain at once)
                                continue
                        got = self._split_prob(line[0], threads)
                        t, callee = self._jump(line[1]), line[2]
            if got is None:
                callee = None
                t = rule.target
                if t is None or (isinstance(t, OtherTarget) and not t.terminating):
                    # no target, LOG and the like: every packet goes on as it was, matched or not
                    # (the walk changes nothing for them either): what the rule matches is moot
                    continue
                if not self.effects:
                    run = self._verdict_run(rules, k - 1, hook)
                    if run is not None:
                        # a run of rules with one verdict (kube-proxy's 500 DROPs of
                        # KUBE-EXTERNAL-SERVICES): their packets at once, by the union of their
                        # matches (a table summary ORs the packets of one verdict anyway)
                        end, m, action = run
                        hit, threads = self._split_by((False, {}, m, 1.0, None), threads)
                        out.extend((h, action) for h in hit)
                        k = end
                        continue
                got = self._split_statistic(rule, threads) if type(t) is Jump and self.effects else None
            hit, threads = got if got is not None else self._split(rule, threads, hook, isinstance(t, Nat))
            if not hit:
                continue
            if isinstance(t, Jump):
                if callee is None:  # (a line read: its chain already looked up)
                    callee = self.rs.chain(table, t.chain)
                if callee is None:
                    raise Unsupported(f"{_at(rule)}: jump to undefined chain {t.chain}")
                if endpoints and depth < MAX_DEPTH and self._endpoint(hit, callee, table, out) is not None:
                    continue  # (an endpoint chain, walked at once: nothing comes back)
                marks = self._marks_only(callee) if self.effects and self.mark is not None else None
                if marks is not None:
                    # kube-proxy's KUBE-MARK-MASQ (39,000 jumps on a 10,000-service dump): every
                    # packet comes back, its mark rewritten, as the chain's rules would
                    hit = [Thread(h.packets, h.prob, _remarked(h.mark, marks)) for h in hit]
                    threads = self._join(threads, hit) if not t.goto else threads
                    if t.goto:
                        back.extend(hit)
                    continue
                ret = self._chain(hit, table, hook, callee, out, depth + 1)
                if t.goto:
                    back.extend(ret)  # a RETURN from a goto'd chain returns from this one
                else:
                    threads = self._join(threads, ret)
            elif isinstance(t, Reject):
                out.extend((h, f"REJECT {t.with_}") for h in hit)
            elif isinstance(t, Verdict):
                if t.verdict == "RETURN":
                    back.extend(hit)
                elif t.verdict in ("ACCEPT", "DROP"):
                    out.extend((h, None if t.verdict == "ACCEPT" else "DROP") for h in hit)
                else:
                    raise Unsupported(f"{_at(rule)}: verdict {t.verdict}")
            elif isinstance(t, SetMark) and t.kind == "MARK" and self.effects:
                if self.mark is None:
                    raise Unsupported(f"{_at(rule)}: MARK on an open mark")
                threads = self._join(threads, [Thread(h.packets, h.prob, _remarked(h.mark, ((t.mask, t.value),)))
                                               for h in hit])
            elif isinstance(t, Nat) and t.kind == "DNAT" and table == "nat" and hook in ("PREROUTING", "OUTPUT") \
                    and self.effects:
                out.extend((d, None) for h in hit for d in self._dnat(rule, h))
            else:
                raise Unsupported(f"{_at(rule)}: target {getattr(t, 'name', type(t).__name__)}")
        return back + threads

    def _endpoint_shape(self, chain, table: str):
        """``(source, marks, proto, consts, recent)`` when ``chain`` is a kube-proxy endpoint
        chain (KUBE-SEP-*): ``-s ADDR/32 -j CHAIN`` where CHAIN only marks (`_marks_only`), then
        ``-p PROTO [-m recent --set ...] -j DNAT --to-destination ADDR:PORT`` to one address and
        port of a port protocol, comments aside; ``recent``: whether the DNAT rule has recent
        matches that every packet meets (session affinity's ``--set``: `_compile` decides them
        under walk.RECENT_ASSUMPTION). None for any other chain."""
        key = id(chain)
        hit = self._shapes.get(key, False)
        if hit is not False:
            return hit
        hit = None
        rules = chain.rules
        if len(rules) == 2 and self.family == 4 and rules[0].pending is not None and rules[1].pending is not None:
            # not decoded yet (a lazily parsed dump): its lines read as kube-proxy writes them,
            # without decoding the 56,000 rules of 28,000 endpoints (`_endpoint_text`)
            hit = self._endpoint_text(rules, table)
            if hit is not None or "DNAT" not in rules[1].text:
                # (a second rule whose line does not name DNAT has no DNAT target: kube-proxy's
                # 1,800 service chains of one endpoint are not decoded to tell)
                self._shapes[key] = hit
                return hit
        # (the cheap tests first: most chains reached are not of this shape, and each is asked once)
        if len(rules) == 2 and type(rules[1].target) is Nat and type(rules[0].target) is Jump:
            m1 = [m for m in rules[0].matches if not isinstance(m, CommentMatch)]
            m2 = [m for m in rules[1].matches if not isinstance(m, CommentMatch) and not _every_recent(m)]
            recent = any(_every_recent(m) for m in rules[1].matches)
            t1, t2 = rules[0].target, rules[1].target
            callee = self.rs.chain(table, t1.chain) if isinstance(t1, Jump) and not t1.goto else None
            marks = self._marks_only(callee) if callee is not None else None
            if marks is not None and len(m1) == 1 and isinstance(m1[0], AddrMatch) and m1[0].direction == "src" \
                    and len(m2) == 1 and isinstance(m2[0], ProtoMatch) and not m2[0].negated \
                    and m2[0].number in PORT_PROTOS and isinstance(t2, Nat) and t2.kind == "DNAT" \
                    and len(t2.ranges) == 1:
                pt, r = _point(m1[0], self.family), t2.ranges[0]
                if pt is not None and r.addr_lo is not None and r.addr_lo == r.addr_hi \
                        and r.addr_lo.version == self.family and r.port_lo is not None and r.port_lo == r.port_hi:
                    hit = (pt[0][1], marks, m2[0].number, (("dst", r.addr_lo), ("dport", r.port_lo)), recent)
        self._shapes[key] = hit
        return hit

    def _endpoint_text(self, rules, table: str):
        """`_endpoint_shape` of two IPv4 rules read from their lines, when they are exactly as
        kube-proxy writes them (``-s A/32 [-m comment --comment C] -j CHAIN`` and ``-p P
        [-m comment --comment C] [-m P] -j DNAT --to-destination A:PORT``, dotted quads as the
        parser takes them, CHAIN a chain of the table that only marks); None otherwise (the
        caller decodes them). What the parser would decode from these lines, to the value
        (tests/test_setwalk.py compares both on every such chain of the corpus)."""
        m1, m2 = _SEP_MARK.fullmatch(rules[0].text), _SEP_DNAT.fullmatch(rules[1].text)
        if m1 is None or m2 is None:
            return None
        (src, jump), (proto, recent, module, dst, port) = m1.groups(), m2.groups()
        if module not in (None, proto):
            return None
        callee = self._line_jump(jump, table)
        marks = self._marks_only(callee) if callee is not None else None
        src, dst, port = self._line_address(src), self._line_address(dst), int(port)
        if marks is None or src is None or dst is None or not 0 < port < 65536:
            return None
        return src, marks, _PORT_MODULES[proto], (("dst", dst), ("dport", port)), recent is not None

    def _endpoint(self, threads: list, chain, table: str, out: list, prob: float = 1.0):
        """A kube-proxy endpoint chain (`_endpoint_shape`) walked at once, as `_chain` walks
        it rule by rule: the packets from the endpoint's own address (``-s``) are marked and
        every packet is translated to the endpoint. With ``prob`` below 1, the rule that jumps
        there matches by ``-m statistic`` alone with that probability (`_statistic_line`): split
        and walked at once, as `_split_prob` and then the chain would, without the threads
        between. Returns the threads that go on (the rule's misses; none at ``prob`` 1: nothing
        comes back from the chain). Only for parts without exclusions, their source open, their
        protocol the rule's and their destination pinned elsewhere than the endpoint (every
        packet moves); None otherwise (the caller splits, walks the chain rule by rule).
        28,000 of them on a 10,000-service dump; tests/test_setwalk.py compares them with the
        rules walked one by one."""
        shape = self._endpoint_shape(chain, table)
        if shape is None or prob <= 0.0:
            return None
        src, marks, proto, consts, recent = shape
        (fd, vd), (fp, vp) = consts
        sp = self.space
        at, false, where, stop = sp._at_until, sp._false, {"src": int(src)}, sp._last_level["src"] + 1
        nodes = []
        for th in threads:
            for p in th.packets:
                pins = p.pins
                if p.excl is not None or "src" in pins or pins.get("proto") != proto or fd not in pins \
                        or fp not in pins or (pins[fd] == vd and pins[fp] == vp):
                    return None
                node = at(p.g.node, where, stop)
                if node is None:
                    return None  # (the set tests a field above the source: rule by rule)
                nodes.append(node)
        # the statistic split (`_split_prob`): the same packets in two worlds, their parts
        # remembering where they split; then the endpoint chain (`_endpoint`) on the hits
        certain = prob >= 1.0
        miss = []
        worlds: dict = {}
        hits = []
        excl_key = ("src",)
        k = 0
        for th in threads:
            ins = th.packets if certain else \
                tuple(p if p.origin is not None else Part(p.pins, p.g, None, p) for p in th.packets)
            hp, mk = (th.prob, th.mark) if certain else (th.prob * prob, th.mark)
            if not certain:
                miss.append(Thread(ins, th.prob * (1 - prob), mk))
            outs, marked = [], []
            for p in ins:
                node = nodes[k]
                k += 1
                if node == false:
                    outs.append(p)
                    continue
                outs.append(Part(p.pins, p.g, {excl_key: {(src,)}}, p.origin))
                pins = dict(p.pins)
                pins["src"] = src
                marked.append(Part(pins, sp._set(node), None, p.origin))
            if outs:
                worlds.setdefault((hp, mk), []).extend(outs)
            if marked:
                hits.append(((hp, _remarked(mk, marks)), marked))
        for key, ins in hits:
            worlds.setdefault(key, []).extend(ins)
        if recent:
            self.recent_assumed = True  # (as `_compile` decides --set: walk.RECENT_ASSUMPTION)
        for (p_, mark), parts in worlds.items():
            parts = tuple(parts)
            out.append((Thread(parts, p_, mark, (parts, consts)), None))
        if len(miss) > 1 and (len(miss) != 2 or (miss[0].prob, miss[0].mark) == (miss[1].prob, miss[1].mark)):
            miss = self._join([], miss)
        return miss

    def _marks_only(self, chain):
        """The MARK rewrites ``((mask, value), ...)`` of a chain whose every rule matches
        every packet and marks it (or changes nothing: LOG), in order; None for any other chain."""
        key = id(chain)
        hit = self._marks.get(key, False)
        if hit is False:
            rules = chain.rules
            # (a chain that jumps or translates first, as the 40,000 service and endpoint
            # chains of a 10,000-service dump, is told at once; by its first line when that
            # is not decoded yet: `_endpoint_text` reads the endpoint chains undecoded)
            if rules and rules[0].pending is not None and " -j MARK " not in rules[0].text + " ":
                hit = None
            else:
                hit = [] if not rules or type(rules[0].target) not in (Jump, Nat) else None
            for r in rules if hit is not None else ():
                t = r.target
                if any(not isinstance(m, CommentMatch) for m in r.matches):
                    hit = None
                elif t is None or isinstance(t, OtherTarget) and not t.terminating:
                    continue
                elif isinstance(t, SetMark) and t.kind == "MARK":
                    hit.append((t.mask, t.value))
                else:
                    hit = None
                if hit is None:
                    break
            self._marks[key] = hit = tuple(hit) if hit is not None else None
        return hit

    #: a table summary takes a run of at least this many rules with one verdict at once
    VERDICT_RUN = 4

    def _verdict_run(self, rules, k: int, hook: str):
        """``(end, packets, action)`` for the rules ``rules[k:end]`` when they are a run of
        `VERDICT_RUN` or more rules with the same ACCEPT, DROP or REJECT target, each matching a
        set of packets (not a per-thread mark, not a statistic: `_rule_set`); ``packets``: the
        union of what they match (cached per chain position and what the walk knows). None
        otherwise."""
        action = _verdict_action(rules[k].target)
        if action is False:
            return None
        # a run of header matches only is the same set for every walk of the exploration (the
        # table summaries: shared); otherwise it depends on what this walk knows
        shared = self._headers.get(("run", id(rules), k, hook))
        if shared is not None:
            end, hit = shared
            if hit is not None:
                return (end, hit, action) if hit is not False else None
        else:
            end = k + 1
            while end < len(rules) and _verdict_action(rules[end].target) == action:
                end += 1
            if end - k < self.VERDICT_RUN:
                return None
            if all(isinstance(m, _HEADER_MATCHES + (CommentMatch,)) for r in rules[k:end] for m in r.matches):
                hit = self._run_set(rules, k, end, hook)
                self._headers[("run", id(rules), k, hook)] = (end, hit)
                self._keep.append(rules)  # (its id stays its own)
                return (end, hit, action) if hit is not False else None
            self._headers[("run", id(rules), k, hook)] = (end, None)
            self._keep.append(rules)
        key = ("run", id(rules), k, end, hook, self.iif, self.oif, self.ctstates, self.tcp_flags, self.icmp)
        hit = self._sets.get(key)
        if hit is None:
            hit = self._sets[key] = self._run_set(rules, k, end, hook)
        if hit is False:
            return None
        return end, hit, action

    def _run_set(self, rules, k: int, end: int, hook: str):
        """The union of what ``rules[k:end]`` match (False: one of them depends on the thread)."""
        sets = []
        for r in rules[k:end]:
            s = self._rule_set(r, hook)
            if s is None:
                return False
            sets.append(s.node)
        return self.space._set(_or_all(self.space, sets))

    def _rule_set(self, rule, hook: str):
        """What ``rule`` matches as one set without its family, the same for every thread (None:
        it depends on the thread: a statistic or a -m mark decided per thread's mark)."""
        for m in rule.matches:
            if isinstance(m, StatisticMatch) or isinstance(m, MarkMatch) and m.kind == "mark" and self.mark is not None:
                return None
        never, points, m_set, _, _ = self._plan(rule, hook)
        if never:
            return self.space.empty()
        if points:  # (the one-value matches as one cube: kube-proxy's -d, -p, --dport)
            pt = self._point_set(points)
            m_set = pt if m_set is None else self._op("&", m_set, pt)
        return m_set if m_set is not None else self._full_set

    @staticmethod
    def _join(a: list, b: list) -> list:
        """Threads of the same world travel together again (their packets are disjoint)."""
        if not b:
            return a
        by = {}
        for t in a + b:
            k = (t.prob, t.mark)
            hit = by.get(k)
            by[k] = t if hit is None else Thread(hit.packets + t.packets, t.prob, t.mark)
        return list(by.values())

    def _dnat(self, rule, h: Thread) -> list:
        """DNAT to one address (and port) of ``h``'s packets: the table ends. A packet already
        sent there keeps its tuple, and the kernel marks no translation (IPS_DST_NAT)."""
        t = rule.target
        if len(t.ranges) != 1:
            raise Unsupported(f"{_at(rule)}: DNAT with several ranges")
        r = t.ranges[0]
        if r.addr_lo != r.addr_hi or r.port_lo != r.port_hi:
            raise Unsupported(f"{_at(rule)}: DNAT to a range")
        if r.addr_lo is not None and r.addr_lo.version != self.family:
            raise Unsupported(f"{_at(rule)}: DNAT to another family")
        consts = []
        if r.addr_lo is not None:
            consts.append(("dst", r.addr_lo))
        if r.port_lo is not None:
            consts.append(("dport", r.port_lo))
        consts = tuple(consts)
        same, moved = [], []
        for p in h.packets:
            pins = p.pins
            if p.excl is None and (r.port_lo is None or pins.get("proto") in PORT_PROTOS) \
                    and any(f in pins and pins[f] != v for f, v in consts):
                moved.append(p)  # (kube-proxy: a port protocol, another destination pinned)
                continue
            if p.excl and any(f not in p.pins for f, _ in consts):
                p = self._flush(p)  # the destination is split below: exclusions first
                if p is None:
                    continue
            if r.port_lo is not None:
                # a packet without ports keeps none (pick_port of no port): only port protocols
                proto = p.pins.get("proto")
                if proto is None and not self._op("-", p.g, self._has_ports()).is_empty() \
                        or proto is not None and proto not in PORT_PROTOS:
                    raise Unsupported(f"{_at(rule)}: DNAT with a port of packets without ports")
            # the packets already sent there (dst and port as written) keep their tuple
            free = {}
            differs = False
            for f, v in consts:
                have = p.pins.get(f)
                if have is None:
                    free[f] = v
                elif have != v:
                    differs = True
            if differs:
                moved.append(p)
            elif not free:
                same.append(p)
            else:
                there = self._pin(p, free)
                if there is None:
                    moved.append(p)
                elif there is _NO_DESCENT:
                    pt = self._point_set(free)
                    for parts, g in ((same, self._op("&", p.g, pt)), (moved, self._op("-", p.g, pt))):
                        if not g.is_empty():
                            parts.append(Part(p.pins, g, None, p.origin))
                else:
                    same.append(there)
                    rest = self._op("-", p.g, self._point_set(free))
                    if not rest.is_empty():
                        moved.append(Part(p.pins, rest, None, p.origin))
        out = []
        if same:
            out.append(Thread(tuple(same), h.prob, h.mark))
        if moved:
            # the translated packets are not built here: Exit.consts says what they are (the
            # caller takes them together, symbolic.explain_fate)
            moved = tuple(moved)
            out.append(Thread(moved, h.prob, h.mark, (moved, consts)))
        return out

    def _has_ports(self):
        hit = self._ports.get("has")
        if hit is None:
            hit = self._ports["has"] = self.space.ports("proto", [(p, p) for p in PORT_PROTOS])
        return hit

    # ------------------------------------------------------------------ parts
    def _parts(self, s) -> tuple:
        """A set as the parts the walk carries: one, its family pinned."""
        g = self._strip(s)
        return () if g.is_empty() else (Part({"family": self.family}, g),)

    def _strip(self, s):
        """``s`` without its family (every set here is of the flow's family): its cofactor."""
        return self.space._set(self.space._at(s.node, {"family": 0 if self.family == 4 else 1}))

    def _op(self, op: str, a, b):
        """``a & b`` or ``a - b``, cached: the parts of thousands of service chains share their sets."""
        key = (op, int(a.node), int(b.node))
        hit = self._memo.get(key)
        if hit is None:
            hit = self._memo[key] = (a & b if op == "&" else a - b, a, b)  # operands kept: their ids stay theirs
        return hit[0]

    def _point_set(self, values: dict):
        """The packets with ``values`` (field -> value), without their family."""
        key = tuple(values.items())
        hit = self._points.get(key)
        if hit is None:
            sp = self.space
            hit = self._points[key] = sp._set(_point_node(sp, values, sp._u))
        return hit

    def _pin(self, p: Part, new: dict):
        """The packets of ``p`` with the fields of ``new`` fixed to its values, as a part (None:
        none; `_NO_DESCENT` when ``p`` tests a field above them that is not pinned: the caller
        takes the point as a set). ``p``'s exclusions over fields that ``new`` fixes are decided
        here, the others kept (`_needs_flush` says when they cannot be)."""
        node = self.space._at(p.g.node, {f: int(v) for f, v in new.items()})
        if node is None:
            return _NO_DESCENT
        if node == self.space._false:
            return None
        keep = None
        if p.excl:
            for key, values in p.excl.items():
                if key[0] in new:  # every field of the key (_needs_flush)
                    if tuple(new[f] for f in key) in values:
                        return None  # an earlier rule of the run took these packets
                else:
                    keep = keep if keep is not None else {}
                    keep[key] = set(values)
        pins = dict(p.pins)
        pins.update(new)
        return Part(pins, self.space._set(node), keep, p.origin)

    def _cofactor(self, g, values: dict):
        """``g`` at ``values`` (None: empty): `PacketSpace._cofactor`."""
        node = self.space._cofactor(g.node, values, self.family)
        return None if node == self.space._false else self.space._set(node)

    @staticmethod
    def _needs_flush(p: Part, new: dict) -> bool:
        """Whether ``p``'s exclusions must be taken out of its set before ``new`` is pinned: a
        key over some but not all of the new fields, or more than a few points to copy."""
        copied = 0
        for key, values in p.excl.items():
            common = sum(f in new for f in key)
            if common == 0:
                copied += len(values)
            elif common != len(key):
                return True
        return copied > 64

    @staticmethod
    def _exclude(p: Part, new: dict) -> Part:
        """``p`` without the point ``new``, kept as an exclusion. A part with exclusions is only
        ever in one thread (hits are flushed, and only hits are shared between statistic
        worlds): it is handed over, one more exclusion added in place; a part without any may
        be shared, and gets a new part."""
        key = tuple(sorted(new))
        values = tuple(new[f] for f in key)
        if p.excl is None:
            return Part(p.pins, p.g, {key: {values}}, p.origin)
        p.excl.setdefault(key, set()).add(values)
        return p

    def _flush(self, p: Part):
        """``p`` with its exclusions taken out of its set (None: nothing left)."""
        if not p.excl:
            return p
        sp = self.space
        node = sp._false
        level = sp._level
        for key, values in p.excl.items():
            # in the order of their values from the deepest down (each OR then adds a path
            # beside the last one: ~1.4x faster than in a set's order for 11,000 points)
            order = sorted(range(len(key)), key=lambda i: level[key[i]])
            for vs in sorted(values, key=lambda vs: tuple(int(vs[i]) for i in order), reverse=True):
                node = self._point_set(dict(zip(key, vs))).node | node
        g = p.g - sp._set(node)
        return None if g.is_empty() else Part(p.pins, g, None, p.origin)

    def _settled(self, parts: tuple) -> tuple:
        """``parts`` as a way out of a table: a part keeps its exclusions (the parts of 28,000
        endpoints then share their ``g``) when one packet of its ``g`` is not excluded (it is
        not empty); otherwise they are taken out, and an empty part is dropped."""
        for p in parts:
            if p.excl:
                break
        else:
            return parts
        out = []
        for p in parts:
            if p.excl and not self._surely_not_empty(p):
                p = self._flush(p)
            if p is not None:
                out.append(p)
        return tuple(out)

    def _surely_not_empty(self, p: Part) -> bool:
        key = int(p.g.node)
        w = self._witness.get(key)
        if w is None:
            w = self._witness[key] = (p.g.pick(), p.g)
        # (kube-proxy's KUBE-SERVICES: the 11,000 points its rules took stay a lookup when its
        # preferred packet is left: building them costs ~0.6 s, that a superset avoids,
        # symbolic._after)
        return not _excludes(p.excl, w[0])

    def _reads_pinned(self, m, pins: dict):
        """``m`` (a set without its family) at the values ``pins`` gives the fields it tests."""
        sup = self._support.get(int(m.node))
        if sup is None:
            sp = self.space
            sup = frozenset(sp._var_bit[v][0] for v in sp.bdd.support(m.node))
            self._support[int(m.node)] = sup
            self._keep.append(m)
        common = {f: v for f, v in pins.items() if f in sup and f != "family"}
        if not common:
            return m
        key = (int(m.node), tuple(common.items()))
        hit = self._at_memo.get(key)
        if hit is None:
            got = self._cofactor(m, common)
            hit = self._at_memo[key] = got if got is not None else self.space.empty()
        return hit

    # ------------------------------------------------------------------ matches
    def _split(self, rule, threads: list, hook: str, keep_excl: bool = False) -> tuple[list, list]:
        """(the threads' packets the rule matches, those it does not), per world. ``keep_excl``:
        the matched parts may keep their exclusions (a target that ends the thread: DNAT)."""
        return self._split_by(self._plan(rule, hook), threads, keep_excl)

    def _plan(self, rule, hook: str) -> tuple:
        """What ``rule`` matches, as `_split_by` takes it: ``(never, points, m_set, prob, marks)``
        (one-value matches as points, the others as one set, a statistic's probability, a
        ``-m mark`` decided per thread)."""
        points: dict = {}
        never = False
        m_set = None
        prob = 1.0
        marks = None  # (value, mask, negated) of a -m mark decided per thread
        for m in rule.matches:
            if isinstance(m, CommentMatch):
                continue
            if isinstance(m, MarkMatch) and m.kind == "mark" and self.mark is not None:
                if marks is not None:
                    raise Unsupported(f"{_at(rule)}: two -m mark matches")
                marks = (m.value, m.mask, m.negated)
                continue
            if isinstance(m, StatisticMatch):
                if m.mode != "random" or not self.effects:
                    raise Unsupported(f"{_at(rule)}: statistic {m.mode}")
                p = m.probability
                prob *= (1 - p) if m.negated else p
                continue
            pt = _point(m, self.family)
            if pt is not None:
                for f, v in pt:
                    have = points.get(f)
                    if have is None:
                        points[f] = v
                    elif have != v:
                        never = True
                continue
            s = self._match_set(m, rule, hook)
            if s.node == self._full:
                continue
            m_set = s if m_set is None else self._op("&", m_set, s)
        return never, points, m_set, prob, marks

    def _split_by(self, plan: tuple, threads: list, keep_excl: bool = False) -> tuple[list, list]:
        """`_split` by a rule's `_plan`."""
        never, points, m_set, prob, marks = plan
        if never or m_set is not None and m_set.is_empty():
            return [], threads
        hit, miss = [], []
        for th in threads:
            mk = th.mark
            if marks is not None and ((mk & marks[1]) == marks[0]) == marks[2]:
                miss.append(th)  # -m mark: this thread's mark decides for all its packets
                continue
            if prob <= 0.0:
                miss.append(th)
                continue
            ins, outs = [], []
            keep = keep_excl and prob >= 1.0  # a statistic world's hits are in two threads
            for part in th.packets:
                self._split_part(part, points, m_set, ins, outs, keep)
            ins, outs = tuple(ins), tuple(outs)
            if prob >= 1.0:
                if ins:
                    hit.append(Thread(ins, th.prob, mk))
                if outs:
                    miss.append(Thread(outs, th.prob, mk))
            else:
                if ins:
                    # the same packets in two worlds: their parts remember where they split (a
                    # part split before, without exclusions, is shared as it is)
                    ins = tuple(p if p.origin is not None and p.excl is None else Part(p.pins, p.g, None, p.origin or p)
                                for p in ins)
                    hit.append(Thread(ins, th.prob * prob, mk))
                    miss.append(Thread(ins, th.prob * (1 - prob), mk))
                if outs:
                    miss.append(Thread(outs, th.prob, mk))
        if len(miss) > 1 and (len(miss) != 2 or (miss[0].prob, miss[0].mark) == (miss[1].prob, miss[1].mark)):
            miss = self._join([], miss)
        return hit, miss

    def _line_jump(self, name: str, table: str):
        """The chain a ``-j NAME`` read from a line jumps to, as the parser decides it: a chain
        of the table whose name is no target's (None otherwise), cached per walk."""
        key = ("jump", table, name)
        hit = self._sets.get(key, False)
        if hit is False:
            hit = None if name in _NOT_CHAINS else self.rs.chain(table, name)
            self._sets[key] = hit
        return hit

    def _jump(self, name: str) -> Jump:
        """The jump ``-j name`` a line read says, one per name."""
        hit = self._jumps.get(name)
        if hit is None:
            hit = self._jumps[name] = Jump(0, 0, name, False)
        return hit

    def _rcheck_line(self, rule, table: str) -> bool:
        """Whether a rule not decoded yet is kube-proxy's session affinity check (``-A SVC [-m
        comment --comment C] -m recent --rcheck --seconds N --reap --name SEP --mask
        255.255.255.255 --rsource -j CHAIN``, CHAIN a chain of the table): under
        walk.RECENT_ASSUMPTION (the client's first connection) it matches no packet, as
        `_compile` decides the decoded rule (tests/test_setwalk.py compares both)."""
        m = _SVC_RCHECK.fullmatch(rule.text)
        return m is not None and self._line_jump(m.group(1), table) is not None

    def _statistic_line(self, rule, table: str):
        """``(probability, CHAIN, its chain)`` of a rule not decoded yet whose line is a kube-proxy
        endpoint rule (``-A SVC [-m comment --comment C] [-m statistic --mode random --probability
        P] -j CHAIN``, CHAIN a chain of the table), what the parser would decode from it (a jump
        to CHAIN); None otherwise (tests/test_setwalk.py compares both on the corpus)."""
        m = _SVC_JUMP.fullmatch(rule.text)
        if m is None:
            return None
        name = m.group(2)
        callee = self._line_jump(name, table)
        if callee is None:
            return None
        prob = 1.0
        if m.group(1) is not None:
            prob = self._probs.get(m.group(1))
            if prob is None:
                p = float(m.group(1))
                if not 0.0 <= p <= 1.0:
                    return None
                # (StatisticMatch.probability; a few values on a whole dump: 1/2, 1/3, ...)
                prob = self._probs[m.group(1)] = O.random_threshold(p) / 0x80000000
        return prob, name, callee

    def _point_line(self, rule, table: str, hook: str):
        """``(plan, Jump, its chain)`` (`_plan`) of a rule not decoded yet whose line is a kube-proxy
        service rule (``-A CHAIN [! -s NET] -d A[/32] -p P [-m comment --comment C] -m P --dport
        PORT -j CHAIN2``, CHAIN2 a chain of the table: KUBE-SERVICES' rules, a service's
        masquerade rule), what the parser would decode from it; None otherwise
        (tests/test_setwalk.py compares both on the corpus)."""
        if self.family != 4:
            return None
        m = _SVC_POINT.fullmatch(rule.text)
        if m is None:
            return None
        not_src, vip, proto, module, port, name = m.groups()
        if module != proto:
            return None
        callee = self._line_jump(name, table)
        if callee is None:
            return None
        port, dst = int(port), self._line_address(vip)
        if dst is None or port > 65535:
            return None
        m_set = None
        if not_src is not None:
            key = ("not-src", not_src, hook)
            hit = self._sets.get(key)
            if hit is None:  # (read, set): one pod range for 10,000 services, built once
                if O._V4_MATCH(not_src) is None:  # (not a network the parser reads at once)
                    hit = (False, None)
                else:
                    net = O._net_cached(not_src)  # (the parser's own reader of a network)
                    s = self._match_set(AddrMatch(0, 0, True, "src", (net,)), rule, hook)
                    hit = (True, None if s.node == self._full else s)
                self._sets[key] = hit
            read, m_set = hit
            if not read:
                return None
        points = {"dst": dst, "proto": _PORT_MODULES[proto], "dport": port}
        return (False, points, m_set, 1.0, None), self._jump(name), callee

    def _line_address(self, text: str):
        """The IPv4 address of a dotted quad read from a line, as the parser takes it (None: not
        one), cached per walk (a service's address is in two of its lines, an endpoint's too)."""
        hit = self._addrs.get(text, False)
        if hit is False:
            packed = O.dotted_quad(text)
            hit = self._addrs[text] = None if packed is None else O._v4_address(int.from_bytes(packed, "big"))
        return hit

    def _split_statistic(self, rule, threads: list):
        """`_split` of a rule that matches by ``-m statistic --mode random`` alone (or matches
        every packet: comments only), for threads without exclusions: kube-proxy's 28,000
        endpoint rules of a 10,000-service dump, without `_split`'s general case. None for any
        other rule or thread (the caller splits in general)."""
        prob = 1.0
        for m in rule.matches:
            k = type(m)
            if k is CommentMatch:
                continue
            if k is not StatisticMatch or m.mode != "random":
                return None
            p = m.probability
            prob *= (1 - p) if m.negated else p
        return self._split_prob(prob, threads)

    def _split_prob(self, prob: float, threads: list):
        """`_split_statistic` of a rule matching with probability ``prob``."""
        for th in threads:
            for p in th.packets:
                if p.excl is not None:
                    return None
        hit, miss = [], []
        for th in threads:
            if prob <= 0.0:
                miss.append(th)
            elif prob >= 1.0:
                hit.append(Thread(th.packets, th.prob, th.mark))
            else:
                # the same packets in two worlds: their parts remember where they split
                ins = tuple(p if p.origin is not None else Part(p.pins, p.g, None, p) for p in th.packets)
                hit.append(Thread(ins, th.prob * prob, th.mark))
                miss.append(Thread(ins, th.prob * (1 - prob), th.mark))
        if len(miss) > 1 and (len(miss) != 2 or (miss[0].prob, miss[0].mark) == (miss[1].prob, miss[1].mark)):
            miss = self._join([], miss)
        return hit, miss

    def _split_part(self, p: Part, points: dict, m_set, ins: list, outs: list, keep: bool = False) -> None:
        """Split one part by a rule: one-value matches (``points``) pin fields, the others
        (``m_set``, a set without family) are a set operation on what is not pinned. The
        packets matched go to ``ins`` (without exclusions: they go to a target), the others to
        ``outs``."""
        if not points and m_set is None and p.excl is None:
            ins.append(p)  # (a rule that matches every packet of a part without exclusions)
            return
        new = {}
        pins = p.pins
        for f, v in points.items():
            have = pins.get(f)
            if have is None:
                new[f] = v
            elif have != v:
                outs.append(p)
                return
        if p.excl and m_set is not None and self._op("&", p.g, self._reads_pinned(m_set, pins)).is_empty():
            # no packet of the part matches (kube-proxy's last KUBE-SERVICES rule, addrtype
            # LOCAL, for a flow to the service range): it goes on with its exclusions, unflushed
            outs.append(p)
            return
        if p.excl and (m_set is not None or new and self._needs_flush(p, new)):
            p = self._flush(p)  # once: the misses go on without them
            if p is None:
                return
        if new:
            h = self._pin(p, new)
            if h is None:
                outs.append(p)
                return
            if h is _NO_DESCENT:  # the point as a set: no pin, no exclusion
                pt = self._point_set(new)
                m_set = pt if m_set is None else self._op("&", m_set, pt)
                new = None
                h = p
        else:
            h = p
        if m_set is None:
            if new:
                outs.append(self._exclude(p, new))
            h = h if keep else self._flush(h)
            if h is not None:
                ins.append(h)
            return
        h = self._flush(h)
        if h is None:
            if new:
                outs.append(p)
            return
        m = self._reads_pinned(m_set, h.pins)
        gin = self._op("&", h.g, m)
        gout = self._op("-", h.g, m)
        if not gin.is_empty():
            ins.append(Part(h.pins, gin, None, h.origin))
        if not gout.is_empty():
            outs.append(Part(h.pins, gout, None, h.origin))
        if new:
            outs.append(self._exclude(p, new))

    def _match_set(self, m, rule, hook: str):
        """What ``m`` matches, as a set without its family (`_strip`)."""
        if isinstance(m, CtStateMatch):  # decided by the states known here, not cached
            return self._strip(self._compile(m, rule, hook))
        cache = self._headers if isinstance(m, _HEADER_MATCHES) else self._sets
        key = _match_key(m)
        hit = cache.get(key)
        if hit is not None:
            return hit
        s = self._strip(self._compile(m, rule, hook))
        cache[key] = s
        return s

    def _compile(self, m, rule, hook: str):
        from analyzer.netfilter.symbolic import match_header

        sp = self.space
        if isinstance(m, (AddrMatch, IpRangeMatch, ProtoMatch, PortMatch, AddrTypeMatch)):
            if isinstance(m, AddrTypeMatch) and (m.limit_iface or not self.ns.known):
                raise Unsupported(f"{_at(rule)}: addrtype not decided")
            got = match_header(m, sp, self.family, self.ns, self._ports)
            if got is None:
                raise Unsupported(f"{_at(rule)}: {type(m).__name__} not compiled")
            return got[0]
        if isinstance(m, IfaceMatch):
            if m.direction == "out" and hook in ("PREROUTING", "INPUT"):
                return sp.empty() if not m.negated else sp.universe()  # no output interface yet
            name = self.iif if m.direction == "in" else self.oif
            if name is None:
                raise Unsupported(f"{_at(rule)}: interface match on an open or unknown interface")
            hit = name.startswith(m.name[:-1]) if m.name.endswith("+") else name == m.name
            return sp.universe() if hit != m.negated else sp.empty()
        if isinstance(m, MarkMatch) and m.kind == "mark":  # an open mark: a set over the input field
            s = sp.masked("mark", m.value, m.mask)
            return ~s if m.negated else s
        if isinstance(m, TcpFlagsMatch) and self.tcp_flags is not None:
            # walk._match: only a TCP packet matches (negated or not), by its flags
            hit = ((self.tcp_flags & m.mask) == m.comp) != m.negated
            return sp.eq("proto", 6) if hit else sp.empty()
        if isinstance(m, IcmpMatch) and self.icmp is not None:
            t, c = self.icmp
            hit = m.type is None or (t == m.type and (m.code is None or c == m.code))
            icmp = sp.eq("proto", 1) | sp.eq("proto", 58)
            return icmp if hit != m.negated else sp.empty()
        if isinstance(m, CtStateMatch) and self.ctstates is not None:
            return sp.universe() if bool(self.ctstates & m.states) != m.negated else sp.empty()
        if isinstance(m, OpaqueMatch) and m.module == "recent":
            # as the walk decides it for a connection's first packet (walk.RECENT_ASSUMPTION):
            # a client the list has not seen; --set matches, the checks find no entry
            self.recent_assumed = True
            hit = m.option not in _RECENT_CHECKS
            return sp.universe() if hit != m.negated else sp.empty()
        what = f"-m {m.module}" if m.module else type(m).__name__.replace("Match", " match").lower()
        raise Unsupported(f"{_at(rule)}: '{what}' is not followed as a set")


def _every_recent(m) -> bool:
    """Whether ``m`` is a recent match every packet meets under walk.RECENT_ASSUMPTION (no entry
    yet: an option but --rcheck, --update and --remove, not negated), as `_compile` decides it."""
    return isinstance(m, OpaqueMatch) and m.module == "recent" and not m.negated and m.option not in _RECENT_CHECKS


#: the recent options that look the client up (none is found under walk.RECENT_ASSUMPTION)
_RECENT_CHECKS = ("--rcheck", "--update", "--remove")


def _point(m, family: int):
    """The one value per field a header match fixes, ``((field, value), ...)`` as
    `PacketSpace.where` takes them (what ``symbolic.match_header`` compiles the match to), or
    None when it fixes none: ``-d IP/32``, ``-p tcp``, ``-m tcp --dport 80`` (TCP and port 80)."""
    if m.negated:
        return None
    if isinstance(m, AddrMatch):
        if len(m.networks) != 1:
            return None
        n = m.networks[0]
        if n.version != family or n.prefixlen != n.max_prefixlen:
            return None
        return ((m.direction, n.network_address),)
    if isinstance(m, ProtoMatch):
        return None if m.number == 0 else (("proto", m.number),)
    if isinstance(m, PortMatch):
        if m.mod not in _PORT_MODULES or m.direction == "any" or len(m.ranges) != 1:
            return None
        lo, hi = m.ranges[0]
        if lo != hi:
            return None
        return (("proto", _PORT_MODULES[m.mod]), ("sport" if m.direction == "src" else "dport", lo))
    return None


# kube-proxy's endpoint chain, line by line (SetWalker._endpoint_text): its source mark rule and
# its DNAT rule, an optional comment (quoted without '"' or '\\', or one word) and nothing else
_COMMENT = r'(?: -m comment --comment (?:"[^"\\]*"|[^ "\\-][^ "\\]*))?'
# names a -j takes as a target, not a chain (the parser: O.TARGETS, SET, other families' targets)
_NOT_CHAINS = frozenset(O.TARGETS) | {"SET"} | frozenset().union(*O.FAMILY_TARGETS.values())
_SVC_JUMP = re.compile(r'-A \S+' + _COMMENT + r'(?: -m statistic --mode random --probability (\d+(?:\.\d+)?))? -j (\S+)')
_SVC_POINT = re.compile(r'-A \S+(?: ! -s (\d+\.\d+\.\d+\.\d+/\d+))? -d (\d+\.\d+\.\d+\.\d+)(?:/32)? -p (tcp|udp|sctp)'
                        + _COMMENT + r' -m (tcp|udp|sctp) --dport ([1-9]\d*) -j (\S+)')
_SEP_MARK = re.compile(r'-A \S+ -s (\d+\.\d+\.\d+\.\d+)(?:/32)?' + _COMMENT + r' -j (\S+)')
# session affinity (ClientIP): the DNAT rule remembers the client (--set), the service's chain
# first sends a client the list holds to its endpoint (--rcheck)
_SEP_DNAT = re.compile(r'-A \S+ -p (tcp|udp|sctp)' + _COMMENT + r'( -m recent --set --name \S+ --mask 255\.255\.255\.255 '
                       r'--rsource)?(?: -m (tcp|udp|sctp))? -j DNAT --to-destination (\d+\.\d+\.\d+\.\d+):([1-9]\d*)')
_SVC_RCHECK = re.compile(r'-A \S+' + _COMMENT + r' -m recent --rcheck --seconds [1-9]\d* --reap --name \S+ '
                         r'--mask 255\.255\.255\.255 --rsource -j (\S+)')

#: matches whose set depends only on the space, the family and the namespace (symbolic.match_header)
_HEADER_MATCHES = (AddrMatch, IpRangeMatch, ProtoMatch, PortMatch, AddrTypeMatch)
_NO_DESCENT = object()  # SetWalker._pin: the point is taken as a set
_PORT_MODULES = {"tcp": 6, "udp": 17, "sctp": 132}  # -m tcp/udp/sctp: the protocol they test first


def _at(rule) -> str:
    """Where a rule is, for a user: ``nat:PREROUTING:rule:3 (line 12)``."""
    return f"{rule.label} (line {rule.span.line})" if rule.span is not None else rule.label


_KEY_FIELDS: dict = {}


def _match_key(m) -> tuple:
    """A match without its columns: equal matches of different rules compile once."""
    names = _KEY_FIELDS.get(type(m))
    if names is None:
        import dataclasses

        names = _KEY_FIELDS[type(m)] = tuple(f.name for f in dataclasses.fields(m) if f.name not in ("col", "end_col"))
    return (type(m), *(getattr(m, f) for f in names))
