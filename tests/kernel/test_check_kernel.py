"""The kernel judges `synack check`: each sample policy's environment is rebuilt in real network
namespaces (:mod:`envlab`), the connection its assertions are about is made for real, and the
policy holds exactly when the connection works end to end (the echo comes back from the address
the client dialled): the hairpin policy fails on seed1-broken and holds on both fixes, the
sidecar policy fails when the application is down."""
from __future__ import annotations

from pathlib import Path

import pytest

from analyzer.policy.adapter import load_target
from analyzer.policy.evaluate import evaluate
from analyzer.policy.spec import load_policy
from envlab import build_env
from netns import Lab

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
POL = ROOT / "samples" / "policies"
ENV = ROOT / "samples" / "env"
DATA = b"GET / HTTP/1.0\r\n\r\n"
CONNECT_TIMEOUT = 1.5

# (policy, environment, the assertion whose flow is made in the kernel)
CASES = [
    ("seed1-hairpin.yaml", "seed1-broken.yaml", "vip-replies-translated"),
    ("seed1-hairpin.yaml", "seed1-fixed-masquerade.yaml", "vip-replies-translated"),
    ("seed1-hairpin.yaml", "seed1-fixed-br-netfilter.yaml", "vip-replies-translated"),
    ("seed2-sidecar.yaml", "seed2-app-down.yaml", "app-reachable-through-sidecar"),
    ("seed2-sidecar.yaml", "seed2-app-up.yaml", "app-reachable-through-sidecar"),
]


@pytest.mark.parametrize("policy,env,assertion", CASES, ids=[f"{p[:-5]}@{e[:-5]}" for p, e, _ in CASES])
def test_policy_holds_exactly_when_the_kernel_connects(policy, env, assertion, lab: Lab, require) -> None:
    require("nft")
    pol = load_policy(str(POL / policy))
    results = evaluate(pol, load_target(str(ENV / env)))
    holds = all(r.status == "pass" for r in results)
    a = next(x for x in pol.assertions if x.name == assertion)
    sel = a.flows
    target = load_target(str(ENV / env))
    src = str(target.default_src(sel, 4))
    dst, port = str(sel.dst[0].network_address), sel.dport[0][0]
    if "bridge:" in (ENV / env).read_text():
        require("bridge_nf")

    envlab = build_env(lab, str(ENV / env))
    res = envlab[sel.start].connect_tcp(dst, port, src=src, src_port=40000, data=DATA,
                                        timeout=CONNECT_TIMEOUT)
    works = bool(res.ok and tuple(res.peer) == (dst, port) and res.received == DATA)
    summary = "; ".join(f"{r.assertion.name}={r.status}" for r in results)
    assert holds == works, f"synack check: {summary}; kernel: {res.outcome} {res.error or ''}"
