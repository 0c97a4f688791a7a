"""Explain one flow through one namespace, first packet and reply: orchestration and rendering.

Uses netfilter/ (what the kernel evaluates, in which order) on the parsed model; the result is a
list of outcomes, each a forward trace, the conntrack entry, and the reply's trace.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace

from analyzer.model.packet import tcp_flag_names
from analyzer.netfilter.env import EnvError, Namespace
from analyzer.netfilter.neighbour import answers_solicitation, own_address, resolves_neighbour
from analyzer.netfilter.walk import Branch, Conntrack, Packet, Step, Walker, parse_flow, route_decision
from analyzer.report import SCHEMA_VERSION


@dataclass
class Outcome:
    forward: Branch
    reply: Branch | None
    disposition: str
    detail: str
    client_sees: Packet | None
    reply_ok: bool | None

    @property
    def confidence(self) -> str:
        return "APPROXIMATE" if self.forward.approx or (self.reply and self.reply.approx) else "EXACT"


def explain_flow(ruleset, pkt: Packet, ns: Namespace, local: bool = False,
                 walker: Walker | None = None, reply: bool = True) -> list[Outcome]:
    """Every outcome of the flow's first packet and its reply in one namespace. ``walker`` lets a
    caller observe the walk (symbolic.py records which rules were evaluated); ``reply=False``
    follows the first packet only (what lint checks about a connection's fate ask)."""
    w = walker or Walker(ruleset, ns)
    ct = Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport, in_use=w.ct_in_use)
    start = Branch(pkt, ct)
    outcomes: list[Outcome] = []
    if local:
        r = ns.route(pkt.dst)
        if r.kind == "unicast":
            start.pkt = replace(pkt, oif=r.oif)
            start.next_hop = r.via or pkt.dst
        elif r.kind == "local":
            start.pkt = replace(pkt, oif="lo")
        brs = w.hook([start], "OUTPUT")
        done = []
        for br in brs:
            if br.disposition is None:
                kind = route_decision(w, br, local_origin=True)  # nat OUTPUT may have changed the destination: reroute
                if kind == "local":
                    br.pkt = replace(br.pkt, oif="lo")
            done.append(br)
        brs = w.hook(done, "POSTROUTING")
        looped = []
        for br in brs:
            if br.disposition is None and br.pkt.oif == "lo":
                looped.extend(_loopback(w, br))
            else:
                looped.append(br)
        brs = looped
        for br in brs:
            if br.disposition is None:
                if br.pkt.oif == "lo":
                    br.disposition, br.detail = "delivered-locally", f"delivered locally to port {br.pkt.dport}"
                else:
                    br.disposition = "sent"
                    br.detail = f"sent out {br.pkt.oif or '?'} to {br.next_hop or br.pkt.dst}"
                    _resolve_next_hop(w, br)
    else:
        if not _client_resolves_us(w, start):
            return [Outcome(start, None, start.disposition, start.detail, None, None)]
        brs = w.hook([start], "PREROUTING")
        routed = []
        for br in brs:
            if br.disposition is not None:
                routed.append(br)
                continue
            kind = route_decision(w, br)
            if kind == "local":
                for b in w.hook([br], "INPUT"):
                    if b.disposition is None:
                        b.disposition, b.detail = "delivered-locally", f"delivered locally to port {b.pkt.dport}"
                    routed.append(b)
            elif kind == "forward":
                if ns.sysctl("net.ipv4.ip_forward" if br.pkt.family == 4 else "net.ipv6.conf.all.forwarding", 1) == 0:
                    br.disposition, br.detail = "dropped", "ip_forward is 0: the kernel does not forward"
                    br.steps.append(Step("route", "ip_forward=0: dropped"))
                    routed.append(br)
                    continue
                for b in w.hook(w.hook([br], "FORWARD"), "POSTROUTING"):
                    if b.disposition is None:
                        b.disposition = "forwarded"
                        b.detail = f"forwarded out {b.pkt.oif or '?'} to {b.next_hop or b.pkt.dst}"
                        _resolve_next_hop(w, b)
                    routed.append(b)
            else:
                routed.append(br)
        brs = routed
    for br in brs:
        outcomes.append(_with_reply(w, br, local) if reply else
                        Outcome(br, None, br.disposition, br.detail, None, None))
    return outcomes


