"""Hypothesis strategies for testing quantization code (lowbit's own tests use them too).

* ``shapes`` / ``dims``: 2-D shapes around tile edges (1, 15/16/17, 31/32/33, 63/64/65,
  127/128/129) and primes such as 113 x 203, plus empty dimensions when asked.
* ``float_arrays``: finite random-normal data with a random scale, optionally with planted
  outlier rows/columns and all-zero rows; ``outlier_rows``: the same with outlier rows (LLM.int8's
  and FPQ's per-token case) and sometimes a zero row.
* ``bit_patterns``: arrays of raw float16 / bfloat16 / float32 bit patterns (subnormals, Inf,
  NaN payloads and all).
* ``values_for(fmt)``: values that hit every region of a format (grid points, ties,
  subnormals, overflow, signed zeros, Inf and NaN).
* ``formats``: any lowbit format (random ExMy floats, n-bit ints, the named formats);
  ``fp_formats`` / ``int_formats`` / ``named_formats`` separately; ``fpq_formats``: LLM-FP4's
  (signed, no reserved code).

Every fp16 / bf16 bit pattern is better swept exhaustively than sampled:
``lowbit.fast.testing.exhaustive_16bit``.
"""

from __future__ import annotations

import numpy as np

from lowbit.fast.testing._hypothesis import st  # one line if Hypothesis is missing

TILE_EDGES = [1, 2, 3, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 113, 127, 128, 129, 203]


def dims(max_value: int = 203, allow_zero: bool = False) -> st.SearchStrategy[int]:
    edges = [d for d in TILE_EDGES if d <= max_value] + ([0] if allow_zero else [])
    return st.one_of(st.sampled_from(edges), st.integers(1, max_value))


def shapes(max_rows: int = 203, max_cols: int = 203, allow_zero: bool = False):
    return st.tuples(dims(max_rows, allow_zero), dims(max_cols, allow_zero))


