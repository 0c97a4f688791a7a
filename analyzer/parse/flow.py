"""Parse layer: the text of ``--flow`` -> one packet, or a set of packets (any field open).

``[PROTO] SRC[:PORTS] -> DST[:PORTS]``: an address is one address, a prefix (``10.0.0.0/8``) or
a range (``10.0.0.1-10.0.0.9``), IPv6 in brackets when a port follows; ports are one port or a
range (``1000-2000``); a part left out is open (any protocol, any port).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from analyzer.model.packet import CT_INPUT, PORT_PROTOS, PROTO, TCP_FLAGS, Packet, tcp_flag_names

_FLOW = re.compile(r"^\s*(?:(?P<proto>[a-z]+|\d+)\s+)?(?P<src>\S+?)\s*->\s*(?P<dst>\S+)\s*$", re.I)

#: the witness value of an open port: an ephemeral source port, a web destination port
DEFAULT_SPORT, DEFAULT_DPORT = 40000, 80


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """A set of packets: ``template`` is one of them (a concrete witness; its fixed fields hold
    for all), ``open`` names the fields with more than one value. For an open field the allowed
    values are ``src``/``dst`` (address ranges, ``(first, last)``), ``sport``/``dport`` (port
    ranges; empty: any port) and ``iif`` (an interface name or ``prefix+`` wildcard; None: any).

    >>> s = parse_flow_spec('tcp 10.0.0.0/8 -> 10.96.0.1:1000-2000')
    >>> sorted(s.open), s.text()
    (['dport', 'sport', 'src'], 'tcp 10.0.0.0/8 -> 10.96.0.1:1000-2000')
    """

    template: Packet
    open: frozenset  # fields the user left open
    src: tuple = ()
    dst: tuple = ()
    sport: tuple = ()
    dport: tuple = ()
    iif: str | None = None
    mark: tuple = ()       # ((value, mask),): the marks m with m & mask == value (given or open)
    connmark: tuple = ()   # the same for the conntrack entry's mark
    ctstate: tuple = ()    # the CT_INPUT names allowed (empty: NEW, not said)
    uid: tuple = ()        # ((lo, hi),) of a local process's uid
    gid: tuple = ()
    tcp_flags: tuple = ()  # ((lo, hi),) of the flag byte (given or open)

    def text(self) -> str:
        """The flow as the user would write it (open parts left out)."""
        t = self.template

        def addr(field: str, rs: tuple) -> str:
            if field not in self.open:
                return str(getattr(t, field))
            return ",".join(_range_text(lo, hi) for lo, hi in rs)

        def side(field: str, port: str) -> str:
            a = addr(field, getattr(self, field))
            ps = self.sport if port == "sport" else self.dport
            if port in self.open:
                p = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ps)
            else:
                p = "" if getattr(t, port) is None else str(getattr(t, port))
            if not p:
                return a
            return f"[{a}]:{p}" if t.family == 6 else f"{a}:{p}"

        from analyzer.model.packet import PROTO_NAME
        proto = "" if "proto" in self.open else f"{PROTO_NAME.get(t.proto, t.proto)} "
        flags = " flags any" if "tcp_flags" in self.open else \
            f" flags {tcp_flag_names(t.tcp_flags)}" if t.proto == 6 and t.tcp_flags != 0x02 \
            and "proto" not in self.open and (self.tcp_flags or not self.ctstate) else ""
        more = ""
        for key in ("mark", "connmark"):
            for v, m in getattr(self, key):
                more += f" {key} " + ("any" if m == 0 else f"{v:#x}" if m == 0xFFFFFFFF else f"{v:#x}/{m:#x}")
        if self.ctstate:
            more += " ctstate " + ("any" if len(self.ctstate) == 4 else ",".join(s.lower() for s in self.ctstate))
        for key in ("uid", "gid"):
            for lo, hi in getattr(self, key):
                more += f" {key} " + ("any" if (lo, hi) == (0, 0xFFFFFFFF) else str(lo) if lo == hi else f"{lo}-{hi}")
        return f"{proto}{side('src', 'sport')} -> {side('dst', 'dport')}{flags}{more}"


def _range_text(lo, hi) -> str:
    if lo == hi:
        return str(lo)
    nets = list(ipaddress.summarize_address_range(lo, hi))
    return str(nets[0]) if len(nets) == 1 else f"{lo}-{hi}"


def _addresses(s: str) -> tuple:
    """``a``, ``a/n`` or ``a-b`` (comma-separated lists too) -> ((first, last), ...)."""
    out = []
    for part in s.split(","):
        if "/" in part:
            n = ipaddress.ip_network(part, strict=False)
            out.append((n.network_address, n.broadcast_address))
        elif "-" in part:
            a, b = (ipaddress.ip_address(x) for x in part.split("-", 1))
            if a.version != b.version or a > b:
                raise ValueError(f"invalid address range '{part}'")
            out.append((a, b))
        else:
            a = ipaddress.ip_address(part)
            out.append((a, a))
    if len({lo.version for lo, _ in out}) != 1:
        raise ValueError(f"'{s}' mixes address families")
    return tuple(out)


def _ports(s: str) -> tuple:
    out = []
    for part in s.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"invalid port '{part}' in flow")
        lo_i, hi_i = int(lo), int(hi) if sep else int(lo)
        if hi_i > 65535 or lo_i > hi_i:
            raise ValueError(f"invalid port '{part}' in flow")
        out.append((lo_i, hi_i))
    return tuple(out)


def _endpoint(s: str) -> tuple[tuple, tuple | None]:
    if s.startswith("["):
        a, _, rest = s[1:].partition("]")
        if rest and not rest.startswith(":"):
            why = f": the prefix length goes inside the brackets, [{a}{rest}]" if rest.startswith("/") else ""
            raise ValueError(f"invalid endpoint '{s}'{why}")
        return _addresses(a), (_ports(rest[1:]) if rest else None)
    if s.count(":") == 1:
        a, p = s.split(":")
        return _addresses(a), _ports(p)
    return _addresses(s), None


def _witness_address(rs: tuple):
    """A host address of the first range: not a prefix's network address when avoidable."""
    lo, hi = rs[0]
    return lo + 1 if int(hi) - int(lo) > 1 else lo  # (lo + 1 overflows at 255.255.255.255)


