"""Netfilter layer: the kernel's path of a packet through one namespace, as data.

Three paths, each an ordered tuple of named stages (``ARRIVE``, ``LOCAL_OUT``, ``BRIDGED``), each
stage naming the kernel function it models; :func:`run` interprets them. What each hook runs
inside (raw, conntrack, mangle, nat, filter, security in priority order) is ``stages.py``.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable

from analyzer.model.packet import Packet, with_ifaces
from analyzer.netfilter.trace import Bridge, Conntrack as CT, Kind, Route, Step, bridge_step
from analyzer.netfilter.walk import Branch, Conntrack, Walker, route_decision, route_step

ELIXIR = "https://elixir.bootlin.com/linux/v6.6/C/ident/"


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of a path: ``run(ctx, branches) -> branches``, order-preserving (each branch is
    replaced by its outcomes in place); a branch whose ``disposition`` is set has ended and is
    passed on untouched."""

    name: str
    kernel: str          # the kernel function it models (an identifier on elixir.bootlin.com)
    run: Callable
    doc: str = ""
    paths: dict | None = None   # a choice: the paths a branch may continue on, by name

    @property
    def source(self) -> str:
        return ELIXIR + self.kernel


@dataclass(slots=True)
class Ctx:
    """What the stages of one namespace walk read: the namespace's walker, the packet as it
    arrived, how it arrived, and the L2 facts of the environment (``links``: an object with
    ``segment_of``, ``bridge_nf``, ``next_namespace``, ``hairpin``; crosshost.World)."""

    w: Walker
    links: object
    ns: str
    pkt: Packet          # the packet as it arrived (before any translation here)
    iif: str | None
    reply: bool          # the packet belongs to a connection this namespace tracks
    bridged_via: str | None = None
    from_port: tuple | None = None


# ---------------------------------------------------------------- stage builders

def hook(name: str, kernel: str, doc: str = "") -> Stage:
    """The netfilter hook ``name``: every table registered there, in the backend's order."""
    def run(ctx: Ctx, brs: list) -> list:
        return ctx.w.hook(brs, name, reply=ctx.reply)
    return Stage(name, kernel, run, doc)


def each(name: str, kernel: str, fn: Callable, doc: str = "") -> Stage:
    """``fn(ctx, branch)`` on every branch still travelling (it may end it: disposition set)."""
    def run(ctx: Ctx, brs: list) -> list:
        for b in brs:
            if b.disposition is None:
                fn(ctx, b)
        return brs
    return Stage(name, kernel, run, doc)


def each_routed(name: str, kernel: str, fn: Callable, doc: str = "") -> Stage:
    """`each`, also on a branch TPROXY assigned to a local socket in PREROUTING: the input route
    still runs for it (ip_rcv_finish), and refuses what it refuses for any packet."""
    def run(ctx: Ctx, brs: list) -> list:
        for b in brs:
            if b.disposition is None or b.disposition == "tproxy":
                fn(ctx, b)
        return brs
    return Stage(name, kernel, run, doc)


def choose(name: str, kernel: str, decide: Callable, paths: dict, doc: str = "") -> Stage:
    """``decide(ctx, branch)`` names the path each travelling branch continues on (None: it
    ended, or it goes on with the stages after this one)."""
    def run(ctx: Ctx, brs: list) -> list:
        out = []
        for b in brs:
            key = decide(ctx, b) if b.disposition is None else None
            if key is None:
                out.append(b)
            else:
                out.extend(walk_path(paths[key], ctx, [b]))
        return out
    return Stage(name, kernel, run, doc, paths)


def walk_path(path: tuple, ctx: Ctx, brs: list) -> list:
    """Run the stages of ``path`` in order."""
    for stage in path:
        brs = stage.run(ctx, brs)
    return brs


# ---------------------------------------------------------------- the stages' kernel facts

