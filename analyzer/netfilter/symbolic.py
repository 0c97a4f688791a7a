"""Netfilter layer: the matches of a ruleset as packet sets (BDD atoms) over the header fields a
flow leaves open, so that the engine can split those fields into classes the rules treat alike.
"""
from __future__ import annotations

from analyzer.engine.packetset import PacketSpace
from analyzer.model.rules import PortMatch, ProtoMatch

PROTO_OF_MODULE = {"tcp": 6, "udp": 17, "sctp": 132, "dccp": 33, "udplite": 136}
OPEN_FIELDS = ("proto", "sport", "dport")
WIDTH = {"proto": 8, "sport": 16, "dport": 16}


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
