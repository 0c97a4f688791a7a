"""Report layer: service matrices and the spoofing check (analyzer/matrix.py) as text (fffuu's
layout), JSON or DOT."""
from __future__ import annotations

import ipaddress
import json

from analyzer.matrix import Matrix, Spoofing
from analyzer.parse.ipassmt import render_ranges

SCHEMA_VERSION = "1.1"


def _mode(m: Matrix) -> str:
    routed = ", -o by routes" if m.routed else ""
    if m.ifaces == "abstract":
        return f"fffuu's abstraction, -i {m.iface_rewrite}d to assigned sources{routed}"
    return f"interfaces exact{routed}"


def _one_text(m: Matrix) -> list[str]:
    out = [f"=========== TCP port {m.sport}->{m.dport} ({m.table} {m.chain}, {m.closure} closure, "
           f"{_mode(m)}, IPv{m.family}) ==========="]
    for c in m.sources:
        out.append(f"{c.name} |-> {c.render()}")
    out.append("")
    out += [f"({a},{b})" for a, b in m.edges]
    if m.approximate:
        out.append("")
        out.append(f"APPROXIMATE: {len(m.approximate)} rule(s) have matches synack only bounds "
                   f"({', '.join(m.approximate[:5])}{', ...' if len(m.approximate) > 5 else ''})")
    return out


def _spoof_text(s: Spoofing) -> list[str]:
    out = [f"=========== spoofing check ({s.chain}, {s.closure} closure, IPv{s.family}; "
           f"assignment: {s.ipassmt}) ==========="]
    out += [f"warning: {w}" for w in s.warnings]
    for i in s.ifaces:
        if not i.spoofed:
            out.append(f"{i.name}: certified (accepts only {render_ranges(i.assigned, s.family)})")
            continue
        how = "" if i.exact else " (may: a bounded match decides; APPROXIMATE)"
        out.append(f"{i.name}: FLT003 accepts spoofed sources {render_ranges(i.spoofed, s.family)}{how}")
        out.append(f"  assigned: {render_ranges(i.assigned, s.family)}")
        out.append(f"  witness: {i.witness}")
    if s.approximate:
        out.append(f"APPROXIMATE: {len(s.approximate)} rule(s) have matches synack only bounds")
    return out


def render_text(ms, spoof: Spoofing | None = None) -> str:
    ms = [ms] if isinstance(ms, Matrix) else ms
    out: list[str] = []
    for m in ms:
        out += _one_text(m) + [""]
    if spoof is not None:
        out += _spoof_text(spoof) + [""]
    return "\n".join(out)


def _ranges(rs, family):
    addr = ipaddress.IPv4Address if family == 4 else ipaddress.IPv6Address
    return [[str(addr(lo)), str(addr(hi))] for lo, hi in rs]


def matrix_json(m: Matrix) -> dict:
    return {
        "chain": m.chain, "table": m.table, "sport": m.sport, "dport": m.dport, "proto": "tcp",
        "closure": m.closure, "family": m.family,
        "interfaces": m.ifaces, "ipassmt": m.ipassmt, "outputs_routed": m.routed,
        **({"iface_rewrite": m.iface_rewrite} if m.iface_rewrite else {}),
        "classes": [{"name": c.name, "ranges": [[str(lo), str(hi)] for lo, hi in c.ranges],
                     "cidrs": c.cidrs()} for c in m.sources],
        "edges": [list(e) for e in m.edges],
        "approximate_rules": m.approximate,
    }


def spoofing_json(s: Spoofing) -> dict:
    return {
        "chain": s.chain, "family": s.family, "ipassmt": s.ipassmt, "closure": s.closure,
        "warnings": s.warnings, "approximate_rules": s.approximate,
        "interfaces": [{
            "name": i.name, "assigned": _ranges(i.assigned, s.family),
            "certified": not i.spoofed, "spoofed": _ranges(i.spoofed, s.family),
            **({"code": "FLT003", "witness": str(i.witness),
                "confidence": "EXACT" if i.exact else "APPROXIMATE"} if i.spoofed else {}),
        } for i in s.ifaces],
    }


def to_json(ms, spoof: Spoofing | None = None) -> dict:
    """One object per dump and family: ``matrices`` (one per port) and ``spoofing`` (null
    without an IP assignment). Schema 1.1; 1.0 was one matrix's fields at the top level."""
    ms = [ms] if isinstance(ms, Matrix) else ms
    return {"schema_version": SCHEMA_VERSION, "matrices": [matrix_json(m) for m in ms],
            "spoofing": spoofing_json(spoof) if spoof is not None else None}


def render_json(ms, spoof: Spoofing | None = None) -> str:
    return json.dumps(to_json(ms, spoof), indent=2) + "\n"


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def render_dot(ms, spoof: Spoofing | None = None) -> str:
    """Each matrix as a Graphviz picture of the matrix itself: a table whose row X, column Y
    cell is filled when class X reaches class Y, and a legend naming each class by its ranges
    (the first 6; the text output has them all). One digraph per matrix (``dot -Tsvg`` draws
    them all). The spoofing check is not drawn."""
    ms = [ms] if isinstance(ms, Matrix) else ms
    out = []
    for m in ms:
        names = [c.name for c in m.sources]
        edges = set(m.edges)
        head = "".join(f'<TD BGCOLOR="#eeeeee"><B>{n}</B></TD>' for n in names)
        rows = [f'<TR><TD BGCOLOR="#eeeeee">src \\ dst</TD>{head}</TR>']
        for a in names:
            cells = "".join(
                f'<TD BGCOLOR="#2e7d32" TOOLTIP="{a} -&gt; {b}"> </TD>' if (a, b) in edges
                else "<TD> </TD>" for b in names)
            rows.append(f'<TR><TD BGCOLOR="#eeeeee"><B>{a}</B></TD>{cells}</TR>')
        legend = "".join(
            f'<TR><TD ALIGN="LEFT"><B>{c.name}</B></TD><TD ALIGN="LEFT">'
            + "<BR ALIGN=\"LEFT\"/>".join(_esc(r) for r in c.render(limit=6).strip("{}").split(" u "))
            + '<BR ALIGN="LEFT"/></TD></TR>' for c in m.sources)
        title = (f"TCP {m.sport} -&gt; {m.dport}, {m.table} {m.chain}, {m.closure} closure, "
                 f"{_esc(_mode(m))}, IPv{m.family}: {len(names)} classes, {len(edges)} edges"
                 + (f", APPROXIMATE ({len(m.approximate)} rules bounded)" if m.approximate else ""))
        out += [f'digraph "service matrix tcp/{m.dport}" {{',
                "  rankdir=LR; node [shape=plaintext, fontname=Helvetica, fontsize=11];",
                f'  label=<{title}>; labelloc=t;',
                '  matrix [label=<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="6">'
                + "".join(rows) + "</TABLE>>];",
                '  classes [label=<<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="4">'
                + legend + "</TABLE>>];",
                "}"]
    return "\n".join(out) + "\n"


def to_svg(dot_text: str) -> str:
    """The DOT text drawn by Graphviz (``dot -Tsvg``); several graphs become one SVG each,
    concatenated. RuntimeError when ``dot`` is missing or fails."""
    import shutil
    import subprocess
    exe = shutil.which("dot")
    if exe is None:
        raise RuntimeError("-o svg needs Graphviz's `dot` (apt-get install graphviz); "
                           "-o dot prints the graph for any Graphviz")
    p = subprocess.run([exe, "-Tsvg"], input=dot_text, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"dot -Tsvg failed: {p.stderr.strip()[:300]}")
    return p.stdout
