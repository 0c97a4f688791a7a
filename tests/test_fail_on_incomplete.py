"""lint --fail-on-incomplete: exit 1 when something in scope was not read or followed (a clean
result is a promise); complete/incomplete in JSON and SARIF; the configuration key."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from _golden import ROOT, run

SAMPLE = "samples/env/router-dnat-network.yaml"   # one DNAT to a destination network: not dialled
COMPLETE = "samples/env/seed2-app-up.yaml"         # every translation dialled, nothing left the environment


def test_a_translation_followed_in_part_fails_the_gate():
    rc, out, err = run(["lint", "--env", SAMPLE])
    assert rc == 0 and "No findings." in out and err == ""
    rc, out2, err = run(["lint", "--env", SAMPLE, "--fail-on-incomplete"])
    assert rc == 1
    assert out2 == out  # the report is the same: only the exit code and the stderr line differ
    assert err == ("synack: not everything in scope was read and followed (--fail-on-incomplete): "
                   "1 translation followed in part or not at all\n")


def test_a_complete_environment_passes_the_gate():
    rc, out, err = run(["lint", "--env", COMPLETE, "--fail-on-incomplete"])
    assert rc == 0 and "No findings." in out and err == ""
    rc, out, _ = run(["lint", "--env", COMPLETE, "--fail-on-incomplete", "-o", "json"])
    doc = json.loads(out)
    assert rc == 0 and doc["complete"] is True and doc["incomplete"] == []


def test_json_and_sarif_say_what_was_not_followed():
    rc, out, err = run(["lint", "--env", SAMPLE, "-o", "json"])
    doc = json.loads(out)
    assert rc == 0 and err == ""  # without the flag: said, not failed
    assert doc["complete"] is False
    assert doc["incomplete"] == [{
        "reason": "translations-in-part", "count": 1,
        "message": "1 translation followed in part or not at all",
        "places": [{"path": "samples/env/router-dnat-network.rules", "line": 9,
                    "why": "a destination network: not followed"}]}]
    rc, out, err = run(["lint", "--env", SAMPLE, "-o", "json", "--fail-on-incomplete"])
    assert rc == 1 and json.loads(out)["incomplete"] == doc["incomplete"] and "--fail-on-incomplete" in err
    rc, out, _ = run(["lint", "--env", SAMPLE, "-o", "sarif"])
    props = json.loads(out)["runs"][0]["properties"]
    assert props["complete"] is False and props["incomplete"] == doc["incomplete"]


def test_requests_that_leave_the_environment_fail_the_gate():
    """seed1's backend dials the VIP on its own link, where nothing the environment describes
    answers: those flows end outside it."""
    env = "samples/env/seed1-fixed-masquerade.yaml"
    assert run(["lint", "--env", env])[0] == 0
    rc, _, err = run(["lint", "--env", env, "--fail-on-incomplete"])
    assert rc == 1 and "2 flows entirely left the environment" in err


def _copy(tmp_path, sample=SAMPLE):
    for p in (ROOT / sample).parent.glob((ROOT / sample).stem + ".*"):
        shutil.copy(p, tmp_path)
    for rules in ("router-dnat-network.rules",):
        shutil.copy(ROOT / "samples" / "env" / rules, tmp_path)
    return str(tmp_path / os.path.basename(sample))


def test_the_configuration_key(tmp_path):
    env = _copy(tmp_path)
    assert run(["lint", "--env", env])[0] == 0
    (tmp_path / "synack.toml").write_text("fail-on-incomplete = true\n")
    rc, _, err = run(["lint", "--env", env])
    assert rc == 1 and "(--fail-on-incomplete)" in err
    assert run(["lint", "--env", env, "--no-fail-on-incomplete"])[0] == 0  # the command line wins
    (tmp_path / "synack.toml").write_text('fail-on-incomplete = "yes"\n')
    rc, _, err = run(["lint", "--env", env])
    assert rc == 2 and "'fail-on-incomplete' must be true or false" in err
    (tmp_path / "synack.toml").unlink()
    (tmp_path / "pyproject.toml").write_text("[tool.synack]\nfail-on-incomplete = true\n")
    assert run(["lint", "--env", env])[0] == 1


RULES = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -m frobnicate --level 3 -j ACCEPT
-A INPUT -p tcp -m tcp --dport 443 -j ACCEPT
COMMIT
"""