def _neighbour_steps(br: Branch, chk, what: str):
    """An exchange that crossed rules is shown in full (the kernel counts it too); one that
    only met policies is one line."""
    if chk.crosses_rules or not chk.ok:
        br.steps.append(Step("neighbour", what))
        br.steps.extend(chk.steps)
    br.steps.append(Step("neighbour", ("ok: " if chk.ok else "FAILED: ") + chk.summary))
    br.approx.extend(chk.approx)


def _client_resolves_us(w: Walker, br: Branch) -> bool:
    """IPv6: the client on the input link must resolve this host (its next hop) first; the
    neighbour solicitation goes through ip6tables (netfilter.neighbour)."""
    p = br.pkt
    target = own_address(w.ns, p.iif, p.src) if p.family == 6 and p.iif else None
    if target is None:
        return True
    chk = answers_solicitation(w.rs, w.ns, p.iif, target, p.src, walker=w)
    _neighbour_steps(br, chk, f"the client {p.src} solicits {target} on {p.iif}")
    if not chk.ok:
        br.disposition = "dropped"
        br.detail = f"{chk.summary}: the client cannot resolve its next hop and never sends the packet"
    return chk.ok


def _resolve_next_hop(w: Walker, br: Branch):
    """IPv6: before the packet leaves, this host resolves the next hop on the output link."""
    p = br.pkt
    hop = br.next_hop or p.dst
    source = own_address(w.ns, p.oif, hop) if p.family == 6 and p.oif else None
    if source is None:
        return
    chk = resolves_neighbour(w.rs, w.ns, p.oif, hop, source, walker=w)
    _neighbour_steps(br, chk, f"this host solicits {hop} on {p.oif}")
    if not chk.ok:
        br.disposition = "dropped"
        br.detail = f"{chk.summary}: the next hop stays unresolved and the packet is never sent"


