"""LLM.int8() — fast path (torch; Triton kernels on CUDA). Mirrors ``lowbit.reference.llm_int8``.

Same functions, parameters, defaults and errors as the reference (see its docstring for the
paper, the equations and the choices). Differences that come from working precision:

* ``int8_matmul`` returns float32 and ``matmul`` returns x's dtype (the reference returns
  float64, the exact value these approximate); codes, absmax and outlier masks are bit-exact.
* On CUDA with Triton, a ``lowbit.fast.nn.Linear8bitLt`` forward (weights quantized once) is
  three launches (flag memset, fused quantize with on-device outlier detection, int8 GEMM with
  the outlier product, dequantization and bias fused; two without threshold) and never
  synchronises with the host, so it can be captured in a CUDA graph. ``matmul`` adds the
  quantization of ``w`` on every call. The input check for
  NaN/Inf needs a sync, so it runs on CPU tensors only.
* On CPU the int8 product runs through ``torch._int_mm`` (oneDNN int8 GEMM, exact int32) and
  the scaling in float64; the outlier columns are gathered (a sync is free on CPU). The torch
  branch on CUDA (float64 input, or no Triton) masks the non-outlier columns instead and
  multiplies with the whole weight: no ``nonzero``, no host sync.
* ``matmul`` is differentiable (``torch.autograd.Function``) with the gradients of
  ``lowbit.reference.llm_int8.matmul_grad``.

Public functions: ``vectorwise_quant``, ``vectorwise_dequant``, ``int8_matmul``, ``matmul``,
``outlier_features``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lowbit.fast._tensors import takes_tensors
from lowbit.kernels import on_triton_device

__all__ = ["vectorwise_quant", "vectorwise_dequant", "int8_matmul", "matmul", "outlier_features"]

Q_MAX = 127
INV_Q_MAX_F32 = 0.007874015718698502  # float32(1/127), bitsandbytes' dequant constant
MM_DEQUANT = 1.0 / 16129.0
MIN_ABSMAX = 2.0**-121
MAX_K_INT32 = (2**31 - 1) // (127 * 127)
OUTLIER_WEIGHTS = ("full", "dequantized")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _rows(shape) -> int:
    """Number of rows when every leading dimension is a row (works for zero-size shapes)."""
    return int(math.prod(shape[:-1]))


def _on_triton_device(t: torch.Tensor) -> bool:
    """Tests patch this to run the kernel path on CPU tensors under ``TRITON_INTERPRET=1``."""
    return on_triton_device(t)


def _use_triton(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16, torch.float32) and _on_triton_device(t)


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not (t == t and abs(t) != float("inf")) or t < 0:
        raise ValueError(
            f"threshold must be a finite number >= 0 (0 disables outliers), got {threshold}"
        )
    # Compared in float32, like the reference and bitsandbytes' CUDA kernel.
    return float(torch.tensor(t, dtype=torch.float32))


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{name} must be a float tensor (float16/bfloat16/float32/float64), got {got}"
        )
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension (..., features), got a scalar")


def _check_finite(
    x32: torch.Tensor, is_outlier: torch.Tensor | None, absmax: torch.Tensor, name: str
) -> None:
    """Raise on NaN anywhere or Inf outside the outliers (CPU only: on CUDA it would sync).

    NaN is never an outlier (NaN >= τ is False) and both NaN and Inf propagate through the row
    absmax of the non-outlier elements, so the cheap test looks at the row maxima only.
    """
    if x32.is_cuda or bool(torch.isfinite(absmax).all()):
        return
    bad = ~torch.isfinite(x32)
    if is_outlier is not None:
        bad &= ~is_outlier
    if name == "w":  # matmul quantizes the weights without outlier decomposition
        raise ValueError(
            f"w has {int(bad.sum())} non-finite values; the weights must be finite (they are "
            "quantized without outlier decomposition)"
        )
    raise ValueError(
        f"{name} has {int(bad.sum())} non-finite values that are not outliers; "
        "clean the input or set threshold > 0 so Inf goes to the full-precision part"
    )


def _quant_rows_torch(
    X32: torch.Tensor, tau: float, name: str = "x"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised twin of the reference's row loop: (codes, absmax, outlier_cols bool).

    In-place steps on two temporaries: on CPU every fresh (rows, cols) buffer costs page faults.
    """
    rows, cols = X32.shape
    magnitude = X32.abs()
    is_outlier: torch.Tensor | None = None
    if tau > 0:
        is_outlier = magnitude >= tau
        magnitude.masked_fill_(is_outlier, 0.0)
    if cols == 0 or rows == 0:
        absmax = torch.zeros(rows, dtype=torch.float32, device=X32.device)
    else:
        absmax = magnitude.amax(dim=1)
    _check_finite(X32, is_outlier, absmax, name)
    usable = absmax >= MIN_ABSMAX
    safe = torch.where(usable, absmax, torch.ones_like(absmax))
    # float32(1 / c) * 127, two roundings: bitsandbytes' `127.0 / row_stats` (torch evaluates a
    # scalar divided by a tensor as reciprocal() * scalar) and the reference.
    scale = torch.where(usable, (1.0 / safe) * Q_MAX, torch.zeros_like(absmax))
    q = torch.mul(X32, scale[:, None], out=magnitude).round_()
    if is_outlier is not None:
        outlier_cols = is_outlier.any(dim=0)
        # Every outlier element lies in an outlier column: zeroing the columns covers both.
        q.masked_fill_(outlier_cols[None, :], 0.0)
    else:
        outlier_cols = torch.zeros(cols, dtype=torch.bool, device=X32.device)
    return q.to(torch.int8), absmax, outlier_cols


