"""Explain one flow through one namespace, first packet and reply: orchestration and rendering.

Uses netfilter/ (what the kernel evaluates, in which order) on the parsed model; the result is a
list of outcomes, each a forward trace, the conntrack entry, and the reply's trace.
"""
from __future__ import annotations

import json
import operator
import sys
from dataclasses import dataclass, replace

from analyzer.engine.concolic import in_network, is_ghost
from analyzer.netfilter.env import EnvError, Namespace
from analyzer.netfilter.neighbour import answers_solicitation, own_address, resolves_neighbour
from analyzer.netfilter.trace import Bridge, Kind, Reply, Step
from analyzer.netfilter.walk import Branch, Conntrack, Packet, Walker, parse_flow


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


#: what explain assumes about the world beyond the dump's namespace (printed with every answer;
#: the sysctls are settable with --sysctl, a bridge with --bridge)
PEER_MODEL = ("the client is a peer on the input interface; a destination outside this namespace is a "
              "peer reached by the route, which answers from the address it was sent to, straight to "
              "the client when both are on-link on the output interface, else back through this namespace")


def assumptions(ns: Namespace, family: int, local: bool) -> list[str]:
    """Every assumption explain makes, as printed (the same defaults as an environment file gives
    a namespace only where the kernel has one: ip_forward is assumed on, a router being explained)."""
    fwd = "net.ipv4.ip_forward" if family == 4 else "net.ipv6.conf.all.forwarding"
    out = [f"{fwd}={ns.sysctl(fwd, 1)}"]
    if ns.bridged:
        brnf = "net.bridge.bridge-nf-call-iptables" if family == 4 else "net.bridge.bridge-nf-call-ip6tables"
        out.append(f"{brnf}={ns.sysctl(brnf, 1)} (bridge ports: {', '.join(sorted(ns.bridged))})")
    else:
        out.append("no bridge: peers are on plain links (--bridge IFACE makes IFACE a bridge port)")
    if family == 4:
        rp = ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
        out.append(f"net.ipv4.conf.all.rp_filter={rp}")
    if not local:
        out.append(PEER_MODEL)
    return out


def client_route_assumption(ns: Namespace, pkt: Packet, local: bool) -> str | None:
    if _with_client_route(ns, pkt, local) is ns:
        return None
    return (f"the client {pkt.src} is reached back on {pkt.iif} (no route to it given: "
            f"'--route \'{pkt.src}/{pkt.src.max_prefixlen} via GW dev IFACE\'' to change)")


def explain_flow(ruleset, pkt: Packet, ns: Namespace, local: bool = False,
                 walker: Walker | None = None, reply: bool = True, resume: Branch | None = None) -> list[Outcome]:
    """Every outcome of the flow's first packet and its reply in one namespace, in rule order.
    The namespace is walked by the environment walk (crosshost: one namespace, the same hook
    sequence, ip_forward, martians, rp_filter and bridges as ``--env``); the world beyond it is
    the implicit peer model (``PEER_MODEL``). ``walker`` lets a caller observe the walk
    (symbolic.py records which rules were evaluated); ``reply=False`` follows the first packet
    only (what lint checks about a connection's fate ask). ``resume``: the flow's branch as it
    left the PREROUTING hook (``pkt`` its packet then): the walk goes on from there
    (pipeline.run; symbolic.py's fate exploration walked the hook over a set of packets)."""
    from analyzer.crosshost import HOST, one_namespace_world

    ns = _with_client_route(ns, pkt, local)
    if walker is not None and walker.ns is not ns:
        walker.ns = ns
    world = one_namespace_world(ruleset, ns, pkt.family, walker, memo=False)  # one flow: no walk is asked twice
    w = world.walker(HOST, pkt.family)
    nd = None
    if not local:
        # IPv6: the client must resolve this host (its next hop) before it sends anything
        nd = Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport, in_use=w.ct_in_use))
        if not _client_resolves_us(w, nd):
            return [Outcome(nd, None, nd.disposition, nd.detail, None, None)]
    brs = world.walk(HOST, pkt, None if local else pkt.iif, False, None, local_origin=local, resume=resume)
    brs.reverse()  # the walker lists a fork's outcomes last-rule-first
    for b in brs:
        if nd is not None and nd.steps:
            b.steps[:0] = nd.steps
            b.approx[:0] = nd.approx
        if b.disposition in ("forwarded", "sent"):
            _resolve_next_hop(w, b)  # IPv6: this host resolves the next hop on the output link
    return [_with_reply(world, br, local) if reply else
            Outcome(br, None, br.disposition, br.detail, None, None) for br in brs]


