"""Report layer: explain results as JSON, one shape for ``explain DUMP`` and ``explain --env``.

A document holds the flow and its outcomes; an outcome a request and a reply journey (and a
proxy's second leg), each a list of hops (one namespace each), each hop its typed steps. The
shape is described by ``explain.schema.json`` (JSON Schema 2020-12) next to this module and
versioned by ``EXPLAIN_SCHEMA_VERSION`` (docs/explain.md). Renders results; decides nothing.
"""
from __future__ import annotations

import enum
import json
from pathlib import Path

#: version of the explain document (2.0: request/reply journeys of hops of typed steps for both
#: a dump and an environment; 1.x had steps as text and two shapes)
EXPLAIN_SCHEMA_VERSION = "2.0"
SCHEMA_PATH = Path(__file__).with_name("explain.schema.json")

#: the namespace of a single dump (crosshost.HOST)
HOST = "host"


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def packet_json(p) -> dict | None:
    if p is None:
        return None
    return {"family": p.family, "proto": p.proto, "src": str(p.src), "sport": p.sport, "dst": str(p.dst),
            "dport": p.dport, "iif": p.iif, "oif": p.oif, "mark": p.mark}


def _tuple_json(p) -> dict | None:
    """A conntrack tuple (no interfaces)."""
    if p is None:
        return None
    return {"proto": p.proto, "src": str(p.src), "sport": p.sport, "dst": str(p.dst), "dport": p.dport}


def _value_json(v):
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, tuple):
        return [_value_json(x) for x in v]
    issue = getattr(v, "issue", None)  # a Cilium Defect
    return issue if issue is not None else str(v)


def step_json(s) -> dict:
    """A step's typed fields; ``trace`` is the line as xtables-monitor prints it."""
    r = s.rule
    table = r.table if r is not None else s.table
    chain = r.chain if r is not None else s.chain
    after = s.after
    return {
        "kind": s.kind.value, "table": table, "chain": chain,
        "rule": None if r is None else {"path": r.span.path, "line": r.span.line, "col": r.span.col,
                                        "end_col": r.span.end_col, "index": r.index, "text": r.text},
        "fact": _value_json(s.fact), "value": _value_json(s.value),
        "packet_before": packet_json(s.before),
        # null when the step did not change the packet
        "packet_after": packet_json(after) if after is not None and after is not s.before
        and after != s.before else None,
        "detail": s.verdict, "note": s.note, "trace": f"{s.where}:{s.verdict}",
    }


def conntrack_json(ct) -> dict | None:
    if ct is None:
        return None
    state = ("not-in-use" if not getattr(ct, "in_use", True) else "untracked" if ct.untracked
             else "invalid" if getattr(ct, "invalid", False) else "tracked")
    doc = {"state": state}
    if state == "tracked":
        o = ct.original
        doc.update({"original": _tuple_json(o),
                    "reply": {"proto": o.proto, "src": str(ct.reply_src), "sport": ct.reply_sport,
                              "dst": str(ct.reply_dst), "dport": ct.reply_dport},
                    "dnat": ct.dnat, "snat": ct.snat, "mark": ct.mark})
    return doc


def hop_json(h) -> dict:
    return {
        "namespace": h.namespace, "role": h.role, "arrived_on": h.arrived_on, "bridged": h.bridged,
        "packet_in": packet_json(h.packet_in), "packet_out": packet_json(h.packet_out),
        "disposition": h.disposition, "detail": h.detail, "approximate": list(h.approx),
        "probability": h.prob, "outcomes_here": h.outcomes,
        "conntrack": conntrack_json(h.ct),
        "steps": [step_json(s) for s in h.steps],
    }


def journey_json(j) -> dict | None:
    if j is None:
        return None
    return {"end": j.end, "end_namespace": j.end_ns, "end_packet": packet_json(j.end_packet),
            "detail": j.detail, "approximate": j.approximate, "probability": j.prob,
            "hops": [hop_json(h) for h in j.hops]}


def _confidence(approximate: bool) -> str:
    return "APPROXIMATE" if approximate else "EXACT"


def outcome_json(t) -> dict:
    """One outcome of a connection (a crosshost Trip)."""
    approx = t.request.approximate or (t.reply is not None and t.reply.approximate)
    doc = {
        "probability": t.prob, "confidence": _confidence(approx), "endpoint": packet_json(t.endpoint),
        "request": journey_json(t.request), "reply": journey_json(t.reply),
        "client_sees": packet_json(t.client_sees), "matches_dialled": t.matches_dialled,
        "second_leg": None, "listener": None,
    }
    if t.second_leg is not None:
        doc["second_leg"] = outcome_json(t.second_leg)
        doc["listener"] = {"port": t.listener.port, "uid": t.listener.uid, "proxy_to": t.listener.proxy_to}
    return doc


def _document(flow, start, outcomes, unfollowed, diags, assumed=None) -> dict:
    from analyzer.model.packet import tcp_flag_names
    from analyzer.report.diagnostics import to_dict

    doc = {"schema_version": EXPLAIN_SCHEMA_VERSION, "tool": "synack", "flow": packet_json(flow),
           "from": start}
    doc["flow"]["tcp_flags"] = tcp_flag_names(flow.tcp_flags) if flow.proto == 6 else None
    from analyzer.model.packet import CT_INPUT
    if getattr(flow, "ctstate", CT_INPUT["NEW"]) != CT_INPUT["NEW"]:  # a packet of an existing connection
        doc["flow"]["ctstate"] = next((n for n, b in CT_INPUT.items() if b == flow.ctstate), flow.ctstate)
        doc["flow"]["connmark"] = flow.connmark
    doc["assumptions"] = list(assumed or [])
    doc["outcomes"] = outcomes
    doc["branches_not_followed"] = unfollowed
    doc["diagnostics"] = [to_dict(d) for d in diags]
    return doc


