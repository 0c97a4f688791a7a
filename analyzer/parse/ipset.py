"""Parse layer: ``ipset save`` output -> sets synack can evaluate ``-m set --match-set`` with.

Supported types: hash:ip, hash:net, hash:ip,port, hash:net,port, hash:ip,port,ip,
hash:ip,port,net, hash:net,port,net, hash:net,iface is kept but not evaluated, bitmap:port,
bitmap:ip, list:set. Other types are kept as unknown: matches against them stay APPROXIMATE.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from analyzer.diagnostics import Diagnostic, Severity
from analyzer.source import SourceFile, Span

PROTO = {"tcp": 6, "udp": 17, "sctp": 132, "udplite": 136, "icmp": 1, "icmpv6": 58}
EVALUATED = {"hash:ip", "hash:net", "hash:ip,port", "hash:net,port", "hash:ip,port,ip",
             "hash:ip,port,net", "hash:net,port,net", "bitmap:port", "bitmap:ip", "list:set"}


@dataclass
class IpSet:
    name: str
    type: str
    family: int = 4
    entries: list = field(default_factory=list)  # per type: tuples of dimension values
    members: list = field(default_factory=list)  # list:set: member set names

    @property
    def dims(self) -> list[str]:
        return self.type.split(":", 1)[1].split(",")

    def contains(self, values: list, sets: dict | None = None) -> bool | None:
        """values: one per dimension the rule's flags ask for (address or (proto, port)).
        None when this set cannot be evaluated."""
        if self.type == "list:set":
            if not sets or any(m not in sets or "port" in sets[m].dims for m in self.members):
                return None  # members with other dimensions than addresses: not evaluated
            res = [sets[m].contains(values, sets) if sets and m in sets else None for m in self.members]
            if any(r is True for r in res):
                return True
            return None if any(r is None for r in res) else False
        if self.type not in EVALUATED:
            return None
        dims = self.dims
        if len(values) < len(dims):
            return None
        for e in self.entries:
            if all(_dim_match(d, e[i], values[i]) for i, d in enumerate(dims)):
                return True
        return False


def _dim_match(dim: str, entry, value) -> bool:
    if dim in ("ip", "net"):
        return value is not None and not isinstance(value, tuple) and value.version == entry.version \
            and value in entry
    if dim == "port":
        if not isinstance(value, tuple):
            return False
        proto, port = value
        eproto, lo, hi = entry
        return (eproto is None or eproto == proto) and port is not None and lo <= port <= hi
    return False


def _parse_dim(dim: str, text: str):
    if dim in ("ip", "net"):
        if "-" in text and "/" not in text:  # a range a-b: widen to the covering networks
            a, b = text.split("-", 1)
            nets = list(ipaddress.summarize_address_range(ipaddress.ip_address(a), ipaddress.ip_address(b)))
            return nets[0] if len(nets) == 1 else _Many(nets)
        return ipaddress.ip_network(text, strict=False)
    if dim == "port":
        proto = None
        if ":" in text:
            p, text = text.split(":", 1)
            proto = PROTO.get(p.lower(), int(p) if p.isdecimal() else -1)
        lo, _, hi = text.partition("-")
        return (proto, int(lo), int(hi or lo))
    raise ValueError(dim)


class _Many:
    """Several networks standing for one ip range entry."""

    def __init__(self, nets):
        self.nets = nets
        self.version = nets[0].version

    def __contains__(self, a):
        return any(a in n for n in self.nets)


def load_ipsets(text: str, path: str) -> tuple[dict[str, IpSet], list[Diagnostic]]:
    sf = SourceFile.from_text(text, path)
    sets: dict[str, IpSet] = {}
    diags: list[Diagnostic] = []

    def err(n, msg, hint=None):
        line = sf.line(n)
        diags.append(Diagnostic("PRS111", Severity.ERROR, msg, Span(path, n, 1, len(line) + 1), hint, line))

    for n, raw in enumerate(sf.lines, 1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "create" and len(words) >= 3:
            name, typ = words[1], words[2]
            fam = 6 if "family" in words and words[words.index("family") + 1:][:1] == ["inet6"] else 4
            sets[name] = IpSet(name, typ, fam)
        elif words[0] == "add" and len(words) >= 3:
            s = sets.get(words[1])
            if s is None:
                err(n, f"'add' to set '{words[1]}' before its 'create'", "ipset save writes create lines first")
                continue
            if s.type == "list:set":
                s.members.append(words[2])
                continue
            if s.type not in EVALUATED:
                continue
            parts = words[2].split(",")
            try:
                entry = tuple(_parse_dim(d, p) for d, p in zip(s.dims, parts))
                if s.type.startswith("hash:"):  # ipset: "if the protocol is omitted, tcp is assumed"
                    entry = tuple((6, *v[1:]) if d == "port" and v[0] is None else v
                                  for d, v in zip(s.dims, entry))
                s.entries.append(entry)
            except (ValueError, IndexError):
                err(n, f"invalid {s.type} entry '{words[2]}'")
        else:
            err(n, f"unexpected line in ipset save output: '{words[0]}'",
                "expected 'create NAME TYPE ...' or 'add NAME ENTRY ...' (the output of `ipset save`)")
    return sets, diags
