"""The kernel harness builds what it claims: each test here replays a flow through real
namespaces and checks what the kernel did (who the server saw, conntrack, rule counters,
packets on the wire). The scenario tests are the kernel's ground truth for NAT001."""

from __future__ import annotations

import os

import pytest

import netns
from netns import Lab, Ns

VIP = "10.96.0.10"

DNAT_VIP_TO_SERVER = f"""\
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d {VIP}/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination {{server}}:8080
{{extra}}COMMIT
"""


def dnat_rules(server: str, extra: str = "") -> str:
    return DNAT_VIP_TO_SERVER.format(server=server, extra=extra)


# ---------------------------------------------------------------------------------------------
# Parsers (no kernel needed)
# ---------------------------------------------------------------------------------------------


def test_probe_without_root_explains_the_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    caps = netns.probe()
    assert not caps.usable and "root" in caps.reason
    assert caps.why_not("nft") == caps.reason


def test_conntrack_extended_output_is_parsed_like_plain() -> None:
    line = ("ipv4     2 udp      17 29 src=10.0.1.2 dst=10.96.0.10 sport=5000 dport=53 "
            "src=10.0.2.2 dst=10.0.1.2 sport=5353 dport=5000 mark=0 use=1")
    (entry,) = netns.parse_conntrack(line)
    assert entry.proto == "udp" and entry.state is None
    assert (entry.reply.src, entry.reply.sport) == ("10.0.2.2", 5353)
    assert entry.dnat and not entry.snat and not entry.unreplied


def test_tcpdump_any_interface_line_carries_interface_and_direction() -> None:
    pkt = netns.parse_tcpdump_line(
        "1700000000.5 sk1b  In  IP 10.0.0.2.40000 > 10.0.0.3.8080: Flags [R], seq 1, "
        "win 0, length 0")
    assert pkt is not None
    assert (pkt.ifname, pkt.direction, pkt.is_rst, pkt.dport) == ("sk1b", "In", True, 8080)


def test_save_counters_number_rules_per_chain() -> None:
    text = "*filter\n[1:2] -A INPUT -j A\n[3:4] -A FORWARD -j B\n[5:6] -A INPUT -j C\nCOMMIT\n"
    got = [(r.chain, r.index, r.packets) for r in netns.parse_save_counters(text)]
    assert got == [("INPUT", 1, 1), ("FORWARD", 1, 3), ("INPUT", 2, 5)]


# ---------------------------------------------------------------------------------------------
# Harness mechanics
# ---------------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_namespaces_and_processes_are_removed_even_when_the_test_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            ns = lab.netns("doomed")
            assert ns.name.startswith(f"synack-{os.getpid()}-") and ns.name.endswith("-doomed")
            server = ns.listen_tcp("127.0.0.1", 8080)
            assert server.process.running()
            raise RuntimeError("boom")
    assert ns.name not in netns.run(["ip", "netns", "list"]).stdout
    assert not server.process.running()
    assert not os.path.exists(lab.workdir)


@pytest.mark.kernel
def test_stale_namespaces_of_dead_runs_are_removed_and_live_ones_kept() -> None:
    gone = netns.run(["sh", "-c", "echo $$"]).stdout.strip()  # a pid that has exited
    stale, alive = f"synack-{gone}-1-stale", f"synack-{os.getpid()}-999-alive"
    try:
        for name in (stale, alive):
            netns.run(["ip", "netns", "add", name])
        removed = netns.remove_stale_namespaces()
        listed = netns.run(["ip", "netns", "list"]).stdout
        assert stale in removed and stale not in listed
        assert alive in listed and alive not in removed
    finally:
        for name in (stale, alive):
            netns.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.kernel
def test_interface_names_fit_ifnamsiz(lab: Lab) -> None:
    a, b = lab.netns("a"), lab.netns("b")
    veth = lab.veth(a, b)
    assert all(len(link.name) <= 15 for link in veth)
    assert veth.a.name in a.links() and veth.b.name in b.links()
    assert a.sysctl_get("net.ipv4.conf.all.rp_filter") == "0"


