"""Model layer: an environment as data, frozen: namespaces (each with its rulesets, its network
state and its listeners), the L2 segments joining them, which namespaces are clients, and the
example flows. Parsed by analyzer/parse/envfile.py; walked by crosshost.py."""
from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True, eq=False)
class NamespaceSpec:
    """One namespace of an environment: ``net`` its addresses, routes and sysctls (a
    netfilter.env.Namespace), its IPv4 and IPv6 rulesets (model.Ruleset or None), listeners, the
    dump files read for it, and ``cilium`` (a netfilter.cilium.CiliumNode) on a Cilium node."""

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
