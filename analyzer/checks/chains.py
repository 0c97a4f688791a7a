"""Checks layer, chain structure family (CHN): how chains jump to each other and which rules
can run at all. Also holds the per-table jump graph (:class:`TableGraph`) the target checks use
to know which hooks reach a user chain.
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, fields
from typing import AbstractSet as Set, Iterator

from analyzer.checks import CheckContext, check
from analyzer.diagnostics import Diagnostic, Related, Severity
from analyzer.model.rules import (
    AddrMatch, AddrTypeMatch, BUILTIN_CHAINS, Chain, CommentMatch, ConnmarkCopy, IfaceMatch, Jump,
    Masquerade, Match, Nat, Netmap, Notrack, OtherTarget, OwnerMatch, PhysdevMatch, ProtoMatch,
    Redirect, Reject, Rule, SetMark, StatisticMatch, TABLES, Table, Tproxy, UnknownTarget, Verdict,
)

ERROR, WARNING = Severity.ERROR, Severity.WARNING

# nf_tables validates every path from a base chain and refuses a chain at jump level 16
# (NFT_JUMP_STACK_SIZE) with EMLINK; -j and -g both count. Checked on 6.18 with iptables-nft
# 1.8.9: 15 user chains below INPUT load, 16 are refused. iptables-legacy has no such limit.
NFT_MAX_JUMP_LEVEL = 15

# Targets iptables knows, for "did you mean" when a -j name is neither a chain nor known.
STANDARD_TARGETS = (
    "ACCEPT", "DROP", "RETURN", "QUEUE", "REJECT", "DNAT", "SNAT", "MASQUERADE", "REDIRECT",
    "NETMAP", "TPROXY", "MARK", "CONNMARK", "CT", "NOTRACK", "LOG", "NFLOG", "TRACE", "TCPMSS",
    "NFQUEUE", "SET", "CLASSIFY", "DSCP", "TOS", "TTL", "HL", "CHECKSUM", "SYNPROXY", "AUDIT",
)
VERDICTS = ("ACCEPT", "DROP", "RETURN", "QUEUE")

# Targets that only record (log, trace): a packet leaves them unchanged, so a later rule
# cannot match anything new because of them.
NO_EFFECT_TARGETS = frozenset({"LOG", "NFLOG", "ULOG", "TRACE", "AUDIT"})

# Match modules whose result depends on earlier packets, time or chance: two identical rules
# using them are not duplicates (the second `-m limit` has its own bucket, the second
# `-m statistic --probability 0.5` takes half of what the first left).
STATEFUL_MODULES = frozenset({
    "statistic", "limit", "hashlimit", "recent", "quota", "quota2", "connlimit", "nth",
    "random", "connbytes", "rateest",
})


# Chains that generators always create for other rules or components to jump to, used only in
# some configurations; finding them unreferenced says nothing about this ruleset (CHN003).
LIBRARY_CHAINS = frozenset({
    "KUBE-MARK-DROP", "KUBE-MARK-MASQ",  # kubelet/kube-proxy: "mark for drop/masquerade" helpers
    "KUBE-FIREWALL",  # nat, IPVS mode: used only for loadBalancerSourceRanges
    "CNI-HOSTPORT-SETMARK", "CNI-HOSTPORT-MASQ",  # CNI portmap plugin helpers
    "ufw-user-limit", "ufw-user-limit-accept",  # ufw: used only by "limit" rules
    "ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT",  # istio-iptables: per-config use
})
LIBRARY_SUFFIXES = ("-float-snat",)  # neutron agents create <agent>-float-snat always


def library_chain(name: str) -> bool:
    return name in LIBRARY_CHAINS or name.endswith(LIBRARY_SUFFIXES)


# --------------------------------------------------------------------------- jump graph
@dataclass
class TableGraph:
    """Who jumps to whom inside one table, and which builtin chains (hooks) reach each chain.

    Jumps to builtin chains are left out: the kernel refuses them (CHN008), so they never carry
    packets.
    """

    table: Table
    callees: dict[str, list[Rule]] = field(default_factory=dict)  # chain -> its jump/goto rules
    hooks: dict[str, Set[str]] = field(default_factory=dict)  # chain -> builtin chains reaching it
    # what the restore checks look at, gathered in the one pass over the rules that finds the
    # callees (a 10,000-service dump: 117k rules; each check walking them again cost 30-150 ms),
    # in the table's order of chains and rules:
    jumps: list[Rule] = field(default_factory=list)  # rules whose target is a Jump (-j/-g CHAIN)
    # of those, the jumps to a builtin chain or to a chain the table does not have (CHN008, CHN001)
    jumps_out: list[Rule] = field(default_factory=list)
    others: list[Rule] = field(default_factory=list)  # rules with another target
    placed: list[Rule] = field(default_factory=list)  # rules with a match of _PLACED_MATCHES
    _topo: tuple | None = None
    _via: dict | None = None
    _order: dict | None = None
    _succ: dict | None = None  # chain -> its callees, once each, in the order of the first jump
    # on a table without cycles, build() also measures each reachable chain's jump level below
    # the builtins (CHN010): chain -> level, and chain -> the caller that gives it
    levels: dict | None = None
    parents: dict | None = None

    @property
    def via(self) -> dict[tuple[str, str], Rule]:
        """(hook, chain) -> the first jump by which the hook's BFS enters the chain."""
        if self._via is None:
            self._bfs()
        return self._via

    @property
    def order(self) -> dict[str, int]:
        """chain -> BFS order from the builtins (each builtin's BFS in turn)."""
        if self._order is None:
            self._bfs()
        return self._order

    def _bfs(self):
        # only findings need the paths: built on first use, not for every parse
        via: dict = {}
        order: dict = {}
        reached: dict[str, set[str]] = {}
        for c in self.table.chains.values():
            if not c.builtin:
                continue
            hook = c.name
            order.setdefault(hook, len(order))
            queue = deque([hook])
            while queue:
                name = queue.popleft()
                for r in self.callees.get(name, ()):
                    dst = r.target.chain
                    seen = reached.setdefault(dst, set())
                    if hook in seen:
                        continue
                    seen.add(hook)
                    via[(hook, dst)] = r
                    order.setdefault(dst, len(order))
                    queue.append(dst)
        self._via, self._order = via, order
        return reached

    def acyclic(self) -> tuple[list[str], set[str]]:
        """(a topological order of the chains no cycle feeds, the chains on or below a cycle).
        Kahn's algorithm on plain dicts: a 10,000-service kube-proxy table has 40k chains, and
        usually no cycle at all, so the loop and depth checks can skip networkx entirely."""
        if self._topo is None:
            succ = self._succ
            if succ is None:
                succ = self._succ = {src: tuple(dict.fromkeys([r.target.chain for r in rules]))
                                     for src, rules in self.callees.items()}
            indeg: dict[str, int] = dict.fromkeys(self.table.chains, 0)
            for ds in succ.values():
                for d in ds:
                    indeg[d] = indeg.get(d, 0) + 1
            # the order is its own FIFO queue: a chain is appended when its last caller is
            order = [n for n, k in indeg.items() if k == 0]
            for n in order:
                for m in succ.get(n, ()):
                    k = indeg[m] - 1
                    indeg[m] = k
                    if not k:
                        order.append(m)
            self._topo = (order, set() if len(order) == len(indeg) else set(indeg) - set(order), succ)
        return self._topo[:2]

    @classmethod
    def build(cls, table: Table) -> "TableGraph":
        g = cls(table)
        chains = table.chains
        user = {name for name, c in chains.items() if not c.builtin}
        callees = g.callees
        jumps, jumps_out, others, placed = g.jumps, g.jumps_out, g.others, g.placed
        succ = g._succ = {}
        jump, placed_types = Jump, _PLACED_MATCHES
        hook_names = frozenset(BUILTIN_CHAINS.get(table.name, ()))
        for c in chains.values():
            mine = None
            for r in c.rules:
                t = r.target
                if t.__class__ is jump:  # no subclass of Jump exists
                    jumps.append(r)
                    if t.chain in user:
                        if mine is None:
                            mine = callees[c.name] = [r]
                            ds = [t.chain]
                        else:
                            mine.append(r)
                            ds.append(t.chain)
                        if t.chain in hook_names:  # a user chain named as a builtin (a model built by hand)
                            jumps_out.append(r)
                    else:  # a builtin chain (CHN008) or none of this table (CHN001)
                        jumps_out.append(r)
                elif t is not None:
                    others.append(r)
                for m in r.matches:
                    if m.__class__ in placed_types:
                        placed.append(r)
                        break
            if mine is not None:
                # each callee once, in the order of the first jump to it
                succ[c.name] = (ds[0],) if len(ds) == 1 else tuple(dict.fromkeys(ds))
        hooks = g.hooks
        order, cyclic = g.acyclic()
        if not cyclic:
            # no cycle: the hooks reaching a chain flow along a topological order, one pass over
            # the jumps instead of one BFS per hook (kube-proxy's PREROUTING and OUTPUT share
            # KUBE-SERVICES and its 40k chains); chains reached from the same hooks share one
            # frozenset. The longest jump path from a builtin (CHN010) flows along with them.
            builtins = set()
            for c in chains.values():
                if c.builtin:
                    hooks[c.name] = frozenset((c.name,))
                    builtins.add(c.name)
            level: dict[str, int] = {}
            parent: dict[str, str] = {}
            for n in order:
                hs = hooks.get(n)
                if hs:
                    if n in builtins:
                        level[n] = 0
                    lv = level[n] + 1
                    for m in succ.get(n, ()):
                        have = hooks.get(m)
                        if have is None:
                            hooks[m] = hs
                        elif not hs <= have:
                            hooks[m] = have | hs
                        if lv > level.get(m, -1):
                            level[m] = lv
                            parent[m] = n
            g.levels, g.parents = level, parent
            return g
        # a cycle: one BFS per hook (the paths' BFS, which findings on such a table use anyway);
        # jumps to builtins are not callees, so no builtin is reached by another
        for c in chains.values():
            if c.builtin:
                hooks[c.name] = {c.name}
        hooks.update(g._bfs())
        return g

    def reachable(self, chain: str) -> bool:
        return bool(self.hooks.get(chain))

    def path(self, hook: str, chain: str) -> list[Rule]:
        """The jump rules by which ``hook``'s builtin chain first reaches ``chain`` (BFS order)."""
        out: list[Rule] = []
        cur = chain
        while cur != hook:
            r = self.via.get((hook, cur))
            if r is None or len(out) > len(self.table.chains):
                break
            out.append(r)
            cur = r.chain
        return out[::-1]


