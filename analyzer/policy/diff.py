"""Policy layer: which flows change fate between two dumps or two environments.

Rule identity is (table, chain, text without counters): rules that moved to other lines or whose
counters changed are not changes, rules whose order within their chain changed are. The packet
space worth asking about is what the changed rules can see: the union over changed rules of the
rule's own header matches AND the space of every jump path into its chain. Only that space is
explored (adapter.explore over both targets at once), so a one-service change of a
10,000-service dump costs the rules of that service, not the dump.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from analyzer.engine.packetset import PacketSpace
from analyzer.model.rules import Jump
from analyzer.parse.options import PROTOCOLS
from analyzer.policy.adapter import (
    DumpTarget, EnvTarget, FlowClass, TargetError, decoded_proto, explore, match_set,
)
from analyzer.policy.spec import FlowSel
from analyzer.source import Span

_COUNTERS = re.compile(r"^\[\d+:\d+\]\s*|\s-c\s+\d+\s+\d+(?=\s|$)")
_INSERT = re.compile(r"^-I (\S+) (?:\d+ )?")
_JUMP = re.compile(r"\s-[jg]\s+(\S+)")
BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
LOCAL_ROOTS = ("OUTPUT",)
ARRIVAL_ROOTS = ("PREROUTING", "INPUT", "FORWARD", "POSTROUTING")


def identity(rule) -> str:
    """A rule's text without counters and with single spaces.

    >>> identity(type("R", (), {"text": "[3:4] -A X -p tcp  -c 1 2 -j ACCEPT"})())
    '-A X -p tcp -j ACCEPT'
    >>> identity(type("R", (), {"text": "-I X 1 -p tcp -j ACCEPT"})())
    '-A X -p tcp -j ACCEPT'
    """
    t = rule.text
    if t.startswith("[") or " -c " in t:
        t = _COUNTERS.sub(" ", t)
    t = " ".join(t.split()) if "  " in t or t != t.strip() else t
    if t.startswith("-I "):  # '-I CHAIN [n]' (a --noflush payload) is the same rule as '-A CHAIN'
        t = _INSERT.sub(r"-A \1 ", t)
    return t


@dataclass
class RuleChange:
    side: str                   # "old" | "new"
    table: str
    chain: str
    rule: object                # analyzer.model.rules.Rule (None: the chain's policy)
    span: Span | None
    text: str


@dataclass
class Change:
    kind: str                   # newly-blocked | newly-allowed | translated-elsewhere | now-asymmetric | ...
    cls: FlowClass
    old: str
    new: str
    old_rules: list = field(default_factory=list)   # (Span, text) responsible in OLD
    new_rules: list = field(default_factory=list)
    entry: str = ""


@dataclass
class DiffResult:
    changes: list[Change]
    rule_changes: list[RuleChange]
    complete: bool
    classes: int
    entries: list[str]
    env_changes: list[str] = field(default_factory=list)   # environments: what changed besides rules


def env_changes(old_env, new_env) -> list[str]:
    """What differs between two environments besides their rules: namespaces, addresses,
    routes, sysctls, listeners, links.

    >>> env_changes(type("E", (), {"namespaces": {}, "segments": []})(), type("E", (), {"namespaces": {}, "segments": []})())
    []
    """
    out = []
    a, b = old_env.namespaces, new_env.namespaces
    for n in sorted(set(a) - set(b)):
        out.append(f"namespace '{n}' removed")
    for n in sorted(set(b) - set(a)):
        out.append(f"namespace '{n}' added")
    for n in sorted(set(a) & set(b)):
        x, y = a[n], b[n]
        facts = {
            "addresses": lambda s: sorted(f"{ad}@{i}" for i, ad in s.net.local_addresses()),
            "routes": lambda s: sorted(r.render() for r in s.net.routes),
            "sysctls": lambda s: sorted(f"{k}={v}" for k, v in s.net.sysctls.items()),
            "listeners": lambda s: sorted(f"{l.proto}/{l.port}" + (f" ({l.name})" if l.name else "")
                                          + (f" proxy_to {l.proxy_to}" if l.proxy_to else "") for l in s.listeners),
        }
        for what, f in facts.items():
            fx, fy = f(x), f(y)
            if fx != fy:
                gone = [v for v in fx if v not in fy]
                came = [v for v in fy if v not in fx]
                out.append(f"'{n}' {what}: " + ", ".join([f"-{v}" for v in gone] + [f"+{v}" for v in came]))
    seg = lambda e: sorted(f"{s.name}:{sorted(s.members)}:{s.bridge_ns}:{s.hairpin}" for s in e.segments)  # noqa: E731
    if seg(old_env) != seg(new_env):
        out.append("links changed")
    return out


def _chains(rs):
    for t in rs.tables.values():
        for c in t.chains.values():
            yield t.name, c


def _key(rule, family: int) -> tuple:
    """(destination, protocol number, destination port) ``rule`` pins down, None for any: two
    rules whose keys differ in a pinned field never match the same packet. Destination and port
    are the walker's own big-chain key (`walk.chain_index_key`: a single positive ``-d A/32``,
    a single positive ``--dport N``, however spelled); the protocol a positive ``-p`` other than
    ``all``. A lazily parsed rule is read from its text when it has kube-proxy's service shape
    and not decoded for its protocol otherwise (then None: wider, which is safe).

    >>> from analyzer.parse import load_ruleset
    >>> rs = load_ruleset([("*filter\\n:X - [0:0]\\n"
    ...     "-A X -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j ACCEPT\\n"
    ...     "-A X ! -d 10.0.0.1/32 -j DROP\\n"
    ...     '-A X -p udp -m comment --comment "was -d 10.0.0.9 --dport 22" -j DROP\\n'
    ...     "-A X --destination 10.0.0.1 -p 6 -m tcp --destination-port 22:22 -j DROP\\n"
    ...     '-A X -d 10.0.0.1/32 -p all -j LOG --log-prefix "-d 10.0.0.2 "\\nCOMMIT\\n', "x")]).ruleset
    >>> [_key(r, 4) for r in rs.chain("filter", "X").rules]  # doctest: +NORMALIZE_WHITESPACE
    [(IPv4Address('10.96.0.10'), 6, 53), (None, None, None), (None, 17, None),
     (IPv4Address('10.0.0.1'), 6, 22), (IPv4Address('10.0.0.1'), None, None)]
    """
    from analyzer.netfilter.walk import _KUBE_SERVICE_RULE, chain_index_key

    dst, port = chain_index_key(rule, family)
    if rule.pending is not None:  # read from the text: still undecoded
        m = _KUBE_SERVICE_RULE.match(rule.text)
        return dst, (PROTOCOLS[m.group(2)] if m else None), port
    return dst, decoded_proto(rule), port


def _compatible(a: tuple, b: tuple) -> bool:
    return all(x is None or y is None or x == y for x, y in zip(a, b))


def _reordered(ra: list[str], rb: list[str], rules_a: list, family: int) -> tuple[set, set]:
    """Indices (old side, new side) of common rules whose order relative to a rule they can
    overlap with changed: only those can change a packet's fate by moving. kube-proxy writes
    KUBE-SERVICES in Go map order, different at every sync; its rules pin distinct
    destination/port pairs, so the shuffle is no change. ``rules_a``: the old side's rules
    (``ra`` are their identities), read for what each pins (`_key`)."""
    from collections import Counter, defaultdict

    def occ(seq):
        seen, out = Counter(), []
        for t in seq:
            out.append((t, seen[t]))
            seen[t] += 1
        return out
    oa, ob = occ(ra), occ(rb)
    pos_b = {x: j for j, x in enumerate(ob)}
    common = [(i, x) for i, x in enumerate(oa) if x in pos_b]
    in_a = set(oa)
    if [x for _, x in common] == [x for x in ob if x in in_a]:
        return set(), set()
    # rules off the longest common order moved (LCS of two orders of the same items: the
    # longest increasing run of new positions, O(n log n)); compare each with what it may overlap
    seq = [x for _, x in common]
    stay = _lis_items(seq, [pos_b[x] for x in seq])
    pos_a = {x: i for i, x in enumerate(oa)}
    keys = {x: _key(rules_a[i], family) for i, x in common}
    sem = {x: _COMMENT.sub("", x[0]) for _, x in common}
    by_dst, by_port, wild_dst, wild_port = defaultdict(list), defaultdict(list), [], []
    for _, x in common:
        d, p, port = keys[x]
        (by_dst[d] if d else wild_dst).append(x)
        (by_port[(p, port)] if port else wild_port).append(x)
    old_idx, new_idx = set(), set()
    for _, m in common:
        if m in stay:
            continue
        d, p, port = keys[m]
        cands = by_dst[d] + wild_dst if d else (by_port[(p, port)] + wild_port if port else [x for _, x in common])
        for x in cands:
            if x == m or not _compatible(keys[m], keys[x]) or sem[m] == sem[x]:
                continue  # disjoint, or the same rule but for its comment: order is moot
            if (pos_a[m] < pos_a[x]) != (pos_b[m] < pos_b[x]):
                old_idx.update((pos_a[m], pos_a[x]))
                new_idx.update((pos_b[m], pos_b[x]))
    return old_idx, new_idx


def _lis_items(items: list, keys: list[int]) -> set:
    """The items of a longest strictly increasing subsequence of ``keys``.

    >>> sorted(_lis_items("abcd", [2, 0, 1, 3]))
    ['b', 'c', 'd']
    """
    import bisect
    tails, tail_idx, prev = [], [], [-1] * len(keys)
    for i, k in enumerate(keys):
        j = bisect.bisect_left(tails, k)
        if j == len(tails):
            tails.append(k)
            tail_idx.append(i)
        else:
            tails[j], tail_idx[j] = k, i
        prev[i] = tail_idx[j - 1] if j else -1
    out, i = set(), tail_idx[-1] if tail_idx else -1
    while i >= 0:
        out.add(items[i])
        i = prev[i]
    return out


_COMMENT = re.compile(r'\s-m comment --comment (?:"(?:[^"\\]|\\.)*"|\S+)')


def changed_rules(old_rs, new_rs) -> list[RuleChange]:
    """Rules present on one side only, chain by chain, by identity; rules present on both sides
    that changed order relative to a rule they can overlap with (a move only in the file, or
    past rules that never match the same packet, is no change); a chain whose policy changed."""
    from collections import Counter

    out = []
    old_c = {(t, c.name): c for t, c in _chains(old_rs)}
    new_c = {(t, c.name): c for t, c in _chains(new_rs)}
    for key in sorted(set(old_c) | set(new_c)):
        a, b = old_c.get(key), new_c.get(key)
        if a is not None and b is not None and a.policy == b.policy and len(a.rules) == len(b.rules) \
                and all(x.text == y.text for x, y in zip(a.rules, b.rules)):
            continue
        ra = [identity(r) for r in a.rules] if a else []
        rb = [identity(r) for r in b.rules] if b else []
        if a is not None and b is not None and a.policy != b.policy:
            out.append(RuleChange("old", key[0], key[1], None, a.span, f"policy {a.policy}"))
            out.append(RuleChange("new", key[0], key[1], None, b.span, f"policy {b.policy}"))
        if ra == rb:
            continue
        ca, cb = Counter(ra), Counter(rb)
        gone, came = ca - cb, cb - ca
        seen: Counter = Counter()
        for i, t in enumerate(ra):
            seen[t] += 1
            if seen[t] > ca[t] - gone[t]:
                out.append(RuleChange("old", key[0], key[1], a.rules[i], a.rules[i].span, t))
        seen = Counter()
        for j, t in enumerate(rb):
            seen[t] += 1
            if seen[t] > cb[t] - came[t]:
                out.append(RuleChange("new", key[0], key[1], b.rules[j], b.rules[j].span, t))
        if a is None or b is None:  # a chain on one side only: nothing moved
            continue
        oi, ni = _reordered(ra, rb, a.rules, old_rs.family)
        for i in sorted(oi):
            out.append(RuleChange("old", key[0], key[1], a.rules[i], a.rules[i].span, ra[i]))
        for j in sorted(ni):
            out.append(RuleChange("new", key[0], key[1], b.rules[j], b.rules[j].span, rb[j]))
    return out


class _Reach:
    """The packets that can reach each chain of one ruleset: builtin chains see every packet of
    their hooks, a user chain what its callers' jump rules pass (the rules before a jump are
    ignored: an over-approximation, which only costs classes that then show no change)."""

    def __init__(self, space, rs):
        self.space, self.rs = space, rs
        self.memo: dict = {}
        self._callers: dict = {}
        self._blob: dict = {}

    def callers(self, table, chain) -> list:
        """Rules of ``table`` that jump or go to ``chain`` (found in the rules' text: one scan of
        a joined text per query instead of decoding every rule's target)."""
        key = (table, chain)
        hit = self._callers.get(key)
        if hit is not None:
            return hit
        import bisect
        blob = self._blob.get(table)
        if blob is None:
            rules = [r for c in self.rs.tables[table].chains.values() for r in c.rules]
            starts, pos = [], 0
            for r in rules:
                starts.append(pos)
                pos += len(r.text) + 1
            blob = self._blob[table] = ("\n".join(r.text for r in rules) + "\n", starts, rules)
        text, starts, rules = blob
        out, seen = [], set()
        name = re.escape(chain)
        fast = re.compile(r"\s-[jg] " + name + r"(?=\s|$)")
        # every rule that names the chain as a word; one written '-j CHAIN' is a caller (or
        # names it in a comment: then the reach is wider, which is safe), any other spelling
        # (--jump, --goto, quoted) is decided by its decoded target
        for m in re.finditer(name, text):  # a literal: scanned fast; the word boundaries below
            a, b = m.start(), m.end()
            if a and text[a - 1] in "\"'":
                a -= 1
            if b < len(text) and text[b] in "\"'":
                b += 1
            if not (text[a - 1:a].isspace() and text[b:b + 1].isspace()):
                continue
            i = bisect.bisect_right(starts, m.start()) - 1
            r = rules[i]
            if i in seen or r.chain == chain:
                continue
            seen.add(i)
            if fast.search(r.text) or (isinstance(r.target, Jump) and r.target.chain == chain):
                out.append(r)
        self._callers[key] = out
        return out

    def roots(self, table, chain, seen=None) -> set:
        """Builtin chains a chain is reached from."""
        if chain in BUILTIN:
            return {chain}
        seen = seen or set()
        if (table, chain) in seen:
            return set()
        seen.add((table, chain))
        out = set()
        for r in self.callers(table, chain):
            out |= self.roots(table, r.chain, seen)
        return out

    def space_of(self, table, chain, depth=0):
        key = (table, chain)
        if key in self.memo:
            return self.memo[key]
        sp = self.space
        if chain in BUILTIN or depth > 32:
            s = sp.universe()
        else:
            self.memo[key] = sp.empty()  # a jump cycle adds nothing
            s = sp.empty()
            for r in self.callers(table, chain):
                s |= self.space_of(table, r.chain, depth + 1) & match_set(sp, r)
        self.memo[key] = s
        return s


def _kind(old_ends, new_ends) -> str:
    o_reach = any(e.reached for e in old_ends)
    n_reach = any(e.reached for e in new_ends)
    if o_reach and not n_reach:
        return "newly-blocked"
    if n_reach and not o_reach:
        return "newly-allowed"
    o_dst = {(str(e.address), e.port, e.namespace, e.listener) for e in old_ends if e.reached}
    n_dst = {(str(e.address), e.port, e.namespace, e.listener) for e in new_ends if e.reached}
    if o_dst != n_dst:
        o_tr = any(e.translated for e in old_ends if e.reached)
        n_tr = any(e.translated for e in new_ends if e.reached)
        if n_tr and not o_tr:
            return "newly-translated"
        if o_tr and not n_tr:
            return "no-longer-translated"
        return "translated-elsewhere"
    o_sym = any(e.symmetric is False for e in old_ends)
    n_sym = any(e.symmetric is False for e in new_ends)
    if n_sym and not o_sym:
        return "now-asymmetric"
    if o_sym and not n_sym:
        return "now-symmetric"
    return "changed"


def _responsible(fate, changed_lines: set, kind: str = "") -> list:
    """Rules on the witness's path that changed, else the rule that decided (for a change in
    symmetry: the translation whose reply is or is not reversed)."""
    out = [(Span(p, l, 1, 2), w) for w, p, l in fate.rules if (p, l) in changed_lines]
    if out:
        return out
    if kind in ("now-asymmetric", "now-symmetric") and fate.translation is not None:
        return [(fate.translation, "translated here")]
    if fate.decisive is not None:
        return [(fate.decisive, "decided here")]
    return []


def diff_dumps(old: DumpTarget, new: DumpTarget, limit: int = 256, iif: str | None = None) -> DiffResult:
    space = PacketSpace()
    rchanges = changed_rules(old.ruleset, new.ruleset)
    if not rchanges:
        return DiffResult([], [], True, 0, [])
    reach = {"old": _Reach(space, old.ruleset), "new": _Reach(space, new.ruleset)}
    seen = space.empty()
    roots = set()
    seeds = {}
    for rc in rchanges:
        r = reach[rc.side]
        s = r.space_of(rc.table, rc.chain)
        if rc.rule is not None:
            s &= match_set(space, rc.rule)
        seen |= s
        seeds[s.node] = s
        roots |= r.roots(rc.table, rc.chain)
    fam = space.family(old.ruleset.family)
    seen &= fam
    entries = []
    if roots & set(ARRIVAL_ROOTS):
        entries.append(FlowSel(iif=iif))
    if roots & set(LOCAL_ROOTS):
        entries.append(FlowSel(local=True))
    changed_lines = {"old": set(), "new": set()}
    for rc in rchanges:
        if rc.span is not None:
            changed_lines[rc.side].add((rc.span.path, rc.span.line))
    changes, complete, n = [], True, 0
    labels = []
    for sel in entries:
        label = "generated locally" if sel.local else (f"arriving on {sel.iif}" if sel.iif else "arriving")
        labels.append(label)
        u = seen
        local_src = [a.ip for _, a in old.ns.local_addresses() if a.version == old.ruleset.family]
        if sel.local and local_src:  # a local process sends from an address of the namespace
            u = seen & space.union(space.eq("src", a) for a in local_src)
        ex = explore([old, new], sel, universe=u, space=space, limit=limit, family=old.ruleset.family,
                     seeds=[x for x in seeds.values() if not x.is_full()])
        complete = complete and ex.complete
        n += len(ex.classes)
        differ = [c for c in ex.classes if c.fates[0].signature() != c.fates[1].signature()]
        ex.classes = differ
        for c in ex.merged(lambda c: (c.fates[0].signature(), c.fates[1].signature())):
            fo, fn = c.fates
            k = _kind(fo.ends, fn.ends)
            changes.append(Change(k, c, fo.summary(), fn.summary(), _responsible(fo, changed_lines["old"], k),
                                  _responsible(fn, changed_lines["new"], k), label))
    return DiffResult(changes, rchanges, complete, n, labels)


def diff_envs(old: EnvTarget, new: EnvTarget, limit: int = 256) -> DiffResult:
    """Environments: flows from every namespace to every listener and translated destination of
    either environment (the destinations lint --env follows), compared end to end."""
    from analyzer.checks.reply import listen_ports, service_destinations

    space = PacketSpace()
    rchanges = []
    for name in sorted(set(old.env.namespaces) | set(new.env.namespaces)):
        a, b = old.env.namespaces.get(name), new.env.namespaces.get(name)
        for attr in ("ruleset", "ruleset6"):
            ra, rb = getattr(a, attr, None), getattr(b, attr, None)
            if ra is not None or rb is not None:
                from analyzer.model.rules import Ruleset
                fam = 4 if attr == "ruleset" else 6
                rchanges += changed_rules(ra or Ruleset(fam, {}, ()), rb or Ruleset(fam, {}, ()))
    dests = set()
    for t in (old, new):
        ports = listen_ports(t.env)
        for name, spec in t.env.namespaces.items():
            for (addr, proto, port), _ in service_destinations(spec, None, ports):
                dests.add((addr, proto, port))
            for l in spec.listeners:
                for _, a in spec.net.local_addresses():
                    if not a.ip.is_loopback:
                        dests.add((a.ip, {"tcp": 6, "udp": 17, "sctp": 132}.get(l.proto, 6), l.port))
    changes, complete, n, labels = [], True, 0, []
    starts = [s for s in old.env.namespaces if s in new.env.namespaces]
    changed_lines = {"old": set(), "new": set()}
    for rc in rchanges:
        if rc.span is not None:
            changed_lines[rc.side].add((rc.span.path, rc.span.line))
    for start in starts:
        for addr, proto, port in sorted(dests, key=lambda d: (str(d[0]), d[1], d[2])):
            sel = FlowSel(start=start, protos=(proto,), dst=(__import__("ipaddress").ip_network(addr),),
                          dport=((port, port),))
            try:
                ex = explore([old, new], sel, space=space, limit=limit)
            except TargetError:
                continue
            complete = complete and ex.complete
            n += len(ex.classes)
            ex.classes = [c for c in ex.classes if c.fates[0].signature() != c.fates[1].signature()]
            for c in ex.merged(lambda c: (c.fates[0].signature(), c.fates[1].signature())):
                fo, fn = c.fates
                k = _kind(fo.ends, fn.ends)
                changes.append(Change(k, c, fo.summary(), fn.summary(), _responsible(fo, changed_lines["old"], k),
                                      _responsible(fn, changed_lines["new"], k), f"from '{start}'"))
        labels.append(f"from '{start}'")
    return DiffResult(changes, rchanges, complete, n, labels, env_changes(old.env, new.env))
