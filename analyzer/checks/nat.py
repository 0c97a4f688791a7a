"""Checks layer, translation family (NAT): the findings of one connection's outcomes across an
environment, read from the typed trace (analyzer/netfilter/trace.py), never from its text.

One function per code, each given the world and one outcome (a ``Trip``): NAT001 (the reply
bypasses the translation, or a hairpin without SNAT comes back as a martian), NAT002 (the reply
is lost), NAT003 (a proxy's second leg fails), NAT004 (bridge hairpin off); ``outcome_findings``
merges them over every outcome with the failing endpoints and the share of connections.
``checks/reply.py`` runs them over every service of an environment (``lint --env``); explain
``--env`` and policies call them on the flow they follow. NAT005 lives in ``checks/reply.py``.
``explain_findings``: NAT001/NAT002 of ``explain DUMP`` (one namespace and its peer model).
"""
from __future__ import annotations

from analyzer.crosshost import World
from analyzer.diagnostics import APPROXIMATE, EXACT, Diagnostic, Related, Severity
from analyzer.model.packet import hostport
from analyzer.netfilter.trace import Bridge, Cilium, Hop, Journey, Kind, Reply, Route, Step, Trip

def findings(world: World, trip: Trip) -> list[Diagnostic]:
    """The NAT findings of one outcome of a connection, in order: NAT001 (or NAT002), NAT004,
    NAT003; each code is one function below."""
    out = []
    for code in (reply_bypasses_translation, reply_lost, hairpin_returns_to_client, bridge_hairpin_off,
                 split_connection_second_leg_fails):
        d = code(world, trip)
        if d is not None:
            out.append(d)
    return out


def reply_bypasses_translation(world: World, trip: Trip) -> Diagnostic | None:
    """NAT001: the client sees the reply from an address it never dialled: a namespace
    translated the request's destination and the reply does not cross its conntrack entry."""
    flow, req, seen = trip.flow, trip.request, trip.client_sees
    if trip.reply is None or seen is None or trip.matches_dialled:
        return None
    dnat_hops = [h for h in req.hops if h.ct is not None and h.ct.dnat]
    # the namespaces whose conntrack reverse-translated the reply
    reply_ns_with_ct = {h.namespace for h in trip.reply.hops
                        if any(s.kind is Kind.REVERSE_NAT for s in h.steps)}
    missed = [h for h in dnat_hops if h.namespace not in reply_ns_with_ct]
    rule = _translating_rule(world, missed[0]) if missed else None
    span = rule.option_span(rule.target) if rule is not None and rule.target else None
    related = []
    if rule is not None:
        related.append(Related("destination translated here", rule.span))
    bypass = _bypass_point(trip, missed[0].namespace if missed else None)
    back = world.env.namespaces[trip.start].net.route(seen.src)
    rst = ("answers RST" if back.kind in ("unicast", "local") else
           "would answer RST but has no route to it, so the RST is dropped")
    msg = (f"client {flow.src} dialled {hostport(flow.dst, flow.dport)} but the reply arrives from "
           f"{hostport(seen.src, seen.sport)}: the client's kernel has no socket for it and {rst}; "
           f"the connect retries its SYN and times out")
    cil = _cilium_miss(world, trip, missed[0]) if missed else None
    hint = _fix_hint(world, trip, missed)
    if cil is not None:
        msg += (f". The request {hostport(flow.dst, flow.dport)} -> "
                f"{hostport(missed[0].packet_out.dst, missed[0].packet_out.dport)}: {cil[0]}")
        hint = cil[1]
    elif missed:
        msg += (f". The request was translated in '{missed[0].namespace}' "
                f"({hostport(flow.dst, flow.dport)} -> {hostport(missed[0].packet_out.dst, missed[0].packet_out.dport)}) "
                f"but the reply {bypass}")
    return Diagnostic("NAT001", Severity.ERROR, msg, span, hint,
                      _line(world, span), APPROXIMATE if _approx(trip) else EXACT,
                      tuple(related), flow.tuple_str(), "reply-bypasses-translation")


