"""The kernel judges which source address a client's connection gets (no bind): lint --env dials
every listener from each client, and the source it gives the client must be the one the
client's kernel picks (ipv6_dev_get_saddr, RFC 6724 section 5).

The client lists, before the address it really uses, a link-local address (rule 2: a global
destination gets a source of global scope), a global address on another interface whose prefix
is closer to the destination (rule 5, the output interface, comes before rule 8, the longest
prefix), and a ULA (rule 6: a ULA destination gets the ULA source, a global one the global
source). The connection is made for real and the address it came from (the client socket's
local address, and the peer the server accepted) is compared with synack's: lint --env's flow
to the server's listener, and ``Namespace.source_address`` for the ULA destination, which lint
does not dial (it dials a listener at the namespace's first global address).
"""
from __future__ import annotations

import ipaddress

import pytest

from analyzer.checks import CheckContext
from analyzer.checks.reply import environment_trips
from analyzer.parse.envfile import load_environment
from envlab import build_env

pytestmark = pytest.mark.kernel

ENV = """clients: [client]
namespaces:
  client:
    # listed before the global address of eth0 it uses: a link-local, a global address of another
    # interface sharing a longer prefix with the server (2001:db8:2::/48), a ULA
    addresses: [fe80::c/64@eth0, 2001:db8:2:1::2/64@eth1, fd00:1::2/64@eth0, 2001:db8:1::2/64@eth0]
    routes: ["default via 2001:db8:1::1 dev eth0"]
  router:
    addresses: [2001:db8:1::1/64@eth0, fd00:1::1/64@eth0, 2001:db8:2::1/64@eth1, fd00:2::1/64@eth1]
    sysctls: {net.ipv6.conf.all.forwarding: 1}
  server:
    addresses: [2001:db8:2::3/64@eth0, fd00:2::3/64@eth0]
    routes: ["default via 2001:db8:2::1 dev eth0"]
    listeners: [{port: 8080, address: "::", name: web}]
  side:
    addresses: [2001:db8:2:1::1/64@eth0]
links:
  - veth: ["client:eth0", "router:eth0"]
  - veth: ["router:eth1", "server:eth0"]
  - veth: ["client:eth1", "side:eth0"]     # (a veth: the test kernel may have no dummy module)
"""
#: destination -> the source the kernel is expected to pick (and synack to give)
EXPECTED = {"2001:db8:2::3": "2001:db8:1::2", "fd00:2::3": "fd00:1::2"}
CONNECT_TIMEOUT = 3.0


def _same_sources(lab, tmp_path, env_text: str, expected: dict, family: int) -> None:
    """synack (lint --env's flow to the server's listener, at the first key of ``expected``, and
    ``Namespace.source_address`` for the others) and the kernel (a real connection from the
    client, and its ``ip route get``) give each destination the source ``expected`` says."""
    path = tmp_path / "env.yaml"
    path.write_text(env_text)
    env = load_environment(str(path))
    client = env.namespaces["client"].net
    ctx = CheckContext(None, (), extra={"env": env, "jobs": 1})
    [(cname, sname, trips, diags)] = environment_trips(ctx)
    listener, *others = expected
    assert (cname, sname, str(trips[0].flow.dst)) == ("client", "server", listener)
    predicted = {listener: str(trips[0].flow.src),
                 **{d: str(client.source_address(ipaddress.ip_address(d))) for d in others}}
    assert predicted == expected
    assert diags == [] and trips[0].client_sees is not None

    envlab = build_env(lab, str(path))
    server = envlab.servers[("server", 8080)]
    seen = {}
    for n, dst in enumerate(expected, 1):
        res = envlab["client"].connect_tcp(dst, 8080, timeout=CONNECT_TIMEOUT)
        assert res.ok, (dst, res, envlab.describe())
        [conn] = [c for c in server.wait_connections(n, timeout=CONNECT_TIMEOUT) if c.local[0] == dst]
        assert conn.peer[0] == res.local[0]  # what the server saw is what the client's socket had
        seen[dst] = res.local[0]
        # and what the kernel's own route lookup says it would pick
        route = envlab["client"].ip(*(["-6"] if family == 6 else []), "route", "get", dst)
        assert f"src {res.local[0]} " in route + " ", route
    assert seen == predicted


def test_kernel_and_lint_env_pick_the_same_source(lab, tmp_path) -> None:
    _same_sources(lab, tmp_path, ENV, EXPECTED, 6)


ENV4 = """clients: [client]
namespaces:
  client:
    # listed before the address it really uses: an address of another interface, and one of the
    # output interface outside the gateway's subnet (which a route names as its src)
    addresses: [10.0.9.2/24@eth1, 10.0.7.2/24@eth0, 10.0.1.2/24@eth0]
    routes: ["default via 10.0.1.1 dev eth0", "10.0.5.0/24 via 10.0.1.1 dev eth0 src 10.0.7.2"]
  router:
    addresses: [10.0.1.1/24@eth0, 10.0.2.1/24@eth1]
    routes: ["10.0.7.0/24 via 10.0.1.2 dev eth0", "10.0.5.0/24 via 10.0.2.3 dev eth1"]
    sysctls: {net.ipv4.ip_forward: 1}
  server:
    addresses: [10.0.2.3/24@eth0, 10.0.5.3/24@eth0]
    routes: ["default via 10.0.2.1 dev eth0"]
    listeners: [{port: 8080, address: "0.0.0.0", name: web}]
  side:
    addresses: [10.0.9.1/24@eth0]
links:
  - veth: ["client:eth0", "router:eth0"]
  - veth: ["router:eth1", "server:eth0"]
  - veth: ["client:eth1", "side:eth0"]
"""
#: IPv4 (fib_result_prefsrc): the output interface's address in the gateway's subnet; a route's src
EXPECTED4 = {"10.0.2.3": "10.0.1.2", "10.0.5.3": "10.0.7.2"}


def test_kernel_and_lint_env_pick_the_same_ipv4_source(lab, tmp_path) -> None:
    _same_sources(lab, tmp_path, ENV4, EXPECTED4, 4)
