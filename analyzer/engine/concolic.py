"""Symbolic engine: concolic packet fields, so that a concrete walk tells which packets it stands for.

A witness packet's open fields are ints and strings that remember the input field they came
from (`SymInt`: ``(input & keep) ^ xor``, which covers copies, constants, NETMAP-style prefix
maps and mark arithmetic; `SymStr`: an interface name). While a `Recorder` is active, every
decision the walk takes on them (``==``, ``<``, ``in network``, ``startswith``, truth) is noted
as a packet set over the *input* fields, oriented the way the witness went. The conjunction of
the notes (`Recorder.condition`) is then a set of packets every one of which takes the
witness's path: the walk cannot tell them apart. An operation the recorder cannot express
(arithmetic on an open field, comparing two open fields) is noted in `Recorder.lost`: the
caller reports that class as APPROXIMATE. Knows no iptables names.

>>> from analyzer.engine.packetset import PacketSpace
>>> sp = PacketSpace()
>>> port = SymInt(8080, "dport", 16)
>>> with Recorder(sp) as rec:
...     hit = 8000 <= port <= 8999 and port != 8443
>>> hit, rec.condition == sp.range("dport", 8000, 8999) - sp.eq("dport", 8443)
(True, True)
"""
from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from analyzer.engine.fields import ADDRESS_FIELDS

if TYPE_CHECKING:  # a concrete walk imports this module: dd (and networkx through it) only when recording
    from analyzer.engine.packetset import PacketSet, PacketSpace

__all__ = ["SymInt", "SymMix", "SymStr", "Ghost", "Recorder", "active", "plain", "sym_address", "ghost_address",
           "is_sym", "is_ghost", "one_of", "in_network"]

_ACTIVE: "Recorder | None" = None


def active() -> "Recorder | None":
    """The recorder notes go to, or None (then symbolic values behave exactly as plain ones)."""
    return _ACTIVE


def plain(v: Any) -> Any:
    """``v`` without its input tag (a plain int or str; other values unchanged)."""
    if isinstance(v, (SymInt, SymMix)):
        return int.__int__(v)
    if isinstance(v, SymStr):
        return str.__str__(v)
    return v