def _with_reply(w: Walker, fwd: Branch, local: bool) -> Outcome:
    if fwd.disposition not in ("forwarded", "delivered-locally", "sent", "tproxy"):
        return Outcome(fwd, None, fwd.disposition, fwd.detail, None, None)
    if fwd.disposition == "tproxy":
        fwd.detail = fwd.detail or "delivered to a transparent proxy"
    p = fwd.pkt
    o = fwd.ct.original
    if p.proto == 6 and p.tcp_flags & 0x04:  # an RST is never answered
        return Outcome(fwd, None, fwd.disposition, fwd.detail, None, None)
    # the answer to a SYN is a SYN+ACK; to anything else, an ACK (the far end still knows the
    # connection, as after a firewall failover; a host that does not answers RST instead)
    rflags = (0x12 if p.tcp_flags & 0x02 else 0x10) if p.proto == 6 else 0
    rp = Packet(p.family, p.proto, p.dst, p.src, p.dport, p.sport, tcp_flags=rflags,
                icmp_type=(0 if p.family == 4 else 129) if p.proto in (1, 58) else None, icmp_code=0)
    if fwd.disposition == "tproxy":  # the proxy answers with the original destination as source
        rp = replace(rp, src=o.dst, sport=o.dport)
    rb = Branch(rp, replace(fwd.ct), [], 1.0, [], reply=True)
    if fwd.disposition in ("delivered-locally", "tproxy"):
        r = w.ns.route(rp.dst)
        rb.pkt = replace(rp, oif=r.oif if r.kind in ("unicast", "local") else fwd.ct.original.iif)
        rb.steps.append(Step("reply", f"generated locally by the socket on port {p.dport}"))
        brs = w.hook(w.hook([rb], "OUTPUT", reply=True), "POSTROUTING", reply=True)
        if local:  # a local process dialled a local address: the reply loops back through lo too
            brs = [x for b in brs for x in (_loopback(w, b, reply=True)
                                            if b.disposition is None and b.pkt.oif == "lo" else [b])]
    elif _on_link(w.ns, p):
        # the backend and the client share the subnet the packet left on: the backend answers
        # the client directly and the reply never crosses this host's conntrack entry
        rb.pkt = rp
        rb.steps.append(Step("reply", f"goes straight from {p.dst} to {p.src} on {p.oif}: both are "
                                      f"on-link there, so it bypasses this host (no reverse translation)"))
        if p.oif in w.ns.bridged:
            rb.approx.append(f"{p.oif} is a bridge port: with br_netfilter (bridge-nf-call-iptables=1) "
                             "the bridged reply is reverse-translated after all")
        rb.disposition, rb.detail = "sent", f"sent by {p.dst} directly to the client"
        brs = [rb]
    else:
        rb.pkt = replace(rp, iif=p.oif)
        rb.steps.append(Step("reply", f"arrives on {p.oif or '?'}"))
        brs = w.hook([rb], "PREROUTING", reply=True)
        nxt = []
        for b in brs:
            if b.disposition is not None:
                nxt.append(b)
                continue
            if local or w.ns.is_local(b.pkt.dst):
                for x in w.hook([b], "INPUT", reply=True):
                    if x.disposition is None:
                        x.disposition, x.detail = "delivered-locally", "delivered to the client socket"
                    nxt.append(x)
            else:
                r = w.ns.route(b.pkt.dst)
                b.pkt = replace(b.pkt, oif=r.oif if r.kind == "unicast" else o.iif)
                b.steps.append(Step("route", f"reply forward out {b.pkt.oif or '?'}"))
                nxt.extend(w.hook(w.hook([b], "FORWARD", reply=True), "POSTROUTING", reply=True))
        brs = nxt
    rb = brs[0] if brs else rb
    if rb.disposition is None and w.ns.is_local(rb.pkt.dst) and fwd.disposition != "forwarded":
        rb.disposition, rb.detail = "delivered-locally", "delivered to the client socket on this host"
    if rb.disposition is None:
        rb.disposition = "sent"
        rb.detail = f"leaves toward the client via {rb.pkt.oif or '?'}"
    seen = rb.pkt if rb.disposition in ("sent", "delivered-locally") else None
    ok = None
    if seen is not None:
        ok = seen.src == o.dst and seen.sport == o.dport and seen.dst == o.src and seen.dport == o.sport
    return Outcome(fwd, rb, fwd.disposition, fwd.detail, seen, ok)


def _loopback(w: Walker, br: Branch, reply: bool = False) -> list[Branch]:
    """A packet a local process sent to a local address leaves on ``lo`` and comes back in:
    PREROUTING and INPUT see it with ``-i lo``. Its conntrack entry was confirmed on the way
    out, so the nat chains do not run again."""
    br.ct.confirmed = True
    br.pkt = replace(br.pkt, iif="lo", oif=None)
    br.steps.append(Step("route", "loopback: back in on lo"))
    out = w.hook(w.hook([br], "PREROUTING", reply=reply), "INPUT", reply=reply)
    for b in out:
        if b.disposition is None:
            b.disposition = "delivered-locally"
            b.detail = "delivered to the client socket on this host" if reply else \
                f"delivered locally to port {b.pkt.dport}"
    return out


def _on_link(ns: Namespace, p: Packet) -> bool:
    """Whether a forwarded packet's destination reaches its source without this host: both in
    a subnet connected to the output interface (the classic hairpin: DNAT without SNAT)."""
    if not p.oif or ns.is_local(p.src):  # SNAT'd to this host: the reply comes back here
        return False
    for a in ns.addrs.get(p.oif, []):
        if a.version == p.family and a.network.prefixlen < a.max_prefixlen \
                and p.src in a.network and p.dst in a.network:
            return True
    return False


# ------------------------------------------------------------------ rendering
def render_text(flow: Packet, outcomes: list[Outcome], where: str) -> str:
    """Summary first, then each outcome's trace (analyzer/report/explain_text.py)."""
    from analyzer.report.explain_text import render
    return render(flow, outcomes, where)


