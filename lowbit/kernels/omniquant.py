"""Triton kernels for OmniQuant: the W4A16 dequantize-GEMM of ``OmniQuantLinear`` and the
dynamic per-token asymmetric activation quantizer.

**W4A16 linear** (``w4a16_linear``): Y = X · Ŵᵀ + b with Ŵ = (q − z) · s per group of G inputs.
The 4-bit codes stay packed in memory (two per byte, low nibble first: ``formats.pack``'s
layout) and are unpacked in registers. Each K-step lies inside one group (BLOCK_K divides G),
so the group's scale and zero point are one value per output column, and the dequantization
moves out of the inner product:

    Σ_k x_k (q_k − z) s = s · (Σ_k x_k q_k − z · Σ_k x_k)

The codes 0..15 are exact in fp16/bf16, so the tensor-core product x · q has exact products
and float32 sums; no rounded weight value is ever formed (which a bf16 Ŵ would need). The
epilogue adds the bias and casts to X's dtype. Hopper has no INT4 tensor cores; this is a
16-bit dot on unpacked codes.

**Per-token activation quantizer** (``quantize_activation``): one program per row; pass 1 takes
the row's min and max, pass 2 writes (clamp(rint(x / s) + z, 0, 2^b − 1) − z) · s with
s = clamp((max − min) / (2^b − 1), 1e-5, 1e4), z = rint(clamp(−min / s, −1e4, 1e4)): bit for
bit ``lowbit.fast.omniquant.quantize_activation`` (a row holding NaN comes out all NaN, as
there; ±Inf saturates the scale at 1e4, as there). Divisions are ``div_rn`` (IEEE; Triton's
``/`` may be approximate on GPU) and rint is ``(|v| + 2^23) − 2^23`` with the sign put back,
which rounds half to even for every float32 (values from 2^23 up are integers already) and
which the interpreter executes too.

Launchers (callable directly, also under ``TRITON_INTERPRET=1`` on CPU): ``w4a16_linear(x,
packed, scale, zero, bias=None, *, group_size)`` and ``quantize_activation(x, bits)``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["w4a16_linear", "quantize_activation", "block_k_for"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rint(v):
    """Round half to even for any float32 (|v| >= 2^23 is an integer already)."""
    a = tl.abs(v)
    r = tl.where(a < 8388608.0, (a + 8388608.0) - 8388608.0, a)
    return tl.where(v < 0, -r, r)


@triton.jit
def _act_quant_kernel(
    x_ptr,  # (M, K) input rows, float16/bfloat16/float32
    out_ptr,  # (M, K) fake-quantized output, x's dtype
    K,  # row length
    stride_xm,  # row stride of x (elements; columns contiguous)
    stride_om,  # row stride of out
    levels,  # 2^bits - 1, as float32
    BLOCK_K: tl.constexpr,  # columns per step
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    hi = tl.full([BLOCK_K], float("-inf"), tl.float32)
    lo = tl.full([BLOCK_K], float("inf"), tl.float32)
    nan = tl.zeros([BLOCK_K], tl.int32)  # tl.maximum drops NaN; torch's amax keeps it
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = cols < K
        v = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        hi = tl.maximum(hi, tl.where(ok, v, float("-inf")))
        lo = tl.minimum(lo, tl.where(ok, v, float("inf")))
        nan = tl.maximum(nan, (v != v).to(tl.int32))
    x_max = tl.max(hi, axis=0)
    x_min = tl.min(lo, axis=0)
    s = tl.math.div_rn(x_max - x_min, levels)
    s = tl.minimum(tl.maximum(s, 1e-5), 1e4)
    s = tl.where(tl.max(nan, axis=0) > 0, float("nan"), s)  # a NaN row comes out all NaN
    z = _rint(tl.minimum(tl.maximum(tl.math.div_rn(-x_min, s), -1e4), 1e4))
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = cols < K
        v = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(v, s)) + z, 0.0), levels)
        y = (q - z) * s
        tl.store(out_ptr + row * stride_om + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


# Bytes: reads x twice (the second pass mostly from L2) and writes it once: about
# 3 * itemsize * M * K at worst. FLOPs: negligible (memory bound).
def quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Launch ``_act_quant_kernel`` on a 2-D tensor ``x`` (M, K): per-row (token) asymmetric
    fake quantization at ``bits`` (2..15), in x's dtype."""
    if x.ndim != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"quantize_activation expects a 2-D float16/bfloat16/float32 tensor, got {tuple(x.shape)} {x.dtype}"
        )
    x = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if M == 0 or K == 0:
        return out
    block_k = min(4096, triton.next_power_of_2(max(K, 16)))
    _act_quant_kernel[(M,)](
        x, out, K, x.stride(0), out.stride(0), float(2**bits - 1), BLOCK_K=block_k,
        # no fma contraction: (q - z) * s and the divisions must round as the torch path does
        **({} if _interpreting() else {"enable_fp_fusion": False}),
    )  # fmt: skip
    return out


