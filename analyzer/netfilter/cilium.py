"""Netfilter layer, Cilium's side: where Cilium's BPF datapath translates a connection to a
service and where it reverse-translates the replies, as data with its upstream sources, and the
stage of the environment walk that applies it (crosshost.travel_all calls :func:`stage`).

Every modelled fact cites cilium/cilium (files read at the commits named) or an issue, and the
versions it holds for. What a dump cannot show is a setting of the namespace's ``cilium:`` key
(docs/cilium.md), never a guess.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from analyzer.model.env import CiliumNode  # noqa: F401 (re-exported)
from analyzer.netfilter.trace import Cilium, Step, cilium_step
from analyzer.netfilter.walk import Conntrack, Packet



@dataclass(frozen=True, slots=True)
class Fact:
    """One thing Cilium's datapath does, where it is in the source, and since when."""

    name: str
    what: str
    source: str
    versions: str


# Translation and reverse-translation points, in the order a packet meets them.
FACTS = {
    "socket-lb": Fact(
        "socket LB at connect()",
        "cgroup connect4/sendmsg4 hooks rewrite the destination of a socket to a service frontend "
        "to a backend before any packet exists; recvmsg4/getpeername4 report the frontend back "
        "(reverse translation in the socket layer, not on the wire)",
        "bpf/bpf_sock.c sock4_connect -> __sock4_xlate_fwd, __sock4_xlate_rev (commit 00c22b1c)",
        "'host-reachable services' in 1.7-era status output, 'Socket LB' in the 1.13+ output of the corpus"),
    "socket-lb-externalip": Fact(
        "socket LB skips foreign ExternalIPs",
        "an ExternalIP frontend is translated at connect() only when the address belongs to this "
        "host (ipcache identity HOST), 'so that a k8s service cannot easily MITM a public IP'",
        "bpf/bpf_sock.c sock4_skip_xlate (commit 00c22b1c)", "as read at that commit (2020); other versions not checked"),
    "socket-lb-hostns-only": Fact(
        "socket LB for the host namespace only",
        "with 'Socket LB Coverage: Hostns-only' pods' sockets are not translated at connect(); "
        "their packets are translated per packet by bpf_lxc",
        "bpf/bpf_sock.c ctx_in_hostns (commit 00c22b1c); cilium status 'Socket LB Coverage'",
        "'Socket LB Coverage' seen in the 1.15 status output of the corpus"),
    "per-packet-lb": Fact(
        "per-packet LB at the pod's interface",
        "bpf_lxc (from-container, tc on the pod's host-side veth) looks the destination up in the "
        "service map and DNATs it to a backend when the socket layer did not; the CT entry keeps "
        "the rev-NAT index",
        "bpf/bpf_lxc.c __per_packet_lb_svc_xlate_4 / handle_ipv4_from_lxc; bpf/lib/lb.h lb4_local "
        "(commit 00025c98)", "east-west LB of every version; ENABLE_PER_PACKET_LB in the source read"),
    "revnat-to-container": Fact(
        "reverse translation into the client pod",
        "a reply to a connection bpf_lxc translated is reverse-translated (lb4_rev_nat with the CT "
        "entry's rev-NAT index) before it enters the client pod",
        "bpf/bpf_lxc.c (CT_REPLY handling of the client endpoint), bpf/lib/lb.h lb4_rev_nat "
        "(commits 00025c98, 0040d667)", "all versions"),
    "local-delivery": Fact(
        "local delivery by BPF redirect",
        "a packet from a pod to another endpoint of the same node is redirected by bpf_lxc straight "
        "to the destination's veth (ipv4_local_delivery): the host's netfilter (iptables, "
        "conntrack) never sees it",
        "bpf/bpf_lxc.c handle_ipv4_from_lxc -> lookup_ip4_endpoint -> ipv4_local_delivery "
        "(commit 00025c98); cilium PR #14675 (the same bypass on the tunnel path)",
        "all versions unless endpoint routes are on (--enable-endpoint-routes)"),
    "nodeport": Fact(
        "NodePort/ExternalIP/LoadBalancer LB at the device",
        "bpf_host on the node's devices (from-netdev) translates traffic from outside to a "
        "backend; to a remote backend it also SNATs to the node's address (mode SNAT) or keeps the "
        "client's address (DSR); the reply is reverse-translated at the device (SNAT) or on the "
        "backend's node (DSR)",
        "bpf/lib/nodeport.h nodeport_lb4, rev_nodeport_lb4; cilium PR #22756 (rev-DNAT of local "
        "backends at to-netdev)", "1.6+ (kube-proxy replacement)"),
    "no-lookup-without-backends": Fact(
        "a frontend without backends is not translated",
        "lb4_lookup_service returns no service when the frontend's backend count is 0",
        "bpf/lib/lb.h lb6_lookup_service / lb4_lookup_service (commit 0040d667)", "all versions"),
}


