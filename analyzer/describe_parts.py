"""Orchestration: a fate group's description (`symbolic.describe`) read from the set walk's
parts, without building the group's set.

A fate group is a list of `setwalk.Part`s (some fields pinned to one value, the rest ``g``, a
set that thousands of parts share, minus excluded points) and now and then a plain set. The
set of 10,000 services' parts is a BDD of ~450,000 nodes, seconds to build and ~0.6 s to
project on each field; the projection of a union is the union of the projections, so a
field's values are the pinned values of the parts that pin it and the projections of the few
distinct ``g``s of the others, each computed once. `describe_parts` says what `describe`
says of the set, the same string, or builds the set and asks `describe` when the parts
cannot prove it (`fast_text` None).
"""
from __future__ import annotations

import itertools

from analyzer.engine.partition import _projection, intervals
from analyzer.netfilter.symbolic import OPEN_INTS, flow_set

#: a projection with more ranges than this is not listed (the set is built instead)
MAX_RUNS = 1 << 16


class _Unproven(Exception):
    """The parts cannot prove `describe`'s answer: the caller builds the set."""


def describe_parts(items, spec, space, build) -> str:
    """`symbolic.describe` of the packets of ``items`` (`setwalk.Part`s and sets, as
    `symbolic._cells` leaves a group), the same string; ``build()`` gives the set, built only
    when the parts cannot say it (`fast_text`)."""
    from analyzer.netfilter.setwalk import Part, _materialize
    from analyzer.symbolic import _cyclic_gc_paused, describe

    with _cyclic_gc_paused():  # (the parts are tens of thousands of objects: no cycles among them)
        items = [trimmed(x, space) for x in items]
        text = fast_text(items, spec, space)
    if text is not None:
        return text
    if len(items) == 1 and isinstance(items[0], Part):
        with _cyclic_gc_paused():
            text = one_part_text(items[0], spec, space)
        if text is not None:
            return text
        # the same set as ``build()``'s, without the exclusions that take nothing out
        return describe(_materialize(space, items), spec, space)
    return describe(build(), spec, space)


#: a field whose excluded values are at most this many gives `one_part_text` a witness set
FEW_VALUES = 64


def one_part_text(x, spec, space) -> str | None:
    """`describe`'s answer for one part excluding many points of several fields (the packets no
    kube-proxy service took, less the 11,242 services' points: seconds to build), without
    building the exclusions, when it can be proven; else None.

    ``X`` is the part without its exclusions, ``W`` the packets of ``X`` whose value of some
    field of the exclusions' key is none of the excluded points' values (protocols, ports:
    a few values), so surely in the part. When each open field takes the same values in ``W``
    as in ``X``, those are the part's values, and `describe`'s field-by-field text is ``X``'s.
    When they are the flow's, `describe` speaks of the rest of the flow: it contains the flow
    less ``X`` and the excluded points, so its box (the flow's packets with every field at a
    value the rest takes) contains the box of those and of a few excluded points; a packet of
    the part in that box (of ``W``, or at a mix of those points' values that no exclusion
    holds) is in the box and not in the rest, so the rest is not a box: "every packet of the
    flow that no other group holds"."""
    from analyzer.netfilter.setwalk import Part, _materialize
    from analyzer.symbolic import _fields_text, _project

    if not x.excl or len(x.excl) != 1:
        return None
    fields = [f for f in spec.open if f in space.fields]
    if "ctstate" in fields:
        return None
    (key, points), = x.excl.items()
    whole = _materialize(space, [Part(x.pins, x.g)])
    sure = space.empty()
    for k, f in enumerate(key):
        values = {vs[k] for vs in points}
        if len(values) <= FEW_VALUES:
            sure = sure | (whole - space.union(space.eq(f, v) for v in values))
    if sure.is_empty() or any(_project(sure, f) != _project(whole, f) for f in fields):
        return None
    text = _fields_text(whole, spec, space)
    flow = flow_set(space, spec)
    if text and any(_project(whole, f) != _project(flow, f) for f in fields):
        return text
    # packets surely in the rest: the flow's outside the part, and a few excluded points
    inside = flow & whole
    known = []
    for vs in points:
        cube = space.where(**dict(zip(key, vs)))
        if not (inside & cube).is_empty():
            known.append((vs, inside & cube))
            if len(known) == 4:
                break
    rest = space.union([flow - whole, *(c for _, c in known)])
    if rest.is_empty():
        return None
    box = flow
    for f in fields:
        box = box & _project(rest, f)
    if not (box & sure).is_empty():
        return "every packet of the flow that no other group holds"
    # a point of the box the exclusions do not hold (their fields' values mixed)
    for c in itertools.product(*({vs[k] for vs, _ in known} for k in range(len(key)))):
        if c not in points and not (box & whole & space.where(**dict(zip(key, c)))).is_empty():
            return "every packet of the flow that no other group holds"
    return None


