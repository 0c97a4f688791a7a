"""Checks layer, kube-proxy family (KUB): what kube-proxy's iptables mode writes
(pkg/proxy/iptables/proxier.go, syncProxyRules) checked against the rules as they are, with
the one walk (netfilter/walk.py) deciding where a service's packets really go.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from analyzer.checks import CheckContext, check
from analyzer.checks._paths import (
    LOST, LossIndex, confidence, ending, first_packet, node_namespace, related_steps, share,
    walker, witness,
)
from analyzer.diagnostics import APPROXIMATE, Diagnostic, EXACT, Related, Severity
from analyzer.model.packet import hostport
from analyzer.model.rules import (
    AddrMatch, CommentMatch, Jump, Masquerade, MarkMatch, Nat, PortMatch, ProtoMatch, Rule,
    SetMark, StatisticMatch,
)
from analyzer.netfilter.trace import Kind
from analyzer.netfilter.walk import Branch, Conntrack, Packet, Walker

ERROR, WARNING = Severity.ERROR, Severity.WARNING
PROTO_NAME = {6: "tcp", 17: "udp", 132: "sctp"}
# kube-proxy writes probabilities with %0.10f and the kernel keeps 31 bits: 1/3 comes back as
# 0.33333333349; anything closer than this to the intended value is what kube-proxy meant
PROB_TOLERANCE = 1e-6
SHARE_TOLERANCE = 1e-3  # a share off by less than 0.1 percentage point is not reported


# --------------------------------------------------------------------------- reading the rules
@dataclass(frozen=True, slots=True)
class ServicePort:
    """One `-d VIP -p P --dport N -j KUBE-SVC-X` rule of nat KUBE-SERVICES."""

    rule: Rule
    vip: object
    proto: int
    port: int
    chain: str

    @property
    def name(self) -> str:
        for m in self.rule.matches:
            if isinstance(m, CommentMatch):
                return m.text.removesuffix(" cluster IP")
        return self.chain

    def packet(self, src, local: bool, family: int) -> Packet:
        return Packet(family, self.proto, src, self.vip, 40000, self.port,
                      tcp_flags=0x02 if self.proto == 6 else 0, iif=None if local else "eth0")


def _dst_port(rule: Rule):
    """(vip or None, proto, port) of a rule that names one protocol and one destination port."""
    vip, proto, port = None, None, None
    for m in rule.matches:
        if isinstance(m, AddrMatch) and m.direction == "dst":
            if m.negated or len(m.networks) != 1 or m.networks[0].num_addresses != 1:
                return None
            vip = m.networks[0].network_address
        elif isinstance(m, ProtoMatch):
            if m.negated:
                return None
            proto = m.number
        elif isinstance(m, PortMatch) and m.direction == "dst":
            if m.negated or len(m.ranges) != 1 or m.ranges[0][0] != m.ranges[0][1]:
                return None
            port = m.ranges[0][0]
    if proto not in PROTO_NAME or port is None:
        return None
    return vip, proto, port


def _jump(rule: Rule, *prefixes: str) -> str | None:
    t = rule.target
    if isinstance(t, Jump) and t.chain.startswith(prefixes):
        return t.chain
    return None


def service_ports(ctx: CheckContext) -> list[ServicePort]:
    cache = ctx.extra.get("kub.services")
    if cache is None:
        cache = []
        c = ctx.ruleset.chain("nat", "KUBE-SERVICES")
        for r in (c.rules if c else ()):
            chain = _jump(r, "KUBE-SVC-")
            if chain is None:
                continue
            dp = _dst_port(r)
            if dp is None or dp[0] is None:
                continue
            cache.append(ServicePort(r, dp[0], dp[1], dp[2], chain))
        ctx.extra["kub.services"] = cache
    return cache


def endpoint_rules(chain) -> list[Rule]:
    """The rules of a KUBE-SVC/SVL chain that pick an endpoint: jumps to KUBE-SEP-*, leaving
    out session-affinity (`-m recent --rcheck`) rules, which kube-proxy puts before them."""
    return [r for r in chain.rules if _jump(r, "KUBE-SEP-")
            and not any(m.module == "recent" for m in r.matches)]


def _dnat(chain) -> Rule | None:
    for r in chain.rules:
        if isinstance(r.target, Nat) and r.target.kind == "DNAT":
            return r
    return None


def _endpoints(ruleset, svc_chain: str) -> list[tuple]:
    """(address, port) of each endpoint DNAT a KUBE-SVC chain can pick (None when not written)."""
    c = ruleset.chain("nat", svc_chain)
    out = []
    for r in (endpoint_rules(c) if c is not None else ()):
        sep = ruleset.chain("nat", r.target.chain)
        d = _dnat(sep) if sep is not None else None
        if d is not None:
            out += [(x.addr_lo, x.port_lo) for x in d.target.ranges]
    return out


def _declared(chain) -> bool:
    """False for a chain that only appears in `-A` lines (PRS017): a grep or `-S` fragment,
    whose other rules may have been cut."""
    return chain.span is not None and not (chain.rules and chain.span.line == chain.rules[0].span.line)


def _nat(ctx):
    return ctx.ruleset.tables.get("nat") if ctx.ruleset is not None else None


# --------------------------------------------------------------------------- KUB001
@check(code="KUB001", name="service-traffic-dropped", severity=ERROR)
def service_traffic_dropped(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A service with endpoints whose new connections are still dropped or rejected.

    Why it matters: kube-proxy DNATs a cluster IP to an endpoint, so nothing after nat should
    refuse it; a stale `has no endpoints` REJECT, a host firewall or a chain that lets part of
    the traffic fall out of KUBE-SVC makes the service fail for some or all connections.
    Fix: remove or narrow the rule named in the finding (or let kube-proxy resync its chains).
    """
    if _nat(ctx) is None:
        return
    rs = ctx.ruleset
    ns = node_namespace(rs.family)
    node = next(a.ip for _, a in ns.local_addresses())
    loss = LossIndex(rs, ns)
    for sp in service_ports(ctx):
        if sp.vip.version != rs.family:
            continue
        eps = _endpoints(rs, sp.chain)
        if not eps:
            continue
        # only walk a service whose packets some DROP/REJECT could see (before or after DNAT)
        if not loss.may_lose([sp.vip] + [a for a, _ in eps if a is not None],
                             [sp.port] + [p for _, p in eps if p is not None], sp.proto):
            continue
        pkt = sp.packet(node, True, rs.family)
        lost = [br for br in first_packet(rs, pkt, ns, local=True, walker=walker(ctx, rs, ns))
                if br.disposition in LOST]
        if not lost:
            continue
        br = lost[0]
        what, span = ending(rs, br)
        where = "rejected" if br.disposition == "rejected" else "dropped"
        probs = [b.prob for b in lost]
        part = "" if None in probs or sum(probs) >= 0.999999 else f" ({sum(probs):.0%} of new connections)"
        yield ctx.diag(
            "KUB001",
            f"{sp.rule.label}: service {sp.name} ({PROTO_NAME[sp.proto]} {hostport(sp.vip, sp.port)}) has "
            f"endpoints, yet a new connection from this node is {where} by {what}{part}",
            sp.rule.option_span(sp.rule.target), hint="remove or narrow that rule, or resync kube-proxy",
            related=((Related(f"{where} here", span),) if span else ()) + related_steps(rs, br),
            witness=witness(br.ct.original, True), confidence=confidence(br))


