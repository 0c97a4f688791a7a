"""kube-proxy family (KUB): behaviour beyond the bad/good samples."""
from __future__ import annotations

import ipaddress
import random
import sys
from pathlib import Path

from analyzer.checks import CheckContext, run_checks
from analyzer.checks._paths import first_packet, node_namespace
from analyzer.netfilter.walk import Packet, Walker
from analyzer.parse import load_ruleset

ROOT = Path(__file__).resolve().parents[2]
GOOD = (ROOT / "samples" / "checks" / "KUB002" / "good.rules").read_text()


def lint(text: str, code: str):
    res = load_ruleset((text, "t.rules"))
    return [d for d in run_checks(CheckContext(res.ruleset, res.files), select=[code])]


def test_conditional_last_endpoint_leaves_a_share_untranslated():
    text = GOOD.replace('-m comment --comment "default/web:http -> 10.244.2.7:8080" -j',
                        '-m comment --comment "default/web:http -> 10.244.2.7:8080" -m statistic '
                        '--mode random --probability 0.50000000000 -j')
    [d] = lint(text, "KUB002")
    assert "16.7% match no endpoint rule" in d.message


def test_two_endpoints_written_by_kube_proxy_are_fair():
    assert lint(GOOD, "KUB002") == []


def test_share_of_connections_lost_is_reported():
    # the first endpoint's port is dropped by a host rule: a third of connections fail
    text = GOOD.replace("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
                        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP") \
        .replace('-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
                 '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n'
                 '-A OUTPUT -d 10.244.1.5/32 -j REJECT')
    [d] = lint(text, "KUB001")
    assert "rejected by filter:OUTPUT:rule:2" in d.message and "(33% of new connections)" in d.message


def test_no_masquerade_jump_is_reported():
    text = GOOD.replace('-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING\n', "")
    [d] = lint(text, "KUB003")
    assert "the nat table has no MASQUERADE rule" not in d.message and "no MASQUERADE rule is reached" in d.message


class _UnindexedWalker(Walker):
    """Every rule of every chain, in order: the reference the big-chain index must agree with."""

    def _rules_for(self, table, chain, pkt):
        c = self.rs.chain(table, chain)
        return (None, ()) if c is None else (c, range(len(c.rules)))


def _outcomes(w, rs, pkt, ns, local):
    return sorted((b.disposition, tuple(s.where for s in b.steps)) for b in first_packet(rs, pkt, ns, local, walker=w))


def test_indexed_walker_agrees_with_the_walker_on_random_packets():
    """The port/address index only skips rules that cannot match: same outcomes, same steps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gen_kubeproxy import generate

    text = generate(60, seed=3)  # KUBE-SERVICES, KUBE-NODEPORTS, ... long enough to be indexed
    rs = load_ruleset((text, "t.rules")).ruleset
    ns = node_namespace(4)
    rnd = random.Random(7)
    dsts = sorted({str(m.networks[0].network_address) for r in rs.rules() for m in r.matches
                   if type(m).__name__ == "AddrMatch" and m.direction == "dst" and not m.negated
                   and m.networks[0].num_addresses == 1})
    ports = sorted({lo for r in rs.rules() for m in r.matches if type(m).__name__ == "PortMatch"
                    for lo, _ in m.ranges})
    assert len(dsts) > 40 and len(ports) > 20
    for _ in range(300):
        proto = rnd.choice([6, 17])
        pkt = Packet(4, proto, ipaddress.ip_address(rnd.choice(["10.244.1.5", "203.0.113.7", "192.0.2.1"])),
                     ipaddress.ip_address(rnd.choice(dsts + ["192.0.2.1"])),
                     40000, rnd.choice(ports + [1]), iif=rnd.choice([None, "eth0"]))
        local = pkt.iif is None
        assert _outcomes(Walker(rs, ns), rs, pkt, ns, local) == \
            _outcomes(_UnindexedWalker(rs, ns), rs, pkt, ns, local)
