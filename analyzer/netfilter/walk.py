"""Netfilter layer: what the kernel does to one concrete packet in one namespace.

Hooks in kernel order (raw -> conntrack -> mangle -> nat -> routing -> filter ...), chains with
jump/goto/return and policies, conntrack (nat sees only a connection's first packet; replies are
reverse-translated automatically), NAT targets, marks. Statistic branches and matches synack cannot
evaluate fork the walk into several outcomes (the latter marked APPROXIMATE).
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
import re
import ipaddress
from dataclasses import dataclass, field

from analyzer.model.rules import (
    AddrMatch, AddrTypeMatch, CommentMatch, ConnmarkCopy, CtStateMatch, CtStatusMatch,
    CtTupleMatch, FragmentMatch, IcmpMatch, IfaceMatch, IpRangeMatch, Jump, MarkMatch,
    Masquerade, Nat, Netmap, Notrack, OpaqueMatch, OtherTarget, OwnerMatch, PhysdevMatch,
    PortMatch, ProtoMatch, Redirect, Reject, Rule, Ruleset, SetMark, SetMatch, StatisticMatch,
    TcpFlagsMatch, Tproxy, UnknownMatch, UnknownTarget, Verdict,
)
from analyzer.engine.concolic import active, in_network, is_sym, one_of, plain
from analyzer.netfilter import stages as STAGES
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.nat import pick_address, pick_port
from analyzer.netfilter.trace import Assumption, Conntrack as CT, Kind, Route, Step  # noqa: F401 (Step re-exported)

from analyzer.model.packet import CT_INPUT, PROTO, PROTO_NAME, Packet, evolve, tcp_flag_names, with_ifaces  # noqa: F401 (re-exported)
from analyzer.parse.flow import FlowSpec, parse_flow, parse_flow_spec  # noqa: F401 (re-exported)
from analyzer.parse.options import _ip
MAX_OUTCOMES = 64
#: rule evaluations of one table traversal after which the walk stops: only a chain loop gets
#: there (the kernel refuses a table with a loop a builtin chain reaches, ELOOP; lint: CHN002)
MAX_RULE_VISITS = 20_000

@dataclass
class Conntrack:
    original: Packet
    reply_src: object = None
    reply_sport: int | None = None
    reply_dst: object = None
    reply_dport: int | None = None
    dnat: bool = False
    snat: bool = False
    untracked: bool = False
    mark: int = 0
    in_use: bool = True  # False: no rule needs conntrack, so the namespace tracks nothing
    confirmed: bool = False  # the entry left this namespace once (looped back on lo): nat is done
    invalid: bool = False  # conntrack refused the packet (ctstate INVALID): no entry, nat skipped
    # the packet belongs to an entry that existed before it (ESTABLISHED or RELATED, from the
    # flow's ctstate): nat is not consulted, and the entry is taken to translate nothing
    existing: str | None = None

    def copy(self) -> "Conntrack":
        """A shallow copy of the same type (what ``dataclasses.replace(ct)`` gives, without its
        per-field work: a 10k-service environment copies entries millions of times)."""
        c = object.__new__(type(self))
        c.__dict__.update(self.__dict__)
        return c

    def reply_tuple(self) -> str:
        o = self.original
        p = Packet(o.family, o.proto, self.reply_src, self.reply_dst, self.reply_sport, self.reply_dport)
        return p.tuple_str()


@dataclass
class Branch:
    pkt: Packet
    ct: Conntrack
    steps: list = field(default_factory=list)
    prob: float | None = 1.0
    approx: list = field(default_factory=list)
    disposition: str | None = None  # set when the walk ends
    detail: str = ""
    next_hop: object = None
    reply: bool = False
    notracked: bool = False  # a NOTRACK matched this packet in this namespace's raw table

    def fork(self) -> "Branch":
        return Branch(self.pkt, self.ct.copy(), list(self.steps), self.prob, list(self.approx),
                      self.disposition, self.detail, self.next_hop, self.reply, self.notracked)


#: ICMPv6 router solicitation/advertisement, neighbour solicitation/advertisement, redirect
_ND_TYPES = (133, 134, 135, 136, 137)
#: the ``uid`` of a packet a kernel socket sends (neighbour discovery): '-m owner' sees a socket
#: without a file (tests/kernel/test_neighbour_kernel.py, owner cases)
KERNEL_SOCKET = -1


def index_key(rule: Rule) -> tuple:
    """(destination address, destination port) the rule is limited to by a single positive
    ``-d ADDR/32`` and a single positive ``--dport N`` (None where it is not): the keys of the
    big-chain index, for the walk and for the checks that bucket rules the same way."""
    dst = port = None
    for m in rule.matches:
        if m.negated:
            continue
        if isinstance(m, AddrMatch) and m.direction == "dst" and len(m.networks) == 1 \
                and m.networks[0].num_addresses == 1:
            dst = m.networks[0].network_address
        elif isinstance(m, PortMatch) and m.direction == "dst" and len(m.ranges) == 1 \
                and m.ranges[0][0] == m.ranges[0][1]:
            port = m.ranges[0][0]
    return dst, port


#: kube-proxy's service rule as iptables-save writes it, read in one match (the common case)
_KUBE_SERVICE_RULE = re.compile(r'-A \S+ (?:! -s [0-9./]+ )?-d ([0-9.]+)/32 -p (tcp|udp|sctp) '
                                r'-m comment --comment (?:"[^"\\]*"|[^\s"\\]+) -m \2 --dport (\d+) '
                                r'-j [A-Za-z][\w-]*(?: --(?:to-destination|reject-with) [\w.:-]+)?$')
_QUOTED_WORDS = re.compile(r'"[^"\\]*"')
#: options that begin like a destination option but do not make an index key
_OTHER_D_OPTIONS = frozenset(("--dst-type", "--dst-range", "--dir", "--dscp", "--dscp-class"))
#: options that take a value: one written as an option (``--comment -p``) is left to the decoder
_VALUED = frozenset(("-m", "-p", "-s", "-i", "-o", "--comment", "--dst-type", "--src-type", "--sport",
                     "--match", "--protocol", "--source", "--in-interface", "--out-interface"))


def _text_index_key(text: str, family: int):
    """`index_key` read from a rule's text (an ``iptables-save`` line), so that indexing a big
    chain of a lazily parsed dump does not decode its rules (12,955 of them in a 10,000-service
    KUBE-SERVICES: 1.3 s). None when the text is anything but the plain form: a quote with a
    backslash, ``-d ! X``, two ``-d`` or ``--dport``, an address list or host name, a port name,
    any other option spelled ``--d...`` (``--destination``, ``--dports``), ``--dport`` outside
    ``-m tcp/udp/sctp``, a destination option after the target; the caller then decodes.
    tests/test_chain_index_text.py checks it against `index_key` on every rule of the corpus and
    on mutated kube-proxy rules."""
    m = _KUBE_SERVICE_RULE.match(text)
    if m is not None and family == 4 and int(m.group(3)) <= 65535:
        try:
            return _ip(m.group(1)), int(m.group(3))  # (the parser's own reader of an address)
        except ValueError:
            return None
    if "\\" in text:
        return None
    if '"' in text:
        text = _QUOTED_WORDS.sub('""', text)
        if '"' in text.replace('""', ""):
            return None
    words = text.split()
    dst = port = None
    seen_d = seen_p = False
    module = None
    target = False
    for i in range(2, len(words)):
        w = words[i]
        if target:
            if w == "-d" or (w.startswith("--d") and w not in _OTHER_D_OPTIONS):
                return None  # a match option written after the target: leave it to the decoder
            continue
        if w == "!" and (i + 1 >= len(words) or not words[i + 1].startswith("-") or words[i + 1] == "!"):
            return None  # '-d ! X', '! !', a stray '!'
        if w.startswith("-") and i + 1 < len(words) and words[i + 1] == "!":
            return None  # the old '-x ! V' negation, or an option's value read as '!'
        if w in _VALUED and (i + 1 >= len(words) or words[i + 1].startswith("-")):
            return None
        if w == "-m":
            module = words[i + 1]
        elif w in ("-j", "-g", "--jump", "--goto"):
            if i + 1 >= len(words) or words[i + 1].startswith("-"):
                return None
            target = True  # the target's own options follow
        elif w == "-d":
            if seen_d or i + 1 >= len(words):
                return None
            seen_d = True
            v = words[i + 1]
            if v.startswith(("!", "-")):
                return None
            if words[i - 1] == "!":
                continue
            addr, slash, plen = v.partition("/")
            try:
                if not slash or plen == ("32" if family == 4 else "128"):  # one address
                    one = ipaddress.ip_address(addr)
                else:
                    net = ipaddress.ip_network(v, strict=False)
                    one = net.network_address if net.num_addresses == 1 else False
            except ValueError:
                return None
            if one is not False:
                if one.version != family:
                    return None
                dst = one
        elif w == "--dport":
            if seen_p or i + 1 >= len(words) or module not in ("tcp", "udp", "sctp"):
                return None
            seen_p = True
            v = words[i + 1]
            if words[i - 1] == "!":
                continue
            lo, colon, hi = v.partition(":")
            if not lo.isdecimal() or (colon and not hi.isdecimal()) or int(lo) > 65535 or (colon and int(hi) > 65535):
                return None
            if not colon or int(lo) == int(hi):
                port = int(lo)
        elif w.startswith("--d") and w not in _OTHER_D_OPTIONS:
            return None
    return dst, port


def chain_index_key(rule: Rule, family: int) -> tuple:
    """`index_key` of ``rule``, read from its text while it is still undecoded (a lazy parse)."""
    if rule.pending is not None:
        key = _text_index_key(rule.text, family)
        if key is not None:
            return key
    return index_key(rule)


class ChainIndex:
    """Rules of a big chain bucketed by a single positive ``-d ADDR/32``, else by a single
    positive ``--dport N``: explaining one flow looks only at the rules that can match its
    destination and port (kube-proxy's KUBE-SERVICES has one rule per service port,
    KUBE-EXTERNAL-SERVICES and KUBE-NODEPORTS one per node port).

    Sound for a set of packets too: when the walk runs under a concolic recorder and the
    destination or port is open, the choice of bucket is itself a decision the recorder notes
    ("the destination is K", or "it is none of the bucketed addresses"), so every packet of the
    class explained shares the witness's buckets and no skipped rule could match any of them.
    """

    def __init__(self, rules: tuple[Rule, ...], family: int = 4):
        self.always: list[int] = []
        self.by_dst: dict = {}
        self.by_dport: dict = {}
        self.size = len(rules)
        for i, r in enumerate(rules):
            key, port = chain_index_key(r, family)
            if key is not None:
                self.by_dst.setdefault(key, []).append(i)
            elif port is not None:
                self.by_dport.setdefault(port, []).append(i)
            else:
                self.always.append(i)

    def candidates(self, dst, dport=None, pkt=None, rules=None, ns=None):
        """Indices, in rule order, of the rules that can match a packet to ``dst``:``dport``.
        Open (``pkt`` and the chain's ``rules`` given): when the witness meets no bucketed
        rule, one decision covers them all (netfilter.symbolic.none_of_bucketed)."""
        rec = active()
        if rec is not None:
            if pkt is not None and (is_sym(dst) is not None or is_sym(dport) is not None):
                from analyzer.netfilter.symbolic import none_of_bucketed
                if none_of_bucketed(self, rec, pkt, rules, ns):
                    return iter(self.always)
            b = self._bucket(rec, self.by_dst, dst, "dst")
            p = self._bucket(rec, self.by_dport, dport, "dport") if dport is not None else None
        else:
            b = self.by_dst.get(dst)
            p = self.by_dport.get(dport) if dport is not None and self.by_dport else None
        if b is True or p is True:
            return iter(range(self.size))
        if b and p:
            return heapq.merge(self.always, b, p)
        if b or p:
            return heapq.merge(self.always, b or p)
        return iter(self.always)

    def _bucket(self, rec, buckets: dict, value, what: str):
        """The bucket of ``value``; an open value notes which one (True: cannot say, take all)."""
        sym = is_sym(value)
        if sym is None:
            return buckets.get(value)
        if not buckets:
            return None
        if sym.keep != (1 << sym.width) - 1 or sym.xor:
            return True  # a partly rewritten value: every rule
        v = plain(sym)
        key = v if what == "dport" else \
            ipaddress.IPv4Address(v) if value.version == 4 else ipaddress.IPv6Address(v)
        hit = buckets.get(key)
        if hit:
            rec.note(rec.eq_atom(sym, v), True)
        else:
            rec.note(self._keys_atom(rec, buckets, what, sym.field, getattr(value, "version", 0)), False,
                     large=True)
        return hit

    def _keys_atom(self, rec, buckets: dict, what: str, field: str, version: int):
        """The packets whose ``field`` is one of the bucket keys (built once per space)."""
        k = (what, field, version)
        cache = self.__dict__.setdefault("_keys_atoms", {})
        hit = cache.get(k)
        if hit is None or hit[0] is not rec.space:
            sp = rec.space
            keys = (a for a in buckets if what == "dport" or a.version == version)
            atom = sp.union(sp.eq(field, a) for a in keys)
            cache[k] = (sp, atom)
            return atom
        return hit[1]


#: match modules whose rules make the kernel track connections (their checkentry takes conntrack)
_CT_MODULES = frozenset({"conntrack", "state", "connmark", "connlimit", "connbytes", "connlabel",
                         "helper", "cluster", "ipvs", "conntrack_zone"})


# every target or module name conntrack_in_use() looks for, as words of a rule's text
_CT_WORDS = re.compile(r"\b(?:DNAT|SNAT|MASQUERADE|REDIRECT|NETMAP|NOTRACK|CT|CONNMARK|CONNSECMARK|"
                       r"CLUSTERIP|SYNPROXY|TPROXY|conntrack|state|connmark|" + "|".join(sorted(_CT_MODULES)) + r")\b")


def conntrack_in_use(ruleset: Ruleset) -> bool:
    """Whether any rule makes the kernel track connections in this namespace.

    Conntrack exists on demand: a namespace tracks nothing until a rule needs it (a NAT target,
    a conntrack/state/connmark match, CONNMARK, NOTRACK/CT, SYNPROXY). Empty builtin nat chains alone do
    not (checked on 6.x with iptables-nft and iptables-legacy).
    """
    for rule in ruleset.rules():
        if rule.pending is not None and not _CT_WORDS.search(rule.text):
            continue  # a lazily parsed rule whose text names nothing conntrack-related: don't decode
        t = rule.target
        if isinstance(t, (Nat, Masquerade, Redirect, Netmap, Notrack, ConnmarkCopy)):
            return True
        if isinstance(t, SetMark) and t.kind != "MARK":
            return True
        if isinstance(t, OtherTarget) and t.target in ("CT", "CONNSECMARK", "CLUSTERIP", "SYNPROXY"):
            return True
        for m in rule.matches:
            if isinstance(m, (CtStateMatch, CtStatusMatch, CtTupleMatch)):
                return True
            if isinstance(m, MarkMatch) and m.kind != "mark":
                return True
            if isinstance(m, (OpaqueMatch, UnknownMatch)) and m.module in _CT_MODULES:
                return True
    return False


TCP_LOOSE = "net.netfilter.nf_conntrack_tcp_loose"
_FIN, _SYN, _RST, _PSH, _ACK, _URG, _ECE, _CWR = (1 << i for i in range(8))
# tcp_valid_flags in nf_conntrack_proto_tcp.c (PSH, ECE and CWR masked off first)
_VALID_TCP_FLAGS = frozenset({_SYN, _SYN | _URG, _SYN | _ACK, _RST, _RST | _ACK, _FIN | _ACK,
                              _FIN | _ACK | _URG, _ACK, _ACK | _URG})


def tcp_flags_valid(pkt: Packet) -> bool:
    """Whether conntrack accepts the TCP flag combination at all (tcp_error: for any packet,
    of a connection or not)."""
    f = pkt.tcp_flags & ~(_PSH | _ECE | _CWR)
    return one_of(f, _VALID_TCP_FLAGS)  # an open value notes the whole set at once


def first_packet_state(pkt: Packet, tcp_loose: int = 1) -> tuple[str, str | None]:
    """What conntrack makes of a packet that belongs to no entry: ("NEW", note) or ("INVALID",
    reason). TCP only opens an entry on a SYN, or, with ``nf_conntrack_tcp_loose=1`` (the
    default), on a mid-stream ACK, which it picks up as an established connection (tcp_new in
    nf_conntrack_proto_tcp.c); an RST, a FIN or a SYN+ACK opens nothing.

    >>> from analyzer.model.packet import Packet
    >>> import ipaddress as ip
    >>> ack = Packet(4, 6, ip.ip_address("10.0.0.1"), ip.ip_address("10.0.0.2"), 1, 2, tcp_flags=0x10)
    >>> first_packet_state(ack)[0], first_packet_state(ack, tcp_loose=0)[0]
    ('NEW', 'INVALID')
    """
    if pkt.proto != 6:
        return "NEW", None
    f = pkt.tcp_flags & ~(_PSH | _ECE | _CWR)
    if not tcp_flags_valid(pkt):
        return "INVALID", f"TCP flags {tcp_flag_names(plain(pkt.tcp_flags))} are not a valid combination"
    if f & _RST:
        return "INVALID", "an RST that belongs to no connection opens none"
    if f & _SYN:
        if f & _ACK:
            return "INVALID", "a SYN+ACK that belongs to no connection opens none"
        return "NEW", None
    if f & _FIN:
        return "INVALID", "a FIN that belongs to no connection opens none"
    if not tcp_loose:
        return "INVALID", f"a mid-stream ACK is not picked up with {TCP_LOOSE}=0"
    return "NEW", f"a mid-stream ACK picked up ({TCP_LOOSE}=1): the entry starts ESTABLISHED"


# what a ruleset's walks can share (conntrack in use, big-chain indexes), for the last few
# rulesets walked: explaining many flows on one 10k-service dump must not redo them per flow
_SHARED: "OrderedDict[int, tuple[Ruleset, dict]]" = OrderedDict()


def _shared(ruleset: Ruleset) -> dict:
    hit = _SHARED.get(id(ruleset))
    if hit is not None and hit[0] is ruleset:
        _SHARED.move_to_end(id(ruleset))
        return hit[1]
    data = {"ct_in_use": conntrack_in_use(ruleset), "index": {}}
    _SHARED[id(ruleset)] = (ruleset, data)  # holding the ruleset keeps its id from being reused
    while len(_SHARED) > 8:
        _SHARED.popitem(last=False)
    return data


_PLAIN_ADDRESSES = (ipaddress.IPv4Address, ipaddress.IPv6Address)
# id of an AddrMatch -> (the match, ((version, first, last address as integers) per network)):
# ``address in network`` of the ipaddress module is several Python calls per network, ~8% of a
# 10,000-service environment lint; the match is held so that its id is not reused
_ADDR_BOUNDS: dict = {}


def _addr_bounds(m) -> tuple:
    if len(_ADDR_BOUNDS) > 100_000:
        _ADDR_BOUNDS.clear()
    hit = _ADDR_BOUNDS[id(m)] = (m, tuple((n.version, int(n.network_address), int(n.broadcast_address))
                                          for n in m.networks))
    return hit


#: what the walk assumes when it meets ``-m recent`` (explain prints it with its assumptions)
RECENT_ASSUMPTION = ("-m recent: the flow is the client's first connection (--rcheck/--update/--remove "
                     "find no entry, --set matches), as when kube-proxy's ClientIP affinity first picks "
                     "an endpoint; a later connection may stick to another one")


class Walker:
    #: set once the walk met a ``-m recent`` match (evaluated under RECENT_ASSUMPTION)
    recent_assumed = False
    #: whether `_eval` names each rule to an active recorder (netfilter.symbolic's walker)
    _names_rules = False

    def __init__(self, ruleset: Ruleset, ns: Namespace, backend: str | None = None):
        self.rs = ruleset
        self.ns = ns
        # which iptables wrote the dump decides the order of stages (netfilter.stages)
        self.backend = backend or getattr(ruleset, "backend", None)
        shared = _shared(ruleset)
        self._index: dict = shared["index"]
        self.ct_in_use = shared["ct_in_use"]
        self._order_noted: dict = {}  # hook -> whether the stage order had to be assumed
        self._hook_stages: dict = {}  # hook -> its stages that can act in this ruleset
        # table -> chain name -> (chain or None, every rule index of a small chain or the big
        # chain's index): a walk looks chains up ~80 times a flow
        self._chains: dict = {}

    # -------------------------------------------------------------- chain evaluation
    def _chain_entry(self, table: str, chain: str) -> tuple:
        by_name = self._chains.get(table)
        if by_name is None:
            by_name = self._chains[table] = {}
        hit = by_name.get(chain)
        if hit is None:
            c = self.rs.chain(table, chain)
            if c is None:
                hit = (None, ())
            elif len(c.rules) < 32:
                hit = (c, range(len(c.rules)))
            else:
                idx = self._index.get((table, chain))
                if idx is None:
                    idx = self._index[(table, chain)] = ChainIndex(c.rules, self.rs.family)
                hit = (c, idx)
            by_name[chain] = hit
        return hit

    def _rules_for(self, table: str, chain: str, pkt: Packet):
        c, cand = self._chain_entry(table, chain)
        if type(cand) is ChainIndex:
            return c, cand.candidates(pkt.dst, pkt.dport, pkt, c.rules, self.ns)
        return c, cand

    def run_table(self, br: Branch, table: str, hook: str) -> list[Branch]:
        """Traverse a table's builtin chain for this hook. Returned branches either go on to the
        next table (``disposition`` None) or ended (dropped, rejected, ...)."""
        frame = self._frame(table, hook, br)
        if frame[0] is None:
            return [br]
        return self._eval(br, table, hook, [frame])

    def _frame(self, table, chain_name, br):
        c, cand = self._rules_for(table, chain_name, br.pkt)
        return [c, cand if type(cand) is range else list(cand), 0]

    #: the table being evaluated (the raw table runs before the conntrack lookup)
    _table: str | None = None

    def _eval(self, br: Branch, table: str, hook: str, frames: list) -> list[Branch]:
        """frames: [chain, candidate rule indices, position] per call level (jump pushes)."""
        self._table = table
        out: list[Branch] = []
        visits = 0
        # a recording walker names the rule being evaluated to the recorder (its lost reasons
        # say where); the recorder is the same for the whole traversal
        rec = active() if self._names_rules else None
        label = self._where if rec is not None else None
        while frames:
            frame = frames[-1]
            chain, cand, pos = frame
            chain_name = chain.name
            rules = chain.rules
            pushed = False
            while pos < len(cand):
                rule = rules[cand[pos]]
                pos += 1
                frame[2] = pos
                visits += 1
                if visits > MAX_RULE_VISITS:
                    br.steps.append(Step(Kind.LOOP, None, br.pkt, br.pkt, table, chain_name))
                    br.disposition = "loop"
                    br.detail = (f"{table}:{chain_name} was reached again and again ({MAX_RULE_VISITS} rule "
                                 "evaluations): the chains jump in a loop, and the kernel refuses such a "
                                 "table (ELOOP; lint reports CHN002)")
                    br.approx.append(f"{table}: chain loop through {chain_name}; the walk stopped")
                    out.append(br)
                    return out
                if rec is not None:
                    rec.where, rec.label = rule, label
                res = self._match_rule(rule, br, hook)
                if res is False:
                    continue
                if res is not True:  # uncertain: fork into match / no match
                    p, reason, exact = res
                    t = rule.target
                    if t is None or (type(t) is OtherTarget and not t.terminating):
                        # matched or not, the packet goes on unchanged (LOG, NFLOG, no target):
                        # no fork, the rule shown with what was not decided
                        self._step(br, rule, Kind.OTHER if t is not None else Kind.CONTINUE,
                                   note=f"may match ({reason}); the packet goes on unchanged either way")
                        continue
                    if len(out) < MAX_OUTCOMES:
                        alt = br.fork()
                        alt.prob = alt.prob * (1 - p) if (p is not None and alt.prob is not None) else None
                        if not exact:
                            alt.approx.append(Assumption(rule, reason, False))
                        out.extend(self._eval(alt, table, hook, [list(f) for f in frames]))
                        if rec is not None:  # the other branch named its own rules
                            rec.where = rule
                    br.prob = br.prob * p if (p is not None and br.prob is not None) else None
                    if not exact:
                        br.approx.append(Assumption(rule, reason, True))
                action = self._apply_target(rule, br, table, hook)
                if action == "continue":
                    continue
                if action == "jump" or action == "goto":
                    if action == "goto":
                        frames.pop()
                    frames.append(self._frame(table, rule.target.chain, br))
                    pushed = True
                    break
                if action == "return":
                    frames.pop()
                    pushed = True
                    if not frames:  # RETURN in a builtin chain: the policy decides
                        pol = chain.policy or "ACCEPT"
                        br.steps.append(_step(Step, (Kind.POLICY, None, br.pkt, br.pkt, table, hook, None, pol, None, None)))
                        out.append(self._end(br, pol))
                        return out
                    break
                out.append(self._end(br, action))
                return out
            if pushed:
                continue
            frames.pop()
            if not frames:  # off the end of the hook's chain (or of a chain it went to by goto)
                pol = self._chain_entry(table, hook)[0].policy or "ACCEPT"
                br.steps.append(_step(Step, (Kind.POLICY, None, br.pkt, br.pkt, table, hook, None, pol, None, None)))
                out.append(self._end(br, pol))
                return out
            br.steps.append(_step(Step, (Kind.RETURN, None, br.pkt, br.pkt, table, chain_name, None, None, None, None)))
        return out

    def _end(self, br: Branch, action: str) -> Branch:
        br.disposition = disposition(action)
        if br.disposition == "rejected":
            br.detail = action.partition(" ")[2]
        return br

    # -------------------------------------------------------------- matches
    def _match_rule(self, rule: Rule, br: Branch, hook: str):
        fork = None
        for m in rule.matches:
            r = self._match(m, br, hook)
            if r is True:
                continue
            if r is False:
                return False
            if fork is not None:  # second uncertain match: combine conservatively
                p1, reason1, ex1 = fork
                p2, reason2, ex2 = r
                fork = (p1 * p2 if p1 is not None and p2 is not None else None,
                        f"{reason1}; {reason2}", ex1 and ex2)
            else:
                fork = r
        return True if fork is None else fork

    def _match(self, m, br: Branch, hook: str):
        p = br.pkt
        neg = m.negated
        if isinstance(m, CommentMatch):
            return True
        if isinstance(m, AddrMatch):
            a = p.src if m.direction == "src" else p.dst
            if type(a) in _PLAIN_ADDRESSES:  # a concrete address: its integer against the bounds
                hit = _ADDR_BOUNDS.get(id(m))
                if hit is None or hit[0] is not m:
                    hit = _addr_bounds(m)
                x, v = a._ip, a._version
                for version, lo, hi in hit[1]:
                    if version == v and lo <= x <= hi:
                        return not neg
                return neg
            return any(in_network(a, n) for n in m.networks if n.version == a.version) != neg
        if isinstance(m, ProtoMatch):
            return (m.number == 0 or m.number == p.proto) != neg
        if isinstance(m, IfaceMatch):
            name = p.iif if m.direction == "in" else p.oif
            if name is None:
                if (m.direction == "in" and hook in ("OUTPUT", "POSTROUTING")) or \
                        (m.direction == "out" and hook in ("PREROUTING", "INPUT")):
                    return neg  # no such interface at this hook: '-i' never matches here
                return (None, f"{'input' if m.direction == 'in' else 'output'} interface unknown "
                              f"(give --from-iface / routes)", False)
            hit = name.startswith(m.name[:-1]) if m.name.endswith("+") else name == m.name
            return hit != neg
        if isinstance(m, PortMatch):
            if p.sport is None and p.dport is None:
                return False
            if m.mod in ("tcp", "udp", "sctp", "udplite", "dccp") and PROTO.get(m.mod, p.proto) != p.proto:
                return False
            def inr(v):
                return v is not None and any(lo <= v <= hi for lo, hi in m.ranges)
            if m.direction == "src":
                hit = inr(p.sport)
            elif m.direction == "dst":
                hit = inr(p.dport)
            else:
                hit = inr(p.sport) or inr(p.dport)
            return hit != neg
        if isinstance(m, TcpFlagsMatch):
            if p.proto != 6:
                return False
            return ((p.tcp_flags & m.mask) == m.comp) != neg
        if isinstance(m, IcmpMatch):
            if p.proto not in (1, 58) or p.icmp_type is None:
                return False
            hit = m.type is None or (p.icmp_type == m.type and (m.code is None or p.icmp_code == m.code))
            return hit != neg
        if isinstance(m, MarkMatch):
            if m.kind != "mark" and not self._has_entry(br):
                return False  # connmark_mt: no entry, no match (negated or not)
            v = p.mark if m.kind == "mark" else br.ct.mark
            return ((v & m.mask) == m.value) != neg
        if isinstance(m, CtStateMatch):
            return (bool(self._ctstates(br) & m.states)) != neg
        if isinstance(m, CtStatusMatch):
            if m.option == "ctdir":
                d = "REPLY" if br.reply else "ORIGINAL"
                return (d in m.values) != neg
            if m.option == "ctstatus":
                return self._ctstatus(br, m, neg)
            return (None, f"--{m.option} not modelled", False)
        if isinstance(m, CtTupleMatch):
            ct = br.ct
            o = ct.original
            val = {"origsrc": o.src, "origdst": o.dst, "replsrc": ct.reply_src, "repldst": ct.reply_dst,
                   "origsrcport": o.sport, "origdstport": o.dport, "replsrcport": ct.reply_sport,
                   "repldstport": ct.reply_dport}.get(m.field_name)
            if val is None:
                return (None, f"--ct{m.field_name} unknown here", False)
            if m.ports:
                return (m.ports[0] <= val <= m.ports[1]) != neg
            return any(in_network(val, n) for n in m.networks if n.version == val.version) != neg
        if isinstance(m, AddrTypeMatch):
            a = p.src if m.direction == "src" else p.dst
            t = self._addrtype(a)
            if t is None:
                return (None, f"whether {a} is LOCAL is unknown (give --addr)", False)
            return (t in m.types or ("UNICAST" in m.types and t == "LOCAL")) != neg
        if isinstance(m, IpRangeMatch):
            a = p.src if m.direction == "src" else p.dst
            return (a.version == m.lo.version and m.lo <= a <= m.hi) != neg
        if isinstance(m, StatisticMatch):
            if m.mode == "random":
                pr = m.probability
                if neg:
                    pr = 1 - pr
                if pr >= 1.0:
                    return True
                if pr <= 0.0:
                    return False
                return (pr, f"statistic random {m.probability:.4f}", True)
            return (None, f"statistic nth every {m.every}", False)
        if isinstance(m, OwnerMatch):
            if hook not in ("OUTPUT", "POSTROUTING"):
                return False
            if p.iif is not None:
                # a forwarded packet has no socket: xt_owner answers (match ^ invert) == 0
                return neg
            if p.uid == KERNEL_SOCKET:
                # sent by a kernel socket (neighbour discovery: ndisc_sk), which has no file:
                # xt_owner answers ((match ^ invert) & (UID | GID)) == 0, and a socket exists
                return (not neg) if m.option == "socket-exists" else neg
            if m.option == "socket-exists":
                return (p.uid is not None) != neg
            v = p.uid if m.option == "uid" else p.gid if m.option == "gid" else None
            if v is None:
                return (None, f"owner {m.option} of the local process unknown (give --uid/--gid)", False)
            return (m.lo <= v <= m.hi) != neg
        if isinstance(m, FragmentMatch):
            return neg  # the first packet is never a non-first fragment
        if isinstance(m, PhysdevMatch):
            bridged = p.iif in self.ns.bridged if p.iif else False
            if m.option == "physdev-is-bridged" or m.option == "physdev-is-in":
                return bridged != neg
            return (None, f"bridge port ({m.option}) not modelled", False)
        if isinstance(m, SetMatch):
            s = self.ns.ipsets.get(m.name)
            if s is None:
                return (None, f"ipset '{m.name}' contents not given (pass `ipset save` output)", False)
            vals = []
            for d, f in zip(s.dims if s.type != "list:set" else ["ip"] * len(m.flags), m.flags):
                if d == "port":
                    vals.append((p.proto, p.sport if f == "src" else p.dport))
                else:
                    vals.append(p.src if f == "src" else p.dst)
            hit = s.contains(vals, self.ns.ipsets)
            if hit is None:
                return (None, f"ipset '{m.name}' of type {s.type} not evaluated", False)
            return hit != neg
        if isinstance(m, OpaqueMatch) and m.module == "recent":
            self.recent_assumed = True  # explain says so (RECENT_ASSUMPTION)
            # the walk is a connection's first packet from a client the list has not seen (kube-proxy's
            # session affinity: the first connection picks an endpoint by statistic, later ones stick
            # to it): --set matches and records, --rcheck/--update/--remove find no entry; the
            # other options only qualify the check
            return (m.option not in ("--rcheck", "--update", "--remove")) != neg
        if isinstance(m, OpaqueMatch) and m.module == "hl" and p.proto == 58 and p.icmp_type in _ND_TYPES \
                and m.args and m.args[0].isdigit():
            # neighbour discovery is sent with hop limit 255 (RFC 4861 6.1.2/7.1.1: ndisc's
            # socket), so '-m hl' is decided for it
            v = int(m.args[0])
            hit = 255 == v if m.option == "--hl-eq" else 255 > v if m.option == "--hl-gt" else 255 < v
            return hit != neg
        if isinstance(m, (OpaqueMatch, UnknownMatch)):
            return (None, f"'-m {m.module} {m.option}' not evaluated", False)
        return (None, f"{type(m).__name__} not evaluated", False)

    def _has_entry(self, br: Branch) -> bool:
        """Whether the packet has a conntrack entry where the rules run: not in the raw table
        (it runs before the conntrack lookup; a packet looped back on lo keeps its entry), not
        untracked, not refused (INVALID), and only where conntrack is in use."""
        ct = br.ct
        if self._table == "raw" and not ct.confirmed:
            return False
        return ct.in_use and not ct.untracked and not ct.invalid

    def _ctstates(self, br: Branch) -> set:
        ct = br.ct
        if self._table == "raw" and not ct.confirmed:
            # no entry yet: conntrack_mt and state_mt see INVALID, UNTRACKED after a NOTRACK of
            # this packet (a reply is a packet of its own: its raw pass has no entry either)
            return {"UNTRACKED"} if br.notracked else {"INVALID"}
        if ct.untracked:
            return {"UNTRACKED"}
        if ct.invalid:
            return {"INVALID"}
        if ct.existing and not br.reply:
            return {ct.existing}
        s = {"ESTABLISHED"} if br.reply else {"NEW"}
        if ct.dnat:
            s.add("DNAT")
        if ct.snat:
            s.add("SNAT")
        return s

    def _ctstatus(self, br: Branch, m, neg: bool):
        """``--ctstatus``: the entry's status bits as the rules see them. A connection's first
        packet has none of them (CONFIRMED only once it left this namespace and came back on lo);
        its first reply has SEEN_REPLY and CONFIRMED, and for TCP (a SYN+ACK) not ASSURED. What
        the walk cannot know (ASSURED of other replies, the bits of an existing entry the flow
        names) forks APPROXIMATE. Without an entry (INVALID, UNTRACKED) the match fails, negated
        or not: conntrack_mt returns before testing the status."""
        ct = br.ct
        if not self._has_entry(br):
            return False
        if br.reply:
            sure = {"SEEN_REPLY", "CONFIRMED"}
            unknown = {"ASSURED"} if ct.existing or br.pkt.proto != 6 else set()
        elif ct.existing == "ESTABLISHED":
            sure, unknown = {"SEEN_REPLY", "CONFIRMED"}, {"ASSURED", "EXPECTED"}
        elif ct.existing:
            sure, unknown = set(), {"SEEN_REPLY", "CONFIRMED", "ASSURED", "EXPECTED"}
        else:
            sure, unknown = ({"CONFIRMED"} if ct.confirmed else set()), set()
        if m.values & sure:
            return not neg
        if m.values & unknown:
            return (None, f"--ctstatus {','.join(sorted(m.values & unknown))} of this entry is not known", False)
        return neg

    def _addrtype(self, a):
        if a.is_multicast:
            return "MULTICAST"
        if a.version == 4 and (a == ipaddress.IPv4Address("255.255.255.255")):
            return "BROADCAST"
        if a.is_loopback or self.ns.is_local(a):
            return "LOCAL"
        if not self.ns.known:
            return None
        return "UNICAST"

    # -------------------------------------------------------------- targets
    def _step(self, br, rule: Rule, kind: Kind, before=None, value=None, fact=None, note: str | None = None):
        p = br.pkt
        br.steps.append(_step(Step, (kind, rule, before or p, p, None, None, fact, value, None, note)))

    def _apply_target(self, rule: Rule, br: Branch, table: str, hook: str) -> str:
        t = rule.target
        steps = br.steps
        if t is None:
            p = br.pkt
            steps.append(_step(Step, (Kind.CONTINUE, rule, p, p, None, None, None, None, None, None)))
            return "continue"
        if isinstance(t, Jump):
            p = br.pkt
            steps.append(_step(Step, (Kind.GOTO if t.goto else Kind.JUMP, rule, p, p, None, None, None, None, None, None)))
            if self._chain_entry(table, t.chain)[0] is None:
                br.approx.append(f"{rule.label}: jump to undefined chain {t.chain}")
                return "continue"
            return "goto" if t.goto else "jump"
        if isinstance(t, Verdict):
            p = br.pkt
            steps.append(_step(Step, (_VERDICT_KIND.get(t.verdict, Kind.OTHER), rule, p, p, None, None, None, None, None, None)))
            return "return" if t.verdict == "RETURN" else t.verdict
        if isinstance(t, Reject):
            self._step(br, rule, Kind.REJECT)
            return f"REJECT {t.with_}"
        if isinstance(t, SetMark):
            before = br.pkt
            if t.kind == "MARK":
                br.pkt = evolve(br.pkt, mark=(br.pkt.mark & ~t.mask & 0xFFFFFFFF) ^ t.value)
                self._step(br, rule, Kind.MARK, before, br.pkt.mark)
            elif not self._has_entry(br):
                self._step(br, rule, Kind.CONNMARK, note="no conntrack entry here: the target does nothing")
            else:
                br.ct.mark = (br.ct.mark & ~t.mask & 0xFFFFFFFF) ^ t.value
                self._step(br, rule, Kind.CONNMARK, before, br.ct.mark)
            return "continue"
        if isinstance(t, ConnmarkCopy) and not self._has_entry(br):
            self._step(br, rule, Kind.CONNMARK, note="no conntrack entry here: the target does nothing")
            return "continue"
        if isinstance(t, ConnmarkCopy):
            before = br.pkt
            if t.direction == "save":
                # xt_connmark: ct = (ct & ~ctmask) ^ (mark & nfmask); XOR, not OR, where the masks
                # overlap (tests/kernel: connmark-save-masks-xor)
                br.ct.mark = (br.ct.mark & ~t.ctmask & 0xFFFFFFFF) ^ (br.pkt.mark & t.nfmask)
                self._step(br, rule, Kind.CONNMARK, before, br.ct.mark)
            else:
                # mark = (mark & ~nfmask) ^ (ct & ctmask)
                br.pkt = evolve(br.pkt, mark=(br.pkt.mark & ~t.nfmask & 0xFFFFFFFF) ^ (br.ct.mark & t.ctmask))
                self._step(br, rule, Kind.CONNMARK, before, br.pkt.mark)
            return "continue"
        if isinstance(t, Notrack):
            br.ct.untracked = br.notracked = True
            self._step(br, rule, Kind.NOTRACK, note="untracked: nat table skipped, no reverse translation")
            return "continue"
        if isinstance(t, Tproxy):
            before = br.pkt
            br.pkt = evolve(br.pkt, mark=(br.pkt.mark & ~t.mask & 0xFFFFFFFF) ^ t.mark)
            ip = t.on_ip or self.ns.primary_address(br.pkt.iif, br.pkt.family) or br.pkt.dst
            self._step(br, rule, Kind.TPROXY, before, (ip, t.on_port),
                       note="delivered to the local proxy socket; the packet keeps its destination")
            br.detail = f"proxy socket {ip}:{t.on_port}"
            return "TPROXY"
        if isinstance(t, (Nat, Masquerade, Redirect, Netmap)):
            return self._nat(rule, br, table, hook)
        if isinstance(t, OtherTarget):
            if t.terminating:
                self._step(br, rule, Kind.HANDOFF)
                br.approx.append(f"{rule.label}: {t.target} hands the packet to userspace/elsewhere")
                return t.target
            self._step(br, rule, Kind.OTHER)
            return "continue"
        if isinstance(t, UnknownTarget):
            self._step(br, rule, Kind.UNKNOWN)
            br.approx.append(f"{rule.label} (line {rule.span.line}): target {t.target} not modelled")
            return "continue"
        self._step(br, rule, Kind.OTHER)
        return "continue"

    def _nat(self, rule, br: Branch, table: str, hook: str) -> str:
        t = rule.target
        p = br.pkt
        ct = br.ct
        if isinstance(t, (Nat, Redirect, Netmap)) and (t.name == "DNAT" or isinstance(t, Redirect) or
                                                        (isinstance(t, Netmap) and hook in ("PREROUTING", "OUTPUT"))):
            if isinstance(t, Redirect):
                if hook == "OUTPUT":
                    addr = ipaddress.ip_address("127.0.0.1" if p.family == 4 else "::1")
                else:
                    addr = self.ns.primary_address(p.iif, p.family)
                    if addr is None:
                        addr = p.dst
                        br.approx.append(f"{rule.label}: address of {p.iif or 'the input interface'} unknown; "
                                         "REDIRECT uses it as the new destination")
                pc = pick_port(p.dport, *(t.ports or (None, None)), random=t.random, dnat=True)
                port = self._port(br, rule, pc)
                br.pkt = evolve(p, dst=addr, dport=port)
                kind = Kind.REDIRECT
            elif isinstance(t, Netmap):
                off = int(p.dst) & int(t.to.hostmask)
                br.pkt = evolve(p, dst=ipaddress.ip_address(int(t.to.network_address) | off))
                kind = Kind.NETMAP
            else:
                r = t.ranges[0]
                # find_best_ips_proto: a hash of the source seeded with the destination (exact)
                addr = p.dst if r.addr_lo is None else r.addr_lo if r.addr_lo.version != p.dst.version else \
                    pick_address(r.addr_lo, r.addr_hi, p.src, p.dst, persistent=t.persistent, dnat=True)
                pc = pick_port(p.dport, r.port_lo, r.port_hi, random=t.random or t.random_fully, dnat=True)
                port = self._port(br, rule, pc)
                br.pkt = evolve(p, dst=addr, dport=port)
                kind = Kind.DNAT
                if len(t.ranges) > 1:
                    br.approx.append(f"{rule.label}: DNAT with several --to-destination; the kernel "
                                     f"uses one, shown with the first ({addr})")
            # the kernel sets IPS_DST_NAT (what --ctstate DNAT tests) only if the tuple changed
            ct.dnat = ct.dnat or (br.pkt.dst, br.pkt.dport) != (p.dst, p.dport)
            ct.reply_src, ct.reply_sport = br.pkt.dst, br.pkt.dport
            ranged = isinstance(t, Nat) and t.ranges[0].addr_lo != t.ranges[0].addr_hi
            self._step(br, rule, kind, p, fact="dst", note=(
                "the kernel's pick in the range: a hash of the source address seeded with the "
                "destination (find_best_ips_proto), the same on every boot") if ranged else None)
            return "NAT"
        # source NAT (SNAT, MASQUERADE, NETMAP in POSTROUTING/INPUT)
        if isinstance(t, Masquerade):
            addr = self.ns.masquerade_address(p.oif, p.family, toward=br.next_hop or p.dst)
            if addr is None:
                addr = ipaddress.ip_address("0.0.0.0" if p.family == 4 else "::")
                br.approx.append(f"{rule.label}: MASQUERADE uses the address of {p.oif or 'the output interface'}, "
                                 "which is not known (give --addr)")
            pc = pick_port(p.sport, *(t.ports or (None, None)), random=t.random)
            port = self._port(br, rule, pc)
            kind = Kind.MASQUERADE
        elif isinstance(t, Netmap):
            off = int(p.src) & int(t.to.hostmask)
            addr = ipaddress.ip_address(int(t.to.network_address) | off)
            port = p.sport
            kind = Kind.NETMAP
        else:
            r = t.ranges[0]
            random_all = t.random or t.random_fully
            in_range = (r.addr_lo is None or (p.src.version == r.addr_lo.version and r.addr_lo <= p.src <= r.addr_hi)) \
                and (r.port_lo is None or p.sport is None or r.port_lo <= p.sport <= r.port_hi)
            if in_range and not random_all:
                # get_unique_tuple step 1: the original tuple already lies in the range: kept
                addr, port = p.src, p.sport
            else:
                addr = p.src if r.addr_lo is None else r.addr_lo if r.addr_lo.version != p.src.version else \
                    pick_address(r.addr_lo, r.addr_hi, p.src, p.dst, persistent=t.persistent, dnat=False)
                port = self._port(br, rule, pick_port(p.sport, r.port_lo, r.port_hi, random=random_all))
            kind = Kind.SNAT
        br.pkt = evolve(p, src=addr, sport=port)
        # IPS_SRC_NAT only if the tuple changed: MASQUERADE to the address already used is a no-op
        ct.snat = ct.snat or (addr, port) != (p.src, p.sport)
        ct.reply_dst, ct.reply_dport = addr, port
        self._step(br, rule, kind, p, fact="src",
                   note="source port kept unless it clashes with another connection" if port == p.sport and plain(p.sport) else None)
        return "NAT"

    def _port(self, br: Branch, rule: Rule, pc) -> int | None:
        if not pc.exact:
            br.approx.append(f"{rule.label}: {pc.why}; shown with {pc.port}")
        return pc.port

    # -------------------------------------------------------------- the whole path
    def hook(self, brs: list[Branch], hook: str, reply: bool = False) -> list[Branch]:
        """Run every stage registered at this hook, in the kernel's order (netfilter.stages)."""
        if self.backend is None and not reply and self._order_assumed_at(hook):
            for br in brs:
                if br.disposition is None:
                    br.steps.append(Step(Kind.STAGES, chain=hook, value=STAGES.DEFAULT_BACKEND,
                                         note="the dump does not say which iptables wrote it (no "
                                         "'# Generated by' header): iptables-nft runs security "
                                         "INPUT after nat INPUT, iptables-legacy before it"))
        for stage in self._stages_at(hook):
            table = stage.table
            if table is None:  # the conntrack lookup
                if not reply:
                    for br in brs:
                        if br.disposition is None and not br.ct.confirmed:
                            self._conntrack_step(br)
                continue
            nxt = []
            for br in brs:
                if br.disposition is not None:
                    nxt.append(br)
                elif table == "nat" and (reply or br.ct.untracked or not br.ct.in_use or br.ct.confirmed
                                         or br.ct.invalid or br.ct.existing):
                    # nat chains see only the first packet of a tracked connection; replies are
                    # reverse-translated by conntrack itself; a packet without a conntrack entry
                    # (untracked, or no rule needs conntrack) passes the nat hooks untouched
                    if reply:
                        self._denat(br, hook)
                    nxt.append(br)
                else:
                    nxt.extend(self.run_table(br, table, hook))
            brs = nxt
        return brs

    def _stages_at(self, hook: str) -> tuple:
        """The stages of ``hook`` that can act here: the conntrack lookup, nat (which reverse-
        translates replies without rules), and each other table that has this hook's chain (a
        table without it passes every packet on untouched: skipping it changes nothing)."""
        hit = self._hook_stages.get(hook)
        if hit is None:
            hit = self._hook_stages[hook] = tuple(
                s for s in STAGES.stages(hook, self.backend)
                if s.table is None or s.table == "nat" or self.rs.chain(s.table, hook) is not None)
        return hit

    def _order_assumed_at(self, hook: str) -> bool:
        hit = self._order_noted.get(hook)
        if hit is None:
            hit = self._order_noted[hook] = self._order_assumed(hook)
        return hit

    def _order_assumed(self, hook: str) -> bool:
        present = {t for t in STAGES.tables(hook) if (c := self.rs.chain(t, hook)) is not None
                   and (c.rules or (c.policy or "ACCEPT") != "ACCEPT")}
        return STAGES.order_differs(hook, present)

    def _conntrack_step(self, br: Branch):
        if not br.ct.in_use:
            br.steps.append(Step(Kind.CONNTRACK, None, br.pkt, br.pkt, fact=CT.OFF, note="no rule in this ruleset needs "
                                 "conntrack: the kernel keeps no entry"))
            return
        if br.ct.untracked:
            br.steps.append(Step(Kind.CONNTRACK, None, br.pkt, br.pkt, fact=CT.UNTRACKED))
            return
        given = br.pkt.ctstate
        if given != CT_INPUT["NEW"]:
            for name in ("ESTABLISHED", "RELATED", "INVALID"):
                if given == CT_INPUT[name]:
                    break
            else:
                name = "NEW"
            if name == "INVALID" or (br.pkt.proto == 6 and not tcp_flags_valid(br.pkt)):
                br.ct.invalid = True
                why = "the flow says conntrack refuses it (e.g. a TCP segment out of window)" \
                    if name == "INVALID" else \
                    f"TCP flags {tcp_flag_names(plain(br.pkt.tcp_flags))} are not a valid combination"
                br.steps.append(Step(Kind.CONNTRACK, None, br.pkt, br.pkt, fact=CT.INVALID,
                                     note=f"{why}: no entry; the nat table is skipped"))
                return
            if name != "NEW":
                br.ct.existing = name
                br.ct.mark = br.pkt.connmark
                br.steps.append(Step(Kind.CONNTRACK, None, br.pkt, br.pkt, fact=CT[name], note=(
                    "a packet of an existing connection (original direction): the nat table is not "
                    "consulted, and the entry is taken to translate nothing")))
                return
        state, why = first_packet_state(br.pkt, self.ns.sysctl(TCP_LOOSE, 1))
        if state == "INVALID":
            br.ct.invalid = True
            br.steps.append(Step(Kind.CONNTRACK, None, br.pkt, br.pkt, fact=CT.INVALID, note=f"{why}: no entry; the nat table is skipped"))
            return
        note = f"original tuple {br.ct.original.tuple_str()}"
        br.steps.append(Step(Kind.CONNTRACK, None, br.pkt, br.pkt, fact=CT.NEW, note=f"{note}; {why}" if why else note))

    def _denat(self, br: Branch, hook: str):
        """The reply is reverse-translated by conntrack at the nat hooks, without rules."""
        ct = br.ct
        o = ct.original
        p = br.pkt
        if hook in ("PREROUTING", "OUTPUT") and ct.snat and p.dst == ct.reply_dst:
            br.pkt = evolve(p, dst=o.src, dport=o.sport)
            br.steps.append(Step(Kind.REVERSE_NAT, None, p, br.pkt, "nat", hook, "SNAT"))
        elif hook in ("POSTROUTING", "INPUT") and ct.dnat and p.src == ct.reply_src:
            br.pkt = evolve(br.pkt, src=o.dst, sport=o.dport)
            br.steps.append(Step(Kind.REVERSE_NAT, None, p, br.pkt, "nat", hook, "DNAT"))


def disposition(action: str | None) -> str | None:
    """How a table traversal that ended with ``action`` leaves the packet: None (it goes on:
    ACCEPT, a NAT, or no action), "dropped", "rejected" (``REJECT with``), else the action in
    lower case ("tproxy", a hand-off)."""
    if action is None or action in ("ACCEPT", "NAT"):
        return None
    if action == "DROP":
        return "dropped"
    if action.startswith("REJECT"):
        return "rejected"
    return action.lower()


def route_step(before: Packet, after: Packet, fact: Route, text: str, route: str | None = None) -> Step:
    """A step of the routing decision or of the input route checks (``fact`` says which);
    ``route``: the route taken, as ``ip route`` prints it."""
    return Step(Kind.ROUTE, None, before, after, None, None, fact, route, text)


# a Step from all ten of its fields in order (kind, rule, before, after, table, chain, fact,
# value, text, note), without the NamedTuple's __new__ (a Python function that fills the
# defaults): the steps of every rule a walk crosses are built here
_step = tuple.__new__
assert Step._fields == ("kind", "rule", "before", "after", "table", "chain", "fact", "value", "text", "note")

#: the kind of a rule step for each verdict target
_VERDICT_KIND = {"ACCEPT": Kind.ACCEPT, "DROP": Kind.DROP, "RETURN": Kind.RETURN, "QUEUE": Kind.QUEUE}


def route_decision(w: "Walker", br: Branch, local_origin: bool = False) -> str:
    """The routing decision for ``br.pkt`` in ``w``'s namespace: 'local' (delivered here),
    'forward' (``oif`` and ``next_hop`` set) or 'end' (disposition set: no route, blackhole...).
    A namespace given no addresses or routes at all is assumed to forward (APPROXIMATE)."""
    ns = w.ns
    r = ns.route(br.pkt.dst)
    if r.kind == "local":
        br.steps.append(route_step(br.pkt, br.pkt, Route.LOCAL,
                                   f"local delivery ({br.pkt.dst} is an address of this namespace)"))
        return "local"
    if r.kind == "none":
        if not ns.known:
            br.steps.append(route_step(br.pkt, br.pkt, Route.ASSUMED_FORWARD,
                                       "forward (no addresses/routes given: assumed not local)"))
            br.approx.append("routing unknown: give --addr/--route or --iproute")
            return "forward"
        br.disposition, br.detail = "no-route", f"no route to {br.pkt.dst}"
        br.steps.append(route_step(br.pkt, br.pkt, Route.NO_ROUTE, br.detail))
        return "end"
    if r.kind != "unicast":
        br.disposition, br.detail = r.kind, f"{r.kind} route {r.route.render()}"
        br.steps.append(route_step(br.pkt, br.pkt, Route.SPECIAL, br.detail, r.route.render()))
        return "end"
    before = br.pkt
    br.pkt = with_ifaces(br.pkt, br.pkt.iif, r.oif)
    br.next_hop = r.via or br.pkt.dst
    via = r.text or r.route.render()
    br.steps.append(route_step(before, br.pkt, Route.OUTPUT if local_origin else Route.FORWARD,
                               f"{'output' if local_origin else 'forward'} via {via}", via))
    return "forward"