def reply_lost(world: World, trip: Trip) -> Diagnostic | None:
    """NAT002: the request was answered but the reply never gets back to the client."""
    flow, rep = trip.flow, trip.reply
    if rep is None or (trip.client_sees is not None and not trip.matches_dialled):
        return None  # no reply, or NAT001's
    if rep.end == "delivered" and rep.end_ns == trip.start:
        return None
    return Diagnostic("NAT002", Severity.ERROR,
                      f"the reply to {flow.tuple_str()} does not come back to the client: "
                      f"{rep.detail or rep.end} (in {rep.end_ns})",
                      None, "check the return route and the filter rules on the reply path",
                      None, APPROXIMATE if _approx(trip) else EXACT, (), flow.tuple_str(),
                      "reply-lost")


def hairpin_returns_to_client(world: World, trip: Trip) -> Diagnostic | None:
    """NAT001, hairpin without SNAT: the translated request comes back to the client's own
    namespace with the client's address as source; the kernel drops it (martian source)
    before any socket sees it."""
    flow, req = trip.flow, trip.request
    if not (trip.reply is None and req.end == "dropped" and req.end_ns == trip.start
            and _stopped_by(req, Route.MARTIAN_SOURCE) and req.hops and req.hops[-1].packet_in.src == flow.src):
        return None
    dnat_hops = [h for h in req.hops if h.ct is not None and h.ct.dnat and h.namespace != trip.start]
    if not dnat_hops:
        return None
    hop = dnat_hops[-1]
    rule = _translating_rule(world, hop)
    span = rule.option_span(rule.target) if rule is not None and rule.target else None
    related = (Related("destination translated here", rule.span),) if rule is not None else ()
    msg = (f"client {flow.src} dialled {hostport(flow.dst, flow.dport)}; '{hop.namespace}' translates it to "
           f"{hostport(hop.packet_out.dst, hop.packet_out.dport)}, in the client's own namespace, without "
           f"SNAT: the request comes back with the client's own address as source and the kernel "
           f"drops it (martian source), so no SYN+ACK ever comes; the connect retries its SYN and "
           f"times out")
    return Diagnostic("NAT001", Severity.ERROR, msg, span, _fix_hint(world, trip, [hop], hairpin=True),
                      _line(world, span), APPROXIMATE if _approx(trip) else EXACT,
                      related, flow.tuple_str(), "reply-bypasses-translation")


def bridge_hairpin_off(world: World, trip: Trip) -> Diagnostic | None:
    """NAT004: the translated request must leave the bridge by the port it came in on, whose
    hairpin mode is off."""
    flow, req = trip.flow, trip.request
    if not _stopped_by(req, Bridge.HAIRPIN_OFF):
        return None
    hop = next((h for h in req.hops if h.ct is not None and h.ct.dnat), None)
    rule = _translating_rule(world, hop) if hop is not None else None
    span = rule.option_span(rule.target) if rule is not None and rule.target else None
    bridge = req.hops[-1].namespace
    return Diagnostic(
        "NAT004", Severity.ERROR,
        f"client {flow.src} dialled {hostport(flow.dst, flow.dport)}; the translated request must leave "
        f"'{bridge}''s bridge by the port it came in on, and {req.stop.value[0]} drops it, hairpin "
        "mode is off on that port: the SYN is dropped, the connect times out",
        span, "turn on hairpin mode for that bridge port (kubelet/CNI hairpinMode, "
              "'bridge link set dev PORT hairpin on'; 'hairpin: true' in the environment file)",
        _line(world, span), APPROXIMATE if _approx(trip) else EXACT,
        (Related("destination translated here", rule.span),) if rule is not None else (),
        flow.tuple_str(), "bridge-hairpin-off")


