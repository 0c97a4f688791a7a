"""Parse layer: the environment file (YAML) -> namespaces with rulesets, addresses, routes,
sysctls, links and listeners. Schema and examples: docs/environment.md."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import yaml

from analyzer.netfilter.env import EnvError, Namespace

SYSCTL_DEFAULTS = {
    "net.ipv4.ip_forward": 0,
    "net.ipv6.conf.all.forwarding": 0,
    # br_netfilter creates this at 1 in every new namespace
    "net.bridge.bridge-nf-call-iptables": 1,
    "net.bridge.bridge-nf-call-ip6tables": 1,
    "net.ipv4.conf.all.route_localnet": 0,
    "net.ipv4.conf.all.rp_filter": 0,
}
KNOWN_KEYS = {"iptables", "ip6tables", "addresses", "routes", "iproute", "sysctls", "listeners",
              "ipsets", "description"}


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


@dataclass
class NamespaceSpec:
    name: str
    net: Namespace
    ruleset: object = None  # analyzer.model.Ruleset (v4)
    ruleset6: object = None
    listeners: list = field(default_factory=list)
    dumps: list = field(default_factory=list)


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


@dataclass
class Environment:
    path: str
    namespaces: dict[str, NamespaceSpec]
    segments: list[Segment]
    diagnostics: list = field(default_factory=list)
    clients: list = field(default_factory=list)  # namespaces lint uses as clients (default: all)
    examples: list = field(default_factory=list)  # [{from, flow, uid?}] flows worth explaining

    def segment_of(self, ns: str, iface: str | None) -> Segment | None:
        for s in self.segments:
            if (ns, iface) in s.members or (s.bridge_ns == ns and s.bridge_iface == iface):
                return s
        return None


def _member(text: str, where: str) -> tuple[str, str]:
    ns, sep, iface = str(text).partition(":")
    if not sep or not ns or not iface:
        raise EnvError(f"{where}: '{text}' should be NAMESPACE:INTERFACE")
    return ns, iface


def load_environment(path: str) -> Environment:
    from analyzer.parse import load_ruleset

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise EnvError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise EnvError(f"{path}: not UTF-8 text; an environment file is YAML (docs/environment.md)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise EnvError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("namespaces"), dict):
        raise EnvError(f"{path}: expected a mapping with 'namespaces:' (see docs/environment.md)")
    base = os.path.dirname(os.path.abspath(path))
    env = Environment(path, {}, [])
    for name, spec in doc["namespaces"].items():
        spec = spec or {}
        if not isinstance(spec, dict):
            raise EnvError(f"{path}: namespace '{name}' should be a mapping")
        unknown = set(spec) - KNOWN_KEYS
        if unknown:
            raise EnvError(f"{path}: namespace '{name}': unknown key(s) {', '.join(sorted(unknown))}"
                           f" (known: {', '.join(sorted(KNOWN_KEYS))})")
        net = Namespace(name=str(name))
        net.sysctls.update(SYSCTL_DEFAULTS)
        for k, v in (spec.get("sysctls") or {}).items():
            net.sysctls[str(k)] = int(v)
        for a in spec.get("addresses") or []:
            cidr, _, iface = str(a).partition("@")
            if not iface:
                raise EnvError(f"{path}: namespace '{name}': address '{a}' needs '@IFACE'")
            net.add_addr(cidr, iface)
        ipr = spec.get("iproute")
        if ipr:
            with open(os.path.join(base, ipr["addr"])) as fa:
                at = fa.read()
            rt = None
            if ipr.get("route"):
                with open(os.path.join(base, ipr["route"])) as fr:
                    rt = fr.read()
            net.load_iproute_json(at, rt)
        for r in spec.get("routes") or []:
            net.add_route(str(r))
        ns = NamespaceSpec(str(name), net)
        ipsets = spec.get("ipsets")
        for fp in ([ipsets] if isinstance(ipsets, str) else list(ipsets or [])):
            from analyzer.parse.ipset import load_ipsets
            full = os.path.join(base, fp)
            try:
                with open(full, encoding="utf-8") as f:
                    sets, diags = load_ipsets(f.read(), os.path.relpath(full))
            except OSError as e:
                raise EnvError(f"{path}: namespace '{name}': cannot read {fp}: {e.strerror}") from None
            env.diagnostics.extend(diags)
            net.ipsets.update(sets)
        for key in ("iptables", "ip6tables"):
            files = spec.get(key)
            if not files:
                continue
            files = [files] if isinstance(files, str) else list(files)
            inputs = []
            for fp in files:
                full = os.path.join(base, fp)
                try:
                    with open(full, encoding="utf-8", errors="surrogateescape") as f:
                        inputs.append((f.read(), os.path.relpath(full)))
                except OSError as e:
                    raise EnvError(f"{path}: namespace '{name}': cannot read {fp}: {e.strerror}") from None
            res = load_ruleset(inputs, family=6 if key == "ip6tables" else 4)
            env.diagnostics.extend(res.diagnostics)
            ns.dumps.extend(p for _, p in inputs)
            if key == "iptables":
                ns.ruleset = res.ruleset
            else:
                ns.ruleset6 = res.ruleset
        for l in spec.get("listeners") or []:
            if isinstance(l, int):
                l = {"port": l}
            try:
                ns.listeners.append(Listener(int(l["port"]), str(l.get("proto", "tcp")), l.get("address"),
                                             l.get("uid"), l.get("gid"), l.get("proxy_to"), l.get("name")))
            except (KeyError, TypeError, ValueError):
                raise EnvError(f"{path}: namespace '{name}': listener {l!r} needs at least 'port'") from None
        env.namespaces[str(name)] = ns
    for i, link in enumerate(doc.get("links") or []):
        where = f"{path}: links[{i}]"
        if not isinstance(link, dict) or len(link) != 1:
            raise EnvError(f"{where}: expected one of 'veth: [A:IF, B:IF]', 'bridge: {{...}}', 'segment: [...]'")
        kind, val = next(iter(link.items()))
        if kind in ("veth", "segment", "routed"):
            members = tuple(_member(m, where) for m in val)
            env.segments.append(Segment(f"{kind}{i}", members))
        elif kind == "bridge":
            bns = val.get("namespace")
            bname = val.get("name", "br0")
            members = tuple(_member(m, where) for m in val.get("ports", []))
            hp = val.get("hairpin", False)
            if not isinstance(hp, bool):
                hp = tuple(_member(m, where) for m in hp)
            env.segments.append(Segment(f"{bns}:{bname}", members, bns, bname, hp))
        else:
            raise EnvError(f"{where}: unknown link kind '{kind}' (veth, bridge, segment)")
    env.examples = list(doc.get("examples") or [])
    unknown_top = set(doc) - {"namespaces", "links", "clients", "examples", "description"}
    if unknown_top:
        raise EnvError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown_top))} "
                       "(known: namespaces, links, clients, examples, description)")
    for c in doc.get("clients") or []:
        if str(c) not in env.namespaces:
            raise EnvError(f"{path}: clients: unknown namespace '{c}'")
        env.clients.append(str(c))
    for s in env.segments:
        for ns_name, _ in s.members + ((s.bridge_ns, None),) if s.bridge_ns else s.members:
            if ns_name not in env.namespaces:
                raise EnvError(f"{path}: link '{s.name}' names unknown namespace '{ns_name}'")
    return env
