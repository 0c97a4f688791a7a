"""The typed trace: steps hold the rule, the action, the packets and typed facts; text is derived;
and no finding depends on what a rule's chain or comment says."""
from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from _golden import ROOT, run
from analyzer.explain import explain_flow
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.trace import Bridge, Conntrack, Kind, Route, Step
from analyzer.netfilter.walk import parse_flow
from analyzer.parse import load_ruleset

DUMP = """*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SVC-X - [0:0]
-A PREROUTING -d 10.96.0.1/32 -p tcp --dport 80 -j KUBE-SVC-X
-A KUBE-SVC-X -p tcp -j DNAT --to-destination 10.0.2.2:8080
-A POSTROUTING -o eth1 -j MASQUERADE
COMMIT
*filter
:FORWARD DROP [0:0]
-A FORWARD -d 10.0.2.2/32 -j ACCEPT
COMMIT
"""


def _explain(text=DUMP, flow="tcp 10.0.1.5:40000 -> 10.96.0.1:80"):
    res = load_ruleset((text, "t.rules"))
    ns = Namespace()
    ns.add_addr("10.0.1.1/24", "eth0")
    ns.add_addr("10.0.2.1/24", "eth1")
    pkt = parse_flow(flow)
    from dataclasses import replace
    return explain_flow(res.ruleset, replace(pkt, iif="eth0"), ns)


def test_a_step_holds_the_rule_the_action_and_the_packets():
    steps = _explain()[0].forward.steps
    jump = next(s for s in steps if s.kind is Kind.JUMP)
    assert jump.rule.chain == "PREROUTING" and jump.target_chain == "KUBE-SVC-X"
    assert (jump.where, jump.verdict, jump.line, jump.path) == ("nat:PREROUTING:rule:1", "JUMP KUBE-SVC-X", 5, "t.rules")
    dnat = next(s for s in steps if s.kind is Kind.DNAT)
    assert dnat.before.dst == ipaddress.ip_address("10.96.0.1")
    assert (dnat.after.dst, dnat.after.dport) == (ipaddress.ip_address("10.0.2.2"), 8080)
    assert dnat.translation == (ipaddress.ip_address("10.0.2.2"), 8080) and dnat.translates_destination
    assert dnat.verdict == "DNAT to 10.0.2.2:8080"
    assert dnat.packet == "tcp 10.0.1.5:40000 -> 10.0.2.2:8080"
    masq = next(s for s in steps if s.kind is Kind.MASQUERADE)
    assert masq.translates_source and masq.after.src == ipaddress.ip_address("10.0.2.1")
    ct = next(s for s in steps if s.kind is Kind.CONNTRACK)
    assert ct.fact is Conntrack.NEW and ct.rule is None and ct.where == "conntrack"
    route = next(s for s in steps if s.kind is Kind.ROUTE)
    assert route.fact is Route.FORWARD and route.after.oif == "eth1"


def test_policy_and_route_refusals_are_typed():
    dropped = DUMP.replace("-A FORWARD -d 10.0.2.2/32 -j ACCEPT\n", "")
    last = _explain(dropped)[0].forward.steps[-1]
    assert last.kind is Kind.POLICY and last.value == "DROP" and last.drops
    assert (last.where, last.verdict) == ("filter:FORWARD:policy", "DROP")


def test_steps_are_frozen():
    step = _explain()[0].forward.steps[0]
    with pytest.raises(AttributeError):
        step.kind = Kind.DROP


def test_text_is_the_xtables_monitor_line():
    s = Step(Kind.BRIDGE, fact=Bridge.HAIRPIN_OFF, text="br0 drops it")
    assert str(s) == "bridge:br0 drops it" and s.drops


def test_the_environment_trace_is_frozen():
    from analyzer.crosshost import World, follow_all
    from analyzer.parse.envfile import load_environment

    env = load_environment(str(ROOT / "samples" / "env" / "seed1-broken.yaml"))
    world = World(env)
    flow = parse_flow("tcp 10.4.26.45:35582 -> 10.4.26.234:80")
    trips = follow_all(world, "client", flow)
    t = trips[0]
    assert isinstance(t.request.hops, tuple) and isinstance(t.request.hops[0].steps, tuple)
    with pytest.raises(AttributeError):
        t.request.end = "x"
    with pytest.raises(AttributeError):
        t.request.hops[0].namespace = "x"


