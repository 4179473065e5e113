"""Triton kernels for LLM.int8(): fused row-wise quantization with on-device outlier detection,
and an int8 x int8 -> int32 GEMM with the outlier product and the dequantization fused.

One LLM.int8() forward is three launches and no host synchronisation:

1. ``torch.zeros(K, int32)`` for the outlier-column flags (a memset);
2. ``_int8_rowwise_quant_kernel``: one program per row; pass 1 takes the row absmax over the
   elements with |x| < τ and sets the flag of every column holding an element |x| >= τ with a
   masked store of 1 (every writer writes the same value, so no atomic is needed; the flag never
   leaves the device); pass 2 writes the int8 codes, 0 at outlier elements;
3. ``_int8_matmul_kernel``: a tiled ``tl.dot`` over int8 codes with an int32 accumulator. Each
   K-block loads its slice of the flags, zeroes the outlier columns of the X codes (so the whole
   outlier column is excluded, as bitsandbytes does with ``CA[:, outlier_cols] = 0``) and, only
   when the slice holds a flag (a uniform scalar branch), adds the 16-bit product of the masked
   original X block with the weight block to a second, float32 accumulator. The epilogue scales
   the int32 accumulator by c_x ⊗ c_w / 127², adds the outlier accumulator (times c_w / 127 when
   the outlier weights are the dequantized int8 ones) and the bias, and casts to the output dtype.

Why this outlier scheme: the set of outlier columns changes with every batch, and compacting it
into an index list (``nonzero``) needs its size on the host, i.e. a sync, and a shape that CUDA
graphs cannot replay. Masking inside the GEMM keeps every shape static and the launch count at 3.
Its cost is one extra 16-bit block product per K-block that holds an outlier column: with a few
systematic outlier dimensions (the paper's case) that is a few of K/BLOCK_K blocks; with many
scattered outlier columns it tends to one 16-bit product per block (about 3x an int8-only GEMM).

Rounding inside kernels uses ``(v + 1.5 * 2**23) - 1.5 * 2**23`` (round half to even in float32
for |v| < 2**22; here |v| <= 127), which the Triton interpreter also executes correctly, and the
scale is ``div_rn(1, absmax) * 127`` (IEEE division, then a float32 product: bitsandbytes' CPU
semantics and the reference's; Triton's ``/`` may be approximate on GPU). The quantize kernel
is compiled with ``enable_fp_fusion=False``: Triton's default would contract ``v * scale + 1.5 *
2**23`` into one fma, which rounds the exact product once instead of rounding it to float32
first, and so differs from the reference at near-ties.

Launchers (callable directly, also under ``TRITON_INTERPRET=1`` on CPU):

* ``rowwise_quant(x, threshold=0.0)`` -> (codes int8, absmax float32, flags int32 (K,) or None).
  Codes are zero at outlier *elements* only; whole outlier columns are zeroed by the consumer
  (the GEMM masks them, ``lowbit.fast.llm_int8.vectorwise_quant`` zeroes them for its API).
* ``int8_linear(codes_x, absmax_x, codes_w, absmax_w, *, flags=None, x=None, w_full=None,
  bias=None, out_dtype=torch.float32, out_int32=False)`` -> (M, N) output.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["rowwise_quant", "int8_linear", "MIN_ABSMAX", "INV_Q_MAX", "MM_DEQUANT"]

MIN_ABSMAX = 2.0**-121  # below it 127 / absmax overflows float32: the row is treated as zero
INV_Q_MAX = 0.007874015718698502  # float32(1/127), bitsandbytes' dequantization constant
MM_DEQUANT = 1.0 / 16129.0  # 1/127², rounded to float32 inside the kernel (= CUDA MM_DEQUANT_CONST)
_ROUND_MAGIC = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds half to even


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _int8_rowwise_quant_kernel(
    x_ptr,  # (M, K) input rows, any float dtype; element (m, k) at m * stride_xm + k * stride_xk
    codes_ptr,  # (M, K) int8 output codes (0 at outlier elements)
    absmax_ptr,  # (M,) float32 output: row absmax over the elements with |x| < threshold
    flags_ptr,  # (K,) int32 outlier-column flags, zeroed by the caller, set to 1 by any row
    K,  # number of columns
    stride_xm,  # row stride of x (elements)
    stride_xk,  # column stride of x (elements)
    stride_cm,  # row stride of codes (elements; columns are contiguous)
    threshold,  # float32 τ (ignored unless HAS_THRESHOLD)
    HAS_THRESHOLD: tl.constexpr,  # τ > 0: detect outliers
    BLOCK_K: tl.constexpr,  # columns per step
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    # Pass 1: absmax over non-outlier elements; flag the outlier columns.
    running = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        in_row = cols < K
        v = tl.load(x_row + cols * stride_xk, mask=in_row, other=0.0).to(tl.float32)
        a = tl.abs(v)
        if HAS_THRESHOLD:
            is_outlier = (a >= threshold) & in_row
            # Every writer stores the same 1, so concurrent plain stores race benignly.
            tl.store(flags_ptr + cols, tl.full([BLOCK_K], 1, tl.int32), mask=is_outlier)
            a = tl.where(is_outlier, 0.0, a)
        running = tl.maximum(running, a)
    absmax = tl.max(running, axis=0)
    tl.store(absmax_ptr + row, absmax)
    # Pass 2: codes = round(x * (127 / absmax)), zero rows and outlier elements -> 0.
    usable = absmax >= 3.76158192263132e-37  # MIN_ABSMAX = 2**-121
    scale = tl.where(usable, tl.math.div_rn(1.0, tl.where(usable, absmax, 1.0)) * 127.0, 0.0)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        in_row = cols < K
        v = tl.load(x_row + cols * stride_xk, mask=in_row, other=0.0).to(tl.float32)
        q = v * scale
        q = (q + 12582912.0) - 12582912.0
        if HAS_THRESHOLD:
            q = tl.where(tl.abs(v) >= threshold, 0.0, q)
        tl.store(codes_ptr + row * stride_cm + cols, q.to(tl.int8), mask=in_row)


# Bytes: reads x twice (the second pass mostly from L2 for rows up to a few hundred KB) and
# writes 1 byte per element plus 4 per row: about (2 * itemsize + 1) * M * K from DRAM at worst,
# (itemsize + 1) * M * K when the row stays in cache. FLOPs: negligible (memory bound).
def rowwise_quant(x: torch.Tensor, threshold: float = 0.0, *, block_k: int | None = None):
    """Launch ``_int8_rowwise_quant_kernel`` on a 2-D float tensor ``x`` (M, K).

    Returns ``(codes int8 (M, K), absmax float32 (M,), flags)``: codes are zero at outlier
    elements (|x| >= threshold), not yet along whole outlier columns; flags is an int32 (K,)
    tensor with 1 on outlier columns, or None when ``threshold == 0`` (no outliers exist).
    """
    if x.ndim != 2:
        raise ValueError(
            f"rowwise_quant expects a 2-D tensor (rows, cols), got shape {tuple(x.shape)}"
        )
    M, K = x.shape
    codes = torch.empty((M, K), dtype=torch.int8, device=x.device)
    absmax = torch.empty((M,), dtype=torch.float32, device=x.device)
    # Flags only when outliers are detected (their zero fill is one launch): W8A8 without a
    # threshold is two launches in all (quantize + GEMM). Without flags the kernel gets a dummy
    # pointer it never touches (HAS_THRESHOLD is False).
    flags = torch.zeros((K,), dtype=torch.int32, device=x.device) if threshold > 0 else None
    if M == 0:
        return codes, absmax, flags
    if block_k is None:
        block_k = min(4096, triton.next_power_of_2(max(K, 16)))
    _int8_rowwise_quant_kernel[(M,)](
        x,
        codes,
        absmax,
        flags if flags is not None else absmax,
        K,
        x.stride(0),
        x.stride(1),
        codes.stride(0),
        float(threshold),
        HAS_THRESHOLD=threshold > 0,
        BLOCK_K=block_k,
        # No mul+add -> fma contraction: the rounding trick needs x * scale rounded to float32
        # first (an fma would round the exact product once: different codes at near-ties).
        **({} if _interpreting() else {"enable_fp_fusion": False}),
    )
    return codes, absmax, flags


@triton.jit
def _int8_matmul_kernel(
    xq_ptr,  # (M, K) int8 codes of X (rows = tokens)
    wq_ptr,  # (N, K) int8 codes of W (nn.Linear layout: K-major, what 8-bit tensor cores want)
    sx_ptr,  # (M,) float32 absmax of the rows of X
    sw_ptr,  # (N,) float32 absmax of the rows of W
    flags_ptr,  # (K,) int32 outlier-column flags (read only if HAS_OUTLIERS)
    xf_ptr,  # (M, K) original X, read on outlier columns only (if HAS_OUTLIERS)
    wf_ptr,  # (N, K) full-precision W for the outlier product (if OUTLIER_FULL_W)
    bias_ptr,  # (N,) bias (if HAS_BIAS)
    out_ptr,  # (M, N) output, out dtype (int32 when OUT_INT32)
    M,  # tokens
    N,  # output features
    K,  # input features
    stride_xm,  # codes_x strides (elements)
    stride_xk,
    stride_wn,  # codes_w strides
    stride_wk,
    stride_fm,  # original X strides
    stride_fk,
    stride_gn,  # full-precision W strides
    stride_gk,
    stride_om,  # output strides
    stride_on,
    HAS_OUTLIERS: tl.constexpr,  # add the 16-bit product of the flagged columns
    OUTLIER_FULL_W: tl.constexpr,  # paper: full-precision W columns; else dequantized int8 W
    OUTLIER_DOT_F32: tl.constexpr,  # outlier product in float32 (interpreter, fp32 input)
    HAS_BIAS: tl.constexpr,
    OUT_INT32: tl.constexpr,  # store the raw int32 accumulator (tests)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
    m_ok = offs_m < M
    n_ok = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(
            xq_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0,
        )  # (BLOCK_M, BLOCK_K) int8
        b = tl.load(
            wq_ptr + offs_n[None, :] * stride_wn + kk[:, None] * stride_wk,
            mask=n_ok[None, :] & k_ok[:, None],
            other=0,
        )  # (BLOCK_K, BLOCK_N) int8
        if HAS_OUTLIERS:
            f = tl.load(flags_ptr + kk, mask=k_ok, other=0)  # (BLOCK_K,)
            is_o = f != 0
            a = tl.where(is_o[None, :], 0, a).to(tl.int8)
            if tl.sum(f, axis=0) > 0:  # uniform branch: only K-blocks that hold outliers
                xo = tl.load(
                    xf_ptr + offs_m[:, None] * stride_fm + kk[None, :] * stride_fk,
                    mask=m_ok[:, None] & is_o[None, :],
                    other=0.0,
                )  # (BLOCK_M, BLOCK_K) original X on outlier columns, 0 elsewhere
                if OUTLIER_FULL_W:
                    wo = tl.load(
                        wf_ptr + offs_n[None, :] * stride_gn + kk[:, None] * stride_gk,
                        mask=n_ok[None, :] & is_o[:, None],
                        other=0.0,
                    )
                else:
                    wo = b  # int8 codes: exact in fp16/bf16; c_w / 127 applied in the epilogue
                if OUTLIER_DOT_F32:
                    acc_o += tl.dot(xo.to(tl.float32), wo.to(tl.float32), input_precision="ieee")
                else:
                    acc_o += tl.dot(xo, wo.to(xo.dtype))
        acc += tl.dot(a, b, out_dtype=tl.int32)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = m_ok[:, None] & n_ok[None, :]
    if OUT_INT32:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        sx = tl.load(sx_ptr + offs_m, mask=m_ok, other=0.0)
        sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * (sx[:, None] * sw[None, :]) * 6.200012e-05
        if HAS_OUTLIERS:
            if OUTLIER_FULL_W:
                y += acc_o
            else:
                y += acc_o * (sw[None, :] * 0.007874015718698502)
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


# FLOPs: 2 * M * N * K int8 ops (+ 2 * M * N * BLOCK_K 16-bit ops per K-block with outliers).
# Bytes: M * K + N * K (int8 codes) + 4 * (M + N) (scales) + M * N * out itemsize, plus the
# original X blocks of K-blocks with outliers.
def int8_linear(
    codes_x: torch.Tensor,
    absmax_x: torch.Tensor,
    codes_w: torch.Tensor,
    absmax_w: torch.Tensor,
    *,
    flags: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    w_full: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    out_int32: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Launch ``_int8_matmul_kernel``: Y = S · c_x ⊗ c_w / 127² (+ outlier product) (+ bias).

    ``codes_x`` (M, K) int8, ``codes_w`` (N, K) int8, ``absmax_*`` float32. With ``flags``
    (K,) int32, ``x`` (M, K) must be the original input: flagged columns are removed from the
    int8 product and multiplied in 16 bits with ``w_full`` (N, K) if given (paper), else with the
    dequantized int8 weights (bitsandbytes). ``out_int32`` returns the raw accumulator S.
    """
    M, K = codes_x.shape
    N, K2 = codes_w.shape
    if K != K2 or codes_x.dtype != torch.int8 or codes_w.dtype != torch.int8:
        raise ValueError(
            f"int8_linear needs int8 codes (M, K) and (N, K), got {tuple(codes_x.shape)} {codes_x.dtype} and {tuple(codes_w.shape)} {codes_w.dtype}"
        )
    has_outliers = flags is not None
    if has_outliers and x is None:
        raise ValueError(
            "int8_linear: flags given without x, the original input for the outlier product"
        )
    out = torch.empty((M, N), dtype=torch.int32 if out_int32 else out_dtype, device=codes_x.device)
    if M == 0 or N == 0:
        return out
    interp = _interpreting()
    if block_m is None:
        block_m = 32 if interp else (64 if M <= 64 else 128)
    if block_n is None:
        block_n = 32 if interp else 128
    if block_k is None:
        block_k = 32 if interp else 128
    xf = x if has_outliers and x is not None else codes_x
    wf = w_full if w_full is not None else codes_w
    dot_f32 = interp or (xf.dtype == torch.float32) or (xf.dtype == torch.float64)
    if has_outliers and not dot_f32 and w_full is not None and w_full.dtype != xf.dtype:
        wf = w_full.to(xf.dtype)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    launch_opts = (
        {}
        if interp
        else {
            "num_warps": 8 if block_m * block_n >= 128 * 128 else 4,
            "num_stages": 3,
            "enable_fp_fusion": True,  # the epilogue is tier B: fma is welcome
        }
    )
    _int8_matmul_kernel[grid](
        codes_x,
        codes_w,
        absmax_x,
        absmax_w,
        flags if has_outliers else absmax_x,
        xf,
        wf,
        bias if bias is not None else absmax_w,
        out,
        M,
        N,
        K,
        codes_x.stride(0),
        codes_x.stride(1),
        codes_w.stride(0),
        codes_w.stride(1),
        xf.stride(0),
        xf.stride(1),
        wf.stride(0),
        wf.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_OUTLIERS=has_outliers,
        OUTLIER_FULL_W=w_full is not None,
        OUTLIER_DOT_F32=dot_f32,
        HAS_BIAS=bias is not None,
        OUT_INT32=out_int32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        **launch_opts,
    )
    return out
