"""Environment files: every problem is located (file:line:col, namespace, key) and explained,
nothing is silently ignored, and no mutation of a sample ends in a traceback."""
from __future__ import annotations

import importlib.util
import textwrap

import pytest

from _golden import ROOT, run
from analyzer.netfilter.env import EnvError, Namespace
from analyzer.parse.envfile import KNOWN_SYSCTLS, NAMESPACE_KEYS, load_environment

BASE = """\
namespaces:
  client:
    addresses: [10.4.26.45/24@eth0]
    routes: ["default via 10.4.26.1 dev eth0"]
  host:
    addresses: [10.4.26.1/24@eth0]
    sysctls: {net.ipv4.ip_forward: 1}
links:
  - veth: ["client:eth0", "host:eth0"]
"""


def env_file(tmp_path, text: str) -> str:
    p = tmp_path / "env.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def load_error(tmp_path, text: str) -> str:
    with pytest.raises(EnvError) as e:
        load_environment(env_file(tmp_path, text))
    return str(e.value)


def warnings(tmp_path, text: str) -> list[str]:
    env = load_environment(env_file(tmp_path, text))
    return [f"{d.span.line}:{d.code} {d.message}" for d in env.diagnostics]


def test_the_base_environment_is_clean(tmp_path):
    assert warnings(tmp_path, BASE) == []


def test_misspelled_sysctl_is_an_error_with_a_suggestion(tmp_path):
    msg = load_error(tmp_path, BASE.replace("net.ipv4.ip_forward", "net.ipv4.ip_foward"))
    assert "env.yaml:7:15: namespace 'host', sysctls: unknown sysctl 'net.ipv4.ip_foward'" in msg
    assert "did you mean 'net.ipv4.ip_forward'?" in msg


def test_sysctl_values_and_interfaces_are_checked(tmp_path):
    msg = load_error(tmp_path, BASE.replace("{net.ipv4.ip_forward: 1}",
                                            "{net.ipv4.ip_forward: 2, net.ipv4.conf.eht0.rp_filter: 1}"))
    assert "sysctl 'net.ipv4.ip_forward' is 2; expected one of 0, 1" in msg
    assert "has no interface 'eht0' (did you mean 'eth0'?)" in msg


def test_address_as_a_string_says_to_write_a_list(tmp_path):
    msg = load_error(tmp_path, BASE.replace("[10.4.26.45/24@eth0]", "10.4.26.45/24@eth0"))
    assert "env.yaml:3:5: namespace 'client', addresses: addresses should be a list, not a string " \
           "(write [10.4.26.45/24@eth0])" in msg
    assert "address '1'" not in msg


def test_proxy_to_must_be_an_address_and_port(tmp_path):
    msg = load_error(tmp_path, BASE.replace(
        "    sysctls:", "    listeners: [{port: 15001, proxy_to: somewhere}]\n    sysctls:"))
    assert "env.yaml:7:31: namespace 'host', listeners[0]: proxy_to 'somewhere' should be ADDR:PORT" in msg


def test_listener_shapes(tmp_path):
    env = load_environment(env_file(tmp_path, BASE.replace(
        "    sysctls:", "    listeners: [80, '53/udp', {port: 8080, name: web}]\n    sysctls:")))
    assert [(l.port, l.proto) for l in env.namespaces["host"].listeners] == [(80, "tcp"), (53, "udp"), (8080, "tcp")]
    msg = load_error(tmp_path, BASE.replace("    sysctls:", "    listeners: [{prot: 80}, 70000]\n    sysctls:"))
    assert "listeners[0]: a listener needs 'port: N'" in msg
    assert "unknown listener key 'prot'" in msg
    assert "listeners[1]: listener port 70000 should be a number 1-65535" in msg


def test_route_via_a_device_the_namespace_lacks_is_a_warning(tmp_path):
    w = warnings(tmp_path, BASE.replace("dev eth0\"]", "dev eth1\"]"))
    assert w == ["4:ENV001 namespace 'client', routes[0]: route '0.0.0.0/0 via 10.4.26.1 dev eth1' goes out "
                 "'eth1', which namespace 'client' does not have (no address and no link names it) "
                 "(did you mean 'eth0'?)"]


def test_gateway_not_on_link_is_a_warning(tmp_path):
    w = warnings(tmp_path, BASE.replace("default via 10.4.26.1", "default via 10.9.9.1"))
    assert len(w) == 1 and w[0].startswith("4:ENV002 namespace 'client', routes[0]: gateway 10.9.9.1")
    assert warnings(tmp_path, BASE.replace("default via 10.4.26.1 dev eth0",
                                           "default via 10.9.9.1 dev eth0 onlink")) == []


def test_one_address_in_two_namespaces_is_a_warning(tmp_path):
    w = warnings(tmp_path, BASE.replace("[10.4.26.1/24@eth0]", "[10.4.26.1/24@eth0, 10.4.26.45/32@eth0]"))
    assert w == ["6:ENV003 namespace 'host', addresses[1]: address 10.4.26.45 is also in namespace 'client' "
                 "(eth0): packets to it reach whichever the walk meets first"]


def test_unknown_keys_everywhere_get_a_suggestion(tmp_path):
    msg = load_error(tmp_path, BASE.replace("routes:", "rotues:").replace("veth:", "vet:")
                     + "clients: [clinet]\n")
    assert "namespace 'client', rotues: unknown key 'rotues' (did you mean 'routes'?)" in msg
    assert "unknown link kind 'vet' (did you mean 'veth'?)" in msg
    assert "clients[0]: unknown namespace 'clinet' (did you mean 'client'?)" in msg