@dataclass(frozen=True, slots=True)
class Defect:
    """A known upstream defect of the reply-bypasses-translation class."""

    issue: str
    affected: str                 # versions as reported
    since: tuple | None           # first affected version (inclusive), None = unknown
    fixed: tuple | None           # first fixed version, None = not known to synack
    settings: str
    symptom: str
    fix: str
    applies: str                  # which translation point it breaks (a key of FACTS)
    types: tuple = ()             # service types it was reported for (empty: any)


DEFECTS = (
    Defect("cilium#9285", "1.6.0 (reported; the maintainers point at fixes in 1.6.1/1.6.2, PRs "
           "#8975 and #8978)", (1, 6, 0), (1, 6, 2),
           "per-packet LB of pod traffic, endpoint routes off (local delivery by BPF)",
           "a pod connects to an ExternalIP whose backend runs on the same node: the SYN is "
           "translated, the SYN+ACK reaches the client from the backend's PodIP, the client "
           "answers RST",
           "upgrade to 1.6.2 or later; or translate at connect() (socket LB / host-reachable "
           "services; for an ExternalIP only when the address is the node's, bpf_sock.c "
           "sock4_skip_xlate), so that no packet needs reverse translation; or SNAT that path",
           "revnat-to-container", ("ExternalIPs",)),
    Defect("cilium#14136", "1.9.0 (reported, IPv4 only, with kube-proxy replacement, DSR, Maglev)",
           (1, 9, 0), None,
           "kube-proxy replacement with DSR",
           "a client (pod or the host) on the node of the backend cannot connect to the service's "
           "external IP; cilium monitor shows no drop",
           "see the issue; synack does not know the fixed version. Avoid DSR for that path or "
           "reach the service by its ClusterIP from inside the cluster",
           "nodeport"),
    Defect("cilium#10567", "1.7 era (2020-03), any version where Cilium leaves ClusterIP to "
           "kube-proxy and delivers pod-to-pod traffic by BPF", None, None,
           "kube-proxy handles ClusterIP, Cilium's east-west LB off, local delivery by BPF",
           "a pod connects to a ClusterIP whose backend runs on the same node: kube-proxy's DNAT in "
           "the host's iptables translates the SYN, the SYN+ACK is redirected by BPF straight into "
           "the client pod without crossing conntrack, the client answers RST",
           "turn Cilium's east-west LB (or socket LB) on; or endpoint routes so replies cross the "
           "host stack. Modelled by the walk itself (not a version defect)",
           "local-delivery"),
    Defect("cilium#22659", "1.13 and before (reported 2022-12)", None, None,
           "kube-proxy replacement, NodePort backend in the host network namespace",
           "the reply of a local hostNetwork backend to a NodePort client is not reverse-translated",
           "cilium PR #22756 (rev-DNAT at to-netdev); synack does not know the release it shipped in",
           "nodeport"),
    Defect("cilium#33574", "1.15 (2024, a question, not a bug)", None, None,
           "NodePort/LoadBalancer to a backend on the receiving node",
           "the backend sees the external client's address: Cilium does not SNAT traffic to a local "
           "backend (by design), so the reply goes back through the same node and is reverse-"
           "translated there",
           "none needed; externalTrafficPolicy and SNAT/DSR decide the source the backend sees",
           "nodeport"),
)


