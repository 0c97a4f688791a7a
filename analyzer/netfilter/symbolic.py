"""Netfilter layer: a flow with open fields as an engine packet set, and the concolic witness
packets whose walks tell the engine which packets they stand for.

Every match the walk evaluates is compiled by running it: the witness's open fields are
concolic values (engine/concolic.py), so an address match, an ``iprange``, a port, protocol,
interface (``+`` wildcards), addrtype (the namespace's addresses), ipset member, conntrack
tuple or routing lookup notes exactly the packet set it tested. Targets are transformers of
those values: DNAT/SNAT/MASQUERADE/REDIRECT put constants in, NETMAP keeps the host bits
(`RecordingWalker`), MARK/CONNMARK keep an open mark's untouched bits open (a mark copied to or
from the connection's mark under masks is a several-field value, concolic.SymMix). The
packet's mark, its connection's mark and state, TCP flags and a local process's uid/gid may be
open too (`OPEN_INTS`). A match the walk
cannot evaluate forks it (APPROXIMATE, rule named, as for one packet); an operation the
recorder cannot express is reported as lost (APPROXIMATE, rule named).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

from analyzer.engine.concolic import SymInt, SymStr, active, is_sym, plain, sym_address
from analyzer.engine.packetset import IFACE_NONE, PacketSet, PacketSpace
from analyzer.model.packet import CT_INPUT, PORT_PROTOS, PROTO, Packet
from analyzer.model.rules import (
    AddrMatch, AddrTypeMatch, CommentMatch, IpRangeMatch, Netmap, PortMatch, ProtoMatch,
)
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.walk import _KUBE_SERVICE_RULE, Walker, disposition
from analyzer.netfilter.trace import Kind

#: protocols whose packets the walk builds differently (ports, ICMP type, TCP flags); all other
#: protocols look alike to it, so a class never mixes two of these or one of these and another
DISTINCT_PROTOS = (1, 6, 17, 58, 132)

_IFACE_WORDS = re.compile(r"(?:^|\s)(?:-i|-o|--in-interface|--out-interface|--physdev-in|--physdev-out)"
                          r"\s+(\S+)")


def interface_names(ruleset, ns: Namespace, extra=()) -> list[str]:
    """Every interface name and wildcard the rules or the namespace mention (read from the rule
    text, so a lazily parsed dump is not decoded): the engine interns them up front."""
    names = set(n for n in extra if n)
    names.update(ns.addrs)
    names.update(r.dev for r in ns.routes if r.dev)
    names.update(ns.bridged)
    names.update(ns.bridged.values())
    for rule in ruleset.rules():
        text = rule.text
        if "-i" not in text and "-o" not in text:  # (in every option _IFACE_WORDS reads)
            continue
        for m in _IFACE_WORDS.finditer(text):
            names.add(m.group(1).strip("'\""))
    names.discard("+")
    # names before wildcards; the engine has 254 ids: keep the namespace's own first
    own = [n for n in names if not n.endswith("+")]
    wild = sorted(n for n in names if n.endswith("+"))
    return sorted(own)[:200] + wild[:50]


def flow_space(ruleset, ns: Namespace, spec) -> PacketSpace:
    space = PacketSpace()
    for n in interface_names(ruleset, ns, [spec.template.iif, spec.iif]):
        try:
            space.declare_interfaces([n])
        except ValueError:
            break  # more names than ids: the rest fall under "other" (classes stay sound)
    return space


def flow_set(space: PacketSpace, spec, local: bool = False) -> PacketSet:
    """The packets ``spec`` stands for, over the fields the walk reads from its input."""
    t = spec.template
    s = space.family(t.family)
    c: dict = {}
    if "proto" not in spec.open:
        c["proto"] = t.proto
    for f in ("src", "dst"):
        if f not in spec.open:
            c[f] = t.src if f == "src" else t.dst
    if c:
        s &= space.where(**c)
    for f in ("src", "dst"):
        if f in spec.open:
            s &= space.union(space.range(f, lo, hi) for lo, hi in getattr(spec, f))
    ports_given = False
    for f in ("sport", "dport"):
        rs = getattr(spec, f) if f in spec.open else ((getattr(t, f), getattr(t, f)),) \
            if getattr(t, f) is not None and (t.proto in PORT_PROTOS or "proto" in spec.open) else ()
        if rs:
            ports_given = ports_given or f not in spec.open or bool(getattr(spec, f))
            s &= space.ports(f, list(rs))
    if "proto" in spec.open and ports_given:
        s &= space.ports("proto", [(p, p) for p in PORT_PROTOS])  # ports given: port protocols
    if "iif" in spec.open and not local:
        s &= space.iface("iif", spec.iif or "+")
    for f in ("mark", "connmark"):
        if f in spec.open:
            (v, m), = getattr(spec, f)
            given = space.masked(f, v, m)
            if f == "connmark":  # only an existing entry has a mark of its own: a new one's is 0
                given = (given & space.any_flag("ctstate", "ESTABLISHED,RELATED")) | \
                    (space.eq("connmark", 0) - space.any_flag("ctstate", "ESTABLISHED,RELATED"))
            s &= given
    if spec.ctstate or "connmark" in spec.open:  # the states the connmark constraint above met
        s &= space.union(space.eq("ctstate", CT_INPUT[n]) for n in spec.ctstate or ("NEW",))
    for f in ("uid", "gid", "tcp_flags"):
        if f in spec.open:
            s &= space.ports(f, list(getattr(spec, f)))
    return s


def proto_class(space: PacketSpace, proto: int) -> PacketSet:
    """The protocols the walk treats like ``proto`` before any rule looks at it."""
    if proto in DISTINCT_PROTOS:
        return space.eq("proto", proto)
    return space.universe() - space.ports("proto", [(p, p) for p in DISTINCT_PROTOS])


def witness(spec, v: dict, space: PacketSpace) -> Packet:
    """The concrete packet for picked values ``v``, its open fields concolic."""
    t = spec.template
    fam = t.family
    ch: dict = {}  # the changes to the template, made in one replace (a dataclass replace each is ~20 us)
    proto = t.proto
    if "proto" in spec.open:
        proto = v["proto"]
        ch.update(proto=SymInt(proto, "proto", 8), tcp_flags=t.tcp_flags if proto == 6 else 0,
                  icmp_type=(8 if fam == 4 else 128) if proto in (1, 58) else None,
                  icmp_code=0 if proto in (1, 58) else None)
    for f in ("src", "dst"):
        if f in spec.open:
            ch[f] = sym_address(v[f], f, fam)
    if int(proto) in PORT_PROTOS:
        for f in ("sport", "dport"):
            ch[f] = SymInt(v[f], f, 16) if f in spec.open else getattr(t, f)
    else:
        ch["sport"] = ch["dport"] = None
    if "iif" in spec.open and v["iif"] != IFACE_NONE:
        ch["iif"] = SymStr(space.iface_name(v["iif"]), "iif")
    sym = {f: SymInt(v[f], f, space.widths[f]) for f in OPEN_INTS if f in spec.open}
    if int(proto) != 6:
        sym.pop("tcp_flags", None)
    elif "tcp_flags" not in sym and "ctstate" in spec.open and not spec.tcp_flags:
        # flags not said: a connection's first SYN, or an ACK of an existing one (flow_flags_follow)
        sym["tcp_flags"] = 0x02 if v["ctstate"] == CT_INPUT["NEW"] else 0x10
    ch.update(sym)
    return replace(t, **ch) if ch else t


#: the integer fields a flow may leave open besides addresses and ports (engine field names,
#: which are also the Packet's)
OPEN_INTS = ("mark", "connmark", "ctstate", "uid", "gid", "tcp_flags")


def flow_flags_follow(spec, pkt) -> None:
    """When the flow leaves the conntrack state open and says no TCP flags, a witness's flags
    follow its state (SYN when it opens a connection, else ACK): note that decision, under
    the walk's recorder, so a class never mixes the two."""
    if "ctstate" in spec.open and not spec.tcp_flags and "tcp_flags" not in spec.open:
        _ = pkt.ctstate == CT_INPUT["NEW"]


