"""Follow a flow across namespaces (hosts, pods, bridges) forward and back; find replies that
bypass the translation that the request crossed, and connections split at a local proxy.

Orchestration over netfilter/: each namespace is walked with the single-namespace model; this
module moves packets between namespaces (L2 segments, bridges with or without br_netfilter),
keeps each namespace's conntrack entries, and walks the reply back from where the request ended.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from analyzer.diagnostics import APPROXIMATE, EXACT, Diagnostic, Related, Severity
from analyzer.netfilter.walk import Branch, Conntrack, Packet, Step, Walker, route_decision
from analyzer.parse.envfile import Environment
from analyzer.source import Span

MAX_HOPS = 16


@dataclass
class Hop:
    namespace: str
    role: str            # "request" | "reply" | "second leg"
    arrived_on: str | None
    steps: list
    packet_in: Packet
    packet_out: Packet
    disposition: str
    detail: str = ""
    ct: Conntrack | None = None
    approx: list = field(default_factory=list)
    bridged: bool = False


@dataclass
class Journey:
    """One direction of one connection through the environment."""

    hops: list = field(default_factory=list)
    end: str = ""           # delivered | refused | dropped | rejected | left | no-route | loop | ...
    end_ns: str | None = None
    end_packet: Packet | None = None
    detail: str = ""

    @property
    def approximate(self) -> bool:
        return any(h.approx for h in self.hops)


@dataclass
class Trip:
    flow: Packet
    start: str
    request: Journey
    reply: Journey | None = None
    client_sees: Packet | None = None
    second_leg: "Trip | None" = None
    findings: list = field(default_factory=list)
    listener: object = None


def _empty_ruleset(family: int):
    from analyzer.model.rules import Ruleset
    return Ruleset(family, {}, ())


class World:
    def __init__(self, env: Environment):
        self.env = env
        self.walkers: dict[str, Walker] = {}

    def walker(self, ns: str, family: int) -> Walker:
        key = f"{ns}/{family}"
        w = self.walkers.get(key)
        if w is None:
            spec = self.env.namespaces[ns]
            rs = spec.ruleset if family == 4 else spec.ruleset6
            w = self.walkers[key] = Walker(rs or _empty_ruleset(family), spec.net)
        return w

    # ------------------------------------------------------------------ L2 delivery
    def next_namespace(self, ns: str, oif: str | None, next_hop) -> tuple[str, str, object] | None:
        """Who receives a packet sent by ``ns`` out of ``oif`` to ``next_hop``:
        (namespace, its interface, the bridge segment crossed or None)."""
        seg = self.env.segment_of(ns, oif)
        if seg is None:
            return None
        candidates = list(seg.members)
        if seg.bridge_ns is not None:
            candidates.append((seg.bridge_ns, seg.bridge_iface))
        for other_ns, iface in candidates:
            if other_ns == ns and iface == oif:
                continue
            net = self.env.namespaces[other_ns].net
            if any(a.ip == next_hop for a in net.addrs.get(iface, [])):
                crossed = seg if (seg.bridge_ns is not None and other_ns != seg.bridge_ns
                                  and ns != seg.bridge_ns) else None
                return other_ns, iface, crossed
        return None

    def bridge_nf(self, seg, family: int) -> bool:
        key = "net.bridge.bridge-nf-call-iptables" if family == 4 else "net.bridge.bridge-nf-call-ip6tables"
        return self.env.namespaces[seg.bridge_ns].net.sysctl(key, 1) == 1

    def hairpin(self, seg, member: tuple[str, str]) -> bool:
        """Whether the bridge sends a frame back out of the port ``member`` it came in on
        (the port's hairpin mode; Linux default off, kubelet/CNI ``hairpinMode`` turns it on).
        ``bridge: {..., hairpin: true | [NS:IF, ...]}`` in the environment file."""
        hp = seg.hairpin
        if isinstance(hp, bool):
            return hp
        return tuple(member) in set(hp)

class Tracker:
    """Per-namespace conntrack tables built while the request travels."""

    def __init__(self):
        self.entries: dict[str, list[Conntrack]] = {}

    def add(self, ns: str, ct: Conntrack):
        if not ct.untracked:
            self.entries.setdefault(ns, []).append(ct)

    def lookup_reply(self, ns: str, p: Packet) -> Conntrack | None:
        for ct in self.entries.get(ns, []):
            if (p.proto == ct.original.proto and p.src == ct.reply_src and p.sport == ct.reply_sport
                    and p.dst == ct.reply_dst and p.dport == ct.reply_dport):
                return ct
        return None


def _martian_source(w: Walker, b: Branch, iif: str) -> bool:
    """The kernel's input route check (fib_validate_source): a packet that arrives from a link
    with a source address of this very namespace is a martian and dropped, unless accept_local."""
    if iif == "lo" or b.pkt.family != 4 or not w.ns.is_local(b.pkt.src):
        return False
    if w.ns.sysctl("net.ipv4.conf.all.accept_local", 0) or w.ns.sysctl(f"net.ipv4.conf.{iif}.accept_local", 0):
        return False
    b.disposition = "dropped"
    b.detail = (f"martian source: {b.pkt.src} is an address of this namespace, but the packet arrives "
                f"on {iif}; the kernel drops it (accept_local=0)")
    b.steps.append(Step("route", b.detail))
    return True


def _conf(w: Walker, key: str, iif: str) -> int:
    """A per-interface IPv4 sysctl as the kernel combines it: max(all, interface)."""
    return max(w.ns.sysctl(f"net.ipv4.conf.all.{key}", 0), w.ns.sysctl(f"net.ipv4.conf.{iif}.{key}", 0))


def _input_route_refuses(w: Walker, b: Branch, iif: str) -> bool:
    """The input route lookup's other refusals (ip_route_input_slow): a loopback destination
    from a real interface without route_localnet, and reverse-path filtering (rp_filter 1 strict:
    the route back to the source must leave by the interface the packet came in on; 2 loose:
    some route back must exist)."""
    if iif == "lo" or b.pkt.family != 4:
        return False
    if b.pkt.dst.is_loopback and not _conf(w, "route_localnet", iif):
        b.disposition = "dropped"
        b.detail = (f"martian destination: {b.pkt.dst} arrives on {iif}; loopback addresses are "
                    f"routed only with net.ipv4.conf.{iif}.route_localnet=1")
        b.steps.append(Step("route", b.detail))
        return True
    mode = _conf(w, "rp_filter", iif)
    if mode == 0:
        return False
    back = w.ns.route(b.pkt.src)
    if back.kind == "local" or (back.kind == "unicast" and (mode == 2 or back.oif == iif)):
        return False
    where = f"leaves by {back.oif}" if back.kind == "unicast" else "does not exist"
    b.disposition = "dropped"
    b.detail = (f"rp_filter={mode} ({'strict' if mode == 1 else 'loose'}): the packet from {b.pkt.src} "
                f"arrives on {iif} but the route back to {b.pkt.src} {where}")
    b.steps.append(Step("route", b.detail))
    return True


def walk_namespace(world: World, tracker: Tracker, ns: str, pkt: Packet, iif: str | None,
                   reply_mode: bool, bridged_via: str | None = None,
                   from_port: tuple | None = None) -> list[Branch]:
    """One namespace, one packet: PREROUTING/OUTPUT -> route -> INPUT or FORWARD -> POSTROUTING.
    ``reply_mode``: the packet belongs to a connection this namespace already tracks (looked
    up in ``tracker``); otherwise it starts a NEW connection here. ``from_port``: (namespace,
    interface) of the bridge port the frame came in on, when ``iif`` is this namespace's bridge."""
    w = world.walker(ns, pkt.family)
    ct = tracker.lookup_reply(ns, pkt) if reply_mode else None
    is_reply = ct is not None
    if ct is None:
        ct = Conntrack(replace(pkt, iif=iif), pkt.dst, pkt.dport, pkt.src, pkt.sport)
        if hasattr(w, "ct_in_use"):
            ct.in_use = w.ct_in_use
    br = Branch(replace(pkt, iif=iif, oif=None), ct, [], 1.0, [], reply=is_reply)
    if reply_mode and not is_reply:
        br.steps.append(Step("conntrack", "no entry for this packet here: treated as a new connection"))
    if bridged_via is not None:
        # br_netfilter: a bridged IP packet crosses PREROUTING, FORWARD, POSTROUTING of the bridge's
        # namespace, with conntrack, but is switched, not routed
        br.pkt = replace(br.pkt, oif=bridged_via)
        brs = w.hook([br], "PREROUTING", reply=is_reply)
        brs = w.hook(brs, "FORWARD", reply=is_reply)
        brs = w.hook(brs, "POSTROUTING", reply=is_reply)
        for b in brs:
            if b.disposition is None:
                b.disposition, b.detail = "bridged", f"switched on {bridged_via}"
            if not is_reply:
                tracker.add(ns, b.ct)
        return brs
    if iif is None:  # generated by a local process
        r = w.ns.route(br.pkt.dst)
        if r.kind == "unicast":
            br.pkt = replace(br.pkt, oif=r.oif)
            br.next_hop = r.via or br.pkt.dst
        elif r.kind == "local":  # local traffic leaves through the loopback device
            br.pkt = replace(br.pkt, oif="lo")
        brs = w.hook([br], "OUTPUT", reply=is_reply)
        out = []
        for b in brs:
            if b.disposition is None:
                kind = route_decision(w, b, local_origin=iif is None)
                if kind == "local":
                    b.pkt = replace(b.pkt, oif="lo")
            out.append(b)
        brs = w.hook(out, "POSTROUTING", reply=is_reply)
        for b in brs:
            if b.disposition is None:
                if b.pkt.oif == "lo":
                    b.disposition, b.detail = "delivered", f"delivered locally to port {b.pkt.dport}"
                else:
                    b.disposition, b.detail = "sent", f"sent out {b.pkt.oif} to {b.next_hop}"
    else:
        brs = w.hook([br], "PREROUTING", reply=is_reply)
        out = []
        for b in brs:
            if b.disposition is not None:
                out.append(b)
                continue
            if w.ns.route(b.pkt.dst).kind in ("local", "unicast") and _martian_source(w, b, iif):
                out.append(b)
                continue
            if _input_route_refuses(w, b, iif):
                out.append(b)
                continue
            kind = route_decision(w, b, local_origin=iif is None)
            bridged_dnat = False
            if kind == "forward" and from_port is not None and b.pkt.oif == iif and b.pkt.dst != pkt.dst:
                seg = world.env.segment_of(ns, iif)
                if seg is not None and seg.bridge_ns == ns and world.bridge_nf(seg, b.pkt.family):
                    # br_netfilter: the frame's destination was rewritten in PREROUTING and the new
                    # one is on the same bridge, so the frame is switched to it, not routed
                    # (br_nf_pre_routing_finish: "bridged DNAT", no ip_forward needed); the bridge
                    # never sends a frame back out of the port it came in on unless that port is
                    # in hairpin mode
                    bridged_dnat = True
                    dest = world.next_namespace(ns, iif, b.next_hop)
                    if dest is not None and (dest[0], dest[1]) == tuple(from_port) \
                            and not world.hairpin(seg, tuple(from_port)):
                        b.disposition = "dropped"
                        b.detail = (f"bridged DNAT back to the port it came in on ({from_port[0]}:{from_port[1]}): "
                                    f"{iif} drops it, hairpin mode is off on that port")
                        b.steps.append(Step("bridge", b.detail))
                        out.append(b)
                        continue
                    b.steps.append(Step("bridge", f"bridged DNAT: {b.pkt.dst} is on {iif}, so br_netfilter "
                                                  f"switches the frame to it (not routed)"))
            if kind == "local":
                for x in w.hook([b], "INPUT", reply=is_reply):
                    if x.disposition is None:
                        x.disposition, x.detail = "delivered", f"delivered locally to port {x.pkt.dport}"
                    out.append(x)
            elif kind == "forward":
                fwd_key = "net.ipv4.ip_forward" if b.pkt.family == 4 else "net.ipv6.conf.all.forwarding"
                if not bridged_dnat and w.ns.sysctl(fwd_key, 1) == 0:
                    b.disposition, b.detail = "dropped", f"{fwd_key}=0: not forwarded"
                    b.steps.append(Step("route", b.detail))
                    out.append(b)
                    continue
                for x in w.hook(w.hook([b], "FORWARD", reply=is_reply), "POSTROUTING", reply=is_reply):
                    if x.disposition is None:
                        x.disposition, x.detail = "sent", f"forwarded out {x.pkt.oif} to {x.next_hop}"
                    out.append(x)
            else:
                out.append(b)
        brs = out
    for b in brs:
        if b.disposition == "tproxy":
            b.disposition = "delivered"
        if not is_reply:
            tracker.add(ns, b.ct)
    return brs


def travel(world: World, tracker: Tracker, start_ns: str, pkt: Packet, iif: str | None,
           role: str, reply_mode: bool) -> Journey:
    """Move a packet hop by hop until it is delivered, dropped or leaves the environment.
    Where a namespace forks (statistic branches), the first outcome is followed and the others
    are noted."""
    j = Journey()
    ns, arrived, bridged_via = start_ns, iif, None
    from_port = None
    visited = set()
    for _ in range(MAX_HOPS):
        key = (ns, arrived, pkt.src, pkt.dst, pkt.sport, pkt.dport)
        if key in visited:
            j.end, j.end_ns, j.detail = "loop", ns, f"the packet comes back to {ns} unchanged: routing loop"
            return j
        visited.add(key)
        brs = walk_namespace(world, tracker, ns, pkt, arrived, reply_mode, bridged_via, from_port)
        from_port = None
        b = brs[0]
        hop = Hop(ns, role, arrived, b.steps, pkt, b.pkt, b.disposition, b.detail, b.ct, list(b.approx),
                  bridged=bridged_via is not None)
        if len(brs) > 1:
            hop.approx.append(f"{len(brs)} outcomes in {ns} (statistic/uncertain matches); following the first "
                              f"(p={b.prob:.3f})" if b.prob is not None else f"{len(brs)} outcomes; following the first")
        j.hops.append(hop)
        if b.disposition == "bridged":
            nxt = world.next_namespace(bridged_from_ns, bridged_from_oif, bridged_next_hop)
            bridged_via = None
            if nxt is None:
                j.end, j.end_ns, j.detail = "no-neighbour", ns, f"nobody answers for {bridged_next_hop}"
                return j
            ns, arrived, _ = nxt
            pkt = replace(b.pkt, iif=None, oif=None)
            continue
        if b.disposition != "sent":
            j.end, j.end_ns, j.end_packet, j.detail = b.disposition, ns, b.pkt, b.detail
            return j
        nxt = world.next_namespace(ns, b.pkt.oif, b.next_hop)
        if nxt is None:
            j.end, j.end_ns, j.end_packet = "left", ns, b.pkt
            j.detail = f"leaves the environment from {ns} via {b.pkt.oif} (to {b.next_hop})"
            return j
        nns, niface, crossed = nxt
        pkt = replace(b.pkt, iif=None, oif=None)
        if crossed is not None and world.bridge_nf(crossed, pkt.family):
            # the frame crosses the bridge's netfilter first
            bridged_from_ns, bridged_from_oif, bridged_next_hop = ns, b.pkt.oif, b.next_hop
            ns, arrived, bridged_via = crossed.bridge_ns, crossed.bridge_iface, crossed.bridge_iface
            continue
        if crossed is not None:
            hop.steps = list(hop.steps) + [Step("bridge", f"switched by {crossed.name} without netfilter "
                                                          f"(bridge-nf-call-iptables=0 in {crossed.bridge_ns})")]
        seg = world.env.segment_of(nns, niface)
        if seg is not None and seg.bridge_ns == nns and seg.bridge_iface == niface:
            from_port = (ns, b.pkt.oif)  # the bridge port the frame enters by
        ns, arrived, bridged_via = nns, niface, None
    j.end, j.detail = "loop", f"more than {MAX_HOPS} hops"
    return j


def _listener(world: World, ns: str, pkt: Packet):
    spec = world.env.namespaces[ns]
    for l in spec.listeners:
        if l.port == pkt.dport and l.proto == {6: "tcp", 17: "udp", 132: "sctp"}.get(pkt.proto, "tcp"):
            return l
    return None


def follow(world: World, start: str, flow: Packet, uid=None, gid=None, depth: int = 0) -> Trip:
    """A connection from a process in ``start`` (OUTPUT path) to ``flow.dst``: request, then reply."""
    tracker = Tracker()
    flow = replace(flow, uid=uid, gid=gid)
    req = travel(world, tracker, start, flow, None, "request", reply_mode=False)
    trip = Trip(flow, start, req)
    if req.end != "delivered":
        return trip
    end_ns, arrived = req.end_ns, req.end_packet
    spec = world.env.namespaces[end_ns]
    lst = _listener(world, end_ns, arrived)
    trip.listener = lst
    if spec.listeners and lst is None:
        req.end, req.detail = "refused", (f"nothing listens on {arrived.dport}/{'tcp' if arrived.proto == 6 else arrived.proto} "
                                          f"in {end_ns}: the kernel answers RST (connection refused)")
        return trip
    # the reply is generated by the socket that accepted the connection
    rp = Packet(arrived.family, arrived.proto, arrived.dst, arrived.src, arrived.dport, arrived.sport,
                tcp_flags=0x12 if arrived.proto == 6 else 0)
    hop_tproxy = any("TPROXY" in s.verdict for s in req.hops[-1].steps)
    if hop_tproxy:  # a transparent proxy answers as the original destination
        rp = replace(rp, src=flow.dst, sport=flow.dport)
    rep = travel(world, tracker, end_ns, rp, None, "reply", reply_mode=True)
    trip.reply = rep
    if rep.end in ("delivered",) and rep.end_ns == start:
        trip.client_sees = rep.end_packet
    if lst is not None and lst.proxy_to and depth == 0:
        trip.second_leg = _second_leg(world, end_ns, lst, arrived, req.hops[-1].packet_in)
    return trip


def _second_leg(world: World, ns: str, lst, arrived: Packet, before: Packet) -> Trip:
    """The connection a proxy opens for each client. ``proxy_to: original`` is what a sidecar
    does: the original destination (before REDIRECT/TPROXY), or 127.0.0.1:PORT when that
    destination is an address of the proxy's own namespace (inbound)."""
    import ipaddress

    net = world.env.namespaces[ns].net
    if lst.proxy_to == "original":
        dst, port = before.dst, before.dport
        if net.is_local(dst):
            dst = ipaddress.ip_address("127.0.0.1" if dst.version == 4 else "::1")
    else:
        addr, _, p = lst.proxy_to.rpartition(":")
        dst, port = ipaddress.ip_address(addr.strip("[]")), int(p)
    if dst.is_loopback:
        src = dst
    else:
        r = net.route(dst)
        src = (net.primary_address(r.oif, dst.version, dst) if r.kind == "unicast" else None) or arrived.dst
    pkt = Packet(dst.version, arrived.proto, src, dst, 50000, port)
    return follow(world, ns, pkt, uid=lst.uid, gid=lst.gid, depth=1)


# ------------------------------------------------------------------ findings
def findings(world: World, trip: Trip) -> list[Diagnostic]:
    out = []
    flow = trip.flow
    req = trip.request
    if trip.reply is not None and trip.client_sees is None and trip.reply.end in ("delivered", "sent", "left"):
        pass
    if trip.reply is not None:
        seen = trip.client_sees
        # which namespaces translated the request's destination?
        dnat_hops = [h for h in req.hops if h.ct is not None and h.ct.dnat]
        reply_ns = {h.namespace for h in trip.reply.hops if h.role == "reply"}
        reply_ns_with_ct = {h.namespace for h in trip.reply.hops
                            if any(s.verdict.startswith("conntrack reverse") for s in h.steps)}
        if seen is not None and (seen.src != flow.dst or seen.sport != flow.dport):
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
            msg = (f"client {flow.src} dialled {flow.dst}:{flow.dport} but the reply arrives from "
                   f"{seen.src}:{seen.sport}: the client's kernel has no socket for it and {rst}; "
                   f"the connect retries its SYN and times out")
            if missed:
                msg += (f". The request was translated in '{missed[0].namespace}' "
                        f"({flow.dst}:{flow.dport} -> {missed[0].packet_out.dst}:{missed[0].packet_out.dport}) "
                        f"but the reply {bypass}")
            out.append(Diagnostic("NAT001", Severity.ERROR, msg, span, _fix_hint(world, trip, missed),
                                  _line(world, span), APPROXIMATE if _approx(trip) else EXACT,
                                  tuple(related), flow.tuple_str(), "reply-bypasses-translation"))
        elif trip.reply.end not in ("delivered",) or (trip.reply.end_ns != trip.start):
            out.append(Diagnostic("NAT002", Severity.ERROR,
                                  f"the reply to {flow.tuple_str()} does not come back to the client: "
                                  f"{trip.reply.detail or trip.reply.end} (in {trip.reply.end_ns})",
                                  None, "check the return route and the filter rules on the reply path",
                                  None, APPROXIMATE if _approx(trip) else EXACT, (), flow.tuple_str(),
                                  "reply-lost"))
    elif (req.end == "dropped" and req.end_ns == trip.start and req.detail.startswith("martian source")
          and req.hops and req.hops[-1].packet_in.src == flow.src):
        # hairpin without SNAT: the translated request comes back to the client's own namespace
        # with the client's address as source; the kernel drops it before any socket sees it
        dnat_hops = [h for h in req.hops if h.ct is not None and h.ct.dnat and h.namespace != trip.start]
        if dnat_hops:
            hop = dnat_hops[-1]
            rule = _translating_rule(world, hop)
            span = rule.option_span(rule.target) if rule is not None and rule.target else None
            related = (Related("destination translated here", rule.span),) if rule is not None else ()
            msg = (f"client {flow.src} dialled {flow.dst}:{flow.dport}; '{hop.namespace}' translates it to "
                   f"{hop.packet_out.dst}:{hop.packet_out.dport}, in the client's own namespace, without "
                   f"SNAT: the request comes back with the client's own address as source and the kernel "
                   f"drops it (martian source), so no SYN+ACK ever comes; the connect retries its SYN and "
                   f"times out")
            out.append(Diagnostic("NAT001", Severity.ERROR, msg, span,
                                  _fix_hint(world, trip, [hop], hairpin=True),
                                  _line(world, span), APPROXIMATE if _approx(trip) else EXACT,
                                  related, flow.tuple_str(), "reply-bypasses-translation"))
    if req.end == "dropped" and "hairpin mode is off" in (req.detail or ""):
        hop = next((h for h in req.hops if h.ct is not None and h.ct.dnat), None)
        rule = _translating_rule(world, hop) if hop is not None else None
        span = rule.option_span(rule.target) if rule is not None and rule.target else None
        bridge = req.hops[-1].namespace
        out.append(Diagnostic(
            "NAT004", Severity.ERROR,
            f"client {flow.src} dialled {flow.dst}:{flow.dport}; the translated request must leave "
            f"'{bridge}''s bridge by the port it came in on, and {req.detail.split(': ', 1)[-1]}: the "
            f"SYN is dropped, the connect times out",
            span, f"turn on hairpin mode for that bridge port (kubelet/CNI hairpinMode, "
                  f"'bridge link set dev PORT hairpin on'; 'hairpin: true' in the environment file)",
            _line(world, span), APPROXIMATE if _approx(trip) else EXACT,
            (Related("destination translated here", rule.span),) if rule is not None else (),
            flow.tuple_str(), "bridge-hairpin-off"))
    leg = trip.second_leg
    if leg is not None and trip.reply is not None and trip.client_sees is not None:
        fail = None
        if leg.request.end == "delivered" and leg.listener is not None and leg.listener is trip.listener:
            fail = (f"the proxy's own connection to {leg.flow.dst}:{leg.flow.dport} is redirected back into "
                    f"the proxy (port {trip.listener.port}): a loop, the owner exemption "
                    f"(-m owner --uid-owner {trip.listener.uid}) is missing or does not match")
        elif leg.request.end != "delivered":
            fail = f"the proxy's connection to {leg.flow.dst}:{leg.flow.dport} fails: {leg.request.detail or leg.request.end}"
        elif leg.reply is None or leg.client_sees is None:
            fail = f"the proxy's connection to {leg.flow.dst}:{leg.flow.dport} gets no usable reply"
        if fail:
            red = next((h for h in trip.request.hops if h.namespace == trip.request.end_ns), None)
            rule = _translating_rule(world, red) if red is not None else None
            span = rule.option_span(rule.target) if rule is not None else None
            related = []
            loop_hop = next((h for h in leg.request.hops if h.namespace == leg.request.end_ns), None)
            loop_rule = _translating_rule(world, loop_hop) if loop_hop is not None else None
            if loop_rule is not None:
                related.append(Related("the proxy's own connection is redirected here", loop_rule.span))
            out.append(Diagnostic(
                "NAT003", Severity.ERROR,
                f"split connection: {flow.tuple_str()} ends at the local proxy on port {trip.listener.port} "
                f"in '{trip.request.end_ns}', so the client's handshake succeeds; but {fail}. The proxy "
                f"then resets the client's connection right after the first data",
                span, (f"exempt the proxy's own traffic from the outbound REDIRECT: "
                       f"'-A ISTIO_OUTPUT -m owner --uid-owner {trip.listener.uid} -j RETURN' before the redirect"
                       if "redirected back into the proxy" in fail else
                       f"start the application on {leg.flow.dst}:{leg.flow.dport} (or point the proxy at the "
                       f"port it really listens on)"),
                _line(world, span), APPROXIMATE if _approx(trip) or _approx(leg) else EXACT, tuple(related),
                flow.tuple_str(),
                "split-connection-second-leg-fails"))
    return out


def _approx(trip: Trip) -> bool:
    return trip.request.approximate or (trip.reply is not None and trip.reply.approximate)


def _translating_rule(world: World, hop: Hop):
    for s in hop.steps:
        if s.verdict.startswith(("DNAT", "REDIRECT", "NETMAP")) and s.line:
            spec = world.env.namespaces[hop.namespace]
            rs = spec.ruleset if hop.packet_in.family == 4 else spec.ruleset6
            for r in rs.rules():
                if r.span.line == s.line and r.span.path == s.path:
                    return r
    return None


def _bypass_point(trip: Trip, ns: str | None) -> str:
    hops = trip.reply.hops
    if not hops:
        return "never reaches it"
    first = hops[0]
    path = " -> ".join(dict.fromkeys(h.namespace for h in hops))
    return f"goes {path} and never crosses '{ns}''s conntrack entry, so it is not reverse-translated"


def _fix_hint(world: World, trip: Trip, missed, hairpin: bool = False) -> str:
    if not missed:
        return "make the reply return through the namespace that translated the request"
    ns = missed[0].namespace
    out_if = missed[0].packet_out.oif
    rule = _translating_rule(world, missed[0])
    if rule is not None and rule.chain.startswith("KUBE-SEP-"):
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


def _line(world: World, span):
    if span is None:
        return None
    try:
        with open(span.path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                if i == span.line:
                    return line.rstrip("\n")
    except OSError:
        return None
    return None


# ------------------------------------------------------------------ rendering
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


def _pkt_json(p: Packet | None):
    if p is None:
        return None
    return {"proto": p.proto, "src": str(p.src), "sport": p.sport, "dst": str(p.dst), "dport": p.dport}


def _journey_json(j: Journey | None):
    if j is None:
        return None
    return {
        "end": j.end, "end_namespace": j.end_ns, "detail": j.detail,
        "hops": [{
            "namespace": h.namespace, "arrived_on": h.arrived_on, "bridged": h.bridged,
            "packet_in": _pkt_json(h.packet_in), "packet_out": _pkt_json(h.packet_out),
            "disposition": h.disposition, "detail": h.detail, "approximate": h.approx,
            "steps": [{"where": s.where, "verdict": s.verdict, "line": s.line, "path": s.path,
                       "packet": s.packet, "note": s.note} for s in h.steps],
            "conntrack": None if h.ct is None or h.ct.untracked or not getattr(h.ct, "in_use", True) else {
                "original": _pkt_json(h.ct.original),
                "reply": {"src": str(h.ct.reply_src), "sport": h.ct.reply_sport,
                          "dst": str(h.ct.reply_dst), "dport": h.ct.reply_dport},
                "dnat": h.ct.dnat, "snat": h.ct.snat},
        } for h in j.hops],
    }


def trip_json(trip: Trip, diags) -> dict:
    from analyzer.report import SCHEMA_VERSION
    from analyzer.report.diagnostics import to_dict

    doc = {
        "schema_version": SCHEMA_VERSION, "flow": _pkt_json(trip.flow), "from": trip.start,
        "request": _journey_json(trip.request), "reply": _journey_json(trip.reply),
        "client_sees": _pkt_json(trip.client_sees),
        "matches_dialled": None if trip.client_sees is None else (
            trip.client_sees.src == trip.flow.dst and trip.client_sees.sport == trip.flow.dport),
        "findings": [to_dict(d) for d in diags],
    }
    if trip.second_leg is not None:
        doc["second_leg"] = trip_json(trip.second_leg, [])
        doc["second_leg"]["listener"] = {"port": trip.listener.port, "uid": trip.listener.uid,
                                         "proxy_to": trip.listener.proxy_to}
    return doc
