"""The adapter's class split is sound: every packet of a class has its witness's fate (checked
by walking random members of each class concretely), including through a big chain the walker
looks up by destination (kube-proxy's KUBE-SERVICES shape)."""
from __future__ import annotations

import random

import pytest

from analyzer.engine.packetset import PacketSpace
from analyzer.parse import load_ruleset
from analyzer.policy.adapter import DumpTarget, explore, make_namespace, witness_packet
from analyzer.policy.spec import flow_selector


def _dump(seed: int, tcp: str = "tcp") -> str:
    """``tcp``: how the port-bucketed rules name the protocol (iptables takes ``6`` too)."""
    rng = random.Random(seed)
    rules = []
    for i in range(40):  # > 32 rules: the walker indexes the chain by destination
        port = rng.choice([80, 443, 8080])
        verdict = rng.choice(["DROP", "ACCEPT", "RETURN"])
        rules.append(f"-A BIG -d 10.0.0.{i * 3 + 1}/32 -p tcp -m tcp --dport {port} -j {verdict}")
    rules.append("-A BIG -s 10.1.0.0/16 -p tcp -m tcp --dport 1000:2000 -j DROP")
    for port in rng.sample(range(2000, 3000), 4):  # no destination: bucketed by port (walk.ChainIndex)
        rules.append(f'-A BIG -p {tcp} -m comment --comment "was --dport {port + 1}" -m tcp --dport {port} -j DROP')
    return "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                      ":BIG - [0:0]", "-A FORWARD -d 10.0.0.0/24 -j BIG",
                      "-A FORWARD -d 10.0.0.64/26 -p udp -j REJECT", *rules, "COMMIT", ""])


@pytest.mark.parametrize("tcp", ["tcp", "6"])
def test_every_member_of_a_class_has_the_witness_fate(tcp):
    for seed in range(3):
        res = load_ruleset([(_dump(seed, tcp), f"big{seed}.rules")])
        ns = make_namespace(["10.0.0.254/24@eth1", "10.1.0.254/16@eth0"])
        t = DumpTarget(res.ruleset, ns, "big")
        sel = flow_selector({"iif": "eth0", "proto": ["tcp", "udp"], "src": "10.0.0.0/8",
                             "dst": "10.0.0.0/24", "dport": "1-3000"})
        space = PacketSpace()
        ex = explore([t], sel, space=space)
        assert ex.complete and 3 < len(ex.classes) < 256
        rng = random.Random(seed)
        for c in ex.classes:
            want = c.fates[0].signature()
            for _ in range(4):
                prefer = {f: rng.getrandbits(w) for f, w in (("src", 32), ("dst", 32), ("sport", 16), ("dport", 16))}
                v = c.packets.pick(prefer=prefer)
                pkt = witness_packet(v, 4)
                got, _ = t.walk(pkt, sel)
                assert got.signature() == want, (c.text, c.witness.tuple_str(), pkt.tuple_str())


def test_a_dst_cidr_over_a_big_chain_splits_per_matching_destination_only():
    res = load_ruleset([(_dump(0), "big.rules")])
    t = DumpTarget(res.ruleset, make_namespace(["10.0.0.254/24@eth1"]), "big")
    # port 22 is pinned by no rule of the big chain: no destination is peeled off; the /24 splits
    # only at the host's own address (routing: local delivery)
    ex = explore([t], flow_selector({"iif": "eth0", "proto": "tcp", "dst": "10.0.0.0/24", "dport": 22}))
    assert sorted(c.text for c in ex.classes) == ["tcp any -> 10.0.0.0/25,10.0.0.128/26,10.0.0.192/27,"
                                                  "10.0.0.224/28,10.0.0.240/29,10.0.0.248/30,... (8 ranges):22",
                                                  "tcp any -> 10.0.0.254:22"]


def test_rules_the_walker_buckets_however_they_are_spelled_split_the_classes():
    """The walker's big-chain index buckets `--destination A --destination-port N` and
    `--dport N:N` as it buckets `-d A --dport N`; the classes must split there too (the
    adapter read the buckets from the rule text with its own patterns, missed these spellings,
    and put 10.0.0.77:22, which the chain drops, in a class whose witness is forwarded)."""
    rules = [f"-A BIG -d 10.0.0.{i}/32 -p tcp -m tcp --dport 80 -j ACCEPT" for i in range(1, 40)]
    rules += ["-A BIG --destination 10.0.0.77/32 --protocol tcp -m tcp --destination-port 22 -j DROP",
              "-A BIG -p tcp -m tcp --dport 2222:2222 -j DROP"]
    text = "\n".join(["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                      ":BIG - [0:0]", "-A FORWARD -j BIG", *rules, "COMMIT", ""])
    t = DumpTarget(load_ruleset([(text, "spelled.rules")]).ruleset,
                   make_namespace(["10.0.0.254/24@eth1", "10.1.0.254/16@eth0"]), "spelled")
    rng = random.Random(7)
    for dst, dport in (("10.0.0.0/24", 22), ("10.0.0.77", "2000-3000")):
        sel = flow_selector({"iif": "eth0", "proto": "tcp", "src": "10.1.0.0/16", "dst": dst, "dport": dport})
        ex = explore([t], sel, space=PacketSpace())
        assert ex.complete
        dropped = set()
        for c in ex.classes:
            want = c.fates[0].signature()
            probes = [{"dst": 0x0A00004D, "dport": 22}, {"dst": 0x0A00004D, "dport": 2222}]
            probes += [{"dst": rng.getrandbits(32), "dport": rng.getrandbits(16)} for _ in range(6)]
            for prefer in probes:
                pkt = witness_packet(c.packets.pick(prefer=prefer), 4)
                got, _ = t.walk(pkt, sel)
                assert got.signature() == want, (c.text, c.witness.tuple_str(), pkt.tuple_str())
            if want[0][0] == "dropped":
                dropped.add(c.text)
        assert dropped == {"tcp 10.1.0.0/16 -> 10.0.0.77:22" if dport == 22 else "tcp 10.1.0.0/16 -> 10.0.0.77:2222"}


def test_a_policy_flow_from_a_namespace_gets_the_kernels_source(tmp_path):
    """`from: client` with no `src:`: the source the client's kernel picks (RFC 6724), not its
    first listed address: fe80::c listed first would send a global destination a link-local
    source, which no kernel does (lint --env's flows pick the same, tests/kernel/test_source_address_kernel.py)."""
    from analyzer.parse.envfile import load_environment
    from analyzer.policy.adapter import EnvTarget

    (tmp_path / "empty.rules").write_text("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
    (tmp_path / "env.yaml").write_text(
        "namespaces:\n  client:\n    ip6tables: empty.rules\n"
        "    addresses: [fe80::c/64@eth0, 2001:db8:1::2/64@eth0]\n"
        "    routes: ['default via 2001:db8:1::1 dev eth0']\n")
    t = EnvTarget(load_environment(str(tmp_path / "env.yaml")), "env")
    for dst, want in (("2001:db8:2::3", "2001:db8:1::2"), ("fe80::1", "fe80::c")):
        sel = flow_selector({"from": "client", "proto": "tcp", "dst": dst, "dport": 80})
        assert str(t.default_src(sel, 6)) == want
