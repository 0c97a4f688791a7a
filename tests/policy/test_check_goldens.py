"""Golden outputs of the sample policies: samples/policies/POLICY.INPUT.check.txt holds
`synack check POLICY INPUT --no-trace` (the verdicts, witnesses, fates and deciding rules; the
traces are explain's, whose goldens live with explain). ``pytest --update-goldens`` rewrites them."""
from __future__ import annotations

import pytest

from _golden import ROOT, check_golden, run

POL = "samples/policies"
CASES = [
    ("seed1-hairpin", ["--env", "samples/env/seed1-broken.yaml"]),
    ("seed1-hairpin", ["--env", "samples/env/seed1-fixed-masquerade.yaml"]),
    ("seed1-hairpin", ["--env", "samples/env/seed1-fixed-br-netfilter.yaml"]),
    ("seed2-sidecar", ["--env", "samples/env/seed2-app-down.yaml"]),
    ("seed2-sidecar", ["--env", "samples/env/seed2-app-up.yaml"]),
    ("kubeproxy-three-endpoints", ["--env", "samples/env/kubeproxy-three-endpoints.yaml"]),
    ("kubeproxy-node", ["samples/env/kubeproxy-node.rules"]),
    ("kubeproxy-node", ["samples/env/kubeproxy-node-no-hairpin-masq.rules"]),
    ("kubeproxy-node", ["samples/policies/kubeproxy-node-any-port.rules"]),
    ("kubeproxy-shares", ["samples/policies/kubeproxy-stale-probability.rules"]),
    ("kubeproxy-unchanged", ["samples/env/kubeproxy-node-no-hairpin-masq.rules"]),
]


def _id(policy, args):
    return f"{policy}.{args[-1].rsplit('/', 1)[-1].rsplit('.', 1)[0]}"


@pytest.mark.parametrize("policy,args", CASES, ids=[_id(p, a) for p, a in CASES])
def test_check_golden(request, policy, args):
    argv = ["check", f"{POL}/{policy}.yaml", *args, "--no-trace", "--isolated"]
    rc, out, _ = run(argv)
    check_golden(request, ROOT / POL / f"{_id(policy, args)}.check.txt",
                 f"$ synack {' '.join(argv)}\nexit {rc}\n{out}")


DIFFS = [
    ("samples/env/kubeproxy-node.rules", "samples/env/kubeproxy-node-no-hairpin-masq.rules",
     ["--addr", "10.244.0.1/24@cni0"]),
    ("samples/env/seed1-broken.yaml", "samples/env/seed1-fixed-br-netfilter.yaml", []),
    ("samples/env/seed2-app-down.yaml", "samples/env/seed2-app-up.yaml", []),
]


@pytest.mark.parametrize("old,new,extra", DIFFS, ids=[f"{o.rsplit('/', 1)[-1]}-{n.rsplit('/', 1)[-1]}" for o, n, _ in DIFFS])
def test_diff_golden(request, old, new, extra):
    argv = ["diff", old, new, *extra]
    rc, out, _ = run(argv)
    stem = f"{old.rsplit('/', 1)[-1].rsplit('.', 1)[0]}.{new.rsplit('/', 1)[-1].rsplit('.', 1)[0]}"
    check_golden(request, ROOT / POL / "diff" / f"{stem}.diff.txt", f"$ synack {' '.join(argv)}\nexit {rc}\n{out}")
