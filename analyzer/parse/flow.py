"""Parse layer: the text of ``--flow`` -> one packet, or a set of packets (any field open).

``[PROTO] SRC[:PORTS] -> DST[:PORTS]``: an address is one address, a prefix (``10.0.0.0/8``) or
a range (``10.0.0.1-10.0.0.9``), IPv6 in brackets when a port follows; ports are one port or a
range (``1000-2000``); a part left out is open (any protocol, any port).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from analyzer.model.packet import PORT_PROTOS, PROTO, TCP_FLAGS, Packet, tcp_flag_names

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
        flags = f" flags {tcp_flag_names(t.tcp_flags)}" if t.proto == 6 and t.tcp_flags != 0x02 \
            and "proto" not in self.open else ""
        return f"{proto}{side('src', 'sport')} -> {side('dst', 'dport')}{flags}"


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
            raise ValueError(f"invalid endpoint '{s}'")
        return _addresses(a), (_ports(rest[1:]) if rest else None)
    if s.count(":") == 1:
        a, p = s.split(":")
        return _addresses(a), _ports(p)
    return _addresses(s), None


def _witness_address(rs: tuple):
    """A host address of the first range: not a prefix's network address when avoidable."""
    lo, hi = rs[0]
    return lo + 1 if hi > lo + 1 else lo


_FLAGS = re.compile(r"\s+flags\s+(?P<flags>\S+)\s*$", re.I)


def split_tcp_flags(text: str) -> tuple[str, int | None]:
    """A flow's ``flags ACK,PSH`` suffix (a TCP packet that is not a connection's first SYN):
    the flow without it, and the flag bits (None: no suffix, the default SYN).

    >>> split_tcp_flags('tcp 10.0.0.1:1 -> 10.0.0.2:80 flags ACK')
    ('tcp 10.0.0.1:1 -> 10.0.0.2:80', 16)
    """
    m = _FLAGS.search(text)
    if not m:
        return text, None
    bits = 0
    for name in re.split(r"[,|]", m.group("flags").upper()):
        if name not in TCP_FLAGS and name != "NONE":
            raise ValueError(f"unknown TCP flag '{name}' (SYN, ACK, FIN, RST, PSH, URG, ECE, CWR or NONE)")
        bits |= TCP_FLAGS.get(name, 0)
    return text[:m.start()], bits


def parse_flow_spec(text: str, iif: str | None = None) -> FlowSpec:
    """``tcp 10.0.0.1:1234 -> 10.0.0.2:80`` with any part open; ``iif`` an interface or a
    ``prefix+`` wildcard (open when it is a wildcard).

    >>> sorted(parse_flow_spec('10.0.0.1 -> 10.0.0.2').open)
    ['dport', 'proto', 'sport']
    >>> sorted(parse_flow_spec('tcp 10.0.0.1 -> 10.0.0.2:80').open)
    ['sport']
    >>> s = parse_flow_spec('udp 10.0.0.0/8:53 -> 10.96.0.0-10.96.0.9:1000-2000', iif='eth+')
    >>> sorted(s.open), s.dport, s.template.tuple_str(), s.template.iif
    (['dport', 'dst', 'iif', 'src'], ((1000, 2000),), 'udp 10.0.0.1:53 -> 10.96.0.1:1000', None)
    """
    text, flags = split_tcp_flags(text)
    m = _FLOW.match(text)
    if not m:
        raise ValueError("flow must look like '[PROTO] SRC[:PORT] -> DST[:PORT] [flags ACK,...]'")
    try:
        (srcs, sports), (dsts, dports) = _endpoint(m.group("src")), _endpoint(m.group("dst"))
    except ValueError as e:
        raise ValueError(f"invalid flow: {e}") from None
    if srcs[0][0].version != dsts[0][0].version:
        raise ValueError("source and destination are of different address families")
    open_ = set()
    p = m.group("proto")
    if p is None:
        open_.add("proto")
        proto = 6
    else:
        p = p.lower()
        if p not in PROTO and not p.isdigit():
            raise ValueError(f"unknown protocol '{p}' (tcp, udp, icmp, sctp or a number)")
        proto = PROTO.get(p) if p in PROTO else int(p)
        if proto > 255:
            raise ValueError(f"protocol number {proto} out of range (0-255)")
        if proto not in PORT_PROTOS and (sports or dports):
            raise ValueError(f"{p} flows have no ports")
    if flags is not None and (p is None or proto != 6):
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
    fam = srcs[0][0].version
    pkt = Packet(fam, proto, _witness_address(srcs), _witness_address(dsts), sport, dport,
                 iif=None if "iif" in open_ else iif, tcp_flags=(0x02 if flags is None else flags) if proto == 6 else 0,
                 icmp_type=(8 if fam == 4 else 128) if proto in (1, 58) else None,
                 icmp_code=0 if proto in (1, 58) else None)
    return FlowSpec(pkt, frozenset(open_), srcs, dsts, sports or (), dports or (),
                    iif if "iif" in open_ else None)


def parse_flow(text: str) -> Packet:
    """``tcp 10.0.0.1:1234 -> 10.0.0.2:80`` as one packet: a missing source port is an ephemeral
    one, a missing destination port stays None (see `parse_flow_spec` for open flows).

    >>> parse_flow('tcp 10.4.26.45:35582 -> 10.4.26.234:80').tuple_str()
    'tcp 10.4.26.45:35582 -> 10.4.26.234:80'
    """
    spec = parse_flow_spec(text)
    if spec.open & {"src", "dst", "iif"} or any(getattr(spec, f) for f in ("sport", "dport") if f in spec.open):
        raise ValueError("this command takes one concrete flow: give single addresses and ports")
    t = spec.template
    return replace(t, dport=None) if "dport" in spec.open and t.proto in PORT_PROTOS else t
