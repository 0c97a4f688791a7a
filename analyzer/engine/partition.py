"""Symbolic engine: split a packet set into classes that every given predicate treats alike.

Generic: the atoms are any PacketSets (the caller builds them from whatever rules it knows). A
class lies entirely inside or entirely outside every atom, so one witness per class stands for
all of its packets in any evaluation that only asks those atoms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from analyzer.engine.packetset import PacketSet


@dataclass(frozen=True, slots=True)
class Partition:
    classes: tuple[PacketSet, ...]
    complete: bool  # False when the class limit stopped the refinement (then APPROXIMATE)
    atoms_used: int


def partition(universe: PacketSet, atoms: Iterable[PacketSet], limit: int = 256) -> Partition:
    """Refine ``universe`` by each atom in turn.

    >>> from analyzer.engine.packetset import PacketSpace
    >>> s = PacketSpace()
    >>> u = s.where(proto=6)
    >>> p = partition(u, [s.where(dport=(80, 80)), s.where(dport=(0, 1023))])
    >>> len(p.classes), p.complete
    (3, True)
    """
    classes = [universe]
    used = 0
    seen = set()
    for atom in atoms:
        key = atom.node if hasattr(atom, "node") else id(atom)
        if key in seen:
            continue
        seen.add(key)
        used += 1
        nxt = []
        for c in classes:
            inside = c & atom
            if inside.is_empty():
                nxt.append(c)
                continue
            outside = c - atom
            nxt.append(inside)
            if not outside.is_empty():
                nxt.append(outside)
        if len(nxt) > limit:
            return Partition(tuple(classes), False, used - 1)
        classes = nxt
    return Partition(tuple(classes), True, used)


def field_ranges(s: PacketSet, field: str, bounds: Iterable[int], width: int) -> list[tuple[int, int]]:
    """The values of ``field`` in ``s`` as inclusive ranges, given every boundary the atoms used
    (a class is constant on each elementary interval between consecutive boundaries).

    >>> from analyzer.engine.packetset import PacketSpace
    >>> sp = PacketSpace()
    >>> c = sp.where(proto=6) - sp.where(dport=(80, 80))
    >>> field_ranges(c, "dport", [80, 81], 16)
    [(0, 79), (81, 65535)]
    """
    top = (1 << width) - 1
    pts = sorted({0, top + 1, *(b for b in bounds if 0 <= b <= top + 1)})
    out: list[tuple[int, int]] = []
    space = s.space
    for lo, nxt in zip(pts, pts[1:]):
        hi = nxt - 1
        if not (s & space.eq(field, lo)).is_empty():
            if out and out[-1][1] == lo - 1:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
    return out


@dataclass(frozen=True, slots=True)
class Explored:
    """One class of packets a walk cannot tell apart: ``witness`` (the picked field values) was
    walked, ``result`` is what the walk returned; ``lost`` says why the class may be too wide
    (empty: every packet of ``packets`` takes the witness's path)."""

    packets: PacketSet
    witness: dict
    result: object
    lost: tuple[str, ...] = ()


def explore(universe: PacketSet, make, walk, limit: int = 4096,
            prefer: dict | None = None, fixed: dict | None = None,
            progress=None) -> tuple[list[Explored], PacketSet]:
    """Path refinement by concolic walks: pick a witness of the packets not yet explained,
    ``make(values)`` builds its concolic form, ``walk(witness)`` runs it while a Recorder notes
    every decision; the packets deciding alike form its class. Repeats until every packet is in
    a class, or ``limit`` classes (then the second value, the packets left, is not empty).
    ``fixed``: input fields every packet of ``universe`` has one value of (``{field: value}``),
    told to the recorders; ``progress(n)`` is called after each class.

    A toy "graph": traffic to port 22 is dropped unless it comes from 10.0.0.0/8.

    >>> import ipaddress
    >>> from analyzer.engine.packetset import PacketSpace
    >>> from analyzer.engine.concolic import SymInt, sym_address
    >>> sp = PacketSpace()
    >>> def make(v):
    ...     return sym_address(v["src"], "src", 4), SymInt(v["dport"], "dport", 16)
    >>> def walk(pkt):
    ...     src, dport = pkt
    ...     return "drop" if dport == 22 and src not in ipaddress.ip_network("10.0.0.0/8") else "accept"
    >>> classes, rest = explore(sp.where(proto=6) & sp.family(4), make, walk)
    >>> sorted((c.result, c.packets == sp.where(proto=6, dport=22) & sp.family(4) - sp.prefix("src", "10.0.0.0/8"))
    ...        for c in classes)
    [('accept', False), ('accept', False), ('drop', True)]
    >>> rest.is_empty()
    True
    """
    from analyzer.engine.concolic import Recorder

    sp = universe.space
    work = universe
    out: list[Explored] = []
    cache: dict = {}
    while not work.is_empty() and len(out) < limit:
        v = work.pick(prefer)
        pkt = make(v)
        rec = Recorder(sp, 4 if v["family"] == 0 else 6, cache, v, fixed)
        with rec:
            result = walk(pkt)
        cls = work & rec.condition
        lost = tuple(rec.lost)
        if cls.is_empty():  # the witness must lie in its own class: a recording bug; stay safe
            cls, lost = work, lost + ("internal: the witness fell outside its own class",)
        out.append(Explored(cls, v, result, lost))
        work = work - cls
        if progress is not None:
            progress(len(out))
    return out, work



def _projection(s: PacketSet, field: str):
    """``s`` projected on ``field`` (every other field quantified away): the space, the BDD
    node, each of the field's variables' bit position (most significant first) and its width."""
    sp = s.space
    others = tuple(n for f in sp.fields if f != field for n in sp._vars[f])
    if (s.node & sp._fam[6]) == sp._false:
        # IPv4 only: the high 96 address bits are free in the set, so the projection of the
        # set itself, those bits then pinned to zero for an address field, is the projection
        # of its representative form (which would rebuild the whole set first: seconds for
        # the union of 10,000 services)
        node = sp._exist(others, s.node)
        if field in ("src", "dst"):
            node = node & sp._bits(field, 0, 96, 0, sp._true)
    else:
        node = sp._exist(others, sp._to_rep(s.node))
    names = sp._vars[field]
    return sp, node, {n: i for i, n in enumerate(names)}, len(names)

def intervals(s: PacketSet, field: str, limit: int = 64) -> tuple[list[tuple[int, int]], bool]:
    """The values ``field`` takes in ``s``, as sorted inclusive ranges (IPv4 addresses as 32-bit
    values), and whether the list is complete (False: more than ``limit`` ranges).

    >>> from analyzer.engine.packetset import PacketSpace
    >>> sp = PacketSpace()
    >>> intervals(sp.where(proto=6) - sp.eq("dport", 80), "dport")
    ([(0, 79), (81, 65535)], True)
    >>> intervals(sp.prefix("dst", "10.0.0.0/8") - sp.prefix("dst", "10.96.0.0/12"), "dst")
    ([(167772160, 174063615), (175112192, 184549375)], True)
    """
    sp, node, pos, w = _projection(s, field)
    out: list[tuple[int, int]] = []
    complete = True
    try:
        _go(node, 0, 0, (pos, w, sp._true, sp._false, out, limit))
    except _Stop:
        complete = False
    return out, complete


class _Stop(Exception):
    pass


def _go(n, i: int, value: int, ctx) -> None:
    # a module-level recursion: a recursive closure would keep BDD nodes alive in a cycle
    pos, w, true, false, out, limit = ctx
    if n == false:
        return
    if n == true or i == w:
        lo = value << (w - i)
        hi = lo + (1 << (w - i)) - 1
        if out and out[-1][1] + 1 == lo:
            out[-1] = (out[-1][0], hi)
        else:
            if len(out) >= limit:
                raise _Stop
            out.append((lo, hi))
        return
    if pos[n.var] > i:  # this bit is free
        _go(n, i + 1, value << 1, ctx)
        _go(n, i + 1, value << 1 | 1, ctx)
        return
    low, high = n.low, n.high
    if n.negated:
        low, high = ~low, ~high
    _go(low, i + 1, value << 1, ctx)
    _go(high, i + 1, value << 1 | 1, ctx)


def masks(s: PacketSet, field: str, limit: int = 64) -> tuple[list[tuple[int, int]], bool]:
    """The values ``field`` takes in ``s`` as disjoint ``(value, mask)`` cubes (every x with
    ``x & mask == value``: how marks and flags are tested), one per path of the field's BDD,
    and whether the list is complete (False: more than ``limit``).

    >>> from analyzer.engine.packetset import PacketSpace
    >>> sp = PacketSpace()
    >>> masks(sp.masked("mark", 0, 0x10000), "mark")
    ([(0, 65536)], True)
    >>> masks(sp.universe(), "mark")
    ([(0, 0)], True)
    """
    sp, node, pos, w = _projection(s, field)
    out: list[tuple[int, int]] = []
    stack = [(node, 0, 0)]
    while stack:
        n, value, mask = stack.pop()
        if n == sp._false:
            continue
        if n == sp._true:
            if len(out) >= limit:
                return sorted(out), False
            out.append((value, mask))
            continue
        bit = 1 << (w - 1 - pos[n.var])
        low, high = n.low, n.high
        if n.negated:
            low, high = ~low, ~high
        stack.append((high, value | bit, mask | bit))
        stack.append((low, value, mask | bit))
    return sorted(out), True
