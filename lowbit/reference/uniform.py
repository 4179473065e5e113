"""Uniform integer quantization (round to nearest, "RTN") — reference.

The integer quantizer that every method's baselines share: the absmax int8 of LLM.int8()
(arXiv:2208.07339, section 2.1), the "MinMax INT" baseline of LLM-FP4 (arXiv:2310.16836), the
round-to-nearest (RTN) weight baselines of GPTQ/AWQ/OmniQuant tables, and, with clipping
learned instead of fixed, OmniQuant's learnable weight clipping (arXiv:2308.13137, section 3.2).

Formulas (one scale ``s`` per tensor, row or group; ``c`` = ``clip_ratio``; rint = round half
to even):

* symmetric, b bits: Q = 2^(b-1) - 1, s = (c · max|x|) / Q,
  q = clamp(rint(x / s), -Q, Q), x̂ = q · s. Codes int8 (b <= 8) or int16; -2^(b-1) is never
  produced, so int8 codes lie in [-127, 127] like LLM.int8()'s absmax codes.
* asymmetric, b bits: x_min = c · min(min x, 0), x_max = c · max(max x, 0),
  s = (x_max - x_min) / (2^b - 1), z = clamp(rint(-x_min / s), 0, 2^b - 1),
  q = clamp(rint(x / s) + z, 0, 2^b - 1), x̂ = (q - z) · s. Codes uint8 (b <= 8) or int32;
  z int32 with the scale's shape.

Public functions:

* ``encode(x, bits=8, *, symmetric=True, granularity="channel", group_size=None,
  clip_ratio=1.0)`` -> ``(codes, scale, zero_point)``; ``zero_point`` is None when symmetric.
* ``decode(codes, scale, zero_point=None, *, group_size=None, dtype=None)`` -> values
  ((q - z) · s in the scale's precision, returned as float32, or as ``dtype``).
* ``quantize(x, bits=8, *, ...)`` -> fake-quantized values in x's dtype,
  ``decode(encode(x), dtype=x.dtype)``.

``encode`` and ``quantize`` also take ``scale=`` (and ``zero_point=``, asymmetric) for static
quantization with calibrated parameters (the static activation scales of LLM-FP4's MinMax
baselines): the given values replace the computed ones and out-of-range values clamp.

Granularity (the reductions run over the last dimension, the input features of a weight
(out, in) or the hidden size of activations (..., tokens, in)):

* ``"tensor"``: one scale; scale shape (1,) * x.ndim.
* ``"channel"``: one scale per row of the last dimension (per output channel of a weight);
  scale shape (..., 1). ``"token"`` is the same reduction, named for activations.
* ``"group"``: groups of ``group_size`` consecutive elements along the last dimension; scale
  shape (..., ceil(n / group_size)). When group_size does not divide n, the last group of
  each row is shorter and its scale comes from its own elements only (no padding).

Choices, and where they differ from other implementations:

* Working precision: float32 for float16 / bfloat16 / float32 input (both convert exactly),
  float64 for float64 input. The scale is computed in it, and codes come from the division
  ``x / s`` in it (never ``x · (1/s)``), so for symmetric per-channel int quantization the
  values are bit for bit ``torch.round(x / (absmax / Q)).clamp(-Q, Q) * (absmax / Q)`` on
  CPU, up to the sign of zero (that expression keeps -0 for small negative x; on CUDA it
  computes ``absmax / Q`` as ``absmax · (1/Q)``, which can differ in the last bit).
  ``clip_ratio`` is rounded to the working precision first. Scales are returned in the
  working precision (float32, or float64 for float64 input).
* Asymmetric ranges always include 0 (x_min <= 0 <= x_max), as torch.ao observers and the
  usual GPTQ-style RTN do, so 0 is exactly representable (code z). OmniQuant's own quantizer
  does not force 0 into the range and clamps s to [1e-5, 1e4] and z to [-1e4, 1e4]; the
  OmniQuant module implements that behaviour itself. z is clamped to [0, 2^b - 1] (a no-op
  for ranges that include 0, kept as a guard against rounding).
* rint(x / s) ties go to even, like ``torch.round`` and ``np.rint``. Whether a value lies on a
  tie depends on the working precision: the row [-1, 0.5, 2] at 4 bits has s = fl(2/7); in
  float64 -1/s is exactly -3.5 (code -4), in float32 fl(2/7) rounds up and -1/s is
  -3.4999998 (code -3).
* Zero scales (all-zero rows, groups or tensors, or a scale that underflows): the division
  uses 1 instead of s, so the codes are 0 (z = 0) and the decoded values 0, never NaN. The
  returned scale stays 0. Every zero in a result is +0 (decoded values come from integer
  codes, so -0.0 input decodes to +0).
* ``decode`` of a float64 scale to float16 / bfloat16 rounds through float32, as torch's casts
  do (a direct rounding from float64 differs now and then, for 113 of 2 million
  random-normal values to float16 and 17 to bfloat16). Values beyond a 16-bit dtype's range
  become ±Inf.
* bits: an int from 2 to 16; ``clip_ratio`` in (0, 1]. Empty tensors and zero-size dimensions
  give empty codes and scales of the shapes above (a zero-length row gets scale 0).
* Non-finite input raises ``ValueError`` with the count; an asymmetric range whose width
  x_max - x_min overflows the working precision (float32 values near ±3.4e38) raises too.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["encode", "decode", "quantize", "GRANULARITIES", "MIN_BITS", "MAX_BITS"]

GRANULARITIES = ("tensor", "channel", "token", "group")
MIN_BITS, MAX_BITS = 2, 16
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


# ---------------------------------------------------------------------------------------------
# argument checks (shared wording with the fast path)
# ---------------------------------------------------------------------------------------------


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(
            f"bits must be an int from {MIN_BITS} to {MAX_BITS}, got {bits!r} ({type(bits).__name__})"
        )
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be from {MIN_BITS} to {MAX_BITS}, got {bits}")
    return int(bits)


def _check_clip_ratio(clip_ratio) -> float:
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, numbers.Real):
        raise TypeError(
            f"clip_ratio must be a number in (0, 1], got {clip_ratio!r} ({type(clip_ratio).__name__})"
        )
    if not 0.0 < float(clip_ratio) <= 1.0:
        raise ValueError(f"clip_ratio must lie in (0, 1] (1.0 = no clipping), got {clip_ratio}")
    return float(clip_ratio)


def _check_symmetric(symmetric) -> bool:
    if not isinstance(symmetric, (bool, np.bool_)):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    return bool(symmetric)


def _check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(
            f"group_size must be a positive int (e.g. 128), got {group_size!r} ({type(group_size).__name__})"
        )
    if int(group_size) < 1:
        raise ValueError(f"group_size must be a positive int (e.g. 128), got {group_size}")
    return int(group_size)


def _check_granularity(granularity, group_size) -> int | None:
    """Validate the pair; return the group size for "group", else None."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "group":
        if group_size is None:
            raise ValueError("granularity='group' needs group_size, e.g. group_size=128")
        return _check_group_size(group_size)
    if group_size is not None:
        raise ValueError(
            f"group_size is only used with granularity='group' (got granularity={granularity!r}); "
            "drop group_size or pass granularity='group'"
        )
    return None