class Recorder:
    """Collects the decisions of one walk. Use as a context manager around the walk.

    ``condition``: the packets (over input fields) that decide every noted question the way the
    witness did. ``lost``: reasons the condition may be too wide (then the class is APPROXIMATE).
    ``where`` is the caller's label of what is being evaluated, used in those reasons.
    """

    def __init__(self, space: PacketSpace, family: int = 4, cache: dict | None = None,
                 values: dict | None = None, fixed: dict | None = None):
        self.space = space
        self.family = family
        # the witness's input values (as PacketSet.pick gives them) and the input fields every
        # packet explored has one value of: a caller deciding a whole set at once (one note
        # instead of one per rule) checks the witness against it and which fields are input
        self.values = values
        self.fixed = fixed or {}
        self._cond = space.universe()
        self._big: list = []
        self.lost: list[str] = []
        self.where: Any = None
        # what turns ``where`` into text when a reason is lost (None: it is text already); a
        # walker sets ``where`` to the object being evaluated before each one and pays for its
        # label only when something is lost
        self.label: Any = None
        self.notes = 0
        self._prev: Recorder | None = None
        self._seen: set = set()
        # atoms by question, shared between the recorders of one exploration: a walk asks the
        # same few questions (is this address local?) many times
        self._cache: dict = {} if cache is None else cache

    def __enter__(self) -> "Recorder":
        global _ACTIVE
        self._prev, _ACTIVE = _ACTIVE, self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = self._prev

    @property
    def condition(self) -> PacketSet:
        if self._big:
            # the large decisions last, and their conjunction shared by every walk that made
            # the same ones: each AND with a large set costs its size
            key = frozenset(self._big)
            both = self._cache.get(("big", key))
            if both is None:
                both = self.space.universe()
                for atom, result in self._big:
                    both = both & atom if result else both - atom
                self._cache[("big", key)] = both
            self._cond = self._cond & both
            self._big = []
        return self._cond

    def note(self, atom: PacketSet | None, result: bool, large: bool = False) -> None:
        """The walk asked "is the packet in ``atom``?" and the witness answered ``result``.
        ``large``: the atom is a large set (a union over a big chain's rules), kept for the
        end so that the many small decisions are not each ANDed with it."""
        if atom is None or (atom, result) in self._seen:
            return
        self._seen.add((atom, result))
        self.notes += 1
        if large:
            self._big.append((atom, result))
            return
        self._cond = self._cond & atom if result else self._cond - atom

    def lose(self, reason: str) -> None:
        where = self.where
        if where is not None and self.label is not None and not isinstance(where, str):
            where = self.label(where)
        text = f"{where}: {reason}" if where else reason
        if text not in self.lost:
            self.lost.append(text)

    # ---- atoms over input fields -------------------------------------------------------------
    def eq_atom(self, v: "SymInt", value: int) -> PacketSet | None:
        """Input packets for which ``v`` equals ``value`` (None: the same for all of them)."""
        key = ("eq", v.field, v.width, v.keep, v.xor, value)
        try:
            return self._cache[key]
        except KeyError:
            atom = self._cache[key] = self._eq_atom(v, value)
            return atom

    def _eq_atom(self, v: "SymInt", value: int) -> PacketSet | None:
        full = (1 << v.width) - 1
        if not 0 <= value <= full:
            return None
        if (value ^ v.xor) & ~v.keep & full:  # a constant bit differs: never equal
            return None
        if v.keep == 0:
            return None
        return self.space.masked(v.field, self._value(v, (value ^ v.xor) & v.keep), self._value(v, v.keep))

    def mix_atom(self, v: "SymMix", value: int) -> PacketSet | None:
        """Input packets for which the several-field value ``v`` equals ``value``."""
        key = ("mix", v.terms, v.xor, value)
        try:
            return self._cache[key]
        except KeyError:
            full = (1 << v.width) - 1
            atom = None if not 0 <= value <= full else self.space.linear(dict(v.terms), value ^ v.xor)
            self._cache[key] = atom
            return atom

    def range_atom(self, v: "SymInt", lo: int, hi: int) -> PacketSet | None:
        key = ("range", v.field, v.width, lo, hi)
        try:
            return self._cache[key]
        except KeyError:
            atom = self._cache[key] = self._range_atom(v, lo, hi)
            return atom

    def _range_atom(self, v: "SymInt", lo: int, hi: int) -> PacketSet | None:
        full = (1 << v.width) - 1
        lo, hi = max(lo, 0), min(hi, full)
        if lo > hi or (lo == 0 and hi == full):
            return None
        return self.space.range(v.field, self._value(v, lo), self._value(v, hi))

    def _value(self, v: "SymInt", x: int):
        # an address field takes address objects: they select the family's width
        if v.field in ADDRESS_FIELDS:
            return ipaddress.IPv4Address(x) if v.width == 32 else ipaddress.IPv6Address(x)
        return x

    def iface_atom(self, field: str, pattern: str) -> PacketSet | None:
        key = ("iface", field, pattern)
        if key in self._cache:
            return self._cache[key]
        from analyzer.engine.packetset import IfaceOrderError

        try:
            atom = self._cache[key] = self.space.iface(field, pattern)
            return atom
        except IfaceOrderError as e:
            self.lose(f"interface {pattern} not declared before a wildcard: {e}")
            return None
        except ValueError as e:  # more names than interface ids
            self.lose(f"interface {pattern}: {e}")
            return None


def one_of(v: Any, values) -> bool:
    """``v in values``, noted as one decision ("the value is one of these") rather than one per
    value, so the packets answering yes stay one class.

    >>> from analyzer.engine.packetset import PacketSpace
    >>> sp = PacketSpace()
    >>> with Recorder(sp) as rec:
    ...     hit = one_of(SymInt(0x12, "tcp_flags", 8), (0x02, 0x12))
    >>> hit, rec.condition == sp.ports("tcp_flags", [0x02, 0x12]), rec.notes
    (True, True, 1)
    """
    r = any(int(v) == int(x) for x in values) if isinstance(v, (SymInt, SymMix)) else v in values
    rec = _ACTIVE
    if rec is not None and isinstance(v, (SymInt, SymMix)):
        atoms = [rec.eq_atom(v, int(x)) if isinstance(v, SymInt) else rec.mix_atom(v, int(x)) for x in values]
        atom = rec.space.empty()
        for a in atoms:
            if a is not None:
                atom = atom | a
        rec.note(atom, r)
    return r


def _lose(what: str) -> None:
    if _ACTIVE is not None:
        _ACTIVE.lose(what)


