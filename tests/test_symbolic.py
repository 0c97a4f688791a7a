"""Flows with open protocol/ports: the BDD partition groups every packet by outcome."""
from __future__ import annotations

from pathlib import Path

import pytest

from analyzer.netfilter.env import Namespace
from analyzer.parse import load_path
from analyzer.symbolic import explain_open_flow, parse_flow_spec

ROOT = Path(__file__).resolve().parent.parent


def groups_for(dump, flow, **ns_addrs):
    rs = load_path(str(ROOT / dump)).ruleset
    ns = Namespace()
    for iface, cidr in ns_addrs.items():
        ns.add_addr(cidr, iface)
    spec = parse_flow_spec(flow)
    from dataclasses import replace
    spec = replace(spec, template=replace(spec.template, iif="eth0"))
    return explain_open_flow(rs, spec, ns)


def test_open_port_splits_the_redirected_port_from_the_rest():
    groups, complete = groups_for("samples/seed2-sidecar-pod.rules", "tcp 10.6.2.2 -> 10.7.3.3", eth0="10.7.3.3/24")
    assert complete
    by = {g.description: g for g in groups}
    assert sorted(by) == ["dport 0-8079, 8081-65535", "dport 8080"]
    assert by["dport 8080"].outcomes[0].forward.pkt.dport == 15001
    other = by["dport 0-8079, 8081-65535"]
    assert other.outcomes[0].forward.pkt.dport == other.witness.dport


def test_open_protocol_separates_tcp_from_other_protocols():
    groups, complete = groups_for("samples/env/kubeproxy-node.rules", "10.1.1.1 -> 10.96.0.10", cni0="10.244.0.1/24")
    assert complete and len(groups) == 2
    by = {g.description: g for g in groups}
    assert sorted(by) == ["every packet of the flow except: proto tcp; dport 80", "proto tcp; dport 80"]
    dnat = [s for s in by["proto tcp; dport 80"].outcomes[0].forward.steps if s.verdict.startswith("DNAT")]
    assert dnat and "10.244.0.5:8080" in dnat[0].verdict
    rest = by["every packet of the flow except: proto tcp; dport 80"]
    assert not any(s.verdict.startswith("DNAT") for s in rest.outcomes[0].forward.steps)


def test_flow_spec_takes_the_last_address():
    """255.255.255.255 (and ffff:...:ffff) as an endpoint: its witness is itself (no overflow)."""
    assert str(parse_flow_spec("tcp 10.0.0.1 -> 255.255.255.255:80").template.dst) == "255.255.255.255"
    assert str(parse_flow_spec("tcp 255.255.255.254/31 -> 10.0.0.1:80").template.src) == "255.255.255.254"
    assert parse_flow_spec("tcp [::1] -> [ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:80").template.dst.packed == b"\xff" * 16


def test_flow_spec_reports_open_fields():
    assert parse_flow_spec("udp 10.0.0.1:53 -> 10.0.0.2").open == {"dport"}
    assert parse_flow_spec("tcp 10.0.0.1:1 -> 10.0.0.2:2").open == frozenset()


def test_a_flow_without_ports_has_none():
    from analyzer.netfilter.walk import parse_flow

    p = parse_flow("icmp 10.0.0.1 -> 10.0.0.2")
    assert (p.proto, p.sport, p.dport, p.icmp_type) == (1, None, None, 8)
    assert parse_flow("tcp 10.0.0.1 -> 10.0.0.2:80").sport == 40000
    assert parse_flow("tcp 10.0.0.1:5 -> 10.0.0.2").dport is None