def parse_version(text: str | None) -> tuple | None:
    """``1.15.0-rc.1`` -> (1, 15, 0).

    >>> parse_version("v1.6.0"), parse_version("1.15.0-rc.1"), parse_version(None)
    ((1, 6, 0), (1, 15, 0), None)
    """
    if not text:
        return None
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def defect_applies(d: Defect, version: tuple | None) -> bool | None:
    """True/False when the version decides it, None when it is not known."""
    if version is None or d.since is None:
        return None
    if version < d.since:
        return False
    return d.fixed is None or version < d.fixed


# ------------------------------------------------------------------------------ one node
def defects(node: CiliumNode, fact: str, service=None) -> list[tuple[Defect, bool | None]]:
    """The known Cilium defects of datapath fact ``fact`` (for ``service``'s type), each with
    whether the node's version has it (None: version unknown)."""
    return [(d, defect_applies(d, node.version)) for d in DEFECTS if d.applies == fact
            and (not d.types or service is None or service.type in d.types)]


@dataclass
class CiliumCT(Conntrack):
    """A connection Cilium translated: where, and where its replies are reverse-translated."""

    point: str = ""            # a key of FACTS: where the request was translated
    revnat_at: str = ""        # the interface (or "socket") the reverse translation happens at
    service: object = None


@dataclass
class Outcome:
    """What the Cilium stage did to a packet arriving in a namespace."""

    pkt: Packet
    steps: list
    prob: float = 1.0
    redirect_oif: str | None = None    # delivered by BPF redirect: the host's netfilter is skipped
    entry: CiliumCT | None = None      # a translation to remember for the replies
    revnat: bool = False
    approx: list = field(default_factory=list)


def _step(fact: str, what: Cilium, verdict: str, packet: Packet | None = None, note: str | None = None,
          value: object = None) -> Step:
    f = FACTS[fact]
    return cilium_step(fact, what, verdict, packet, note or f"{f.source}; {f.versions}", value)


def _backends(node: CiliumNode, svc, pkt: Packet, fact: str, where: str) -> list[Outcome]:
    usable = [b for b in svc.backends if b.state in (None, "active")]
    out = []
    for b in usable:
        new = replace(pkt, dst=b.endpoint.address, dport=b.endpoint.port)
        step = _step(fact, Cilium.DNAT, f"DNAT {pkt.dst}:{pkt.dport} -> {b.endpoint.address}:{b.endpoint.port} "
                           f"({svc.label}{', backend on node ' + b.node if b.node else ''}) at {where}", new)
        out.append(Outcome(new, [step], 1.0 / len(usable)))
    return out


def connect(node: CiliumNode, pkt: Packet, in_hostns: bool, local_addr) -> list[Outcome] | None:
    """Socket LB: a local process's connect() to a frontend, translated before any packet.
    None: not translated here (disabled, not covered, no service, a foreign ExternalIP)."""
    if not node.socket_lb or (node.socket_lb_hostns_only and not in_hostns):
        return None
    svc = node.lookup(pkt)
    if svc is None:
        return None
    if svc.type == "ExternalIPs" and not local_addr(svc.frontend.address):
        return None  # bpf_sock.c sock4_skip_xlate: only this host's ExternalIPs
    outs = _backends(node, svc, pkt, "socket-lb", "connect() (bpf_sock)")
    for o in outs:
        o.entry = CiliumCT(pkt, o.pkt.dst, o.pkt.dport, pkt.src, pkt.sport, dnat=True,
                           point="socket-lb", revnat_at="socket", service=svc)
    return outs


def from_endpoint(node: CiliumNode, pkt: Packet, iif: str, route_oif, is_local_endpoint,
                  entries: list) -> list[Outcome] | None:
    """A packet arriving from a pod's veth (bpf_lxc from-container): per-packet LB of a new
    connection, rev-NAT of a reply whose client is on this node, and local delivery by BPF."""
    rev = _match_reply(entries, pkt)
    if rev is not None:
        return _reply(node, pkt, rev, route_oif, is_local_endpoint)
    outs = None
    if node.per_packet_lb:
        svc = node.lookup(pkt)
        if svc is not None:
            outs = _backends(node, svc, pkt, "per-packet-lb", f"{iif} (bpf_lxc from-container)")
            for o in outs:
                o.entry = CiliumCT(pkt, o.pkt.dst, o.pkt.dport, pkt.src, pkt.sport, dnat=True,
                                   point="per-packet-lb", revnat_at=iif, service=svc)
    if outs is None:
        outs = [Outcome(pkt, [])]
    for o in outs:
        _maybe_local_delivery(node, o, route_oif, is_local_endpoint)
    return outs


