"""Netfilter layer, results: a walk's trace, Trace -> Hop -> Step, typed and frozen.

A ``Step`` holds what the kernel did, as data: the model ``Rule`` it evaluated (None for
policies, conntrack, routing, bridges ...), the action as a ``Kind``, the packet before and after,
and the typed fact a check needs (the jump target is ``rule.target``, the NAT result is
``after``, a route's ``Route`` kind, why a bridge dropped a frame ...). Its text is derived, the
way ``xtables-monitor --trace`` prints it (``nat:KUBE-SERVICES:rule:7:JUMP KUBE-SVC-X``), and only
when asked: a 10k-service environment walk builds millions of steps and prints few.

A ``Hop`` is the steps of one namespace for one packet, a ``Journey`` one direction of one
connection (one branch), a ``Trip`` one outcome of a connection (request, reply, a proxy's
second leg). Findings read these fields, never the text.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from analyzer.engine.trace import chance
from analyzer.model.packet import hostport

if TYPE_CHECKING:  # pragma: no cover
    from analyzer.model.packet import Packet
    from analyzer.model.rules import Rule


class Kind(enum.Enum):
    """What a step did. Rule steps: the target's action; the others: the stage that spoke."""

    # a rule matched ...
    CONTINUE = "CONTINUE"       # no target: counted, traversal goes on
    JUMP = "JUMP"
    GOTO = "GOTO"
    RETURN = "RETURN"           # -j RETURN, or the implicit return at a user chain's end (no rule)
    ACCEPT = "ACCEPT"
    DROP = "DROP"
    QUEUE = "QUEUE"
    REJECT = "REJECT"
    DNAT = "DNAT"
    SNAT = "SNAT"
    MASQUERADE = "MASQUERADE"
    REDIRECT = "REDIRECT"
    NETMAP = "NETMAP"
    TPROXY = "TPROXY"
    MARK = "MARK"
    CONNMARK = "CONNMARK"
    NOTRACK = "NOTRACK"
    OTHER = "OTHER"             # a non-terminal target synack passes over (LOG, NFLOG, TCPMSS ...)
    HANDOFF = "HANDOFF"         # a terminating target synack does not follow (NFQUEUE, ...)
    UNKNOWN = "UNKNOWN"         # a target synack does not model
    # ... or no rule did
    LOOP = "LOOP"               # the chains jump in a loop: the walk stopped there (``chain``)
    POLICY = "POLICY"           # a builtin chain's policy decided (``value``: ACCEPT | DROP)
    STAGES = "STAGES"           # the order of stages at a hook was assumed (``value``: backend)
    CONNTRACK = "CONNTRACK"     # the conntrack lookup (``fact``: a ``Conntrack``)
    REVERSE_NAT = "REVERSE_NAT"  # conntrack undid a translation on a reply (``fact``: SNAT | DNAT)
    ROUTE = "ROUTE"             # the routing decision and the input route checks (``fact``: ``Route``)
    BRIDGE = "BRIDGE"           # a bridge switched or dropped the frame (``fact``: ``Bridge``)
    NEIGHBOUR = "NEIGHBOUR"     # IPv6 neighbour discovery before the packet is sent
    REPLY = "REPLY"             # how explain's peer model sends the reply
    CILIUM = "CILIUM"           # Cilium's BPF datapath (``chain``: the datapath point, a FACTS key;
    #                             ``fact``: a ``Cilium``)


#: rule actions that rewrite the packet's addresses (the trace prints the new tuple)
NAT_KINDS = frozenset({Kind.DNAT, Kind.SNAT, Kind.MASQUERADE, Kind.REDIRECT, Kind.NETMAP})
#: destination translations (NETMAP: when ``fact`` is "dst")
DNAT_KINDS = frozenset({Kind.DNAT, Kind.REDIRECT})


class Conntrack(enum.Enum):
    """What the conntrack lookup made of the packet."""

    NEW = "NEW"
    ESTABLISHED = "ESTABLISHED"  # the flow says it belongs to an existing connection
    RELATED = "RELATED"
    INVALID = "INVALID"         # refused (e.g. a lone RST): no entry, the nat table is skipped
    UNTRACKED = "UNTRACKED"     # NOTRACK / CT --notrack in raw
    OFF = "OFF"                 # no rule needs conntrack: the kernel keeps no entry
    MISSING = "MISSING"         # a reply found no entry in this namespace: walked as a new connection


