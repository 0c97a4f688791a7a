"""Environment checks (NAT family): each code's bad environment raises exactly it, the good one
nothing; every sample environment loads; bad environment files get clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from analyzer.checks import CheckContext, run_checks
from analyzer.netfilter.env import EnvError
from analyzer.parse.envfile import load_environment

ROOT = Path(__file__).resolve().parent.parent
CODES = sorted(p.parent.name for p in (ROOT / "samples" / "checks").glob("NAT*/bad.yaml"))


def env_findings(path):
    env = load_environment(str(path))
    return [d for d in run_checks(CheckContext(None, (), extra={"env": env}), ["NAT"])]


@pytest.mark.parametrize("code", CODES)
def test_env_check_samples(code):
    bad = env_findings(ROOT / "samples" / "checks" / code / "bad.yaml")
    assert bad and {d.code for d in bad} == {code}, [d.message for d in bad]
    assert all(d.witness for d in bad)
    good = env_findings(ROOT / "samples" / "checks" / code / "good.yaml")
    assert good == []


def test_nat001_points_at_the_translation_and_names_the_fix():
    (d,) = env_findings(ROOT / "samples" / "checks" / "NAT001" / "bad.yaml")
    assert d.span.path.endswith("seed1-host.rules") and d.span.line == 11
    assert "10.4.26.11:80" in d.message and "RST" in d.message
    assert "MASQUERADE" in d.hint and "bridge-nf-call-iptables=1" in d.hint


def test_kube_proxy_hairpin_hint_is_the_missing_rule():
    d = env_findings(ROOT / "samples" / "env" / "kubeproxy-hairpin-broken.yaml")[0]
    assert "-A KUBE-SEP-AAAAAAAAAAAAAAAA -s 10.244.0.5/32 -j KUBE-MARK-MASQ" in d.hint
    assert env_findings(ROOT / "samples" / "env" / "kubeproxy-hairpin.yaml") == []


@pytest.mark.parametrize("text,needle", [
    ("namespaces: [a, b]\n", "expected a mapping with 'namespaces:'"),
    ("namespaces:\n  a: {adresses: []}\n", "unknown key 'adresses' (did you mean 'addresses'?)"),
    ("namespaces:\n  a: {addresses: [10.0.0.1/24]}\n", "needs '@IFACE'"),
    ("namespaces:\n  a: {}\nlinks:\n  - veth: [a:eth0, b:eth0]\n", "unknown namespace 'b'"),
    ("namespaces:\n  a: {routes: ['10.0.0.0/33 dev x']}\n", "invalid route destination"),
    ("namespaces:\n  a: {\n", "invalid YAML"),
])
def test_bad_environment_files_get_clear_errors(tmp_path, text, needle):
    p = tmp_path / "env.yaml"
    p.write_text(text)
    with pytest.raises(EnvError) as e:
        load_environment(str(p))
    assert needle in str(e.value)


# ---------------------------------------------------------------------------------------------
# every branch followed (kube-proxy's endpoint choice)
# ---------------------------------------------------------------------------------------------

KUBE_MULTI = ["kubeproxy-local-endpoint-first", "kubeproxy-remote-endpoint-first", "kubeproxy-three-endpoints"]


@pytest.mark.parametrize("name,share", [("kubeproxy-local-endpoint-first", "1 of 2 endpoints (10.244.0.6:8080), about 50%"),
                                        ("kubeproxy-remote-endpoint-first", "1 of 2 endpoints (10.244.0.6:8080), about 50%"),
                                        ("kubeproxy-three-endpoints", "1 of 3 endpoints (10.244.0.6:8080), about 33%")])
def test_same_node_endpoint_is_nat001_in_every_endpoint_order(name, share):
    (d,) = env_findings(ROOT / "samples" / "env" / f"{name}.yaml")
    assert d.code == "NAT001" and share in d.message, d.message
    assert d.confidence == "EXACT"  # statistic forks have exact probabilities
    assert "bridge-nf-call-iptables=1" in d.hint  # kube-proxy's rules are complete: br_netfilter is missing


def test_every_outcome_is_followed_with_its_probability():
    from analyzer.crosshost import World, follow_all
    from analyzer.netfilter.walk import parse_flow

    env = load_environment(str(ROOT / "samples" / "env" / "kubeproxy-three-endpoints.yaml"))
    trips = follow_all(World(env), "pod-a", parse_flow("tcp 10.244.0.5:40000 -> 10.96.0.20:80"))
    got = {(str(t.endpoint.dst), round(t.prob, 3)) for t in trips}
    assert got == {("10.244.0.6", 0.333), ("10.244.1.5", 0.333), ("10.244.1.6", 0.333)}
    # in rule order, each with its own reply: the local endpoint's reply bypasses node1
    assert [str(t.endpoint.dst) for t in trips] == ["10.244.0.6", "10.244.1.5", "10.244.1.6"]
    assert str(trips[0].client_sees.src) == "10.244.0.6"
    assert all(str(t.client_sees.src) == "10.96.0.20" for t in trips[1:])


def test_fan_out_cap_is_counted_not_silent():
    from analyzer.crosshost import World, follow_all
    from analyzer.netfilter.walk import parse_flow

    env = load_environment(str(ROOT / "samples" / "env" / "kubeproxy-three-endpoints.yaml"))
    trips = follow_all(World(env, max_outcomes=2), "pod-a", parse_flow("tcp 10.244.0.5:40000 -> 10.96.0.20:80"))
    assert len(trips) == 2 and trips[0].unfollowed == 1


def test_namespace_walks_are_memoized():
    from analyzer.crosshost import World, follow_all
    from analyzer.netfilter.walk import parse_flow

    env = load_environment(str(ROOT / "samples" / "env" / "kubeproxy-three-endpoints.yaml"))
    world = World(env)
    flow = parse_flow("tcp 10.244.0.5:40000 -> 10.96.0.20:80")
    first = follow_all(world, "pod-a", flow)
    misses = world.memo_misses
    again = follow_all(world, "pod-a", flow)
    assert world.memo_misses == misses and world.memo_hits >= misses
    assert [t.client_sees for t in again] == [t.client_sees for t in first]


def test_a_flows_own_walks_leave_the_memo_with_it():
    """The walks that carry a flow's destination or its own conntrack entry are kept apart and
    forgotten when another flow starts; the walks later flows share (an endpoint's node and pod)
    stay, and the answers are those of a fresh World."""
    from analyzer.crosshost import World, follow_all
    from analyzer.netfilter.walk import parse_flow

    env = load_environment(str(ROOT / "samples" / "env" / "kubeproxy-three-endpoints.yaml"))
    service = parse_flow("tcp 10.244.0.5:40000 -> 10.96.0.20:80")
    direct = parse_flow("tcp 10.244.0.5:40000 -> 10.244.1.5:8080")
    world = World(env)
    follow_all(world, "pod-a", service)
    own = dict(world._flow_memo)

    def carries(key, dst):  # the walk's packet, or the original of its conntrack entry
        pkt, ct = key.key[1], key.key[4]  # (a replayed reply walk's key holds no tuple)
        return dst in (pkt.dst, pkt.src) or (ct is not None and not isinstance(ct[0], bool) and ct[0].dst == dst)
    assert own and all(carries(k, service.dst) for k in own)
    assert not any(carries(k, service.dst) for k in world._memo)
    shared = {k for k in world._memo if k.key[0] == "pod-c"}
    assert shared  # the endpoint's own walks: any flow that reaches pod-c asks them again
    after = follow_all(world, "pod-a", direct)
    assert not set(own) & set(world._flow_memo) and shared <= set(world._memo)
    fresh = follow_all(World(env), "pod-a", direct)
    def seen(trips):  # (Journey compares by identity; its hops are tuples)
        return [(t.request.hops, t.request.end, t.reply and t.reply.hops, t.client_sees) for t in trips]
    assert seen(after) == seen(fresh)


def test_default_route_without_dev_takes_the_gateway_device():
    import ipaddress

    from analyzer.netfilter.env import Namespace

    ns = Namespace()
    ns.add_route("default via 10.244.0.1")  # before the address: resolved at lookup, as the kernel shows it
    ns.add_addr("10.244.0.5/24", "eth0")
    r = ns.route(ipaddress.ip_address("10.96.0.20"))
    assert (r.kind, r.oif, str(r.via)) == ("unicast", "eth0", "10.244.0.1")
    assert r.route.render() == "0.0.0.0/0 via 10.244.0.1 dev eth0"


def test_lint_env_reports_what_it_covered():
    import json

    from _golden import run

    rc, out, _ = run(["lint", "--env", "samples/env/kubeproxy-three-endpoints.yaml", "-o", "json"])
    doc = json.loads(out)
    assert rc == 1 and [d["code"] for d in doc["diagnostics"]] == ["NAT001"]
    c = doc["coverage"]
    assert (c["services"], c["clients"], c["flows"]) == (4, 1, 4)
    assert c["outcomes"] == 6 and c["replies_followed"] == 6 and c["branches_not_followed"] == 0
    rc, out, _ = run(["lint", "--env", "samples/env/kubeproxy-three-endpoints.yaml"])
    assert "Covered: 4 services x 1 client = 4 flows, 6 endpoints (6 outcomes)" in out
    assert "Not covered: 0 requests never arrived" in out


def test_explain_env_prints_every_outcome():
    from _golden import run

    rc, out, _ = run(["explain", "--env", "samples/env/kubeproxy-remote-endpoint-first.yaml", "--from", "pod-a",
                      "--flow", "tcp 10.244.0.5:40000 -> 10.96.0.20:80"])
    assert rc == 1
    assert "== outcome 1 of 2 (p=0.500, endpoint 10.244.1.5:8080)" in out
    assert "== outcome 2 of 2 (p=0.500, endpoint 10.244.0.6:8080)" in out
    assert "about 50% of connections, are reset" in out


def test_session_affinity_first_connection_follows_the_statistic_choice():
    """-m recent --rcheck (kube-proxy's ClientIP affinity) finds no entry on a client's first
    connection: the endpoints are chosen by the statistic rules alone, with exact probabilities."""
    from analyzer.explain import explain_flow
    from analyzer.netfilter.env import Namespace
    from analyzer.netfilter.walk import parse_flow
    from analyzer.parse import load_ruleset

    text = """*nat
:PREROUTING ACCEPT [0:0]
:SVC - [0:0]
:SEP-A - [0:0]
:SEP-B - [0:0]
-A PREROUTING -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j SVC
-A SVC -m recent --rcheck --seconds 10800 --reap --name SEP-A --mask 255.255.255.255 --rsource -j SEP-A
-A SVC -m recent --rcheck --seconds 10800 --reap --name SEP-B --mask 255.255.255.255 --rsource -j SEP-B
-A SVC -m statistic --mode random --probability 0.50000000000 -j SEP-A
-A SVC -j SEP-B
-A SEP-A -p tcp -m recent --set --name SEP-A --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.0.5:80
-A SEP-B -p tcp -m recent --set --name SEP-B --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.1.5:80
COMMIT
"""
    res = load_ruleset((text, "affinity.rules"))
    ns = Namespace()
    ns.add_addr("192.168.0.1/24", "eth0")
    ns.add_route("10.244.0.0/16 via 192.168.0.2")
    outs = explain_flow(res.ruleset, parse_flow("tcp 192.168.0.9:40000 -> 10.96.0.1:80"), ns)
    assert sorted((str(o.forward.pkt.dst), o.forward.prob, o.confidence) for o in outs) == [
        ("10.244.0.5", 0.5, "EXACT"), ("10.244.1.5", 0.5, "EXACT")]


# ---------------------------------------------------------------------------------------------
# one walk: explain DUMP and explain --env give the same answer for the same namespace
# ---------------------------------------------------------------------------------------------

ENV_SAMPLES = sorted((ROOT / "samples" / "env").glob("*.yaml"))


def _packet_steps(steps):
    """The steps of the packet itself: without IPv6 neighbour exchanges, which explain DUMP and
    environments place differently (explain: the client resolving this host, first; an
    environment: in the sender's hop, with the other namespace's rules)."""
    steps = list(steps)
    if steps and steps[0].where == "neighbour":
        end = next(i for i, s in enumerate(steps) if s.where == "neighbour"
                   and s.verdict.startswith(("ok: ", "FAILED: ")))
        steps = steps[end + 1:]
    cut = next((i for i, s in enumerate(steps) if s.where == "neighbour"), len(steps))
    return steps[:cut]


@pytest.mark.parametrize("path", ENV_SAMPLES, ids=[p.stem for p in ENV_SAMPLES])
def test_explain_and_env_agree(path):
    """Every namespace a sample's example flow crosses, explained on its own
    (`explain DUMP` with the namespace's addresses, routes and sysctls, arriving as it did in the
    environment), takes the same steps to the same packet and disposition as in the environment."""
    from dataclasses import replace

    import yaml

    from analyzer.crosshost import World, follow_all
    from analyzer.explain import explain_flow
    from analyzer.netfilter.walk import parse_flow

    env = load_environment(str(path))
    doc = yaml.safe_load(path.read_text())
    compared = 0
    for ex in doc.get("examples") or []:
        uid = ex.get("uid")
        for trip in follow_all(World(env), ex["from"], parse_flow(ex["flow"]), uid=uid, gid=uid):
            for hop in trip.request.hops:
                spec = env.namespaces[hop.namespace]
                if hop.bridged:
                    continue
                local = hop.arrived_on is None
                pkt = hop.packet_in if local else replace(hop.packet_in, iif=hop.arrived_on)
                rs = spec.ruleset if pkt.family == 4 else spec.ruleset6
                outs = explain_flow(rs, pkt, spec.net, local=local)
                same = [o for o in outs if o.forward.pkt.dst == hop.packet_out.dst
                        and o.forward.pkt.dport == hop.packet_out.dport]
                assert same, (hop.namespace, [o.forward.pkt.tuple_str() for o in outs])
                o = same[0]
                if hop.disposition == "no-neighbour":
                    # IPv6 neighbour discovery failed; explain on its own walks only this
                    # namespace's half of the exchange (its implicit peer answers): the same end
                    # when this namespace's own rules dropped it, else the packet leaves
                    own = f"; {hop.namespace}'s " in hop.detail
                    assert (o.disposition == "dropped") == own, (hop.namespace, o.disposition, hop.detail)
                    assert not own or "FAILED" in o.forward.steps[-1].verdict
                else:
                    assert o.disposition == hop.disposition, (hop.namespace, o.disposition, hop.disposition)
                steps = [s for s in hop.steps if s.where != "bridge"]
                assert [s.render() for s in _packet_steps(o.forward.steps)] == \
                    [s.render() for s in _packet_steps(steps)]
                compared += 1
    assert compared, "no namespace on the example's path"


def test_mermaid_draws_syn_synack_rst_and_translations():
    from _golden import run

    rc, out, _ = run(["explain", "--env", "samples/env/kubeproxy-remote-endpoint-first.yaml", "--from", "pod-a",
                      "--flow", "tcp 10.244.0.5:40000 -> 10.96.0.20:80", "-o", "mermaid"])
    diagrams = out.strip().split("\n\n")
    assert len(diagrams) == 2 and all(d.startswith("sequenceDiagram") for d in diagrams)
    ok, bad = diagrams
    assert "Note over node1: DNAT to 10.244.1.5:8080" in ok and "Note over node1: conntrack reverse DNAT" in ok
    assert "RST" not in ok
    assert "pod_b->>pod_a: SYN+ACK tcp 10.244.0.6:8080 -> 10.244.0.5:40000" in bad
    assert "pod_a-xpod_b: RST" in bad
    rc, out, _ = run(["explain", "samples/explain/hairpin-no-masquerade.rules", "--flow", "tcp 10.0.0.2:42424 -> 10.0.0.1:80",
                      "--from-iface", "br0", "--addr", "10.0.0.1/24@br0", "-o", "mermaid"])
    assert "client->>host: SYN" in out and "(bypasses host)" in out and "client-xn10_0_0_3: RST" in out


def test_explain_prints_and_takes_its_assumptions():
    from _golden import run

    argv = ["explain", "samples/explain/hairpin-no-masquerade.rules", "--flow", "tcp 10.0.0.2:42424 -> 10.0.0.1:80",
            "--from-iface", "br0", "--addr", "10.0.0.1/24@br0"]
    rc, out, _ = run(argv)
    assert rc == 1 and "assumes: net.ipv4.ip_forward=1" in out and "NAT001" in out
    # the same host as the bridge of an environment with br_netfilter: the bridged reply crosses
    # the host's conntrack entry, as `explain --env` says (no finding)
    rc, out, _ = run(argv + ["--bridge", "br0"])
    assert rc == 0 and "assumes: net.bridge.bridge-nf-call-iptables=1 (bridge ports: br0)" in out
    rc, out, _ = run(argv + ["--bridge", "br0", "--sysctl", "net.bridge.bridge-nf-call-iptables=0"])
    assert rc == 1 and "NAT001" in out
    rc, out, _ = run(argv + ["--sysctl", "net.ipv4.ip_forward=0"])
    assert "net.ipv4.ip_forward=0: not forwarded" in out


_TWO_SERVICES = """\
clients: [client]
namespaces:
  client:
    addresses: [192.168.0.10/24@eth0]
    routes: ["192.168.0.96/27 via 192.168.0.1 dev eth0"]
  node1:
    iptables: node1.rules
    addresses: [192.168.0.1/24@eth0, 10.0.12.1/24@eth1]
    routes: ["10.244.1.0/24 via 10.0.12.2 dev eth1"]
    sysctls: {net.ipv4.ip_forward: 1}
  node2:
    addresses: [10.0.12.2/24@eth0, 10.244.1.1/24@cni0]
    routes: ["192.168.0.0/24 via 10.0.12.1 dev eth0"]
    sysctls: {net.ipv4.ip_forward: 1}
  pod:
    addresses: [10.244.1.5/24@eth0]
    routes: ["default via 10.244.1.1 dev eth0"]
    listeners: [{port: 8080, name: web}]
links:
  - veth: ["client:eth0", "node1:eth0"]
  - veth: ["node1:eth1", "node2:eth0"]
  - veth: ["node2:cni0", "pod:eth0"]
"""


def _two_services(tmp_path, forward_rule: str):
    """Two services of node1 translated to the same pod: their replies cross node1 as the same
    packet, each with its own conntrack entry."""
    (tmp_path / "node1.rules").write_text(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
        "-A PREROUTING -d 192.168.0.100/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.244.1.5:8080\n"
        "-A PREROUTING -d 192.168.0.101/32 -p tcp -m tcp --dport 81 -j DNAT --to-destination 10.244.1.5:8080\n"
        "COMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        f"{forward_rule}\n-A FORWARD -m conntrack --ctstate ESTABLISHED -j ACCEPT\nCOMMIT\n")
    (tmp_path / "env.yaml").write_text(_TWO_SERVICES)
    return load_environment(str(tmp_path / "env.yaml"))


def _answers(trips):  # (Journey compares by identity; its hops are tuples)
    return [(t.request.hops, t.request.end, t.reply and t.reply.hops, t.reply and t.reply.end, t.client_sees)
            for t in trips]


def test_a_reply_walk_is_replayed_for_each_connection_with_its_own_translation(tmp_path):
    """node1's walk of the pod's reply is remembered without the conntrack tuple and replayed
    for the second service: the same answers as a fresh walk, each reverse-translated to the
    address its client dialled."""
    from analyzer.crosshost import World, follow_all
    from analyzer.netfilter.walk import parse_flow

    env = _two_services(tmp_path, "-A FORWARD -s 10.0.0.0/8 -j LOG")
    world = World(env)
    flows = [parse_flow("tcp 192.168.0.10:40000 -> 192.168.0.100:80"),
             parse_flow("tcp 192.168.0.10:40000 -> 192.168.0.101:81")]
    first = follow_all(world, "client", flows[0])
    hits = world.memo_hits
    second = follow_all(world, "client", flows[1])
    assert world.memo_hits > hits
    replayed = [v for k, v in world._memo.items() if k.key[0] == "node1" and k.key[-1] == "replayed"]
    assert replayed and all(brs is not None for _, brs in replayed)  # (None: walked per entry)
    for flow, got in zip(flows, (first, second)):
        assert _answers(got) == _answers(follow_all(World(env), "client", flow))
        assert (got[0].client_sees.src, got[0].client_sees.sport) == (flow.dst, flow.dport)
        node1 = [h for h in got[0].reply.hops if h.namespace == "node1"][0]
        assert node1.ct.original.dst == flow.dst and node1.packet_out.src == flow.dst


def test_a_rule_reading_the_conntrack_tuple_keeps_each_reply_walk_its_own(tmp_path):
    """A rule that matches the entry's original destination sees the two replies differently:
    nothing is replayed there, and the second service's reply is dropped as the kernel does."""
    from analyzer.crosshost import World, follow_all
    from analyzer.netfilter.walk import parse_flow

    env = _two_services(tmp_path, "-A FORWARD -m conntrack --ctstate ESTABLISHED --ctorigdst 192.168.0.101 -j DROP")
    world = World(env)
    first = follow_all(world, "client", parse_flow("tcp 192.168.0.10:40000 -> 192.168.0.100:80"))
    second = follow_all(world, "client", parse_flow("tcp 192.168.0.10:40000 -> 192.168.0.101:81"))
    assert first[0].reply.end == "delivered" and second[0].reply.end == "dropped"
    assert not any(k.key[0] == "node1" and k.key[-1] == "replayed" for k in world._memo)
