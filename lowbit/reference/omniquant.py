"""OmniQuant (Shao et al., ICLR 2024, arXiv 2308.13137) — reference, NumPy.

OmniQuant calibrates a quantized model one transformer block at a time, by gradient descent
on the block's output error, with two kinds of learnable parameters:

* **LWC**, learnable weight clipping (paper section 3.2): each weight row (or group of
  ``group_size`` inputs) gets two logits, gamma and beta; the quantizer's range is
  [sigmoid(beta) · min, sigmoid(gamma) · max] instead of [min, max].
* **LET**, learnable equivalent transformation (paper section 3.3): per-channel scales s (and
  shifts delta) that move activation outliers into the weights, X W^T + b =
  ((X - delta) / s) (W · diag(s))^T + (b + W delta), applied where the algebra is exact.

This module is the method step by step, so it can be read next to the paper: the quantizer
and its analytic gradients (the official code's autograd graph), the per-token activation
quantizer, the LET transformations, and hand-written Adam calibrations of one linear layer
and of one LLaMA MLP sub-block (gate, up, SwiGLU, down: the chain rule through two quantized
layers and the activation, ``let_mlp_loss_grad``).
``lowbit.fast.omniquant`` is the same in torch, plus the block-wise calibration of models.

The quantizer, exactly as the official code's ``UniformAffineQuantizer`` computes it (b bits,
one range per row or group; rint = round half to even):

* asymmetric (the default): x_max = sigmoid(gamma) · max(x), x_min = sigmoid(beta) · min(x);
  s = clamp((x_max - x_min) / (2^b - 1), 1e-5, 1e4); z = rint(clamp(-x_min / s, -1e4, 1e4));
  q = clamp(rint(x / s) + z, 0, 2^b - 1); x̂ = (q - z) · s. The range is not forced to include
  0 (unlike ``lowbit.reference.uniform``) and z is not clamped to [0, 2^b - 1].
* symmetric: s = clamp(max(|x_max|, |x_min|) / (2^(b-1) - 1), 1e-5, 1e4), z = 2^(b-1) - 1,
  the same q and x̂: the grid is [-(2^(b-1) - 1), 2^(b-1)] · s (one extra positive level).
* gamma = beta = None: no clipping (sigmoid = 1), plain min-max round to nearest.
* The scale clamp at 1e-5 is the code's zero guard: an all-zero row or group gets s = 1e-5,
  z = 0, codes z and values 0, never NaN.
* Groups: ``group_size`` consecutive inputs of a row. When it does not divide the row, the
  last group is shorter and its range comes from its own elements (the official code pads
  with zeros and then only allows the symmetric quantizer).

Gradients (``quantize_weight_grad``), the official graph's: the rounding x / s passes its
gradient straight through (STE), the clamp of q stops it for clipped elements, the zero
point's plain rint passes none. So gamma and beta receive gradient only through s, and w also
through the row (group) max and min that set the range, split evenly between tied maxima as
torch's ``amax`` does; ``max(|x_max|, |x_min|)`` splits a tie in half, as ``torch.max`` does.

Working precision: float32 for float16 / bfloat16 / float32 input, float64 for float64. The
clipping factors sigmoid(gamma), sigmoid(beta) are computed in float64 and rounded to float32
whatever the input (learned factors need no more, and NumPy's and torch's float64 exp differ
in the last bit now and then: rounded to float32, both sides agree bit for bit).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "CLIP_MIN",
    "CLIP_MAX",
    "LWC_INIT",
    "SCALE_FLOOR",
    "group_count",
    "encode_weight",
    "decode_weight",
    "quantize_weight",
    "quantize_weight_grad",
    "quantize_activation",
    "quantize_activation_grad",
    "truncate_scale",
    "smooth_scale",
    "let_norm_linears",
    "let_v_o",
    "let_q_k",
    "rotary_scale",
    "let_linear_loss_grad",
    "LinearCalibration",
    "calibrate_linear",
    "let_mlp_loss_grad",
    "MLPCalibration",
    "calibrate_mlp",
]

CLIP_MIN, CLIP_MAX = 1e-5, 1e4  # the scale clamp (and |z| <= 1e4) of the official quantizer
LWC_INIT = 4.0  # gamma = beta = 4: sigmoid(4) = 0.982, training starts at 98.2 % of min/max
SCALE_FLOOR = 1e-2  # LET scales with |s| below this are replaced by ±1e-2 before use
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


# ---------------------------------------------------------------------------------------------
# argument checks (the fast path raises the same messages)
# ---------------------------------------------------------------------------------------------


def _check_bits(bits, low: int = 2, high: int = 16) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"bits must be an int from {low} to {high}, got {bits!r}")
    if not low <= int(bits) <= high:
        raise ValueError(f"bits must be from {low} to {high}, got {bits}")
    return int(bits)


def _check_group_size(group_size, n: int) -> int:
    """The group length along the input dimension: ``n`` (one group per row) for None."""
    if group_size is None:
        return max(n, 1)
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be a positive int (e.g. 128) or None, got {group_size!r}")
    if int(group_size) < 1:
        raise ValueError(f"group_size must be a positive int (e.g. 128) or None, got {group_size}")
    return int(group_size)


def group_count(n: int, group_size: int | None) -> int:
    """Groups per row of ``n`` inputs: 1 per channel (``group_size=None``), else ceil(n / G)."""
    return 1 if group_size is None else -(-n // int(group_size))


def _working(x, name: str = "w") -> np.ndarray:
    """``x`` as a float32 / float64 array of at least 2 dimensions, finite."""
    x = np.asarray(x)
    if x.dtype.name not in _FLOAT_NAMES:
        raise ValueError(
            f"{name} must be floating point (float16/bfloat16/float32/float64), got {x.dtype}"
        )
    if x.ndim < 2:
        raise ValueError(f"{name} must be 2-D (rows, inputs) or more, got shape {x.shape}")
    wdt = np.float64 if x.dtype == np.float64 else np.float32
    x_w = x.astype(wdt)
    bad = int(np.count_nonzero(~np.isfinite(x_w)))
    if bad:
        raise ValueError(
            f"{name} has {bad} non-finite values; OmniQuant needs finite input (np.nan_to_num)"
        )
    return x_w


def _check_logits(logits, name: str, want: tuple) -> np.ndarray | None:
    if logits is None:
        return None
    g = np.asarray(logits)
    if g.dtype.kind != "f" or g.shape != want:
        raise ValueError(
            f"{name} must be a float array of shape {want} (rows, groups), got {g.dtype} {g.shape}"
        )
    if not np.all(np.isfinite(g)):
        raise ValueError(
            f"{name} must be finite: the LWC logits diverged (lower the LWC learning rate)"
        )
    return g


# ---------------------------------------------------------------------------------------------
# the quantizer, per row / group (paper section 3.2)
# ---------------------------------------------------------------------------------------------


def _grouped(x: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, n) -> (rows, n_groups, G) padded with NaN, and the mask of real elements."""
    rows, n = x.shape
    ng = max(-(-n // G), 1)
    padded = np.full((rows, ng * G), np.nan, dtype=x.dtype)
    padded[:, :n] = x
    return padded.reshape(rows, ng, G), ~np.isnan(padded.reshape(rows, ng, G))


def _ungrouped(v: np.ndarray, n: int) -> np.ndarray:
    return v.reshape(v.shape[0], -1)[:, :n]


def _sigmoid(logits: np.ndarray | None, wdt) -> np.ndarray | float:
    if logits is None:
        return wdt(1.0)
    # float64, then float32 (a 1-ulp float64 exp difference between libraries then vanishes);
    # exp(-g) overflowing to inf for very negative logits gives the right limit, 0
    with np.errstate(over="ignore"):
        return (
            (1.0 / (1.0 + np.exp(-logits.astype(np.float64))))
            .astype(np.float32)
            .astype(wdt)[..., None]
        )


@dataclass
class _Forward:
    """Every intermediate of one quantizer call, (rows, groups, G) or (rows, groups, 1)."""

    x: np.ndarray  # grouped input, NaN-padded
    real: np.ndarray  # mask of real (not padding) elements
    hi: np.ndarray  # max(x) per group
    lo: np.ndarray  # min(x) per group
    a: np.ndarray | float  # sigmoid(gamma)
    b: np.ndarray | float  # sigmoid(beta)
    s_raw: np.ndarray  # the scale before its clamp
    s: np.ndarray  # the scale
    z: np.ndarray  # the zero point (float, integer valued)
    r: np.ndarray  # rint(x / s)
    q: np.ndarray  # the code, clamp(r + z, 0, 2^b - 1)
    levels: int  # 2^b - 1
    symmetric: bool
    extra: dict = field(default_factory=dict)


def _forward(x: np.ndarray, bits: int, G: int, gamma, beta, symmetric: bool) -> _Forward:
    wdt = x.dtype.type
    xg, real = _grouped(x, G)  # (rows, groups, G)
    with np.errstate(invalid="ignore"):
        hi = np.nanmax(xg, axis=-1, keepdims=True)  # (rows, groups, 1)
        lo = np.nanmin(xg, axis=-1, keepdims=True)
    a, b = _sigmoid(gamma, wdt), _sigmoid(beta, wdt)
    x_max = a * hi  # sigmoid(gamma) · max
    x_min = b * lo  # sigmoid(beta) · min
    levels = 2**bits - 1
    if symmetric:
        half = wdt(2 ** (bits - 1) - 1)
        s_raw = np.maximum(np.abs(x_max), np.abs(x_min)) / half
        z = np.full_like(s_raw, half)  # the fixed zero point 2^(b-1) - 1
    else:
        s_raw = (x_max - x_min) / wdt(levels)
    s = np.clip(s_raw, wdt(CLIP_MIN), wdt(CLIP_MAX))  # the code's zero guard
    if not symmetric:
        z = np.rint(np.clip(-x_min / s, wdt(-1e4), wdt(1e4)))  # plain rint: no gradient
    with np.errstate(invalid="ignore"):
        r = np.rint(xg / s)  # round_ste(x / s)
    q = np.clip(r + z, 0, levels)
    return _Forward(xg, real, hi, lo, a, b, s_raw, s, z, r, q, levels, symmetric)


def _prepare(w, bits, group_size, gamma, beta, symmetric):
    bits = _check_bits(bits)
    if not isinstance(symmetric, (bool, np.bool_)):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    x = _working(w)
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    G = _check_group_size(group_size, x.shape[1])
    want = (*lead, group_count(x.shape[1], group_size))
    g = _check_logits(gamma, "gamma", want)
    bt = _check_logits(beta, "beta", want)
    flat = (x.shape[0], want[-1])
    g = None if g is None else g.reshape(flat)
    bt = None if bt is None else bt.reshape(flat)
    return x, bits, G, g, bt, bool(symmetric), lead


def encode_weight(
    w: np.ndarray,
    bits: int = 4,
    group_size: int | None = None,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    symmetric: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The integer form of ``quantize_weight``: ``(codes, scale, zero_point)``.

    codes (rows, n) uint8 (bits <= 8) or int32, in [0, 2^b - 1]; scale (rows, n_groups) in the
    working precision; zero_point (rows, n_groups) int32 (in [-1e4, 1e4]: not clamped to the
    code range, as in the official code). ``decode_weight`` gives back ``quantize_weight``.
    """
    x, bits, G, g, bt, symmetric, lead = _prepare(w, bits, group_size, gamma, beta, symmetric)
    f = _forward(x, bits, G, g, bt, symmetric)
    codes = _ungrouped(np.where(f.real, f.q, 0), x.shape[1])
    dtype = np.uint8 if bits <= 8 else np.int32
    return (
        codes.astype(dtype).reshape(*lead, x.shape[1]),
        f.s[..., 0].reshape(*lead, -1),
        f.z[..., 0].astype(np.int32).reshape(*lead, -1),
    )


def decode_weight(
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    group_size: int | None = None,
    dtype=None,
) -> np.ndarray:
    """x̂ = (q - z) · s per group, in the scale's precision (returned as ``dtype``, default it)."""
    codes, scale, zp = np.asarray(codes), np.asarray(scale), np.asarray(zero_point)
    if codes.dtype.kind not in "ui" or zp.dtype.kind not in "ui":
        raise ValueError(
            f"codes and zero_point must be integers (from encode_weight), got {codes.dtype}, {zp.dtype}"
        )
    n = codes.shape[-1]
    want = (*codes.shape[:-1], group_count(n, group_size))
    if scale.shape != want or zp.shape != want:
        raise ValueError(
            f"scale and zero_point must have shape {want} for group_size={group_size}, got {scale.shape}, {zp.shape}"
        )
    G = _check_group_size(group_size, n)
    rep = lambda v: np.repeat(v, G, axis=-1)[..., :n]  # noqa: E731  (per group -> per element)
    values = (codes.astype(np.int64) - rep(zp.astype(np.int64))).astype(scale.dtype) * rep(scale)
    return values if dtype is None else values.astype(dtype)


def quantize_weight(
    w: np.ndarray,
    bits: int = 4,
    group_size: int | None = None,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    symmetric: bool = False,
) -> np.ndarray:
    """LWC fake quantization of a weight (rows, n) (paper section 3.2): x̂ = (q - z) · s with
    the range [sigmoid(beta) · min, sigmoid(gamma) · max] of each row or group.

    ``gamma``, ``beta``: logits of shape (rows, n_groups), n_groups = 1 per channel
    (``group_size=None``) or ceil(n / group_size); None means no clipping. Returns x̂ in w's
    dtype (computed in the working precision, see the module docstring).
    """
    x, bits, G, g, bt, symmetric, lead = _prepare(w, bits, group_size, gamma, beta, symmetric)
    f = _forward(x, bits, G, g, bt, symmetric)
    values = _ungrouped((f.q - f.z) * f.s, x.shape[1])
    return values.reshape(*lead, x.shape[1]).astype(np.asarray(w).dtype)


def quantize_weight_grad(
    w: np.ndarray,
    bits: int = 4,
    group_size: int | None = None,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    symmetric: bool = False,
    *,
    grad_output: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Analytic gradients of ``quantize_weight`` for an upstream gradient ``grad_output``:
    ``(grad_w, grad_gamma, grad_beta)`` (None for a logit that is None), in the working
    precision. The official code's autograd graph; see the module docstring."""
    x, bits, G, g, bt, symmetric, lead = _prepare(w, bits, group_size, gamma, beta, symmetric)
    go = np.asarray(grad_output)
    if go.shape != np.asarray(w).shape:
        raise ValueError(f"grad_output must have w's shape {np.asarray(w).shape}, got {go.shape}")
    f = _forward(x, bits, G, g, bt, symmetric)
    gy, _ = _grouped(go.astype(x.dtype).reshape(x.shape), G)
    gy = np.where(f.real, gy, 0)
    inside = f.real & (f.r + f.z >= 0) & (f.r + f.z <= f.levels)  # clamp passes the gradient
    # x̂ = (clamp(rint_ste(x / s) + z) - z) · s
    grad_x = np.where(inside, gy, 0)  # through x / s: s · (1 / s)
    with np.errstate(invalid="ignore"):
        dxhat_ds = (f.q - f.z) - np.where(inside, f.x / f.s, 0)  # ∂x̂/∂s per element
    grad_s = np.sum(np.where(f.real, gy * dxhat_ds, 0), axis=-1, keepdims=True)
    grad_s_raw = np.where((f.s_raw >= CLIP_MIN) & (f.s_raw <= CLIP_MAX), grad_s, 0)
    x_max, x_min = f.a * f.hi, f.b * f.lo
    if symmetric:
        grad_absmax = grad_s_raw / (2 ** (bits - 1) - 1)
        share_hi = np.where(
            np.abs(x_max) > np.abs(x_min), 1.0, np.where(np.abs(x_max) == np.abs(x_min), 0.5, 0.0)
        )
        grad_x_max = grad_absmax * share_hi * np.sign(x_max)
        grad_x_min = grad_absmax * (1.0 - share_hi) * np.sign(x_min)
    else:
        grad_x_max = grad_s_raw / f.levels
        grad_x_min = -grad_s_raw / f.levels
    grad_gamma = None if g is None else (grad_x_max * f.hi * f.a * (1 - f.a))[..., 0]
    grad_beta = None if bt is None else (grad_x_min * f.lo * f.b * (1 - f.b))[..., 0]
    # the range: max and min pass their gradient to the elements that attain them (ties share)
    is_hi, is_lo = f.real & (f.x == f.hi), f.real & (f.x == f.lo)
    grad_x = grad_x + is_hi * (grad_x_max * f.a) / np.maximum(is_hi.sum(-1, keepdims=True), 1)
    grad_x = grad_x + is_lo * (grad_x_min * f.b) / np.maximum(is_lo.sum(-1, keepdims=True), 1)
    grad_w = _ungrouped(grad_x, x.shape[1]).reshape(*lead, x.shape[1]).astype(x.dtype)
    shape = (*lead, -1)
    return (
        grad_w,
        None if grad_gamma is None else grad_gamma.astype(x.dtype).reshape(shape),
        None if grad_beta is None else grad_beta.astype(x.dtype).reshape(shape),
    )


def quantize_activation(x: np.ndarray, bits: int = 8) -> np.ndarray:
    """Dynamic per-token asymmetric fake quantization of activations (..., d): each token's
    own [min, max] over its d features, no clipping; ``bits >= 16`` returns x unchanged (the
    official quantizer's early return)."""
    bits = _check_bits(bits, 2, 32)
    x = np.asarray(x)
    if bits >= 16:
        return x
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension (..., features), got a scalar")
    if x.size == 0:
        return x.copy()
    _working(x.reshape(-1, x.shape[-1]), "x")  # errors name x, not w
    return quantize_weight(x.reshape(-1, x.shape[-1]), bits).reshape(x.shape)


def quantize_activation_grad(
    x: np.ndarray, bits: int = 8, *, grad_output: np.ndarray
) -> np.ndarray:
    """The gradient of ``quantize_activation`` (the identity for ``bits >= 16``): STE inside the
    range, and the token's min and max carry the scale's gradient (the official graph)."""
    bits = _check_bits(bits, 2, 32)
    x = np.asarray(x)
    if bits >= 16:
        return np.asarray(grad_output).astype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    g = np.asarray(grad_output).reshape(rows.shape)
    return quantize_weight_grad(rows, bits, grad_output=g)[0].reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# LET: learnable equivalent transformation (paper section 3.3)
# ---------------------------------------------------------------------------------------------


def truncate_scale(scale: np.ndarray) -> np.ndarray:
    """|s| < 1e-2 -> sign(s) · 1e-2 (the official ``truncate_number``; its gradient passes
    straight through). An exact 0, where sign(0) = 0 would divide by zero, becomes +1e-2."""
    s = np.asarray(scale)
    floor = np.where(s < 0, -SCALE_FLOOR, SCALE_FLOOR).astype(s.dtype)
    return np.where(np.abs(s) < SCALE_FLOOR, floor, s)


def smooth_scale(act_absmax: np.ndarray, weight: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """SmoothQuant-style LET initialisation: s_j = max(max|X_j|^alpha / max_k|W_kj|^(1 - alpha),
    1e-5), with the input channel's activation absmax and the first linear's weight column."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    x_max = np.asarray(act_absmax, dtype=np.float64)
    w_max = np.abs(np.asarray(weight, dtype=np.float64)).max(axis=0)
    with np.errstate(divide="ignore"):
        s = x_max**alpha / np.maximum(w_max, 1e-30) ** (1.0 - alpha)
    return np.maximum(s, CLIP_MIN)


def let_norm_linears(norm_weight, norm_bias, weights, biases, scale, shift=None):
    """Norm -> linears: the norm emits (X - delta) / s and each following linear takes
    W · diag(s) and b + W delta, so their outputs are unchanged (exact when the norm's output
    feeds only these linears: LLaMA's pre-norms, not BERT's post-LayerNorm, whose output is
    also the residual stream).

    Returns ``(norm_weight', norm_bias', [W'], [b'])``; norm_bias' is None when the norm has no
    bias and the shift is None (an RMSNorm with a shift gets the bias -delta / s).
    """
    s = truncate_scale(scale)
    delta = None if shift is None else np.asarray(shift)
    gamma_n = np.asarray(norm_weight) / s
    if delta is None:
        beta_n = None if norm_bias is None else np.asarray(norm_bias) / s
    else:
        beta_n = ((0.0 if norm_bias is None else np.asarray(norm_bias)) - delta) / s
    new_w, new_b = [], []
    for w, b in zip(weights, biases):
        w = np.asarray(w)
        new_w.append(w * s[None, :])  # columns
        shifted = None if delta is None else w @ delta  # W delta, with the original W
        if b is None:
            new_b.append(shifted)
        else:
            new_b.append(np.asarray(b) if shifted is None else np.asarray(b) + shifted)
    return gamma_n, beta_n, new_w, new_b


def _per_query_channel(v: np.ndarray, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """A vector over the KV channels (num_kv_heads · d) repeated for the query heads that
    share each KV head (grouped-query attention: query head h reads KV head h // n_rep)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if v.shape[-1] % num_kv_heads:
        raise ValueError(f"{v.shape[-1]} KV channels do not split into {num_kv_heads} heads")
    heads = v.reshape(num_kv_heads, -1)
    return np.repeat(heads, num_heads // num_kv_heads, axis=0).reshape(-1)


def let_v_o(
    w_v, b_v, w_o, b_o, scale, shift=None, *, num_heads: int = 1, num_kv_heads: int | None = None
):
    """v -> o: V' = (V - delta) / s per value channel (W_v / s by rows, (b_v - delta) / s), and
    W_o · diag(s), b_o + W_o delta on o's inputs. Exact because each attention row sums to 1,
    so P V' = (P V - delta) / s. With grouped-query attention the KV channel's s and delta are
    repeated for every query head that reads it (the official code breaks on GQA).

    Returns ``(W_v', b_v', W_o', b_o')`` (b_v' is None only when b_v and the shift are None).
    """
    kv = num_heads if num_kv_heads is None else num_kv_heads
    s = truncate_scale(scale)
    w_v, w_o = np.asarray(w_v), np.asarray(w_o)
    s_o = _per_query_channel(s, num_heads, kv)
    new_wv = w_v / s[:, None]
    if shift is None:
        new_bv = None if b_v is None else np.asarray(b_v) / s
        new_bo = None if b_o is None else np.asarray(b_o)
    else:
        delta = np.asarray(shift)
        new_bv = ((0.0 if b_v is None else np.asarray(b_v)) - delta) / s
        moved = w_o @ _per_query_channel(delta, num_heads, kv)  # W_o delta, original W_o
        new_bo = moved if b_o is None else np.asarray(b_o) + moved
    return new_wv, new_bv, w_o * s_o[None, :], new_bo


def rotary_scale(half_scale: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """Per-KV-channel q/k scales from one scale per rotary pair: Hugging Face's rotate_half
    pairs channel i of a head with channel i + d / 2, and RoPE commutes with a scaling only
    when both channels of a pair share it. ``half_scale``: (num_kv_heads · d / 2,)."""
    half = np.asarray(half_scale).reshape(num_kv_heads, -1)
    return np.concatenate([half, half], axis=1).reshape(-1)


def let_q_k(
    w_q,
    b_q,
    w_k,
    b_k,
    scale,
    *,
    num_heads: int = 1,
    num_kv_heads: int | None = None,
    rotary: bool = False,
):
    """Q/K: W_q / s and b_q / s by rows, W_k · s and b_k · s, so every q · k is unchanged.
    ``scale`` runs over K's channels (num_kv_heads · d) and is repeated for the query heads of
    each KV head. ``rotary=True`` (RoPE after the projections) requires the two channels of
    each rotary pair to share a scale (build it with ``rotary_scale``): then the transform is
    exact through RoPE (the official code does not enforce this).

    Returns ``(W_q', b_q', W_k', b_k')`` (biases None where given None).
    """
    kv = num_heads if num_kv_heads is None else num_kv_heads
    s = truncate_scale(scale)
    if rotary:
        heads = s.reshape(kv, -1)
        d2 = heads.shape[1] // 2
        if heads.shape[1] % 2 or not np.array_equal(heads[:, :d2], heads[:, d2:]):
            raise ValueError(
                "rotary=True needs one scale per rotary pair (i, i + d/2): build it with rotary_scale"
            )
    s_q = _per_query_channel(s, num_heads, kv)
    w_q, w_k = np.asarray(w_q), np.asarray(w_k)
    return (
        w_q / s_q[:, None],
        None if b_q is None else np.asarray(b_q) / s_q,
        w_k * s[:, None],
        None if b_k is None else np.asarray(b_k) * s,
    )


# ---------------------------------------------------------------------------------------------
# one linear layer, calibrated with LWC + LET by hand-written Adam (paper sections 3.2-3.4)
# ---------------------------------------------------------------------------------------------


def let_linear_loss_grad(
    x,
    w,
    b,
    scale,
    shift,
    gamma,
    beta,
    *,
    y_target,
    wbits=4,
    abits=16,
    group_size=None,
    symmetric=False,
):
    """One quantized linear under LET and LWC, its loss and analytic gradients.

    Forward: X' = (X - delta) / s, W' = W · diag(s), b' = b + W delta (the LET of a norm ->
    linear pair, with the norm folded into X), Y = Q_a(X') Q_w(W')^T + b',
    loss = mean((Y - y_target)^2). ``scale``/``shift`` (in,) or None (no LET / no shift),
    ``gamma``/``beta`` as ``quantize_weight``'s or None (no LWC).

    Returns ``(loss, grads)`` with grads a dict of the given parameters' gradients, keys
    "scale", "shift", "gamma", "beta" (float64).
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    s = (
        np.ones(x.shape[1])
        if scale is None
        else truncate_scale(np.asarray(scale, dtype=np.float64))
    )
    delta = np.zeros(x.shape[1]) if shift is None else np.asarray(shift, dtype=np.float64)
    b0 = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64)
    x_let = (x - delta) / s  # X'
    w_let = w * s  # W'
    b_let = b0 + w @ delta  # b'
    xq = quantize_activation(x_let, abits)
    wq = quantize_weight(w_let, wbits, group_size, gamma, beta, symmetric)
    y = xq @ wq.T + b_let
    diff = y - np.asarray(y_target, dtype=np.float64)
    loss = float(np.mean(diff**2))
    g_y = 2.0 * diff / diff.size  # ∂loss/∂Y
    g_xq, g_wq, g_b = g_y @ wq, g_y.T @ xq, g_y.sum(axis=0)
    g_x_let = quantize_activation_grad(x_let, abits, grad_output=g_xq)
    g_w_let, g_gamma, g_beta = quantize_weight_grad(
        w_let, wbits, group_size, gamma, beta, symmetric, grad_output=g_wq
    )
    grads: dict[str, np.ndarray] = {}
    if scale is not None:  # s enters through X' = (X - delta) / s and W' = W s (STE past the floor)
        grads["scale"] = (g_w_let * w).sum(axis=0) - (g_x_let * x_let / s).sum(axis=0)
    if shift is not None:  # delta through X' and b' = b + W delta
        grads["shift"] = -(g_x_let / s).sum(axis=0) + w.T @ g_b
    if gamma is not None:
        grads["gamma"] = g_gamma
    if beta is not None:
        grads["beta"] = g_beta
    return loss, grads


def _diverged(name: str, what: str, step: int, lwc_lr: float, let_lr: float) -> str:
    """The one-line error of a diverging calibration (both sides raise it)."""
    return f"{name}: {what} at step {step}; lower the learning rates (lwc_lr={lwc_lr}, let_lr={let_lr})"


def _adam(params, loss_and_grads, steps: int, lr: dict, name: str, lwc_lr: float, let_lr: float):
    """``steps`` Adam steps on ``params`` (a dict, updated in place): betas 0.9 / 0.999,
    eps 1e-8, no weight decay (the official AdamW with wd = 0), ``lr[key]`` per parameter
    (keys starting with "gamma"/"beta" use lr["gamma"]). Returns the loss before each step;
    a non-finite loss or parameter raises the one-line ``_diverged`` error."""
    m = {k: np.zeros_like(v) for k, v in params.items()}  # Adam's first moment
    v2 = {k: np.zeros_like(v) for k, v in params.items()}  # and second moment
    losses = []
    for t in range(1, steps + 1):
        loss, grads = loss_and_grads(params)
        if not math.isfinite(loss):
            raise ValueError(_diverged(name, f"the calibration loss is {loss}", t, lwc_lr, let_lr))
        losses.append(loss)
        for k, g in grads.items():
            m[k] = 0.9 * m[k] + 0.1 * g
            v2[k] = 0.999 * v2[k] + 0.001 * g * g
            m_hat = m[k] / (1 - 0.9**t)
            v_hat = v2[k] / (1 - 0.999**t)
            step = lr[k.split("_")[0]]
            with np.errstate(over="ignore", invalid="ignore"):  # reported just below
                params[k] = params[k] - step * m_hat / (np.sqrt(v_hat) + 1e-8)
            if not np.all(np.isfinite(params[k])):
                raise ValueError(
                    _diverged(name, f"the {k} parameters became non-finite", t, lwc_lr, let_lr)
                )
    return losses


@dataclass
class LinearCalibration:
    """What ``calibrate_linear`` learned: the parameters (None where not trained) and the loss
    at every step (before the step's update). They are torch tensors in lowbit.fast."""

    scale: Any
    shift: Any
    gamma: Any
    beta: Any
    losses: list[float]


def calibrate_linear(
    x,
    w,
    b=None,
    *,
    wbits: int = 4,
    abits: int = 16,
    group_size: int | None = None,
    symmetric: bool = False,
    lwc: bool = True,
    let: bool = True,
    let_shift: bool = False,
    alpha: float = 0.5,
    steps: int = 100,
    lwc_lr: float = 1e-2,
    let_lr: float = 5e-3,
    name: str = "linear",
) -> LinearCalibration:
    """OmniQuant on one linear layer, readable end to end: LET scales initialised
    SmoothQuant-style (and shifts at the channels' mid-range), LWC logits at 4.0, then
    ``steps`` steps of Adam (betas 0.9 / 0.999, eps 1e-8, no weight decay: the official
    AdamW with wd = 0) on the output MSE against the full-precision layer, one learning rate
    per group (``lwc_lr`` for gamma/beta, ``let_lr`` for scale/shift).

    A non-finite loss or parameter stops with a one-line ``ValueError`` naming ``name``, the
    step and the learning rates to lower (the official repository's users hit NaN losses).
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    y_fp = x @ w.T + (0.0 if b is None else np.asarray(b, dtype=np.float64))
    n_groups = group_count(w.shape[1], group_size)
    params: dict[str, np.ndarray] = {}
    if let:
        params["scale"] = smooth_scale(np.abs(x).max(axis=0), w, alpha)
        if let_shift:
            params["shift"] = (x.max(axis=0) + x.min(axis=0)) / 2.0
    if lwc:
        params["gamma"] = np.full((w.shape[0], n_groups), LWC_INIT)
        params["beta"] = np.full((w.shape[0], n_groups), LWC_INIT)
    lr = {"scale": let_lr, "shift": let_lr, "gamma": lwc_lr, "beta": lwc_lr}

    def loss_and_grads(p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        return let_linear_loss_grad(
            x, w, b, p.get("scale"), p.get("shift"), p.get("gamma"), p.get("beta"),
            y_target=y_fp, wbits=wbits, abits=abits, group_size=group_size, symmetric=symmetric,
        )  # fmt: skip

    losses = _adam(params, loss_and_grads, steps, lr, name, lwc_lr, let_lr)
    return LinearCalibration(
        params.get("scale"), params.get("shift"), params.get("gamma"), params.get("beta"), losses
    )


def _sigmoid_of(u: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-u) = inf for u < -709 gives the right limit, 0
        return 1.0 / (1.0 + np.exp(-u))


def _silu(u: np.ndarray) -> np.ndarray:
    return u * _sigmoid_of(u)


def let_mlp_loss_grad(
    x,
    w_gate,
    w_up,
    w_down,
    params: dict,
    *,
    y_target,
    wbits: int = 4,
    abits: int = 16,
    group_size: int | None = None,
    symmetric: bool = False,
):
    """A LLaMA MLP sub-block under LET and LWC, its loss and analytic gradients.

    Forward (the norm before the MLP folded into X, as in ``let_linear_loss_grad``):
    X' = X / s, W_gate' = W_gate · diag(s), W_up' = W_up · diag(s) (LET: norm -> gate/up);
    X̂ = Q_a(X'); G = X̂ Q_w(W_gate')^T, U = X̂ Q_w(W_up')^T, H = silu(G) ⊙ U (the SwiGLU);
    Y = Q_a(H) Q_w(W_down)^T (no LET on down_proj, as in the official code);
    loss = mean((Y - y_target)^2).

    ``params`` holds what is learned, each entry optional: "scale" (in,) and the LWC logits
    "gamma_gate", "beta_gate", "gamma_up", "beta_up", "gamma_down", "beta_down" (rows, groups).
    Returns ``(loss, grads)`` with the gradient of each given parameter (float64).
    """
    x = np.asarray(x, dtype=np.float64)
    W = {
        k: np.asarray(v, dtype=np.float64)
        for k, v in (("gate", w_gate), ("up", w_up), ("down", w_down))
    }
    s = (
        truncate_scale(np.asarray(params["scale"], np.float64))
        if "scale" in params
        else np.ones(x.shape[1])
    )

    def wq(key: str, w: np.ndarray) -> np.ndarray:
        return quantize_weight(
            w, wbits, group_size, params.get(f"gamma_{key}"), params.get(f"beta_{key}"), symmetric
        )

    def wq_grad(key: str, w: np.ndarray, g: np.ndarray):
        return quantize_weight_grad(
            w,
            wbits,
            group_size,
            params.get(f"gamma_{key}"),
            params.get(f"beta_{key}"),
            symmetric,
            grad_output=g,
        )

    x_let = x / s  # X'                                   (tokens, d)
    w_gate_let, w_up_let = W["gate"] * s, W["up"] * s  # (ffn, d)
    xq = quantize_activation(x_let, abits)
    q_gate, q_up, q_down = wq("gate", w_gate_let), wq("up", w_up_let), wq("down", W["down"])
    g = xq @ q_gate.T  # (tokens, ffn)
    u = xq @ q_up.T
    sig = _sigmoid_of(g)
    h = g * sig * u  # silu(G) ⊙ U
    hq = quantize_activation(h, abits)
    y = hq @ q_down.T  # (tokens, d_out)
    diff = y - np.asarray(y_target, dtype=np.float64)
    loss = float(np.mean(diff**2))

    g_y = 2.0 * diff / diff.size  # ∂loss/∂Y
    g_hq, g_qdown = g_y @ q_down, g_y.T @ hq
    g_h = quantize_activation_grad(h, abits, grad_output=g_hq)
    g_g = g_h * u * sig * (1.0 + g * (1.0 - sig))  # silu'(G) = σ(G) (1 + G (1 - σ(G)))
    g_u = g_h * g * sig
    g_xq = g_g @ q_gate + g_u @ q_up
    g_qgate, g_qup = g_g.T @ xq, g_u.T @ xq
    g_x_let = quantize_activation_grad(x_let, abits, grad_output=g_xq)
    g_w = {}
    grads: dict[str, np.ndarray] = {}
    for key, w_let, g_q in (
        ("gate", w_gate_let, g_qgate),
        ("up", w_up_let, g_qup),
        ("down", W["down"], g_qdown),
    ):
        g_w[key], g_gamma, g_beta = wq_grad(key, w_let, g_q)
        if f"gamma_{key}" in params:
            grads[f"gamma_{key}"] = g_gamma
        if f"beta_{key}" in params:
            grads[f"beta_{key}"] = g_beta
    if "scale" in params:  # s through X' = X / s and both W' = W s (STE past the floor)
        grads["scale"] = (
            (g_w["gate"] * W["gate"]).sum(axis=0)
            + (g_w["up"] * W["up"]).sum(axis=0)
            - (g_x_let * x_let / s).sum(axis=0)
        )
    return loss, grads


@dataclass
class MLPCalibration:
    """What ``calibrate_mlp`` learned (the ``params`` of ``let_mlp_loss_grad``) and the loss
    at every step (before the step's update)."""

    params: dict
    losses: list[float]


def calibrate_mlp(
    x,
    w_gate,
    w_up,
    w_down,
    *,
    wbits: int = 4,
    abits: int = 16,
    group_size: int | None = None,
    symmetric: bool = False,
    lwc: bool = True,
    let: bool = True,
    alpha: float = 0.5,
    steps: int = 100,
    lwc_lr: float = 1e-2,
    let_lr: float = 5e-3,
    name: str = "mlp",
) -> MLPCalibration:
    """OmniQuant on one LLaMA MLP sub-block (gate, up, SwiGLU, down), readable end to end:
    the norm -> gate/up LET scale initialised SmoothQuant-style from X and W_up (as the
    official code does), LWC logits at 4.0 on all three weights, then
    ``steps`` Adam steps (as ``calibrate_linear``) on the sub-block's output MSE against full
    precision, with the analytic gradients of ``let_mlp_loss_grad``."""
    x = np.asarray(x, dtype=np.float64)
    W = [np.asarray(w, dtype=np.float64) for w in (w_gate, w_up, w_down)]
    g_fp = x @ W[0].T
    y_fp = (_silu(g_fp) * (x @ W[1].T)) @ W[2].T
    params: dict[str, np.ndarray] = {}
    if let:
        params["scale"] = smooth_scale(np.abs(x).max(axis=0), W[1], alpha)
    if lwc:
        for key, w in zip(("gate", "up", "down"), W):
            shape = (w.shape[0], group_count(w.shape[1], group_size))
            params[f"gamma_{key}"] = np.full(shape, LWC_INIT)
            params[f"beta_{key}"] = np.full(shape, LWC_INIT)
    lr = {"scale": let_lr, "gamma": lwc_lr, "beta": lwc_lr}

    def loss_and_grads(p: dict[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        return let_mlp_loss_grad(
            x, W[0], W[1], W[2], p, y_target=y_fp, wbits=wbits, abits=abits, group_size=group_size,
            symmetric=symmetric,
        )  # fmt: skip

    losses = _adam(params, loss_and_grads, steps, lr, name, lwc_lr, let_lr)
    return MLPCalibration(params, losses)
