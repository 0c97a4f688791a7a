"""Cilium's datapath as a stage of the environment walk (analyzer/netfilter/cilium.py): where it
translates, where it reverse-translates, what bypasses the host's netfilter, and the known-defects
table; the `cilium:` key of environment files."""
from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from analyzer.checks import CheckContext, run_checks
from analyzer.checks.nat import outcome_findings
from analyzer.crosshost import World, follow_all
from analyzer.netfilter import cilium as C
from analyzer.netfilter.env import EnvError
from analyzer.netfilter.walk import Packet
from analyzer.parse.envfile import load_environment

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "cilium"


def trips(name: str, src="client", flow=None):
    env = load_environment(str(SAMPLES / name))
    world = World(env)
    ex = flow or env.examples[0]["flow"]
    from analyzer.netfilter.walk import parse_flow
    return world, follow_all(world, src, parse_flow(ex))


def steps(journey):
    return [(h.namespace, s.where, s.verdict) for h in journey.hops for s in h.steps
            if s.where.startswith("cilium:")]


def test_seed1_same_node_translates_at_the_client_veth_and_never_reverses():
    world, (t,) = trips("seed1-same-node.yaml")
    req = steps(t.request)
    assert req[0][:2] == ("node-a", "cilium:per-packet-lb") and "-> 10.4.26.11:80" in req[0][2]
    assert req[1][:2] == ("node-a", "cilium:local-delivery")
    rep = steps(t.reply)
    assert ("node-a", "cilium:local-delivery") == rep[0][:2]
    assert rep[1][1] == "cilium:revnat-to-container" and rep[1][2].startswith("NO rev-NAT") and "cilium#9285" in rep[1][2]
    assert str(t.client_sees.src) == "10.4.26.11"
    (d,) = outcome_findings(world, [t])
    assert d.code == "NAT001" and "cilium#9285" in d.message and "upgrade to 1.6.2" in d.hint
    assert "socket LB" in d.hint and "SNAT" in d.hint


@pytest.mark.parametrize("name", ["seed1-other-node.yaml", "seed1-same-node-fixed.yaml",
                                  "seed1-same-node-socket-lb.yaml"])
def test_seed1_variants_are_symmetric(name):
    world, ts = trips(name)
    assert all(str(t.client_sees.src) == "10.4.26.234" for t in ts)
    assert outcome_findings(world, ts) == []


def test_other_node_reverse_translates_on_the_way_into_the_client_pod():
    _, (t,) = trips("seed1-other-node.yaml")
    rev = [s for s in steps(t.reply) if s[1] == "cilium:revnat-to-container"]
    assert rev == [("node-a", "cilium:revnat-to-container",
                    "rev-NAT 10.4.26.11:80 -> 10.4.26.234:80 into lxc-client")]
    # the request crossed node-a's netfilter (routed to node-b), not a BPF redirect
    assert not [s for s in steps(t.request) if s[1] == "cilium:local-delivery"]


def test_socket_lb_translates_before_the_packet_and_the_socket_reports_the_vip():
    _, (t,) = trips("seed1-same-node-socket-lb.yaml")
    first = t.request.hops[0]
    assert first.namespace == "client" and first.steps[0].where == "cilium:socket-lb"
    assert str(first.packet_out.dst) == "10.4.26.11"
    assert any(s.where == "cilium:socket-lb" and "recvmsg/getpeername" in s.verdict for s in t.reply.hops[-1].steps)


def test_kube_proxy_clusterip_with_bpf_local_delivery_is_flagged_10567():
    world, (t,) = trips("kubeproxy-clusterip-bpf-redirect.yaml")
    (d,) = outcome_findings(world, [t])
    assert d.code == "NAT001" and d.span.path.endswith("kubeproxy-node.rules") and d.span.line == 24
    assert "redirects it by BPF" in d.message and "cilium#10567" in d.hint


@pytest.mark.parametrize("name", ["kubeproxy-clusterip-cilium-ewlb.yaml", "kubeproxy-clusterip-socket-lb.yaml"])
def test_kube_proxy_clusterip_is_fine_when_cilium_translates(name):
    world, ts = trips(name)
    assert outcome_findings(world, ts) == []
    # kube-proxy's DNAT is never reached: Cilium translated first
    assert not any("DNAT" in s.verdict and not s.where.startswith("cilium")
                   for t in ts for h in t.request.hops for s in h.steps)


def test_socket_lb_skips_a_foreign_external_ip():
    from analyzer.parse.cilium import parse_cilium
    res = parse_cilium("ID Frontend Service Type Backend\n7 10.4.26.234:80 ExternalIPs 1 => 10.4.26.11:80\n", "x")
    svc_node = C.CiliumNode(services=res.dump.services, socket_lb=True)
    p = Packet(4, 6, ipaddress.ip_address("10.4.26.45"), ipaddress.ip_address("10.4.26.234"), 1234, 80)
    assert C.connect(svc_node, p, True, lambda a: False) is None  # bpf_sock.c sock4_skip_xlate
    (o,) = C.connect(svc_node, p, True, lambda a: str(a) == "10.4.26.234")
    assert str(o.pkt.dst) == "10.4.26.11"
    svc_node = replace(svc_node, socket_lb_hostns_only=True)
    assert C.connect(svc_node, p, False, lambda a: True) is None  # a pod's socket: not covered


def test_defect_table_is_consulted_by_version():
    d9285 = next(d for d in C.DEFECTS if d.issue == "cilium#9285")
    assert C.defect_applies(d9285, (1, 6, 0)) is True
    assert C.defect_applies(d9285, (1, 6, 2)) is False
    assert C.defect_applies(d9285, (1, 5, 9)) is False
    assert C.defect_applies(d9285, None) is None
    for d in C.DEFECTS:
        assert d.issue.startswith("cilium#") and d.symptom and d.fix and d.applies in C.FACTS
    for f in C.FACTS.values():
        assert f.source and f.versions


