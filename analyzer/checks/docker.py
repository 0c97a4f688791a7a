"""Checks layer, Docker family (DCK): published ports (nat DOCKER DNAT rules) walked from an
outside client through the one walk, and DOCKER-USER rules read the way filter sees packets:
after the DNAT.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterator

from analyzer.checks import CheckContext, check
from analyzer.checks._paths import (
    LOST, confidence, ending, first_packet, host_of, node_namespace, related_steps,
)
from analyzer.diagnostics import Diagnostic, Related, Severity
from analyzer.model.rules import (
    AddrMatch, CtTupleMatch, IfaceMatch, Nat, PortMatch, ProtoMatch, Rule,
)
from analyzer.netfilter.trace import Kind
from analyzer.netfilter.walk import Packet

WARNING, ERROR = Severity.WARNING, Severity.ERROR
PROTO_NAME = {6: "tcp", 17: "udp", 132: "sctp"}


@dataclass(frozen=True, slots=True)
class Published:
    """One published port: `-p P --dport N -j DNAT --to-destination ADDR:PORT` in nat DOCKER."""

    rule: Rule
    proto: int
    host_port: int
    addr: object
    port: int
    bridge: str
    host_ip: object | None  # `-d HOSTIP/32` when published on one address

    def render(self) -> str:
        return f"{PROTO_NAME[self.proto]} {self.host_ip or '*'}:{self.host_port} -> {self.addr}:{self.port}"


def published_ports(ctx: CheckContext) -> list[Published]:
    cache = ctx.extra.get("dck.published")
    if cache is not None:
        return cache
    out = []
    nat = ctx.ruleset.tables.get("nat") if ctx.ruleset is not None else None
    for c in (nat.chains.values() if nat else ()):
        if not c.name.startswith("DOCKER"):
            continue
        for r in c.rules:
            t = r.target
            if not (isinstance(t, Nat) and t.kind == "DNAT" and len(t.ranges) == 1):
                continue
            rng = t.ranges[0]
            proto = host_port = host_ip = None
            bridge = "docker0"
            for m in r.matches:
                if isinstance(m, ProtoMatch) and not m.negated:
                    proto = m.number
                elif isinstance(m, PortMatch) and m.direction == "dst" and not m.negated \
                        and len(m.ranges) == 1 and m.ranges[0][0] == m.ranges[0][1]:
                    host_port = m.ranges[0][0]
                elif isinstance(m, IfaceMatch) and m.direction == "in" and m.negated:
                    bridge = m.name
                elif isinstance(m, AddrMatch) and m.direction == "dst" and not m.negated \
                        and len(m.networks) == 1 and m.networks[0].num_addresses == 1:
                    host_ip = m.networks[0].network_address
            if proto not in PROTO_NAME or host_port is None or rng.addr_lo is None:
                continue
            port = rng.port_lo if rng.port_lo is not None else host_port
            out.append(Published(r, proto, host_port, rng.addr_lo, port, bridge, host_ip))
    ctx.extra["dck.published"] = out
    return out


def _clients(rs) -> list:
    """An outside client, and one address inside every source range the filter table names, so
    that a port open to some sources only is not called dropped."""
    out = [ipaddress.ip_address("203.0.113.7" if rs.family == 4 else "2001:db8:ffff::7")]
    f = rs.tables.get("filter")
    for r in (f.rules() if f else ()):
        for m in r.matches:
            if isinstance(m, AddrMatch) and m.direction == "src":
                a = host_of(m.networks)
                if a is not None and a.version == rs.family and not a.is_loopback:
                    out.append(a)
    return list(dict.fromkeys(out))[:16]


@check(code="DCK001", name="published-port-dropped", severity=ERROR)
def published_port_dropped(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A port Docker publishes whose DNATed connections are dropped in FORWARD or DOCKER-USER.

    Why it matters: `docker run -p` writes a DNAT in nat DOCKER and an ACCEPT in filter
    DOCKER; the translated packet is forwarded to the container, so FORWARD's policy, a
    DOCKER-USER rule or a flushed DOCKER filter chain decides whether the port works. A
    published port that no client can reach is a silent outage (or a firewall that was
    meant to allow it).
    Fix: restore Docker's filter rules (restart dockerd after a firewall reload) or allow
    the container's address and port in DOCKER-USER.
    """
    rs = ctx.ruleset
    if rs is None:
        return
    pubs = published_ports(ctx)
    if not pubs:
        return
    clients = _clients(rs)
    for p in pubs:
        if p.addr.version != rs.family or (p.host_ip is not None and p.host_ip.is_loopback):
            continue  # published on 127.0.0.1: only local clients, through docker-proxy
        node = p.host_ip if p.host_ip is not None else None
        ns = node_namespace(rs.family, local=(node,) if node is not None else (),
                            extra_routes=(f"{p.addr}/{p.addr.max_prefixlen} dev {p.bridge}",))
        dst = node or next(a.ip for _, a in ns.local_addresses())
        lost = []
        for client in clients:
            pkt = Packet(rs.family, p.proto, client, dst, 40000, p.host_port, iif="eth0",
                         tcp_flags=0x02 if p.proto == 6 else 0)
            brs = first_packet(rs, pkt, ns)
            gone = [b for b in brs if b.disposition in LOST]
            if len(gone) < len(brs) or not brs:
                break  # this client gets through: the port is open to someone
            lost.append(gone[0])
        else:
            b = lost[0]
            what, span = ending(rs, b)
            dnat = next((s for s in b.steps if s.kind is Kind.DNAT), None)
            how = "is DNATed" if dnat is not None and dnat.rule is p.rule else \
                f"is translated first by {dnat.where} ({dnat.verdict})" if dnat is not None else "is not DNATed"
            yield ctx.diag(
                "DCK001",
                f"{p.rule.label}: published port {p.render()} {how}, then {b.disposition} by "
                f"{what} for every client tried ({', '.join(str(c) for c in clients)})",
                p.rule.option_span(p.rule.target),
                hint=f"let FORWARD accept {PROTO_NAME[p.proto]} to {p.addr}:{p.port} (Docker's filter "
                     "DOCKER chain, or an ACCEPT in DOCKER-USER)",
                related=((Related(f"{b.disposition} here", span),) if span else ()) + related_steps(rs, b),
                witness=f"{b.ct.original.tuple_str()} arriving on eth0", confidence=confidence(b))


