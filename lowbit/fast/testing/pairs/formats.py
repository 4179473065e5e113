"""Number-format pairs (lowbit.reference.formats <-> lowbit.fast.formats)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from lowbit.fast.testing.pairs import Call, Pair, register
from lowbit.fast.testing.strategies import (
    _cast,
    float_arrays,
    float_dtypes,
    fp_formats,
    int_formats,
    named_formats,
    numpy_dtype,
    shapes,
    values_for,
)
from lowbit.reference.formats import FPFormat, parse_format

any_format = st.one_of(fp_formats(), int_formats(), named_formats().map(parse_format))
mx_format = st.one_of(
    fp_formats(signed=True), st.sampled_from(["e4m3fn", "e5m2", "e3m2fn", "e2m3fn", "e2m1fn"])
)
blocks = st.sampled_from([1, 2, 7, 16, 31, 32, 33])


def with_specials(draw, x: np.ndarray, nan: bool) -> np.ndarray:
    """Plant +-Inf (and NaN where allowed) at random places."""
    if x.size and draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        flat = x.reshape(-1).copy()
        idx = rng.integers(0, flat.size, size=max(1, flat.size // 10))
        flat[idx] = rng.choice(
            [np.inf, -np.inf] + ([np.nan, -np.nan] if nan else []), size=idx.size
        )
        x = flat.reshape(x.shape)
    return x


@st.composite
def encode_calls(draw):
    fmt = draw(any_format)
    # tile edges up to 65, and the primes 113 x 203 (a ragged last tile in both dimensions)
    shape = draw(st.one_of(shapes(65, 65, allow_zero=True), st.just((113, 203))))
    x = draw(values_for(fmt, shape=shape))
    is_fp = isinstance(fmt, FPFormat)
    x = with_specials(draw, x, nan=is_fp and fmt.has_nan)
    saturate = draw(st.booleans())
    if is_fp and not saturate and not fmt.has_nan and not (fmt.signed and fmt.has_zero):
        saturate = True  # the reference raises on negative/zero values (tested separately)
    x = _cast(x, numpy_dtype(draw(float_dtypes)))
    return Call((x, fmt), {"saturate": saturate})


@st.composite
def decode_calls(draw):
    fmt = draw(any_format)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = draw(shapes(65, 65, allow_zero=True))
    codes = rng.integers(0, 2**fmt.bits, size=shape).astype(
        np.uint8 if fmt.bits <= 8 else np.uint16
    )
    dtype = draw(st.sampled_from([None, np.float64, np.float16, "bfloat16"]))
    return Call((codes, fmt), {"dtype": numpy_dtype(dtype) if isinstance(dtype, str) else dtype})


@st.composite
def pack_calls(draw):
    bits = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # zero-size leading dims are left out: the reference's reshape(..., -1, g) is ambiguous
    # there (reported); 1-D empty inputs are in
    shape = draw(st.one_of(shapes(17, 70), st.tuples(st.integers(0, 70))))
    dtype = draw(st.sampled_from([np.uint8, np.int32, np.int64]))
    return Call((rng.integers(0, 2**bits, size=shape).astype(dtype), bits))


@st.composite
def unpack_calls(draw):
    bits = draw(st.integers(1, 8))
    nbytes = np.lcm(bits, 8) // 8
    rows, groups = (
        draw(st.integers(1, 9)),
        draw(st.integers(0, 20)),
    )  # rows >= 1: see pack_calls
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    packed = rng.integers(0, 256, size=(rows, groups * nbytes)).astype(np.uint8)
    total = groups * (np.lcm(bits, 8) // bits)
    n = draw(st.one_of(st.none(), st.integers(0, total)))
    return Call((packed, bits), {} if n is None else {"n": n})


@st.composite
def mx_calls(draw):
    fmt = draw(mx_format)
    dtype = numpy_dtype(draw(float_dtypes))
    x = draw(
        float_arrays(dtype=np.float64, outlier_cols=True, zero_rows=True, max_rows=40, max_cols=80)
    )
    x = _cast(with_specials(draw, x, nan=True), dtype)
    return Call((x, fmt), {"block": draw(blocks)})


@st.composite
def decode_mx_calls(draw):
    fmt = parse_format(draw(mx_format))
    block = draw(blocks)
    rows, n = draw(shapes(20, 80))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = rng.integers(0, 2**fmt.bits, size=(rows, n)).astype(np.uint8)
    scales = rng.integers(0, 256, size=(rows, -(-n // block))).astype(np.uint8)
    return Call(
        (codes, scales, fmt),
        {"block": block, "dtype": draw(st.sampled_from([None, np.float64]))},
    )


register(Pair("formats.encode", encode_calls()))
register(Pair("formats.quantize", encode_calls()))
register(Pair("formats.decode", decode_calls()))
register(
    Pair(
        "formats.values",
        st.one_of(any_format, fp_formats(max_bits=12)).map(lambda f: Call((f,))),
    )
)
register(Pair("formats.pack", pack_calls()))
register(Pair("formats.unpack", unpack_calls()))
register(Pair("formats.encode_mx", mx_calls()))
register(Pair("formats.quantize_mx", mx_calls()))
register(Pair("formats.decode_mx", decode_mx_calls()))


@st.composite
def nvfp4_calls(draw):
    dtype = numpy_dtype(draw(float_dtypes))
    x = draw(
        float_arrays(dtype=np.float64, outlier_cols=True, zero_rows=True, max_rows=40, max_cols=80)
    )
    if draw(st.booleans()):  # magnitudes far from 1: the global scale does the work
        x = x * 2.0 ** draw(st.integers(-60, 60))
    x = _cast(with_specials(draw, x, nan=True), dtype)
    kwargs: dict = {"block_2d": draw(st.booleans()) and x.ndim >= 2}
    if draw(st.booleans()):
        kwargs["global_scale"] = draw(st.sampled_from([1.0, 0.37, 2688.0, 1e-20]))
    return Call((x,), kwargs)


@st.composite
def decode_nvfp4_calls(draw):
    rows, n = draw(shapes(40, 80))
    block_2d = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = rng.integers(0, 16, size=(rows, n)).astype(np.uint8)
    scale_shape = (-(-rows // 16), -(-n // 16)) if block_2d else (rows, -(-n // 16))
    scales = rng.integers(0, 256, size=scale_shape).astype(np.uint8) & 0x7F  # E4M3FN: no sign
    g = draw(st.sampled_from([1.0, 1120.8252, 3.0e-5]))
    dtype = draw(st.sampled_from([None, np.float64]))
    return Call((codes, scales, g), {"block_2d": block_2d, "dtype": dtype})


register(Pair("formats.nvfp4_global_scale", nvfp4_calls().map(lambda c: Call(c.args))))
register(Pair("formats.encode_nvfp4", nvfp4_calls()))
register(Pair("formats.quantize_nvfp4", nvfp4_calls()))
register(Pair("formats.decode_nvfp4", decode_nvfp4_calls()))
