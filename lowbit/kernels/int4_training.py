"""Triton kernels for 4-bit training (arXiv 2306.11987): the fused block-Hadamard + LSQ
quantizer of the forward, and the bit-splitting gradient quantizer of the backward.

* ``_hadamard_quantize_kernel`` (PERF M7): one program per (BLOCK_M rows) x (one Hadamard
  block of B channels). It loads the tile once, runs the butterfly stages of
  ``lowbit.fast.hadamard`` in registers (each stage a reshape to (rows, B / 2h, 2, h), a split of
  the pair axis into a and b, and a join of (a + b, a - b): the same additions in the same
  order, so the transform is bit for bit the torch path's), scales by 1/sqrt(B), divides by the
  LSQ step read from device memory (no host sync), rounds (half away from zero, or half to even
  by the 1.5 * 2^23 trick) and clamps to [-Qn, Qp]. It writes the int8 codes and, for the
  backward's LSQ gradient, optionally the transformed values X~. Bytes: read M·K·(2|4), write
  M·K (+ M·K·4 with X~); no FLOPs worth counting (log2(B) additions per element).
* ``_bit_split_kernel`` (PERF M8): one program per BLOCK_M rows of the output gradient G
  (N, out): t = G · sigma (sigma from a device scalar), F = clamp(rint(t / nb)), the residual's
  stochastic rounding with the reference's counter-based hash (so the codes are bit for bit the
  reference's), and the integer row sums of F^2 and S^2 that the leverage scores need. Bytes:
  read N·out·(2|4), write 2·N·out + 16·N.

The GEMMs are the int8 kernel of ``lowbit.kernels.int8`` with ``out_int32=True`` (Hopper has no
INT4 tensor cores; codes in [-8, 7] multiply exactly in int8 with int32 accumulation).

Launchers (also run under ``TRITON_INTERPRET=1`` on CPU): ``hadamard_quantize(x, step, block,
bits=4, rounding="half_away", keep_transform=False)`` -> (codes, X~ or None);
``bit_split(g, sigma, bits=4, clip="code", seed=0)`` -> (F, S, sum F², sum S²).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["hadamard_quantize", "bit_split"]

_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds half to even


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rint(v):
    """Round half to even in float32 (|v| < 2^22)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _round_half_away(v):
    whole = tl.where(v < 0, -tl.floor(-v), tl.floor(v))  # trunc
    frac = tl.abs(v - whole)
    step = tl.where(v < 0, -1.0, 1.0)
    return tl.where(frac >= 0.5, whole + step, whole)


