"""Model layer: an environment as data, frozen: namespaces (each with its rulesets, its network
state and its listeners), the L2 segments joining them, which namespaces are clients, and the
example flows. Parsed by analyzer/parse/envfile.py; walked by crosshost.py."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping


@dataclass(frozen=True, slots=True)
class Listener:
    """A process listening in a namespace (``proxy_to``: it opens a second connection there)."""

    port: int
    proto: str = "tcp"
    address: str | None = None
    uid: int | None = None
    gid: int | None = None
    proxy_to: str | None = None  # "ADDR:PORT" the proxy connects to for each accepted client
    name: str | None = None


#: the protocol names of Cilium's frontends, by number
_CILIUM_PROTO = {6: "TCP", 17: "UDP", 132: "SCTP"}


@dataclass(frozen=True, eq=False)
class CiliumNode:
    """A namespace's ``cilium:`` key: the services of its dumps and the settings of its datapath.
    Defaults (docs/cilium.md): each setting comes from the status dump when one is given,
    otherwise the value that claims the least translation. The datapath stages that read it are
    in netfilter/cilium.py."""

    services: tuple = ()              # analyzer.model.services.Service (external and internal scope)
    status: object = None             # CiliumStatus
    node: str | None = None
    version: tuple | None = None
    socket_lb: bool = False
    socket_lb_hostns_only: bool = False
    per_packet_lb: bool = True
    nodeport: bool = False
    lb_mode: str = "snat"
    local_delivery: str = "bpf"       # bpf | stack (endpoint routes)
    endpoints: tuple = ()             # the node's interfaces that are pods' veths
    devices: tuple = ()               # the node's external devices (NodePort LB)
    dumps: tuple = ()
    parsed: tuple = ()                # the CiliumDump of each dump (for the CIL checks)
    files: tuple = ()                 # their SourceFiles (for the checks' source lines)

    @cached_property
    def index(self) -> Mapping:
        """(address, port, protocol) of each external frontend with backends -> its service (the
        first one a dump lists)."""
        out: dict = {}
        for s in self.services:
            if s.scope == "external" and s.backends:
                out.setdefault((s.frontend.address, s.frontend.port, s.frontend.protocol), s)
        return out

    def lookup(self, pkt, local_addr=None):
        """The service whose frontend is the packet's destination (protocol-less dumps match any).
        ``local_addr``: for traffic at a device, a NodePort/HostPort on 0.0.0.0/[::] matches any
        address of the node (the wildcard frontend, bpf_sock.c sock4_wildcard_lookup)."""
        try:
            dst = ipaddress.ip_address(str(pkt.dst))
        except ValueError:
            return None
        index = self.index
        proto = _CILIUM_PROTO.get(pkt.proto)
        svc = index.get((dst, pkt.dport, proto)) or index.get((dst, pkt.dport, None))
        if svc is None and local_addr is not None and local_addr(dst):
            any_ = ipaddress.ip_address("::" if dst.version == 6 else "0.0.0.0")
            svc = index.get((any_, pkt.dport, proto)) or index.get((any_, pkt.dport, None))
            if svc is not None and svc.type not in ("NodePort", "HostPort", None):
                svc = None
        return svc


@dataclass(frozen=True, slots=True, eq=False)
class NamespaceSpec:
    """One namespace of an environment: ``net`` its addresses, routes and sysctls (a
    netfilter.env.Namespace), its IPv4 and IPv6 rulesets (model.Ruleset or None), listeners, the
    dump files read for it, and ``cilium`` (a `CiliumNode`) on a Cilium node."""

    name: str
    net: object
    ruleset: object = None
    ruleset6: object = None
    listeners: tuple[Listener, ...] = ()
    dumps: tuple[str, ...] = ()
    cilium: object = None


@dataclass(frozen=True, slots=True)
class Segment:
    """An L2 segment: interfaces (``ns:iface``) that reach each other directly. A bridge segment
    lives in ``bridge_ns`` (its netfilter sees bridged frames when bridge-nf-call-iptables=1)."""

    name: str
    members: tuple[tuple[str, str], ...]
    bridge_ns: str | None = None
    bridge_iface: str | None = None
    # bridge ports in hairpin mode (a frame may leave by the port it came in on): True for all,
    # or the (ns, iface) members; Linux default off, kubelet/CNI "hairpinMode" turns it on
    hairpin: object = False


@dataclass(frozen=True, slots=True, eq=False)
class Environment:
    path: str
    namespaces: Mapping[str, NamespaceSpec]
    segments: tuple[Segment, ...]
    diagnostics: tuple = ()
    clients: tuple[str, ...] = ()   # namespaces lint uses as clients (default: all)
    examples: tuple = ()            # ({from, flow, uid?}, ...) flows worth explaining

    def segment_of(self, ns: str, iface: str | None) -> Segment | None:
        for s in self.segments:
            if (ns, iface) in s.members or (s.bridge_ns == ns and s.bridge_iface == iface):
                return s
        return None
