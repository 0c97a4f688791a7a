"""Checks layer: Cilium service tables (CIL codes), read from a service list, a bpf lb list, the
statedb tables or a JSON dump alone.

The checks read ``ctx.extra["cilium"]``: a tuple of :class:`~analyzer.model.services.CiliumDump`
(nothing there: they yield nothing). ``ctx.extra["node"]`` is the node the dumps were taken on,
when the user says (``--node``); without it, CIL004 judges only what the dump itself shows.

Datapath facts the checks rely on (cilium/cilium bpf/lib/lb.h, read at commit 0040d667, the
``lb4_*`` twins of the ``lb6_*`` functions named): ``lb6_lookup_service`` returns no service when
the frontend's backend count is 0, so a frontend without backends is never translated;
``lb6_src_range_ok`` admits a source only if the LPM map holds a range for the service's
rev-NAT id, so a service that checks source ranges and has none of its family admits nothing.
"""
from __future__ import annotations

from typing import Iterator

from analyzer.checks import CheckContext, check
from analyzer.diagnostics import APPROXIMATE, Related, Severity
from analyzer.model.services import EXTERNAL_TYPES, Service

_UNUSABLE = ("terminating", "quarantined", "maintenance")


def service_tables(ctx: CheckContext):
    """Each listing's services as one table: (listing, services). The statedb frontends table is
    completed from the services and backends tables of the same dump (or of the other inputs)."""
    from analyzer.parse.cilium import join_statedb

    dumps = ctx.extra.get("cilium") or ()
    meta = next((lst for d in dumps for lst in d.listings if lst.kind == "services"), None)
    bes = next((lst for d in dumps for lst in d.listings if lst.kind == "backends"), None)
    for d in dumps:
        for lst in d.listings:
            if lst.kind == "frontends":
                # in a txtar archive the tables of one moment share a suffix (frontends_x.table
                # with services_x.table); otherwise take the first services/backends table
                yield lst, join_statedb(lst, _sibling(d, lst, "services") or meta,
                                        _sibling(d, lst, "backends") or bes)
            elif lst.services:
                yield lst, lst.services


def _sibling(dump, lst, kind):
    if lst.section is None:
        return None
    suffix = lst.section.split("frontends", 1)[-1]
    for other in dump.listings:
        if other.kind == kind and other.section and other.section.endswith(suffix):
            return other
    return None


def _exempt(s: Service) -> bool:
    # an L7 load-balancer frontend hands its traffic to the proxy: it has no backends of its own
    return "l7-load-balancer" in s.flags or s.l7_proxy_port is not None


def _internal_sibling(services) -> dict:
    return {(s.frontend.address, s.frontend.port, s.frontend.protocol): s
            for s in services if s.scope == "internal"}


@check(code="CIL001", name="service-without-backends", severity=Severity.WARNING)
def service_without_backends(ctx: CheckContext) -> Iterator:
    """A frontend with no backend at all: Cilium does not translate it.

    Why it matters: ``lb4_lookup_service`` (bpf/lib/lb.h) returns no service when the frontend's
    backend count is 0, so connections to the VIP are dropped or go unanswered instead of
    reaching a pod; clients see timeouts or resets.
    Fix: check the service's selector and its EndpointSlices (``kubectl get endpointslices -l
    kubernetes.io/service-name=NAME``); pods that are not ready are not backends.
    """
    for lst, services in service_tables(ctx):
        internal = _internal_sibling(services)
        for s in services:
            # a NAT46/64 frontend's backends live in the other family's map (bpf lb list shows
            # the IPv4 map only)
            if s.backends or _exempt(s) or "46x64" in s.flags:
                continue
            sib = internal.get((s.frontend.address, s.frontend.port, s.frontend.protocol))
            if s.scope == "external" and sib is not None and sib.backends:
                continue  # eTP=Local without a local backend: CIL004 says so
            yield ctx.diag("CIL001", f"{s.label} has no backend: Cilium does not translate it and "
                           "new connections to it fail", s.span,
                           "check the service's selector and whether its pods are ready")


