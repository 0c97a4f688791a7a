"""Follow a flow across namespaces (hosts, pods, bridges) forward and back; find replies that
bypass the translation that the request crossed, and connections split at a local proxy.

Orchestration over netfilter/: each namespace is walked with the single-namespace model; this
module moves packets between namespaces (L2 segments, bridges with or without br_netfilter),
keeps each namespace's conntrack entries, and walks the reply back from where the request ended.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace

from analyzer.diagnostics import APPROXIMATE, EXACT, Diagnostic, Related, Severity
from analyzer.netfilter import pipeline
from analyzer.netfilter.pipeline import _ifaces
from analyzer.netfilter.walk import Branch, Conntrack, Packet, Step, Walker
from analyzer.parse.envfile import Environment
from analyzer.source import Span

MAX_HOPS = 16
#: at most this many distinct journeys per direction of one connection; more are counted as not
#: followed and reported (kube-proxy's endpoint choice forks once per endpoint)
MAX_OUTCOMES = 64
#: namespace walks remembered by a World (oldest forgotten first)
MEMO_SIZE = 20000


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
    prob: float | None = 1.0   # of this outcome among the namespace's outcomes (None: unknown)
    outcomes: int = 1          # how many outcomes the namespace had for this packet


@dataclass
class Journey:
    """One direction of one connection through the environment (one branch of it)."""

    hops: list = field(default_factory=list)
    end: str = ""           # delivered | refused | dropped | rejected | left | no-route | loop | ...
    end_ns: str | None = None
    end_packet: Packet | None = None
    detail: str = ""
    order: tuple = ()       # which outcome of each fork on the way (0 = the first, in rule order)

    @property
    def approximate(self) -> bool:
        return any(h.approx for h in self.hops)

    @property
    def prob(self) -> float | None:
        """Probability of this branch (product of the forks on its way; None: unknown)."""
        p = 1.0
        for h in self.hops:
            if h.prob is None:
                return None
            p *= h.prob
        return p

    def copy(self) -> "Journey":
        return Journey(list(self.hops), self.end, self.end_ns, self.end_packet, self.detail, self.order)


@dataclass
class Trip:
    """One outcome of a connection: its request, the reply, and a proxy's second leg."""

    flow: Packet
    start: str
    request: Journey
    reply: Journey | None = None
    client_sees: Packet | None = None
    second_leg: "Trip | None" = None
    findings: list = field(default_factory=list)
    listener: object = None
    unfollowed: int = 0     # branches beyond the cap (MAX_OUTCOMES), not followed

    @property
    def prob(self) -> float | None:
        p = self.request.prob
        for part in (self.reply.prob if self.reply is not None else 1.0,
                     self.second_leg.prob if self.second_leg is not None else 1.0):
            p = None if p is None or part is None else p * part
        return p

    @property
    def endpoint(self) -> Packet | None:
        """Where the request was sent to: the last destination translation's result, else where
        the request ended (kube-proxy's endpoint choice)."""
        for h in reversed(self.request.hops):
            if h.ct is not None and h.ct.dnat and (h.packet_out.dst, h.packet_out.dport) != \
                    (h.packet_in.dst, h.packet_in.dport):
                return h.packet_out
        return self.request.end_packet


#: the namespace of a single dump (``synack explain DUMP``) when walked as an environment
HOST = "host"


def one_namespace_world(ruleset, ns, family: int, walker: Walker | None = None) -> "World":
    """The environment of one dump: one namespace ``HOST`` with its ruleset, addresses, routes
    and sysctls; what lies beyond it is explain's implicit peer model (analyzer/explain.py)."""
    from analyzer.parse.envfile import NamespaceSpec

    spec = NamespaceSpec(HOST, ns, ruleset if family == 4 else None, ruleset if family == 6 else None)
    world = World(Environment("<dump>", {HOST: spec}, []))
    world.walkers[f"{HOST}/{family}"] = walker or Walker(ruleset or _empty_ruleset(family), ns)
    return world


def _empty_ruleset(family: int):
    from analyzer.model.rules import Ruleset
    return Ruleset(family, {}, ())


