"""Netfilter layer: the matches of a ruleset as packet sets (BDD atoms) over the header fields a
flow leaves open, so that the engine can split those fields into classes the rules treat alike.
"""
from __future__ import annotations

from analyzer.engine.packetset import PacketSpace
from analyzer.model.rules import AddrMatch, PortMatch, ProtoMatch, Ruleset

PROTO_OF_MODULE = {"tcp": 6, "udp": 17, "sctp": 132, "dccp": 33, "udplite": 136}
OPEN_FIELDS = ("proto", "sport", "dport")
WIDTH = {"proto": 8, "sport": 16, "dport": 16}


def _could_match(rule, pkt) -> bool:
    """Cheap pre-filter: a rule whose positive -s/-d excludes the flow's addresses adds no atom."""
    for m in rule.matches:
        if isinstance(m, AddrMatch) and not m.negated:
            a = pkt.src if m.direction == "src" else pkt.dst
            if not any(a in n for n in m.networks if n.version == a.version):
                return False
    return True


def match_atoms(space: PacketSpace, m, open_fields: set) -> tuple[list, dict]:
    """Per-field separators for one match over the open fields: the protocol it implies, and its
    port ranges. Negation does not change where a match separates packets, so it is ignored
    here (the concrete walk evaluates it). One field per atom keeps every class a product of
    per-field ranges, which is what makes classes describable ("tcp dport 80")."""
    atoms, bounds = [], {}
    if isinstance(m, ProtoMatch) and "proto" in open_fields and m.number != 0:
        atoms.append(space.eq("proto", m.number))
        bounds["proto"] = {m.number, m.number + 1}
    if isinstance(m, PortMatch):
        proto = PROTO_OF_MODULE.get(m.mod)
        if proto is not None and "proto" in open_fields:
            atoms.append(space.eq("proto", proto))
            bounds["proto"] = {proto, proto + 1}
        fields = ("sport",) if m.direction == "src" else ("dport",) if m.direction == "dst" else ("sport", "dport")
        for f in fields:
            if f in open_fields:
                atoms.append(space.ports(f, list(m.ranges)))
                bounds[f] = {b for lo, hi in m.ranges for b in (lo, hi + 1)}
    return atoms, bounds


def flow_atoms(space: PacketSpace, ruleset: Ruleset, pkt, open_fields: set):
    """Atoms (deduplicated) and boundaries from every rule that could see this flow."""
    atoms, bounds, seen = [], {f: set() for f in OPEN_FIELDS}, set()
    for rule in ruleset.rules():
        if not _could_match(rule, pkt):
            continue
        for m in rule.matches:
            key = (type(m), m.negated, getattr(m, "number", None), getattr(m, "mod", None),
                   getattr(m, "direction", None), getattr(m, "ranges", None))
            if key in seen:
                continue
            new, b = match_atoms(space, m, open_fields)
            if not new:
                continue
            seen.add(key)
            atoms.extend(new)
            for f, vals in b.items():
                bounds.setdefault(f, set()).update(vals)
    return atoms, bounds
