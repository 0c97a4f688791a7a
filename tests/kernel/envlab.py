"""Build a real lab from a synack environment file (``docs/environment.md``).

Test-support layer on top of :mod:`netns` (the harness). It reads the environment YAML itself
(it does not import the analyzer, so the lab is not built from the analyzer's reading of the
file) and creates:

- one namespace per ``namespaces:`` entry (harness naming ``synack-<pid>-<lab>-<name>``);
- ``veth: [A:IF, B:IF]``: a veth pair created with harness names and renamed, inside each
  namespace, to the interface name the environment uses, so ``-i``/``-o`` rules match;
- ``bridge: {namespace, name, ports: [NS:IF ...]}``: a Linux bridge ``name`` in ``namespace``;
  each port is a veth whose member end is renamed to ``IF`` in its namespace and whose other end
  (harness name) is enslaved to the bridge; ``hairpin: true`` (or a list of ``NS:IF`` ports)
  turns on the bridge's hairpin mode on those ports (Linux default: off). ``net.bridge.bridge-nf-call-iptables`` of the
  bridge's namespace (default 1, as br_netfilter creates it) sets both the namespace sysctl and
  the bridge's own ``nf_call_iptables`` (the kernel runs the hooks if either is 1);
- ``segment: [...]`` (a switch without netfilter): a bridge with netfilter off in an extra
  namespace ``seg<i>``; two members become a plain veth pair;
- addresses (``CIDR@IFACE``; an interface no link created becomes a dummy, ``lo`` is lo),
  routes (``ip route replace``), the namespace's ``sysctls``;
- the iptables dumps, loaded with ``iptables-restore`` (nft backend by default; a list of files
  is applied in order, the later ones with ``--noflush``);
- the listeners: a harness TCP (or UDP) echo server per plain entry, run as its uid/gid, and
  for ``proxy_to`` entries a real proxy process (:class:`ProxyServer`) running as the
  listener's uid/gid, so ``-m owner`` rules apply to its own connections.

Everything is owned by the :class:`netns.Lab`, so it is torn down with it; every wait is bounded.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

from netns import (DEFAULT_LIFETIME, HarnessError, Lab, Ns, Unsupported, _PROLOGUE, _Server,
                   wait_until)

__all__ = ["EnvLab", "ProxyConnection", "ProxyServer", "build_env"]

#: Environment defaults (docs/environment.md): br_netfilter creates the bridge sysctls at 1.
BRIDGE_NF_DEFAULT = 1


# --------------------------------------------------------------------------------------------
# The proxy (a sidecar stand-in)
# --------------------------------------------------------------------------------------------

_PROXY = _PROLOGUE + r"""
import ipaddress, select, threading
log = open(cfg["log"], "a", buffering=1)
log_lock = threading.Lock()
def emit(**kw):
    kw["t"] = time.time()
    with log_lock:
        log.write(json.dumps(kw) + "\n")
def original_dst(conn, fam):
    try:
        if fam == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
            return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]]
        raw = conn.getsockopt(socket.IPPROTO_IPV6, 80, 28)  # IP6T_SO_ORIGINAL_DST
        return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]]
    except OSError:
        return None
def reset(sock):
    # close with SO_LINGER {on, 0}: the kernel sends RST instead of FIN
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
local_addrs = set(cfg["local_addrs"])
own_ports = set()          # local ports of the proxy's own outbound sockets (loop detection)
own_lock = threading.Lock()
deadline = time.monotonic() + cfg["lifetime"]
def left():
    return max(0.05, deadline - time.monotonic())
def target(conn, fam):
    if cfg["proxy_to"] == "original":
        od = original_dst(conn, fam)
        if od is None:
            return None, "no original destination (SO_ORIGINAL_DST failed: conntrack has no entry)"
        addr, port = od
        ip = ipaddress.ip_address(addr)
        if addr in local_addrs or ip.is_loopback:
            # inbound: the original destination is this namespace; the app listens on loopback
            addr = "127.0.0.1" if ip.version == 4 else "::1"
        return (addr, port), None
    addr, _, port = cfg["proxy_to"].rpartition(":")
    return (addr.strip("[]"), int(port)), None
