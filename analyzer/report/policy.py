"""Report layer: policy check results as text, JSON (schema_version) and SARIF 2.1.0."""
from __future__ import annotations

import json

from analyzer import DOCS_URL, PROJECT_URL, __version__
from analyzer.report import SCHEMA_VERSION

_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def _span(s):
    return None if s is None else {"path": s.path, "line": s.line, "col": s.col}


def _indent(text: str, pad: str) -> str:
    return "\n".join(pad + l if l else l for l in text.rstrip().splitlines())


def render_text(results, policy_path: str, target: str, verbose: bool = True, traces: bool = True) -> str:
    out = [f"policy {policy_path} against {target}", ""]
    for r in results:
        a = r.assertion
        mark = {"pass": "PASS", "fail": "FAIL", "error": "ERROR"}[r.status]
        head = f"{mark:<5} {a.name} ({a.kind}"
        head += f", {a.severity.label})" if r.status != "pass" else ")"
        if r.approximate:
            head += " (APPROXIMATE)"
        out.append(head)
        if r.status == "pass" and not verbose:
            continue
        out.append(f"      {r.message}")
        if r.status == "pass":
            continue
        out.append(f"      assertion at {a.span.render()}")
        for k, w in enumerate(r.witnesses, 1):
            if w.code:
                out.append(_indent(w.trace if traces else w.trace.splitlines()[0], "      "))
                continue
            out.append(f"      witness {k}: {w.flow}" + (f"  (class: {w.packets})" if w.packets else ""))
            out.append(f"        fate: {w.fate}" + (f"  [rule at {w.span.path}:{w.span.line}]" if w.span else ""))
            if w.baseline is not None:
                out.append(f"        baseline: {w.baseline}"
                           + (f"  [rule at {w.baseline_span.path}:{w.baseline_span.line}]" if w.baseline_span else ""))
            if not traces:
                continue
            out.append("        trace:")
            out.append(_indent(w.trace, "          "))
            if w.baseline_trace:
                out.append("        baseline trace:")
                out.append(_indent(w.baseline_trace, "          "))
        if r.failing > len(r.witnesses):
            out.append(f"      ... {r.failing - len(r.witnesses)} more failing class(es) not shown")
    out.append("")
    out.append(summary_line(results))
    return "\n".join(out) + "\n"


def summary_line(results) -> str:
    n = len(results)
    c = {s: sum(1 for r in results if r.status == s) for s in ("pass", "fail", "error")}
    s = f"{n} assertion{'s' if n != 1 else ''}: {c['pass']} passed, {c['fail']} failed"
    approx = sum(1 for r in results if r.approximate and r.status != "error")
    return (s + (f", {c['error']} could not be answered" if c["error"] else "")
            + (f"; {approx} APPROXIMATE" if approx else "") + ".")


def to_dict(r) -> dict:
    a = r.assertion
    return {
        "name": a.name, "kind": a.kind, "severity": a.severity.label, "status": r.status,
        "message": r.message, "description": a.description, "location": _span(a.span),
        "flows": a.flows.describe() if a.flows else None, "classes": r.classes,
        "failing_classes": r.failing, "approximate": r.approximate,
        "witnesses": [{
            "flow": w.flow, "packets": w.packets, "fate": w.fate, "rule": _span(w.span), "code": w.code,
            "baseline": w.baseline, "baseline_rule": _span(w.baseline_span),
            "trace": w.trace_json or w.trace,
        } for w in r.witnesses],
    }


def render_json(results, policy_path: str, target: str) -> str:
    doc = {"schema_version": SCHEMA_VERSION, "tool": "synack", "version": __version__,
           "policy": policy_path, "target": target,
           "summary": {s: sum(1 for r in results if r.status == s) for s in ("pass", "fail", "error")},
           "results": [to_dict(r) for r in results]}
    return json.dumps(doc, indent=2)


def render_sarif(results, policy_path: str, target: str) -> str:
    """One SARIF result per failing assertion: located at the rule that decided the witness's
    fate (in the dump), with the assertion in the policy file as a related location."""
    failing = [r for r in results if r.status != "pass"]
    rule_ids = sorted({f"policy/{r.assertion.name}" for r in failing})
    index = {rid: i for i, rid in enumerate(rule_ids)}

    def loc(span, message=None):
        l = {"physicalLocation": {"artifactLocation": {"uri": span.path},
                                  "region": {"startLine": span.line, "startColumn": span.col}}}
        if message:
            l["message"] = {"text": message}
        return l

    out = []
    for r in failing:
        a = r.assertion
        rid = f"policy/{a.name}"
        w = r.witnesses[0] if r.witnesses else None
        msg = f"{a.name}: {r.message}"
        if w is not None and not w.code:
            msg += f"; witness {w.flow}: {w.fate}"
        res = {"ruleId": rid, "ruleIndex": index[rid], "level": _LEVEL[a.severity.label],
               "message": {"text": msg},
               "locations": [loc(w.span if w is not None and w.span else a.span)],
               "relatedLocations": [dict(loc(a.span, f"assertion '{a.name}'"), id=0)],
               "properties": {"status": r.status, "kind": a.kind, "approximate": r.approximate,
                              **({"witness": w.flow} if w is not None and w.flow else {})}}
        out.append(res)
    by_id = {f"policy/{r.assertion.name}": r.assertion for r in failing}
    doc = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "synack", "version": __version__, "informationUri": PROJECT_URL,
                "rules": [{"id": rid, "name": by_id[rid].kind,
                           "shortDescription": {"text": by_id[rid].description or f"{by_id[rid].kind} assertion '{by_id[rid].name}'"},
                           "helpUri": DOCS_URL + "docs/policy.md"} for rid in rule_ids]}},
            "results": out,
            "properties": {"schema_version": SCHEMA_VERSION, "policy": policy_path, "target": target},
        }],
    }
    return json.dumps(doc, indent=2)
