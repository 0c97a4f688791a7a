"""Report layer: the service matrix (analyzer/matrix.py) as text (fffuu's layout), JSON or DOT."""
from __future__ import annotations

import json

from analyzer.matrix import SPORT, Matrix


def render_text(m: Matrix) -> str:
    out = [f"=========== TCP port {SPORT}->{m.dport} (filter {m.chain}, {m.closure} closure, "
           f"IPv{m.family}) ==========="]
    for c in m.sources:
        out.append(f"{c.name} |-> {c.render()}")
    out.append("")
    out += [f"({a},{b})" for a, b in m.edges]
    if m.approximate:
        out.append("")
        out.append(f"APPROXIMATE: {len(m.approximate)} rule(s) have matches synack only bounds "
                   f"({', '.join(m.approximate[:5])}{', ...' if len(m.approximate) > 5 else ''})")
    return "\n".join(out) + "\n"


def render_json(m: Matrix) -> str:
    return json.dumps({
        "schema_version": "1.0", "chain": m.chain, "sport": SPORT, "dport": m.dport, "proto": "tcp",
        "closure": m.closure, "family": m.family,
        "classes": [{"name": c.name, "ranges": [[str(lo), str(hi)] for lo, hi in c.ranges],
                     "cidrs": c.cidrs()} for c in m.sources],
        "edges": [list(e) for e in m.edges],
        "approximate_rules": m.approximate,
    }, indent=2) + "\n"


def render_dot(m: Matrix) -> str:
    out = [f'digraph "service matrix tcp/{m.dport}" {{', "  rankdir=LR;", "  node [shape=box];"]
    for c in m.sources:
        label = c.render(limit=4).replace('"', "'")
        out.append(f'  "{c.name}" [label="{c.name}: {label}"];')
    for a, b in m.edges:
        out.append(f'  "{a}" -> "{b}";')
    out.append("}")
    return "\n".join(out) + "\n"