class World:
    """An environment being walked: per-namespace walkers, and a memo of namespace walks keyed by
    (namespace, packet, arrival, conntrack entry), so that every branch and every flow that
    brings the same packet to the same place reuses the walk."""

    def __init__(self, env: Environment, max_outcomes: int | None = None):
        self.env = env
        self.walkers: dict[str, Walker] = {}
        self.max_outcomes = max_outcomes or MAX_OUTCOMES
        self._memo: OrderedDict = OrderedDict()
        self.memo_hits = 0
        self.memo_misses = 0
        self.cilium_cover = _cilium_setup(env)  # namespace -> (Cilium node namespace, its veth there)
        self._segment_of: dict = {}
        self._owners: dict = {}
        self._rule_index: dict = {}    # (namespace, family) -> {(path, line): Rule}
        self._source_lines: dict = {}  # path -> its lines, for findings' source lines
        self._neighbour: dict = {}     # IPv6 neighbour exchanges between namespaces, by who and where

    def walk(self, ns: str, pkt: Packet, iif: str | None, reply_mode: bool, ct: Conntrack | None,
             bridged_via: str | None = None, from_port: tuple | None = None,
             local_origin: bool | None = None) -> list[Branch]:
        """Every outcome of ``pkt`` arriving in ``ns`` on ``iif`` (None: sent by a local process,
        unless ``local_origin`` is False: arriving on an unnamed interface), in the walker's
        order (fresh copies: callers may change them)."""
        key = (ns, pkt, iif, reply_mode, _ct_key(ct), bridged_via,
               tuple(from_port) if from_port is not None else None, local_origin)
        hit = self._memo.get(key)
        if hit is None:
            self.memo_misses += 1
            hit = pipeline.run(self.walker(ns, pkt.family), self, ns, pkt, iif, ct, reply_mode, bridged_via,
                               from_port, local_origin)
            self._memo[key] = hit
            if len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
        else:
            self.memo_hits += 1
            self._memo.move_to_end(key)
        return [b.fork() for b in hit]

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
        seg = self.segment_of(ns, oif)
        if seg is None:
            return None
        owners = self._owners.get(seg.name)
        if owners is None:
            # who owns each address on this segment, in the segment's member order
            owners = self._owners[seg.name] = {}
            candidates = list(seg.members)
            if seg.bridge_ns is not None:
                candidates.append((seg.bridge_ns, seg.bridge_iface))
            for other_ns, iface in candidates:
                for a in self.env.namespaces[other_ns].net.addrs.get(iface, []):
                    owners.setdefault(a.ip, []).append((other_ns, iface))
        for other_ns, iface in owners.get(next_hop, ()):
            if other_ns == ns and iface == oif:
                continue
            crossed = seg if (seg.bridge_ns is not None and other_ns != seg.bridge_ns
                              and ns != seg.bridge_ns) else None
            return other_ns, iface, crossed
        return None

    def segment_of(self, ns: str, iface: str | None):
        seg = self._segment_of.get((ns, iface), False)
        if seg is False:
            seg = self._segment_of[(ns, iface)] = self.env.segment_of(ns, iface)
        return seg

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

def _cilium_setup(env: Environment) -> dict:
    """Which Cilium node each namespace belongs to: the node itself, or a pod whose veth peer is
    one of the node's endpoints. Fills the node's default endpoints (its veths to namespaces that
    are not Cilium nodes) and devices (its other interfaces)."""
    cover = {}
    for name, spec in env.namespaces.items():
        node = spec.cilium
        if node is None:
            continue
        cover[name] = (name, None)
        peers = {}
        for seg in env.segments:
            if seg.bridge_ns is None and len(seg.members) == 2:
                (a, ai), (b, bi) = seg.members
                if a == name and env.namespaces[b].cilium is None:
                    peers[ai] = b
                elif b == name and env.namespaces[a].cilium is None:
                    peers[bi] = a
        if not node.endpoints:
            node.endpoints = tuple(sorted(peers))
        for iface in node.endpoints:
            if iface in peers:
                cover[peers[iface]] = (name, iface)
        if not node.devices:
            node.devices = tuple(sorted(i for i in spec.net.addrs if i not in node.endpoints and i != "lo"))
    return cover


