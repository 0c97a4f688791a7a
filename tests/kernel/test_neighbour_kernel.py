"""IPv6 neighbour discovery between the namespaces of an environment, judged by the kernel.

Each sample (samples/env/ipv6-*-nd-*.yaml, ipv6-client-na-dropped.yaml) is rebuilt in real
namespaces with real neighbour discovery (no static entries), under both iptables backends, and
a real TCP connect is made from the client. synack's environment walk of the same file must say
the same: the connection works, or the journey ends "no-neighbour" in the namespace whose next
hop stays unresolved (and then no SYN leaves that namespace). The wire facts the model rests on
are checked too:

- a solicitation is sent with hop limit 255 to the target's solicited-node group, from the
  waiting packet's source when that is an address of the output interface (the client's
  fd01::2), else from the interface's link-local address (the router forwarding to fd02::2);
- conntrack keeps no entry for neighbour discovery (nf_conntrack_icmpv6_error: UNTRACKED);
- the model assumes empty neighbour caches: the lab starts with none (build_env adds no static
  entries), and the client's entry for its router ends FAILED when the exchange fails.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from analyzer.crosshost import World, follow_all
from analyzer.netfilter.neighbour import solicited_node
from analyzer.netfilter.walk import parse_flow
from analyzer.parse.envfile import load_environment
from envlab import build_env

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
#: sample -> the next hop the client solicits
SAMPLES = {"ipv6-router-nd-dropped": "fd01::1", "ipv6-router-nd-accepted": "fd01::1",
           "ipv6-client-na-dropped": "fd01::1", "ipv6-bridge-nd-dropped": "fd03::b"}
#: a failing exchange sends 3 solicitations, 1 s apart, before giving up
CONNECT_TIMEOUT = 5.0


@pytest.mark.parametrize("name", SAMPLES)
def test_kernel_agrees_on_neighbour_discovery(name: str, lab, require, backend: str) -> None:
    require("tcpdump")
    path = ROOT / "samples" / "env" / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    if any("bridge" in link for link in doc.get("links") or []):
        require("bridge_nf")
    ex = doc["examples"][0]
    flow = parse_flow(ex["flow"])
    [trip] = follow_all(World(load_environment(str(path))), ex["from"], flow)
    req = trip.request
    ok = trip.client_sees is not None and (trip.client_sees.src, trip.client_sees.sport) == (flow.dst, flow.dport)
    predicted = "ok" if ok else req.end
    assert predicted in ("ok", "no-neighbour"), (req.end, req.detail)

    envlab = build_env(lab, str(path), backend=backend)
    client = envlab[ex["from"]]
    router = envlab.ns.get("router")
    nd = "icmp6 and ip6[7] = 255 and ip6[40] = 135"   # solicitations with hop limit 255
    with client.capture("eth0", f"tcp port {flow.sport} or ({nd})", timeout=CONNECT_TIMEOUT + 4) as cap, \
            (router or client).capture("eth1" if router else "lo", nd, timeout=CONNECT_TIMEOUT + 4) as rcap:
        res = client.connect_tcp(str(flow.dst), flow.dport, src=str(flow.src), src_port=flow.sport,
                                 timeout=CONNECT_TIMEOUT)
    why = (f"\nsynack: {req.end} {req.detail}\nkernel: {res}\nclient eth0:\n  " + "\n  ".join(cap.lines)
           + "\nrouter eth1:\n  " + "\n  ".join(rcap.lines))
    syns = [p for p in cap.packets if p.proto == "tcp" and (p.src, p.sport) == (str(flow.src), flow.sport)]
    gateway = SAMPLES[name]
    # the client solicits its router from the SYN's own source, to the solicited-node group
    group = str(solicited_node(ipaddress.ip_address(gateway)))
    assert any(f"{flow.src} > {group}" in line and f"who has {gateway}" in line for line in cap.lines), why

    if predicted == "ok":
        assert router is not None
        assert res.ok and tuple(res.peer) == (str(flow.dst), flow.dport), why
        # the router forwards the SYN: its solicitation for the server comes from its link-local
        # address (the SYN's source is not one of its own), hop limit 255
        sol = [line for line in rcap.lines if "who has fd02::2" in line]
        assert sol and all(line.split()[2].startswith("fe80:") for line in sol), why
        # the server answers via fd02::1, which it has not learned (the router solicited it from
        # its link-local address): it solicits fd02::1 from the SYN+ACK's source, as synack says
        back = [line for line in rcap.lines if "who has fd02::1" in line]
        assert back and all(line.split()[2] == "fd02::2" for line in back), why
        rep = trip.reply.hops[0].steps
        assert any(st.verdict == "server solicits fd02::1 on eth0 from fd02::2; router holds it on eth1"
                   for st in rep), rep
        # neighbour discovery leaves no conntrack entry (UNTRACKED); the TCP connection has one
        # only where a rule needs conntrack (the router's INPUT uses --ctstate)
        assert not router.conntrack(family="ipv6", proto="icmpv6"), why
    else:
        assert req.end_ns == ex["from"], why
        # after 3 unanswered solicitations, 1 s apart, the entry FAILS and the kernel reports
        # "address unreachable" to the waiting socket: connect() fails with EHOSTUNREACH
        assert res.outcome == "unreachable" and res.error == "EHOSTUNREACH", why
        assert 2.5 <= res.elapsed <= CONNECT_TIMEOUT, why
        assert not syns, "synack says the SYN never leaves the client" + why
        neigh = client.run(["ip", "-6", "neigh", "show", gateway]).stdout
        assert "FAILED" in neigh or "INCOMPLETE" in neigh, neigh + why


#: the client's OUTPUT rule -> whether its solicitation still leaves. Neighbour discovery is sent
#: from the kernel's ndisc socket, which has no file: xt_owner matches it only through negated
#: uid/gid options, and --socket-exists matches it.
OWNER_RULES = {
    "-p ipv6-icmp -m owner --uid-owner 0 -j DROP": "ok",
    "-p ipv6-icmp -m owner ! --uid-owner 0 -j DROP": "no-neighbour",
    "-p ipv6-icmp -m owner --socket-exists -j DROP": "no-neighbour",
}


@pytest.mark.parametrize("rule", OWNER_RULES)
def test_owner_match_on_neighbour_discovery(rule: str, lab, require, backend: str, tmp_path: Path) -> None:
    require("tcpdump")
    doc = yaml.safe_load((ROOT / "samples" / "env" / "ipv6-router-nd-accepted.yaml").read_text())
    doc["namespaces"]["router"]["ip6tables"] = str(ROOT / "samples" / "env" / "ipv6-router-nd-accepted.rules")
    (tmp_path / "client.rules").write_text(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        f"-A OUTPUT {rule}\nCOMMIT\n")
    doc["namespaces"]["client"]["ip6tables"] = "client.rules"
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    flow = parse_flow(doc["examples"][0]["flow"])
    [trip] = follow_all(World(load_environment(str(path))), "client", flow)
    predicted = "ok" if trip.client_sees is not None else trip.request.end
    assert predicted == OWNER_RULES[rule], (trip.request.end, trip.request.detail)
    assert not trip.request.approximate, trip.request.hops[0].approx

    envlab = build_env(lab, str(path), backend=backend)
    res = envlab["client"].connect_tcp(str(flow.dst), flow.dport, src=str(flow.src), src_port=flow.sport,
                                       timeout=CONNECT_TIMEOUT)
    if predicted == "ok":
        assert res.ok, res
    else:
        # the "address unreachable" the kernel then sends the socket is ICMPv6 from a kernel
        # socket too, and these rules drop it in OUTPUT as well: the connect times out instead
        assert res.outcome in ("unreachable", "timeout") and not res.connected, res
