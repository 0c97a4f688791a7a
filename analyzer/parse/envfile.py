"""Parse layer: the environment file (YAML) -> namespaces with rulesets, addresses, routes,
sysctls, links and listeners. Schema and examples: docs/environment.md.

The file is composed (not just loaded) so that every key keeps its line: each problem is
reported as ``FILE:LINE:COL: namespace 'NS', KEY: ...`` with a "did you mean" where one fits.
Errors (the environment cannot mean what was written) are collected and raised together as one
:class:`EnvError`; doubts (the kernel would refuse or ignore it) are ENV warnings that
``lint --env`` reports. Namespace keys are one table, :data:`NAMESPACE_KEYS`: a new key is a row.
"""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
from types import MappingProxyType
from typing import Callable

import yaml

from analyzer.diagnostics import Diagnostic, Severity
from analyzer.model.env import Environment, Listener, NamespaceSpec, Segment  # noqa: F401 (re-exported)
from analyzer.netfilter.env import EnvError, Namespace
from analyzer.source import Span

# sysctls the walk reads: name (IFACE: `all` or an interface of the namespace) -> (default, values, meaning)
KNOWN_SYSCTLS: dict[str, tuple[int, tuple[int, ...], str]] = {
    "net.ipv4.ip_forward": (0, (0, 1), "route packets between interfaces (IPv4)"),
    "net.ipv6.conf.all.forwarding": (0, (0, 1), "route packets between interfaces (IPv6)"),
    # br_netfilter creates these at 1 in every new namespace
    "net.bridge.bridge-nf-call-iptables": (1, (0, 1), "bridged IPv4 frames cross iptables (br_netfilter)"),
    "net.bridge.bridge-nf-call-ip6tables": (1, (0, 1), "bridged IPv6 frames cross ip6tables (br_netfilter)"),
    "net.netfilter.nf_conntrack_tcp_loose": (1, (0, 1), "a lone TCP ACK may open a conntrack entry (mid-stream pickup)"),
    "net.ipv4.conf.IFACE.rp_filter": (0, (0, 1, 2), "reverse-path filter: 1 strict, 2 loose (max of all and IFACE)"),
    "net.ipv4.conf.IFACE.route_localnet": (0, (0, 1), "accept 127.0.0.0/8 destinations from real interfaces"),
    "net.ipv4.conf.IFACE.accept_local": (0, (0, 1), "accept packets whose source is a local address"),
}
SYSCTL_DEFAULTS = {k: v[0] for k, v in KNOWN_SYSCTLS.items() if "IFACE" not in k} | {
    "net.ipv4.conf.all.route_localnet": 0, "net.ipv4.conf.all.rp_filter": 0}

# warnings about an environment that loads but would not behave as written (docs/environment.md)
ENV_CODES = {
    "ENV001": ("route-device-missing", "A route names a device the namespace does not have"),
    "ENV002": ("gateway-not-on-link", "A route's gateway is not in a subnet of the namespace (the kernel refuses it)"),
    "ENV003": ("address-in-two-namespaces", "One address is configured in two namespaces"),
    "ENV004": ("listener-port-repeated", "A namespace lists the same listener twice"),
}
TOP_KEYS = ("namespaces", "links", "clients", "examples", "description")
LISTENER_KEYS = ("port", "proto", "address", "uid", "gid", "proxy_to", "name")
LINK_KINDS = ("veth", "bridge", "segment", "routed")
BRIDGE_KEYS = ("namespace", "name", "ports", "hairpin")
PROTOS = ("tcp", "udp", "sctp")


class _NamespaceDraft:
    """A namespace while its keys are read; frozen into a model NamespaceSpec at the end."""

    def __init__(self, name: str, net: Namespace):
        self.name, self.net = name, net
        self.ruleset = self.ruleset6 = self.cilium = None
        self.listeners: list = []
        self.dumps: list = []

    def freeze(self) -> NamespaceSpec:
        return NamespaceSpec(self.name, self.net, self.ruleset, self.ruleset6, tuple(self.listeners),
                             tuple(self.dumps), self.cilium)