class Route(enum.Enum):
    """The routing decision, and the input route check that refused a packet."""

    LOCAL = "local"                     # delivered here
    FORWARD = "forward"                 # routed on (``after.oif``)
    OUTPUT = "output"                   # a local process's packet routed out
    ASSUMED_FORWARD = "assumed-forward"  # no addresses or routes given: assumed not local
    NO_ROUTE = "no-route"
    SPECIAL = "special"                 # blackhole / unreachable / prohibit route
    LOOPBACK = "loopback"               # sent to a local address: back in on lo
    MARTIAN_SOURCE = "martian-source"   # a source the input refuses (ours, 0.0.0.0, loopback, multicast, ::, link-local)
    MARTIAN_DESTINATION = "martian-destination"  # 0.0.0.0, loopback, multicast or broadcast: never routed on
    RP_FILTER = "rp-filter"             # reverse path filter
    IP_FORWARD_OFF = "ip-forward-off"   # would be forwarded, ip_forward=0
    OUTPUT_REFUSED = "output-refused"   # a local socket's source the output route refuses (EINVAL)

    @property
    def drops(self) -> bool:
        return self in _ROUTE_DROPS


_ROUTE_DROPS = frozenset({Route.NO_ROUTE, Route.SPECIAL, Route.MARTIAN_SOURCE, Route.MARTIAN_DESTINATION,
                          Route.RP_FILTER, Route.IP_FORWARD_OFF, Route.OUTPUT_REFUSED})


class Bridge(enum.Enum):
    """What a bridge did with the frame."""

    NO_NETFILTER = "no-netfilter"   # switched without br_netfilter: the host's hooks are not crossed
    BRIDGED_DNAT = "bridged-dnat"   # br_netfilter switches a DNATed frame to its new destination
    HAIRPIN_OFF = "hairpin-off"     # would leave by the port it came in on; hairpin mode is off


class Reply(enum.Enum):
    """How explain's peer model sends the reply (REPLY steps)."""

    LOCAL_SOCKET = "local-socket"   # the flow was delivered here: a local socket answers
    STRAIGHT = "straight"           # backend and client share the link: the reply bypasses this host
    BRIDGED = "bridged"             # bridged back through this host with br_netfilter
    BACK = "back"                   # routed back through this host


class Cilium(enum.Enum):
    """What a Cilium datapath step did (``fact`` of a CILIUM step is the datapath point)."""

    DNAT = "dnat"                   # service translation to a backend
    SNAT = "snat"
    REVNAT = "revnat"               # reverse translation of a reply
    NO_REVNAT = "no-revnat"         # a known defect skips the reverse translation (``value``: the Defect)
    REDIRECT = "redirect"           # delivered by BPF redirect past the host's netfilter (``value``: oif)
    KNOWN_DEFECT = "known-defect"   # a defect that may apply (``value``: the Defect)
    SOCKET_REVNAT = "socket-revnat"  # the socket layer reports the frontend
    PASS = "pass"                   # DSR / modes synack does not follow further