def _conf(w: Walker, key: str, iif: str) -> int:
    """A per-interface IPv4 sysctl as the kernel combines it: max(all, interface)."""
    return max(w.ns.sysctl(f"net.ipv4.conf.all.{key}", 0), w.ns.sysctl(f"net.ipv4.conf.{iif}.{key}", 0))


# ipv4_is_zeronet is "== 0.0.0.0" since Linux 5.3 ("ipv4: allow 0.0.0.0/8 as a valid address
# range"); checked here on 6.x: a packet from 0.0.0.5 is forwarded (tests/kernel/test_martians_kernel.py)
_ANY = ipaddress.IPv4Address("0.0.0.0")
_LBCAST = ipaddress.IPv4Address("255.255.255.255")


def _drop(b: Branch, fact: Route, detail: str, disposition: str = "dropped") -> None:
    b.disposition, b.detail = disposition, detail
    b.steps.append(route_step(b.pkt, b.pkt, fact, detail))


#: IPv6 multicast destinations of scope 0 (reserved) and 1 (interface-local): ffX0::/16, ffX1::/16
_MC6_DROPPED_SCOPES = tuple(ipaddress.IPv6Network(f"ff{f:x}{s}::/16") for s in "01" for f in range(16))


def ip6_header_checks(ctx: Ctx, b: Branch) -> None:
    """ip6_rcv_core's drops, before any netfilter hook sees the packet (RFC 4291): a loopback
    (::1) source or destination arriving on a real interface, a multicast destination of scope
    1 (interface-local) or 0 (reserved), and a multicast source. IPv6 only."""
    if b.pkt.family != 6 or ctx.iif == "lo":
        return
    src, dst = b.pkt.src, b.pkt.dst
    why = fact = None
    if src.is_loopback:
        fact, why = Route.MARTIAN_SOURCE, f"the loopback source {src} arrives on {ctx.iif}"
    elif dst.is_loopback:
        fact, why = Route.MARTIAN_DESTINATION, f"the loopback destination {dst} arrives on {ctx.iif}"
    elif dst.is_multicast and any(dst in n for n in _MC6_DROPPED_SCOPES):
        fact, why = Route.MARTIAN_DESTINATION, f"{dst} is a multicast destination of scope 0 or 1 (interface-local)"
    elif src.is_multicast:
        fact, why = Route.MARTIAN_SOURCE, f"{src} is a multicast address, never a sender's"
    if why is not None:
        _drop(b, fact, f"{why}: ip6_rcv_core drops it before any hook (RFC 4291)")


def _never_routed_on(b: Branch, multicast: bool) -> None:
    """A multicast or limited-broadcast destination: ip_route_input_rcu (IPv6: ip6_mc_input)
    takes a multicast one aside (dropped unless a local socket joined the group or multicast
    routing is on), the limited broadcast goes to brd_input (local delivery as a broadcast);
    neither is routed on as unicast, and TCP takes neither (tcp_v4_rcv / tcp_v4_conn_request
    drop broadcast and multicast)."""
    what = "a multicast" if multicast else "the limited broadcast"
    _drop(b, Route.MARTIAN_DESTINATION, f"{b.pkt.dst} is {what} destination: never routed on"
          + ("; TCP drops it" if b.pkt.proto == 6 else ""))
    if not multicast:
        b.approx.append("a broadcast is delivered to this host (brd_input): its INPUT chains are "
                        "not walked here")
    elif b.pkt.proto != 6:
        b.approx.append("a multicast destination: delivery to a joined group and multicast routing "
                        "are not modelled (taken as dropped)")


