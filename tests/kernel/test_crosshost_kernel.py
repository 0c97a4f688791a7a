"""The kernel judges `synack explain --env`: every sample environment is rebuilt in real network
namespaces (:mod:`envlab`), the flows its docs explain are run for real with a capture in the
client's namespace, and the client's experience must be what synack's verdict says:

- NAT001, reply bypasses translation: SYN, a SYN+ACK from the backend's address (the one synack
  says the client sees), the client's RST to it, and the connect times out. The hairpin form
  of NAT001 (the translated request comes back to the client itself without SNAT): the kernel
  drops it as a martian source, so there is no SYN+ACK at all and the connect times out;
- NAT003, split connection whose second leg fails: the handshake completes (with the dialled
  address), the client sends data and gets RST; the proxy's own connection failed the way
  synack says (refused by the app port, or looped back into the proxy);
- NAT002 or a request that never arrives: no SYN+ACK from anywhere, the connect times out;
- nothing: the connection works end to end (the echo comes back), the SYN+ACK comes from the
  dialled address, and the server synack names sees the peer address synack says it sees.

Flows: each sample's ``examples:`` (the flows the docs and goldens explain); FLOWS below holds
them for samples that do not list any. The kubeproxy samples also run as a copy with the hairpin
mode of the bridge ports flipped (``hairpin: true`` is what kubelet/CNI ``hairpinMode`` sets):
without it, with br_netfilter, the bridge drops a pod's frame DNATed back to its own port,
whatever the nat table says.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from analyzer.checks.nat import findings
from analyzer.crosshost import World, follow, follow_all
from analyzer.netfilter.walk import parse_flow
from analyzer.parse.envfile import load_environment
from envlab import ProxyServer, build_env
from netns import Lab, Packet, TcpResult, wait_until

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
DATA = b"GET / HTTP/1.0\r\n\r\n"
#: A connect that synack says fails must fail within this (one SYN retransmission fits in it).
CONNECT_TIMEOUT = 1.5

#: The flows of docs/tutorial.md, for samples without ``examples:``.
FLOWS: dict[str, list[dict]] = {
    "seed1-broken": [{"from": "client", "flow": "tcp 10.4.26.45:35582 -> 10.4.26.234:80"}],
    "seed1-fixed-masquerade": [{"from": "client", "flow": "tcp 10.4.26.45:35582 -> 10.4.26.234:80"}],
    "seed1-fixed-br-netfilter": [{"from": "client", "flow": "tcp 10.4.26.45:35582 -> 10.4.26.234:80"}],
    "kubeproxy-hairpin": [{"from": "pod-a", "flow": "tcp 10.244.0.5:40000 -> 10.96.0.10:80"}],
    "kubeproxy-hairpin-broken": [{"from": "pod-a", "flow": "tcp 10.244.0.5:40000 -> 10.96.0.10:80"}],
    "seed2-app-down": [{"from": "client", "flow": "tcp 10.7.2.2:51136 -> 10.7.3.3:8080"}],
    "seed2-app-up": [{"from": "client", "flow": "tcp 10.7.2.2:51136 -> 10.7.3.3:8080"}],
    "seed2-no-owner-exemption": [{"from": "pod", "flow": "tcp 10.7.3.3:40000 -> 10.7.4.4:443", "uid": 1000}],
    "seed2-outbound-ok": [{"from": "pod", "flow": "tcp 10.7.3.3:40000 -> 10.7.4.4:443", "uid": 1000}],
    "two-node-routed": [{"from": "client", "flow": "tcp 192.168.0.10:40000 -> 192.168.0.100:80"}],
}

#: Samples whose connection forks (kube-proxy's random endpoint choice): the kernel picks an
#: endpoint per connection, so they are checked per endpoint by
#: test_kernel_agrees_with_every_endpoint below, not by the one-outcome test.
MULTI_ENDPOINT = ("kubeproxy-local-endpoint-first", "kubeproxy-remote-endpoint-first",
                  "kubeproxy-three-endpoints")

#: Samples also run, as a generated copy, with the hairpin mode of their bridge ports flipped.
HAIRPIN_TOGGLE = ("kubeproxy-hairpin", "kubeproxy-hairpin-broken")


def _hairpin_of(doc: dict) -> bool:
    return any(bool(link["bridge"].get("hairpin")) for link in doc.get("links") or []
               if isinstance(link, dict) and isinstance(link.get("bridge"), dict))


@dataclass(frozen=True)
class Case:
    id: str
    env: Path
    start: str
    flow: str
    uid: int | None = None
    hairpin: bool | None = None  # run a copy with the bridge ports' hairpin mode set to this


def _cases() -> list[Case]:
    out: list[Case] = []
    envs = sorted((ROOT / "samples" / "env").glob("*.yaml"))
    envs += sorted((ROOT / "samples" / "checks").glob("NAT*/*.yaml"))
    for path in envs:
        name = path.stem if path.parent.name == "env" else f"{path.parent.name}-{path.stem}"
        doc = yaml.safe_load(path.read_text()) or {}
        examples = doc.get("examples") or FLOWS.get(name, [])
        if name in MULTI_ENDPOINT:
            continue
        if not examples:  # a sample nobody told us how to exercise: make it visible
            out.append(Case(f"{name}:no-flow", path, "", ""))
        for ex in examples:
            out.append(Case(f"{name}:{ex['from']}", path, ex["from"], ex["flow"], ex.get("uid")))
            if path.stem in HAIRPIN_TOGGLE and path.parent.name == "env":
                flip = not _hairpin_of(doc)
                out.append(Case(f"{name}+hairpin-{'on' if flip else 'off'}:{ex['from']}", path,
                                ex["from"], ex["flow"], ex.get("uid"), hairpin=flip))
    return out


CASES = _cases()


def _hairpin_copy(path: Path, tmp: Path, hairpin: bool) -> Path:
    """The environment with ``hairpin: <hairpin>`` on every bridge and absolute dump paths."""
    doc = yaml.safe_load(path.read_text())
    for spec in doc["namespaces"].values():
        for key in ("iptables", "ip6tables"):
            files = (spec or {}).get(key)
            if isinstance(files, str):
                spec[key] = str((path.parent / files).resolve())
            elif files:
                spec[key] = [str((path.parent / f).resolve()) for f in files]
    for link in doc.get("links") or []:
        if "bridge" in link:
            link["bridge"]["hairpin"] = hairpin
    out = tmp / f"{path.stem}-hairpin-{'on' if hairpin else 'off'}.yaml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


# ---------------------------------------------------------------------------------------------
# synack's side
# ---------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    shape: str        # bypass | martian | split | lost | dropped | refused | no-neighbour | ok
    codes: list[str]
    trip: object
    summary: str


def synack_verdict(env_path: Path, case: Case) -> Verdict:
    env = load_environment(str(env_path))
    world = World(env)
    trip = follow(world, case.start, parse_flow(case.flow), uid=case.uid, gid=case.uid)
    codes = sorted({d.code for d in findings(world, trip)})
    req = trip.request
    if "NAT001" in codes:
        shape = "bypass" if trip.client_sees is not None else "martian"
    elif "NAT003" in codes:
        shape = "split"
    elif "NAT002" in codes:
        shape = "lost"
    elif req.end == "refused":
        shape = "refused"
    elif req.end == "no-neighbour":
        shape = "no-neighbour"
    elif req.end != "delivered":
        shape = "dropped"
    elif trip.client_sees is not None and (trip.client_sees.src, trip.client_sees.sport) == \
            (trip.flow.dst, trip.flow.dport):
        shape = "ok"
    else:  # delivered, no finding, yet not a clean reply: say so rather than guess
        shape = f"unclassified({req.end}, reply={trip.reply and trip.reply.end})"
    sees = trip.client_sees.tuple_str() if trip.client_sees is not None else f"nothing ({req.end} in {req.end_ns})"
    return Verdict(shape, codes, trip, f"{','.join(codes) or 'clean'}; client sees {sees}")


# ---------------------------------------------------------------------------------------------
# the kernel's side
# ---------------------------------------------------------------------------------------------


def _length(p: Packet) -> int:
    tail = p.raw.rsplit("length ", 1)
    try:
        return int(tail[1].split()[0].rstrip(":,")) if len(tail) == 2 else 0
    except ValueError:
        return 0


def _reset_after_connect(res: TcpResult) -> bool:
    # The proxy's RST can land before the client's shutdown(SHUT_WR) (ENOTCONN) or send (EPIPE).
    return res.connected and (res.outcome == "reset"
                              or res.error in ("ECONNRESET", "ENOTCONN", "EPIPE"))


def _kernel_summary(res: TcpResult, packets: list[Packet]) -> str:
    wire = " ".join(f"{p.src}.{p.sport}>{p.dst}.{p.dport}[{p.flags}]" for p in packets[:8])
    return f"{res.outcome}{'/' + res.error if res.error else ''}; {wire}"


def _server_for(envlab, ns: str, port: int):
    return envlab.servers.get((ns, port))


def test_every_sample_environment_has_a_flow() -> None:
    missing = [c.env.name for c in CASES if not c.flow]
    assert not missing, f"no flow to run for {missing}: add 'examples:' to the sample or to FLOWS"


@pytest.mark.parametrize("case", [c for c in CASES if c.flow], ids=lambda c: c.id)
def test_kernel_agrees_with_synack(case: Case, lab: Lab, require, tmp_path: Path) -> None:
    require("nft", "tcpdump")
    env_path = case.env if case.hairpin is None else _hairpin_copy(case.env, tmp_path, case.hairpin)
    doc = yaml.safe_load(env_path.read_text())
    if any("bridge" in link or "segment" in link for link in doc.get("links") or []):
        require("bridge_nf")
    verdict = synack_verdict(env_path, case)
    trip = verdict.trip
    env = load_environment(str(env_path))
    assert len(follow_all(World(env), case.start, parse_flow(case.flow), uid=case.uid, gid=case.uid)) == 1, \
        "this connection forks: add the sample to MULTI_ENDPOINT (checked per endpoint)"
    flow = trip.flow
    dialled = (str(flow.dst), flow.dport)

    envlab = build_env(lab, str(env_path))
    client = envlab[case.start]
    with client.capture("any", f"tcp port {flow.sport}", timeout=CONNECT_TIMEOUT * 2 + 4) as cap:
        res = client.connect_tcp(str(flow.dst), flow.dport, src=str(flow.src), src_port=flow.sport,
                                 data=DATA, timeout=CONNECT_TIMEOUT, uid=case.uid, gid=case.uid)
    packets = [p for p in cap.packets if p.proto == "tcp"]
    mine = str(flow.src), flow.sport
    to_client = [p for p in packets if p.dport == flow.sport and p.sport != flow.sport]
    from_client = [p for p in packets if (p.src, p.sport) == mine]
    synacks = [p for p in to_client if p.is_synack]
    row = (f"{case.id:42} synack: {verdict.shape:8} {verdict.summary} || kernel: "
           f"{_kernel_summary(res, packets)}")
    print("\n" + row)
    why = f"\n{row}\nsynack trip end: {trip.request.end} {trip.request.detail}\ncapture:\n  " + \
          "\n  ".join(cap.lines)

    if verdict.shape == "bypass":
        seen = (str(trip.client_sees.src), trip.client_sees.sport)
        assert seen != dialled
        assert any(p.is_syn for p in from_client), why
        assert synacks, f"synack predicts a SYN+ACK from {seen}; none came" + why
        assert {(p.src, p.sport) for p in synacks} == {seen}, why
        first = synacks[0]
        assert any(p.is_rst and (p.dst, p.dport) == seen and p.time >= first.time
                   for p in from_client), "the client did not reset the stray SYN+ACK" + why
        assert res.outcome == "timeout", why

    elif verdict.shape in ("martian", "lost", "dropped"):
        assert any(p.is_syn for p in from_client), why
        rep = trip.reply
        if verdict.shape == "lost" and rep is not None and rep.end_ns == case.start:
            # the reply dies inside the client's own stack (rp_filter, martian): the SYN+ACK is on
            # the client's wire, but the client never answers it, neither ACK nor RST
            assert synacks, "synack says the reply reaches the client before being dropped" + why
            assert not any(p.is_rst for p in from_client), why
            assert not any(p.flags == "." and (p.dst, p.dport) == dialled for p in from_client), why
        else:
            assert not synacks, f"synack says no SYN+ACK reaches the client ({verdict.shape})" + why
        assert res.outcome == "timeout", why
        req = trip.request
        if req.end_packet is not None and verdict.shape != "lost":
            # where synack says the request dies: back in the client's own namespace (martian),
            # or elsewhere, in which case its translated form never reaches the client
            back = [p for p in from_client if p.is_syn
                    and (p.dst, p.dport) == (str(req.end_packet.dst), req.end_packet.dport)
                    and (p.dst, p.dport) != dialled]
            if req.end_ns == case.start:
                assert back, "synack says the translated SYN comes back to the client" + why
            else:
                assert not back, f"synack says the request dies in {req.end_ns}" + why

    elif verdict.shape == "refused":
        assert res.outcome == "refused", why

    elif verdict.shape == "no-neighbour":
        # the next hop never resolves: the SYN waits in the neighbour queue and never leaves that
        # namespace (after 3 solicitations the sender is told EHOSTUNREACH; CONNECT_TIMEOUT is
        # shorter than that)
        assert res.outcome in ("timeout", "unreachable"), why
        assert not synacks, why
        if trip.request.end_ns == case.start:
            assert not any(p.is_syn for p in from_client), why

    elif verdict.shape == "split":
        assert res.connected and tuple(res.peer) == dialled, why
        assert synacks and all((p.src, p.sport) == dialled for p in synacks), why
        data = [p for p in from_client if _length(p) > 0]
        assert data, "the client sent no data" + why
        assert any(p.is_rst and p.time >= data[0].time for p in to_client), \
            "synack says the proxy resets the client after the first data" + why
        assert _reset_after_connect(res), why
        # the second leg failed the way synack says
        leg = trip.second_leg
        proxy = _server_for(envlab, trip.request.end_ns, trip.listener.port)
        assert isinstance(proxy, ProxyServer), why
        outer = wait_until(lambda: next((c for c in proxy.connections()
                                         if c.peer == mine and c.client_reset), None),
                           timeout=2.0, what="the proxy to reset the client")
        if leg.request.end == "refused":
            assert outer.upstream == (str(leg.flow.dst), leg.flow.dport), outer
            assert outer.upstream_error == "ECONNREFUSED", outer
        elif leg.listener is trip.listener:  # redirected back into the proxy itself
            assert any(c.loop for c in proxy.connections()), proxy.connections()
        assert outer.client_reset, outer

    elif verdict.shape == "ok":
        assert res.ok and tuple(res.peer) == dialled and res.received == DATA, why
        assert synacks and all((p.src, p.sport) == dialled for p in synacks), why
        # the server synack names saw the connection, from the peer address synack says
        end = trip.request.end_packet
        server = _server_for(envlab, trip.request.end_ns, end.dport)
        assert server is not None, f"no listener on {trip.request.end_ns}:{end.dport}" + why
        conns = server.wait_connections(1, timeout=2.0) if isinstance(server, ProxyServer) \
            else server.wait_connections(1, timeout=2.0, finished=False)
        assert conns[0].peer[0] == str(end.src), (conns[0], str(end.src))
        leg = trip.second_leg
        if leg is not None:  # the proxy's own connection went where synack says
            assert conns[0].upstream == (str(leg.flow.dst), leg.flow.dport), conns[0]
            assert conns[0].upstream_error is None, conns[0]
            final = _server_for(envlab, leg.request.end_ns, leg.request.end_packet.dport)
            assert final is not None and final.wait_connections(1, timeout=2.0)
    else:
        pytest.fail(f"synack's verdict is not one the kernel can check: {verdict.shape}" + why)


# ---------------------------------------------------------------------------------------------
# connections that fork: every endpoint, one at a time, then the kernel's own random choice
# ---------------------------------------------------------------------------------------------

#: random-choice connections made with the real rules (each lands on some endpoint; each one that
#: synack says is reset costs a connect timeout)
RANDOM_CONNECTIONS = 4


def _pinned(rules: str, endpoint: str) -> str:
    """The dump with kube-proxy's endpoint choice pinned to ``endpoint``: the KUBE-SVC rules
    jumping to other endpoints are dropped, and the statistic match of the kept one removed."""
    out = []
    for line in rules.splitlines():
        if line.startswith("-A KUBE-SVC-") and "-j KUBE-SEP-" in line:
            if f"-> {endpoint}" not in line:
                continue
            line = re.sub(r"-m statistic --mode random --probability \S+ ", "", line)
        out.append(line)
    return "\n".join(out) + "\n"


def _kernel_outcome(envlab, client, flow, sport: int, servers: dict) -> tuple[str, str | None]:
    """('reset', endpoint the stray SYN+ACK came from) or ('ok', endpoint whose server got it)
    or (other outcome, None), for one connection from ``sport``."""
    with client.capture("any", f"tcp port {sport}", timeout=CONNECT_TIMEOUT * 2 + 4) as cap:
        res = client.connect_tcp(str(flow.dst), flow.dport, src=str(flow.src), src_port=sport,
                                 data=DATA, timeout=CONNECT_TIMEOUT)
    packets = [p for p in cap.packets if p.proto == "tcp"]
    synacks = [p for p in packets if p.dport == sport and p.is_synack]
    stray = {f"{p.src}:{p.sport}" for p in synacks if (p.src, p.sport) != (str(flow.dst), flow.dport)}
    resets = any(p.is_rst and p.sport == sport for p in packets)
    if res.outcome == "timeout" and stray and resets:
        (ep,) = stray
        return "reset", ep
    if res.ok and tuple(res.peer) == (str(flow.dst), flow.dport) and res.received == DATA:
        # the servers log their accepts asynchronously: look again for a bounded while
        deadline = time.monotonic() + 3.0
        while True:
            for ep, server in servers.items():
                if any(c.peer and c.peer[1] == sport for c in server.connections()):
                    return "ok", ep
            if time.monotonic() > deadline:
                return "ok", None
            time.sleep(0.1)
    return f"{res.outcome}/{res.error}", None


def _conclusive_outcome(envlab, client, flow, sport: int, servers: dict) -> tuple[str, str | None]:
    """:func:`_kernel_outcome`, tried again from another source port (at most twice) when one
    connection tells nothing (no endpoint seen: a capture or a server log lost under load). A
    conclusive answer is never retried, so a wrong prediction still fails."""
    for attempt in range(3):
        got, where = _kernel_outcome(envlab, client, flow, sport + 100 * attempt, servers)
        if where is not None:
            break
    return got, where


@pytest.mark.parametrize("name", MULTI_ENDPOINT)
def test_kernel_agrees_with_every_endpoint(name: str, lab: Lab, require) -> None:
    """The kernel resets every connection that lands on the same-node endpoint (its reply is
    switched on the bridge without netfilter) and completes the others; synack says so per
    endpoint, with NAT001 naming exactly the failing ones."""
    require("nft", "tcpdump", "bridge_nf")
    env_path = ROOT / "samples" / "env" / f"{name}.yaml"
    doc = yaml.safe_load(env_path.read_text())
    ex = doc["examples"][0]
    env = load_environment(str(env_path))
    world = World(env)
    flow = parse_flow(ex["flow"])
    trips = follow_all(world, ex["from"], flow)
    predicted = {}
    for t in trips:
        ep = f"{t.endpoint.dst}:{t.endpoint.dport}"
        codes = {d.code for d in findings(world, t)}
        predicted[ep] = "reset" if "NAT001" in codes and t.client_sees is not None else \
            "ok" if not codes and t.client_sees is not None and \
            (t.client_sees.src, t.client_sees.sport) == (flow.dst, flow.dport) else f"other {codes}"
    assert len(predicted) == len(trips) >= 2, predicted
    assert sum(t.prob for t in trips) == pytest.approx(1.0)

    envlab = build_env(lab, str(env_path))
    client = envlab[ex["from"]]
    servers = {f"{ep.split(':')[0]}:{ep.split(':')[1]}": envlab.servers[(ns, int(ep.split(":")[1]))]
               for ep in predicted for ns, spec in doc["namespaces"].items()
               if any(str(a).split("/")[0] == ep.split(":")[0] for a in (spec or {}).get("addresses") or [])}
    assert set(servers) == set(predicted), servers
    rules = (env_path.parent / doc["namespaces"]["node1"]["iptables"]).read_text()
    node1 = envlab["node1"]
    rows = []
    # each endpoint pinned in turn: the kernel's answer for that branch
    for i, ep in enumerate(sorted(predicted)):
        node1.iptables_restore(_pinned(rules, ep))
        got, where = _conclusive_outcome(envlab, client, flow, 42000 + i, servers)
        rows.append(f"pinned {ep}: synack {predicted[ep]}, kernel {got} ({where})")
        assert (got, where) == (predicted[ep], ep), "\n".join(rows)
    # the real rules: whichever endpoint the kernel picks, the outcome is synack's for it
    node1.iptables_restore(rules)
    for i in range(RANDOM_CONNECTIONS):
        got, where = _conclusive_outcome(envlab, client, flow, 43000 + i, servers)
        rows.append(f"random: kernel {got} at {where}")
        assert where in predicted and got == predicted[where], "\n".join(rows)
    print("\n" + "\n".join(rows))
