"""Checks layer, filter-semantics family (FLT): rules no packet can reach (shadowed) and rules
whose removal changes no packet's fate (redundant), per chain and through jumps, in every
table, from the rules' packet sets (netfilter/matchsets.py: exact bounds, APPROXIMATE where a
match is only bounded).

A rule i of a chain is shadowed when every packet it may match is certainly decided by the
rules before it: taken by a terminal rule (ACCEPT, DROP, REJECT, a NAT target, RETURN, -g)
or by a jump to a chain that certainly ends it. Rules that rewrite a field a later rule may
test (MARK, CONNMARK, NOTRACK, unknown targets), directly or in a chain they jump to, start
a new segment: packets after them are not the packets before them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator

from analyzer.checks import CheckContext, check
from analyzer.checks.chains import STATEFUL_MODULES, unconditional
from analyzer.diagnostics import APPROXIMATE, Diagnostic, EXACT, Related, Severity
from analyzer.model.rules import (
    ConnmarkCopy, Jump, Notrack, OtherTarget, Reject, Rule, SetMark,
    UnknownTarget, Verdict,
)
from analyzer.netfilter.walk import index_key

WARNING, INFO = Severity.WARNING, Severity.INFO
BIG_CHAIN = 48  # chains with more rules are indexed by destination address / port


def _modifies(rule: Rule) -> bool:
    t = rule.target
    return isinstance(t, (SetMark, ConnmarkCopy, Notrack, UnknownTarget)) or (
        isinstance(t, OtherTarget) and not t.terminating and not t.modelled_effect)


def _stateful(rule: Rule) -> bool:
    return any(m.module in STATEFUL_MODULES for m in rule.matches)


@dataclass
class _Table:
    """What the table's chains certainly do, computed once per table."""

    table: object
    comp: object
    take: dict = field(default_factory=dict)      # chain -> PacketSet it certainly ends
    dirty: dict = field(default_factory=dict)     # chain -> may rewrite packets and return

    def chain_dirty(self, name: str, stack=()) -> bool:
        if name in self.dirty:
            return self.dirty[name]
        c = self.table.chains.get(name)
        if c is None or name in stack:
            return True
        self.dirty[name] = True  # provisional, for cycles
        d = False
        for r in c.rules:
            t = r.target
            if _modifies(r) or (isinstance(t, Jump) and not t.goto and self.chain_dirty(t.chain, stack + (name,))):
                d = True
                break
        self.dirty[name] = d
        return d

    def chain_take(self, name: str, stack=()):
        """Packets a user chain certainly ends (does not RETURN to its caller)."""
        sp = self.comp.space
        if name in self.take:
            return self.take[name]
        c = self.table.chains.get(name)
        if c is None or name in stack or c.builtin:
            return sp.empty()
        self.take[name] = sp.empty()  # provisional, for cycles
        if len(c.rules) > 4 * BIG_CHAIN:  # kube-proxy's big dispatch chains: not needed exactly
            return sp.empty()
        cont = self.comp.universe  # packets certainly still in the chain, unchanged
        ends = sp.empty()
        for r in c.rules:
            if cont.is_empty():
                break
            b = self.comp.rule(r)
            t = r.target
            if isinstance(t, Verdict) and t.verdict == "RETURN":
                cont = cont - b.over
            elif t is not None and t.terminal:
                ends = ends | (cont & b.under)
                cont = cont - b.over
            elif isinstance(t, Jump):
                if t.goto:
                    sub = self.chain_take(t.chain, stack + (name,)) if not self.table.chains.get(t.chain, None) \
                        or not self.table.chains[t.chain].builtin else sp.empty()
                    ends = ends | (cont & b.under & sub)
                    cont = cont - b.over
                else:
                    sub = self.chain_take(t.chain, stack + (name,))
                    ends = ends | (cont & b.under & sub)
                    if self.chain_dirty(t.chain):
                        cont = cont - b.over
            elif _modifies(r):
                cont = cont - b.over
        self.take[name] = ends
        return ends