def _cilium_stage(world: "World", tr: "Tracker", ns: str, pkt: Packet, arrived, reply_mode: bool,
                  bridged_via, from_port) -> list[Branch] | None:
    """Cilium's BPF datapath on the way into ``ns`` (analyzer/netfilter/cilium.py): socket LB at
    connect() for a local process, bpf_lxc for a packet from a pod's veth (per-packet LB, rev-NAT,
    local delivery by BPF redirect that skips the host's netfilter). None: Cilium plays no part
    here, the namespace is walked as before."""
    cover = world.cilium_cover.get(ns)
    if cover is None or bridged_via is not None:
        return None
    from analyzer.netfilter import cilium as C
    node_ns, _ = cover
    node = world.env.namespaces[node_ns].cilium
    entries = tr.entries.get(node_ns + "#cilium", [])
    outs = None
    if arrived is None and not reply_mode:
        spec = world.env.namespaces[node_ns]
        local = {a.ip for addrs in spec.net.addrs.values() for a in addrs}
        outs = C.connect(node, pkt, ns == node_ns, lambda a: a in local)
    elif ns == node_ns and arrived in node.endpoints:
        w = world.walker(ns, pkt.family)

        def route_oif(dst):
            r = w.ns.route(dst)
            return r.oif if r.kind == "unicast" else None
        outs = C.from_endpoint(node, pkt, arrived, route_oif, lambda i: i in node.endpoints, entries)
    elif ns == node_ns and arrived in node.devices:
        w = world.walker(ns, pkt.family)
        spec = world.env.namespaces[node_ns]
        local = {a.ip for addrs in spec.net.addrs.values() for a in addrs}

        def route_oif(dst):
            r = w.ns.route(dst)
            return r.oif if r.kind == "unicast" else None

        def addr_of(iface):
            return next((a.ip for a in spec.net.addrs.get(iface, []) if a.version == pkt.family), None)
        outs = C.from_device(node, pkt, arrived, route_oif, lambda i: i in node.endpoints, entries,
                             lambda a: a in local, addr_of)
    if not outs or (len(outs) == 1 and not outs[0].steps):
        return None
    brs = []
    for o in outs:
        if o.redirect_oif is not None:
            ct = o.entry or Conntrack(replace(o.pkt, iif=arrived), untracked=True)
            nh = o.pkt.dst
            r = world.walker(ns, o.pkt.family).ns.route(o.pkt.dst)
            if r.kind == "unicast" and r.via is not None:
                nh = r.via  # bpf_fib_lookup gives the gateway of the route
            b = Branch(replace(o.pkt, iif=arrived, oif=o.redirect_oif), ct, list(o.steps), o.prob,
                       list(o.approx), disposition="sent", detail=f"redirected to {o.redirect_oif} by BPF",
                       next_hop=nh, reply=reply_mode)
            b.cilium_entry = o.entry
            b.cilium_done = True  # delivered by bpf_lxc itself: its rev-NAT (or its absence) is decided
            brs.append(b)
            continue
        ct = tr.lookup_reply(ns, o.pkt) if reply_mode else None
        for b in world.walk(ns, o.pkt, arrived, reply_mode, ct, bridged_via, from_port):
            b.steps = list(o.steps) + b.steps
            b.approx = list(o.approx) + b.approx
            b.prob = None if b.prob is None else b.prob * o.prob
            b.cilium_entry = o.entry
            brs.append(b)
    return brs


def _cilium_into_endpoint(world: "World", tr: "Tracker", ns: str, b: Branch) -> None:
    """bpf_lxc to-container: a reply leaving a Cilium node toward a pod's veth is reverse-
    translated when that pod's from-container translated its connection."""
    from analyzer.netfilter import cilium as C

    node = world.env.namespaces[ns].cilium
    if node is None or b.disposition not in ("sent", "forwarded") or b.pkt.oif not in node.endpoints \
            or getattr(b, "cilium_done", False):
        return
    o = C.reply_into_endpoint(node, b.pkt, b.pkt.oif, tr.entries.get(ns + "#cilium", []))
    if o is not None:
        b.pkt = replace(o.pkt, iif=b.pkt.iif, oif=b.pkt.oif)
        b.steps = b.steps + o.steps


class Tracker:
    """Per-namespace conntrack tables built while the request travels."""

    def __init__(self):
        self.entries: dict[str, list[Conntrack]] = {}
        self.neigh: frozenset = frozenset()  # IPv6 neighbour entries learned: (namespace, iface, address)

    def copy(self) -> "Tracker":
        t = Tracker()
        t.entries = {ns: list(lst) for ns, lst in self.entries.items()}
        t.neigh = self.neigh
        return t

    def add(self, ns: str, ct: Conntrack):
        if not ct.untracked:
            self.entries.setdefault(ns, []).append(ct)

    def lookup_reply(self, ns: str, p: Packet) -> Conntrack | None:
        for ct in self.entries.get(ns, []):
            if (p.proto == ct.original.proto and p.src == ct.reply_src and p.sport == ct.reply_sport
                    and p.dst == ct.reply_dst and p.dport == ct.reply_dport):
                return ct
        return None


