"""Follow a flow across namespaces (hosts, pods, bridges) forward and back; find replies that
bypass the translation that the request crossed, and connections split at a local proxy.

Orchestration over netfilter/: each namespace is walked with the single-namespace model; this
module moves packets between namespaces (L2 segments, bridges with or without br_netfilter),
keeps each namespace's conntrack entries, and walks the reply back from where the request ended.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from analyzer.model.env import Environment, NamespaceSpec
from analyzer.netfilter import pipeline
from analyzer.netfilter.pipeline import _ifaces
from analyzer.netfilter.trace import (  # noqa: F401 (Hop, Journey, Trip re-exported)
    Bridge, Conntrack as CT, Hop, Journey, JourneyBuilder, Kind, Step, Trip, bridge_step,
)
from analyzer.netfilter.walk import _PLAIN_ADDRESSES, Branch, Conntrack, Packet, Walker, evolve

MAX_HOPS = 16
#: at most this many distinct journeys per direction of one connection; more are counted as not
#: followed and reported (kube-proxy's endpoint choice forks once per endpoint)
MAX_OUTCOMES = 64
#: namespace walks that later flows may share, remembered by a World (oldest forgotten first;
#: a 10,000-service environment of three kube-proxy nodes reuses ~50,000 of them, ~40,000 in
#: each of two workers)
MEMO_SIZE = 40000


#: the namespace of a single dump (``synack explain DUMP``) when walked as an environment
HOST = "host"


def one_namespace_world(ruleset, ns, family: int, walker: Walker | None = None, memo: bool = True) -> "World":
    """The environment of one dump: one namespace ``HOST`` with its ruleset, addresses, routes
    and sysctls; what lies beyond it is explain's implicit peer model (analyzer/explain.py).
    ``memo=False``: walks are not remembered (see `World`)."""
    spec = NamespaceSpec(HOST, ns, ruleset if family == 4 else None, ruleset if family == 6 else None)
    world = World(Environment("<dump>", {HOST: spec}, ()), memo=memo)
    world.walkers[f"{HOST}/{family}"] = walker or Walker(ruleset or _empty_ruleset(family), ns)
    return world


def _empty_ruleset(family: int):
    from analyzer.model.rules import Ruleset
    return Ruleset(family, {}, ())


class World:
    """An environment being walked: per-namespace walkers, and a memo of namespace walks keyed by
    (namespace, packet, arrival, conntrack entry), so that every branch and every flow that
    brings the same packet to the same place reuses the walk."""

    def __init__(self, env: Environment, max_outcomes: int | None = None, memo: bool = True):
        self.env = env
        # False: every walk is walked and handed over as is (explain's world of one flow asks no
        # walk twice: 0 hits in 11,000 walks of an open flow, where keying each cost its packet's hash)
        self.memo = memo
        self.walkers: dict[str, Walker] = {}
        self.max_outcomes = max_outcomes or MAX_OUTCOMES
        self._memo: OrderedDict = OrderedDict()
        # the walks only the flow being followed can ask again (its own destination, or a
        # conntrack entry of its own connection): kept apart and forgotten with the flow, so
        # that they do not push out of the memo the walks later flows share (begin_flow)
        self._flow_memo: dict = {}
        self._flow_dst: tuple | None = None
        self._tuples: dict = {}  # (namespace, family) -> whether no rule reads a conntrack tuple
        self.memo_hits = 0
        self.memo_misses = 0
        # namespace -> (Cilium node namespace, its veth there); node namespace -> its CiliumNode with
        # the default endpoints and devices filled in (the environment itself stays as read)
        self.cilium_cover, self.cilium_nodes = _cilium_setup(env)
        self._segment_of: dict = {}
        self._owners: dict = {}
        self._rule_index: dict = {}    # (namespace, family) -> {(path, line): Rule}
        self._source_lines: dict = {}  # path -> its lines, for findings' source lines
        self._neighbour: dict = {}     # IPv6 neighbour exchanges between namespaces, by who and where

    def walk(self, ns: str, pkt: Packet, iif: str | None, reply_mode: bool, ct: Conntrack | None,
             bridged_via: str | None = None, from_port: tuple | None = None,
             local_origin: bool | None = None, fresh: bool = True, replay: bool = True,
             resume: Branch | None = None) -> list[Branch]:
        """Every outcome of ``pkt`` arriving in ``ns`` on ``iif`` (None: sent by a local process,
        unless ``local_origin`` is False: arriving on an unnamed interface), in the walker's
        order: fresh copies that callers may change, or (``fresh=False``) the remembered
        branches themselves, for a caller that only reads them and their conntrack entries."""
        if not self.memo or resume is not None:
            return pipeline.run(self.walker(ns, pkt.family), self, ns, pkt, iif, ct, reply_mode, bridged_via,
                                from_port, local_origin, resume)
        if replay and ct is not None and not fresh and not ct.snat and type(ct) is Conntrack \
                and not self._flow_local(pkt, None) and self._tuple_free(ns, pkt.family):
            return self._reply_walk(ns, pkt, iif, reply_mode, ct, bridged_via, from_port, local_origin)
        key = _MemoKey((ns, pkt, iif, reply_mode, _ct_key(ct), bridged_via,
                        tuple(from_port) if from_port is not None else None, local_origin))
        hit = self._flow_memo.get(key)
        if hit is not None:
            self.memo_hits += 1
            return [b.fork() for b in hit] if fresh else list(hit)
        hit = self._memo.get(key)
        if hit is None:
            self.memo_misses += 1
            hit = pipeline.run(self.walker(ns, pkt.family), self, ns, pkt, iif, ct, reply_mode, bridged_via,
                               from_port, local_origin)
            if self._flow_local(pkt, ct):
                self._flow_memo[key] = hit
            else:
                self._memo[key] = hit
                if len(self._memo) > MEMO_SIZE:
                    self._memo.popitem(last=False)
        else:
            self.memo_hits += 1
            self._memo.move_to_end(key)
        return [b.fork() for b in hit] if fresh else list(hit)

    def _flow_local(self, pkt: Packet, ct: Conntrack | None) -> bool:
        """Whether a walk carries the followed flow's destination, in its packet or as the
        original destination of its conntrack entry: no other flow asks it again."""
        fd = self._flow_dst
        return fd is not None and ((pkt.dport == fd[1] and pkt.dst == fd[0]) or (pkt.sport == fd[1] and pkt.src == fd[0])
                                   or (ct is not None and ct.original.dport == fd[1] and ct.original.dst == fd[0]))

    def _tuple_free(self, ns: str, family: int) -> bool:
        """Whether no rule of the namespace matches a conntrack entry's tuple (``-m conntrack
        --ctorigsrc/--ctorigdst/--ctreplsrc/...``, read from the rules' text: a lazily parsed
        dump is not decoded for it)."""
        hit = self._tuples.get((ns, family))
        if hit is None:
            spec = self.env.namespaces[ns]
            rs = spec.ruleset if family == 4 else spec.ruleset6
            hit = self._tuples[(ns, family)] = rs is None or not any(
                "--cto" in r.text or "--ctr" in r.text for r in rs.rules())
        return hit

    def _reply_walk(self, ns, pkt, iif, reply_mode, ct, bridged_via, from_port, local_origin) -> list[Branch]:
        """The walk of a packet of a known connection (``ct``, not source-translated) in a
        namespace whose rules never read an entry's tuple: the rules see the same fields for
        every connection whose reply the packet is (state, status, mark; tuple aside), so the
        walk is remembered without the tuple and replayed for each connection: each outcome
        gets its own copy of the entry with that connection's tuple, and the reverse
        destination translation (conntrack's, at POSTROUTING or INPUT: the last step of the
        walk) puts that connection's original destination back as the source."""
        key = _MemoKey((ns, pkt, iif, reply_mode, (pkt.src == ct.reply_src, ct.dnat, ct.untracked, ct.mark,
                        ct.in_use, ct.confirmed, ct.invalid, ct.existing), bridged_via,
                        tuple(from_port) if from_port is not None else None, local_origin, _REPLAYED))
        hit = self._memo.get(key)
        if hit is None:
            self.memo_misses += 1
            brs = pipeline.run(self.walker(ns, pkt.family), self, ns, pkt, iif, ct, reply_mode, bridged_via,
                               from_port, local_origin)
            replayable = all(_replayable(b, ct) for b in brs)
            self._memo[key] = (_ct_key(ct), brs if replayable else None)
            if not replayable:  # walked for each entry (see _replayable), remembered with it
                exact = _MemoKey((ns, pkt, iif, reply_mode, _ct_key(ct), bridged_via,
                                  tuple(from_port) if from_port is not None else None, local_origin))
                (self._flow_memo if self._flow_local(pkt, ct) else self._memo)[exact] = brs
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
            return list(brs)
        self.memo_hits += 1
        self._memo.move_to_end(key)
        first, brs = hit
        if brs is None:
            return self.walk(ns, pkt, iif, reply_mode, ct, bridged_via, from_port, local_origin, fresh=False,
                             replay=False)
        if first == _ct_key(ct):
            return list(brs)
        return [_replay(b, ct) for b in brs]

    def begin_flow(self, flow: Packet) -> None:
        """A flow is followed: forget the walks only the previous one could ask again."""
        if self._flow_dst != (flow.dst, flow.dport):
            self._flow_memo.clear()
            self._flow_dst = (flow.dst, flow.dport)

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

