"""LLM-FP4 (FPQ): floating-point quantization with a real-valued exponent bias — the reference.

Paper: Shih-yang Liu, Zechun Liu, Xijie Huang, Pingcheng Dong, Kwang-Ting Cheng, "LLM-FP4: 4-Bit
Floating-Point Quantized Transformers", EMNLP 2023, arXiv:2310.16836. Official code:
github.com/nbasyl/LLM-FP4 (``quant_layers/fp_linear.py``), whose defaults and fixed bugs the
docstrings below name.

An FP format has a sign, E exponent bits and M mantissa bits and, in LLM-FP4, *no* reserved code
(``FPFormat(E, M, specials="none")``). Its exponent bias ``b`` is a real number that plays the role
of a scale (paper section 3, the FP quantization process: clip, scale, compare/round):

    Qmax(b) = (2 - 2^-M) * 2^(2^E - 1 - b)                          (``max_from_bias``)
    b       = 2^E - log2(Qmax) + log2(2 - 2^-M) - 1                 (its inverse, ``bias_from_max``)
    xc      = clamp(x, -Qmax, Qmax)                                  (clip)
    p       = max(floor(log2|xc| + b), 1)                            (binade; zeros land in p = 1)
    step    = 2^(p - M - b)                                          (scale)
    xq      = round(xc / step) * step,  round half to even           (compare / round)

Because every quantity above only involves ``x * 2^b``, the quantizer is ``Q_b(x) = 2^-b Q_0(x 2^b)``
with ``Q_0`` the integer-bias-0 quantizer. That identity drives everything here:

* the exponent ``floor(log2|y|)`` of ``y = x 2^b`` is read with ``frexp`` (exact at powers of two,
  where a float ``log2`` can land one binade off);
* a real bias is *realised* as the float32 multiplier of its fractional part:
  ``2^b = 2^floor(b) * fl32(2^frac(b))`` and ``2^-b = 2^-floor(b) * fl32(2^-frac(b))``.
  For an integer b both are exact powers of two, so at ``b = fmt.bias`` the quantizer equals
  ``lowbit.reference.formats.quantize(x, fmt)`` bit for bit (same grid, same tie rule). For a real b
  the float32 rounding of 2^frac(b) is the only approximation (relative 2^-24, as in any kernel
  that stores its scale in float32), and it makes NumPy, torch and Triton agree bit for bit:
  products of a float32 input with a float32 multiplier are exact in float64;
* ``Q_{b+k}(x) = 2^-k Q_b(2^k x)`` for integer k: the pre-shifted bias (paper section 4.2).

Public functions

* ``max_from_bias(bias, fmt)`` / ``bias_from_max(maxval, fmt)``: the clip max Qmax(b) of section 3
  and its inverse.
* ``quantize(x, fmt, bias=None)``: fake quantization, bias scalar or broadcastable array.
* ``encode(x, fmt, bias=None)`` / ``decode(codes, fmt, bias=None)``: FP codes (sign | exponent |
  mantissa) whose value is the quantized value; ``decode(encode(x)) == quantize(x)``.
* ``linear(x, w, a_fmt, a_bias, w_fmt, w_bias, b=None)``: the simulated quantized layer
  ``Q(X) Q(W)^T + b`` (the search objective's forward).
* ``preshift(a_bias, fmt, tensor_bias=None)``: per-channel activation biases -> the pre-shifted
  form ``t + k_c`` (real tensor bias t, integer shifts k_c in [0, 2^E - 1]).
* ``fold_preshift(w_bias, shifts)``: folds the shifts into the weights' exponent biases.
* ``search(x, w, b=None, ...)``: the joint format / bias search (FPQ baseline and FPQ).

Deviations from the official code, and why

* Zero rows / channels / tensors: the code sets b = +inf and returns NaN. Here ``bias_from_max``
  floors the max at ``MAXVAL_FLOOR`` = 2^-126 (the smallest normal float32), so the bias stays
  finite and an all-zero channel quantizes to zeros.
* ``search``: all k + 1 candidates are scored (the code's ``range(0, eq_n, ...)`` never scores the
  last one, factor 1.2), and the current bias and the min-max bias b0 itself (factor 1, which the
  default grid 0.01 + 0.0119 i never hits) stay candidates, so a search step never makes the layer
  worse and planted exact answers stay reachable (the code can drift away from both). Each bias step
  quantizes the other tensor with its latest searched biases (the code: those committed at its last
  format step, see ``search``). The 8-bit format search uses
  E = bits - 1 - M for the candidate actually scored (the code drops the +2 mantissa offset in
  ``_search_best_a_format`` and the baseline's ``_search_best_w_format``).
* Search direction: by default a candidate is ``factor * b0`` (the code multiplies the *bias*,
  ``search_space="bias"``), so the clip max becomes ``maxval * 2^((1 - factor) * b0)`` and which
  factors clip depends on the sign of b0. ``search_space="max"`` scales the *max* instead
  (candidate max ``factor * maxval``, what the paper's text describes), which clips for every
  factor < 1 regardless of the sign of b0.
* Folding (section 4.2 of the paper; the code only simulates it): ``fold_preshift`` adds the
  activation shift k_c to the exponent bias of weight column c. Re-reading the same FP codes with
  bias ``b_o + k_c`` multiplies them by exactly 2^-k_c, so the folded layer's products are the
  simulated layer's products bit for bit (see ``fold_preshift`` for the condition).

Not implemented: the embedding-table quantizer (the "E" of the paper's E/W/A
bit-widths) and quantization-error propagation through earlier layers during calibration; the
report's FPQ rows quantize the linear layers' weights and inputs (W/A) only, and say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lowbit.reference.formats import FPFormat, _check_code_range

__all__ = [
    "MAXVAL_FLOOR",
    "FPQSearchResult",
    "default_formats",
    "max_from_bias",
    "bias_from_max",
    "quantize",
    "encode",
    "decode",
    "linear",
    "preshift",
    "fold_preshift",
    "search",
]

# Smallest clip max a bias is derived from: keeps zero rows/channels finite (the code gives NaN).
MAXVAL_FLOOR = 2.0**-126
# Real biases are accepted in this range: 2^b stays far inside float64 and every float32 input
# times 2^b is exact.
_BIAS_LIMIT = 600.0


# ---- formats -----------------------------------------------------------------------------------


def _check_format(fmt: Any, name: str = "fmt") -> FPFormat:
    """LLM-FP4 formats: signed ExMy with every code a finite number (no reserved Inf/NaN)."""
    if not isinstance(fmt, FPFormat):
        raise ValueError(
            f"{name}={fmt!r} is not an FPFormat: pass e.g. FPFormat(2, 1) (E2M1, LLM-FP4 reserves no code)"
        )
    if fmt.specials != "none" or not fmt.signed or not fmt.subnormals:
        raise ValueError(
            f"{name}={fmt.name} is not an LLM-FP4 format: use FPFormat({fmt.ebits}, {fmt.mbits}) "
            "(signed, with subnormals, specials='none': the all-ones exponent is a normal binade)"
        )
    if fmt.ebits > 7:
        raise ValueError(f"{name}={fmt.name}: LLM-FP4 formats need ebits <= 7 so 2^b fits float32")
    return fmt


def default_formats(bits: int) -> list[FPFormat]:
    """The official code's format candidates: E3M0/E2M1/E1M2 at 4 bits, E5M2..E1M6 at 8 bits
    (E7M0, E6M1 excluded); any other width: every split with 1 <= E <= 7."""
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is invalid: use 2..16 bits (sign included)")
    if bits == 4:
        mantissas = [0, 1, 2]
    elif bits == 8:
        mantissas = [2, 3, 4, 5, 6]
    else:
        mantissas = [m for m in range(bits - 1) if 1 <= bits - 1 - m <= 7]
    return [FPFormat(bits - 1 - m, m) for m in mantissas]


def _qmax0(fmt: FPFormat) -> float:
    """Largest magnitude at bias 0: (2 - 2^-M) 2^(2^E - 1) (the all-ones exponent is a binade)."""
    return (2.0 - 2.0**-fmt.mbits) * 2.0 ** (2**fmt.ebits - 1)


def _check_bias(bias: Any) -> np.ndarray:
    b = np.asarray(bias, dtype=np.float64)
    if not np.all(np.isfinite(b)) or np.any(np.abs(b) > _BIAS_LIMIT):
        raise ValueError(
            f"bias must be finite with |bias| <= {_BIAS_LIMIT:g}: derive it with bias_from_max(maxval, fmt)"
        )
    return b


def _check_bias_shape(bias_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> None:
    """The bias must broadcast to x's shape (the result keeps x's shape). Pure Python: the fast
    path calls it with torch shapes, so both sides raise the same message."""
    bias_shape, x_shape = tuple(bias_shape), tuple(x_shape)
    try:
        ok = np.broadcast_shapes(x_shape, bias_shape) == x_shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"bias of shape {bias_shape} does not broadcast to x's shape {x_shape}: use a scalar, "
            "(rows, 1) per row, (cols,) per column, or x's shape"
        )


def _check_layer_bias(b_shape: tuple[int, ...], out_features: int) -> None:
    """The layer bias b of ``linear`` is one value per output feature."""
    if tuple(b_shape) != (out_features,):
        raise ValueError(
            f"b has shape {tuple(b_shape)} but the layer has {out_features} outputs: pass b of shape ({out_features},) or None"
        )


def _bias_scales(bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2^b and 2^-b as realised by every path: 2^floor(b) times the float32-rounded 2^frac(b)."""
    b_int = np.floor(bias)  # integer part
    b_frac = bias - b_int  # in [0, 1), exact
    scale = np.ldexp(np.exp2(b_frac).astype(np.float32).astype(np.float64), b_int.astype(np.int64))
    scale_inv = np.ldexp(
        np.exp2(-b_frac).astype(np.float32).astype(np.float64), -b_int.astype(np.int64)
    )
    return scale, scale_inv


