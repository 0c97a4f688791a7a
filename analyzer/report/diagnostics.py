"""Report layer: diagnostics as text (ruff-like), JSON (with schema_version) and SARIF 2.1.0."""
from __future__ import annotations

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
        "count": d.count, "also": [_span(s) for s in d.also],
    }


def render_text_all(diags, summary: dict | None = None) -> str:
    out = [render_text(d) for d in diags]
    if summary is not None:
        counts = {s.label: sum(1 for d in diags if d.severity == s) for s in Severity}
        parts = [f"{v} {k}{'s' if v != 1 else ''}" for k, v in reversed(counts.items()) if v]
        total = sum(d.count for d in diags)
        repeated = f" ({total} occurrences)" if total > len(diags) else ""
        out.append(("Found " + ", ".join(parts) + repeated + ".") if parts else "No findings.")
    return "\n".join(out)


def render_json(diags, extra: dict | None = None) -> str:
    doc = {"schema_version": SCHEMA_VERSION, "tool": "synack", "version": __version__,
           "diagnostics": [to_dict(d) for d in diags]}
    if extra:
        doc.update(extra)
    import json  # not imported for text output (synack parse of a dump)

    return json.dumps(doc, indent=2)


_LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


def _uri(path: str) -> str:
    """A dump's path as a SARIF artifact URI (a relative reference; '<stdin>' stays readable)."""
    from urllib.parse import quote
    return quote(path, safe="/:._-~")


def render_sarif(diags, codes: dict, properties: dict | None = None) -> str:
    """SARIF 2.1.0: one run, a rule per code used (``codes``: analyzer.codes.all_codes()), a result
    per diagnostic; a group's other places are related locations and its size a property;
    ``properties`` go into the run's property bag (lint's ``complete``/``incomplete``)."""
    from analyzer import PROJECT_URL
    from analyzer.codes import CodeInfo, doc_path

    used = sorted({d.code for d in diags})
    rule_index = {c: i for i, c in enumerate(used)}

    def info(c) -> CodeInfo:
        return codes.get(c) or CodeInfo(c, c, "warning", c, doc_path(c))

    def loc(span, message=None):
        region = {"startLine": max(1, span.line), "startColumn": max(1, span.col)}
        if span.end_col > span.col:
            region["endColumn"] = span.end_col
        l = {"physicalLocation": {"artifactLocation": {"uri": _uri(span.path)}, "region": region}}
        if message:
            l["message"] = {"text": message}
        return l

    results = []
    for d in diags:
        r = {"ruleId": d.code, "ruleIndex": rule_index[d.code], "level": _LEVEL[d.severity],
             "message": {"text": d.message + (f" ({d.count} times)" if d.count > 1 else "")
                         + (f" (help: {d.hint})" if d.hint else "")}}
        if d.span:
            r["locations"] = [loc(d.span)]
        related = [loc(x.span, x.message) for x in d.related] + [loc(s, "the same finding") for s in d.also]
        if related:
            r["relatedLocations"] = [dict(x, id=i) for i, x in enumerate(related)]
        r["properties"] = {"confidence": d.confidence, **({"witness": d.witness} if d.witness else {}),
                           **({"count": d.count} if d.count > 1 else {})}
        results.append(r)
    doc = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "synack", "version": __version__, "informationUri": PROJECT_URL,
                "rules": [{"id": c, "name": info(c).name,
                           "shortDescription": {"text": info(c).summary},
                           "helpUri": info(c).help_uri,
                           "defaultConfiguration": {"level": {"error": "error", "warning": "warning"}
                                                    .get(info(c).severity, "note")}} for c in used],
            }},
            "results": results,
            "properties": {"schema_version": SCHEMA_VERSION, **(properties or {})},
        }],
    }
    import json  # not imported for text output (synack parse of a dump)

    return json.dumps(doc, indent=2)