# --------------------------------------------------------------------------- KUB002
def shares(rules: list[Rule]) -> tuple[list[float], float, list[float]]:
    """(share of each endpoint, share left to fall out of the chain, each rule's probability):
    a rule takes ``p`` of what the rules before it left.

    >>> s, left, _ = shares([])
    >>> (s, left)
    ([], 1.0)
    """
    rest, out, probs = 1.0, [], []
    for r in rules:
        p = 1.0
        for m in r.matches:
            if isinstance(m, StatisticMatch) and m.mode == "random":
                p = 1 - m.probability if m.negated else m.probability
        probs.append(p)
        out.append(rest * p)
        rest *= 1 - p
    return out, rest, probs


@check(code="KUB002", name="endpoint-share-skewed", severity=WARNING)
def endpoint_share_skewed(ctx: CheckContext) -> Iterator[Diagnostic]:
    """Statistic probabilities in a KUBE-SVC chain that do not give each endpoint its share.

    Why it matters: kube-proxy writes `--probability 1/n, 1/(n-1), ..., 1/2` and an
    unconditional last rule, so each of n endpoints gets 1/n of new connections; other values
    overload some endpoints, and a conditional last rule lets connections fall out of the
    chain without any DNAT.
    Fix: restore 1/(n-i) on rule i and no statistic match on the last endpoint rule.
    """
    nat = _nat(ctx)
    if nat is None:
        return
    for c in nat.chains.values():
        if not c.name.startswith(("KUBE-SVC-", "KUBE-SVL-")) or not _declared(c):
            continue  # an undeclared chain is a fragment (grep output): its rules may be cut
        eps = endpoint_rules(c)
        if not eps or any(isinstance(m, StatisticMatch) and m.mode != "random" for r in eps for m in r.matches):
            continue
        n = len(eps)
        got, left, probs = shares(eps)
        if max(abs(s - 1 / n) for s in got) <= SHARE_TOLERANCE and left <= SHARE_TOLERANCE:
            continue
        bad = next((i for i, p in enumerate(probs) if abs(p - 1 / (n - i)) > PROB_TOLERANCE), 0)
        r = eps[bad]
        spread = " / ".join(f"{s:.1%}" for s in got)
        msg = (f"{r.label}: {c.name} splits new connections {spread} over its {n} endpoint(s), "
               f"not {1 / n:.1%} each")
        if left > SHARE_TOLERANCE:
            msg += f"; {left:.1%} match no endpoint rule and fall out of the chain without DNAT"
        want = ", ".join(f"{1 / (n - i):.4f}" for i in range(n - 1))
        hint = (f"kube-proxy writes --probability {want} and no statistic match on the last rule"
                if n > 1 else "a single endpoint rule takes every connection: drop its statistic match")
        yield ctx.diag("KUB002", msg, r.span, hint=hint,
                       related=tuple(Related(f"endpoint {i + 1}: probability {p:.4f}, share {s:.1%}", e.span)
                                     for i, (e, p, s) in enumerate(zip(eps, probs, got))),
                       witness=f"a new connection entering {c.name}")


