"""Checks layer: behaviour of the chain and placement checks on small hand-written dumps."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from analyzer.checks import CheckContext, run_checks
from analyzer.diagnostics import Severity
from analyzer.parse import load_ruleset

FILTER = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
NAT = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
MANGLE = ("*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n"
          ":OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n")


def diags(text: str, partial: bool = False, select=None):
    res = load_ruleset((text, "t.rules"))
    assert res.diagnostics == (), res.diagnostics
    return run_checks(CheckContext(res.ruleset, res.files, partial=partial), select=select)


def codes(text: str, **kw) -> list[str]:
    return [d.code for d in diags(text, **kw)]


def test_loop_no_builtin_reaches_loads_so_it_is_a_warning():
    text = FILTER + ":A - [0:0]\n:B - [0:0]\n-A A -j B\n-A B -j A\nCOMMIT\n"
    (d,) = diags(text, select=["CHN002"])
    assert d.severity == Severity.WARNING and "A -> B -> A" in d.message


def test_self_loop_reached_from_builtin_is_an_error():
    (d,) = diags(FILTER + ":A - [0:0]\n-A INPUT -j A\n-A A -p tcp -g A\nCOMMIT\n", select=["CHN002"])
    assert d.severity == Severity.ERROR and d.span.line == 7


def test_undefined_chain_is_a_warning_in_a_fragment_and_in_a_restore_payload():
    text = FILTER + "-A INPUT -j MISSING\nCOMMIT\n"
    assert [d.severity for d in diags(text, partial=True)] == [Severity.WARNING]
    payload = "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j KUBE-SVC-X\nCOMMIT\n"
    assert [(d.code, d.severity) for d in diags(payload)] == [("CHN001", Severity.WARNING)]


def test_goto_a_verdict_is_explained():
    (d,) = diags(FILTER + "-A INPUT -g RETURN\nCOMMIT\n")
    assert d.code == "CHN001" and d.hint == "write '-j RETURN'"


def test_helper_and_empty_chains_are_not_unreachable():
    text = NAT + (":KUBE-MARK-DROP - [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n"
                  "-A KUBE-MARK-DROP -j MARK --set-xmark 0x8000/0x8000\nCOMMIT\n")
    assert codes(text) == []


def test_jump_to_a_chain_that_never_returns_shadows_the_rest():
    text = FILTER + (":LOGDROP - [0:0]\n-A INPUT -j LOGDROP\n-A INPUT -p tcp -j ACCEPT\n"
                     "-A LOGDROP -j LOG\n-A LOGDROP -j DROP\nCOMMIT\n")
    (d,) = diags(text)
    assert d.code == "CHN004" and "LOGDROP never returns" in d.message and len(d.related) == 2


def test_chain_with_a_return_before_its_drop_may_return():
    text = FILTER + (":GUARD - [0:0]\n-A INPUT -j GUARD\n-A INPUT -p tcp -j ACCEPT\n"
                     "-A GUARD -s 10.0.0.0/8 -j RETURN\n-A GUARD -j DROP\nCOMMIT\n")
    assert codes(text) == []


def test_duplicates_compare_model_values_not_spelling_or_order():
    text = NAT + ("-A PREROUTING -p tcp -d 10.0.0.1 -j DNAT --to 10.1.0.1:80\n"
                  "-A PREROUTING -d 10.0.0.1/32 -p tcp -j DNAT --to-destination 10.1.0.1:80\nCOMMIT\n")
    assert codes(text) == ["CHN006"]


def test_a_mark_between_copies_or_a_random_match_is_not_a_duplicate():
    marked = MANGLE + ("-A PREROUTING -m mark --mark 0x1 -j ACCEPT\n-A PREROUTING -j MARK --set-mark 0x1\n"
                       "-A PREROUTING -m mark --mark 0x1 -j ACCEPT\nCOMMIT\n")
    assert codes(marked) == []
    random = FILTER + ("-A INPUT -m statistic --mode random --probability 0.5 -j DROP\n" * 2) + "COMMIT\n"
    assert codes(random) == []


def test_return_in_builtin_is_the_skip_idiom_with_policy_accept():
    # libvirt's multicast/broadcast exemption from MASQUERADE, Istio's excluded interfaces
    assert codes(NAT + "-A POSTROUTING -s 192.168.122.0/24 -d 224.0.0.0/24 -j RETURN\n"
                       "-A PREROUTING -i lo -j RETURN\nCOMMIT\n") == []
    assert codes(FILTER + "-A OUTPUT -o lo -j RETURN\nCOMMIT\n") == []


def test_return_in_builtin_with_policy_drop_is_a_drop():
    text = FILTER.replace(":FORWARD ACCEPT", ":FORWARD DROP") + "-A FORWARD -i br0 -j RETURN\nCOMMIT\n"
    (d,) = diags(text)
    assert d.code == "CHN005" and d.severity == Severity.WARNING and "so they are dropped" in d.message


CORPUS = Path(os.environ.get("SYNACK_CORPUS", Path(__file__).resolve().parents[3] / "shared" / "corpus"))


@pytest.mark.skipif(not (CORPUS / "iptables").exists(), reason="corpus not present")
def test_return_idioms_of_libvirt_istio_openstack_are_not_reported():
    quiet = [p for sub in ("libvirt", "istio", "istio-cmdlist", "openstack", "openstack-neutron-sefl")
             for p in sorted((CORPUS / "iptables" / sub).iterdir()) if p.is_file()]
    assert quiet
    def chn005(p):
        res = load_ruleset((p.read_text(errors="surrogateescape"), p.name))
        return run_checks(CheckContext(res.ruleset, res.files), select=["CHN005"])
    fired = [p.name for p in quiet if chn005(p)]
    assert fired == []


def test_target_table_and_backend_only_refusals():
    text = MANGLE + "-A PREROUTING -p tcp -j DNAT --to-destination 10.0.0.1:80\n-A INPUT -j TRACE\nCOMMIT\n"
    dnat, trace = diags(text)
    assert (dnat.code, dnat.severity) == ("CHN007", Severity.ERROR)
    assert "only valid in the nat table" in dnat.message
    assert (trace.code, trace.severity) == ("CHN007", Severity.WARNING)
    assert "iptables-legacy refuses" in trace.message


def test_target_hook_check_follows_every_caller():
    text = NAT + (":X - [0:0]\n-A PREROUTING -j X\n-A POSTROUTING -j X\n"
                  "-A X -p tcp -j DNAT --to-destination 10.0.0.1:80\nCOMMIT\n")
    (d,) = diags(text)
    assert d.code == "CHN007" and "POSTROUTING" in d.message


def test_nat_ports_need_a_port_protocol():
    assert codes(NAT + "-A PREROUTING -j DNAT --to-destination 10.0.0.1:80\nCOMMIT\n") == ["CHN011"]
    assert codes(NAT + "-A PREROUTING -p icmp -j DNAT --to-destination 10.0.0.1:80\nCOMMIT\n") == []


def test_interface_in_builtin_output_is_refused_but_in_a_user_chain_never_matches():
    assert codes(FILTER + "-A OUTPUT -i eth0 -j ACCEPT\nCOMMIT\n") == ["CHN009"]
    text = FILTER + ":X - [0:0]\n-A OUTPUT -j X\n-A X ! -i eth0 -j ACCEPT\nCOMMIT\n"
    (d,) = diags(text)
    assert d.code == "CHN012" and "always matches" in d.message


def test_an_environment_only_context_has_nothing_to_check():
    assert run_checks(CheckContext(None, (), extra={"env": None}), select=["CHN"]) == []


def test_reject_tcp_reset_needs_tcp():
    from analyzer.checks import CheckContext, run_checks
    from analyzer.parse import load_ruleset

    def codes(rule):
        text = f"*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{rule}\nCOMMIT\n"
        res = load_ruleset((text, "t.rules"))
        return [d.code for d in run_checks(CheckContext(res.ruleset, res.files), ["CHN011"])]

    assert codes("-A FORWARD -j REJECT --reject-with tcp-reset") == ["CHN011"]
    assert codes("-A FORWARD -p tcp -j REJECT --reject-with tcp-reset") == []
    assert codes("-A FORWARD -j REJECT --reject-with icmp-port-unreachable") == []