def _cilium_setup(env: Environment) -> tuple[dict, dict]:
    """Which Cilium node each namespace belongs to: the node itself, or a pod whose veth peer is
    one of the node's endpoints; and each node with its default endpoints (its veths to
    namespaces that are not Cilium nodes) and devices (its other interfaces) computed, as a copy."""
    cover, nodes = {}, {}
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
        endpoints = node.endpoints or tuple(sorted(peers))
        for iface in endpoints:
            if iface in peers:
                cover[peers[iface]] = (name, iface)
        devices = node.devices or tuple(sorted(i for i in spec.net.addrs if i not in endpoints and i != "lo"))
        nodes[name] = replace(node, endpoints=endpoints, devices=devices)
    return cover, nodes


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
    node = world.cilium_nodes[node_ns]
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

    node = world.cilium_nodes.get(ns)
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


_new_hop = tuple.__new__
assert Hop._fields == ("namespace", "role", "arrived_on", "steps", "packet_in", "packet_out", "disposition",
                       "detail", "ct", "approx", "bridged", "prob", "outcomes")


class _MemoKey:
    """A memo key that hashes its tuple once: a dict hashes a plain tuple on every lookup,
    insertion and move, and a tuple holding packets hashes their ``ipaddress`` objects each time
    (a ``hex()`` per address; a 10,000-service environment does ~250,000 namespace walks)."""

    __slots__ = ("key", "hash")

    def __init__(self, key: tuple):
        self.key = key
        # (namespace, packet, iif, reply, conntrack key, bridged_via, from_port, local_origin[, mark]):
        # hashed by the packet's addresses as integers and its ports rather than whole (equal
        # keys still hash equal; an open packet's symbolic fields hash as they are)
        pkt, ct = key[1], key[4]
        src, dst = pkt.src, pkt.dst
        if type(src) in _PLAIN_ADDRESSES and type(dst) in _PLAIN_ADDRESSES:
            if ct is not None and type(ct[0]) is not bool:  # a whole entry: its original and reply ports
                o = ct[0]
                ct = (o.dst._ip if type(o.dst) in _PLAIN_ADDRESSES else o.dst, o.dport, ct[2], ct[4], ct[5:])
            self.hash = hash((key[0], src._ip, dst._ip, pkt.sport, pkt.dport, pkt.iif, pkt.oif, pkt.mark,
                              key[2], key[3], ct, key[5:]))
        else:
            self.hash = hash(key)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other) -> bool:
        return self.hash == other.hash and self.key == other.key