def early_martians(ctx: Ctx, b: Branch) -> None:
    """ip_route_input_slow's checks before any route lookup ("the most weird martians, which can
    be not detected by fib_lookup"), in its order: a multicast or limited-broadcast source; a
    multicast or limited-broadcast destination, or both addresses 0.0.0.0 (`_never_routed_on`);
    a source 0.0.0.0 and then a destination 0.0.0.0 (the rest of 0.0.0.0/8 is routed since
    Linux 5.3); a loopback destination, else a loopback source, without route_localnet on the
    input interface. IPv6: a multicast destination (as IPv4's); its other checks come before
    PREROUTING (`ip6_header_checks`)."""
    w, iif = ctx.w, ctx.iif
    if iif == "lo":
        return
    src, dst = b.pkt.src, b.pkt.dst
    if b.pkt.family == 6:
        if dst.is_multicast:
            _never_routed_on(b, True)
        return
    if src.is_multicast or src == _LBCAST:
        return _drop(b, Route.MARTIAN_SOURCE, f"martian source: {src} is a {'multicast' if src != _LBCAST else 'broadcast'} "
                     f"address, never a sender's; the kernel drops it")
    multicast = dst.is_multicast
    if multicast or dst == _LBCAST or (src == _ANY and dst == _ANY):
        return _never_routed_on(b, multicast)
    if src == _ANY:
        return _drop(b, Route.MARTIAN_SOURCE, "martian source: 0.0.0.0 is accepted only towards the "
                     "limited broadcast; the kernel drops it")
    if dst == _ANY:
        return _drop(b, Route.MARTIAN_DESTINATION, "martian destination: 0.0.0.0; the kernel drops it")
    if dst.is_loopback:
        if not _conf(w, "route_localnet", iif):
            _drop(b, Route.MARTIAN_DESTINATION, f"martian destination: {dst} arrives on {iif}; loopback addresses "
                  f"are routed only with net.ipv4.conf.{iif}.route_localnet=1")
    elif src.is_loopback and not _conf(w, "route_localnet", iif):
        _drop(b, Route.MARTIAN_SOURCE, f"martian source: {src} is a loopback address but arrives on {iif}; "
              f"accepted only with net.ipv4.conf.{iif}.route_localnet=1")


def output_refusals(ctx: Ctx, b: Branch) -> None:
    """What the output route of a local socket refuses with EINVAL, so that nothing is sent: a
    multicast or limited-broadcast source (ip_route_output_key_hash_rcu) and a loopback source on
    a route leaving by a device other than lo without its route_localnet (__mkroute_output).
    IPv4 only."""
    if b.pkt.family != 4:
        return
    src, oif = b.pkt.src, b.pkt.oif
    why = None
    if src.is_multicast or src == _LBCAST:
        why = f"{src} as a source (a multicast or broadcast address)"
    elif oif is not None and oif != "lo" and src.is_loopback and not _conf(ctx.w, "route_localnet", oif):
        why = (f"the loopback source {src} on a route out of {oif} (only with "
               f"net.ipv4.conf.{oif}.route_localnet=1)")
    if why is not None:
        _drop(b, Route.OUTPUT_REFUSED, f"the output route refuses {why}: the socket call (connect, "
              f"sendmsg) fails with EINVAL", "not-sent")


def martian_source(ctx: Ctx, b: Branch) -> None:
    """fib_validate_source: a packet that arrives from a link with a source address of this very
    namespace is a martian and dropped, unless accept_local. Asked only of a packet the input
    route would deliver or forward."""
    w, iif = ctx.w, ctx.iif
    # the route first, then the source: the order the recorder of an open flow notes them in
    if w.ns.route(b.pkt.dst).kind not in ("local", "unicast"):
        return
    if iif == "lo" or b.pkt.family != 4 or not w.ns.is_local(b.pkt.src):
        return
    if w.ns.sysctl("net.ipv4.conf.all.accept_local", 0) or w.ns.sysctl(f"net.ipv4.conf.{iif}.accept_local", 0):
        return
    b.disposition = "dropped"
    b.detail = (f"martian source: {b.pkt.src} is an address of this namespace, but the packet arrives "
                f"on {iif}; the kernel drops it (accept_local=0)")
    b.steps.append(route_step(b.pkt, b.pkt, Route.MARTIAN_SOURCE, b.detail))