class _EnvironmentDraft:
    """An environment while the file is read; frozen into a model Environment at the end."""

    segment_of = Environment.segment_of

    def __init__(self, path: str):
        self.path = path
        self.namespaces: dict = {}
        self.segments: list = []
        self.diagnostics: list = []
        self.clients: list = []
        self.examples: list = []

    def freeze(self) -> Environment:
        return Environment(self.path, MappingProxyType({k: v.freeze() for k, v in self.namespaces.items()}),
                           tuple(self.segments), tuple(self.diagnostics), tuple(self.clients),
                           tuple(self.examples))


def _suggest(word, candidates) -> str:
    """' (did you mean 'X'?)' for the closest candidate, or nothing.

    >>> _suggest("net.ipv4.ip_foward", ["net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter"])
    " (did you mean 'net.ipv4.ip_forward'?)"
    """
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _kind(v) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "empty"}.get(type(v), type(v).__name__)


def _compose(text: str):
    """The document and, for every key and list item, its (line, column): ``marks[path]``
    where path is the tuple of keys and indexes leading to it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        doc = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    marks: dict[tuple, tuple[int, int, int]] = {}

    def mark(n):
        s, e = n.start_mark, n.end_mark
        return s.line + 1, s.column + 1, (e.column + 1 if e.line == s.line else s.column + 2)

    def walk(n, path):
        marks.setdefault(path, mark(n))
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                kp = path + (str(k.value) if isinstance(k, yaml.ScalarNode) else "?",)
                marks.setdefault(kp, mark(k))
                walk(v, kp)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                walk(v, path + (i,))

    if node is not None:
        walk(node, ())
    return doc, marks


class _Loader:
    """Reads one environment file: keeps the marks, collects errors and ENV warnings."""

    def __init__(self, path: str, text: str, marks: dict):
        self.path, self.marks = path, marks
        self.lines = text.splitlines()
        self.base = os.path.dirname(os.path.abspath(path))
        self.errors: list[tuple[int, int, str]] = []
        self.warnings: list[Diagnostic] = []
        self.ifaces: dict[str, set[str]] = {}       # namespace -> interfaces named anywhere
        self.iface_refs: list[tuple] = []           # (ns, iface, loc, what) to check at the end
        self.routes: list[tuple] = []               # (ns, Route, loc, onlink) given in `routes:`
        self.addr_locs: dict[tuple, tuple] = {}     # (ns, ip) -> loc of its `addresses:` item

    def at(self, loc) -> tuple[int, int, int]:
        loc = tuple(loc)
        while loc and loc not in self.marks:
            loc = loc[:-1]
        return self.marks.get(loc, (1, 1, 2))

    def _subject(self, loc) -> str:
        loc = tuple(loc)
        if len(loc) >= 2 and loc[0] == "namespaces":
            rest = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                           for i, p in enumerate(loc[2:4]) if i == 0 or isinstance(p, int))
            return f"namespace '{loc[1]}'" + (f", {rest}" if rest else "")
        return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p))
                       for i, p in enumerate(loc[:2])) or "top level"

    def error(self, loc, message: str) -> None:
        line, col, _ = self.at(loc)
        self.errors.append((line, col, f"{self.path}:{line}:{col}: {self._subject(loc)}: {message}"))

    def warn(self, code: str, loc, message: str, hint: str | None = None) -> None:
        line, col, end = self.at(loc)
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else None
        self.warnings.append(Diagnostic(code, Severity.WARNING, f"{self._subject(loc)}: {message}",
                                        Span(self.path, line, col, end), hint, text,
                                        name=ENV_CODES[code][0]))

    # -- shapes
    def as_list(self, v, loc, what: str, scalar_ok: bool = False) -> list:
        if v is None:
            return []
        if isinstance(v, list):
            return v
        if scalar_ok and isinstance(v, str):
            return [v]
        example = f" (write [{v}])" if isinstance(v, (str, int)) and not isinstance(v, bool) else ""
        self.error(loc, f"{what} should be a list, not {_kind(v)}{example}")
        return []

    def as_map(self, v, loc, what: str) -> dict:
        if v is None:
            return {}
        if isinstance(v, dict):
            return v
        self.error(loc, f"{what} should be a mapping (KEY: VALUE), not {_kind(v)}")
        return {}

    def known_keys(self, d: dict, loc, allowed, what: str) -> None:
        for k in d:
            if str(k) not in allowed:
                self.error(tuple(loc) + (str(k),), f"unknown {what} '{k}'{_suggest(k, allowed)} "
                                                  f"(known: {', '.join(allowed)})")

    def read(self, rel, loc, errors="strict") -> tuple[str, str] | None:
        if not isinstance(rel, str) or not rel:
            self.error(loc, f"expected a file name, not {_kind(rel)}")
            return None
        full = os.path.join(self.base, rel)
        try:
            with open(full, encoding="utf-8", errors=errors) as f:
                return f.read(), os.path.relpath(full)
        except OSError as e:
            self.error(loc, f"cannot read {rel}: {e.strerror}")
        except UnicodeDecodeError:
            self.error(loc, f"{rel} is not UTF-8 text")
        return None


# -- namespace keys: each row reads one key into the namespace (docs/environment.md, "Namespace keys")
def _k_description(ld: _Loader, ns: _NamespaceDraft, v, loc) -> None:
    pass


def _k_addresses(ld: _Loader, ns: _NamespaceDraft, v, loc) -> None:
    for i, a in enumerate(ld.as_list(v, loc, "addresses")):
        cidr, sep, iface = str(a).partition("@")
        if not isinstance(a, str) or not sep or not iface:
            ld.error(loc + (i,), f"address '{a}' needs '@IFACE' (CIDR@IFACE, e.g. 10.0.0.1/24@eth0)")
            continue
        try:
            ns.net.add_addr(cidr, iface)
        except EnvError as e:
            ld.error(loc + (i,), str(e))
            continue
        ld.ifaces[ns.name].add(iface)
        ld.addr_locs.setdefault((ns.name, ns.net.addrs[iface][-1].ip), loc + (i,))


def _k_routes(ld: _Loader, ns: _NamespaceDraft, v, loc) -> None:
    for i, r in enumerate(ld.as_list(v, loc, "routes")):
        if not isinstance(r, str):
            ld.error(loc + (i,), f"a route is a string in `ip route` syntax, not {_kind(r)}")
            continue
        try:
            ns.net.add_route(r)
        except EnvError as e:
            ld.error(loc + (i,), str(e))
            continue
        ld.routes.append((ns.name, ns.net.routes[-1], loc + (i,), " onlink" in f" {r} "))


def _k_iproute(ld: _Loader, ns: _NamespaceDraft, v, loc) -> None:
    d = ld.as_map(v, loc, "iproute")
    ld.known_keys(d, loc, ("addr", "route"), "iproute key")
    if "addr" not in d and d:
        ld.error(loc, "iproute needs 'addr:' (a file with `ip addr` or `ip -j addr` output)")
        return
    if not d:
        return
    at = ld.read(d["addr"], loc + ("addr",))
    rt = ld.read(d["route"], loc + ("route",)) if d.get("route") else None
    if at is None or (d.get("route") and rt is None):
        return
    try:
        ns.net.load_iproute(at[0], rt[0] if rt else None)
    except EnvError as e:
        ld.error(loc, str(e))
        return
    ld.ifaces[ns.name].update(ns.net.addrs)
    ld.ifaces[ns.name].update(r.dev for r in ns.net.routes if r.dev)


_PER_IFACE = re.compile(r"net\.ipv4\.conf\.([^.]+)\.([a-z_]+)$")


def _k_sysctls(ld: _Loader, ns: _NamespaceDraft, v, loc) -> None:
    names = [k for k in KNOWN_SYSCTLS if "IFACE" not in k] + \
            [k.replace("IFACE", i) for k in KNOWN_SYSCTLS if "IFACE" in k for i in ["all", *sorted(ld.ifaces[ns.name])]]
    for k, val in ld.as_map(v, loc, "sysctls").items():
        key, kloc = str(k), loc + (str(k),)
        m = _PER_IFACE.match(key)
        row = KNOWN_SYSCTLS.get(key) or (KNOWN_SYSCTLS.get(f"net.ipv4.conf.IFACE.{m.group(2)}") if m else None)
        if row is None:
            ld.error(kloc, f"unknown sysctl '{key}'{_suggest(key, names)}: synack reads only the sysctls "
                           "listed in docs/environment.md, and any other would be silently ignored")
            continue
        if isinstance(val, bool):
            val = int(val)
        if not isinstance(val, int) or val not in row[1]:
            ld.error(kloc, f"sysctl '{key}' is {val!r}; expected one of {', '.join(map(str, row[1]))}")
            continue
        if m and m.group(1) == "default":
            ld.error(kloc, f"sysctl '{key}' sets the value for interfaces created later, which an environment "
                           f"does not have: write net.ipv4.conf.all.{m.group(2)} or net.ipv4.conf.IFACE.{m.group(2)}")
            continue
        if m and m.group(1) not in ("all",):
            ld.iface_refs.append((ns.name, m.group(1), kloc, f"sysctl '{key}'"))
        ns.net.sysctls[key] = val


def _k_ipsets(ld: _Loader, ns: _NamespaceDraft, v, loc) -> None:
    from analyzer.parse.ipset import load_ipsets

    for i, fp in enumerate(ld.as_list(v, loc, "ipsets", scalar_ok=True)):
        got = ld.read(fp, loc if isinstance(v, str) else loc + (i,))
        if got is not None:
            sets, diags = load_ipsets(*got)
            ld.env.diagnostics.extend(diags)
            ns.net.ipsets.update(sets)


def _k_rules(family: int) -> Callable:
    def read(ld: _Loader, ns: _NamespaceDraft, v, loc) -> None:
        from analyzer.parse import load_ruleset

        key = "iptables" if family == 4 else "ip6tables"
        inputs = []
        for i, fp in enumerate(ld.as_list(v, loc, key, scalar_ok=True)):
            got = ld.read(fp, loc if isinstance(v, str) else loc + (i,), errors="surrogateescape")
            if got is not None:
                inputs.append(got)
        if not inputs:
            return
        res = load_ruleset(inputs, family=family)
        ld.env.diagnostics.extend(res.diagnostics)
        ns.dumps.extend(p for _, p in inputs)
        if family == 4:
            ns.ruleset = res.ruleset
        else:
            ns.ruleset6 = res.ruleset
    return read


def _int(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _k_listeners(ld: _Loader, ns: _NamespaceDraft, v, loc) -> None:
    seen: dict[tuple, int] = {}
    for i, item in enumerate(ld.as_list(v, loc, "listeners")):
        iloc = loc + (i,)
        if isinstance(item, (int, str)) and not isinstance(item, bool):
            port, _, proto = str(item).partition("/")  # shorthand: 80 or "53/udp"
            item = {"port": int(port) if port.isdigit() else port, **({"proto": proto} if proto else {})}
        elif not isinstance(item, dict):
            ld.error(iloc, f"a listener is {{port: N, ...}} or a port number, not {_kind(item)}")
            continue
        ld.known_keys(item, iloc, LISTENER_KEYS, "listener key")
        bad = False
        if "port" not in item:
            ld.error(iloc, "a listener needs 'port: N'")
            bad = True
        elif not _int(item.get("port"), 1, 65535):
            ld.error(iloc + ("port",), f"listener port {item.get('port')!r} should be a number 1-65535")
            bad = True
        proto = str(item.get("proto", "tcp")).lower()
        if proto not in PROTOS:
            ld.error(iloc + ("proto",), f"listener proto '{item.get('proto')}'{_suggest(proto, PROTOS)}: "
                                        f"one of {', '.join(PROTOS)}")
            bad = True
        for idk in ("uid", "gid"):
            if item.get(idk) is not None and not _int(item[idk], 0, 2**32 - 1):
                ld.error(iloc + (idk,), f"listener {idk} {item[idk]!r} should be a number")
                bad = True
        addr = item.get("address")
        if addr is not None:
            try:
                ipaddress.ip_address(str(addr))
            except ValueError:
                ld.error(iloc + ("address",), f"listener address '{addr}' is not an IP address")
                bad = True
        to = item.get("proxy_to")
        if to is not None and to != "original":
            host, sep, port = str(to).rpartition(":")
            try:
                ipaddress.ip_address(host.strip("[]"))
                ok = bool(sep) and port.isdigit() and 0 < int(port) < 65536
            except ValueError:
                ok = False
            if not ok:
                ld.error(iloc + ("proxy_to",), f"proxy_to '{to}' should be ADDR:PORT (e.g. 127.0.0.1:8080, "
                                               f"[::1]:8080) or 'original'{_suggest(to, ['original'])}")
                bad = True
        if bad:
            continue
        key = (item["port"], proto, None if addr is None else str(addr))
        if key in seen:
            ld.warn("ENV004", iloc, f"listener {proto}/{item['port']} is listed twice (items {seen[key]} and {i})",
                    "keep one entry per listening socket")
        seen[key] = i
        ns.listeners.append(Listener(item["port"], proto, None if addr is None else str(addr),
                                     item.get("uid"), item.get("gid"), to,
                                     None if item.get("name") is None else str(item["name"])))


CILIUM_KEYS = ("dumps", "node", "version", "socket_lb", "socket_lb_hostns_only", "per_packet_lb", "nodeport",
               "lb_mode", "local_delivery", "endpoints", "devices")


def _k_cilium(ld: _Loader, ns: _NamespaceDraft, v, loc) -> None:
    """``cilium:`` makes the namespace a Cilium node: its service dumps, and the datapath
    settings the dumps cannot show (docs/cilium.md: each with its default)."""
    from analyzer.model.env import CiliumNode
    from analyzer.netfilter.cilium import parse_version
    from analyzer.parse.cilium import join_statedb, parse_cilium

    d = ld.as_map(v, loc, "cilium")
    ld.known_keys(d, loc, CILIUM_KEYS, "cilium key")
    node: dict = {}  # CiliumNode fields, built once every key is read
    dumps, parsed, files = [], [], []
    services, status, meta, bes, fronts = [], None, None, None, []
    for i, fp in enumerate(ld.as_list(d.get("dumps"), loc + ("dumps",), "cilium.dumps", scalar_ok=True)):
        floc = loc + ("dumps",) + ((i,) if isinstance(d.get("dumps"), list) else ())
        got = ld.read(fp, floc, errors="surrogateescape")
        if got is None:
            continue
        res = parse_cilium(*got)
        ld.env.diagnostics.extend(res.diagnostics)
        ns.dumps.append(got[1])
        dumps.append(got[1])
        parsed.append(res.dump)
        files.extend(res.files)
        for lst in res.dump.listings:
            if lst.status is not None:
                status = lst.status
            elif lst.kind == "frontends":
                fronts.append(lst)
            elif lst.kind == "services":
                meta = lst
            elif lst.kind == "backends":
                bes = lst
            elif lst.kind != "revnat":
                services.extend(lst.services)
    for f in fronts:
        services.extend(join_statedb(f, meta, bes))
    if not services:
        ld.error(loc + ("dumps",), "cilium needs at least one service dump (service list, JSON, bpf lb "
                                   "list or statedb frontends table) in 'dumps'")
    node["services"] = tuple(services)
    node["status"] = status
    if status is not None:
        node["version"] = parse_version(status.version)
        if status.socket_lb is not None:
            node["socket_lb"] = status.socket_lb
        if status.socket_lb_hostns_only is not None:
            node["socket_lb_hostns_only"] = status.socket_lb_hostns_only
        if status.kpr is not None:
            node["nodeport"] = status.kpr.lower() in ("true", "strict", "probe")
        if status.lb_mode:
            node["lb_mode"] = status.lb_mode.lower()
    for key in ("socket_lb", "socket_lb_hostns_only", "per_packet_lb", "nodeport"):
        if key in d:
            if not isinstance(d[key], bool):
                ld.error(loc + (key,), f"cilium.{key} should be true or false, not {_kind(d[key])}")
            else:
                node[key] = d[key]
    if "version" in d:
        node["version"] = parse_version(str(d["version"]))
        if node["version"] is None:
            ld.error(loc + ("version",), f"cilium.version '{d['version']}' is not a version like 1.15.3")
    if "node" in d:
        node["node"] = str(d["node"])
    for key, allowed in (("lb_mode", ("snat", "dsr", "hybrid")), ("local_delivery", ("bpf", "stack"))):
        if key in d:
            val = str(d[key]).lower()
            if val not in allowed:
                ld.error(loc + (key,), f"cilium.{key} '{d[key]}'{_suggest(val, allowed)}: one of {', '.join(allowed)}")
            else:
                node[key] = val
    for key in ("endpoints", "devices"):
        if key in d:
            items = ld.as_list(d[key], loc + (key,), f"cilium.{key}", scalar_ok=True)
            node[key] = tuple(str(x) for x in items)
            for j, x in enumerate(items):
                ld.iface_refs.append((ns.name, str(x), loc + (key, j), f"cilium.{key}"))
    ns.cilium = CiliumNode(dumps=tuple(dumps), parsed=tuple(parsed), files=tuple(files), **node)


# one row per namespace key, in the order they are read (addresses before what names interfaces)
NAMESPACE_KEYS: dict[str, Callable] = {
    "description": _k_description,
    "addresses": _k_addresses,
    "iproute": _k_iproute,
    "routes": _k_routes,
    "sysctls": _k_sysctls,
    "ipsets": _k_ipsets,
    "iptables": _k_rules(4),
    "ip6tables": _k_rules(6),
    "listeners": _k_listeners,
    "cilium": _k_cilium,
}
KNOWN_KEYS = set(NAMESPACE_KEYS)


def _member(ld: _Loader, text, loc) -> tuple[str, str] | None:
    ns, sep, iface = str(text).partition(":")
    if not isinstance(text, str) or not sep or not ns or not iface:
        ld.error(loc, f"'{text}' should be NAMESPACE:INTERFACE")
        return None
    if ns not in ld.env.namespaces:
        ld.error(loc, f"unknown namespace '{ns}'{_suggest(ns, ld.env.namespaces)}")
        return None
    ld.ifaces[ns].add(iface)
    return ns, iface


def _links(ld: _Loader, links) -> None:
    for i, link in enumerate(ld.as_list(links, ("links",), "links")):
        loc = ("links", i)
        if not isinstance(link, dict) or len(link) != 1:
            ld.error(loc, "a link is one of 'veth: [A:IF, B:IF]', 'bridge: {namespace, name, ports}', "
                          "'segment: [A:IF, ...]'")
            continue
        kind, val = next(iter(link.items()))
        kloc = loc + (str(kind),)
        if kind in ("veth", "segment", "routed"):
            raw = ld.as_list(val, kloc, kind)
            members = [_member(ld, m, kloc + (j,)) for j, m in enumerate(raw)]
            if kind == "veth" and len(raw) != 2:
                ld.error(kloc, f"a veth pair has two ends, not {len(raw)}")
            if None in members or not members:
                continue
            ld.env.segments.append(Segment(f"{kind}{i}", tuple(members)))
        elif kind == "bridge":
            val = ld.as_map(val, kloc, "bridge")
            ld.known_keys(val, kloc, BRIDGE_KEYS, "bridge key")
            bns = val.get("namespace")
            if bns is not None and str(bns) not in ld.env.namespaces:
                ld.error(kloc + ("namespace",), f"unknown namespace '{bns}'{_suggest(bns, ld.env.namespaces)}")
                continue
            bname = str(val.get("name", "br0"))
            if bns is not None:
                ld.ifaces[str(bns)].add(bname)
            ports = ld.as_list(val.get("ports"), kloc + ("ports",), "ports")
            members = [_member(ld, m, kloc + ("ports", j)) for j, m in enumerate(ports)]
            hp = val.get("hairpin", False)
            if not isinstance(hp, bool):
                hps = ld.as_list(hp, kloc + ("hairpin",), "hairpin")
                hp = tuple(_member(ld, m, kloc + ("hairpin", j)) for j, m in enumerate(hps))
                if None in hp:
                    continue
            if None in members:
                continue
            ld.env.segments.append(Segment(f"{bns}:{bname}", tuple(members),
                                           None if bns is None else str(bns), bname, hp))
        else:
            ld.error(kloc, f"unknown link kind '{kind}'{_suggest(kind, LINK_KINDS)} (veth, bridge, segment)")


def _cross_checks(ld: _Loader) -> None:
    """What only the whole file can tell: interfaces that exist, gateways on a link, addresses
    owned twice."""
    for ns, iface, loc, what in ld.iface_refs:
        if iface not in ld.ifaces[ns]:
            ld.error(loc, f"{what}: namespace '{ns}' has no interface '{iface}'"
                          f"{_suggest(iface, ld.ifaces[ns])}")
    for ns, r, loc, onlink in ld.routes:
        net = ld.env.namespaces[ns].net
        if r.dev and r.dev not in ld.ifaces[ns] and r.dev != "lo":
            ld.warn("ENV001", loc, f"route '{r.render()}' goes out '{r.dev}', which namespace '{ns}' "
                                   f"does not have (no address and no link names it)"
                                   f"{_suggest(r.dev, ld.ifaces[ns])}",
                    f"add an address on {r.dev} or a link with '{ns}:{r.dev}'")
            continue
        if r.via is not None and not onlink and r.kind == "unicast":
            nets = [a.network for iface, a in net.local_addresses()
                    if (r.dev is None or iface == r.dev) and a.version == r.via.version]
            if not any(r.via in n for n in nets):
                ld.warn("ENV002", loc, f"gateway {r.via} of route '{r.render()}' is not in a subnet of "
                                       f"{r.dev or 'any interface'} (the kernel refuses it: 'Nexthop has "
                                       f"invalid gateway'); the packet would leave to nobody",
                        f"add an address whose subnet holds {r.via}, or write 'onlink' if that is meant")
    owners: dict = {}
    for name, spec in ld.env.namespaces.items():
        for iface, a in spec.net.local_addresses():
            if a.ip.is_loopback:
                continue
            if a.ip in owners and owners[a.ip][0] != name:
                other = owners[a.ip]
                loc = ld.addr_locs.get((name, a.ip), ("namespaces", name))
                ld.warn("ENV003", loc, f"address {a.ip} is also in namespace '{other[0]}' ({other[1]}): "
                                       "packets to it reach whichever the walk meets first",
                        "give each namespace its own address (a VIP both answer for is not modelled)")
            owners.setdefault(a.ip, (name, iface))


def load_environment(path: str, on_namespace: Callable | None = None) -> Environment:
    """The environment file at ``path``; ``on_namespace(i, n, name)`` is called before the keys
    of each of the ``n`` namespaces are read (their dumps parsed): progress."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise EnvError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise EnvError(f"{path}: not UTF-8 text; an environment file is YAML (docs/environment.md)") from None
    try:
        doc, marks = _compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise EnvError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise EnvError(f"{path}: YAML nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("namespaces"), dict) or not doc["namespaces"]:
        raise EnvError(f"{path}: expected a mapping with 'namespaces:' holding one mapping per namespace "
                       "(see docs/environment.md)")
    ld = _Loader(path, text, marks)
    env = ld.env = _EnvironmentDraft(path)
    ld.known_keys(doc, (), TOP_KEYS, "top-level key")
    specs = []
    for name, spec in doc["namespaces"].items():
        loc = ("namespaces", str(name))
        if spec is not None and not isinstance(spec, dict):
            ld.error(loc, f"a namespace is a mapping of keys ({', '.join(NAMESPACE_KEYS)}), not {_kind(spec)}")
            spec = {}
        spec = spec or {}
        ld.known_keys(spec, loc, list(NAMESPACE_KEYS), "key")
        ns = _NamespaceDraft(str(name), Namespace(name=str(name)))
        ns.net.sysctls.update(SYSCTL_DEFAULTS)
        env.namespaces[str(name)] = ns
        ld.ifaces[str(name)] = {"lo"}
        specs.append((ns, spec, loc))
    _links(ld, doc.get("links"))  # links name interfaces: read them before the keys that use them
    for i, (ns, spec, loc) in enumerate(specs):
        if on_namespace is not None:
            on_namespace(i, len(specs), ns.name)
        for key, read in NAMESPACE_KEYS.items():
            if key in spec:
                read(ld, ns, spec[key], loc + (key,))
    for i, c in enumerate(ld.as_list(doc.get("clients"), ("clients",), "clients")):
        if str(c) not in env.namespaces:
            ld.error(("clients", i), f"unknown namespace '{c}'{_suggest(c, env.namespaces)}")
        else:
            env.clients.append(str(c))
    for i, ex in enumerate(ld.as_list(doc.get("examples"), ("examples",), "examples")):
        if not isinstance(ex, dict) or not isinstance(ex.get("flow"), str) or str(ex.get("from")) not in env.namespaces:
            ld.error(("examples", i), "an example is {from: NAMESPACE, flow: 'tcp A:P -> B:Q'} with a "
                                      "namespace of this file")
            continue
        env.examples.append(ex)
    _cross_checks(ld)
    if ld.errors:
        raise EnvError("\n".join(m for _, _, m in sorted(ld.errors)))
    env.diagnostics.extend(sorted(ld.warnings, key=lambda d: d.sort_key()))
    return env.freeze()