def _maybe_local_delivery(node: CiliumNode, o: Outcome, route_oif, is_local_endpoint):
    oif = route_oif(o.pkt.dst)
    if node.local_delivery == "bpf" and oif is not None and is_local_endpoint(oif):
        o.redirect_oif = oif
        o.steps.append(_step("local-delivery", Cilium.REDIRECT, f"REDIRECT to {oif} (ipv4_local_delivery): "
                                               "the host's iptables and conntrack are not crossed", value=oif))


def _match_reply(entries: list, pkt: Packet) -> CiliumCT | None:
    for ct in entries:
        if (pkt.proto == ct.original.proto and pkt.src == ct.reply_src and pkt.sport == ct.reply_sport
                and pkt.dst == ct.reply_dst and pkt.dport == ct.reply_dport):
            return ct
    return None


def _reply(node: CiliumNode, pkt: Packet, ct: CiliumCT, route_oif, is_local_endpoint) -> list[Outcome]:
    """A reply on a connection Cilium translated on this node."""
    o = Outcome(pkt, [])
    if ct.point == "nodeport" and ct.revnat_at == "endpoint":
        new = replace(pkt, src=ct.original.dst, sport=ct.original.dport)
        o.pkt = new
        o.revnat = True
        o.steps.append(_step("nodeport", Cilium.REVNAT, f"rev-DNAT {pkt.src}:{pkt.sport} -> {new.src}:{new.sport} in "
                                         "from-container (CT_REPLY of a NodePort connection: NODEPORT_REVNAT)", new))
        oif = route_oif(new.dst)
        if oif is not None:
            o.redirect_oif = oif
        return [o]
    _maybe_local_delivery(node, o, route_oif, is_local_endpoint)
    if ct.revnat_at == "socket":
        return [o]  # the socket layer reverse-translates at recvmsg/getpeername: nothing on the wire
    toward = o.redirect_oif or route_oif(pkt.dst)
    if toward == ct.revnat_at:
        broken = [(d, a) for d, a in defects(node, "revnat-to-container", ct.service) if a]
        if broken and o.redirect_oif is not None:
            d = broken[0][0]
            o.steps.append(_step("revnat-to-container", Cilium.NO_REVNAT,
                                 f"NO rev-NAT into {toward} ({d.issue}, Cilium "
                                 f"{'.'.join(map(str, node.version))}: {d.symptom.split(':')[0]})",
                                 note=f"{d.issue}: {d.affected}; fix: {d.fix}", value=d))
            return [o]
        new = replace(pkt, src=ct.original.dst, sport=ct.original.dport)
        o.pkt = new
        o.revnat = True
        o.steps.append(_step("revnat-to-container", Cilium.REVNAT, f"rev-NAT {pkt.src}:{pkt.sport} -> "
                                                    f"{new.src}:{new.sport} into {toward}", new))
        if o.redirect_oif is not None:
            for d, applies in defects(node, "revnat-to-container", ct.service):
                if applies is None:  # the version is not known: say what would break, and where
                    o.steps.append(cilium_step(
                        "known-defect", Cilium.KNOWN_DEFECT, f"POSSIBLE {d.issue}: {d.symptom}",
                        note=f"{d.affected}; settings: {d.settings}; fix: {d.fix}. "
                             "Give the node's version (cilium status, or cilium.version)", value=d))
    return [o]