def walk_namespace(world: World, tracker: Tracker, ns: str, pkt: Packet, iif: str | None,
                   reply_mode: bool, bridged_via: str | None = None,
                   from_port: tuple | None = None) -> list[Branch]:
    """One namespace, one packet: PREROUTING/OUTPUT -> route -> INPUT or FORWARD -> POSTROUTING.
    ``reply_mode``: the packet belongs to a connection this namespace already tracks (looked
    up in ``tracker``); otherwise it starts a NEW connection here. ``from_port``: (namespace,
    interface) of the bridge port the frame came in on, when ``iif`` is this namespace's bridge.
    Every outcome's conntrack entry is added to ``tracker`` (use :func:`travel_all` to keep one
    tracker per outcome)."""
    ct = tracker.lookup_reply(ns, pkt) if reply_mode else None
    brs = world.walk(ns, pkt, iif, reply_mode, ct, bridged_via, from_port)
    for b in brs:
        if not b.reply:
            tracker.add(ns, b.ct)
    return brs


def _ct_key(ct: Conntrack | None):
    if ct is None:
        return None
    return (ct.original, ct.reply_src, ct.reply_sport, ct.reply_dst, ct.reply_dport, ct.dnat, ct.snat,
            ct.untracked, ct.mark, ct.in_use)


def travel_all(world: World, tracker: Tracker, start_ns: str, pkt: Packet, iif: str | None,
               role: str, reply_mode: bool) -> tuple[list[tuple[Journey, Tracker]], int]:
    """Move a packet hop by hop until it is delivered, dropped or leaves the environment,
    following every outcome of every namespace (statistic endpoint choices with their
    probability, uncertain matches with their APPROXIMATE reason). Returns the distinct journeys,
    each with the conntrack entries its own branch made, and how many further branches were not
    followed because of the cap ``world.max_outcomes``."""
    done: list[tuple[Journey, Tracker]] = []
    unfollowed = 0
    # a branch in flight: journey so far, its tracker, where the packet is, and how it got there
    todo = [(Journey(), tracker, start_ns, pkt, iif, None, None, None, frozenset())]
    while todo:
        j, tr, ns, pkt, arrived, bridged_via, from_port, bridged_from, visited = todo.pop()
        for _ in range(MAX_HOPS):
            key = (ns, arrived, pkt.src, pkt.dst, pkt.sport, pkt.dport)
            if key in visited:
                j.end, j.end_ns, j.detail = "loop", ns, f"the packet comes back to {ns} unchanged: routing loop"
                break
            visited = visited | {key}
            brs = _cilium_stage(world, tr, ns, pkt, arrived, reply_mode, bridged_via, from_port)
            if brs is None:
                ct = tr.lookup_reply(ns, pkt) if reply_mode else None
                brs = world.walk(ns, pkt, arrived, reply_mode, ct, bridged_via, from_port)
            for b in brs:
                _cilium_into_endpoint(world, tr, ns, b)
            # the walker lists a fork's outcomes last-rule-first; follow them in rule order
            brs.reverse()
            room = max(1, world.max_outcomes - len(done) - len(todo))
            if len(brs) > room:  # the cap: counted and reported, never silent
                unfollowed += len(brs) - room
                brs = brs[:room]
            for i, alt in enumerate(brs[1:], 1):
                # each other outcome continues as its own branch, with its own conntrack view
                jj, tt = j.copy(), tr.copy()
                jj.order += (i,)
                nxt = _advance(world, jj, tt, ns, pkt, arrived, bridged_via, bridged_from, alt, len(brs), role)
                if nxt is None:
                    done.append((jj, tt))
                else:
                    todo.append((jj, tt, *nxt, visited))
            if len(brs) > 1:
                j.order += (0,)
            nxt = _advance(world, j, tr, ns, pkt, arrived, bridged_via, bridged_from, brs[0], len(brs), role)
            if nxt is None:
                break
            ns, pkt, arrived, bridged_via, from_port, bridged_from = nxt
        else:
            j.end, j.detail = "loop", f"more than {MAX_HOPS} hops"
        done.append((j, tr))
    done.sort(key=lambda jt: jt[0].order)
    return done, unfollowed


def _cilium_ct_type():
    from analyzer.netfilter.cilium import CiliumCT
    return CiliumCT