def split_connection_second_leg_fails(world: World, trip: Trip) -> Diagnostic | None:
    """NAT003: the connection ends at a local proxy whose own connection onward fails."""
    flow, leg = trip.flow, trip.second_leg
    if leg is None or trip.reply is None or trip.client_sees is None:
        return None
    fail = None
    loop = False
    if leg.request.end == "delivered" and leg.listener is not None and leg.listener is trip.listener:
        loop = True
        fail = (f"the proxy's own connection to {hostport(leg.flow.dst, leg.flow.dport)} is redirected back into "
                f"the proxy (port {trip.listener.port}): a loop, the owner exemption "
                f"(-m owner --uid-owner {trip.listener.uid}) is missing or does not match")
    elif leg.request.end != "delivered":
        fail = f"the proxy's connection to {hostport(leg.flow.dst, leg.flow.dport)} fails: {leg.request.detail or leg.request.end}"
    elif leg.reply is None or leg.client_sees is None:
        fail = f"the proxy's connection to {hostport(leg.flow.dst, leg.flow.dport)} gets no usable reply"
    if not fail:
        return None
    red = next((h for h in trip.request.hops if h.namespace == trip.request.end_ns), None)
    rule = _translating_rule(world, red) if red is not None else None
    span = rule.option_span(rule.target) if rule is not None else None
    related = []
    loop_hop = next((h for h in leg.request.hops if h.namespace == leg.request.end_ns), None)
    loop_rule = _translating_rule(world, loop_hop) if loop_hop is not None else None
    if loop_rule is not None:
        related.append(Related("the proxy's own connection is redirected here", loop_rule.span))
    return Diagnostic(
        "NAT003", Severity.ERROR,
        f"split connection: {flow.tuple_str()} ends at the local proxy on port {trip.listener.port} "
        f"in '{trip.request.end_ns}', so the client's handshake succeeds; but {fail}. The proxy "
        f"then resets the client's connection right after the first data",
        span, (f"exempt the proxy's own traffic from the outbound REDIRECT: "
               f"'-A ISTIO_OUTPUT -m owner --uid-owner {trip.listener.uid} -j RETURN' before the redirect"
               if loop else
               f"start the application on {hostport(leg.flow.dst, leg.flow.dport)} (or point the proxy at the "
               f"port it really listens on)"),
        _line(world, span), APPROXIMATE if _approx(trip) or _approx(leg) else EXACT, tuple(related),
        flow.tuple_str(), "split-connection-second-leg-fails")


#: what the connections of a failing outcome experience, per finding
_FATE = {"NAT001": "are reset", "NAT002": "lose their reply and time out",
         "NAT003": "are reset after the first data", "NAT004": "time out"}


def outcome_findings(world: World, trips: list[Trip]) -> list[Diagnostic]:
    """Findings of a connection over all its outcomes: a finding when any outcome fails, naming
    the failing endpoints and the share of connections affected ("1 of 3 endpoints, about 33%
    of connections, are reset"). EXACT when the forks are statistic (exact probabilities) and
    the finding itself is exact."""
    per = [(t, findings(world, t)) for t in trips]
    if len(trips) == 1:
        return per[0][1]
    total = None if any(t.prob is None for t in trips) else sum(t.prob for t in trips)
    wheres = [t.endpoint_name for t in trips]
    by_endpoint = len(set(wheres)) == len(trips)
    out = []
    codes = list(dict.fromkeys(d.code for _, ds in per for d in ds))
    for code in codes:
        failing = [(t, next(d for d in ds if d.code == code)) for t, ds in per if any(d.code == code for d in ds)]
        t0, d0 = failing[0]
        k, n = len(failing), len(trips)
        names = ", ".join(dict.fromkeys(t.endpoint_name for t, _ in failing))
        if total:
            share = sum(t.prob for t, _ in failing) / total
            how = f"about {share:.0%} of connections"
        else:
            how = "share of connections unknown (an uncertain match forks the path)"
        fate = _FATE.get(code, "fail")
        if code == "NAT001" and t0.client_sees is None:
            fate = "time out"
        if by_endpoint:
            head = (f"{k} of {n} endpoints ({names}), {how}, {fate}: "
                    if k < n else f"all {n} endpoints ({names}) {fate}: ")
        else:
            head = f"{k} of {n} outcomes ({names}), {how}, {fate}: "
        exact = total is not None and all(d.confidence == EXACT for _, d in failing)
        related = tuple(dict.fromkeys(r for _, d in failing for r in d.related))
        out.append(Diagnostic(d0.code, d0.severity, head + d0.message, d0.span, d0.hint, d0.source_line,
                              EXACT if exact else APPROXIMATE, related, d0.witness, d0.name))
    return out