class FlowError(ValueError):
    """A mistake in ``--flow`` text, shown under the text with a caret and a hint.

    >>> print(FlowError("unknown word 'mrk'", "tcp 1.2.3.4 -> 5.6.7.8 mrk 1", 23, 3, "did you mean 'mark'?"))
    invalid flow: unknown word 'mrk'
      tcp 1.2.3.4 -> 5.6.7.8 mrk 1
                             ^^^
      help: did you mean 'mark'?
    """

    def __init__(self, message: str, text: str, col: int, width: int = 1, hint: str | None = None):
        super().__init__(message)
        self.message, self.text, self.col, self.width, self.hint = message, text, col, max(width, 1), hint

    def __str__(self) -> str:
        out = [f"invalid flow: {self.message}", f"  {self.text}", "  " + " " * self.col + "^" * self.width]
        if self.hint:
            out.append(f"  help: {self.hint}")
        return "\n".join(out)


FLOW_SHAPE = ("[PROTO] SRC[:PORT] -> DST[:PORT] [WORD VALUE ...], e.g. 'tcp 10.0.0.1:40000 -> 10.96.0.10:80' "
              "or, open, '10.0.0.0/8 -> 10.96.0.0/12'")
ENDPOINT_HINT = ("an endpoint is ADDR[:PORT]: ADDR one address, a prefix (10.0.0.0/8), a range "
                 "(10.0.0.1-10.0.0.9) or a comma list; PORT N, N-M or a comma list; IPv6 with a port in "
                 "brackets ([fd00::1]:80, [fd00::/64]:80)")

#: what may follow ``SRC -> DST``, each as ``WORD VALUE`` (any order, each once)
KEYWORDS = {
    "flags": "TCP flags of the packet: 'SYN,ACK' (one combination) or 'any'",
    "mark": "the packet mark on arrival: V, V/MASK (every mark m with m & MASK == V) or 'any'",
    "connmark": "the mark of its conntrack entry (ctstate established/related): V, V/MASK or 'any'",
    "ctstate": "the connection it belongs to: new, established, related, invalid (comma list) or 'any'",
    "uid": "owner uid of the local process (--local): N, N-M or 'any'",
    "gid": "owner gid of the local process (--local): N, N-M or 'any'",
}
_CT_NAMES = ("new", "established", "related", "invalid")
_U32 = (1 << 32) - 1