def from_device(node: CiliumNode, pkt: Packet, iif: str, route_oif, is_local_endpoint, entries: list,
                local_addr, addr_of) -> list[Outcome] | None:
    """A packet arriving on a node's device (bpf_host from-netdev, bpf/lib/nodeport.h):
    NodePort/ExternalIP/LoadBalancer LB of a connection from outside, and the reverse
    translation of the replies of the connections it SNATed. None: not Cilium's (the host's
    stack and netfilter handle it)."""
    rev = _match_reply(entries, pkt)
    if rev is not None and rev.point == "nodeport" and rev.revnat_at == iif:
        new = replace(pkt, src=rev.original.dst, sport=rev.original.dport, dst=rev.original.src,
                      dport=rev.original.sport)
        o = Outcome(new, [_step("nodeport", Cilium.REVNAT, f"rev-SNAT+rev-DNAT {pkt.src}:{pkt.sport} -> {pkt.dst}:{pkt.dport} "
                                            f"to {new.src}:{new.sport} -> {new.dst}:{new.dport} at {iif} "
                                            "(rev_nodeport_lb4)", new)], revnat=True)
        oif = route_oif(new.dst)
        if oif is not None:
            o.redirect_oif = oif
        return [o]
    if not node.nodeport:
        return None
    svc = node.lookup(pkt, local_addr)
    if svc is None or svc.type not in ("NodePort", "ExternalIPs", "LoadBalancer", "HostPort"):
        return None
    outs = _backends(node, svc, pkt, "nodeport", f"{iif} (bpf_host from-netdev, nodeport_lb4)")
    for o in outs:
        oif = route_oif(o.pkt.dst)
        o.entry = CiliumCT(pkt, o.pkt.dst, o.pkt.dport, pkt.src, pkt.sport, dnat=True, point="nodeport",
                           revnat_at="endpoint", service=svc)
        if oif is not None and is_local_endpoint(oif):
            # a local backend: no SNAT; its reply is rev-DNATed in its from-container
            # (CT_REPLY with node_port -> NODEPORT_REVNAT, bpf_lxc.c)
            o.redirect_oif = oif
            o.steps.append(_step("nodeport", Cilium.REDIRECT, f"REDIRECT to the local backend's {oif} (no SNAT: the backend "
                                             f"sees the client {pkt.src})", value=oif))
        elif node.lb_mode == "snat" and oif is not None:
            me = addr_of(oif)
            if me is None:
                continue
            o.pkt = replace(o.pkt, src=me)
            o.entry = CiliumCT(pkt, o.pkt.dst, o.pkt.dport, me, pkt.sport, dnat=True, snat=True,
                               point="nodeport", revnat_at=oif, service=svc)
            o.redirect_oif = oif
            o.steps.append(_step("nodeport", Cilium.SNAT, f"SNAT {pkt.src} -> {me} (mode SNAT) and REDIRECT out {oif}: the "
                                             "reply must come back here to be reverse-translated", o.pkt))
        else:
            o.approx.append(f"Cilium {node.lb_mode.upper()} to a remote backend: the backend's node "
                            "reverse-translates from the DSR option; synack does not walk that yet")
            o.steps.append(_step("nodeport", Cilium.PASS, f"{node.lb_mode.upper()}: the client's address is kept; "
                                             "reverse translation on the backend's node (not walked)"))
    return outs


def reply_into_endpoint(node: CiliumNode, pkt: Packet, oif: str, entries: list) -> Outcome | None:
    """A reply leaving the node's stack toward a pod's veth: bpf_lxc's to-container reverse-
    translates it when it belongs to a connection the pod's from-container translated."""
    ct = _match_reply(entries, pkt)
    if ct is None or ct.revnat_at != oif:
        return None
    new = replace(pkt, src=ct.original.dst, sport=ct.original.dport)
    return Outcome(new, [_step("revnat-to-container", Cilium.REVNAT, f"rev-NAT {pkt.src}:{pkt.sport} -> "
                                                      f"{new.src}:{new.sport} into {oif}", new)], revnat=True)


def destinations(node: CiliumNode):
    """((address, protocol number, port), service type) of every frontend with backends a client
    can dial (the wildcard NodePort frontends 0.0.0.0/[::] stand for the node's addresses: not
    listed)."""
    seen = set()
    for s in node.services:
        fe = s.frontend
        if s.scope != "external" or not s.backends or fe.address.is_unspecified or not fe.port:
            continue
        key = (fe.address, {"TCP": 6, "UDP": 17, "SCTP": 132}.get(fe.protocol or "TCP", 6), fe.port)
        if key not in seen:
            seen.add(key)
            yield key, s.type
