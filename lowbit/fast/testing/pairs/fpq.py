"""LLM-FP4 / FPQ pairs (lowbit.reference.fpq <-> lowbit.fast.fpq)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from lowbit.fast.testing.pairs import Call, Pair, register
from lowbit.fast.testing.strategies import float_arrays, fpq_formats
from lowbit.fast.testing.tiers import MatmulTier


@st.composite
def biases(draw, shape):
    """None, an integer, a real scalar, or a real per-row / per-column array (negative too)."""
    kind = draw(st.sampled_from(["none", "int", "real", "row", "col"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.integers(-20, 30))
    if kind == "real":
        return float(rng.uniform(-20.0, 30.0))
    if kind == "row":
        return rng.uniform(-20.0, 30.0, size=(shape[0], 1))
    return rng.uniform(-20.0, 30.0, size=(shape[1],))


@st.composite
def quantize_calls(draw, dtypes=("float32", "float16", "float64", "bfloat16"), nan: bool = True):
    """Inputs with outlier columns and zero rows; sometimes with +-Inf (clipped to the largest
    value), NaN (kept; ``nan=False`` for encode, which refuses it) and subnormals of the
    input dtype, at biases of every shape."""
    from lowbit.fast.testing.strategies import numpy_dtype

    fmt = draw(fpq_formats)
    dtype = numpy_dtype(draw(st.sampled_from(dtypes)))
    x = draw(float_arrays(dtype=dtype, outlier_cols=True, zero_rows=True, max_rows=40, max_cols=40))
    if x.size and draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        tiny = float(np.finfo(np.float32 if dtype == numpy_dtype("bfloat16") else dtype).tiny)
        specials = [np.inf, -np.inf, tiny / 4, -tiny / 2] + ([np.nan] if nan else [])
        flat = x.reshape(-1).astype(np.float64)
        where = rng.random(flat.size) < 0.1
        flat[where] = rng.choice(specials, size=int(where.sum()))
        x = flat.reshape(x.shape).astype(dtype)
    return Call((x, fmt), {"bias": draw(biases(x.shape))})


@st.composite
def decode_calls(draw):
    fmt = draw(fpq_formats)
    shape = (draw(st.integers(1, 20)), draw(st.integers(1, 20)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = rng.integers(0, 2**fmt.bits, size=shape).astype(
        np.uint8 if fmt.bits <= 8 else np.uint16
    )
    return Call((codes, fmt), {"bias": draw(biases(shape))})


@st.composite
def max_from_bias_calls(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return Call((rng.uniform(-40.0, 40.0, size=draw(st.integers(0, 30))), draw(fpq_formats)))


@st.composite
def bias_from_max_calls(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    m = np.abs(rng.standard_normal(draw(st.integers(1, 30)))) * 10.0 ** rng.integers(-6, 6)
    m[rng.random(m.shape) < 0.2] = 0.0  # zero rows/channels
    return Call((m, draw(fpq_formats)))


@st.composite
def linear_calls(draw):
    x = draw(float_arrays(outlier_cols=True, zero_rows=True, max_rows=33, max_cols=33))
    out = draw(st.integers(1, 33))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = (rng.standard_normal((out, x.shape[1])) * 0.1).astype(np.float32)
    a_fmt, w_fmt = draw(fpq_formats), draw(fpq_formats)
    per_channel = draw(st.booleans())
    a_max = np.abs(x).max(axis=0) if per_channel else np.abs(x).max()
    a_bias = np.asarray(_ref_fpq().bias_from_max(a_max, a_fmt) + rng.uniform(-1.0, 1.0))
    w_bias = _ref_fpq().bias_from_max(np.abs(w).max(axis=1), w_fmt) + rng.uniform(-0.5, 0.5, out)
    b = (rng.standard_normal(out) * 0.1).astype(np.float32) if draw(st.booleans()) else None
    return Call((x, w, a_fmt, a_bias, w_fmt, w_bias), {"b": b})


def linear_naive(x, w, a_fmt, a_bias, w_fmt, w_bias, b=None):
    """float32 GEMM of the *reference* quantizer's values (independent of the fast quantizer)."""
    import torch

    ref = _ref_fpq()
    xq = torch.from_numpy(ref.quantize(x.numpy(), a_fmt, np.asarray(a_bias)).astype(np.float32))
    wq = torch.from_numpy(
        ref.quantize(w.numpy(), w_fmt, np.asarray(w_bias)[:, None]).astype(np.float32)
    )
    y = xq @ wq.T
    return y if b is None else y + b


@st.composite
def preshift_calls(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a_bias = rng.uniform(-10.0, 20.0, size=draw(st.integers(1, 40)))
    t = draw(st.one_of(st.none(), st.floats(-10.0, 20.0)))
    return Call((a_bias, draw(fpq_formats)), {"tensor_bias": t})


@st.composite
def fold_calls(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w_bias = rng.uniform(-10.0, 20.0, size=draw(st.integers(1, 20)))
    shifts = rng.integers(0, 16, size=draw(st.integers(1, 20)))
    return Call((w_bias, shifts))


def _ref_fpq():
    from lowbit.reference import fpq

    return fpq


register(Pair(op="fpq.quantize", inputs=quantize_calls()))
register(Pair(op="fpq.encode", inputs=quantize_calls(nan=False)))  # every float dtype
register(Pair(op="fpq.decode", inputs=decode_calls()))
register(Pair(op="fpq.max_from_bias", inputs=max_from_bias_calls()))
register(Pair(op="fpq.bias_from_max", inputs=bias_from_max_calls()))
register(Pair(op="fpq.linear", inputs=linear_calls(), tier=MatmulTier(), naive=linear_naive))
register(Pair(op="fpq.preshift", inputs=preshift_calls()))
register(Pair(op="fpq.fold_preshift", inputs=fold_calls()))
register(
    Pair(
        op="fpq.search",
        inputs=st.nothing(),
        tested_in="tests/test_fpq.py::test_fast_search_matches_reference (a search per example is too slow for Hypothesis)",
    )
)
