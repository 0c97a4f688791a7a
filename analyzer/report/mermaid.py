"""Report layer: a flow's outcomes as Mermaid sequence diagrams (`synack explain -o mermaid`).

Lanes are the client, the namespaces the packets cross and the server; the first packet is a
SYN arrow, the reply a SYN+ACK arrow, a client's reset an RST arrow; translations are notes over
the namespace that made them, the way the seed article draws its figures. Renders results only.
"""
from __future__ import annotations

from analyzer.netfilter.trace import Kind, Reply


def _id(name: str) -> str:
    """A Mermaid participant id for a lane name.

    >>> _id("pod-a"), _id("10.0.0.3")
    ('pod_a', 'n10_0_0_3')
    """
    s = "".join(c if c.isalnum() else "_" for c in name) or "x"
    return "n" + s if s[0].isdigit() else s


def _lane(lanes: list, name: str) -> str:
    if name not in lanes:
        lanes.append(name)
    return _id(name)


def _translations(hop) -> list[str]:
    out = []
    for s in hop.steps:
        if s.translates:
            v = s.verdict
            out.append(v + (f" ({s.path.rsplit('/', 1)[-1]}:{s.line})" if s.line else ""))
    return out


def _flags(pkt, reply: bool) -> str:
    if pkt.proto != 6:
        return "reply" if reply else "request"
    return "SYN+ACK" if reply else "SYN"


def trips_mermaid(trips) -> str:
    """One ``sequenceDiagram`` per outcome of ``explain --env`` (crosshost trips)."""
    blocks = []
    for i, t in enumerate(trips, 1):
        lanes: list = []
        body: list[str] = []
        client = _lane(lanes, t.start)
        title = f"outcome {i} of {len(trips)}"
        if t.prob is not None and len(trips) > 1:
            title += f", p={t.prob:.3f}"
        for role, j, first in (("request", t.request, False), ("reply", t.reply, True)):
            if j is None:
                continue
            prev = None
            for h in j.hops:
                here = _lane(lanes, h.namespace)
                if prev is not None and prev != here:
                    body.append(f"    {prev}->>{here}: {_flags(h.packet_in, first)} {h.packet_in.tuple_str()}")
                for note in _translations(h):
                    body.append(f"    Note over {here}: {note}")
                if h.disposition not in ("sent", "forwarded", "bridged", "delivered"):
                    body.append(f"    Note over {here}: {h.disposition}" + (f": {h.detail}" if h.detail else ""))
                prev = here
        if t.client_sees is not None:
            seen = t.client_sees
            if (seen.src, seen.sport) != (t.flow.dst, t.flow.dport):
                back = _lane(lanes, t.reply.hops[0].namespace) if t.reply and t.reply.hops else client
                body.append(f"    {client}-x{back}: RST (reply from {seen.src}:{seen.sport}, dialled "
                            f"{t.flow.dst}:{t.flow.dport})")
        head = ["sequenceDiagram", f"    title {t.flow.tuple_str()}: {title}"]
        head += [f"    participant {_id(n)} as {n}" for n in lanes]
        blocks.append("\n".join(head + body))
    return "\n\n".join(blocks) + "\n"


def explain_mermaid(flow, outcomes, where: str) -> str:
    """One ``sequenceDiagram`` per outcome of ``explain DUMP``: client, this host, the server."""
    blocks = []
    for i, oc in enumerate(outcomes, 1):
        fwd = oc.forward
        server = f"{fwd.pkt.dst}" if oc.disposition != "delivered" else "host"
        lanes = ["client", "host"] + ([server] if server != "host" else [])
        body = [f"    client->>host: {_flags(flow, False)} {flow.tuple_str()}"]
        for s in fwd.steps:
            if s.translates and s.kind is not Kind.REVERSE_NAT:
                body.append(f"    Note over host: {s.verdict}" + (f" (line {s.line})" if s.line else ""))
        if oc.disposition in ("forwarded", "sent"):
            body.append(f"    host->>{_id(server)}: {_flags(flow, False)} {fwd.pkt.tuple_str()}")
        elif oc.disposition != "delivered":
            body.append(f"    Note over host: {oc.disposition}" + (f": {oc.detail}" if oc.detail else ""))
        rb = oc.reply
        if rb is not None:
            straight = bool(rb.steps) and rb.steps[0].fact is Reply.STRAIGHT
            src = "host" if oc.disposition == "delivered" else _id(server)
            if straight:
                body.append(f"    {src}->>client: {_flags(flow, True)} {rb.pkt.tuple_str()} (bypasses host)")
            else:
                if src != "host":
                    body.append(f"    {src}->>host: {_flags(flow, True)}")
                for s in rb.steps:
                    if s.kind is Kind.REVERSE_NAT:
                        body.append(f"    Note over host: {s.verdict}")
                if rb.disposition in ("sent", "forwarded", "delivered"):
                    body.append(f"    host->>client: {_flags(flow, True)} {rb.pkt.tuple_str()}")
                else:
                    body.append(f"    Note over host: reply {rb.disposition}")
            if oc.reply_ok is False and oc.client_sees is not None:
                body.append(f"    client-x{'host' if not straight else src}: RST (reply from "
                            f"{oc.client_sees.src}:{oc.client_sees.sport})")
        head = ["sequenceDiagram", f"    title {flow.tuple_str()} ({where}): outcome {i} of {len(outcomes)}"]
        head += [f"    participant {_id(n)} as {n}" for n in lanes]
        blocks.append("\n".join(head + body))
    return "\n\n".join(blocks) + "\n"