def trimmed(x, space):
    """``x`` without the points it excludes over several fields that are not in its set (they
    take nothing out): the packets no kube-proxy service took exclude the 11,000 services'
    points, all outside the set of the rejected services' packets (a set of 3,840 BDD nodes,
    which the exclusions would take seconds to build from); anything else as it is."""
    from analyzer.netfilter.setwalk import Part

    if not isinstance(x, Part) or not x.excl or all(len(k) == 1 for k in x.excl):
        return x
    sp = space
    fam = x.pins["family"]
    node = x.g.node & sp._fam[fam]
    at = {"family": 0 if fam == 4 else 1}
    excl: dict = {}
    false, at_until = sp._false, sp._at_until
    for key, values in x.excl.items():
        if len(key) == 1:
            excl[key] = values
            continue
        kept = set()
        stop = max(sp._last_level[f] for f in key) + 1  # (PacketSpace._at's, once per key)
        for vs in values:
            point = dict(at)
            for f, v in zip(key, vs):
                point[f] = v if v.__class__ is int else int(v)
            if at_until(node, point, stop) != false:  # in the set (or the descent cannot say: kept)
                kept.add(vs)
        if kept:
            excl[key] = kept
    if len(excl) == len(x.excl) and all(len(v) == len(x.excl[k]) for k, v in excl.items()):
        return x
    return Part(x.pins, x.g, excl or None, x.origin)


def fast_text(items, spec, space) -> str | None:
    """`describe`'s answer from the parts, when it is its field-by-field text (some open field
    of the group does not take every value the flow allows) and every field's values are
    known exactly from them; None otherwise (one item: its set is one AND away; an "every
    packet of the flow except" answer, which needs the rest of the flow; exclusions of an
    unusual shape; a conntrack state open)."""
    from analyzer.symbolic import _fields_text

    from analyzer.netfilter.setwalk import Part, _materialize

    fields = [f for f in spec.open if f in space.fields]
    if len(items) <= 1 or "ctstate" in fields:
        return None
    # a part excluding points of several fields (the 11,000 services kube-proxy's KUBE-SERVICES
    # took, left as a lookup by the set walk) is read as its own set, built here
    items = [_materialize(space, [x]) if isinstance(x, Part) and x.excl and any(len(k) != 1 for k in x.excl) else x
             for x in items]
    try:
        view = Projections(items, fields, space)
        text = _fields_text(None, spec, space, view=view)
        if not text:
            return None
        flow = flow_set(space, spec)
        if all(view.same(f, flow) for f in fields):
            return None  # every field takes the flow's values: said by what it leaves out
    except _Unproven:
        return None
    return text