def first_data(conn, n):
    # wait (bounded) for the client's first data, as Envoy reads before it gives up
    conn.settimeout(min(cfg["io_timeout"], left()))
    try:
        data = conn.recv(65536)
        emit(event="client-data", id=n, bytes=len(data))
    except OSError as exc:
        emit(event="client-data", id=n, bytes=0, error=err_name(exc))
def relay(n, conn, up):
    socks = {conn: up, up: conn}
    names = {conn: "client", up: "upstream"}
    open_in = {conn: True, up: True}
    got_client_data = False
    end = time.monotonic() + min(cfg["io_timeout"] * 2, left())
    while any(open_in.values()):
        wait = end - time.monotonic()
        if wait <= 0:
            emit(event="relay-timeout", id=n)
            break
        readable, _, _ = select.select([s for s, o in open_in.items() if o], [], [], wait)
        for s in readable:
            other = socks[s]
            try:
                chunk = s.recv(65536)
            except OSError as exc:
                emit(event="relay-error", id=n, side=names[s], error=err_name(exc))
                if s is up:
                    if not got_client_data:
                        first_data(conn, n)
                    reset(conn)
                    up.close()
                else:
                    reset(up)
                    conn.close()
                return
            if s is conn and chunk:
                got_client_data = True
            if not chunk:
                open_in[s] = False
                try:
                    other.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            try:
                other.sendall(chunk)
            except OSError as exc:
                emit(event="relay-error", id=n, side=names[other], error=err_name(exc))
                if other is up:
                    reset(conn)
                    up.close()
                else:
                    reset(up)
                    conn.close()
                return
    emit(event="relay-done", id=n)
    conn.close()
    up.close()
def handle(n, conn, peer, fam):
    try:
        with own_lock:
            looped = peer[1] in own_ports and (peer[0] in local_addrs or ipaddress.ip_address(peer[0]).is_loopback)
        if looped:
            # Our own outbound connection came back to us (no owner exemption). A real Envoy
            # recurses until it runs out of connections; this stand-in stops at once.
            emit(event="loop", id=n, peer=addr_of(peer))
            reset(conn)
            return
        dst, why = target(conn, fam)
        up = None
        if dst is not None:
            up = socket.socket(family(dst[0]), socket.SOCK_STREAM)
            up.bind(("::" if family(dst[0]) == socket.AF_INET6 else "0.0.0.0", 0))
            with own_lock:
                own_ports.add(up.getsockname()[1])
            up.settimeout(min(cfg["connect_timeout"], left()))
            try:
                up.connect(dst)
            except socket.timeout:
                why = "timeout"
            except OSError as exc:
                why = err_name(exc)
            if why is not None:
                up.close()
                up = None
        emit(event="upstream", id=n, dst=list(dst) if dst else None, error=why,
             local=addr_of(up.getsockname()) if up is not None else None)
        if up is None:
            first_data(conn, n)
            reset(conn)
            emit(event="reset-client", id=n)
            return
        relay(n, conn, up)
    except Exception as exc:  # never leave a client hanging on a bug here
        emit(event="crash", id=n, error=repr(exc))
        try:
            reset(conn)
        except Exception:
            pass
drop_privileges()
fam = family(cfg["addr"])
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((cfg["addr"], cfg["port"]))
srv.listen(64)
emit(event="listening", local=addr_of(srv.getsockname()), pid=os.getpid(), uid=os.getuid(),
     gid=os.getgid())
n = 0
while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        break
    srv.settimeout(remaining)
    try:
        conn, peer = srv.accept()
    except socket.timeout:
        break
    n += 1
    emit(event="accept", id=n, peer=addr_of(peer), local=addr_of(conn.getsockname()),
         original_dst=original_dst(conn, fam))
    if n > cfg["max_connections"]:
        emit(event="limit", id=n)
        reset(conn)
        continue
    threading.Thread(target=handle, args=(n, conn, peer, fam), daemon=True).start()