def max_from_bias(bias: Any, fmt: FPFormat) -> np.ndarray:
    """Paper section 3 (FP quantization process): the clip max
    Qmax(b) = (2 - 2^-M) 2^(2^E - 1 - b), as the quantizer realises it
    (``quantize(+inf, fmt, b) == max_from_bias(b, fmt)``). Returns float64, bias's shape."""
    fmt = _check_format(fmt)
    b = _check_bias(bias)
    _, scale_inv = _bias_scales(b)  # 2^-b
    return _qmax0(fmt) * scale_inv


def bias_from_max(maxval: Any, fmt: FPFormat) -> np.ndarray:
    """Inverse of the clip max of paper section 3, the min-max initialisation of section 4.1:
    b = 2^E - 1 - log2(Qmax / (2 - 2^-M)) (= 2^E - log2(Qmax) + log2(2 - 2^-M) - 1, as the
    official code writes it). Exact when Qmax/(2 - 2^-M) is a power of two (integer
    b); otherwise max_from_bias(bias_from_max(m)) == m to float32 precision of 2^frac(b).
    maxval <= MAXVAL_FLOOR (zero rows) is floored there, so the bias stays finite."""
    fmt = _check_format(fmt)
    m = np.asarray(maxval, dtype=np.float64)
    if np.any(np.isnan(m)) or np.any(np.isinf(m)):
        raise ValueError("maxval must be finite: remove NaN/Inf from the calibration data")
    m = np.maximum(np.abs(m), MAXVAL_FLOOR)
    b = (2**fmt.ebits - 1) - np.log2(m / (2.0 - 2.0**-fmt.mbits))
    return b