@triton.jit
def _hadamard_quantize_kernel(
    x_ptr,  # (M, K) float input
    step_ptr,  # 0-d float32 LSQ step (|step|, floored by the caller)
    codes_ptr,  # (M, K) int8 output codes
    t_ptr,  # (M, K) float32 transformed values X~ (written when KEEP_T)
    M,
    K,
    stride_xm,
    stride_xk,
    stride_cm,
    stride_ck,
    stride_tm,
    stride_tk,
    scale,  # float32(1 / sqrt(B)), rounded on the host as the torch path does
    QN: tl.constexpr,  # codes are clamped to [-QN, QP]
    QP: tl.constexpr,
    B: tl.constexpr,  # Hadamard block (power of two)
    LOG2_B: tl.constexpr,
    HALF_AWAY: tl.constexpr,
    KEEP_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)  # which Hadamard block along K
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_b * B + tl.arange(0, B)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    y = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    y = y.to(tl.float32)
    for i in tl.static_range(LOG2_B):
        h: tl.constexpr = 1 << i
        pairs = tl.reshape(y, (BLOCK_M, B // (2 * h), 2, h))
        a, b = tl.split(tl.permute(pairs, (0, 1, 3, 2)))  # (rows, B/2h, h) each
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (BLOCK_M, B))
    y = y * scale
    if KEEP_T:
        tl.store(t_ptr + rows[:, None] * stride_tm + cols[None, :] * stride_tk, y, mask=mask)
    step = tl.load(step_ptr)
    v = tl.div_rn(y, step)
    if HALF_AWAY:
        q = _round_half_away(v)
    else:
        q = _rint(tl.minimum(tl.maximum(v, -4194304.0), 4194304.0))  # |v| < 2^22 for the trick
    q = tl.minimum(tl.maximum(q, -QN), QP)
    tl.store(
        codes_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_ck, q.to(tl.int8), mask=mask
    )


def hadamard_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    block: int,
    bits: int = 4,
    rounding: str = "half_away",
    keep_transform: bool = False,
    block_m: int | None = None,
):
    """LSQ codes of block_hadamard(x, block) / step, fused: (codes int8 (M, K), X~ or None).

    ``x`` (M, K) float32/float16/bfloat16; ``step`` a 0-d float32 tensor on x's device (the
    caller's |step|, floored); ``block`` a power of two dividing K, at most 256.
    """
    M, K = x.shape
    if block < 1 or block & (block - 1) or K % block or block > 256:
        raise ValueError(f"block={block} must be a power of two <= 256 dividing K={K}")
    codes = torch.empty((M, K), dtype=torch.int8, device=x.device)
    t = torch.empty((M, K), dtype=torch.float32, device=x.device) if keep_transform else codes
    if M == 0 or K == 0:
        return codes, (t if keep_transform else None)
    if block_m is None:
        block_m = max(1, min(64, 4096 // block)) if not _interpreting() else 16
    grid = (triton.cdiv(M, block_m), K // block)
    _hadamard_quantize_kernel[grid](
        x,
        step.reshape(()).to(torch.float32),
        codes,
        t,
        M,
        K,
        x.stride(0),
        x.stride(1),
        codes.stride(0),
        codes.stride(1),
        t.stride(0),
        t.stride(1),
        float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32)),
        QN=2 ** (bits - 1),
        QP=2 ** (bits - 1) - 1,
        B=block,
        LOG2_B=block.bit_length() - 1,
        HALF_AWAY=rounding == "half_away",
        KEEP_T=keep_transform,
        BLOCK_M=block_m,
    )
    return codes, (t if keep_transform else None)


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _bit_split_kernel(
    g_ptr,  # (N, C) float output gradient
    sigma_ptr,  # 0-d float32 sigma
    f_ptr,  # (N, C) int8 high part
    s_ptr,  # (N, C) int8 residual part
    f_norm_ptr,  # (N,) int32 sum of F^2 per row
    s_norm_ptr,  # (N,) int32 sum of S^2 per row
    N,
    C,
    stride_gn,
    stride_gc,
    key,  # the hash key of (seed, stream 0), as the reference computes it
    NB: tl.constexpr,  # 2^bits - 2
    LOW: tl.constexpr,  # the clamp of both parts
    HIGH: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    sigma = tl.load(sigma_ptr)
    f_acc = tl.zeros((BLOCK_M,), dtype=tl.int32)
    s_acc = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < N) & (cols[None, :] < C)
        g = tl.load(
            g_ptr + rows[:, None] * stride_gn + cols[None, :] * stride_gc, mask=mask, other=0.0
        )
        t = g.to(tl.float32) * sigma
        hi = tl.minimum(tl.maximum(_rint(tl.div_rn(t, NB * 1.0)), LOW), HIGH)
        r = t - NB * hi
        if STOCHASTIC:
            index = (rows[:, None] * C + cols[None, :]).to(tl.uint32)  # row-major element index
            k = key.to(tl.uint32)
            bits = _hash32(_hash32(index ^ k) + k)
            u = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
            r_floor = tl.floor(r)
            lo = r_floor + tl.where(u < r - r_floor, 1.0, 0.0)
        else:
            lo = _rint(r)
        lo = tl.minimum(tl.maximum(lo, LOW), HIGH)
        hi_i = tl.where(mask, hi.to(tl.int32), 0)
        lo_i = tl.where(mask, lo.to(tl.int32), 0)
        offs = rows[:, None] * C + cols[None, :]
        tl.store(f_ptr + offs, hi_i.to(tl.int8), mask=mask)
        tl.store(s_ptr + offs, lo_i.to(tl.int8), mask=mask)
        f_acc += tl.sum(hi_i * hi_i, axis=1)
        s_acc += tl.sum(lo_i * lo_i, axis=1)
    tl.store(f_norm_ptr + rows, f_acc, mask=rows < N)
    tl.store(s_norm_ptr + rows, s_acc, mask=rows < N)


def bit_split(
    g: torch.Tensor,
    sigma: torch.Tensor,
    key: int,
    bits: int = 4,
    clip: str = "code",
    residual: str = "stochastic",
    block_m: int | None = None,
    block_c: int | None = None,
):
    """The split codes of ``g`` (N, C) for a given ``sigma`` (0-d float32 on g's device):
    (F int8, S int8, sum F² int32 (N,), sum S² int32 (N,)). ``key`` is the residual stream's hash
    key (``lowbit.fast.int4_training._stream_key(seed, 0)``)."""
    N, C = g.shape
    Qn, Qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    nb = 2**bits - 2
    low, high = (-(nb // 2 - 1), nb // 2 - 1) if clip == "code" else (-Qn, Qp)
    F = torch.empty((N, C), dtype=torch.int8, device=g.device)
    S = torch.empty((N, C), dtype=torch.int8, device=g.device)
    f_norm = torch.zeros(N, dtype=torch.int32, device=g.device)
    s_norm = torch.zeros(N, dtype=torch.int32, device=g.device)
    if N == 0 or C == 0:
        return F, S, f_norm, s_norm
    if block_m is None:
        block_m = 16 if _interpreting() else 32
    if block_c is None:
        block_c = 32 if _interpreting() else 128
    _bit_split_kernel[(triton.cdiv(N, block_m),)](
        g,
        sigma.reshape(()).to(torch.float32),
        F,
        S,
        f_norm,
        s_norm,
        N,
        C,
        g.stride(0),
        g.stride(1),
        key,
        NB=nb,
        LOW=low,
        HIGH=high,
        STOCHASTIC=residual == "stochastic",
        BLOCK_M=block_m,
        BLOCK_C=block_c,
    )
    return F, S, f_norm, s_norm
