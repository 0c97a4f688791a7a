"""`synack parse --live` reads a namespace's rules with iptables-save, read-only, on both backends."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel

RULES = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:SVC - [0:0]
-A PREROUTING -j SVC
-A SVC -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.5:8080
COMMIT
"""


def _rules(text):
    return [l for l in text.splitlines() if not l.startswith("#")]


def test_live_reads_the_namespace_rules_and_changes_nothing(lab, backend):
    ns = lab.netns("live")
    ns.iptables_restore(RULES, backend=backend)
    before = _rules(ns.iptables_save(counters=False, backend=backend))
    r = subprocess.run([sys.executable, "-m", "analyzer", "parse", "--live", "--netns", ns.name,
                        "--backend", backend, "-o", "save"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "-A SVC -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.5:8080" in r.stdout
    assert _rules(ns.iptables_save(counters=False, backend=backend)) == before
