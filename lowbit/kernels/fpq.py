"""Triton kernels for LLM-FP4 (FPQ): fake quantization / encoding with a real exponent bias in one
pass, and a W4A4 / W4A8 FP linear that decodes FP codes in registers and runs ``tl.dot``.

The quantizer (``lowbit.reference.fpq``) is ``Q_b(x) = 2^-b Q_0(x 2^b)``. A real bias is realised
as 2^b = 2^floor(b) * fl32(2^frac(b)); the launcher receives 2^b and 2^-b as float64 tensors that
broadcast against x (per tensor, per channel, per token). The kernel works in float64, where
``x * 2^b`` is exact for float32/bf16/fp16 inputs, reads the binade from the float64 exponent
bits (exact at powers of two, like ``frexp``) and rounds half to even with the 1.5 * 2^52 trick,
so results are bit-identical to the reference for float32 (bf16/fp16 outputs are rounded through
float32 like the reference). Float64 ALU work is a handful of operations per element; the kernel
stays memory-bound on H100-class GPUs (fp64 at 1/2 of fp32 rate).

The linear keeps the pre-shifted bias folded (paper section 4.2): activation codes are written
with per-channel bias t + k_c and read *raw* (bias 0); weight codes (per-output-channel bias b_o,
optionally two 4-bit codes per byte) are read with exponent shifted by -k_c, so the inner product
runs on exact FP grid values ``raw_x * raw_w * 2^-k_c`` and the real scales 2^-t and 2^-b_o are
applied once in the epilogue. Decoded values have <= 8 significant bits: exact in bf16, so the GPU
path feeds bf16 operands to ``tl.dot`` (fp32 accumulation); the interpreter uses fp32 operands.

Launchers (callable directly, also under ``TRITON_INTERPRET=1``):

* ``fake_quant(x, ebits, mbits, scale, scale_inv=None, *, codes=False)`` -> x's dtype values, or uint8
  codes when ``codes=True``.
* ``fpq_linear(a_codes, w_codes, shifts, a_scale_inv, w_scale_inv, a_bits, w_bits, *, bias=None,
  w_packed=False, out_dtype=torch.float32)`` -> (M, N).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["supports", "fake_quant", "fpq_linear", "pack_nibbles"]

_RINT64 = 6755399441055744.0  # 1.5 * 2**52: (v + c) - c rounds half to even in float64, |v| < 2**51


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _pow2_f64(e):
    """2^e for integer e in the normal float64 range, built from the exponent bits."""
    return ((e + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _fpq_fake_quant_kernel(
    x_ptr,  # (M, K) input, float32/float16/bfloat16; element (m, k) at m * stride_xm + k * stride_xk
    out_ptr,  # (M, K) output: x's dtype (values) or uint8 (codes), contiguous rows
    scale_ptr,  # float64 2^b, addressed m * stride_sm + k * stride_sk (strides may be 0: broadcast)
    scale_inv_ptr,  # float64 2^-b, same layout as scale_ptr
    M,  # rows
    K,  # columns
    stride_xm,  # x row stride (elements)
    stride_xk,  # x column stride (elements)
    stride_om,  # out row stride (elements)
    stride_sm,  # bias row stride (0 for per-tensor / per-column bias)
    stride_sk,  # bias column stride (0 for per-tensor / per-row bias)
    QMAX0: tl.constexpr,  # (2 - 2^-M) 2^(2^E - 1): the clip max at bias 0 (exact in float32)
    EBITS: tl.constexpr,  # exponent bits E
    MBITS: tl.constexpr,  # mantissa bits M
    OUT_CODES: tl.constexpr,  # write sign|exponent|mantissa codes instead of values
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # columns per program
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    s_off = rows[:, None] * stride_sm + cols[None, :] * stride_sk
    scale = tl.load(scale_ptr + s_off, mask=mask, other=1.0)
    y = x.to(tl.float64) * scale  # x 2^b, exact
    q0 = tl.full((BLOCK_M, BLOCK_K), QMAX0, tl.float64)
    yc = tl.where(y > q0, q0, tl.where(y < -q0, -q0, y))  # 1. clip (NaN passes through)
    bits = yc.to(tl.int64, bitcast=True)
    biased = (bits >> 52) & 0x7FF  # float64 exponent field: floor(log2|yc|) + 1023 for normals
    p = tl.maximum(biased - 1023, 1)  # 2. p = max(floor(log2|y|), 1); zeros land in p = 1
    step = _pow2_f64(p - MBITS)  # 3. step 2^(p - M) in units of 2^-b
    v = yc * _pow2_f64(MBITS - p)  # exact: a power-of-two scaling
    mag = (tl.abs(v) + 6755399441055744.0) - 6755399441055744.0  # 4. round half to even
    r = tl.where(((bits >> 63) & 1) == 1, -mag, mag)  # sign restored: -0.3 and -0 give -0 like rint
    q = r * step
    if OUT_CODES:
        sign = ((q.to(tl.int64, bitcast=True) >> 63) & 1).to(tl.int32)
        a = tl.abs(q)
        e = (((a.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023).to(tl.int32)  # floor(log2 a)
        normal = a >= 2.0
        field = tl.where(normal, e, 0)
        # e >= 1 for normals; the clamp keeps zeros (e = -1023) from 0 * 2^1024 = NaN in the
        # lane tl.where discards
        mant_n = a * _pow2_f64(MBITS - tl.maximum(e, 1)) - (1 << MBITS)
        mant_s = a * _pow2_f64(tl.full(e.shape, MBITS - 1, tl.int32))
        mant = tl.where(normal, mant_n, mant_s).to(tl.int32)
        code = (sign << (EBITS + MBITS)) | (field << MBITS) | mant
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], code.to(tl.uint8), mask=mask)
    else:
        scale_inv = tl.load(scale_inv_ptr + s_off, mask=mask, other=1.0)
        xq = (q * scale_inv).to(tl.float32)  # exact in float64, one rounding to float32
        tl.store(
            out_ptr + rows[:, None] * stride_om + cols[None, :],
            xq.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


def supports(x: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether ``fake_quant`` handles this input/bias pair (a bias that broadcasts to x)."""
    if (
        x.ndim == 0
        or x.numel() == 0
        or x.dtype not in (torch.float32, torch.float16, torch.bfloat16)
    ):
        return False
    try:
        return torch.broadcast_shapes(tuple(bias.shape), tuple(x.shape)) == tuple(x.shape)
    except RuntimeError:
        return False