# --------------------------------------------------------------------------- KUB003
def _mark_of(chain) -> int | None:
    mark = 0
    for r in chain.rules:
        t = r.target
        if isinstance(t, SetMark) and t.kind == "MARK" and all(isinstance(m, CommentMatch) for m in r.matches):
            mark = (mark & ~t.mask & 0xFFFFFFFF) ^ t.value
    return mark or None


@check(code="KUB003", name="masq-mark-not-masqueraded", severity=ERROR)
def masq_mark_not_masqueraded(ctx: CheckContext) -> Iterator[Diagnostic]:
    """KUBE-MARK-MASQ sets a mark that nat POSTROUTING does not masquerade.

    Why it matters: kube-proxy marks hairpin, external and off-cluster service traffic with
    KUBE-MARK-MASQ and relies on KUBE-POSTROUTING to MASQUERADE what carries the mark; if the
    marks differ (two kube-proxy versions or a changed --iptables-masquerade-bit) or the jump
    is missing, replies bypass the node and those connections hang.
    Fix: make KUBE-POSTROUTING test the mark KUBE-MARK-MASQ sets, and jump to it from POSTROUTING.
    """
    nat = _nat(ctx)
    if nat is None:
        return
    mm = nat.chains.get("KUBE-MARK-MASQ")
    if mm is None or not mm.rules:
        return
    if not any(_jump(r, "KUBE-MARK-MASQ") for r in nat.rules()):
        return  # nothing marks
    mark = _mark_of(mm)
    if mark is None:
        return
    rs = ctx.ruleset
    post = nat.chains.get("POSTROUTING")
    start = "POSTROUTING"
    if post is None or post.span is None:  # a --noflush payload: POSTROUTING lives elsewhere
        if "KUBE-POSTROUTING" not in nat.chains:
            return
        start = "KUBE-POSTROUTING"
    ns = node_namespace(rs.family)
    src, dst = ("10.244.0.5", "10.244.1.7") if rs.family == 4 else ("fd00::5", "fd00:1::7")
    import ipaddress
    pkt = Packet(rs.family, 6, ipaddress.ip_address(src), ipaddress.ip_address(dst), 40000, 8080,
                 oif="eth0", mark=mark)
    w = Walker(rs, ns)
    br = Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport))
    if start == "POSTROUTING":
        brs = w.run_table(br, "nat", "POSTROUTING")
    else:
        brs = w._eval(br, "nat", "POSTROUTING", [w._frame("nat", start, br)])
    missed = [b for b in brs if not any(s.kind in (Kind.MASQUERADE, Kind.SNAT) for s in b.steps)]
    if not missed:
        return
    b = missed[0]
    masq = [r for r in nat.rules() if isinstance(r.target, Masquerade)]
    tests = [f"{m.value:#x}/{m.mask:#x}" for r in masq for m in r.matches if isinstance(m, MarkMatch)]
    rule = next(r for r in mm.rules if isinstance(r.target, SetMark))
    why = (f"the MASQUERADE rules test {', '.join(sorted(set(tests)))}" if tests else
           "no MASQUERADE rule is reached" if masq else "the nat table has no MASQUERADE rule")
    yield ctx.diag(
        "KUB003",
        f"{rule.label}: KUBE-MARK-MASQ marks packets {mark:#x} for masquerade, but a packet with that "
        f"mark leaves nat {start} unmasqueraded{share(b)}: {why}",
        rule.option_span(rule.target), hint="make KUBE-POSTROUTING match the mark KUBE-MARK-MASQ sets "
        "('-m mark --mark M/M -j MASQUERADE') and jump to it from nat POSTROUTING",
        related=tuple(Related("masquerades here", r.span) for r in masq[:3]) + related_steps(rs, b),
        witness=f"{pkt.tuple_str()} mark {mark:#x} leaving on eth0", confidence=confidence(b))


