"""Symbolic engine, packet-set layer: sets of packets as BDDs over packet header fields.

Generic over header fields and conntrack state; knows nothing of tables, chains or targets.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

try:  # CUDD is ~50x faster; the pure-Python manager has the same API.
    from dd import cudd as _cudd
except ImportError:  # pragma: no cover - depends on how dd was built
    _cudd = None
from dd import autoref as _autoref

__all__ = [
    "LAYOUT", "ADDRESS_FIELDS", "CTSTATE_BITS", "CT_STATES", "TCP_FLAG_BITS",
    "IFACE_NONE", "IFACE_OTHER", "IfaceOrderError", "Flow", "PacketSet", "PacketSpace",
]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Header fields in BDD variable order, top first: (name, width in bits).  Each field is one
#: contiguous block of variables, most significant bit first, except that a tuple of names
#: interleaves those fields bit by bit (MSB of each, then the next bit of each, ...).
#: `family` and `proto` sit on top because nearly every match tests them; `dst` and `dport`
#: follow because rule sets with thousands of "address + port" matches branch on them, so
#: their union is a trie over dst/dport with everything below shared as one suffix.  `mark`
#: and `connmark` are interleaved because marks are copied between them: `mark == connmark`
#: is 3 nodes per bit interleaved and 2^32 nodes as two blocks.  `ctstate` is last: the
#: universe's one-state-per-packet constraint then hangs below every set, built once.
#: Alternatives are measured by tests/engine/bench_packetset.py (see its docstring).
LAYOUT: tuple[tuple[str | tuple[str, ...], int], ...] = (
    ("family", 1),      # 0 = IPv4, 1 = IPv6
    ("proto", 8),       # IP protocol / IPv6 next header
    ("dst", 128),       # IPv4: low 32 bits (see PacketSpace on the high 96)
    ("dport", 16),
    ("src", 128),
    ("sport", 16),
    ("icmp_type", 8),
    ("icmp_code", 8),
    ("iif", 8),         # interned interface ids, see PacketSpace
    ("oif", 8),
    (("mark", "connmark"), 32),  # packet mark, conntrack mark
    ("tcp_flags", 8),   # TCP_FLAG_BITS: byte 13 of the TCP header
    ("uid", 32),        # socket owner, locally generated packets only
    ("gid", 32),
    ("ctstate", 7),     # CTSTATE_BITS, one variable per flag
)

#: 128-bit address fields; an IPv4 address is the low 32 bits, the high 96 bits being zero.
from analyzer.engine.fields import ADDRESS_FIELDS  # noqa: E402,F401 (defined once, re-exported)

#: Conntrack state flags as bit values of the `ctstate` field.  A packet is in exactly one of
#: the five CT_STATES; SNAT and DNAT say its connection was translated and combine with any.
CTSTATE_BITS: Mapping[str, int] = {
    "NEW": 0x01, "ESTABLISHED": 0x02, "RELATED": 0x04, "INVALID": 0x08,
    "UNTRACKED": 0x10, "SNAT": 0x20, "DNAT": 0x40,
}
CT_STATES = ("NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED")

#: TCP flags as bit values of the `tcp_flags` field, as in the TCP header.
TCP_FLAG_BITS: Mapping[str, int] = {
    "FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08,
    "ACK": 0x10, "URG": 0x20, "ECE": 0x40, "CWR": 0x80,
}

_FLAG_FIELDS: Mapping[str, Mapping[str, int]] = {"ctstate": CTSTATE_BITS, "tcp_flags": TCP_FLAG_BITS}
_IFACE_FIELDS = ("iif", "oif")

#: Interface id of "no interface": no input device on locally generated packets, no output
#: device before the routing decision.
IFACE_NONE = 0
#: Interface id of "an interface named nowhere and covered by no wildcard".
IFACE_OTHER = 255
_IFACE_IDS = range(1, 255)

_PORT_PROTOS = {6: "tcp", 17: "udp", 132: "sctp", 33: "dccp", 136: "udplite"}
_ICMP_PROTOS = {1: "icmp", 58: "icmpv6"}
_OTHER_PROTOS = {0: "hopopt", 2: "igmp", 4: "ipip", 41: "ipv6", 47: "gre", 50: "esp", 51: "ah",
                 89: "ospf", 112: "vrrp"}
_EPHEMERAL_PORTS = (32768, 60999)  # Linux net.ipv4.ip_local_port_range default
_NETWORKS = (ipaddress.IPv4Network, ipaddress.IPv6Network)
_ADDRESSES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


class IfaceOrderError(ValueError):
    """An interface name arrived after a wildcard covering it was already used in a set.

    Sets built from that wildcard count the name as "some other interface with that prefix";
    giving it its own id afterwards would silently drop it from them.  Declare every name up
    front (``PacketSpace(interfaces=...)`` or `PacketSpace.declare_interfaces`).
    """


# --------------------------------------------------------------------------------------------
# one concrete packet
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Flow:
    """One concrete packet; ``str()`` prints it the way an operator writes a flow.

    Addresses may be given as text; ``family`` (4 or 6) follows from them.

    >>> str(Flow("10.0.0.1", "10.0.0.2", sport=1234, dport=80))
    'tcp 10.0.0.1:1234 -> 10.0.0.2:80'
    >>> str(Flow("2001:db8::1", "2001:db8::2", proto=58, icmp_type=128, iif="eth0"))
    'icmpv6 2001:db8::1 -> 2001:db8::2 type 128 code 0 iif eth0'
    """

    src: IPAddress
    dst: IPAddress
    proto: int = 6
    sport: int = 0
    dport: int = 0
    icmp_type: int = 0
    icmp_code: int = 0
    iif: str | None = None
    oif: str | None = None
    ctstate: frozenset[str] = frozenset({"NEW"})
    mark: int = 0
    connmark: int = 0
    tcp_flags: frozenset[str] = frozenset()
    uid: int = 0
    gid: int = 0
    family: int = 0  # IP version, 4 or 6; 0 = take it from src

    def __post_init__(self) -> None:
        src, dst = ipaddress.ip_address(self.src), ipaddress.ip_address(self.dst)
        if src.version != dst.version:
            raise ValueError(f"flow mixes IPv{src.version} and IPv{dst.version}: {src} -> {dst}")
        if self.family not in (0, src.version):
            raise ValueError(f"family {self.family} but addresses are IPv{src.version}")
        ctstate = frozenset(self.ctstate.split(",") if isinstance(self.ctstate, str) else self.ctstate)
        tcp_flags = frozenset(self.tcp_flags.split(",") if isinstance(self.tcp_flags, str)
                              else self.tcp_flags)
        if unknown := ctstate - CTSTATE_BITS.keys():
            raise ValueError(f"unknown conntrack state {sorted(unknown)}")
        if len(ctstate & set(CT_STATES)) != 1:
            raise ValueError(f"a packet has exactly one of {CT_STATES}, got {sorted(ctstate)}")
        if unknown := tcp_flags - TCP_FLAG_BITS.keys():
            raise ValueError(f"unknown TCP flag {sorted(unknown)}")
        for name, value in (("src", src), ("dst", dst), ("family", src.version),
                            ("ctstate", ctstate), ("tcp_flags", tcp_flags)):
            object.__setattr__(self, name, value)

    def __str__(self) -> str:
        p = self.proto
        if p in _PORT_PROTOS:
            text = f"{_PORT_PROTOS[p]} {_hostport(self.src, self.sport)} -> {_hostport(self.dst, self.dport)}"
        elif p in _ICMP_PROTOS:
            text = f"{_ICMP_PROTOS[p]} {self.src} -> {self.dst} type {self.icmp_type} code {self.icmp_code}"
        else:
            text = f"{_OTHER_PROTOS.get(p, f'proto {p}')} {self.src} -> {self.dst}"
        extra = [f"{k} {v}" for k, v in (("iif", self.iif), ("oif", self.oif)) if v is not None]
        if self.ctstate != {"NEW"}:
            extra.append("ctstate " + ",".join(n for n in CTSTATE_BITS if n in self.ctstate))
        if self.tcp_flags:
            extra.append("flags " + ",".join(n for n in TCP_FLAG_BITS if n in self.tcp_flags))
        extra += [f"{k} {v:#x}" for k, v in (("mark", self.mark), ("connmark", self.connmark)) if v]
        extra += [f"{k} {v}" for k, v in (("uid", self.uid), ("gid", self.gid)) if v]
        return " ".join([text, *extra])


def _groups(layout) -> tuple[tuple[tuple[str, ...], int], ...]:
    return tuple(((f,) if isinstance(f, str) else tuple(f), w) for f, w in layout)


def _hostport(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


# --------------------------------------------------------------------------------------------
# the space: one BDD manager, the variable layout, interned interfaces
# --------------------------------------------------------------------------------------------

#: how many descent steps a space remembers (`PacketSpace._at_until`) before it forgets them all:
#: the 10,000-service open flow remembers about 500
_MAX_STEPS = 100_000


class PacketSpace:
    """The universe of packets: one BDD manager and the variable layout of `LAYOUT`.

    Well-formedness.  The universe holds every packet with exactly one conntrack state among
    NEW/ESTABLISHED/RELATED/INVALID/UNTRACKED (`ctstate_one_hot`); every `PacketSet` is a
    subset of it, so complement, equality and emptiness never see a stateless packet.  Fields
    without meaning for a packet (ports of ICMP, uid of forwarded traffic) stay free.

    IPv4 addresses.  An IPv4 address is the low 32 bits of `src`/`dst`; its high 96 bits are
    zero in every value this module returns (`pick`, `Flow`).  Inside the BDD they are left
    *free* for family 0: every set is closed under changing them, so one IPv4 packet is a
    class of bit-vectors that sets never split.  A "/32 + port" match is then 57 nodes, not
    153, which halves its build time and makes unions of thousands of them ~4x faster (see
    the bench), at no cost in precision.  Operations that compute on whole 128-bit values (a
    plain int on an address field; `exists`/`restrict`/`masked_assign`/`copy_masked`
    touching an address or `family`) pin the high bits to zero, compute, and free them again.

    Interfaces.  `iif`/`oif` hold 8-bit ids interned by name: 0 is "no interface", 255 is "an
    interface named nowhere", and each wildcard prefix (``eth+``) reserves one id for "an
    interface with that prefix that is not named anywhere, nor under a longer wildcard".  A
    wildcard is then the OR of the names it covers and of the reserved ids of every wildcard
    it covers, itself included; a negated name still contains unnamed interfaces.  This stays
    sound while no name or longer wildcard is interned after a wildcard covering it was used
    in a set: that raises `IfaceOrderError`, so declare all names before building sets.
    At most 254 names and wildcards.
    """

    def __init__(self, layout: Iterable[tuple[str | tuple[str, ...], int]] = LAYOUT, *,
                 backend: str | None = None, interfaces: Iterable[str] = ()):
        layout = tuple(((f,) if isinstance(f, str) else tuple(f), int(w)) for f, w in layout)
        flat = sorted((f, w) for group, w in layout for f in group)
        if flat != sorted((f, w) for group, w in _groups(LAYOUT) for f in group):
            raise ValueError("layout must order exactly the fields of LAYOUT, with their widths")
        self.layout = layout
        self.widths: dict[str, int] = dict(flat)
        self.fields: tuple[str, ...] = tuple(f for group, _ in layout for f in group)
        if backend is None:
            backend = "cudd" if _cudd is not None else "autoref"
        if backend == "cudd" and _cudd is not None:
            self.bdd = _cudd.BDD()
        elif backend == "autoref":
            self.bdd = _autoref.BDD()
        else:
            raise ValueError(f"BDD backend {backend!r} is not available (cudd, autoref)")
        self.backend = backend
        bdd = self.bdd
        # A fixed order keeps construction cost predictable; automatic sifting would reorder
        # under callers' feet and did not pay for itself on the bench.
        bdd.configure(reordering=False)
        self._vars: dict[str, tuple[str, ...]] = {
            f: tuple(f"{f}_{self.widths[f] - 1 - p}" for p in range(self.widths[f]))
            for f in self.fields}  # MSB first
        bdd.declare(*(self._vars[f][p] for group, w in layout for p in range(w) for f in group))
        self._var_bit: dict[str, tuple[str, int]] = {
            v: (f, self.widths[f] - 1 - p) for f in self.fields for p, v in enumerate(self._vars[f])}
        self._pos = {f: tuple(bdd.var(v) for v in vs) for f, vs in self._vars.items()}
        self._neg = {f: tuple(~x for x in xs) for f, xs in self._pos.items()}
        self._level = {f: bdd.level_of_var(vs[0]) for f, vs in self._vars.items()}
        self._chunks: dict[tuple[str, int, int, int], Any] = {}
        self._cubes: dict[tuple, Any] = {}  # quantified variables -> their cube (_exist)
        self._true, self._false = bdd.true, bdd.false

        states = [self._pos["ctstate"][self._position("ctstate", CTSTATE_BITS[s])] for s in CT_STATES]
        one_hot = self._false
        for i, lit in enumerate(states):
            for j, other in enumerate(states):
                if j != i:
                    lit &= ~other
            one_hot |= lit
        self._u = one_hot
        self._fam = {4: self._neg["family"][0], 6: self._pos["family"][0]}
        self._u_family = {v: lit & one_hot for v, lit in self._fam.items()}
        # the "representative" universe: IPv4 packets with their high address bits zero
        self._hi_vars = [v for f in ADDRESS_FIELDS for v in self._vars[f][:96]]
        self._hi_zero = self._bits("dst", 0, 96, 0, self._bits("src", 0, 96, 0, self._true))
        self._rep_u = one_hot & (self._fam[6] | self._hi_zero)

        self._iface_ids: dict[str, int] = {}
        self._wild_ids: dict[str, int] = {}
        self._iface_by_id: dict[int, tuple[str, bool]] = {}  # id -> (name or prefix, is wildcard)
        self._used_wildcards: set[str] = set()
        # per BDD level, the field and bit (shift from the LSB) its variable holds, and the level
        # where the byte of that bit ends: `_at` descends by the values of a point without
        # building its cube, a byte at a time (`_at_until`)
        self._level_bit: list = [None] * len(self._var_bit)
        for v, (f, bit) in self._var_bit.items():
            last = bdd.level_of_var(self._vars[f][self.widths[f] - 1 - (bit & ~7)])
            self._level_bit[bdd.level_of_var(v)] = (f, bit, last + 1)
        self._steps: dict = {}  # (node, byte value) -> (node, the node one byte further down)
        self._last_level = {f: bdd.level_of_var(vs[-1]) for f, vs in self._vars.items()}
        self._next_iface = iter(_IFACE_IDS)
        self.declare_interfaces(interfaces)
        self._prefer: dict[str, int] | tuple = {"proto": 6, "sport": _EPHEMERAL_PORTS[0]}

    def __repr__(self) -> str:
        return f"<PacketSpace {self.backend} {len(self._var_bit)} vars>"

    @property
    def preferences(self) -> dict[str, int] | tuple[PacketSet, ...]:
        """What `PacketSet.pick` prefers by default: ``{field: value}`` (default: TCP and the
        first ephemeral source port) or a sequence of sets; ``()`` for the lowest values."""
        if isinstance(self._prefer, dict):
            return dict(self._prefer)
        return tuple(self._set(n) for n in self._prefer)

    @preferences.setter
    def preferences(self, prefer: Mapping[str, int] | Iterable[PacketSet]) -> None:
        self._prefer = self._preference(prefer)

    def _preference(self, prefer: Mapping[str, int] | Iterable[PacketSet]) -> dict[str, int] | tuple:
        # sets are kept as nodes: a set refers to its space, and the pure-Python manager
        # refuses to be collected in a reference cycle with its own nodes
        if isinstance(prefer, Mapping):
            for f, v in prefer.items():
                self._check_value(f, v)
            return dict(prefer)
        return tuple(self._own(s)._node for s in prefer)

    # ---- sets -------------------------------------------------------------------------------

    def _set(self, node) -> PacketSet:
        return PacketSet(self, node)

    def universe(self) -> PacketSet:
        """Every well-formed packet."""
        return self._set(self._u)

    def empty(self) -> PacketSet:
        return self._set(self._false)

    def ctstate_one_hot(self) -> PacketSet:
        """Packets in exactly one conntrack state: the constraint the universe is made of."""
        return self._set(self._u)

    def family(self, version: int) -> PacketSet:
        """All IPv4 (``4``) or all IPv6 (``6``) packets."""
        return self._set(self._u_family[version])

    def eq(self, field: str, value: int | str | IPAddress) -> PacketSet:
        """``field == value``.  An address (`ipaddress` object or text) fixes the family too;
        a plain int on an address field is its 128-bit value, of either family.  Interface
        fields take a name."""
        return self._set(self._build([self._spec_eq(field, value)]))

    def range(self, field: str, lo: int | str | IPAddress, hi: int | str | IPAddress) -> PacketSet:
        """``lo <= field <= hi``, inclusive, built from two comparators (O(width) BDD ops)."""
        return self._set(self._build([self._spec_range(field, lo, hi)]))

    def ports(self, field: str, ranges: Iterable[int | tuple[int, int]]) -> PacketSet:
        """The union of ranges of a (non-address) field; an int is a one-value range."""
        node = self._false
        for r in ranges:
            lo, hi = (r, r) if isinstance(r, int) else r
            node |= self._build([self._spec_range(field, lo, hi)])
        return self._set(node)

    def prefix(self, field: str, network: str | IPNetwork | IPAddress) -> PacketSet:
        """Addresses in ``network``, host bits ignored as the kernel's masked compare does;
        fixes the family."""
        return self._set(self._build([self._spec_prefix(field, network)]))

    def masked(self, field: str, value: int | IPAddress, mask: int | IPAddress) -> PacketSet:
        """``field & mask == value``; empty when ``value`` has bits outside ``mask``.  On an
        address field, address objects select that family's width (non-contiguous netmasks)."""
        return self._set(self._build([self._spec_masked(field, value, mask)]))

    def linear(self, terms: Mapping[str, int], value: int) -> PacketSet:
        """Packets where the XOR over fields of ``field & mask`` equals ``value``, bit by bit:
        what a value copied between fields with masks is compared with (``terms`` maps each
        field, of one width and not an address, to the bits of it that reach the value).

        >>> s = PacketSpace()
        >>> s.linear({"mark": 0xf0}, 0x10) == s.masked("mark", 0x10, 0xf0)
        True
        >>> both = s.linear({"mark": 0xff, "connmark": 0x0f}, 0x0)   # mark ^ (connmark & 0xf) == 0
        >>> (both & s.eq("mark", 0x3) & s.eq("connmark", 0x13)).is_empty(), (both & s.eq("mark", 0x4) & s.eq("connmark", 0x3)).is_empty()
        (False, True)
        """
        widths = {self.widths[f] for f in terms}
        if len(widths) != 1 or any(f in ADDRESS_FIELDS for f in terms):
            raise ValueError(f"linear needs non-address fields of one width, got {sorted(terms)}")
        (width,) = widths
        self._check_value(next(iter(terms)), value)
        node = self._true
        for k in range(width):
            bit = self._false if not value >> k & 1 else self._true
            lit = None
            for f, mask in terms.items():
                if mask >> k & 1:
                    v = self._pos[f][width - 1 - k]
                    lit = v if lit is None else self.bdd.apply("xor", lit, v)
            if lit is None:
                if value >> k & 1:
                    return self.empty()
                continue
            node = (lit if bit == self._true else ~lit) & node
        return self._set(node & self._u)

    def flag_value(self, field: str, names: Iterable[str] | str) -> int:
        """The bits of named flags of `ctstate` or `tcp_flags` (``"SYN,ACK"`` or a list)."""
        table = _FLAG_FIELDS[field]
        if isinstance(names, str):
            names = names.split(",") if names else ()
        value = 0
        for n in names:
            if n.upper() not in table:
                raise ValueError(f"unknown {field} flag {n!r}; known: {', '.join(table)}")
            value |= table[n.upper()]
        return value

    def any_flag(self, field: str, names: Iterable[str] | str) -> PacketSet:
        """Packets with at least one of the named flags set (``"NEW,ESTABLISHED"``)."""
        value = self.flag_value(field, names)
        w = self.widths[field]
        node = self._false
        for p, lit in enumerate(self._pos[field]):
            if value >> (w - 1 - p) & 1:
                node |= lit
        return self._set(node & self._u)

    def iface(self, field: str, name: str) -> PacketSet:
        """Packets whose interface `field` (`iif`/`oif`) is ``name``.  A trailing ``+`` matches
        every interface starting with the rest; ``+`` alone matches any interface."""
        return self._set(self._build([self._spec_iface(field, name)]))

    def where(self, **constraints: Any) -> PacketSet:
        """The conjunction of per-field constraints, built in one bottom-up pass (the fast way
        to build a match).  A value is an int or address (`eq`), a ``(lo, hi)`` tuple (`range`),
        a network or ``"a.b.c.d/n"`` (`prefix`), or an interface name (`iface`).

        >>> s = PacketSpace()
        >>> s.where(proto=6, dst="10.96.0.1/32", dport=443) == (
        ...     s.eq("proto", 6) & s.prefix("dst", "10.96.0.1/32") & s.eq("dport", 443))
        True
        """
        specs = []
        for field, value in constraints.items():
            if isinstance(value, tuple):
                lo, hi = value
                if lo == hi and isinstance(lo, int) and field not in ADDRESS_FIELDS:
                    specs.append(self._spec_eq(field, lo))  # one cube from cached pieces
                else:
                    specs.append(self._spec_range(field, lo, hi))
            elif field in _IFACE_FIELDS and isinstance(value, str):
                specs.append(self._spec_iface(field, value))
            elif field in ADDRESS_FIELDS and (isinstance(value, _NETWORKS)
                                              or isinstance(value, str) and "/" in value):
                specs.append(self._spec_prefix(field, value))
            else:
                specs.append(self._spec_eq(field, value))
        return self._set(self._build(specs))

    def union(self, sets: Iterable[PacketSet]) -> PacketSet:
        """The OR of many sets.  A left fold: each OR only walks the new set's paths, which
        beats a balanced tree of ORs on large unions of small sets (see the bench)."""
        node = self._false
        for s in sets:
            node = node | self._own(s)._node
        return self._set(node)

    # ---- concrete packets -------------------------------------------------------------------

    def from_flow(self, flow: Flow) -> PacketSet:
        """The one-packet set of ``flow``.  Interface names are resolved, not interned: an
        unknown name falls under its longest wildcard's reserved id, else `IFACE_OTHER`."""
        values = self.flow_values(flow)
        node = self._true
        for f in reversed(self.fields):
            if f in ADDRESS_FIELDS and flow.family == 4:
                node = self._bits(f, 96, 32, values[f], node)
            else:
                node = self._bits(f, 0, self.widths[f], values[f], node)
        return self._set(node)  # every field fixed, one state: inside the universe

    def flow_values(self, flow: Flow) -> dict[str, int]:
        """The field values of ``flow`` as ints (the inverse of `to_flow`)."""
        return {
            "family": 0 if flow.family == 4 else 1,
            "src": int(flow.src), "dst": int(flow.dst), "proto": flow.proto,
            "sport": flow.sport, "dport": flow.dport,
            "icmp_type": flow.icmp_type, "icmp_code": flow.icmp_code,
            "iif": self.resolve_iface(flow.iif), "oif": self.resolve_iface(flow.oif),
            "ctstate": self.flag_value("ctstate", flow.ctstate),
            "tcp_flags": self.flag_value("tcp_flags", flow.tcp_flags),
            "mark": flow.mark, "connmark": flow.connmark, "uid": flow.uid, "gid": flow.gid,
        }

    def to_flow(self, values: Mapping[str, int]) -> Flow:
        """A `Flow` from field values as `PacketSet.pick` returns them."""
        v4 = values.get("family", 0) == 0
        addr = ipaddress.IPv4Address if v4 else ipaddress.IPv6Address
        mask = 0xFFFFFFFF if v4 else (1 << 128) - 1
        ct, flags = values.get("ctstate", CTSTATE_BITS["NEW"]), values.get("tcp_flags", 0)
        return Flow(
            src=addr(values.get("src", 0) & mask), dst=addr(values.get("dst", 0) & mask),
            proto=values.get("proto", 0), sport=values.get("sport", 0), dport=values.get("dport", 0),
            icmp_type=values.get("icmp_type", 0), icmp_code=values.get("icmp_code", 0),
            iif=self.iface_name(values.get("iif", 0)), oif=self.iface_name(values.get("oif", 0)),
            ctstate=frozenset(n for n, b in CTSTATE_BITS.items() if ct & b),
            tcp_flags=frozenset(n for n, b in TCP_FLAG_BITS.items() if flags & b),
            mark=values.get("mark", 0), connmark=values.get("connmark", 0),
            uid=values.get("uid", 0), gid=values.get("gid", 0),
        )

    # ---- interfaces ---------------------------------------------------------------------------

    def declare_interfaces(self, names: Iterable[str]) -> None:
        """Intern names and ``prefix+`` wildcards, in any order, before sets use them."""
        for name in names:
            if name.endswith("+"):
                if name != "+":
                    self._intern_wildcard(name[:-1])
            else:
                self.iface_id(name)

    def iface_id(self, name: str) -> int:
        """The id of interface ``name``, interning it on first use."""
        if (i := self._iface_ids.get(name)) is not None:
            return i
        if not name or name.endswith("+"):
            raise ValueError(f"not an interface name: {name!r}")
        self._check_late(name, f"interface {name!r}")
        i = self._alloc_iface()
        self._iface_ids[name] = i
        self._iface_by_id[i] = (name, False)
        return i

    def resolve_iface(self, name: str | None) -> int:
        """The id a concrete interface ``name`` falls under, without interning it."""
        if name is None:
            return IFACE_NONE
        if (i := self._iface_ids.get(name)) is not None:
            return i
        prefixes = [p for p in self._wild_ids if name.startswith(p)]
        return self._wild_ids[max(prefixes, key=len)] if prefixes else IFACE_OTHER

    def iface_name(self, i: int) -> str | None:
        """A name for id ``i``: the interned name, or for a reserved or unused id an invented
        name that `resolve_iface` maps back to the same meaning."""
        if i == IFACE_NONE:
            return None
        name, wild = self._iface_by_id.get(i, ("", True))
        return self._invent_name(name) if wild else name

    def _alloc_iface(self) -> int:
        try:
            return next(self._next_iface)
        except StopIteration:
            raise ValueError(f"more than {len(_IFACE_IDS)} interface names and wildcards") from None

    def _intern_wildcard(self, prefix: str) -> int:
        if (i := self._wild_ids.get(prefix)) is not None:
            return i
        self._check_late(prefix, f"wildcard {prefix}+")
        i = self._alloc_iface()
        self._wild_ids[prefix] = i
        self._iface_by_id[i] = (prefix, True)
        return i

    def _check_late(self, name: str, what: str) -> None:
        for p in self._used_wildcards:
            if name.startswith(p):  # "eth+" covers "eth" itself too
                raise IfaceOrderError(f"{what} interned after wildcard {p}+ was used in a set; "
                                      "declare all interface names first")

    def _invent_name(self, prefix: str) -> str:
        """A name that is not interned and whose longest wildcard prefix is ``prefix``
        (for ``""``: that no wildcard covers)."""
        base = prefix or "if"
        for k in range(100000):
            cand = f"{base}{k}"
            if cand not in self._iface_ids and max(
                    (p for p in self._wild_ids if cand.startswith(p)), key=len, default="") == prefix:
                return cand
        raise ValueError(f"cannot invent an interface name under {prefix!r}")  # pragma: no cover

    # ---- building: constraints are specs, ANDed bottom-up onto the universe ------------------
    #
    # A spec is (level, kind, payload, family): kind "cube" has payload (field, start, length,
    # value), a cube over positions [start, start+length) (0 = MSB) built from cached 8-bit
    # pieces; kind "node" has a ready BDD node.  Cubes are ANDed in from the lowest level up,
    # so each AND only walks its own piece; this is what makes a /32 + port match cheap.

    def _build(self, specs: list[tuple]) -> Any:
        fam = None
        for spec in specs:
            if spec[3] is not None:
                if fam not in (None, spec[3]):
                    return self._false
                fam = spec[3]
        node = self._u
        nodes = []
        for _, kind, payload, _ in sorted(specs, key=lambda s: -s[0]):
            if kind == "cube":
                node = self._bits(*payload, node)
            else:
                nodes.append(payload)
        for extra in nodes:
            node = extra & node
        return node if fam is None else self._fam[fam] & node

    def _spec_eq(self, field: str, value: Any) -> tuple:
        if field in ADDRESS_FIELDS:
            if isinstance(value, int):
                self._check_value(field, value)
                return self._spec_node(field, self._from_rep(self._bits(field, 0, 128, value, self._rep_u)))
            addr = value if isinstance(value, _ADDRESSES) else ipaddress.ip_address(value)
            if addr.version == 4:
                return self._level[field], "cube", (field, 96, 32, int(addr)), 4
            return self._level[field], "cube", (field, 0, 128, int(addr)), 6
        if field in _IFACE_FIELDS and isinstance(value, str):
            value = self.iface_id(value)
        self._check_value(field, value)
        return self._level[field], "cube", (field, 0, self.widths[field], value), None

    def _spec_prefix(self, field: str, network: Any) -> tuple:
        if field not in ADDRESS_FIELDS:
            raise ValueError(f"prefix needs an address field {ADDRESS_FIELDS}, not {field!r}")
        if not isinstance(network, _NETWORKS):
            network = ipaddress.ip_network(network, strict=False)
        plen, v = network.prefixlen, network.version
        width = 32 if v == 4 else 128
        value = int(network.network_address) >> (width - plen)
        return self._level[field], "cube", (field, 128 - width, plen, value), v

    def _spec_range(self, field: str, lo: Any, hi: Any) -> tuple:
        if field in ADDRESS_FIELDS and not isinstance(lo, int):
            lo, hi = ipaddress.ip_address(lo), ipaddress.ip_address(hi)
            if lo.version != hi.version:
                raise ValueError(f"address range mixes families: {lo}-{hi}")
            start, width = (96, 32) if lo.version == 4 else (0, 128)
            node = self._range_bits(field, start, width, int(lo), int(hi))
            return self._level[field], "node", node, lo.version
        if field in _IFACE_FIELDS and isinstance(lo, str):
            raise ValueError("interface ranges are meaningless; use iface()")
        self._check_value(field, lo)
        self._check_value(field, hi)
        node = self._range_bits(field, 0, self.widths[field], lo, hi)
        if field in ADDRESS_FIELDS:
            return self._spec_node(field, self._from_rep(node & self._rep_u))
        return self._level[field], "node", node, None

    def _spec_masked(self, field: str, value: Any, mask: Any) -> tuple:
        fam, start, width = None, 0, self.widths.get(field, 0)
        if field in ADDRESS_FIELDS and isinstance(value, _ADDRESSES):
            fam = value.version
            start, width = (96, 32) if fam == 4 else (0, 128)
            value, mask = int(value), int(mask)
            if not 0 <= mask < 1 << width:
                raise ValueError(f"mask {mask:#x} wider than IPv{fam}")
        else:
            self._check_value(field, value)
            self._check_value(field, mask)
        if value & ~mask:
            return self._level[field], "node", self._false, fam
        node = self._masked_bits(field, start, width, value, mask)
        if field in ADDRESS_FIELDS and fam is None:
            return self._spec_node(field, self._from_rep(node & self._rep_u))
        return self._level[field], "node", node, fam

    def _spec_iface(self, field: str, name: str) -> tuple:
        if field not in _IFACE_FIELDS:
            raise ValueError(f"{field!r} is not an interface field {_IFACE_FIELDS}")
        if not name.endswith("+"):
            return self._spec_eq(field, self.iface_id(name))
        prefix = name[:-1]
        if not prefix:  # "+" matches every interface, never "no interface"
            return self._spec_node(field, ~self._bits(field, 0, 8, IFACE_NONE, self._true))
        self._intern_wildcard(prefix)
        self._used_wildcards.add(prefix)
        ids = [i for n, i in self._iface_ids.items() if n.startswith(prefix)]
        ids += [i for p, i in self._wild_ids.items() if p.startswith(prefix)]
        node = self._false
        for i in ids:
            node |= self._bits(field, 0, 8, i, self._true)
        return self._spec_node(field, node)

    def _spec_node(self, field: str, node: Any) -> tuple:
        return self._level[field], "node", node, None

    # ---- raw BDD builders (not yet inside the universe) ---------------------------------------

    def _own(self, s: PacketSet) -> PacketSet:
        if s._space is not self:
            raise ValueError("packet sets from different PacketSpaces")
        return s

    def _position(self, field: str, bit_value: int) -> int:
        """Variable position (0 = MSB) of a one-bit value."""
        return self.widths[field] - bit_value.bit_length()

    def _check_value(self, field: str, value: int) -> None:
        if field not in self.widths:
            raise ValueError(f"unknown field {field!r}; fields: {', '.join(self.fields)}")
        if not isinstance(value, int) or not 0 <= value < 1 << self.widths[field]:
            raise ValueError(f"{field} value {value!r} outside 0..{(1 << self.widths[field]) - 1}")

    def _bits(self, field: str, start: int, length: int, value: int, node: Any) -> Any:
        """``node`` AND the cube fixing positions [start, start+length) of ``field`` to
        ``value``, from cached 8-bit pieces ANDed bottom-up (each AND walks one piece)."""
        end = pos = start + length
        chunks = self._chunks
        while pos > start:
            lo = max(start, (pos - 1) & ~7)
            n = pos - lo
            sub = (value >> (end - pos)) & ((1 << n) - 1)
            key = (field, lo, n, sub)
            piece = chunks.get(key)
            if piece is None:
                piece = self._true
                lits = self._pos[field], self._neg[field]
                for k in range(n - 1, -1, -1):
                    piece = lits[not sub >> (n - 1 - k) & 1][lo + k] & piece
                chunks[key] = piece
            node = piece & node
            pos = lo
        return node

    def _range_bits(self, field: str, start: int, width: int, lo: int, hi: int) -> Any:
        if lo > hi:
            return self._false
        pos_lits, neg_lits = self._pos[field], self._neg[field]
        true = self._true
        # x >= lo and x <= hi, each folded from the LSB up: a more significant bit decides
        # unless it equals the bound's bit, and then the bits below decide.
        ge = le = true
        for k in range(width):
            p, bit = start + width - 1 - k, 1 << k
            if lo & bit:
                ge = pos_lits[p] & ge
            elif ge is not true:
                ge = pos_lits[p] | ge
            if not hi & bit:
                le = neg_lits[p] & le
            elif le is not true:
                le = neg_lits[p] | le
        return ge & le

    def _masked_bits(self, field: str, start: int, width: int, value: int, mask: int) -> Any:
        low = ~mask & ((1 << width) - 1)
        if mask and not low & (low + 1):
            # a prefix mask (an address's network, or every bit): the cube of its top bits from
            # the cached 8-bit pieces, not one AND per bit (a concolic walk asks ~1 new one a class)
            plen = width - low.bit_length()
            return self._bits(field, start, plen, value >> (width - plen), self._true)
        node = self._true
        for k in range(width):
            if mask >> k & 1:
                p = start + width - 1 - k
                node = (self._pos if value >> k & 1 else self._neg)[field][p] & node
        return node

    def _exist(self, names, node: Any) -> Any:
        """``exists names . node``, with the cube of ``names`` built once (CUDD: dd builds it
        from the names on every call otherwise, 4x the cost of the quantification here)."""
        if self.backend != "cudd":
            return self.bdd.exist(names, node)
        key = names if type(names) is tuple else tuple(names)
        cube = self._cubes.get(key)
        if cube is None:
            cube = self._cubes[key] = self.bdd.cube(key)
        return self.bdd.apply("\\E", cube, node)

    def _at_until(self, node: Any, values: dict, stop: int) -> Any:
        """`_at` down to level ``stop`` (excluded): the node reached there (None as `_at`).

        The descent goes one byte of a field at a time, each step remembered by (node, the
        byte's value) (`_steps`): the 28,000 endpoint chains of a 10,000-service dump pin their
        own source on a set that tests only its first two bytes, and then share both steps."""
        level_bit = self._level_bit
        steps = self._steps
        while True:
            lev = node.level
            if lev >= stop:
                return node
            f, bit, end = level_bit[lev]
            v = values.get(f)
            if v is None:
                return None
            key = (int(node), (v >> (bit & ~7)) & 0xFF)
            hit = steps.get(key)
            if hit is not None and end <= stop:
                node = hit[1]
                continue
            top, neg, until = node, False, min(end, stop)
            while True:  # within the byte: bit by bit
                if node.negated:
                    neg = not neg
                    node = ~node
                node = node.high if (v >> bit) & 1 else node.low
                lev = node.level
                if lev >= until:
                    break
                f2, bit, _ = level_bit[lev]
                if f2 != f:  # (a byte's levels are one field's)
                    break
            node = ~node if neg else node
            if end <= stop:
                if len(steps) >= _MAX_STEPS:
                    steps.clear()  # (the kept nodes would keep CUDD from freeing what they hold)
                steps[key] = (top, node)  # the key's node kept: its id stays its own

    def _cofactor(self, node: Any, values: dict, family: int) -> Any:
        """The cofactor of ``node`` (a set of ``family``'s packets, 4 or 6) at ``values`` (field ->
        value as `where` takes it), without the family: `_at`, or field by field
        (`PacketSet.restrict`) where the set tests a field above them."""
        fam = {"family": 0 if family == 4 else 1}
        got = self._at(node, dict(fam, **{f: int(v) for f, v in values.items()}))
        if got is None:
            s = self._set(node)
            for f, v in values.items():
                s = s.restrict(f, v)
            got = self._at(s.node, fam)
        return got

    def _at(self, node: Any, values: dict) -> Any:
        """The cofactor of ``node`` at a point of some fields (``values``: field -> int, an
        address as its int, ``family`` as its bit), by one descent from the root: no cube is
        built. None when the set tests a field that is not given above the deepest one that
        is (the descent would have to take both ways: the caller uses `PacketSet.restrict`)."""
        return self._at_until(node, values, max(self._last_level[f] for f in values) + 1)

    # the representative form pins IPv4 high address bits to zero (see the class docstring)
    def _to_rep(self, node: Any) -> Any:
        return node & self._rep_u

    def _from_rep(self, node: Any) -> Any:
        v4 = self._exist(self._hi_vars, node & self._hi_zero & self._fam[4])
        return (node & self._fam[6]) | (v4 & self._fam[4])