# matches allowed only in some chains or hooks (CHN009, CHN012): the model has no subclass of them
_PLACED_MATCHES = frozenset({IfaceMatch, OwnerMatch, AddrTypeMatch, PhysdevMatch})


def user_chains_only(table: Table) -> bool:
    """True when the table is a restore payload for ``--noflush`` rather than a dump: it declares
    none of its builtin chains. iptables-save always declares them (`:INPUT ACCEPT [0:0]`);
    kube-proxy's and ztunnel's payloads do not, and jump to chains an earlier transaction made
    on the machine, outside this input."""
    builtins = [c for c in table.chains.values() if c.builtin]
    return bool(builtins) and all(c.span is None for c in builtins) and (
        any(not c.builtin for c in table.chains.values()) or any(c.rules for c in builtins))


def tables(ctx: CheckContext):
    """The tables of the context's ruleset (none for an environment-only context)."""
    return ctx.ruleset.tables.values() if ctx.ruleset is not None else ()


def table_graph(ctx: CheckContext, table: Table) -> TableGraph:
    """The jump graph of ``table``, built once per check run."""
    cache = ctx.extra.setdefault("chains.graphs", {})
    key = (id(ctx.ruleset), table.name)
    g = cache.get(key)
    if g is None:
        g = cache[key] = TableGraph.build(table)
    return g


