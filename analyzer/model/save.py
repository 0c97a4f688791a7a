"""Model -> iptables-save text.

``to_save(ruleset)`` writes a :class:`~analyzer.model.rules.Ruleset` back in the syntax
``iptables-save`` prints: ``*table``, chain declarations (``:INPUT ACCEPT [0:0]``,
``:USER - [0:0]``), ``-A CHAIN ...`` rules in order, ``COMMIT``. Each typed match and target is
rendered canonically (``-d 1.2.3.4/32``, ``-p tcp -m tcp --dport 80``, ``--set-xmark V/M``, ...),
so that parsing the output gives back an equal model and ``iptables-restore --test`` accepts it
whenever it accepted the original.

Matches keep their order in the rule. A module's options are written after an explicit
``-m MODULE`` (also for the modules a protocol loads implicitly, as iptables-save does);
consecutive options of one module share one ``-m`` unless an option would repeat (or the module
takes only one option, like ``multiport``).
"""
from __future__ import annotations

import re

from analyzer.model.rules import (
    AddrMatch, AddrTypeMatch, Chain, CommentMatch, ConnmarkCopy, CtStateMatch, CtStatusMatch,
    CtTupleMatch, FragmentMatch, IcmpMatch, IfaceMatch, IpRangeMatch, Jump, MarkMatch, Masquerade,
    Match, Nat, Netmap, Notrack, OpaqueMatch, OtherTarget, OwnerMatch, PhysdevMatch, PortMatch,
    ProtoMatch, Redirect, Reject, Rule, Ruleset, SetMark, SetMatch, StatisticMatch, Table, Target,
    TcpFlagsMatch, Tproxy, UnknownMatch, UnknownTarget, Verdict,
)

__all__ = ["to_save", "rule_to_save", "match_args", "target_args", "quote"]

# names iptables knows for protocol numbers (``-p``); anything else is written as its number
_PROTO_NAMES = {
    0: "all", 1: "icmp", 2: "igmp", 4: "ipencap", 6: "tcp", 8: "egp", 17: "udp", 33: "dccp",
    41: "ipv6", 43: "ipv6-route", 44: "ipv6-frag", 47: "gre", 50: "esp", 51: "ah",
    58: "ipv6-icmp", 59: "ipv6-nonxt", 60: "ipv6-opts", 88: "eigrp", 89: "ospf", 103: "pim",
    112: "vrrp", 115: "l2tp", 132: "sctp", 135: "mh", 136: "udplite",
}
# libxt_tcp's flag names in print order; ECE/CWR are written for completeness only
_TCP_FLAG_BITS = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08), ("ACK", 0x10),
                  ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80))
_CT_STATE_ORDER = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")
_CT_STATUS_ORDER = ("NONE", "EXPECTED", "SEEN_REPLY", "ASSURED", "CONFIRMED")
_ADDR_TYPE_ORDER = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST",
                    "BLACKHOLE", "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE")

# xtables_save_string: no quotes when the value is only these characters
_SAFE_CANONICAL = re.compile(r"[A-Za-z0-9_-]+")
# verbatim arguments: quote only what the iptables-restore tokenizer would split or eat
_NEEDS_QUOTE = re.compile(r"""[\s"'\\]""")


def quote(s: str, canonical: bool = False) -> str:
    """Quote ``s`` for iptables-restore as ``xtables_save_string`` does (``"..."`` with ``"``,
    ``'`` and ``\\`` escaped by a backslash).

    With ``canonical`` (strings iptables-save always passes through ``xtables_save_string``,
    such as comments) anything beyond ``[A-Za-z0-9_-]`` is quoted; otherwise only values with
    blanks, quotes or backslashes (or empty ones) are.

    >>> quote('a "b" c\\\\d', canonical=True)
    '"a \\\\"b\\\\" c\\\\\\\\d"'
    >>> quote('5/sec'), quote('5/sec', canonical=True), quote('')
    ('5/sec', '"5/sec"', '""')
    """
    if canonical:
        if _SAFE_CANONICAL.fullmatch(s):
            return s
    elif s and not _NEEDS_QUOTE.search(s):
        return s
    return '"' + re.sub(r"""(["'\\])""", r"\\\1", s) + '"'


def _hex(v: int) -> str:
    return f"0x{v:x}"


def _vm(value: int, mask: int, full_mask_short: bool = True) -> str:
    """``V/M`` in hex; ``V`` alone when the mask is all ones (as iptables-save prints marks)."""
    if full_mask_short and mask == 0xFFFFFFFF:
        return _hex(value)
    return f"{_hex(value)}/{_hex(mask)}"


def _ordered(values, order) -> str:
    known = [v for v in order if v in values]
    rest = sorted(v for v in values if v not in order)
    return ",".join(known + rest)


