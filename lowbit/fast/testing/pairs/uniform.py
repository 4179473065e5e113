"""Pairs for the uniform integer quantizer (lowbit.{reference,fast}.uniform): tier A, bit-exact.

Inputs: every float dtype; 2-D shapes around tile edges and primes up to 203 (with outlier
rows/columns and zero rows), 1-D and 3-D (..., tokens, in) tensors, empty and zero-size
dimensions, all-zero tensors, half-integer grids (exact rounding ties); all four
granularities, group sizes that do and do not divide the row, bits 2..8 and 16, both
``symmetric`` flags, clip ratios, static (given) scales and zero points. ``decode`` gets both encoder output and random codes.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from lowbit.fast.testing.pairs import Call, Pair, register
from lowbit.fast.testing.strategies import dims, float_arrays, numpy_dtype
from lowbit.fast.testing.tiers import EXACT

BITS = st.sampled_from([2, 3, 4, 5, 6, 7, 8, 16])
GROUP_SIZES = st.sampled_from([1, 2, 3, 7, 16, 32, 33, 64, 128, 500])
CLIP_RATIOS = st.one_of(
    st.just(1.0), st.sampled_from([0.5, 0.9, 0.999]), st.floats(0.05, 1.0, exclude_min=True)
)
X_DTYPES = ["float32", "float16", "bfloat16", "float64"]
EMPTY_SHAPES = [(0,), (0, 5), (3, 0), (0, 0), (2, 0, 7), (2, 3, 0)]


@st.composite
def settings(draw) -> dict:
    """bits, symmetric, granularity (+ group_size) and clip_ratio as encode's keywords."""
    granularity = draw(st.sampled_from(["tensor", "channel", "token", "group"]))
    kwargs = {
        "symmetric": draw(st.booleans()),
        "granularity": granularity,
        "clip_ratio": draw(CLIP_RATIOS),
    }
    if granularity == "group":
        kwargs["group_size"] = draw(GROUP_SIZES)
    return kwargs


@st.composite
def uniform_arrays(draw, bits: int) -> np.ndarray:
    dtype = numpy_dtype(draw(st.sampled_from(X_DTYPES)))
    # float16 tops out at 65504: keep x100 outlier rows times x100 outlier columns finite
    scale = draw(st.sampled_from([1e-3, 1e-1, 0.5])) if dtype == np.float16 else None
    kind = draw(st.sampled_from(["2d", "2d", "2d", "3d", "1d", "empty", "zeros", "ties"]))
    structure = {"outlier_rows": True, "outlier_cols": True, "zero_rows": True}
    if kind == "2d":
        return draw(float_arrays(dtype=dtype, scale=scale, max_rows=203, max_cols=203, **structure))
    if kind == "3d":
        shape = (draw(st.integers(1, 3)), draw(dims(33)), draw(dims(70)))
        return draw(float_arrays(shape=shape, dtype=dtype, scale=scale))
    if kind == "1d":
        return draw(float_arrays(shape=(draw(dims(203)),), dtype=dtype, scale=scale))
    if kind == "empty":
        return np.zeros(draw(st.sampled_from(EMPTY_SHAPES)), dtype=dtype)
    rows, cols = draw(dims(40)), draw(dims(70))
    if kind == "zeros":
        return np.zeros((rows, cols), dtype=dtype)
    # half-integers in [-Q, Q] with +-Q in every row: symmetric scale 1 (bits <= 8, clip 1),
    # so x / s lands exactly on rounding ties
    Q = 2 ** (bits - 1) - 1 if bits <= 8 else 127
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(-2 * Q, 2 * Q + 1, size=(rows, cols)) / 2.0
    x[:, 0] = rng.choice([-Q, Q], size=rows)
    return x.astype(dtype)


@st.composite
def encode_calls(draw) -> Call:
    """Computed parameters, or (one in four) static ones calibrated on other data of x's shape,
    so that x falls partly outside their range and clamps."""
    bits = draw(BITS)
    x = draw(uniform_arrays(bits))
    kwargs = draw(settings())
    if x.size and draw(st.integers(0, 3)) == 0:
        from lowbit.reference.uniform import encode

        kwargs["clip_ratio"] = 1.0
        calibration = (x.astype(np.float64) * draw(st.sampled_from([0.25, 0.5, 2.0]))).astype(
            x.dtype
        )
        _, scale, zero_point = encode(calibration, bits, **kwargs)
        kwargs = {**kwargs, "scale": scale, "zero_point": zero_point}
    return Call((x, bits), kwargs)


@st.composite
def decode_calls(draw) -> Call:
    """Encoder output (any setting), or random codes with random scales (zeros included)."""
    dtype = draw(st.sampled_from([None, np.float64, np.float32, np.float16, "bfloat16"]))
    out = {"dtype": numpy_dtype(dtype) if isinstance(dtype, str) else dtype}
    bits = draw(BITS)
    kwargs = draw(settings())
    G = kwargs.get("group_size")
    if draw(st.booleans()):
        from lowbit.reference.uniform import encode

        codes, scale, zero_point = encode(draw(uniform_arrays(bits)), bits, **kwargs)
        return Call((codes, scale, zero_point), {"group_size": G, **out})
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows, n = draw(dims(65, allow_zero=True)), draw(dims(130, allow_zero=True))
    k = {"tensor": 1, "channel": 1, "token": 1}.get(kwargs["granularity"]) or -(-n // G)
    scale_shape = (1, 1) if kwargs["granularity"] == "tensor" else (rows, k)
    scale_dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = rng.random(scale_shape) * 10.0 ** draw(st.integers(-6, 3))
    scale[rng.random(scale_shape) < 0.2] = 0.0
    scale = scale.astype(scale_dtype)
    if kwargs["symmetric"]:
        Q = 2 ** (bits - 1) - 1
        codes = rng.integers(-Q, Q + 1, size=(rows, n)).astype(np.int8 if bits <= 8 else np.int16)
        zero_point = None
    else:
        codes = rng.integers(0, 2**bits, size=(rows, n)).astype(np.uint8 if bits <= 8 else np.int32)
        zero_point = rng.integers(0, 2**bits, size=scale_shape).astype(np.int32)
    return Call((codes, scale, zero_point), {"group_size": G, **out})


register(Pair(op="uniform.encode", inputs=encode_calls(), tier=EXACT))
register(Pair(op="uniform.decode", inputs=decode_calls(), tier=EXACT))
register(Pair(op="uniform.quantize", inputs=encode_calls(), tier=EXACT))
