"""Checks layer, translation family (NAT): follow every service of an environment forward and
back, and report replies that bypass the translation and connections split at a local proxy.

These checks need an environment (``synack lint --env ENV.yaml``): without one they yield nothing.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple

from analyzer.checks import CheckContext, check
from analyzer.diagnostics import Diagnostic, Severity
from analyzer.model.packet import PROTO, hostport
from analyzer.model.rules import AddrMatch, Jump, Nat, PortMatch, ProtoMatch, Redirect

PROTO_NAME = {6: "tcp", 17: "udp", 132: "sctp"}


def outbound_catchall(spec) -> bool:
    """Whether locally generated traffic is translated whatever its destination (a sidecar's
    outbound REDIRECT): then every listener elsewhere in the environment is a destination."""
    rs = spec.ruleset
    if rs is None or "nat" not in rs.tables:
        return False
    nat = rs.tables["nat"]
    for cname in _reachable(nat, ("OUTPUT",)):
        for r in nat.chains[cname].rules:
            t = r.target
            if isinstance(t, Redirect) or (isinstance(t, Nat) and t.kind == "DNAT"):
                if not any(isinstance(m, (AddrMatch, PortMatch)) and not m.negated for m in r.matches):
                    return True
    return False


def service_destinations(spec, partly: list | None = None, listen_ports=()):
    """(address, proto, port) a namespace translates: rules in nat PREROUTING/OUTPUT (and the
    chains they reach) with a destination port that DNAT/REDIRECT or jump on to a translation.
    A rule without ``-d`` stands for every address of the namespace (a pod's REDIRECT).

    A rule with ``-d`` addresses but no destination port (one-to-one NAT: every port of the
    address) is dialled at ``listen_ports`` (``(proto, port)`` of every listener of the
    environment), the ports a client of that address can get an answer from.

    ``partly`` (a list) receives ``(rule, why)`` for every translating rule followed only in
    part or not at all: such a rule with no listener to dial, a destination given as a network
    rather than addresses, a port range or list (its first port stands for it). lint --env says
    so after its findings. (A translating rule with neither ``-d`` nor a port, such as a
    kube-proxy endpoint's DNAT or Istio's catch-all REDIRECT, is reached by the flows to the
    destinations before it and to the listeners.)"""
    out: list = []
    seen: set = set()
    for rs in (spec.ruleset, getattr(spec, "ruleset6", None)):  # iptables, then ip6tables
        if rs is not None and "nat" in rs.tables:
            _destinations(spec, rs, partly, listen_ports, seen, out)
    return out


def _destinations(spec, rs, partly, listen_ports, seen: set, out: list) -> None:
    """`service_destinations` of one ruleset (one address family)."""
    nat = rs.tables["nat"]
    chains = nat.chains
    # the chains PREROUTING and OUTPUT reach, in _reachable's order, each read in the same pass
    # that finds the chains it jumps to (a kube-proxy nat table: ~100,000 rules, read once)
    done, todo = set(), [c for c in ("PREROUTING", "OUTPUT") if c in chains]
    while todo:
        cname = todo.pop()
        if cname in done:
            continue
        done.add(cname)
        for r in chains[cname].rules:
            t = r.target
            if isinstance(t, Jump):
                if t.chain in chains:
                    todo.append(t.chain)
                if "-d" not in r.text or not _leads_to_translation(nat, t.chain):
                    continue
            elif isinstance(t, Nat):
                if t.kind != "DNAT":
                    continue
            elif not isinstance(t, Redirect):
                continue
            if "-d" not in r.text:
                # no destination address or port (every spelling has "-d": -d, --dst,
                # --destination, --dport(s), --destination-port(s)): nothing to dial, told
                # without reading the matches (KUBE-SVC's jumps, KUBE-SEP's KUBE-MARK-MASQ; not
                # KUBE-SEP's DNAT, whose --to-destination has "-d" too)
                continue
            ports = [m for m in r.matches if isinstance(m, PortMatch) and m.direction == "dst" and not m.negated]
            dsts = [m for m in r.matches if isinstance(m, AddrMatch) and m.direction == "dst" and not m.negated]
            if not ports:
                if dsts:  # one-to-one NAT: every port of the address; dial the listening ones
                    _every_port(r, dsts, listen_ports, partly, seen, out)
                continue
            proto = next((m.number for m in r.matches if isinstance(m, ProtoMatch) and not m.negated), 6) or 6
            nports = sum(hi - lo + 1 for lo, hi in ports[0].ranges)
            if partly is not None and nports > 1:
                partly.append((r, f"a port range or list: its first port of {nports} followed"))
            if dsts:
                addrs = _single_addresses(r, dsts, partly)
            else:
                # the namespace's first address stands for all of them (a NodePort rule does not
                # look at the address; dialling every address of every node multiplies the work)
                addrs = [a.ip for _, a in spec.net.local_addresses()
                         if a.version == rs.family and not a.ip.is_loopback
                         and (rs.family == 4 or not a.ip.is_link_local)][:1]
            for a in addrs:
                for lo, _ in ports[0].ranges[:1]:
                    key = (a, proto, lo)
                    if key not in seen:
                        seen.add(key)
                        out.append((key, r))


def _single_addresses(r, dsts, partly) -> list:
    """The single addresses of a rule's positive ``-d`` matches; a network among them goes to
    ``partly`` (not dialled)."""
    addrs = [n.network_address for m in dsts for n in m.networks if n.num_addresses == 1]
    if partly is not None and len(addrs) < sum(len(m.networks) for m in dsts):
        partly.append((r, "a destination network: not followed" if not addrs
                       else "a destination network: only its single addresses followed"))
    return addrs


def listen_ports(env) -> list:
    """``(protocol number, port)`` of every listener of the environment, sorted: where a rule
    translating every port of an address (one-to-one NAT) is dialled."""
    return sorted({(PROTO.get(l.proto, 6), l.port) for s in env.namespaces.values() for l in s.listeners})


def _every_port(r, dsts, listen_ports, partly, seen: set, out: list) -> None:
    """A translating rule with ``-d`` addresses and no port: its addresses at every listening port
    (of the rule's protocol when it has one)."""
    proto = next((m.number for m in r.matches if isinstance(m, ProtoMatch) and not m.negated), 0)
    addrs = _single_addresses(r, dsts, partly)
    dial = [(p, port) for p, port in listen_ports if not proto or p == proto]
    if addrs and not dial:
        if partly is not None:
            partly.append((r, "no destination port, and no listener in the environment to dial: not followed"))
        return
    for a in addrs:
        for p, port in dial:
            key = (a, p, port)
            if key not in seen:
                seen.add(key)
                out.append((key, r))


def _reachable(table, roots):
    """The chains ``roots`` reach by jumps, each once, in discovery order (a set for membership:
    a kube-proxy nat table has tens of thousands of chains)."""
    seen, order, todo = set(), [], [c for c in roots if c in table.chains]
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.add(c)
        order.append(c)
        for r in table.chains[c].rules:
            if isinstance(r.target, Jump) and r.target.chain in table.chains:
                todo.append(r.target.chain)
    return order


def _leads_to_translation(table, chain, depth=0, memo=None) -> bool:
    if memo is None:
        if len(_TRANSLATES) > 16 and id(table) not in _TRANSLATES:
            _TRANSLATES.clear()
        memo = _TRANSLATES.setdefault(id(table), (table, {}))[1]
    hit = memo.get(chain)
    if hit is not None:
        return hit
    if depth > 8 or chain not in table.chains:
        return False
    out = False
    for r in table.chains[chain].rules:
        t = r.target
        if isinstance(t, Redirect) or (isinstance(t, Nat) and t.kind == "DNAT"):
            out = True
            break
        if isinstance(t, Jump) and _leads_to_translation(table, t.chain, depth + 1, memo):
            out = True
            break
    memo[chain] = out
    return out


# per nat table (held, so its id stays unique): chain -> whether it leads to a translation
_TRANSLATES: dict = {}


#: how a request that reaches no listener ends, in words (NAT005)
_NEVER = {"dropped": "is dropped", "rejected": "is rejected", "no-route": "finds no route",
          "no-neighbour": "finds nobody on the link", "loop": "loops", "blackhole": "is blackholed",
          "unreachable": "hits an unreachable route", "prohibit": "hits a prohibit route",
          "refused": "is refused (nothing listens)", "nfqueue": "is queued to userspace (NFQUEUE)",
          "not-sent": "is never sent (the connect fails with EINVAL)"}


def environment_trips(ctx: CheckContext):
    """Every (client namespace, service) pair, followed once over every branch; cached on ctx.

    Returns [(client, service namespace, trips, findings)] and sets ``ctx.extra["coverage"]``:
    what was followed (services x clients, endpoints, requests and replies) and what could not
    be (requests that never arrived, flows that leave the environment, branches over the cap)."""
    cached = ctx.extra.get("trips")
    if cached is not None:
        return cached
    env = ctx.extra.get("env")
    trips = []
    if env is None:
        ctx.extra["trips"] = trips
        return trips

    from analyzer.crosshost import World

    world = World(env)
    clients = env.clients or list(env.namespaces)
    targets: list = []
    partly: list = []
    ports = listen_ports(env)
    for name, spec in env.namespaces.items():
        targets += [(name, key, set(clients), True) for key, _ in service_destinations(spec, partly, ports)]
        if spec.cilium is not None:  # the frontends of a Cilium node's service dumps
            from analyzer.netfilter.cilium import destinations
            inside = {c for c, (node, _) in world.cilium_cover.items() if node == name}
            # a ClusterIP is dialled from inside the cluster: the node and its pods
            targets += [(name, key, set(clients) & inside if typ == "ClusterIP" else set(clients), True)
                        for key, typ in destinations(spec.cilium)]
        # every listener is a service too, translated or not: its reply must come back as well
        for l in spec.listeners:
            if l.proxy_to:
                continue  # reached through a REDIRECT/TPROXY, covered by the translated destinations
            for addr in _dial_addresses(spec):
                proto = {"tcp": 6, "udp": 17, "sctp": 132}.get(l.proto, 6)
                targets.append((name, (addr, proto, l.port), set(clients) - {name}, False))
        if name in clients and outbound_catchall(spec):  # (reads the whole nat table: clients only)
            for other, ospec in env.namespaces.items():
                if other == name:
                    continue
                for l in ospec.listeners:
                    for addr in _dial_addresses(ospec):
                        proto = {"tcp": 6, "udp": 17, "sctp": 132}.get(l.proto, 6)
                        targets.append((name, (addr, proto, l.port), {name}, False))
    cov = {"services": 0, "clients": 0, "flows": 0, "outcomes": 0, "endpoints": 0, "requests_delivered": 0,
           "replies_followed": 0, "never_arrived": 0, "left_environment": 0, "unreachable_listeners": 0,
           "branches_not_followed": 0, "max_outcomes": world.max_outcomes,
           # flows the walk approximated other than by following an undecidable match both ways
           # (a target, an address or a port it does not model exactly): the first 10 named
           "approximate_flows": 0, "approximate_examples": [],
           # branches of the other flows whose request (or reply) left the environment
           "branches_left": 0,
           # translating rules followed in part or not at all (service_destinations)
           "translations_in_part": [{"path": r.span.path, "line": r.span.line, "rule": r.text, "why": why}
                                    for r, why in partly]}
    import gc
    gc_was_on = gc.isenabled()
    # the walks allocate millions of small objects that form no reference cycles (every
    # collection of a 1,000-service run found nothing to free) while the environment's rulesets
    # stay alive: the cyclic GC only costs time here (about 20% of it); freeze the rulesets out
    # of its reach and pause it for the walks
    gc.freeze()
    gc.disable()
    try:
        _follow_targets(ctx, env, world, clients, targets, cov, trips)
    finally:
        if gc_was_on:
            # the trips stay alive for the checks and the report: re-enabled on millions of young
            # objects, the collector would walk them all two or three times as they age (5 s of a
            # 10,000-service run, spent in whatever allocated next: the JSON rendering)
            gc.freeze()
            gc.enable()
    ctx.extra["coverage"] = cov
    ctx.extra["trips"] = trips
    return trips


def _dial_addresses(spec) -> list:
    """Where a client dials a listener of ``spec``: the namespace's first address of each family
    (not loopback, and for IPv6 not link-local), IPv4 first."""
    first: dict = {}
    for _, a in spec.net.local_addresses():
        if not a.ip.is_loopback and (a.version == 4 or not a.ip.is_link_local):
            first.setdefault(a.version, a.ip)
    return [first[v] for v in (4, 6) if v in first]


def _flows(env, clients, targets) -> list[tuple]:
    """The flows to follow, in order: (client, service namespace, packet, translated), each
    (client, address, protocol, port) once (every node's kube-proxy publishes the same service)."""
    from analyzer.netfilter.walk import Packet

    out, seen = [], set()
    # (client, 4) or (client, IPv6 destination) -> the source the client's kernel picks
    # (Namespace.source_address: IPv4 its first address; IPv6 by RFC 6724's rules, so a global
    # destination is not dialled from a link-local address listed first)
    sources: dict = {}
    for name, (addr, proto, port), who, translated in targets:
        for cname in [c for c in clients if c in who]:
            key = (cname, 4 if addr.version == 4 else addr)
            src = sources.get(key, False)
            if src is False:
                src = sources[key] = env.namespaces[cname].net.source_address(addr)
            if src is None or (cname == name and src == addr):
                continue
            key = (cname, addr, proto, port)
            if key in seen:
                continue
            seen.add(key)
            out.append((cname, name, Packet(addr.version, proto, src, addr, 40000, port), translated))
    return out


def _follow_one(world, cname: str, name: str, pkt, translated: bool):
    """One flow followed over every branch: (its coverage counts, the trips to keep or None,
    its findings)."""
    from analyzer.checks.nat import outcome_findings
    from analyzer.crosshost import follow_all

    outcomes = follow_all(world, cname, pkt)
    diags = outcome_findings(world, outcomes)
    c = {"flows": 1, "outcomes": len(outcomes),
         "branches_not_followed": sum(t.unfollowed for t in outcomes),
         "endpoints": len({(t.endpoint.dst, t.endpoint.dport) if t.endpoint is not None else None
                           for t in outcomes}),
         "requests_delivered": sum(t.request.end == "delivered" for t in outcomes),
         "replies_followed": sum(t.reply is not None for t in outcomes)}
    why = next((a for t in outcomes for a in _approximations(t)), None)
    c["approximate_flows"] = int(why is not None)
    c["approximate_examples"] = [] if why is None else [{"client": cname, "flow": pkt.tuple_str(), "why": str(why)}]
    ends = {t.request.end for t in outcomes}
    c["branches_left"] = 0 if ends <= {"left"} else sum(_left(t) for t in outcomes)
    if ends <= {"left"}:
        c["left_environment"] = 1
        return c, None, diags  # goes somewhere the environment does not describe
    if not (ends & {"delivered", "refused"}) and not diags:
        c["never_arrived"] = 1
        if not translated:
            c["unreachable_listeners"] = 1
            return c, None, diags  # this client cannot reach that listener at all: not asked
        # a translated service no branch of which reaches a listener anywhere
        diags = [_never_arrives(world, cname, name, outcomes)]
    return c, outcomes, diags


def _left(trip) -> bool:
    """Whether a branch went somewhere the environment does not describe (its request, its reply
    or a proxy's second leg left it)."""
    return trip.request.end == "left" or (trip.reply is not None and trip.reply.end == "left") or (
        trip.second_leg is not None and _left(trip.second_leg))


def _approximations(trip):
    """A trip's APPROXIMATE reasons (request, reply, a proxy's second leg) other than a match the
    walk cannot decide (an ``Assumption``): the walk followed such a match both ways, so every
    outcome the kernel can have is among the trips; the others (a target not modelled, a
    MASQUERADE address or NAT port guessed, a jump to an undefined chain, ...) stand in for what
    the kernel does."""
    from analyzer.netfilter.trace import Assumption

    for j in (trip.request, trip.reply):
        if j is not None:
            for h in j.hops:
                for a in h.approx:
                    if not isinstance(a, Assumption):
                        yield a
    if trip.second_leg is not None:
        yield from _approximations(trip.second_leg)


class _Followed(NamedTuple):
    """What a worker process sends back for a followed flow: its first trip's flow (all that
    the NAT checks read of the trips, see _emit) instead of the trips themselves."""

    flow: object


#: the state a forked worker inherits (set just before the pool forks)
_FORKED: dict = {}


def _follow_chunk(indices: list[int]) -> list[tuple]:
    world, flows = _FORKED["world"], _FORKED["flows"]
    out = []
    for i in indices:
        cname, name, pkt, translated = flows[i]
        c, outcomes, diags = _follow_one(world, cname, name, pkt, translated)
        out.append((i, c, None if outcomes is None else (_Followed(outcomes[0].flow),), diags))
    return out


#: below this many flows the walks stay in this process (a worker's start and its own memo cost more)
PARALLEL_MIN_FLOWS = 400


def _follow_targets(ctx, env, world, clients, targets, cov, trips) -> None:
    flows = _flows(env, clients, targets)
    cov["services"] = len({(p.dst, p.proto, p.dport) for _, _, p, _ in flows})
    cov["clients"] = len({c for c, _, _, _ in flows})
    progress = ctx.extra.get("progress")  # progress(i, n): the lint's bar, on a terminal
    jobs = int(ctx.extra.get("jobs") or 1)
    cilium = any(spec.cilium is not None for spec in env.namespaces.values())
    if jobs > 1 and len(flows) >= ctx.extra.get("parallel_min", PARALLEL_MIN_FLOWS) and not cilium:
        results = _follow_in_workers(world, flows, jobs, progress)
    else:
        results = []
        for i, (cname, name, pkt, translated) in enumerate(flows):
            if progress is not None and not i % 16:
                progress(i, len(flows))
            c, outcomes, diags = _follow_one(world, cname, name, pkt, translated)
            results.append((i, c, outcomes, diags))
    for i, c, outcomes, diags in results:
        for k, v in c.items():
            cov[k] += v
        del cov["approximate_examples"][10:]
        if outcomes is not None:
            cname, name = flows[i][:2]
            trips.append((cname, name, outcomes, diags))


def _follow_in_workers(world, flows, jobs: int, progress) -> list[tuple]:
    """The flows followed by ``jobs`` forked processes (each with a copy-on-write view of the
    parsed environment and its own memo of namespace walks), in chunks of interleaved flows so
    that the workers finish together; the results in the flows' order. The trips stay in the
    workers: each flow comes back as its coverage counts, its findings and its first trip's
    flow (the Cilium check reads whole trips: an environment with a Cilium node is followed in
    this process)."""
    import multiprocessing

    n = len(flows)
    size = max(1, min(64, n // (jobs * 8)))
    chunks = [list(range(k, n, (n + size - 1) // size)) for k in range((n + size - 1) // size)]
    _FORKED.update(world=world, flows=flows)
    out: list = [None] * n
    done = 0
    try:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for part in pool.imap_unordered(_follow_chunk, chunks):
                for r in part:
                    out[r[0]] = r
                done += len(part)
                if progress is not None:
                    progress(done, n)
    finally:
        _FORKED.clear()
    return out


def _never_arrives(world, cname: str, sname: str, outcomes) -> Diagnostic:
    from analyzer.checks.nat import _line, _translating_rule
    from analyzer.diagnostics import APPROXIMATE, EXACT, Related
    from analyzer.netfilter.trace import Kind

    flow = outcomes[0].flow
    fates = []
    for t in outcomes:
        r = t.request
        detail = r.detail
        if not detail and r.hops and r.hops[-1].steps:
            last = r.hops[-1].steps[-1]  # the verdict that ended it, as the trace prints it
            detail = f"{last.where}:{last.verdict}" + (f", line {last.line}" if last.line else "")
        fates.append(f"{_NEVER.get(r.end, r.end)} in '{r.end_ns}'" + (f" ({detail})" if detail else ""))
    fates = list(dict.fromkeys(fates))
    req = outcomes[0].request
    dnat = next((h for h in req.hops if h.ct is not None and h.ct.dnat), None)
    rule = _translating_rule(world, dnat) if dnat is not None else None
    span = rule.option_span(rule.target) if rule is not None and rule.target else None
    related = []
    if rule is not None:
        related.append(Related("destination translated here", rule.span))
    for t in outcomes:
        hop = t.request.hops[-1] if t.request.hops else None
        end = next((x for x in reversed(hop.steps) if x.rule is not None), None) if hop is not None else None
        if end is not None and end.kind in (Kind.DROP, Kind.REJECT):
            end_rule = end.rule
            if all(r.span != end_rule.span for r in related):
                related.append(Related("the request ends here", end_rule.span))
    approx = any(t.request.approximate for t in outcomes) or any(t.prob is None for t in outcomes)
    n = len(outcomes)
    msg = (f"client {flow.src} dialled {hostport(flow.dst, flow.dport)}, which '{sname}' translates, but the "
           f"request reaches no listener anywhere" + (f" on any of its {n} branches" if n > 1 else "")
           + ": it " + "; ".join(fates))
    return Diagnostic("NAT005", Severity.WARNING, msg, span,
                      "check the routes and filter rules toward the service's endpoints, and that the "
                      "endpoints' namespaces are in the environment", _line(world, span),
                      APPROXIMATE if approx else EXACT, tuple(related), flow.tuple_str(),
                      "request-never-arrives")


def _rules(world, hop):
    spec = world.env.namespaces[hop.namespace]
    rs = spec.ruleset if hop.packet_in.family == 4 else spec.ruleset6
    return rs.rules() if rs is not None else ()


def _emit(ctx: CheckContext, code: str) -> Iterator[Diagnostic]:
    seen = set()
    for cname, sname, trips, diags in environment_trips(ctx):
        flow = trips[0].flow
        for d in diags:
            if d.code != code:
                continue
            key = (cname, flow.dst, flow.dport, flow.proto)
            if key in seen:
                continue
            seen.add(key)
            yield Diagnostic(d.code, d.severity, f"[{cname} -> {sname}] {d.message}", d.span, d.hint,
                             d.source_line, d.confidence, d.related, d.witness, d.name)


@check(code="NAT001", name="reply-bypasses-translation", severity=Severity.ERROR)
def reply_bypasses_translation(ctx: CheckContext) -> Iterator[Diagnostic]:
    """The reply to a translated connection does not cross the conntrack entry that translated it.

    Why it matters: the client sees the reply from an address it never dialled and resets it;
    its SYN is retransmitted until the connect times out.
    Fix: SNAT/MASQUERADE the forward path, enable br_netfilter on the bridge, or route the reply
    back through the translating namespace.
    """
    yield from _emit(ctx, "NAT001")


@check(code="NAT002", name="reply-lost", severity=Severity.ERROR)
def reply_lost(ctx: CheckContext) -> Iterator[Diagnostic]:
    """The request is delivered but its reply never gets back to the client.

    Why it matters: the client retransmits and times out although the server answered.
    Fix: a return route toward the client, or accept the reply (ESTABLISHED) in the filter rules.
    """
    yield from _emit(ctx, "NAT002")


@check(code="NAT003", name="split-connection-second-leg-fails", severity=Severity.ERROR)
def split_connection(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A connection ends at a local proxy (REDIRECT/TPROXY) whose own connection onward fails.

    Why it matters: the client's handshake succeeds against the proxy, then the first data is
    reset when the proxy cannot reach the application (not listening, dropped, or redirected back
    into the proxy because the owner exemption is missing).
    Fix: start the application, correct the proxy's target, keep ``-m owner --uid-owner`` RETURN.
    """
    yield from _emit(ctx, "NAT003")


@check(code="NAT004", name="bridge-hairpin-off", severity=Severity.ERROR)
def bridge_hairpin_off(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A translated request must go back out of the bridge port it came in on, and that port is
    not in hairpin mode.

    Why it matters: the bridge drops the frame; the client's SYN is never answered (a pod calling
    its own service through kube-proxy on a CNI bridge without hairpinMode).
    Fix: turn hairpin mode on for the port (kubelet/CNI hairpinMode, `bridge link set dev PORT
    hairpin on`), or masquerade so the backend is reached some other way.
    """
    yield from _emit(ctx, "NAT004")


@check(code="NAT005", name="request-never-arrives", severity=Severity.WARNING)
def request_never_arrives(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A client's request to a translated service reaches no listener anywhere, on any branch.

    Why it matters: the service is published (DNAT/REDIRECT) but every connection to it is
    dropped, rejected or lost on the way: a route, a filter rule or a missing endpoint.
    Fix: the route or filter rule the message names; or describe the endpoint's namespace in the
    environment (a request that leaves the environment is counted as not covered, not flagged).
    """
    yield from _emit(ctx, "NAT005")