class Step(NamedTuple):
    """One line of the trace, with the rule (and so the dump line) it comes from.

    Frozen as a tuple rather than a frozen dataclass: the environment walk builds one per rule
    it crosses, and a tuple is built five times faster (1 us against 6 us on the CI machine).

    >>> from analyzer.model.rules import Jump, Rule
    >>> from analyzer.source import Span
    >>> r = Rule("nat", "KUBE-SERVICES", 7, (), Jump(0, 0, "KUBE-SVC-X"), Span("k.rules", 12, 1, 40), "...")
    >>> s = Step(Kind.JUMP, r)
    >>> s.where, s.verdict, s.line
    ('nat:KUBE-SERVICES:rule:7', 'JUMP KUBE-SVC-X', 12)
    >>> print(s.render())
    nat:KUBE-SERVICES:rule:7:JUMP KUBE-SVC-X  (k.rules:12)
    """

    kind: Kind
    rule: "Rule | None" = None
    before: "Packet | None" = None     # the packet as the step saw it
    after: "Packet | None" = None      # ... and as it left (the same object when unchanged)
    table: str | None = None           # non-rule steps: the table (policy, implicit return, reverse NAT)
    chain: str | None = None           # non-rule steps: the chain or hook
    fact: object = None                # the typed fact: Conntrack, Route, Bridge, Cilium, "dst"/"src" of NAT
    value: object = None               # a value: the mark set, the policy, TPROXY's (ip, port), a route ...
    text: str | None = None            # the words of a non-rule step (route, bridge, cilium, ...)
    note: str | None = None

    # ------------------------------------------------------------------ typed views
    @property
    def line(self) -> int | None:
        r = self.rule
        return r.span.line if r is not None else None

    @property
    def path(self) -> str | None:
        r = self.rule
        return r.span.path if r is not None else None

    @property
    def target_chain(self) -> str | None:
        """The chain a JUMP/GOTO enters."""
        return self.rule.target.chain if self.kind in (Kind.JUMP, Kind.GOTO) else None

    @property
    def translates_destination(self) -> bool:
        """A rule's destination NAT (DNAT, REDIRECT, NETMAP in PREROUTING/OUTPUT)."""
        k = self.kind
        return k in DNAT_KINDS or (k is Kind.NETMAP and self.fact == "dst")

    @property
    def translates_source(self) -> bool:
        k = self.kind
        return k in (Kind.SNAT, Kind.MASQUERADE) or (k is Kind.NETMAP and self.fact == "src")

    @property
    def translation(self):
        """(address, port) the packet was translated to, None when this step translates nothing."""
        if self.translates_destination:
            return self.after.dst, self.after.dport
        if self.translates_source:
            return self.after.src, self.after.sport
        return None

    @property
    def translates(self) -> bool:
        """The step rewrote the packet's addresses: a NAT target, TPROXY, conntrack's reverse
        translation, or Cilium's (reverse) translation and redirect."""
        k = self.kind
        return k in NAT_KINDS or k is Kind.TPROXY or k is Kind.REVERSE_NAT or (
            k is Kind.CILIUM and self.fact in _CILIUM_TRANSLATES)

    @property
    def drops(self) -> bool:
        """The step ended the packet (a verdict, or a route/bridge refusal)."""
        k = self.kind
        if k in (Kind.DROP, Kind.REJECT):
            return True
        if k is Kind.POLICY:
            return self.value == "DROP"
        if k is Kind.ROUTE:
            return self.fact.drops
        return k is Kind.BRIDGE and self.fact is Bridge.HAIRPIN_OFF

    # ------------------------------------------------------------------ text, derived
    @property
    def where(self) -> str:
        r = self.rule
        if r is not None:
            return f"{r.table}:{r.chain}:rule:{r.index}"
        return _WHERE[self.kind].format(table=self.table, chain=self.chain)

    @property
    def verdict(self) -> str:
        """The action as the trace prints it (``JUMP KUBE-SVC-X``, ``DNAT to 10.0.0.5:80``)."""
        k = self.kind
        r = self.rule
        if r is None:
            if k is Kind.POLICY:
                return self.value
            if k is Kind.RETURN or k is Kind.LOOP:
                return k.value
            if k is Kind.STAGES:
                return f"iptables-{self.value} order"
            if k is Kind.REVERSE_NAT:
                return f"conntrack reverse {self.fact}"
            if k is Kind.CONNTRACK and self.fact is not Conntrack.MISSING:
                return self.fact.value
            return self.text or ""
        t = r.target
        a = self.after
        if k is Kind.CONTINUE:
            return "CONTINUE"
        if k is Kind.JUMP or k is Kind.GOTO:
            return f"{k.value} {t.chain}"
        if k is Kind.REJECT:
            return f"REJECT {t.with_}"
        if k is Kind.MARK:
            return f"MARK set 0x{self.value:x}"
        if k is Kind.CONNMARK:
            if self.value is None:  # no conntrack entry: the target did nothing
                return "CONNMARK"
            how = getattr(t, "direction", "set")
            return f"CONNMARK {how} 0x{self.value:x}"
        if k is Kind.TPROXY:
            ip, port = self.value
            return f"TPROXY on {ip}:{port} mark 0x{a.mark:x}"
        if k is Kind.DNAT:
            return f"DNAT to {t.ranges[0].render()}"
        if k is Kind.SNAT:
            return f"SNAT to {t.ranges[0].render()}"
        if k is Kind.REDIRECT:
            return f"REDIRECT to {hostport(a.dst, a.dport)}" if a.dport is not None else f"REDIRECT to {a.dst}"
        if k is Kind.NETMAP:
            return f"NETMAP to {a.dst if self.fact == 'dst' else a.src}"
        if k is Kind.MASQUERADE:
            return f"MASQUERADE to {a.src}" + (" (random-fully)" if t.random_fully else "")
        if k in (Kind.ACCEPT, Kind.DROP, Kind.QUEUE, Kind.RETURN):
            return t.verdict
        return getattr(t, "target", None) or t.name

    @property
    def packet(self) -> str | None:
        """The tuple after a rewrite, as the trace prints it (None: the step rewrote nothing)."""
        k = self.kind
        if k in NAT_KINDS or k is Kind.REVERSE_NAT or (k is Kind.CILIUM and self.after is not None):
            return self.after.tuple_str()
        return None

    def render(self) -> str:
        s = f"{self.where}:{self.verdict}"
        r = self.rule
        if r is not None and r.span.line:
            s += f"  ({r.span.path}:{r.span.line})"
        p = self.packet
        if p:
            s += f"\n      -> {p}"
        if self.note:
            s += f"\n      note: {self.note}"
        return s

    def __str__(self) -> str:
        return f"{self.where}:{self.verdict}"


