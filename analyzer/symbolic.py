"""Explain a flow with open parts (no ports, no protocol): every packet it stands for, grouped.

The rules' port and protocol matches become BDD atoms (netfilter/symbolic.py); the engine splits
the open fields into classes no rule tells apart (engine/partition.py); one witness per class is
explained concretely (explain.py) and classes with the same outcome are reported together.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from analyzer.engine.packetset import PacketSpace
from analyzer.engine.partition import field_ranges, partition
from analyzer.netfilter.symbolic import OPEN_FIELDS, WIDTH, match_atoms
from analyzer.model.packet import PROTO_NAME, Packet
from analyzer.netfilter.walk import Walker
from analyzer.parse.flow import FlowSpec, parse_flow_spec  # noqa: F401 (re-exported)

@dataclass
class Group:
    description: str
    witness: Packet
    outcomes: list
    classes: int


def _ranges_text(rs, names=None) -> str:
    return ", ".join((names.get(lo, str(lo)) if names else str(lo)) if lo == hi else f"{lo}-{hi}"
                     for lo, hi in rs)


def _describe(cls, open_, bounds) -> tuple[tuple, str]:
    """(protocol ranges, text for the other open fields) of one class (a product of ranges)."""
    protos = field_ranges(cls, "proto", bounds.get("proto", ()), 8) if "proto" in open_ else ()
    parts = []
    for f in ("sport", "dport"):
        if f not in open_:
            continue
        rs = field_ranges(cls, f, bounds.get(f, ()), WIDTH[f])
        if rs != [(0, 65535)]:
            parts.append(f"{f} {_ranges_text(rs)}")
    return tuple(protos), ("; ".join(parts) or "any port")


def _group_text(descs) -> str:
    """Merge class descriptions: the same port text over several protocol ranges is one item."""
    by_ports: dict[str, list] = {}
    for protos, ports in descs:
        by_ports.setdefault(ports, []).extend(protos)
    items = []
    for ports, protos in by_ports.items():
        if protos:
            merged = []
            for lo, hi in sorted(protos):
                if merged and merged[-1][1] + 1 >= lo:
                    merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
                else:
                    merged.append((lo, hi))
            ptxt = "any protocol" if merged == [(0, 255)] else "proto " + _ranges_text(merged, PROTO_NAME)
            items.append(f"{ptxt}: {ports}")
        else:
            items.append(ports)
    return " | ".join(items)


class _RecordingWalker(Walker):
    """A walker that remembers every rule it evaluated: the only rules whose matches can tell
    apart the packets of the class being explained."""

    def __init__(self, ruleset, ns):
        super().__init__(ruleset, ns)
        self.evaluated = []

    def _match_rule(self, rule, br, hook):
        self.evaluated.append(rule)
        return super()._match_rule(rule, br, hook)


def explain_open_flow(ruleset, spec: FlowSpec, ns, local: bool = False, limit: int = 256):
    """Returns (groups, complete): one group per distinct outcome signature.

    Path refinement: explain one witness of a class; split the class by the matches of the rules
    that walk evaluated (engine.partition); a class no such match splits takes exactly the
    witness's path, so its outcome holds for all of its packets. Only rules on the way are ever
    asked, so a 10,000-service dump costs the rules the flow meets, not all of them."""
    from analyzer.explain import explain_flow

    space = PacketSpace()
    t = spec.template
    fixed = {}
    if "proto" not in spec.open:
        fixed["proto"] = t.proto
    for f in ("sport", "dport"):
        if f not in spec.open and t.proto in (6, 17, 132):
            fixed[f] = getattr(t, f)
    universe = space.family(t.family) & (space.where(**fixed) if fixed else space.universe())
    prefer = [space.eq("sport", 40000), space.eq("proto", 6), space.eq("dport", 80),
              space.range("dport", 1, 65535), space.range("sport", 1024, 65535)]
    bounds: dict = {f: set() for f in OPEN_FIELDS}
    work, done = [universe], []
    complete = True
    while work:
        cls = work.pop()
        pkt = _witness(t, spec, cls.pick(prefer=prefer))
        w = _RecordingWalker(ruleset, ns)
        outs = explain_flow(ruleset, pkt, ns, local=local, walker=w)
        atoms = []
        for rule in dict.fromkeys(w.evaluated):
            for m in rule.matches:
                new, b = match_atoms(space, m, set(spec.open))
                atoms += new
                for f, vals in b.items():
                    bounds[f].update(vals)
        parts = partition(cls, atoms, limit).classes
        if len(parts) == 1 or len(done) + len(work) + len(parts) > limit:
            complete = complete and len(parts) == 1
            done.append((cls, pkt, outs))
        else:
            work.extend(reversed(parts))
    groups: dict = {}
    order = []
    for cls, pkt, outs in done:
        sig = tuple((o.disposition, tuple((s.where, s.verdict.split(" to ")[0]) for s in o.forward.steps))
                    for o in outs)
        desc = _describe(cls, spec.open, bounds)
        if sig not in groups:
            groups[sig] = Group("", pkt, outs, 1)
            groups[sig]._descs = [desc]
            order.append(sig)
        else:
            groups[sig]._descs.append(desc)
            groups[sig].classes += 1
    result = []
    for sig in order:
        g = groups[sig]
        g.description = _group_text(g._descs)
        del g._descs
        result.append(g)
    return result, complete


def _witness(t: Packet, spec: FlowSpec, v: dict) -> Packet:
    pkt = t
    if "proto" in spec.open:
        pkt = replace(pkt, proto=v["proto"], tcp_flags=0x02 if v["proto"] == 6 else 0,
                      icmp_type=(8 if t.family == 4 else 128) if v["proto"] in (1, 58) else None,
                      icmp_code=0 if v["proto"] in (1, 58) else None)
    if pkt.proto in (6, 17, 132):
        return replace(pkt, sport=v["sport"] if "sport" in spec.open else t.sport,
                       dport=v["dport"] if "dport" in spec.open else t.dport)
    return replace(pkt, sport=None, dport=None)


def render_groups(spec: FlowSpec, groups, complete: bool, where: str) -> str:
    from analyzer.explain import render_text

    t = spec.template
    shown = f"{'any protocol' if 'proto' in spec.open else PROTO_NAME.get(t.proto, t.proto)} " \
            f"{t.src}{'' if 'sport' in spec.open else f':{t.sport}'} -> " \
            f"{t.dst}{'' if 'dport' in spec.open else f':{t.dport}'}"
    out = [f"flow: {shown} ({where}); open: {', '.join(sorted(spec.open))}",
           f"{len(groups)} distinct outcome group(s)" + ("" if complete else
           " (APPROXIMATE: too many classes, the partition stopped early)"), ""]
    for k, g in enumerate(groups, 1):
        out.append(f"=== group {k}: {g.description}  (witness {g.witness.tuple_str()})")
        out.append(render_text(g.witness, g.outcomes, where).rstrip())
        out.append("")
    return "\n".join(out).rstrip() + "\n"