def reverse_path(ctx: Ctx, b: Branch) -> None:
    """Reverse-path filtering (fib_validate_source; rp_filter 1 strict: the route back to the
    source must leave by the interface the packet came in on; 2 loose: some route back must
    exist)."""
    w, iif = ctx.w, ctx.iif
    if iif == "lo" or b.pkt.family != 4:
        return
    mode = _conf(w, "rp_filter", iif)
    if mode == 0:
        return
    back = w.ns.route(b.pkt.src)
    if back.kind == "local" or (back.kind == "unicast" and (mode == 2 or back.oif == iif)):
        return
    where = f"leaves by {back.oif}" if back.kind == "unicast" else "does not exist"
    b.disposition = "dropped"
    b.detail = (f"rp_filter={mode} ({'strict' if mode == 1 else 'loose'}): the packet from {b.pkt.src} "
                f"arrives on {iif} but the route back to {b.pkt.src} {where}")
    b.steps.append(route_step(b.pkt, b.pkt, Route.RP_FILTER, b.detail))


def input_route(ctx: Ctx, b: Branch) -> str | None:
    """The input routing decision (walk.route_decision): 'local', 'forward', or
    'bridged-dnat' when br_netfilter switches a frame whose destination PREROUTING rewrote to
    another host on the bridge it came in on (br_nf_pre_routing_finish: no ip_forward needed)."""
    kind = route_decision(ctx.w, b, local_origin=False)
    if kind == "local":
        return "local"
    if kind != "forward":
        return None
    if ctx.from_port is not None and b.pkt.oif == ctx.iif and b.pkt.dst != ctx.pkt.dst:
        seg = ctx.links.segment_of(ctx.ns, ctx.iif)
        if seg is not None and seg.bridge_ns == ctx.ns and ctx.links.bridge_nf(seg, b.pkt.family):
            return "bridged-dnat"
    return "forward"


def bridge_port(ctx: Ctx, b: Branch) -> None:
    """br_forward's should_deliver: the bridge never sends a frame back out of the port it came
    in on unless that port is in hairpin mode."""
    from_port, iif = tuple(ctx.from_port), ctx.iif
    dest = ctx.links.next_namespace(ctx.ns, iif, b.next_hop)
    seg = ctx.links.segment_of(ctx.ns, iif)
    if dest is not None and (dest[0], dest[1]) == from_port and not ctx.links.hairpin(seg, from_port):
        b.disposition = "dropped"
        b.detail = (f"bridged DNAT back to the port it came in on ({from_port[0]}:{from_port[1]}): "
                    f"{iif} drops it, hairpin mode is off on that port")
        b.steps.append(bridge_step(b.pkt, Bridge.HAIRPIN_OFF, b.detail, (iif, from_port)))
        return
    b.steps.append(bridge_step(b.pkt, Bridge.BRIDGED_DNAT, f"bridged DNAT: {b.pkt.dst} is on {iif}, so br_netfilter "
                                                           f"switches the frame to it (not routed)"))


def ip_forward(ctx: Ctx, b: Branch) -> None:
    """Forwarding switched off: IPv4's input route refuses to forward (ip_route_input_slow,
    IN_DEV_FORWARD), IPv6's ip6_forward drops (devconf forwarding)."""
    key = "net.ipv4.ip_forward" if b.pkt.family == 4 else "net.ipv6.conf.all.forwarding"
    if ctx.w.ns.sysctl(key, 1) == 0:
        b.disposition, b.detail = "dropped", f"{key}=0: not forwarded"
        b.steps.append(route_step(b.pkt, b.pkt, Route.IP_FORWARD_OFF, b.detail))