_CILIUM_TRANSLATES = frozenset({Cilium.DNAT, Cilium.SNAT, Cilium.REVNAT, Cilium.REDIRECT})

#: where a step without a rule happened, by kind (``{table}``, ``{chain}``: the step's own)
_WHERE = {Kind.POLICY: "{table}:{chain}:policy", Kind.RETURN: "{table}:{chain}:return",
          Kind.STAGES: "stages:{chain}", Kind.LOOP: "{table}:{chain}", Kind.REVERSE_NAT: "nat:{chain}",
          Kind.CILIUM: "cilium:{chain}", Kind.CONNTRACK: "conntrack", Kind.ROUTE: "route",
          Kind.BRIDGE: "bridge", Kind.NEIGHBOUR: "neighbour", Kind.REPLY: "reply"}


def cilium_step(point: str, what: Cilium, text: str, packet: "Packet | None" = None,
                note: str | None = None, value: object = None) -> Step:
    """A step of Cilium's datapath at ``point`` (a FACTS key); ``packet``: the packet after it,
    printed in the trace; ``value``: the interface of a REDIRECT, the ``Defect`` of
    NO_REVNAT and KNOWN_DEFECT."""
    return Step(Kind.CILIUM, None, None, packet, None, point, what, value, text, note)


def bridge_step(pkt: "Packet", fact: Bridge, text: str, value=None) -> Step:
    """What a bridge did with the frame (``fact``), in words; HAIRPIN_OFF's ``value`` is (the
    bridge, (namespace, interface) of the port)."""
    return Step(Kind.BRIDGE, None, pkt, pkt, None, None, fact, value, text)


# ---------------------------------------------------------------------- why a result is approximate
class Assumption(str):
    """One reason an outcome is APPROXIMATE where the walk met a match it cannot decide and
    followed both ways: the text shown to the user, with the rule and which way this outcome
    took (``assumes_match``) as data, for checks that weigh the assumption (CHN013 discards an
    outcome that needs ``-i lo`` to match a neighbour discovery packet). Other reasons in a
    branch's ``approx`` are plain strings."""

    rule: "object"
    reason: str
    assumes_match: bool

    def __new__(cls, rule, reason: str, assumes_match: bool):
        way = "matches" if assumes_match else "does not match"
        self = super().__new__(cls, f"{rule.label} (line {rule.span.line}): {reason}; this outcome assumes it {way}")
        self.rule, self.reason, self.assumes_match = rule, reason, assumes_match
        return self

    def __reduce__(self):  # pickle and copy: rebuilt from its data (str would pass only the text)
        return (Assumption, (self.rule, self.reason, self.assumes_match))