class SymInt(int):
    """An int taken from input field ``field`` (``width`` bits), as ``(input & keep) ^ xor``.

    Bitwise AND/OR/XOR with plain ints stay symbolic (address-in-network tests and mark
    arithmetic are made of them); comparisons are noted; other arithmetic is noted as lost.
    """

    def __new__(cls, value: int, field: str, width: int, keep: int | None = None, xor: int = 0):
        self = int.__new__(cls, value)
        self.field = field
        self.width = width
        self.keep = (1 << width) - 1 if keep is None else keep
        self.xor = xor
        return self

    def _derive(self, value: int, keep: int, xor: int) -> "SymInt":
        full = (1 << self.width) - 1
        return SymInt(value, self.field, self.width, keep & full, xor & full)

    def _same(self, o: Any) -> bool:
        return isinstance(o, SymInt) and (o.field, o.keep, o.xor) == (self.field, self.keep, self.xor)

    # -- bitwise: stays symbolic
    def __and__(self, o):
        if isinstance(o, (SymInt, SymMix)) or not isinstance(o, int):
            if isinstance(o, (SymInt, SymMix)):
                _lose(f"{self.field} combined with {_fields_of(o)}")
            return int.__and__(int(self), int(o)) if isinstance(o, int) else NotImplemented
        return self._derive(int.__and__(int(self), o), self.keep & o, self.xor & o)

    __rand__ = __and__

    def __or__(self, o):
        if isinstance(o, (SymInt, SymMix)):
            return _combine("or", self, o)
        if not isinstance(o, int):
            return NotImplemented
        return self._derive(int.__or__(int(self), o), self.keep & ~o, (self.xor & ~o) | o)

    __ror__ = __or__

    def __xor__(self, o):
        if isinstance(o, (SymInt, SymMix)):
            return _combine("xor", self, o)
        if not isinstance(o, int):
            return NotImplemented
        return self._derive(int.__xor__(int(self), o), self.keep, self.xor ^ o)

    __rxor__ = __xor__

    # -- decisions: noted
    def __eq__(self, o):
        if type(o) is int:  # a constant, the common case: what the general path below does for it
            r = int.__eq__(self, o)
            rec = _ACTIVE
            if rec is not None:
                rec.note(rec.eq_atom(self, o), r)
            return r
        if not isinstance(o, int):
            return NotImplemented if not isinstance(o, (str, type(None))) else False
        if isinstance(o, (SymInt, SymMix)) and not self._same(o) and _linear_ok(self, o):
            d = self ^ o  # two open values are equal where their XOR is zero
            return d.__eq__(0) if isinstance(d, (SymInt, SymMix)) else d == 0
        r = int.__eq__(int(self), int(o))
        rec = _ACTIVE
        if rec is not None:
            if isinstance(o, SymInt):
                if not self._same(o):
                    rec.lose(f"compares {self.field} with {o.field}")
            else:
                rec.note(rec.eq_atom(self, int(o)), r)
        return r

    def __ne__(self, o):
        r = self.__eq__(o)
        return r if r is NotImplemented else not r

    __hash__ = int.__hash__

    def _order(self, lo: int, hi: int, r: bool, o) -> bool:
        rec = _ACTIVE
        if rec is not None:
            if isinstance(o, SymMix):
                rec.lose(f"orders {self.field} against {_fields_of(o)}")
            elif isinstance(o, SymInt):
                if not self._same(o):
                    rec.lose(f"orders {self.field} against {o.field}")
            elif self.keep != (1 << self.width) - 1 or self.xor:
                rec.lose(f"orders a rewritten {self.field}")
            else:
                rec.note(rec.range_atom(self, lo, hi), r)
        return r

    def __lt__(self, o):
        if not isinstance(o, int):
            return NotImplemented
        return self._order(0, int(o) - 1, int(self) < int(o), o)

    def __le__(self, o):
        if not isinstance(o, int):
            return NotImplemented
        return self._order(0, int(o), int(self) <= int(o), o)

    def __gt__(self, o):
        if not isinstance(o, int):
            return NotImplemented
        return self._order(int(o) + 1, 1 << self.width, int(self) > int(o), o)

    def __ge__(self, o):
        if not isinstance(o, int):
            return NotImplemented
        return self._order(int(o), 1 << self.width, int(self) >= int(o), o)

    def __bool__(self):
        r = int(self) != 0
        rec = _ACTIVE
        if rec is not None:
            rec.note(rec.eq_atom(self, 0), not r)
        return r

    def __int__(self):
        return int.__int__(self)

    def __repr__(self):
        return int.__repr__(self)

    # -- arithmetic: the result is plain, the dependency is lost
    def _arith(name):  # noqa: N805
        op = getattr(int, name)

        def f(self, *a):
            _lose(f"arithmetic ({name.strip('_')}) on {self.field}")
            return op(int(self), *(int(x) if isinstance(x, SymInt) else x for x in a))
        f.__name__ = name
        return f

    for _n in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__",
               "__rfloordiv__", "__mod__", "__rmod__", "__lshift__", "__rlshift__", "__rshift__",
               "__rrshift__", "__neg__", "__invert__", "__pow__", "__truediv__", "__divmod__"):
        locals()[_n] = _arith(_n)
    del _n, _arith


