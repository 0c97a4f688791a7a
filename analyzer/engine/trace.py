"""Symbolic engine, results layer: what any trace of a walk needs, whatever graph was walked.

The trace types themselves (Trace -> Hop -> Step) name tables, chains and hooks, so they live in
the netfilter layer (analyzer/netfilter/trace.py); this module keeps the generic parts: the
confidence of an answer and the probability of a branch through several random choices.
"""
from __future__ import annotations

from typing import Iterable, Literal

__all__ = ["EXACT", "APPROXIMATE", "Confidence", "chance"]

EXACT = "EXACT"
APPROXIMATE = "APPROXIMATE"
Confidence = Literal["EXACT", "APPROXIMATE"]


def chance(parts: Iterable[float | None]) -> float | None:
    """The probability of taking every one of several independent choices: their product, None
    (unknown) when any one is unknown.

    >>> chance([0.5, 1.0, 0.5]), chance([0.5, None]), chance([])
    (0.25, None, 1.0)
    """
    p = 1.0
    for x in parts:
        if x is None:
            return None
        p *= x
    return p