emit(event="exit")
"""


@dataclass(frozen=True, slots=True)
class ProxyConnection:
    """One connection the proxy accepted and what became of it."""

    id: int
    peer: tuple[str, int]
    local: tuple[str, int]
    original_dst: tuple[str, int] | None
    loop: bool = False                       # it was the proxy's own outbound connection
    upstream: tuple[str, int] | None = None  # where the proxy connected onward
    upstream_error: str | None = None        # ECONNREFUSED, timeout ... (None: connected)
    upstream_local: tuple[str, int] | None = None
    client_reset: bool = False               # the proxy reset the client (SO_LINGER 0)
    events: tuple[str, ...] = ()


def _pair(value) -> tuple[str, int] | None:
    return (str(value[0]), int(value[1])) if value else None


class ProxyServer(_Server):
    """A tiny TCP proxy in a namespace, run as ``uid``/``gid`` (privileges are dropped before
    any socket is created, so ``-m owner`` matches its connections).

    For each client: ``proxy_to: original`` connects to ``SO_ORIGINAL_DST`` (127.0.0.1:PORT
    when that address belongs to the namespace), ``ADDR:PORT`` connects there; on success it
    relays both ways (half-closes passed on); when the onward connect fails it waits, bounded,
    for the client's first data and resets the client (``SO_LINGER`` 0 close), as the Envoy of
    seed scenario 2 does. A connection from its own outbound socket (a REDIRECT loop) is reset
    at once.
    """

    _script = _PROXY

    def __init__(self, ns: Ns, addr: str, port: int, *, proxy_to: str, local_addrs: list[str],
                 lifetime: float, uid: int | None, gid: int | None, io_timeout: float = 2.0,
                 connect_timeout: float = 1.0, max_connections: int = 32) -> None:
        super().__init__(ns, addr, port, lifetime=lifetime, uid=uid, gid=gid,
                         proxy_to=proxy_to, local_addrs=local_addrs, io_timeout=io_timeout,
                         connect_timeout=connect_timeout, max_connections=max_connections)

    def connections(self) -> list[ProxyConnection]:
        conns: dict[int, dict] = {}
        for e in self.events():
            i = e.get("id")
            if e["event"] == "accept":
                conns[i] = {"id": i, "peer": _pair(e["peer"]), "local": _pair(e["local"]),
                            "original_dst": _pair(e["original_dst"]), "events": ["accept"]}
                continue
            c = conns.get(i)
            if c is None:
                continue
            c["events"].append(e["event"])
            if e["event"] == "loop":
                c["loop"] = True
                c["client_reset"] = True
            elif e["event"] == "upstream":
                c["upstream"], c["upstream_error"] = _pair(e["dst"]), e["error"]
                c["upstream_local"] = _pair(e["local"])
            elif e["event"] in ("reset-client", "relay-error"):
                c["client_reset"] = True
        return [ProxyConnection(**{**c, "events": tuple(c["events"])}) for c in conns.values()]

    def wait_connections(self, n: int = 1, *, timeout: float = 3.0,
                         settled: bool = True) -> list[ProxyConnection]:
        """Wait until ``n`` connections were accepted (and, if ``settled``, decided: looped,
        relayed or reset)."""
        final = {"loop", "reset-client", "relay-done", "relay-error", "relay-timeout", "crash",
                 "limit"}

        def enough() -> list[ProxyConnection] | None:
            got = [c for c in self.connections() if not settled or final & set(c.events)]
            return got if len(got) >= n else None
        return wait_until(enough, timeout=timeout, what=f"{n} proxied connection(s)")


# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------


@dataclass
class EnvLab:
    """A lab built from an environment file: its namespaces by environment name, the
    interfaces each has (environment names), and the listeners started."""

    lab: Lab
    path: str
    doc: dict
    ns: dict[str, Ns] = field(default_factory=dict)
    interfaces: dict[str, set[str]] = field(default_factory=dict)
    servers: dict[tuple[str, int], object] = field(default_factory=dict)
    bridges: list[tuple[str, str]] = field(default_factory=list)
    backend: str = "nft"

    def __getitem__(self, name: str) -> Ns:
        return self.ns[name]

    def addresses(self, name: str) -> list[str]:
        """The environment's addresses of namespace ``name`` (without prefix length)."""
        spec = self.doc["namespaces"].get(name) or {}
        return [str(a).partition("@")[0].split("/")[0] for a in spec.get("addresses") or []]

    def proxies(self) -> dict[tuple[str, int], ProxyServer]:
        return {k: s for k, s in self.servers.items() if isinstance(s, ProxyServer)}

    def describe(self) -> str:
        return self.lab.describe()


def _member(text: object) -> tuple[str, str]:
    ns, sep, iface = str(text).partition(":")
    if not sep or not ns or not iface:
        raise HarnessError(f"link member {text!r} should be NAMESPACE:INTERFACE")
    return ns, iface