#: marks a World memo key of a walk remembered without its conntrack entry's tuple
_REPLAYED = "replayed"


def _replayable(b: Branch, ct: Conntrack) -> bool:
    """Whether outcome ``b`` of a walk with entry ``ct`` depends on the entry's tuple only through
    its last step, conntrack's reverse destination translation, which gave ``b.pkt``."""
    steps = b.steps
    for i, s in enumerate(steps):
        if s.kind is Kind.REVERSE_NAT and (i != len(steps) - 1 or s.fact != "DNAT" or s.after is not b.pkt):
            return False
    c = b.ct
    return type(c) is Conntrack and (c.original, c.reply_src, c.reply_sport, c.reply_dst, c.reply_dport) == \
        (ct.original, ct.reply_src, ct.reply_sport, ct.reply_dst, ct.reply_dport)


def _replay(b: Branch, ct: Conntrack) -> Branch:
    """Outcome ``b`` of a remembered walk for the connection of ``ct`` (see World._reply_walk)."""
    c = b.ct.copy()  # what the walk did to the entry (its mark), with this connection's tuple
    c.original, c.reply_src, c.reply_sport, c.reply_dst, c.reply_dport = (
        ct.original, ct.reply_src, ct.reply_sport, ct.reply_dst, ct.reply_dport)
    steps, pkt = b.steps, b.pkt
    if steps and steps[-1].kind is Kind.REVERSE_NAT:
        last = steps[-1]
        o = ct.original
        pkt = evolve(last.before, src=o.dst, sport=o.dport)
        steps = steps[:-1] + [last._replace(after=pkt)]
    return Branch(pkt, c, steps, b.prob, b.approx, b.disposition, b.detail, b.next_hop, b.reply, b.notracked)


