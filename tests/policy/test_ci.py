"""The pre-commit hook definitions run as pre-commit would run them (entry + args + files)."""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HOOKS = {h["id"]: h for h in yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())}


def _run(hook: dict, args: list[str], files: list[str]) -> subprocess.CompletedProcess:
    """pre-commit runs ``entry + args + filenames``; ``synack`` is this checkout's CLI."""
    entry = shlex.split(hook["entry"])
    assert entry[0] == "synack"
    cmd = [sys.executable, "-m", "analyzer", *entry[1:], *hook.get("args", []), *args]
    if hook.get("pass_filenames", True):
        cmd += files
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_hook_definitions_are_well_formed():
    import re
    for h in HOOKS.values():
        assert {"id", "name", "entry", "language"} <= set(h) and h["language"] == "python"
        re.compile(h["files"])
    assert re.search(HOOKS["synack-lint"]["files"], "nodes/node1.rules")


def test_lint_hook_passes_clean_and_fails_bad_dumps():
    ok = _run(HOOKS["synack-lint"], ["--isolated"], ["samples/checks/CHN005/good.rules"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _run(HOOKS["synack-lint"], ["--isolated"],
               ["samples/checks/CHN005/good.rules", "samples/checks/CHN005/bad.rules"])
    assert bad.returncode == 1 and "CHN005" in bad.stdout


def test_lint_env_hook():
    r = _run(HOOKS["synack-lint-env"], ["--isolated", "--env", "samples/env/seed1-broken.yaml"],
             ["samples/env/seed1-host.rules"])
    assert r.returncode == 1 and "NAT001" in r.stdout


def test_check_hook():
    hook = HOOKS["synack-check"]
    ok = _run(hook, ["samples/policies/seed2-sidecar.yaml", "--env", "samples/env/seed2-app-up.yaml"], [])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _run(hook, ["samples/policies/seed2-sidecar.yaml", "--env", "samples/env/seed2-app-down.yaml"], [])
    assert bad.returncode == 1 and "FAIL  app-reachable-through-sidecar" in bad.stdout


def test_ci_doc_names_the_shipped_hooks():
    doc = (REPO / "docs" / "ci.md").read_text()
    for hid in HOOKS:
        assert f"id: {hid}" in doc
    assert "upload-sarif" in doc and "junit:" in doc