def ip6_forward_source(ctx: Ctx, b: Branch) -> None:
    """ip6_forward's source check before the FORWARD hook ("security critical"), for a packet
    leaving by another interface than it came in on: the unspecified source (::) is dropped, a
    link-local source is refused with ICMPv6 destination unreachable (beyond scope). (Multicast
    and loopback sources never got this far: ip6_header_checks.) IPv6 only."""
    if b.pkt.family != 6 or b.pkt.oif == ctx.iif:
        return
    src = b.pkt.src
    if src.is_unspecified:
        _drop(b, Route.MARTIAN_SOURCE, "the unspecified source :: is never forwarded (ip6_forward)")
    elif src.is_link_local:
        _drop(b, Route.MARTIAN_SOURCE, f"the link-local source {src} is never forwarded off its link: "
              f"ip6_forward answers ICMPv6 destination unreachable", "rejected")


def deliver(ctx: Ctx, b: Branch) -> None:
    b.disposition, b.detail = "delivered", f"delivered locally to port {b.pkt.dport}"


def forwarded(ctx: Ctx, b: Branch) -> None:
    b.disposition, b.detail = "forwarded", f"forwarded out {b.pkt.oif} to {b.next_hop}"


def sent(ctx: Ctx, b: Branch) -> None:
    b.disposition, b.detail = "sent", f"sent out {b.pkt.oif} to {b.next_hop}"


def switched(ctx: Ctx, b: Branch) -> None:
    b.disposition, b.detail = "bridged", f"switched on {ctx.bridged_via}"


def output_route(ctx: Ctx, b: Branch) -> None:
    """The socket's route (ip_route_output_key): the output interface and next hop; a local
    destination leaves through the loopback device."""
    r = ctx.w.ns.route(b.pkt.dst)
    if r.kind == "unicast":
        b.pkt = with_ifaces(b.pkt, b.pkt.iif, r.oif)
        b.next_hop = r.via or b.pkt.dst
    elif r.kind == "local":
        b.pkt = with_ifaces(b.pkt, b.pkt.iif, "lo")


def reroute(ctx: Ctx, b: Branch) -> None:
    """The routing decision after OUTPUT (ip_route_me_harder re-routes when nat or mangle
    changed the destination or mark): shown as a step, or the end (no route, unreachable...)."""
    if route_decision(ctx.w, b, local_origin=True) == "local":
        b.pkt = with_ifaces(b.pkt, b.pkt.iif, "lo")


def on_loopback(ctx: Ctx, b: Branch) -> str:
    return "loopback" if b.pkt.oif == "lo" else "out"


def loopback(ctx: Ctx, b: Branch) -> None:
    """A packet to a local address leaves on lo and comes back in (loopback_xmit -> netif_rx):
    PREROUTING and INPUT see it with -i lo; its conntrack entry was confirmed on the way out
    (nf_confirm at POSTROUTING), so the nat chains do not run again."""
    b.ct.confirmed = True
    before = b.pkt
    b.pkt = with_ifaces(b.pkt, "lo", None)
    b.steps.append(route_step(before, b.pkt, Route.LOOPBACK, "loopback: back in on lo"))


def bridge_out(ctx: Ctx, b: Branch) -> None:
    """The bridge port the frame is switched to (br_handle_frame -> br_forward)."""
    b.pkt = with_ifaces(b.pkt, b.pkt.iif, ctx.bridged_via)


def _tproxy_delivers(ctx: Ctx, brs: list) -> list:
    for b in brs:
        if b.disposition == "tproxy":
            b.disposition = "delivered"
    return brs


TPROXY = Stage("tproxy", "tproxy_tg4", _tproxy_delivers,
               "a packet TPROXY assigned to a local socket in PREROUTING is delivered to it")


# ---------------------------------------------------------------- the three paths

#: ip_local_deliver: to a local socket
LOCAL_IN = (
    hook("INPUT", "ip_local_deliver", "NF_INET_LOCAL_IN"),
    each("deliver", "ip_local_deliver_finish", deliver),
)