class _NotingDict(dict):
    """A dict whose lookups by an open interface name compare it with every key, so that the
    recorder notes which names would have been found (a hash lookup decides silently)."""

    def _key(self, k):
        if isinstance(k, SymStr) and active() is not None:
            for key in self:
                if k == key:
                    return key, True
            return None, False
        return k, dict.__contains__(self, k)

    def __contains__(self, k):
        return self._key(k)[1]

    def get(self, k, default=None):
        key, hit = self._key(k)
        return dict.__getitem__(self, key) if hit else default

    def __getitem__(self, k):
        key, hit = self._key(k)
        if not hit:
            raise KeyError(k)
        return dict.__getitem__(self, key)


def _open_key(sym) -> tuple:
    """An open value as a memo key: its input field and how it derives from it, and its value."""
    return sym.field, sym.width, sym.keep, sym.xor, int.__int__(sym)


class _PlainOnlyCache(dict):
    """A memo that answers for an open value only inside the walk that computed the answer: a
    hit from another walk would skip the decisions that made it, so that walk's recorder would
    not note them; inside one walk (one recorder) they were noted when it was computed, and
    noting them again changes nothing."""

    _rec = None  # the recorder the open answers were computed under
    _open: dict = {}

    def _mine(self, k):
        """The open key of ``k`` when answers for it are valid now; None for a plain ``k``;
        False when an open ``k`` cannot be answered (no recorder, or another one)."""
        sym = is_sym(k)
        if sym is None:
            return None
        rec = active()
        return _open_key(sym) if rec is not None and rec is self._rec else False

    def get(self, k, default=None):
        key = self._mine(k)
        if key is None:
            return dict.get(self, k, default)
        return default if key is False else self._open.get(key, default)

    def __contains__(self, k):
        key = self._mine(k)
        return dict.__contains__(self, k) if key is None else key is not False and key in self._open

    def __setitem__(self, k, v):
        sym = is_sym(k)
        if sym is None:
            dict.__setitem__(self, k, v)
            return
        rec = active()
        if rec is None:
            return
        if rec is not self._rec:
            self._rec, self._open = rec, {}
        self._open[_open_key(sym)] = v


