"""Report layer: `synack diff` results as text, JSON (schema_version) and SARIF 2.1.0."""
from __future__ import annotations

import json

from analyzer import DOCS_URL, PROJECT_URL, __version__
from analyzer.report import SCHEMA_VERSION

TITLE = {"newly-blocked": "newly blocked", "newly-allowed": "newly allowed",
         "translated-elsewhere": "now translated elsewhere",
         "newly-translated": "newly translated", "no-longer-translated": "no longer translated", "now-asymmetric": "now asymmetric",
         "now-symmetric": "now symmetric", "changed": "fate changed"}


def _span(s):
    return None if s is None else {"path": s.path, "line": s.line}


def render_text(res, old: str, new: str, verbose: bool = False) -> str:
    out = [f"diff {old} -> {new}: {len(res.rule_changes)} rule change(s) by identity "
           f"(table, chain, text without counters); {res.classes} class(es) explored "
           f"({', '.join(res.entries) or 'nothing to explore'})"
           + ("" if res.complete else " (APPROXIMATE: class limit reached)"), ""]
    for e in res.env_changes:
        out.insert(-1, f"  environment: {e}")
    if not res.changes:
        out.append("No flow changes fate." if res.rule_changes else "No rule changed.")
        return "\n".join(out) + "\n"
    for k, c in enumerate(res.changes, 1):
        out.append(f"{k}. {TITLE.get(c.kind, c.kind)}: {c.cls.text} ({c.entry})")
        out.append(f"   witness: {c.cls.witness.tuple_str()}")
        out.append(f"   old: {c.old}")
        for span, what in c.old_rules[:4]:
            out.append(f"        {span.path}:{span.line}: {what}")
        out.append(f"   new: {c.new}")
        for span, what in c.new_rules[:4]:
            out.append(f"        {span.path}:{span.line}: {what}")
        if verbose:
            out.append("   old trace:")
            out.extend("     " + l for l in c.cls.fates[0].trace_text.rstrip().splitlines())
            out.append("   new trace:")
            out.extend("     " + l for l in c.cls.fates[1].trace_text.rstrip().splitlines())
        out.append("")
    out.append(f"{len(res.changes)} class(es) of flows change fate.")
    return "\n".join(out) + "\n"


def to_dict(c) -> dict:
    return {"kind": c.kind, "packets": c.cls.text, "entry": c.entry, "witness": c.cls.witness.tuple_str(),
            "old": {"fate": c.old, "rules": [{"span": _span(s), "step": w} for s, w in c.old_rules],
                    "trace": c.cls.fates[0].trace_json},
            "new": {"fate": c.new, "rules": [{"span": _span(s), "step": w} for s, w in c.new_rules],
                    "trace": c.cls.fates[1].trace_json}}


def render_json(res, old: str, new: str) -> str:
    doc = {"schema_version": SCHEMA_VERSION, "tool": "synack", "version": __version__, "old": old, "new": new,
           "complete": res.complete, "classes_explored": res.classes, "entries": res.entries,
           "rule_changes": [{"side": r.side, "table": r.table, "chain": r.chain, "span": _span(r.span),
                             "text": r.text} for r in res.rule_changes],
           "environment_changes": res.env_changes,
           "changes": [to_dict(c) for c in res.changes]}
    return json.dumps(doc, indent=2)


def render_sarif(res, old: str, new: str) -> str:
    """One result per changed class, at the new side's responsible rule (the old side's when the
    change is a removal), the other side as a related location."""
    kinds = sorted({c.kind for c in res.changes})
    index = {k: i for i, k in enumerate(kinds)}

    def loc(span, message=None):
        l = {"physicalLocation": {"artifactLocation": {"uri": span.path},
                                  "region": {"startLine": span.line}}}
        if message:
            l["message"] = {"text": message}
        return l

    results = []
    for c in res.changes:
        main = c.new_rules[0][0] if c.new_rules else (c.old_rules[0][0] if c.old_rules else None)
        r = {"ruleId": f"diff/{c.kind}", "ruleIndex": index[c.kind], "level": "warning",
             "message": {"text": f"{TITLE.get(c.kind, c.kind)}: {c.cls.text} ({c.entry}); witness "
                                 f"{c.cls.witness.tuple_str()}: was {c.old}, now {c.new}"},
             "properties": {"witness": c.cls.witness.tuple_str(), "packets": c.cls.text}}
        if main is not None:
            r["locations"] = [loc(main)]
        rel = [loc(s, f"old: {w}") for s, w in c.old_rules[:4]] + [loc(s, f"new: {w}") for s, w in c.new_rules[:4]]
        if rel:
            r["relatedLocations"] = [dict(x, id=i) for i, x in enumerate(rel)]
        results.append(r)
    doc = {"$schema": "https://json.schemastore.org/sarif-2.1.0.json", "version": "2.1.0",
           "runs": [{"tool": {"driver": {"name": "synack", "version": __version__,
                                         "informationUri": PROJECT_URL,
                                         "rules": [{"id": f"diff/{k}", "name": k,
                                                    "shortDescription": {"text": f"flows {TITLE.get(k, k)}"},
                                                    "helpUri": DOCS_URL + "docs/policy.md"} for k in kinds]}},
                     "results": results,
                     "properties": {"schema_version": SCHEMA_VERSION, "old": old, "new": new}}]}
    return json.dumps(doc, indent=2)