@pytest.mark.kernel
def test_run_as_uid_uses_that_uid(lab: Lab, require) -> None:
    require("setpriv")
    ns = lab.netns("box")
    assert ns.run(["id", "-u"], uid=1337).stdout.strip() == "1337"
    assert ns.run(["id", "-g"], uid=1337, gid=1338).stdout.strip() == "1338"


# ---------------------------------------------------------------------------------------------
# (1) Two namespaces over a veth
# ---------------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_tcp_server_sees_client_address_over_veth(lab: Lab) -> None:
    client, server = lab.netns("client"), lab.netns("server")
    lab.veth(client, server, addr_a="10.0.0.1/24", addr_b="10.0.0.2/24")
    listener = server.listen_tcp("0.0.0.0", 8080)

    result = client.connect_tcp("10.0.0.2", 8080, data=b"hello")

    assert result.ok, result
    assert result.received == b"hello"
    (conn,) = listener.wait_connections(1)
    assert conn.peer == result.local and conn.peer[0] == "10.0.0.1"
    assert conn.local == ("10.0.0.2", 8080)
    assert conn.data == b"hello"


@pytest.mark.kernel
@pytest.mark.parametrize("static_neighbors", [False, True], ids=["nd", "static-neigh"])
def test_tcp_over_ipv6_veth(lab: Lab, static_neighbors: bool) -> None:
    client, server = lab.netns("client"), lab.netns("server")
    lab.veth(client, server, addr_a="fd00::1/64", addr_b="fd00::2/64",
             static_neighbors=static_neighbors)
    listener = server.listen_tcp("::", 8080)

    result = client.connect_tcp("fd00::2", 8080)

    assert result.ok and result.received == b"hi", result
    (conn,) = listener.wait_connections(1)
    assert conn.peer == ("fd00::1", result.local[1]) and conn.local == ("fd00::2", 8080)


@pytest.mark.kernel
def test_connect_to_closed_port_is_refused(lab: Lab) -> None:
    client, server = lab.netns("client"), lab.netns("server")
    lab.veth(client, server, addr_a="10.0.0.1/24", addr_b="10.0.0.2/24")
    result = client.connect_tcp("10.0.0.2", 9, timeout=1)
    assert result.outcome == "refused" and result.reset and not result.connected


# ---------------------------------------------------------------------------------------------
# (2), (3) A router namespace DNATs a VIP to the server, with each iptables backend
# ---------------------------------------------------------------------------------------------


def build_routed(lab: Lab) -> tuple[Ns, Ns, Ns]:
    """client 10.0.1.2 -- 10.0.1.1 router 10.0.2.1 -- 10.0.2.2 server."""
    client, router, server = lab.netns("client"), lab.netns("router", forwarding=True), \
        lab.netns("server")
    lab.veth(client, router, addr_a="10.0.1.2/24", addr_b="10.0.1.1/24")
    lab.veth(server, router, addr_a="10.0.2.2/24", addr_b="10.0.2.1/24")
    client.route("default via 10.0.1.1")
    server.route("default via 10.0.2.1")
    return client, router, server


@pytest.mark.kernel
def test_router_dnat_of_vip_reaches_server_and_is_tracked(lab: Lab, backend: str,
                                                          require) -> None:
    require("conntrack")
    client, router, server = build_routed(lab)
    router.iptables_restore(dnat_rules("10.0.2.2"), backend=backend)
    listener = server.listen_tcp("0.0.0.0", 8080)

    result = client.connect_tcp(VIP, 80, data=b"ping")

    # The client only ever talks to the VIP: the reply was reverse-translated by the router.
    assert result.ok, result
    assert result.peer == (VIP, 80) and result.received == b"ping"
    (conn,) = listener.wait_connections(1)
    assert conn.peer == result.local  # no SNAT on the way
    assert conn.local == ("10.0.2.2", 8080)
    # The server's own namespace tracks nothing (no rules need conntrack there).
    assert conn.original_dst is None

    (entry,) = [e for e in router.conntrack(proto="tcp") if e.original.sport == result.local[1]]
    assert (entry.original.dst, entry.original.dport) == (VIP, 80)
    assert (entry.reply.src, entry.reply.sport) == ("10.0.2.2", 8080)
    assert entry.dnat and not entry.snat and "ASSURED" in entry.flags

    # The nat table sees only the first packet of a connection.
    assert router.rule_counters("nat", backend=backend) == {("PREROUTING", 1): 1}
    assert "DNAT" in router.counted_rules("nat", backend=backend)[0].rule