def _tables(ctx: CheckContext) -> list[_Table]:
    cache = ctx.extra.get("flt.tables")
    if cache is None:
        from analyzer.netfilter.matchsets import MatchCompiler

        cache = []
        if ctx.ruleset is not None and ctx.ruleset.tables:
            comp = MatchCompiler(ctx.ruleset)
            cache = [_Table(t, comp) for t in ctx.ruleset.tables.values()]
        ctx.extra["flt.tables"] = cache
    return cache


@dataclass
class Finding:
    rule: Rule
    by: list  # earlier rules whose packets cover it
    witness: str
    exact: bool


def _minimal(comp, over, cover):
    """Leave out covering rules the others do without (the ESTABLISHED accept that only
    overlaps): the finding names the rules that really take the packets."""
    keep = list(cover)
    for e in sorted(cover, key=lambda e: -e[0]):
        rest = [x for x in keep if x is not e]
        if rest and over <= comp.space.union(x[2] for x in rest):
            keep = rest
    return keep


def _prefer(comp):
    """A witness that reads like a connection: a new TCP SYN from an ephemeral port."""
    p = getattr(comp, "_prefer", None)
    if p is None:
        sp = comp.space
        p = comp._prefer = [sp.any_flag("ctstate", "NEW"), sp.eq("proto", 6), sp.eq("tcp_flags", 0x02),
                            sp.range("sport", 32768, 60999)]
    return p


def _contribution(tt: _Table, r: Rule):
    """Packets rule r certainly removes from the rest of its chain, or None if it removes none."""
    t = r.target
    b = tt.comp.rule(r)
    if t is None:
        return None
    if isinstance(t, Verdict) or t.terminal:
        return b.under
    if isinstance(t, Jump):
        if t.goto or b.under.is_empty():
            return b.under
        sub = tt.chain_take(t.chain)
        return None if sub.is_empty() else b.under & sub
    return None


def shadowed_in_chain(tt: _Table, chain) -> Iterator[Finding]:
    comp = tt.comp
    rules = chain.rules
    big = len(rules) > BIG_CHAIN
    seg = []  # (index, rule, contribution) of the current segment
    by_dst: dict = {}
    by_port: dict = {}
    always: list = []
    seen_text: set = set()
    last = len(rules) - 1
    for i, r in enumerate(rules):
        text = r.text.split(None, 2)[2] if r.text.count(" ") >= 2 else r.text
        dup = text in seen_text  # CHN006 reports exact duplicates
        seen_text.add(text)
        b = comp.rule(r) if seg and not dup and not _stateful(r) else None
        if b is not None and not b.over.is_empty():
            if big:
                dst, port = index_key(r)
                cand = list(always)
                if dst is not None:
                    cand += by_dst.get(dst, [])
                    if port is not None:
                        cand += by_port.get(port, [])
                    else:  # any port: every port-only rule may take some of its packets
                        cand += [e for lst in by_port.values() for e in lst]
                elif port is not None:
                    cand += by_port.get(port, []) + [e for lst in by_dst.values() for e in lst]
                else:
                    cand = seg
            else:
                cand = seg
            cover = [e for e in cand if not (e[2] & b.over).is_empty()]
            if cover:
                taken = comp.space.union(e[2] for e in cover)
                if b.over <= taken:
                    cover = _minimal(comp, b.over, sorted(cover, key=lambda e: e[0]))
                    # CHN004 reports what follows an unconditional rule, CHN006 a repeated rule
                    if not any(unconditional(e[1]) or (_target_key(e[1]) == _target_key(r)
                                                       and comp.rule(e[1]).over == b.over) for e in cover):
                        pick = b.over.pick_flow(prefer=_prefer(comp))
                        first = next((e for e in cover if pick in e[2]), cover[0])
                        exact = b.exact and all(comp.rule(e[1]).exact for e in cover)
                        yield Finding(r, [e[1] for e in cover], f"{pick} (taken by {first[1].label})", exact)
        if _modifies(r) or (isinstance(r.target, Jump) and not r.target.goto and tt.chain_dirty(r.target.chain)):
            seg, by_dst, by_port, always = [], {}, {}, []  # later packets may differ from earlier ones
            continue
        if i == last:
            break  # nothing after it to shadow
        c = _contribution(tt, r)
        if c is None or c.is_empty():
            continue
        e = (i, r, c)
        seg.append(e)
        if big:
            dst, port = index_key(r)
            if dst is not None:
                by_dst.setdefault(dst, []).append(e)
            elif port is not None:
                by_port.setdefault(port, []).append(e)
            else:
                always.append(e)


