"""LLM-FP4 (FPQ), fast path: torch (any device) and Triton kernels on CUDA.

Mirrors ``lowbit.reference.fpq`` function by function (same names, parameters, defaults and
errors; see that module for the paper, the equations and the deviations from the official
code). The quantizer runs in float64 on the torch side exactly as the reference does, so results
are bit-identical; on CUDA tensors ``quantize`` dispatches to ``lowbit.kernels.fpq`` (one pass,
per-tensor / per-channel / per-token real bias), which is bit-identical for float32 inputs too.

Besides the mirrored functions this module holds the calibration driver ``_calibrate_model``
(the official code's layer-wise calibration): captures each linear's inputs on calibration texts
and runs ``search`` layer by layer,
with a tqdm progress bar. ``lowbit.fast.nn.FPQLinear.from_linear`` builds the modules from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from lowbit.fast._tensors import takes_tensors
from lowbit.fast.formats import _codes_in_range
from lowbit.kernels import on_triton_device
from lowbit.reference.formats import FPFormat
from lowbit.reference.fpq import (
    _BIAS_LIMIT,
    MAXVAL_FLOOR,
    FPQSearchResult,
    _candidates,
    _check_bias_shape,
    _check_format,
    _check_layer_bias,
    _check_search_args,
    _per_output_channel,
    _qmax0,
    default_formats,
)

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


def _bias_tensor(bias: Any, device: torch.device) -> torch.Tensor:
    """Bias as float64 on ``device``; checked (finite, in range) unless that would sync a GPU."""
    b = torch.as_tensor(bias, dtype=torch.float64, device=device)
    if b.device.type == "cpu" and (
        not bool(torch.isfinite(b).all()) or bool((b.abs() > _BIAS_LIMIT).any())
    ):
        raise ValueError(
            f"bias must be finite with |bias| <= {_BIAS_LIMIT:g}: derive it with bias_from_max(maxval, fmt)"
        )
    return b


def _bias_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2^b and 2^-b as the reference realises them: 2^floor(b) times fl32(2^(+-frac(b)))."""
    b_int = torch.floor(b)
    b_frac = b - b_int
    scale = torch.ldexp(torch.exp2(b_frac).float().double(), b_int)
    scale_inv = torch.ldexp(torch.exp2(-b_frac).float().double(), -b_int)
    return scale, scale_inv


def max_from_bias(bias: Any, fmt: FPFormat) -> torch.Tensor:
    """Paper section 3 (FP quantization process): the clip max
    Qmax(b) = (2 - 2^-M) 2^(2^E - 1 - b) as the quantizer realises it (float64)."""
    fmt = _check_format(fmt)
    device = bias.device if isinstance(bias, torch.Tensor) else torch.device("cpu")
    _, scale_inv = _bias_scales(_bias_tensor(bias, device))
    return _qmax0(fmt) * scale_inv


def bias_from_max(maxval: Any, fmt: FPFormat) -> torch.Tensor:
    """Inverse of section 3's clip max (the min-max initialisation of paper section 4.1):
    b = 2^E - 1 - log2(Qmax / (2 - 2^-M)); maxval floored at MAXVAL_FLOOR (zero rows)."""
    fmt = _check_format(fmt)
    m = torch.as_tensor(maxval, dtype=torch.float64)
    # calibration time, not a forward path: the one host sync of this check is fine on CUDA too
    if not bool(torch.isfinite(m).all()):
        raise ValueError("maxval must be finite: remove NaN/Inf from the calibration data")
    m = m.abs().clamp_min(MAXVAL_FLOOR)
    return (2**fmt.ebits - 1) - torch.log2(m / (2.0 - 2.0**-fmt.mbits))


def _check_float(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        dtype = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"cannot quantize an array of dtype {dtype}: pass floating-point values")


