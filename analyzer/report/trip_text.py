"""Report layer: ``explain --env`` as text, every outcome of a connection hop by hop (request,
reply, a proxy's second leg), each step as ``xtables-monitor --trace`` prints it, then the
findings. Renders results (analyzer/netfilter/trace.py Trips); decides nothing.
"""
from __future__ import annotations

from analyzer.diagnostics import Diagnostic
from analyzer.netfilter.trace import Journey, Trip


def render_trip(trip: Trip, diags: list[Diagnostic]) -> str:
    out = [f"flow: {trip.flow.tuple_str()} from namespace '{trip.start}'", ""]

    def journey(title, j: Journey, indent="  "):
        out.append(f"{title}:")
        for h in j.hops:
            head = f"{indent}[{h.namespace}]" + (f" arrives on {h.arrived_on}" if h.arrived_on else " (local process)")
            if h.bridged:
                head += " (bridged, br_netfilter)"
            out.append(head + f": {h.packet_in.tuple_str()}")
            for s in h.steps:
                out.append(indent + "  " + s.render().replace("\n", "\n" + indent + "  "))
            out.append(f"{indent}  => {h.disposition}" + (f": {h.detail}" if h.detail else ""))
            if h.outcomes > 1:
                out.append(f"{indent}  branch: one of {h.outcomes} outcomes here"
                           + (f" (p={h.prob:.3f})" if h.prob is not None else " (probability unknown)"))
            for a in h.approx:
                out.append(f"{indent}  approximate: {a}")
        out.append(f"{indent}end: {j.end}" + (f" in '{j.end_ns}'" if j.end_ns else "") +
                   (f": {j.detail}" if j.detail else ""))

    journey("request", trip.request)
    if trip.reply is not None:
        journey("reply", trip.reply)
    if trip.client_sees is not None:
        ok = trip.client_sees.src == trip.flow.dst and trip.client_sees.sport == trip.flow.dport
        out.append(f"client sees: {trip.client_sees.tuple_str()}  "
                   f"({'matches what it dialled' if ok else 'NOT what it dialled'})")
    if trip.second_leg is not None:
        out.append("")
        out.append(f"second leg (opened by the proxy on port {trip.listener.port}, uid {trip.listener.uid}):")
        leg = trip.second_leg
        sub = render_trip(leg, []).splitlines()[2:]
        out.extend("  " + l for l in sub)
    if diags:
        from analyzer.diagnostics import render_text
        out.append("")
        out.extend(render_text(d) for d in diags)
    return "\n".join(out).rstrip() + "\n"


def _outcome_title(t: Trip, i: int, n: int) -> str:
    p = t.prob
    share = f"p={p:.3f}" if p is not None else "probability unknown (uncertain match)"
    e = t.endpoint
    to = f", endpoint {t.endpoint_name}" if e is not None and t.request.end != "no-route" else ""
    return f"outcome {i} of {n} ({share}{to})"


def render_trips(trips: list[Trip], diags: list[Diagnostic]) -> str:
    """Every outcome of one connection, each with its probability, then the findings."""
    if len(trips) == 1:
        return render_trip(trips[0], diags)
    t0 = trips[0]
    out = [f"flow: {t0.flow.tuple_str()} from namespace '{t0.start}'",
           f"{len(trips)} outcomes (the path forks: statistic endpoint choice or uncertain matches)"]
    for i, t in enumerate(trips, 1):
        out.append("")
        out.append(f"== {_outcome_title(t, i, len(trips))}")
        out.extend(render_trip(t, []).splitlines()[2:])
    if t0.unfollowed:
        out.append("")
        from analyzer.crosshost import MAX_OUTCOMES
        out.append(f"not followed: {t0.unfollowed} further branches (cap of {MAX_OUTCOMES} outcomes per direction)")
    if diags:
        from analyzer.diagnostics import render_text
        out.append("")
        out.extend(render_text(d) for d in diags)
    return "\n".join(out).rstrip() + "\n"
