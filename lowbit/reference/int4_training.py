"""Training with 4-bit integers (Xi, Li, Chen, Zhu; NeurIPS 2023, arXiv 2306.11987) — reference.

Every linear layer Y = X W^T runs its three matmuls in INT4:

* **Forward: the Hadamard quantizer (HQ) with LSQ** (paper section 4). X and W are multiplied by
  the same block-diagonal Hadamard matrix along the reduction dimension, X~ = X H and
  W~ = W H (``lowbit.reference.hadamard``), then quantized per tensor with learned step sizes
  (LSQ, Esser et al. 2020): q = clamp(round(v), -Qn, Qp) with v = X~ / s_x, Qn = 2^(b-1) = 8,
  Qp = 2^(b-1) - 1 = 7, and Y = s_x s_w (q_x q_w^T), an exact integer product, because
  X~ W~^T = X W^T. The block size is searched once per layer on the first batch (``hq_search``).
* **Backward: bit splitting and leverage-score sampling (LSS)** (paper section 5). The output
  gradient G (N tokens x out) is scaled by sigma = nb^2 / (2 max|G|) with nb = 2^b - 2 = 14 and
  split into two INT4 matrices, G ≈ (nb F + S) / sigma: F = round(G sigma / nb) and S the
  stochastically rounded residual (``bit_split``). Stacked, [F; S] has 2N rows; LSS keeps about
  N of them, row i with probability p_i proportional to its leverage score (``lss_probabilities``:
  for grad W, ||row_i|| ||x_i||; for grad X, ||row_i||) and divides the kept rows by p_i, so
  the estimators of grad W~ = G^T X^ and grad X~ = G W^ are unbiased (``lss_grad_weight``,
  ``lss_grad_input``). The LSQ gradients (straight-through inside the range, the step's
  gradient with scale 1 / sqrt(numel Qp)) and the transpose of H finish the layer's backward
  (``int4_linear_backward``).

Public functions (``lowbit.fast.int4_training`` has the same, in torch):

* ``lsq_init(x, bits)``: the first step size, 2 mean|x| / sqrt(Qp) + 1e-10.
* ``lsq_encode(x, step, bits, rounding)`` -> int8 codes; ``lsq_quantize`` -> codes * step;
  ``lsq_quantize_grad`` -> (grad_x, grad_step).
* ``hq_search(x, w, bits, max_block)`` -> (best block, candidate blocks, their errors).
* ``hq_linear(x, w, step_x, step_w, block, bits, rounding)``: the INT4 forward.
* ``bit_split(g, bits, clip, seed)`` -> (F, S, sigma); ``bit_merge(F, S, sigma, bits)`` -> G~.
* ``lss_probabilities(scores, budget)``; ``lss_sample(p, seed, stream)`` -> kept rows.
* ``lss_grad_weight``, ``lss_grad_input``: the two estimators from the split gradient.
* ``int4_linear_backward``: the whole backward of one layer.

Choices where the official code (spec/methods.md section 4) is not what the paper says:

* Rounding of the forward codes is explicit: ``"half_away"`` (C ``round``, as the released CUDA
  kernel) or ``"half_even"`` (``torch.round``, as the Python block-size search).
* ``clip="code"`` reproduces the released kernels: F and S are clamped to ±6 (13 of the 16
  levels), so gradients above 90/98 of max|G| are clipped and residuals in (6, 7] too (biased).
  ``clip="full"`` clamps to the code range [-8, 7], which the split never leaves (|F| <= 7 and
  |S| <= 7), so E[(nb F + S) / sigma] = G: unbiased.
* Stochastic rounding is floor(r) + [u < r - floor(r)] with u uniform on [0, 1) (the official
  adds U(-0.5, 0.5) and rounds to nearest: the same distribution, up to the ties).
* The released CUDA kernels never sample (they keep every non-zero row: ``sampling=False``
  here); the paper and the Python fallback do (``sampling=True``, the default).
* Random numbers come from a counter-based hash of (seed, stream, element index), not from a
  generator, so this reference and the fast path draw the same numbers on any device, and the
  sampled rows for a seed are part of the contract (tier A). Streams: 0 the residual's
  rounding, 1 the grad-W rows, 2 the grad-X rows.
* LSS probabilities are computed in float64 and rounded to float32 (float64 for float64 input):
  the leverage scores come from the exact integer row norms of the codes, so only the order of
  one float64 sum separates this reference from the fast path.

Working precision: float32 for float16 / bfloat16 / float32 input, float64 for float64. Integer
products are exact (codes in float64 here; int8 x int8 -> int32 in the fast path).
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from lowbit.reference.hadamard import block_hadamard, block_sizes

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

STEP_EPS = 1e-10  # added to the initial step size (the official code's zero guard)
GRAD_EPS = 1e-8  # the official margin on min/max of the gradient before sigma
_ROUNDINGS = ("half_even", "half_away")
_CLIPS = ("code", "full")
_RESIDUALS = ("stochastic", "nearest")
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")
_STREAM_RESIDUAL, _STREAM_WEIGHT, _STREAM_INPUT = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# argument checks (the fast path raises the same messages)
# ---------------------------------------------------------------------------------------------


def _levels(bits) -> tuple[int, int]:
    """(Qn, Qp): codes are integers in [-Qn, Qp] = [-2^(b-1), 2^(b-1) - 1]."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"bits must be an int from 2 to 8, got {bits!r}")
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be from 2 to 8 (codes are stored in int8), got {bits}")
    return 2 ** (int(bits) - 1), 2 ** (int(bits) - 1) - 1