def _port_range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}:{hi}"


def _tcp_flags(v: int) -> str:
    if v == 0:
        return "NONE"
    if v == 0xFF:
        return "ALL"  # not reachable from iptables' own ALL (0x3f), written for a round trip
    return ",".join(n for n, b in _TCP_FLAG_BITS if v & b)


def _net(n, host_prefix: bool = True) -> str:
    if not host_prefix and n.prefixlen == n.max_prefixlen:
        return str(n.network_address)
    return str(n)


def _proto(m: ProtoMatch) -> str:
    name = (m.name or "").lower()
    if name and (name == _PROTO_NAMES.get(m.number) or name in ("ipip", "icmpv6")):
        return name
    return _PROTO_NAMES.get(m.number, str(m.number))


# --------------------------------------------------------------------------- matches
def match_args(m: Match) -> tuple[str, list[str]]:
    """``(module, tokens)`` of one match: ``module`` is ``""`` for generic options (``-s``,
    ``-p``, ...); ``tokens`` are unquoted, starting with ``!`` when negated. The first option
    name in ``tokens`` (after ``!``) is what must not repeat inside one ``-m``."""
    neg = ["!"] if m.negated else []
    if isinstance(m, AddrMatch):
        return "", neg + ["-s" if m.direction == "src" else "-d", ",".join(_net(n) for n in m.networks)]
    if isinstance(m, ProtoMatch):
        return "", neg + ["-p", _proto(m)]
    if isinstance(m, IfaceMatch):
        return "", neg + ["-i" if m.direction == "in" else "-o", m.name]
    if isinstance(m, FragmentMatch):
        return "", neg + ["-f"]
    if isinstance(m, PortMatch):
        multi = m.mod == "multiport"
        opt = {"src": "--sport", "dst": "--dport", "any": "--port"}[m.direction] + ("s" if multi else "")
        return m.mod, neg + [opt, ",".join(_port_range(lo, hi) for lo, hi in m.ranges)]
    if isinstance(m, TcpFlagsMatch):
        return "tcp", neg + ["--tcp-flags", _tcp_flags(m.mask), _tcp_flags(m.comp)]
    if isinstance(m, IcmpMatch):
        opt = "--icmp-type" if m.family == 4 else "--icmpv6-type"
        if m.name:
            val = m.name
        elif m.type is None:
            val = "any"
        else:
            val = str(m.type) if m.code is None else f"{m.type}/{m.code}"
        return m.module, neg + [opt, val]
    if isinstance(m, MarkMatch):
        return m.kind, neg + ["--mark", _vm(m.value, m.mask)]
    if isinstance(m, CtStateMatch):
        opt = "--state" if m.mod == "state" else "--ctstate"
        return m.mod, neg + [opt, _ordered(m.states, _CT_STATE_ORDER)]
    if isinstance(m, CtTupleMatch):
        opt = "--ct" + m.field_name
        if m.ports is not None:
            return "conntrack", neg + [opt, _port_range(*m.ports)]
        return "conntrack", neg + [opt, ",".join(_net(n, host_prefix=False) for n in m.networks)]
    if isinstance(m, CtStatusMatch):
        order = _CT_STATUS_ORDER if m.option == "ctstatus" else ("ORIGINAL", "REPLY")
        return "conntrack", neg + ["--" + m.option, _ordered(m.values, order)]
    if isinstance(m, AddrTypeMatch):
        opt = "--src-type" if m.direction == "src" else "--dst-type"
        return "addrtype", neg + [opt, _ordered(m.types, _ADDR_TYPE_ORDER)]
    if isinstance(m, StatisticMatch):
        if m.mode == "random":
            return "statistic", ["--mode", "random"] + neg + [
                "--probability", "%.11f" % (m.threshold / 0x80000000)]
        return "statistic", ["--mode", m.mode] + neg + [
            "--every", str(m.every), "--packet", str(m.packet)]
    if isinstance(m, OwnerMatch):
        if m.option in ("uid", "gid"):
            ids = str(m.lo) if m.lo == m.hi else f"{m.lo}-{m.hi}"
            return "owner", neg + [f"--{m.option}-owner", ids]
        return "owner", neg + ["--" + m.option]
    if isinstance(m, SetMatch):
        return "set", neg + ["--match-set", m.name, ",".join(m.flags), *m.extra]
    if isinstance(m, PhysdevMatch):
        return "physdev", neg + ["--" + m.option] + ([m.name] if m.name is not None else [])
    if isinstance(m, IpRangeMatch):
        opt = "--src-range" if m.direction == "src" else "--dst-range"
        return "iprange", neg + [opt, f"{m.lo}-{m.hi}"]
    if isinstance(m, CommentMatch):
        return "comment", neg + ["--comment", m.text]
    if isinstance(m, (OpaqueMatch, UnknownMatch)):
        if m.mod == "statistic" and " " in m.option:
            # an undecodable -m statistic kept whole: every statistic option takes one argument
            toks = [t for pair in zip(m.option.split(), m.args) for t in pair]
            return "statistic", neg + toks
        if not m.option:  # a module used without options ('-m socket')
            return m.mod, []
        return m.mod, neg + [m.option, *m.args]
    raise TypeError(f"cannot write match {type(m).__name__}")