def _fields_of(v) -> str:
    return "+".join(f for f, _ in v.terms) if isinstance(v, SymMix) else v.field


def _terms(v) -> tuple[dict, int]:
    """``v`` as ``XOR over fields of (input & mask)``, XOR a constant: ({field: mask}, constant)."""
    if isinstance(v, SymMix):
        return dict(v.terms), v.xor
    if isinstance(v, SymInt):
        return {v.field: v.keep}, v.xor
    return {}, int(v)


def _linear_ok(a, b) -> bool:
    """Whether two open values combine into one linear value (same width, no address field)."""
    return a.width == b.width and not any(f in ADDRESS_FIELDS for x in (a, b) for f in _terms(x)[0])


def _make(value: int, terms: dict, xor: int, width: int):
    """The simplest form of a linear value: a plain int, a `SymInt` (one field) or a `SymMix`."""
    full = (1 << width) - 1
    terms = {f: m & full for f, m in terms.items() if m & full}
    if not terms:
        return value
    if len(terms) == 1:
        (f, m), = terms.items()
        return SymInt(value, f, width, m, xor & full)
    return SymMix(value, tuple(sorted(terms.items())), xor & full, width)


def _combine(op: str, a, b):
    """``a | b`` or ``a ^ b`` of two open values (or one open value and a constant): a value
    copied between fields with masks (CONNMARK --save-mark, --restore-mark) stays symbolic
    while every bit comes from at most one field under OR, from any under XOR."""
    value = int.__or__(int(a), int(b)) if op == "or" else int.__xor__(int(a), int(b))
    width = a.width if isinstance(a, (SymInt, SymMix)) else b.width
    if isinstance(a, (SymInt, SymMix)) and isinstance(b, (SymInt, SymMix)) and not _linear_ok(a, b):
        _lose(f"{_fields_of(a)} combined with {_fields_of(b)}")
        return value
    ta, xa = _terms(a)
    tb, xb = _terms(b)
    if op == "xor":
        terms = dict(ta)
        for f, m in tb.items():
            terms[f] = terms.get(f, 0) ^ m
        return _make(value, terms, xa ^ xb, width)
    var_a = var_b = 0
    for m in ta.values():
        var_a |= m
    for m in tb.values():
        var_b |= m
    if var_a & var_b:  # a bit open in both: OR is not linear there
        _lose(f"{_fields_of(a)} ORed with {_fields_of(b)} on the same bits")
        return value
    ones = (~var_a & xa) | (~var_b & xb)  # bits a constant 1 forces
    terms = {}
    for t in (ta, tb):
        for f, m in t.items():
            terms[f] = terms.get(f, 0) | (m & ~ones)
    return _make(value, terms, ones | (((xa & var_a) | (xb & var_b)) & ~ones), width)