def _steps_json(steps):
    return [{"where": s.where, "verdict": s.verdict, "line": s.line, "path": s.path,
             "packet": s.packet, "note": s.note} for s in steps]


def _tuple_json(p: Packet | None):
    if p is None:
        return None
    return {"proto": p.proto, "src": str(p.src), "sport": p.sport, "dst": str(p.dst), "dport": p.dport}


def render_json(flow: Packet, outcomes: list[Outcome]) -> str:
    doc = {"schema_version": SCHEMA_VERSION, "flow": _tuple_json(flow), "outcomes": []}
    if flow.proto == 6 and flow.tcp_flags != 0x02:  # not a connection's first SYN
        doc["flow"]["tcp_flags"] = tcp_flag_names(flow.tcp_flags)
    for oc in outcomes:
        ct = oc.forward.ct
        item = {
            "probability": oc.forward.prob, "confidence": oc.confidence,
            "disposition": oc.disposition, "detail": oc.detail,
            "steps": _steps_json(oc.forward.steps),
            "translated": _tuple_json(oc.forward.pkt),
            "approximate": oc.forward.approx,
        }
        if oc.reply is not None:
            item["conntrack_state"] = ("not-in-use" if not ct.in_use else "untracked" if ct.untracked
                                       else "invalid" if ct.invalid else "tracked")
            item["conntrack"] = None if (ct.untracked or ct.invalid or not ct.in_use) else {
                "original": _tuple_json(ct.original),
                "reply": {"proto": ct.original.proto, "src": str(ct.reply_src), "sport": ct.reply_sport,
                          "dst": str(ct.reply_dst), "dport": ct.reply_dport},
                "dnat": ct.dnat, "snat": ct.snat, "mark": ct.mark}
            item["reply"] = {"steps": _steps_json(oc.reply.steps), "disposition": oc.reply.disposition,
                             "detail": oc.reply.detail, "approximate": oc.reply.approx,
                             "client_sees": _tuple_json(oc.client_sees), "matches_dialled": oc.reply_ok}
        doc["outcomes"].append(item)
    return json.dumps(doc, indent=2)


def build_namespace(args) -> Namespace:
    ns = Namespace()
    for spec in args.addr:
        cidr, _, iface = spec.partition("@")
        ns.add_addr(cidr, iface or "eth0")
    for spec in getattr(args, "sysctl", None) or []:
        key, sep, value = spec.partition("=")
        try:
            ns.sysctls[key.strip()] = int(value, 0)
        except ValueError:
            raise EnvError(f"--sysctl takes KEY=INTEGER, not '{spec}'") from None
    if args.iproute:
        try:
            with open(args.iproute[0]) as fa, open(args.iproute[1]) as fr:
                ns.load_iproute(fa.read(), fr.read())
        except OSError as e:
            raise EnvError(f"--iproute {e.filename}: cannot read it: {e.strerror}") from None
    for r in args.route:
        ns.add_route(r)
    for path in getattr(args, "ipset", []):
        from analyzer.parse.ipset import load_ipsets
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                sets, diags = load_ipsets(f.read(), path)
        except OSError as e:
            raise EnvError(f"--ipset {path}: cannot read it: {e.strerror}") from None
        if diags:
            raise EnvError(f"{diags[0].span.render()}: {diags[0].message}")
        ns.ipsets.update(sets)
    return ns


