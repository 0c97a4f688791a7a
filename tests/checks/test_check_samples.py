"""Checks layer: each check's sample dumps, the kernel's verdict on them, and the real corpus.

``samples/checks/CODE/`` holds, for each check that reads one dump, ``bad.rules`` (raises CODE, and no other code except those listed
in an optional ``also`` file) and ``good.rules`` (raises nothing at all, parse included). For a
check that mirrors a refusal (``restore=True``), a kernel test loads both into a throwaway
network namespace: bad is refused by every backend named in an optional ``refused-by`` file
(default: ``nft legacy``) and accepted by the others; good is accepted by both.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from analyzer.checks import CheckContext, load_all, run_checks
from analyzer.parse import load_ruleset

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "checks"
DOCS = ROOT / "docs" / "checks"
CORPUS = Path(os.environ.get("SYNACK_CORPUS", ROOT.parent / "shared" / "corpus")) / "iptables"
# checks that read one dump; environment checks (NAT*, bad.yaml) have tests/test_env_checks.py
SAMPLE_CODES = sorted(p.parent.name for p in SAMPLES.glob("*/bad.rules"))
BACKENDS = ("nft", "legacy")


def analyse(path: Path):
    res = load_ruleset((path.read_text(), str(path)))
    return res, run_checks(CheckContext(res.ruleset, res.files))


def listed(sample: Path, name: str, default: str = "") -> set[str]:
    f = sample / name
    return set((f.read_text() if f.exists() else default).split())


@pytest.mark.parametrize("code", SAMPLE_CODES)
def test_check_sample(code):
    sample = SAMPLES / code
    res, found = analyse(sample / "bad.rules")
    codes = {d.code for d in res.diagnostics} | {d.code for d in found}
    assert code in codes, f"bad.rules does not raise {code}"
    assert codes - {code} - listed(sample, "also") == set(), "bad.rules raises other codes too"

    res, found = analyse(sample / "good.rules")
    assert [d.message for d in res.diagnostics] == []
    assert [f"{d.code} {d.message}" for d in found] == []


def test_every_check_has_samples_and_a_page():
    index = (DOCS / "README.md").read_text()
    for code, info in load_all().items():
        sample = SAMPLES / code
        assert list(sample.glob("bad.*")) and list(sample.glob("good.*")), f"{code} has no samples"
        assert (DOCS / f"{code}.md").exists(), f"{code} has no docs/checks/{code}.md"
        assert f"`{info.name}`" in index and code in index, f"{code} missing from docs/checks/README.md"
        assert "Why it matters:" in info.func.__doc__ and "Fix:" in info.func.__doc__


# ------------------------------------------------------------------------------------- kernel
@pytest.fixture(scope="module")
def netns_mod():
    kdir = str(ROOT / "tests" / "kernel")
    if kdir not in sys.path:
        sys.path.insert(0, kdir)
    import netns  # the kernel harness: namespaces named, bounded and always removed

    caps = netns.probe()
    if not caps.usable:
        pytest.skip(caps.reason)
    return netns, caps


def restore_codes() -> list[str]:
    return sorted(c for c, info in load_all().items() if info.restore)


@pytest.mark.kernel
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("code", restore_codes())
def test_kernel_agrees_with_restore_check(code, backend, netns_mod):
    """A real load, not ``iptables-restore --test``: --test commits nothing, so it misses every
    refusal that comes from the kernel (hooks, tables, loops), on both backends."""
    netns, caps = netns_mod
    reason = caps.why_not(backend)
    if reason:
        pytest.skip(reason)
    sample = SAMPLES / code
    refused_by = listed(sample, "refused-by", "nft legacy")
    with netns.Lab() as lab:
        ns = lab.netns("chk")
        prog = f"iptables-{backend}-restore"
        bad = ns.run([prog, "-w", "5"], input=(sample / "bad.rules").read_text(), check=False)
        if backend in refused_by:
            assert bad.returncode != 0, f"{prog} accepted {code}/bad.rules"
        else:
            assert bad.returncode == 0, f"{prog} refused {code}/bad.rules: {bad.stderr}"
        good = ns.run([prog, "-w", "5"], input=(sample / "good.rules").read_text(), check=False)
        assert good.returncode == 0, f"{prog} refused {code}/good.rules: {good.stderr}"


# ------------------------------------------------------------------------------------- corpus
def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.rglob("*") if p.is_file()) if CORPUS.is_dir() else []


@pytest.mark.slow
def test_checks_survive_the_corpus():
    files = corpus_files()
    if not files:
        pytest.skip(f"corpus not found at {CORPUS}")
    counts: Counter = Counter()
    for path in files:
        res = load_ruleset((path.read_text(errors="surrogateescape"), str(path)))
        for d in run_checks(CheckContext(res.ruleset, res.files)):
            assert d.code and d.message and d.span is not None, (path, d)
            counts[d.code] += 1
    print(dict(sorted(counts.items())))
