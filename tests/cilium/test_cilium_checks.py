"""Checks layer, Cilium: each CIL check's samples (bad raises exactly its code, good raises
nothing, parse included), through the CLI as a user runs it; CIL004 with a known node."""
from __future__ import annotations

from pathlib import Path

import pytest

from analyzer.checks import CheckContext
from analyzer.checks.cilium import run_cilium_checks
from analyzer.cli import main
from analyzer.parse.cilium import parse_cilium

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "checks"
CODES = sorted(p.parent.name for p in SAMPLES.glob("CIL*/bad.txt"))


def lint(path: Path, node: str | None = None) -> list:
    res = parse_cilium(path.read_text(), str(path))
    ctx = CheckContext(None, res.files, extra={"cilium": (res.dump,), "node": node})
    return list(res.diagnostics) + run_cilium_checks(ctx)


def test_every_cil_code_has_samples():
    assert CODES == ["CIL001", "CIL002", "CIL003", "CIL004", "CIL005"]


@pytest.mark.parametrize("code", CODES)
def test_cil_sample(code):
    bad = lint(SAMPLES / code / "bad.txt")
    assert bad and {d.code for d in bad} == {code}
    assert lint(SAMPLES / code / "good.txt") == []


@pytest.mark.parametrize("code", CODES)
def test_cil_sample_through_the_cli(code, capsys):
    assert main(["lint", str(SAMPLES / code / "bad.txt")]) == 1
    assert f" {code} [" in capsys.readouterr().out
    assert main(["lint", str(SAMPLES / code / "good.txt")]) == 0


JSON_LOCAL = """[{"spec": {"id": 7, "frontend-address": {"ip": "10.4.26.234", "port": 80, "protocol": "TCP",
  "scope": "external"}, "flags": {"type": "ExternalIPs", "extTrafficPolicy": "Local",
  "intTrafficPolicy": "Cluster", "name": "web", "namespace": "default"},
  "backend-addresses": [{"ip": "10.4.26.11", "port": 80, "protocol": "TCP", "state": "active",
  "nodeName": "node-b"}]}}]
"""


def test_local_policy_without_a_backend_on_the_named_node(tmp_path):
    f = tmp_path / "svc.json"
    f.write_text(JSON_LOCAL)
    assert [d.code for d in lint(f, node="node-a")] == ["CIL004"]
    assert lint(f, node="node-b") == []
    assert lint(f) == []  # the node is not known: nothing to compare with


def test_duplicate_without_protocol_is_approximate(tmp_path):
    f = tmp_path / "old.txt"
    f.write_text("ID   Frontend        Service Type   Backend\n"
                 "1    10.0.0.1:53     ClusterIP      1 => 10.1.0.1:53\n"
                 "2    10.0.0.1:53     ClusterIP      1 => 10.1.0.1:53\n")
    (d,) = lint(f)
    assert d.code == "CIL002" and d.confidence == "APPROXIMATE"


def test_unknown_backend_state_is_not_inactive(tmp_path):
    f = tmp_path / "old.txt"
    f.write_text("ID   Frontend        Service Type   Backend\n"
                 "1    10.0.0.1:80     ClusterIP      1 => 10.1.0.1:80\n")
    assert lint(f) == []


def test_parse_cli_reports_listings(capsys):
    assert main(["parse", str(SAMPLES / "CIL003" / "bad.txt")]) == 0
    out = capsys.readouterr().out
    assert "cilium text: service-list (1 services, 3 backends); 0 error(s)" in out


def test_format_cilium_refuses_an_iptables_dump(tmp_path, capsys):
    f = tmp_path / "x.rules"
    f.write_text("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n")
    assert main(["parse", "--format", "cilium", str(f)]) == 2
    assert "PRS200" in capsys.readouterr().out
