"""Model layer: frozen, located iptables data (tables, chains, rules, matches, targets).

Every option carries its columns inside its rule's line (``col``, ``end_col``); the rule carries
the line's :class:`~analyzer.source.Span`. ``rule.option_span(opt)`` gives an option's full Span.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Union

from analyzer.source import Span

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

BUILTIN_CHAINS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
})
TABLES = tuple(BUILTIN_CHAINS)


# --------------------------------------------------------------------------- matches
@dataclass(frozen=True, slots=True)
class Match:
    """One match option as written (``! --dport 80``); a rule ANDs its matches."""

    col: int
    end_col: int
    negated: bool

    @property
    def module(self) -> str:
        return ""

    @property
    def modelled(self) -> bool:
        """False when the engine cannot evaluate it: verdicts that depend on it are APPROXIMATE."""
        return True


@dataclass(frozen=True, slots=True)
class AddrMatch(Match):
    """``-s``/``-d`` (several comma-separated addresses are an OR)."""

    direction: str  # "src" | "dst"
    networks: tuple[Network, ...]


@dataclass(frozen=True, slots=True)
class ProtoMatch(Match):
    """``-p``; ``number`` 0 means all."""

    number: int
    name: str


@dataclass(frozen=True, slots=True)
class IfaceMatch(Match):
    """``-i``/``-o``; a trailing ``+`` is a prefix wildcard."""

    direction: str  # "in" | "out"
    name: str


@dataclass(frozen=True, slots=True)
class FragmentMatch(Match):
    """``-f``: second and later fragments."""


@dataclass(frozen=True, slots=True)
class PortMatch(Match):
    """``--sport``/``--dport`` (tcp, udp, sctp, udplite) and multiport ``--sports/--dports/--ports``."""

    mod: str
    direction: str  # "src" | "dst" | "any"
    ranges: tuple[tuple[int, int], ...]

    @property
    def module(self) -> str:
        return self.mod


@dataclass(frozen=True, slots=True)
class TcpFlagsMatch(Match):
    """``--tcp-flags MASK COMP`` (``--syn`` is ``SYN,RST,ACK,FIN SYN``); bits as in the TCP header."""

    mask: int
    comp: int

    @property
    def module(self) -> str:
        return "tcp"


@dataclass(frozen=True, slots=True)
class IcmpMatch(Match):
    """``--icmp-type``/``--icmpv6-type``; ``code`` None means any code, ``type`` None means any."""

    family: int
    type: int | None
    code: int | None
    name: str

    @property
    def module(self) -> str:
        return "icmp" if self.family == 4 else "icmp6"


@dataclass(frozen=True, slots=True)
class MarkMatch(Match):
    """``-m mark --mark V/M`` or ``-m connmark --mark V/M``: ``(x & mask) == value``."""

    kind: str  # "mark" | "connmark"
    value: int
    mask: int

    @property
    def module(self) -> str:
        return self.kind


@dataclass(frozen=True, slots=True)
class CtStateMatch(Match):
    """``-m state --state`` / ``-m conntrack --ctstate``."""

    mod: str
    states: frozenset[str]

    @property
    def module(self) -> str:
        return self.mod


@dataclass(frozen=True, slots=True)
class CtTupleMatch(Match):
    """``-m conntrack --ctorigsrc/--ctorigdst/--ctreplsrc/--ctrepldst`` (address) and
    ``--ctorigsrcport`` ... (port range)."""

    field_name: str  # "origsrc", "origdst", "replsrc", "repldst", "origsrcport", ...
    networks: tuple[Network, ...] = ()
    ports: tuple[int, int] | None = None

    @property
    def module(self) -> str:
        return "conntrack"


@dataclass(frozen=True, slots=True)
class CtStatusMatch(Match):
    """``-m conntrack --ctstatus`` / ``--ctdir`` / ``--ctproto``."""

    option: str
    values: frozenset[str]

    @property
    def module(self) -> str:
        return "conntrack"


@dataclass(frozen=True, slots=True)
class AddrTypeMatch(Match):
    """``-m addrtype --src-type/--dst-type T[,T]`` with optional ``--limit-iface-in/out``."""

    direction: str  # "src" | "dst"
    types: frozenset[str]
    limit_iface: str | None = None  # "in" | "out"

    @property
    def module(self) -> str:
        return "addrtype"


@dataclass(frozen=True, slots=True)
class StatisticMatch(Match):
    """``-m statistic``: random mode keeps the kernel's 31-bit threshold, so 10- and 11-decimal
    spellings of one probability are equal."""

    mode: str  # "random" | "nth"
    threshold: int = 0  # random: match when prandom_u32() & 0x7fffffff < threshold
    every: int = 0
    packet: int = 0

    @property
    def module(self) -> str:
        return "statistic"

    @property
    def probability(self) -> float:
        if self.mode == "random":
            return self.threshold / 0x80000000
        return 1.0 / self.every if self.every else 1.0


@dataclass(frozen=True, slots=True)
class OwnerMatch(Match):
    """``-m owner --uid-owner/--gid-owner A[-B]`` or ``--socket-exists`` (OUTPUT/POSTROUTING only)."""

    option: str  # "uid" | "gid" | "socket-exists" | "suppl-groups"
    lo: int = 0
    hi: int = 0

    @property
    def module(self) -> str:
        return "owner"


@dataclass(frozen=True, slots=True)
class SetMatch(Match):
    """``-m set --match-set NAME src,dst``: needs ``ipset save`` contents to be exact."""

    name: str
    flags: tuple[str, ...]
    extra: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return "set"

    @property
    def modelled(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class PhysdevMatch(Match):
    """``-m physdev``: bridge ports (``--physdev-in/out NAME``, ``--physdev-is-in/out/bridged``)."""

    option: str
    name: str | None = None

    @property
    def module(self) -> str:
        return "physdev"


@dataclass(frozen=True, slots=True)
class IpRangeMatch(Match):
    """``-m iprange --src-range/--dst-range A-B``."""

    direction: str
    lo: Address
    hi: Address

    @property
    def module(self) -> str:
        return "iprange"


@dataclass(frozen=True, slots=True)
class CommentMatch(Match):
    """``-m comment --comment TEXT``: never changes a verdict."""

    text: str

    @property
    def module(self) -> str:
        return "comment"


@dataclass(frozen=True, slots=True)
class OpaqueMatch(Match):
    """An option of a module synack knows the syntax of but does not evaluate
    (``limit``, ``recent``, ``socket``, ``hashlimit``, ``length``, ...): kept verbatim, and
    verdicts that depend on it are APPROXIMATE."""

    mod: str
    option: str
    args: tuple[str, ...]

    @property
    def module(self) -> str:
        return self.mod

    @property
    def modelled(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class UnknownMatch(Match):
    """An option of a module synack does not know; kept with its raw text."""

    mod: str
    option: str
    args: tuple[str, ...]

    @property
    def module(self) -> str:
        return self.mod

    @property
    def modelled(self) -> bool:
        return False


# --------------------------------------------------------------------------- targets
@dataclass(frozen=True, slots=True)
class Target:
    col: int
    end_col: int

    @property
    def name(self) -> str:
        return type(self).__name__.upper()

    @property
    def terminal(self) -> bool:
        """True when the rule's verdict ends traversal of the hook for this packet."""
        return True