def _approx(trip: Trip) -> bool:
    return trip.request.approximate or (trip.reply is not None and trip.reply.approximate)


def _stopped_by(j: Journey, fact) -> bool:
    """Whether the journey was dropped by this route/bridge refusal (a typed fact of its last step)."""
    stop = j.stop
    return stop is not None and stop.fact is fact


def _translating_rule(world: World, hop: Hop):
    """The rule that translated the request's destination in this hop (DNAT, REDIRECT, NETMAP)."""
    return next((s.rule for s in hop.steps if s.rule is not None and s.translates_destination), None)


def _bypass_point(trip: Trip, ns: str | None) -> str:
    hops = trip.reply.hops
    if not hops:
        return "never reaches it"
    path = " -> ".join(dict.fromkeys(h.namespace for h in hops))
    redirect = next((s for h in hops if h.namespace == ns for s in h.steps if _local_delivery(s)), None)
    if redirect is not None:
        # Cilium's bpf_lxc hands the reply from one pod's veth to the other's: no netfilter
        return (f"goes {path}, where Cilium redirects it by BPF from pod to pod "
                f"(redirect to {redirect.value}): it never crosses '{ns}''s netfilter "
                f"conntrack, so the translation there is not undone")
    return f"goes {path} and never crosses '{ns}''s conntrack entry, so it is not reverse-translated"


def _local_delivery(s: Step) -> bool:
    """Cilium's bpf_lxc delivering the packet from pod to pod by BPF redirect (ipv4_local_delivery)."""
    return s.kind is Kind.CILIUM and s.fact is Cilium.REDIRECT and s.chain == "local-delivery"


def _cilium_miss(world: World, trip: Trip, hop: Hop) -> tuple[str, str] | None:
    """For a request Cilium translated: (what happened to the reply, the fixes), from the
    datapath facts and the known-defects table (analyzer/netfilter/cilium.py)."""
    from analyzer.netfilter.cilium import FACTS, CiliumCT, defects

    ct = hop.ct
    if not isinstance(ct, CiliumCT):
        return None
    node = world.cilium_nodes.get(hop.namespace)
    said = next((s for h in trip.reply.hops for s in h.steps
                 if s.kind is Kind.CILIUM and s.fact is Cilium.NO_REVNAT), None)
    where = FACTS[ct.point].name
    if said is not None:
        d = said.value
        seen_on = node.version if node is not None else None
        why = (f"Cilium translated it in '{hop.namespace}' ({where}, at {ct.revnat_at}); the reply is "
               f"delivered back to {ct.revnat_at} by BPF redirect with no reverse translation on its path "
               f"({d.issue}" + (f", Cilium {'.'.join(map(str, seen_on))}" if seen_on else "")
               + f": {d.symptom.split(':')[0]})")
        fixes = d.fix
    else:
        why = (f"Cilium translated it in '{hop.namespace}' ({where}, reverse translation at "
               f"{ct.revnat_at}), but the reply {_bypass_point(trip, hop.namespace)}")
        fixes = ("translate at connect() (socket LB) or make the reply pass the interface where "
                 "Cilium reverse-translates")
    if node is not None and node.version is None:
        fixes += ("; the Cilium version is not known (give cilium status or cilium.version): "
                  + ", ".join(d.issue for d, _ in defects(node, ct.point) + defects(node, "revnat-to-container"))
                  + " may apply")
    return why, fixes