def _advance(world: World, j: Journey, tr: Tracker, ns: str, pkt: Packet, arrived, bridged_via,
             bridged_from, b: Branch, outcomes: int, role: str):
    """Record outcome ``b`` of the walk of ``pkt`` in ``ns`` as a hop of ``j``; return where the
    packet goes next (namespace, packet, arrival, bridged_via, from_port, bridged_from), or None
    when the journey ends here (``j.end`` set)."""
    if not b.reply and not isinstance(b.ct, _cilium_ct_type()):
        tr.add(ns, b.ct)
    entry = getattr(b, "cilium_entry", None)
    if entry is not None:
        cover = world.cilium_cover.get(ns)
        tr.add((cover[0] if cover else ns) + "#cilium", entry)
    hop = Hop(ns, role, arrived, b.steps, pkt, b.pkt, b.disposition, b.detail, b.ct, list(b.approx),
              bridged=bridged_via is not None, prob=b.prob if outcomes > 1 else 1.0, outcomes=outcomes)
    j.hops.append(hop)
    if b.disposition == "bridged":
        from_ns, from_oif, next_hop = bridged_from
        nxt = world.next_namespace(from_ns, from_oif, next_hop)
        if nxt is None:
            j.end, j.end_ns, j.detail = "no-neighbour", ns, f"nobody answers for {next_hop}"
            return None
        nns, niface, _ = nxt
        return nns, _ifaces(b.pkt, None, None), niface, None, None, None
    if b.disposition not in ("sent", "forwarded"):
        j.end, j.end_ns, j.end_packet, j.detail = b.disposition, ns, b.pkt, b.detail
        return None
    nxt = world.next_namespace(ns, b.pkt.oif, b.next_hop)
    if nxt is None:
        j.end, j.end_ns, j.end_packet = "left", ns, b.pkt
        j.detail = f"leaves the environment from {ns} via {b.pkt.oif} (to {b.next_hop})"
        return None
    nns, niface, crossed = nxt
    if b.pkt.family == 6 and not getattr(b, "cilium_done", False) \
            and not _neighbour_resolved(world, tr, hop, ns, b, nns, niface, crossed):
        j.end, j.end_ns, j.end_packet, j.detail = "no-neighbour", ns, b.pkt, hop.detail
        return None
    out = _ifaces(b.pkt, None, None)
    if crossed is not None and world.bridge_nf(crossed, out.family):
        # the frame crosses the bridge's netfilter first
        return (crossed.bridge_ns, out, crossed.bridge_iface, crossed.bridge_iface, None,
                (ns, b.pkt.oif, b.next_hop))
    if crossed is not None:
        hop.steps = list(hop.steps) + [Step("bridge", f"switched by {crossed.name} without netfilter "
                                                      f"(bridge-nf-call-iptables=0 in {crossed.bridge_ns})")]
    seg = world.env.segment_of(nns, niface)
    from_port = None
    if seg is not None and seg.bridge_ns == nns and seg.bridge_iface == niface:
        from_port = (ns, b.pkt.oif)  # the bridge port the frame enters by
    return nns, out, niface, None, from_port, None


def _neighbour_resolved(world: World, tr: Tracker, hop: Hop, ns: str, b: Branch, nns: str, niface: str,
                        crossed) -> bool:
    """IPv6: ``ns`` resolves the next hop before the packet leaves; the neighbour solicitation
    and advertisement cross ip6tables in both namespaces (and the bridge's, with br_netfilter)
    (netfilter.neighbour.exchange). The connection starts with empty neighbour caches; what an
    exchange teaches both ends (the sender the target, the owner the solicitor: ndisc_recv_ns
    creates a STALE entry, usable at once) is kept per branch in ``tr``, so a reply toward an
    address that solicited needs no exchange. False: the exchange failed, ``hop`` says where."""
    from analyzer.netfilter import neighbour as ND

    oif, target = b.pkt.oif, b.next_hop
    if (ns, oif, target) in tr.neigh:
        return True
    source, assumed = ND.solicitation_source(world.env.namespaces[ns].net, oif, b.pkt.src)
    bridge = crossed if crossed is not None and world.bridge_nf(crossed, 6) else None
    key = (ns, oif, target, source, nns, niface, bridge.name if bridge is not None else None)
    ex = world._neighbour.get(key)
    if ex is None:
        ex = world._neighbour[key] = ND.exchange(
            (ns, world.walker(ns, 6), oif), (nns, world.walker(nns, 6), niface), target, source,
            (bridge.bridge_ns, world.walker(bridge.bridge_ns, 6), bridge.bridge_iface) if bridge is not None else None)
    src = f"{source} (a link-local address: the environment lists none for {ns}:{oif})" if assumed else str(source)
    steps = [Step("neighbour", f"{ns} solicits {target} on {oif} from {src}; {nns} holds it on {niface}")]
    if not ex.ok or any(":rule:" in st.where for _, _, sts in ex.legs for st in sts):
        for what, leg_ns, sts in ex.legs:  # an exchange that crossed rules is shown in full
            sts = [st for st in sts if not (st.where == "conntrack" and st.verdict == "OFF")]
            if sts:  # a namespace without ip6tables rules adds nothing to say
                steps.append(Step("neighbour", what))
                steps.extend(sts)
    steps.append(Step("neighbour", ("ok: " if ex.ok else "FAILED: ") + ex.summary))
    hop.steps = list(hop.steps) + steps
    hop.approx = hop.approx + ex.approx
    if not ex.ok:
        hop.disposition = "no-neighbour"
        hop.detail = (f"{ns} cannot resolve its next hop {target} on {oif}: {ex.summary}; the packet is "
                      f"never sent (after 3 unanswered solicitations, 1 s apart, the kernel drops it and "
                      f"reports 'address unreachable' to its sender)")
        return False
    tr.neigh |= {(ns, oif, target), (nns, niface, source)}
    return True


