"""Golden samples: every environment under samples/env/ and samples/cilium/ with its expected lint and explain output
next to it (NAME.lint.txt, NAME.explain.txt); every open flow under samples/open/ (CASE.args: the arguments after
``synack explain``) with its text and JSON output (CASE.explain.txt, CASE.explain.json). ``pytest --update-goldens``
rewrites them."""
from __future__ import annotations

import json
import re
import shlex

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


OPEN = sorted((ROOT / "samples" / "open").glob("*.args"))


@pytest.mark.parametrize("case", OPEN, ids=[p.stem for p in OPEN])
def test_open_flow_text_golden(request, case):
    rc, out, err = run(["explain", *shlex.split(case.read_text())])
    assert err == "", err
    assert rc == (1 if re.search(r"\bNAT00\d \[", out) else 0)  # exit 1 exactly when a group has a finding
    check_golden(request, case.with_suffix(".explain.txt"), out)


@pytest.mark.parametrize("case", OPEN, ids=[p.stem for p in OPEN])
def test_open_flow_json_golden(request, case):
    rc, out, err = run(["explain", *shlex.split(case.read_text()), "-o", "json"])
    assert err == "", err
    doc = json.loads(out)
    # the text and JSON say the same grouping
    text = run(["explain", *shlex.split(case.read_text())])[1].splitlines()
    assert (doc["grouped_by"] == "fate") == (" by fate over " in text[1])
    assert (doc["fate_fallback"] is not None) == text[2].startswith("grouped by rules crossed, not by fate: ")
    # each traced group's witness is an explain document of the shipped schema
    import jsonschema

    from analyzer.report.explain_json import schema
    for g in doc["groups"]:
        jsonschema.Draft202012Validator(schema()).validate(g["explain"])
    check_golden(request, case.with_suffix(".explain.json"), out)
