"""synack check: policies of assertions against dumps and environments (docs/policy.md)."""
from __future__ import annotations

import json
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from analyzer.cli import main
from analyzer.policy.adapter import load_target
from analyzer.policy.evaluate import evaluate
from analyzer.policy.spec import PolicyError, load_policy

REPO = Path(__file__).resolve().parents[2]
POL = REPO / "samples" / "policies"
ENV = REPO / "samples" / "env"
CORPUS = next((p for p in (REPO.parent / "shared" / "corpus", Path("/work/shared/corpus")) if p.is_dir()), None)

# (policy, input, expected status of every assertion): the seed samples agree with the kernel
# tests (tests/kernel/test_crosshost_kernel.py): seed1-broken resets, both fixes connect; seed2
# splits the connection when the app is down
CASES = [
    ("seed1-hairpin.yaml", ENV / "seed1-broken.yaml",
     {"vip-reaches-backend": "pass", "vip-replies-translated": "fail", "vip-backends": "pass",
      "no-bypassed-replies": "fail", "other-ports-closed": "pass", "same-as-masquerade-fix": "fail"}),
    ("seed1-hairpin.yaml", ENV / "seed1-fixed-masquerade.yaml", "all-pass"),
    ("seed1-hairpin.yaml", ENV / "seed1-fixed-br-netfilter.yaml", "all-pass"),
    ("seed2-sidecar.yaml", ENV / "seed2-app-down.yaml",
     {"app-reachable-through-sidecar": "fail", "no-split-connections": "fail", "replies-translated": "pass"}),
    ("seed2-sidecar.yaml", ENV / "seed2-app-up.yaml", "all-pass"),
    ("kubeproxy-node.yaml", ENV / "kubeproxy-node.rules", "all-pass"),
    ("kubeproxy-node.yaml", POL / "kubeproxy-node-any-port.rules",
     {"clusterip-to-endpoint": "pass", "clusterip-forwarded-to-pod": "pass", "hairpin-masqueraded": "pass",
      "other-service-ports-not-translated": "fail", "structure": "pass"}),
    # kernel-verified per endpoint (test_crosshost_kernel: kubeproxy-three-endpoints): pod-b's
    # third of the connections is reset, the others connect
    ("kubeproxy-three-endpoints.yaml", ENV / "kubeproxy-three-endpoints.yaml",
     {"web-reached": "pass", "equal-shares": "pass", "replies-translated": "fail"}),
    ("kubeproxy-shares.yaml", ENV / "kubeproxy-three-endpoints-node1.rules", "all-pass"),
    ("kubeproxy-shares.yaml", POL / "kubeproxy-stale-probability.rules", {"equal-shares": "fail"}),
    ("kubeproxy-unchanged.yaml", ENV / "kubeproxy-node.rules", "all-pass"),
    ("kubeproxy-unchanged.yaml", ENV / "kubeproxy-node-no-hairpin-masq.rules", {"clusterip-unchanged": "fail"}),
    ("kubeproxy-node.yaml", ENV / "kubeproxy-node-no-hairpin-masq.rules",
     {"clusterip-to-endpoint": "pass", "clusterip-forwarded-to-pod": "pass", "hairpin-masqueraded": "fail",
      "other-service-ports-not-translated": "pass", "structure": "pass"}),
]


def _statuses(policy: Path, target: Path) -> dict:
    pol = load_policy(str(policy))
    ctx = pol.target or {}
    t = load_target(str(target), ctx.get("addresses", ()), ctx.get("routes", ()), ctx.get("sysctls"))
    return {r.assertion.name: r.status for r in evaluate(pol, t)}


@pytest.mark.parametrize("policy,target,expected", CASES,
                         ids=[f"{p[:-5]}@{t.stem}" for p, t, _ in CASES])
def test_policy_samples(policy, target, expected):
    got = _statuses(POL / policy, target)
    if expected == "all-pass":
        expected = dict.fromkeys(got, "pass")
    assert got == expected