@triton.jit
def _w4a16_kernel(
    x_ptr,  # (M, K) activations, float16/bfloat16/float32
    w_ptr,  # (N, K // 2) uint8 packed codes: byte j of row n holds k = 2j (low) and 2j + 1 (high)
    s_ptr,  # (N, K // G) float32 group scales
    z_ptr,  # (N, K // G) int16 group zero points
    bias_ptr,  # (N,) bias (if HAS_BIAS)
    out_ptr,  # (M, N) output, x's dtype
    M,  # tokens
    N,  # output features
    K,  # input features (a multiple of G)
    G,  # group size (a multiple of BLOCK_K)
    stride_xm,  # x row stride (elements; columns contiguous)
    stride_wn,  # packed row stride (bytes)
    stride_sn,  # scale / zero row stride (elements)
    stride_om,  # output row stride
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,  # the product in float32 (fp32 input, or the interpreter)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # even, divides G
    GROUP_M: tl.constexpr,  # grouped tile order for L2 reuse (Triton matmul tutorial)
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)
    m_ok = offs_m < M
    n_ok = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
            mask=m_ok[:, None],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        packed = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_b)[None, :],
            mask=n_ok[:, None],
            other=0,
        )  # (BLOCK_N, BLOCK_K // 2) uint8
        codes = tl.join(packed & 0xF, packed >> 4)  # (BLOCK_N, BLOCK_K // 2, 2): k = 2j, 2j + 1
        codes = tl.reshape(codes, (BLOCK_N, BLOCK_K))
        g = k0 // G
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0.0)  # (BLOCK_N,)
        z = tl.load(z_ptr + offs_n * stride_sn + g, mask=n_ok, other=0).to(tl.float32)
        xf = x.to(tl.float32)
        if DOT_F32:
            xq = tl.dot(xf, tl.trans(codes.to(tl.float32)), input_precision="ieee")
        else:
            xq = tl.dot(x, tl.trans(codes.to(x.dtype)))  # codes 0..15: exact in 16 bits
        x_sum = tl.sum(xf, axis=1)  # (BLOCK_M,)
        acc += (xq - x_sum[:, None] * z[None, :]) * s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def block_k_for(group_size: int) -> int | None:
    """The K-step of ``w4a16_linear`` for a group size: the largest power of two <= 128 that
    divides it (at least 16, what ``tl.dot`` needs), or None when there is none."""
    for bk in (128, 64, 32, 16):
        if group_size % bk == 0:
            return bk
    return None


# FLOPs: 2 * M * N * K (16-bit dot on unpacked codes) + M * K (row sums per N tile).
# Bytes: M * K * itemsize (X, re-read per N tile from L2) + N * K / 2 (packed codes)
# + 6 * N * K / G (scales and zero points) + M * N * itemsize (Y). Decode (M <= 16) is bound by
# the N * K / 2 code bytes: a quarter of a bf16 weight's traffic.
def w4a16_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    group_size: int,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launch ``_w4a16_kernel``: Y = X · ((q − z) · s)ᵀ + b from packed 4-bit codes.

    ``x`` (M, K) float16/bfloat16/float32; ``packed`` (N, K / 2) uint8; ``scale`` (N, K / G)
    float32; ``zero`` (N, K / G) int16; K a multiple of ``group_size``, which needs a K-step
    (``block_k_for``). Returns (M, N) in x's dtype.
    """
    M, K = x.shape
    N = packed.shape[0]
    block_k = block_k_for(group_size)
    if block_k is None or K % group_size or packed.shape[1] * 2 != K:
        raise ValueError(
            f"w4a16_linear needs K={K} a multiple of group_size={group_size} (itself a multiple of 16) and packed codes (N, K/2), got {tuple(packed.shape)}"
        )
    if packed.dtype != torch.uint8 or zero.dtype != torch.int16 or scale.dtype != torch.float32:
        raise ValueError(
            f"w4a16_linear needs uint8 codes, float32 scales and int16 zero points, got {packed.dtype}, {scale.dtype}, {zero.dtype}"
        )
    x = x if x.stride(-1) == 1 else x.contiguous()
    packed, scale, zero = packed.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    interp = _interpreting()
    if block_m is None:
        block_m = 16 if interp or M <= 16 else (64 if M <= 64 else 128)
    if block_n is None:
        block_n = 32 if interp else (64 if M <= 16 else 128)
    if interp:
        block_k = min(block_k, 32)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    launch = (
        {} if interp else {"num_warps": 4 if block_m * block_n <= 64 * 64 else 8, "num_stages": 3}
    )
    _w4a16_kernel[grid](
        x, packed, scale, zero, bias if bias is not None else scale, out,
        M, N, K, group_size,
        x.stride(0), packed.stride(0), scale.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, DOT_F32=interp or x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, **launch,
    )  # fmt: skip
    return out
