"""lint --env says which translating rules it could not follow as a client would dial them."""
from __future__ import annotations

import json

from analyzer.cli import main

RULES = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d 10.7.2.100/32 -j DNAT --to-destination 10.7.3.3
-A PREROUTING -d 10.7.2.64/26 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.7.3.3:8080
-A PREROUTING -d 10.7.2.1/32 -p tcp -m tcp --dport 8000:8009 -j DNAT --to-destination 10.7.3.3:8080
-A PREROUTING -d 10.7.2.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.7.3.3:8080
COMMIT
"""

#: a client, a router that translates, a server listening on 8080 (one address family)
ENV_TEMPLATE = """namespaces:
  client:
    addresses: [{client}@eth0]
    routes: ["default via {gw1} dev eth0"]
  router:
    {key}: {rules}
    addresses: [{router}]
    sysctls: {{{forwarding}: 1}}
  server:
    addresses: [{server}@eth0]
    routes: ["default via {gw2} dev eth0"]
    listeners:
      - {{port: 8080, name: app}}
links:
  - veth: ["client:eth0", "router:eth0"]
  - veth: ["router:eth1", "server:eth0"]
"""
ENV = ENV_TEMPLATE.format(client="10.7.2.2/24", gw1="10.7.2.1", key="iptables", rules="router.rules",
                          router="10.7.2.1/24@eth0, 10.7.2.100/32@eth0, 10.7.3.1/24@eth1",
                          forwarding="net.ipv4.ip_forward", server="10.7.3.3/24", gw2="10.7.3.1")


def test_translations_followed_in_part_are_named(tmp_path, capsys):
    (tmp_path / "router.rules").write_text(RULES)
    env = tmp_path / "env.yaml"
    env.write_text(ENV)
    main(["lint", "--env", str(env), "--jobs", "1"])
    out = capsys.readouterr().out
    assert "Translations followed in part or not at all: 2" in out
    assert "router.rules:7: a destination network: not followed" in out
    assert "router.rules:8: a port range or list: its first port of 10 followed" in out
    # one-to-one NAT (no port): dialled at the environment's listening port
    assert "dialled 10.7.2.100:8080" in out
    main(["lint", "--env", str(env), "--jobs", "1", "-o", "json"])
    doc = json.loads(capsys.readouterr().out)
    part = doc["coverage"]["translations_in_part"]
    assert [(p["line"], p["why"].split(":")[0]) for p in part] == [
        (7, "a destination network"), (8, "a port range or list")]
    assert doc["coverage"]["services"] == 4  # 10.7.2.100:8080, 10.7.2.1:8000 and :80, the listener


def test_one_to_one_nat_without_a_listener_is_named(tmp_path, capsys):
    (tmp_path / "router.rules").write_text(RULES)
    env = tmp_path / "env.yaml"
    env.write_text(ENV.replace("    listeners:\n      - {port: 8080, name: app}\n", ""))
    main(["lint", "--env", str(env), "--jobs", "1"])
    out = capsys.readouterr().out
    assert "router.rules:6: no destination port, and no listener in the environment to dial: not followed" in out


def test_nothing_said_when_every_translation_is_followed(tmp_path, capsys):
    (tmp_path / "router.rules").write_text("\n".join(l for l in RULES.splitlines() if "10.7.2.1/32" in l
                                                     or not l.startswith("-A")) + "\n")
    env = tmp_path / "env.yaml"
    env.write_text(ENV)
    main(["lint", "--env", str(env), "--jobs", "1"])
    out = capsys.readouterr().out
    assert "Translations followed in part" in out  # the port range is still followed in part
    (tmp_path / "router.rules").write_text(RULES.replace(
        "-A PREROUTING -d 10.7.2.1/32 -p tcp -m tcp --dport 8000:8009 -j DNAT --to-destination 10.7.3.3:8080\n", "")
        .replace("-A PREROUTING -d 10.7.2.100/32 -j DNAT --to-destination 10.7.3.3\n", "")
        .replace("-A PREROUTING -d 10.7.2.64/26 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.7.3.3:8080\n", ""))
    main(["lint", "--env", str(env), "--jobs", "1"])
    out = capsys.readouterr().out
    assert "Translations followed in part" not in out and "Covered:" in out
    main(["lint", "--env", str(env), "--jobs", "1", "-o", "json"])
    assert json.loads(capsys.readouterr().out)["coverage"]["translations_in_part"] == []


RULES6 = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d 2001:db8:1::1/128 -p tcp -m tcp --dport 80 -j DNAT --to-destination [2001:db8:2::3]:9999
-A POSTROUTING -o eth1 -j MASQUERADE
COMMIT
"""