def split_tcp_flags(text: str) -> tuple[str, int | None]:
    """A flow's ``flags ACK,PSH`` suffix (a TCP packet that is not a connection's first SYN):
    the flow without it, and the flag bits (None: no suffix, the default SYN).

    >>> split_tcp_flags('tcp 10.0.0.1:1 -> 10.0.0.2:80 flags ACK')
    ('tcp 10.0.0.1:1 -> 10.0.0.2:80', 16)
    """
    head, words = _split_words(text)
    if "flags" not in words:
        return text, None
    rs = _flags(*words["flags"], text)
    return head, rs[0][0]


def _split_words(text: str) -> tuple[str, dict]:
    """``text`` up to the end of the destination, and ``{word: (value, column of the value)}``
    of the keywords after it."""
    arrow = text.find("->")
    if arrow < 0:
        return text, {}
    m = re.compile(r"\s*\S+").match(text, arrow + 2)
    if m is None:
        return text, {}
    head = text[:m.end()]
    toks = [(t.group(), t.start()) for t in re.finditer(r"\S+", text[m.end():])]
    toks = [(w, c + m.end()) for w, c in toks]
    words: dict = {}
    for i in range(0, len(toks), 2):
        word, col = toks[i]
        key = word.lower()
        if key not in KEYWORDS:
            import difflib

            near = difflib.get_close_matches(key, list(KEYWORDS), n=1, cutoff=0.5)
            raise FlowError(f"unknown word '{word}' after the destination", text, col, len(word),
                            f"did you mean '{near[0]}'?" if near else
                            "after 'SRC -> DST' come " + ", ".join(f"'{k} VALUE'" for k in KEYWORDS))
        if i + 1 >= len(toks):
            raise FlowError(f"'{word}' needs a value", text, col + len(word), 1, KEYWORDS[key])
        if key in words:
            raise FlowError(f"'{word}' given twice", text, col, len(word), None)
        words[key] = toks[i + 1]
    return head, words


def _flags(value: str, col: int, text: str) -> tuple:
    if value.lower() == "any":
        return ((0, 255),)
    bits = 0
    for name in re.split(r"[,|]", value.upper()):
        if name not in TCP_FLAGS and name != "NONE":
            raise FlowError(f"unknown TCP flag '{name}'", text, col, len(value),
                            "SYN, ACK, FIN, RST, PSH, URG, ECE, CWR, NONE, or 'any'")
        bits |= TCP_FLAGS.get(name, 0)
    return ((bits, bits),)


def _masked(value: str, col: int, text: str, what: str) -> tuple:
    if value.lower() == "any":
        return ((0, 0),)
    v, _, m = value.partition("/")
    try:
        val, mask = int(v, 0), int(m, 0) if m else _U32
    except ValueError:
        raise FlowError(f"invalid {what} '{value}'", text, col, len(value), KEYWORDS[what]) from None
    if not 0 <= val <= _U32 or not 0 <= mask <= _U32:
        raise FlowError(f"{what} '{value}' is not a 32-bit value", text, col, len(value), KEYWORDS[what])
    if val & ~mask:
        raise FlowError(f"{what} value {val:#x} has bits outside its mask {mask:#x}", text, col, len(value),
                        f"no mark m has m & {mask:#x} == {val:#x}; did you mean {val & mask:#x}/{mask:#x}?")
    return ((val, mask),)


def _id_range(value: str, col: int, text: str, what: str) -> tuple:
    if value.lower() == "any":
        return ((0, _U32),)
    lo, sep, hi = value.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()) or int(lo) > _U32 or (sep and int(hi) > _U32) \
            or (sep and int(lo) > int(hi)):
        raise FlowError(f"invalid {what} '{value}'", text, col, len(value), KEYWORDS[what])
    return ((int(lo), int(hi) if sep else int(lo)),)