@check(code="CIL002", name="duplicate-frontend", severity=Severity.ERROR)
def duplicate_frontend(ctx: CheckContext) -> Iterator:
    """Two entries of one listing with the same frontend (address, port, protocol, scope).

    Why it matters: the BPF service map has one entry per frontend, so only one of the two
    backend sets is used; which one depends on the order the agent wrote them.
    Fix: find the two services claiming the address (``kubectl get svc -A -o wide``): two
    LoadBalancer services given the same IP, or an ExternalIP equal to another service's IP.
    """
    for lst, services in service_tables(ctx):
        seen: dict = {}
        for s in services:
            k = s.key
            if k in seen:
                first = seen[k]
                unsure = s.frontend.protocol is None
                yield ctx.diag(
                    "CIL002", f"{s.label} repeats the frontend of {first.label}"
                    + (" (the dump shows no protocol: they may be TCP and UDP)" if unsure else ""),
                    s.span, "give each service its own address or port",
                    related=(Related("first defined here", first.span),) if first.span else (),
                    confidence=APPROXIMATE if unsure else "EXACT")
            else:
                seen[k] = s


@check(code="CIL003", name="no-active-backend", severity=Severity.WARNING)
def no_active_backend(ctx: CheckContext) -> Iterator:
    """A frontend whose backends are all terminating, quarantined or in maintenance.

    Why it matters: Cilium selects only active backends for new connections (terminating ones
    keep the connections they already have), so new connections find no backend.
    Fix: bring a backend back (``cilium service update --backends ADDR --states active`` for
    maintenance), or look at why the pods are terminating or failing health checks.
    """
    for lst, services in service_tables(ctx):
        for s in services:
            if not s.backends or any(b.state in (None, "active") for b in s.backends):
                continue
            states = ", ".join(f"{b.endpoint} {b.state}" for b in s.backends)
            yield ctx.diag("CIL003", f"{s.label} has no active backend ({states})", s.span,
                           "new connections need an active backend")


@check(code="CIL004", name="local-policy-no-local-backend", severity=Severity.WARNING)
def local_policy_no_local_backend(ctx: CheckContext) -> Iterator:
    """An external frontend (NodePort, ExternalIP, LoadBalancer) with eTP=Local and no local backend.

    externalTrafficPolicy=Local, and none of the backends runs on this node.

    Why it matters: with ``Local`` the node forwards external traffic only to its own backends
    (and keeps the client's address); with none, traffic that the outside sends to this node is
    dropped, while the service still answers on other nodes, which looks like a flaky service.
    Fix: send external traffic only to nodes with a backend (the load balancer's health check
    on the service's healthCheckNodePort does that), or use ``externalTrafficPolicy: Cluster``.
    """
    node = ctx.extra.get("node")
    for lst, services in service_tables(ctx):
        internal = _internal_sibling(services)
        for s in services:
            if s.scope != "external" or (s.type is not None and s.type not in EXTERNAL_TYPES) or _exempt(s):
                continue
            sib = internal.get((s.frontend.address, s.frontend.port, s.frontend.protocol))
            if not s.backends and sib is not None and sib.backends:
                # two scopes: the /i frontend has backends the external one lacks, so the
                # external scope is Local and none of the backends runs here
                yield ctx.diag("CIL004", f"{s.label} is externalTrafficPolicy=Local with no backend "
                               f"on this node (its internal frontend {sib.label} has "
                               f"{len(sib.backends)})", s.span,
                               "external traffic to this node for it is dropped",
                               related=(Related("internal-scope frontend", sib.span),) if sib.span else ())
                continue
            if node is None or s.ext_policy != "Local" or not s.backends:
                continue
            if any(b.node is None for b in s.backends):
                continue  # the dump does not say where the backends run
            if not any(b.node == node for b in s.backends):
                where = ", ".join(sorted({b.node for b in s.backends}))
                yield ctx.diag("CIL004", f"{s.label} is externalTrafficPolicy=Local and none of its "
                               f"backends runs on node {node} (they run on {where})", s.span,
                               "external traffic to this node for it is dropped")


