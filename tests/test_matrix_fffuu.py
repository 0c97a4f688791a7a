"""synack matrix against fffuu's own published answers (tests/data/fffuu/: its test suite's
golden outputs for the TUM firewall, the Synology NAS and the SQRL Shorewall dump, reduced to
partition, edges and spoofing certification by tools/fffuu_reference.py; provenance inside).

- ``--fffuu`` (ifaces="abstract") must give fffuu's partition and edges exactly.
- The default (interfaces exact) may only drop edges fffuu has (fffuu over-approximates), and
  every edge it drops on the TUM dump is confirmed by concrete walks: no input/output interface
  pair that respects the assignment gets that packet accepted.
- The spoofing check certifies exactly the interfaces fffuu certifies.
"""
from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import pytest

from analyzer.matrix import compiler, service_matrix, spoofing_check
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.walk import Branch, Conntrack, Packet, Walker
from analyzer.parse import load_ruleset
from analyzer.parse.ipassmt import generic, parse_ipassmt

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "fffuu"
CORPUS = Path(os.environ.get("SYNACK_CORPUS", ROOT.parent / "shared" / "corpus")) / "iptables" / "iptables-semantics"
REFS = sorted(DATA.glob("*.json"))


def _load(ref_path):
    ref = json.loads(ref_path.read_text())
    dump = CORPUS / ref["dump"]
    if not dump.exists():
        pytest.skip(f"corpus dump {ref['dump']} not present (set SYNACK_CORPUS)")
    rs = load_ruleset((dump.read_text(), str(dump))).ruleset
    ia = parse_ipassmt((DATA / ref["ipassmt"]).read_text(), ref["ipassmt"]) if ref["ipassmt"] else None
    return ref, rs, ia


_CACHE: dict = {}


def loaded(ref_path):
    if ref_path not in _CACHE:
        _CACHE[ref_path] = _load(ref_path)
    return _CACHE[ref_path]


def ours(m):
    return ({c.name: [[int(lo), int(hi)] for lo, hi in c.ranges] for c in m.sources}, m.edges)


def as_sets(classes, edges):
    key = {name: tuple(map(tuple, rs)) for name, rs in classes.items()}
    return set(key.values()), {(key[a], key[b]) for a, b in edges}


@pytest.mark.parametrize("ref_path", REFS, ids=lambda p: p.stem)
def test_fffuu_mode_gives_fffuus_partition_and_edges(ref_path):
    ref, rs, ia = loaded(ref_path)
    comp = compiler(rs, ia or generic(rs.family))
    for port, want in ref["matrices"].items():
        m = service_matrix(rs, ref["chain"], int(port), ipassmt=ia, sport=want["sport"],
                           ifaces="abstract", table=ref["table"], comp=comp)
        assert as_sets(*ours(m)) == as_sets(want["classes"], want["edges"]), port


def _cls(classes, a):
    return next(k for k, rs in classes.items() if any(lo <= a <= hi for lo, hi in rs))


def _cuts(*partitions):
    cuts = set()
    for classes in partitions:
        for rs in classes.values():
            for lo, hi in rs:
                cuts.update((lo, hi + 1))
    return sorted(c for c in cuts if c < 2 ** 32)


def _walk_accepts(rs, chain, src, dst, dport, iif, oif):
    pkt = Packet(4, 6, ipaddress.ip_address(src), ipaddress.ip_address(dst), 10000, dport,
                 iif=iif, oif=oif)
    br = Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport))
    return any(o.disposition is None for o in Walker(rs, Namespace()).run_table(br, "filter", chain))


@pytest.mark.parametrize("ref_path", REFS, ids=lambda p: p.stem)
def test_exact_mode_only_drops_fffuu_edges_that_no_interface_pair_accepts(ref_path):
    ref, rs, ia = loaded(ref_path)
    if ref["table"] != "filter":
        pytest.skip("the concrete walk here runs filter chains")
    assmt = ia or generic(rs.family)
    names = sorted({n for n, _ in assmt.ifaces} | {m.name for r in rs.rules() for m in r.matches
                                                    if type(m).__name__ == "IfaceMatch" and "+" not in m.name})
    comp = compiler(rs, assmt)
    for port, want in ref["matrices"].items():
        m = service_matrix(rs, ref["chain"], int(port), ipassmt=ia, comp=comp)
        mine, medges = ours(m)
        fedges = {tuple(e) for e in want["edges"]}
        cuts = _cuts(mine, want["classes"])
        # one representative per cell of the common refinement of both partitions
        reps = [(c, _cls(mine, c), _cls(want["classes"], c)) for c in cuts]
        dropped = set()
        for s, ms, fs in reps:
            for d, md, fd in reps:
                if (ms, md) in set(medges):
                    assert (fs, fd) in fedges, f"port {port}: {s}->{d} is ours only"
                elif (fs, fd) in fedges:
                    dropped.add((ms, md, s, d))
        # who is right: walk one packet per dropped class pair over every interface pair
        seen = set()
        for ms, md, s, d in sorted(dropped):
            if (ms, md) in seen:
                continue
            seen.add((ms, md))
            iifs = [n for n in names if any(lo <= s <= hi for lo, hi in assmt.get(n) or ())]
            iifs += [n for n in names if assmt.get(n) is None] + ["unnamed0"]
            for iif in iifs:
                for oif in names + ["unnamed1"]:
                    assert not _walk_accepts(rs, ref["chain"], s, d, int(port), iif, oif), (
                        f"port {port}: {ipaddress.ip_address(s)} -> {ipaddress.ip_address(d)} "
                        f"via {iif}->{oif} is accepted by a concrete walk but not in our matrix")


@pytest.mark.parametrize("ref_path", [p for p in REFS if json.loads(p.read_text())["ipassmt"]],
                         ids=lambda p: p.stem)
def test_spoofing_check_certifies_what_fffuu_certifies(ref_path):
    ref, rs, ia = loaded(ref_path)
    s = spoofing_check(rs, ref["chain"], ia, table=ref["table"])
    assert {i.name: not i.spoofed for i in s.ifaces} == ref["spoofing_certified"]
    for i in s.ifaces:
        if i.spoofed:  # the witness is a spoofed packet on that interface
            assert i.witness.iif == i.name
            assert not any(lo <= int(i.witness.src) <= hi for lo, hi in i.assigned)