@check(code="DCK002", name="docker-user-port-translated", severity=WARNING)
def docker_user_port_translated(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A DOCKER-USER `--dport` naming a published host port that filter never sees.

    Why it matters: DOCKER-USER runs in filter FORWARD, after nat PREROUTING translated the
    published host port to the container's port; `--dport 8080` for `-p 8080:80` never
    matches the published connections (they have port 80 there), so the rule meant to
    restrict or allow them does nothing for them.
    Fix: match the original port, `-m conntrack --ctorigdstport 8080 --ctdir ORIGINAL`, or
    the container port.
    """
    rs = ctx.ruleset
    f = rs.tables.get("filter") if rs is not None else None
    du = f.chains.get("DOCKER-USER") if f else None
    if du is None:
        return
    pubs = published_ports(ctx)
    for r in du.rules:
        if any(isinstance(m, CtTupleMatch) for m in r.matches):
            continue
        proto = next((m.number for m in r.matches if isinstance(m, ProtoMatch) and not m.negated), None)
        pm = next((m for m in r.matches if isinstance(m, PortMatch) and m.direction == "dst" and not m.negated), None)
        if pm is None:
            continue
        inr = lambda n: any(lo <= n <= hi for lo, hi in pm.ranges)  # noqa: E731
        for p in pubs:
            if proto not in (None, 0, p.proto) or not inr(p.host_port) or inr(p.port):
                continue
            yield ctx.diag(
                "DCK002",
                f"{r.label}: DOCKER-USER tests --dport {p.host_port}, a host port published by "
                f"{p.rule.label} ({p.render()}); filter sees it after the DNAT, as port {p.port}, so "
                f"this rule never matches connections to the published port",
                r.option_span(pm),
                hint=f"match the original port: -m conntrack --ctorigdstport {p.host_port} --ctdir ORIGINAL",
                related=(Related(f"publishes {p.render()} here", p.rule.span),),
                witness=f"{PROTO_NAME[p.proto]} 203.0.113.7:40000 -> {p.host_ip or '192.0.2.1'}:{p.host_port}, "
                        f"seen by filter as -> {p.addr}:{p.port}")
            break