def test_a_dump_with_a_match_synack_cannot_evaluate(tmp_path):
    dump = tmp_path / "fw.rules"
    dump.write_text(RULES)
    rc, out, err = run(["lint", str(dump), "--fail-on", "error"])
    assert rc == 0 and "PRS009" in out and err == ""
    rc, out, err = run(["lint", str(dump), "--fail-on", "error", "--fail-on-incomplete"])
    assert rc == 1
    assert "1 match synack cannot evaluate (an unknown match module)" in err
    doc = json.loads(run(["lint", str(dump), "-o", "json"])[1])
    assert [(r["reason"], r["count"], [(p["line"], p["code"]) for p in r["places"]])
            for r in doc["incomplete"]] == [("approximate-matches", 1, [(6, "PRS009")])]
    # a suppression on the rule accepts that gap (it is reported and silenced as a finding is)
    dump.write_text(RULES.replace("--level 3 -j", '--level 3 -m comment --comment "synack: ignore PRS009" -j'))
    rc, out, err = run(["lint", str(dump), "--fail-on-incomplete"])
    assert rc == 0 and "No findings." in out and err == ""
    # without the unknown match the dump is complete
    dump.write_text(RULES.replace(" -m frobnicate --level 3", ""))
    assert run(["lint", str(dump), "--fail-on-incomplete"])[:2] == (0, "No findings.\n")


def test_a_line_read_in_part_is_incomplete(tmp_path):
    """A parse error: synack reads what it can of the line (here the rule without its unknown
    option, so wider than written); --ignore hides the error, the gate still says so."""
    dump = tmp_path / "fw.rules"
    dump.write_text(RULES.replace(" -m frobnicate --level 3", "").replace("--dport 443", "--dprot 443"))
    rc, _, err = run(["lint", str(dump), "--ignore", "PRS002,FLT", "--fail-on-incomplete"])
    assert rc == 0 and err == ""  # ignored: accepted as suppressions are
    rc, out, err = run(["lint", str(dump), "--ignore", "FLT", "--fail-on-incomplete", "-o", "json"])
    doc = json.loads(out)
    assert rc == 1 and doc["complete"] is False
    assert doc["incomplete"][0]["reason"] == "parse-errors" and doc["incomplete"][0]["places"][0]["code"] == "PRS002"