def _round_scaled(
    x: torch.Tensor, fmt: FPFormat, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip, binade, step, round in units of 2^-b (float64); the reference's steps, done in place
    (fresh allocations cost more than the arithmetic on CPU). Returns (q, 2^-b)."""
    M = fmt.mbits
    scale, scale_inv = _bias_scales(b)
    y = x.to(torch.float64, copy=True)
    if y.shape != torch.broadcast_shapes(y.shape, scale.shape):
        y = y.expand(torch.broadcast_shapes(y.shape, scale.shape)).clone()
    y.mul_(scale)  # x 2^b, exact for float32 x
    Qmax0 = _qmax0(fmt)
    y.clamp_(-Qmax0, Qmax0)  # 1. clip (NaN stays NaN)
    # 2.-3. the step 2^(p - M) with p = max(floor(log2|y|), 1): masking y's bits down to its
    # exponent field gives 2^floor(log2|y|) exactly (like frexp; 0 for zeros, inf for NaN)
    step = (y.view(torch.int64) & 0x7FF0000000000000).view(torch.float64)
    step.clamp_(min=2.0).mul_(2.0**-M)
    y.div_(step)  # exact: a power-of-two scaling
    torch.round(y, out=y)  # 4. round half to even
    y.mul_(step)  # q = r * step (exact)
    return y, scale_inv


@takes_tensors
def quantize(x: torch.Tensor, fmt: FPFormat, bias: Any = None) -> torch.Tensor:
    """Fake-quantize ``x`` to ``fmt`` with real exponent bias ``bias``: clip, binade, step, round
    of paper section 3 (FP quantization process; see the reference).

    On CUDA 2-D tensors with a scalar, per-row ``(M, 1)`` or per-column ``(K,)`` bias this is one
    Triton kernel pass; everything else runs the float64 torch path.
    """
    fmt = _check_format(fmt)
    _check_float(x)
    b = _bias_tensor(fmt.bias if bias is None else bias, x.device)
    _check_bias_shape(tuple(b.shape), tuple(x.shape))
    if on_triton_device(x) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        from lowbit.kernels import fpq as kfpq

        if kfpq.supports(x, b):
            scale, scale_inv = _bias_scales(b)
            return kfpq.fake_quant(x, fmt.ebits, fmt.mbits, scale, scale_inv)
    q, scale_inv = _round_scaled(x, fmt, b)
    xq = q * scale_inv
    if x.dtype == torch.float64:
        return xq
    return xq.float().to(x.dtype)


@takes_tensors
def encode(x: torch.Tensor, fmt: FPFormat, bias: Any = None) -> torch.Tensor:
    """FP codes (uint8 up to 8 bits, else uint16) of quantize(x, fmt, bias): the FP variable of
    paper section 3 (formulation of FP variables; see the reference)."""
    fmt = _check_format(fmt)
    _check_float(x)
    # encoding is a calibration/conversion step, not a forward path: check on every device
    if bool(torch.isnan(x).any()):
        raise ValueError(
            f"{int(torch.isnan(x).sum())} NaN value(s) cannot be encoded: LLM-FP4 formats have no NaN code"
        )
    b = _bias_tensor(fmt.bias if bias is None else bias, x.device)
    _check_bias_shape(tuple(b.shape), tuple(x.shape))
    q, _ = _round_scaled(x, fmt, b)
    M = fmt.mbits
    # q lies on the bias-0 grid (<= 8 significant bits, |q| < 2^128): exact in float32, whose
    # bits then hold sign, binade and mantissa; int32 bit operations are fast on CPU.
    q32 = q.float()
    bits = q32.view(torch.int32)
    a = q32.abs()
    normal = a >= 2.0  # 2^1 is the smallest normal at bias 0: field = binade, mantissa below it
    magnitude = torch.where(
        normal,
        ((bits & 0x7FFFFFFF) >> (23 - M)) - (127 << M),  # (binade << M) | mantissa
        (a * 2.0 ** (M - 1)).int(),  # subnormal: a = d 2^(1 - M), field 0
    )
    code = magnitude | ((bits >> 31) & 1) << (fmt.ebits + M)
    # the arithmetic ran in int32 (uint16 has few kernels); the codes are stored like the
    # reference's (DESIGN section 2): uint8 up to 8 bits, else uint16
    return code.to(torch.uint8 if fmt.bits <= 8 else torch.uint16)


@takes_tensors
def decode(codes: torch.Tensor, fmt: FPFormat, bias: Any = None) -> torch.Tensor:
    """float32 values of FP codes read with real exponent bias ``bias``: the FP variable of paper
    section 3 (formulation of FP variables); re-reading at b + k is section 4.2's
    reparameterisation (see the reference)."""
    fmt = _check_format(fmt)
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        raise ValueError(
            f"codes must be an integer array, got {getattr(codes, 'dtype', type(codes))}"
        )
    c = _codes_in_range(codes.long(), fmt)
    b = _bias_tensor(fmt.bias if bias is None else bias, c.device)
    _check_bias_shape(tuple(b.shape), tuple(c.shape))
    M = fmt.mbits
    sign = (c >> (fmt.ebits + M)) & 1
    field = (c >> M) & (2**fmt.ebits - 1)
    mantissa = c & (2**M - 1)
    # 2^(max(field, 1) - M) from its bits; field 0 (subnormal) shares the step of field 1
    pow2 = ((field.clamp(min=1) - M + 1023) << 52).view(torch.float64)
    a = torch.where(field > 0, mantissa + 2**M, mantissa).double() * pow2
    _, scale_inv = _bias_scales(b)
    return (torch.where(sign == 1, -a, a) * scale_inv).float()


@takes_tensors
def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    a_fmt: FPFormat,
    a_bias: Any,
    w_fmt: FPFormat,
    w_bias: Any,
    b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Y = Q(X; a_bias) Q(W; w_bias)^T + b, computed in x's precision (float32 at least): the
    forward whose output MSE the search of paper section 4.1 minimises (see the reference)."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(
            f"linear needs x (tokens, in) and w (out, in) with the same in: got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    if b is not None:
        _check_layer_bias(tuple(b.shape), w.shape[0])
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    Xq = quantize(x, a_fmt, a_bias).to(work)
    Wq = quantize(
        w,
        w_fmt,
        _per_output_channel(
            torch.as_tensor(w_bias, dtype=torch.float64, device=w.device), w.shape[0]
        ),
    ).to(work)
    Y = Xq @ Wq.T
    if b is not None:
        Y = Y + b.to(work)
    return Y


@takes_tensors
def preshift(
    a_bias: torch.Tensor, fmt: FPFormat, tensor_bias: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper section 4.2 (pre-shifted exponent bias): per-channel biases -> (t, k) with
    k_c = clamp(round(b_c), round(t), round(t) + 2^E - 1) - round(t)."""
    fmt = _check_format(fmt)
    b_c = _bias_tensor(
        a_bias, a_bias.device if isinstance(a_bias, torch.Tensor) else torch.device("cpu")
    )
    if b_c.ndim != 1 or b_c.numel() == 0:
        raise ValueError(
            f"a_bias must be a non-empty vector of per-channel biases, got shape {tuple(b_c.shape)}"
        )
    t = b_c.min() if tensor_bias is None else _bias_tensor(tensor_bias, b_c.device)
    if t.ndim != 0:
        raise ValueError("tensor_bias must be a scalar")
    z = torch.round(t)
    k = torch.minimum(torch.maximum(torch.round(b_c), z), z + 2**fmt.ebits - 1) - z
    return t, k.long()


@takes_tensors
def fold_preshift(w_bias: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Paper section 4.2 (reparameterisation into the weights): (out, in) weight exponent biases
    b_o + k_c (see the reference for the exactness condition)."""
    b_o = torch.as_tensor(w_bias, dtype=torch.float64)
    k = torch.as_tensor(shifts)
    if b_o.ndim != 1 or k.ndim != 1:
        raise ValueError(
            f"fold_preshift needs w_bias (out,) and shifts (in,), got {tuple(b_o.shape)} and {tuple(k.shape)}"
        )
    if k.is_floating_point() and not bool((k == torch.round(k)).all()):
        raise ValueError("shifts must be integers (the k_c of preshift)")
    return b_o[:, None] + k.to(torch.float64, copy=False).to(b_o.device)[None, :]


# Bytes one batch of search candidates may hold (the float64 quantizer's two work arrays, the
# quantized operand and the batched GEMM output): a bias step scores its candidates in batches
# of at most this size, so memory stays bounded whatever the grid and the layer. The arrays are
# allocated once per search and reused (on CPU a fresh large tensor costs more in page faults
# than the arithmetic done on it). On CPU small batches that stay in cache are fastest (256
# tokens, 384 -> 1536, 20 candidates, 2 rounds: 0.71 s at 2 MiB, 0.73 s at 8-32 MiB, 0.91 s at
# 128 MiB); other devices take larger batches (fewer kernel launches).
SEARCH_CHUNK_BYTES = 8 * 2**20
SEARCH_CHUNK_BYTES_GPU = 256 * 2**20


class _Buffers:
    """Work arrays of a search, allocated on first use and reused for every batch."""

    def __init__(self, device: torch.device):
        self.device = device
        self.store: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        t = self.store.get(name)
        if t is None or t.numel() < n or t.dtype != dtype:
            t = torch.empty(n, dtype=dtype, device=self.device)
            self.store[name] = t
        return t[:n].view(shape)


def _round_into(
    x: torch.Tensor, fmt: FPFormat, b: torch.Tensor, y: torch.Tensor, step: torch.Tensor
) -> None:
    """Steps 1-4 of ``_round_scaled`` for a bias with a leading candidate dimension, written into
    preallocated float64 arrays: b (n, 1, 1), (n, rows, 1) or (n, 1, cols) against x (rows,
    cols) leaves y = round(clip(x 2^b) / step) and step = 2^(p - M), both (n, rows, cols)."""
    scale, _ = _bias_scales(b)
    torch.mul(x, scale, out=y)  # x 2^b in float64: exact for float32 x
    Qmax0 = _qmax0(fmt)
    y.clamp_(-Qmax0, Qmax0)  # 1. clip
    # 2.-3. the step 2^(p - M) with p = max(floor(log2|y|), 1), from y's exponent bits
    torch.bitwise_and(y.view(torch.int64), 0x7FF0000000000000, out=step.view(torch.int64))
    step.clamp_(min=2.0).mul_(2.0**-fmt.mbits)
    y.div_(step)  # exact: a power-of-two scaling
    torch.round(y, out=y)  # 4. round half to even


def _fake_quant_into(
    x: torch.Tensor,
    fmt: FPFormat,
    b: torch.Tensor,
    y: torch.Tensor,
    step: torch.Tensor,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``quantize(x, fmt, b)`` for a bias with a leading candidate dimension (see
    ``_round_into``), returned as ``out``'s dtype (``out`` None: y itself, float64). The same
    float64 arithmetic as ``_round_scaled`` (bit-identical values), without the argument checks
    or the kernel dispatch."""
    _round_into(x, fmt, b, y, step)
    y.mul_(step).mul_(_bias_scales(b)[1])  # q 2^-b, exact in float64
    if out is None:
        return y
    return out.copy_(y)  # float32: the same single rounding as quantize's .float()


def _once(make: Callable[[], Any] | None) -> Callable[[], Any]:
    """``make``, called at most once: a step's fixed operand, built only if a scorer needs it."""
    kept: list = []

    def get() -> Any:
        if not kept:
            assert make is not None
            kept.append(make())
        return kept[0]

    return get


def _batch(per_candidate_bytes: int, device: torch.device) -> int:
    """Candidates per batch so that a batch holds at most SEARCH_CHUNK_BYTES (CPU) or
    SEARCH_CHUNK_BYTES_GPU (other devices), at least one."""
    limit = SEARCH_CHUNK_BYTES if device.type == "cpu" else SEARCH_CHUNK_BYTES_GPU
    return max(1, limit // max(1, per_candidate_bytes))


# ---- exact integer scoring (CPU, float32 work) ------------------------------------------------------
# At bias 0 a format's values are integers times 2^(1 - M), the step of binade 1. So W quantized
# with per-row biases is f_o I (|I| <= Qmax0 2^(M - 1): 64 for E3M0, 12 for E2M1, 7 for E1M2) and
# X quantized with tensor bias t and pre-shifts k_c is f 2^(k_max - k_c) I. A candidate's output
# Xq Wq^T is then f f_o times an integer GEMM, exact in int32, and torch's int8 GEMM runs about 8x
# faster than its float32 GEMM on CPUs with VNNI (2 cores: 520 against 66 GFLOP/s). Integers wider
# than int8 (the pre-shift's 2^(k_max - k_c), 8-bit formats) are split into 7-bit limbs, one GEMM
# per pair of limbs; a weight / activation format pair is scored this way when it needs at most
# MAX_LIMB_PAIRS GEMMs, else with float32 GEMMs. The float factors are applied to the exact
# products, so each error is a float32 mean of squares like the float32 path's, from exact
# rather than rounded products.

INT_SCORING_CACHE_BYTES = 256 * 2**20  # one format's fixed candidates' codes, kept for later rounds
MAX_LIMB_PAIRS = 4  # beyond, float32 GEMMs are faster; also caps the limbs (int32 holds 4)


def _int_unit(fmt: FPFormat) -> float:
    """2^(M - 1): bias-0 values times this are integers."""
    return 2.0 ** (fmt.mbits - 1)


def _int_max(fmt: FPFormat, shifted: bool = False) -> int:
    """Largest integer code magnitude; ``shifted``: times the widest pre-shift 2^(2^E - 1)."""
    return int(_qmax0(fmt) * _int_unit(fmt)) << ((2**fmt.ebits - 1) if shifted else 0)


def _limbs_for(vmax: int) -> int:
    """7-bit limbs (the top one a signed int8) that hold integers of magnitude <= vmax."""
    n = 1
    while vmax > 127 << (7 * (n - 1)):
        n += 1
    return n


def _split_limbs(y: torch.Tensor, n: int) -> torch.Tensor:
    """Exact integers (float64, |y| < 127 * 2^21 for n <= 4) -> (n, *y.shape) int8 limbs, low
    first: the low ones in [0, 127], the top one signed."""
    v = y.to(torch.int32)
    limbs = []
    for _ in range(n - 1):
        limbs.append((v & 127).to(torch.int8))
        v >>= 7
    limbs.append(v.to(torch.int8))
    return torch.stack(limbs)


def _limb_mm(lhs: list[torch.Tensor], rhs: list[torch.Tensor]) -> torch.Tensor:
    """(sum_l 2^7l lhs_l) @ (sum_l 2^7l rhs_l) as float32: one exact int8 GEMM per limb pair."""
    out: torch.Tensor | None = None
    for i, a in enumerate(lhs):
        for k, b in enumerate(rhs):
            p = torch._int_mm(a, b).float()
            if out is None:
                out = p.mul_(2.0 ** (7 * (i + k))) if i + k else p
            else:
                out.add_(p, alpha=2.0 ** (7 * (i + k)))
    assert out is not None
    return out


class _IntScorer:
    """Scores a search's bias candidates with exact integer GEMMs (see the comment above). The
    codes of each format's fixed candidates ([b0, grid]) are computed once and reused by every
    round."""

    @staticmethod
    def applies(x: torch.Tensor) -> bool:
        """CPU float32 work, and int32 accumulation safe: a limb GEMM sums d_in products of two
        limbs of magnitude <= 128."""
        return x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[1] < 2**31 >> 14

    def __init__(self, x, w, target, wfmts, afmts, a_b0c, preshifted, bufs):
        self.x, self.w, self.wfmts, self.afmts = x, w, wfmts, afmts
        self.target = target  # (tokens, out): y_fp minus the layer bias, float32
        self.target_t = target.T.contiguous()
        self.a_b0c, self.preshifted, self.bufs = a_b0c, preshifted, bufs
        self.cache: dict = {}  # the fixed candidates' codes, per tensor and format
        self.w_limbs = [_limbs_for(_int_max(f)) for f in wfmts]
        self.a_limbs = [_limbs_for(_int_max(f, preshifted)) for f in afmts]

    def pays(self, jw: int, ja: int) -> bool:
        """Whether weight format jw against activation format ja is scored with integers."""
        return self.w_limbs[jw] * self.a_limbs[ja] <= MAX_LIMB_PAIRS

    def _work(self, shape):
        return self.bufs.get("y", shape, torch.float64), self.bufs.get("step", shape, torch.float64)

    def w_codes(self, j: int, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, out) biases of weight format j -> int8 limbs (limbs, k, out, in), factors (k, out)."""
        fmt = self.wfmts[j]
        y, step = self._work((bias.shape[0], *self.w.shape))
        _round_into(self.w, fmt, bias[:, :, None], y, step)
        y.mul_(step.mul_(_int_unit(fmt)))  # exact integers
        return _split_limbs(y, self.w_limbs[j]), _bias_scales(bias)[1] / _int_unit(fmt)

    def x_codes(self, j: int, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k,) tensor biases of activation format j -> int8 limbs (limbs, k, tokens, in) and
        factors (k,)."""
        fmt = self.afmts[j]
        y, step = self._work((t.shape[0], *self.x.shape))
        K = 2**fmt.ebits - 1 if self.preshifted else 0
        if self.preshifted:  # preshift's k_c per candidate, as a_effective_many computes them
            z = torch.round(t)[:, None]
            k = torch.minimum(torch.maximum(torch.round(self.a_b0c[j])[None], z), z + K) - z
            _round_into(self.x, fmt, (t[:, None] + k)[:, None, :], y, step)
            step.mul_(torch.exp2(K - k)[:, None, :])
        else:
            _round_into(self.x, fmt, t[:, None, None], y, step)
        y.mul_(step.mul_(_int_unit(fmt)))  # exact integers, |v| <= _int_max(fmt, preshifted)
        return _split_limbs(y, self.a_limbs[j]), _bias_scales(t)[1] / (_int_unit(fmt) * 2.0**K)

    @staticmethod
    def _batches(n: int, per_candidate_bytes: int):
        c = min(n, _batch(per_candidate_bytes, torch.device("cpu")))
        return [(c0, min(n, c0 + c)) for c0 in range(0, n, c)]

    def _codes(self, key, cands, make, code_bytes: int, batches):
        """(limbs (limbs, k, ...), factors (k, ...)) of each candidate batch; computed once and
        kept for later rounds when all of them fit INT_SCORING_CACHE_BYTES."""
        whole = self.cache.get(key)
        if whole is None:
            parts = [make(cands[c0:c1]) for c0, c1 in batches]
            if code_bytes * cands.shape[0] > INT_SCORING_CACHE_BYTES:
                return parts
            whole = (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts]))
            self.cache[key] = whole
        return [(whole[0][:, c0:c1], whole[1][c0:c1]) for c0, c1 in batches]

    def w_errors(self, j: int, cands: torch.Tensor, xq) -> torch.Tensor:
        """Per-row MSE (n, out) of weight format j's candidates (n, out), X quantized as ``xq``
        (``x_codes`` of one candidate)."""
        x_limbs, fx = xq
        n, (d_out, d_in), tokens = cands.shape[0], self.w.shape, self.x.shape[0]
        rhs = [v[0].T.contiguous() for v in x_limbs]  # (in, tokens) per limb
        L = self.w_limbs[j]
        batches = self._batches(n, (16 + L) * d_out * d_in + 8 * d_out * tokens)
        codes = self._codes(
            ("w", j), cands, lambda c: self.w_codes(j, c), L * d_out * d_in, batches
        )
        err = torch.empty(n, d_out)
        for (c0, c1), (w_limbs, fw) in zip(batches, codes):
            k = c1 - c0
            lhs = [v.reshape(k * d_out, d_in) for v in w_limbs]
            Y = _limb_mm(lhs, rhs).view(k, d_out, tokens)
            Y.mul_((fw * fx).float()[:, :, None]).sub_(self.target_t).square_()
            torch.mean(Y, dim=2, out=err[c0:c1])
        return err

    def a_errors(self, j: int, cands: torch.Tensor, wq) -> torch.Tensor:
        """MSE (n,) of activation format j's candidates (n,), W quantized as ``wq`` (``w_codes``
        of one candidate)."""
        w_limbs, fw = wq  # (limbs, 1, out, in), (1, out)
        n, (tokens, d_in), d_out = cands.shape[0], self.x.shape, self.w.shape[0]
        rhs = [v[0].T.contiguous() for v in w_limbs]  # (in, out) per limb
        L = self.a_limbs[j]
        batches = self._batches(n, (16 + L) * tokens * d_in + 8 * tokens * d_out)
        codes = self._codes(
            ("a", j), cands, lambda c: self.x_codes(j, c), L * tokens * d_in, batches
        )
        err = torch.empty(n)
        for (c0, c1), (x_limbs, fx) in zip(batches, codes):
            k = c1 - c0
            lhs = [v.reshape(k * tokens, d_in) for v in x_limbs]
            Y = _limb_mm(lhs, rhs).view(k, tokens, d_out)
            Y.mul_((fx[:, None] * fw).float()[:, None, :]).sub_(self.target).square_()
            torch.mean(Y, dim=(1, 2), out=err[c0:c1])
        return err


@takes_tensors
def search(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
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
    """Joint format / exponent-bias search for one linear: paper section 4.1 (joint format and max
    value search), with section 4.2's pre-shifted bias when ``preshifted`` (the reference's
    algorithm, in torch: every bias step tunes every candidate format, then the format steps
    compare the searched candidates; see ``lowbit.reference.fpq.search``).

    The candidates of a bias step are scored in batches (a leading candidate dimension, one GEMM
    per batch of at most ``SEARCH_CHUNK_BYTES``) instead of one quantize + GEMM each; the first
    of equal errors wins, as in the reference. A bias step whose inputs (the other tensor's format
    and biases) did not change since the same step last ran is skipped: it would return the
    current biases (they are its first candidates and were the best of the same errors).
    float64 inputs: float64 GEMMs, the reference's results bit for bit. float32 inputs on CPU
    with formats of at most 4-bit-like code ranges (every 4-bit search; see ``_IntScorer``):
    exact integer GEMMs on the codes, float32 errors. Otherwise float32 GEMMs. The quantizer is
    exact throughout. Returns ``FPQSearchResult`` holding torch tensors (float64 biases, int64
    shifts).
    """
    return _search(
        x, w, b, wbits=wbits, abits=abits, preshifted=preshifted, gamma1=gamma1, gamma2=gamma2,
        n_candidates=n_candidates, rounds=rounds, search_space=search_space, w_formats=w_formats,
        a_formats=a_formats,
    )  # fmt: skip


def _search(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    *,
    wbits: int,
    abits: int,
    preshifted: bool,
    gamma1: float,
    gamma2: float,
    n_candidates: int,
    rounds: int,
    search_space: str,
    w_formats: list[FPFormat] | None,
    a_formats: list[FPFormat] | None,
    int_scoring: bool = True,
) -> FPQSearchResult:
    """``search``; ``int_scoring=False`` forces the float GEMM path (for tests and benchmarks)."""
    _check_search_args(x, w, wbits, abits, gamma1, gamma2, n_candidates, rounds, search_space)
    if b is not None:
        _check_layer_bias(tuple(b.shape), w.shape[0])
    wfmts = [_check_format(f, "w_formats[i]") for f in (w_formats or default_formats(wbits))]
    afmts = [_check_format(f, "a_formats[i]") for f in (a_formats or default_formats(abits))]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    itemsize = torch.finfo(work).bits // 8
    x = x.to(work)
    w = w.to(work)
    dev = x.device
    tokens, d_in, d_out = x.shape[0], x.shape[1], w.shape[0]
    bias_vec = torch.zeros(d_out, dtype=work, device=dev) if b is None else b.to(work)
    y_fp = x @ w.T + bias_vec  # (tokens, out)
    y_fp_t = y_fp.T.contiguous()  # (out, tokens): the weight step's GEMM output layout
    factors = (
        gamma1
        + torch.arange(n_candidates + 1, dtype=torch.float64, device=dev)
        * (gamma2 - gamma1)
        / n_candidates
    )
    # log2 as NumPy computes it (the reference's), once per search: identical 'max' candidates
    log2_factors = torch.from_numpy(np.log2(factors.cpu().numpy())).to(dev)

    w_absmax = w.abs().amax(dim=1)
    w_b0 = [bias_from_max(w_absmax, f) for f in wfmts]
    w_cur = [v.clone() for v in w_b0]
    w_grid = [_candidates(v, factors, log2_factors, search_space) for v in w_b0]  # (k+1, out)
    a_b0c = [bias_from_max(x.abs().amax(dim=0), f) for f in afmts] if preshifted else []
    if preshifted:
        a_b0 = [v.min() for v in a_b0c]
    else:
        a_b0 = [bias_from_max(x.abs().amax(), f) for f in afmts]
    a_cur = [v.clone() for v in a_b0]
    a_grid = [_candidates(v, factors, log2_factors, search_space) for v in a_b0]  # (k+1,)

    def mse(y: torch.Tensor, dim=None) -> torch.Tensor:
        d = y.sub_(y_fp).square_()  # in place: y is a fresh GEMM output
        return d.mean() if dim is None else d.mean(dim=dim)

    def a_effective(j: int, t: torch.Tensor) -> torch.Tensor:
        if not preshifted:
            return t
        t_out, k = preshift(a_b0c[j], afmts[j], tensor_bias=t)
        return t_out + k

    def a_effective_many(j: int, t: torch.Tensor) -> torch.Tensor:
        """(n,) tensor-bias candidates -> the (n, 1, 1) or (n, 1, in) biases X is quantized with:
        ``a_effective`` (``preshift``'s formula) for each candidate, in one tensor operation."""
        if not preshifted:
            return t[:, None, None]
        z = torch.round(t)[:, None]  # (n, 1) zero points round(t)
        k = torch.minimum(
            torch.maximum(torch.round(a_b0c[j])[None], z), z + 2 ** afmts[j].ebits - 1
        )
        return (t[:, None] + (k - z))[:, None, :]  # t + k_c, (n, 1, in)

    def output(iw: int, wb: torch.Tensor, ia: int, ab: torch.Tensor) -> torch.Tensor:
        return linear(x, w, afmts[ia], a_effective(ia, ab), wfmts[iw], wb, bias_vec)

    bufs = _Buffers(dev)
    q_out = work != torch.float64  # float32 work: the quantized operand gets its own array

    def float_w_errors(j: int, cands: torch.Tensor, XqT: torch.Tensor) -> torch.Tensor:
        """Per-row MSE (n, out) of format j's weight candidates (n, out), X quantized (fixed):
        XqT (in, tokens)."""
        n = cands.shape[0]
        c = min(n, _batch((16 + itemsize * q_out) * d_out * d_in + itemsize * d_out * tokens, dev))
        err = torch.empty(n, d_out, dtype=work, device=dev)
        for c0 in range(0, n, c):
            k = min(c, n - c0)
            shape = (k, d_out, d_in)
            Wq = _fake_quant_into(
                w,
                wfmts[j],
                cands[c0 : c0 + k, :, None],
                bufs.get("y", shape, torch.float64),
                bufs.get("step", shape, torch.float64),
                bufs.get("q", shape, work) if q_out else None,
            )  # (k, out, in)
            Yt = torch.matmul(Wq, XqT, out=bufs.get("Y", (k, d_out, tokens), work))
            Yt.add_(bias_vec[:, None]).sub_(y_fp_t).square_()  # (k, out, tokens)
            torch.mean(Yt, dim=2, out=err[c0 : c0 + k])  # per output column
        return err

    def float_a_errors(j: int, cands: torch.Tensor, WqT: torch.Tensor) -> torch.Tensor:
        """MSE (n,) of format j's activation tensor-bias candidates, W quantized (fixed): WqT
        (in, out)."""
        n = cands.shape[0]
        c = min(n, _batch((16 + itemsize * q_out) * tokens * d_in + itemsize * tokens * d_out, dev))
        err = torch.empty(n, dtype=work, device=dev)
        for c0 in range(0, n, c):
            k = min(c, n - c0)
            shape = (k, tokens, d_in)
            Xq = _fake_quant_into(
                x,
                afmts[j],
                a_effective_many(j, cands[c0 : c0 + k]),
                bufs.get("y", shape, torch.float64),
                bufs.get("step", shape, torch.float64),
                bufs.get("q", shape, work) if q_out else None,
            )  # (k, tokens, in)
            Y = torch.matmul(Xq, WqT, out=bufs.get("Y", (k, tokens, d_out), work))
            Y.add_(bias_vec).sub_(y_fp).square_()  # (k, tokens, out)
            torch.mean(Y, dim=(1, 2), out=err[c0 : c0 + k])
        return err

    scorer = None
    if int_scoring and _IntScorer.applies(x):
        scorer = _IntScorer(x, w, y_fp - bias_vec, wfmts, afmts, a_b0c, preshifted, bufs)

    # w_cur / a_cur are always one of [b0, grid] (their first entries): their indices there
    w_idx = [torch.zeros(d_out, dtype=torch.long, device=dev) for _ in wfmts]
    a_idx = [0 for _ in afmts]

    def search_w_bias(j: int, ja: int, xq_int, xq_float) -> torch.Tensor:
        """Format j's per-output-channel best over [current, b0, grid], X quantized (fixed) in
        format ja: as integer codes (``xq_int()``) or float (``xq_float()``, (in, tokens))."""
        fixed = torch.cat([w_b0[j][None], w_grid[j]])  # (n, out): the same every round
        if scorer is not None and scorer.pays(j, ja):
            # the current biases' errors are among the fixed candidates' (exact products)
            err = scorer.w_errors(j, fixed, xq_int())
            err = torch.cat([err.gather(0, w_idx[j][None]), err])
        else:
            err = float_w_errors(j, torch.cat([w_cur[j][None], fixed]), xq_float())
        # the reference keeps a candidate only when strictly better: NaN never wins
        err = torch.where(torch.isnan(err), torch.inf, err)
        best = torch.argmin(err, dim=0)  # (out,) the first of equal errors, per column
        w_idx[j] = torch.where(best == 0, w_idx[j], best - 1)
        return fixed.gather(0, w_idx[j][None]).squeeze(0)

    def search_a_bias(j: int, jw: int, wq_int, wq_float) -> torch.Tensor:
        """Format j's best tensor (part of the) bias over [current, b0, grid], W quantized
        (fixed) in format jw: as integer codes (``wq_int()``) or float (``wq_float()``, (in, out))."""
        fixed = torch.cat([a_b0[j][None], a_grid[j]])  # (n,)
        if scorer is not None and scorer.pays(jw, j):
            err = scorer.a_errors(j, fixed, wq_int())
            err = torch.cat([err[a_idx[j]][None], err])
        else:
            err = float_a_errors(j, torch.cat([a_cur[j][None], fixed]), wq_float())
        best = int(torch.argmin(err))  # the first of equal errors (and NumPy's NaN rule)
        if best:
            a_idx[j] = best - 1
        return fixed[a_idx[j]]

    def quantized_x_t(j: int, t: torch.Tensor) -> torch.Tensor:
        return quantize(x, afmts[j], a_effective(j, t)).to(work).T.contiguous()  # (in, tokens)

    def quantized_w_t(j: int, wb: torch.Tensor) -> torch.Tensor:
        return quantize(w, wfmts[j], wb[:, None]).to(work).T.contiguous()  # (in, out)

    iw = min(range(len(wfmts)), key=lambda i: abs(wfmts[i].mbits - (wbits - 1) // 2))
    ia = min(range(len(afmts)), key=lambda i: abs(afmts[i].mbits - (abits - 1) // 2))
    w_seen: tuple[int, torch.Tensor] | None = None  # what the last weight step saw
    a_seen: tuple[int, torch.Tensor] | None = None

    for _ in range(int(rounds)):
        steps = ("wb", "ab", "wf", "af") if preshifted else ("wb", "wf", "ab", "af")
        for step_name in steps:
            if step_name == "wb":
                if w_seen is not None and w_seen[0] == ia and torch.equal(w_seen[1], a_cur[ia]):
                    continue  # same quantized X as last time: every format keeps its biases
                w_seen = (ia, a_cur[ia])
                xq_int = _once(partial(scorer.x_codes, ia, a_cur[ia][None]) if scorer else None)
                xq_float = _once(partial(quantized_x_t, ia, a_cur[ia]))
                for j in range(len(wfmts)):
                    w_cur[j] = search_w_bias(j, ia, xq_int, xq_float)
            elif step_name == "ab":
                if a_seen is not None and a_seen[0] == iw and torch.equal(a_seen[1], w_cur[iw]):
                    continue  # same quantized W as last time
                a_seen = (iw, w_cur[iw])
                wq_int = _once(partial(scorer.w_codes, iw, w_cur[iw][None]) if scorer else None)
                wq_float = _once(partial(quantized_w_t, iw, w_cur[iw]))
                for j in range(len(afmts)):
                    a_cur[j] = search_a_bias(j, iw, wq_int, wq_float)
            elif step_name == "wf":  # linear()'s arithmetic, the fixed X quantized once
                Xq = quantize(x, afmts[ia], a_effective(ia, a_cur[ia])).to(work)
                errs = torch.stack(
                    [mse(Xq @ quantize(w, f, v[:, None]).to(work).T + bias_vec)
                     for f, v in zip(wfmts, w_cur)]
                )  # fmt: skip
                iw = int(torch.argmin(errs))
            else:  # the fixed W quantized once
                WqT = quantize(w, wfmts[iw], w_cur[iw][:, None]).to(work).T
                errs = torch.stack(
                    [mse(quantize(x, f, a_effective(j, a_cur[j])).to(work) @ WqT + bias_vec)
                     for j, f in enumerate(afmts)]
                )  # fmt: skip
                ia = int(torch.argmin(errs))

    shift = preshift(a_b0c[ia], afmts[ia], tensor_bias=a_cur[ia])[1] if preshifted else None
    return FPQSearchResult(
        w_format=wfmts[iw],
        a_format=afmts[ia],
        w_bias=w_cur[iw],
        a_bias=a_effective(ia, a_cur[ia]).to(torch.float64),
        a_tensor_bias=a_cur[ia].to(torch.float64),
        a_shift=shift,
        mse=float(mse(output(iw, w_cur[iw], ia, a_cur[ia]))),
    )


# ---- calibration driver (the official code's layer-wise calibration) --------------------------------


def _capture_inputs(
    model: torch.nn.Module, names: list[str], run: Callable[[], None], max_tokens: int | None = None
) -> dict[str, torch.Tensor]:
    """Run ``run()`` once with forward hooks on the named linears; return their inputs as
    (tokens, in) float32 CPU tensors (the first ``max_tokens`` tokens when given)."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(_m, args, _out, name=name):
            store[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, chunks in store.items():
        if not chunks:
            raise ValueError(
                f"linear {n!r} saw no input while calibrating: is it used in the forward pass?"
            )
        t = torch.cat(chunks)
        out[n] = t[:max_tokens] if max_tokens else t
    return out


def _search_rows(x: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """At most ``max_tokens`` rows of x for the search: every row that holds a channel's absmax
    (so the min-max initialisation equals the full data's) plus evenly spaced rows."""
    if max_tokens is None or x.shape[0] <= max_tokens:
        return x
    keep = torch.unique(x.abs().argmax(dim=0))
    spaced = torch.linspace(0, x.shape[0] - 1, max(max_tokens - keep.numel(), 1)).round().long()
    return x[torch.unique(torch.cat([keep, spaced]))]


def _calibrate_model(
    inputs: dict[str, torch.Tensor],
    linears: dict[str, torch.nn.Linear],
    progress: bool = True,
    max_tokens: int | None = None,
    desc: str = "FPQ search",
    **search_kwargs: Any,
) -> dict[str, FPQSearchResult]:
    """Search every linear on its captured full-precision inputs (the official code's
    layer-wise, non-sequential calibration: no quantization error is propagated); ``desc``
    labels the progress bar."""
    from tqdm.auto import tqdm

    results = {}
    for name in tqdm(list(linears), desc=desc, disable=not progress, leave=False):
        lin = linears[name]
        results[name] = search(
            _search_rows(inputs[name], max_tokens).to(lin.weight.device),
            lin.weight.detach().float(),
            None if lin.bias is None else lin.bias.detach().float(),
            **search_kwargs,
        )
    return results


def _quantize_model(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    minmax: tuple[Any, Any] | None = None,
    progress: bool = True,
    max_tokens: int | None = None,
    **search_kwargs: Any,
) -> dict[str, FPQSearchResult]:
    """Swap ``FPQLinear`` into every linear of ``model`` that has captured ``inputs``.

    ``minmax=(w_format, a_format)``: fixed formats with min-max biases (the paper's MinMax rows);
    otherwise ``search(**search_kwargs)`` per layer. Returns the search results (empty for MinMax).
    """
    from lowbit.fast.convert import replace_linears
    from lowbit.fast.nn import FPQLinear

    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n in inputs
    }
    results: dict[str, FPQSearchResult] = {}
    if minmax is None:
        results = _calibrate_model(inputs, linears, progress, max_tokens, **search_kwargs)

    def make(name: str, lin: torch.nn.Linear) -> torch.nn.Module | None:
        if name not in linears:
            return None
        if minmax is None:
            return FPQLinear.from_linear(lin, result=results[name])
        return FPQLinear.from_linear(
            lin, w_format=minmax[0], a_format=minmax[1], calib_inputs=inputs[name]
        )

    replace_linears(model, make, skip=(), progress=False)
    return results
