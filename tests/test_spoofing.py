"""FLT003 / the spoofing half of synack matrix: the check's samples, the IP assignment parser
and the routes-derived assignment, and the spoofed sources against brute force (concrete walks
of packets on every interface from probe sources over random chains)."""
from __future__ import annotations

import ipaddress
import json
import random
from pathlib import Path

import pytest

from analyzer.checks import CheckContext, run_checks
from analyzer.cli import main
from analyzer.matrix import assignment_from_routes, spoofing_check
from analyzer.netfilter.env import Namespace
from analyzer.netfilter.walk import Branch, Conntrack, Packet, Walker
from analyzer.parse import load_ruleset
from analyzer.parse.envfile import load_environment
from analyzer.parse.ipassmt import IpassmtError, parse_ipassmt

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "checks" / "FLT003"


def env_findings(path):
    env = load_environment(str(path))
    return run_checks(CheckContext(None, (), extra={"env": env}), ["FLT003"])


def test_flt003_bad_sample_names_each_interface_with_a_walked_witness():
    found = env_findings(SAMPLE / "bad.yaml")
    assert {d.code for d in found} == {"FLT003"}
    by_iface = {d.message.split(" arriving on ")[1].split()[0]: d for d in found}
    assert set(by_iface) == {"wan0", "lan0", "dmz0"}
    assert "from 10.0.0.0/24 u 192.0.2.0/24" in by_iface["wan0"].message
    assert all(d.witness and d.confidence == "EXACT" for d in found)
    assert "iif wan0" in by_iface["wan0"].witness


def test_flt003_good_sample_is_clean():
    assert env_findings(SAMPLE / "good.yaml") == []


def test_lint_env_runs_flt003_by_default(capsys):
    assert main(["lint", "--env", str(SAMPLE / "bad.yaml")]) == 1
    assert "FLT003" in capsys.readouterr().out


def test_ipassmt_parser_reads_fffuus_format():
    a = parse_ipassmt("eth0 = [0.0.0.0-255.255.255.255]\nfoo = []\n"
                      "eth1.96 = [131.159.14.3/25]\n"
                      "up = all_but_those_ips [\n  10.0.0.0/8,\n  192.168.0.0/16\n]\n")
    assert a.names() == ["eth0", "foo", "eth1.96", "up"]
    assert a.get("foo") == () and a.render("eth1.96") == "131.159.14.0/25"
    assert a.render("up") == "0.0.0.0 .. 9.255.255.255 u 11.0.0.0 .. 192.167.255.255 u 192.169.0.0 .. 255.255.255.255"
    with pytest.raises(IpassmtError):
        parse_ipassmt("eth0 = 10.0.0.0/8")
    with pytest.raises(IpassmtError):
        parse_ipassmt("eth0 = [10.0.0.0/8]\neth0 = [10.0.0.0/8]")


def test_assignment_from_routes_is_longest_prefix():
    ns = Namespace()
    ns.add_addr("10.0.0.1/24", "lan0")
    ns.add_route("10.1.0.0/16 via 10.0.0.254 dev lan0")
    ns.add_addr("203.0.113.2/30", "wan0")
    ns.add_route("default via 203.0.113.1")
    a = assignment_from_routes(ns, 4)
    assert a.render("lan0") == "10.0.0.0/24 u 10.1.0.0/16"
    assert a.get("wan0")[0] == (0, int(ipaddress.ip_address("10.0.0.0")) - 1)