@pytest.mark.kernel
def test_udp_dnat_reply_comes_back_from_the_vip(lab: Lab, require) -> None:
    require("nft")
    client, router, server = build_routed(lab)
    router.iptables_restore(
        "*nat\n"
        f"-A PREROUTING -d {VIP}/32 -p udp --dport 53 -j DNAT --to-destination 10.0.2.2:5353\n"
        "COMMIT\n")
    listener = server.listen_udp("0.0.0.0", 5353)

    result = client.send_udp(VIP, 53, b"query", src_port=5000)

    assert result.replied and result.reply == b"query"
    assert result.reply_from == (VIP, 53)
    (dgram,) = listener.wait_datagrams(1)
    assert dgram.peer == ("10.0.1.2", 5000)
    assert dgram.local == ("10.0.2.2", 5353)


@pytest.mark.kernel
def test_trace_shows_the_dnat_rule_in_prerouting(lab: Lab, require) -> None:
    require("nft", "trace")
    client, router, server = build_routed(lab)
    router.iptables_restore(dnat_rules("10.0.2.2"))
    server.listen_tcp("0.0.0.0", 8080)

    with router.trace("-p tcp --dport 80") as trace:
        assert client.connect_tcp(VIP, 80).ok

    dnat = [s for s in trace.steps if (s.table, s.chain, s.kind) == ("nat", "PREROUTING", "rule")]
    assert len(dnat) == 1, trace.lines()
    assert "DNAT" in dnat[0].rule and dnat[0].packet_field("DST") == VIP
    assert "SYN" in dict(dnat[0].packet)


# ---------------------------------------------------------------------------------------------
# Owner match (the sidecar's uid exemption)
# ---------------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_owner_match_applies_to_sockets_of_that_uid(lab: Lab, require) -> None:
    require("nft")
    client, server = lab.netns("client"), lab.netns("server")
    lab.veth(client, server, addr_a="10.0.0.1/24", addr_b="10.0.0.2/24")
    client.iptables_restore(
        "*filter\n"
        "-A OUTPUT -p tcp --dport 8080 -m owner --uid-owner 1337 "
        "-j REJECT --reject-with tcp-reset\n"
        "COMMIT\n")
    server.listen_tcp("0.0.0.0", 8080)

    assert client.connect_tcp("10.0.0.2", 8080).ok
    rejected = client.connect_tcp("10.0.0.2", 8080, uid=1337, timeout=1)
    assert rejected.outcome == "refused", rejected
    assert client.rule_counters("filter") == {("OUTPUT", 1): 1}


# ---------------------------------------------------------------------------------------------
# (4) Seed scenario 1: client and backend on one bridge, the VIP DNAT done on the host
# ---------------------------------------------------------------------------------------------

CLIENT, SERVER, GATEWAY = "10.0.0.2", "10.0.0.3", "10.0.0.1"


def build_bridged_host(lab: Lab, *, nf_call_iptables: bool,
                       extra_rules: str = "") -> tuple[Ns, Ns, Ns, str]:
    """client and server hang off br0 in the host namespace, one /24. The client reaches
    the VIP through the host (its gateway); the host DNATs the VIP to the server; the
    server reaches the client on-link, so its reply is *bridged* by the host, never routed.
    Returns (client, host, server, the client's interface)."""
    host = lab.netns("host", forwarding=True)
    client, server = lab.netns("client"), lab.netns("server")
    c_if, host_c = lab.veth(client, host, addr_a=f"{CLIENT}/24")
    _, host_s = lab.veth(server, host, addr_a=f"{SERVER}/24")
    lab.bridge(host, "br0", ports=[host_c, host_s], addr=f"{GATEWAY}/24",
               nf_call_iptables=nf_call_iptables)
    client.route(f"10.96.0.0/16 via {GATEWAY}")
    server.route(f"default via {GATEWAY}")
    host.iptables_restore(dnat_rules(SERVER, extra_rules))
    return client, host, server, c_if.name


