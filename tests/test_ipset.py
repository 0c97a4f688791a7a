"""`ipset save` contents make `-m set` matches exact; without them they stay APPROXIMATE."""
from __future__ import annotations

import ipaddress
from pathlib import Path

from analyzer.parse.ipset import load_ipsets

ROOT = Path(__file__).resolve().parent.parent
A = ipaddress.ip_address


def test_ipset_save_types_and_membership():
    text = (ROOT / "samples" / "explain" / "ipset-allowed.save").read_text()
    sets, diags = load_ipsets(text, "s.save")
    assert diags == []
    allowed, blocked = sets["allowed-clients"], sets["blocked-ports"]
    assert allowed.contains([A("10.0.1.77")]) is True
    assert allowed.contains([A("192.168.7.7")]) is True
    assert allowed.contains([A("10.0.3.2")]) is False
    assert blocked.contains([A("10.0.2.2"), (6, 9090)]) is True
    assert blocked.contains([A("10.0.2.2"), (17, 9090)]) is False  # tcp only
    assert blocked.contains([A("10.0.2.2"), (6, 8080)]) is False


def test_port_without_protocol_means_tcp_and_unknown_types_are_not_evaluated():
    sets, diags = load_ipsets("create p hash:ip,port\nadd p 10.0.0.1,80\ncreate m hash:mac\nadd m 00:11:22:33:44:55\n", "x")
    assert diags == []
    assert sets["p"].contains([A("10.0.0.1"), (6, 80)]) is True
    assert sets["p"].contains([A("10.0.0.1"), (17, 80)]) is False
    assert sets["m"].contains([A("10.0.0.1")]) is None


def test_bad_lines_are_located_errors():
    _, diags = load_ipsets("add ghost 10.0.0.1\nflush\n", "x.save")
    assert [(d.code, d.span.line) for d in diags] == [("PRS111", 1), ("PRS111", 2)]
