"""Netfilter layer: one network namespace's addresses, routes and sysctls (what routing and
``addrtype``/MASQUERADE/REDIRECT depend on)."""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field, replace

from analyzer.engine.concolic import in_network


class EnvError(ValueError):
    pass


_BR_STATES = ("UP", "DOWN", "UNKNOWN", "LOWERLAYERDOWN", "DORMANT", "NOTPRESENT", "TESTING")
_SKIPPED_ROUTE_TYPES = ("broadcast", "multicast", "anycast", "throw", "nat", "nexthop")


@dataclass(frozen=True, slots=True)
class Route:
    dest: ipaddress.IPv4Network | ipaddress.IPv6Network
    dev: str | None
    via: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    kind: str = "unicast"  # unicast | local | blackhole | unreachable | prohibit
    src: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    metric: int = 0

    def render(self) -> str:
        s = f"{self.dest}" if self.kind == "unicast" else f"{self.kind} {self.dest}"
        if self.via:
            s += f" via {self.via}"
        if self.dev:
            s += f" dev {self.dev}"
        return s


@dataclass(frozen=True, slots=True)
class RouteResult:
    kind: str  # local | unicast | blackhole | unreachable | prohibit | none
    oif: str | None
    via: object | None
    route: Route | None
    #: ``route.render()``, computed once: results are cached per destination, and every forwarded
    #: packet's route step shows it (formatting the addresses each time was ~2% of a 10,000-service
    #: environment lint)
    text: str | None = field(default=None, compare=False)


def _common_prefix(a, b) -> int:
    x = int(a) ^ int(b)
    return a.max_prefixlen - x.bit_length()


#: the kernel's default IPv6 address label table (net/ipv6/addrlabel.c, RFC 6724 section 2.1),
#: longest prefix first: source address selection prefers a source whose label is the destination's
_LABELS = tuple((ipaddress.ip_network(n), label) for n, label in (
    ("::1/128", 0), ("::/96", 3), ("::ffff:0:0/96", 4), ("2001::/32", 6), ("2001:10::/28", 7),
    ("2002::/16", 2), ("3ffe::/16", 12), ("fec0::/10", 11), ("fc00::/7", 5), ("::/0", 1)))


def _label(ip) -> int:
    return next(label for net, label in _LABELS if ip in net)


def _scope(ip) -> int:
    """An IPv6 unicast address's scope as the kernel counts it (__ipv6_addr_src_scope): link-local
    2, site-local (fec0::/10) 5, anything else global 14 (ULAs included)."""
    return 2 if ip.is_link_local else 5 if ip.is_site_local else 14


