"""Training with 4-bit integers (arXiv 2306.11987) — fast path (torch), twin of the reference.

The same functions with the same parameters as ``lowbit.reference.int4_training`` (read its
docstring for the method). Codes, sampled rows and everything computed from exact integer
products are bit for bit the reference's (tier A): the same operations in the same working
precision, the same counter-based random numbers (a 32-bit hash of seed, stream and element
index, computed here with 64-bit integer tensors on any device), and INT4 x INT4 products as
int8 ``torch._int_mm`` with int32 accumulation (exact: |q| <= 8, so each product is at most 64).
The one float GEMM is the sampled weight gradient (``lss_grad_weight(..., sampling=True)``):
the 1 / p row weights sit between the two factors, so it runs in float32 (tier B).

``lss_probabilities`` runs the official fix-up loop, whose exit test reads the device (one
synchronisation per iteration, in the backward pass only). ``lowbit.fast.nn.int4_training``
builds the trainable ``Int4Linear`` from these functions.
"""

from __future__ import annotations

import math
import numbers

import torch

from lowbit.fast._tensors import takes_tensors
from lowbit.fast.hadamard import block_hadamard
from lowbit.kernels import on_triton_device
from lowbit.reference.hadamard import block_sizes
from lowbit.reference.int4_training import (
    _CLIPS,
    _GOLDEN,
    _M1,
    _M2,
    _RESIDUALS,
    _ROUNDINGS,
    _STREAM_INPUT,
    _STREAM_RESIDUAL,
    _STREAM_WEIGHT,
    GRAD_EPS,
    STEP_EPS,
    _check_choice,
    _check_seed,
    _levels,
    _split_bins,
)

