"""Netfilter layer: a table traversal over a *set* of packets.

The concolic walk (symbolic.py) explores an open flow path by path: one class of packets per
path, so a 10,000-service dump's fan-out (kube-proxy's KUBE-SERVICES, one chain per service and
endpoint) makes one class per service and endpoint, each walked on its own. This walk carries
the whole set instead: each rule splits it (``S & match``, ``S - match``), a jump runs the called
chain on the part that matched and the part that comes back joins the rest, a statistic
branch splits the world (both parts, each with its probability), MARK rewrites the mark of the
part that matched (kept per thread: the flow's mark is fixed), and DNAT to one address (and
port) ends the table with that part's destination rewritten (`Exit.consts`). Two uses:

- `SetWalker.hook`: the PREROUTING hook for a connection's first packet. Each way out is an
  `Exit`: the input packets that take it, the packets as they leave, and what the hook did;
  symbolic.explain_fate explores the packets after the hook concolically and groups the input
  packets by fate.
- `SetWalker.table` with ``effects=False``: one table traversal after the hook, decided for
  every packet at once by how it leaves the table (symbolic.RecordingWalker._summary).

It models only what it can follow exactly, in the walk's semantics (walk.Walker._match and
_apply_target): header matches (addresses, iprange, protocol, ports, addrtype with the
namespace's addresses, via `symbolic.match_header`), ``-i``/``-o`` against known interfaces,
``-m mark``, ``-m statistic --mode random``, ``-m recent`` (RECENT_ASSUMPTION),
``--tcp-flags``/``--icmp-type`` and ``--ctstate`` with known values, comments; jumps, gotos,
RETURN, ACCEPT, DROP, REJECT, policies, MARK, and DNAT to a single address and port; a rule
whose target changes nothing (none, LOG, ...) is skipped whatever it matches. Anything else
raises `Unsupported`, and the caller walks path by path as before: a set walk never guesses.
"""
from __future__ import annotations

from dataclasses import dataclass

from analyzer.model.rules import (
    AddrMatch, AddrTypeMatch, CommentMatch, CtStateMatch, IcmpMatch, IfaceMatch, IpRangeMatch, Jump, MarkMatch, Nat,
    OpaqueMatch, OtherTarget, PortMatch, ProtoMatch, Reject, SetMark, StatisticMatch, TcpFlagsMatch, Verdict,
)
from analyzer.netfilter import stages as STAGES

#: how deep chains may call each other before the set walk gives up (the kernel refuses loops)
MAX_DEPTH = 64


class Unsupported(Exception):
    """The set walk cannot follow this rule exactly (the caller explores path by path)."""


@dataclass(slots=True)
class Thread:
    """Packets travelling together in one world: ``packets`` as they are now, ``prob`` the
    probability of the statistic branches that led here (1.0: every packet goes this way)."""

    packets: object
    prob: float = 1.0
    # the packet mark of every packet of the thread, when the flow's mark is fixed (then MARK
    # and -m mark are decided per thread, without a set operation); None: the mark is an open
    # input field of ``packets``
    mark: int | None = None
    dnat: tuple | None = None  # (input packets, constants written): the DNAT that ended the nat table


@dataclass(frozen=True, slots=True)
class Exit:
    """One way through the hook: ``before`` the input packets that take it (over the fields
    as they arrived), ``after`` the same packets as they leave the hook, except their packet
    mark, which is ``mark`` for all of them (None: the mark is an open input field, unchanged,
    in ``after``), ``prob`` the share of their connections that go this way, ``action``: None
    (the packet goes on) or how it ended ("DROP", "REJECT ..."); ``dnat``: whether a DNAT
    changed the destination on the way, ``consts`` what it wrote ((field, value), ...). ``prob``
    is informative only: two statistic worlds that join again (a statistic jump to a chain that
    returns) travel as one thread of their common probability. Translated: then
    ``after`` is None, the packets being ``before`` with those fields rewritten
    (``before.assign_all(consts)``, not built: the caller takes them together)."""

    before: object
    after: object
    prob: float
    action: str | None
    dnat: bool
    consts: tuple = ()
    mark: int | None = None

    def image(self):
        """The packets as they leave the hook (``after``, built for a translated exit), their
        mark aside (``mark``)."""
        return self.after if self.after is not None else self.before.assign_all(self.consts)