class _NotingAddresses(frozenset):
    """The namespace's own addresses (``Namespace.is_local``): asked about an open address,
    notes "the address is one of these" as one decision (a set lookup decides silently: a class
    of sources arriving from a link would hold this host's own address, which the kernel drops
    as a martian)."""

    def __contains__(self, a):
        sym = is_sym(a)
        rec = active()
        if sym is None or rec is None:
            return frozenset.__contains__(self, a)
        # inside one walk (one recorder) the decision was noted the first time it was asked
        d = self.__dict__
        if d.get("_rec") is not rec:
            d["_rec"], d["_answers"] = rec, {}
        key = _open_key(sym)
        hit = d["_answers"].get(key)
        if hit is not None:
            return hit
        d["_answers"][key] = hit = self._decide(sym, a.version, rec)
        return hit

    def _decide(self, sym, version: int, rec) -> bool:
        ints = self.__dict__.get("_ints")
        if ints is None:
            ints = self._ints = {v: frozenset(int(x) for x in self if x.version == v) for v in (4, 6)}
        mine = ints[version]
        hit = int.__int__(sym) in mine
        # the atom "one of these", shared by every walk of the exploration (rec's cache)
        key = ("one of", id(self), sym.field, sym.width, sym.keep, sym.xor)
        atom = rec._cache.get(key, False)
        if atom is False:
            atom = None
            for x in mine:
                one = rec.eq_atom(sym, x)
                if one is not None:
                    atom = one if atom is None else atom | one
            rec._cache[key] = atom
        rec.note(atom, hit)
        return hit


def noting_namespace(ns: Namespace) -> Namespace:
    """``ns`` whose per-interface tables note lookups by an open interface name, whose own
    addresses note membership tests of an open address, and whose route memo answers an open
    address only inside the walk that computed it."""
    return replace(ns, addrs=_NotingDict(ns.addrs), bridged=_NotingDict(ns.bridged),
                   _local=_NotingAddresses(a.ip for _, a in ns.local_addresses()),
                   _routes_by_dst=_PlainOnlyCache())