# Bytes: reads N·bytes(x) + writes N·bytes(out) (+ the bias, broadcast, negligible): a streaming
# kernel; goal M4 (docs/benchmarks.md) = 0.8-0.9 of copy bandwidth. FLOPs: ~12 float64 operations per element.
def fake_quant(
    x: torch.Tensor,
    ebits: int,
    mbits: int,
    scale: torch.Tensor,
    scale_inv: torch.Tensor | None = None,
    *,
    codes: bool = False,
) -> torch.Tensor:
    """One-pass FP fake quantization (or encoding) of ``x`` with 2^b = ``scale`` broadcast on x.
    ``scale_inv`` (2^-b) is needed for values only: codes do not depend on it."""
    if scale_inv is None and not codes:
        raise ValueError(
            "fake_quant needs scale_inv (2^-b) to return values; pass it or codes=True"
        )
    shape = x.shape
    K = shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    s = scale.to(torch.float64).expand(shape).reshape(M, K)
    # codes=True never reads 2^-b: the kernel gets 2^b's pointer as a placeholder
    si = s if scale_inv is None else scale_inv.to(torch.float64).expand(shape).reshape(M, K)
    if s.stride() != si.stride():
        si = si.contiguous()
        s = s.contiguous()
    out = torch.empty((M, K), device=x.device, dtype=torch.uint8 if codes else x.dtype)
    qmax0 = (2.0 - 2.0**-mbits) * 2.0 ** (2**ebits - 1)
    BLOCK_M, BLOCK_K = (16, 64) if _interpreting() else (8, 256)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K))
    _fpq_fake_quant_kernel[grid](
        x2, out, s, si, M, K,
        x2.stride(0), x2.stride(1), out.stride(0), s.stride(0), s.stride(1),
        QMAX0=qmax0, EBITS=ebits, MBITS=mbits, OUT_CODES=codes, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return out.reshape(shape)


@triton.jit
def _decode_raw(code, shift, EBITS: tl.constexpr, MBITS: tl.constexpr):
    """FP code -> its value at bias 0 times 2^-shift, in float32 (exact: <= 8 significant bits).
    Needs 2^(max(field, 1) - M - shift) to be a normal float32: true for E <= 5 and shifts
    below 2^5 (callers check, see ``FPQLinear._folded_is_exact``)."""
    field = (code >> MBITS) & ((1 << EBITS) - 1)
    mant = code & ((1 << MBITS) - 1)
    sig = tl.where(field > 0, mant + (1 << MBITS), mant)
    ex = tl.maximum(field, 1) - MBITS - shift  # value = sig 2^(max(field, 1) - M - shift)
    pow2 = ((ex + 127) << 23).to(tl.float32, bitcast=True)
    val = sig.to(tl.float32) * pow2
    return tl.where(((code >> (EBITS + MBITS)) & 1) == 1, -val, val)


@triton.jit
def _fpq_linear_kernel(
    a_ptr,  # (M, K) uint8 activation codes written at per-channel bias t + k_c
    w_ptr,  # (N, K) uint8 weight codes, or (N, K / 2) two 4-bit codes per byte (low nibble first)
    shift_ptr,  # (K,) int32 pre-shift k_c folded into the weight exponent
    a_scale_inv_ptr,  # (1,) float32 2^-t (activation tensor bias)
    w_scale_inv_ptr,  # (N,) float32 2^-b_o (weight bias per output channel)
    bias_ptr,  # (N,) layer bias (any float dtype), read only if HAS_BIAS
    out_ptr,  # (M, N) output
    M,  # tokens
    N,  # output features
    K,  # input features
    stride_am,  # a row stride (elements)
    stride_wn,  # w row stride (bytes)
    stride_om,  # out row stride (elements)
    A_EBITS: tl.constexpr,  # activation format
    A_MBITS: tl.constexpr,
    W_EBITS: tl.constexpr,  # weight format
    W_MBITS: tl.constexpr,
    W_PACKED: tl.constexpr,  # weight codes packed two per byte
    HAS_BIAS: tl.constexpr,  # add bias_ptr in the epilogue
    DOT_BF16: tl.constexpr,  # bf16 operands for tl.dot (exact for <= 8-bit significands)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        a_code = tl.load(
            a_ptr + rm[:, None] * stride_am + rk[None, :],
            mask=(rm[:, None] < M) & kmask[None, :],
            other=0,
        ).to(tl.int32)
        if W_PACKED:
            byte = tl.load(
                w_ptr + rn[:, None] * stride_wn + (rk[None, :] // 2),
                mask=(rn[:, None] < N) & kmask[None, :],
                other=0,
            ).to(tl.int32)
            w_code = (byte >> ((rk[None, :] % 2) * 4)) & 0xF
        else:
            w_code = tl.load(
                w_ptr + rn[:, None] * stride_wn + rk[None, :],
                mask=(rn[:, None] < N) & kmask[None, :],
                other=0,
            ).to(tl.int32)
        shift = tl.load(shift_ptr + rk, mask=kmask, other=0)
        a_val = _decode_raw(a_code, tl.zeros_like(a_code), A_EBITS, A_MBITS)  # (BLOCK_M, BLOCK_K)
        w_val = _decode_raw(w_code, shift[None, :], W_EBITS, W_MBITS)  # (BLOCK_N, BLOCK_K)
        if DOT_BF16:
            acc += tl.dot(a_val.to(tl.bfloat16), tl.trans(w_val.to(tl.bfloat16)))
        else:
            acc += tl.dot(a_val, tl.trans(w_val), input_precision="ieee")
    a_si = tl.load(a_scale_inv_ptr)
    w_si = tl.load(w_scale_inv_ptr + rn, mask=rn < N, other=0.0)
    y = acc * a_si * w_si[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :],
        y.to(out_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) 4-bit codes -> (N, ceil(K/2)) bytes, element 2j in the low nibble (formats.pack's order)."""
    N, K = codes.shape
    c = codes.to(torch.uint8)
    if K % 2:
        c = torch.cat([c, torch.zeros((N, 1), dtype=torch.uint8, device=c.device)], dim=1)
    return (c[:, 0::2] & 0xF) | ((c[:, 1::2] & 0xF) << 4)


# Bytes: M·K (activation codes) + N·K/2 or N·K (weight codes) + M·N·bytes(out); FLOPs: 2·M·N·K on
# bf16 tensor cores after an in-register decode (a few integer ops per code and per K-block).
def fpq_linear(
    a_codes: torch.Tensor,
    w_codes: torch.Tensor,
    shifts: torch.Tensor,
    a_scale_inv: torch.Tensor,
    w_scale_inv: torch.Tensor,
    a_bits: tuple[int, int],
    w_bits: tuple[int, int],
    *,
    bias: torch.Tensor | None = None,
    w_packed: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Y = decode(a_codes, t) decode(w_codes, b_o + k_c)^T + bias, with (E, M) = a_bits / w_bits."""
    M, K = a_codes.shape
    N = w_codes.shape[0]
    a_codes = a_codes.contiguous()
    w_codes = w_codes.contiguous()
    out = torch.empty((M, N), device=a_codes.device, dtype=out_dtype)
    interp = _interpreting()
    BLOCK_M, BLOCK_N, BLOCK_K = (16, 32, 32) if interp else (64, 64, 64)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _fpq_linear_kernel[grid](
        a_codes, w_codes, shifts.to(torch.int32).contiguous(),
        a_scale_inv.reshape(1).to(torch.float32), w_scale_inv.to(torch.float32).contiguous(),
        bias if bias is not None else out, out,
        M, N, K, a_codes.stride(0), w_codes.stride(0), out.stride(0),
        A_EBITS=a_bits[0], A_MBITS=a_bits[1], W_EBITS=w_bits[0], W_MBITS=w_bits[1],
        W_PACKED=w_packed, HAS_BIAS=bias is not None, DOT_BF16=not interp,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return out