def _neighbour_steps(br: Branch, chk, what: str):
    """An exchange that crossed rules is shown in full (the kernel counts it too); one that
    only met policies is one line."""
    if chk.crosses_rules or not chk.ok:
        br.steps.append(Step(Kind.NEIGHBOUR, text=what))
        br.steps.extend(chk.steps)
    br.steps.append(Step(Kind.NEIGHBOUR, fact=chk.ok, text=("ok: " if chk.ok else "FAILED: ") + chk.summary))
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


_step_kind = operator.itemgetter(0)  # Step.kind (a NamedTuple's first field), read at C speed

#: how a packet that reached somewhere ends (what the reply is walked for)
REACHED = _REACHED = ("forwarded", "delivered", "sent")


def _with_client_route(ns: Namespace, pkt: Packet, local: bool) -> Namespace:
    """The peer model's client is reachable back on the interface it came in on: when the
    namespace has addresses or routes but none toward the client, a copy with that route."""
    if local or not pkt.iif or not ns.known or ns.route(pkt.src).kind != "none":
        return ns
    import copy

    peer = copy.copy(ns)
    peer.routes = list(ns.routes)
    peer._routes_by_dst = type(ns._routes_by_dst)()  # an open flow's memo never answers for open addresses
    peer.add_route(f"{pkt.src}/{pkt.src.max_prefixlen} dev {pkt.iif}")
    # the route is to the client, whatever its (open) address: Namespace._client_match
    peer.client_route, peer.client = peer.routes[-1], pkt.src
    return peer


