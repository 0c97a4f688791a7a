"""Property tests of the packet-set layer; run only where hypothesis is installed."""
from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from analyzer.engine import PacketSpace  # noqa: E402

SPACE = PacketSpace()
u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)


@settings(max_examples=200, deadline=None)
@given(old=u32, value=u32, mask=u32)
def test_masked_assign_is_the_kernel_formula(old, value, mask):
    image = SPACE.eq("mark", old).masked_assign("mark", value, mask)
    assert image == SPACE.eq("mark", (old & ~mask) ^ value)


@settings(max_examples=200, deadline=None)
@given(lo=u16, hi=u16, port=u16)
def test_range_membership(lo, hi, port):
    assert (SPACE.eq("dport", port) <= SPACE.range("dport", lo, hi)) == (lo <= port <= hi)


@settings(max_examples=100, deadline=None)
@given(a=u16, b=u16, c=u16)
def test_boolean_algebra_laws(a, b, c):
    x, y, z = (SPACE.range("sport", min(v, 1000), max(v, 1000)) for v in (a, b, c))
    assert x & (y | z) == (x & y) | (x & z)
    assert ~(x | y) == ~x & ~y
    assert x - y == x & ~y
