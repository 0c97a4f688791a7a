"""Golden samples for `synack explain`: each samples/explain/CASE.args is one command line (the
arguments after ``synack explain``) over a dump in the same directory, with its expected output
next to it: CASE.explain.txt (text) and CASE.explain.json (``-o json``). The dumps, flows,
addresses and routes are the cases tests/kernel/test_explain_kernel.py replays in real
namespaces, so these goldens are predictions the kernel has confirmed.
``pytest --update-goldens`` rewrites them; review the diff."""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from _golden import ROOT, check_golden, run

SAMPLES = ROOT / "samples" / "explain"
CASES = sorted(SAMPLES.glob("*.args"))
IDS = [p.stem for p in CASES]


def explain_argv(case: Path, *extra: str) -> list[str]:
    return ["explain", *shlex.split(case.read_text()), *extra]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explain_text_golden(request, case):
    rc, out, err = run(explain_argv(case))
    assert err == "", err  # a sample dump parses cleanly and the flow is explainable
    # exit 1 exactly when the explained flow has a finding (as `explain --env` and `lint`)
    assert rc == (1 if re.search(r"\bNAT00\d \[", out) else 0)
    check_golden(request, case.with_suffix(".explain.txt"), out)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explain_json_golden(request, case):
    rc, out, err = run(explain_argv(case, "-o", "json"))
    assert err == "", err
    assert rc == (1 if '"code": "NAT00' in out else 0)
    check_golden(request, case.with_suffix(".explain.json"), out)


# ---- the samples are the kernel's cases: same dump, flow, addresses and routes -------------

def _kernel_module():
    path = ROOT / "tests" / "kernel" / "test_explain_kernel.py"
    spec = importlib.util.spec_from_file_location("_explain_kernel_cases", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while building Case
    spec.loader.exec_module(mod)
    return mod


KERNEL = _kernel_module()
SPORT = 41000  # the kernel test picks a fresh source port per run; the samples fix one


def _kernel_argv(case) -> list[str]:
    """The command line that asks synack what the kernel test asks it (see its _predict)."""
    net = KERNEL.V6 if case.ipv6 else KERNEL.V4
    src = net["r_s"] if case.local else net["client"]
    fmt = "[{}]:{}" if case.ipv6 else "{}:{}"
    argv = [case.path, "--flow", f"tcp {fmt.format(src, SPORT)} -> {fmt.format(case.dst, case.dport)}"]
    if case.local:
        argv += ["--local"] + (["--uid", str(case.uid)] if case.uid is not None else [])
    else:
        argv += ["--from-iface", "sk1b"]
    argv += ["--addr", f"{net['r_c']}/{net['plen']}@sk1b", "--addr", f"{net['r_s']}/{net['plen']}@sk2b"]
    argv += [a for cidr, iface in case.router_addrs for a in ("--addr", f"{cidr}@{iface}")]
    return argv + ["--route", net["default"]]


# test_hairpin_on_a_bridge: the host owns 10.0.0.1/24 on br0 and has no other route
KERNEL_ARGV = {c.id: _kernel_argv(c) for c in KERNEL.CASES} | {
    name: [f"samples/explain/{name}.rules", "--flow", "tcp 10.0.0.2:42424 -> 10.0.0.1:80",
           "--from-iface", "br0", "--addr", "10.0.0.1/24@br0"]
    for name in ("hairpin-no-masquerade", "hairpin-masquerade")} | {
    "docker-lo-masquerade": KERNEL.DOCKER_LO_ARGV} | {
    name: KERNEL.lone_segment_argv(name) for name in KERNEL.LONE_SEGMENTS}


def test_every_kernel_case_is_a_sample():
    assert sorted(KERNEL_ARGV) == sorted(IDS)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_args_are_what_the_kernel_verified(case):
    assert shlex.split(case.read_text()) == KERNEL_ARGV[case.stem]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_explain_json_golden_follows_the_schema(case):
    """Every JSON golden is valid against the shipped schema (analyzer/report/explain.schema.json)."""
    import json

    import jsonschema

    from analyzer.report.explain_json import EXPLAIN_SCHEMA_VERSION, schema

    doc = json.loads(case.with_suffix(".explain.json").read_text())
    assert doc["schema_version"] == EXPLAIN_SCHEMA_VERSION
    jsonschema.Draft202012Validator(schema()).validate(doc)