def _with_reply(world, fwd: Branch, local: bool) -> Outcome:
    from analyzer.crosshost import HOST

    if fwd.disposition not in _REACHED:
        return Outcome(fwd, None, fwd.disposition, fwd.detail, None, None)
    w = world.walker(HOST, fwd.pkt.family)
    p = fwd.pkt
    o = fwd.ct.original
    if p.proto == 6 and p.tcp_flags & 0x04:  # an RST is never answered
        return Outcome(fwd, None, fwd.disposition, fwd.detail, None, None)
    # the answer to a SYN is a SYN+ACK; to anything else, an ACK (the far end still knows the
    # connection, as after a firewall failover; a host that does not answers RST instead)
    rflags = (0x12 if p.tcp_flags & 0x02 else 0x10) if p.proto == 6 else 0
    rp = Packet(p.family, p.proto, p.dst, p.src, p.dport, p.sport, tcp_flags=rflags,
                icmp_type=(0 if p.family == 4 else 129) if p.proto in (1, 58) else None, icmp_code=0)
    tproxy = Kind.TPROXY in map(_step_kind, fwd.steps)
    if tproxy:  # the proxy answers with the original destination as source
        rp = replace(rp, src=o.dst, sport=o.dport)
    # the reply belongs to the request's connection (untracked or not: then nat is skipped and
    # nothing is reverse-translated, as the kernel does)
    ct = fwd.ct
    if fwd.disposition == "delivered":
        head = Step(Kind.REPLY, None, rp, rp, fact=Reply.LOCAL_SOCKET,
                    text=f"generated locally by the socket on port {p.dport}")
        brs = world.walk(HOST, rp, None, True, ct, local_origin=True)
    elif (on_link := _on_link(w.ns, p)) and not (p.oif in w.ns.bridged and _bridge_nf(w.ns, p.family)):
        # the backend and the client share the subnet the packet left on: the backend answers
        # the client directly and the reply never crosses this host's conntrack entry
        rb = Branch(rp, replace(fwd.ct), [], 1.0, [], reply=True)
        rb.steps.append(Step(Kind.REPLY, None, rp, rp, fact=Reply.STRAIGHT,
                             text=f"goes straight from {p.dst} to {p.src} on {p.oif}: both are "
                                  f"on-link there, so it bypasses this host (no reverse translation)"))
        if p.oif in w.ns.bridged:
            rb.steps.append(Step(Kind.BRIDGE, None, rp, rp, fact=Bridge.NO_NETFILTER,
                                 text=f"switched by {w.ns.bridged[p.oif]} without netfilter "
                                      f"(bridge-nf-call-iptables=0)"))
        rb.disposition, rb.detail = "sent", f"sent by {p.dst} directly to the client"
        brs, head = [rb], None
    elif on_link:
        # a bridge port with br_netfilter: the bridged reply crosses this host's hooks (and its
        # conntrack entry) on its way to the client
        head = Step(Kind.REPLY, None, rp, rp, fact=Reply.BRIDGED,
                    text=f"bridged on {w.ns.bridged[p.oif]} from {p.dst} to {p.src}: br_netfilter "
                         f"(bridge-nf-call-iptables=1) runs this host's hooks on it")
        brs = world.walk(HOST, rp, p.oif, True, ct, bridged_via=p.oif)
    else:
        head = Step(Kind.REPLY, None, rp, rp, fact=Reply.BACK, text=f"arrives on {p.oif or '?'}")
        brs = world.walk(HOST, rp, p.oif, True, ct, local_origin=False)
    brs.reverse()
    rb = brs[0]
    if head is not None:
        rb.steps.insert(0, head)
    if rb.disposition == "bridged":
        rb.disposition, rb.detail = "sent", f"bridged to the client ({rb.detail})"
    elif rb.disposition == "delivered" and not local and fwd.disposition == "forwarded":
        rb.detail = "delivered to the client socket"
    elif rb.disposition == "delivered":
        rb.detail = "delivered to the client socket on this host"
    elif rb.disposition in ("forwarded", "sent") and head is not None:
        rb.detail = f"leaves toward the client via {rb.pkt.oif or '?'}"
    for other in brs[1:]:
        rb.approx.append(f"the reply has {len(brs)} outcomes here; shown: the first ({other.disposition} "
                         f"is another)")
    seen = rb.pkt if rb.disposition in _REACHED else None
    ok = None
    if seen is not None:
        if is_ghost(o.dst):
            # the original destination is one of many (fate exploration: the walk began after
            # a DNAT): the reply is as dialled when conntrack put the very value back, and
            # otherwise not, since the DNAT changed the tuple (ct.dnat)
            ok = seen.src is o.dst and seen.sport is o.dport and seen.dst == o.src and seen.dport == o.sport
        else:
            ok = seen.src == o.dst and seen.sport == o.dport and seen.dst == o.src and seen.dport == o.sport
    return Outcome(fwd, rb, fwd.disposition, fwd.detail, seen, ok)


def _bridge_nf(ns: Namespace, family: int) -> bool:
    key = "net.bridge.bridge-nf-call-iptables" if family == 4 else "net.bridge.bridge-nf-call-ip6tables"
    return ns.sysctl(key, 1) == 1


def _on_link(ns: Namespace, p: Packet) -> bool:
    """Whether a forwarded packet's destination reaches its source without this host: both in
    a subnet connected to the output interface (the classic hairpin: DNAT without SNAT)."""
    if not p.oif or ns.is_local(p.src):  # SNAT'd to this host: the reply comes back here
        return False
    for a in ns.addrs.get(p.oif, []):
        if a.version == p.family and a.network.prefixlen < a.max_prefixlen \
                and in_network(p.src, a.network) and in_network(p.dst, a.network):
            return True
    return False


