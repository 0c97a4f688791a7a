"""Report layer: diagnostics as text (ruff-like), JSON (with schema_version) and SARIF 2.1.0."""
from __future__ import annotations

import json

from analyzer import __version__
from analyzer.diagnostics import Diagnostic, Severity, render_text
from analyzer.report import SCHEMA_VERSION


def _span(s):
    return None if s is None else {"path": s.path, "line": s.line, "col": s.col, "end_col": s.end_col}


def to_dict(d: Diagnostic) -> dict:
    return {
        "code": d.code, "name": d.name, "severity": d.severity.label, "message": d.message,
        "span": _span(d.span), "source_line": d.source_line, "hint": d.hint,
        "confidence": d.confidence,
        "related": [{"message": r.message, "span": _span(r.span)} for r in d.related],
        "witness": d.witness,
    }


def render_text_all(diags, summary: dict | None = None) -> str:
    out = [render_text(d) for d in diags]
    if summary is not None:
        counts = {s.label: sum(1 for d in diags if d.severity == s) for s in Severity}
        parts = [f"{v} {k}{'s' if v != 1 else ''}" for k, v in reversed(counts.items()) if v]
        out.append(("Found " + ", ".join(parts) + ".") if parts else "No findings.")
    return "\n".join(out)


def render_json(diags, extra: dict | None = None) -> str:
    doc = {"schema_version": SCHEMA_VERSION, "tool": "synack", "version": __version__,
           "diagnostics": [to_dict(d) for d in diags]}
    if extra:
        doc.update(extra)
    return json.dumps(doc, indent=2)


_LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


def render_sarif(diags, rules: dict) -> str:
    """SARIF 2.1.0: one run, a rule per check code used, a result per diagnostic."""
    used = sorted({d.code for d in diags})
    rule_index = {c: i for i, c in enumerate(used)}

    def loc(span, message=None):
        l = {"physicalLocation": {"artifactLocation": {"uri": span.path},
                                  "region": {"startLine": span.line, "startColumn": span.col,
                                             "endColumn": span.end_col}}}
        if message:
            l["message"] = {"text": message}
        return l

    results = []
    for d in diags:
        r = {"ruleId": d.code, "ruleIndex": rule_index[d.code], "level": _LEVEL[d.severity],
             "message": {"text": d.message + (f" (help: {d.hint})" if d.hint else "")}}
        if d.span:
            r["locations"] = [loc(d.span)]
        if d.related:
            r["relatedLocations"] = [dict(loc(x.span, x.message), id=i) for i, x in enumerate(d.related)]
        r["properties"] = {"confidence": d.confidence, **({"witness": d.witness} if d.witness else {})}
        results.append(r)
    doc = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "synack", "version": __version__, "informationUri": "https://example.invalid/synack",
                "rules": [{"id": c, "name": rules.get(c, (c, ""))[0],
                           "shortDescription": {"text": rules.get(c, (c, c))[1]},
                           "helpUri": f"docs/checks/{c}.md"} for c in used],
            }},
            "results": results,
            "properties": {"schema_version": SCHEMA_VERSION},
        }],
    }
    return json.dumps(doc, indent=2)