def travel(world: World, tracker: Tracker, start_ns: str, pkt: Packet, iif: str | None,
           role: str, reply_mode: bool) -> Journey:
    """The first journey of :func:`travel_all` (its conntrack entries added to ``tracker``)."""
    journeys, _ = travel_all(world, tracker.copy(), start_ns, pkt, iif, role, reply_mode)
    j, tr = journeys[0]
    tracker.entries = tr.entries
    return j


def _listener(world: World, ns: str, pkt: Packet):
    spec = world.env.namespaces[ns]
    for l in spec.listeners:
        if l.port == pkt.dport and l.proto == {6: "tcp", 17: "udp", 132: "sctp"}.get(pkt.proto, "tcp"):
            return l
    return None


def follow_all(world: World, start: str, flow: Packet, uid=None, gid=None, depth: int = 0) -> list[Trip]:
    """Every outcome of a connection from a process in ``start`` (OUTPUT path) to ``flow.dst``:
    one Trip per distinct (request, reply, second leg) branch, each with its probability
    (``Trip.prob``; None when an uncertain match forked it). Never empty."""
    flow = replace(flow, uid=uid, gid=gid)
    reqs, unfollowed = travel_all(world, Tracker(), start, flow, None, "request", reply_mode=False)
    trips: list[Trip] = []
    for req, tracker in reqs:
        trip = Trip(flow, start, req)
        if req.end != "delivered":
            trips.append(trip)
            continue
        end_ns, arrived = req.end_ns, req.end_packet
        spec = world.env.namespaces[end_ns]
        lst = _listener(world, end_ns, arrived)
        trip.listener = lst
        if spec.listeners and lst is None:
            req.end, req.detail = "refused", (f"nothing listens on {arrived.dport}/{'tcp' if arrived.proto == 6 else arrived.proto} "
                                              f"in {end_ns}: the kernel answers RST (connection refused)")
            trips.append(trip)
            continue
        # the reply is generated by the socket that accepted the connection
        rp = Packet(arrived.family, arrived.proto, arrived.dst, arrived.src, arrived.dport, arrived.sport,
                    tcp_flags=0x12 if arrived.proto == 6 else 0)
        hop_tproxy = any("TPROXY" in s.verdict for s in req.hops[-1].steps)
        if hop_tproxy:  # a transparent proxy answers as the original destination
            rp = replace(rp, src=flow.dst, sport=flow.dport)
        reps, more = travel_all(world, tracker, end_ns, rp, None, "reply", reply_mode=True)
        unfollowed += more
        legs = [None]
        if lst is not None and lst.proxy_to and depth == 0:
            legs = _second_legs(world, end_ns, lst, arrived, req.hops[-1].packet_in)
        for rep, _ in reps:
            for leg in legs:
                t = Trip(flow, start, req, rep, listener=lst, second_leg=leg)
                if rep.end in ("delivered",) and rep.end_ns == start:
                    t.client_sees = _socket_revnat(world, tracker, start, flow, rep)
                trips.append(t)
    if len(trips) > world.max_outcomes:
        unfollowed += len(trips) - world.max_outcomes
        trips = trips[:world.max_outcomes]
    trips[0].unfollowed = unfollowed
    return trips


