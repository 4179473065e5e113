"""Hadamard pairs (lowbit.reference.hadamard <-> lowbit.fast.hadamard).

Both sides run the same butterfly stages in the same working precision, so every pair is
bit-exact (tier A), NaN and Inf included; the comparison with the dense matrix product is in
tests/test_hadamard.py.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from lowbit.fast.testing.pairs import Call, Pair, register
from lowbit.fast.testing.strategies import float_arrays, float_dtypes, numpy_dtype

POWERS = st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256])


@st.composite
def _values(draw, shape) -> np.ndarray:
    dtype = numpy_dtype(draw(float_dtypes))
    x = draw(float_arrays(shape=shape, dtype=dtype, scale=1.0 if dtype == np.float16 else None))
    if x.size and draw(st.booleans()):  # a non-finite value spreads through its block
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf]))
    return x


@st.composite
def fwht_calls(draw) -> Call:
    lead = tuple(draw(st.lists(st.integers(0, 9), max_size=2)))
    return Call((draw(_values(lead + (draw(POWERS),))),))


@st.composite
def block_calls(draw) -> Call:
    block = draw(POWERS)
    n = block * draw(st.integers(0, 9))
    rows = draw(st.integers(0, 17))
    return Call((draw(_values((rows, n))), block))


register(Pair("hadamard.hadamard", st.builds(Call, st.tuples(POWERS))))
register(Pair("hadamard.fwht", fwht_calls()))
register(Pair("hadamard.block_hadamard", block_calls()))