def _kube_proxy_node(services: int):
    """(dump text, lazily parsed ruleset, namespace) of a generated kube-proxy node: eth0
    192.168.0.2/24, default route via 192.168.0.1."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gen_kubeproxy import generate

    from analyzer.parse import load_ruleset

    text = generate(services=services, seed=3)
    ns = Namespace()
    ns.add_addr("192.168.0.2/24", "eth0")
    ns.add_route("default via 192.168.0.1 dev eth0")
    return text, load_ruleset((text, "kp.rules"), lazy=True).ruleset, ns


def test_open_source_and_service_cidr_on_a_generated_kube_proxy_dump():
    """Every ClusterIP:port of a generated kube-proxy dump is its own class, translated to one of
    its endpoints; everything else in the service CIDR falls through (one witness each)."""
    import re

    from analyzer.symbolic import _plain, explain_classes

    text, rs, ns = _kube_proxy_node(40)
    spec = parse_flow_spec("10.0.0.0/8 -> 10.96.0.0/12", iif="eth0")
    classes, rest, _ = explain_classes(rs, spec, ns)
    assert rest.is_empty()
    rule = r"^-A KUBE-SERVICES -d (10\.\S+)/32 -p (tcp|udp) (.*?)--dport (\d+)"
    found = re.findall(rule, text, re.M)
    want = {(d, p, port) for d, p, rest, port in found if "has no endpoints" not in rest}
    refused = {(d, p, port) for d, p, rest, port in found if "has no endpoints" in rest}
    assert want and refused
    translated, rejected = set(), set()
    for c in classes:
        w = _plain(witness_of(c, spec))
        key = (str(w.dst), {6: "tcp", 17: "udp"}.get(w.proto), str(w.dport))
        for o in c.result:
            if any(s.verdict.startswith("DNAT") for s in o.forward.steps):
                translated.add(key)
            if o.disposition == "rejected":
                rejected.add(key)
    assert want <= translated and refused <= rejected


def witness_of(c, spec):
    from analyzer.netfilter.symbolic import witness
    return witness(spec, c.witness, c.packets.space)


def test_open_destination_on_the_tum_firewall():
    """The largest firewall of the iptables-semantics corpus (TUM, thousands of rules): an open
    source and destination explain through FORWARD, each class with a concrete witness inside it."""
    import os

    corpus = Path(os.environ.get("SYNACK_CORPUS", ROOT.parent / "shared" / "corpus"))
    path = corpus / "iptables" / "iptables-semantics" / "IPPartEval__TUM_Net__iptables-save-2015-09-03_15-56-50"
    if not path.exists():
        pytest.skip("corpus not present")
    from analyzer.symbolic import explain_classes

    rs = load_path(str(path)).ruleset
    spec = parse_flow_spec("tcp 0.0.0.0/0 -> 131.159.0.0/16:22", iif="eth0")
    classes, rest, space = explain_classes(rs, spec, Namespace(), limit=60)
    assert len(classes) == 60 and not rest.is_empty()
    for c in classes:
        assert c.witness["dport"] == 22 and not (c.packets & space.eq("dport", 22)).is_empty()
        assert any(o.disposition in ("dropped", "rejected", "forwarded") for o in c.result)


def test_open_mark_on_a_calico_node():
    """A Calico node from the corpus (AKS, kubenet, 194 filter rules) reads and writes the mark
    all the way (Calico's 0x10000 policy-accept bit, kube-proxy's 0x4000 masquerade bit): with
    the mark open, the classes split on exactly those bits; a packet arriving with 0x4000 is
    accepted by KUBE-FORWARD before Calico's own accept rule; random packets of every class walk
    as its witness does."""
    import os
    import random

    from analyzer.explain import explain_flow
    from analyzer.netfilter.symbolic import witness
    from analyzer.symbolic import _plain, explain_classes, signature

    corpus = Path(os.environ.get("SYNACK_CORPUS", ROOT.parent / "shared" / "corpus"))
    path = corpus / "iptables" / "calico" / "aks-kubenet-calico__filter-list-rules.txt"
    if not path.exists():
        pytest.skip("corpus not present")
    rs = load_path(str(path)).ruleset
    ns = Namespace()
    ns.add_addr("10.240.0.4/16", "eth0")
    ns.add_addr("10.244.0.1/24", "cbr0")
    spec = parse_flow_spec("tcp 10.244.1.5 -> 10.244.0.5:80 mark any ctstate new,established",
                           iif="cali112d888c0c2")
    groups, complete = explain_open_flow(rs, spec, ns)
    assert complete
    by = {g.description: g for g in groups}
    accepted_at = {d: [s.where for s in g.outcomes[0].forward.steps if s.verdict == "ACCEPT"] for d, g in by.items()}
    assert accepted_at["mark 0x4000/0x14000; ctstate NEW"] == ["filter:KUBE-FORWARD:rule:2"]
    assert accepted_at["mark 0x0/0x14000; ctstate NEW"] == ["filter:FORWARD:rule:7"]  # Calico: policy accepted
    assert any(d.endswith("ctstate ESTABLISHED") for d in by)
    classes, rest, space = explain_classes(rs, spec, ns)
    rnd = random.Random(5)
    for c in classes:
        for _ in range(3):
            v = c.packets.pick({"mark": rnd.getrandbits(32), "sport": rnd.getrandbits(16)})
            got = explain_flow(rs, _plain(witness(spec, v, space)), ns)
            assert signature(got) == signature(c.result)


MARKS = """*mangle
:PREROUTING ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
-A PREROUTING -j CONNMARK --restore-mark --nfmask 0xff --ctmask 0xff
-A PREROUTING -m mark --mark 0x0/0xff -p tcp --dport 8080 -j MARK --set-xmark 0x7/0xff
-A PREROUTING -j CONNMARK --save-mark --nfmask 0xff --ctmask 0xff
COMMIT
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -m conntrack --ctstate INVALID -j DROP
-A FORWARD -m mark --mark 0x7/0xff -j ACCEPT
COMMIT
"""


def test_open_mark_and_state_from_the_command_line(tmp_path):
    """`mark any ctstate any connmark any` after the flow: one group per way the rules and
    conntrack tell them apart, named by mark cubes and states; JSON lists the open fields."""
    from _golden import run

    dump = tmp_path / "marks.rules"
    dump.write_text(MARKS)
    args = ["explain", str(dump), "--flow", "tcp 10.0.1.2 -> 10.0.2.2:8080 mark any ctstate any connmark any",
            "--from-iface", "sk1b", "--addr", "10.0.1.1/24@sk1b", "--addr", "10.0.2.1/24@sk2b"]
    rc, out, err = run(args)
    assert err == "" and rc == 0, err
    assert "open: connmark, ctstate, mark, sport" in out
    heads = [line for line in out.splitlines() if line.startswith("=== group")]
    assert any("ctstate INVALID" in h for h in heads) and any("ctstate RELATED" in h for h in heads)
    assert any("connmark 0x0/0xff; ctstate ESTABLISHED" in h for h in heads)
    rc, out, _ = run(args + ["-o", "json"])
    doc = __import__("json").loads(out)
    assert doc["open_fields"] == ["connmark", "ctstate", "mark", "sport"] and doc["complete"]
    invalid = [g for g in doc["groups"] if "INVALID" in g["packets"]]
    assert invalid and invalid[0]["explain"]["outcomes"][0]["request"]["end"] == "dropped"


@pytest.mark.parametrize("flow, extra, message, caret", [
    ("tcp 10.0.0.1 -> 10.0.0.2:80 mrk 0x1", [], "did you mean 'mark'?", "^^^"),
    ("tcp 10.0.0.1 -> 10.0.0.2:80 mark 0x3/0x1", [], "has bits outside its mask", "^^^^^^^"),
    ("tcp 10.0.0.1 -> 10.0.0.2:80 uid 1337", [], "add --local", "^^^"),
    ("tcp 10.0.0.1 -> 10.0.0.2:80 ctstate untracked", [], "NOTRACK", "^^^^^^^^^"),
    ("tcp 10.0.0.1 -> 10.0.0.2:80 connmark 0x5", [], "add 'ctstate established'", "^^^"),
    ("tcp 10.0.0.1 -> 10.0.0.2:80 mark 0x1", ["--mark", "0x2"], "given twice", None),
    # the tuple too: the endpoint, protocol or whole text at fault, with the syntax as help
    ("tcp 10.0.0.0/33 -> 10.0.0.2:80", [], "does not appear to be an IPv4 or IPv6 network", "^" * 11),
    ("tcp 10.0.0.1 -> 10.0.0.2:99999", [], "an endpoint is ADDR[:PORT]", "^" * 14),
    ("tcp fd00::/64 -> [fd00::]/64", [], "inside the brackets, [fd00::/64]", "^" * 11),
    ("tpc 10.0.0.1 -> 10.0.0.2:80", [], "unknown protocol 'tpc'", "^^^"),
    ("icmp 10.0.0.1 -> 10.0.0.2:80", [], "icmp flows have no ports", "^" * 11),
    ("tcp 10.0.0.1 -> fd00::1", [], "different address families", "^" * 7),
    ("tcp 10.0.0.1 > 10.0.0.2", [], "[PROTO] SRC[:PORT] -> DST[:PORT]", "^" * 23),
])
def test_flow_words_errors_point_at_the_word(tmp_path, flow, extra, message, caret):
    from _golden import run

    dump = tmp_path / "marks.rules"
    dump.write_text(MARKS)
    rc, out, err = run(["explain", str(dump), "--flow", flow, "--from-iface", "eth0", *extra])
    assert rc == 2 and out == "" and message in err and "Traceback" not in err
    if caret:
        lines = err.splitlines()
        text_line = next(i for i, line in enumerate(lines) if line.strip() == flow)
        assert lines[text_line + 1].strip() == caret


def test_ipset_and_mark_open_together(tmp_path):
    """`-m set` with `--ipset` and `-m mark` on an open source and mark: the group that takes
    every source and mark the flow allows is said by what it leaves out (exactly: every
    combination of the values listed)."""
    from _golden import run

    (tmp_path / "sets.save").write_text("create allow hash:net family inet\nadd allow 10.0.0.0/25\n")
    (tmp_path / "set.rules").write_text("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n"
                                       "-A FORWARD -m set --match-set allow src -m mark ! --mark 0x1/0x1 -j ACCEPT\n"
                                       "COMMIT\n")
    rc, out, err = run(["explain", str(tmp_path / "set.rules"), "--ipset", str(tmp_path / "sets.save"),
                        "--flow", "tcp 10.0.0.0/24 -> 10.1.0.1:80 mark 0x0/0xfffffffe", "--from-iface", "eth0"])
    heads = [line.split("  (")[0] for line in out.splitlines() if line.startswith("=== group")]
    assert heads == ["=== group 1: every packet of the flow except: src 10.0.0.0/25; mark 0x0",
                     "=== group 2: src 10.0.0.0/25; mark 0x0"], out


def test_open_connmark_of_an_established_connection(tmp_path):
    """`connmark any ctstate established`: the classes are over the connmark of established
    packets only (a new connection's entry has mark 0, and none is mixed in)."""
    from _golden import run

    dump = tmp_path / "marks.rules"
    dump.write_text(MARKS)
    rc, out, err = run(["explain", str(dump), "--flow", "tcp 10.0.1.2 -> 10.0.2.2:8080 connmark any ctstate established",
                        "--from-iface", "sk1b", "--addr", "10.0.1.1/24@sk1b", "--addr", "10.0.2.1/24@sk2b"])
    heads = [line.split("  (")[0] for line in out.splitlines() if line.startswith("=== group")]
    assert heads == ["=== group 1: connmark 0x0/0xff", "=== group 2: connmark any but 0x0/0xff"], out
    assert "conntrack:ESTABLISHED" in out and "conntrack:NEW" not in out


RECENT = """*nat
:PREROUTING ACCEPT [0:0]
:KUBE-SVC - [0:0]
-A PREROUTING -d 10.96.0.1/32 -p tcp --dport 80 -j KUBE-SVC
-A KUBE-SVC -m recent --name A --rcheck --seconds 10800 --reap -j DNAT --to-destination 10.0.2.2:8080
-A KUBE-SVC -j DNAT --to-destination 10.0.2.3:8080
COMMIT
"""


@pytest.mark.parametrize("flow", ["tcp 10.0.1.2:4000 -> 10.96.0.1:80", "tcp 10.0.1.0/24 -> 10.96.0.1:80"])
def test_recent_is_a_printed_assumption(tmp_path, flow):
    """`-m recent` is evaluated as the client's first connection: explain says so, for one
    flow and for a set of them, in text and JSON."""
    import json

    from _golden import run

    dump = tmp_path / "recent.rules"
    dump.write_text(RECENT)
    rc, out, err = run(["explain", str(dump), "--flow", flow, "--from-iface", "eth0"])
    assert "assumes: -m recent: the flow is the client's first connection" in out, out
    rc, out, err = run(["explain", str(dump), "--flow", flow, "--from-iface", "eth0", "-o", "json"])
    assert any(a.startswith("-m recent") for a in json.loads(out)["assumptions"])
    rc, out, err = run(["explain", str(dump), "--flow", flow.replace("10.96.0.1", "10.96.0.2"), "--from-iface", "eth0"])
    assert "-m recent" not in out  # only when a walk met such a rule


def test_open_flow_limits_are_said_in_text_and_json(tmp_path):
    """`--max-classes` stops the exploration and says how much is left unexplained (with an
    example packet); `--show-groups` prints the first traces and counts the groups not shown;
    the summary counts every class by kind of outcome. JSON says the same, every group listed."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _golden import run
    from gen_kubeproxy import generate

    dump = tmp_path / "kp.rules"
    dump.write_text(generate(services=40, seed=3))
    base = ["explain", str(dump), "--flow", "10.0.0.0/8 -> 10.96.0.0/12", "--from-iface", "eth0",
            "--addr", "192.168.0.2/24@eth0", "--route", "default via 192.168.0.1 dev eth0"]
    # grouped by fate, the first 10 classes make 2 groups: one shown, one counted
    rc, out, err = run(base + ["--max-classes", "10", "--show-groups", "1"])
    assert rc in (0, 1), err
    assert "over 10 class(es)" in out and "stopped at the limit of 10 classes (--max-classes)" in out
    assert "the remaining packets are not explained, e.g. " in out
    assert len([line for line in out.splitlines() if line.startswith("=== group")]) == 1
    assert "more group(s)" in out and "not shown" in out
    rc, out, err = run(base + ["--max-classes", "10", "-o", "json"])
    doc = json.loads(out)
    assert doc["complete"] is False and doc["classes"] == 10 and doc["max_classes"] == 10
    # grouped by rules crossed, each class is in one group (by fate, a class counts in every
    # group whose packets reach it: docs/explain.md)
    path = json.loads(run(base + ["--max-classes", "10", "-o", "json", "--group-by", "path"])[1])
    assert path["unexplained_example"] and sum(g["classes"] for g in path["groups"]) == 10
    assert all(g["packets"] for g in doc["groups"])
    # the class bookkeeping below is that of the grouping by rules crossed (one group a class)
    base = base + ["--group-by", "path"]
    rc, out, err = run(base)
    assert "APPROXIMATE" not in out.splitlines()[1] and "by outcome" in out
    total = int(out.splitlines()[1].split(" class(es)")[0].split()[-1].replace(",", ""))
    tally = sum(int(line.split()[0].replace(",", "")) for line in out.splitlines() if " class(es) in " in line)
    assert tally == total
    # JSON: every group traced by default, the same summary as the text, one group per line
    rc, out, err = run(base + ["-o", "json"])
    doc = json.loads(out)
    assert doc["schema_version"] == "1.2" and doc["complete"]
    # doc["classes"] == total: not so when grouped by fate (the text sums Group.classes, which
    # count a class in every group it reaches): test_setwalk.py::test_fate_group_classes_add_up
    assert doc["groups_traced"] == len(doc["groups"]) and all("explain" in g and g["packets"] for g in doc["groups"])
    assert sum(s["classes"] for s in doc["summary"]) == total == sum(g["classes"] for g in doc["groups"])
    text_summary = [line for line in run(base)[1].splitlines() if " class(es) in " in line]
    assert [(s["classes"], s["groups"], s["outcome"]) for s in doc["summary"]] == \
        [(int(line.split()[0].replace(",", "")), int(line.split(" in ")[1].split()[0].replace(",", "")),
          line.split("group(s): ")[1].split("  (")[0].replace(" [APPROXIMATE]", "")) for line in text_summary]
    assert len(out.splitlines()) < 60 + len(doc["groups"])  # not pretty-printed group by group
    # --show-groups caps the traces in JSON too: the other groups are listed, without trace or ranges
    rc, out, err = run(base + ["-o", "json", "--show-groups", "2"])
    capped = json.loads(out)
    assert capped["groups_traced"] == 2 and len(capped["groups"]) == len(doc["groups"])
    assert [("explain" in g, g["packets"] is None) for g in capped["groups"][:3]] == [(True, False), (True, False), (False, True)]
    assert [(g["witness"], g["outcome"], g["classes"], g["diagnostics"]) for g in capped["groups"]] == \
        [(g["witness"], g["outcome"], g["classes"], g["diagnostics"]) for g in doc["groups"]]
    assert capped["groups"][0]["explain"] == doc["groups"][0]["explain"]


def test_open_flow_classes_are_per_service_port_not_per_address():
    """Packets that meet no service rule (another port, another protocol, an address without a
    service) are not split by ClusterIP: the classes are the service ports' (each split by the
    sources its rules tell apart) plus a few."""
    import re

    from analyzer.symbolic import explain_classes

    text, rs, ns = _kube_proxy_node(40)
    classes, rest, _ = explain_classes(rs, parse_flow_spec("10.0.0.0/8 -> 10.96.0.0/12", iif="eth0"), ns)
    assert rest.is_empty()
    ports = re.findall(r"^-A KUBE-SERVICES -d (10\.\S+)/32 .*?--dport (\d+) -j (KUBE-SVC-\S+)", text, re.M)
    endpoints = {c: len(re.findall(rf"^-A {c} .*-j KUBE-SEP-", text, re.M)) for _, _, c in ports}
    bound = sum(2 + endpoints[c] for _, _, c in ports) + 40
    assert len(classes) <= bound, (len(classes), bound)


def test_open_source_holding_a_local_address_is_a_martian_class():
    """A set lookup of an open address decides silently: the namespace's own address inside an
    open source range arriving from a link must be its own class (dropped as a martian), not
    part of the forwarded one."""
    from analyzer.parse import load_ruleset
    from analyzer.symbolic import explain_open

    rs = load_ruleset(("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\nCOMMIT\n", "x")).ruleset
    ns = Namespace()
    ns.add_addr("192.168.0.2/24", "eth0")
    ns.add_addr("10.0.0.1/24", "eth1")
    res = explain_open(rs, parse_flow_spec("tcp 192.168.0.0/24 -> 10.0.0.0/24:80", iif="eth0"), ns)
    assert res.complete
    by = {g.description: [o.disposition for o in g.outcomes] for g in res.groups}
    assert by["src 192.168.0.2; dst 10.0.0.0/24"] == ["dropped"]
    assert by["src 192.168.0.0/31, 192.168.0.3-192.168.0.255; dst 10.0.0.0, 10.0.0.2-10.0.0.255"] == ["forwarded"]


def test_open_address_memos_answer_only_inside_the_walk_that_asked():
    """The noting namespace's route memo and local-address test answer an open address again
    only under the recorder that noted its decisions: a second walk (another class) notes them
    itself, or its class would be wider than its path."""
    import ipaddress

    from analyzer.engine.concolic import Recorder, sym_address
    from analyzer.engine.packetset import PacketSpace
    from analyzer.netfilter.symbolic import noting_namespace

    ns = Namespace()
    ns.add_addr("192.168.0.2/24", "eth0")
    ns.add_route("10.244.0.0/16 via 192.168.0.3 dev eth0")
    nsw = noting_namespace(ns)
    sp = PacketSpace()
    own, pod = ipaddress.ip_address("192.168.0.2"), ipaddress.ip_address("10.244.1.1")
    conds = []
    for _ in range(2):
        a, b = sym_address(int(own), "src", 4), sym_address(int(pod), "dst", 4)
        with Recorder(sp) as rec:
            for _ in range(2):  # asked again in the same walk: answered by the memo
                assert nsw.is_local(a) and nsw.route(a).kind == "local"
                assert nsw.route(b).via == ipaddress.ip_address("192.168.0.3")
        conds.append(rec.condition)
    assert conds[0] == conds[1]
    assert conds[0] == sp.eq("src", own) & sp.prefix("dst", "10.244.0.0/16")


def test_in_network_notes_what_the_ipaddress_test_notes():
    """`in_network` answers ``addr in net`` for an open address (plain, NETMAP-rewritten, IPv6)
    and notes the very decision the ipaddress test notes, in every recorder: its atoms are
    shared by an exploration's recorders (one cache), the decisions are not."""
    import ipaddress

    from analyzer.engine.concolic import Recorder, in_network, sym_address
    from analyzer.engine.packetset import PacketSpace

    sp = PacketSpace()
    cases = [(0x0A600001, 4, None, 0, "10.96.0.0/12"), (0x0A600001, 4, None, 0, "10.0.0.0/16"),
             (0x7F000001, 4, None, 0, "127.0.0.0/8"), (0x0A600001, 4, 0xFF, 0xC0A80000, "192.168.0.0/24"),
             (0x0A600001, 4, 0xFF, 0xC0A80000, "192.168.1.0/24"), (1, 6, None, 0, "::/127"),
             (0xFE80 << 112 | 5, 6, None, 0, "fe80::/10"), (0x0A600001, 4, None, 0, "::/0")]
    cache: dict = {}
    for value, fam, keep, xor, text in cases:
        net = ipaddress.ip_network(text)

        def addr():
            return sym_address(value, "dst", fam, keep, xor)
        with Recorder(sp) as ref:
            want = addr() in net
        for _ in range(2):  # a second recorder on the same cache notes the decision again
            with Recorder(sp, cache=cache) as rec:
                assert in_network(addr(), net) == want, text
            assert rec.condition == ref.condition, text
    a = sym_address(0x7F000001, "src", 4)
    with Recorder(sp) as rec:
        assert a.is_loopback and not a.is_multicast
    assert rec.condition == sp.prefix("src", "127.0.0.0/8")
    with Recorder(sp) as rec:
        assert sym_address(0xFF02 << 112 | 1, "src", 6).is_multicast
    assert rec.condition == sp.prefix("src", "ff00::/8")


