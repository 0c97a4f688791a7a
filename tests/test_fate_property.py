"""Property: open-flow explain grouped by fate (symbolic.explain_fate) tells the truth about
every packet of every group.

Random small rulesets whose nat PREROUTING uses every kind the set walk (netfilter/setwalk.py)
follows (addresses with prefixes and negation, iprange, ports, protocol, ``-i``, addrtype,
``-m mark`` after MARK, statistic, ``-m recent``, jumps, gotos, RETURN, ACCEPT, LOG, DNAT to one
address and port or to one address), with mangle/raw PREROUTING marks and drops, filter
FORWARD/INPUT rules (some on ``--ctstate DNAT``, the original destination and the mark) and nat POSTROUTING MASQUERADE/SNAT,
and now and then a rule the set walk refuses (then explain falls back to paths). For every
group, random packets drawn from it are walked concretely from the start and must end with the
group's fates (those of its witness); the groups must partition the flow's packets. Most
examples must be explained by fate (else this property tests little).
"""
from __future__ import annotations

import os
import random

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from analyzer.explain import explain_flow  # noqa: E402
from analyzer.netfilter.symbolic import flow_set, witness  # noqa: E402
from analyzer.parse import load_ruleset  # noqa: E402
from analyzer.parse.flow import parse_flow_spec  # noqa: E402
from analyzer.symbolic import _plain, explain_open, fate  # noqa: E402

from test_symbolic_property import _match, _namespace, neg  # noqa: E402

SAMPLES = 3  # random packets drawn from each group
EXAMPLES = int(os.environ.get("SYNACK_PROPERTY_EXAMPLES", "40"))

#: DNAT targets: addresses inside the flows' destinations (so that some packets are already
#: there), another subnet, the host's own address; with and without a port
DNAT_TO = ["10.0.1.5:8080", "10.0.1.5", "10.0.0.9:80", "10.0.1.3:80", "192.168.7.5:443", "10.0.0.1:22",
           "10.0.2.9", ":8080", "10.0.1.6:80 --random", "10.0.1.7 --persistent"]
PRE_MATCHES = ["addr", "addr", "iprange", "proto", "port", "multiport", "iif", "mark", "mark", "addrtype", "statistic",
               "statistic", "recent"]
FLOWS = ["tcp 10.0.0.0/24 -> 10.0.1.0/28", "tcp 10.0.0.0/25 -> 10.0.0.0/23:80", "udp 10.0.0.0/24 -> 10.0.1.0/29",
         "10.0.0.0/25 -> 10.0.1.0/28", "tcp 10.0.0.0/26 -> 10.0.1.0/29 mark 0x4000",
         "tcp 10.0.0.0/26 -> 10.0.1.0/29:80 mark 0x0/0xfffffff0", "icmp 10.0.0.0/24 -> 10.0.1.0/29",
         "0.0.0.0/0 -> 10.0.0.0/23"]


def _pre_match(kind: str, d) -> str:
    pick = d.draw
    if kind == "iif":
        return f"{pick(neg)}-i {pick(st.sampled_from(['eth0', 'eth+', 'eth1', 'wlan+']))}"
    if kind == "statistic":
        return f"-m statistic --mode random {pick(neg)}--probability {pick(st.sampled_from(['0.5', '0.25', '0.33333']))}"
    if kind == "recent":
        return f"-m recent {pick(neg)}{pick(st.sampled_from(['--set', '--rcheck --seconds 60', '--update']))} --name A"
    return _match(kind, d)


def _rules(d, chain: str, n: int, kinds: list, targets: list) -> list[str]:
    out = []
    for _ in range(n):
        ms = []
        for k in d.draw(st.lists(st.sampled_from(kinds), max_size=2)):
            m = _pre_match(k, d)
            if "-p " in m and any("-p " in x for x in ms):
                continue
            ms.append(m)
        out.append(" ".join(["-A", chain, *ms, d.draw(st.sampled_from(targets))]))
    return out