def _ctstates(value: str, col: int, text: str) -> tuple:
    if value.lower() == "any":
        return tuple(n.upper() for n in _CT_NAMES)
    out = []
    for name in value.lower().split(","):
        if name == "untracked":
            raise FlowError("ctstate UNTRACKED is not an input", text, col, len(value),
                            "a NOTRACK (or CT --notrack) rule makes a packet untracked: the walk decides it")
        if name not in _CT_NAMES:
            import difflib

            near = difflib.get_close_matches(name, _CT_NAMES, n=1, cutoff=0.5)
            raise FlowError(f"unknown conntrack state '{name}'", text, col, len(value),
                            f"did you mean '{near[0]}'?" if near else KEYWORDS["ctstate"])
        if name.upper() not in out:
            out.append(name.upper())
    return tuple(n.upper() for n in _CT_NAMES if n.upper() in out)  # in a fixed order


def parse_flow_spec(text: str, iif: str | None = None, local: bool | None = None) -> FlowSpec:
    """``tcp 10.0.0.1:1234 -> 10.0.0.2:80`` with any part open; ``iif`` an interface or a
    ``prefix+`` wildcard (open when it is a wildcard). After the destination, ``flags``,
    ``mark``, ``connmark``, ``ctstate``, ``uid`` and ``gid`` (`KEYWORDS`) give or open those
    fields; ``local`` False refuses uid/gid (they describe a local process).

    >>> sorted(parse_flow_spec('10.0.0.1 -> 10.0.0.2').open)
    ['dport', 'proto', 'sport']
    >>> sorted(parse_flow_spec('tcp 10.0.0.1 -> 10.0.0.2:80').open)
    ['sport']
    >>> s = parse_flow_spec('udp 10.0.0.0/8:53 -> 10.96.0.0-10.96.0.9:1000-2000', iif='eth+')
    >>> sorted(s.open), s.dport, s.template.tuple_str(), s.template.iif
    (['dport', 'dst', 'iif', 'src'], ((1000, 2000),), 'udp 10.0.0.1:53 -> 10.96.0.1:1000', None)
    >>> s = parse_flow_spec('tcp 10.0.0.1 -> 10.96.0.1:443 mark 0x0/0xffff0000 ctstate any')
    >>> sorted(s.open), s.mark, s.ctstate
    (['ctstate', 'mark', 'sport'], ((0, 4294901760),), ('NEW', 'ESTABLISHED', 'RELATED', 'INVALID'))
    """
    full = text
    text, words = _split_words(text)
    flags = _flags(*words["flags"], full) if "flags" in words else None
    m = _FLOW.match(text)
    if not m:
        raise FlowError("not a flow", full, 0, len(text.rstrip()) or 1, FLOW_SHAPE)
    ends = []
    for side in ("src", "dst"):
        try:
            ends.append(_endpoint(m.group(side)))
        except ValueError as e:
            raise FlowError(str(e), full, m.start(side), len(m.group(side)), ENDPOINT_HINT) from None
    (srcs, sports), (dsts, dports) = ends
    if srcs[0][0].version != dsts[0][0].version:
        raise FlowError("source and destination are of different address families", full, m.start("dst"),
                        len(m.group("dst")), "a flow is IPv4 or IPv6 from end to end")
    open_ = set()
    p = m.group("proto")
    if p is None:
        open_.add("proto")
        proto = 6
    else:
        at = (full, m.start("proto"), len(p))
        p = p.lower()
        if p not in PROTO and not p.isdigit():
            raise FlowError(f"unknown protocol '{p}'", *at, f"{', '.join(PROTO)} or a number (0-255); "
                            "left out: every protocol")
        proto = PROTO.get(p) if p in PROTO else int(p)
        if proto > 255:
            raise FlowError(f"protocol number {proto} out of range", *at, "a protocol number is 0-255")
        if proto not in PORT_PROTOS and (sports or dports):
            side = "dst" if dports else "src"
            raise FlowError(f"{p} flows have no ports", full, m.start(side), len(m.group(side)),
                            "only tcp, udp and sctp flows have ports: leave them out")
    if flags is not None and (p is None or proto != 6):
        if "flags" in words:
            raise FlowError("only tcp flows take 'flags'", full, words["flags"][1], len(words["flags"][0]),
                            "TCP flags belong to tcp flows: 'tcp SRC -> DST flags ...'")
        raise ValueError("only tcp flows take 'flags'")
    for f, rs in (("src", srcs), ("dst", dsts)):
        if len(rs) > 1 or rs[0][0] != rs[0][1]:
            open_.add(f)
    sport = dport = None
    if proto in PORT_PROTOS or "proto" in open_:
        for f, ps in (("sport", sports), ("dport", dports)):
            if ps is None or len(ps) > 1 or ps[0][0] != ps[0][1]:
                open_.add(f)
        sport = sports[0][0] if sports else DEFAULT_SPORT   # an ephemeral port
        dport = dports[0][0] if dports else DEFAULT_DPORT   # a witness for an open port
    if iif is not None and iif.endswith("+"):
        open_.add("iif")
    extra = {}
    for key in ("mark", "connmark"):
        if key in words:
            extra[key] = _masked(*words[key], full, key)
            if extra[key][0][1] != _U32:
                open_.add(key)
    for key in ("uid", "gid"):
        if key in words:
            if local is False:
                raise FlowError(f"'{key}' describes the local process that sends the packet", full,
                                words[key][1] - len(key) - 1, len(key), "add --local (the OUTPUT path)")
            extra[key] = _id_range(*words[key], full, key)
            if extra[key][0][0] != extra[key][0][1]:
                open_.add(key)
    states = _ctstates(*words["ctstate"], full) if "ctstate" in words else ("NEW",)
    if len(states) > 1:
        open_.add("ctstate")
    if "connmark" in words and set(states) <= {"NEW", "INVALID"} and extra["connmark"][0][0] != 0:
        raise FlowError("a packet that opens a connection has no entry yet: its connmark is 0", full,
                        words["connmark"][1], len(words["connmark"][0]), "add 'ctstate established'")
    if flags is not None and flags[0] != (flags[0][0], flags[0][0]):
        open_.add("tcp_flags")
    fam = srcs[0][0].version
    if flags is None:  # a connection's first SYN; an ACK for a packet of an existing one
        flag_bits = 0x02 if "NEW" in states else 0x10
    else:
        flag_bits = 0x02 if "tcp_flags" in open_ else flags[0][0]
    mark = extra.get("mark", ((0, _U32),))[0][0]
    connmark = extra.get("connmark", ((0, _U32),))[0][0]
    uid = extra["uid"][0][0] if "uid" in extra else None
    gid = extra["gid"][0][0] if "gid" in extra else None
    pkt = Packet(fam, proto, _witness_address(srcs), _witness_address(dsts), sport, dport,
                 iif=None if "iif" in open_ else iif, tcp_flags=flag_bits if proto == 6 else 0,
                 icmp_type=(8 if fam == 4 else 128) if proto in (1, 58) else None,
                 icmp_code=0 if proto in (1, 58) else None, mark=mark, uid=uid, gid=gid,
                 connmark=connmark, ctstate=CT_INPUT[states[0]])
    return FlowSpec(pkt, frozenset(open_), srcs, dsts, sports or (), dports or (),
                    iif if "iif" in open_ else None, extra.get("mark", ()), extra.get("connmark", ()),
                    states if "ctstate" in words else (), extra.get("uid", ()), extra.get("gid", ()),
                    flags or ())


def parse_flow(text: str, local: bool | None = None) -> Packet:
    """``tcp 10.0.0.1:1234 -> 10.0.0.2:80`` as one packet: a missing source port is an ephemeral
    one, a missing destination port stays None (see `parse_flow_spec` for open flows).

    >>> parse_flow('tcp 10.4.26.45:35582 -> 10.4.26.234:80').tuple_str()
    'tcp 10.4.26.45:35582 -> 10.4.26.234:80'
    """
    spec = parse_flow_spec(text, local=local)
    if spec.open & {"src", "dst", "iif", "mark", "connmark", "ctstate", "uid", "gid", "tcp_flags"} or any(getattr(spec, f) for f in ("sport", "dport") if f in spec.open):
        raise ValueError("this command takes one concrete flow: give single addresses and ports")
    t = spec.template
    return replace(t, dport=None) if "dport" in spec.open and t.proto in PORT_PROTOS else t
