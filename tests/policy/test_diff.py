"""synack diff: flows that change fate between two dumps or two environments."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from analyzer.cli import main

REPO = Path(__file__).resolve().parents[2]
ENV = REPO / "samples" / "env"
KP = ENV / "kubeproxy-node.rules"

SIMPLE = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -d 10.0.0.5/32 -p tcp -m tcp --dport 22 -j DROP
-A FORWARD -d 10.0.0.0/24 -p tcp -j ACCEPT
COMMIT
"""


def _diff(capsys, old, new, *extra):
    rc = main(["diff", str(old), str(new), "-o", "json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def _swapped(tmp_path, base: str):
    """old.rules with ``base``, new.rules with its rules 1 and 2 of FORWARD (lines 5 and 6) swapped."""
    old, new = tmp_path / "old.rules", tmp_path / "new.rules"
    old.write_text(base)
    lines = base.splitlines()
    lines[4], lines[5] = lines[5], lines[4]
    new.write_text("\n".join(lines) + "\n")
    return old, new


def test_identical_rules_moved_lines_and_counters_are_no_change(tmp_path, capsys):
    text = KP.read_text()
    nat, filt = text.split("*filter")
    moved = "# a comment line that shifts every rule\n*filter" + filt.replace("[0:0]", "[7:420]") + \
        nat.replace("-A KUBE-MARK-MASQ -j MARK", "[3:180] -A KUBE-MARK-MASQ -j MARK")
    p = tmp_path / "moved.rules"
    p.write_text(moved)
    rc, doc = _diff(capsys, KP, p)
    assert rc == 0 and doc["rule_changes"] == [] and doc["changes"] == []


def test_removed_hairpin_masquerade_is_now_asymmetric(capsys):
    rc, doc = _diff(capsys, KP, ENV / "kubeproxy-node-no-hairpin-masq.rules", "--addr", "10.244.0.1/24@cni0")
    assert rc == 1
    assert {c["kind"] for c in doc["changes"]} == {"now-asymmetric"}
    ch = doc["changes"][0]
    assert ch["packets"] == "tcp 10.244.0.5 -> 10.96.0.10:80"  # only the endpoint calling itself
    assert ch["old"]["rules"][0]["span"]["line"] == 20   # the hairpin MASQ rule that is gone
    assert doc["schema_version"] == "1.0"


def test_reordered_overlapping_rules_change_fate(tmp_path, capsys):
    rc, doc = _diff(capsys, *_swapped(tmp_path, SIMPLE))  # ACCEPT now shadows the DROP of port 22
    assert rc == 1
    (ch,) = doc["changes"]
    assert ch["kind"] == "newly-allowed" and ch["packets"] == "tcp any -> 10.0.0.5:22"
    assert ch["witness"].endswith("-> 10.0.0.5:22")


def test_reordered_disjoint_rules_are_no_change(tmp_path, capsys):
    base = SIMPLE.replace("-A FORWARD -d 10.0.0.0/24 -p tcp -j ACCEPT",
                          "-A FORWARD -d 10.0.0.6/32 -p tcp -m tcp --dport 80 -j ACCEPT")
    rc, doc = _diff(capsys, *_swapped(tmp_path, base))
    assert rc == 0 and doc["rule_changes"] == []


@pytest.mark.parametrize("proto", ["all", "6", "TCP"])
def test_reordered_rules_overlap_whatever_the_protocol_is_called(tmp_path, capsys, proto):
    """`-p all` matches tcp, and `-p 6` is `-p tcp`: the DROP of port 22 moved behind an ACCEPT
    of the same address written so is a change (it was taken for disjoint rules)."""
    base = SIMPLE.replace("-A FORWARD -d 10.0.0.0/24 -p tcp -j ACCEPT",
                          f"-A FORWARD -d 10.0.0.5/32 -p {proto} -j ACCEPT")
    rc, doc = _diff(capsys, *_swapped(tmp_path, base))
    assert rc == 1
    (ch,) = doc["changes"]
    assert ch["kind"] == "newly-allowed" and ch["packets"] == "tcp any -> 10.0.0.5:22"


@pytest.mark.parametrize("jump", ["--jump CHK", "--goto CHK", "-g CHK", '-j "CHK"'])
def test_a_change_in_a_chain_reached_by_any_spelling_of_the_jump(tmp_path, capsys, jump):
    """The chain's callers were found by ' -j CHAIN' in the text: a chain reached by
    '--jump CHAIN' had no callers, its packets were none, and removing its DROP was 'No flow
    changes fate' (exit 0)."""
    old, new = tmp_path / "old.rules", tmp_path / "new.rules"
    head = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:CHK - [0:0]\n"
    old.write_text(head + f"-A FORWARD {jump}\n-A CHK -p tcp -m tcp --dport 22 -j DROP\nCOMMIT\n")
    new.write_text(head + f"-A FORWARD {jump}\nCOMMIT\n")
    rc, doc = _diff(capsys, old, new)
    assert rc == 1
    (ch,) = doc["changes"]
    assert ch["kind"] == "newly-allowed" and ch["packets"] == "tcp any -> any:22"


def test_policy_change_newly_blocked_text_and_sarif(tmp_path, capsys):
    old, new = tmp_path / "old.rules", tmp_path / "new.rules"
    old.write_text(SIMPLE.replace(":FORWARD DROP", ":FORWARD ACCEPT"))
    new.write_text(SIMPLE)
    assert main(["diff", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "newly blocked" in out and "witness:" in out
    assert main(["diff", str(old), str(new), "-o", "sarif"]) == 1
    sarif = json.loads(capsys.readouterr().out)
    res = sarif["runs"][0]["results"]
    assert res and all(r["ruleId"] == "diff/newly-blocked" for r in res)
    assert sarif["runs"][0]["properties"]["schema_version"] == "1.0"


def test_environments_fixed_hairpin_is_now_symmetric(capsys):
    rc, doc = _diff(capsys, ENV / "seed1-broken.yaml", ENV / "seed1-fixed-masquerade.yaml")
    assert rc == 1
    kinds = {(c["kind"], c["entry"]) for c in doc["changes"]}
    assert ("now-symmetric", "from 'client'") in kinds


def test_mixed_inputs_and_unreadable_exit_2(tmp_path, capsys):
    assert main(["diff", str(KP), str(ENV / "seed1-broken.yaml")]) == 2
    assert main(["diff", str(KP), str(tmp_path / "missing.rules")]) == 2


def test_kube_proxy_syncs_name_exactly_the_changed_services(tmp_path, capsys):
    """The benchmark's scenario at 300 services: one service added, one endpoint removed."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_diff import expected_flows, named_flows, two_syncs
    old, new, added, shrink = two_syncs(300)
    po, pn = tmp_path / "a.rules", tmp_path / "b.rules"
    po.write_text(old)
    pn.write_text(new)
    rc, doc = _diff(capsys, po, pn, "--addr", "10.244.0.1/24@cni0", "--route", "default via 192.168.0.1 dev eth0",
                    "--addr", "192.168.0.10/24@eth0")
    assert rc == 1
    assert named_flows(doc) == expected_flows(added, shrink)
    kinds = {c["kind"] for c in doc["changes"]}
    assert kinds == {"newly-translated", "translated-elsewhere"}


def test_environment_changes_besides_rules_are_named(capsys):
    rc, doc = _diff(capsys, ENV / "seed2-app-down.yaml", ENV / "seed2-app-up.yaml")
    assert rc == 1 and doc["rule_changes"] == []
    assert doc["environment_changes"] == ["'pod' listeners: +tcp/8080 (app)"]
    assert {c["kind"] for c in doc["changes"]} == {"newly-allowed"}
    rc, doc = _diff(capsys, ENV / "seed1-broken.yaml", ENV / "seed1-fixed-br-netfilter.yaml")
    (ch,) = doc["changes"]
    assert ch["kind"] == "now-symmetric" and ch["old"]["rules"][0]["step"] == "translated here"
    assert ch["old"]["rules"][0]["span"]["line"] == 11   # the DNAT whose reply was not reversed


def test_both_families_of_one_dump_are_compared(tmp_path, capsys):
    half = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A FORWARD -d {} -p tcp -m tcp --dport 80 -j {}\nCOMMIT\n"
    old, new = tmp_path / "old.rules", tmp_path / "new.rules"
    old.write_text(half.format("10.0.0.5/32", "ACCEPT") + half.format("fd00::5/128", "ACCEPT"))
    new.write_text(half.format("10.0.0.5/32", "ACCEPT") + half.format("fd00::5/128", "DROP"))
    rc, doc = _diff(capsys, old, new, "--addr", "fd00::1/64@eth1")
    assert rc == 1
    (ch,) = doc["changes"]
    assert ch["kind"] == "newly-blocked" and ch["packets"] == "tcp any -> fd00::5:80"


CORPUS = next((p for p in (REPO.parent / "shared" / "corpus", Path("/work/shared/corpus")) if p.is_dir()), None)


@pytest.mark.skipif(CORPUS is None, reason="corpus absent")
def test_every_corpus_dump_diffs_empty_against_itself(capsys):
    """A dump compared with itself changes nothing (exit 0; 2 only for input with no rule): every
    25th corpus file here, all 582 in docs/policy.md's run."""
    files = sorted(p for p in (CORPUS / "iptables").rglob("*") if p.is_file()
                   and not p.name.endswith((".md", ".json", ".jsonl", ".gitattributes")))
    for f in files[::25]:
        rc = main(["diff", str(f), str(f), "-o", "json"])
        out = capsys.readouterr().out
        assert rc in (0, 2), f
        if rc == 0:
            assert json.loads(out)["changes"] == [], f