# ---- no finding reads text ---------------------------------------------------------------
#: words the trace prints for translations and drops; a check matching text would see them
WORDS = "DNAT MASQUERADE TPROXY REDIRECT NETMAP SNAT conntrack reverse martian source hairpin mode is off"


#: chains whose names checks rightly rely on (kube-proxy's, Istio's and Docker's fixed names)
KEEP = re.compile(r"^(KUBE-(SERVICES|NODEPORTS|POSTROUTING|MARK-MASQ|MARK-DROP|FORWARD|FIREWALL|PROXY-\w+|"
                  r"EXTERNAL-SERVICES|LOAD-BALANCER|KUBELET-CANARY|PROXY-CANARY)|ISTIO_\w+|DOCKER[\w-]*|CILIUM_\w+)$")
#: kube-proxy's hashed chains: the prefix says what they are, the hash is free text
HASHED = re.compile(r"^(KUBE-(?:SVC|SEP|FW|XLB|EXT|SVL)-)\w+$")


def _disguise(text: str, keep=KEEP) -> str:
    """The same rules, with every user chain's name carrying TPROXY/DNAT (kube-proxy's hashed
    chains keep their prefix, fixed well-known names are kept) and every rule a comment full of
    the trace's words."""
    names = re.findall(r"(?m)^:(\S+) - ", text)
    for i, name in enumerate(sorted(names, key=len, reverse=True)):
        if keep is not None and keep.match(name):
            continue
        m = HASHED.match(name)
        new = f"{m.group(1)}TPROXY-DNAT-{i:x}" if m else (name + "-TPROXY-DNAT")[:28]
        text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", new, text)
    return re.sub(r"(?m)^(-A \S+)", rf'\1 -m comment --comment "{WORDS}"', text)


def _codes(out: str) -> list:
    doc = json.loads(out)
    return sorted((d["code"], d["severity"], d["confidence"], Path(d["span"]["path"]).name if d.get("span") else None,
                   d["span"]["line"] if d.get("span") else None)
                  for d in doc.get("diagnostics", []))


def _copy_disguised(src: Path, dst: Path, keep=KEEP):
    for f in src.iterdir():
        if f.is_file():
            if f.suffix in (".rules", ".v4", ".v6", ".save"):
                (dst / f.name).write_text(_disguise(f.read_text(), keep))
            else:
                shutil.copy(f, dst / f.name)


ENVS = sorted((ROOT / "samples" / "env").glob("*.yaml"))


@pytest.mark.parametrize("env", ENVS, ids=[p.stem for p in ENVS])
def test_env_findings_do_not_read_rule_text(tmp_path, env):
    _copy_disguised(env.parent, tmp_path)
    rc1, out1, _ = run(["lint", "--env", str(env), "-o", "json"])
    rc2, out2, _ = run(["lint", "--env", str(tmp_path / env.name), "-o", "json"])
    assert rc1 == rc2
    assert _codes(out1) == _codes(out2)


def test_a_chain_named_tproxy_is_not_a_tproxy(tmp_path):
    """The sidecar's ISTIO chains renamed ...-TPROXY: the reply still comes from the socket's
    address (a transparent proxy would answer as the original destination)."""
    _copy_disguised(ROOT / "samples" / "env", tmp_path, keep=None)
    assert "ISTIO_INBOUND-TPROXY" in (tmp_path / "seed2-pod.rules").read_text()
    argv = ["explain", "--env", "{}", "--from", "client", "--flow", "tcp 10.7.2.2:51136 -> 10.7.3.3:8080", "-o", "json"]
    a = json.loads(run([x.replace("{}", str(ROOT / "samples/env/seed2-app-down.yaml")) for x in argv])[1])
    b = json.loads(run([x.replace("{}", str(tmp_path / "seed2-app-down.yaml")) for x in argv])[1])
    assert [o["client_sees"] for o in a["outcomes"]] == [o["client_sees"] for o in b["outcomes"]]


