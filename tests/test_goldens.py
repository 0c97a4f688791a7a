"""Golden samples: every environment under samples/env/ and samples/cilium/ with its expected lint and explain output
next to it (NAME.lint.txt, NAME.explain.txt). ``pytest --update-goldens`` rewrites them."""
from __future__ import annotations


import pytest
import yaml

from _golden import ROOT, check_golden, run

ENVS = sorted((ROOT / "samples" / "env").glob("*.yaml")) + sorted((ROOT / "samples" / "cilium").glob("*.yaml"))


@pytest.mark.parametrize("env", ENVS, ids=[p.stem for p in ENVS])
def test_lint_env_golden(request, env):
    rc, out, _ = run(["lint", "--env", str(env.relative_to(ROOT))])
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
        rc, text, _ = run(argv)
        out.append(f"$ synack {' '.join(argv)}\nexit {rc}\n{text}")
    check_golden(request, env.with_suffix(".explain.txt"), "\n".join(out))