@st.composite
def fate_rulesets(draw):
    d = draw(st.data())
    marks = ["-j MARK --set-xmark 0x4000/0x4000", "-j MARK --set-xmark 0x1/0xffffffff", "-j MARK --xor-mark 0x11",
             "-j MARK --set-xmark 0x2/0x3"]
    lines = []
    if draw(st.booleans()):
        lines += ["*raw", ":PREROUTING ACCEPT [0:0]"]
        lines += _rules(d, "PREROUTING", draw(st.integers(0, 2)), ["addr", "port", "statistic", "iif"],
                        ["-j DROP", "-j ACCEPT", "-j LOG"])
        lines.append("COMMIT")
    if draw(st.booleans()):
        lines += ["*mangle", ":PREROUTING ACCEPT [0:0]"]
        user = draw(st.booleans())
        if user:  # a LOG-then-DROP chain (the shape of TUM's LOG_DROP)
            lines += [":LOG_DROP - [0:0]", "-A LOG_DROP -m limit --limit 5/min -j LOG --log-prefix drop",
                      "-A LOG_DROP -j DROP"]
        lines += _rules(d, "PREROUTING", draw(st.integers(0, 3)), ["addr", "port", "mark", "statistic", "proto"],
                        marks + ["-j DROP", "-j ACCEPT", "-j RETURN"] + (["-j LOG_DROP"] if user else []))
        lines.append("COMMIT")
    user = ["SVC", "SEP"][:draw(st.integers(0, 2))]
    lines += ["*nat", ":PREROUTING ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]", *(f":{u} - [0:0]" for u in user)]
    dnat = [f"-j DNAT --to-destination {a}" for a in DNAT_TO]
    # rules that change nothing (no target, LOG, whatever they match: the set walk skips them)
    common = dnat + dnat + marks + ["-j LOG", "-j ACCEPT", "-j RETURN", "", "-m limit --limit 5/min -j LOG",
                                    "-m hashlimit --hashlimit-above 10/sec --hashlimit-name h -j LOG"]
    for k, c in enumerate(["PREROUTING", *user]):
        callees = user[k:]  # a chain calls the ones after it: no loops
        jumps = [f"-j {u}" for u in callees] * 2 + [f"-g {u}" for u in callees]
        lines += _rules(d, c, draw(st.integers(1 if c != "PREROUTING" else 2, 5)), PRE_MATCHES, common + jumps)
    if draw(st.integers(0, 9)) == 0:  # now and then a rule the set walk refuses
        lines.append(draw(st.sampled_from(["-A PREROUTING -j DNAT --to-destination 10.0.1.5-10.0.1.7",
                                           "-A PREROUTING -m conntrack --ctstate NEW -j RETURN",
                                           "-A PREROUTING -p tcp -j REDIRECT --to-ports 3128"])))
    lines += _rules(d, "POSTROUTING", draw(st.integers(0, 2)), ["addr", "mark", "port"],
                    ["-j MASQUERADE", "-j SNAT --to-source 10.0.1.1", "-j RETURN"])
    if draw(st.booleans()):
        lines.append("-A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE")
    lines.append("COMMIT")
    lines += ["*filter", f":INPUT {draw(st.sampled_from(['ACCEPT', 'DROP']))} [0:0]",
              f":FORWARD {draw(st.sampled_from(['ACCEPT', 'ACCEPT', 'DROP']))} [0:0]"]
    fwd = ["addr", "port", "mark", "proto"]
    lines += _rules(d, "FORWARD", draw(st.integers(0, 3)), fwd,
                    ["-j ACCEPT", "-j DROP", "-j REJECT", "-m conntrack --ctstate DNAT -j ACCEPT",
                     "-m conntrack --ctstate DNAT -j DROP", "-m conntrack --ctorigdst 10.0.1.0/29 -j DROP",
                     "-m conntrack ! --ctorigdstport 80 -j REJECT"])
    lines += _rules(d, "INPUT", draw(st.integers(0, 2)), fwd, ["-j ACCEPT", "-j DROP", "-j REJECT"])
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def check_fates(text: str, flow: str, iif: str, seed: int, limit: int = 300) -> str:
    """Explain ``flow`` by fate; every group's random packets end as the group says. Returns how
    the packets were grouped ("fate", or "path" when the set walk did not apply)."""
    res = load_ruleset((text, "gen.rules"))
    hypothesis.assume(not res.errors)
    rs = res.ruleset
    ns = _namespace()
    spec = parse_flow_spec(flow, iif=iif)
    got = explain_open(rs, spec, ns, limit=limit, by="fate")
    if got.by != "fate":
        return got.by
    space = got.space
    universe = flow_set(space, spec)
    # the groups partition the flow's packets (with what the class limit left unexplained)
    seen = space.empty()
    for g in got.groups:
        assert not g.packets.is_empty()
        assert (seen & g.packets).is_empty(), "two groups share packets"
        seen = seen | g.packets
    assert (seen & got.rest).is_empty()
    assert seen | got.rest == universe
    rnd = random.Random(seed)
    for g in got.groups:
        want = {fate(o) for o in g.outcomes}
        for _ in range(SAMPLES):
            prefer = {f: rnd.getrandbits(space.widths[f]) for f in ("proto", "src", "dst", "sport", "dport", "mark")}
            v = g.packets.pick(prefer)
            pkt = _plain(witness(spec, v, space))
            have = {fate(o) for o in explain_flow(rs, pkt, ns)}
            assert have == want, (pkt.tuple_str(), g.witness.tuple_str(), sorted(have, key=repr),
                                  sorted(want, key=repr), g.approximate)
    return "fate"


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(text=fate_rulesets(), flow=st.sampled_from(FLOWS), iif=st.sampled_from(["eth0", "eth0", "eth1"]),
       seed=st.integers(0, 2**32 - 1), limit=st.sampled_from([300, 300, 300, 2, 5]))