def test_a_lost_reason_names_the_rule_being_evaluated():
    """The recording walker names the rule in a lost reason (its label and dump line), though it
    builds that text only when something is lost."""
    from analyzer.parse import load_ruleset
    from analyzer.symbolic import explain_classes

    rs = load_ruleset(("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -j DNAT --to-destination "
                       "10.9.0.1-10.9.0.9\nCOMMIT\n", "x.rules")).ruleset
    ns = Namespace()
    ns.add_addr("192.168.0.2/24", "eth0")
    ns.add_route("default via 192.168.0.1 dev eth0")
    classes, rest, _ = explain_classes(rs, parse_flow_spec("tcp 10.0.0.0/30 -> 10.96.0.1:80", iif="eth0"), ns)
    assert rest.is_empty()
    lost = {r for c in classes for r in c.lost}
    assert lost and all(r.startswith("nat:PREROUTING:rule:1 (line 3): ") for r in lost), lost
    # a statistic fork walks the other branch (rule 2) before rule 1's target: still rule 1's
    rs = load_ruleset(("*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -m statistic --mode random --probability "
                       "0.5 -j DNAT --to-destination 10.9.0.1-10.9.0.9\n-A PREROUTING -p tcp -j DNAT "
                       "--to-destination 10.8.0.1-10.8.0.9\nCOMMIT\n", "x.rules")).ruleset
    classes, rest, _ = explain_classes(rs, parse_flow_spec("tcp 10.0.0.0/30 -> 10.96.0.1:80", iif="eth0"), ns)
    lost = {r.partition(": ")[0] for c in classes for r in c.lost}
    assert lost == {"nat:PREROUTING:rule:1 (line 3)", "nat:PREROUTING:rule:2 (line 4)"}, lost