def _ct_key(ct: Conntrack | None):
    """Every field of a conntrack entry that a namespace walk reads, for the World memo's key
    (two entries that differ only in ``confirmed``, ``invalid`` or ``existing`` are walked
    differently: nat skipped, raw's view of the state)."""
    if ct is None:
        return None
    return (ct.original, ct.reply_src, ct.reply_sport, ct.reply_dst, ct.reply_dport, ct.dnat, ct.snat,
            ct.untracked, ct.mark, ct.in_use, ct.confirmed, ct.invalid, ct.existing)


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
    # (``visited``: the places the packet was, a tuple scanned in order: a journey has a few
    # hops, and comparing them costs less than hashing their addresses for a set at every hop)
    todo = [(JourneyBuilder(), tracker, start_ns, pkt, iif, None, None, None, ())]
    while todo:
        j, tr, ns, pkt, arrived, bridged_via, from_port, bridged_from, visited = todo.pop()
        for _ in range(MAX_HOPS):
            key = (ns, arrived, pkt.src, pkt.dst, pkt.sport, pkt.dport)
            if key in visited:
                j.end, j.end_ns, j.detail = "loop", ns, f"the packet comes back to {ns} unchanged: routing loop"
                break
            visited += (key,)
            brs = _cilium_stage(world, tr, ns, pkt, arrived, reply_mode, bridged_via, from_port)
            if brs is None:
                ct = tr.lookup_reply(ns, pkt) if reply_mode else None
                # without Cilium nothing below changes a branch (_advance reads it; a conntrack
                # entry kept in ``tr`` is copied before a reply walk uses it): no copies needed
                brs = world.walk(ns, pkt, arrived, reply_mode, ct, bridged_via, from_port,
                                 fresh=bool(world.cilium_nodes))
            if world.cilium_nodes:
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
    return [(j.freeze(), t) for j, t in done], unfollowed


def _cilium_ct_type():
    global _CILIUM_CT
    if _CILIUM_CT is None:
        from analyzer.netfilter.cilium import CiliumCT
        _CILIUM_CT = CiliumCT
    return _CILIUM_CT


_CILIUM_CT = None


