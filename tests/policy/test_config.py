"""Configuration ([tool.synack] / synack.toml, found walking up like ruff) and suppressions
(rule comments, environment-file lines; unused ones reported as POL002)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from analyzer.cli import main
from analyzer.policy.config import find_config

REPO = Path(__file__).resolve().parents[2]
BAD = (REPO / "samples/checks/CHN005/bad.rules").read_text()
ENV = REPO / "samples" / "env"


def _lint(capsys, *argv):
    rc = main(["lint", *argv, "-o", "json"])
    doc = json.loads(capsys.readouterr().out)
    return rc, [d["code"] for d in doc["diagnostics"]], doc


def test_rule_comment_suppresses_its_code_on_that_rule(tmp_path, capsys):
    p = tmp_path / "r.rules"
    p.write_text(BAD.replace('--comment "leave bridged traffic alone"', '--comment "synack: ignore CHN005"'))
    rc, codes, _ = _lint(capsys, str(p), "--isolated")
    assert rc == 0 and codes == []


def test_unused_rule_suppression_is_reported(tmp_path, capsys):
    p = tmp_path / "r.rules"
    p.write_text(BAD.replace("-A FORWARD -i br0 -o eth0 -j ACCEPT",
                             '-A FORWARD -i br0 -o eth0 -m comment --comment "synack: ignore CHN001" -j ACCEPT'))
    rc, codes, doc = _lint(capsys, str(p), "--isolated")
    assert rc == 1 and codes == ["CHN005", "POL002"]
    pol = doc["diagnostics"][1]
    assert pol["span"]["line"] == 8 and "no CHN001 finding on this rule" in pol["message"]
    # a suppression of a check that did not run is not stale
    rc, codes, _ = _lint(capsys, str(p), "--isolated", "--select", "CHN005")
    assert codes == ["CHN005"]


def test_config_found_walking_up_from_the_input(tmp_path, capsys):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.synack]\nignore = ["CHN005"]\n')
    sub = tmp_path / "nodes" / "a"
    sub.mkdir(parents=True)
    p = sub / "r.rules"
    p.write_text(BAD)
    assert find_config(str(p)).path == str(tmp_path / "pyproject.toml")
    rc, codes, _ = _lint(capsys, str(p))
    assert rc == 0 and codes == []
    rc, codes, _ = _lint(capsys, str(p), "--isolated")
    assert rc == 1 and codes == ["CHN005"]
    # synack.toml nearer the input wins
    (sub / "synack.toml").write_text('fail-on = "error"\n')
    rc, codes, _ = _lint(capsys, str(p))
    assert rc == 0 and codes == ["CHN005"]   # a warning, below fail-on = error


def test_per_file_ignores_and_bad_config(tmp_path, capsys):
    (tmp_path / "synack.toml").write_text('[per-file-ignores]\n"legacy/*.rules" = ["CHN005"]\n')
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / "old.rules").write_text(BAD)
    (tmp_path / "new.rules").write_text(BAD)
    assert _lint(capsys, str(tmp_path / "legacy" / "old.rules"))[1] == []
    assert _lint(capsys, str(tmp_path / "new.rules"))[1] == ["CHN005"]
    (tmp_path / "synack.toml").write_text('selct = ["CHN"]\n')
    assert main(["lint", str(tmp_path / "new.rules")]) == 2
    assert "unknown key(s) selct" in capsys.readouterr().err


def test_config_default_environment(tmp_path, capsys):
    (tmp_path / "synack.toml").write_text(f'env = "{ENV / "seed1-broken.yaml"}"\nselect = ["NAT001"]\n')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc, codes, _ = _lint(capsys)
    finally:
        os.chdir(cwd)
    assert rc == 1 and codes == ["NAT001"]


def test_environment_file_suppression(tmp_path, capsys):
    text = (ENV / "seed1-broken.yaml").read_text().replace("seed1-host.rules", str(ENV / "seed1-host.rules"))
    p = tmp_path / "env.yaml"
    # inside the host's block: covers what concerns that namespace
    p.write_text(text.replace("  host:\n", "  host:\n    # synack: ignore[NAT001] the bridge is being replaced\n"))
    rc, codes, _ = _lint(capsys, "--env", str(p), "--select", "NAT", "--isolated")
    assert rc == 0 and codes == []
    # at the top level, for a code that does not fire: reported as unused
    p.write_text("# synack: ignore[NAT003]\n" + text)
    rc, codes, doc = _lint(capsys, "--env", str(p), "--select", "NAT", "--isolated")
    assert sorted(codes) == ["NAT001", "POL002"]
    pol = next(d for d in doc["diagnostics"] if d["code"] == "POL002")
    assert pol["span"] == {"path": str(p), "line": 1, "col": 1, "end_col": 25}


def test_check_no_finding_honours_suppressions(tmp_path, capsys):
    text = (ENV / "seed1-broken.yaml").read_text().replace("seed1-host.rules", str(ENV / "seed1-host.rules"))
    p = tmp_path / "env.yaml"
    p.write_text("# synack: ignore[NAT001]\n" + text)
    pol = tmp_path / "p.yaml"
    pol.write_text("assertions:\n  - name: quiet\n    no-finding: {codes: [NAT001]}\n")
    assert main(["check", str(pol), "--env", str(p), "--isolated"]) == 0
    assert main(["check", str(pol), "--env", str(ENV / "seed1-broken.yaml"), "--isolated"]) == 1