@st.composite
def float_arrays(
    draw,
    shape=None,
    dtype=np.float32,
    scale=None,
    outlier_rows: bool = False,
    outlier_cols: bool = False,
    zero_rows: bool = False,
    max_rows: int = 129,
    max_cols: int = 129,
):
    """Random-normal data times a random power-of-ten scale, with optional structure."""
    if shape is None:
        shape = draw(shapes(max_rows, max_cols))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if scale is None:
        scale = 10.0 ** draw(st.integers(-3, 3))
    x = rng.standard_normal(shape) * scale
    if len(shape) == 2 and shape[0] and shape[1]:
        if outlier_cols and draw(st.booleans()):
            cols = rng.choice(shape[1], size=max(1, shape[1] // 50), replace=False)
            x[:, cols] *= draw(st.sampled_from([10.0, 30.0, 100.0]))
        if outlier_rows and draw(st.booleans()):
            rows = rng.choice(shape[0], size=max(1, shape[0] // 50), replace=False)
            x[rows, :] *= draw(st.sampled_from([10.0, 30.0, 100.0]))
        if zero_rows and draw(st.booleans()):
            x[rng.integers(0, shape[0])] = 0.0
    return _cast(x, dtype)


def _cast(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` in ``dtype``; values beyond its range become +-Inf (test inputs want them)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.dtype(dtype).name == "bfloat16":
            return x.astype(np.float32).astype(dtype)
        return x.astype(dtype)


float_dtypes = st.sampled_from(["float16", "bfloat16", "float32", "float64"])


def numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


# ---- number formats ------------------------------------------------------------------------------


@st.composite
def fp_formats(
    draw, max_bits: int = 8, specials=("none", "fn", "ieee"), signed=None, subnormals=None
):
    """Random valid ExMy formats: ebits + mbits <= max_bits - 1, all three ``specials``,
    signed and unsigned, biases around the default, with or without subnormals (``None``:
    drawn)."""
    from lowbit.reference.formats import FPFormat

    ebits = draw(st.integers(1, max_bits - 1))
    mbits = draw(st.integers(0, max_bits - 1 - ebits))
    spec = draw(st.sampled_from(specials))
    if spec == "ieee" and mbits == 0:
        spec = "fn"
    is_signed = draw(st.booleans()) if signed is None else signed
    default_bias = 2 ** (ebits - 1) - 1
    bias = draw(st.one_of(st.none(), st.integers(default_bias - 3, default_bias + 3)))
    # no subnormals (field 0 a normal binade, no zero: E8M0FNU's kind) one time in eight
    subnormals = subnormals if subnormals is not None else draw(st.integers(0, 7)) > 0
    try:
        return FPFormat(
            ebits, mbits, bias=bias, specials=spec, signed=is_signed, subnormals=subnormals
        )
    except ValueError:  # e.g. E1M0 "fn" (no finite value), E8M0 "none" (max beyond float32)
        from hypothesis import reject

        reject()


# LLM-FP4's formats reserve no code (specials "none") and are signed; shared by FPQ's pairs and tests.
fpq_formats = fp_formats(specials=("none",), signed=True, subnormals=True)


def int_formats(max_bits: int = 8):
    from lowbit.reference.formats import IntFormat

    return st.builds(IntFormat, st.integers(2, max_bits), st.booleans())


def named_formats():
    from lowbit.reference.formats import NAMED_FORMATS

    return st.sampled_from(sorted(k for k, f in NAMED_FORMATS.items() if f.bits <= 8))


def formats(max_bits: int = 8):
    """Any lowbit format object: a random ExMy float, an n-bit int or a named format."""
    from lowbit.reference.formats import parse_format

    return st.one_of(fp_formats(max_bits), int_formats(max_bits), named_formats().map(parse_format))


def outlier_rows(shape=None, dtype=np.float32, max_rows: int = 129, max_cols: int = 129):
    """Random-normal arrays whose rows sometimes include a few 10-100x outlier rows and an
    all-zero row: the per-token cases (absmax rows, empty rows) that quantizers get wrong."""
    return float_arrays(
        shape, dtype, outlier_rows=True, zero_rows=True, max_rows=max_rows, max_cols=max_cols
    )


_BITS: dict[str, tuple[type, int]] = {
    "float16": (np.uint16, 16),
    "bfloat16": (np.uint16, 16),
    "float32": (np.uint32, 32),
}


@st.composite
def bit_patterns(draw, dtype="float32", shape=None, max_side: int = 129):
    """Arrays of uniformly random bit patterns of ``dtype`` ("float16", "bfloat16" or
    "float32"): every class of input (subnormals, Inf, NaN with payloads, both zeros) appears."""
    if dtype not in _BITS:
        raise ValueError(f"bit_patterns takes float16, bfloat16 or float32, got {dtype!r}")
    if shape is None:
        shape = draw(shapes(max_side, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    uint, n = _BITS[dtype]
    raw = rng.integers(0, 2**n, size=shape, dtype=np.int64)
    return raw.astype(uint).view(numpy_dtype(dtype))


@st.composite
def values_for(draw, fmt, shape=None, max_side: int = 67, specials: bool = True):
    """Float64 arrays that exercise every region of ``fmt``: exact grid points, midpoints
    (ties), subnormals, overflow, zeros of both signs and, with ``specials``, +-Inf (any
    format: saturation or Inf) and NaN (formats that have a NaN code)."""
    from lowbit.reference.formats import values

    grid = values(fmt)
    grid = grid[np.isfinite(grid)]
    if shape is None:
        shape = draw(st.tuples(st.integers(0, max_side), st.integers(1, 5)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = int(np.prod(shape))
    pick = rng.choice(grid, size=n) if grid.size else np.zeros(n)
    pick2 = rng.choice(grid, size=n) if grid.size else np.zeros(n)
    top = float(np.max(np.abs(grid))) if grid.size else 1.0
    kind = rng.integers(0, 6, size=n)
    x = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3, kind == 4],
        [
            pick,
            (pick + pick2) / 2,
            rng.standard_normal(n) * top / 4,
            pick * (1 + rng.uniform(-(2**-6), 2**-6, n)),
            rng.uniform(-2, 2, n) * top,
        ],
        default=np.where(rng.random(n) < 0.5, -0.0, 0.0),
    )
    if specials and n:
        special = rng.random(n) < 0.05
        inf = np.where(rng.random(n) < 0.5, -np.inf, np.inf)
        x = np.where(
            special,
            np.where(rng.random(n) < 0.5, np.nan, inf) if getattr(fmt, "has_nan", False) else inf,
            x,
        )
    return x.reshape(shape)


# ---- oracles and special float32 inputs for the formats tests ------------------------------------


def _ml_dtypes_by_format() -> dict:
    import ml_dtypes

    return {
        "e5m2": ml_dtypes.float8_e5m2,
        "e4m3fn": ml_dtypes.float8_e4m3fn,
        "e3m2fn": ml_dtypes.float6_e3m2fn,
        "e2m3fn": ml_dtypes.float6_e2m3fn,
        "e2m1fn": ml_dtypes.float4_e2m1fn,
        "e8m0fnu": ml_dtypes.float8_e8m0fnu,
        "float16": np.float16,
        "bfloat16": ml_dtypes.bfloat16,
    }


# Named format -> the ml_dtypes type with the same bits: ``x.astype(ML_DTYPES[name])`` is an
# independent oracle for encode (saturate=False semantics) and its bits for the codes.
ML_DTYPES = _ml_dtypes_by_format()


def random_fp32(n: int, seed: int = 0) -> np.ndarray:
    """float32 values of every class: normals over 60 decades, raw bit patterns (the first
    eighth: subnormals, Inf, NaN with payloads), signed subnormals (the second eighth), small
    integers times powers of two (ties of most formats, the third eighth), and +-0, +-Inf."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n)).astype(np.float32)
    k = n // 8
    x[:k] = rng.integers(0, 2**32, k, dtype=np.uint32).view(np.float32)
    x[k : 2 * k] = rng.integers(0, 2**23, k, dtype=np.uint32).view(np.float32) * rng.choice(
        [-1, 1], k
    )
    x[2 * k : 3 * k] = (rng.integers(-64, 64, k) * 2.0 ** rng.integers(-20, 10, k)).astype(
        np.float32
    )
    x[3 * k : 3 * k + 4] = [0.0, -0.0, np.inf, -np.inf]
    return x