def _fix_hint(world: World, trip: Trip, missed, hairpin: bool = False) -> str:
    if not missed:
        return "make the reply return through the namespace that translated the request"
    ns = missed[0].namespace
    if trip.reply is not None and any(_local_delivery(s) for h in trip.reply.hops
                                      if h.namespace == ns for s in h.steps):
        # cilium#10567: iptables translated, Cilium's bpf_lxc delivers the reply past netfilter
        return (f"Cilium delivers the reply from pod to pod by BPF redirect, past '{ns}''s conntrack "
                f"(cilium#10567): let Cilium translate the service itself (east-west LB: cilium.per_packet_lb, "
                f"or socket LB) so that it also reverse-translates, or use endpoint routes "
                f"(cilium.local_delivery: stack) so replies cross the host's netfilter")
    out_if = missed[0].packet_out.oif
    rule = _translating_rule(world, missed[0])
    bridged_seg = next((seg for seg in world.env.segments
                        if seg.bridge_ns == ns and not world.bridge_nf(seg, missed[0].packet_in.family)), None)
    if rule is not None and rule.chain.startswith("KUBE-SEP-") and not hairpin and bridged_seg is not None \
            and _has_hairpin_masq(world, missed[0], rule):
        # kube-proxy's rules are complete: it relies on br_netfilter for same-bridge endpoints
        return (f"kube-proxy needs br_netfilter on '{ns}': the reply of the endpoint "
                f"{missed[0].packet_out.dst} is switched on {bridged_seg.name} straight to the client; load "
                f"br_netfilter and set net.bridge.bridge-nf-call-iptables=1 so bridged replies cross "
                f"'{ns}''s conntrack")
    if rule is not None and rule.chain.startswith("KUBE-SEP-") and not _has_hairpin_masq(world, missed[0], rule):
        ep = missed[0].packet_out.dst
        return (f"kube-proxy's hairpin masquerade is missing for this endpoint: add "
                f"'-A {rule.chain} -s {ep}/{ep.max_prefixlen} -j KUBE-MARK-MASQ' before the DNAT rule "
                f"(kube-proxy writes it for every endpoint; check --cluster-cidr / masquerade settings)")
    hint = (f"masquerade the translated traffic in '{ns}' so the reply must come back through it, e.g. "
            f"'-A POSTROUTING -m conntrack --ctstate DNAT"
            + (f" -o {out_if}" if out_if else "") + " -j MASQUERADE' in its nat table")
    if hairpin:  # br_netfilter does not help a connection translated back to its own client
        return hint
    for seg in world.env.segments:
        if seg.bridge_ns == ns and not world.bridge_nf(seg, missed[0].packet_in.family):
            hint += (f"; or enable br_netfilter in '{ns}' (net.bridge.bridge-nf-call-iptables=1) so "
                     f"bridged replies cross its conntrack")
            break
    return hint


def _has_hairpin_masq(world: World, hop: Hop, rule) -> bool:
    """Whether the KUBE-SEP chain of ``rule`` marks the endpoint's own traffic for masquerade."""
    from analyzer.model.rules import AddrMatch, Jump

    spec = world.env.namespaces[hop.namespace]
    rs = spec.ruleset if hop.packet_in.family == 4 else spec.ruleset6
    chain = rs.chain(rule.table, rule.chain) if rs is not None else None
    ep = hop.packet_out.dst
    for r in chain.rules if chain is not None else ():
        if isinstance(r.target, Jump) and r.target.chain == "KUBE-MARK-MASQ" and any(
                isinstance(m, AddrMatch) and m.direction == "src" and not m.negated
                and any(ep in n for n in m.networks) for m in r.matches):
            return True
    return False


