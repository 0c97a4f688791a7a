"""Golden samples: every environment under samples/env/ with its expected lint and explain output
next to it (NAME.lint.txt, NAME.explain.txt). ``pytest --update-goldens`` rewrites them."""
from __future__ import annotations

import io
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from analyzer.cli import main

ROOT = Path(__file__).resolve().parent.parent
ENVS = sorted((ROOT / "samples" / "env").glob("*.yaml"))


def run(argv) -> tuple[int, str]:
    buf = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)  # paths in the output are relative to the repository
    try:
        with redirect_stdout(buf):
            rc = main(argv)
    finally:
        os.chdir(cwd)
    return rc, buf.getvalue()


def check_golden(request, path: Path, text: str):
    if request.config.getoption("--update-goldens") or not path.exists():
        path.write_text(text)
        if not request.config.getoption("--update-goldens"):
            pytest.fail(f"{path.name} did not exist; written, review it")
        return
    assert text == path.read_text(), f"output differs from {path.relative_to(ROOT)} (run pytest --update-goldens and review)"


@pytest.mark.parametrize("env", ENVS, ids=[p.stem for p in ENVS])
def test_lint_env_golden(request, env):
    rc, out = run(["lint", "--env", str(env.relative_to(ROOT))])
    check_golden(request, env.with_suffix(".lint.txt"), f"exit {rc}\n{out}")


@pytest.mark.parametrize("env", ENVS, ids=[p.stem for p in ENVS])
def test_explain_env_golden(request, env):
    doc = yaml.safe_load(env.read_text())
    examples = doc.get("examples") or []
    assert examples, f"{env.name} has no 'examples:' flow to explain"
    out = []
    for ex in examples:
        argv = ["explain", "--env", str(env.relative_to(ROOT)), "--from", ex["from"], "--flow", ex["flow"]]
        if "uid" in ex:
            argv += ["--uid", str(ex["uid"])]
        rc, text = run(argv)
        out.append(f"$ synack {' '.join(argv)}\nexit {rc}\n{text}")
    check_golden(request, env.with_suffix(".explain.txt"), "\n".join(out))