@dataclass
class Namespace:
    """Addresses per interface and a main routing table; sysctls that change the path."""

    name: str = "host"
    addrs: dict[str, list] = field(default_factory=dict)  # iface -> [ip_interface]
    routes: list[Route] = field(default_factory=list)
    sysctls: dict[str, int] = field(default_factory=dict)
    bridged: dict[str, str] = field(default_factory=dict)  # port iface -> bridge
    ipsets: dict = field(default_factory=dict)  # name -> analyzer.parse.ipset.IpSet (`ipset save`)
    # caches of the queries below (a node may hold hundreds of addresses and routes, and an
    # environment walk asks the same questions for every flow); add_addr/add_route reset them
    _local: frozenset | None = field(default=None, repr=False, compare=False)
    _routes_by_dst: dict = field(default_factory=dict, repr=False, compare=False)
    # explain's peer model: the route back to the flow's client (``explain._with_client_route``),
    # matched by `_client_match` (the client's address may be an open one), and the flow's
    # source addresses as (lo, hi) ints (set on an open explain's namespace by symbolic.py)
    client_route: Route | None = field(default=None, repr=False, compare=False)
    client: object = field(default=None, repr=False, compare=False)
    flow_sources: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def known(self) -> bool:
        return bool(self.addrs or self.routes)

    def add_addr(self, cidr: str, iface: str):
        try:
            a = ipaddress.ip_interface(cidr)
        except ValueError:
            raise EnvError(f"invalid address '{cidr}' (expected CIDR like 10.0.0.1/24)") from None
        self.addrs.setdefault(iface, []).append(a)
        self._local = None
        self._routes_by_dst.clear()
        # the kernel adds the connected route and the local route for each address (one
        # connected route per prefix and device: a second address in the subnet adds none)
        if a.network.prefixlen < a.max_prefixlen and not any(
                r.dest == a.network and r.dev == iface and r.via is None and r.kind == "unicast"
                for r in self.routes):
            self.routes.append(Route(a.network, iface, None, "unicast", a.ip))

    def add_route(self, spec: str):
        words = spec.split()
        if not words:
            raise EnvError("empty route")
        kind = "unicast"
        if words[0] in ("blackhole", "unreachable", "prohibit", "local", "unicast"):
            kind, words = words[0], words[1:]
        if not words:
            raise EnvError(f"route '{spec}' has no destination")
        dest = words[0]
        if dest == "default":
            dest = "::/0" if any(":" in w for w in words) else "0.0.0.0/0"
        try:
            net = ipaddress.ip_network(dest, strict=False)
        except ValueError:
            raise EnvError(f"invalid route destination '{words[0]}' in '{spec}'") from None
        via = dev = src = None
        metric = 0
        it = iter(words[1:])
        for w in it:
            try:
                if w == "via":
                    via = ipaddress.ip_address(next(it))
                elif w == "dev":
                    dev = next(it)
                elif w == "src":
                    src = ipaddress.ip_address(next(it))
                elif w == "metric":
                    metric = int(next(it))
            except (StopIteration, ValueError):
                raise EnvError(f"malformed route '{spec}' near '{w}'") from None
        self.routes.append(Route(net, dev, via, kind, src, metric))
        self._routes_by_dst.clear()

    def load_iproute(self, addr_text: str, route_text: str | None):
        """``ip addr`` and ``ip route`` output as printed (also ``-o``/``-br``), or ``ip -j`` JSON."""
        if addr_text.lstrip().startswith("[") and (route_text is None or not route_text.strip()
                                                   or route_text.lstrip().startswith("[")):
            return self.load_iproute_json(addr_text, route_text)
        n = self._load_ip_addr_text(addr_text)
        if n == 0:
            raise EnvError("no address found: expected the output of `ip addr` (or `ip -j addr`)")
        if route_text:
            self._load_ip_route_text(route_text)

    def _load_ip_addr_text(self, text: str) -> int:
        r"""``ip addr``: ``N: IFACE[@PEER]: <FLAGS> ...`` then ``inet CIDR ... [peer P/N]`` lines;
        ``ip -o addr``: one ``N: IFACE inet CIDR ...`` per line; ``ip -br addr``: ``IFACE STATE CIDR...``.

        >>> ns = Namespace(); ns._load_ip_addr_text(
        ...     "2: eth0@if7: <BROADCAST,UP> mtu 1500\n    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\n")
        1
        >>> ns.addrs["eth0"][0]
        IPv4Interface('10.0.0.5/24')
        """
        iface, n = None, 0
        for raw in text.splitlines():
            words = raw.split()
            if not words:
                continue
            if re.match(r"\d+:$", words[0]) and len(words) > 1:
                iface = words[1].rstrip(":").split("@")[0]
                words = words[2:] if words[1].endswith(":") else words[2:]
                if not words or words[0].startswith("<"):
                    continue
            elif len(words) >= 3 and words[1] in _BR_STATES and not raw[0].isspace():
                for w in words[2:]:
                    if "/" in w:
                        self.add_addr(w, words[0].split("@")[0])
                        n += 1
                continue
            if words[0] in ("inet", "inet6") and len(words) > 1 and iface:
                cidr = words[1]
                if "peer" in words[:4] and words.index("peer") + 1 < len(words):
                    cidr = words[1].split("/")[0] + "/" + ("32" if words[0] == "inet" else "128")
                self.add_addr(cidr, iface)
                n += 1
        return n

    def _load_ip_route_text(self, text: str) -> None:
        """``ip route`` / ``ip -6 route`` lines (main table; other tables and types are skipped)."""
        for raw in text.splitlines():
            words = raw.split()
            if not words or raw[0].isspace() or words[0] in _SKIPPED_ROUTE_TYPES:
                continue
            if "table" in words and words[words.index("table") + 1:][:1] not in (["main"], []):
                continue
            self.add_route(" ".join(words))

    def load_iproute_json(self, addr_json: str, route_json: str | None):
        """``ip -j addr`` and ``ip -j route`` output."""
        try:
            for link in json.loads(addr_json):
                for ai in link.get("addr_info", []):
                    if "local" in ai and "prefixlen" in ai:
                        self.add_addr(f"{ai['local']}/{ai['prefixlen']}", link.get("ifname", "?"))
            if route_json:
                for r in json.loads(route_json):
                    dst = r.get("dst", "")
                    if r.get("table") not in (None, "main"):
                        continue
                    spec = (r.get("type", "") + " " if r.get("type") in ("blackhole", "unreachable", "prohibit") else "") + dst
                    if r.get("gateway"):
                        spec += f" via {r['gateway']}"
                    if r.get("dev"):
                        spec += f" dev {r['dev']}"
                    self.add_route(spec)
        except (json.JSONDecodeError, AttributeError, TypeError) as e:
            raise EnvError(f"not `ip -j addr`/`ip -j route` JSON: {e}") from None

    # -- queries the netfilter model asks
    def local_addresses(self):
        for iface, lst in self.addrs.items():
            for a in lst:
                yield iface, a

    def is_local(self, addr) -> bool:
        if type(addr) is ipaddress.IPv4Address:  # 127.0.0.0/8 by its integer (is_loopback: a network test)
            if addr._ip >> 24 == 127:
                return True
        elif addr.is_loopback:
            return True
        if self._local is None:
            self._local = frozenset(a.ip for _, a in self.local_addresses())
        return addr in self._local

    def primary_address(self, iface: str | None, family: int, toward=None):
        """MASQUERADE's choice: the route's preferred source, else the first address of the
        interface (in the destination's subnet when there is one)."""
        lst = [a for a in self.addrs.get(iface or "", []) if a.version == family]
        if toward is not None:
            for a in lst:
                if toward in a.network:
                    return a.ip
        return lst[0].ip if lst else None

    def masquerade_address(self, iface: str | None, family: int, toward=None):
        """MASQUERADE's source: ``inet_select_addr(out, nexthop, RT_SCOPE_UNIVERSE)``. A primary
        address of the output interface (the one whose subnet holds the next hop, else the first);
        if it has none of universe scope (``lo``: 127.0.0.1 is host scope), the first primary
        universe-scope address of the namespace's interfaces in kernel order (ifindex: the order
        ``ip -j addr`` lists them and addresses are given in). None: no such address known.

        >>> ns = Namespace(); ns.add_addr("127.0.0.1/8", "lo"); ns.add_addr("192.168.1.5/24", "eth0")
        >>> ns.add_addr("172.17.0.1/16", "docker0")
        >>> ns.masquerade_address("lo", 4), ns.masquerade_address("docker0", 4)
        (IPv4Address('192.168.1.5'), IPv4Address('172.17.0.1'))
        """
        def universe(iface_addrs):
            seen = []
            for a in iface_addrs:
                if a.version != family:
                    continue
                if family == 4 and any(a.ip in b.network for b in seen):
                    continue  # a secondary address (IFA_F_SECONDARY) is never picked
                seen.append(a)
                if not (a.ip.is_loopback or (family == 6 and a.ip.is_link_local)):
                    yield a

        own = list(universe(self.addrs.get(iface or "", [])))
        if own:
            if toward is not None:
                for a in own:
                    if toward in a.network:
                        return a.ip
            return own[0].ip
        if iface is None:
            return None
        if family == 6:
            # ipv6_dev_get_saddr (RFC 6724) over every interface: the destination itself if it
            # is ours (rule 1), else the longest common prefix with it (rule 8)
            cands = [a.ip for lst in self.addrs.values() for a in universe(lst)]
            if not cands:
                return None
            if toward is None or toward.version != 6:
                return cands[0]
            return max(cands, key=lambda ip: (ip == toward, _common_prefix(ip, toward)))
        for lst in self.addrs.values():
            for a in universe(lst):
                return a.ip
        return None

    def source_address(self, dst):
        """The source a local process's connection to ``dst`` gets when it binds none. IPv6:
        ``ipv6_dev_get_saddr``'s rules (RFC 6724 section 5) in its order over the namespace's
        addresses: the destination itself (1), the appropriate scope (2: a global or ULA
        destination never gets a link-local source while the namespace has a larger one), the
        route's output interface (5), the destination's label (6), the longest common prefix,
        capped at the address's prefix length (8); a link-local destination takes only the output
        interface's addresses. Equal on every rule: the first listed (the kernel takes the first
        it meets, in interface and address order). A route's ``src`` is not read for IPv6.
        IPv4 (fib_result_prefsrc): a local destination is its own source; else the route's
        ``src``; else inet_select_addr on the output interface: its first address in the subnet of
        the next hop (the gateway, or the destination itself), else its first address; an
        interface without one: the first address of any other (not loopback). None: no address.

        >>> ns = Namespace(); ns.add_addr("fe80::c/64", "eth0"); ns.add_addr("2001:db8:1::2/64", "eth0")
        >>> ns.add_route("default via 2001:db8:1::1 dev eth0")
        >>> str(ns.source_address(ipaddress.ip_address("2001:db8:2::3")))
        '2001:db8:1::2'
        >>> str(ns.source_address(ipaddress.ip_address("fe80::1")))
        'fe80::c'
        >>> ns.add_addr("10.9.0.2/24", "eth1"); ns.add_addr("10.7.0.2/24", "eth0"); ns.add_addr("10.0.1.2/24", "eth0")
        >>> ns.add_route("default via 10.0.1.1 dev eth0"); ns.add_route("10.5.0.0/16 via 10.0.1.1 dev eth0 src 10.7.0.2")
        >>> [str(ns.source_address(ipaddress.ip_address(d))) for d in ("8.8.8.8", "10.5.0.9", "10.9.0.7", "10.7.0.2")]
        ['10.0.1.2', '10.7.0.2', '10.9.0.2', '10.7.0.2']
        """
        if dst.version == 4:
            r = self.route(dst)
            if r.kind == "local":
                return dst
            if r.kind == "unicast":
                if r.route is not None and r.route.src is not None:
                    return r.route.src
                hop = r.via or dst
                on = [a for a in self.addrs.get(r.oif, ()) if a.version == 4 and not a.ip.is_loopback]
                if on:
                    return next((a.ip for a in on if hop in a.network), on[0].ip)
            return next((a.ip for _, a in self.local_addresses() if a.version == 4 and not a.ip.is_loopback), None)
        cands = [(iface, a) for iface, a in self.local_addresses() if a.version == 6 and not a.ip.is_loopback]
        if not cands:
            return None
        oif = self.route(dst).oif
        if dst.is_link_local or dst.is_multicast:  # only the output interface's link
            cands = [(iface, a) for iface, a in cands if iface == oif] or cands
        d, label = _scope(dst), _label(dst)

        def score(i_c):
            i, (iface, a) = i_c
            s = _scope(a.ip)
            return (a.ip == dst, -s if s >= d else s - 128, iface == oif, _label(a.ip) == label,
                    min(_common_prefix(a.ip, dst), a.network.prefixlen), -i)
        return max(enumerate(cands), key=score)[1][1].ip

    def route(self, dst) -> RouteResult:
        hit = self._routes_by_dst.get(dst)
        if hit is None:
            if len(self._routes_by_dst) > 65536:
                self._routes_by_dst.clear()
            hit = self._routes_by_dst[dst] = self._route(dst)
        return hit

    def _client_match(self, dst) -> bool:
        """Whether ``dst`` is the client's address (explain's peer model routes it back on the
        input interface). Exact for an open client address: the client's own open address always
        is; another open address is noted outside the flow's sources when it lies there (so no
        packet of its class is its own client); inside them, whether it equals the client's
        address is a comparison of two open fields, which no class can hold: the witness's answer
        is taken and the class is APPROXIMATE (said)."""
        from analyzer.engine.concolic import active, is_sym, plain

        c = self.client
        if dst.version != c.version:
            return False
        ds, cs = is_sym(dst._ip), is_sym(c._ip)
        if ds is None or cs is None:
            return dst == c  # one side fixed: a one-field decision (noted when the other is open)
        if (ds.field, ds.keep, ds.xor) == (cs.field, cs.keep, cs.xor):
            return True  # the client's own address (the reply's destination, rp_filter's source)
        rec = active()
        d = plain(ds)
        if rec is not None and self.flow_sources is not None and ds.keep == (1 << ds.width) - 1 and not ds.xor \
                and not any(lo <= d <= hi for lo, hi in self.flow_sources):
            mk = ipaddress.IPv4Address if ds.width == 32 else ipaddress.IPv6Address
            atom = rec.space.empty()
            for lo, hi in self.flow_sources:
                atom = atom | rec.space.range(ds.field, mk(lo), mk(hi))
            rec.note(atom, False)
            return False
        if rec is not None:
            rec.lose("the destination may be the client's own address (the flow's sources and "
                     "destinations overlap, and no route leads back to the sources: "
                     "explain routes the client back on its input interface)")
        return d == plain(cs)

    def _route(self, dst) -> RouteResult:
        if self.is_local(dst):
            return RouteResult("local", "lo", None, None)
        client = self.client_route
        if client is not None and self._client_match(dst):
            return RouteResult("unicast", client.dev, None, client, client.render())
        best = None
        for r in self.routes:
            if r is client:
                continue
            if r.dest.version == dst.version and in_network(dst, r.dest):
                if best is None or (r.dest.prefixlen, -r.metric) > (best.dest.prefixlen, -best.metric):
                    best = r
        if best is None:
            return RouteResult("none", None, None, None)
        if best.kind != "unicast":
            return RouteResult(best.kind, best.dev, None, best, best.render())
        if best.dev is None and best.via is not None:
            # `default via GW` without `dev`: the kernel takes the device of the connected route
            # holding GW (fib_check_nh), as `ip route` shows it afterwards
            dev = self.gateway_device(best.via)
            if dev is not None:
                best = replace(best, dev=dev)
        return RouteResult("unicast", best.dev, best.via, best, best.render())

    def gateway_device(self, gw) -> str | None:
        """The device a gateway is reached by: the longest connected route (no ``via``) holding it.

        >>> ns = Namespace(); ns.add_addr("10.0.0.5/24", "eth0"); ns.add_route("default via 10.0.0.1")
        >>> ns.route(ipaddress.ip_address("8.8.8.8")).oif
        'eth0'
        """
        best = None
        for r in self.routes:
            if (r.kind == "unicast" and r.via is None and r.dev is not None
                    and r.dest.version == gw.version and gw in r.dest
                    and (best is None or r.dest.prefixlen > best.dest.prefixlen)):
                best = r
        return best.dev if best is not None else None

    def sysctl(self, key: str, default: int) -> int:
        return self.sysctls.get(key, default)