CASES = sorted((ROOT / "samples" / "explain").glob("*.args"))


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_explain_findings_do_not_read_rule_text(tmp_path, case):
    _copy_disguised(case.parent, tmp_path)
    argv = shlex.split(case.read_text())
    moved = [str(tmp_path / Path(a).name) if a.startswith("samples/") else a for a in argv]
    rc1, out1, _ = run(["explain", *argv, "-o", "json"])
    rc2, out2, _ = run(["explain", *moved, "-o", "json"])
    assert rc1 == rc2
    a, b = json.loads(out1), json.loads(out2)
    assert _codes(out1) == _codes(out2)
    assert [(o["request"]["end"], o["matches_dialled"]) for o in a["outcomes"]] == \
        [(o["request"]["end"], o["matches_dialled"]) for o in b["outcomes"]]


SERVER = """*nat
:PREROUTING ACCEPT [0:0]
:{chain} - [0:0]
-A PREROUTING -j {chain}
-A {chain} -p tcp --dport 80 -j REDIRECT --to-ports 8080
COMMIT
*filter
:OUTPUT ACCEPT [0:0]
-A OUTPUT -m conntrack --ctstate INVALID -j DROP
COMMIT
"""

ENV = """namespaces:
  client:
    addresses: [10.0.0.1/24@eth0]
  server:
    iptables: server.rules
    addresses: [10.0.0.2/24@eth0]
links:
  - veth: ["client:eth0", "server:eth0"]
"""


@pytest.mark.parametrize("chain", ["SERVICE", "TPROXY-SERVICE"])
def test_the_reply_belongs_to_the_connection_whatever_the_chain_is_called(tmp_path, chain):
    """A reply read as a transparent proxy's (answering from the original destination) would
    find no conntrack entry and be dropped as INVALID by the server's OUTPUT."""
    (tmp_path / "server.rules").write_text(SERVER.format(chain=chain))
    (tmp_path / "env.yaml").write_text(ENV)
    rc, out, err = run(["explain", "--env", str(tmp_path / "env.yaml"), "--from", "client",
                        "--flow", "tcp 10.0.0.1:40000 -> 10.0.0.2:80", "-o", "json"])
    doc = json.loads(out)
    assert rc == 0, out
    assert doc["outcomes"][0]["matches_dialled"] is True and not doc["diagnostics"]


# ---- one JSON shape for a dump and an environment --------------------------------------------
def _examples():
    import yaml

    out = []
    for env in ENVS:
        for ex in (yaml.safe_load(env.read_text()) or {}).get("examples") or []:
            out.append(pytest.param(env, ex["from"], ex["flow"], id=f"{env.stem}:{ex['from']}"))
    return out


@pytest.mark.parametrize("env,start,flow", _examples())
def test_env_explain_json_follows_the_schema(env, start, flow):
    import jsonschema

    from analyzer.report.explain_json import schema

    rc, out, err = run(["explain", "--env", str(env), "--from", start, "--flow", flow, "-o", "json"])
    assert err == ""
    doc = json.loads(out)
    jsonschema.Draft202012Validator(schema()).validate(doc)
    steps = [s for o in doc["outcomes"] for h in o["request"]["hops"] for s in h["steps"]]
    assert steps and all(s["trace"].endswith(s["detail"]) for s in steps)


def test_dump_and_environment_give_one_shape():
    """``explain DUMP`` is an environment of one namespace: the same keys at every level."""
    rc, a, _ = run(["explain", "samples/seed1-hairpin-host.rules", "--flow", "tcp 10.4.26.45:35582 -> 10.4.26.234:80",
                    "--from-iface", "eth0", "--addr", "10.4.26.1/24@eth0", "-o", "json"])
    rc, b, _ = run(["explain", "--env", "samples/env/seed1-broken.yaml", "--from", "client",
                    "--flow", "tcp 10.4.26.45:35582 -> 10.4.26.234:80", "-o", "json"])
    a, b = json.loads(a), json.loads(b)

    def keys(doc, path="") -> set:
        if isinstance(doc, dict):
            return {path + "." + k for k in doc} | {x for k, v in doc.items() for x in keys(v, path + "." + k)}
        if isinstance(doc, list):
            return {x for v in doc for x in keys(v, path + "[]")}
        return set()
    shared = keys(a) & keys(b)
    assert {".outcomes[].request.hops[].steps[].kind", ".outcomes[].reply.hops[].steps[].packet_before",
            ".outcomes[].request.hops[].conntrack.state", ".outcomes[].probability"} <= shared
    import jsonschema

    from analyzer.report.explain_json import schema
    for doc in (a, b):
        jsonschema.Draft202012Validator(schema()).validate(doc)