class Projections:
    """The values each of ``fields`` takes in the packets of ``items`` (`setwalk.Part`s and
    sets), read from the parts: ``runs(f)`` all of them as maximal ranges (`intervals`),
    ``values(f)`` a set of them (the mark-like fields of `_masks_text`). Raises `_Unproven`
    where the parts do not give them exactly.

    A part's packets are its pinned values times ``g`` less its exclusions. A field it pins
    takes that one value (when the part holds a packet); another field the values of ``g``'s
    projection (with the family: the part's ``g`` and family, its *key*). Exclusions of one
    field's values (a run of ``-s EP/32`` rules) take exactly those values out of that field's
    projection; the other fields keep theirs when ``g`` is the product of that field and the
    others (an exclusion then removes no packet of another value) and a value of ``g`` is left.
    Anything else is `_Unproven`."""

    def __init__(self, items, fields, space):
        from analyzer.netfilter.setwalk import Part

        self.space = space
        self.fields = fields
        self._keys: dict = {}  # (g node, family) -> _Key
        self._points: dict = {f: set() for f in fields}  # pinned values
        self._cuts: dict = {}  # (key, field) -> the values every part of the key excludes there
        self._sets: list = []  # items that are sets
        shapes: dict = {}  # (key, pinned fields) without exclusions -> the fields pinned
        for x in items:
            if not isinstance(x, Part):
                self._sets.append(x)
                continue
            key = self._key(x.g, x.pins["family"])
            if key.empty:
                continue
            if not x.excl:
                # the parts of one set and shape differ in their pinned values only
                shape = (key, tuple(x.pins))
                pinned = shapes.get(shape)
                if pinned is None:
                    pinned = shapes[shape] = self._shape(x, key, None, None)
                for f in pinned:
                    self._points[f].add(int(x.pins[f]))
                continue
            fld, cut = self._exclusion(x, key)
            if not key.some_left(fld, cut):
                continue  # the part holds no packet
            if any(f != fld and f not in x.pins for f in fields) and not key.product(fld):
                raise _Unproven(f"the parts' set is not a product of {fld} and the rest")
            for f in self._shape(x, key, fld, cut):
                self._points[f].add(int(x.pins[f]))
        self._runs: dict = {}

    def _shape(self, x, key: "_Key", fld, cut) -> tuple:
        """The fields ``x`` pins (their values are the caller's to add); the others take
        ``key``'s values less ``cut`` (of ``fld``)."""
        if not key.free_of(x.pins):
            raise _Unproven("a part's set depends on a field it pins")
        pinned = []
        for f in self.fields:
            if f in x.pins:
                if f in OPEN_INTS or f in ("iif", "oif"):
                    raise _Unproven(f"{f} pinned")
                pinned.append(f)
                continue
            c = cut if f == fld else frozenset()
            k = (key, f)
            have = self._cuts.get(k)
            # the union of g's values less each part's cut is g's values less their intersection
            self._cuts[k] = c if have is None else have & c
        return tuple(pinned)

    def _key(self, g, family: int) -> "_Key":
        k = (int(g.node), family)
        hit = self._keys.get(k)
        if hit is None:
            hit = self._keys[k] = _Key(self.space, g, family)
        return hit

    @staticmethod
    def _exclusion(x, key: "_Key"):
        """``(field, values)`` the part excludes, as ints (None, None: none)."""
        if not x.excl:
            return None, None
        if len(x.excl) != 1:
            raise _Unproven("exclusions over several keys")
        (fields, values), = x.excl.items()
        if len(fields) != 1 or fields[0] in x.pins or fields[0] in OPEN_INTS or fields[0] in ("iif", "oif"):
            raise _Unproven(f"an exclusion over {fields}")
        fld = fields[0]
        out = set()
        for (v,) in values:
            if fld in ("src", "dst") and v.version != (4 if x.pins["family"] == 4 else 6):
                raise _Unproven("an excluded address of another family")
            out.add(int(v))
        return fld, frozenset(out)

    def runs(self, f: str) -> list:
        """Every value of ``f``, as sorted maximal ranges."""
        hit = self._runs.get(f)
        if hit is None:
            pieces = [_point_runs(self._points[f])]
            for (key, g), cut in self._cuts.items():
                if g == f:
                    pieces.append(_minus(key.runs(f), cut))
            for s in self._sets:
                pieces.append(_all_runs(s, f))
            hit = self._runs[f] = _merge(pieces)
        return hit

    def intervals(self, f: str, limit: int) -> tuple[list, bool]:
        """What `intervals` of the set says: the first ``limit`` ranges, and whether that is all."""
        rs = self.runs(f)
        return rs[:limit], len(rs) <= limit

    def values(self, f: str):
        """A set whose only field is ``f``, holding its values (its projection)."""
        if self._points[f]:
            raise _Unproven(f"{f} pinned")
        sp = self.space
        node = sp._false
        for (key, g), cut in self._cuts.items():
            if g == f:
                if cut:
                    raise _Unproven(f"{f} excluded")
                node = node | key.node(f)
        for s in self._sets:
            node = node | _projection(s, f)[1]
        return sp._set(node)

    def same(self, f: str, flow) -> bool:
        """Whether ``f`` takes exactly the values it takes in ``flow`` (``packets.project(f) ==
        flow.project(f)`` in `describe`)."""
        if f in OPEN_INTS:
            return self.values(f).node == _projection(flow, f)[1]
        return self.runs(f) == _all_runs(flow, f)


