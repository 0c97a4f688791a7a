"""Parse layer: an IP assignment file (fffuu's ``--ipassmt`` format) -> which source addresses
each input interface may carry.

One entry per interface, whitespace (newlines included) free::

    eth0 = [10.0.0.0/8, 192.168.1.1-192.168.1.9, 172.16.0.1]
    eth1 = all_but_those_ips [10.0.0.0/8, 192.168.0.0/16]
    dummy = []

An address with host bits under a prefix (``131.159.14.3/25``) stands for its network, as in
fffuu. The result maps each interface name to merged inclusive integer ranges of one family.

>>> a = parse_ipassmt("lan = [10.0.0.1/8]\\nwan = all_but_those_ips [10.0.0.0/8]")
>>> a.family, a.render("lan"), a.render("wan")
(4, '10.0.0.0/8', '0.0.0.0 .. 9.255.255.255 u 11.0.0.0 .. 255.255.255.255')
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_ENTRY = re.compile(r"\s*([^\s=\[\],]+)\s*=\s*(all_but_those_ips\s*)?\[([^\]]*)\]\s*")


class IpassmtError(ValueError):
    pass


def merge(ranges):
    """Sorted, merged inclusive (lo, hi) integer ranges.

    >>> merge([(5, 9), (0, 3), (4, 4), (20, 30)])
    [(0, 9), (20, 30)]
    """
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def complement(ranges, top: int):
    """The inclusive ranges of [0, top) not in ``ranges`` (merged).

    >>> complement([(0, 3), (8, 9)], 16)
    [(4, 7), (10, 15)]
    """
    out, nxt = [], 0
    for lo, hi in merge(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt < top:
        out.append((nxt, top - 1))
    return out


def render_ranges(ranges, family: int) -> str:
    """fffuu-like text: a range that is one prefix as CIDR, else ``lo .. hi``."""
    addr = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    parts = []
    for lo, hi in ranges:
        nets = list(ipaddress.summarize_address_range(addr(lo), addr(hi)))
        parts.append(str(nets[0]) if len(nets) == 1 else f"{addr(lo)} .. {addr(hi)}")
    return " u ".join(parts) if parts else "{}"


@dataclass(frozen=True)
class IpAssignment:
    """Interface -> the source addresses packets arriving on it may carry (merged ranges)."""
    family: int
    ifaces: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    origin: str = ""

    def get(self, name: str):
        for n, r in self.ifaces:
            if n == name:
                return r
        return None

    def names(self) -> list[str]:
        return [n for n, _ in self.ifaces]

    def render(self, name: str) -> str:
        return render_ranges(self.get(name) or (), self.family)

    @classmethod
    def of(cls, family: int, entries, origin: str = "") -> "IpAssignment":
        return cls(family, tuple((n, tuple(merge(r))) for n, r in entries), origin)


def _item(text: str, family: int | None):
    text = text.strip()
    if "-" in text and "/" not in text:
        a, b = (ipaddress.ip_address(x.strip()) for x in text.split("-", 1))
        if a.version != b.version or int(a) > int(b):
            raise IpassmtError(f"bad range {text!r}")
        return a.version, (int(a), int(b))
    net = ipaddress.ip_network(text, strict=False)
    return net.version, (int(net.network_address), int(net.broadcast_address))


def parse_ipassmt(text: str, origin: str = "") -> IpAssignment:
    """Parse fffuu's ipassmt format (see the module docstring); raises IpassmtError."""
    pos, entries, family = 0, [], None
    text = re.sub(r"#[^\n]*", "", text)
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = _ENTRY.match(text, pos)
        if not m:
            line = text.count("\n", 0, pos) + 1
            raise IpassmtError(f"{origin or 'ipassmt'}:{line}: expected 'IFACE = [ADDR, ...]' "
                               f"or 'IFACE = all_but_those_ips [ADDR, ...]'")
        name, neg, body = m.group(1), m.group(2), m.group(3)
        ranges = []
        for item in filter(None, (x.strip() for x in body.split(","))):
            try:
                fam, r = _item(item, family)
            except ValueError as e:
                raise IpassmtError(f"{origin or 'ipassmt'}: {name}: {e}") from None
            if family is None:
                family = fam
            elif fam != family:
                raise IpassmtError(f"{origin or 'ipassmt'}: {name}: mixes IPv4 and IPv6 addresses")
            ranges.append(r)
        entries.append((name, neg, ranges))
        pos = m.end()
    family = family or 4
    top = 1 << (32 if family == 4 else 128)
    names = [n for n, _, _ in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise IpassmtError(f"{origin or 'ipassmt'}: interface(s) listed twice: {', '.join(dup)}")
    return IpAssignment.of(family, [(n, complement(r, top) if neg else r) for n, neg, r in entries],
                           origin)


def generic(family: int) -> IpAssignment:
    """fffuu's assignment when none is given: only loopback, ``lo = [127.0.0.0/8]``."""
    net = ipaddress.ip_network("127.0.0.0/8" if family == 4 else "::1/128")
    return IpAssignment.of(family, [("lo", [(int(net.network_address), int(net.broadcast_address))])],
                           "generic (lo only, as fffuu)")
