"""Checks layer, placement family (CHN): targets and matches used in a table or hook where
iptables or the kernel refuses them, or where they can never match.

Every restriction below was checked by loading a one-rule dump into a throwaway network
namespace with iptables-nft-restore and iptables-legacy-restore 1.8.9 on Linux 6.18 (a real
load: ``--test`` commits nothing, so it misses every refusal that comes from the kernel).
docs/checks/CHN007.md has the table of results.
"""
from __future__ import annotations

from typing import Iterator

from analyzer.checks import CheckContext, check
from analyzer.checks.chains import render_path, table_graph, tables, user_chains_only
from analyzer.diagnostics import Diagnostic, Related, Severity
from analyzer.model.rules import (
    Reject,
    TABLES, AddrTypeMatch, IfaceMatch, Masquerade, Nat, OtherTarget, OwnerMatch, PhysdevMatch,
    ProtoMatch, Redirect, Rule, Table, Tproxy, Verdict,
)

ERROR, WARNING = Severity.ERROR, Severity.WARNING
HOOK_ORDER = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")

# target -> tables it may appear in (kernel xt_target.table; "x_tables: ip_tables: DNAT target:
# only valid in nat table, not mangle"). Same for ip6tables.
TARGET_TABLES: dict[str, tuple[str, ...]] = {
    "DNAT": ("nat",), "SNAT": ("nat",), "MASQUERADE": ("nat",), "REDIRECT": ("nat",),
    "NETMAP": ("nat",),
    "TPROXY": ("mangle",),
    "CT": ("raw",), "NOTRACK": ("raw",),
    "REJECT": ("filter",),
    "DSCP": ("mangle",), "TOS": ("mangle",), "ECN": ("mangle",), "TTL": ("mangle",),
    "HL": ("mangle",), "CHECKSUM": ("mangle",),
    "CONNSECMARK": ("mangle", "security"),
}
# target -> hooks it may be reached from (kernel xt_target.hooks; "DNAT target: used from hooks
# POSTROUTING, but only usable from PREROUTING/OUTPUT"). The kernel applies this to every hook
# that reaches the rule through user chains, and refuses the whole table.
TARGET_HOOKS: dict[str, tuple[str, ...]] = {
    "DNAT": ("PREROUTING", "OUTPUT"),
    "REDIRECT": ("PREROUTING", "OUTPUT"),
    "SNAT": ("INPUT", "POSTROUTING"),
    "MASQUERADE": ("POSTROUTING",),
    "TPROXY": ("PREROUTING",),
    "SYNPROXY": ("INPUT", "FORWARD"),
    "CLASSIFY": ("FORWARD", "OUTPUT", "POSTROUTING"),
    "TCPMSS --clamp-mss-to-pmtu": ("FORWARD", "OUTPUT", "POSTROUTING"),
}
# Refused by one backend only: (target, tables it may appear in, backend that refuses).
# TRACE: xt_TRACE is raw-only for iptables-legacy; iptables-nft turns it into `meta nftrace`.
BACKEND_TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "TRACE": (("raw",), "iptables-legacy"),
}


def _target_key(rule: Rule) -> str | None:
    t = rule.target
    if t is None:
        return None
    name = t.name
    if isinstance(t, OtherTarget) and name == "TCPMSS" and any(
            o == "--clamp-mss-to-pmtu" for o, _ in t.options):
        return "TCPMSS --clamp-mss-to-pmtu"
    return name


def _hooks_reaching(g, chain: str) -> list[str]:
    return sorted(g.hooks.get(chain, ()), key=HOOK_ORDER.index)


def _path_related(g, hook: str, rule: Rule) -> tuple[Related, ...]:
    return tuple(Related(f"{r.chain} {'goes' if r.target.goto else 'jumps'} to {r.target.chain} here",
                         r.span) for r in g.path(hook, rule.chain))


def _where(g, hook: str, rule: Rule, table: Table, what: str) -> str:
    """``DNAT in nat POSTROUTING`` or ``DNAT is reached from nat POSTROUTING (path)``."""
    if rule.chain == hook:
        return f"{what} in {table.name} {hook}"
    return f"{what} is reached from {table.name} {hook} ({render_path(g.path(hook, rule.chain), rule.chain)})"