@pytest.mark.skipif(CORPUS is None, reason="corpus absent")
def test_docker_host_policy_on_corpus_dump():
    dump = CORPUS / "iptables/docker/acore2026__free5gc-compose__iptables-save.txt"
    assert set(_statuses(POL / "docker-host.yaml", dump).values()) == {"pass"}


def test_blocked_fails_with_a_witness_on_a_published_container_port(tmp_path):
    """Docker accepts forwarded packets to a published container port even when they are sent to
    the container's address directly: 'blocked' over every port finds that class."""
    if CORPUS is None:
        pytest.skip("corpus absent")
    text = (POL / "docker-host.yaml").read_text().replace(
        "dport: [1-2120, 2123-4999, 5001-7999, 8001-9081, 9083-65535]", "dport: 1-65535")
    p = tmp_path / "docker.yaml"
    p.write_text(text)
    pol = load_policy(str(p))
    t = load_target(str(CORPUS / "iptables/docker/acore2026__free5gc-compose__iptables-save.txt"),
                    pol.target["addresses"], pol.target["routes"])
    r = {r.assertion.name: r for r in evaluate(pol, t)}["containers-not-routed-directly"]
    assert r.status == "fail"
    w = r.witnesses[0]
    assert "out br-free5gc" in w.fate and w.span is not None and "DNAT" in w.trace or "ACCEPT" in w.trace


def test_exit_codes_text_and_failing_witness(capsys):
    assert main(["check", str(POL / "seed1-hairpin.yaml"), "--env", str(ENV / "seed1-fixed-masquerade.yaml")]) == 0
    capsys.readouterr()
    assert main(["check", str(POL / "seed1-hairpin.yaml")]) == 1  # the policy's target: the broken env
    out = capsys.readouterr().out
    assert "FAIL  vip-replies-translated (symmetric, error)" in out
    assert "witness 1: tcp 10.4.26.45:40000 -> 10.4.26.234:80" in out
    assert "nat:VIP-SERVICES:rule:1:DNAT to 10.4.26.11:80" in out  # the trace that shows why
    assert "6 assertions: 3 passed, 3 failed." in out