# --------------------------------------------------------------------------------------------
# a set of packets
# --------------------------------------------------------------------------------------------

class PacketSet:
    """An immutable set of packets of one `PacketSpace` (a BDD node).

    ``&`` is "in both", ``|`` "in either", ``-`` "in the first, not the second", ``~`` the
    complement within the universe, ``<=`` inclusion, ``flow in s`` membership.  ``bool()`` is
    refused: say `is_empty` or `is_full`.

    >>> space = PacketSpace()
    >>> web = space.eq("proto", 6) & space.eq("dport", 80)
    >>> ssh = space.eq("proto", 6) & space.eq("dport", 22)
    >>> (web & ssh).is_empty()              # one packet has one destination port
    True
    >>> either = web | ssh
    >>> (either & space.eq("dport", 22)) == ssh
    True
    >>> web <= either and not either <= web
    True
    >>> str((either - web).pick_flow())     # a witness: lowest values, TCP, an ephemeral port
    'tcp 0.0.0.0:32768 -> 0.0.0.0:22'
    >>> (~either | either).is_full()
    True
    """

    __slots__ = ("_space", "_node")

    def __init__(self, space: PacketSpace, node: Any):
        object.__setattr__(self, "_space", space)
        object.__setattr__(self, "_node", node)

    def __setattr__(self, name, value):
        raise AttributeError("PacketSet is immutable")

    @property
    def space(self) -> PacketSpace:
        return self._space

    @property
    def node(self) -> Any:
        """The underlying BDD node (for benchmarks and debugging)."""
        return self._node

    def _new(self, node: Any) -> PacketSet:
        return PacketSet(self._space, node)

    # ---- algebra ------------------------------------------------------------------------------

    def __and__(self, other: PacketSet) -> PacketSet:
        return self._new(self._node & self._space._own(other)._node)

    def __or__(self, other: PacketSet) -> PacketSet:
        return self._new(self._node | self._space._own(other)._node)

    def __sub__(self, other: PacketSet) -> PacketSet:
        return self._new(self._node & ~self._space._own(other)._node)

    def __xor__(self, other: PacketSet) -> PacketSet:
        o = self._space._own(other)._node
        return self._new((self._node | o) & ~(self._node & o))

    def __invert__(self) -> PacketSet:
        return self._new(self._space._u & ~self._node)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PacketSet):
            return NotImplemented
        return self._space is other._space and self._node == other._node

    def __hash__(self) -> int:
        return hash(int(self._node))

    def __le__(self, other: PacketSet) -> bool:
        return (self - other).is_empty()

    def __ge__(self, other: PacketSet) -> bool:
        return (other - self).is_empty()

    def __contains__(self, flow: Flow) -> bool:
        return not (self._space.from_flow(flow) & self).is_empty()

    def __bool__(self) -> bool:
        raise TypeError("the truth value of a PacketSet is ambiguous: use is_empty() or is_full()")

    def is_empty(self) -> bool:
        return self._node == self._space._false

    def is_full(self) -> bool:
        return self._node == self._space._u

    def isdisjoint(self, other: PacketSet) -> bool:
        return (self & other).is_empty()

    # ---- quantification and rewrites ------------------------------------------------------

    def _names(self, fields: str | Iterable[str]) -> tuple[list[str], tuple[str, ...]]:
        fields = (fields,) if isinstance(fields, str) else tuple(fields)
        names = []
        for f in fields:
            if f not in self._space.widths:
                raise ValueError(f"unknown field {f!r}")
            names.extend(self._space._vars[f])
        return names, fields

    def _finish(self, node: Any, fields: Iterable[str]) -> PacketSet:
        # only a change to ctstate can leave the universe: no other field takes part in it
        return self._new(node & self._space._u if "ctstate" in fields else node)

    def exists(self, fields: str | Iterable[str]) -> PacketSet:
        """Forget ``fields``: every packet equal to some member outside those fields.

        Forgetting `family` keeps addresses as 128-bit values: 10.0.0.1 becomes ::10.0.0.1 for
        IPv6 packets."""
        names, fields = self._names(fields)
        if not names:
            return self
        sp = self._space
        if "family" in fields:  # a free IPv4 high bit must not turn into a free IPv6 bit
            return self._finish(sp._from_rep(sp._exist(names, sp._to_rep(self._node))), fields)
        return self._finish(sp._exist(names, self._node), fields)

    def project(self, fields: str | Iterable[str]) -> PacketSet:
        """Keep only ``fields``: forget every other one."""
        keep = {fields} if isinstance(fields, str) else set(fields)
        return self.exists([f for f in self._space.fields if f not in keep])

    def and_eq(self, field: str, value: int | str | IPAddress) -> PacketSet:
        """``self & space.eq(field, value)``, the value's cube ANDed onto this set bottom-up
        (one AND per 8-bit piece, no cube built apart): the cheap way to pin one more field of
        many sets that share the rest (a big chain's ``-d IP/32`` rules over a few ports).

        >>> sp = PacketSpace()
        >>> web = sp.where(proto=6, dport=80)
        >>> web.and_eq("dst", ipaddress.ip_address("10.96.0.1")) == web & sp.eq("dst", "10.96.0.1")
        True
        """
        sp = self._space
        _, kind, payload, fam = sp._spec_eq(field, value)
        node = sp._bits(*payload, self._node) if kind == "cube" else payload & self._node
        return self._new(node if fam is None else sp._fam[fam] & node)

    def restrict(self, field: str, value: int | str | IPAddress) -> PacketSet:
        """The packets that would be members if ``field`` were ``value`` (the cofactor); the
        result no longer depends on ``field``."""
        sp = self._space
        fam, node = None, self._node
        if field in ADDRESS_FIELDS and not isinstance(value, int):
            addr = ipaddress.ip_address(value)
            fam, value = addr.version, int(addr)
        elif field in _IFACE_FIELDS and isinstance(value, str):
            value = sp.resolve_iface(value)
        sp._check_value(field, value)
        w = sp.widths[field]
        cofactor = {v: bool(value >> (w - 1 - p) & 1) for p, v in enumerate(sp._vars[field])}
        if field not in ADDRESS_FIELDS and field != "family":
            return self._finish(sp.bdd.let(cofactor, node), (field,))
        if fam == 4:  # IPv4 packets only, whose high 96 bits are free: the low 32 decide
            return self._new(sp.bdd.let({v: cofactor[v] for v in sp._vars[field][96:]}, node & sp._fam[4]))
        if fam is not None:
            node = node & sp._fam[fam]
        return self._new(sp._from_rep(sp.bdd.let(cofactor, sp._to_rep(node))))

    def assign(self, field: str, value: int | str | IPAddress) -> PacketSet:
        """The image of the rewrite ``field := value``: exists field . S, then field == value.

        An address keeps only the packets of its family (a rewrite never changes family)."""
        if field == "family":
            return self.exists("family") & self._space.family(4 if value == 0 else 6)
        return self.assign_all(((field, value),))

    def assign_all(self, pairs) -> PacketSet:
        """`assign` of several fields at once (``((field, value), ...)``, no ``family``): one
        quantification, one AND (what a DNAT to ``address:port`` writes).

        >>> sp = PacketSpace()
        >>> s = sp.where(proto=6, dst="10.96.0.1", dport=80)
        >>> two = (("dst", ipaddress.ip_address("10.244.0.5")), ("dport", 8080))
        >>> s.assign_all(two) == s.assign("dst", two[0][1]).assign("dport", 8080)
        True
        """
        sp = self._space
        names: list = []
        node = self._node
        for field, value in pairs:
            if field in ADDRESS_FIELDS and isinstance(value, ipaddress.IPv4Address):
                # only IPv4 packets keep, and their high 96 bits are free: the low 32 are the address
                names += sp._vars[field][96:]
                node = node & sp._fam[4]
            else:
                names += sp._vars[field]
        return self._new(sp._exist(tuple(names), node) & sp._build([sp._spec_eq(f, v) for f, v in pairs]))

    def assign_range(self, field: str, lo: int | str | IPAddress, hi: int | str | IPAddress) -> PacketSet:
        """The image of rewriting ``field`` to any value in ``lo..hi`` (a translation range)."""
        sp = self._space
        if field == "family":
            return self.exists("family") & sp._set(sp._build([sp._spec_range(field, lo, hi)]))
        return self._new(sp._exist(sp._vars[field], self._node) & sp._build([sp._spec_range(field, lo, hi)]))

    def rewrite(self, field: str, lo: int | str | IPAddress, hi: int | str | IPAddress | None = None) -> PacketSet:
        """`assign` when only ``lo`` is given, else `assign_range`."""
        return self.assign(field, lo) if hi is None else self.assign_range(field, lo, hi)

    def masked_assign(self, field: str, value: int, mask: int) -> PacketSet:
        """The image of ``field := (field & ~mask) ^ value``, the kernel's mark rewrite.

        Per bit: inside ``mask`` the new bit is ``value``'s bit; outside it the old bit stays,
        flipped where ``value`` has a 1.  So ``mask=0`` XORs, ``mask=value`` ORs, ``value=0``
        clears the mask bits, and "set to v under m" is ``value=v, mask=m|v``.
        """
        sp = self._space
        sp._check_value(field, value)
        sp._check_value(field, mask)
        w = sp.widths[field]
        names, neg = sp._vars[field], sp._neg[field]
        addr = field in ADDRESS_FIELDS or field == "family"
        node = sp._to_rep(self._node) if addr else self._node
        flips = {names[p]: neg[p] for p in range(w)
                 if not mask >> (w - 1 - p) & 1 and value >> (w - 1 - p) & 1}
        if flips:  # x := ~x undoes itself, so its preimage (what let computes) is its image
            node = sp.bdd.let(flips, node)
        if mask:
            fixed = [names[p] for p in range(w) if mask >> (w - 1 - p) & 1]
            node = sp._exist(fixed, node) & sp._masked_bits(field, 0, w, value & mask, mask)
        if addr:
            return self._new(sp._from_rep(node))
        return self._finish(node, (field,))

    def copy_masked(self, src: str, dst: str, mask: int, src_mask: int | None = None) -> PacketSet:
        """The image of ``dst := (dst & ~mask) ^ (src & src_mask)``; ``src_mask`` defaults to
        ``mask``, i.e. "copy the ``mask`` bits of src into dst".  This is the formula the kernel
        uses to copy a mark between a packet and its connection."""
        sp = self._space
        if src == dst:
            raise ValueError("copy_masked needs two different fields")
        if sp.widths.get(src) != sp.widths.get(dst):
            raise ValueError(f"{src} and {dst} differ in width")
        src_mask = mask if src_mask is None else src_mask
        sp._check_value(dst, mask)
        sp._check_value(src, src_mask)
        w = sp.widths[dst]
        bdd, s_lit, d_lit, d_names = sp.bdd, sp._pos[src], sp._pos[dst], sp._vars[dst]
        addr = {src, dst} & {*ADDRESS_FIELDS, "family"}
        node = sp._to_rep(self._node) if addr else self._node
        xors, overwritten, ties = {}, [], []
        for p in range(w):
            keep, take = not mask >> (w - 1 - p) & 1, src_mask >> (w - 1 - p) & 1
            if keep and take:  # d := d ^ s undoes itself while s stays: image = preimage
                xors[d_names[p]] = bdd.apply("xor", d_lit[p], s_lit[p])
            elif not keep:     # d := s or d := 0: forget d, then tie it to its new value
                overwritten.append(d_names[p])
                ties.append(bdd.apply("<=>", d_lit[p], s_lit[p]) if take else ~d_lit[p])
        if xors:
            node = bdd.let(xors, node)
        if overwritten:
            # one bit at a time: the whole "d == s" relation alone can be exponential in the
            # variable order (two separate blocks), while the result stays as small as the
            # set of source values
            node = sp._exist(overwritten, node)
            for tie in reversed(ties):
                node = node & tie
        if addr:
            return self._new(sp._from_rep(node))
        return self._finish(node, (dst,))

    def copy_field(self, src: str, dst: str) -> PacketSet:
        """The image of ``dst := src``."""
        return self.copy_masked(src, dst, (1 << self._space.widths[dst]) - 1)

    # ---- inspection ---------------------------------------------------------------------------

    def fields_constrained(self) -> tuple[str, ...]:
        """Fields whose value decides membership beyond what the universe already says."""
        sp = self._space
        support = {sp._var_bit[v][0] for v in self._node.support}
        return tuple(f for f in sp.fields if f in support and self.exists(f) != self)

    def count(self) -> int:
        """The exact number of packets, a Python int (the universe holds about 2^468)."""
        sp = self._space
        node = sp._to_rep(self._node)  # one bit-vector per IPv4 packet
        n = len(sp._var_bit)
        return _count(node, n, sp.bdd.level_of_var, sp._true, {}) << _level(node, n, sp.bdd.level_of_var)

    def pick(self, prefer: Mapping[str, int] | Iterable[PacketSet] | None = None
             ) -> dict[str, int] | None:
        """One member as ``{field: int}`` for every field, or None when empty.

        Walks one path of the BDD from the root, O(number of variables).  With ``prefer`` a
        mapping ``{field: value}``, each bit takes the preferred value's bit when that still
        leaves a member, else the other bit, and bits the set leaves free take the preferred
        bit; fields not named prefer 0, so the witness has the lowest values the set allows.
        With ``prefer`` a sequence of sets, each is intersected in when that leaves a member
        (one AND each, dearer on large sets), then every bit prefers 0.  Default: the space's
        `preferences` (TCP, the first ephemeral source port).  IPv4 addresses come back as
        32-bit values.
        """
        if self.is_empty():
            return None
        sp = self._space
        prefer = sp._prefer if prefer is None else sp._preference(prefer)
        node = self._node
        if not isinstance(prefer, dict):
            for p in prefer:
                narrowed = node & p
                if narrowed != sp._false:
                    node = narrowed
            prefer = {}
        values = dict.fromkeys(sp.fields, 0)
        values.update(prefer)
        # the preferred bit of each variable, kept per preference (an exploration picks
        # thousands of witnesses with the same one)
        key = tuple(prefer.items())
        cache = sp.__dict__.setdefault("_wanted", {})
        wanted = cache.get(key)
        if wanted is None:
            wanted = {}
            for f, v in prefer.items():
                w = sp.widths[f]
                wanted.update((name, v >> (w - 1 - p) & 1) for p, name in enumerate(sp._vars[f]))
            if len(cache) > 256:
                cache.clear()
            cache[key] = wanted
        false, var_bit = sp._false, sp._var_bit
        while (var := node.var) is not None:
            neg = node.negated  # a complemented edge complements both children
            bit = wanted.get(var, 0)
            child = node.high if bit else node.low
            if neg:
                child = ~child
            if child == false:
                bit = 1 - bit
                child = node.high if bit else node.low
                if neg:
                    child = ~child
            f, b = var_bit[var]
            values[f] = values[f] | 1 << b if bit else values[f] & ~(1 << b)
            node = child
        if values["family"] == 0:  # the high 96 bits were free: the address is the low 32
            for f in ADDRESS_FIELDS:
                values[f] &= 0xFFFFFFFF
        return values

    def contains_values(self, values: Mapping[str, int]) -> bool:
        """Whether the packet with these field values (as `pick` returns them: every field an
        int, IPv4 addresses as 32-bit values) is in the set: one path from the root.

        >>> sp = PacketSpace()
        >>> web = sp.where(proto=6, dport=80)
        >>> v = web.pick()
        >>> web.contains_values(v), web.contains_values({**v, "dport": 81})
        (True, False)
        """
        sp = self._space
        node, false, var_bit = self._node, sp._false, sp._var_bit
        while (var := node.var) is not None:
            f, b = var_bit[var]
            child = node.high if values.get(f, 0) >> b & 1 else node.low
            node = ~child if node.negated else child
        return node != false

    def pick_flow(self, prefer: Mapping[str, int] | Iterable[PacketSet] | None = None
                  ) -> Flow | None:
        """One member as a `Flow`, or None when empty."""
        values = self.pick(prefer)
        return None if values is None else self._space.to_flow(values)

    def __repr__(self) -> str:
        if self.is_empty():
            return "<PacketSet empty>"
        if self.is_full():
            return "<PacketSet universe>"
        return f"<PacketSet on {','.join(self.fields_constrained())}, e.g. {self.pick_flow()}>"


def _level(u: Any, n: int, level_of_var) -> int:
    return n if u.var is None else level_of_var(u.var)


def _count(u: Any, n: int, level_of_var, true: Any, memo: dict[int, int]) -> int:
    """Models of ``u`` over the variables at its level and below.  (A module function, not a
    closure: a recursive closure is a reference cycle, and the pure-Python manager must not
    be collected in a cycle with its nodes.)"""
    if u.var is None:
        return 1 if u == true else 0
    if u.negated:
        return (1 << (n - _level(u, n, level_of_var))) - _count(~u, n, level_of_var, true, memo)
    key = int(u)
    if key not in memo:
        here, lo, hi = _level(u, n, level_of_var), u.low, u.high  # regular: children are cofactors
        memo[key] = ((_count(lo, n, level_of_var, true, memo) << (_level(lo, n, level_of_var) - here - 1))
                     + (_count(hi, n, level_of_var, true, memo) << (_level(hi, n, level_of_var) - here - 1)))
    return memo[key]
