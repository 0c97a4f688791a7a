"""`synack explain` on the samples and on kube-proxy's own TestTracePackets expectations."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from analyzer.explain import explain_flow, render_json
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.walk import parse_flow
from analyzer.parse import load_ruleset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "samples")
KUBE = "/work/shared/corpus/iptables/kube-proxy"
TRACE_FLOWS = os.path.join(KUBE, "proxier_test__TestTracePackets.flows.json")


def _load(path):
    with open(path) as fh:
        return load_ruleset((fh.read(), path)).ruleset


def _explain(rules, flow, addrs=(), routes=(), iif="eth0", local=False, uid=None,
             gid=None):
    ns = Namespace()
    for cidr, iface in addrs:
        ns.add_addr(cidr, iface)
    for r in routes:
        ns.add_route(r)
    pkt = parse_flow(flow)
    pkt = replace(pkt, uid=uid, gid=gid) if local else replace(pkt, iif=iif)
    return pkt, explain_flow(rules, pkt, ns, local=local)


def test_seed1_hairpin_reply_bypasses_translation():
    rules = _load(os.path.join(SAMPLES, "seed1-hairpin-host.rules"))
    _, (oc,) = _explain(rules, "tcp 10.4.26.45:35582 -> 10.4.26.234:80",
                        addrs=[("10.4.26.234/24", "eth0")])
    assert oc.disposition == "forwarded"
    assert (str(oc.forward.pkt.dst), oc.forward.pkt.dport) == ("10.4.26.11", 80)
    assert oc.forward.ct.dnat and not oc.forward.ct.snat
    # the backend answers the client on-link, from its own address: the client resets it
    assert oc.reply_ok is False
    assert str(oc.client_sees.src) == "10.4.26.11"


def test_seed2_sidecar_redirect_terminates_locally():
    rules = _load(os.path.join(SAMPLES, "seed2-sidecar-pod.rules"))
    _, (oc,) = _explain(rules, "tcp 10.6.2.2:51136 -> 10.7.3.3:8080",
                        addrs=[("10.7.3.3/24", "eth0")])
    assert oc.disposition == "delivered"
    assert oc.forward.pkt.dport == 15001
    assert oc.forward.ct.reply_sport == 15001 and oc.forward.ct.dnat
    assert oc.reply_ok is True and oc.client_sees.sport == 8080
    assert [s.where for s in oc.forward.steps if ":rule:" in s.where][-1].startswith("nat:")


def test_seed2_sidecar_own_traffic_is_exempt_by_uid():
    rules = _load(os.path.join(SAMPLES, "seed2-sidecar-pod.rules"))
    # the sidecar's own connection out (uid 1337) RETURNs before ISTIO_REDIRECT
    _, (oc,) = _explain(rules, "tcp 10.7.3.3:40000 -> 10.9.9.9:80",
                        addrs=[("10.7.3.3/24", "eth0")], routes=["default via 10.7.3.1 dev eth0"],
                        local=True, uid=1337)
    assert (str(oc.forward.pkt.dst), oc.forward.pkt.dport) == ("10.9.9.9", 80)
    # traffic to a local address leaves via lo and is redirected whoever sends it (rule 1)
    _, (oc,) = _explain(rules, "tcp 10.7.3.3:40000 -> 10.7.3.3:8080",
                        addrs=[("10.7.3.3/24", "eth0")], local=True, uid=1337)
    assert oc.forward.pkt.dport == 15001
    _, (oc,) = _explain(rules, "tcp 10.7.3.3:40000 -> 10.9.9.9:80",
                        addrs=[("10.7.3.3/24", "eth0")], routes=["default via 10.7.3.1 dev eth0"],
                        local=True, uid=1000, gid=1000)
    assert oc.forward.pkt.dport == 15001


def test_masquerade_to_the_address_already_used_is_not_snat():
    rules = load_ruleset(("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                          ":POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n", "m.rules")).ruleset
    _, (oc,) = _explain(rules, "tcp 10.0.2.1:40000 -> 10.0.2.2:80", addrs=[("10.0.2.1/24", "eth1")],
                        local=True)
    assert not oc.forward.ct.snat  # the kernel sets IPS_SRC_NAT only when the tuple changes


def test_no_rule_needing_conntrack_means_no_entry():
    rules = load_ruleset(("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                          "-A FORWARD -p tcp --dport 22 -j ACCEPT\nCOMMIT\n", "f.rules")).ruleset
    pkt, outs = _explain(rules, "tcp 10.0.1.2:40000 -> 10.0.2.2:22",
                         addrs=[("10.0.1.1/24", "eth0"), ("10.0.2.1/24", "eth1")])
    assert not outs[0].forward.ct.in_use
    doc = json.loads(render_json(pkt, outs))
    assert doc["outcomes"][0]["request"]["hops"][0]["conntrack"] == {"state": "not-in-use"}


def test_json_output_schema():
    path = os.path.join(SAMPLES, "seed2-sidecar-pod.rules")
    out = subprocess.run([sys.executable, "-m", "analyzer", "explain", path, "--flow",
                          "tcp 10.6.2.2:51136 -> 10.7.3.3:8080", "--from-iface", "eth0",
                          "--addr", "10.7.3.3/24@eth0", "-o", "json"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    assert doc["schema_version"]
    (oc,) = doc["outcomes"]
    (hop,) = oc["request"]["hops"]
    rule_steps = [s for s in hop["steps"] if s["rule"] is not None]
    assert rule_steps and all(isinstance(s["rule"]["line"], int) for s in rule_steps)
    assert [s["kind"] for s in rule_steps][-1] == "REDIRECT"
    assert rule_steps[-1]["packet_after"]["dport"] == 15001 and rule_steps[-1]["packet_before"]["dport"] == 8080
    assert hop["conntrack"]["original"]["dport"] == 8080
    assert hop["conntrack"]["reply"]["sport"] == 15001
    assert oc["client_sees"]["sport"] == 8080
    assert oc["matches_dialled"] is True


def _trace_flows():
    if not os.path.exists(TRACE_FLOWS):
        return []
    with open(TRACE_FLOWS) as fh:
        doc = json.load(fh)
    return [pytest.param(doc, f, id=f["name"]) for f in doc["flows"]]


@pytest.mark.parametrize("doc, flow", _trace_flows() or
                         [pytest.param(None, None, marks=pytest.mark.skip("corpus absent"))])
def test_kube_proxy_trace_packets(doc, flow):
    """Kubernetes' own expectations (TestTracePackets): DNAT destinations over every statistic
    branch, terminal verdicts, and whether KUBE-MARK-MASQ leads to MASQUERADE."""
    rules = _load(os.path.join(KUBE, doc["rules_file"]))
    ns_addrs = [(a, ifc) for ifc, lst in doc["node"]["local_addresses_for_addrtype_LOCAL"].items()
                for a in lst if ":" not in a]
    src = ipaddress.ip_address(flow["sourceIP"])
    local = any(ipaddress.ip_interface(a).ip == src for a, _ in ns_addrs)
    _, outs = _explain(rules, f"tcp {flow['sourceIP']}:40000 -> {flow['destIP']}:{flow['destPort']}",
                       addrs=ns_addrs, routes=["default via 192.168.0.1 dev eth0"], local=local)
    want = flow["output"]
    if want in ("DROP", "REJECT"):
        assert {o.disposition for o in outs} == {"dropped" if want == "DROP" else "rejected"}
    elif want == "ACCEPT":
        assert {o.disposition for o in outs} == {"delivered"}
        assert not any(o.forward.ct.dnat for o in outs)
    else:
        got = {f"{o.forward.pkt.dst}:{o.forward.pkt.dport}" for o in outs if o.forward.ct.dnat}
        assert got == {d.strip() for d in want.split(",") if d.strip()}
    masq = any(s.verdict.startswith("MASQUERADE") for o in outs for s in o.forward.steps)
    assert masq == flow["masq"]


# ---- kernel facts of issue 7 (each also a kernel test in tests/kernel/test_explain_kernel.py) ----

def _security_nat_input(backend_header: str | None, backend: str | None = None):
    from analyzer.netfilter.walk import Walker

    text = open(os.path.join(SAMPLES, "explain", "security-nat-input-nft.rules")).read()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("# Generated by"))
    if backend_header:
        text = backend_header + "\n" + text
    rs = load_ruleset((text, "x.rules")).ruleset
    ns = Namespace()
    ns.add_addr("10.0.1.1/24", "sk1b")
    flow = replace(parse_flow("tcp 10.0.1.2:41000 -> 10.0.1.1:8080"), iif="sk1b")
    (oc,) = explain_flow(rs, flow, ns, walker=Walker(rs, ns, backend=backend))
    return [s.where for s in oc.forward.steps if s.where.startswith(("security:", "nat:INPUT", "stages:"))]


def test_security_input_runs_after_nat_input_on_nft_and_before_on_legacy():
    nft = "# Generated by iptables-save v1.8.10 (nf_tables) on Mon Dec  1 10:00:00 2025"
    legacy = "# Generated by iptables-legacy-save v1.8.7 on Mon Dec  1 10:00:00 2025"
    assert _security_nat_input(nft) == ["nat:INPUT:rule:1", "security:INPUT:rule:2"]
    assert _security_nat_input(legacy) == ["security:INPUT:rule:1", "nat:INPUT:rule:1"]
    # no header: nft, and the trace says it assumed so; --backend overrides
    assert _security_nat_input(None) == ["stages:INPUT", "nat:INPUT:rule:1", "security:INPUT:rule:2"]
    assert _security_nat_input(None, "legacy") == ["security:INPUT:rule:1", "nat:INPUT:rule:1"]


def test_masquerade_to_ports_keeps_a_source_port_inside_the_range():
    rs = _load(os.path.join(SAMPLES, "explain", "masquerade-to-ports.rules"))
    ns = Namespace()
    ns.add_addr("10.0.1.1/24", "sk1b")
    ns.add_addr("10.0.2.1/24", "sk2b")
    ns.add_route("default via 10.0.2.2 dev sk2b")
    flow = replace(parse_flow("tcp 10.0.1.2:41000 -> 10.0.2.2:8080"), iif="sk1b")
    (oc,) = explain_flow(rs, flow, ns)
    assert (str(oc.forward.pkt.src), oc.forward.pkt.sport, oc.confidence) == ("10.0.2.1", 41000, "EXACT")


def test_lone_ack_is_new_with_tcp_loose_and_invalid_without():
    rs = _load(os.path.join(SAMPLES, "explain", "lone-ack.rules"))
    for loose, want in ((1, "forwarded"), (0, "dropped")):
        ns = Namespace(sysctls={"net.netfilter.nf_conntrack_tcp_loose": loose})
        ns.add_addr("10.0.1.1/24", "sk1b")
        ns.add_addr("10.0.2.1/24", "sk2b")
        ns.add_route("default via 10.0.2.2 dev sk2b")
        flow = replace(parse_flow("tcp 10.0.1.2:41000 -> 10.99.0.1:80 flags ACK"), iif="sk1b")
        (oc,) = explain_flow(rs, flow, ns)
        assert oc.disposition == want and oc.forward.ct.invalid == (loose == 0)