def test_cil006_samples():
    def found(path):
        env = load_environment(str(path))
        return [d for d in run_checks(CheckContext(None, (), extra={"env": env}), ["NAT", "CIL006"])]
    bad = found(ROOT / "samples" / "checks" / "CIL006" / "bad.yaml")
    assert [d.code for d in bad] == ["CIL006"] and "cilium#9285" in bad[0].message
    assert found(ROOT / "samples" / "checks" / "CIL006" / "good.yaml") == []


def test_status_dump_sets_the_node(tmp_path):
    (tmp_path / "svc.txt").write_text("ID Frontend Service Type Backend\n1 10.96.0.1:443 ClusterIP 1 => 10.0.0.1:6443\n")
    (tmp_path / "status.txt").write_text(
        "KubeProxyReplacement:   True   [eth0 (Direct Routing)]\nCilium:   Ok   1.15.3 (v1.15.3-abc)\n"
        "KubeProxyReplacement Details:\n  Status:   True\n  Socket LB:   Enabled\n  Socket LB Coverage:   Hostns-only\n"
        "  Mode:   DSR\n")
    (tmp_path / "env.yaml").write_text("namespaces:\n  n:\n    cilium: {dumps: [svc.txt, status.txt]}\n")
    node = load_environment(str(tmp_path / "env.yaml")).namespaces["n"].cilium
    assert (node.version, node.socket_lb, node.socket_lb_hostns_only, node.nodeport, node.lb_mode) == (
        (1, 15, 3), True, True, True, "dsr")


@pytest.mark.parametrize("body,needle", [
    ("cilium: {dumps: [svc.txt], socket_lbb: true}", "unknown cilium key 'socket_lbb' (did you mean 'socket_lb'?)"),
    ("cilium: {dumps: [svc.txt], socket_lb: yes-please}", "cilium.socket_lb should be true or false"),
    ("cilium: {dumps: [svc.txt], lb_mode: dsrr}", "cilium.lb_mode 'dsrr' (did you mean 'dsr'?)"),
    ("cilium: {dumps: [svc.txt], version: latest}", "is not a version like 1.15.3"),
    ("cilium: {dumps: []}", "cilium needs at least one service dump"),
    ("cilium: {dumps: [missing.txt]}", "cannot read missing.txt"),
])
def test_bad_cilium_keys_get_located_errors(tmp_path, body, needle):
    (tmp_path / "svc.txt").write_text("ID Frontend Service Type Backend\n1 10.96.0.1:443 ClusterIP 1 => 10.0.0.1:6443\n")
    (tmp_path / "env.yaml").write_text(f"namespaces:\n  n:\n    {body}\n")
    with pytest.raises(EnvError) as e:
        load_environment(str(tmp_path / "env.yaml"))
    assert needle in str(e.value) and "env.yaml:3:" in str(e.value)


def test_nodeport_from_outside_local_backend_without_snat_remote_with_snat():
    world, ts = trips("nodeport-external-client.yaml", src="outside")
    assert len(ts) == 2 and outcome_findings(world, ts) == []
    by_end = {str(t.endpoint.dst): t for t in ts}
    remote, local = by_end["10.4.27.12"], by_end["10.4.26.11"]
    # remote backend: SNAT to node-a's address, reverse-translated when the reply comes back to eth0
    assert str(remote.request.end_packet.src) == "192.168.1.11"
    assert any("rev-SNAT+rev-DNAT" in s[2] for s in steps(remote.reply))
    # local backend: the client's address is kept, rev-DNAT in the backend's from-container
    assert str(local.request.end_packet.src) == "192.168.1.50"
    assert any("NODEPORT_REVNAT" in s[2] for s in steps(local.reply))
    assert all(str(t.client_sees.src) == "192.168.1.11" and t.client_sees.sport == 30080 for t in ts)


def test_nodeport_dsr_to_a_remote_backend_is_approximate(tmp_path):
    text = (SAMPLES / "nodeport-external-client.yaml").read_text().replace("lb_mode: snat", "lb_mode: dsr")
    text = text.replace("nodeport-node-a.services.txt", str(SAMPLES / "nodeport-node-a.services.txt"))
    (tmp_path / "env.yaml").write_text(text)
    env = load_environment(str(tmp_path / "env.yaml"))
    world = World(env)
    from analyzer.netfilter.walk import parse_flow
    ts = follow_all(world, "outside", parse_flow("tcp 192.168.1.50:40000 -> 192.168.1.11:30080"))
    remote = next(t for t in ts if str(t.endpoint.dst) == "10.4.27.12")
    assert remote.request.approximate and str(remote.request.end_packet.src) == "192.168.1.50"


def test_lint_env_runs_the_dump_checks_on_each_cilium_node(tmp_path):
    from _golden import run
    (tmp_path / "svc.txt").write_text("ID   Frontend        Service Type   Backend\n"
                                      "7    10.4.26.234:80  ExternalIPs    1 => 10.4.26.11:80\n"
                                      "9    10.96.5.5:80    ClusterIP\n")
    text = (SAMPLES / "seed1-same-node-fixed.yaml").read_text().replace(
        "dumps: [seed1-node-a.services.txt]", f"dumps: [{tmp_path / 'svc.txt'}]")
    (tmp_path / "env.yaml").write_text(text)
    rc, out, _ = run(["lint", "--env", str(tmp_path / "env.yaml")])
    assert rc == 1 and "CIL001" in out and "10.96.5.5:80" in out and "NAT001" not in out