class SymMix(int):
    """An int made of several input fields of one width: ``XOR over (field & mask) ^ xor``
    (a packet mark into which a connection mark was restored under masks). Bitwise operations
    with constants and other open values stay symbolic; ``==`` and truth are noted over all
    the fields at once; anything else is lost."""

    def __new__(cls, value: int, terms: tuple, xor: int, width: int):
        self = int.__new__(cls, value)
        self.terms = terms
        self.xor = xor
        self.width = width
        return self

    def __and__(self, o):
        if isinstance(o, (SymInt, SymMix)) or not isinstance(o, int):
            if isinstance(o, (SymInt, SymMix)):
                _lose(f"{_fields_of(self)} combined with {_fields_of(o)}")
            return int.__and__(int(self), int(o)) if isinstance(o, int) else NotImplemented
        return _make(int.__and__(int(self), o), {f: m & o for f, m in self.terms}, self.xor & o, self.width)

    __rand__ = __and__

    def __or__(self, o):
        return _combine("or", self, o) if isinstance(o, int) else NotImplemented

    __ror__ = __or__

    def __xor__(self, o):
        return _combine("xor", self, o) if isinstance(o, int) else NotImplemented

    __rxor__ = __xor__

    def __eq__(self, o):
        if not isinstance(o, int):
            return NotImplemented if not isinstance(o, (str, type(None))) else False
        if isinstance(o, (SymInt, SymMix)):
            if not _linear_ok(self, o):
                _lose(f"compares {_fields_of(self)} with {_fields_of(o)}")
                return int.__eq__(int(self), int(o))
            d = self ^ o
            return d.__eq__(0) if isinstance(d, (SymInt, SymMix)) else d == 0
        r = int.__eq__(int(self), int(o))
        rec = _ACTIVE
        if rec is not None:
            rec.note(rec.mix_atom(self, int(o)), r)
        return r

    def __ne__(self, o):
        r = self.__eq__(o)
        return r if r is NotImplemented else not r

    __hash__ = int.__hash__

    def __bool__(self):
        return not self.__eq__(0)

    def __int__(self):
        return int.__int__(self)

    def __repr__(self):
        return int.__repr__(self)

    def _opaque(name):  # noqa: N805
        op = getattr(int, name)

        def f(self, *a):
            _lose(f"{name.strip('_')} on {_fields_of(self)}")
            return op(int(self), *(int(x) if isinstance(x, (SymInt, SymMix)) else x for x in a))
        f.__name__ = name
        return f

    for _n in ("__lt__", "__le__", "__gt__", "__ge__", "__add__", "__radd__", "__sub__", "__rsub__",
               "__mul__", "__rmul__", "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__",
               "__lshift__", "__rlshift__", "__rshift__", "__rrshift__", "__neg__", "__invert__",
               "__pow__", "__truediv__", "__divmod__"):
        locals()[_n] = _opaque(_n)
    del _n, _opaque


class Ghost(SymInt):
    """A value the walk carries but no packet set holds (a connection's original destination,
    when the packets explored are those after a DNAT chosen per original): passing it on, and
    comparing it with itself, decide nothing; any other decision on it (a comparison, a
    network test, arithmetic) is noted as lost, so the class is reported APPROXIMATE instead of
    decided for one value."""

    def __new__(cls, value: int, field: str, width: int):
        return SymInt.__new__(cls, value, field, width)

    def _derive(self, value: int, keep: int, xor: int):
        _lose(f"a decision on the {self.field}")
        return value

    def __eq__(self, o):
        if o is self:
            return True
        if isinstance(o, Ghost) and o.field == self.field:
            return int.__eq__(self, o)
        if not isinstance(o, int):
            return NotImplemented if not isinstance(o, (str, type(None))) else False
        _lose(f"a decision on the {self.field}")
        return int.__eq__(int(self), int(o))

    def __ne__(self, o):
        r = self.__eq__(o)
        return r if r is NotImplemented else not r

    __hash__ = int.__hash__

    def _order(self, lo: int, hi: int, r: bool, o) -> bool:
        _lose(f"a decision on the {self.field}")
        return r

    def __bool__(self):
        _lose(f"a decision on the {self.field}")
        return int(self) != 0