def _line(world: World, span):
    """The source line a span points at (each file read once per World)."""
    if span is None:
        return None
    lines = world._source_lines.get(span.path)
    if lines is None:
        try:
            with open(span.path, encoding="utf-8", errors="replace") as f:
                lines = f.read().split("\n")
        except OSError:
            lines = []
        world._source_lines[span.path] = lines
    return lines[span.line - 1].rstrip("\r") if 0 < span.line <= len(lines) else None


# ---------------------------------------------------------------------- one dump
def explain_findings(flow, outcomes, files=()) -> list[Diagnostic]:
    """The findings ``lint --env`` would raise on this flow, read from the outcomes the walk
    computed: a reply the client does not recognise (NAT001), a reply that never reaches it
    (NAT002). One namespace only (``explain DUMP``): what happens beyond it is an assumption of
    the walk (the peer model), so the messages say "here" rather than name namespaces."""
    from analyzer.explain import REACHED as _REACHED
    from analyzer.source import Span

    lines = {f.path: f for f in files}
    out = []
    for k, oc in enumerate(outcomes, 1):
        if oc.reply is None:
            continue
        tag = "" if len(outcomes) == 1 else f"outcome {k} of {len(outcomes)}" + (
            "" if oc.forward.prob in (None, 1.0) else f" (p={oc.forward.prob:.3f})") + ": "
        conf = oc.confidence if oc.confidence == APPROXIMATE else EXACT
        dnat = next((s for s in oc.forward.steps if s.rule is not None
                     and s.kind in (Kind.DNAT, Kind.REDIRECT, Kind.NETMAP)), None)
        span = line = None
        related = ()
        if dnat is not None:
            line = lines[dnat.path].line(dnat.line) if dnat.path in lines else None
            col = (line or "").find("-j ") + 1 or 1
            span = Span(dnat.path, dnat.line, col, max(col + 1, len(line or "") + 1))
        o = oc.forward.ct.original
        if oc.reply_ok is False and oc.client_sees is not None:
            seen = oc.client_sees
            msg = (f"{tag}client {o.src} dialled {hostport(o.dst, o.dport)} but the reply arrives from "
                   f"{hostport(seen.src, seen.sport)}: the client's kernel has no socket for it and answers RST")
            if oc.forward.ct.dnat and oc.reply.steps and oc.reply.steps[0].fact is Reply.STRAIGHT:
                msg += (f"; the request was translated to {hostport(oc.forward.pkt.dst, oc.forward.pkt.dport)} here "
                        f"but the reply goes straight back to the client, bypassing this host's conntrack entry")
            out.append(Diagnostic("NAT001", Severity.ERROR, msg, span,
                                  "SNAT/MASQUERADE the translated flow on its way out (so the reply comes back "
                                  "here to be reverse-translated), or route the reply through this host",
                                  line, conf, related, flow.tuple_str(), "reply-bypasses-translation"))
        elif oc.reply.disposition not in _REACHED:
            stop = next((s for s in reversed(oc.reply.steps) if s.line and s.path in lines), None)
            if stop is not None:  # the rule that ended the reply, rather than the translation
                line = lines[stop.path].line(stop.line)
                col = line.find("-j ") + 1 or 1
                span = Span(stop.path, stop.line, col, max(col + 1, len(line) + 1))
            out.append(Diagnostic("NAT002", Severity.ERROR,
                                  f"{tag}the reply to {o.tuple_str()} does not come back to the client: "
                                  f"{oc.reply.disposition}" + (f" ({oc.reply.detail})" if oc.reply.detail else "")
                                  + (f" by {oc.reply.steps[-1].where}:{oc.reply.steps[-1].verdict}"
                                     if oc.reply.steps else ""),
                                  span, "check the filter rules and routes on the reply path", line, conf,
                                  related, flow.tuple_str(), "reply-lost"))
    return out
