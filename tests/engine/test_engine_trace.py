"""The engine's part of a trace is generic: confidence words and the chance of a branch."""
from __future__ import annotations

from analyzer.engine import APPROXIMATE, EXACT, chance


def test_chance_of_a_branch_is_the_product_of_its_choices():
    assert chance([0.5, 0.5]) == 0.25
    assert chance([]) == 1.0


def test_one_unknown_choice_makes_the_chance_unknown():
    assert chance([0.5, None, 0.5]) is None


def test_confidence_words():
    assert (EXACT, APPROXIMATE) == ("EXACT", "APPROXIMATE")


def test_engine_names_no_table_or_chain():
    import analyzer.engine.trace as t
    text = open(t.__file__).read()
    for word in ("PREROUTING", "POSTROUTING", "KUBE-", "nat:", "filter:"):
        assert word not in text