def trips_json(trips, diags) -> dict:
    """``explain --env -o json``: every outcome of the connection (crosshost trips)."""
    t0 = trips[0]
    return _document(t0.flow, t0.start, [outcome_json(t) for t in trips], t0.unfollowed, diags)


def trip_json(trip, diags) -> dict:
    """One outcome as a whole document (a policy witness)."""
    return _document(trip.flow, trip.start, [outcome_json(trip)], trip.unfollowed, diags)


# ---------------------------------------------------------------------- explain DUMP
class _Hop:
    """A hop of explain's one namespace, from its forward or reply branch (netfilter.trace.Hop's
    fields, read by ``hop_json``)."""

    def __init__(self, role, arrived_on, br, packet_in, outcomes):
        self.namespace, self.role, self.arrived_on, self.bridged = HOST, role, arrived_on, False
        self.packet_in, self.packet_out = packet_in, br.pkt
        self.disposition, self.detail, self.approx = br.disposition, br.detail, br.approx
        self.prob, self.outcomes, self.ct, self.steps = br.prob, outcomes, br.ct, br.steps


def _one_hop_journey(hop, end_packet) -> dict:
    return {"end": hop.disposition, "end_namespace": HOST, "end_packet": packet_json(end_packet),
            "detail": hop.detail, "approximate": bool(hop.approx), "probability": hop.prob,
            "hops": [hop_json(hop)]}


def explain_json(flow, outcomes, assumed=None, diags=(), local: bool = False) -> dict:
    """``explain DUMP -o json``: the same document as an environment's, of one namespace
    (``host``): each outcome's request and reply are journeys of one hop."""
    out = []
    for oc in outcomes:
        fwd = oc.forward
        req = _Hop("request", None if local else flow.iif, fwd, flow, len(outcomes))
        rep = None
        if oc.reply is not None:
            rb = oc.reply
            first = next((s.before for s in rb.steps if s.before is not None), rb.pkt)
            rep = _one_hop_journey(_Hop("reply", None, rb, first, 1), rb.pkt)
            rep["probability"] = 1.0
        approx = bool(fwd.approx) or (oc.reply is not None and bool(oc.reply.approx))
        out.append({
            "probability": fwd.prob, "confidence": _confidence(approx), "endpoint": packet_json(fwd.pkt),
            "request": _one_hop_journey(req, fwd.pkt), "reply": rep,
            "client_sees": packet_json(oc.client_sees), "matches_dialled": oc.reply_ok,
            "second_leg": None, "listener": None,
        })
    return _document(flow, HOST if local else None, out, 0, diags, assumed)


#: version of the open-flow document (``explain --flow SET -o json``). 1.1 added ``summary``,
#: ``groups_traced`` and each group's ``witness``, ``outcome`` and ``approximate``; a group past
#: ``--show-groups`` has no ``explain`` and a null ``packets``. 1.2 added ``grouped_by`` ("fate"
#: or "path") and ``fate_fallback`` (why not by fate when it was asked, else null); grouped by
#: fate, ``outcome`` says the translations too ("forwarded, DNAT+SNAT, reply as dialled").
OPEN_SCHEMA_VERSION = "1.2"


def write_open(out, spec, result, found, traced: int | None, local: bool = False) -> None:
    """``explain --flow SET -o json``, written to ``out`` (a file) group by group, one group per
    line, so that a flow of 50,000 groups neither sits in memory as one string nor goes through
    the pure-Python pretty-printer. ``found``: each group's diagnostics; ``traced``: how many
    groups (the first ones) carry their witness's ``explain`` document and their packets as
    ranges (``Group.description``, filled in by the caller), None: all."""
    from analyzer.report.diagnostics import to_dict
    from analyzer.symbolic import outcome_kind, tally, witness_extras

    groups = result.groups
    unexplained = result.unexplained_example(spec)
    n = len(groups) if traced is None else min(traced, len(groups))
    by = getattr(result, "by", "path")
    nat = by == "fate"  # fate groups differ by translation too: their outcome says it
    head = {"schema_version": OPEN_SCHEMA_VERSION, "open_fields": sorted(spec.open),
            "grouped_by": by, "fate_fallback": getattr(result, "fallback", None), "complete": result.complete,
            **({"assumptions": groups[0].assumes} if groups and groups[0].assumes else {}),
            "classes": result.classes, "max_classes": result.limit,
            "unexplained_example": unexplained.tuple_str() if unexplained else None,
            "summary": [{"outcome": kind, "approximate": approx, "classes": nc, "groups": ng,
                         "groups_with_findings": nf} for kind, approx, nc, ng, nf in tally(groups, found, nat)],
            "groups_traced": n}
    text = json.dumps(head, indent=2)
    out.write(text[:-2] + ',\n  "groups": [')
    for k, (g, ds) in enumerate(zip(groups, found)):
        doc = {"packets": g.description if k < n else None, "classes": g.classes,
               "witness": g.witness.tuple_str() + witness_extras(g.witness, spec),
               "outcome": outcome_kind(g, nat),
               "approximate": g.is_approximate}
        if k < n:
            doc["explain"] = explain_json(g.witness, g.outcomes, local=local)
        doc["diagnostics"] = [to_dict(d) for d in ds]
        out.write(("\n    " if k == 0 else ",\n    ") + json.dumps(doc))
    out.write("\n  ]\n}\n" if groups else "]\n}\n")
