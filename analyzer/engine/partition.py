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