def render_path(rules: list[Rule], end: str) -> str:
    """``POSTROUTING rule 1 -> X rule 2 -> Y`` for the rules of :meth:`TableGraph.path`."""
    return " -> ".join(f"{r.chain} rule {r.index}" for r in rules) + f" -> {end}"


# --------------------------------------------------------------------------- rule helpers
def unconditional(rule: Rule) -> bool:
    """True when the rule matches every packet: no matches but comments (or ones that cannot
    fail, such as ``-p all``, ``-s 0.0.0.0/0``, ``-i +``)."""
    return all(_always_true(m) for m in rule.matches)


def _always_true(m: Match) -> bool:
    if isinstance(m, CommentMatch):
        return True
    if m.negated:
        return False
    if isinstance(m, ProtoMatch):
        return m.number == 0
    if isinstance(m, AddrMatch):
        return any(n.prefixlen == 0 for n in m.networks)
    if isinstance(m, IfaceMatch):
        return m.name == "+"
    return False


def describe_target(rule: Rule) -> str:
    t = rule.target
    if isinstance(t, Jump):
        return f"{'-g' if t.goto else '-j'} {t.chain}"
    return f"-j {t.name}" if t is not None else "no target"


def ends_chain(t) -> bool:
    """True when a packet this target applies to never reaches the chain's next rule:
    verdicts (RETURN included), REJECT, NAT targets, terminating extensions, and goto."""
    if t is None:
        return False
    if isinstance(t, Verdict):
        return True
    if isinstance(t, Jump):
        return t.goto
    return t.terminal