def test_open_sources_without_a_route_back_are_one_class(tmp_path):
    """No route leads back to the flow's sources (only --addr given): explain's peer model routes
    each client back on its input interface, whatever its address. A source range is one class,
    not one per address (before: 50 classes for 50 addresses, then the --max-classes stop); a
    destination range overlapping the sources is APPROXIMATE, said with the reason."""
    from _golden import run

    dump = tmp_path / "acc.rules"
    dump.write_text("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
    base = ["explain", str(dump), "--from-iface", "eth1", "--addr", "192.168.0.2/24@eth0", "--max-classes", "50"]
    rc, out, err = run(base + ["--flow", "tcp 10.9.0.0/16 -> 192.168.0.5:80"])
    assert rc == 0 and "1 group(s) by fate over 1 class(es)" in out and "group 1: every packet of the flow  (" in out, out
    assert "client sees tcp 192.168.0.5:80 -> 10.9.0.1:40000 (as dialled)" in out
    rc, out, err = run(base + ["--flow", "tcp 10.9.0.0/16 -> 10.9.0.0/24:80"])
    assert "stopped at the limit" not in out and "the destination may be the client's own address" in out, out


def test_interface_names_are_every_name_the_rules_write():
    """netfilter.symbolic.interface_names skips a rule whose text holds neither '-i' nor '-o'
    (every option it reads holds one): on random rules with every interface option, quoted
    comments and look-alike words, the names are those its pattern finds in every rule."""
    import random

    from analyzer.netfilter.symbolic import _IFACE_WORDS, interface_names
    from analyzer.parse import load_ruleset

    rnd = random.Random(4)
    opts = ["-i", "-o", "--in-interface", "--out-interface", "-m physdev --physdev-in", "-m physdev --physdev-out"]
    words = ["-p tcp", "-m comment --comment \"sync-ingress x-o\"", "-s 10.0.0.0/8", "-j ACCEPT", "-m multiport --dports 80,81",
             "! -i lo", "-m tcp --dport 22"]
    for _ in range(30):
        rules = []
        for _ in range(rnd.randrange(1, 12)):
            parts = [rnd.choice(words) for _ in range(rnd.randrange(0, 3))]
            if rnd.random() < 0.6:
                parts.append(f"{rnd.choice(opts)} {rnd.choice(['eth0', 'eth1', 'veth+', 'cni0', 'br-x', 'wg0'])}")
            rnd.shuffle(parts)
            rules.append("-A FORWARD " + " ".join(parts) + " -j ACCEPT")
        rs = load_ruleset(("*filter\n:FORWARD ACCEPT [0:0]\n" + "\n".join(rules) + "\nCOMMIT\n", "x.rules")).ruleset
        want = {m.group(1).strip("'\"") for r in rs.rules() for m in _IFACE_WORDS.finditer(r.text)} - {"+"}
        got = set(interface_names(rs, Namespace()))
        assert got == want, rules