@check(code="CIL005", name="source-ranges-admit-nothing", severity=Severity.ERROR)
def source_ranges_admit_nothing(ctx: CheckContext) -> Iterator:
    """A frontend that checks source ranges but has no range of its own address family.

    Why it matters: ``lb4_src_range_ok``/``lb6_src_range_ok`` (bpf/lib/lb.h) admit a client only
    if the source-range map holds a prefix covering it for the service's rev-NAT id; with no
    prefix of the frontend's family every client is dropped.
    Fix: add the clients' ranges of that family to ``loadBalancerSourceRanges`` (both families
    for a dual-stack service), or remove the list to admit every source.
    """
    for lst, services in service_tables(ctx):
        for s in services:
            if s.source_ranges is None:
                continue
            checked = "check source-range" in s.flags or (
                s.source_ranges and s.type in ("LoadBalancer", "ExternalIPs"))
            if not checked:
                continue
            fam = [r for r in s.source_ranges if r.version == s.frontend.address.version]
            if fam:
                continue
            other = ", ".join(str(r) for r in s.source_ranges) or "none"
            yield ctx.diag("CIL005", f"{s.label} checks source ranges but has none of IPv"
                           f"{s.frontend.address.version} (ranges: {other}): every client is dropped",
                           s.span, f"add the clients' IPv{s.frontend.address.version} ranges to "
                           "loadBalancerSourceRanges")



def run_cilium_checks(ctx: CheckContext, select=None, ignore=None) -> list:
    """Only the CIL checks: the dump checks of the other families need an iptables ruleset."""
    from analyzer.checks import load_all, selected

    out = []
    for code, info in sorted(load_all().items()):
        if code.startswith("CIL") and selected(code, info.name, select, ignore):
            out.extend(info.func(ctx))
    return out


@check(code="CIL006", name="known-cilium-defect-possible", severity=Severity.INFO)
def known_cilium_defect_possible(ctx: CheckContext) -> Iterator:
    """A connection takes a path a known Cilium defect breaks, and the node's version is unknown.

    Why it matters: the walk models the datapath as Cilium documents it; some versions break this
    very path (the table in analyzer/netfilter/cilium.py, docs/cilium.md), e.g. cilium#9285: a pod
    reaching an ExternalIP whose backend is on its own node gets the SYN+ACK from the PodIP and
    resets. Whether it happens depends on the version, which the service dumps do not show.
    Fix: give the node's version (a `cilium status` dump among `cilium.dumps`, or `cilium.version`)
    so that lint can decide; upgrade past the fixed version named in the message.
    """
    from analyzer.checks.reply import environment_trips
    from analyzer.netfilter.trace import Cilium, Kind

    if ctx.extra.get("env") is None:
        return
    seen = set()
    for cname, sname, trips, _ in environment_trips(ctx):
        for t in trips:
            for j in (t.request, t.reply):
                for h in (j.hops if j is not None else ()):
                    for s in h.steps:
                        if s.kind is not Kind.CILIUM or s.fact is not Cilium.KNOWN_DEFECT:
                            continue
                        issue = s.value.issue
                        if (h.namespace, issue) in seen:
                            continue
                        seen.add((h.namespace, issue))
                        yield ctx.diag("CIL006", f"[{cname} -> {sname}] node '{h.namespace}', version unknown: "
                                       f"{t.flow.tuple_str()} takes the path {issue} breaks in some versions "
                                       f"({s.value.symptom})", None, s.note,
                                       witness=t.flow.tuple_str())