class _SymAddress:
    """What an open address refuses to be without losing its class: a number or packed bytes."""

    __slots__ = ()

    def __int__(self):
        _lose("an open address used as a number")
        return int.__int__(self._ip)

    @property
    def packed(self):
        _lose("an open address hashed or packed (e.g. NAT to a range)")
        return int.__int__(self._ip).to_bytes(self.max_prefixlen // 8, "big")


def in_network(addr, net) -> bool:
    """``addr in net`` (ipaddress's masked compare), for an open address noted as the very
    decision ``addr._ip & netmask == network`` notes, with the atom kept per question in the
    exploration's cache instead of derived anew per test (a walk asks ~30 of them).

    >>> from analyzer.engine.packetset import PacketSpace
    >>> sp = PacketSpace()
    >>> with Recorder(sp) as rec:
    ...     hit = in_network(sym_address(0x0A000001, "src", 4), ipaddress.ip_network("10.0.0.0/8"))
    >>> hit, rec.condition == sp.prefix("src", "10.0.0.0/8")
    (True, True)
    """
    sym = addr._ip
    if type(sym) is not SymInt or addr._version != net._version:
        return addr in net
    mask, value = net.netmask._ip, net.network_address._ip
    hit = int.__int__(sym) & mask == value
    rec = _ACTIVE
    if rec is not None:
        key = ("in", sym.field, sym.width, sym.keep, sym.xor, value, mask)
        cache = rec._cache
        atom = cache.get(key, False)
        if atom is False:
            atom = cache[key] = rec.eq_atom(sym & mask, value)
        rec.note(atom, hit)
    return hit


_V4_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_V4_MULTICAST = ipaddress.IPv4Network("224.0.0.0/4")
_V6_MULTICAST = ipaddress.IPv6Network("ff00::/8")
_V6_LINK_LOCAL = ipaddress.IPv6Network("fe80::/10")


class _SymV4(_SymAddress, ipaddress.IPv4Address):
    __slots__ = ()

    # the network tests a walk asks most, through in_network (the same decisions noted)
    @property
    def is_loopback(self):
        return in_network(self, _V4_LOOPBACK)

    @property
    def is_multicast(self):
        return in_network(self, _V4_MULTICAST)


class _SymV6(_SymAddress, ipaddress.IPv6Address):
    __slots__ = ()

    @property
    def is_multicast(self):
        return in_network(self, _V6_MULTICAST)

    @property
    def is_link_local(self):
        return in_network(self, _V6_LINK_LOCAL)


def sym_address(value: int, field: str, family: int, keep: int | None = None, xor: int = 0):
    """An address from input field ``field`` (its bits ``keep``, XOR ``xor``)."""
    width = 32 if family == 4 else 128
    addr = (_SymV4 if family == 4 else _SymV6)(int(value))  # checked as a plain int: nothing noted
    addr._ip = SymInt(value, field, width, keep, xor)
    return addr


def ghost_address(field: str, family: int):
    """An address no packet set holds (`Ghost`), e.g. a connection's original destination."""
    addr = (_SymV4 if family == 4 else _SymV6)(0)
    addr._ip = Ghost(0, field, 32 if family == 4 else 128)
    return addr


def is_ghost(v: Any) -> bool:
    """Whether ``v`` (an int or address) is a `Ghost`."""
    return isinstance(v, Ghost) or isinstance(getattr(v, "_ip", None), Ghost)


def is_sym(v: Any) -> "SymInt | SymMix | SymStr | None":
    """The symbolic value behind ``v`` (an int, str or address), or None when it is constant."""
    if isinstance(v, (SymInt, SymMix, SymStr)):
        return v
    ip = getattr(v, "_ip", None)
    return ip if isinstance(ip, SymInt) else None


class SymStr(str):
    """An interface name taken from input field ``field``; equality and prefix tests are noted."""

    def __new__(cls, value: str, field: str):
        self = str.__new__(cls, value)
        self.field = field
        return self

    def __eq__(self, o):
        r = str.__eq__(str(self), o)
        rec = _ACTIVE
        if rec is not None and isinstance(o, str) and r is not NotImplemented:
            if isinstance(o, SymStr):
                if o.field != self.field:
                    rec.lose(f"compares {self.field} with {o.field}")
            else:
                rec.note(rec.iface_atom(self.field, str(o)), r)
        return r

    def __ne__(self, o):
        r = self.__eq__(o)
        return r if r is NotImplemented else not r

    __hash__ = str.__hash__

    def startswith(self, prefix, *a):
        r = str.startswith(str(self), prefix, *a)
        rec = _ACTIVE
        if rec is not None:
            if a or not isinstance(prefix, str):
                rec.lose(f"unusual prefix test on {self.field}")
            else:
                rec.note(rec.iface_atom(self.field, prefix + "+") if prefix else None, r)
        return r

    def __str__(self):
        return str.__str__(self)

    def _opaque(name):  # noqa: N805
        op = getattr(str, name)

        def f(self, *a):
            _lose(f"string operation {name.strip('_')} on {self.field}")
            return op(str(self), *a)
        f.__name__ = name
        return f

    for _n in ("endswith", "__contains__", "__getitem__", "__lt__", "__le__", "__gt__", "__ge__",
               "find", "index", "split", "partition", "rstrip", "lstrip", "strip"):
        locals()[_n] = _opaque(_n)
    del _n, _opaque