def test_cli_prints_every_problem_and_exits_2(tmp_path):
    p = env_file(tmp_path, BASE.replace("ip_forward", "ip_foward").replace("routes:", "rotues:"))
    rc, out, err = run(["lint", "--env", p])
    assert rc == 2 and err.count("synack: error: ") == 2 and "Traceback" not in err


def test_warnings_make_lint_exit_1(tmp_path):
    rc, out, err = run(["lint", "--env", env_file(tmp_path, BASE.replace("via 10.4.26.1", "via 10.9.9.1"))])
    assert rc == 1 and "ENV002 [warning]" in out


def test_namespace_keys_and_sysctls_are_documented():
    doc = (ROOT / "docs" / "environment.md").read_text()
    for key in NAMESPACE_KEYS:
        assert f"| `{key}`" in doc or f"`{key}` |" in doc or f"`{key}`," in doc, key
    for name in KNOWN_SYSCTLS:
        assert f"`{name}`" in doc, name


# ----------------------------------------------------------------------------- iproute text
IP_ADDR = """\
1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN group default qlen 1000
    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00
    inet 127.0.0.1/8 scope host lo
       valid_lft forever preferred_lft forever
2: eth0@if9: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP group default
    link/ether 02:42:ac:11:00:02 brd ff:ff:ff:ff:ff:ff link-netnsid 0
    inet 10.4.26.1/24 brd 10.4.26.255 scope global eth0
       valid_lft forever preferred_lft forever
    inet6 fe80::42:acff:fe11:2/64 scope link
       valid_lft forever preferred_lft forever
3: wg0: <POINTOPOINT,NOARP,UP,LOWER_UP> mtu 1420 qdisc noqueue state UNKNOWN group default qlen 1000
    inet 10.9.0.1 peer 10.9.0.2/32 scope global wg0
"""
IP_ROUTE = """\
default via 10.4.26.254 dev eth0 proto dhcp src 10.4.26.1 metric 100
10.4.26.0/24 dev eth0 proto kernel scope link src 10.4.26.1
blackhole 10.66.0.0/16 proto bird
broadcast 10.4.26.255 dev eth0 table local proto kernel scope link src 10.4.26.1
"""


def test_iproute_takes_the_text_people_paste():
    ns = Namespace()
    ns.load_iproute(IP_ADDR, IP_ROUTE)
    assert {i: [str(a) for a in v] for i, v in ns.addrs.items()} == {
        "lo": ["127.0.0.1/8"], "eth0": ["10.4.26.1/24", "fe80::42:acff:fe11:2/64"], "wg0": ["10.9.0.1/32"]}
    import ipaddress
    r = ns.route(ipaddress.ip_address("8.8.8.8"))
    assert (r.kind, r.oif, str(r.via)) == ("unicast", "eth0", "10.4.26.254")
    assert ns.route(ipaddress.ip_address("10.66.1.1")).kind == "blackhole"


def test_iproute_brief_and_oneline_forms():
    ns = Namespace()
    ns.load_iproute("lo               UNKNOWN        127.0.0.1/8 ::1/128\n"
                    "eth0@if5         UP             10.0.0.5/24 fe80::1/64\n", None)
    assert [str(a) for a in ns.addrs["eth0"]] == ["10.0.0.5/24", "fe80::1/64"]
    ns = Namespace()
    ns.load_iproute("2: eth0    inet 10.0.0.5/24 brd 10.0.0.255 scope global eth0\\       valid_lft forever\n", None)
    assert [str(a) for a in ns.addrs["eth0"]] == ["10.0.0.5/24"]


def test_explain_iproute_accepts_text(tmp_path):
    (tmp_path / "a").write_text(IP_ADDR)
    (tmp_path / "r").write_text(IP_ROUTE)
    rc, out, err = run(["explain", "samples/seed1-hairpin-host.rules", "--flow", "tcp 10.4.26.45:35582 -> 10.4.26.234:80",
                        "--from-iface", "eth0", "--iproute", str(tmp_path / "a"), str(tmp_path / "r")])
    assert rc in (0, 1) and err == "", err
    assert "NAT001" in out


# ----------------------------------------------------------------------------- fuzz
def _fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_env", ROOT / "benchmarks" / "fuzz_env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mutated_environments_never_end_in_a_traceback():
    fz = _fuzz()
    where = fz.workdir()
    failures = []
    for i, name, doc, text in fz.cases(120, seed=2026):
        _, tb = fz.run_case(text, doc, where)
        if tb:
            failures.append(f"case {i} from {name}:\n{text}\n{tb}")
    assert not failures, failures[0]


def test_explain_env_says_the_warnings_on_stderr(tmp_path):
    p = env_file(tmp_path, BASE.replace("default via 10.4.26.1", "default via 10.9.9.1"))
    rc, out, err = run(["explain", "--env", p, "--from", "client", "--flow", "tcp 10.4.26.45:40000 -> 10.4.26.1:80"])
    assert "synack: warning: " in err and "ENV002" in err and "env.yaml:4:" in err


def test_default_interface_sysctl_says_what_to_write(tmp_path):
    msg = load_error(tmp_path, BASE.replace("{net.ipv4.ip_forward: 1}", "{net.ipv4.conf.default.rp_filter: 1}"))
    assert "write net.ipv4.conf.all.rp_filter or net.ipv4.conf.IFACE.rp_filter" in msg