def _is_float(dtype: np.dtype) -> bool:
    return dtype.name in _FLOAT_NAMES


def _working_dtype(dtype: np.dtype) -> np.dtype:
    """float64 for float64, else float32 (float16 and bfloat16 convert to it exactly)."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _as_working(x) -> tuple[np.ndarray, np.ndarray]:
    """(x as an array, x in the working precision); checks dtype, rank and finiteness."""
    x = np.asarray(x)
    if not _is_float(x.dtype):
        raise ValueError(
            f"x must be floating point (float16/bfloat16/float32/float64), got {x.dtype}"
        )
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension, got a scalar: use x.reshape(1)")
    x_w = x.astype(_working_dtype(x.dtype))  # (..., n)
    n_bad = int(np.count_nonzero(~np.isfinite(x_w)))
    if n_bad:
        raise ValueError(
            f"x has {n_bad} non-finite values; uniform quantization needs finite input "
            "(replace NaN/Inf, e.g. with np.nan_to_num)"
        )
    return x, x_w


def _out_dtype(dtype) -> np.dtype:
    if dtype is None:
        return np.dtype(np.float32)
    out = np.dtype(dtype)
    if not _is_float(out):
        raise ValueError(
            f"dtype must be floating point (float16/bfloat16/float32/float64), got {out}"
        )
    return out


# ---------------------------------------------------------------------------------------------
# reductions and broadcasting per granularity
# ---------------------------------------------------------------------------------------------


def _reduce(v: np.ndarray, reducer, granularity: str, G: int | None) -> np.ndarray:
    """max or min of ``v`` (..., n) per tensor / row / group, including 0.

    ``initial=0`` puts 0 into every reduction: that is the definition of the range here (|x|
    >= 0 for absmax; x_min <= 0 <= x_max for asymmetric) and it gives empty rows the value 0.
    ``+ 0.0`` turns a -0 result into +0, so both paths agree on the sign of zero scales.
    Returns (1,) * ndim for "tensor", (..., 1) for "channel"/"token", (..., n_groups) for
    "group".
    """
    if granularity == "tensor":
        return reducer(v, axis=None, keepdims=True, initial=0.0) + 0.0  # (1, ..., 1)
    if granularity in ("channel", "token"):
        return reducer(v, axis=-1, keepdims=True, initial=0.0) + 0.0  # (..., 1)
    assert G is not None
    lead, n = v.shape[:-1], v.shape[-1]
    n_full = n // G  # groups of exactly G elements
    full = v[..., : n_full * G].reshape(*lead, n_full, G)  # (..., n_full, G)
    stats = [reducer(full, axis=-1, initial=0.0)]  # (..., n_full)
    if n % G:  # the last group is shorter: its own elements only, no padding
        tail = v[..., n_full * G :]  # (..., n % G)
        stats.append(reducer(tail, axis=-1, keepdims=True, initial=0.0))  # (..., 1)
    return np.concatenate(stats, axis=-1) + 0.0  # (..., n_groups)


def _per_element(stat: np.ndarray, n: int, G: int | None) -> np.ndarray:
    """A per-group statistic (..., n_groups) repeated to (..., n); others broadcast as they are."""
    if G is None:
        return stat  # (1, ..., 1) or (..., 1): broadcasts against (..., n)
    return np.repeat(stat, G, axis=-1)[..., :n]  # (..., n)


def _n_groups(n: int, G: int) -> int:
    return -(-n // G)


def _scale_shape(x_shape: tuple, granularity: str, G: int | None) -> tuple:
    """The shape of the scale ``encode`` computes for x of ``x_shape``."""
    if granularity == "tensor":
        return (1,) * len(x_shape)
    if G is None:
        return (*x_shape[:-1], 1)
    return (*x_shape[:-1], _n_groups(x_shape[-1], G))


def _static_params(scale, zero_point, symmetric: bool, want: tuple, wdt, c_ratio: float):
    """Check given (calibrated) parameters: scale float, finite, >= 0, of the computed shape;
    zero_point integer of that shape, exactly when asymmetric."""
    s = np.asarray(scale)
    if not _is_float(s.dtype) or s.shape != want:
        raise ValueError(
            f"scale must be a float array of shape {want} (as encode returns it), got {s.dtype} {s.shape}"
        )
    if not np.all(np.isfinite(s) & (s >= 0)):
        raise ValueError("scale must be finite and >= 0 (calibrate it with encode)")
    if c_ratio != 1.0:
        raise ValueError(
            "clip_ratio applies when scales are computed; with a given scale leave it at 1.0"
        )
    if symmetric:
        if zero_point is not None:
            raise ValueError("zero_point is only used with symmetric=False; drop it")
        return s.astype(wdt), None
    z = None if zero_point is None else np.asarray(zero_point)
    if z is None or z.dtype.kind not in "ui" or z.shape != want:
        raise ValueError(
            f"symmetric=False with a given scale needs zero_point: integers of shape {want}"
        )
    return s.astype(wdt), z.astype(wdt)


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    """NumPy broadcasting of ``shape`` onto ``target`` without changing ``target``."""
    if len(shape) > len(target):
        return False
    return all(d in (1, t) for d, t in zip(shape[::-1], target[::-1]))


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def encode(
    x: np.ndarray,
    bits: int = 8,
    *,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
    clip_ratio: float = 1.0,
    scale: np.ndarray | None = None,
    zero_point: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize ``x`` to ``bits``-bit integer codes with one scale per tensor / row / group.

    ``x``: float array (..., n). Symmetric: s = c · max|x| / (2^(b-1) - 1), q = clamp(rint(x /
    s), ±(2^(b-1) - 1)). Asymmetric: the range [c · min(x, 0), c · max(x, 0)] maps onto
    [0, 2^b - 1] with integer zero point z.

    Returns ``(codes, scale, zero_point)``: codes (..., n) int8/int16 (symmetric) or
    uint8/int32 (asymmetric); scale float32 (float64 for float64 x) of shape (1,) * ndim,
    (..., 1) or (..., n_groups); zero_point int32 of the scale's shape, or None if symmetric.

    Static quantization: pass ``scale`` (and, asymmetric, ``zero_point``) of those shapes,
    calibrated elsewhere (e.g. ``encode(calibration_x)[1]``); they are used instead of being
    computed from x, and values outside their range clamp to the extreme codes.
    """
    bits = _check_bits(bits)
    symmetric = _check_symmetric(symmetric)
    G = _check_granularity(granularity, group_size)
    c_ratio = _check_clip_ratio(clip_ratio)
    _, x_w = _as_working(x)  # (..., n) float32 or float64
    wdt = x_w.dtype
    n = x_w.shape[-1]
    c = np.asarray(c_ratio, dtype=wdt)  # clip ratio in the working precision
    one = np.asarray(1, dtype=wdt)
    static = None
    if scale is not None or zero_point is not None:
        if scale is None:
            raise ValueError("zero_point was given without scale; pass both (or neither)")
        want = _scale_shape(x_w.shape, granularity, G)
        static = _static_params(scale, zero_point, symmetric, want, wdt, c_ratio)
    if symmetric:
        Q = np.asarray(2 ** (bits - 1) - 1, dtype=wdt)  # qmax
        if static is not None:
            s = static[0]  # (..., k) given
        else:
            absmax = _reduce(np.abs(x_w), np.max, granularity, G)  # (..., k)
            s = (c * absmax) / Q  # (..., k)
        s_div = np.where(s == 0, one, s)  # divide by 1 where s = 0: codes 0
        q = np.rint(x_w / _per_element(s_div, n, G))  # (..., n)
        q = np.clip(q, -Q, Q)  # (..., n)
        return q.astype(np.int8 if bits <= 8 else np.int16), s.astype(wdt), None
    Q = np.asarray(2**bits - 1, dtype=wdt)  # number of steps
    if static is not None:
        s, z = static  # (..., k) given
        s_div = np.where(s == 0, one, s)  # (..., k)
        q = np.rint(x_w / _per_element(s_div, n, G)) + _per_element(z, n, G)  # (..., n)
        q = np.clip(q, 0, Q)  # (..., n)
        return q.astype(np.uint8 if bits <= 8 else np.int32), s, z.astype(np.int32)
    x_min = c * _reduce(x_w, np.min, granularity, G)  # (..., k)  c · min(min x, 0)
    x_max = c * _reduce(x_w, np.max, granularity, G)  # (..., k)  c · max(max x, 0)
    with np.errstate(over="ignore"):  # an overflowing range is reported just below
        s = (x_max - x_min) / Q  # (..., k)
    if not np.all(np.isfinite(s)):
        raise ValueError(
            f"the range max(x) - min(x) overflows {wdt.name}; quantize float64 input (x.astype(np.float64))"
        )
    s_div = np.where(s == 0, one, s)  # (..., k)
    z = np.clip(np.rint(-x_min / s_div), 0, Q)  # (..., k)  zero point
    q = np.rint(x_w / _per_element(s_div, n, G)) + _per_element(z, n, G)  # (..., n)
    q = np.clip(q, 0, Q)  # (..., n)
    return q.astype(np.uint8 if bits <= 8 else np.int32), s.astype(wdt), z.astype(np.int32)


