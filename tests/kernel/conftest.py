"""Pytest wiring for kernel tests: the ``kernel`` marker, a capability probe that turns a
machine without root / ``ip netns`` / iptables into skips with a reason, and a ``lab`` fixture
that always tears its namespaces down and prints their state when a test fails."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator

import pytest

# Make `import netns` work under every import mode (prepend, append, importlib).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import netns  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kernel: builds real network namespaces and replays flows in the kernel; needs root, "
        "`ip netns` and iptables (skipped with the reason otherwise)",
    )


#: Backstop per kernel test; the harness bounds every wait itself, far below this.
KERNEL_TEST_BUDGET = float(os.environ.get("SYNACK_KERNEL_TEST_BUDGET", "30"))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"_synack_report_{report.when}", report)


@pytest.fixture(scope="session")
def kernel_caps() -> netns.Capabilities:
    """What this machine offers kernel tests (probed once, in a throwaway namespace)."""
    caps = netns.probe()
    if caps.usable:
        netns.remove_stale_namespaces()
    return caps


@pytest.fixture(autouse=True)
def _kernel_gate(request: pytest.FixtureRequest) -> Iterator[None]:
    """Skip ``kernel`` tests, with the reason, where they cannot run; stop one that overruns
    :data:`KERNEL_TEST_BUDGET` (its lab is still torn down)."""
    if request.node.get_closest_marker("kernel") is None:
        yield
        return
    caps: netns.Capabilities = request.getfixturevalue("kernel_caps")
    if not caps.usable:
        pytest.skip(caps.reason)
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def overrun(signum: int, frame: object) -> None:
        raise netns.HarnessTimeout(f"kernel test ran longer than {KERNEL_TEST_BUDGET:g}s")

    previous = signal.signal(signal.SIGALRM, overrun)
    signal.setitimer(signal.ITIMER_REAL, KERNEL_TEST_BUDGET)
    try:
        yield  # fixtures torn down after this (the lab) still run: the alarm only interrupts
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def require(kernel_caps: netns.Capabilities):
    """``require('tcpdump', 'bridge_nf')`` skips the test unless every feature is available.

    Features: ``nft``, ``legacy``, ``conntrack``, ``tcpdump``, ``trace``, ``setpriv``,
    ``bridge_nf``.
    """
    def _require(*features: str) -> None:
        reason = kernel_caps.why_not(*features)
        if reason:
            pytest.skip(reason)
    return _require


@pytest.fixture
def lab(request: pytest.FixtureRequest, kernel_caps: netns.Capabilities) -> Iterator[netns.Lab]:
    """A :class:`netns.Lab`; its namespaces and processes are removed even if the test fails,
    and on failure the state of every namespace is printed first."""
    if not kernel_caps.usable:
        pytest.skip(kernel_caps.reason)
    with netns.Lab() as the_lab:
        yield the_lab
        report = getattr(request.node, "_synack_report_call", None)
        if report is not None and report.failed:
            print(f"\n---- lab state at failure ({the_lab.prefix}) ----")
            print(the_lab.describe())


@pytest.fixture(params=["nft", "legacy"])
def backend(request: pytest.FixtureRequest, require) -> str:
    """Each iptables backend in turn; skipped where that backend does not work."""
    require(request.param)
    return request.param