class _Key:
    """The packets ``g`` of one family that parts share, their projections computed once."""

    def __init__(self, space, g, family: int):
        self.space = space
        self.g = g
        self.set = space._set(g.node & space._fam[family])
        self.empty = self.set.is_empty()
        self._support = None
        self._runs: dict = {}
        self._nodes: dict = {}
        self._product: dict = {}

    def runs(self, f: str) -> list:
        hit = self._runs.get(f)
        if hit is None:
            hit = self._runs[f] = _all_runs(self.set, f)
        return hit

    def node(self, f: str):
        hit = self._nodes.get(f)
        if hit is None:
            hit = self._nodes[f] = _projection(self.set, f)[1]
        return hit

    def free_of(self, pins: dict) -> bool:
        """Whether ``g`` tests none of the fields ``pins`` fixes (but the family: the part's
        packets are then its pinned values times ``g``)."""
        if self._support is None:
            sp = self.space
            self._support = {sp._var_bit[v][0] for v in sp.bdd.support(self.g.node)}
        return not any(f in self._support for f in pins if f != "family")

    def some_left(self, f: str, cut: frozenset) -> bool:
        """Whether a value of ``f`` outside ``cut`` is left."""
        rs = self.runs(f)
        return sum(hi - lo + 1 for lo, hi in rs) > len(cut) or bool(_minus(rs, cut))

    def product(self, f: str) -> bool:
        """Whether the set is its values of ``f`` times its values of the other fields."""
        hit = self._product.get(f)
        if hit is None:
            sp = self.space
            mine = tuple(sp._vars[f])
            others = tuple(v for g in sp.fields if g != f for v in sp._vars[g])
            s = self.set.node
            hit = self._product[f] = (sp._exist(others, s) & sp._exist(mine, s)) == s
        return hit


def _all_runs(s, f: str) -> list:
    rs, complete = intervals(s, f, MAX_RUNS)
    if not complete:
        raise _Unproven(f"more than {MAX_RUNS} ranges of {f}")
    return rs


def _point_runs(points) -> list:
    """Values as sorted maximal ranges.

    >>> _point_runs({7, 1, 2, 3, 9, 10})
    [(1, 3), (7, 7), (9, 10)]
    """
    out: list = []
    lo = hi = None
    for v in sorted(points):
        if hi is not None and v == hi + 1:
            hi = v
            continue
        if hi is not None:
            out.append((lo, hi))
        lo = hi = v
    if hi is not None:
        out.append((lo, hi))
    return out


def _minus(runs: list, points) -> list:
    """``runs`` (sorted, disjoint ranges) without ``points``.

    >>> _minus([(0, 9), (20, 29)], {0, 5, 25, 29, 40})
    [(1, 4), (6, 9), (20, 24), (26, 28)]
    """
    if not points:
        return runs
    pts = sorted(points)
    out, i = [], 0
    for lo, hi in runs:
        while i < len(pts) and pts[i] < lo:
            i += 1
        while i < len(pts) and pts[i] <= hi:
            if pts[i] > lo:
                out.append((lo, pts[i] - 1))
            lo = pts[i] + 1
            i += 1
        if lo <= hi:
            out.append((lo, hi))
    return out


def _merge(pieces) -> list:
    """The union of lists of ranges, as sorted maximal ranges (adjacent ones joined, as
    `intervals` joins them).

    >>> _merge([[(5, 5), (1, 1), (2, 2)], [(3, 4), (8, 9)], [(7, 7)]])
    [(1, 5), (7, 9)]
    """
    out: list = []
    for lo, hi in sorted(r for p in pieces for r in p):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out