def test_fail_on_ignores_lower_severity(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text((POL / "seed2-sidecar.yaml").read_text().replace("../env/", str(ENV) + "/"))
    assert main(["check", str(p), "--env", str(ENV / "seed2-app-down.yaml"), "--fail-on", "error"]) == 1
    txt = p.read_text().replace("  - name: app-reachable-through-sidecar\n", "  - name: app-reachable-through-sidecar\n    severity: info\n") \
        .replace("  - name: no-split-connections\n", "  - name: no-split-connections\n    severity: warning\n")
    p.write_text(txt)
    assert main(["check", str(p), "--env", str(ENV / "seed2-app-down.yaml"), "--fail-on", "error"]) == 0
    assert main(["check", str(p), "--env", str(ENV / "seed2-app-down.yaml")]) == 1


def test_fail_on_approximate_gates_an_approximate_pass(tmp_path, capsys):
    """A pass that crosses a match synack cannot evaluate (-m string) and that decides (ACCEPT:
    a LOG rule would change nothing, matched or not) is APPROXIMATE: exit 0 and said in the
    summary, exit 1 with --fail-on-approximate."""
    dump = tmp_path / "fw.rules"
    dump.write_text("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                    '-A FORWARD -m string --string "x" --algo bm -j ACCEPT\n'
                    "-A FORWARD -p tcp -m tcp --dport 80 -j ACCEPT\nCOMMIT\n")
    pol = tmp_path / "pol.yaml"
    pol.write_text("version: 1\ntarget:\n  addresses: [10.0.1.1/24@eth0, 10.0.2.1/24@eth1]\nassertions:\n"
                   "  - name: web-open\n    reachable: {iif: eth0, src: 10.0.1.0/24, proto: tcp, dst: 10.0.2.5, dport: 80}\n")
    assert main(["check", str(pol), str(dump)]) == 0
    out = capsys.readouterr().out
    assert "PASS  web-open (reachable) (APPROXIMATE)" in out and out.rstrip().endswith("1 APPROXIMATE.")
    assert main(["check", str(pol), str(dump), "--fail-on-approximate"]) == 1
    assert "--fail-on-approximate" in capsys.readouterr().err
    dump.write_text(dump.read_text().replace('-A FORWARD -m string --string "x" --algo bm -j ACCEPT\n', ""))
    assert main(["check", str(pol), str(dump), "--fail-on-approximate"]) == 0


def test_invalid_policy_is_located_and_exits_2(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("version: 1\nassertions:\n  - name: a\n    blocked: {dst: 10.0.0.1, dportt: 80}\n"
                 "  - name: b\n    symmetric: {}\n    blocked: {}\n  - name: c\n    severity: fatal\n"
                 "    no-finding: {codes: [NAT001]}\n")
    with pytest.raises(PolicyError) as e:
        load_policy(str(p))
    lines = e.value.render().splitlines()
    assert lines[0].startswith(f"{p}:4:14: POL001") and "dportt" in lines[0]
    assert lines[1].startswith(f"{p}:5:5: POL001") and "exactly one of" in lines[1]
    assert lines[2].startswith(f"{p}:9:15: POL001") and "fatal" in lines[2]
    assert main(["check", str(p), str(ENV / "kubeproxy-node.rules")]) == 2
    assert "POL001" in capsys.readouterr().err


def test_yaml_syntax_error_and_missing_input(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("assertions:\n  - name: [\n")
    assert main(["check", str(p), str(ENV / "kubeproxy-node.rules")]) == 2
    assert f"{p}:3:1: POL001 [error] invalid YAML" in capsys.readouterr().err
    p.write_text("assertions:\n  - {name: a, symmetric: {dst: 10.0.0.1}}\n")
    assert main(["check", str(p)]) == 2
    assert main(["check", str(p), str(tmp_path / "missing.rules")]) == 2


def test_unanswerable_assertion_exits_2(capsys):
    # an environment flow needs a start namespace
    assert main(["check", str(POL / "kubeproxy-node.yaml"), "--env", str(ENV / "seed1-broken.yaml")]) == 2
    assert "cannot be answered" in capsys.readouterr().err


def test_json_output(capsys):
    assert main(["check", str(POL / "seed2-sidecar.yaml"), "--env", str(ENV / "seed2-app-down.yaml"), "-o", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema_version"] == "1.0" and doc["summary"] == {"pass": 1, "fail": 2, "error": 0}
    r = {x["name"]: x for x in doc["results"]}["app-reachable-through-sidecar"]
    assert r["status"] == "fail" and r["location"]["line"] == 10
    assert r["witnesses"][0]["flow"] == "tcp 10.7.2.2:40000 -> 10.7.3.3:8080"
    assert r["witnesses"][0]["trace"]["outcomes"][0]["second_leg"]["request"]["end"] == "refused"


def test_sarif_points_at_the_rule_in_the_dump(capsys):
    assert main(["check", str(POL / "kubeproxy-node.yaml"), str(ENV / "kubeproxy-node-no-hairpin-masq.rules"),
                 "-o", "sarif"]) == 1
    doc = json.loads(capsys.readouterr().out)
    run = doc["runs"][0]
    assert run["properties"]["schema_version"] == "1.0"
    (res,) = run["results"]
    assert res["ruleId"] == "policy/hairpin-masqueraded" and res["level"] == "error"
    loc = res["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"].endswith("kubeproxy-node-no-hairpin-masq.rules")
    assert loc["region"]["startLine"] == 20  # the DNAT whose reply bypasses the node
    rel = res["relatedLocations"][0]["physicalLocation"]
    assert rel["artifactLocation"]["uri"].endswith("kubeproxy-node.yaml")
    assert run["tool"]["driver"]["rules"][0]["id"] == "policy/hairpin-masqueraded"


def test_junit_one_case_per_assertion(tmp_path, capsys):
    out = tmp_path / "report.xml"
    assert main(["check", str(POL / "seed1-hairpin.yaml"), "-o", "junit", "--output-file", str(out)]) == 1
    root = ET.parse(out).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [a.name for a in load_policy(str(POL / "seed1-hairpin.yaml")).assertions]
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["vip-replies-translated", "no-bypassed-replies", "same-as-masquerade-fix"]
    assert suite.get("failures") == "3" and suite.get("tests") == "6"
    assert "witness: tcp 10.4.26.45:40000" in cases[1].find("failure").text
    assert "3 failed" in capsys.readouterr().err


def test_schema_ships_in_the_package():
    from analyzer.policy.spec import schema
    s = schema()
    assert s["$defs"]["assertion"]["oneOf"][0] == {"required": ["reachable"]}


def test_unchanged_from_witness_shows_both_sides(capsys):
    assert main(["check", str(POL / "kubeproxy-unchanged.yaml"), str(ENV / "kubeproxy-node-no-hairpin-masq.rules"),
                 "-o", "json"]) == 1
    r = json.loads(capsys.readouterr().out)["results"][0]
    w = r["witnesses"][0]
    assert w["flow"] == "tcp 10.244.0.5:40000 -> 10.96.0.10:80"
    assert "bypasses the translation" in w["fate"] and "bypasses" not in w["baseline"]


def test_translated_to_reports_the_wrong_shares(capsys):
    assert main(["check", str(POL / "kubeproxy-shares.yaml"), str(POL / "kubeproxy-stale-probability.rules")]) == 1
    out = capsys.readouterr().out
    assert "10.244.1.5:8080 gets 0.222 of the connections, not 0.3333" in out


def test_check_and_diff_sarif_validate_against_the_2_1_0_schema(capsys):
    import jsonschema
    schema = json.loads((REPO / "tests" / "data" / "sarif-schema-2.1.0.json").read_text())
    runs = [
        ["check", str(POL / "kubeproxy-node.yaml"), str(ENV / "kubeproxy-node-no-hairpin-masq.rules"), "-o", "sarif"],
        ["check", str(POL / "seed1-hairpin.yaml"), "-o", "sarif"],
        ["diff", str(ENV / "kubeproxy-node.rules"), str(ENV / "kubeproxy-node-no-hairpin-masq.rules"), "-o", "sarif",
         "--addr", "10.244.0.1/24@cni0"],
    ]
    for argv in runs:
        assert main(argv) == 1
        doc = json.loads(capsys.readouterr().out)
        jsonschema.Draft4Validator(schema).validate(doc)
        driver = doc["runs"][0]["tool"]["driver"]
        assert driver["informationUri"].startswith("https://") and "example" not in driver["informationUri"]
        assert all(r["helpUri"].startswith("https://") for r in driver["rules"])


def test_a_dump_with_both_families_answers_ipv6_flows_from_its_ip6tables_part(tmp_path, capsys):
    rules = tmp_path / "dual.rules"
    rules.write_text("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                     "-A FORWARD -d 10.0.0.5/32 -p tcp -m tcp --dport 80 -j ACCEPT\nCOMMIT\n"
                     "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                     "-A FORWARD -d fd00::5/128 -p tcp -m tcp --dport 80 -j ACCEPT\nCOMMIT\n")
    pol = tmp_path / "p.yaml"
    pol.write_text('assertions:\n  - {name: v4, reachable: {iif: eth0, dst: 10.0.0.5, dport: 80}}\n'
                   '  - {name: v6, reachable: {iif: eth0, dst: "fd00::5", dport: 80}}\n'
                   '  - {name: v6-other, blocked: {iif: eth0, dst: "fd00::6", dport: 80}}\n')
    assert main(["check", str(pol), str(rules), "--addr", "10.0.0.1/24@eth1", "--addr", "fd00::1/64@eth1"]) == 0
    assert "3 passed" in capsys.readouterr().out


def test_a_destination_of_the_other_input_kind_cannot_be_answered(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text("assertions:\n  - name: a\n    reachable: {iif: eth0, dst: 10.96.0.10, dport: 80, to: {namespace: pod}}\n")
    assert main(["check", str(p), str(ENV / "kubeproxy-node.rules")]) == 2
    assert "'to: namespace' applies to environments only" in capsys.readouterr().err