# --------------------------------------------------------------------------- CHN007
@check(code="CHN007", name="target-invalid-here", severity=ERROR, restore=True)
def target_invalid_here(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A target is used in a table, or reached from a hook, where iptables or the kernel refuses it.

    Why it matters: the whole table fails to load ("RULE_APPEND failed (Invalid argument)" on
    iptables-nft, "line N failed" on iptables-legacy), also when the target sits in a user chain
    that a wrong hook reaches.
    Fix: move the rule to a chain of the right table and hook (DNAT/REDIRECT in nat PREROUTING or
    OUTPUT, SNAT in nat POSTROUTING or INPUT, MASQUERADE in nat POSTROUTING, TPROXY in mangle
    PREROUTING, CT/NOTRACK in raw, REJECT in filter), or stop the wrong hook reaching its chain.
    """
    for table in tables(ctx):
        if table.name not in TABLES:
            continue  # unknown table (PRS013): its hooks are unknown
        g = table_graph(ctx, table)
        refused: dict = {}  # (target key, hooks reaching a chain) -> those hooks that refuse it
        for r in _chn007_rules(g):
            t = r.target
            if t.__class__ is Nat:  # kube-proxy's DNAT per endpoint: its key is its kind
                key = name = t.kind
            else:
                key = _target_key(r)
                name = key.split()[0]
            if name == "DROP" and isinstance(r.target, Verdict) and table.name == "nat":
                yield ctx.diag(
                    "CHN007",
                    f"{r.label}: DROP in the nat table; iptables refuses it (\"the nat table is "
                    "not intended for filtering\"), so table nat does not load",
                    r.option_span(r.target), hint="drop the packets in the filter table (or mangle/raw) instead")
                continue
            homes = TARGET_TABLES.get(name)
            if homes is not None and table.name not in homes:
                yield ctx.diag(
                    "CHN007",
                    f"{r.label}: {name} is only valid in the {'/'.join(homes)} table; the "
                    f"kernel refuses it in {table.name}, so table {table.name} does not load",
                    r.option_span(r.target), hint=f"move the rule to *{homes[0]}")
                continue
            only = BACKEND_TABLES.get(name)
            if only is not None and table.name not in only[0]:
                yield ctx.diag(
                    "CHN007",
                    f"{r.label}: {name} outside the {'/'.join(only[0])} table: {only[1]} refuses "
                    f"table {table.name} (other backends accept it)",
                    r.option_span(r.target), hint=f"move the rule to *{only[0][0]}", severity=WARNING)
                continue
            hooks = TARGET_HOOKS.get(key)
            if hooks is None:
                continue
            # chains reached from the same hooks share one set (TableGraph.build): one answer each
            reach = g.hooks.get(r.chain, ())
            bad = refused.get((key, reach))
            if bad is None:
                bad = refused[(key, reach)] = [h for h in _hooks_reaching(g, r.chain) if h not in hooks]
            if not bad:
                continue
            h = bad[0]
            more = f" (and from {', '.join(bad[1:])})" if len(bad) > 1 else ""
            yield ctx.diag(
                "CHN007",
                f"{r.label}: {_where(g, h, r, table, key)}{more}; the kernel allows "
                f"{name} only from {'/'.join(hooks)} and refuses the whole {table.name} table",
                r.option_span(r.target), hint=f"use {name} only in chains reached from {'/'.join(hooks)}",
                related=_path_related(g, h, r))


# the target names CHN007 has a rule for (a 10k-service kube-proxy dump: 117k rules, most jumps)
_CHN007_NAMES = frozenset({"DROP", *TARGET_TABLES, *BACKEND_TABLES, *(k.split()[0] for k in TARGET_HOOKS)})


def _chn007_rules(g) -> list[Rule]:
    """The rules whose target CHN007 has a rule for, in the table's order: targets of those
    names, and jumps (-g) to a chain of such a name (Jump.name is its chain)."""
    names = _CHN007_NAMES
    out = [r for r in g.others if r.target.name in names]
    # such a jump goes to a chain the table lacks (jumps_out: iptables refuses a chain named as a
    # target), or, in a model built by hand, to one of its chains
    chains = g.table.chains
    pool = g.jumps if any(n in chains for n in names) else g.jumps_out
    jumps = [r for r in pool if r.target.chain in names]
    if jumps:
        pos = {name: k for k, name in enumerate(g.table.chains)}
        out = sorted(out + jumps, key=lambda r: (pos[r.chain], r.index))
    return out


# --------------------------------------------------------------------------- CHN009
# match -> hooks it may be reached from; all refused by the kernel on both backends.
OWNER_HOOKS = ("OUTPUT", "POSTROUTING")
LIMIT_IFACE_HOOKS = {"in": ("PREROUTING", "INPUT", "FORWARD"),
                     "out": ("FORWARD", "OUTPUT", "POSTROUTING")}
# iptables itself (both backends, even with --test) refuses -i in these builtin chains and -o in
# the others, by chain name, in every table.
NO_IN_IFACE = ("OUTPUT", "POSTROUTING")
NO_OUT_IFACE = ("PREROUTING", "INPUT")


_CHN009_MATCHES = (IfaceMatch, OwnerMatch, AddrTypeMatch, PhysdevMatch)


@check(code="CHN009", name="match-invalid-here", severity=ERROR, restore=True)
def match_invalid_here(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A match is used in a builtin chain, or reached from a hook, where iptables or the kernel
    refuses it: -i in OUTPUT/POSTROUTING, -o in PREROUTING/INPUT, `-m owner` outside
    OUTPUT/POSTROUTING, `--limit-iface-in/out` on the wrong side, `--physdev-out` from OUTPUT.

    Why it matters: the table fails to load ("Can't use -i with OUTPUT" from iptables,
    "owner match: used from hooks INPUT, but only valid from OUTPUT/POSTROUTING" from the kernel).
    Fix: match what the hook knows: -o and owner on the way out, -i on the way in.
    """
    for table in tables(ctx):
        if table.name not in TABLES:
            continue  # unknown table (PRS013): its hooks are unknown
        g = table_graph(ctx, table)
        for r in g.placed:  # the rules with a match of _CHN009_MATCHES
            chain = table.chains[r.chain]
            for m in r.matches:
                if not isinstance(m, _CHN009_MATCHES):
                    continue
                if isinstance(m, IfaceMatch) and chain.builtin:
                    banned = NO_IN_IFACE if m.direction == "in" else NO_OUT_IFACE
                    if chain.name in banned:
                        opt = "-i" if m.direction == "in" else "-o"
                        side = "input" if m.direction == "in" else "output"
                        yield ctx.diag(
                            "CHN009",
                            f"{r.label}: '{opt} {m.name}' in {chain.name}, where a packet has no "
                            f"{side} interface; iptables refuses it (\"Can't use {opt} with "
                            f"{chain.name}\"), so table {table.name} does not load",
                            r.option_span(m), hint=f"use {'-o' if opt == '-i' else '-i'}, or match the "
                            f"interface in the chain of the other direction")
                    continue
                allowed = what = None
                if isinstance(m, OwnerMatch):
                    allowed, what = OWNER_HOOKS, "-m owner"
                elif isinstance(m, AddrTypeMatch) and m.limit_iface:
                    allowed = LIMIT_IFACE_HOOKS[m.limit_iface]
                    what = f"-m addrtype --limit-iface-{m.limit_iface}"
                elif isinstance(m, PhysdevMatch) and m.option in ("physdev-out", "physdev-is-out") \
                        and not any(isinstance(x, PhysdevMatch) and x.option == "physdev-is-bridged"
                                    and not x.negated for x in r.matches):
                    allowed = ("PREROUTING", "INPUT", "FORWARD", "POSTROUTING")
                    what = f"--{m.option}"
                if allowed is None:
                    continue
                bad = [h for h in _hooks_reaching(g, r.chain) if h not in allowed]
                if not bad:
                    continue
                h = bad[0]
                yield ctx.diag(
                    "CHN009",
                    f"{r.label}: {_where(g, h, r, table, what)}; the kernel allows it "
                    f"only from {'/'.join(allowed)} and refuses the whole {table.name} table",
                    r.option_span(m), hint=f"use {what} only in chains reached from {'/'.join(allowed)}",
                    related=_path_related(g, h, r))


# --------------------------------------------------------------------------- CHN011
PORT_PROTOCOLS = {4: frozenset({6, 17, 132, 33, 1}), 6: frozenset({6, 17, 132, 33})}


def _proto(rule: Rule) -> ProtoMatch | None:
    for m in rule.matches:  # a loop, not a generator: CHN011 asks this of every DNAT rule
        if isinstance(m, ProtoMatch):
            return m
    return None


@check(code="CHN011", name="target-needs-protocol", severity=ERROR, restore=True)
def target_needs_protocol(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A target that needs a protocol is used without a matching `-p`: TPROXY without `-p tcp`
    or `-p udp`, TCPMSS without `-p tcp`, or a NAT target with ports and no `-p tcp/udp/sctp/dccp`.

    Why it matters: the table fails to load (the kernel: "xt_TPROXY: Can be used only with -p tcp
    or -p udp"; iptables: "Need TCP, UDP, SCTP or DCCP with port specification").
    Fix: add the protocol (`-p tcp`), or one rule per protocol.
    """
    family = ctx.ruleset.family if ctx.ruleset is not None else 4
    for table in tables(ctx):
        if table.name not in TABLES:
            continue
        for r in table_graph(ctx, table).others:  # a jump needs no protocol
            t = r.target
            tt = type(t)
            if tt is Verdict:
                continue  # nor does a verdict
            if tt is Nat:  # kube-proxy's DNAT to each endpoint: only the port test applies
                for rg in t.ranges:
                    if rg.port_lo is not None:
                        break
                else:
                    continue
            p = _proto(r)
            num = p.number if p is not None else 0
            if tt is Nat and num in PORT_PROTOCOLS.get(family, PORT_PROTOCOLS[4]):
                continue
            if isinstance(t, Tproxy) and (num not in (6, 17) or p.negated):
                have = "no -p" if p is None or num == 0 else f"'{'! ' if p.negated else ''}-p {p.name}'"
                yield ctx.diag(
                    "CHN011",
                    f"{r.label}: TPROXY with {have}; the kernel accepts TPROXY only with "
                    f"-p tcp or -p udp and refuses table {table.name}",
                    r.option_span(t), hint="add '-p tcp' (and a second rule with '-p udp' if needed)")
            elif (need := _needs_tcp(t)) is not None and (num != 6 or p.negated):
                what, kernel_says, hint = need
                yield ctx.diag(
                    "CHN011",
                    f"{r.label}: {what} without '-p tcp'; the kernel refuses it "
                    f"({kernel_says}), so table {table.name} does not load",
                    r.option_span(t), hint=hint)
            elif _has_ports(t) and num not in PORT_PROTOCOLS.get(family, PORT_PROTOCOLS[4]):
                have = "no -p" if num == 0 else f"-p {p.name}"
                yield ctx.diag(
                    "CHN011",
                    f"{r.label}: {t.name} gives ports with {have}; iptables refuses it (\"Need "
                    f"TCP, UDP, SCTP or DCCP with port specification\"), so table {table.name} "
                    "does not load",
                    r.option_span(t), hint="add '-p tcp' (or -p udp), or drop the port")


def _needs_tcp(t):
    """(what, the kernel's words, hint) for targets valid only on TCP packets, else None."""
    if isinstance(t, OtherTarget) and t.target == "TCPMSS":
        return "TCPMSS", "TCPMSS target: only valid for protocol 6", "add '-p tcp --tcp-flags SYN,RST SYN'"
    if isinstance(t, Reject) and t.with_ == "tcp-reset":
        return ("REJECT --reject-with tcp-reset", '"TCP_RESET invalid for non-tcp"',
                "add '-p tcp' (and reject other protocols with an ICMP type)")
    return None


def _has_ports(t) -> bool:
    if isinstance(t, Nat):
        return any(rg.port_lo is not None for rg in t.ranges)
    if isinstance(t, (Masquerade, Redirect)):
        return t.ports is not None
    return False


# --------------------------------------------------------------------------- CHN012
@check(code="CHN012", name="interface-never-matches", severity=WARNING)
def interface_never_matches(ctx: CheckContext) -> Iterator[Diagnostic]:
    """A user chain matches -i (or -o) but only hooks without that interface reach it: -i from
    OUTPUT/POSTROUTING, -o from PREROUTING/INPUT.

    Why it matters: iptables refuses this in a builtin chain but accepts it in a user chain,
    where the kernel finds no interface: `-i eth0` never matches and `! -i eth0` always does.
    Fix: match the other direction (-o on the way out, -i on the way in), or reach the chain from
    a hook that has the interface.
    """
    if ctx.partial:
        return  # callers outside this input could reach the chain from another hook
    for table in tables(ctx):
        if table.name not in TABLES or user_chains_only(table):
            continue  # unknown table (PRS013), or a payload whose callers live elsewhere
        g = table_graph(ctx, table)
        for chain in table.chains.values():
            if chain.builtin:
                continue
            hooks = _hooks_reaching(g, chain.name)
            if not hooks:
                continue
            for r in chain.rules:
                for m in r.matches:
                    if not isinstance(m, IfaceMatch):
                        continue
                    banned = NO_IN_IFACE if m.direction == "in" else NO_OUT_IFACE
                    if not all(h in banned for h in hooks):
                        continue
                    opt = "-i" if m.direction == "in" else "-o"
                    result = "always matches" if m.negated else "never matches"
                    h = hooks[0]
                    yield ctx.diag(
                        "CHN012",
                        f"{r.label}: '{'! ' if m.negated else ''}{opt} {m.name}' {result}: chain "
                        f"{chain.name} is reached only from {table.name} {'/'.join(hooks)}, where a "
                        f"packet has no {'input' if opt == '-i' else 'output'} interface",
                        r.option_span(m),
                        hint=f"use {'-o' if opt == '-i' else '-i'} here, or delete the match",
                        related=_path_related(g, h, r))