def _fates_walk_like_their_random_packets(stats, text, flow, iif, seed, limit):
    stats[check_fates(text, flow, iif, seed, limit)] += 1


def test_fate_groups_walk_like_their_random_packets():
    stats = {"fate": 0, "path": 0}
    _fates_walk_like_their_random_packets(stats)
    # most examples must be explained by fate, else the property says little
    assert stats["fate"] > stats["path"], stats


# ------------------------------------------------------------------ the set walk itself

def check_exits(text: str, flow: str, iif: str, seed: int) -> str:
    """The PREROUTING hook walked over the flow's packets (setwalk.SetWalker) against the
    concrete walk of the same hook (walk.Walker.hook) on random packets of the flow: each
    concrete branch (one per statistic world) leaves as one of the exits its packet is in
    says (the packet after the hook, its mark, dropped or not, translated or not), and every
    exit its packet is in is taken by some branch, with no more probability than they have."""
    from analyzer.netfilter.setwalk import SetWalker, Unsupported
    from analyzer.netfilter.walk import Branch, Conntrack, Walker
    from analyzer.netfilter.symbolic import flow_space

    res = load_ruleset((text, "gen.rules"))
    hypothesis.assume(not res.errors)
    rs = res.ruleset
    ns = _namespace()
    spec = parse_flow_spec(flow, iif=iif)
    space = flow_space(rs, ns, spec)
    universe = flow_set(space, spec)
    mark = None if "mark" in spec.open else int(spec.template.mark or 0)
    w = Walker(rs, ns)
    try:
        exits = SetWalker(rs, ns, space, 4, iif, mark, w.backend).hook(universe, "PREROUTING", w.ct_in_use)
    except Unsupported:
        return "path"
    rnd = random.Random(seed)
    for _ in range(SAMPLES * 2):
        v = universe.pick({f: rnd.getrandbits(space.widths[f]) for f in ("proto", "src", "dst", "sport", "dport", "mark")})
        pkt = _plain(witness(spec, v, space))
        mine = [e for e in exits if not (e.before & _point(space, v, spec)).is_empty()]
        assert mine, pkt.tuple_str()
        brs = w.hook([Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport, in_use=w.ct_in_use))],
                     "PREROUTING")
        taken = set()
        mass = [0.0] * len(mine)  # the probability of the concrete branches each exit holds
        for br in brs:
            after = _point(space, {**v, "dst": int(br.pkt.dst), "dport": br.pkt.dport, "mark": br.pkt.mark}, spec,
                           with_mark=False)
            action = None if br.disposition is None else {"dropped": "DROP"}.get(br.disposition, br.disposition)
            hits = [k for k, e in enumerate(mine) if e.action == action and e.dnat == bool(br.ct.dnat)
                    and (e.mark is None or e.mark == br.pkt.mark) and not (e.image() & after).is_empty()]
            assert hits, (pkt.tuple_str(), br.pkt.tuple_str(), br.disposition, br.prob, hex(br.pkt.mark),
                          [(e.action, e.dnat, e.mark, e.prob, e.consts) for e in mine])
            taken.update(hits)
            for k in hits:  # None: the walk forked on a match it does not evaluate (-m limit)
                mass[k] += 1.0 if br.prob is None else br.prob
        assert taken == set(range(len(mine))), (pkt.tuple_str(), [(e.action, e.dnat, e.mark, e.prob) for e in mine])
        # Exit.prob is informative (a statistic jump to a chain that returns joins its two
        # worlds, a LOG rule's statistic is not split): never more than the concrete walk's
        # branches that leave that way, nor more than 1 in all
        assert all(e.prob <= m + 1e-9 for e, m in zip(mine, mass)), (pkt.tuple_str(), mass, [e.prob for e in mine])
        assert sum(e.prob for e in mine) <= 1 + 1e-9, [e.prob for e in mine]
    return "fate"


def _point(space, v: dict, spec, with_mark: bool = True):
    """The one packet of values ``v`` as a set, over the fields the flow's sets hold."""
    s = space.universe()
    for f in ("proto", "src", "dst", "sport", "dport"):
        if v.get(f) is not None and f in space.fields:
            s = s & space.eq(f, v[f])
    if with_mark and "mark" in spec.open:
        s = s & space.eq("mark", v["mark"])
    return s


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(text=fate_rulesets(), flow=st.sampled_from(FLOWS), iif=st.sampled_from(["eth0", "eth0", "eth1"]),
       seed=st.integers(0, 2**32 - 1))
def _exits_walk_like_the_hook(stats, text, flow, iif, seed):
    stats[check_exits(text, flow, iif, seed)] += 1


def test_set_walk_exits_are_the_concrete_hooks_ways():
    stats = {"fate": 0, "path": 0}
    _exits_walk_like_the_hook(stats)
    assert stats["fate"] > stats["path"], stats