def _sysctls(spec: Mapping) -> dict[str, int]:
    return {str(k): int(v) for k, v in (spec.get("sysctls") or {}).items()}


def build_env(lab: Lab, path: str, *, backend: str = "nft",
              lifetime: float = DEFAULT_LIFETIME, io_timeout: float = 2.0) -> EnvLab:
    """Create every namespace, link, address, route, sysctl, ruleset and listener of the
    environment file ``path`` inside ``lab``; returns once every listener listens."""
    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    if not isinstance(doc, dict) or not isinstance(doc.get("namespaces"), dict):
        raise HarnessError(f"{path}: expected a mapping with 'namespaces:'")
    base = os.path.dirname(os.path.abspath(path))
    env = EnvLab(lab, path, doc, backend=backend)
    specs: dict[str, dict] = {str(k): (v or {}) for k, v in doc["namespaces"].items()}

    # -- namespaces ------------------------------------------------------------------------
    for name in specs:
        env.ns[name] = lab.netns(name)
        env.interfaces[name] = {"lo"}

    def rename(ns_name: str, current: str, wanted: str) -> None:
        if wanted in env.interfaces[ns_name]:
            raise HarnessError(f"{path}: interface {ns_name}:{wanted} is linked twice")
        if current != wanted:
            env.ns[ns_name].ip("link", "set", current, "name", wanted)
        env.interfaces[ns_name].add(wanted)

    def bridge_nf(ns_name: str) -> bool:
        value = _sysctls(specs.get(ns_name, {})).get("net.bridge.bridge-nf-call-iptables",
                                                      BRIDGE_NF_DEFAULT)
        return bool(value)

    def bridge(bns: str, bname: str, members: list[tuple[str, str]], nf: bool,
               hairpin: bool | set[tuple[str, str]] = False) -> None:
        ports = []
        for mns, mif in members:
            if mns not in env.ns:
                raise HarnessError(f"{path}: link names unknown namespace {mns!r}")
            veth = lab.veth(env.ns[mns], env.ns[bns], up=False)
            rename(mns, veth.a.name, mif)
            env.ns[mns].link_up(mif)
            ports.append(veth.b.name)
        lab.bridge(env.ns[bns], bname, ports=ports, nf_call_iptables=nf)
        env.interfaces[bns].add(bname)
        for port, member in zip(ports, members):
            if hairpin is True or (not isinstance(hairpin, bool) and member in hairpin):
                env.ns[bns].ip("link", "set", "dev", port, "type", "bridge_slave", "hairpin", "on")
        env.bridges.append((bns, bname))

    # -- links -----------------------------------------------------------------------------
    for i, link in enumerate(doc.get("links") or []):
        if not isinstance(link, dict) or len(link) != 1:
            raise HarnessError(f"{path}: links[{i}]: expected one of veth/bridge/segment")
        kind, val = next(iter(link.items()))
        if kind in ("veth", "segment", "routed"):
            members = [_member(m) for m in val]
            if len(members) == 2:
                (a_ns, a_if), (b_ns, b_if) = members
                veth = lab.veth(env.ns[a_ns], env.ns[b_ns], up=False)
                rename(a_ns, veth.a.name, a_if)
                rename(b_ns, veth.b.name, b_if)
                env.ns[a_ns].link_up(a_if)
                env.ns[b_ns].link_up(b_if)
            elif kind == "veth":
                raise HarnessError(f"{path}: links[{i}]: a veth has exactly two ends")
            else:  # a switch without netfilter, in a namespace of its own
                seg = f"seg{i}"
                env.ns[seg] = lab.netns(seg)
                env.interfaces[seg] = {"lo"}
                bridge(seg, "br0", members, False)
        elif kind == "bridge":
            bns, bname = str(val["namespace"]), str(val.get("name", "br0"))
            if bns not in env.ns:
                raise HarnessError(f"{path}: bridge in unknown namespace {bns!r}")
            hp = val.get("hairpin", False)
            hairpin = hp if isinstance(hp, bool) else {_member(m) for m in hp}
            bridge(bns, bname, [_member(m) for m in val.get("ports") or []], bridge_nf(bns),
                   hairpin)
        else:
            raise HarnessError(f"{path}: links[{i}]: unknown link kind {kind!r}")

    # -- addresses, routes, sysctls --------------------------------------------------------
    for name, spec in specs.items():
        ns = env.ns[name]
        if spec.get("iproute"):
            raise Unsupported(f"{path}: namespace {name!r}: 'iproute' files are not replayed")
        for entry in spec.get("addresses") or []:
            cidr, _, iface = str(entry).partition("@")
            if not iface:
                raise HarnessError(f"{path}: address {entry!r} needs @IFACE")
            if iface not in env.interfaces[name]:
                ns.ip("link", "add", iface, "type", "dummy")
                ns.link_up(iface)
                env.interfaces[name].add(iface)
            if iface == "lo" and ipaddress.ip_interface(cidr).ip.is_loopback:
                continue  # lo has it already
            ns.addr(iface, cidr)
    for name, spec in specs.items():
        for route in spec.get("routes") or []:
            env.ns[name].route(str(route))
    for name, spec in specs.items():
        settings = _sysctls(spec)
        if settings:
            env.ns[name].sysctl(settings)

    # -- rulesets --------------------------------------------------------------------------
    for name, spec in specs.items():
        for key, ipv6 in (("iptables", False), ("ip6tables", True)):
            files = spec.get(key)
            if not files:
                continue
            for j, rel in enumerate([files] if isinstance(files, str) else list(files)):
                with open(os.path.join(base, rel), encoding="utf-8") as fh:
                    text = fh.read()
                if not any(line.startswith("*") for line in text.splitlines()):
                    raise Unsupported(f"{path}: {rel} is not iptables-save format; only dumps "
                                      f"are replayed")
                env.ns[name].iptables_restore(text, backend=backend, ipv6=ipv6,  # type: ignore[arg-type]
                                              flush=j == 0)

    # -- listeners -------------------------------------------------------------------------
    for name, spec in specs.items():
        ns = env.ns[name]
        local = env.addresses(name)
        for entry in spec.get("listeners") or []:
            if isinstance(entry, int):
                entry = {"port": entry}
            port, proto = int(entry["port"]), str(entry.get("proto", "tcp"))
            uid, gid = entry.get("uid"), entry.get("gid")
            addr = str(entry.get("address") or "0.0.0.0")
            if entry.get("proxy_to"):
                if proto != "tcp":
                    raise Unsupported(f"{path}: a {proto} proxy is not replayed")
                server: object = ProxyServer(ns, addr, port, proxy_to=str(entry["proxy_to"]),
                                             local_addrs=local, lifetime=lifetime, uid=uid,
                                             gid=gid, io_timeout=io_timeout)
                server.wait_ready(3.0)  # type: ignore[attr-defined]
            elif proto == "tcp":
                server = ns.listen_tcp(addr, port, lifetime=lifetime, io_timeout=io_timeout,
                                       uid=uid, gid=gid)
            elif proto == "udp":
                server = ns.listen_udp(addr, port, lifetime=lifetime, uid=uid, gid=gid)
            else:
                raise Unsupported(f"{path}: {proto} listeners are not replayed")
            env.servers[(name, port)] = server

    # A port's carrier reaches the bridge through linkwatch (up to 1 s later); until then the
    # port is "disabled" and drops frames. Wait, bounded, for every port to forward.
    for bns, bname in env.bridges:
        bns_ = env.ns[bns]

        def forwarding() -> bool:
            ports = json.loads(bns_.run(["bridge", "-j", "link", "show"]).stdout or "[]")
            mine = [p for p in ports if p.get("master") == bname]
            return bool(mine) and all(p.get("state") == "forwarding" for p in mine)
        wait_until(forwarding, timeout=3.0, interval=0.05, what=f"ports of {bname} to forward")
    # IPv6: every link-local address is tentative for about a second after its link comes up
    # (duplicate address detection), and a tentative address sends no neighbour solicitation
    # (a router forwarding solicits from it). Wait, bounded, until none is.
    if any(":" in str(a) for spec in specs.values() for a in spec.get("addresses") or []):
        def settled() -> bool:
            return all(not n.run(["ip", "-6", "addr", "show", "tentative"]).stdout.strip()
                       for n in env.ns.values())
        wait_until(settled, timeout=5.0, interval=0.1, what="IPv6 duplicate address detection")
    return env