__all__ = [
    "lsq_init",
    "lsq_encode",
    "lsq_quantize",
    "lsq_quantize_grad",
    "hq_search",
    "hq_linear",
    "bit_split",
    "bit_merge",
    "lss_probabilities",
    "lss_sample",
    "lss_grad_weight",
    "lss_grad_input",
    "int4_linear_backward",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MASK = 0xFFFFFFFF


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _working(x: torch.Tensor, name: str, check: bool = True) -> torch.Tensor:
    if x.dtype not in _FLOATS:
        raise ValueError(
            f"{name} must be floating point (float16/bfloat16/float32/float64), got {_name(x.dtype)}"
        )
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    x_w = x.detach().to(_work_dtype(x.dtype))
    # checked on CPU only: on CUDA the check would synchronise the device
    if check and x_w.device.type == "cpu" and x_w.numel():
        if not bool(torch.isfinite(x_w.amax()) & torch.isfinite(x_w.amin())):
            bad = int((~torch.isfinite(x_w)).sum())
            raise ValueError(
                f"{name} has {bad} non-finite values; 4-bit training needs finite tensors "
                "(a diverged loss: lower the learning rate, or skip the step as GradScaler does)"
            )
    return x_w


def _step(step, like: torch.Tensor, name: str) -> torch.Tensor:
    """A positive finite step size as a 0-d tensor in ``like``'s dtype and device."""
    s = step.detach() if isinstance(step, torch.Tensor) else torch.as_tensor(step)
    if s.numel() != 1 or s.dtype == torch.bool or s.is_complex():
        raise ValueError(f"{name} must be one positive number (per-tensor LSQ), got {step!r}")
    s_w = s.reshape(()).to(like.dtype).to(like.device)
    if s_w.device.type == "cpu" and not (torch.isfinite(s_w) and s_w > 0):
        raise ValueError(
            f"{name} must be positive and finite, got {float(s_w)!r}; start from lsq_init(x)"
        )
    return s_w


def _codes(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype != torch.int8:
        raise ValueError(
            f"{name} must be int8 codes (from lsq_encode or bit_split), got {_name(x.dtype)}"
        )
    return x


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


# ---- counter-based random numbers (the reference's hash, in int64 tensors) -------------------


def _signed(v: int) -> int:
    """A 32-bit pattern as the int32 that holds it."""
    return v - (1 << 32) if v >= 1 << 31 else v


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int32 bit patterns (``>>`` on int32 is arithmetic)."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The reference's lowbias32 on int32 tensors holding uint32 bit patterns: int32 products
    and sums wrap modulo 2^32 like uint32 ones (checked bit for bit against NumPy's uint32)."""
    x = x ^ _srl(x, 16)
    x = x * _signed(_M1)
    x = x ^ _srl(x, 15)
    x = x * _signed(_M2)
    return x ^ _srl(x, 16)


def _hash32_int(x: int) -> int:
    return int(_hash32(torch.tensor([_signed(x & _MASK)], dtype=torch.int32))[0]) & _MASK


def _stream_key(seed: int, stream: int) -> int:
    """The 32-bit hash key of (seed, stream), as the reference and the kernels use it."""
    return _hash32_int(((seed ^ (stream * _GOLDEN)) & _MASK) ^ _hash32_int(seed >> 32))


def _uniforms(n: int, seed: int, stream: int, device, start: int = 0) -> torch.Tensor:
    """The reference's uniforms on [0, 1) number start ... start + n - 1 of (seed, stream),
    float32, on ``device``."""
    key = _signed(_stream_key(seed, stream))
    if start + n >= 1 << 31:
        raise ValueError(f"{start + n} random numbers requested: at most 2^31 - 1 per call")
    counter = torch.arange(start, start + n, dtype=torch.int32, device=device)
    bits = _hash32(_hash32(counter ^ key) + key)
    return _srl(bits, 8).to(torch.float32).mul_(2.0**-24)


# ---- LSQ ----------------------------------------------------------------------------------------


def _round(v: torch.Tensor, rounding: str) -> torch.Tensor:
    if rounding == "half_even":
        return torch.round(v)
    whole = torch.trunc(v)
    return whole + torch.sign(v) * ((v - whole).abs() >= 0.5).to(v.dtype)


def _encode(x_w: torch.Tensor, s: torch.Tensor, Qn: int, Qp: int, rounding: str) -> torch.Tensor:
    return _round(x_w / s, rounding).clamp_(-Qn, Qp).to(torch.int8)


@takes_tensors
def lsq_init(x: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The first LSQ step, 2 mean|x| / sqrt(Qp) + 1e-10 (mean in float64), 0-d, working dtype."""
    _, Qp = _levels(bits)
    x_w = _working(x, "x")
    mean_abs = x_w.double().abs().mean() if x_w.numel() else torch.zeros((), dtype=torch.float64)
    return (2.0 * mean_abs / math.sqrt(Qp) + STEP_EPS).to(x_w.dtype)


@takes_tensors
def lsq_encode(
    x: torch.Tensor, step: float | torch.Tensor, bits: int = 4, *, rounding: str = "half_even"
) -> torch.Tensor:
    """Codes q = clamp(round(x / step), -Qn, Qp), int8, same shape as x."""
    Qn, Qp = _levels(bits)
    _check_choice(rounding, "rounding", _ROUNDINGS)
    x_w = _working(x, "x")
    return _encode(x_w, _step(step, x_w, "step"), Qn, Qp, rounding)


@takes_tensors
def lsq_quantize(
    x: torch.Tensor, step: float | torch.Tensor, bits: int = 4, *, rounding: str = "half_even"
) -> torch.Tensor:
    """The fake-quantized tensor x^ = q · step, in x's dtype."""
    Qn, Qp = _levels(bits)
    _check_choice(rounding, "rounding", _ROUNDINGS)
    x_w = _working(x, "x")
    s = _step(step, x_w, "step")
    return (_encode(x_w, s, Qn, Qp, rounding).to(x_w.dtype) * s).to(x.dtype)


def _lsq_grad(v: torch.Tensor, g: torch.Tensor, Qn: int, Qp: int, rounding: str):
    """(grad_x, grad_step) from the ratios v = x / s and g = dL/dx^ (both working precision)."""
    below, above = v < -Qn, v > Qp
    inside = ~(below | above)
    grad_x = torch.where(inside, g, 0)
    kappa = 1.0 / math.sqrt(max(v.numel(), 1) * Qp)
    per_element = torch.where(below, -Qn, torch.where(above, Qp, _round(v, rounding) - v))
    grad_step = kappa * (per_element.double() * g.double()).sum()
    return grad_x, grad_step.to(v.dtype)


@takes_tensors
def lsq_quantize_grad(
    x: torch.Tensor,
    step: float | torch.Tensor,
    grad_output: torch.Tensor,
    bits: int = 4,
    *,
    rounding: str = "half_even",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSQ gradients (grad_x in x's dtype, grad_step 0-d) of ``lsq_quantize``."""
    Qn, Qp = _levels(bits)
    _check_choice(rounding, "rounding", _ROUNDINGS)
    x_w = _working(x, "x")
    g = _working(grad_output, "grad_output").to(x_w.dtype)
    if g.shape != x_w.shape:
        raise ValueError(
            f"grad_output has shape {tuple(g.shape)}, x has {tuple(x_w.shape)}: they must match"
        )
    s = _step(step, x_w, "step")
    grad_x, grad_step = _lsq_grad(x_w / s, g, Qn, Qp, rounding)
    return grad_x.to(x.dtype), grad_step


# ---- the Hadamard quantizer's forward -------------------------------------------------------


def _hq_error(t: torch.Tensor, block: int, bits: int) -> torch.Tensor:
    """||Q(t H) H^T - t||_F (float64) with the LSQ init step: one factor of the search score."""
    t_h = block_hadamard(t, block)
    t_q = lsq_quantize(t_h, lsq_init(t_h, bits), bits, rounding="half_even")
    return torch.linalg.norm((block_hadamard(t_q, block) - t).double())


@takes_tensors
def hq_search(
    x: torch.Tensor, w: torch.Tensor, bits: int = 4, max_block: int = 1024
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The official block-size search: (best block, candidate blocks, their errors)."""
    _levels(bits)
    x_w, w_w = _rows(_working(x, "x")), _working(w, "w")
    if w_w.dim() != 2 or w_w.shape[1] != x_w.shape[1]:
        raise ValueError(f"w must be (out, {x_w.shape[1]}) for x's inputs, got {tuple(w_w.shape)}")
    blocks = block_sizes(x_w.shape[1], max_block)
    errors_t = torch.stack([_hq_error(x_w, g, bits) * _hq_error(w_w, g, bits) for g in blocks])
    errors_t = errors_t.cpu()
    best = blocks[int(torch.argmin(errors_t))]  # argmin returns the first of tied minima
    return best, torch.tensor(blocks, dtype=torch.int64), errors_t


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t as a row-major matrix, or a column-major one with both sides > 1: ``_int_mm`` on CPU
    reads the leading dimension from the strides and returns garbage for a (1, n) transpose."""
    rows, cols = t.shape
    if t.stride() == (cols, 1) or (t.stride() == (1, rows) and min(rows, cols) > 1):
        return t
    return torch.empty((rows, cols), dtype=t.dtype, device=t.device).copy_(t)


def _int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for int8 codes, exact int32: the Triton int8 GEMM on CUDA, ``torch._int_mm`` on CPU."""
    if on_triton_device(a):
        from lowbit.kernels.int8 import int8_linear

        ones_m = torch.ones(a.shape[0], dtype=torch.float32, device=a.device)
        ones_n = torch.ones(b.shape[1], dtype=torch.float32, device=a.device)
        return int8_linear(a, ones_m, b.t(), ones_n, out_int32=True)
    if a.device.type == "cpu":
        return torch._int_mm(_strided(a), _strided(b))
    # |sum| <= 64 k < 2^24 for k < 2^18: float32 products of codes are exact
    return (a.to(torch.float32) @ b.to(torch.float32)).to(torch.int32)


def _hq_codes(rows: torch.Tensor, s: torch.Tensor, block: int, bits: int, rounding: str):
    """(LSQ codes of X~, X~ float32/float64) for rows (tokens, in) in the working precision:
    the fused Triton kernel on CUDA (blocks up to 256), the torch butterflies elsewhere; the
    two are bit for bit the same."""
    Qn, Qp = _levels(bits)
    if rows.dtype == torch.float32 and block <= 256 and on_triton_device(rows):
        from lowbit.kernels.int4_training import hadamard_quantize

        return hadamard_quantize(rows, s, block, bits, rounding, keep_transform=True)
    x_h = block_hadamard(rows, block)
    return _encode(x_h, s, Qn, Qp, rounding), x_h


@takes_tensors
def hq_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    step_x: float | torch.Tensor,
    step_w: float | torch.Tensor,
    block: int,
    bits: int = 4,
    *,
    rounding: str = "half_away",
) -> torch.Tensor:
    """The INT4 forward Y = s_x s_w (q_x q_w^T) of X W^T (no bias), in x's dtype."""
    Qn, Qp = _levels(bits)
    _check_choice(rounding, "rounding", _ROUNDINGS)
    x_w, w_w = _working(x, "x"), _working(w, "w")
    if w_w.dim() != 2 or w_w.shape[1] != x_w.shape[-1]:
        raise ValueError(f"w must be (out, {x_w.shape[-1]}) for x's inputs, got {tuple(w_w.shape)}")
    s_x, s_w = _step(step_x, x_w, "step_x"), _step(step_w, x_w, "step_w")
    q_x = _hq_codes(_rows(x_w), s_x, block, bits, rounding)[0]
    q_w = _hq_codes(w_w.to(x_w.dtype), s_w, block, bits, rounding)[0]
    acc = _int_matmul(q_x, q_w.t())  # (tokens, out), exact
    y = acc.to(x_w.dtype) * (s_x * s_w)
    return y.reshape(x_w.shape[:-1] + (w_w.shape[0],)).to(x.dtype)


# ---- bit splitting ------------------------------------------------------------------------------


def _bit_split(g_w: torch.Tensor, bits: int, clip: str, seed: int, residual: str = "stochastic"):
    """``bit_split`` on a working-precision gradient, without checks (the layer's backward)."""
    Qn, Qp = _levels(bits)
    nb, cl = _split_bins(bits)
    low, high = (-cl, cl) if clip == "code" else (-Qn, Qp)
    zero = _const(0.0, g_w)
    g_min = g_w.min() if g_w.numel() else zero
    g_max = g_w.max() if g_w.numel() else zero
    mn = torch.minimum(g_min - _const(GRAD_EPS, g_w), zero)
    mx = torch.maximum(g_max + _const(GRAD_EPS, g_w), zero)
    sigma = _const(nb * nb, g_w) / (_const(2.0, g_w) * torch.maximum(mn.abs(), mx.abs()))
    if g_w.dtype == torch.float32 and g_w.dim() == 2 and on_triton_device(g_w):
        from lowbit.kernels.int4_training import bit_split as split_kernel

        F, S = split_kernel(g_w, sigma, _stream_key(seed, _STREAM_RESIDUAL), bits, clip, residual)[
            :2
        ]
        return F, S, sigma
    flat = g_w.reshape(-1)
    F = torch.empty(flat.shape, dtype=torch.int8, device=g_w.device)
    S = torch.empty_like(F)
    nb_w = _const(nb, g_w)
    # on CPU the dozen elementwise passes (half of them the hash) run on chunks of 128 Ki
    # values, which stay in cache: 2-3x faster than whole-tensor passes
    step = 1 << 17 if g_w.device.type == "cpu" else max(flat.numel(), 1)
    for start in range(0, flat.numel(), step):
        t = flat[start : start + step] * sigma
        f = torch.round(t / nb_w).clamp_(low, high)
        r = t.sub_(nb_w * f)
        if residual == "nearest":
            s = torch.round(r)
        else:
            u = _uniforms(len(r), seed, _STREAM_RESIDUAL, r.device, start).to(r.dtype)
            s = torch.floor(r)
            s += (u < r.sub_(s)).to(r.dtype)  # floor(r) + 1[u < r - floor(r)]
        F[start : start + step] = f
        S[start : start + step] = s.clamp_(low, high)
    return F.reshape(g_w.shape), S.reshape(g_w.shape), sigma


@takes_tensors
def bit_split(
    g: torch.Tensor,
    bits: int = 4,
    *,
    clip: str = "code",
    seed: int = 0,
    residual: str = "stochastic",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a gradient into two INT4 code matrices, g ≈ (nb F + S) / sigma: (F, S, sigma)."""
    _levels(bits)
    _check_choice(clip, "clip", _CLIPS)
    _check_choice(residual, "residual", _RESIDUALS)
    seed = _check_seed(seed)
    return _bit_split(_working(g, "g"), bits, clip, seed, residual)


@takes_tensors
def bit_merge(
    F: torch.Tensor, S: torch.Tensor, sigma: float | torch.Tensor, bits: int = 4
) -> torch.Tensor:
    """The gradient the two parts represent, (nb F + S) / sigma, in sigma's precision."""
    _levels(bits)
    F, S = _codes(F, "F"), _codes(S, "S")
    if F.shape != S.shape:
        raise ValueError(f"F has shape {tuple(F.shape)}, S has {tuple(S.shape)}: they must match")
    sig = torch.as_tensor(sigma, device=F.device)
    sig = sig.to(_work_dtype(sig.dtype) if sig.is_floating_point() else torch.float32)
    nb, _ = _split_bins(bits)
    return (_const(nb, sig) * F.to(sig.dtype) + S.to(sig.dtype)) / sig


# ---- leverage-score sampling --------------------------------------------------------------------


@takes_tensors
def lss_probabilities(scores: torch.Tensor, budget: float) -> torch.Tensor:
    """Keep probabilities p_i ∝ scores_i, sum(p) = budget, p_i <= 1 (the official fix-up loop)."""
    if scores.dim() != 1 or scores.dtype not in _FLOATS:
        raise ValueError(
            f"scores must be a 1-D float array, got {_name(scores.dtype)} {tuple(scores.shape)}"
        )
    if scores.device.type == "cpu" and not bool(torch.isfinite(scores).all() & (scores >= 0).all()):
        raise ValueError("scores must be finite and non-negative (row norms)")
    if not isinstance(budget, numbers.Real) or not budget >= 0:
        raise ValueError(f"budget must be a non-negative number of rows, got {budget!r}")
    return _probabilities(scores.detach().double(), float(budget)).to(_work_dtype(scores.dtype))


def _probabilities(scores64: torch.Tensor, budget: float) -> torch.Tensor:
    total = scores64.sum()
    if scores64.numel() == 0 or float(total) == 0:
        return torch.zeros_like(scores64)
    p = scores64 * (budget / total)
    capped = 0
    while float(p.max()) > 1 and capped < budget:
        small = p < 1
        capped = int((~small).sum())
        p = torch.clamp(p, max=1.0)
        if not bool(small.any()) or float(p[small].max()) == 0:
            break
        p[small] = p[small] * ((budget - capped) / p[small].sum())
    return p


@takes_tensors
def lss_sample(p: torch.Tensor, seed: int, stream: int = 0) -> torch.Tensor:
    """Bernoulli(p_i) per row with the reference's seeded uniforms: a bool mask of kept rows."""
    if p.dim() != 1 or p.dtype not in _FLOATS:
        raise ValueError(
            f"p must be a 1-D float array of probabilities, got {_name(p.dtype)} {tuple(p.shape)}"
        )
    seed = _check_seed(seed)
    if isinstance(stream, bool) or not isinstance(stream, numbers.Integral) or stream < 0:
        raise ValueError(f"stream must be a non-negative int, got {stream!r}")
    return _uniforms(p.numel(), seed, int(stream), p.device).double() < p.double()


def _row_weights(scores64: torch.Tensor, n: int, sampling: bool, seed: int, stream: int, work):
    """1 / p for the kept rows of [F; S], 0 for the others; None without sampling (all kept)."""
    if not sampling:
        return None
    p = _probabilities(scores64.to(work).double(), float(n)).to(work)
    kept = _uniforms(p.numel(), seed, stream, p.device).double() < p.double()
    return torch.where(kept, 1.0 / p, torch.zeros_like(p))


def _split_inputs(F, S, sigma, bits: int):
    _levels(bits)
    F, S = _codes(F, "F"), _codes(S, "S")
    if F.dim() != 2 or F.shape != S.shape:
        raise ValueError(
            f"F and S must be 2-D (tokens, out) of one shape, got {tuple(F.shape)}, {tuple(S.shape)}"
        )
    sig = torch.as_tensor(sigma, device=F.device)
    sig = sig.to(_work_dtype(sig.dtype) if sig.is_floating_point() else torch.float32)
    nb, _ = _split_bins(bits)
    return F, S, sig, sig.dtype, nb


def _integer_norms(codes: torch.Tensor) -> torch.Tensor:
    """sqrt(sum of squared codes) per row, exact integer sums, float64."""
    c = codes.to(torch.int64)
    return (c * c).sum(dim=1).double().sqrt()


def _grad_weight(F, S, sig, q_x, s_x, nb: int, sampling: bool, seed: int) -> torch.Tensor:
    work = sig.dtype
    n = F.shape[0]
    if not sampling:  # every row: two exact integer GEMMs
        high = _int_matmul(F.t(), q_x).to(work)
        low = _int_matmul(S.t(), q_x).to(work)
    else:
        x_norm = _integer_norms(q_x)
        scores = torch.cat([nb * _integer_norms(F) * x_norm, _integer_norms(S) * x_norm])
        d = _row_weights(scores, n, True, seed, _STREAM_WEIGHT, work)
        qx = q_x.to(work)
        high = F.t().to(work) @ (d[:n, None] * qx)  # (out, in), float: 1/p is not an integer
        low = S.t().to(work) @ (d[n:, None] * qx)
    return high * (_const(nb, sig) * s_x / sig) + low * (s_x / sig)


def _grad_input(F, S, sig, q_w, s_w, nb: int, sampling: bool, seed: int) -> torch.Tensor:
    work = sig.dtype
    n = F.shape[0]
    high = _int_matmul(F, q_w).to(work)  # (tokens, in), exact
    low = _int_matmul(S, q_w).to(work)
    scale_high, scale_low = _const(nb, sig) * s_w / sig, s_w / sig
    if not sampling:
        return scale_high * high + scale_low * low
    scores = torch.cat([nb * _integer_norms(F), _integer_norms(S)])
    d = _row_weights(scores, n, True, seed, _STREAM_INPUT, work)
    return (d[:n] * scale_high)[:, None] * high + (d[n:] * scale_low)[:, None] * low


@takes_tensors
def lss_grad_weight(
    F: torch.Tensor,
    S: torch.Tensor,
    sigma: float | torch.Tensor,
    q_x: torch.Tensor,
    step_x: float | torch.Tensor,
    bits: int = 4,
    *,
    sampling: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """The LSS estimator of grad W~ = G^T X^ (out, in), from the split G and the INT4 X."""
    F, S, sig, work, nb = _split_inputs(F, S, sigma, bits)
    q_x = _codes(q_x, "q_x")
    if q_x.dim() != 2 or q_x.shape[0] != F.shape[0]:
        raise ValueError(
            f"q_x must be ({F.shape[0]}, in) for the gradient's tokens, got {tuple(q_x.shape)}"
        )
    s_x = _step(step_x, sig, "step_x")
    return _grad_weight(F, S, sig, q_x, s_x, nb, sampling, _check_seed(seed))


@takes_tensors
def lss_grad_input(
    F: torch.Tensor,
    S: torch.Tensor,
    sigma: float | torch.Tensor,
    q_w: torch.Tensor,
    step_w: float | torch.Tensor,
    bits: int = 4,
    *,
    sampling: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """The LSS estimator of grad X~ = G W^ (tokens, in), from the split G and the INT4 W."""
    F, S, sig, work, nb = _split_inputs(F, S, sigma, bits)
    q_w = _codes(q_w, "q_w")
    if q_w.dim() != 2 or q_w.shape[0] != F.shape[1]:
        raise ValueError(
            f"q_w must be ({F.shape[1]}, in) for the gradient's outputs, got {tuple(q_w.shape)}"
        )
    s_w = _step(step_w, sig, "step_w")
    return _grad_input(F, S, sig, q_w, s_w, nb, sampling, _check_seed(seed))


def _backward_parts(
    g_w, x_h, w_h, s_x, s_w, bits, sampling, clip, seed, rounding, residual, codes=None
):
    """The layer's backward on working-precision tensors already in the Hadamard domain:
    (grad X~, grad W~, grad s_x, grad s_w). Shared by ``int4_linear_backward`` and
    ``Int4Linear``'s autograd Function (which skips the argument checks and passes the
    forward's ``codes`` (q_x, q_w) instead of having them encoded again)."""
    Qn, Qp = _levels(bits)
    v_x, v_w = x_h / s_x, w_h / s_w
    if codes is None:
        codes = (_encode(x_h, s_x, Qn, Qp, rounding), _encode(w_h, s_w, Qn, Qp, rounding))
    q_x, q_w = codes
    F, S, sigma = _bit_split(g_w, bits, clip, seed, residual)
    nb, _ = _split_bins(bits)
    grad_x_h = _grad_input(F, S, sigma, q_w, s_w, nb, sampling, seed)
    grad_w_h = _grad_weight(F, S, sigma, q_x, s_x, nb, sampling, seed)
    grad_x_h, grad_s_x = _lsq_grad(v_x, grad_x_h, Qn, Qp, rounding)
    grad_w_h, grad_s_w = _lsq_grad(v_w, grad_w_h, Qn, Qp, rounding)
    return grad_x_h, grad_w_h, grad_s_x, grad_s_w


@takes_tensors
def int4_linear_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    step_x: float | torch.Tensor,
    step_w: float | torch.Tensor,
    block: int,
    bits: int = 4,
    *,
    sampling: bool = True,
    clip: str = "code",
    seed: int = 0,
    rounding: str = "half_away",
    residual: str = "stochastic",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole backward of ``hq_linear``: (grad_x, grad_w, grad_step_x, grad_step_w)."""
    _levels(bits)
    _check_choice(rounding, "rounding", _ROUNDINGS)
    _check_choice(clip, "clip", _CLIPS)
    _check_choice(residual, "residual", _RESIDUALS)
    seed = _check_seed(seed)
    x_w = _rows(_working(x, "x"))
    w_w = _working(w, "w").to(x_w.dtype)
    g = _rows(_working(grad_output, "grad_output")).to(x_w.dtype)
    if w_w.dim() != 2 or w_w.shape[1] != x_w.shape[1] or g.shape != (x_w.shape[0], w_w.shape[0]):
        raise ValueError(
            f"shapes do not match a linear layer: x {tuple(x.shape)}, w {tuple(w.shape)}, "
            f"grad_output {tuple(grad_output.shape)}"
        )
    s_x, s_w = _step(step_x, x_w, "step_x"), _step(step_w, x_w, "step_w")
    x_h, w_h = block_hadamard(x_w, block), block_hadamard(w_w, block)
    grad_x_h, grad_w_h, grad_s_x, grad_s_w = _backward_parts(
        g, x_h, w_h, s_x, s_w, bits, sampling, clip, seed, rounding, residual
    )
    grad_x = block_hadamard(grad_x_h, block).reshape(x.shape).to(x.dtype)
    grad_w = block_hadamard(grad_w_h, block).to(w.dtype)
    return grad_x, grad_w, grad_s_x, grad_s_w
