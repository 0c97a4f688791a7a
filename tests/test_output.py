"""Output people can act on: findings that explain reports, grouping, SARIF, colour, help text."""
from __future__ import annotations

import json

from _golden import run

README_FIRST = ["explain", "samples/seed1-hairpin-host.rules", "--flow", "tcp 10.4.26.45:35582 -> 10.4.26.234:80",
                "--from-iface", "eth0", "--addr", "10.4.26.1/24@eth0"]


def test_explain_reports_the_finding_it_shows_and_exits_1():
    rc, out, err = run(README_FIRST)
    assert rc == 1, err
    assert "NOT what it dialled" in out and "NAT001 [error]" in out
    assert "seed1-hairpin-host.rules:11:" in out  # points at the DNAT rule
    rc, out, _ = run(README_FIRST + ["-o", "json"])
    assert rc == 1
    assert [d["code"] for d in json.loads(out)["diagnostics"]] == ["NAT001"]


def test_explain_clean_flow_exits_0():
    rc, out, _ = run(["explain", "samples/explain/dnat-masquerade.rules", "--flow", "tcp 10.0.1.2:41000 -> 10.0.1.1:80",
                      "--from-iface", "sk1b", "--addr", "10.0.1.1/24@sk1b", "--addr", "10.0.2.1/24@sk2b"])
    assert rc == 0 and "NAT00" not in out
