"""Results of the engine: Step / Hop / Outcome are plain, frozen and generic."""
from __future__ import annotations

import dataclasses

import pytest

from analyzer.engine import APPROXIMATE, EXACT, Flow, Hop, Outcome, PacketSpace, Step


def test_step_prints_like_a_kernel_trace_line():
    step = Step("jump", "nat:KUBE-SERVICES:rule:7", "KUBE-SVC-ABC", line=12, path="r.v4")
    assert str(step) == "nat:KUBE-SERVICES:rule:7:JUMP KUBE-SVC-ABC"
    assert str(Step("return", "filter:FORWARD")) == "filter:FORWARD:RETURN"


def test_step_kind_must_be_known():
    with pytest.raises(ValueError):
        Step("teleport", "x")


def test_results_are_frozen():
    step = Step("verdict", "filter:INPUT:rule:3", "ACCEPT")
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.detail = "DROP"
    assert hash(step) == hash(Step("verdict", "filter:INPUT:rule:3", "ACCEPT"))


def test_outcome_collects_steps_and_reasons_across_hops():
    space = PacketSpace()
    packets = space.where(proto=6, dst="10.96.0.1", dport=443)
    witness = packets.pick_flow()
    hops = (
        Hop("node-a", (Step("match", "a:1", packet=witness),
                       Step("rewrite", "a:2", "dst 10.244.0.5", approximate_reason="random choice"))),
        Hop("pod-b", (Step("route", "b:1", approximate_reason="random choice"),
                      Step("verdict", "b:2", "ACCEPT")), iif="eth0"),
    )
    out = Outcome("delivered", 0.5, packets, witness, hops, APPROXIMATE)
    assert [s.where for s in out.steps] == ["a:1", "a:2", "b:1", "b:2"]
    assert out.approximate_reasons() == ("random choice",)
    assert "[pod-b] iif eth0" in str(hops[1])
    assert witness in out.packets


def test_outcome_validates_confidence_and_probability():
    with pytest.raises(ValueError):
        Outcome("dropped", confidence="MAYBE")
    with pytest.raises(ValueError):
        Outcome("dropped", probability=1.5)
    assert Outcome("dropped").confidence == EXACT
    assert Outcome("dropped", witness=Flow("10.0.0.1", "10.0.0.2")).hops == ()
