"""Environment checks (NAT family): each code's bad environment raises exactly it, the good one
nothing; every sample environment loads; bad environment files get clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from analyzer.checks import CheckContext, run_checks
from analyzer.netfilter.env import EnvError
from analyzer.parse.envfile import load_environment

ROOT = Path(__file__).resolve().parent.parent
CODES = sorted(p.parent.name for p in (ROOT / "samples" / "checks").glob("NAT*/bad.yaml"))


def env_findings(path):
    env = load_environment(str(path))
    return [d for d in run_checks(CheckContext(None, (), extra={"env": env}), ["NAT"])]


@pytest.mark.parametrize("code", CODES)
def test_env_check_samples(code):
    bad = env_findings(ROOT / "samples" / "checks" / code / "bad.yaml")
    assert bad and {d.code for d in bad} == {code}, [d.message for d in bad]
    assert all(d.witness for d in bad)
    good = env_findings(ROOT / "samples" / "checks" / code / "good.yaml")
    assert good == []


def test_nat001_points_at_the_translation_and_names_the_fix():
    (d,) = env_findings(ROOT / "samples" / "checks" / "NAT001" / "bad.yaml")
    assert d.span.path.endswith("seed1-host.rules") and d.span.line == 11
    assert "10.4.26.11:80" in d.message and "RST" in d.message
    assert "MASQUERADE" in d.hint and "bridge-nf-call-iptables=1" in d.hint


def test_kube_proxy_hairpin_hint_is_the_missing_rule():
    d = env_findings(ROOT / "samples" / "env" / "kubeproxy-hairpin-broken.yaml")[0]
    assert "-A KUBE-SEP-AAAAAAAAAAAAAAAA -s 10.244.0.5/32 -j KUBE-MARK-MASQ" in d.hint
    assert env_findings(ROOT / "samples" / "env" / "kubeproxy-hairpin.yaml") == []


@pytest.mark.parametrize("text,needle", [
    ("namespaces: [a, b]\n", "expected a mapping with 'namespaces:'"),
    ("namespaces:\n  a: {adresses: []}\n", "unknown key(s) adresses"),
    ("namespaces:\n  a: {addresses: [10.0.0.1/24]}\n", "needs '@IFACE'"),
    ("namespaces:\n  a: {}\nlinks:\n  - veth: [a:eth0, b:eth0]\n", "unknown namespace 'b'"),
    ("namespaces:\n  a: {routes: ['10.0.0.0/33 dev x']}\n", "invalid route destination"),
    ("namespaces:\n  a: {\n", "invalid YAML"),
])
def test_bad_environment_files_get_clear_errors(tmp_path, text, needle):
    p = tmp_path / "env.yaml"
    p.write_text(text)
    with pytest.raises(EnvError) as e:
        load_environment(str(p))
    assert needle in str(e.value)
