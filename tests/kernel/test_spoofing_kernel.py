"""The kernel judges FLT003: the FLT003 sample router is built in network namespaces (LAN on
lan0, DMZ on dmz0, the default route on wan0), a TCP SYN with a LAN source (10.0.0.5) is sent
from the wan side to the DMZ's SSH, and it reaches the DMZ exactly when synack reports FLT003
for wan0: with the sample's rules, not with the fixed rules, not with strict rp_filter on wan0
(which drops it in the routing decision, before FORWARD)."""
from __future__ import annotations

from pathlib import Path

import pytest

from analyzer.checks import CheckContext, run_checks
from analyzer.parse.envfile import load_environment
from netns import Lab

pytestmark = pytest.mark.kernel

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "checks" / "FLT003"

CASES = [("router.rules", 0), ("router-fixed.rules", 0), ("router.rules", 1)]


def flt003_on_wan0(tmp_path, rules: str, rp: int) -> bool:
    env = tmp_path / "env.yaml"
    env.write_text(
        "namespaces:\n  router:\n"
        f"    iptables: {SAMPLE / rules}\n"
        "    addresses: [10.0.0.1/24@lan0, 192.0.2.1/24@dmz0, 203.0.113.2/30@wan0]\n"
        "    routes: ['default via 203.0.113.1 dev wan0']\n"
        f"    sysctls: {{net.ipv4.ip_forward: 1, net.ipv4.conf.wan0.rp_filter: {rp}}}\n")
    found = run_checks(CheckContext(None, (), extra={"env": load_environment(str(env))}), ["FLT003"])
    return any(" arriving on wan0 " in d.message for d in found)


@pytest.mark.parametrize("rules,rp", CASES, ids=[f"{r[:-6]}-rp{p}" for r, p in CASES])
def test_spoofed_syn_reaches_the_dmz_exactly_when_flt003_says(rules, rp, lab: Lab, require, tmp_path):
    require("nft", "tcpdump")
    router = lab.netns("router", forwarding=True)
    wan, lan, dmz = lab.netns("wan"), lab.netns("lan"), lab.netns("dmz")
    w = lab.veth(wan, router, addr_a=["203.0.113.1/30", "10.0.0.5/32"], addr_b="203.0.113.2/30",
                 name_b="wan0")
    lab.veth(lan, router, addr_a="10.0.0.2/24", addr_b="10.0.0.1/24", name_b="lan0")
    d = lab.veth(dmz, router, addr_a="192.0.2.10/24", addr_b="192.0.2.1/24", name_b="dmz0")
    router.route("default via 203.0.113.1 dev wan0")
    wan.route("192.0.2.0/24 via 203.0.113.2")
    dmz.route("default via 192.0.2.1")
    lan.route("default via 10.0.0.1")
    router.sysctl({"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.wan0.rp_filter": rp})
    router.iptables_restore((SAMPLE / rules).read_text())
    with dmz.capture(d.a, "tcp dst port 22", timeout=6.0) as cap:
        wan.connect_tcp("192.0.2.10", 22, src="10.0.0.5", timeout=1.0, data=None)
    reached = any(p.src == "10.0.0.5" for p in cap.packets)
    assert w.a.name  # the spoofing namespace's end exists (and owns 10.0.0.5)
    assert reached == flt003_on_wan0(tmp_path, rules, rp), (
        f"kernel: spoofed SYN {'reached' if reached else 'did not reach'} the DMZ; {cap.summary()}")
    assert reached == (rules == "router.rules" and rp == 0)