@pytest.mark.kernel
def test_bridged_reply_bypasses_dnat_and_client_resets(lab: Lab, require) -> None:
    """bridge-nf-call-iptables=0: the SYN+ACK is bridged past the host's conntrack, so it
    reaches the client from the backend's real address; the client answers RST."""
    require("nft", "conntrack", "tcpdump", "bridge_nf")
    client, host, server, c_if = build_bridged_host(lab, nf_call_iptables=False)
    listener = server.listen_tcp("0.0.0.0", 8080)

    with client.capture(c_if, "tcp", timeout=6) as cap:
        result = client.connect_tcp(VIP, 80, src_port=40000, timeout=2)
        # the first SYN, the stray SYN+ACK and the RST are on the wire long before timeout
        cap.wait(lambda ps: any(p.is_rst for p in ps), timeout=1)

    assert result.timed_out and not result.connected, result
    syn, synack, rst = cap.packets[:3]
    assert (syn.is_syn, syn.dst, syn.dport, syn.sport) == (True, VIP, 80, 40000)
    assert (synack.is_synack, synack.src, synack.sport) == (True, SERVER, 8080)
    assert (rst.is_rst, rst.src, rst.dst, rst.dport) == (True, CLIENT, SERVER, 8080)
    assert not any(p.is_synack and p.src == VIP for p in cap.packets)
    # The client kept retransmitting its SYN to the VIP, from the same port.
    assert sum(p.is_syn and p.dst == VIP and p.sport == 40000 for p in cap.packets) >= 2

    assert listener.connections() == []  # the handshake never completed
    (entry,) = host.conntrack(proto="tcp")
    assert entry.unreplied and entry.state == "SYN_SENT"
    assert (entry.original.dst, entry.original.dport) == (VIP, 80)
    assert (entry.reply.src, entry.reply.sport) == (SERVER, 8080)
    # Both SYNs belong to one conntrack entry: the nat table saw only the first.
    assert host.rule_counters("nat") == {("PREROUTING", 1): 1}


@pytest.mark.kernel
def test_bridge_nf_call_iptables_reverse_translates_the_bridged_reply(lab: Lab,
                                                                      require) -> None:
    """bridge-nf-call-iptables=1: the bridged SYN+ACK traverses the host's netfilter hooks,
    conntrack matches it to the DNAT entry and rewrites its source back to the VIP."""
    require("nft", "conntrack", "tcpdump", "bridge_nf")
    client, host, server, c_if = build_bridged_host(lab, nf_call_iptables=True)
    listener = server.listen_tcp("0.0.0.0", 8080)

    with client.capture(c_if, "tcp", timeout=5) as cap:
        result = client.connect_tcp(VIP, 80, data=b"hi")

    assert result.ok and result.received == b"hi", result
    synacks = [p for p in cap.packets if p.is_synack]
    assert [(p.src, p.sport) for p in synacks] == [(VIP, 80)]
    assert not any(p.is_rst for p in cap.packets)
    (conn,) = listener.wait_connections(1)
    assert conn.peer == (CLIENT, result.local[1])
    (entry,) = host.conntrack(proto="tcp")
    assert not entry.unreplied and (entry.reply.src, entry.reply.sport) == (SERVER, 8080)
    assert host.rule_counters("nat") == {("PREROUTING", 1): 1}


@pytest.mark.kernel
def test_masquerade_forces_the_reply_back_through_the_translating_host(lab: Lab,
                                                                       require) -> None:
    """The fix without br_netfilter: SNAT the DNATed flow so the server answers the host."""
    require("nft", "conntrack", "bridge_nf")
    masquerade = "-A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE\n"
    client, host, server, _ = build_bridged_host(lab, nf_call_iptables=False,
                                                 extra_rules=masquerade)
    listener = server.listen_tcp("0.0.0.0", 8080)

    result = client.connect_tcp(VIP, 80)

    assert result.ok, result
    (conn,) = listener.wait_connections(1)
    assert conn.peer[0] == GATEWAY  # the server sees the host, and answers it
    (entry,) = host.conntrack(proto="tcp")
    assert entry.dnat and entry.snat and entry.reply.dst == GATEWAY
    assert host.rule_counters("nat") == {("PREROUTING", 1): 1, ("POSTROUTING", 1): 1}
