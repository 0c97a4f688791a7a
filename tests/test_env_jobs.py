"""`lint --env --jobs N`: the flows followed by forked worker processes give exactly what one
process gives (findings, their order, coverage), in text and JSON."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kube_env(tmp_path_factory):
    """bench_env's three kube-proxy nodes with 300 services (589 flows: above the threshold
    under which the walks stay in one process)."""
    cache = tmp_path_factory.mktemp("bench")
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import bench_env; "
            "print(bench_env.build_env(300, 0, 1))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "SYNACK_BENCH_CACHE": str(cache)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _lint(*args: str):
    p = subprocess.run([sys.executable, "-m", "analyzer", "lint", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode, p.stdout


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_workers_give_what_one_process_gives(kube_env, fmt):
    one = _lint("--env", kube_env, "--select", "NAT", "-o", fmt, "--jobs", "1", "-q")
    two = _lint("--env", kube_env, "--select", "NAT", "-o", fmt, "--jobs", "2", "-q")
    assert one == two
    assert one[0] == 1 and "NAT001" in one[1] and "NAT002" in one[1]
    if fmt == "json":
        import json
        assert json.loads(one[1])["coverage"]["flows"] == 589


def test_jobs_must_be_a_count():
    rc, _ = _lint("--env", str(ROOT / "samples" / "env" / "direct-return-route.yaml"), "--jobs", "x")
    assert rc == 2
