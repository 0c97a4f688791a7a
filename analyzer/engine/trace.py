"""Symbolic engine, results layer: what a walk through a packet-processing graph found.

An `Outcome` holds the hops it crossed, each hop the steps taken there; labels are the
caller's free text, so this module stays generic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .packetset import Flow, PacketSet

__all__ = ["STEP_KINDS", "EXACT", "APPROXIMATE", "Step", "Hop", "Outcome"]

STEP_KINDS = ("match", "rewrite", "verdict", "jump", "return", "route", "note")
EXACT = "EXACT"
APPROXIMATE = "APPROXIMATE"
Confidence = Literal["EXACT", "APPROXIMATE"]


@dataclass(frozen=True, slots=True)
class Step:
    """One thing that happened to the packet, at a caller-named place.

    ``str()`` reads like a kernel trace line: ``where:KIND detail``.

    >>> str(Step("jump", "nat:KUBE-SERVICES:rule:7", "KUBE-SVC-ABC", line=12, path="r.v4"))
    'nat:KUBE-SERVICES:rule:7:JUMP KUBE-SVC-ABC'
    """

    kind: str
    where: str
    detail: str = ""
    line: int | None = None
    path: str | None = None
    packet: Flow | None = None       # the packet as it left this step, when known
    approximate_reason: str | None = None  # set when this step over-approximates

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"step kind {self.kind!r} not in {STEP_KINDS}")

    def __str__(self) -> str:
        return f"{self.where}:{self.kind.upper()}" + (f" {self.detail}" if self.detail else "")


@dataclass(frozen=True, slots=True)
class Hop:
    """The steps taken inside one network namespace (one host, pod or router)."""

    namespace: str
    steps: tuple[Step, ...] = ()
    iif: str | None = None
    oif: str | None = None

    def __str__(self) -> str:
        head = f"[{self.namespace}]" + "".join(
            f" {k} {v}" for k, v in (("iif", self.iif), ("oif", self.oif)) if v)
        return "\n".join([head, *(f"  {s}" for s in self.steps)])


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where a set of packets ends up (``disposition``: caller's word, e.g. "delivered").

    ``probability`` is the share of connections taking this outcome (1.0 unless a random
    choice split them); ``packets`` the packets that get here, ``witness`` one of them.
    """

    disposition: str
    probability: float = 1.0
    packets: PacketSet | None = None
    witness: Flow | None = None
    hops: tuple[Hop, ...] = ()
    confidence: Confidence = EXACT

    def __post_init__(self) -> None:
        if self.confidence not in (EXACT, APPROXIMATE):
            raise ValueError(f"confidence must be {EXACT} or {APPROXIMATE}, not {self.confidence!r}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} outside [0, 1]")

    @property
    def steps(self) -> tuple[Step, ...]:
        return tuple(s for h in self.hops for s in h.steps)

    def approximate_reasons(self) -> tuple[str, ...]:
        """Why this outcome is APPROXIMATE, from its steps, in order, without repeats."""
        return tuple(dict.fromkeys(s.approximate_reason for s in self.steps if s.approximate_reason))