def _advance(world: World, j: JourneyBuilder, tr: Tracker, ns: str, pkt: Packet, arrived, bridged_via,
             bridged_from, b: Branch, outcomes: int, role: str):
    """Record outcome ``b`` of the walk of ``pkt`` in ``ns`` as a hop of ``j``; return where the
    packet goes next (namespace, packet, arrival, bridged_via, from_port, bridged_from), or None
    when the journey ends here (``j.end`` set)."""
    if not b.reply and not isinstance(b.ct, _cilium_ct_type()):
        tr.add(ns, b.ct)
    entry = getattr(b, "cilium_entry", None) if world.cilium_cover else None  # set by _cilium_stage only
    if entry is not None:
        cover = world.cilium_cover.get(ns)
        tr.add((cover[0] if cover else ns) + "#cilium", entry)
    steps = tuple(b.steps)

    def hop(extra=(), approx=(), disposition=None, detail=None):
        # all thirteen fields in order, without the NamedTuple's defaults-filling __new__ (one
        # Hop per namespace crossed per branch)
        j.hops.append(_new_hop(Hop, (ns, role, arrived, steps + tuple(extra), pkt, b.pkt, disposition or b.disposition,
                                     b.detail if detail is None else detail, b.ct, tuple(b.approx) + tuple(approx),
                                     bridged_via is not None, b.prob if outcomes > 1 else 1.0, outcomes)))

    if b.disposition == "bridged":
        hop()
        from_ns, from_oif, next_hop = bridged_from
        nxt = world.next_namespace(from_ns, from_oif, next_hop)
        if nxt is None:
            j.end, j.end_ns, j.detail = "no-neighbour", ns, f"nobody answers for {next_hop}"
            return None
        nns, niface, _ = nxt
        return nns, _ifaces(b.pkt, None, None), niface, None, None, None
    if b.disposition not in ("sent", "forwarded"):
        hop()
        j.end, j.end_ns, j.end_packet, j.detail = b.disposition, ns, b.pkt, b.detail
        return None
    nxt = world.next_namespace(ns, b.pkt.oif, b.next_hop)
    if nxt is None:
        hop()
        j.end, j.end_ns, j.end_packet = "left", ns, b.pkt
        j.detail = f"leaves the environment from {ns} via {b.pkt.oif} (to {b.next_hop})"
        return None
    nns, niface, crossed = nxt
    nd_steps, nd_approx = (), ()
    if b.pkt.family == 6 and not getattr(b, "cilium_done", False):
        ok, nd_steps, nd_approx, fail = _neighbour_resolved(world, tr, ns, b, nns, niface, crossed)
        if not ok:
            hop(nd_steps, nd_approx, "no-neighbour", fail)
            j.end, j.end_ns, j.end_packet, j.detail = "no-neighbour", ns, b.pkt, fail
            return None
    out = _ifaces(b.pkt, None, None)
    if crossed is not None and world.bridge_nf(crossed, out.family):
        hop(nd_steps, nd_approx)
        # the frame crosses the bridge's netfilter first
        return (crossed.bridge_ns, out, crossed.bridge_iface, crossed.bridge_iface, None,
                (ns, b.pkt.oif, b.next_hop))
    if crossed is not None:
        hop(nd_steps + (bridge_step(b.pkt, Bridge.NO_NETFILTER, f"switched by {crossed.name} without netfilter "
                                    f"(bridge-nf-call-iptables=0 in {crossed.bridge_ns})"),), nd_approx)
    else:
        hop(nd_steps, nd_approx)
    seg = world.segment_of(nns, niface)
    from_port = None
    if seg is not None and seg.bridge_ns == nns and seg.bridge_iface == niface:
        from_port = (ns, b.pkt.oif)  # the bridge port the frame enters by
    return nns, out, niface, None, from_port, None