#: ip_forward: routed to another host
FORWARD = (
    each("ip_forward", "ip_route_input_slow", ip_forward, "net.ipv4.ip_forward / net.ipv6.conf.all.forwarding"),
    each("IPv6 forwarding source", "ip6_forward", ip6_forward_source, "::, link-local"),
    hook("FORWARD", "ip_forward", "NF_INET_FORWARD"),
    hook("POSTROUTING", "ip_output", "NF_INET_POST_ROUTING"),
    each("send", "ip_finish_output2", forwarded, "to the next hop's neighbour entry"),
)

#: br_nf_pre_routing_finish: DNAT to a host on the bridge the frame came in on
BRIDGED_DNAT = (
    each("bridge port", "should_deliver", bridge_port, "no hairpin: not back out of the port it came in on"),
    hook("FORWARD", "br_nf_forward_ip", "NF_INET_FORWARD"),
    hook("POSTROUTING", "br_nf_post_routing", "NF_INET_POST_ROUTING"),
    each("send", "br_forward", forwarded),
)

#: a packet arriving on an interface of the namespace
ARRIVE = (
    each("IPv6 header checks", "ip6_rcv_core", ip6_header_checks, "loopback, multicast source, scope 0/1 multicast"),
    hook("PREROUTING", "ip_rcv", "NF_INET_PRE_ROUTING"),
    each_routed("early martians", "ip_route_input_slow", early_martians, "multicast, broadcast, 0.0.0.0, loopback; route_localnet"),
    each("martian source", "fib_validate_source", martian_source, "accept_local"),
    each("reverse path filter", "fib_validate_source", reverse_path, "rp_filter"),
    choose("routing decision", "ip_route_input_noref", input_route,
           {"local": LOCAL_IN, "forward": FORWARD, "bridged-dnat": BRIDGED_DNAT}),
    TPROXY,
)

#: what follows the PREROUTING hook on ARRIVE (where a walk of the hook over a set of packets
#: hands its packets back to the walk of one packet)
AFTER_PREROUTING = ARRIVE[[s.name for s in ARRIVE].index("PREROUTING") + 1:]

#: a packet back in on lo after a local process sent it to a local address
LOOPBACK = (
    each("loopback", "loopback_xmit", loopback),
    hook("PREROUTING", "ip_rcv", "NF_INET_PRE_ROUTING"),
    hook("INPUT", "ip_local_deliver", "NF_INET_LOCAL_IN"),
    each("deliver", "ip_local_deliver_finish", deliver),
)

#: a packet a local process sends
LOCAL_OUT = (
    each("output route", "ip_route_output_key", output_route),
    each("output route refusals", "__mkroute_output", output_refusals, "EINVAL: a multicast, broadcast or loopback source; route_localnet"),
    hook("OUTPUT", "__ip_local_out", "NF_INET_LOCAL_OUT"),
    each("reroute", "ip_route_me_harder", reroute),
    hook("POSTROUTING", "ip_output", "NF_INET_POST_ROUTING"),
    choose("loopback?", "ip_finish_output2", on_loopback,
           {"loopback": LOOPBACK, "out": (each("send", "ip_finish_output2", sent),)}),
    TPROXY,
)

#: an IP frame switched by this namespace's bridge, with br_netfilter (bridge-nf-call-iptables=1):
#: the ip(6)tables hooks run, with conntrack, but the frame is switched, not routed
BRIDGED = (
    each("bridge port", "br_handle_frame", bridge_out),
    hook("PREROUTING", "br_nf_pre_routing", "NF_INET_PRE_ROUTING"),
    hook("FORWARD", "br_nf_forward_ip", "NF_INET_FORWARD"),
    hook("POSTROUTING", "br_nf_post_routing", "NF_INET_POST_ROUTING"),
    each("switch", "br_forward", switched),
)

PATHS = {"arrive": ARRIVE, "local out": LOCAL_OUT, "bridged": BRIDGED}


def _ifaces(p: Packet, iif, oif) -> Packet:
    """``p`` with these interfaces (the same object when it has them: packets are frozen).

    >>> from dataclasses import replace
    >>> p = Packet(4, 6, 1, 2, 3, 4, "eth0", None, 7)
    >>> _ifaces(p, "eth0", None) is p, _ifaces(p, None, "lo") == replace(p, iif=None, oif="lo")
    (True, True)
    """
    return p if p.iif == iif and p.oif == oif else with_ifaces(p, iif, oif)