def _check_choice(value, name: str, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: use one of {', '.join(map(repr, allowed))}")
    return value


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _working(x, name: str) -> np.ndarray:
    """``x`` as a finite float32 / float64 array of at least one dimension."""
    x = np.asarray(x)
    if x.dtype.name not in _FLOAT_NAMES:
        raise ValueError(
            f"{name} must be floating point (float16/bfloat16/float32/float64), got {x.dtype}"
        )
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    x_w = x.astype(np.float64 if x.dtype == np.float64 else np.float32)
    bad = int(np.count_nonzero(~np.isfinite(x_w)))
    if bad:
        raise ValueError(
            f"{name} has {bad} non-finite values; 4-bit training needs finite tensors "
            "(a diverged loss: lower the learning rate, or skip the step as GradScaler does)"
        )
    return x_w


def _step(step, like: np.ndarray, name: str) -> np.floating:
    """A positive finite step size, in the working precision of ``like``."""
    s = np.asarray(step)
    if s.size != 1 or s.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be one positive number (per-tensor LSQ), got {step!r}")
    s_w = like.dtype.type(s.reshape(()))
    if not (np.isfinite(s_w) and s_w > 0):
        raise ValueError(
            f"{name} must be positive and finite, got {float(s_w)!r}; start from lsq_init(x)"
        )
    return s_w


def _codes(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.int8:
        raise ValueError(f"{name} must be int8 codes (from lsq_encode or bit_split), got {x.dtype}")
    return x


def _rows(x: np.ndarray) -> np.ndarray:
    """(..., k) -> (tokens, k)."""
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# counter-based random numbers (the fast path and the kernels compute the same hash)
# ---------------------------------------------------------------------------------------------

_M1, _M2, _GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9


def _hash32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer mixer (Wellons' lowbias32): every input bit changes every output bit."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(_M1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(_M2)
    x ^= x >> np.uint32(16)
    return x


def _uniforms(n: int, seed: int, stream: int) -> np.ndarray:
    """n float32 uniforms on [0, 1) (multiples of 2^-24) for (seed, stream), element i from i."""
    high = _hash32(np.array([(seed >> 32) & 0xFFFFFFFF], dtype=np.uint64))  # 0 for seeds < 2^32
    low = np.array([(seed ^ (stream * _GOLDEN)) & 0xFFFFFFFF], dtype=np.uint32)
    key = _hash32(low ^ high)
    counter = (np.arange(n, dtype=np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    bits = _hash32(_hash32(counter ^ key) + key)  # (n,)
    return (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


# ---------------------------------------------------------------------------------------------
# LSQ (paper section 4, Esser et al.'s learned step size)
# ---------------------------------------------------------------------------------------------


def _round(v: np.ndarray, rounding: str) -> np.ndarray:
    if rounding == "half_even":
        return np.rint(v)
    whole = np.trunc(v)  # half away from zero, without the |v| + 0.5 rounding trap
    return whole + np.sign(v) * (np.abs(v - whole) >= 0.5)


def lsq_init(x: np.ndarray, bits: int = 4) -> np.ndarray:
    """The LSQ step size the official code starts from: 2 mean|x| / sqrt(Qp) + 1e-10.

    Args:
        x: the tensor to be quantized (after the Hadamard transform), any shape.
        bits: code width (Qp = 2^(bits-1) - 1).

    Returns:
        A 0-d array in the working precision (the mean is taken in float64).
    """
    _, Qp = _levels(bits)
    x = _working(x, "x")
    mean_abs = np.abs(x.astype(np.float64)).mean() if x.size else 0.0
    return np.asarray(2.0 * mean_abs / math.sqrt(Qp) + STEP_EPS, dtype=x.dtype)


def lsq_encode(x: np.ndarray, step, bits: int = 4, *, rounding: str = "half_even") -> np.ndarray:
    """Codes q = clamp(round(x / step), -Qn, Qp), int8, same shape as x."""
    Qn, Qp = _levels(bits)
    _check_choice(rounding, "rounding", _ROUNDINGS)
    x = _working(x, "x")
    s = _step(step, x, "step")
    v = x / s  # the LSQ ratio
    return np.clip(_round(v, rounding), -Qn, Qp).astype(np.int8)


def lsq_quantize(x: np.ndarray, step, bits: int = 4, *, rounding: str = "half_even") -> np.ndarray:
    """The fake-quantized tensor x^ = q · step, in x's dtype (computed in the working precision)."""
    q = lsq_encode(x, step, bits, rounding=rounding)
    x_w = _working(x, "x")
    return (q.astype(x_w.dtype) * _step(step, x_w, "step")).astype(np.asarray(x).dtype)


def lsq_quantize_grad(
    x: np.ndarray, step, grad_output: np.ndarray, bits: int = 4, *, rounding: str = "half_even"
) -> tuple[np.ndarray, np.ndarray]:
    """The LSQ gradients of x^ = lsq_quantize(x, step) for the upstream gradient g = dL/dx^.

    * grad_x = g · 1[-Qn <= v <= Qp], v = x / step (straight through inside the range);
    * grad_step = kappa · sum(g · (-Qn·1[v < -Qn] + Qp·1[v > Qp] + (round(v) - v)·1[inside])),
      kappa = 1 / sqrt(numel · Qp), LSQ's gradient scale.

    Returns:
        (grad_x in x's dtype, grad_step as a 0-d array in the working precision; the sum is
        taken in float64).
    """
    Qn, Qp = _levels(bits)
    _check_choice(rounding, "rounding", _ROUNDINGS)
    x_w = _working(x, "x")
    g = _working(grad_output, "grad_output").astype(x_w.dtype)
    if g.shape != x_w.shape:
        raise ValueError(f"grad_output has shape {g.shape}, x has {x_w.shape}: they must match")
    s = _step(step, x_w, "step")
    v = x_w / s
    below, above = v < -Qn, v > Qp
    inside = ~(below | above)
    grad_x = np.where(inside, g, 0).astype(np.asarray(x).dtype)
    kappa = 1.0 / math.sqrt(max(x_w.size, 1) * Qp)
    per_element = np.where(below, -Qn, np.where(above, Qp, _round(v, rounding) - v))
    grad_step = kappa * np.sum(per_element.astype(np.float64) * g.astype(np.float64))
    return grad_x, np.asarray(grad_step, dtype=x_w.dtype)


# ---------------------------------------------------------------------------------------------
# the Hadamard quantizer's forward
# ---------------------------------------------------------------------------------------------


def hq_search(
    x: np.ndarray, w: np.ndarray, bits: int = 4, max_block: int = 1024
) -> tuple[int, np.ndarray, np.ndarray]:
    """The block-size search of the official ``QLinear`` (its first forward, ``dynamic=True``).

    For every block g in 1, 2, 4, ... <= max_block dividing the input dimension: transform,
    quantize each of X~ and W~ with the step ``lsq_init`` would give (round half to even, as
    the official search does), transform back, and score ||X^ - X|| · ||W^ - W|| (Frobenius).

    Args:
        x: (..., in) a batch of the layer's inputs; w: (out, in) its weight.

    Returns:
        (the block with the smallest error, the first on a tie; the candidate blocks (int64);
        their errors (float64)).
    """
    Qn, Qp = _levels(bits)
    x_w, w_w = _rows(_working(x, "x")), _working(w, "w")
    if w_w.ndim != 2 or w_w.shape[1] != x_w.shape[1]:
        raise ValueError(f"w must be (out, {x_w.shape[1]}) for x's inputs, got {w_w.shape}")
    blocks = block_sizes(x_w.shape[1], max_block)
    errors = []
    for g in blocks:
        err = 1.0
        for t in (x_w, w_w):
            t_h = block_hadamard(t, g)  # (rows, in)
            t_q = lsq_quantize(t_h, lsq_init(t_h, bits), bits, rounding="half_even")
            t_back = block_hadamard(t_q, g)
            err *= float(np.linalg.norm((t_back - t).astype(np.float64)))
        errors.append(err)
    errors_arr = np.array(errors, dtype=np.float64)
    return blocks[int(np.argmin(errors_arr))], np.array(blocks, dtype=np.int64), errors_arr


def hq_linear(
    x: np.ndarray,
    w: np.ndarray,
    step_x,
    step_w,
    block: int,
    bits: int = 4,
    *,
    rounding: str = "half_away",
) -> np.ndarray:
    """The INT4 forward Y = s_x s_w (q_x q_w^T) of X W^T, without bias.

    q_x = lsq_encode(block_hadamard(X, block), s_x), q_w likewise for W; the integer product is
    exact, then it is converted to the working precision and scaled by s_x · s_w (one rounded
    product of the two steps).

    Args:
        x: (..., in); w: (out, in); step_x, step_w: the LSQ steps; block: the Hadamard block.

    Returns:
        (..., out) in x's dtype.
    """
    x_arr = np.asarray(x)
    x_w, w_w = _working(x, "x"), _working(w, "w")
    if w_w.ndim != 2 or w_w.shape[1] != x_w.shape[-1]:
        raise ValueError(f"w must be (out, {x_w.shape[-1]}) for x's inputs, got {w_w.shape}")
    q_x = lsq_encode(block_hadamard(_rows(x_w), block), step_x, bits, rounding=rounding)
    q_w = lsq_encode(block_hadamard(w_w.astype(x_w.dtype), block), step_w, bits, rounding=rounding)
    acc = q_x.astype(np.float64) @ q_w.astype(np.float64).T  # (tokens, out), exact integers
    scale = _step(step_x, x_w, "step_x") * _step(step_w, x_w, "step_w")
    y = acc.astype(x_w.dtype) * scale
    return y.reshape(x_w.shape[:-1] + (w_w.shape[0],)).astype(x_arr.dtype)


# ---------------------------------------------------------------------------------------------
# the backward: bit splitting (paper section 5.1)
# ---------------------------------------------------------------------------------------------


def _split_bins(bits: int) -> tuple[int, int]:
    """(nb, the clamp of clip="code"): nb = 2^b - 2 levels per part, ±(nb / 2 - 1)."""
    nb = 2**bits - 2
    return nb, nb // 2 - 1


def bit_split(
    g: np.ndarray,
    bits: int = 4,
    *,
    clip: str = "code",
    seed: int = 0,
    residual: str = "stochastic",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a gradient into two INT4 code matrices: g ≈ (nb F + S) / sigma.

    nb = 2^bits - 2 (14); sigma = nb^2 / (2 max(|min(g) - 1e-8|, |max(g) + 1e-8|)) (the extremes
    taken with 0, as the official code does), so t = g sigma lies in [-nb^2/2, nb^2/2];
    F = clamp(round(t / nb)) holds the high part and S = clamp(stochastic_round(t - nb F)) the
    residual.

    Args:
        g: the output gradient (..., out), finite.
        bits: code width of each part (4).
        clip: ``"code"``, the released kernels' clamp to ±(nb/2 - 1) = ±6 (biased for the largest
            |g|); ``"full"``, the code range [-2^(b-1), 2^(b-1) - 1] (never reached: unbiased).
        seed: seeds the residual's stochastic rounding (stream 0).
        residual: ``"stochastic"`` (the paper: unbiased) or ``"nearest"`` (round half to even:
            deterministic and biased, for reproducibility checks such as DDP against one
            process).

    Returns:
        (F, S, sigma): F and S int8 of g's shape, sigma a 0-d array in the working precision.
    """
    Qn, Qp = _levels(bits)
    _check_choice(clip, "clip", _CLIPS)
    _check_choice(residual, "residual", _RESIDUALS)
    seed = _check_seed(seed)
    g_w = _working(g, "g")
    work = g_w.dtype.type
    nb, cl = _split_bins(bits)
    low, high = (-cl, cl) if clip == "code" else (-Qn, Qp)
    g_min = g_w.min() if g_w.size else work(0)
    g_max = g_w.max() if g_w.size else work(0)
    mn = min(g_min - work(GRAD_EPS), work(0))
    mx = max(g_max + work(GRAD_EPS), work(0))
    sigma = work(nb * nb) / (work(2) * max(abs(mn), abs(mx)))
    t = g_w * sigma  # in [-nb^2/2, nb^2/2]
    F = np.clip(np.rint(t / work(nb)), low, high)  # the high part, round half to even
    r = t - work(nb) * F  # the residual, in [-nb/2, nb/2]
    if residual == "nearest":
        S = np.clip(np.rint(r), low, high)
    else:
        u = _uniforms(r.size, seed, _STREAM_RESIDUAL).reshape(r.shape).astype(work)
        r_floor = np.floor(r)
        S = np.clip(r_floor + (u < r - r_floor), low, high)  # stochastic rounding, E[S] = r
    return F.astype(np.int8), S.astype(np.int8), np.asarray(sigma)


def bit_merge(F: np.ndarray, S: np.ndarray, sigma, bits: int = 4) -> np.ndarray:
    """The gradient the two parts represent, (nb F + S) / sigma, in sigma's precision."""
    _levels(bits)
    F, S = _codes(F, "F"), _codes(S, "S")
    if F.shape != S.shape:
        raise ValueError(f"F has shape {F.shape}, S has {S.shape}: they must match")
    sig = np.asarray(sigma)
    work = np.float64 if sig.dtype == np.float64 else np.float32
    nb, _ = _split_bins(bits)
    high: np.ndarray = F.astype(work) * np.asarray(nb, dtype=work)
    return (high + S.astype(work)) / work(sig)


# ---------------------------------------------------------------------------------------------
# leverage-score sampling (paper section 5.2)
# ---------------------------------------------------------------------------------------------


def lss_probabilities(scores: np.ndarray, budget: float) -> np.ndarray:
    """Keep probabilities p_i ∝ scores_i with sum(p) = budget and p_i <= 1 (the fix-up loop).

    p = scores · budget / sum(scores); then, while some p > 1 and fewer than ``budget`` rows
    are capped: cap at 1 and rescale the uncapped ones to sum to budget - (number capped).
    (The official loop, with its exits: it stops when the uncapped rows all have score 0.)

    Args:
        scores: (rows,) non-negative finite scores.
        budget: the expected number of kept rows (N for the 2N split rows).

    Returns:
        (rows,) float32 (float64 for float64 scores); all zeros when every score is 0.
    """
    sc = np.asarray(scores)
    if sc.ndim != 1 or sc.dtype.name not in _FLOAT_NAMES:
        raise ValueError(f"scores must be a 1-D float array, got {sc.dtype} {sc.shape}")
    if not np.all(np.isfinite(sc)) or np.any(sc < 0):
        raise ValueError("scores must be finite and non-negative (row norms)")
    if not isinstance(budget, numbers.Real) or not budget >= 0:
        raise ValueError(f"budget must be a non-negative number of rows, got {budget!r}")
    out_dtype = np.float64 if sc.dtype == np.float64 else np.float32
    scores64 = sc.astype(np.float64)
    total = scores64.sum()
    if total == 0:
        return np.zeros(sc.shape, dtype=out_dtype)
    p = scores64 * (budget / total)  # (rows,)
    capped = 0
    while p.max() > 1 and capped < budget:
        small = p < 1
        capped = int(np.count_nonzero(~small))
        p = np.minimum(p, 1.0)
        if not small.any() or p[small].max() == 0:
            break
        p[small] = p[small] * ((budget - capped) / p[small].sum())
    return p.astype(out_dtype)


def lss_sample(p: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """Bernoulli(p_i) per row: kept_i = u_i < p_i with the seeded uniforms of ``stream``.

    Rows with p_i = 0 are never kept, rows with p_i = 1 always.
    """
    p = np.asarray(p)
    if p.ndim != 1 or p.dtype.name not in _FLOAT_NAMES:
        raise ValueError(f"p must be a 1-D float array of probabilities, got {p.dtype} {p.shape}")
    seed = _check_seed(seed)
    if isinstance(stream, bool) or not isinstance(stream, numbers.Integral) or stream < 0:
        raise ValueError(f"stream must be a non-negative int, got {stream!r}")
    return _uniforms(p.size, seed, int(stream)).astype(np.float64) < p.astype(np.float64)


def _row_weights(scores: np.ndarray, n: int, sampling: bool, seed: int, stream: int, work):
    """1 / p_i for the kept rows of [F; S] (2n rows) and 0 for the others; ones without sampling.

    Without sampling every row is kept, as the released kernels do (a zero row adds nothing).
    """
    if not sampling:
        return np.ones(2 * n, dtype=work)
    p = lss_probabilities(scores.astype(work), budget=n)
    kept = lss_sample(p, seed, stream)
    weights = np.zeros(2 * n, dtype=work)
    weights[kept] = work(1) / p[kept].astype(work)
    return weights


def _split_inputs(F, S, sigma, bits: int):
    Qn, Qp = _levels(bits)
    F, S = _codes(F, "F"), _codes(S, "S")
    if F.ndim != 2 or F.shape != S.shape:
        raise ValueError(
            f"F and S must be 2-D (tokens, out) of one shape, got {F.shape}, {S.shape}"
        )
    sig = np.asarray(sigma)
    work = np.float64 if sig.dtype == np.float64 else np.float32
    nb, _ = _split_bins(bits)
    return F, S, work(sig), work, nb


def _integer_norms(codes: np.ndarray) -> np.ndarray:
    """sqrt(sum of squared codes) per row: exact integer sums, one correctly rounded sqrt."""
    return np.sqrt((codes.astype(np.int64) ** 2).sum(axis=1).astype(np.float64))


def lss_grad_weight(
    F: np.ndarray,
    S: np.ndarray,
    sigma,
    q_x: np.ndarray,
    step_x,
    bits: int = 4,
    *,
    sampling: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """The LSS estimator of grad W~ = G^T X^ from the split gradient and the forward's INT4 X.

    G ≈ (nb F + S) / sigma and X^ = q_x step_x. Row i of the stacked [F; S] has leverage score
    ||row_i|| · ||x^_i|| (x^_i the token's input, used by both halves); LSS keeps about N of the
    2N rows (stream 1 of ``seed``) and weights the kept ones by 1 / p_i:

        grad W~ = (nb s_x / sigma) F^T D_F q_x + (s_x / sigma) S^T D_S q_x,  D = diag(kept / p).

    Without sampling D = I and both products are exact integer GEMMs.

    Returns:
        (out, in) in the working precision (the products are taken in float64 and rounded once
        per part; the fast path's float32 GEMMs are compared with tier B).
    """
    F, S, sig, work, nb = _split_inputs(F, S, sigma, bits)
    q_x = _codes(q_x, "q_x")
    if q_x.ndim != 2 or q_x.shape[0] != F.shape[0]:
        raise ValueError(
            f"q_x must be ({F.shape[0]}, in) for the gradient's tokens, got {q_x.shape}"
        )
    s_x = _step(step_x, np.zeros(1, work), "step_x")
    n = F.shape[0]
    x_norm = _integer_norms(q_x)  # (n,), common factor s_x dropped: it cancels in p
    scores = np.concatenate([nb * _integer_norms(F) * x_norm, _integer_norms(S) * x_norm])
    d = _row_weights(scores, n, sampling, seed, _STREAM_WEIGHT, work).astype(np.float64)
    qx64 = q_x.astype(np.float64)
    high = F.astype(np.float64).T @ (d[:n, None] * qx64)  # (out, in)
    low = S.astype(np.float64).T @ (d[n:, None] * qx64)
    return (high.astype(work) * (work(nb) * s_x / sig) + low.astype(work) * (s_x / sig)).astype(
        work
    )


def lss_grad_input(
    F: np.ndarray,
    S: np.ndarray,
    sigma,
    q_w: np.ndarray,
    step_w,
    bits: int = 4,
    *,
    sampling: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """The LSS estimator of grad X~ = G W^ from the split gradient and the forward's INT4 W.

    Row i of [F; S] has leverage score ||row_i|| (W^ is shared by all rows); LSS keeps about N
    of the 2N rows (stream 2 of ``seed``). The row weights commute with the product, so both
    GEMMs stay exact integer products and the weights scale their output rows:

        grad X~_i = d_F,i (nb s_w / sigma) (F q_w)_i + d_S,i (s_w / sigma) (S q_w)_i.

    Returns:
        (tokens, in) in the working precision.
    """
    F, S, sig, work, nb = _split_inputs(F, S, sigma, bits)
    q_w = _codes(q_w, "q_w")
    if q_w.ndim != 2 or q_w.shape[0] != F.shape[1]:
        raise ValueError(
            f"q_w must be ({F.shape[1]}, in) for the gradient's outputs, got {q_w.shape}"
        )
    s_w = _step(step_w, np.zeros(1, work), "step_w")
    n = F.shape[0]
    scores = np.concatenate([nb * _integer_norms(F), _integer_norms(S)])
    d = _row_weights(scores, n, sampling, seed, _STREAM_INPUT, work)
    qw64 = q_w.astype(np.float64)
    high = (F.astype(np.float64) @ qw64).astype(work)  # (tokens, in), exact integers
    low = (S.astype(np.float64) @ qw64).astype(work)
    row_high = d[:n] * (work(nb) * s_w / sig)  # (tokens,)
    row_low = d[n:] * (s_w / sig)
    return (row_high[:, None] * high + row_low[:, None] * low).astype(work)


def int4_linear_backward(
    grad_output: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    step_x,
    step_w,
    block: int,
    bits: int = 4,
    *,
    sampling: bool = True,
    clip: str = "code",
    seed: int = 0,
    rounding: str = "half_away",
    residual: str = "stochastic",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The whole backward of ``hq_linear``: (grad_x, grad_w, grad_step_x, grad_step_w).

    1. Recompute the forward's codes: X~ = X H, W~ = W H, q = lsq_encode(·, s).
    2. Split G = dL/dY: F, S, sigma = bit_split(G, clip, seed, residual).
    3. grad X~ = lss_grad_input(F, S, sigma, q_w, s_w); grad W~ = lss_grad_weight(..., q_x, s_x).
    4. LSQ: grad wrt X~ and s_x = lsq_quantize_grad(X~, s_x, grad X~), the same for W.
    5. Back through H: grad X = grad_X~ H^T = block_hadamard(grad_X~) (H is symmetric).

    Returns:
        grad_x (x's shape and dtype), grad_w (w's shape and dtype), and the two step gradients
        (0-d, working precision).
    """
    _check_choice(rounding, "rounding", _ROUNDINGS)
    x_arr, w_arr = np.asarray(x), np.asarray(w)
    x_w, w_w = _rows(_working(x, "x")), _working(w, "w").astype(_working(x, "x").dtype)
    g = _rows(_working(grad_output, "grad_output")).astype(x_w.dtype)
    if w_w.ndim != 2 or w_w.shape[1] != x_w.shape[1] or g.shape != (x_w.shape[0], w_w.shape[0]):
        raise ValueError(
            f"shapes do not match a linear layer: x {x_arr.shape}, w {w_arr.shape}, "
            f"grad_output {np.asarray(grad_output).shape}"
        )
    x_h, w_h = block_hadamard(x_w, block), block_hadamard(w_w, block)  # X~, W~
    q_x = lsq_encode(x_h, step_x, bits, rounding=rounding)
    q_w = lsq_encode(w_h, step_w, bits, rounding=rounding)
    F, S, sigma = bit_split(g, bits, clip=clip, seed=seed, residual=residual)
    grad_x_h = lss_grad_input(F, S, sigma, q_w, step_w, bits, sampling=sampling, seed=seed)
    grad_w_h = lss_grad_weight(F, S, sigma, q_x, step_x, bits, sampling=sampling, seed=seed)
    grad_x_h, grad_step_x = lsq_quantize_grad(x_h, step_x, grad_x_h, bits, rounding=rounding)
    grad_w_h, grad_step_w = lsq_quantize_grad(w_h, step_w, grad_w_h, bits, rounding=rounding)
    grad_x = block_hadamard(grad_x_h, block).reshape(x_arr.shape).astype(x_arr.dtype)
    grad_w = block_hadamard(grad_w_h, block).astype(w_arr.dtype)
    return grad_x, grad_w, grad_step_x, grad_step_w