@dataclass(frozen=True, slots=True)
class Verdict(Target):
    """ACCEPT, DROP, RETURN, QUEUE."""

    verdict: str

    @property
    def name(self) -> str:
        return self.verdict

    @property
    def terminal(self) -> bool:
        return self.verdict != "RETURN"


@dataclass(frozen=True, slots=True)
class Reject(Target):
    with_: str = "icmp-port-unreachable"


@dataclass(frozen=True, slots=True)
class Jump(Target):
    """``-j CHAIN`` (``goto`` False) or ``-g CHAIN`` (``goto`` True)."""

    chain: str
    goto: bool = False

    @property
    def name(self) -> str:
        return self.chain

    @property
    def terminal(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class NatRange:
    """One ``--to-destination``/``--to-source`` range: addresses and ports inclusive, None when absent."""

    addr_lo: Address | None
    addr_hi: Address | None
    port_lo: int | None = None
    port_hi: int | None = None

    def render(self) -> str:
        a = ""
        if self.addr_lo is not None:
            a = str(self.addr_lo) if self.addr_lo == self.addr_hi else f"{self.addr_lo}-{self.addr_hi}"
            if self.addr_lo.version == 6 and self.port_lo is not None:
                a = f"[{a}]"
        if self.port_lo is not None:
            p = str(self.port_lo) if self.port_lo == self.port_hi else f"{self.port_lo}-{self.port_hi}"
            a = f"{a}:{p}"
        return a


@dataclass(frozen=True, slots=True)
class Nat(Target):
    """DNAT or SNAT with one or more ranges (``--to`` is ``--to-destination``/``--to-source``)."""

    kind: str  # "DNAT" | "SNAT"
    ranges: tuple[NatRange, ...]
    random: bool = False
    persistent: bool = False
    random_fully: bool = False

    @property
    def name(self) -> str:
        return self.kind


@dataclass(frozen=True, slots=True)
class Masquerade(Target):
    ports: tuple[int, int] | None = None
    random: bool = False
    random_fully: bool = False


@dataclass(frozen=True, slots=True)
class Redirect(Target):
    ports: tuple[int, int] | None = None
    random: bool = False


@dataclass(frozen=True, slots=True)
class Netmap(Target):
    to: Network


@dataclass(frozen=True, slots=True)
class Tproxy(Target):
    on_port: int
    on_ip: Address | None = None
    mark: int = 0
    mask: int = 0


@dataclass(frozen=True, slots=True)
class SetMark(Target):
    """MARK (``kind`` "MARK") or CONNMARK ``--set-*`` (``kind`` "CONNMARK"), normalised to the
    kernel's ``new = (old & ~mask) ^ value``: ``--or-mark 0x4000`` equals ``--set-xmark 0x4000/0x4000``."""

    kind: str
    value: int
    mask: int

    @property
    def name(self) -> str:
        return self.kind

    @property
    def terminal(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class ConnmarkCopy(Target):
    """CONNMARK ``--save-mark`` (ct := nf) or ``--restore-mark`` (nf := ct) with masks."""

    direction: str  # "save" | "restore"
    nfmask: int = 0xFFFFFFFF
    ctmask: int = 0xFFFFFFFF

    @property
    def name(self) -> str:
        return "CONNMARK"

    @property
    def terminal(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class Notrack(Target):
    """``-j NOTRACK`` or ``-j CT --notrack``: the connection is untracked; NAT never sees it."""

    spelling: str = "CT"

    @property
    def name(self) -> str:
        return self.spelling

    @property
    def terminal(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class OtherTarget(Target):
    """A target whose options synack knows but whose effect it does not model in detail
    (LOG, NFLOG, CT --zone, TCPMSS, DSCP, ...). ``terminating`` as the kernel defines it."""

    target: str
    options: tuple[tuple[str, tuple[str, ...]], ...]
    terminating: bool = False
    modelled_effect: bool = True  # False: packet may change in ways synack ignores

    @property
    def name(self) -> str:
        return self.target

    @property
    def terminal(self) -> bool:
        return self.terminating


@dataclass(frozen=True, slots=True)
class UnknownTarget(Target):
    """A target synack does not know, kept with its raw option text."""

    target: str
    raw: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.target

    @property
    def terminal(self) -> bool:
        return False


# --------------------------------------------------------------------------- structure
@dataclass(frozen=True, slots=True)
class Rule:
    table: str
    chain: str
    index: int  # 1-based position in its chain, as `iptables -L --line-numbers`
    matches: tuple[Match, ...]
    target: Target | None
    span: Span
    text: str
    counters: tuple[int, int] | None = None
    # a rule parsed lazily (``load_ruleset(lazy=True)``, what ``synack explain`` uses: one flow
    # reads a few dozen rules of a 10,000-service dump) has its options decoded on first use of
    # ``matches`` or ``target``; ``pending`` is the decoder (called with the rule), None once done
    pending: object = field(default=None, repr=False, compare=False, hash=False)

    def __getattr__(self, name):
        # only reached for an unset slot: the options of a lazily parsed rule (an explain of a
        # 10,000-service dump decodes ~100,000 of them: the slots are filled through their own
        # descriptors, not object.__setattr__'s lookup)
        if name == "matches" or name == "target":
            pending = self.pending
            if pending is not None:
                matches, target = pending(self)
                _SET_MATCHES(self, matches)
                _SET_TARGET(self, target)
                _SET_PENDING(self, None)
                return matches if name == "matches" else target
        raise AttributeError(name)

    def option_span(self, opt: Match | Target) -> Span:
        return Span(self.span.path, self.span.line, opt.col, opt.end_col)

    @property
    def label(self) -> str:
        return f"{self.table}:{self.chain}:rule:{self.index}"

    @property
    def modelled(self) -> bool:
        return all(m.modelled for m in self.matches)


_SET_MATCHES = Rule.matches.__set__
_SET_TARGET = Rule.target.__set__
_SET_PENDING = Rule.pending.__set__


@dataclass(frozen=True, slots=True)
class Chain:
    table: str
    name: str
    builtin: bool
    policy: str | None
    rules: tuple[Rule, ...]
    span: Span | None
    counters: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    chains: Mapping[str, Chain]
    span: Span | None

    def rules(self):
        for c in self.chains.values():
            yield from c.rules


@dataclass(frozen=True, slots=True)
class Ruleset:
    """Everything one namespace's dump(s) say, for one address family."""

    family: int
    tables: Mapping[str, Table]
    sources: tuple[str, ...] = ()
    backend: str | None = None  # "nft" | "legacy" per the dump's "# Generated by" header; None: not said

    def rules(self):
        for t in self.tables.values():
            yield from t.rules()

    def chain(self, table: str, name: str) -> Chain | None:
        t = self.tables.get(table)
        return t.chains.get(name) if t else None

    def chain_graph(self):
        """Chains as a networkx MultiDiGraph: nodes ``(table, chain)``, an edge per jump/goto rule
        (``kind`` "jump"/"goto", ``rule`` the Rule); builtin chains have ``entry=True``."""
        import networkx as nx

        g = nx.MultiDiGraph()
        for t in self.tables.values():
            for c in t.chains.values():
                g.add_node((t.name, c.name), builtin=c.builtin, entry=c.builtin, policy=c.policy)
            for c in t.chains.values():
                for r in c.rules:
                    if isinstance(r.target, Jump):
                        g.add_edge((t.name, c.name), (t.name, r.target.chain),
                                   kind="goto" if r.target.goto else "jump", rule=r)
        return g


def freeze_mapping(d: dict) -> Mapping:
    return MappingProxyType(d)