# ---------------------------------------------------------------------- hops, journeys, trips
class Hop(NamedTuple):
    """The steps of one namespace for one packet (one outcome of its walk there); a tuple, as
    ``Step``: an environment walk builds one per namespace crossed per branch."""

    namespace: str
    role: str            # "request" | "reply" | "second leg"
    arrived_on: str | None
    steps: tuple
    packet_in: "Packet"
    packet_out: "Packet"
    disposition: str
    detail: str = ""
    ct: object = None    # the conntrack entry (netfilter.walk.Conntrack or Cilium's)
    approx: tuple = ()
    bridged: bool = False
    prob: float | None = 1.0   # of this outcome among the namespace's outcomes (None: unknown)
    outcomes: int = 1          # how many outcomes the namespace had for this packet

    @property
    def stop(self) -> Step | None:
        """The step that ended the packet here (a DROP/REJECT verdict or policy, a route or
        bridge refusal), None when it went on or was delivered."""
        s = self.steps[-1] if self.steps else None
        return s if s is not None and s.drops else None


@dataclass(frozen=True, slots=True, eq=False)
class Journey:
    """One direction of one connection through the environment (one branch of it)."""

    hops: tuple = ()
    end: str = ""           # delivered | refused | dropped | rejected | left | no-route | loop | ...
    end_ns: str | None = None
    end_packet: "Packet | None" = None
    detail: str = ""
    order: tuple = ()       # which outcome of each fork on the way (0 = the first, in rule order)

    @property
    def approximate(self) -> bool:
        return any(h.approx for h in self.hops)

    @property
    def prob(self) -> float | None:
        """Probability of this branch (product of the forks on its way; None: unknown)."""
        return chance(h.prob for h in self.hops)

    @property
    def steps(self):
        return tuple(s for h in self.hops for s in h.steps)

    @property
    def stop(self) -> Step | None:
        """The step that ended the journey (see ``Hop.stop``), None unless it was dropped."""
        return self.hops[-1].stop if self.hops and self.end in ("dropped", "rejected") else None


@dataclass
class JourneyBuilder:
    """A journey while it is walked (hops appended, forks copy it); ``freeze()`` when it ends."""

    hops: list = field(default_factory=list)
    end: str = ""
    end_ns: str | None = None
    end_packet: "Packet | None" = None
    detail: str = ""
    order: tuple = ()

    def copy(self) -> "JourneyBuilder":
        return JourneyBuilder(list(self.hops), self.end, self.end_ns, self.end_packet, self.detail,
                              self.order)

    def freeze(self) -> Journey:
        return Journey(tuple(self.hops), self.end, self.end_ns, self.end_packet, self.detail, self.order)


@dataclass(frozen=True, slots=True, eq=False)
class Trip:
    """One outcome of a connection: its request, the reply, and a proxy's second leg."""

    flow: "Packet"
    start: str
    request: Journey
    reply: Journey | None = None
    client_sees: "Packet | None" = None
    second_leg: "Trip | None" = None
    listener: object = None
    unfollowed: int = 0     # branches beyond the cap, not followed (set on the first outcome)

    @property
    def prob(self) -> float | None:
        return chance((self.request.prob,
                       self.reply.prob if self.reply is not None else 1.0,
                       self.second_leg.prob if self.second_leg is not None else 1.0))

    @property
    def endpoint(self) -> "Packet | None":
        """Where the request was sent to: the last destination translation's result, else where
        the request ended (kube-proxy's endpoint choice)."""
        for h in reversed(self.request.hops):
            if h.ct is not None and h.ct.dnat and (h.packet_out.dst, h.packet_out.dport) != \
                    (h.packet_in.dst, h.packet_in.dport):
                return h.packet_out
        return self.request.end_packet

    @property
    def endpoint_name(self) -> str:
        """The endpoint as ``addr:port`` (where the request ended when nothing translated it)."""
        e = self.endpoint
        return e.tuple_str().split(" -> ")[-1] if e is not None else (self.request.end_ns or "?")

    @property
    def matches_dialled(self) -> bool | None:
        """Whether the reply the client sees comes from the address and port it dialled."""
        s = self.client_sees
        if s is None:
            return None
        return s.src == self.flow.dst and s.sport == self.flow.dport