def _never_returns(table: Table, name: str, memo: dict, stack: set) -> Rule | None:
    """The rule by which chain ``name`` always ends the traversal (never returns to its caller),
    or None. A chain never returns when an unconditional absolute verdict (not RETURN) comes
    before any RETURN and any goto to a chain that may fall off its end."""
    if name in memo:
        return memo[name]
    chain = table.chains.get(name)
    if chain is None or name in stack:
        return None
    stack.add(name)
    found = None
    for r in chain.rules:
        t = r.target
        if isinstance(t, Verdict) and t.verdict == "RETURN":
            break
        if isinstance(t, Jump):
            sub = _never_returns(table, t.chain, memo, stack)
            if t.goto and sub is None:
                break  # the goto'd chain may fall off its end: back to our caller
            if sub is not None and unconditional(r):
                found = r
                break
            continue
        if t is not None and t.terminal and unconditional(r):
            found = r
            break
    stack.discard(name)
    memo[name] = found
    return found


def _loc(chain: Chain) -> str:
    return f"{chain.table}:{chain.name}"


# --------------------------------------------------------------------------- CHN001
@check(code="CHN001", name="jump-to-undefined-chain", severity=ERROR, restore=True)
def jump_to_undefined_chain(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A rule jumps (-j) or goes (-g) to a chain its table does not define.

    Why it matters: iptables-restore refuses the whole table ("Chain 'X' does not exist" with
    iptables-nft, "Couldn't load target `X'" with iptables-legacy), so none of it loads.
    Fix: declare the chain (`:X - [0:0]`) in the same table, or correct the name.
    """
    for table in tables(ctx):
        chains = table.chains
        for r in table_graph(ctx, table).jumps_out:
            t = r.target
            if t.chain in chains:
                continue
            name = t.chain
            hint = _suggest_chain(name, table)
            if t.goto and name in VERDICTS:
                msg = (f"{r.label}: '-g {name}' goes to a chain named {name}, which does not "
                       f"exist: -g takes a chain, not a verdict")
                hint = f"write '-j {name}'"
            elif name.upper() in STANDARD_TARGETS and name not in STANDARD_TARGETS:
                msg = (f"{r.label}: jumps to chain '{name}', which table {table.name} does "
                       f"not define (target names are case-sensitive)")
                hint = f"write '-j {name.upper()}'"
            else:
                other = [tn for tn, tb in ctx.ruleset.tables.items() if name in tb.chains]
                where = f"; a chain of that name exists in table {', '.join(other)}" if other else ""
                msg = (f"{r.label}: {'goes' if t.goto else 'jumps'} to chain '{name}', which "
                       f"table {table.name} does not define{where}")
                hint = hint or (f"declare ':{name} - [0:0]' in *{table.name}, or, if '{name}' "
                                "is a target extension synack does not know, ignore this")
            fragment = ctx.partial or user_chains_only(table)
            if ctx.partial:
                msg += " (it may exist on the machine: this input is a fragment)"
            elif fragment:
                msg += (f" (table {table.name} declares no builtin chain, as a --noflush restore "
                        "payload: the chain may exist on the machine)")
            yield ctx.diag("CHN001", msg, r.option_span(t), hint=hint,
                           severity=WARNING if fragment else ERROR)


def _suggest_chain(name: str, table: Table) -> str | None:
    import difflib  # only for a finding

    cands = [c for c, ch in table.chains.items() if not ch.builtin]
    close = difflib.get_close_matches(name, cands, n=1, cutoff=0.8)
    return f"did you mean '{close[0]}'?" if close else None


# --------------------------------------------------------------------------- CHN002
@check(code="CHN002", name="chain-loop", severity=ERROR, restore=True)
def chain_loop(ctx: CheckContext) -> Iterator[Diagnostic]:
    """Chains jump (or go) to each other in a cycle.

    Why it matters: the kernel refuses a table in which a loop is reachable from a builtin chain
    (iptables-nft: "Too many links", iptables-legacy: "line N failed"), whatever the rules'
    conditions; an unreachable loop loads, but the first jump into it will be refused.
    Fix: break the cycle, usually by replacing one jump with RETURN.
    """
    for table in tables(ctx):
        g = table_graph(ctx, table)
        _, tangled = g.acyclic()
        if not tangled:
            continue  # no cycle anywhere in this table
        import networkx as nx  # ~0.3 s to import: only for a table with a cycle

        dg = nx.DiGraph()
        first_edge: dict[tuple[str, str], Rule] = {}
        for src, rules in g.callees.items():
            if src not in tangled:
                continue  # every cycle lies among the chains Kahn's algorithm could not order
            for r in rules:
                e = (src, r.target.chain)
                if e not in first_edge:
                    first_edge[e] = r
                    dg.add_edge(*e)
        for scc in nx.strongly_connected_components(dg):
            if len(scc) == 1:
                (only,) = scc
                if (only, only) not in first_edge:
                    continue
            big = len(table.chains) + 1
            start = min(scc, key=lambda c: (g.order.get(c, big), _decl_line(table, c), c))
            cycle = _cycle_through(start, scc, first_edge)
            closing = cycle[-1]
            names = [r.chain for r in cycle] + [start]
            reached = g.reachable(start)
            where = " -> ".join(names)
            if reached:
                hook = min(g.hooks[start], key=lambda h: g.order.get(h, 0))
                msg = (f"{closing.label}: chains jump in a loop {where}, reached from "
                       f"{table.name} {hook}; the kernel refuses the whole {table.name} table")
                sev = ERROR
            else:
                msg = (f"{closing.label}: chains jump in a loop {where}; no builtin chain reaches "
                       f"it{' in this input' if ctx.partial else ''}, so it loads, but the kernel "
                       "will refuse any jump into it")
                sev = WARNING
            if len(scc) > len(cycle):
                msg += f" ({len(scc)} chains are in this tangle of loops)"
            related = tuple(Related(f"{r.chain} {'goes' if r.target.goto else 'jumps'} to "
                                    f"{r.target.chain} here", r.span) for r in cycle[:-1])
            yield ctx.diag("CHN002", msg, closing.option_span(closing.target),
                           hint=f"break the loop: {closing.chain} should not jump back to {start}",
                           related=related, severity=sev)


def _decl_line(table: Table, name: str) -> int:
    c = table.chains.get(name)
    return c.span.line if c is not None and c.span is not None else 0


def _cycle_through(start: str, scc: set, edges: dict) -> list[Rule]:
    """Jump rules of a shortest cycle from ``start`` back to itself inside ``scc``."""
    if (start, start) in edges:
        return [edges[(start, start)]]
    succ: dict[str, list[str]] = {}
    for (a, b) in edges:
        if a in scc and b in scc:
            succ.setdefault(a, []).append(b)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        cur = queue.popleft()
        for nxt in sorted(succ.get(cur, ())):
            if nxt == start:
                path = [edges[(cur, start)]]
                while cur != start:
                    p = parent[cur]
                    path.append(edges[(p, cur)])
                    cur = p
                return path[::-1]
            if nxt not in parent:
                parent[nxt] = cur
                queue.append(nxt)
    return []  # pragma: no cover - an SCC always has a cycle through each member


# --------------------------------------------------------------------------- CHN003
@check(code="CHN003", name="unreachable-chain", severity=WARNING)
def unreachable_chain(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A user chain with rules that no builtin chain reaches, directly or through other chains.

    Why it matters: its rules never see a packet; usually the jump into it was forgotten,
    removed, or misspelt.
    Fix: add the missing `-j CHAIN` in the chain that should call it, or delete the chain.
    """
    if ctx.partial:
        return
    import networkx as nx

    for table in tables(ctx):
        if table.name not in TABLES or user_chains_only(table):
            continue  # an unknown table (PRS013) has no hooks; a payload's callers live elsewhere
        g = table_graph(ctx, table)
        dead = [c for c in table.chains.values() if not c.builtin and not g.reachable(c.name)]
        if not dead:
            continue
        dead_names = {c.name for c in dead}
        dg = nx.DiGraph()
        dg.add_nodes_from(dead_names)
        for src in dead_names:
            for r in g.callees.get(src, ()):
                if r.target.chain in dead_names:
                    dg.add_edge(src, r.target.chain)
        cond = nx.condensation(dg)
        for comp in nx.topological_sort(cond):
            if cond.in_degree(comp):
                continue  # only reachable from another unreachable chain: named in its message
            members = sorted(cond.nodes[comp]["members"], key=lambda n: (_decl_line(table, n), n))
            below = set()
            for d in nx.descendants(cond, comp):
                below |= cond.nodes[d]["members"]
            group = [table.chains[n] for n in members] + [table.chains[n] for n in below]
            if not any(c.rules for c in group):
                continue  # empty placeholders (canary chains, hooks for other programs): inert
            if all(library_chain(n) for n in members):
                continue
            head = table.chains[members[0]]
            nrules = sum(len(c.rules) for c in group)
            msg = f"{_loc(head)}: chain {head.name} is never jumped to"
            if len(members) > 1 or below:
                others = sorted((set(members) | below) - {head.name},
                                key=lambda n: (_decl_line(table, n), n))
                shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
                msg += f" (nor {shown}, reached only through it)"
            msg += (f", so its {nrules} rules never see a packet" if nrules != 1
                    else ", so its rule never sees a packet")
            span = head.span or (head.rules[0].span if head.rules else None)
            yield ctx.diag("CHN003", msg, span,
                           hint=f"add '-j {head.name}' where it should run, or delete the chain")


# --------------------------------------------------------------------------- CHN004
@check(code="CHN004", name="rule-after-terminal", severity=WARNING)
def rule_after_terminal(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A rule comes after an unconditional rule that ends the chain for every packet.

    Why it matters: the later rules never run; typically a rule was appended (-A) after a
    catch-all DROP/ACCEPT/RETURN instead of inserted before it.
    Fix: move the rules above the catch-all rule (insert with -I), or delete them.
    """
    for table in tables(ctx):
        memo: dict = {}
        for chain in table.chains.values():
            rules = chain.rules
            for k, r in enumerate(rules[:-1]):
                if not unconditional(r):
                    continue
                t = r.target
                why = None
                related = [Related("every packet stops here", r.span)]
                if ends_chain(t):
                    why = (f"rule {r.index} ({describe_target(r)}, no conditions) ends {chain.name} "
                           "for every packet")
                elif isinstance(t, Jump):
                    end = _never_returns(table, t.chain, memo, set())
                    if end is not None:
                        why = (f"rule {r.index} jumps to {t.chain} for every packet, and "
                               f"{t.chain} never returns (its rule {end.index}: {describe_target(end)})")
                        related.append(Related(f"{t.chain} ends here", end.span))
                if why is None:
                    continue
                nxt = rules[k + 1]
                rest = len(rules) - k - 1
                after = "the rule" if rest == 2 else f"the {rest - 1} rules"
                which = f"{nxt.label} and {after} after it are" if rest > 1 else f"{nxt.label} is"
                yield ctx.diag("CHN004", f"{which} never evaluated: {why}", nxt.span,
                               hint=f"move the rule{'s' if rest > 1 else ''} above rule {r.index} "
                               f"(iptables -I), or delete {'them' if rest > 1 else 'it'}",
                               related=tuple(related))
                break


# --------------------------------------------------------------------------- CHN005
@check(code="CHN005", name="return-in-builtin-chain", severity=WARNING)
def return_in_builtin_chain(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A builtin chain with policy DROP uses -j RETURN, which there drops the packet.

    Why it matters: RETURN reads as "continue", but a builtin chain has no caller; the packet
    gets the policy at once, and with policy DROP that is a drop written as RETURN. With policy
    ACCEPT (and in nat, mangle and raw, whose policy is ACCEPT) RETURN is the usual "skip the rest
    of this chain" idiom of libvirt, Istio and OpenStack, and means what it says: not reported.
    Fix: write the verdict explicitly (-j DROP, or -j ACCEPT to let them through), or move the
    rules into a user chain.
    """
    for table in tables(ctx):
        for chain in table.chains.values():
            if not chain.builtin or (chain.policy or "ACCEPT") != "DROP":
                continue
            for r in chain.rules:
                t = r.target
                if not (isinstance(t, Verdict) and t.verdict == "RETURN"):
                    continue
                which = "every packet gets" if unconditional(r) else "packets matching it get"
                yield ctx.diag("CHN005", f"{r.label}: RETURN in builtin chain {chain.name} has no caller to "
                                         f"return to: {which} the chain policy, DROP, so they are dropped",
                               r.option_span(t),
                               hint="write '-j DROP' if that is meant, or '-j ACCEPT' to let them through")


# --------------------------------------------------------------------------- CHN006
@check(code="CHN006", name="duplicate-rule", severity=WARNING)
def duplicate_rule(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A rule repeats an earlier rule of the same chain, with nothing in between that could
    change which packets it matches.

    Why it matters: the copy never matches a packet the first one did not already handle; it
    usually means a script appended its rules twice, and it hides which rule is live.
    Fix: delete the later copy (and make the script check before it appends, `iptables -C`).
    """
    for table in tables(ctx):
        modifies_memo: dict[str, bool] = {}
        for chain in table.chains.values():
            last: dict[tuple, int] = {}  # key -> position of its latest occurrence
            origin: dict[int, int] = {}  # position of a copy -> position of the rule it repeats
            copies: dict[int, list[Rule]] = {}
            changes = 0  # rules so far that may change what a later rule matches
            mark: list[int] = []
            for k, r in enumerate(chain.rules):
                key = rule_key(r)
                mark.append(changes)
                if key is not None:
                    i = last.get(key)
                    if i is not None and _nothing_between(table, chain.rules[i], mark[k] - mark[i],
                                                          modifies_memo):
                        o = origin[k] = origin.get(i, i)
                        copies.setdefault(o, []).append(r)
                    last[key] = k
                changes += _changes(table, r, modifies_memo)
            for o, dups in copies.items():
                first, r = chain.rules[o], dups[0]
                more = ""
                if len(dups) > 1:
                    idx = [str(d.index) for d in dups[1:]]
                    shown = ", ".join(idx[:8]) + (f" and {len(idx) - 8} more" if len(idx) > 8 else "")
                    more = f"; so do rules {shown}"
                related = (Related("first written here", first.span),) + tuple(
                    Related("another copy", d.span) for d in dups[1:9])
                yield ctx.diag(
                    "CHN006",
                    f"{r.label} repeats rule {first.index} of {chain.name} ({describe_target(r)}): "
                    f"it matches only packets rule {first.index} already handled{more}",
                    r.span, hint=f"delete the {'copies' if len(dups) > 1 else 'copy'} of rule {first.index}",
                    related=related)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _values(o) -> tuple:
    names = _FIELDS.get(type(o))
    if names is None:
        names = _FIELDS[type(o)] = tuple(f.name for f in fields(o) if f.name not in ("col", "end_col"))
    return (type(o).__name__,) + tuple(getattr(o, n) for n in names)


def rule_key(r: Rule) -> tuple | None:
    """What the rule does, as model values (``--to`` and ``--to-destination`` compare equal);
    None when the rule depends on state or chance and so is never a duplicate."""
    for m in r.matches:
        if isinstance(m, StatisticMatch) or m.module in STATEFUL_MODULES:
            return None
    # a rule ANDs its matches, and none left here has side effects: order does not count
    matches = Counter(_values(m) for m in r.matches)
    return (frozenset(matches.items()), _values(r.target) if r.target is not None else None)


def _nothing_between(table: Table, first: Rule, changed: int, memo: dict) -> bool:
    """True when none of the ``changed`` rules from ``first`` up to the copy alters packets,
    except ``first`` itself applying an effect that applying again would not change."""
    own = _changes(table, first, memo)
    return changed == 0 or (changed == own == 1 and _idempotent(first.target))


IDEMPOTENT_TARGETS = frozenset({"DSCP", "CLASSIFY", "TCPMSS", "CT", "SET", "CONNSECMARK",
                                "SECMARK", "CHECKSUM"})


def _idempotent(t) -> bool:
    """Applying the target twice leaves the packet as applying it once (jumps are assumed to)."""
    if isinstance(t, SetMark):
        return t.value & ~t.mask & 0xFFFFFFFF == 0  # --xor-mark outside the mask toggles back
    if isinstance(t, OtherTarget):
        return t.target in NO_EFFECT_TARGETS or t.target in IDEMPOTENT_TARGETS
    return isinstance(t, (Jump, ConnmarkCopy, Notrack))


def _changes(table: Table, r: Rule, memo: dict) -> int:
    """1 when packets that pass rule ``r`` may leave it changed in a way a match can see."""
    t = r.target
    if t is None or ends_chain(t):
        return 0
    if isinstance(t, Jump):
        return 1 if _chain_modifies(table, t.chain, memo, set()) else 0
    return 1 if _modifying(t) else 0


def _modifying(t) -> bool:
    if isinstance(t, (SetMark, ConnmarkCopy, Notrack, UnknownTarget)):
        return True
    if isinstance(t, OtherTarget):
        return t.target not in NO_EFFECT_TARGETS
    if isinstance(t, (Nat, Masquerade, Redirect, Netmap, Tproxy, Reject, Verdict)):
        return False  # they end the chain: nothing continues past them
    return True


def _chain_modifies(table: Table, name: str, memo: dict, stack: set) -> bool:
    if name in memo:
        return memo[name]
    chain = table.chains.get(name)
    if chain is None or name in stack:
        return True
    stack.add(name)
    out = False
    for r in chain.rules:
        t = r.target
        if isinstance(t, Jump):
            if _chain_modifies(table, t.chain, memo, stack):
                out = True
                break
        elif t is not None and not t.terminal and _modifying(t):
            out = True
            break
    stack.discard(name)
    memo[name] = out
    return out


# --------------------------------------------------------------------------- CHN008
@check(code="CHN008", name="jump-to-builtin-chain", severity=ERROR, restore=True)
def jump_to_builtin_chain(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A rule jumps (-j) or goes (-g) to a builtin chain such as INPUT or PREROUTING.

    Why it matters: builtin chains are entered only from their hook; iptables refuses the jump
    (iptables-legacy already in `--test`, iptables-nft at commit with EOPNOTSUPP), and the whole
    table fails to load.
    Fix: move the shared rules into a user chain and jump to it from each builtin chain.
    """
    for table in tables(ctx):
        builtins = BUILTIN_CHAINS.get(table.name, ())
        for r in table_graph(ctx, table).jumps_out:
            t = r.target
            if t.chain in builtins:
                yield ctx.diag(
                    "CHN008",
                    f"{r.label}: {'goes' if t.goto else 'jumps'} to builtin chain {t.chain}; "
                    f"iptables refuses jumps to builtin chains, so table {table.name} does not load",
                    r.option_span(t),
                    hint=f"put the shared rules in a user chain and jump to it from {r.chain} "
                         f"and {t.chain}")


# --------------------------------------------------------------------------- CHN010
@check(code="CHN010", name="chain-nesting-too-deep", severity=ERROR, restore=True)
def chain_nesting_too_deep(ctx: CheckContext) -> Iterator[Diagnostic]:
    """Jumps nest more than 15 user chains below a builtin chain.

    Why it matters: nf_tables (iptables-nft, the default backend of current distributions)
    refuses the table with EMLINK ("Too many links"); iptables-legacy accepts it.
    Fix: flatten the chain hierarchy (goto counts as a level too).
    """
    for table in tables(ctx):
        g = table_graph(ctx, table)
        order, tangled = g.acyclic()
        if not tangled:
            yield from _nesting_acyclic(ctx, table, g, order)
            continue
        import networkx as nx  # ~0.3 s to import: only for a table with a cycle

        dg = nx.DiGraph()
        edge: dict[tuple[str, str], Rule] = {}
        for src, rules in g.callees.items():
            if not g.reachable(src):
                continue
            for r in rules:
                e = (src, r.target.chain)
                if e not in edge:
                    edge[e] = r
                    dg.add_edge(*e)
        if not dg.number_of_edges():
            continue
        # loops are CHN002's; measure depth on the acyclic part only
        cyclic = set()
        for scc in nx.strongly_connected_components(dg):
            n = next(iter(scc))
            if len(scc) > 1 or dg.has_edge(n, n):
                cyclic |= scc
        dg.remove_nodes_from(cyclic)
        level: dict[str, int] = {}
        parent: dict[str, str] = {}
        for n in nx.topological_sort(dg):
            if table.chains.get(n) is not None and table.chains[n].builtin:
                level[n] = 0
            for m in dg.successors(n):
                if n in level and level[n] + 1 > level.get(m, -1):
                    level[m] = level[n] + 1
                    parent[m] = n
        yield from _report_depth(ctx, table, level, parent, edge)


def _nesting_acyclic(ctx, table, g, order):
    """CHN010 on a table without cycles: longest jump path from the builtin chains, in
    topological order, over the jumps of reachable chains (as the networkx path does)."""
    level, parent = g.levels, g.parents
    if level is None:  # a graph built some other way: measure here
        level, parent = {}, {}
        chains = table.chains
        hooks = g.hooks
        succ = g._topo[2]  # each chain's callees, once each, in the order of the first jump
        for n in order:
            c = chains.get(n)
            if c is not None and c.builtin:
                level[n] = 0
            lv = level.get(n)
            if lv is None or not hooks.get(n):
                continue
            lv += 1
            for m in succ.get(n, ()):
                if lv > level.get(m, -1):
                    level[m] = lv
                    parent[m] = n
    yield from _report_depth(ctx, table, level, parent, _FirstJump(g))


class _FirstJump:
    """(caller, callee) -> the caller's first rule that jumps (or goes) to the callee."""

    def __init__(self, g: TableGraph):
        self.g = g

    def __getitem__(self, edge: tuple[str, str]) -> Rule:
        src, dst = edge
        return next(r for r in self.g.callees[src] if r.target.chain == dst)


def _report_depth(ctx, table, level, parent, edge):
    for name, lv in level.items():
        if lv != NFT_MAX_JUMP_LEVEL + 1:
            continue
        chain_path = [name]
        while chain_path[-1] in parent:
            chain_path.append(parent[chain_path[-1]])
        chain_path.reverse()
        r = edge[(chain_path[-2], name)]
        deepest = max(level.values())
        yield ctx.diag(
            "CHN010",
            f"{r.label}: jump puts chain {name} {lv} levels below {table.name} {chain_path[0]} "
            f"({' -> '.join(chain_path)}); nf_tables allows {NFT_MAX_JUMP_LEVEL}, so iptables-nft "
            f"refuses table {table.name} (Too many links); iptables-legacy accepts it"
            + (f" (the deepest chain is {deepest} levels down)" if deepest > lv else ""),
            r.option_span(r.target),
            hint="flatten the chains: fold short chains into their caller")