def test_matrix_command_prints_the_spoofing_check(capsys, tmp_path):
    assmt = tmp_path / "a"
    assmt.write_text("lan0 = [10.0.0.0/24]\ndmz0 = [192.0.2.0/24]\n"
                     "wan0 = all_but_those_ips [10.0.0.0/24, 192.0.2.0/24]\n")
    rules = str(SAMPLE / "router.rules")
    assert main(["matrix", rules, "--ipassmt", str(assmt), "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    wan = next(i for i in doc["spoofing"]["interfaces"] if i["name"] == "wan0")
    assert wan["code"] == "FLT003" and wan["spoofed"] == [["10.0.0.0", "10.0.0.255"], ["192.0.2.0", "192.0.2.255"]]
    assert main(["matrix", str(SAMPLE / "router-fixed.rules"), "--ipassmt", str(assmt)]) == 0
    out = capsys.readouterr().out
    assert "wan0: certified" in out and "FLT003" not in out


# ------------------------------------------------------------------------ brute force
IFACES = ["eth0", "eth1", "eth2"]
NETS = ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "172.16.0.0/12", "10.1.2.0/24"]
PROBES = ["10.1.2.3", "10.9.9.9", "10.1.9.9", "192.168.1.1", "172.16.0.1", "8.8.8.8", "127.0.0.1"]
DSTS = ["10.1.2.3", "10.9.9.9", "192.168.1.1", "172.16.0.1", "8.8.8.8"]


def _cond(rnd):
    parts = []
    if rnd.random() < 0.6:
        parts.append(("! " if rnd.random() < 0.2 else "") + f"-i {rnd.choice(IFACES)}")
    if rnd.random() < 0.6:
        parts.append(("! " if rnd.random() < 0.2 else "") + f"-s {rnd.choice(NETS)}")
    if rnd.random() < 0.3:
        parts.append(f"-d {rnd.choice(NETS)}")
    if rnd.random() < 0.3:
        parts.append(f"-p tcp -m tcp --dport {rnd.choice(['22', '80'])}")
    return " ".join(parts)


def random_case(rnd):
    lines = ["*filter", ":INPUT ACCEPT [0:0]", f":FORWARD {rnd.choice(['ACCEPT', 'DROP'])} [0:0]",
             ":OUTPUT ACCEPT [0:0]", ":CHK - [0:0]"]
    for _ in range(rnd.randint(2, 7)):
        lines.append(f"-A FORWARD {_cond(rnd)} -j {rnd.choice(['ACCEPT', 'DROP', 'CHK', 'RETURN'])}")
    for _ in range(rnd.randint(1, 3)):
        lines.append(f"-A CHK {_cond(rnd)} -j {rnd.choice(['ACCEPT', 'DROP', 'RETURN'])}")
    text = "\n".join(lines + ["COMMIT", ""]).replace("  ", " ")
    assmt = "\n".join(f"{i} = [{', '.join(rnd.sample(NETS, rnd.randint(0, 2)))}]" for i in IFACES)
    return text, assmt


def accepted(rs, src, dst, iif, proto, dport):
    pkt = Packet(4, proto, ipaddress.ip_address(src), ipaddress.ip_address(dst),
                 10000 if proto != 1 else None, dport if proto != 1 else None, iif=iif, oif="eth9",
                 icmp_type=8 if proto == 1 else None, icmp_code=0 if proto == 1 else None)
    br = Branch(pkt, Conntrack(pkt, pkt.dst, pkt.dport, pkt.src, pkt.sport))
    return any(o.disposition is None for o in Walker(rs, Namespace()).run_table(br, "filter", "FORWARD"))


@pytest.mark.parametrize("seed", range(30))
def test_spoofed_sources_agree_with_concrete_walks(seed):
    rnd = random.Random(seed)
    text, assmt_text = random_case(rnd)
    rs = load_ruleset((text, "r.rules")).ruleset
    assmt = parse_ipassmt(assmt_text)
    res = spoofing_check(rs, "FORWARD", assmt)
    assert not res.approximate
    for entry in res.ifaces:
        for src in PROBES:
            a = int(ipaddress.ip_address(src))
            if any(lo <= a <= hi for lo, hi in entry.assigned):
                continue  # not spoofed on this interface
            walked = any(accepted(rs, src, dst, entry.name, proto, dport)
                         for dst in DSTS for proto, dport in ((6, 22), (6, 80), (6, 443), (17, 22), (1, 0)))
            listed = any(lo <= a <= hi for lo, hi in entry.spoofed)
            assert walked == listed, (text, assmt_text, entry.name, src)
        if entry.spoofed:
            assert entry.exact and accepted(rs, entry.witness.src, entry.witness.dst, entry.name,
                                            entry.witness.proto, entry.witness.dport)