def run(w: Walker, links, ns: str, pkt: Packet, iif: str | None, ct: Conntrack | None,
        reply_mode: bool = False, bridged_via: str | None = None, from_port: tuple | None = None,
        local_origin: bool | None = None, resume: Branch | None = None) -> list[Branch]:
    """Every outcome of ``pkt`` in one namespace: arriving on ``iif`` (``ARRIVE``), sent by a
    local process (``iif`` None, or ``local_origin``: ``LOCAL_OUT``), or switched by its bridge
    ``bridged_via`` (``BRIDGED``). ``ct``: the conntrack entry the packet belongs to (None: a new
    connection; ``reply_mode`` says one was looked for). ``from_port``: (namespace, interface) of
    the bridge port the frame came in on, when ``iif`` is this namespace's bridge. A pure
    function of its arguments (crosshost.World memoizes it). ``resume``: a branch that arrived
    on ``iif`` and left the PREROUTING hook as given (its packet and conntrack entry): the walk
    goes on from there (`AFTER_PREROUTING`; symbolic.py's fate exploration)."""
    if resume is not None:
        return walk_path(AFTER_PREROUTING, Ctx(w, links, ns, resume.ct.original, iif, False), [resume])
    is_reply = ct is not None
    if ct is not None:
        ct = ct.copy()  # a reply may change the entry's mark: not the caller's copy
    else:
        arrived = _ifaces(pkt, iif, None)
        ct = Conntrack(arrived if pkt.oif is None else with_ifaces(pkt, iif, pkt.oif), pkt.dst, pkt.dport, pkt.src, pkt.sport)
        if hasattr(w, "ct_in_use"):
            ct.in_use = w.ct_in_use
    br = Branch(_ifaces(pkt, iif, None), ct, [], 1.0, [], reply=is_reply)
    if reply_mode and not is_reply:
        br.steps.append(Step(Kind.CONNTRACK, None, br.pkt, br.pkt, fact=CT.MISSING,
                             text="no entry for this packet here: treated as a new connection"))
    if bridged_via is not None:
        path = BRIDGED
    elif iif is None if local_origin is None else local_origin:
        path = LOCAL_OUT
    else:
        path = ARRIVE
    return walk_path(path, Ctx(w, links, ns, pkt, iif, is_reply, bridged_via, from_port), [br])


#: the paths' names in the docs, in the order a reader meets them
NAMES = (("ARRIVE", "a packet arriving on an interface"),
         ("LOCAL_IN", "to a local socket"),
         ("FORWARD", "routed to another host"),
         ("BRIDGED_DNAT", "destination rewritten to a host on the bridge the frame came in on"),
         ("LOCAL_OUT", "a packet a local process sends"),
         ("LOOPBACK", "to a local address: out on lo and back in"),
         ("BRIDGED", "an IP frame switched by this namespace's bridge, with br_netfilter"))


def markdown() -> str:
    """The paths as a markdown list, one stage a line, each linked to the kernel function it
    models (docs/design.md holds this text; tests/test_pipeline.py keeps the two equal)."""
    names = {id(globals()[n]): n for n, _ in NAMES}
    out = []
    for name, what in NAMES:
        out.append(f"- `{name}` ({what}):")
        for i, s in enumerate(globals()[name], 1):
            line = f"  {i}. {s.name}: [`{s.kernel}`]({s.source})"
            if s.doc:
                line += f" ({s.doc})"
            if s.paths:
                line += "; then " + ", ".join(
                    f"{k}: `{names[id(p)]}`" if id(p) in names else f"{k}: " + ", ".join(x.name for x in p)
                    for k, p in s.paths.items())
            out.append(line)
    return "\n".join(out) + "\n"
