"""TPROXY: synack says the connection ends at the transparent proxy in the router, which answers
as the original destination; the kernel, with the policy routing TPROXY needs and a real
IP_TRANSPARENT listener, does the same (the server behind the router never sees the SYN)."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from analyzer.explain import explain_flow
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.walk import parse_flow
from analyzer.parse import load_path

pytestmark = pytest.mark.kernel
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "samples" / "explain" / "tproxy.rules"

PROXY = r"""
import json, socket, sys, time
cfg = json.loads(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", cfg["port"]))
s.listen(8)
s.settimeout(cfg["lifetime"])
out = open(cfg["log"], "a")
print(json.dumps({"event": "listening"}), file=out, flush=True)
deadline = time.monotonic() + cfg["lifetime"]
while time.monotonic() < deadline:
    try:
        c, peer = s.accept()
    except socket.timeout:
        break
    print(json.dumps({"event": "accept", "peer": list(peer), "local": list(c.getsockname())}), file=out, flush=True)
    c.settimeout(2)
    try:
        data = c.recv(100)
        c.sendall(data)
    except OSError:
        pass
    c.close()
"""


def test_tproxy_connection_ends_at_the_transparent_proxy(lab, tmp_path):
    client, router, server = lab.netns("client"), lab.netns("router", forwarding=True), lab.netns("server")
    lab.veth(client, router, addr_a="10.0.1.2/24", addr_b="10.0.1.1/24", name_b="r1")
    lab.veth(server, router, addr_a="10.0.2.2/24", addr_b="10.0.2.1/24", name_b="r2")
    client.route("default via 10.0.1.1")
    server.route("default via 10.0.2.1")
    router.run(["ip", "rule", "add", "fwmark", "0x1/0x1", "lookup", "100"])
    router.run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"])
    router.iptables_restore(RULES.read_text(), backend="nft")
    server.listen_tcp("0.0.0.0", 80)
    log = tmp_path / "proxy.jsonl"
    router.spawn(["python3", "-c", PROXY, json.dumps({"port": 15006, "lifetime": 8, "log": str(log)})],
                 name="tproxy", lifetime=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (log.exists() and "listening" in log.read_text()):
        time.sleep(0.05)

    # synack's prediction for the router namespace
    ns = Namespace()
    ns.add_addr("10.0.1.1/24", "r1")
    ns.add_addr("10.0.2.1/24", "r2")
    (oc,) = explain_flow(load_path(str(RULES)).ruleset,
                         replace(parse_flow("tcp 10.0.1.2:41000 -> 10.0.2.2:80"), iif="r1"), ns)
    assert oc.disposition == "delivered" and "15006" in oc.detail
    assert oc.reply_ok and str(oc.client_sees.src) == "10.0.2.2" and oc.client_sees.sport == 80

    res = client.connect_tcp("10.0.2.2", 80, src_port=41000, data=b"hi", timeout=2)
    assert res.outcome == "ok" and res.received == b"hi", res
    events = [json.loads(l) for l in log.read_text().splitlines()]
    acc = [e for e in events if e["event"] == "accept"]
    assert acc and acc[0]["local"] == ["10.0.2.2", 80] and acc[0]["peer"][0] == "10.0.1.2"