def _neighbour_resolved(world: World, tr: Tracker, ns: str, b: Branch, nns: str, niface: str,
                        crossed) -> tuple[bool, tuple, tuple, str | None]:
    """IPv6: ``ns`` resolves the next hop before the packet leaves; the neighbour solicitation
    and advertisement cross ip6tables in both namespaces (and the bridge's, with br_netfilter)
    (netfilter.neighbour.exchange). The connection starts with empty neighbour caches; what an
    exchange teaches both ends (the sender the target, the owner the solicitor: ndisc_recv_ns
    creates a STALE entry, usable at once) is kept per branch in ``tr``, so a reply toward an
    address that solicited needs no exchange. Returns (resolved, the steps and APPROXIMATE reasons
    to add to the hop, why it failed)."""
    from analyzer.netfilter import neighbour as ND

    oif, target = b.pkt.oif, b.next_hop
    if (ns, oif, target) in tr.neigh:
        return True, (), (), None
    source, assumed = ND.solicitation_source(world.env.namespaces[ns].net, oif, b.pkt.src)
    bridge = crossed if crossed is not None and world.bridge_nf(crossed, 6) else None
    key = (ns, oif, target, source, nns, niface, bridge.name if bridge is not None else None)
    ex = world._neighbour.get(key)
    if ex is None:
        ex = world._neighbour[key] = ND.exchange(
            (ns, world.walker(ns, 6), oif), (nns, world.walker(nns, 6), niface), target, source,
            (bridge.bridge_ns, world.walker(bridge.bridge_ns, 6), bridge.bridge_iface) if bridge is not None else None)
    src = f"{source} (a link-local address: the environment lists none for {ns}:{oif})" if assumed else str(source)
    steps = [Step(Kind.NEIGHBOUR, text=f"{ns} solicits {target} on {oif} from {src}; {nns} holds it on {niface}")]
    if not ex.ok or any(st.rule is not None for _, _, sts in ex.legs for st in sts):
        for what, leg_ns, sts in ex.legs:  # an exchange that crossed rules is shown in full
            sts = [st for st in sts if not (st.kind is Kind.CONNTRACK and st.fact is CT.OFF)]
            if sts:  # a namespace without ip6tables rules adds nothing to say
                steps.append(Step(Kind.NEIGHBOUR, text=what))
                steps.extend(sts)
    steps.append(Step(Kind.NEIGHBOUR, fact=ex.ok, text=("ok: " if ex.ok else "FAILED: ") + ex.summary))
    if not ex.ok:
        return False, tuple(steps), tuple(ex.approx), (
            f"{ns} cannot resolve its next hop {target} on {oif}: {ex.summary}; the packet is "
            f"never sent (after 3 unanswered solicitations, 1 s apart, the kernel drops it and "
            f"reports 'address unreachable' to its sender)")
    tr.neigh |= {(ns, oif, target), (nns, niface, source)}
    return True, tuple(steps), tuple(ex.approx), None


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
    if flow.uid != uid or flow.gid != gid:  # (dataclasses.replace: ~20 us a flow)
        flow = evolve(flow, uid=uid, gid=gid)
    if depth == 0:
        world.begin_flow(flow)
    reqs, unfollowed = travel_all(world, Tracker(), start, flow, None, "request", reply_mode=False)
    trips: list[Trip] = []
    for req, tracker in reqs:
        if req.end != "delivered":
            trips.append(Trip(flow, start, req))
            continue
        end_ns, arrived = req.end_ns, req.end_packet
        spec = world.env.namespaces[end_ns]
        lst = _listener(world, end_ns, arrived)
        if spec.listeners and lst is None:
            req = replace(req, end="refused", detail=(
                f"nothing listens on {arrived.dport}/{'tcp' if arrived.proto == 6 else arrived.proto} "
                f"in {end_ns}: the kernel answers RST (connection refused)"))
            trips.append(Trip(flow, start, req, listener=lst))
            continue
        # the reply is generated by the socket that accepted the connection
        rp = Packet(arrived.family, arrived.proto, arrived.dst, arrived.src, arrived.dport, arrived.sport,
                    tcp_flags=0x12 if arrived.proto == 6 else 0)
        hop_tproxy = any(s.kind is Kind.TPROXY for s in req.hops[-1].steps)
        if hop_tproxy:  # a transparent proxy answers as the original destination
            rp = replace(rp, src=flow.dst, sport=flow.dport)
        reps, more = travel_all(world, tracker, end_ns, rp, None, "reply", reply_mode=True)
        unfollowed += more
        legs = [None]
        if lst is not None and lst.proxy_to and depth == 0:
            legs = _second_legs(world, end_ns, lst, arrived, req.hops[-1].packet_in)
        for rep, _ in reps:
            seen = None
            if rep.end in ("delivered",) and rep.end_ns == start:
                seen, rep = _socket_revnat(world, tracker, start, flow, rep)
            for leg in legs:
                trips.append(Trip(flow, start, req, rep, seen, leg, lst))
    if len(trips) > world.max_outcomes:
        unfollowed += len(trips) - world.max_outcomes
        trips = trips[:world.max_outcomes]
    if trips[0].unfollowed != unfollowed:
        trips[0] = replace(trips[0], unfollowed=unfollowed)
    return trips


def _socket_revnat(world: World, tracker: Tracker, start: str, flow: Packet,
                   rep: Journey) -> tuple[Packet, Journey]:
    """What the client's socket reports for the reply: with Cilium's socket LB the socket is
    connected to the backend, and recvmsg/getpeername give the frontend back (bpf_sock.c
    __sock4_xlate_rev): the reverse translation happens in the socket layer, not on the wire.
    Returns (what the client sees, the reply with that step on its last hop)."""
    seen = rep.end_packet
    cover = world.cilium_cover.get(start)
    if cover is None:
        return seen, rep
    from analyzer.netfilter.cilium import FACTS, CiliumCT
    from analyzer.netfilter.trace import Cilium, cilium_step

    for ct in tracker.entries.get(cover[0] + "#cilium", []):
        if (isinstance(ct, CiliumCT) and ct.revnat_at == "socket" and ct.original.src == flow.src
                and ct.original.sport == flow.sport and ct.original.dst == flow.dst
                and ct.original.dport == flow.dport and seen.src == ct.reply_src and seen.sport == ct.reply_sport):
            back = replace(seen, src=ct.original.dst, sport=ct.original.dport)
            if rep.hops:
                last = rep.hops[-1]
                step = cilium_step("socket-lb", Cilium.SOCKET_REVNAT,
                                   f"recvmsg/getpeername report {back.src}:{back.sport} for "
                                   f"{seen.src}:{seen.sport} (reverse translation in the socket layer)",
                                   note=FACTS["socket-lb"].source)
                rep = replace(rep, hops=rep.hops[:-1] + (last._replace(steps=last.steps + (step,)),))
            return back, rep
    return seen, rep


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