def _socket_revnat(world: World, tracker: Tracker, start: str, flow: Packet, rep: Journey) -> Packet:
    """What the client's socket reports for the reply: with Cilium's socket LB the socket is
    connected to the backend, and recvmsg/getpeername give the frontend back (bpf_sock.c
    __sock4_xlate_rev): the reverse translation happens in the socket layer, not on the wire."""
    from analyzer.netfilter.cilium import FACTS, CiliumCT

    seen = rep.end_packet
    cover = world.cilium_cover.get(start)
    if cover is None:
        return seen
    for ct in tracker.entries.get(cover[0] + "#cilium", []):
        if (isinstance(ct, CiliumCT) and ct.revnat_at == "socket" and ct.original.src == flow.src
                and ct.original.sport == flow.sport and ct.original.dst == flow.dst
                and ct.original.dport == flow.dport and seen.src == ct.reply_src and seen.sport == ct.reply_sport):
            back = replace(seen, src=ct.original.dst, sport=ct.original.dport)
            if rep.hops:
                rep.hops[-1].steps = list(rep.hops[-1].steps) + [Step(
                    "cilium:socket-lb", f"recvmsg/getpeername report {back.src}:{back.sport} for "
                                        f"{seen.src}:{seen.sport} (reverse translation in the socket layer)",
                    note=FACTS["socket-lb"].source)]
            return back
    return seen


def follow(world: World, start: str, flow: Packet, uid=None, gid=None, depth: int = 0) -> Trip:
    """The first outcome of :func:`follow_all` (rule order): request, then reply. Where the
    connection forks, prefer follow_all, which returns every outcome."""
    return follow_all(world, start, flow, uid, gid, depth)[0]


