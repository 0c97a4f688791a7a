"""Parse layer: table-driven decoder of one rule's options into typed matches and a target.

The tables below say, for every match module and target synack knows, which options it takes and
how many arguments each has; a handful of handlers turn arguments into typed model values.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from functools import lru_cache
from itertools import accumulate, islice, repeat
from operator import add

from analyzer.model.rules import (
    AddrTypeMatch, CommentMatch, ConnmarkCopy, CtStateMatch, CtStatusMatch,
    CtTupleMatch, IcmpMatch, IpRangeMatch, Jump, MarkMatch,
    Masquerade, Nat, NatRange, Netmap, Notrack, OpaqueMatch, OtherTarget, OwnerMatch,
    PhysdevMatch, PortMatch, Redirect, Reject, SetMark, SetMatch, StatisticMatch,
    TcpFlagsMatch, Tproxy, UnknownMatch, UnknownTarget, Verdict,
)


def fast_constructor(cls, omit: tuple = ()):
    """A constructor for a frozen, slotted model dataclass that stores the fields straight into
    their slots, without the generated ``__init__``'s per-field ``object.__setattr__`` calls. A
    large dump builds about a million of these (kube-proxy, 10k services).

    The object is made as an instance of the class's *twin* (:func:`twin_of`), its fields stored
    with ordinary (specialised) attribute stores, and then becomes a ``cls`` by ``__class__``
    assignment, which CPython allows only between classes of the same layout (it checks, and
    raises otherwise). About twice as fast as the generated ``__init__``; calling each slot's
    ``__set__`` is the fallback when ``cls`` has no twin. When the class runs anything else on
    construction (``__post_init__``, default factories, ``init=False`` fields) or has no slots,
    the class itself is returned. Fields named in ``omit`` are neither taken nor set (their
    slots stay empty: a lazily parsed rule's ``matches`` and ``target``).

    >>> from analyzer.model.rules import CommentMatch
    >>> new = fast_constructor(CommentMatch)
    >>> c = new(3, 9, False, "web")
    >>> c == CommentMatch(3, 9, False, "web"), type(c) is CommentMatch
    (True, True)
    """
    fields = _init_fields(cls)
    if fields is None:
        return cls
    ns = {"_new": object.__new__, "_cls": cls}
    params, setters, stores = [], [], []
    for k, f in enumerate(fields):
        if f.name in omit:
            continue
        slot = next((vars(c)[f.name] for c in cls.__mro__ if f.name in vars(c)), None)
        if not hasattr(slot, "__set__"):
            return cls
        ns[f"_set{k}"] = slot.__set__
        if f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            ns[f"_default{k}"] = f.default
            params.append(f"{f.name}=_default{k}")
        setters.append(f"    _set{k}(_obj, {f.name})\n")
        stores.append(f"    _obj.{f.name} = {f.name}\n")
    twin = twin_of(cls)
    if twin is not None:
        ns["_twin"] = twin
        src = f"def new({', '.join(params)}):\n    _obj = _new(_twin)\n" + "".join(stores) + \
            "    _obj.__class__ = _cls\n    return _obj\n"
    else:
        src = f"def new({', '.join(params)}):\n    _obj = _new(_cls)\n" + "".join(setters) + "    return _obj\n"
    exec(src, ns)  # as dataclasses builds __init__
    ns["new"].__qualname__ = f"new_{cls.__name__}" + ("_without_" + "_".join(omit) if omit else "")
    return ns["new"]


def _init_fields(cls):
    """The fields of a frozen, slotted dataclass whose constructor only stores them, else None."""
    if not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__") or "__slots__" not in vars(cls):
        return None
    fields = dataclasses.fields(cls)
    if any(not f.init or f.default_factory is not dataclasses.MISSING for f in fields):
        return None
    return fields


_TWINS: dict = {}


def twin_of(cls):
    """A plain class laid out as the frozen model dataclass ``cls`` (same single base, same own
    slots) on which attributes are stored as usual, or None. An object made with
    ``object.__new__(twin)`` whose every field is stored becomes a ``cls`` by
    ``obj.__class__ = cls`` (CPython checks that the two layouts match); what
    :func:`fast_constructor` and the parse's compiled rule shapes do instead of calling the
    frozen ``__init__``. Checked once per class: an object built so must equal (and repr as)
    the one ``cls`` builds from the same values, else None."""
    if cls in _TWINS:
        return _TWINS[cls]
    _TWINS[cls] = None
    fields = _init_fields(cls)
    if fields is None or len(cls.__bases__) != 1:
        return None
    try:
        twin = type(f"_{cls.__name__}Twin", cls.__bases__, {
            "__slots__": cls.__slots__, "__module__": __name__,
            # plain attribute stores (the frozen base's __setattr__ and __delattr__ refuse them)
            "__setattr__": object.__setattr__, "__delattr__": object.__delattr__})
        values = [object() for _ in fields]  # distinct sentinels: a field stored in another's slot shows
        obj = object.__new__(twin)
        for f, v in zip(fields, values):
            setattr(obj, f.name, v)
        obj.__class__ = cls
        want = cls(*values)
        if type(obj) is not cls or obj != want or repr(obj) != repr(want):
            return None
    except (TypeError, AttributeError):
        return None
    _TWINS[cls] = twin
    return twin


# the model types the decoder builds by the hundred thousand
new_CommentMatch = fast_constructor(CommentMatch)
new_PortMatch = fast_constructor(PortMatch)
new_Nat = fast_constructor(Nat)
new_NatRange = fast_constructor(NatRange)
new_StatisticMatch = fast_constructor(StatisticMatch)
new_OpaqueMatch = fast_constructor(OpaqueMatch)
new_CtStateMatch = fast_constructor(CtStateMatch)
new_MarkMatch = fast_constructor(MarkMatch)
new_TcpFlagsMatch = fast_constructor(TcpFlagsMatch)
new_IcmpMatch = fast_constructor(IcmpMatch)
new_OwnerMatch = fast_constructor(OwnerMatch)
new_SetMatch = fast_constructor(SetMatch)
new_AddrTypeMatch = fast_constructor(AddrTypeMatch)
new_Verdict = fast_constructor(Verdict)
new_Jump = fast_constructor(Jump)
new_SetMark = fast_constructor(SetMark)


class DecodeError(Exception):
    """A problem with one token of a rule: ``index`` of the token, and an optional hint."""

    def __init__(self, code: str, message: str, index: int, hint: str | None = None,
                 end_index: int | None = None, warning: bool = False, value: str | None = None):
        super().__init__(message)
        self.code, self.message, self.index, self.hint = code, message, index, hint
        self.end_index = index if end_index is None else end_index
        self.warning = warning
        self.value = value  # a machine-dependent value: reported once per file


# ------------------------------------------------------------------------ tokenizer
def split_args(line: str, base: int = 1) -> tuple[list[str], list[int], list[int]]:
    """Split a rule line into arguments exactly as iptables-restore does (``add_param_to_argv``):
    words are separated by blanks and tabs; only double quotes group, and inside them a
    backslash escapes the next character; a closing quote ends the word; single quotes and
    backslashes outside quotes are ordinary characters.

    Returns the words and, for each, its 1-based start column and exclusive end column (offset
    by ``base - 1``).

    >>> split_args('-A X -m comment --comment "a \\\\"b\\\\" c" -j ACCEPT')[0][5]
    'a "b" c'
    >>> split_args("--comment 'a b'")[0]
    ['--comment', "'a", "b'"]
    >>> split_args('a"b c"d')[0]
    ['ab c', 'd']
    """
    if line and "\\" not in line and "\t" not in line and "  " not in line and line[0] != " " \
            and line[-1] != " ":
        # words separated by single blanks: columns are a running sum of (length + 1)
        words = line.split(" ")
        lens = list(map(len, words))
        cols = list(accumulate(map(add, lens, repeat(1, len(words) - 1)), initial=base))
        ends = list(map(add, cols, lens))
        q = line.find('"')
        if q < 0:
            return words, cols, ends
        fast = _merge_quoted(line, words, cols, ends, q)
        if fast is not None:
            return fast
    return _split_exact(line, base)


def _merge_quoted(line: str, words: list, cols: list, ends: list, q: int):
    """Join the blank-split pieces of each quoted word that stands alone (``--comment "a b"``);
    None when a quote is glued to a neighbour (``a"b c"d``): the exact path handles that."""
    pairs = []
    last = len(line) - 1
    while q >= 0:
        q2 = line.find('"', q + 1)
        if q2 < 0 or (q and line[q - 1] != " ") or (q2 < last and line[q2 + 1] != " "):
            return None
        pairs.append((q, q2))
        q = line.find('"', q2 + 1)
    for q, q2 in reversed(pairs):  # from the right, so that piece numbers stay valid
        k1 = line.count(" ", 0, q)
        k2 = line.count(" ", 0, q2)
        words[k1:k2 + 1] = (line[q + 1:q2],)
        del cols[k1 + 1:k2 + 1]
        del ends[k1:k2]
    return words, cols, ends


def _split_exact(line: str, base: int):
    words: list[str] = []
    cols: list[int] = []
    ends: list[int] = []
    buf: list[str] = []
    start = -1
    quote = esc = False
    for k, ch in enumerate(line):
        if quote:
            if esc:
                buf.append(ch)
                esc = False
                continue
            if ch == "\\":
                esc = True
                continue
            if ch != '"':
                buf.append(ch)
                continue
            quote = False  # the closing quote ends the word, even an empty one
            words.append("".join(buf))
            cols.append(start + base)
            ends.append(k + base + 1)
            buf, start = [], -1
            continue
        if ch == '"':
            quote = True
            if start < 0:
                start = k
            continue
        if ch == " " or ch == "\t" or ch == "\n":
            if buf:
                words.append("".join(buf))
                cols.append(start + base)
                ends.append(k + base)
                buf, start = [], -1
            continue
        if start < 0:
            start = k
        buf.append(ch)
    if buf:  # an unterminated quote still gives its word
        words.append("".join(buf))
        cols.append(start + base)
        ends.append(len(line) + base)
    return words, cols, ends


def tokenize(line: str) -> list[tuple[str, int, int]]:
    """``split_args`` as (word, col, end_col) triples.

    >>> tokenize('-A X -m comment --comment "a \\\\"b\\\\" c" -j ACCEPT')[5]
    ('a "b" c', 27, 38)
    """
    return list(zip(*split_args(line)))


# ------------------------------------------------------------------------ value decoders
PROTOCOLS = {
    "all": 0, "icmp": 1, "igmp": 2, "ipencap": 4, "ipip": 4, "tcp": 6, "egp": 8, "udp": 17,
    "ipv6": 41, "ipv6-route": 43, "ipv6-frag": 44, "gre": 47, "esp": 50, "ah": 51,
    "ipv6-icmp": 58, "icmpv6": 58, "ipv6-nonxt": 59, "ipv6-opts": 60, "ospf": 89, "eigrp": 88,
    "pim": 103, "vrrp": 112, "l2tp": 115, "sctp": 132, "mh": 135, "udplite": 136, "dccp": 33,
}
PROTO_NAMES = {v: k for k, v in PROTOCOLS.items() if k not in ("ipip", "icmpv6")}

# port names: one table shipped with synack (analyzer/parse/services.py, generated from netbase /
# IANA data), never the analysing machine's /etc/services; a name resolves to its tcp port, else
# its udp (or other protocol's) port, as getservbyname does for the protocols iptables passes
from analyzer.parse.services import SERVICES as _SERVICES_BY_PROTO  # noqa: E402

SERVICES = {name: ports.get("tcp", ports.get("udp", next(iter(ports.values()))))
            for name, ports in _SERVICES_BY_PROTO.items()}

TCP_FLAGS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20,
             "ALL": 0x3F, "NONE": 0}  # libxt_tcp: ALL is the six classic flags; ECE/CWR are unknown to it

CT_STATES = frozenset({"NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED", "SNAT", "DNAT"})
ADDR_TYPES = frozenset({"UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST",
                        "BLACKHOLE", "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE"})

ICMP4 = {
    "any": (None, None), "echo-reply": (0, 0), "pong": (0, 0), "destination-unreachable": (3, None),
    "network-unreachable": (3, 0), "host-unreachable": (3, 1), "protocol-unreachable": (3, 2),
    "port-unreachable": (3, 3), "fragmentation-needed": (3, 4), "source-route-failed": (3, 5),
    "network-unknown": (3, 6), "host-unknown": (3, 7), "network-prohibited": (3, 9),
    "host-prohibited": (3, 10), "TOS-network-unreachable": (3, 11),
    "TOS-host-unreachable": (3, 12), "communication-prohibited": (3, 13),
    "host-precedence-violation": (3, 14), "precedence-cutoff": (3, 15), "source-quench": (4, 0),
    "redirect": (5, None), "network-redirect": (5, 0), "host-redirect": (5, 1),
    "TOS-network-redirect": (5, 2), "TOS-host-redirect": (5, 3), "echo-request": (8, 0),
    "ping": (8, 0), "router-advertisement": (9, 0), "router-solicitation": (10, 0),
    "time-exceeded": (11, None), "ttl-exceeded": (11, None), "ttl-zero-during-transit": (11, 0),
    "ttl-zero-during-reassembly": (11, 1), "parameter-problem": (12, None),
    "ip-header-bad": (12, 0), "required-option-missing": (12, 1), "timestamp-request": (13, 0),
    "timestamp-reply": (14, 0), "address-mask-request": (17, 0), "address-mask-reply": (18, 0),
}
ICMP6 = {
    "destination-unreachable": (1, None), "no-route": (1, 0), "communication-prohibited": (1, 1),
    "beyond-scope": (1, 2), "address-unreachable": (1, 3), "port-unreachable": (1, 4),
    "failed-policy": (1, 5), "reject-route": (1, 6), "packet-too-big": (2, 0),
    "time-exceeded": (3, None), "ttl-exceeded": (3, None), "ttl-zero-during-transit": (3, 0),
    "ttl-zero-during-reassembly": (3, 1), "parameter-problem": (4, None),
    "bad-header": (4, 0), "unknown-header-type": (4, 1), "unknown-option": (4, 2),
    "echo-request": (128, 0), "ping": (128, 0), "echo-reply": (129, 0), "pong": (129, 0),
    "router-solicitation": (133, 0), "router-advertisement": (134, 0),
    "neighbour-solicitation": (135, 0), "neighbor-solicitation": (135, 0),
    "neighbour-advertisement": (136, 0), "neighbor-advertisement": (136, 0), "redirect": (137, 0),
    "mld-listener-query": (130, 0), "mld-listener-report": (131, 0),
    "mld-listener-done": (132, 0), "mld2-listener-report": (143, 0),
}
REJECT_WITH = {
    4: {"icmp-net-unreachable", "icmp-host-unreachable", "icmp-port-unreachable",
        "icmp-proto-unreachable", "icmp-net-prohibited", "icmp-host-prohibited",
        "icmp-admin-prohibited", "tcp-reset", "tcp-rst", "net-unreach", "host-unreach",
        "port-unreach", "proto-unreach", "net-prohib", "host-prohib", "admin-prohib"},
    6: {"icmp6-no-route", "no-route", "icmp6-adm-prohibited", "adm-prohibited",
        "icmp6-addr-unreachable", "addr-unreach", "icmp6-port-unreachable", "port-unreach",
        "tcp-reset", "tcp-rst", "icmp6-policy-fail", "policy-fail", "icmp6-reject-route",
        "reject-route"},
}
REJECT_ALIASES = {"tcp-rst": "tcp-reset", "net-unreach": "icmp-net-unreachable",
                  "host-unreach": "icmp-host-unreachable", "proto-unreach": "icmp-proto-unreachable",
                  "net-prohib": "icmp-net-prohibited", "host-prohib": "icmp-host-prohibited",
                  "admin-prohib": "icmp-admin-prohibited", "no-route": "icmp6-no-route",
                  "adm-prohibited": "icmp6-adm-prohibited", "addr-unreach": "icmp6-addr-unreachable",
                  "policy-fail": "icmp6-policy-fail", "reject-route": "icmp6-reject-route"}


class Ctx:
    """Per-rule decoding state shared by handlers."""

    __slots__ = ("family", "index", "host_names")

    def __init__(self, family: int):
        self.family = family
        self.index = 0
        self.host_names: list[tuple[int, str]] = []


def _int(s: str, ctx: Ctx, what: str, lo: int = 0, hi: int = 0xFFFFFFFF) -> int:
    try:
        v = int(s, 0)
    except ValueError:
        try:
            v = int(s, 10)  # "08" is decimal to iptables
        except ValueError:
            raise DecodeError("PRS004", f"invalid {what} '{s}'", ctx.index) from None
    if not lo <= v <= hi:
        raise DecodeError("PRS004", f"{what} '{s}' out of range {lo}..{hi}", ctx.index)
    return v


def _port(s: str, ctx: Ctx) -> int:
    """A port number or a service name of synack's table (never the analysing machine's).

    >>> _port("http", Ctx(4)), _port("08080", Ctx(4))
    (80, 8080)
    """
    if s.isascii() and s.isdigit():  # '²'.isdigit() is True too, but no port to iptables
        v = int(s)
        if v > 65535:
            raise DecodeError("PRS004", f"port '{s}' out of range 0..65535", ctx.index)
        return v
    v = SERVICES.get(s)
    if v is not None:
        return v
    raise DecodeError("PRS004", f"invalid port {printable(s)}", ctx.index,
                      hint="ports are numbers 0-65535 or service names of the services(5) table "
                           "synack ships (analyzer/parse/services.py)")


def printable(s: str, limit: int = 60) -> str:
    """A word of the input quoted for a message: control bytes, undecodable bytes and unusual
    whitespace escaped (never sent raw to a terminal), long words cut.

    >>> print(printable(b"ht\\xfftp".decode("utf-8", "surrogateescape")), printable("a\\x0bb"))
    'ht\\xfftp' 'a\\x0bb'
    """
    return "'" + escape_text(s[:limit]) + ("..." if len(s) > limit else "") + "'"


def escape_text(s: str) -> str:
    """``s`` with control characters, unusual whitespace and bytes that were not UTF-8 escaped,
    so that a message never sends raw bytes of the input to a terminal.

    >>> escape_text("--d\\x1b[2Jport")
    '--d\\\\x1b[2Jport'
    """
    if s.isprintable():
        return s
    out = []
    for ch in s:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


def port_range(s: str, ctx: Ctx, strict: bool = False) -> tuple[int, int]:
    """``80``, ``1000:2000``, ``:1024``, ``1024:`` (iptables splits port ranges at ':' only).

    An inverted range (``60000:29``) is refused by the tcp and sctp matches (``strict``) but
    accepted by udp, dccp and conntrack, where it matches nothing.
    """
    if ":" not in s:
        p = _port(s, ctx)
        return (p, p)
    a, b = s.split(":", 1)
    lo = _port(a, ctx) if a else 0
    hi = _port(b, ctx) if b else 65535
    if strict and lo > hi:
        raise DecodeError("PRS004", f"invalid port range '{s}' (start after end)", ctx.index,
                          hint=f"write '{b}:{a}'")
    return (lo, hi)


def port_list(s: str, ctx: Ctx) -> tuple[tuple[int, int], ...]:
    parts = s.split(",")
    if len(parts) > 15:
        raise DecodeError("PRS004", f"too many ports in '{s}' (multiport takes at most 15)", ctx.index,
                          hint="split the ports over two rules")
    out = []
    for p in parts:
        lo, hi = port_range(p, ctx)
        if ":" in p and lo >= hi:  # libxt_multiport: "invalid portrange specified"
            raise DecodeError("PRS004", f"invalid port range '{p}' in '{s}' (multiport needs start < end)",
                              ctx.index, hint=f"write '{lo}'" if lo == hi else f"write '{hi}:{lo}'")
        out.append((lo, hi))
    return tuple(out)


# dotted-quad IPv4 as ipaddress accepts it (no leading zeros, ASCII digits: inet_aton refuses
# others with OSError), optionally with a /prefix length
_V4 = re.compile(r"((?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d))"
                 r"(?:/(3[0-2]|[12]?\d))?", re.ASCII)
_V4_MATCH = _V4.fullmatch


_V4_MASKS = [ipaddress.IPv4Network._make_netmask(p) for p in range(33)]  # (netmask, prefix length)
_new_object = object.__new__


def _v4_address(ip: int) -> ipaddress.IPv4Address:
    """``IPv4Address(ip)`` for an int already known to be in range: the constructor's
    type dispatch and range check skipped (a large dump builds tens of thousands)."""
    a = _new_object(ipaddress.IPv4Address)
    a._ip = ip
    return a


def _v4_network(ip: int, prefixlen: int) -> ipaddress.IPv4Network:
    """``IPv4Network((ip, prefixlen), strict=False)`` for an address and prefix length already
    known to be valid: the same attributes, set without the constructor's parsing and checks.

    >>> _v4_network(0x0A000105, 24) == ipaddress.IPv4Network("10.0.1.0/24")
    True
    """
    netmask, prefixlen = _V4_MASKS[prefixlen]
    net = _new_object(ipaddress.IPv4Network)
    a = _new_object(ipaddress.IPv4Address)
    a._ip = ip & netmask._ip
    # attribute stores, in the constructor's order: the values stay in the object (a dict is
    # made only when something asks for __dict__), as the constructor's own stores leave them
    net.network_address = a
    net.netmask = netmask
    net._prefixlen = prefixlen
    if prefixlen == 31:
        net.hosts = net.__iter__
    elif prefixlen == 32:
        net.hosts = lambda: [_v4_address(ip)]
    return net


def _v4_same(ip: int, prefixlen: int) -> bool:
    a, b = _v4_network(ip, prefixlen), ipaddress.IPv4Network((ip, prefixlen), strict=False)
    return (vars(a).keys() == vars(b).keys() and a == b and hash(a) == hash(b) and str(a) == str(b)
            and list(islice(a.hosts(), 3)) == list(islice(b.hosts(), 3)) and a.broadcast_address == b.broadcast_address)


# the shortcut copies what this Python's ipaddress constructor sets: checked once, else not used
if not all(_v4_same(ip, p) for ip in (0, 0x0A0A0A0A, 0xFFFFFFFF, 0xC0A80101) for p in (0, 8, 24, 30, 31, 32)):
    def _v4_network(ip: int, prefixlen: int) -> ipaddress.IPv4Network:  # noqa: F811
        return ipaddress.IPv4Network((ip, prefixlen), strict=False)

    def _v4_address(ip: int) -> ipaddress.IPv4Address:  # noqa: F811
        return ipaddress.IPv4Address(ip)


@lru_cache(maxsize=65536)
def _net_cached(s: str):
    m = _V4_MATCH(s)
    if m is not None:  # the common case, without ipaddress's string parser
        p = m.group(2)
        return _v4_network(int.from_bytes(socket.inet_aton(m.group(1)), "big"), int(p) if p else 32)
    return ipaddress.ip_network(s, strict=False)


def _ip(s: str):
    if _V4_MATCH(s) is not None and "/" not in s:
        return _v4_address(int.from_bytes(socket.inet_aton(s), "big"))
    return ipaddress.ip_address(s)


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?(/\d+)?$")


# What people put in place of an address when they post a dump: X.X.X.X, <private_ip>, xx:xx::
_ANON_ADDR = re.compile(r"^(?:<[^<>]*>|(?=[\d.xX*]*[xX*])[\dxX*]{1,3}(?:\.[\dxX*]{1,3}){3}"
                        r"|(?=[\da-fA-FxX:]*[xX])[\da-fA-FxX]{0,4}(?::[\da-fA-FxX]{0,4}){2,7})(?:/\d+)?$")


def anonymised(s: str) -> bool:
    """A placeholder left where an address was.

    >>> [anonymised(a) for a in ("X.X.X.X/32", "<private_ip>", "10.0.0.x", "10.0.0.1", "ftp.example")]
    [True, True, True, False, False]
    """
    return bool(_ANON_ADDR.match(s))


def network(s: str, ctx: Ctx):
    try:
        net = _net_cached(s)
    except ValueError:
        if anonymised(s):
            raise DecodeError("PRS102", f"'{s}' is a placeholder, not an address (the dump was "
                              "anonymised): iptables-restore refuses it; synack treats this match as "
                              "unknown (APPROXIMATE)", ctx.index,
                              hint="put the real address back to analyse this rule exactly",
                              warning=True, value=s) from None
        if _HOSTNAME.match(s) and not s.replace(".", "").replace("/", "").isdigit():
            ctx.host_names.append((ctx.index, s))
            return None
        raise DecodeError("PRS005", f"invalid address '{s}'", ctx.index,
                          hint="expected ADDRESS[/PREFIX] such as 10.0.0.0/8") from None
    if net.version != ctx.family:
        raise DecodeError("PRS005", f"IPv{net.version} address '{s}' in an IPv{ctx.family} ruleset",
                          ctx.index, hint="IPv6 rules belong in ip6tables-save output")
    return net


def address(s: str, ctx: Ctx):
    try:
        a = ipaddress.ip_address(s.strip("[]"))
    except ValueError:
        raise DecodeError("PRS005", f"invalid address '{s}'", ctx.index) from None
    return a


def mark_value(s: str, ctx: Ctx) -> tuple[int, int]:
    v, _, m = s.partition("/")
    return _int(v, ctx, "mark"), (_int(m, ctx, "mask") if m else 0xFFFFFFFF)


_NAT_RANGES: dict = {}  # (text, family) -> NatRange: frozen, so rules share them


def nat_range(s: str, ctx: Ctx, need_addr: bool = True) -> NatRange:
    """``1.2.3.4``, ``1.2.3.4-1.2.3.9``, ``1.2.3.4:80``, ``1.2.3.4:80-90``, ``[::1]:80``, ``:80``."""
    r = _NAT_RANGES.get((s, ctx.family))
    if r is None:
        r = _nat_range(s, ctx)
        if len(_NAT_RANGES) < 65536:
            _NAT_RANGES[(s, ctx.family)] = r
    return r


def dotted_quad(s: str, aton=socket.inet_aton, ntoa=socket.inet_ntoa) -> bytes | None:
    """The 4 bytes of ``s`` when it is a dotted quad as inet_ntoa writes it (what the octet regex
    accepts), else None: inet_aton alone also takes '10.1', '010.0.0.1', '0x0a.0.0.1',
    '1.2.3.4 junk', and refuses non-ASCII digits with OSError.

    >>> dotted_quad("10.0.0.1"), dotted_quad("10.1"), dotted_quad("010.0.0.1")
    (b'\\n\\x00\\x00\\x01', None, None)
    """
    try:
        packed = aton(s)
    except (OSError, ValueError):
        return None
    return packed if ntoa(packed) == s else None


def _nat_range(s: str, ctx: Ctx, quad=dotted_quad) -> NatRange:
    if ctx.family == 4:
        # ADDR or ADDR:PORT[-PORT] of IPv4 (kube-proxy's DNAT --to-destination): a dotted quad
        # as inet_ntoa writes it, ports of ASCII digits
        addr, colon, ports = s.partition(":")
        packed = quad(addr)
        if packed is not None:
            lo = _v4_address(int.from_bytes(packed, "big"))
            if not colon:
                return new_NatRange(lo, lo, None, None)
            p, dash, q = ports.partition("-")
            if p.isascii() and p.isdigit() and (not dash or q.isascii() and q.isdigit()):
                pl = int(p)
                ph = int(q) if dash else pl
                if ph <= 65535 and pl <= ph:
                    return new_NatRange(lo, lo, pl, ph)
        # anything else, or ports out of range: the general way below decides and says so
    addr, ports = s, None
    if not s:
        raise DecodeError("PRS006", "empty NAT range: iptables refuses it (\"Bad IP address \"\"\")",
                          ctx.index, hint="expected ADDR[-ADDR][:PORT[-PORT]], e.g. 10.244.1.5:8080")
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise DecodeError("PRS006", f"invalid NAT range '{s}' (missing ']')", ctx.index)
        addr, rest = s[1:end], s[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise DecodeError("PRS006", f"invalid NAT range '{s}'", ctx.index)
            ports = rest[1:]
    elif s.count(":") == 1 or (ctx.family == 4 and ":" in s):
        addr, ports = s.split(":", 1)
    lo = hi = None
    if addr:
        a, _, b = addr.partition("-")
        try:
            lo = _ip(a)
            hi = _ip(b) if b else lo
        except ValueError:
            raise DecodeError("PRS006", f"invalid NAT address '{addr}' in '{s}'", ctx.index,
                              hint="expected ADDR[-ADDR][:PORT[-PORT]], e.g. 10.244.1.5:8080") from None
        if lo.version != ctx.family or hi.version != ctx.family or hi < lo:
            raise DecodeError("PRS006", f"invalid NAT address range '{addr}'", ctx.index)
    pl = ph = None
    if ports is not None:
        a, _, b = ports.partition("-")
        if not a.isdecimal() or (b and not b.isdecimal()):
            raise DecodeError("PRS006", f"invalid NAT port range '{ports}' in '{s}'", ctx.index,
                              hint="expected PORT or PORT-PORT after ':'")
        pl = int(a)
        ph = int(b) if b else pl
        if ph > 65535 or pl > ph:
            raise DecodeError("PRS006", f"invalid NAT port range '{ports}'", ctx.index)
    return new_NatRange(lo, hi, pl, ph)


def to_ports(s: str, ctx: Ctx) -> tuple[int, int]:
    a, _, b = s.replace(":", "-").partition("-")
    if not a.isdecimal() or (b and not b.isdecimal()):
        raise DecodeError("PRS006", f"invalid port range '{s}'", ctx.index)
    lo = int(a)
    hi = int(b) if b else lo
    if hi > 65535 or lo > hi:
        raise DecodeError("PRS006", f"invalid port range '{s}'", ctx.index)
    return (lo, hi)


def tcp_flag_set(s: str, ctx: Ctx) -> int:
    v = 0
    for f in s.split(","):
        if f.upper() not in TCP_FLAGS:
            raise DecodeError("PRS004", f"unknown TCP flag '{f}'", ctx.index,
                              hint=_suggest(f.upper(), TCP_FLAGS, "flag"))
        v |= TCP_FLAGS[f.upper()]
    return v


def _suggest(word: str, choices, what: str = "option") -> str | None:
    import difflib  # only for a word that is wrong (a parse of a clean dump never suggests)

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def _ranges_ids(s: str, ctx: Ctx, what: str) -> tuple[int, int]:
    a, _, b = s.partition("-")
    if not a.isdecimal():
        raise DecodeError("PRS105", f"{'user' if what == 'uid' else 'group'} name '{s}' instead of a "
                          f"numeric {what}: iptables-restore resolves it on the machine (and refuses the "
                          "rule where it does not exist); synack cannot, so this match is APPROXIMATE",
                          ctx.index, hint=f"write the numeric {what} (`id -{what[0]} {s}` on that machine)",
                          warning=True, value=s)
    return (int(a), int(b) if b.isdecimal() else int(a))


# ------------------------------------------------------------------------ match handlers
# A handler gets (module, option, args, negated, col, end, ctx) and returns a Match.

def _h_ports(mod, opt, args, neg, col, end, ctx):
    direction = "src" if opt in ("--sport", "--source-port", "--sports", "--source-ports") else (
        "any" if opt == "--ports" else "dst")
    rng = port_list(args[0], ctx) if mod == "multiport" else (
        port_range(args[0], ctx, mod == "tcp" or mod == "sctp"),)
    return new_PortMatch(col, end, neg, mod, direction, rng)


def _h_tcp_flags(mod, opt, args, neg, col, end, ctx):
    if opt == "--syn":
        return new_TcpFlagsMatch(col, end, neg, 0x17, 0x02)
    return new_TcpFlagsMatch(col, end, neg, tcp_flag_set(args[0], ctx), tcp_flag_set(args[1], ctx))


def _h_icmp(mod, opt, args, neg, col, end, ctx):
    fam = 6 if mod in ("icmp6", "icmpv6") else 4
    table = ICMP6 if fam == 6 else ICMP4
    s = args[0]
    if s in table:
        t, c = table[s]
    else:
        a, _, b = s.partition("/")
        if not (a.isascii() and a.isdigit()) or (b and not (b.isascii() and b.isdigit())):
            raise DecodeError("PRS004", f"unknown ICMP type {printable(s)}", ctx.index,
                              hint=_suggest(s, table, "type"))
        t, c = int(a), (int(b) if b else None)
        if t > 255 or (c is not None and c > 255):  # one byte each (iptables: "Invalid ICMP type")
            raise DecodeError("PRS004", f"ICMP type '{s}' out of range: type and code are 0..255",
                              ctx.index)
    return new_IcmpMatch(col, end, neg, fam, t, c, s)


def _h_mark(mod, opt, args, neg, col, end, ctx):
    v, m = mark_value(args[0], ctx)
    return new_MarkMatch(col, end, neg, mod, v & m, m)


def _h_state(mod, opt, args, neg, col, end, ctx):
    states = frozenset(s.upper() for s in args[0].split(","))
    bad = states - CT_STATES
    if bad:
        b = sorted(bad)[0]
        raise DecodeError("PRS004", f"unknown conntrack state '{b}'", ctx.index,
                          hint=_suggest(b, CT_STATES, "state"))
    return new_CtStateMatch(col, end, neg, mod, states)


def _h_cttuple(mod, opt, args, neg, col, end, ctx):
    name = opt[4:]
    if name.endswith("port"):
        return CtTupleMatch(col, end, neg, name, (), port_range(args[0], ctx))
    nets = tuple(n for n in (network(a, ctx) for a in args[0].split(",")) if n is not None)
    return CtTupleMatch(col, end, neg, name, nets, None)


def _h_ctstatus(mod, opt, args, neg, col, end, ctx):
    return CtStatusMatch(col, end, neg, opt[2:], frozenset(args[0].upper().split(",")))


def _h_addrtype(mod, opt, args, neg, col, end, ctx):
    types = frozenset(args[0].upper().split(","))
    bad = types - ADDR_TYPES
    if bad:
        b = sorted(bad)[0]
        raise DecodeError("PRS004", f"unknown address type '{b}'", ctx.index,
                          hint=_suggest(b, ADDR_TYPES, "type"))
    return new_AddrTypeMatch(col, end, neg, "src" if opt == "--src-type" else "dst", types)


def _h_statistic(mod, opt, args, neg, col, end, ctx):
    # options of one -m statistic are merged by the decoder (see _merge_statistic)
    return new_OpaqueMatch(col, end, neg, mod, opt, tuple(args))


def _h_owner(mod, opt, args, neg, col, end, ctx):
    if opt in ("--socket-exists", "--suppl-groups"):
        return new_OwnerMatch(col, end, neg, opt[2:])
    lo, hi = _ranges_ids(args[0], ctx, "uid" if opt == "--uid-owner" else "gid")
    return new_OwnerMatch(col, end, neg, "uid" if opt == "--uid-owner" else "gid", lo, hi)


def _h_set(mod, opt, args, neg, col, end, ctx):
    if opt in ("--match-set", "--set"):
        return new_SetMatch(col, end, neg, args[0], tuple(args[1].split(",")))
    return new_OpaqueMatch(col, end, neg, mod, opt, tuple(args))


def _h_physdev(mod, opt, args, neg, col, end, ctx):
    return PhysdevMatch(col, end, neg, opt[2:], args[0] if args else None)


def _h_iprange(mod, opt, args, neg, col, end, ctx):
    a, _, b = args[0].partition("-")
    lo = address(a, ctx)
    hi = address(b, ctx) if b else lo
    if hi < lo or lo.version != ctx.family:
        raise DecodeError("PRS005", f"invalid address range '{args[0]}'", ctx.index)
    return IpRangeMatch(col, end, neg, "src" if opt == "--src-range" else "dst", lo, hi)


def _h_comment(mod, opt, args, neg, col, end, ctx):
    # iptables 1.8 accepts a comment of any length (the kernel keeps the first 255 bytes)
    return new_CommentMatch(col, end, neg, args[0])


def _h_opaque(mod, opt, args, neg, col, end, ctx):
    return new_OpaqueMatch(col, end, neg, mod, opt, tuple(args))


_RATE = re.compile(r"([1-9]\d*)(?:/([a-zA-Z]+))?")


def _h_limit(mod, opt, args, neg, col, end, ctx):
    """``--limit N[/second|minute|hour|day]`` (any prefix of the unit), ``--limit-burst N``."""
    s = args[0]
    if opt == "--limit-burst":
        if not s.isdecimal():
            raise DecodeError("PRS004", f"invalid --limit-burst '{s}'", ctx.index, hint="a packet count such as 5")
    else:
        m = _RATE.fullmatch(s)
        unit = m.group(2).lower() if m and m.group(2) else "second"
        if m is None or not any(u.startswith(unit) for u in ("second", "minute", "hour", "day")):
            raise DecodeError("PRS004", f"bad rate '{s}'", ctx.index, hint="a rate such as 5/second, 10/minute")
    return new_OpaqueMatch(col, end, neg, mod, opt, tuple(args))


_MAC = re.compile(r"^[0-9a-fA-F]{1,2}(?::[0-9a-fA-F]{1,2}){5}$")
_ANON_MAC = re.compile(r"^[0-9a-fA-FxX]{1,2}(?::[0-9a-fA-FxX]{1,2}){5}$")


def _h_mac(mod, opt, args, neg, col, end, ctx):
    s = args[0]
    if not _MAC.match(s):
        if _ANON_MAC.match(s):
            raise DecodeError("PRS102", f"MAC address '{s}' was anonymised: iptables-restore refuses "
                              "it (\"Invalid MAC address specified\"); synack treats this match as "
                              "unknown (APPROXIMATE)", ctx.index,
                              hint="put the real MAC address back to analyse this rule exactly",
                              warning=True, value=s)
        raise DecodeError("PRS004", f"invalid MAC address '{s}'", ctx.index,
                          hint="expected six hex bytes such as 52:54:00:12:34:56")
    return new_OpaqueMatch(col, end, neg, mod, opt, tuple(args))


_PORTS = {"--sport": 1, "--source-port": 1, "--dport": 1, "--destination-port": 1}
_P = _h_ports

# module -> option -> (number of arguments, handler)
MATCH_MODULES: dict[str, dict[str, tuple[int, object]]] = {
    "tcp": {**{k: (1, _P) for k in _PORTS}, "--tcp-flags": (2, _h_tcp_flags),
            "--syn": (0, _h_tcp_flags), "--tcp-option": (1, _h_opaque)},
    "udp": {k: (1, _P) for k in _PORTS},
    "udplite": {k: (1, _P) for k in _PORTS},
    "sctp": {**{k: (1, _P) for k in _PORTS}, "--chunk-types": (2, _h_opaque)},
    "dccp": {**{k: (1, _P) for k in _PORTS}, "--dccp-types": (1, _h_opaque), "--dccp-option": (1, _h_opaque)},
    "multiport": {k: (1, _P) for k in ("--sports", "--source-ports", "--dports",
                                       "--destination-ports", "--ports")},
    "icmp": {"--icmp-type": (1, _h_icmp)},
    "icmp6": {"--icmpv6-type": (1, _h_icmp)},
    "mark": {"--mark": (1, _h_mark)},
    "connmark": {"--mark": (1, _h_mark)},
    "state": {"--state": (1, _h_state)},
    "conntrack": {"--ctstate": (1, _h_state), "--ctproto": (1, _h_opaque),
                  **{f"--ct{d}{s}": (1, _h_cttuple) for d in ("orig", "repl") for s in
                     ("src", "dst", "srcport", "dstport")},
                  "--ctstatus": (1, _h_ctstatus), "--ctdir": (1, _h_ctstatus),
                  "--ctexpire": (1, _h_opaque)},
    "addrtype": {"--src-type": (1, _h_addrtype), "--dst-type": (1, _h_addrtype),
                 "--limit-iface-in": (0, _h_opaque), "--limit-iface-out": (0, _h_opaque)},
    "statistic": {"--mode": (1, _h_statistic), "--probability": (1, _h_statistic),
                  "--every": (1, _h_statistic), "--packet": (1, _h_statistic)},
    "owner": {"--uid-owner": (1, _h_owner), "--gid-owner": (1, _h_owner),
              "--socket-exists": (0, _h_owner), "--suppl-groups": (0, _h_owner),
              "--pid-owner": (1, _h_opaque), "--sid-owner": (1, _h_opaque),
              "--cmd-owner": (1, _h_opaque)},
    "set": {"--match-set": (2, _h_set), "--set": (2, _h_set), "--return-nomatch": (0, _h_set),
            "--update-counters": (0, _h_set), "--update-subcounters": (0, _h_set),
            "--packets-eq": (1, _h_set), "--packets-lt": (1, _h_set), "--packets-gt": (1, _h_set),
            "--bytes-eq": (1, _h_set), "--bytes-lt": (1, _h_set), "--bytes-gt": (1, _h_set)},
    "physdev": {"--physdev-in": (1, _h_physdev), "--physdev-out": (1, _h_physdev),
                "--physdev-is-in": (0, _h_physdev), "--physdev-is-out": (0, _h_physdev),
                "--physdev-is-bridged": (0, _h_physdev)},
    "comment": {"--comment": (1, _h_comment)},
    "iprange": {"--src-range": (1, _h_iprange), "--dst-range": (1, _h_iprange)},
    # known syntax, semantics not evaluated (APPROXIMATE)
    "socket": {"--transparent": (0, _h_opaque), "--nowildcard": (0, _h_opaque),
               "--restore-skmark": (0, _h_opaque)},
    "recent": {"--name": (1, _h_opaque), "--set": (0, _h_opaque), "--rsource": (0, _h_opaque),
               "--rdest": (0, _h_opaque), "--mask": (1, _h_opaque), "--rcheck": (0, _h_opaque),
               "--update": (0, _h_opaque), "--remove": (0, _h_opaque), "--seconds": (1, _h_opaque),
               "--reap": (0, _h_opaque), "--hitcount": (1, _h_opaque), "--rttl": (0, _h_opaque)},
    "limit": {"--limit": (1, _h_limit), "--limit-burst": (1, _h_limit)},
    "hashlimit": {k: (1, _h_opaque) for k in (
        "--hashlimit", "--hashlimit-upto", "--hashlimit-above", "--hashlimit-burst",
        "--hashlimit-mode", "--hashlimit-srcmask", "--hashlimit-dstmask", "--hashlimit-name",
        "--hashlimit-htable-size", "--hashlimit-htable-max", "--hashlimit-htable-expire",
        "--hashlimit-htable-gcinterval", "--hashlimit-rate-match", "--hashlimit-rate-interval")},
    "length": {"--length": (1, _h_opaque)},
    "ttl": {"--ttl-eq": (1, _h_opaque), "--ttl-gt": (1, _h_opaque), "--ttl-lt": (1, _h_opaque),
            "--ttl": (1, _h_opaque)},
    "hl": {"--hl-eq": (1, _h_opaque), "--hl-gt": (1, _h_opaque), "--hl-lt": (1, _h_opaque)},
    "mac": {"--mac-source": (1, _h_mac)},
    "pkttype": {"--pkt-type": (1, _h_opaque)},
    "connlimit": {"--connlimit-upto": (1, _h_opaque), "--connlimit-above": (1, _h_opaque),
                  "--connlimit-mask": (1, _h_opaque), "--connlimit-saddr": (0, _h_opaque),
                  "--connlimit-daddr": (0, _h_opaque)},
    "helper": {"--helper": (1, _h_opaque)},
    "dscp": {"--dscp": (1, _h_opaque), "--dscp-class": (1, _h_opaque)},
    "tos": {"--tos": (1, _h_opaque)},
    "ecn": {"--ecn-tcp-cwr": (0, _h_opaque), "--ecn-tcp-ece": (0, _h_opaque),
            "--ecn-ip-ect": (1, _h_opaque)},
    "u32": {"--u32": (1, _h_opaque)},
    "string": {"--algo": (1, _h_opaque), "--string": (1, _h_opaque), "--hex-string": (1, _h_opaque),
               "--from": (1, _h_opaque), "--to": (1, _h_opaque), "--icase": (0, _h_opaque)},
    "time": {k: (1, _h_opaque) for k in ("--datestart", "--datestop", "--timestart", "--timestop",
                                         "--monthdays", "--weekdays")} | {
        "--localtz": (0, _h_opaque), "--utc": (0, _h_opaque), "--kerneltz": (0, _h_opaque),
        "--contiguous": (0, _h_opaque)},
    "rpfilter": {"--loose": (0, _h_opaque), "--validmark": (0, _h_opaque),
                 "--accept-local": (0, _h_opaque), "--invert": (0, _h_opaque)},
    "devgroup": {"--src-group": (1, _h_opaque), "--dst-group": (1, _h_opaque)},
    "cgroup": {"--path": (1, _h_opaque), "--cgroup": (1, _h_opaque)},
    "policy": {"--dir": (1, _h_opaque), "--pol": (1, _h_opaque), "--strict": (0, _h_opaque),
               "--reqid": (1, _h_opaque), "--spi": (1, _h_opaque), "--proto": (1, _h_opaque),
               "--mode": (1, _h_opaque), "--tunnel-src": (1, _h_opaque),
               "--tunnel-dst": (1, _h_opaque), "--next": (0, _h_opaque)},
    "esp": {"--espspi": (1, _h_opaque)},
    "ah": {"--ahspi": (1, _h_opaque), "--ahlen": (1, _h_opaque), "--ahres": (0, _h_opaque)},
    "ipvs": {"--ipvs": (0, _h_opaque), "--vproto": (1, _h_opaque), "--vaddr": (1, _h_opaque),
             "--vport": (1, _h_opaque), "--vdir": (1, _h_opaque), "--vmethod": (1, _h_opaque),
             "--vportctl": (1, _h_opaque)},
    "nfacct": {"--nfacct-name": (1, _h_opaque)},
    "bpf": {"--bytecode": (1, _h_opaque), "--object-pinned": (1, _h_opaque)},
    "quota": {"--quota": (1, _h_opaque)},
    "connbytes": {"--connbytes": (1, _h_opaque), "--connbytes-dir": (1, _h_opaque),
                  "--connbytes-mode": (1, _h_opaque)},
    "realm": {"--realm": (1, _h_opaque)},
    "tcpmss": {"--mss": (1, _h_opaque)},
    "frag": {"--fragid": (1, _h_opaque), "--fraglen": (1, _h_opaque), "--fragres": (0, _h_opaque),
             "--fragfirst": (0, _h_opaque), "--fragmore": (0, _h_opaque), "--fraglast": (0, _h_opaque)},
    "rt": {"--rt-type": (1, _h_opaque), "--rt-segsleft": (1, _h_opaque), "--rt-len": (1, _h_opaque),
           "--rt-0-res": (0, _h_opaque), "--rt-0-addrs": (1, _h_opaque), "--rt-0-not-strict": (0, _h_opaque)},
    "ipv6header": {"--header": (1, _h_opaque), "--soft": (0, _h_opaque)},
    "mh": {"--mh-type": (1, _h_opaque)},
    "hbh": {"--hbh-len": (1, _h_opaque), "--hbh-opts": (1, _h_opaque)},
    "dst": {"--dst-len": (1, _h_opaque), "--dst-opts": (1, _h_opaque)},
    "eui64": {},
    "cluster": {"--cluster-total-nodes": (1, _h_opaque), "--cluster-local-node": (1, _h_opaque),
                "--cluster-local-nodemask": (1, _h_opaque), "--cluster-hash-seed": (1, _h_opaque)},
    "condition": {"--condition": (1, _h_opaque)},
    "geoip": {"--src-cc": (1, _h_opaque), "--dst-cc": (1, _h_opaque),
              "--source-country": (1, _h_opaque), "--destination-country": (1, _h_opaque)},
    "osf": {"--genre": (1, _h_opaque), "--ttl": (1, _h_opaque), "--log": (1, _h_opaque)},
    "state6": {},
    "ipv4options": {"--ssrr": (0, _h_opaque), "--lsrr": (0, _h_opaque), "--no-srr": (0, _h_opaque),
                    "--rr": (0, _h_opaque), "--ts": (0, _h_opaque), "--ra": (0, _h_opaque),
                    "--any-opt": (0, _h_opaque), "--flags": (1, _h_opaque), "--any": (0, _h_opaque)},
    "addrtype6": {},
    "l2tp": {"--tid": (1, _h_opaque), "--sid": (1, _h_opaque), "--pversion": (1, _h_opaque),
             "--type": (1, _h_opaque)},
}
MODULE_ALIASES = {"icmpv6": "icmp6", "ipv6-icmp": "icmp6"}
# Extensions that exist for one family only: the other one's restore cannot load them
# ("Couldn't load match `icmp6'").
FAMILY_MODULES = {
    4: frozenset({"icmp", "ttl", "ipv4options", "realm"}),
    6: frozenset({"icmp6", "hl", "rt", "frag", "hbh", "dst", "ipv6header", "mh", "eui64"}),
}
FAMILY_TARGETS = {4: frozenset({"TTL", "ULOG", "CLUSTERIP", "SAME", "MIRROR"}), 6: frozenset({"HL"})}
# Matches the kernel accepts only with `-p` of their protocol, not negated
# (xt_check_match: "tcp match: only valid for protocol 6").
MODULE_PROTOCOLS = {
    "tcp": (6,), "udp": (17,), "udplite": (136,), "sctp": (132,), "dccp": (33,), "icmp": (1,),
    "icmp6": (58,), "esp": (50,), "ah": (51,), "mh": (135,),
    "multiport": (6, 17, 136, 132, 33),
}
# Modules iptables refuses without any option ("mac: option "--mac-source" must be specified",
# "conntrack: At least one option is required"); limit, time, socket, rpfilter, cgroup, esp, ah,
# tcp, udp ... are fine bare.
NEEDS_AN_OPTION = frozenset({
    "mac", "comment", "set", "state", "mark", "connmark", "multiport", "addrtype", "owner",
    "statistic", "physdev", "iprange", "conntrack", "recent", "hashlimit", "string", "length",
    "pkttype", "policy", "tcpmss", "helper", "ttl", "hl", "dscp", "u32", "connlimit", "nfacct",
    "devgroup", "icmp", "icmp6", "quota", "connbytes", "realm", "bpf", "cluster", "ipvs", "ecn", "tos",
})
# A protocol named by -p loads its match module implicitly (``-p tcp --dport 80``).
IMPLICIT_MODULES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6", 132: "sctp", 136: "udplite",
                    33: "dccp", 50: "esp", 51: "ah", 135: "mh"}


# ------------------------------------------------------------------------ targets
def _mark_target(kind, opts, ctx, col, end):
    """MARK / CONNMARK --set-* forms, normalised to xmark value/mask."""
    value = mask = None
    for opt, args, i in opts:
        ctx.index = i
        if opt in ("--set-xmark", "--set-mark"):
            v, m = mark_value(args[0], ctx)
            value, mask = (v, m) if opt == "--set-xmark" else (v, v | m)
        elif opt == "--and-mark":
            value, mask = 0, (~_int(args[0], ctx, "mark")) & 0xFFFFFFFF
        elif opt == "--or-mark":
            b = _int(args[0], ctx, "mark")
            value, mask = b, b
        elif opt == "--xor-mark":
            value, mask = _int(args[0], ctx, "mark"), 0
    return new_SetMark(col, end, kind, value, mask)


def _t_mark(name, opts, ctx, col, end):
    if not opts:
        raise DecodeError("PRS007", "MARK needs one of --set-xmark/--set-mark/--and-mark/--or-mark/--xor-mark",
                          ctx.index)
    return _mark_target("MARK", opts, ctx, col, end)


def _t_connmark(name, opts, ctx, col, end):
    names = [o for o, _, _ in opts]
    if "--save-mark" in names or "--restore-mark" in names:
        nf = ct = 0xFFFFFFFF
        for opt, args, i in opts:
            ctx.index = i
            if opt == "--mask":
                nf = ct = _int(args[0], ctx, "mask")
            elif opt == "--nfmask":
                nf = _int(args[0], ctx, "mask")
            elif opt == "--ctmask":
                ct = _int(args[0], ctx, "mask")
        return ConnmarkCopy(col, end, "save" if "--save-mark" in names else "restore", nf, ct)
    if not any(o in ("--set-xmark", "--set-mark", "--and-mark", "--or-mark", "--xor-mark") for o in names):
        raise DecodeError("PRS007", "CONNMARK needs an action: iptables says \"No operation specified\"",
                          ctx.index, hint="add --set-xmark, --save-mark or --restore-mark")
    return _mark_target("CONNMARK", opts, ctx, col, end)


def _flag(opts, name):
    return any(o == name for o, _, _ in opts)


def _t_nat(name, opts, ctx, col, end):
    if len(opts) == 1 and opts[0][0] != "--random" and opts[0][0][:4] == "--to":  # the usual form
        ctx.index = opts[0][2] + 1
        return new_Nat(col, end, name, (nat_range(opts[0][1][0], ctx),), False, False, False)
    ranges = []
    for opt, args, i in opts:
        if opt in ("--to-destination", "--to-source"):
            ctx.index = i + 1
            ranges.append(nat_range(args[0], ctx))
    if not ranges:
        raise DecodeError("PRS007", f"{name} needs --to-{'destination' if name == 'DNAT' else 'source'}",
                          ctx.index)
    return new_Nat(col, end, name, tuple(ranges), _flag(opts, "--random"), _flag(opts, "--persistent"),
               _flag(opts, "--random-fully"))


def _ports_opt(opts, ctx):
    for opt, args, i in opts:
        if opt == "--to-ports":
            ctx.index = i + 1
            return to_ports(args[0], ctx)
    return None


def _t_masq(name, opts, ctx, col, end):
    return Masquerade(col, end, _ports_opt(opts, ctx), _flag(opts, "--random"), _flag(opts, "--random-fully"))


def _t_redirect(name, opts, ctx, col, end):
    return Redirect(col, end, _ports_opt(opts, ctx), _flag(opts, "--random"))


def _t_netmap(name, opts, ctx, col, end):
    for opt, args, i in opts:
        ctx.index = i + 1
        net = network(args[0], ctx)
        if net is not None:
            return Netmap(col, end, net)
    raise DecodeError("PRS007", "NETMAP needs --to ADDRESS/PREFIX", ctx.index)


def _t_tproxy(name, opts, ctx, col, end):
    port, ip, mark, mask = None, None, 0, 0
    for opt, args, i in opts:
        ctx.index = i + 1
        if opt == "--on-port":
            port = _int(args[0], ctx, "port", 0, 65535)
        elif opt == "--on-ip":
            ip = address(args[0], ctx)
        elif opt == "--tproxy-mark":
            mark, mask = mark_value(args[0], ctx)
    if port is None:
        raise DecodeError("PRS007", "TPROXY needs --on-port", ctx.index)
    return Tproxy(col, end, port, ip, mark, mask)


def _t_reject(name, opts, ctx, col, end):
    w = "icmp-port-unreachable" if ctx.family == 4 else "icmp6-port-unreachable"
    for opt, args, i in opts:
        ctx.index = i + 1
        w = args[0]
        if w not in REJECT_WITH[ctx.family] and w not in ("icmp-port-unreachable", "port-unreach"):
            raise DecodeError("PRS007", f"unknown --reject-with type '{w}'", ctx.index,
                              hint=_suggest(w, REJECT_WITH[ctx.family]))
        w = REJECT_ALIASES.get(w, w)
        if ctx.family == 6 and w in ("port-unreach", "icmp-port-unreachable"):
            w = "icmp6-port-unreachable"
    return Reject(col, end, w)


def _t_ct(name, opts, ctx, col, end):
    if name == "NOTRACK" or _flag(opts, "--notrack"):
        return Notrack(col, end, name)
    return OtherTarget(col, end, name, tuple((o, tuple(a)) for o, a, _ in opts), False, True)


def _t_verdict(name, opts, ctx, col, end):
    return new_Verdict(col, end, name)


def _t_other(name, opts, ctx, col, end):
    terminating, _spec, effect = OTHER_TARGETS[name]
    return OtherTarget(col, end, name, tuple((o, tuple(a)) for o, a, _ in opts), terminating, effect)


# target -> (option -> number of arguments, builder)
TARGETS: dict[str, tuple[dict[str, int], object]] = {
    "ACCEPT": ({}, _t_verdict), "DROP": ({}, _t_verdict), "RETURN": ({}, _t_verdict),
    "QUEUE": ({}, _t_verdict),
    "REJECT": ({"--reject-with": 1}, _t_reject),
    # '--to' is getopt's unambiguous abbreviation of --to-destination / --to-source
    "DNAT": ({"--to-destination": 1, "--random": 0, "--persistent": 0, "--random-fully": 0}, _t_nat),
    "SNAT": ({"--to-source": 1, "--random": 0, "--persistent": 0, "--random-fully": 0}, _t_nat),
    "MASQUERADE": ({"--to-ports": 1, "--random": 0, "--random-fully": 0}, _t_masq),
    "REDIRECT": ({"--to-ports": 1, "--random": 0}, _t_redirect),
    "NETMAP": ({"--to": 1}, _t_netmap),
    "TPROXY": ({"--on-port": 1, "--on-ip": 1, "--tproxy-mark": 1}, _t_tproxy),
    "MARK": ({"--set-xmark": 1, "--set-mark": 1, "--and-mark": 1, "--or-mark": 1, "--xor-mark": 1}, _t_mark),
    "CONNMARK": ({"--set-xmark": 1, "--set-mark": 1, "--and-mark": 1, "--or-mark": 1, "--xor-mark": 1,
                  "--save-mark": 0, "--restore-mark": 0, "--nfmask": 1, "--ctmask": 1, "--mask": 1},
                 _t_connmark),
    "CT": ({"--notrack": 0, "--zone": 1, "--zone-orig": 1, "--zone-reply": 1, "--helper": 1,
            "--ctevents": 1, "--expevents": 1, "--timeout": 1}, _t_ct),
    "NOTRACK": ({}, _t_ct),
}
# name -> (terminating, options, effect on the packet modelled)
OTHER_TARGETS: dict[str, tuple[bool, dict[str, int], bool]] = {
    "LOG": (False, {"--log-prefix": 1, "--log-level": 1, "--log-tcp-sequence": 0,
                    "--log-tcp-options": 0, "--log-ip-options": 0, "--log-uid": 0,
                    "--log-macdecode": 0}, True),
    "NFLOG": (False, {"--nflog-group": 1, "--nflog-prefix": 1, "--nflog-range": 1,
                      "--nflog-size": 1, "--nflog-threshold": 1}, True),
    "ULOG": (False, {"--ulog-nlgroup": 1, "--ulog-prefix": 1, "--ulog-cprange": 1,
                     "--ulog-qthreshold": 1}, True),
    "TRACE": (False, {}, True),
    "AUDIT": (False, {"--type": 1}, True),
    "TCPMSS": (False, {"--set-mss": 1, "--clamp-mss-to-pmtu": 0}, True),
    "DSCP": (False, {"--set-dscp": 1, "--set-dscp-class": 1}, True),
    "TOS": (False, {"--set-tos": 1, "--and-tos": 1, "--or-tos": 1, "--xor-tos": 1}, True),
    "ECN": (False, {"--ecn-tcp-remove": 0, "--ecn-tcp-cwr": 0, "--ecn-tcp-ece": 0, "--ecn-ip-ect": 1}, True),
    "TTL": (False, {"--ttl-set": 1, "--ttl-dec": 1, "--ttl-inc": 1}, True),
    "HL": (False, {"--hl-set": 1, "--hl-dec": 1, "--hl-inc": 1}, True),
    "CLASSIFY": (False, {"--set-class": 1}, True),
    "CHECKSUM": (False, {"--checksum-fill": 0}, True),
    "CONNSECMARK": (False, {"--save": 0, "--restore": 0}, True),
    "SECMARK": (False, {"--selctx": 1}, True),
    "IDLETIMER": (False, {"--timeout": 1, "--label": 1, "--alarm": 0}, True),
    "LED": (False, {"--led-trigger-id": 1, "--led-delay": 1, "--led-always-blink": 0}, True),
    "SET": (False, {"--add-set": 2, "--del-set": 2, "--map-set": 2, "--exist": 0, "--timeout": 1,
                    "--map-mark": 0, "--map-prio": 0, "--map-queue": 0}, True),
    "TEE": (False, {"--gateway": 1, "--oif": 1}, True),
    "NFQUEUE": (True, {"--queue-num": 1, "--queue-balance": 1, "--queue-bypass": 0,
                       "--fail-open": 0, "--queue-cpu-fanout": 0}, True),
    "SYNPROXY": (True, {"--sack-perm": 0, "--timestamp": 0, "--wscale": 1, "--mss": 1, "--ecn": 0}, True),
    "CLUSTERIP": (False, {"--new": 0, "--hashmode": 1, "--clustermac": 1, "--total-nodes": 1,
                          "--local-node": 1, "--hash-init": 1}, False),
    "RATEEST": (False, {"--rateest-name": 1, "--rateest-interval": 1, "--rateest-ewmalog": 1}, True),
    "SAME": (True, {"--to": 1, "--nodst": 0, "--random": 0}, False),
    "MIRROR": (True, {}, False),
    "TARPIT": (True, {}, True),
}
for _n, (_term, _spec, _eff) in OTHER_TARGETS.items():
    TARGETS[_n] = (_spec, _t_other)


def make_target(name: str, opts: list, ctx: Ctx, col: int, end: int, goto: bool):
    """Build the target of ``-j NAME opts`` (``-g`` always names a chain)."""
    if goto:
        return new_Jump(col, end, name, True)
    spec = TARGETS.get(name)
    if spec is None:
        if opts:
            return UnknownTarget(col, end, name, tuple(t for o, a, _ in opts for t in (o, *a)))
        return new_Jump(col, end, name, False)
    return spec[1](name, opts, ctx, col, end)


_PROBABILITIES: dict = {}  # --probability text -> kernel threshold


def random_threshold(prob: float) -> int:
    """The kernel's threshold of ``-m statistic --mode random --probability PROB`` (0..1):
    libxt_statistic's ``info->u.random.probability = lround(0x80000000 * prob)``.

    >>> random_threshold(0.5), random_threshold(1.0)
    (1073741824, 2147483648)
    """
    return int(0x80000000 * prob + 0.5)


def merge_statistic(parts: list[OpaqueMatch], ctx: Ctx) -> StatisticMatch:
    """Options of one ``-m statistic`` become one StatisticMatch with the kernel's threshold."""
    if len(parts) == 2 and parts[0].args[0] == "random" and parts[1].option == "--probability" \
            and parts[0].option == "--mode":
        prob = _PROBABILITIES.get(parts[1].args[0])  # kube-proxy repeats a few probabilities
        if prob is not None:
            return new_StatisticMatch(parts[0].col, parts[1].end_col, parts[0].negated or parts[1].negated,
                                  "random", prob)
    opts = {p.option: p.args[0] for p in parts}
    mode = opts.get("--mode", "")
    col, end = parts[0].col, parts[-1].end_col
    neg = any(p.negated for p in parts)
    if mode == "random":
        try:
            prob = float(opts.get("--probability", ""))
        except ValueError:
            raise DecodeError("PRS004", "statistic --mode random needs --probability 0..1", ctx.index) from None
        if not 0.0 <= prob <= 1.0:
            raise DecodeError("PRS004", f"probability {prob} out of range 0..1", ctx.index)
        threshold = random_threshold(prob)
        if len(_PROBABILITIES) < 4096:
            _PROBABILITIES[opts["--probability"]] = threshold
        return new_StatisticMatch(col, end, neg, "random", threshold)
    if mode == "nth":
        every = _int(opts.get("--every", "0"), ctx, "every", 1)
        return new_StatisticMatch(col, end, neg, "nth", 0, every, _int(opts.get("--packet", "0"), ctx, "packet"))
    raise DecodeError("PRS004", f"statistic --mode must be random or nth, not '{mode}'", ctx.index,
                      hint=_suggest(mode, ("random", "nth")))


def unknown_module_match(mod, opt, args, neg, col, end) -> UnknownMatch:
    return UnknownMatch(col, end, neg, mod, opt, tuple(args))


def all_match_options(mod: str | None) -> list[str]:
    if mod and mod in MATCH_MODULES:
        return list(MATCH_MODULES[mod])
    return sorted({o for spec in MATCH_MODULES.values() for o in spec})


def suggest_option(opt: str, mod: str | None, generic) -> str | None:
    cands = list(generic) + (list(MATCH_MODULES.get(mod, ())) if mod else [])
    hint = _suggest(opt, cands)
    if hint:
        return hint
    for m, spec in MATCH_MODULES.items():
        if opt in spec:
            return f"'{opt}' belongs to '-m {m}'; add '-m {m}' before it"
    return _suggest(opt, all_match_options(None))


def suggest_module(mod: str) -> str | None:
    return _suggest(mod, MATCH_MODULES, "module")


def suggest_target_option(target: str, opt: str) -> str | None:
    spec = TARGETS.get(target, ({},))[0]
    return _suggest(opt, spec)