def _option_name(toks: list[str]) -> str:
    for t in toks:
        if t != "!":
            return t
    return ""


def _render_tokens(toks: list[str], canonical_idx: set[int] = frozenset()) -> str:
    return " ".join(t if t == "!" and k not in canonical_idx else quote(t, k in canonical_idx)
                    for k, t in enumerate(toks))


def _render_match(m: Match, toks: list[str]) -> str:
    if isinstance(m, CommentMatch):
        # comments go through xtables_save_string: quoted unless plain
        return _render_tokens(toks, {len(toks) - 1})
    return _render_tokens(toks)


# options that cannot share one instance of their module (iptables rejects the merge)
_EXCLUSIVE = {
    "recent": {"--set", "--rcheck", "--update", "--remove"},
    "ttl": {"--ttl-eq", "--ttl-gt", "--ttl-lt", "--ttl"},
    "hl": {"--hl-eq", "--hl-gt", "--hl-lt"},
    "connlimit": {"--connlimit-upto", "--connlimit-above"},
    "hashlimit": {"--hashlimit", "--hashlimit-upto", "--hashlimit-above"},
    "string": {"--string", "--hex-string"},
    "dscp": {"--dscp", "--dscp-class"},
}
_COMMAND_TOKENS = frozenset({"-A", "--append", "-I", "--insert", "-R", "--replace", "-D", "--delete"})
_MATCH_TOKENS = frozenset({"-m", "--match"})


def _gaps(rule: Rule | None):
    """``gap(a, b)``: the rule's text between matches ``a`` and ``b`` (None when the columns
    cannot be placed in ``rule.text``, e.g. for a model built by hand)."""
    if rule is None or not rule.text or not rule.matches:
        return None
    text, col0 = rule.text, rule.span.col
    for tok in re.finditer(r"\S+", text):
        if tok.group() not in _COMMAND_TOKENS:
            continue
        shift = col0 - tok.start()
        ok = True
        for m in rule.matches:
            a, b = m.col - shift, m.end_col - shift
            if not (0 < a < b <= len(text) and text[a - 1].isspace() and not text[a].isspace()
                    and (b == len(text) or text[b].isspace())):
                ok = False
                break
        if ok:
            return lambda x, y, s=shift: text[x.end_col - s:y.col - s]
    return None


def _render_matches(matches, rule: Rule | None = None) -> list[str]:
    """Matches in order, each module's options after ``-m MODULE``.

    Consecutive options of one module share one ``-m`` when they did in the rule's text (the
    columns tell), else when they can: not when an option would repeat, for ``multiport``
    (one option per instance) and for options the module takes only one of."""
    out: list[str] = []
    gap = _gaps(rule)
    cur_mod: str | None = None  # module of the open -m group
    seen: set[str] = set()  # option names written in the open group
    last: Match | None = None  # last match written in the open group
    pending_limit: str | None = None  # addrtype --limit-iface-* closing the open group

    def close():
        nonlocal pending_limit
        if pending_limit:
            out.append(f"--limit-iface-{pending_limit}")
            pending_limit = None

    for m in matches:
        mod, toks = match_args(m)
        if not mod:
            # a generic option: keeps the open group (the parser reads -s/-p/... anywhere)
            out.append(_render_match(m, toks))
            continue
        name = _option_name(toks)
        excl = _EXCLUSIVE.get(mod, ())
        new = (mod != cur_mod or name in seen or mod == "multiport"
               or (name in excl and seen & excl))
        if not new and gap is not None and last is not None:
            between = gap(last, m).split()
            new = any(t in _MATCH_TOKENS for t in between)
        if new:
            close()
            out.append(f"-m {quote(mod)}")
            cur_mod, seen = mod, set()
        seen.add(name)
        last = m
        out.append(_render_match(m, toks))
        if isinstance(m, AddrTypeMatch) and m.limit_iface:
            pending_limit = m.limit_iface
    close()
    return out