ENV6 = ENV_TEMPLATE.format(client="2001:db8:1::2/64", gw1="2001:db8:1::1", key="ip6tables",
                           rules="router6.rules", router="2001:db8:1::1/64@eth0, 2001:db8:2::1/64@eth1",
                           forwarding="net.ipv6.conf.all.forwarding", server="2001:db8:2::3/64",
                           gw2="2001:db8:2::1")


def test_ip6tables_translations_are_followed(tmp_path, capsys):
    """An ip6tables DNAT is a translated destination too (only the iptables ruleset was read:
    the router's translated [2001:db8:1::1]:80 was never dialled)."""
    (tmp_path / "router6.rules").write_text(RULES6)
    env = tmp_path / "env.yaml"
    env.write_text(ENV6)
    main(["lint", "--env", str(env), "--jobs", "1", "-o", "json"])
    cov = json.loads(capsys.readouterr().out)["coverage"]
    assert cov["services"] == 2  # the DNAT and the server's listener
    # the server's reply to the masqueraded request comes back too
    (tmp_path / "router6.rules").write_text(RULES6.replace("-A POSTROUTING -o eth1 -j MASQUERADE\n", ""))
    env.write_text(ENV6.replace('    routes: ["default via 2001:db8:2::1 dev eth0"]\n', ""))
    main(["lint", "--env", str(env), "--jobs", "1", "-o", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert any("[2001:db8:1::1]:80" in d["message"] for d in doc["diagnostics"]), doc["diagnostics"]


def test_a_dual_stack_listener_is_dialled_in_both_families(tmp_path, capsys):
    """A listener is dialled at the namespace's first address of each family (it was the first
    address only: an ip6tables DROP in front of a dual-stack server went unseen)."""
    (tmp_path / "router6.rules").write_text("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
                                            ":OUTPUT ACCEPT [0:0]\n-A FORWARD -p tcp -m tcp --dport 8080 -j DROP\n"
                                            "COMMIT\n")
    env = tmp_path / "env.yaml"
    env.write_text(ENV_TEMPLATE.format(
        client="10.7.2.2/24@eth0, 2001:db8:1::2/64", gw1="10.7.2.1", key="ip6tables", rules="router6.rules",
        router="10.7.2.1/24@eth0, 10.7.3.1/24@eth1, 2001:db8:1::1/64@eth0, 2001:db8:2::1/64@eth1",
        forwarding="net.ipv4.ip_forward: 1, net.ipv6.conf.all.forwarding", server="10.7.3.3/24@eth0, 2001:db8:2::3/64",
        gw2="10.7.3.1").replace('routes: ["default via 10.7.3.1 dev eth0"]',
                                'routes: ["default via 10.7.3.1 dev eth0", "default via 2001:db8:2::1 dev eth0"]')
        .replace('routes: ["default via 10.7.2.1 dev eth0"]',
                 'routes: ["default via 10.7.2.1 dev eth0", "default via 2001:db8:1::1 dev eth0"]'))
    main(["lint", "--env", str(env), "--jobs", "1", "-o", "json"])
    cov = json.loads(capsys.readouterr().out)["coverage"]
    assert cov["services"] == 2 and cov["unreachable_listeners"] >= 1, cov


def test_a_global_destination_is_not_dialled_from_a_link_local_source(tmp_path, capsys):
    """A client whose environment lists fe80::c before its global address dials a global
    listener from the global address, as its kernel picks it (RFC 6724 rule 2; kernel-checked in
    tests/kernel/test_source_address_kernel.py). It was dialled from fe80::c: the router
    forwarded it, and the server's reply found no route back to fe80::c (a false NAT002)."""
    env = tmp_path / "env.yaml"
    env.write_text(ENV_TEMPLATE.format(
        client="fe80::c/64@eth0, 2001:db8:1::2/64", gw1="2001:db8:1::1", key="ip6tables", rules="router6.rules",
        router="2001:db8:1::1/64@eth0, 2001:db8:2::1/64@eth1", forwarding="net.ipv6.conf.all.forwarding",
        server="2001:db8:2::3/64", gw2="2001:db8:2::1").replace("{port: 8080, name: app}",
                                                                 '{port: 8080, address: "::", name: app}'))
    (tmp_path / "router6.rules").write_text("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
                                            ":OUTPUT ACCEPT [0:0]\nCOMMIT\n")
    rc = main(["lint", "--env", str(env), "--jobs", "1", "--select", "NAT", "-o", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["diagnostics"] == [], doc["diagnostics"]
    from analyzer.checks import CheckContext
    from analyzer.checks.reply import environment_trips
    from analyzer.parse.envfile import load_environment
    trips = environment_trips(CheckContext(None, (), extra={"env": load_environment(str(env)), "jobs": 1}))
    assert {(c, str(t[0].flow.src), str(t[0].flow.dst)) for c, _, t, _ in trips} >= {
        ("client", "2001:db8:1::2", "2001:db8:2::3")}
    assert not any(str(t[0].flow.src).startswith("fe80") for _, _, t, _ in trips)