def decode(
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None = None,
    *,
    group_size: int | None = None,
    dtype=None,
) -> np.ndarray:
    """x̂ = (q - z) · s: integer codes back to values (z = 0 when ``zero_point`` is None).

    ``scale`` (and ``zero_point``) as ``encode`` returns them: broadcastable to ``codes``
    for "tensor"/"channel"/"token", or (..., n_groups) with ``group_size`` for "group".
    The product is computed in the scale's precision (float64 for a float64 scale, else
    float32) and returned as float32, or as ``dtype`` (a float dtype, e.g. np.float64).
    """
    codes = np.asarray(codes)
    scale = np.asarray(scale)
    out_dtype = _out_dtype(dtype)
    if codes.dtype.kind not in "ui":
        raise ValueError(f"codes must be integers (from encode), got {codes.dtype}")
    if not _is_float(scale.dtype):
        raise ValueError(f"scale must be floating point (from encode), got {scale.dtype}")
    if codes.ndim < 1:
        raise ValueError("codes must have at least one dimension, got a scalar")
    G = None if group_size is None else _check_group_size(group_size)
    n = codes.shape[-1]
    if G is not None:
        want = (*codes.shape[:-1], _n_groups(n, G))
        if scale.shape != want:
            raise ValueError(
                f"scale has shape {scale.shape}, expected {want} for group_size={G} (codes {codes.shape})"
            )
    elif not _broadcasts_to(scale.shape, codes.shape):
        raise ValueError(
            f"scale of shape {scale.shape} does not broadcast to codes {codes.shape}; "
            "pass group_size for per-group scales"
        )
    if zero_point is None:
        z = np.zeros(scale.shape, dtype=np.int32)  # symmetric: z = 0
    else:
        z = np.asarray(zero_point)
        if z.dtype.kind not in "ui" or z.shape != scale.shape:
            raise ValueError(
                f"zero_point must be integers shaped like scale {scale.shape}, got {z.dtype} {z.shape}"
            )
    wdt = _working_dtype(scale.dtype)
    s = scale.astype(wdt)  # (..., k)
    q_minus_z = codes.astype(np.int32) - _per_element(z.astype(np.int32), n, G)  # (..., n) exact
    values = q_minus_z.astype(wdt) * _per_element(s, n, G)  # (..., n)  one rounding
    if wdt == np.float64 and out_dtype.itemsize < 4:
        values = values.astype(np.float32)  # float64 -> 16 bits through float32, as torch does
    with np.errstate(over="ignore"):  # beyond a narrow dtype's range -> +-Inf, as in torch
        return values.astype(out_dtype)


def quantize(
    x: np.ndarray,
    bits: int = 8,
    *,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
    clip_ratio: float = 1.0,
    scale: np.ndarray | None = None,
    zero_point: np.ndarray | None = None,
) -> np.ndarray:
    """Fake quantization: ``decode(*encode(x, ...), dtype=x.dtype)``, values in x's dtype.

    The value (q - z) · s is computed in the working precision and rounded once to x's dtype.
    """
    x = np.asarray(x)
    codes, s, z = encode(
        x,
        bits,
        symmetric=symmetric,
        granularity=granularity,
        group_size=group_size,
        clip_ratio=clip_ratio,
        scale=scale,
        zero_point=zero_point,
    )
    G = group_size if granularity == "group" else None
    return decode(codes, s, z, group_size=G, dtype=x.dtype)