# ---- the quantizer -------------------------------------------------------------------------------


def _as_float(x: Any) -> tuple[np.ndarray, np.dtype]:
    x = np.asarray(x)
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
        raise ValueError(f"cannot quantize an array of dtype {x.dtype}: pass floating-point values")
    return x.astype(np.float64), x.dtype


def _round_scaled(x64: np.ndarray, fmt: FPFormat, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clip, binade, step, round — in units of 2^-b. Returns (q, 2^-b): xq = q * 2^-b."""
    M = fmt.mbits
    scale, scale_inv = _bias_scales(b)  # 2^b, 2^-b (broadcast to x)
    y = x64 * scale  # x 2^b: exact for float32 x (24-bit times 24-bit significands)
    Qmax0 = _qmax0(fmt)  # = Qmax(b) * 2^b
    yc = np.clip(y, -Qmax0, Qmax0)  # 1. xc = clamp(x, -Qmax, Qmax)
    _, e = np.frexp(np.abs(yc))  # |yc| = f 2^e, f in [0.5, 1): floor(log2|yc|) = e - 1, exactly
    p = np.maximum(e - 1, 1)  # 2. p = max(floor(log2|x| + b), 1); frexp(0) gives e = 0 -> p = 1
    step = np.ldexp(1.0, p - M)  # 3. step = 2^(p - M - b), in units of 2^-b
    q = np.rint(yc / step) * step  # 4. round half to even (yc / step is exact)
    return q, scale_inv


def quantize(x: np.ndarray, fmt: FPFormat, bias: Any = None) -> np.ndarray:
    """Fake-quantize ``x`` to ``fmt`` with real exponent bias ``bias`` (default: ``fmt.bias``):
    clip, binade, step, round of paper section 3 (FP quantization process).

    ``bias`` is a scalar or any array that broadcasts against ``x``: per tensor (scalar), per
    output channel of a weight (``(out, 1)``), per input channel of an activation (``(in,)``), per
    token (``(tokens, 1)``). Returns x's dtype; float16/bfloat16 results are rounded through
    float32 (as kernels do). NaN propagates; +-Inf saturates to +-Qmax(b).
    """
    fmt = _check_format(fmt)
    x64, dtype = _as_float(x)
    b = _check_bias(fmt.bias if bias is None else bias)
    _check_bias_shape(b.shape, x64.shape)
    q, scale_inv = _round_scaled(x64, fmt, b)
    xq = q * scale_inv  # back to x's units: exact in float64 (<= 8-bit times 24-bit significands)
    if dtype == np.float64:
        return xq
    with np.errstate(over="ignore"):  # beyond the dtype's range (huge negative biases) -> +-inf
        return xq.astype(np.float32).astype(dtype)


def encode(x: np.ndarray, fmt: FPFormat, bias: Any = None) -> np.ndarray:
    """FP codes (sign | exponent field | mantissa field; uint8 up to 8 bits, else uint16) of
    ``quantize(x, fmt, bias)``, the FP variable of paper section 3 (formulation of FP variables). The exponent field of a normal value is the binade p of the
    quantizer; field 0 holds the subnormals (``d * 2^(1 - M - b)``). NaN has no code: ValueError."""
    fmt = _check_format(fmt)
    x64, _ = _as_float(x)
    if np.isnan(x64).any():
        raise ValueError(
            f"{int(np.isnan(x64).sum())} NaN value(s) cannot be encoded: LLM-FP4 formats have no NaN code"
        )
    b = _check_bias(fmt.bias if bias is None else bias)
    _check_bias_shape(b.shape, x64.shape)
    q, _ = _round_scaled(x64, fmt, b)
    q = np.broadcast_to(q, np.broadcast_shapes(x64.shape, b.shape))
    M = fmt.mbits
    sign = np.signbit(q).astype(np.int64)
    a = np.abs(q)  # on the bias-0 grid: subnormal step 2^(1 - M), normal binades [2^p, 2^(p+1))
    _, e = np.frexp(a)
    normal = a >= 2.0  # 2^1 is the smallest normal at bias 0
    field = np.where(normal, e - 1, 0)
    mantissa = np.where(normal, np.ldexp(a, M - (e - 1)) - 2**M, np.ldexp(a, M - 1))
    code = (sign << (fmt.ebits + M)) | (field << M) | mantissa.astype(np.int64)
    return code.astype(np.uint8 if fmt.bits <= 8 else np.uint16)


def decode(codes: np.ndarray, fmt: FPFormat, bias: Any = None) -> np.ndarray:
    """Values (float32) of FP codes read with real exponent bias ``bias`` (default ``fmt.bias``):
    ``(-1)^s (2^M + mantissa) 2^(field - M - b)``, or ``(-1)^s mantissa 2^(1 - M - b)`` for field 0.
    Reading a code with bias ``b + k`` gives exactly 2^-k times its value at bias b (paper
    section 3, formulation of FP variables; the re-reading is section 4.2's reparameterisation)."""
    fmt = _check_format(fmt)
    c = np.asarray(codes)
    if c.dtype.kind not in "ui":
        raise ValueError(f"codes must be an integer array, got {c.dtype}")
    _check_code_range(c, fmt)
    c = c.astype(np.int64)
    b = _check_bias(fmt.bias if bias is None else bias)
    _check_bias_shape(b.shape, c.shape)
    M = fmt.mbits
    sign = (c >> (fmt.ebits + M)) & 1
    field = (c >> M) & (2**fmt.ebits - 1)
    mantissa = c & (2**M - 1)
    a = np.where(
        field > 0,
        np.ldexp((2**M + mantissa).astype(np.float64), field - M),
        np.ldexp(mantissa.astype(np.float64), 1 - M),
    )
    _, scale_inv = _bias_scales(b)
    value = np.where(sign == 1, -a, a) * scale_inv
    with np.errstate(over="ignore"):  # beyond float32 (huge negative biases) reads as +-inf
        return value.astype(np.float32)


# ---- the layer -------------------------------------------------------------------------------------


def _per_output_channel(wb: Any, out_features: int) -> Any:
    """A weight bias given per output channel ``(out,)`` becomes ``(out, 1)`` to broadcast on W.
    ``wb`` is an array (NumPy here, torch in the fast path: only .ndim, .shape and indexing)."""
    if wb.ndim == 1:
        if wb.shape[0] != out_features:
            raise ValueError(
                f"w_bias has {wb.shape[0]} entries but W has {out_features} rows: pass one per output channel"
            )
        return wb[:, None]
    return wb


def linear(
    x: np.ndarray,
    w: np.ndarray,
    a_fmt: FPFormat,
    a_bias: Any,
    w_fmt: FPFormat,
    w_bias: Any,
    b: np.ndarray | None = None,
) -> np.ndarray:
    """The simulated quantized layer Y = Q(X; a_bias) Q(W; w_bias)^T + b, in float64: the
    forward whose output MSE the search of paper section 4.1 minimises.

    x: (tokens, in); w: (out, in). a_bias: scalar, (in,) per input channel, or (tokens, 1) per
    token. w_bias: scalar, (out,) per output channel, or (out, in) per element (folded shifts).
    """
    x = np.asarray(x)
    w = np.asarray(w)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"linear needs x (tokens, in) and w (out, in) with the same in: got {x.shape} and {w.shape}"
        )
    if b is not None:
        _check_layer_bias(np.shape(b), w.shape[0])
    Xq = quantize(x, a_fmt, a_bias).astype(np.float64)  # (tokens, in)
    Wq = quantize(
        w, w_fmt, _per_output_channel(np.asarray(w_bias, dtype=np.float64), w.shape[0])
    ).astype(np.float64)  # (out, in)
    Y = Xq @ Wq.T  # (tokens, out)
    if b is not None:
        Y = Y + np.asarray(b, dtype=np.float64)
    return Y


# ---- pre-shifted exponent bias (paper section 4.2) -------------------------------------------------


def preshift(
    a_bias: np.ndarray, fmt: FPFormat, tensor_bias: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Paper section 4.2 (pre-shifted exponent bias): per-channel activation biases
    b_c -> (t, k): a real tensor bias t and integer shifts
    k_c = clamp(round(b_c), round(t), round(t) + 2^E - 1) - round(t) in [0, 2^E - 1].

    Channel c is then quantized with bias t + k_c (the official code's ``b_eff,c``). ``t``
    defaults to min_c b_c (the channel with the largest range). Returns (t as a 0-d float64
    array, k as int64 (in,)). Rounding is half to even, like ``torch.round``.
    """
    fmt = _check_format(fmt)
    b_c = _check_bias(a_bias)  # (in,)
    if b_c.ndim != 1 or b_c.size == 0:
        raise ValueError(
            f"a_bias must be a non-empty vector of per-channel biases, got shape {b_c.shape}"
        )
    t = np.min(b_c) if tensor_bias is None else _check_bias(tensor_bias)
    if np.ndim(t) != 0:
        raise ValueError("tensor_bias must be a scalar")
    z = np.rint(t)  # zero point: round(t)
    k = np.clip(np.rint(b_c), z, z + 2**fmt.ebits - 1) - z  # (in,) integers in [0, 2^E - 1]
    return np.asarray(t, dtype=np.float64), k.astype(np.int64)


def fold_preshift(w_bias: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Paper section 4.2 (reparameterisation into the weights): fold activation shifts k_c into
    the weights' exponent biases: (out, in) = b_o + k_c.

    With activation codes written at bias t + k_c and read at the tensor bias t (values 2^k_c
    times the simulated ones), and weight codes written at b_o and read at b_o + k_c (values
    exactly 2^-k_c times), every product X[:, c] W[o, c] equals the simulated layer's product
    bit for bit, so the same GEMM gives the same output. Condition: the 2^(+-k_c) rescaled values
    neither overflow nor leave the normal range of the working float type (always true for
    float32 and E <= 5). Re-encoding the folded weights into a *per-row* bias format instead
    is exact only if every 2^-k_c W[o, c] is on the row's grid (the exponent field must absorb the
    shift: field > k_c, or the shifted-out mantissa bits are zero).
    """
    b_o = np.asarray(w_bias, dtype=np.float64)  # (out,)
    k = np.asarray(shifts)
    if b_o.ndim != 1 or k.ndim != 1:
        raise ValueError(
            f"fold_preshift needs w_bias (out,) and shifts (in,), got {b_o.shape} and {k.shape}"
        )
    if k.dtype.kind not in "iu" and not np.all(k == np.rint(k)):
        raise ValueError("shifts must be integers (the k_c of preshift)")
    return b_o[:, None] + k.astype(np.float64)[None, :]  # (out, in)


# ---- the search (paper section 4.1) -----------------------------------------------------------------


@dataclass(frozen=True)
class FPQSearchResult:
    """What ``search`` chose. Arrays are NumPy in the reference, torch tensors in the fast path.

    w_bias: (out,) per output channel. a_bias: the bias each input channel is quantized with:
    0-d (per tensor) or (in,) = a_tensor_bias + a_shift (pre-shifted). mse: final layer-output MSE.
    """

    w_format: FPFormat
    a_format: FPFormat
    w_bias: Any
    a_bias: Any
    a_tensor_bias: Any
    a_shift: Any
    mse: float


def _check_search_args(
    x, w, wbits, abits, gamma1, gamma2, n_candidates, rounds, search_space
) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or x.shape[0] == 0:
        raise ValueError(
            f"search needs x (tokens > 0, in) and w (out, in): got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if x.shape[1] == 0 or w.shape[0] == 0:
        raise ValueError(
            f"search needs in > 0 and out > 0 (nothing to quantize): got x {tuple(x.shape)}, w {tuple(w.shape)}"
        )
    if not 0 < gamma1 < gamma2:
        raise ValueError(f"need 0 < gamma1 < gamma2, got gamma1={gamma1}, gamma2={gamma2}")
    if int(n_candidates) < 1 or int(rounds) < 1:
        raise ValueError("n_candidates and rounds must be >= 1")
    if search_space not in ("bias", "max"):
        raise ValueError(
            f"search_space={search_space!r} is invalid: use 'bias' (the code) or 'max' (the paper)"
        )


def _candidates(b0: Any, factors: Any, log2_factors: Any, search_space: str) -> Any:
    """(n, *b0.shape) candidate biases: factor * b0 ('bias') or the bias of factor * Qmax ('max').
    Plain array arithmetic (NumPy here, torch in the fast path); ``log2_factors = log2(factors)``."""
    shape = (-1,) + (1,) * b0.ndim
    if search_space == "bias":
        return factors.reshape(shape) * b0[None]
    # bias_from_max(f * max_from_bias(b0)) without the float32 detour
    return b0[None] - log2_factors.reshape(shape)


def _mse(y_fp: np.ndarray, y: np.ndarray, axis=None) -> np.ndarray:
    return np.mean((y_fp - y) ** 2, axis=axis)


def search(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    wbits: int = 4,
    abits: int = 4,
    preshifted: bool = False,
    gamma1: float = 0.01,
    gamma2: float = 1.2,
    n_candidates: int = 100,
    rounds: int = 3,
    search_space: str = "bias",
    w_formats: list[FPFormat] | None = None,
    a_formats: list[FPFormat] | None = None,
) -> FPQSearchResult:
    """Joint search of formats and exponent biases for one linear layer: paper section 4.1 (joint
    format and max value search), with section 4.2's pre-shifted bias when ``preshifted``.

    x: (tokens, in) calibration inputs, w: (out, in), b: (out,) or None. Objective: the MSE of the
    layer output against the full-precision output ``x w^T + b``. Candidate factors
    gamma1 + i (gamma2 - gamma1) / n_candidates, i = 0..n_candidates (all scored), times the
    min-max bias b0 (``search_space="bias"``, the code) or times the max (``"max"``). Weights:
    one bias per output channel (each picked by its own output column's MSE); activations: one
    bias per tensor, or (``preshifted=True``, FPQ) the tensor part t of the pre-shifted per-channel
    bias, with the integer shifts fixed from the per-channel min-max biases. Formats: one per
    tensor from ``w_formats`` / ``a_formats`` (default ``default_formats(bits)``), starting from
    the one with M closest to (bits - 1) / 2 rounded down (E2M1 at 4 bits, E4M3 at 8).

    Each format keeps its own biases (the code's ``w_intervals[m]`` / ``a_intervals[m]``), and
    every bias step tunes **every** candidate format, as the code's ``_search_best_w_interval``
    and ``_search_best_a_interval`` do (they loop over all mantissa widths): the weight-bias step
    tunes each weight format's per-channel biases with X quantized by the current activation
    format and bias; the activation-bias step tunes each activation format's bias with W
    quantized by the current weight format and its biases. A format step then compares the
    *searched* biases of every candidate format, as the official code's interval searches do
    (they loop over every mantissa width). Order per round (the official code's): baseline
    w-bias, w-format,
    a-bias, a-format; FPQ w-bias, a-bias, w-format, a-format. The candidate list of every bias
    step is [current, b0, grid]; the first of equal errors wins, so a step never moves away from
    an equally good current bias.

    "Current" means the latest searched biases of the current formats. The code instead quantizes
    the other tensor with the parameters committed at its last *format* step (``self.w_interval``
    / ``self.a_interval`` are only reassigned there), so in its FPQ order the activation-bias step
    and the weight-format step see the other tensor's biases of the previous round (min-max in
    the first round); here they see the ones searched just before. The baseline order is the
    same in both.

    This is coordinate descent: every step is an exact minimisation over its candidates, so the
    result is never worse than the min-max start, but a joint search over 3 x 3 formats is not
    guaranteed to reach the best of the nine single-format searches (it can settle at another
    fixed point of the bias steps).
    """
    x = np.asarray(x, dtype=np.float64)  # (tokens, in)
    w = np.asarray(w, dtype=np.float64)  # (out, in)
    _check_search_args(x, w, wbits, abits, gamma1, gamma2, n_candidates, rounds, search_space)
    if b is not None:
        _check_layer_bias(np.shape(b), w.shape[0])
    wfmts = [_check_format(f, "w_formats[i]") for f in (w_formats or default_formats(wbits))]
    afmts = [_check_format(f, "a_formats[i]") for f in (a_formats or default_formats(abits))]
    bias_vec = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
    y_fp = x @ w.T + bias_vec  # (tokens, out) full-precision target
    factors = (
        gamma1 + np.arange(n_candidates + 1) * (gamma2 - gamma1) / n_candidates
    )  # k + 1 values
    log2_factors = np.log2(factors)

    # Min-max initialisation per format (the code's _initialize_intervals).
    w_b0 = [bias_from_max(np.max(np.abs(w), axis=1), f) for f in wfmts]  # (out,) per format
    w_cur = [v.copy() for v in w_b0]
    if preshifted:
        a_b0c = [bias_from_max(np.max(np.abs(x), axis=0), f) for f in afmts]  # (in,) per channel
        a_b0 = [np.min(v) for v in a_b0c]  # tensor part t0 = min_c b_c
    else:
        a_b0 = [bias_from_max(np.max(np.abs(x)), f) for f in afmts]  # scalar per format
    a_cur = [np.asarray(v, dtype=np.float64) for v in a_b0]

    def a_effective(j: int, t: np.ndarray) -> np.ndarray:
        """Bias each input channel is quantized with: t, or t + k_c (pre-shifted)."""
        if not preshifted:
            return t
        t_out, k = preshift(a_b0c[j], afmts[j], tensor_bias=t)
        return t_out + k

    def output(iw: int, wb: np.ndarray, ia: int, ab: np.ndarray) -> np.ndarray:
        return linear(x, w, afmts[ia], a_effective(ia, ab), wfmts[iw], wb, bias_vec)

    iw = min(range(len(wfmts)), key=lambda i: abs(wfmts[i].mbits - (wbits - 1) // 2))
    ia = min(range(len(afmts)), key=lambda i: abs(afmts[i].mbits - (abits - 1) // 2))

    def search_w_bias() -> None:
        """Every weight format j: per output channel, the best of its candidates, with the
        activations quantized by the current activation format and bias (the code's
        ``_search_best_w_interval`` loops over every mantissa width)."""
        Xq = quantize(x, afmts[ia], a_effective(ia, a_cur[ia]))  # (tokens, in), fixed here
        for j, fmt in enumerate(wfmts):
            cands = np.concatenate(
                [
                    w_cur[j][None],
                    w_b0[j][None],
                    _candidates(w_b0[j], factors, log2_factors, search_space),
                ]
            )  # (n_cand, out): the current bias first, so it wins ties
            best_err = np.full(w.shape[0], np.inf)  # (out,)
            best = w_cur[j].copy()  # (out,)
            for cand in cands:  # (out,) one candidate bias per output channel
                Wq = quantize(w, fmt, cand[:, None])  # (out, in)
                err = _mse(y_fp, Xq @ Wq.T + bias_vec, axis=0)  # (out,) per output column
                better = err < best_err  # strict: the first of equal errors wins
                best = np.where(better, cand, best)
                best_err = np.where(better, err, best_err)
            w_cur[j] = best

    def search_a_bias() -> None:
        """Every activation format j: the best of its candidates for the tensor (part of the)
        bias, with the current weight format and its current biases (the code's
        ``_search_best_a_interval`` loops over every mantissa width)."""
        for j in range(len(afmts)):
            b0 = np.asarray(a_b0[j])
            cands = np.concatenate(
                [a_cur[j][None], b0[None], _candidates(b0, factors, log2_factors, search_space)]
            )  # (n_cand,)
            errs = [_mse(y_fp, output(iw, w_cur[iw], j, c)) for c in cands]
            a_cur[j] = cands[int(np.argmin(errs))]  # argmin: the first of equal errors wins

    def search_w_format() -> int:
        errs = [_mse(y_fp, output(j, w_cur[j], ia, a_cur[ia])) for j in range(len(wfmts))]
        return int(np.argmin(errs))

    def search_a_format() -> int:
        errs = [_mse(y_fp, output(iw, w_cur[iw], j, a_cur[j])) for j in range(len(afmts))]
        return int(np.argmin(errs))

    for _ in range(int(rounds)):
        if preshifted:
            search_w_bias()
            search_a_bias()
            iw = search_w_format()
            ia = search_a_format()
        else:
            search_w_bias()
            iw = search_w_format()
            search_a_bias()
            ia = search_a_format()

    a_eff = a_effective(ia, a_cur[ia])
    shift = preshift(a_b0c[ia], afmts[ia], tensor_bias=a_cur[ia])[1] if preshifted else None
    return FPQSearchResult(
        w_format=wfmts[iw],
        a_format=afmts[ia],
        w_bias=w_cur[iw],
        a_bias=np.asarray(a_eff, dtype=np.float64),
        a_tensor_bias=np.asarray(a_cur[ia], dtype=np.float64),
        a_shift=shift,
        mse=float(_mse(y_fp, output(iw, w_cur[iw], ia, a_cur[ia]))),
    )