# ------------------------------------------------------------------ rendering
def render_text(flow: Packet, outcomes: list[Outcome], where: str, assumed: list[str] | None = None) -> str:
    """Summary first, then each outcome's trace (analyzer/report/explain_text.py); the
    assumptions explain made, one ``assumes:`` line each, after the flow line."""
    from analyzer.report.explain_text import render
    text = render(flow, outcomes, where)
    if not assumed:
        return text
    first, _, rest = text.partition("\n")
    return "\n".join([first] + [f"assumes: {a}" for a in assumed]) + "\n" + rest


def render_json(flow: Packet, outcomes: list[Outcome], assumed: list[str] | None = None,
                diags=(), local: bool = False) -> str:
    """``explain -o json``: the environment's document shape (analyzer/report/explain_json.py)."""
    from analyzer.report.explain_json import explain_json
    return json.dumps(explain_json(flow, outcomes, assumed, diags, local), indent=2)


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
    for port in getattr(args, "bridge", None) or []:
        iface, _, bridge = port.partition("@")
        ns.bridged[iface] = bridge or iface
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


def flag_values(args, text: str) -> dict:
    """What ``--mark``, ``--uid`` and ``--gid`` say, checked against the flow's own ``mark``,
    ``uid``, ``gid`` words (each may be given once)."""
    from analyzer.parse.flow import _split_words

    _, words = _split_words(text)
    out = {}
    for key in ("mark", "uid", "gid"):
        v = getattr(args, key, None)
        if v is None:
            continue
        if key in words:
            raise ValueError(f"the {key} is given twice: --{key} and '{key} ...' in the flow (keep one)")
        out[key] = v
    return out


def run_explain(args, res) -> int:
    try:
        flow = parse_flow(args.flow, local=args.local)
        flow = replace(flow, **flag_values(args, args.flow))
        ns = build_namespace(args)
    except (ValueError, EnvError, OSError) as e:
        sys.stderr.write(f"synack: error: {e}\n")
        return 2
    if res.errors:
        from analyzer.report.diagnostics import render_text_all
        sys.stderr.write(render_text_all([d for d in res.diagnostics if d.severity.name == "ERROR"]) + "\n")
        sys.stderr.write("synack: warning: the dump has errors; explaining what could be parsed\n")
    if args.local:
        where = "generated locally" + (f" by uid {flow.uid}" if flow.uid is not None else "")
    else:
        flow = replace(flow, iif=args.from_iface)
        where = f"arrives on {args.from_iface}" if args.from_iface else "arrives on an unnamed interface"
    backend = getattr(args, "backend", None)
    walker = Walker(res.ruleset, ns, backend=backend if backend in ("nft", "legacy") else None)
    outcomes = explain_flow(res.ruleset, flow, ns, local=args.local, walker=walker)
    assumed = assumptions(ns, flow.family, args.local)
    if walker.recent_assumed:
        from analyzer.netfilter.walk import RECENT_ASSUMPTION
        assumed.append(RECENT_ASSUMPTION)
    extra = client_route_assumption(ns, flow, args.local)
    if extra:
        assumed.append(extra)
    report_late_errors(res)
    from analyzer.checks.nat import explain_findings
    diags = explain_findings(flow, outcomes, res.files)
    if args.output_format == "json":
        sys.stdout.write(render_json(flow, outcomes, assumed, diags, args.local) + "\n")
    elif args.output_format == "mermaid":
        from analyzer.report.mermaid import explain_mermaid
        sys.stdout.write(explain_mermaid(flow, outcomes, where))
    else:
        from analyzer.report.terminal import write
        write(render_text(flow, outcomes, where, assumed))  # colour on a terminal only
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