# --------------------------------------------------------------------------- targets
def target_args(t: Target) -> list[str]:
    """Tokens (unquoted) from ``-j``/``-g`` on."""
    if isinstance(t, Jump):
        return ["-g" if t.goto else "-j", t.chain]
    if isinstance(t, Verdict):
        return ["-j", t.verdict]
    if isinstance(t, Reject):
        return ["-j", "REJECT", "--reject-with", t.with_]
    if isinstance(t, Nat):
        opt = "--to-destination" if t.kind == "DNAT" else "--to-source"
        toks = ["-j", t.kind]
        for r in t.ranges:
            toks += [opt, r.render()]
        if t.random:
            toks.append("--random")
        if t.random_fully:
            toks.append("--random-fully")
        if t.persistent:
            toks.append("--persistent")
        return toks
    if isinstance(t, (Masquerade, Redirect)):
        toks = ["-j", "MASQUERADE" if isinstance(t, Masquerade) else "REDIRECT"]
        if t.ports is not None:
            lo, hi = t.ports
            toks += ["--to-ports", str(lo) if lo == hi else f"{lo}-{hi}"]
        if t.random:
            toks.append("--random")
        if getattr(t, "random_fully", False):
            toks.append("--random-fully")
        return toks
    if isinstance(t, Netmap):
        return ["-j", "NETMAP", "--to", str(t.to)]
    if isinstance(t, Tproxy):
        toks = ["-j", "TPROXY", "--on-port", str(t.on_port)]
        if t.on_ip is not None:
            toks += ["--on-ip", str(t.on_ip)]
        if t.mark or t.mask:
            toks += ["--tproxy-mark", _vm(t.mark, t.mask, full_mask_short=False)]
        return toks
    if isinstance(t, SetMark):
        toks = ["-j", t.kind]
        if t.value is not None and t.mask is not None:
            toks += ["--set-xmark", _vm(t.value, t.mask, full_mask_short=False)]
        return toks
    if isinstance(t, ConnmarkCopy):
        return ["-j", "CONNMARK", f"--{t.direction}-mark", "--nfmask", _hex(t.nfmask),
                "--ctmask", _hex(t.ctmask)]
    if isinstance(t, Notrack):
        return ["-j", "NOTRACK"] if t.spelling == "NOTRACK" else ["-j", "CT", "--notrack"]
    if isinstance(t, OtherTarget):
        toks = ["-j", t.target]
        for opt, args in t.options:
            toks += [opt, *args]
        return toks
    if isinstance(t, UnknownTarget):
        return ["-j", t.target, *t.raw]
    raise TypeError(f"cannot write target {type(t).__name__}")


def _render_target(t: Target) -> str:
    toks = target_args(t)
    canonical = set()
    if isinstance(t, OtherTarget):
        # strings iptables-save writes with xtables_save_string
        for k in range(1, len(toks)):
            if toks[k - 1] in ("--log-prefix", "--nflog-prefix", "--ulog-prefix", "--label",
                               "--comment"):
                canonical.add(k)
    return _render_tokens(toks, canonical)


# --------------------------------------------------------------------------- structure
def rule_to_save(rule: Rule, chain: str | None = None) -> str:
    """One ``-A CHAIN ...`` line (with ``[packets:bytes]`` first when the rule has counters)."""
    parts = []
    if rule.counters is not None:
        parts.append(f"[{rule.counters[0]}:{rule.counters[1]}]")
    parts += ["-A", quote(chain or rule.chain)]
    parts += _render_matches(rule.matches, rule)
    if rule.target is not None:
        parts.append(_render_target(rule.target))
    return " ".join(parts)


def _chain_decl(c: Chain) -> str:
    pol = (c.policy or "ACCEPT") if c.builtin else "-"
    pk, by = c.counters if c.counters is not None else (0, 0)
    return f":{c.name} {pol} [{pk}:{by}]"


def table_to_save(t: Table) -> list[str]:
    lines = [f"*{t.name}"]
    lines += [_chain_decl(c) for c in t.chains.values()]
    for c in t.chains.values():
        lines += [rule_to_save(r, c.name) for r in c.rules]
    lines.append("COMMIT")
    return lines


def to_save(ruleset: Ruleset, header: bool = True) -> str:
    """The ruleset as ``iptables-save`` (``ip6tables-save`` for family 6) text.

    >>> from analyzer.parse import load_ruleset
    >>> rs = load_ruleset(('*filter\\n-A INPUT -p tcp --dport 80 -j ACCEPT\\nCOMMIT\\n', 'x')).ruleset
    >>> print(to_save(rs, header=False))
    *filter
    :INPUT ACCEPT [0:0]
    :FORWARD ACCEPT [0:0]
    :OUTPUT ACCEPT [0:0]
    -A INPUT -p tcp -m tcp --dport 80 -j ACCEPT
    COMMIT
    <BLANKLINE>
    """
    prog = "ip6tables-save" if ruleset.family == 6 else "iptables-save"
    lines = [f"# Generated by {prog} format writer (synack)"] if header else []
    for t in ruleset.tables.values():
        lines += table_to_save(t)
    if header:
        lines.append("# Completed")
    return "\n".join(lines) + "\n"
