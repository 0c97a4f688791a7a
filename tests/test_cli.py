"""The command line a user meets: exit codes, formats, selection, errors without tracebacks."""
from __future__ import annotations

import json

import pytest

from _golden import ROOT, run

BAD = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
      "-A INPUT -j NOWHERE\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n"


@pytest.fixture
def bad(tmp_path):
    p = tmp_path / "bad.rules"
    p.write_text(BAD)
    return str(p)


def test_lint_exit_codes_and_selection(bad):
    rc, out, _ = run(["lint", bad])
    assert rc == 1 and "CHN001" in out and "CHN004" in out
    rc, out, _ = run(["lint", bad, "--select", "CHN004"])
    assert rc == 1 and "CHN001" not in out
    rc, out, _ = run(["lint", bad, "--ignore", "CHN001,rule-after-terminal"])
    assert rc == 0 and "No findings." in out
    rc, _, _ = run(["lint", bad, "--select", "CHN004", "--fail-on", "error"])
    assert rc == 0  # CHN004 is a warning


def test_json_and_sarif_carry_versions(bad):
    rc, out, _ = run(["lint", bad, "-o", "json"])
    doc = json.loads(out)
    assert doc["schema_version"] and {d["code"] for d in doc["diagnostics"]} >= {"CHN001", "CHN004"}
    rc, out, _ = run(["lint", bad, "-o", "sarif"])
    sarif = json.loads(out)
    assert sarif["version"] == "2.1.0"
    res = sarif["runs"][0]["results"]
    assert res and all(r["locations"][0]["physicalLocation"]["region"]["startLine"] for r in res)


def test_unusable_input_and_usage_errors_exit_2(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 4)
    for argv in (["parse", str(junk)], ["lint", str(junk)],
                 ["explain", str(junk), "--flow", "tcp 1.1.1.1:1 -> 2.2.2.2:2"],
                 ["parse", str(tmp_path / "missing.rules")],
                 ["explain", str(ROOT / "samples" / "seed1-hairpin-host.rules"), "--flow", "nonsense"],
                 ["lint", "--env", str(junk)], ["parse"], ["frobnicate"]):
        rc, out, err = run(argv)
        assert rc == 2, argv
        assert "Traceback" not in out + err


def test_parse_writes_the_model_back(bad):
    rc, out, err = run(["parse", bad, "-o", "save"])
    assert rc == 1 and "CHN001" in err  # the undefined chain is reported on stderr
    assert "-A INPUT -j NOWHERE" in out and out.rstrip().splitlines()[-2] == "COMMIT"


def test_checks_lists_every_code():
    rc, out, _ = run(["checks"])
    assert rc == 0
    for code in ("PRS002", "PRS106", "CHN001", "CHN012", "NAT001", "NAT004"):
        assert code in out