class RecordingWalker(Walker):
    """The walker under a recorder: names the rule in the recorder's lost reasons, and keeps
    NETMAP a transformer (the new address keeps the open host bits of the old one)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # rule label by id(rule), for the recorder's reasons (the walker holds the ruleset, so
        # its rules' ids stay theirs; hashing a frozen Rule costs ~10 us)
        labels: dict = {}

        def where(rule) -> str:
            try:
                return labels[id(rule)][1]
            except KeyError:
                labels[id(rule)] = (rule, f"{rule.label} (line {rule.span.line})")
                return labels[id(rule)][1]

        # (a function of the labels, not a method: the recorder keeps the last label it was
        # given, and a bound method would keep the walker, its namespace and the packet space
        # in a reference cycle that outlives the exploration, frozen by symbolic._cyclic_gc_paused)
        self._where = where

    #: `Walker._eval` tells the recorder which rule it evaluates (labelled only if a reason
    #: is lost: `_where`)
    _names_rules = True

    #: set by the fate exploration (symbolic.explain_fate): a table traversal the set walk
    #: follows is decided for all packets at once, one noted decision per way out (`_summary`)
    summaries = False

    def run_table(self, br, table: str, hook: str):
        if self.summaries:
            got = self._summary(br, table, hook)
            if got is not None:
                return got
        return super().run_table(br, table, hook)

    def _summary(self, br, table: str, hook: str):
        """A table traversal decided as a whole: the set walk (netfilter/setwalk.py) splits
        every packet of the family by how it leaves the table (accepted, dropped, rejected), the
        walk notes "the packet is in the witness's part" (one decision, however many rules
        tell the packets apart), and the witness itself is walked concretely for its trace.
        Packets that leave the same way are then one class, not one per rule crossed: what
        grouping by fate needs (a path signature would differ inside the class). Only for a
        packet whose header fields are the explored input fields or constants (then fixed in
        the sets and quantified out of the decision), with a fixed output interface; None when
        the walk must go rule by rule (setwalk.Unsupported, or the packet does not qualify)."""
        from analyzer.engine import concolic
        from analyzer.engine.concolic import Ghost
        from analyzer.netfilter.setwalk import SetWalker, Thread, Unsupported

        rec = active()
        if rec is None or rec.values is None or self.rs.chain(table, hook) is None:
            return None
        p = br.pkt
        pins = []
        for f in ("proto", "src", "dst", "sport", "dport"):
            v = getattr(p, f)
            sym = is_sym(v)
            if sym is None:
                if v is not None:
                    pins.append((f, v))
            elif type(sym) is not SymInt or isinstance(sym, Ghost) or sym.field != f \
                    or sym.keep != (1 << sym.width) - 1 or sym.xor:
                return None
        mark = p.mark
        msym = is_sym(mark)
        if msym is not None and (type(msym) is not SymInt or msym.field != "mark"
                                 or msym.keep != 0xFFFFFFFF or msym.xor):
            return None
        if isinstance(p.iif, SymStr) or isinstance(p.oif, SymStr):
            return None
        self._table = table
        ctstates = frozenset(self._ctstates(br))
        key = (table, hook, tuple(pins), None if msym is not None else int(mark), p.iif, p.oif, ctstates,
               p.family, br.reply, bool(br.ct.confirmed), p.tcp_flags, p.icmp_type, p.icmp_code)
        cache = self.__dict__.setdefault("_summaries", {})
        hit = cache.get(key)
        if hit is None or hit[0] is not rec.space:
            sp = rec.space
            try:
                flags, it, ic = p.tcp_flags, p.icmp_type, p.icmp_code
                sw = SetWalker(self.rs, self.ns, sp, p.family, p.iif, None if msym is not None else int(mark),
                               self.backend, oif=p.oif, ctstates=ctstates, effects=False,
                               tcp_flags=int(flags) if type(flags) is int else None,
                               icmp=(it, ic or 0) if type(it) is int and type(ic or 0) is int else None,
                               shared=self.__dict__.setdefault("_setwalk", {}))
                u = sp.family(p.family)
                for f, v in pins:
                    u = u & sp.eq(f, v)
                ways: dict = {}
                for t, action in sw.table(Thread(u, 1.0, sw.mark), table, hook):
                    ways[action] = ways[action] | t.packets if action in ways else t.packets
                fixed = [f for f, _ in pins]
                hit = (sp, {a: (s.exists(fixed) if fixed else s) for a, s in ways.items()}, sw.recent_assumed)
            except Unsupported:
                hit = (sp, None, False)
            cache[key] = hit
        ways = hit[1]
        if ways is None:
            return None
        action = next((a for a, s in ways.items() if s.contains_values(rec.values)), False)
        if action is False:
            return None  # the witness is in no part: cannot happen; walk rule by rule
        if hit[2]:
            self.recent_assumed = True
        rec.note(ways[action], True, large=True)
        saved, concolic._ACTIVE = concolic._ACTIVE, None  # the witness's own trace, nothing noted
        try:
            out = super().run_table(br, table, hook)
        finally:
            concolic._ACTIVE = saved
        want = disposition(action)
        if len(out) != 1 or out[0].disposition != want:
            rec.lose(f"internal: {table} {hook} ends the witness {[b.disposition for b in out]}, its part {want}")
        return out

    def _nat(self, rule, br, table: str, hook: str) -> str:
        t = rule.target
        if not isinstance(t, Netmap):
            return super()._nat(rule, br, table, hook)
        dst_side = hook in ("PREROUTING", "OUTPUT")
        p, ct = br.pkt, br.ct
        old = p.dst if dst_side else p.src
        new = _netmap(old, t.to)
        if dst_side:
            br.pkt = replace(p, dst=new)
            ct.dnat = ct.dnat or old not in t.to  # the tuple changes unless already mapped
            ct.reply_src, ct.reply_sport = new, br.pkt.dport
            self._step(br, rule, Kind.NETMAP, p, fact="dst")
        else:
            br.pkt = replace(p, src=new)
            ct.snat = ct.snat or old not in t.to
            ct.reply_dst, ct.reply_dport = new, p.sport
            self._step(br, rule, Kind.NETMAP, p, fact="src",
                       note="source port kept unless it clashes with another connection" if plain(p.sport) else None)
        return "NAT"


def _netmap(addr, to):
    """NETMAP: the prefix of ``to``, the host bits of ``addr`` (concolic when ``addr`` is)."""
    host, net = int(to.hostmask), int(to.network_address)
    sym = is_sym(addr)
    if sym is None:
        return ipaddress.ip_address(net | (int(addr) & host)) if addr.version == 4 else \
            ipaddress.IPv6Address(net | (int(addr) & host))
    value = net | (int.__int__(sym) & host)
    return sym_address(value, sym.field, addr.version, sym.keep & host, (sym.xor & host) | net)


# ------------------------------------------------------------------------------------------
# a big chain's bucketed rules as one set (the fan-out of kube-proxy's KUBE-SERVICES)

#: the header fields `header_set` reads; the walk never rewrites them inside one chain (a NAT
#: target ends the table)
HEADER_FIELDS = ("src", "dst", "sport", "dport", "proto")


def _addrtype_sets(space: PacketSpace, family: int, local: frozenset) -> dict:
    """The address types the walk's ``_addrtype`` gives, as sets of ``field``-less address
    prefixes per type (checked in its order: multicast, broadcast, local, unicast)."""
    mc = ipaddress.ip_network("224.0.0.0/4" if family == 4 else "ff00::/8")
    lo = ipaddress.ip_network("127.0.0.0/8" if family == 4 else "::1/128")
    bc = [ipaddress.ip_network("255.255.255.255/32")] if family == 4 else []
    return {"MULTICAST": [mc], "BROADCAST": bc, "LOOPBACK": [lo],
            "LOCAL": sorted(a for a in local if a.version == family)}


def _addrtype_set(space: PacketSpace, field: str, family: int, types, local: frozenset) -> PacketSet:
    nets = _addrtype_sets(space, family, local)

    def one(kind):
        return space.union(space.prefix(field, n) for n in nets[kind]) if kind != "LOCAL" else \
            space.union(space.eq(field, a) for a in nets["LOCAL"])
    mc, bc = one("MULTICAST"), one("BROADCAST")
    loc = (one("LOOPBACK") | one("LOCAL")) - mc - bc
    uni = space.family(family) - mc - bc - loc
    by = {"MULTICAST": mc, "BROADCAST": bc, "LOCAL": loc, "UNICAST": uni | loc}
    return space.union(by[t] for t in types if t in by)


def header_set(rule, space: PacketSpace, family: int, ns: Namespace | None = None) -> tuple[PacketSet, frozenset]:
    r"""The packets ``rule``'s header matches (addresses, iprange, protocol, ports, comments)
    let through, as the walk's ``_match`` decides them for a packet of ``family``, and the
    fields that set reads; with the namespace ``ns`` (addresses known) ``-m addrtype`` too.
    Other matches are left out: the set is then a superset of the packets the rule matches,
    which is all `none_of_bucketed` needs.

    >>> from analyzer.parse import load_ruleset
    >>> rs = load_ruleset(("*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -d 10.96.0.1/32 -p tcp "
    ...                    "-m tcp --dport 443 -m mark --mark 0x1 -j DROP\nCOMMIT\n", "x")).ruleset
    >>> sp = PacketSpace()
    >>> s, read = header_set(rs.chain("filter", "FORWARD").rules[0], sp, 4)
    >>> s == sp.where(dst="10.96.0.1/32", proto=6, dport=443), sorted(read)
    (True, ['dport', 'dst', 'proto'])
    """
    quick = _header_where(rule, space, family)
    if quick is not None:
        return quick
    out = space.family(family)
    read: set = set()
    ports: dict = {}
    for m in rule.matches:
        got = match_header(m, space, family, ns, ports)
        if got is not None:
            out = out & got[0]
            read |= got[1]
    return out, frozenset(read)


def match_header(m, space: PacketSpace, family: int, ns: Namespace | None = None, cache: dict | None = None):
    """One header match of `header_set` (negation included) as ``(set, fields read)``, or None
    for a match that is not a header match (or addrtype without the namespace's addresses).
    ``cache`` keeps the set of packets that have ports between calls."""
    if isinstance(m, CommentMatch):
        return None
    neg = m.negated
    if isinstance(m, AddrMatch):
        nets = [n for n in m.networks if n.version == family]
        hit = space.union(space.prefix(m.direction, n) for n in nets)
        read = (m.direction,)
    elif isinstance(m, IpRangeMatch):
        field = "src" if m.direction == "src" else "dst"
        hit = space.range(field, m.lo, m.hi) if m.lo.version == family else space.empty()
        read = (field,)
    elif isinstance(m, ProtoMatch):
        hit = space.universe() if m.number == 0 else space.eq("proto", m.number)
        read = ("proto",)
    elif isinstance(m, AddrTypeMatch):
        if ns is None or not ns.known:
            return None  # an address of unknown type: the walk forks, the set stays a superset
        hit = _addrtype_set(space, m.direction, family, m.types, _local_addresses(ns))
        read = (m.direction,)
    elif isinstance(m, PortMatch):
        # no ports (a protocol without them): never matches, negated or not; a module named
        # after a protocol (-m tcp) tests it first, also under '!'
        cache = {} if cache is None else cache
        base = cache.get("has")
        if base is None:
            base = cache["has"] = space.ports("proto", [(p, p) for p in PORT_PROTOS])
        if m.mod in ("tcp", "udp", "sctp") and m.mod in PROTO:
            base = base & space.eq("proto", PROTO[m.mod])
        if m.direction == "any":
            inr = space.ports("sport", m.ranges) | space.ports("dport", m.ranges)
            read = ("sport", "dport", "proto")
        else:
            f = "sport" if m.direction == "src" else "dport"
            inr = space.ports(f, m.ranges)
            read = (f, "proto")
        return base & (~inr if neg else inr), frozenset(read)
    else:
        return None  # not a header match: the set stays a superset
    return (~hit if neg else hit), frozenset(read)


def _header_where(rule, space: PacketSpace, family: int):
    """`header_set` in one `PacketSpace.where` for the common shape (positive one-network
    addresses, a protocol, one port range under -m tcp/udp/sctp, comments, nothing else):
    kube-proxy's `-d IP/32 -p tcp -m tcp --dport N`. None for any other shape."""
    c: dict = {}
    for m in rule.matches:
        if isinstance(m, CommentMatch):
            continue
        if m.negated:
            return None
        if isinstance(m, AddrMatch):
            if len(m.networks) != 1 or m.networks[0].version != family or m.direction in c:
                return None
            c[m.direction] = m.networks[0]
        elif isinstance(m, ProtoMatch):
            if m.number == 0 or c.get("proto", m.number) != m.number:
                return None
            c["proto"] = m.number
        elif isinstance(m, PortMatch):
            f = {"src": "sport", "dst": "dport"}.get(m.direction)
            if f is None or f in c or len(m.ranges) != 1 or m.mod not in ("tcp", "udp", "sctp") \
                    or c.get("proto", PROTO[m.mod]) != PROTO[m.mod]:
                return None
            c["proto"] = PROTO[m.mod]  # a port protocol: the packet has ports
            c[f] = tuple(m.ranges[0])
        else:
            return None
    s = space.where(**c)
    if "src" not in c and "dst" not in c:
        s = s & space.family(family)
    return s, frozenset(c)


#: the header fields of a kube-proxy service rule
_SERVICE_FIELDS = frozenset(("dst", "proto", "dport"))


def _text_header(rule, space: PacketSpace, family: int, by_port: dict):
    """`header_set` of a still undecoded kube-proxy service rule (``-d IP/32 -p P -m comment
    --comment C -m P --dport N -j T``, walk._KUBE_SERVICE_RULE without ``! -s``), read from its
    text: the union of a big chain's header sets must not decode its 12,000 rules (~0.4 s) for
    a flow that meets a few of them. ``by_port`` keeps each (protocol, port)'s set, onto which
    the address is pinned. None for any other rule (the caller decodes it).
    tests/test_symbolic.py compares it with `header_set` on every rule of the corpus and of a
    kube-proxy dump."""
    if family != 4 or rule.pending is None:
        return None
    text = rule.text
    m = _KUBE_SERVICE_RULE.match(text)
    if m is None or "! -s" in text:
        return None
    port = int(m.group(3))
    if port > 65535:
        return None
    try:
        addr = ipaddress.IPv4Address(m.group(1))
    except ValueError:
        return None
    proto = PROTO[m.group(2)]
    base = by_port.get((proto, port))
    if base is None:
        base = by_port[(proto, port)] = space.where(proto=proto, dport=(port, port))
    return base.and_eq("dst", addr), _SERVICE_FIELDS


def _local_addresses(ns: Namespace) -> frozenset:
    return frozenset(a.ip for _, a in ns.local_addresses())


def none_of_bucketed(index, rec, pkt, rules, ns: Namespace | None = None) -> bool:
    """Whether the walk may skip every bucketed rule of the big chain ``index`` (rules keyed
    by ``-d ADDR/32`` or ``--dport N``) for the open packet ``pkt``: true when the witness
    matches none of them, and then noted as one decision, "the packet is in none of the rules'
    header sets", instead of "the destination is this bucket's address". A class then covers
    every destination that meets no bucketed rule (ICMP to any ClusterIP, a port no service
    has), not one class per address. False (nothing noted) when the witness is in one of the
    sets or the fields the sets read are not the explored input fields (then the bucket is
    noted as before)."""
    values = rec.values
    if values is None or not (index.by_dst or index.by_dport):
        return False
    cache = index.__dict__.setdefault("_open_sets", {})
    key = (rec.family, None if ns is None or not ns.known else _local_addresses(ns))
    hit = cache.get(key)
    if hit is None or hit[0] is not rec.space:
        sp = rec.space
        keyed = sorted({i for d in (index.by_dst, index.by_dport) for b in d.values() for i in b})
        union = sp.empty()
        read: set = set()
        sets = {}
        by_port: dict = {}
        for i in keyed:
            s, r = _text_header(rules[i], sp, rec.family, by_port) or header_set(rules[i], sp, rec.family, ns)
            sets[i] = s
            union = union | s
            read |= r
        hit = cache[key] = (sp, union, frozenset(read), sets)
    _, union, read, sets = hit
    for f in read:
        v = getattr(pkt, f)
        sym = is_sym(v)
        if sym is not None:
            if sym.field != f or sym.keep != (1 << sym.width) - 1 or sym.xor:
                return False  # rewritten, or another input field: the sets are not over it
        elif v is None:
            if f == "proto" or values["proto"] in PORT_PROTOS:
                return False
            # a protocol without ports: every packet of the class has none (explored per protocol)
        elif rec.fixed.get(f) != (int(v) if f in ("src", "dst") else v):
            return False  # a constant the walk put in: the input field may differ
    # whether the witness is in the union: only the rules of its own buckets can hold it (a
    # rule keyed by -d K/32 or --dport N holds only packets to K or N), and their sets are
    # small, where a path through the union of thousands of rules costs ~0.1 ms
    mk = ipaddress.IPv4Address if rec.family == 4 else ipaddress.IPv6Address
    for i in (*index.by_dst.get(mk(values["dst"]), ()), *index.by_dport.get(values["dport"], ())):
        if sets[i].contains_values(values):
            return False
    rec.note(union, False, large=True)
    return True