def _quant_rows(X: torch.Tensor, tau: float, zero_columns: bool = True, name: str = "x"):
    """(codes, absmax, outlier_cols) of a 2-D tensor; Triton on CUDA, torch elsewhere.

    With ``zero_columns=False`` the kernel's codes keep the non-outlier entries of outlier
    columns (the GEMM masks them itself), saving a launch on the linear's hot path. ``name`` is
    the argument a non-finite error names (checked on CPU only).
    """
    if _use_triton(X):
        from lowbit.kernels.int8 import rowwise_quant

        codes, absmax, flags = rowwise_quant(X, tau)
        if flags is None:
            outlier_cols = torch.zeros(X.shape[1], dtype=torch.bool, device=X.device)
        else:
            outlier_cols = flags != 0
        if zero_columns and flags is not None:
            codes = codes.masked_fill(outlier_cols[None, :], 0)
        return codes, absmax, outlier_cols, flags
    codes, absmax, outlier_cols = _quant_rows_torch(X.float(), tau, name)
    return codes, absmax, outlier_cols, None


@takes_tensors
def vectorwise_quant(
    x: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 with outlier detection; see the reference for the exact semantics.

    Paper (arXiv:2208.07339) §3.1 vector-wise quantization and the outlier set O of §3.2
    (bitsandbytes' ``int8_vectorwise_quant``).

    Returns ``(codes int8 (..., cols), absmax float32 (...,), outlier_cols bool (cols,))``.
    """
    tau = _check_threshold(threshold)
    _check_float(x, "x")
    lead, cols = x.shape[:-1], x.shape[-1]
    X = x.reshape(_rows(x.shape), cols)
    codes, absmax, outlier_cols, _ = _quant_rows(X, tau)
    return codes.reshape(*lead, cols), absmax.reshape(lead), outlier_cols


@takes_tensors
def vectorwise_dequant(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """(q · c) · float32(1/127) in float32, exactly as the reference and bitsandbytes.

    Inverse of the §3.1 vector-wise quantization (arXiv:2208.07339), bitsandbytes'
    ``int8_vectorwise_dequant``. ``codes`` int8 (..., cols), ``absmax`` (...,); returns float32
    (..., cols).
    """
    if codes.dtype != torch.int8:
        raise ValueError(f"codes must be int8 (from vectorwise_quant), got {codes.dtype}")
    if codes.ndim < 1:
        raise ValueError("codes must have at least one dimension (..., cols), got a scalar")
    if tuple(absmax.shape) != tuple(codes.shape[:-1]):
        raise ValueError(
            f"absmax has shape {tuple(absmax.shape)}, expected codes.shape[:-1] = {tuple(codes.shape[:-1])}"
        )
    return (codes.to(torch.float32) * absmax.to(torch.float32)[..., None]) * INV_Q_MAX_F32


def _int8_product(codes_x: torch.Tensor, codes_w: torch.Tensor) -> torch.Tensor:
    """Exact S = X8 · W8^T on CPU, as float64 (it holds every int32 sum exactly).

    ``torch._int_mm`` (int8 x int8 -> int32 through oneDNN, 10-20x faster than a float64
    matmul here) when this torch has it; a float64 matmul otherwise (K * 127² < 2**53: exact).
    """
    int_mm = getattr(torch, "_int_mm", None)
    # torch 2.13's CPU _int_mm returns uninitialised memory for K = 1 (found by the pair tests;
    # K >= 2 agreed with an int64 matmul on 400 random shapes): use it from K = 2 on.
    if int_mm is not None and codes_x.shape[1] >= 2:
        try:
            return int_mm(codes_x.contiguous(), codes_w.T).to(torch.float64)
        except RuntimeError:  # pragma: no cover - builds without the CPU kernel
            pass
    return codes_x.to(torch.float64) @ codes_w.to(torch.float64).T


@takes_tensors
def int8_matmul(
    codes_x: torch.Tensor, absmax_x: torch.Tensor, codes_w: torch.Tensor, absmax_w: torch.Tensor
) -> torch.Tensor:
    """Y = (X8 · W8^T)_int32 · c_x ⊗ c_w / 127², float32 (tokens, N).

    Paper (arXiv:2208.07339) §3.1 vector-wise product, denormalized by the outer product of the
    two absmax vectors.
    """
    if codes_x.dtype != torch.int8 or codes_w.dtype != torch.int8:
        raise ValueError(f"codes must be int8, got {codes_x.dtype} and {codes_w.dtype}")
    if codes_x.ndim != 2 or codes_w.ndim != 2 or codes_x.shape[1] != codes_w.shape[1]:
        raise ValueError(
            f"int8_matmul needs codes_x (tokens, K) and codes_w (N, K), got {tuple(codes_x.shape)} and {tuple(codes_w.shape)}"
        )
    if codes_x.shape[1] > MAX_K_INT32:
        raise ValueError(
            f"K = {codes_x.shape[1]} overflows int32 accumulation; split K below {MAX_K_INT32}"
        )
    if tuple(absmax_x.shape) != tuple(codes_x.shape[:1]) or tuple(absmax_w.shape) != tuple(
        codes_w.shape[:1]
    ):
        raise ValueError(
            f"absmax shapes {tuple(absmax_x.shape)}, {tuple(absmax_w.shape)} do not match codes "
            f"{tuple(codes_x.shape)}, {tuple(codes_w.shape)}"
        )
    return _scaled_int8_product(codes_x, absmax_x, codes_w, absmax_w, torch.float32)


def _scaled_int8_product(
    codes_x, absmax_x, codes_w, absmax_w, out_dtype: torch.dtype
) -> torch.Tensor:
    """S · c_x ⊗ c_w / 127²: the Triton GEMM on CUDA (float32 epilogue), exact float64 on CPU."""
    if _on_triton_device(codes_x):
        from lowbit.kernels.int8 import int8_linear

        y = int8_linear(
            codes_x.contiguous(),
            absmax_x.float().contiguous(),
            codes_w.contiguous(),
            absmax_w.float().contiguous(),
            out_dtype=torch.float32,
        )
        return y.to(out_dtype)
    S = _int8_product(codes_x, codes_w)  # (tokens, N) exact
    c = absmax_x.to(torch.float64)[:, None] * absmax_w.to(torch.float64)[None, :]
    return (S * c * MM_DEQUANT).to(out_dtype)


def _check_matmul_args(x, w, bias, outlier_weights):
    if outlier_weights not in OUTLIER_WEIGHTS:
        raise ValueError(
            f"outlier_weights must be one of {OUTLIER_WEIGHTS}, got {outlier_weights!r}"
        )
    _check_float(x, "x")
    _check_float(w, "w")
    if w.ndim != 2:
        raise ValueError(f"w must be (out_features, in_features), got shape {tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features, w expects {w.shape[1]}: shapes {tuple(x.shape)}, {tuple(w.shape)}"
        )
    if w.shape[1] > MAX_K_INT32:
        raise ValueError(
            f"K = {w.shape[1]} overflows int32 accumulation; split K below {MAX_K_INT32}"
        )
    if bias is not None and tuple(bias.shape) != (w.shape[0],):
        raise ValueError(f"bias must have shape ({w.shape[0]},), got {tuple(bias.shape)}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather_outliers(t: torch.Tensor) -> bool:
    """Compact the outlier columns with ``nonzero`` only on CPU, where a host sync is free."""
    return t.device.type == "cpu"


def _outlier_product(
    X: torch.Tensor,
    O: torch.Tensor,
    W8: torch.Tensor,
    c_w: torch.Tensor,
    w_full: torch.Tensor | None,
    acc: torch.dtype,
) -> torch.Tensor:
    """X[:, O] · W_O^T in ``acc`` (tokens, N): the 16-bit part of the decomposition (§3.2).

    On CPU the outlier columns are gathered (few columns, cheap). Elsewhere (CUDA without
    Triton, or float64 input) the non-outlier columns of X are masked to 0 and multiplied
    with the whole weight: static shapes, no ``nonzero`` sync, so CUDA graphs can capture it.
    """
    if _gather_outliers(X):
        idx = O.nonzero().flatten()
        X_O = X[:, idx].to(acc)  # (tokens, |O|)
        W8 = W8[:, idx].contiguous()
        w_full = w_full[:, idx] if w_full is not None else None
    else:
        X_O = X.to(acc).masked_fill(~O[None, :], 0.0)  # (tokens, K), zero off the outliers
    W_O = w_full if w_full is not None else vectorwise_dequant(W8, c_w)  # (N, |O| or K)
    return X_O @ W_O.to(acc).T


def _linear_forward(
    X: torch.Tensor,
    W8: torch.Tensor,
    c_w: torch.Tensor,
    bias: torch.Tensor | None,
    tau: float,
    w_full: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM.int8() forward on pre-quantized weights (used by ``matmul`` and ``Linear8bitLt``).

    ``X`` (tokens, K) float; ``W8`` (N, K) int8 with row absmax ``c_w`` (N,); ``w_full`` (N, K)
    full-precision weights for the paper's outlier product, or None for bitsandbytes'
    dequantized one. Returns ``(Y (tokens, N) in X's dtype, outlier columns (K,))``: a bool
    mask on CPU; on CUDA the kernel's int32 flags (None without threshold), left unconverted
    to save a launch.
    """
    if _use_triton(X):
        from lowbit.kernels.int8 import int8_linear, rowwise_quant

        X = X.contiguous()
        codes, c_x, flags = rowwise_quant(X, tau)
        Y = int8_linear(
            codes,
            c_x,
            W8,
            c_w,
            flags=flags,
            x=X,
            w_full=w_full,
            bias=bias,
            out_dtype=X.dtype,
        )
        return Y, flags  # int32 flags or None (tau = 0): converting them would cost a launch
    acc = _acc_dtype(X.dtype)
    X8, c_x, O = _quant_rows_torch(X.float(), tau)
    Y = _scaled_int8_product(X8, c_x, W8, c_w, acc)
    if tau > 0:
        Y = Y + _outlier_product(X, O, W8, c_w, w_full, acc)
    if bias is not None:
        Y = Y + bias.to(acc)
    return Y.to(X.dtype), O


def _linear_backward(
    G: torch.Tensor,
    X: torch.Tensor,
    W8: torch.Tensor,
    c_w: torch.Tensor,
    O: torch.Tensor,
    need_x: bool,
    need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """grad_x through dequantized int8 W; grad_w from column-wise int8 G and X (+ outliers)."""
    acc = _acc_dtype(X.dtype)
    grad_x = grad_w = None
    if need_x:
        grad_x = (G.to(acc) @ vectorwise_dequant(W8, c_w).to(acc)).to(X.dtype)
    if need_w:
        X_T = X.to(acc).masked_fill(O[None, :], 0.0).T.contiguous()  # (K, tokens)
        G8_T, c_g, _, _ = _quant_rows(
            G.to(acc).T.contiguous(), 0.0
        )  # (N, tokens): per output feature
        X8_T, c_xt, _, _ = _quant_rows(X_T, 0.0)  # (K, tokens): per input feature
        grad_w = _scaled_int8_product(G8_T, c_g, X8_T, c_xt, acc)
        grad_w = grad_w + G.to(acc).T @ X.to(acc).masked_fill(~O[None, :], 0.0)
    return grad_x, grad_w


class _Int8MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, tau, outlier_weights):
        K, N = x.shape[-1], w.shape[0]
        X = x.reshape(_rows(x.shape), K)
        W8, c_w, _, _ = _quant_rows(w.contiguous(), 0.0, name="w")
        w_full = w if outlier_weights == "full" else None
        Y, O = _linear_forward(X, W8, c_w, bias, tau, w_full)
        if O is None:  # CUDA without threshold
            O = torch.zeros(K, dtype=torch.bool, device=x.device)
        elif O.dtype != torch.bool:  # CUDA kernels hand back int32 flags
            O = O != 0
        ctx.save_for_backward(X, w, W8, c_w, O)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return Y.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, grad_out):
        X, w, W8, c_w, O = ctx.saved_tensors
        G = grad_out.reshape(_rows(ctx.x_shape), w.shape[0])
        grad_x, grad_w = _linear_backward(
            G, X, W8, c_w, O, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        if grad_w is not None:
            grad_w = grad_w.to(w.dtype)
        grad_bias = G.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_bias, None, None


class _Int8LinearFrozen(torch.autograd.Function):
    """Forward with stored int8 weights; gradients for x (and bias) only (frozen weights)."""

    @staticmethod
    def forward(ctx, X, W8, c_w, bias, tau):
        Y, _ = _linear_forward(X, W8, c_w, bias, tau, None)
        ctx.save_for_backward(W8, c_w)
        ctx.x_dtype = X.dtype
        ctx.has_bias = bias is not None
        return Y

    @staticmethod
    def backward(ctx, G):
        W8, c_w = ctx.saved_tensors
        acc = _acc_dtype(ctx.x_dtype)
        grad_x = (
            (G.to(acc) @ vectorwise_dequant(W8, c_w).to(acc)).to(ctx.x_dtype)
            if ctx.needs_input_grad[0]
            else None
        )
        grad_bias = G.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None


def _frozen_linear(X, W8, c_w, bias, tau: float) -> torch.Tensor:
    """Y = LLM.int8(X, stored int8 W) + bias for ``Linear8bitLt``; differentiable in X and bias."""
    if torch.is_grad_enabled() and (X.requires_grad or (bias is not None and bias.requires_grad)):
        return _Int8LinearFrozen.apply(X, W8, c_w, bias, tau)
    return _linear_forward(X, W8, c_w, bias, tau, None)[0]


@takes_tensors
def matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
    outlier_weights: str = "full",
) -> torch.Tensor:
    """LLM.int8() Y = X W^T + b with outlier decomposition; returns x's dtype (..., N).

    Paper (arXiv:2208.07339) §3.2 mixed-precision decomposition over the §3.1 vector-wise int8
    product (the backward follows bitsandbytes' ``MatMul8bitLt``: see the reference's
    ``matmul_grad``).

    ``outlier_weights``: "full" (paper) or "dequantized" (bitsandbytes, has_fp16_weights=False).
    Differentiable in x, w and bias (gradients of ``reference.llm_int8.matmul_grad``).
    """
    _check_matmul_args(x, w, bias, outlier_weights)
    tau = _check_threshold(threshold)
    return _Int8MatMul.apply(x, w, bias, tau, outlier_weights)


@takes_tensors
def outlier_features(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    threshold: float = 6.0,
    min_layer_frac: float = 0.25,
    min_token_frac: float = 0.06,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's systematic outlier features; returns (dims, magnitude, layer_frac, token_frac).

    Paper (arXiv:2208.07339) §4 criteria (magnitude ≥ 6, ≥ 25 % of layers, ≥ 6 % of sequence
    positions).
    """
    if not (0 <= min_layer_frac <= 1 and 0 <= min_token_frac <= 1):
        raise ValueError(
            f"min_layer_frac and min_token_frac must lie in [0, 1], got {min_layer_frac}, {min_token_frac}"
        )
    if not (threshold == threshold and abs(threshold) != float("inf")) or threshold <= 0:
        raise ValueError(f"threshold must be a finite number > 0, got {threshold}")
    if not isinstance(hidden_states, torch.Tensor):  # one tensor per layer
        hidden_states = torch.stack(list(hidden_states))
    H = hidden_states.detach().abs().float()
    if H.ndim != 3:
        raise ValueError(f"hidden_states must be (layers, tokens, d), got shape {tuple(H.shape)}")
    L, T, D = H.shape
    dev = H.device
    if L == 0 or T == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=dev)
        return torch.zeros(0, dtype=torch.int64, device=dev), empty.float(), empty, empty
    hit = H >= float(torch.tensor(threshold, dtype=torch.float32))
    layer_frac = hit.any(dim=1).sum(dim=0).double() / L
    token_frac = hit.any(dim=0).sum(dim=0).double() / T
    magnitude = H.amax(dim=(0, 1))
    is_feature = (
        (layer_frac >= min_layer_frac) & (token_frac >= min_token_frac) & (magnitude >= threshold)
    )
    dims = is_feature.nonzero().flatten()
    return dims, magnitude[dims], layer_frac[dims], token_frac[dims]