@check(code="FLT001", name="shadowed-rule", severity=WARNING)
def shadowed_rule(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A rule no packet can reach: earlier rules of its chain take every packet it would match.

    Why it matters: the rule looks active but never decides anything; usually an earlier,
    broader rule was added later, or the order of two rules is the wrong way round, and the
    traffic the rule was written for gets the earlier rules' verdict instead.
    Fix: move the rule before the rules named in the finding, narrow them, or delete it.
    """
    for tt in _tables(ctx):
        for chain in tt.table.chains.values():
            for f in shadowed_in_chain(tt, chain):
                names = ", ".join(e.label for e in f.by[:4]) + (f" and {len(f.by) - 4} more" if len(f.by) > 4 else "")
                same = all(_target_text(e) == _target_text(f.rule) for e in f.by)
                yield ctx.diag(
                    "FLT001",
                    f"{f.rule.label}: no packet reaches this rule: {names} "
                    f"{'takes' if len(f.by) == 1 else 'take'} every packet it would match"
                    + (" (with the same target, so no packet's fate depends on it)" if same else ""),
                    f.rule.span, hint="move it above the rules that take its packets, or remove it",
                    severity=INFO if same else WARNING,
                    related=tuple(Related(f"takes its packets first: {e.label}", e.span) for e in f.by[:6]),
                    witness=f.witness, confidence=EXACT if f.exact else APPROXIMATE)


def _target_key(rule: Rule):
    t = rule.target
    if t is None:
        return None
    return (type(t),) + tuple(getattr(t, f.name) for f in fields(t) if f.name not in ("col", "end_col"))


def _target_text(rule: Rule) -> str:
    """The rule's target as written (`-j ACCEPT`, `-j DNAT --to-destination ...`)."""
    t = rule.target
    return rule.text[t.col - 1:t.end_col - 1] if t is not None else ""


def _same_fate(a, b) -> bool:
    if isinstance(a, Verdict) and isinstance(b, Verdict):
        return a.verdict == b.verdict and a.verdict in ("ACCEPT", "DROP")
    if isinstance(a, Reject) and isinstance(b, Reject):
        return a.with_ == b.with_
    return False


@check(code="FLT002", name="redundant-rule", severity=INFO)
def redundant_rule(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A rule whose removal changes no packet's fate: a later rule gives its packets the same verdict.

    Why it matters: the rule is dead weight that reads as if it mattered; when someone later
    edits the rule that really decides, the redundant one hides what the policy is.
    Fix: delete it (or, if it documents intent, turn the later rule into the narrow one).
    """
    for tt in _tables(ctx):
        comp = tt.comp
        for chain in tt.table.chains.values():
            rules = chain.rules
            if len(rules) > BIG_CHAIN * 4:
                continue
            for i, r in enumerate(rules):
                if not isinstance(r.target, (Verdict, Reject)) or _stateful(r):
                    continue
                b = comp.rule(r)
                if b.over.is_empty():
                    continue
                rest = b.over
                decider = None
                for later in rules[i + 1:]:
                    lb = comp.rule(later)
                    if (rest & lb.over).is_empty():
                        continue
                    if _same_fate(r.target, later.target) and not _stateful(later) and lb.exact:
                        rest = rest - lb.under
                        decider = decider or later
                        if rest.is_empty():
                            break
                        continue
                    break  # another verdict, a jump or a rewrite could see its packets
                if not rest.is_empty() or decider is None:
                    continue
                pick = b.over.pick_flow(prefer=_prefer(comp))
                yield ctx.diag(
                    "FLT002",
                    f"{r.label}: removing this rule changes no packet's fate: {decider.label} "
                    f"gives every packet it matches the same verdict, {r.target.name}",
                    r.span, hint=f"delete it; {decider.label} already decides these packets",
                    related=(Related(f"decides the same packets: {decider.label}", decider.span),),
                    witness=f"{pick} ({r.target.name} either way)",
                    confidence=EXACT if b.exact else APPROXIMATE)