ROUTER_NFQUEUE = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d 10.7.2.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.7.3.3:8080
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A FORWARD -p tcp -m tcp --dport 8080 -j NFQUEUE --queue-num 3
COMMIT
"""


def test_a_flow_the_walk_approximates_is_incomplete(tmp_path):
    """NFQUEUE hands the packet to a userspace program synack does not see: the flow is
    followed APPROXIMATELY, said in the text and counted (a match followed both ways is not)."""
    env = _copy(tmp_path)
    (tmp_path / "router-dnat-network.rules").write_text(ROUTER_NFQUEUE)
    rc, out, err = run(["lint", "--env", env, "--select", "NAT", "--fail-on-incomplete", "--fail-on", "error"])
    assert rc == 1
    assert "Approximated: 2 flows, where the walk stood in for something it does not model exactly" in out
    assert "2 flows followed APPROXIMATELY" in err and "NFQUEUE" in err
    doc = json.loads(run(["lint", "--env", env, "-o", "json"])[1])
    assert doc["coverage"]["approximate_flows"] == 2
    assert doc["incomplete"][-1]["places"][0]["flow"] == "tcp 10.7.2.2:40000 -> 10.7.2.1:80"


def test_a_match_followed_both_ways_is_not_incomplete():
    """seed2's pod dials out with its owner unknown: every uid's branch is followed (APPROXIMATE
    outcomes, but none missing), so the gate passes."""
    rc, out, err = run(["lint", "--env", "samples/env/seed2-outbound-ok.yaml", "--fail-on-incomplete"])
    assert rc == 0 and err == "" and "Approximated" not in out


CORPUS = os.environ.get("SYNACK_CORPUS", str(ROOT.parent / "shared" / "corpus"))
WORKER = os.path.join(CORPUS, "iptables/kube-proxy-nodes/unknown__flannel-kubeproxy-iptables__k8s-worker1.save")
WORKER_ENV = """clients: [client]
namespaces:
  client:
    addresses: [10.244.1.30/24@eth0]
    routes: ["default via 10.244.1.1 dev eth0"]
  jtest:
    addresses: [10.244.1.19/24@eth0]
    routes: ["default via 10.244.1.1 dev eth0"]
    listeners: [{port: 8080, name: jtest}]
  scraper:
    addresses: [10.244.1.15/24@eth0]
    routes: ["default via 10.244.1.1 dev eth0"]
    listeners: [{port: 8000, name: scraper}]
  node:
    iptables: worker1.save
    addresses: [192.168.205.146/24@eth0, 10.244.1.1/24@cni0]
    routes: ["default via 192.168.205.1 dev eth0"]
    sysctls: {net.ipv4.ip_forward: 1, net.bridge.bridge-nf-call-iptables: 1}
links:
  - bridge: {namespace: node, name: cni0, ports: ["client:eth0", "jtest:eth0", "scraper:eth0"], hairpin: true}
"""


@pytest.mark.skipif(not os.path.exists(WORKER), reason="corpus not present (SYNACK_CORPUS)")
def test_a_real_worker_node_with_endpoints_on_other_nodes(tmp_path):
    """The corpus's flannel/kube-proxy worker (k8s-worker1) with its two local endpoints as pods:
    the services whose endpoints are on other nodes leave the environment, which a clean lint
    does not show in its exit code and the gate does."""
    shutil.copy(WORKER, tmp_path / "worker1.save")
    (tmp_path / "env.yaml").write_text(WORKER_ENV)
    rc, out, err = run(["lint", "--env", str(tmp_path / "env.yaml")])
    assert rc == 0 and out.startswith("No findings.\n") and "6 left the environment" in out
    assert "Also left the environment: 2 branches of flows delivered elsewhere on other branches." in out
    rc, out, err = run(["lint", "--env", str(tmp_path / "env.yaml"), "--fail-on-incomplete", "-o", "json"])
    doc = json.loads(out)
    assert rc == 1 and [r["reason"] for r in doc["incomplete"]] == ["left-environment"]
    assert doc["incomplete"][0]["count"] == 8
    assert "6 flows entirely and 2 branches of other flows left the environment" in err


def test_the_ci_doc_shows_what_the_gate_prints():
    doc = (ROOT / "docs" / "ci.md").read_text()
    cmd = "$ synack lint --env samples/env/router-dnat-network.yaml --fail-on-incomplete\n"
    shown = doc.split(cmd, 1)[1].split("$ echo $?\n", 1)[0]
    rc, out, err = run(["lint", "--env", SAMPLE, "--fail-on-incomplete"])
    assert shown == out + err and rc == 1


def test_a_value_used_many_times_counts_every_use(tmp_path):
    """A host name is reported where it first appears, its other uses counted in the message:
    the reason counts every rule that holds it (the corpus's TUM firewall: one anonymised MAC
    diagnostic, 885 matches)."""
    dump = tmp_path / "fw.rules"
    dump.write_text(RULES.replace(" -m frobnicate --level 3", " -s admin.example.com")
                    .replace("--dport 443", "--dport 443 -s admin.example.com"))
    rc, out, err = run(["lint", str(dump), "--fail-on", "error", "--fail-on-incomplete"])
    assert rc == 1 and "used 1 more time" in out
    assert "2 matches synack cannot evaluate (a host name): verdicts that depend on them are APPROXIMATE" in err
