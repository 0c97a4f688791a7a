"""Model layer: Cilium's load-balancer state as frozen data (services, frontends, backends,
reverse-NAT entries, the agent's status), whichever dump it was read from.

One shape for every input: ``cilium service list`` (text or JSON), ``cilium bpf lb list``, the
statedb tables (``db/show frontends|services|backends``) and the map dumps of Cilium's own tests.
A fact a dump does not show is ``None`` (unknown), never a default: the 2018 service list has no
protocol, a ``bpf lb list`` no traffic policy, a 1.10 JSON dump no backend state.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from analyzer.source import Span

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Backend states as Cilium names them (pkg/loadbalancer BackendState): only 'active' takes new
# connections; 'terminating' keeps the connections it has, 'quarantined' failed a health check,
# 'maintenance' was set by the operator (cilium service update --states).
BACKEND_STATES = ("active", "terminating", "quarantined", "maintenance")
# Service types as the service list prints them (pkg/loadbalancer SVCType).
SERVICE_TYPES = ("ClusterIP", "NodePort", "ExternalIPs", "HostPort", "LoadBalancer", "LocalRedirect")
EXTERNAL_TYPES = frozenset({"NodePort", "ExternalIPs", "LoadBalancer", "HostPort"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An address, port and protocol as Cilium prints them (``10.0.0.1:80/TCP``, ``[f00d::1]:80``).

    ``protocol`` is None when the dump does not say (service lists before 1.15, ``bpf lb list``
    before 1.16, JSON of 1.10); ``ANY`` is the wildcard entry of a ClusterIP (port 0).

    >>> str(Endpoint(ipaddress.ip_address("f00d::1"), 80, "TCP"))
    '[f00d::1]:80/TCP'
    >>> str(Endpoint(ipaddress.ip_address("10.0.0.1"), 53, None))
    '10.0.0.1:53'
    """

    address: IPAddress
    port: int
    protocol: str | None = None

    def __str__(self) -> str:
        a = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{a}:{self.port}" + (f"/{self.protocol}" if self.protocol else "")

    @property
    def is_wildcard(self) -> bool:
        """0.0.0.0 / [::] frontends: a NodePort on every node address (Cilium expands them)."""
        return self.address.is_unspecified


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend of one frontend. ``index`` is the number the service list prints before
    ``=>`` (or the map slot); ``state`` None = the dump does not say (not: active)."""

    endpoint: Endpoint
    state: str | None = None
    weight: int | None = None
    node: str | None = None
    preferred: bool | None = None
    index: int | None = None
    backend_id: int | None = None
    span: Span | None = None

    @property
    def active(self) -> bool | None:
        return None if self.state is None else self.state == "active"


@dataclass(frozen=True, slots=True)
class Service:
    """One frontend and its backends: what Cilium translates, and how.

    ``scope`` is ``external`` or ``internal`` (the ``/i`` frontend that a service with two
    traffic-policy scopes gets). ``ext_policy``/``int_policy`` are ``Cluster``/``Local`` or None
    when the dump does not show them. ``source_ranges`` None = unknown; () = none configured
    (every source admitted). ``flags`` are the bpf map's flags as printed (``non-routable``,
    ``two-scopes``, ``Local``, ``InternalLocal``, ``check source-range``, ``46x64`` ...).
    """

    frontend: Endpoint
    type: str | None
    backends: tuple[Backend, ...] = ()
    id: int | None = None
    scope: str = "external"
    name: str | None = None            # namespace/name
    port_name: str | None = None
    ext_policy: str | None = None
    int_policy: str | None = None
    source_ranges: tuple[IPNetwork, ...] | None = None
    flags: frozenset = frozenset()
    revnat_id: int | None = None
    l7_proxy_port: int | None = None
    span: Span | None = None

    @property
    def key(self) -> tuple:
        """What makes two frontends the same one to the datapath: address, port, protocol, scope."""
        return (self.frontend.address, self.frontend.port, self.frontend.protocol, self.scope)

    @property
    def label(self) -> str:
        fe = str(self.frontend) + ("/i" if self.scope == "internal" else "")
        ident = f"service {self.id} " if self.id is not None else "service "
        return f"{ident}{fe}" + (f" ({self.type})" if self.type else "")


@dataclass(frozen=True, slots=True)
class RevNat:
    """A reverse-NAT entry: replies from a backend of service ``id`` get this frontend as source."""

    id: int
    frontend: Endpoint
    span: Span | None = None


@dataclass(frozen=True, slots=True)
class TableBackend:
    """A row of the statedb backends table: a backend address, the services using it, its node."""

    endpoint: Endpoint
    services: tuple[str, ...] = ()
    node: str | None = None
    state: str | None = None
    span: Span | None = None


@dataclass(frozen=True, slots=True)
class NodeAddress:
    """A row of the statedb node-addresses table: where NodePort frontends are expanded."""

    address: IPAddress
    nodeport: bool
    primary: bool
    device: str | None
    span: Span | None = None


@dataclass(frozen=True, slots=True)
class CiliumStatus:
    """What ``cilium status [--verbose]`` says about load-balancing. None = not in the dump.

    ``kpr``: KubeProxyReplacement as printed (True/False/Strict/Partial/Probe/Disabled);
    ``socket_lb``: socket-level LB at connect() (``Socket LB`` since 1.12, ``HostReachableServices``
    before); ``socket_lb_hostns_only``: ``Socket LB Coverage: Hostns-only`` (pods' own sockets
    are then not translated at connect); ``lb_mode``: SNAT/DSR/Hybrid; ``host_routing``:
    Legacy/BPF.
    """

    version: str | None = None
    kpr: str | None = None
    socket_lb: bool | None = None
    socket_lb_hostns_only: bool | None = None
    lb_mode: str | None = None
    host_routing: str | None = None
    masquerading: str | None = None
    devices: tuple[str, ...] = ()
    nat46x64: bool | None = None
    services_enabled: tuple[tuple[str, bool], ...] = ()
    span: Span | None = None


@dataclass(frozen=True, slots=True)
class Listing:
    """One table as the command printed it: a ``service list``, a ``bpf lb list``, a statedb
    table, a map dump, a JSON service list or a status report. A transcript with three
    ``service list`` runs holds three listings (three moments, not three copies of one)."""

    kind: str                       # service-list, service-get, bpf-lb-list, revnat, json,
                                    # frontends, services, backends, node-addresses, lbmaps, status
    services: tuple[Service, ...] = ()
    backends: tuple[TableBackend, ...] = ()
    revnat: tuple[RevNat, ...] = ()
    node_addresses: tuple[NodeAddress, ...] = ()
    status: CiliumStatus | None = None
    section: str | None = None      # txtar section name (lb-testdata)
    span: Span | None = None
    service_meta: tuple = ()        # statedb services table rows: (name, policies, ranges, flags)


@dataclass(frozen=True, slots=True)
class CiliumDump:
    """Everything read from one file, listing by listing, in file order."""

    path: str
    format: str
    listings: tuple[Listing, ...] = field(default_factory=tuple)

    @property
    def services(self) -> tuple[Service, ...]:
        return tuple(s for lst in self.listings for s in lst.services)

    @property
    def status(self) -> CiliumStatus | None:
        for lst in self.listings:
            if lst.status is not None:
                return lst.status
        return None
