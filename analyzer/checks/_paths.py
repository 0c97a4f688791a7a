"""Checks layer, shared by the semantic families (KUB, IST, DCK): follow a connection's first
packet through the one walk (netfilter/walk.py via explain.explain_flow) and read its steps.

No check lives here; findings read steps, never text.
"""
from __future__ import annotations

import ipaddress

from analyzer.diagnostics import APPROXIMATE, EXACT, Related
from analyzer.model.rules import (
    AddrMatch, AddrTypeMatch, ConnmarkCopy, CtStateMatch, MarkMatch, PortMatch, ProtoMatch, Reject,
    SetMark, Tproxy, Verdict,
)
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.trace import Kind
from analyzer.netfilter.walk import Packet, Walker

# dispositions of a first packet that end the connection before it reaches anything
LOST = ("dropped", "rejected")


def node_namespace(family: int = 4, local: tuple = (), extra_routes: tuple = ()) -> Namespace:
    """A namespace for lint walks: one uplink (eth0) with a default route, so routing is known
    and only the rules decide; ``local`` adds addresses of this host (on eth0)."""
    ns = Namespace("lint")
    if family == 4:
        ns.add_addr("192.0.2.1/24", "eth0")
        ns.add_route("default via 192.0.2.254 dev eth0")
    else:
        ns.add_addr("2001:db8::1/64", "eth0")
        ns.add_route("default via 2001:db8::fffe dev eth0")
    for a in local:
        ns.add_addr(f"{a}/{a.max_prefixlen}", "eth0")
    for spec in extra_routes:
        ns.add_route(spec)
    return ns


def first_packet(ruleset, pkt: Packet, ns: Namespace, local: bool = False, walker=None):
    """Every branch of a connection's first packet (statistic and unknown matches fork)."""
    from analyzer.explain import explain_flow

    return [o.forward for o in explain_flow(ruleset, pkt, ns, local=local, walker=walker, reply=False)]


def ending(ruleset, br):
    """(text, span) of what ended a lost branch: the rule that dropped or rejected it, or the
    policy of the builtin chain it fell off."""
    for s in reversed(br.steps):
        if s.kind is Kind.POLICY:
            chain = ruleset.chain(s.table, s.chain)
            return f"the policy {s.value} of {s.table}:{s.chain}", chain.span if chain else None
        r = s.rule
        if r is not None:
            return f"{r.label} ({s.verdict})", r.span
    return "an unnamed step", None


def confidence(br) -> str:
    return APPROXIMATE if br.approx else EXACT


def share(br) -> str:
    """`` (25% of new connections)`` for a statistic branch, else ''."""
    if br.prob is None or br.prob >= 0.999999:
        return ""
    return f" ({br.prob:.0%} of new connections)"


def related_steps(ruleset, br, keep=lambda r: True, limit: int = 6) -> tuple[Related, ...]:
    """The rules the branch crossed, as related spans, in walk order."""
    out = []
    for s in br.steps:
        r = s.rule
        if r is not None and keep(r):
            out.append(Related(f"{s.where}: {s.verdict}", r.span))
    return tuple(out[-limit:])


def witness(pkt: Packet, local: bool) -> str:
    text = pkt.tuple_str()
    if local:
        return f"{text} (from a local process{f', uid {pkt.uid}' if pkt.uid is not None else ''})"
    return f"{text} arriving on {pkt.iif or 'an unnamed interface'}"


def host_of(networks) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A concrete address inside the first network (its 5th address for a subnet)."""
    for n in networks:
        if n.num_addresses == 1:
            return n.network_address
        return n.network_address + min(5, n.num_addresses - 2)
    return None


# --------------------------------------------------------------------------- scale
def walker(ctx, ruleset, ns) -> Walker:
    """The walker the path checks use: its big-chain index (by destination address, then port)
    is built once per ruleset and shared, so a check walking one packet per service of a
    10,000-service dump costs the rules on each path, not every NodePort rule each time."""
    return Walker(ruleset, ns)


class LossIndex:
    """Which DROP/REJECT rules could ever see a packet with given destinations, ports and
    protocol: an over-approximation (a rule it keeps may still not match), so a check only
    walks the packets that something could lose. Any builtin chain with policy DROP makes
    every packet a candidate."""

    STATES = frozenset({"NEW", "DNAT"})  # a first packet, DNATed or not

    def __init__(self, ruleset, ns):
        self.ns = ns
        tables = ruleset.tables.values()
        self.policy_drop = any(c.builtin and c.policy == "DROP" for t in tables for c in t.chains.values())
        self.by_dst: dict = {}
        self.by_port = {}
        self.anywhere: list = []
        bits, restore = 0, False
        for r in ruleset.rules():
            t = r.target
            if isinstance(t, SetMark) and t.kind == "MARK":
                bits |= t.value | t.mask
            elif isinstance(t, Tproxy):
                bits |= t.mark | t.mask
            elif isinstance(t, ConnmarkCopy) and t.direction == "restore":
                restore = True
            if not (isinstance(t, Reject) or (isinstance(t, Verdict) and t.verdict == "DROP")):
                continue
            dst = [m for m in r.matches if isinstance(m, AddrMatch) and m.direction == "dst" and not m.negated]
            port = [m for m in r.matches if isinstance(m, PortMatch) and m.direction == "dst" and not m.negated]
            if dst and all(n.num_addresses == 1 for n in dst[0].networks):
                for n in dst[0].networks:
                    self.by_dst.setdefault(n.network_address, []).append(r)
            elif port and all(lo == hi for lo, hi in port[0].ranges) and len(port[0].ranges) <= 16:
                for lo, _ in port[0].ranges:
                    self.by_port.setdefault(lo, []).append(r)
            else:
                self.anywhere.append(r)
        self.mark_bits = 0xFFFFFFFF if restore else bits
        self.local = {a.ip for _, a in ns.local_addresses()}

    def may_lose(self, dsts, dports, proto) -> bool:
        if self.policy_drop:
            return True
        cands = list(self.anywhere)
        for d in dsts:
            cands += self.by_dst.get(d, ())
        for p in dports:
            cands += self.by_port.get(p, ())
        return any(self._may(r, dsts, dports, proto) for r in cands)

    def _may(self, r, dsts, dports, proto) -> bool:
        for m in r.matches:
            if m.negated:
                continue
            if isinstance(m, AddrMatch) and m.direction == "dst":
                if not any(d in n for d in dsts for n in m.networks if n.version == d.version):
                    return False
            elif isinstance(m, ProtoMatch):
                if m.number not in (0, proto):
                    return False
            elif isinstance(m, PortMatch) and m.direction == "dst":
                if not any(lo <= p <= hi for p in dports for lo, hi in m.ranges):
                    return False
            elif isinstance(m, CtStateMatch):
                if not (m.states & self.STATES):
                    return False
            elif isinstance(m, AddrTypeMatch) and m.direction == "dst" and m.types <= {"LOCAL"}:
                if not any(d in self.local or d.is_loopback for d in dsts):
                    return False
            elif isinstance(m, MarkMatch) and m.kind == "mark":
                if (m.value & m.mask) & ~self.mark_bits:
                    return False
        return True