class SetWalker:
    """Set walks of the tables of one hook, for the packets of one flow (``space``): the
    namespace ``ns`` gives addrtype's local addresses; ``iif`` is the flow's input interface
    when it is fixed (``-i`` is then decided once), None when it is an open field (then
    `Unsupported`); ``mark`` the flow's fixed packet mark (None: open, then MARK is
    `Unsupported`: the input mark would be lost)."""

    def __init__(self, ruleset, ns, space, family: int, iif: str | None, mark: int | None,
                 backend: str | None = None, *, oif: str | None = None, ctstates: frozenset | None = None,
                 effects: bool = True, tcp_flags: int | None = None, icmp: tuple | None = None):
        self.rs = ruleset
        self.ns = ns
        self.space = space
        self.family = family
        self.iif = iif
        self.mark = mark
        self.backend = backend if backend is not None else getattr(ruleset, "backend", None)
        self._sets: dict = {}
        self._ports: dict = {}
        self.recent_assumed = False  # a -m recent match was decided under walk.RECENT_ASSUMPTION
        # what a table summary (symbolic.RecordingWalker) knows of the packets for sure: the
        # output interface, the conntrack states the rules see; ``effects`` False: a rule that
        # would change a packet (MARK, DNAT) or split the world (statistic) is Unsupported
        self.oif = oif
        self.ctstates = ctstates
        self.effects = effects
        # the flow's fixed TCP flags, and ICMP (type, code) of its ICMP packets: --tcp-flags and
        # --icmp-type are then decided once (None: not known, Unsupported)
        self.tcp_flags = tcp_flags
        self.icmp = icmp

    # ------------------------------------------------------------------ the hook
    def hook(self, universe, hook: str, ct_in_use: bool) -> list[Exit]:
        """Every way through ``hook`` for the packets of ``universe`` (a connection's first
        packet, state NEW: the caller checks that the conntrack lookup decides it alike for all
        of them)."""
        threads = [Thread(universe, 1.0, self.mark)]
        ended: list[Thread] = []
        ends: list[str] = []
        for stage in STAGES.stages(hook, self.backend):
            table = stage.table
            if table is None or self.rs.chain(table, hook) is None:
                continue  # the conntrack lookup (decided by the caller), or a table without this hook
            if table == "nat" and not ct_in_use:
                continue  # no conntrack entry: the nat hooks pass every packet untouched
            nxt = []
            for th in threads:
                if th.dnat is not None:
                    # the set is over the translated header from here on: what the input
                    # packets were is only known as a whole (Exit.before), not split again
                    raise Unsupported(f"{table} {hook} after a DNAT in the same hook")
                for t, action in self._first_packet_table(th, table, hook):
                    if action is None:
                        nxt.append(t)
                    else:
                        ended.append(t)
                        ends.append(action)
            threads = nxt
        out = [self._exit(t, None) for t in threads]
        out += [self._exit(t, a) for t, a in zip(ended, ends)]
        return [e for e in out if not e.before.is_empty()]

    def _first_packet_table(self, th: Thread, table: str, hook: str):
        """`table` for a connection's first packet in the hook: the conntrack states its rules
        see are known (walk.Walker._ctstates): none yet in raw (it runs before the conntrack
        lookup: INVALID), NEW after it."""
        known = self.ctstates
        self.ctstates = frozenset({"INVALID"}) if table == "raw" else frozenset({"NEW"})
        try:
            return self.table(th, table, hook)
        finally:
            self.ctstates = known

    def _exit(self, t: Thread, action: str | None) -> Exit:
        if t.dnat is None:
            return Exit(t.packets, t.packets, t.prob, action, False, (), t.mark)
        before, consts = t.dnat
        return Exit(before, None, t.prob, action, True, consts, t.mark)

    # ------------------------------------------------------------------ one table
    def table(self, th: Thread, table: str, hook: str) -> list[tuple[Thread, str | None]]:
        """The threads leaving the builtin chain ``hook`` of ``table``: (thread, None) goes on
        to the next table, (thread, action) ended here."""
        chain = self.rs.chain(table, hook)
        out: list = []
        back = self._chain([th], table, hook, chain, out, 0)
        pol = chain.policy or "ACCEPT"
        for t in back:  # off the end of the builtin chain, or RETURN there: the policy
            out.append((t, None if pol == "ACCEPT" else pol))
        return [(t, a) for t, a in out if not t.packets.is_empty()]

    def _chain(self, threads: list, table: str, hook: str, chain, out: list, depth: int) -> list:
        """Run ``chain`` on ``threads``; returns the threads that come back to the caller
        (RETURN or the end of the chain); threads that end (verdict, NAT) go to ``out``."""
        if depth > MAX_DEPTH:
            raise Unsupported(f"chains nested deeper than {MAX_DEPTH} (a loop?)")
        back: list = []
        for rule in chain.rules:
            if not threads:
                break
            t = rule.target
            if t is None or (isinstance(t, OtherTarget) and not t.terminating):
                # no target, LOG and the like: every packet goes on as it was, matched or not
                # (the walk changes nothing for them either): what the rule matches is moot
                continue
            hit, threads = self._split(rule, threads, hook)
            if not hit:
                continue
            if isinstance(t, Jump):
                callee = self.rs.chain(table, t.chain)
                if callee is None:
                    raise Unsupported(f"{_at(rule)}: jump to undefined chain {t.chain}")
                ret = self._chain(hit, table, hook, callee, out, depth + 1)
                if t.goto:
                    back.extend(ret)  # a RETURN from a goto'd chain returns from this one
                else:
                    threads = self._join(threads, ret)
            elif isinstance(t, Reject):
                out.extend((h, f"REJECT {t.with_}") for h in hit)
            elif isinstance(t, Verdict):
                if t.verdict == "RETURN":
                    back.extend(hit)
                elif t.verdict in ("ACCEPT", "DROP"):
                    out.extend((h, None if t.verdict == "ACCEPT" else "DROP") for h in hit)
                else:
                    raise Unsupported(f"{_at(rule)}: verdict {t.verdict}")
            elif isinstance(t, SetMark) and t.kind == "MARK" and self.effects:
                if self.mark is None:
                    raise Unsupported(f"{_at(rule)}: MARK on an open mark")
                threads = self._join(threads, [Thread(h.packets, h.prob, ((h.mark & ~t.mask) ^ t.value) & 0xFFFFFFFF)
                                               for h in hit])
            elif isinstance(t, Nat) and t.kind == "DNAT" and table == "nat" and hook in ("PREROUTING", "OUTPUT") \
                    and self.effects:
                out.extend((d, None) for h in hit for d in self._dnat(rule, h))
            else:
                raise Unsupported(f"{_at(rule)}: target {getattr(t, 'name', type(t).__name__)}")
        return back + threads

    @staticmethod
    def _join(a: list, b: list) -> list:
        """Threads of the same world travel together again (their packets are disjoint)."""
        if not b:
            return a
        by = {}
        for t in a + b:
            k = (t.prob, t.mark)
            hit = by.get(k)
            by[k] = t if hit is None else Thread(hit.packets | t.packets, t.prob, t.mark)
        return list(by.values())

    def _dnat(self, rule, h: Thread) -> list:
        """DNAT to one address (and port) of ``h``'s packets: the table ends. A packet already
        sent there keeps its tuple, and the kernel marks no translation (IPS_DST_NAT)."""
        t = rule.target
        if len(t.ranges) != 1:
            raise Unsupported(f"{_at(rule)}: DNAT with several ranges")
        r = t.ranges[0]
        if r.addr_lo != r.addr_hi or r.port_lo != r.port_hi:
            raise Unsupported(f"{_at(rule)}: DNAT to a range")
        if r.addr_lo is not None and r.addr_lo.version != self.family:
            raise Unsupported(f"{_at(rule)}: DNAT to another family")
        s = h.packets
        if r.port_lo is not None and not (s - self._has_ports()).is_empty():
            # a packet without ports keeps none (pick_port of no port): only port protocols
            raise Unsupported(f"{_at(rule)}: DNAT with a port of packets without ports")
        consts = []
        if r.addr_lo is not None:
            consts.append(("dst", r.addr_lo))
        if r.port_lo is not None:
            consts.append(("dport", r.port_lo))
        consts = tuple(consts)
        same = s & self.space.where(**{f: v for f, v in consts}) if consts else s  # already sent there
        out = []
        moved = s
        if not same.is_empty():
            out.append(Thread(same, h.prob, h.mark))
            moved = s - same
            if moved.is_empty():
                return out
        # the translated packets are not built here: Exit.consts says what they are (the
        # caller takes them together, symbolic.explain_fate)
        out.append(Thread(moved, h.prob, h.mark, (moved, consts)))
        return out

    def _has_ports(self):
        hit = self._ports.get("has")
        if hit is None:
            from analyzer.model.packet import PORT_PROTOS
            hit = self._ports["has"] = self.space.ports("proto", [(p, p) for p in PORT_PROTOS])
        return hit

    # ------------------------------------------------------------------ matches
    def _split(self, rule, threads: list, hook: str) -> tuple[list, list]:
        """(the threads' packets the rule matches, those it does not), per world."""
        m_set = None
        prob = 1.0
        marks = None  # (value, mask, negated) of a -m mark decided per thread
        for m in rule.matches:
            if isinstance(m, CommentMatch):
                continue
            if isinstance(m, MarkMatch) and m.kind == "mark" and self.mark is not None:
                if marks is not None:
                    raise Unsupported(f"{_at(rule)}: two -m mark matches")
                marks = (m.value, m.mask, m.negated)
                continue
            if isinstance(m, StatisticMatch):
                if m.mode != "random" or not self.effects:
                    raise Unsupported(f"{_at(rule)}: statistic {m.mode}")
                p = m.probability
                prob *= (1 - p) if m.negated else p
                continue
            s = self._match_set(m, rule, hook)
            m_set = s if m_set is None else m_set & s
        narrows = m_set is not None
        hit, miss = [], []
        for th in threads:
            mk = th.mark
            if marks is not None and ((mk & marks[1]) == marks[0]) == marks[2]:
                miss.append(th)  # -m mark: this thread's mark decides for all its packets
                continue
            inside = th.packets if m_set is None else th.packets & m_set
            outside = th.packets - inside if narrows else None
            if prob >= 1.0:
                if not inside.is_empty():
                    hit.append(Thread(inside, th.prob, mk))
                if outside is not None and not outside.is_empty():
                    miss.append(Thread(outside, th.prob, mk))
            elif prob <= 0.0:
                miss.append(th)
            else:
                if not inside.is_empty():
                    hit.append(Thread(inside, th.prob * prob, mk))
                    miss.append(Thread(inside, th.prob * (1 - prob), mk))
                if outside is not None and not outside.is_empty():
                    miss.append(Thread(outside, th.prob, mk))
        if len(miss) > 1:
            miss = self._join([], miss)
        return hit, miss

    def _match_set(self, m, rule, hook: str):
        if isinstance(m, CtStateMatch):  # decided by the states known here, not cached
            return self._compile(m, rule, hook)
        key = _match_key(m)
        hit = self._sets.get(key)
        if hit is not None:
            return hit
        s = self._compile(m, rule, hook)
        self._sets[key] = s
        return s

    def _compile(self, m, rule, hook: str):
        from analyzer.netfilter.symbolic import match_header

        sp = self.space
        if isinstance(m, (AddrMatch, IpRangeMatch, ProtoMatch, PortMatch, AddrTypeMatch)):
            if isinstance(m, AddrTypeMatch) and (m.limit_iface or not self.ns.known):
                raise Unsupported(f"{_at(rule)}: addrtype not decided")
            got = match_header(m, sp, self.family, self.ns, self._ports)
            if got is None:
                raise Unsupported(f"{_at(rule)}: {type(m).__name__} not compiled")
            return got[0]
        if isinstance(m, IfaceMatch):
            if m.direction == "out" and hook in ("PREROUTING", "INPUT"):
                return sp.empty() if not m.negated else sp.universe()  # no output interface yet
            name = self.iif if m.direction == "in" else self.oif
            if name is None:
                raise Unsupported(f"{_at(rule)}: interface match on an open or unknown interface")
            hit = name.startswith(m.name[:-1]) if m.name.endswith("+") else name == m.name
            return sp.universe() if hit != m.negated else sp.empty()
        if isinstance(m, MarkMatch) and m.kind == "mark":  # an open mark: a set over the input field
            s = sp.masked("mark", m.value, m.mask)
            return ~s if m.negated else s
        if isinstance(m, TcpFlagsMatch) and self.tcp_flags is not None:
            # walk._match: only a TCP packet matches (negated or not), by its flags
            hit = ((self.tcp_flags & m.mask) == m.comp) != m.negated
            return sp.eq("proto", 6) if hit else sp.empty()
        if isinstance(m, IcmpMatch) and self.icmp is not None:
            t, c = self.icmp
            hit = m.type is None or (t == m.type and (m.code is None or c == m.code))
            icmp = sp.eq("proto", 1) | sp.eq("proto", 58)
            return icmp if hit != m.negated else sp.empty()
        if isinstance(m, CtStateMatch) and self.ctstates is not None:
            return sp.universe() if bool(self.ctstates & m.states) != m.negated else sp.empty()
        if isinstance(m, OpaqueMatch) and m.module == "recent":
            # as the walk decides it for a connection's first packet (walk.RECENT_ASSUMPTION):
            # a client the list has not seen; --set matches, the checks find no entry
            self.recent_assumed = True
            hit = m.option not in ("--rcheck", "--update", "--remove")
            return sp.universe() if hit != m.negated else sp.empty()
        what = f"-m {m.module}" if m.module else type(m).__name__.replace("Match", " match").lower()
        raise Unsupported(f"{_at(rule)}: '{what}' is not followed as a set")


def _at(rule) -> str:
    """Where a rule is, for a user: ``nat:PREROUTING:rule:3 (line 12)``."""
    return f"{rule.label} (line {rule.span.line})" if rule.span is not None else rule.label


_KEY_FIELDS: dict = {}


def _match_key(m) -> tuple:
    """A match without its columns: equal matches of different rules compile once."""
    names = _KEY_FIELDS.get(type(m))
    if names is None:
        import dataclasses

        names = _KEY_FIELDS[type(m)] = tuple(f.name for f in dataclasses.fields(m) if f.name not in ("col", "end_col"))
    return (type(m), *(getattr(m, f) for f in names))