def outcome_findings(flow: Packet, outcomes: list[Outcome], files=()) -> list:
    """The findings ``lint --env`` would raise on this flow, read from the outcomes the walk
    computed: a reply the client does not recognise (NAT001), a reply that never reaches it
    (NAT002). One namespace only: what happens beyond it is an assumption of the walk."""
    from analyzer.diagnostics import APPROXIMATE, EXACT, Diagnostic, Severity
    from analyzer.source import Span

    lines = {f.path: f for f in files}
    out = []
    for k, oc in enumerate(outcomes, 1):
        if oc.reply is None:
            continue
        tag = "" if len(outcomes) == 1 else f"outcome {k} of {len(outcomes)}" + (
            "" if oc.forward.prob in (None, 1.0) else f" (p={oc.forward.prob:.3f})") + ": "
        conf = oc.confidence if oc.confidence == APPROXIMATE else EXACT
        dnat = next((s for s in oc.forward.steps if s.verdict.startswith(("DNAT", "REDIRECT", "NETMAP"))
                     and s.line), None)
        span = line = None
        related = ()
        if dnat is not None:
            line = lines[dnat.path].line(dnat.line) if dnat.path in lines else None
            col = (line or "").find("-j ") + 1 or 1
            span = Span(dnat.path, dnat.line, col, max(col + 1, len(line or "") + 1))
        o = oc.forward.ct.original
        if oc.reply_ok is False and oc.client_sees is not None:
            seen = oc.client_sees
            msg = (f"{tag}client {o.src} dialled {o.dst}:{o.dport} but the reply arrives from "
                   f"{seen.src}:{seen.sport}: the client's kernel has no socket for it and answers RST")
            if oc.forward.ct.dnat and oc.reply.steps and oc.reply.steps[0].verdict.startswith("goes straight"):
                msg += (f"; the request was translated to {oc.forward.pkt.dst}:{oc.forward.pkt.dport} here "
                        f"but the reply goes straight back to the client, bypassing this host's conntrack entry")
            out.append(Diagnostic("NAT001", Severity.ERROR, msg, span,
                                  "SNAT/MASQUERADE the translated flow on its way out (so the reply comes back "
                                  "here to be reverse-translated), or route the reply through this host",
                                  line, conf, related, flow.tuple_str(), "reply-bypasses-translation"))
        elif oc.reply.disposition not in ("sent", "delivered-locally"):
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


def run_explain(args, res) -> int:
    try:
        flow = parse_flow(args.flow)
        ns = build_namespace(args)
    except (ValueError, EnvError, OSError) as e:
        sys.stderr.write(f"synack: error: {e}\n")
        return 2
    if res.errors:
        from analyzer.report.diagnostics import render_text_all
        sys.stderr.write(render_text_all([d for d in res.diagnostics if d.severity.name == "ERROR"]) + "\n")
        sys.stderr.write("synack: warning: the dump has errors; explaining what could be parsed\n")
    if args.local:
        flow = replace(flow, uid=args.uid, gid=args.gid, mark=args.mark)
        where = "generated locally" + (f" by uid {args.uid}" if args.uid is not None else "")
    else:
        flow = replace(flow, iif=args.from_iface, mark=args.mark)
        where = f"arrives on {args.from_iface}" if args.from_iface else "arrives on an unnamed interface"
    backend = getattr(args, "backend", None)
    walker = Walker(res.ruleset, ns, backend=backend if backend in ("nft", "legacy") else None)
    outcomes = explain_flow(res.ruleset, flow, ns, local=args.local, walker=walker)
    report_late_errors(res)
    diags = outcome_findings(flow, outcomes, res.files)
    if args.output_format == "json":
        from analyzer.report.diagnostics import to_dict
        doc = json.loads(render_json(flow, outcomes))
        doc["diagnostics"] = [to_dict(d) for d in diags]
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        from analyzer.report.terminal import write
        write(render_text(flow, outcomes, where))  # colour on a terminal only
        if diags:
            from analyzer.report.diagnostics import render_text_all
            write("\n" + render_text_all(diags) + "\n")
    return 1 if diags else 0


def report_late_errors(res) -> None:
    """Errors in rules the flow met, found when a lazily parsed dump decoded them."""
    late = [d for d in res.late_diagnostics() if d.severity.name == "ERROR"]
    if late:
        from analyzer.report.diagnostics import render_text_all
        sys.stderr.write(render_text_all(sorted(late, key=lambda d: d.sort_key())) + "\n")
        sys.stderr.write("synack: warning: rules on this flow's path have errors; they were explained "
                         "as far as they could be parsed (run `synack lint` for the whole dump)\n")