# --------------------------------------------------------------------------- KUB004
def _svc_of_sep(ctx) -> dict[str, tuple[Rule, "ServicePort | None"]]:
    """KUBE-SEP chain -> (the KUBE-SVC rule that jumps to it, the service port of that chain)."""
    nat = _nat(ctx)
    by_chain = {sp.chain: sp for sp in service_ports(ctx)}
    out = {}
    for c in nat.chains.values():
        if c.name.startswith(("KUBE-SVC-", "KUBE-SVL-")):
            for r in endpoint_rules(c):
                out.setdefault(r.target.chain, (r, by_chain.get(c.name)))
    return out


def _src_is(rule: Rule, addr) -> bool:
    return any(isinstance(m, AddrMatch) and m.direction == "src" and not m.negated
               and any(addr in n for n in m.networks) for m in rule.matches)


@check(code="KUB004", name="endpoint-without-hairpin-masq", severity=WARNING)
def endpoint_without_hairpin_masq(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A KUBE-SEP chain that DNATs to an endpoint without `-s <endpoint> -j KUBE-MARK-MASQ` first.

    Why it matters: a pod that connects to its own service is DNATed back to itself; without
    the hairpin masquerade the request arrives with the pod's own address as source and the
    pod's kernel drops it as a martian, so the connection times out.
    Fix: put `-s <endpoint ip> -j KUBE-MARK-MASQ` before the DNAT, as kube-proxy writes it.
    """
    nat = _nat(ctx)
    if nat is None:
        return
    owners = None
    for c in nat.chains.values():
        if not c.name.startswith("KUBE-SEP-") or not _declared(c):
            continue  # an undeclared chain is a fragment (grep output): its rules may be cut
        d = _dnat(c)
        if d is None or len(d.target.ranges) != 1 or d.target.ranges[0].addr_lo is None:
            continue
        ep = d.target.ranges[0].addr_lo
        if ep.is_unspecified:
            continue
        before = c.rules[:d.index - 1]
        # kube-proxy before 1.2 wrote the mark inline ('-j MARK --set-xmark 0x4d415351/...')
        if any((_jump(r, "KUBE-MARK-MASQ") or isinstance(r.target, SetMark)) and _src_is(r, ep) for r in before):
            continue
        if owners is None:
            owners = _svc_of_sep(ctx)
        via, sp = owners.get(c.name, (None, None))
        port = d.target.ranges[0].port_lo
        if sp is not None:
            wit = f"{PROTO_NAME[sp.proto]} {hostport(ep, 40000)} -> {hostport(sp.vip, sp.port)} (the endpoint calls its own service)"
        else:
            wit = f"tcp {ep}:40000 -> the service of {c.name} (the endpoint calls its own service)"
        yield ctx.diag(
            "KUB004",
            f"{d.label}: {c.name} DNATs to endpoint {ep}{f':{port}' if port else ''} without first marking "
            f"'-s {ep}/32 -j KUBE-MARK-MASQ': a connection from {ep} to its own service is sent back to "
            f"{ep} with its own address as source, which it drops (martian source): the connect times out",
            d.option_span(d.target), hint=f"add '-A {c.name} -s {ep}/32 -j KUBE-MARK-MASQ' before the DNAT",
            related=(Related(f"{via.chain} picks this endpoint here", via.span),) if via else (),
            witness=wit)


# --------------------------------------------------------------------------- KUB005
#: rule actions that let the packet go on (a non-terminal target such as LOG or NFLOG is OTHER)
_PASSIVE = frozenset({Kind.CONTINUE, Kind.JUMP, Kind.GOTO, Kind.RETURN, Kind.MARK, Kind.CONNMARK,
                      Kind.NOTRACK, Kind.OTHER})


@check(code="KUB005", name="nodeport-taken-first", severity=ERROR)
def nodeport_taken_first(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A NodePort whose connections another rule translates, accepts or drops before KUBE-NODEPORTS.

    Why it matters: kube-proxy's NodePort rule sits at the end of nat KUBE-SERVICES; a DNAT
    or REDIRECT for the same port earlier in PREROUTING (Docker's published port, a CNI
    hostPort, a hand-made forward) sends the node's port somewhere else.
    Fix: move the other rule's port, or narrow it so that it does not match the NodePort.
    """
    nat = _nat(ctx)
    if nat is None or "KUBE-NODEPORTS" not in nat.chains:
        return
    pre = nat.chains.get("PREROUTING")
    if pre is None or pre.span is None:
        return  # a --noflush payload: what runs before it is not in the input
    rs = ctx.ruleset
    ns = node_namespace(rs.family)
    node = next(a.ip for _, a in ns.local_addresses())
    import ipaddress
    client = ipaddress.ip_address("203.0.113.7" if rs.family == 4 else "2001:db8:ffff::7")
    seen = set()
    for r in nat.chains["KUBE-NODEPORTS"].rules:
        if not _jump(r, "KUBE-EXT-", "KUBE-SVC-", "KUBE-SVL-", "KUBE-FW-"):
            continue
        dp = _dst_port(r)
        if dp is None or dp[0] is not None or (dp[1], dp[2]) in seen:
            continue
        seen.add((dp[1], dp[2]))
        pkt = Packet(rs.family, dp[1], client, node, 40000, dp[2], iif="eth0",
                     tcp_flags=0x02 if dp[1] == 6 else 0)
        w = walker(ctx, rs, ns)
        br = Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport, in_use=w.ct_in_use))
        for b in w.hook([br], "PREROUTING"):
            if any(s.rule is r for s in b.steps):
                continue
            taker = next((s for s in reversed(b.steps) if s.rule is not None and s.kind not in _PASSIVE), None)
            if taker is None:
                continue
            tr = taker.rule
            yield ctx.diag(
                "KUB005",
                f"{r.label}: NodePort {PROTO_NAME[dp[1]]}/{dp[2]} never reaches KUBE-NODEPORTS: "
                f"{taker.where} takes its connections first ({taker.verdict}){share(b)}",
                r.span, hint=f"free port {dp[2]} in {taker.where} or choose another NodePort",
                related=((Related(f"takes the NodePort's packets: {taker.verdict}", tr.span),) if tr else ())
                + related_steps(rs, b),
                witness=witness(pkt, False), confidence=confidence(b))
            break