def _second_legs(world: World, ns: str, lst, arrived: Packet, before: Packet) -> list[Trip]:
    """The connection a proxy opens for each client, every outcome of it. ``proxy_to: original``
    is what a sidecar does: the original destination (before REDIRECT/TPROXY), or
    127.0.0.1:PORT when that destination is an address of the proxy's own namespace (inbound)."""
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
    return follow_all(world, ns, pkt, uid=lst.uid, gid=lst.gid, depth=1)


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
            cil = _cilium_miss(world, trip, missed[0]) if missed else None
            hint = _fix_hint(world, trip, missed)
            if cil is not None:
                msg += (f". The request {flow.dst}:{flow.dport} -> {missed[0].packet_out.dst}:"
                        f"{missed[0].packet_out.dport}: {cil[0]}")
                hint = cil[1]
            elif missed:
                msg += (f". The request was translated in '{missed[0].namespace}' "
                        f"({flow.dst}:{flow.dport} -> {missed[0].packet_out.dst}:{missed[0].packet_out.dport}) "
                        f"but the reply {bypass}")
            out.append(Diagnostic("NAT001", Severity.ERROR, msg, span, hint,
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


#: what the connections of a failing outcome experience, per finding
_FATE = {"NAT001": "are reset", "NAT002": "lose their reply and time out",
         "NAT003": "are reset after the first data", "NAT004": "time out"}


def _where(t: Trip) -> str:
    e = t.endpoint
    return e.tuple_str().split(" -> ")[-1] if e is not None else (t.request.end_ns or "?")


def outcome_findings(world: World, trips: list[Trip]) -> list[Diagnostic]:
    """Findings of a connection over all its outcomes: a finding when any outcome fails, naming
    the failing endpoints and the share of connections affected ("1 of 3 endpoints, about 33%
    of connections, are reset"). EXACT when the forks are statistic (exact probabilities) and
    the finding itself is exact."""
    per = [(t, findings(world, t)) for t in trips]
    if len(trips) == 1:
        return per[0][1]
    total = None if any(t.prob is None for t in trips) else sum(t.prob for t in trips)
    wheres = [_where(t) for t in trips]
    by_endpoint = len(set(wheres)) == len(trips)
    out = []
    codes = list(dict.fromkeys(d.code for _, ds in per for d in ds))
    for code in codes:
        failing = [(t, next(d for d in ds if d.code == code)) for t, ds in per if any(d.code == code for d in ds)]
        t0, d0 = failing[0]
        k, n = len(failing), len(trips)
        names = ", ".join(dict.fromkeys(_where(t) for t, _ in failing))
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


def _translating_rule(world: World, hop: Hop):
    for s in hop.steps:
        if s.verdict.startswith(("DNAT", "REDIRECT", "NETMAP")) and s.line:
            r = rule_at(world, hop.namespace, hop.packet_in.family, s.path, s.line)
            if r is not None:
                return r
    return None


def rule_at(world: World, ns: str, family: int, path: str | None, line: int | None):
    """The rule of ``ns``'s ruleset written at ``path:line`` (an index built once per ruleset:
    a finding on a 100k-rule node must not scan every rule)."""
    key = (ns, family)
    idx = world._rule_index.get(key)
    if idx is None:
        spec = world.env.namespaces[ns]
        rs = spec.ruleset if family == 4 else spec.ruleset6
        idx = world._rule_index[key] = {(r.span.path, r.span.line): r for r in rs.rules()} if rs is not None else {}
    return idx.get((path, line))


def _bypass_point(trip: Trip, ns: str | None) -> str:
    hops = trip.reply.hops
    if not hops:
        return "never reaches it"
    first = hops[0]
    path = " -> ".join(dict.fromkeys(h.namespace for h in hops))
    redirect = next((s for h in hops if h.namespace == ns for s in h.steps
                     if s.where == "cilium:local-delivery"), None)
    if redirect is not None:
        # Cilium's bpf_lxc hands the reply from one pod's veth to the other's: no netfilter
        return (f"goes {path}, where Cilium redirects it by BPF from pod to pod "
                f"({redirect.verdict.split(' (')[0].lower()}): it never crosses '{ns}''s netfilter "
                f"conntrack, so the translation there is not undone")
    return f"goes {path} and never crosses '{ns}''s conntrack entry, so it is not reverse-translated"


def _cilium_miss(world: World, trip: Trip, hop: Hop) -> tuple[str, str] | None:
    """For a request Cilium translated: (what happened to the reply, the fixes), from the
    datapath facts and the known-defects table (analyzer/netfilter/cilium.py)."""
    from analyzer.netfilter.cilium import CiliumCT, FACTS

    ct = hop.ct
    if not isinstance(ct, CiliumCT):
        return None
    node = world.env.namespaces[hop.namespace].cilium
    said = next((s for h in trip.reply.hops for s in h.steps
                 if s.where.startswith("cilium:revnat") and s.verdict.startswith("NO ")), None)
    where = FACTS[ct.point].name
    if said is not None:
        why = (f"Cilium translated it in '{hop.namespace}' ({where}, at {ct.revnat_at}); the reply is "
               f"delivered back to {ct.revnat_at} by BPF redirect with no reverse translation on its path "
               f"({said.verdict.split('(', 1)[-1].rstrip(')')})")
        fixes = said.note.split("fix: ", 1)[-1]
    else:
        why = (f"Cilium translated it in '{hop.namespace}' ({where}, reverse translation at "
               f"{ct.revnat_at}), but the reply {_bypass_point(trip, hop.namespace)}")
        fixes = ("translate at connect() (socket LB) or make the reply pass the interface where "
                 "Cilium reverse-translates")
    if node is not None and node.version is None:
        fixes += ("; the Cilium version is not known (give cilium status or cilium.version): "
                  + ", ".join(d.issue for d, _ in node.defects(ct.point) + node.defects("revnat-to-container"))
                  + " may apply")
    return why, fixes


def _fix_hint(world: World, trip: Trip, missed, hairpin: bool = False) -> str:
    if not missed:
        return "make the reply return through the namespace that translated the request"
    ns = missed[0].namespace
    if trip.reply is not None and any(s.where == "cilium:local-delivery" for h in trip.reply.hops
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
    to = f", endpoint {_where(t)}" if e is not None and t.request.end != "no-route" else ""
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
        out.append(f"not followed: {t0.unfollowed} further branches (cap of {MAX_OUTCOMES} outcomes per direction)")
    if diags:
        from analyzer.diagnostics import render_text
        out.append("")
        out.extend(render_text(d) for d in diags)
    return "\n".join(out).rstrip() + "\n"


def trips_json(trips: list[Trip], diags) -> dict:
    """The first outcome's document as before (request, reply, ...), plus every outcome under
    ``outcomes`` with its probability and endpoint."""
    from analyzer.report.diagnostics import to_dict

    doc = trip_json(trips[0], diags)
    doc["outcomes"] = []
    for t in trips:
        o = trip_json(t, [])
        o.pop("schema_version", None)
        o.pop("findings", None)
        o["probability"] = t.prob
        o["endpoint"] = _pkt_json(t.endpoint)
        doc["outcomes"].append(o)
    doc["branches_not_followed"] = trips[0].unfollowed
    doc["findings"] = [to_dict(d) for d in diags]
    return doc


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
            "probability": h.prob, "outcomes_here": h.outcomes,
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