# --------------------------------------------------------------------------- KUB006
@check(code="KUB006", name="iptables-version-mismatch", severity=ERROR)
def iptables_version_mismatch(ctx: CheckContext) -> Iterator[Diagnostic]:
    """An endpoint DNAT that reads back as `--to-destination :0 ... 0.0.0.0:0` (kubernetes#114537).

    Why it matters: kube-proxy's own iptables wrote a DNAT revision that the iptables which
    saved this dump decodes wrongly: two iptables versions manage one table. Anything that
    restores such a dump (a backup, another agent, a kube-proxy of another version that
    reads and rewrites rules) loads a DNAT to 0.0.0.0:0 and the service stops.
    Fix: use one iptables version (and backend) on the host and in the kube-proxy image.
    """
    nat = _nat(ctx)
    if nat is None:
        return
    for c in nat.chains.values():
        if not c.name.startswith("KUBE-SEP-"):
            continue
        for r in c.rules:
            t = r.target
            if not (isinstance(t, Nat) and t.kind == "DNAT"):
                continue
            broken = len(t.ranges) > 1 or any(
                x.addr_lo is None or x.addr_lo.is_unspecified or x.port_lo == 0 for x in t.ranges)
            if not broken:
                continue
            shown = " ".join(f"--to-destination {x.render() or ':0'}" for x in t.ranges)
            yield ctx.diag(
                "KUB006",
                f"{r.label}: endpoint DNAT reads back as '{shown}': the iptables that saved this dump "
                "cannot decode the DNAT revision kube-proxy's iptables wrote (kubernetes#114537); "
                "restoring this dump would send the service to 0.0.0.0:0",
                r.option_span(t), hint="run one iptables version on the host and in the kube-proxy "
                "image; read rules with the same iptables that kube-proxy uses",
                witness=f"a connection picked for {c.name}", confidence=APPROXIMATE if len(t.ranges) == 1 else EXACT)
