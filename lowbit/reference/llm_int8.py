"""LLM.int8(): vector-wise int8 quantization with mixed-precision outlier decomposition — reference.

Paper: Tim Dettmers, Mike Lewis, Younes Belkada, Luke Zettlemoyer, "LLM.int8(): 8-bit Matrix
Multiplication for Transformers at Scale", NeurIPS 2022, arXiv:2208.07339.
Official code: bitsandbytes (``bitsandbytes.functional.int8_vectorwise_quant``,
``autograd/_functions.py::MatMul8bitLt``); semantics read from bitsandbytes 0.50.2.

Equations implemented (section numbers of the arXiv version; the equation numbers could not be
re-checked offline, so each is named by its content):

* Section 2.1: absmax quantization X_i8 = round(127 / max|X| · X).
* Section 3.1, vector-wise quantization: Y_ij ≈ S_ij · c_x,i · c_w,j / 127² with S = X8 · W8^T
  accumulated exactly in int32, one absmax per row of X and one per output feature of W.
* Section 3.2, mixed-precision decomposition:
  Y = Σ_{h∈O} X_h W_h^T (16-bit)  +  (c_x ⊗ c_w / 127²) · Σ_{h∉O} X8_h W8_h^T (int8),
  with O = {h : some |X_ih| ≥ τ} found from the input itself (no calibration), τ = 6.0.
* Section 4, outlier-feature criteria: magnitude ≥ 6, in ≥ 25 % of layers, in ≥ 6 % of the
  sequence positions.

Public functions:

* ``vectorwise_quant(x, threshold=0.0)`` -> (codes int8, absmax float32 per row, outlier_cols bool).
* ``vectorwise_dequant(codes, absmax)`` -> float32 values.
* ``int8_matmul(codes_x, absmax_x, codes_w, absmax_w)`` -> float64: exact int32 product, scaled.
* ``matmul(x, w, bias=None, threshold=6.0, outlier_weights="full")`` -> float64 Y = X W^T + b.
* ``matmul_grad(x, w, bias=None, threshold=6.0, outlier_weights="full", *, grad_output)``
  -> (grad_x, grad_w, grad_bias): the backward pass with int8 weights (see below).
* ``outlier_features(hidden_states, threshold=6.0, min_layer_frac=0.25, min_token_frac=0.06)``
  -> (dims, magnitude, layer_frac, token_frac) of the systematic outlier features.

Arithmetic (bit for bit what bitsandbytes computes for float32 input):

* the row absmax c_i = max_{j : |x_ij| < τ} |x_ij| in float32 (elements at or above τ do not
  enter it; the other entries of outlier columns do); τ is compared in float32, like the CUDA
  kernel's ``float threshold``;
* scale_i = float32(1 / c_i) · 127 (two float32 roundings) and q_ij = round_half_even(x_ij ·
  scale_i) (float32 product): what ``torch.round(A * (127.0 / row_stats))`` of the default
  backend computes on float32, because torch evaluates ``127.0 / tensor`` as
  ``tensor.reciprocal() * 127.0``. A correctly rounded 127 / c_i changes a code near a tie
  now and then (4e-7 of the codes of random-normal float32 data, more often for float16 input,
  whose values lie on a coarse grid); bitsandbytes' CUDA kernel uses the approximate
  ``__fdividef(127, c)``, so no float32 formula matches every backend bit for bit;
* outlier elements are 0 in the codes, and so are whole outlier columns. bitsandbytes zeroes
  whole columns only "if rows > 1": with one row the outlier column holds only the outlier
  element, which is zeroed anyway, so both rules give the same codes;
* dequantization is ``(q · c) · float32(1/127)`` in float32 (bitsandbytes' ``int8_vectorwise_dequant``);
* the matmul scale is 1/127² = 1/16129 exactly. bitsandbytes' CUDA epilogue uses
  ``MM_DEQUANT_CONST = 6.200012e-05f`` (the float32 nearest 1/16129) and its PyTorch default backend
  ``6.200124e-05`` (a digit typo, 1.8e-5 relative too large); we use the exact constant.

Deviations from bitsandbytes, and why:

* All-zero rows (and rows whose absmax is below 2**-121, where 127/c overflows float32) get zero
  codes, not NaN or backend-dependent garbage (bitsandbytes divides by zero). The returned
  absmax stays the true row maximum (0 for a zero row), so it matches bitsandbytes' statistics.
* bitsandbytes casts every input to float16 first (``A.to(torch.float16)``); the reference keeps
  the input's precision and quantizes float32 copies (float16/bfloat16 convert exactly). For
  float16 input, bitsandbytes' default CPU backend then does the division and product in float16
  arithmetic, and its CUDA kernel uses the approximate ``__fdividef``; the reference's float32
  arithmetic is what the CUDA kernel approximates.
* ``matmul`` offers both outlier products: ``outlier_weights="full"`` is the paper's (the
  outlier columns multiply the full-precision weight columns), ``"dequantized"`` is what
  bitsandbytes does with ``has_fp16_weights=False`` (the fp16 weights are gone after
  quantization, so the outlier columns multiply the dequantized int8 weight columns). The
  int8 part is identical; "dequantized" adds the weight quantization error on outlier columns.
* Backward: grad_x flows through the dequantized int8 weights (as in bitsandbytes). grad_w uses
  **column-wise** quantized grad_output (one scale per output feature) with column-wise quantized
  X (one scale per input feature), the consistent pairing: the sum runs over tokens, so a scale
  may depend on the output feature and on the input feature but never on the token.
  bitsandbytes >= 0.45 (refactor #1401) quantizes grad_output row-wise but dequantizes with
  column statistics, which mixes the two; the reference does not copy that. Outlier columns of
  X (found in the forward) enter grad_w in full precision, as in bitsandbytes.
* The paper's outlier criteria are analysis criteria only (bitsandbytes applies none of them).
  "Affects ≥ 6 % of the sequence positions" is read as: the dimension reaches τ at that token
  position in at least one layer.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "vectorwise_quant",
    "vectorwise_dequant",
    "int8_matmul",
    "matmul",
    "matmul_grad",
    "outlier_features",
]

Q_MAX = 127  # int8 absmax grid: codes in [-127, 127] (-128 is never produced)
INV_Q_MAX_F32 = np.float32(1.0 / 127.0)  # bitsandbytes' 7.874015718698502e-3
MM_DEQUANT = 1.0 / (127.0 * 127.0)  # exactly 1/16129 (applied in float64 here)
# Smallest absmax whose float32 scale 127/absmax is finite: below it the row is treated as zero.
MIN_ABSMAX = np.float32(2.0**-121)
# int32 accumulation of K products of |int8| <= 127 cannot overflow while K * 127² < 2**31.
MAX_K_INT32 = (2**31 - 1) // (127 * 127)

OUTLIER_WEIGHTS = ("full", "dequantized")


def _rows(shape) -> int:
    """Number of rows when every leading dimension is a row (works for zero-size shapes)."""
    return int(math.prod(shape[:-1]))


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------


def _as_float32(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
        raise ValueError(
            f"{name} must be a float array (float16/bfloat16/float32/float64), got {x.dtype}"
        )
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension (..., features), got a scalar")
    return x.astype(np.float32)


def _check_threshold(threshold: float) -> np.float32:
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(
            f"threshold must be a finite number >= 0 (0 disables outliers), got {threshold}"
        )
    return np.float32(threshold)


def _check_finite(x32: np.ndarray, is_outlier: np.ndarray, name: str) -> None:
    # Inf may only appear as an outlier (it is then computed in full precision); NaN never.
    bad = ~np.isfinite(x32) & ~is_outlier
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite values that are not outliers; "
            "clean the input or set threshold > 0 so Inf goes to the full-precision part"
        )


# ---------------------------------------------------------------------------------------------
# row-wise quantization: the numpy and the numba version agree bit for bit (tests; speed goal P2)
# ---------------------------------------------------------------------------------------------


def _quant_rows_numpy(x32: np.ndarray, threshold: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Row absmax (outlier elements excluded) and int8 codes (outlier elements zeroed).

    ``x32``: (rows, cols) float32. Returns (codes int8 (rows, cols), absmax float32 (rows,)).
    """
    magnitude = np.abs(x32)  # (rows, cols)
    if threshold > 0:
        is_outlier = magnitude >= threshold  # (rows, cols)
        magnitude = np.where(is_outlier, np.float32(0), magnitude)
    else:
        is_outlier = np.zeros(x32.shape, dtype=bool)
    if x32.shape[1] == 0:
        absmax = np.zeros(x32.shape[0], dtype=np.float32)
    else:
        absmax = magnitude.max(axis=1)  # (rows,)  c_x,i
    usable = absmax >= MIN_ABSMAX  # (rows,)  zero rows get zero codes
    safe = np.where(usable, absmax, np.float32(1))
    scale = np.where(usable, (np.float32(1) / safe) * np.float32(Q_MAX), np.float32(0)).astype(
        np.float32
    )  # (rows,)
    q = np.rint(x32 * scale[:, None])  # (rows, cols)  float32 product, half-to-even
    q = np.where(is_outlier, np.float32(0), q)
    return q.astype(np.int8), absmax.astype(np.float32)


@njit(cache=True)
def _quant_rows_numba(x32: np.ndarray, threshold: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The same as ``_quant_rows_numpy`` as two plain loops per row (absmax, then quantize)."""
    rows, cols = x32.shape
    codes = np.zeros((rows, cols), dtype=np.int8)
    absmax = np.zeros(rows, dtype=np.float32)
    for i in range(rows):
        c = np.float32(0.0)
        for j in range(cols):
            a = abs(x32[i, j])
            if threshold > 0 and a >= threshold:
                continue
            if a > c:
                c = a
        absmax[i] = c
        if c < MIN_ABSMAX:
            continue  # zero row: codes stay 0
        scale = (np.float32(1.0) / c) * np.float32(Q_MAX)
        for j in range(cols):
            v = x32[i, j]
            if threshold > 0 and abs(v) >= threshold:
                continue  # outlier element: code 0
            codes[i, j] = np.int8(np.rint(v * scale))
    return codes, absmax


def vectorwise_quant(
    x: np.ndarray, threshold: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise (vector-wise) absmax int8 quantization with outlier detection.

    Paper (arXiv:2208.07339) §3.1 vector-wise quantization, one absmax c_x,i per row, and the
    outlier set O of §3.2 (mixed-precision decomposition); bitsandbytes'
    ``int8_vectorwise_quant``.

    ``x``: (..., cols) float array; rows are all leading dimensions. ``threshold`` τ > 0 marks
    every element with |x| ≥ τ as an outlier: it is excluded from its row's absmax, and its
    whole column is zeroed in the codes (that column goes to the full-precision product).

    Returns ``(codes, absmax, outlier_cols)``: codes int8 (..., cols) in [-127, 127], absmax
    float32 (...,) with the row maxima, outlier_cols bool (cols,) (all False for τ = 0).
    """
    tau = _check_threshold(threshold)
    x32 = _as_float32(x, "x")  # (..., cols)
    lead, cols = x32.shape[:-1], x32.shape[-1]
    X = x32.reshape(_rows(x32.shape), cols)  # (rows, cols)
    is_outlier = (np.abs(X) >= tau) if tau > 0 else np.zeros(X.shape, dtype=bool)  # (rows, cols)
    _check_finite(X, is_outlier, "x")
    codes, absmax = _quant_rows_numba(np.ascontiguousarray(X), tau)  # (rows, cols), (rows,)
    outlier_cols = is_outlier.any(axis=0)  # (cols,)  O = {j : exists i, |X_ij| >= τ}
    codes[:, outlier_cols] = 0  # X8[:, O] = 0
    return codes.reshape(*lead, cols), absmax.reshape(lead), np.asarray(outlier_cols, dtype=bool)


def vectorwise_dequant(codes: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    """x ≈ q · c / 127, in float32 as bitsandbytes computes it: (q · c) · float32(1/127).

    Inverse of the §3.1 vector-wise quantization (arXiv:2208.07339): bitsandbytes'
    ``int8_vectorwise_dequant``, also what its outlier product uses for the weight columns.

    ``codes``: int8 (..., cols); ``absmax``: float32 (...,). Returns float32 (..., cols).
    """
    codes = np.asarray(codes)
    absmax = np.asarray(absmax, dtype=np.float32)
    if codes.dtype != np.int8:
        raise ValueError(f"codes must be int8 (from vectorwise_quant), got {codes.dtype}")
    if codes.ndim < 1:
        raise ValueError("codes must have at least one dimension (..., cols), got a scalar")
    if absmax.shape != codes.shape[:-1]:
        raise ValueError(
            f"absmax has shape {absmax.shape}, expected codes.shape[:-1] = {codes.shape[:-1]}"
        )
    q = codes.astype(np.float32)  # (..., cols)
    return (q * absmax[..., None]) * INV_Q_MAX_F32


def int8_matmul(
    codes_x: np.ndarray, absmax_x: np.ndarray, codes_w: np.ndarray, absmax_w: np.ndarray
) -> np.ndarray:
    """Vector-wise product: Y_ij = (Σ_k X8_ik W8_jk) · c_x,i · c_w,j / 127², exact accumulation.

    Paper (arXiv:2208.07339) §3.1: the int32 product of the row-quantized X and the
    output-feature-quantized W, denormalized by the outer product of the two absmax vectors
    (bitsandbytes applies the constant 1/127² in float32; here in float64).

    ``codes_x``: int8 (tokens, K); ``absmax_x``: (tokens,); ``codes_w``: int8 (N, K) (nn.Linear
    layout); ``absmax_w``: (N,). Returns float64 (tokens, N). K must keep the int32
    accumulator of the fast path from overflowing (K ≤ 133143).
    """
    codes_x, codes_w = np.asarray(codes_x), np.asarray(codes_w)
    if codes_x.dtype != np.int8 or codes_w.dtype != np.int8:
        raise ValueError(f"codes must be int8, got {codes_x.dtype} and {codes_w.dtype}")
    if codes_x.ndim != 2 or codes_w.ndim != 2 or codes_x.shape[1] != codes_w.shape[1]:
        raise ValueError(
            f"int8_matmul needs codes_x (tokens, K) and codes_w (N, K), got {codes_x.shape} and {codes_w.shape}"
        )
    if codes_x.shape[1] > MAX_K_INT32:
        raise ValueError(
            f"K = {codes_x.shape[1]} overflows int32 accumulation; split K below {MAX_K_INT32}"
        )
    c_x = np.asarray(absmax_x, dtype=np.float64)  # (tokens,)
    c_w = np.asarray(absmax_w, dtype=np.float64)  # (N,)
    if c_x.shape != codes_x.shape[:1] or c_w.shape != codes_w.shape[:1]:
        raise ValueError(
            f"absmax shapes {c_x.shape}, {c_w.shape} do not match codes {codes_x.shape}, {codes_w.shape}"
        )
    S = codes_x.astype(np.int64) @ codes_w.astype(np.int64).T  # (tokens, N)  exact integers
    return S.astype(np.float64) * np.outer(c_x, c_w) * MM_DEQUANT  # (tokens, N)


def _check_matmul_args(x, w, bias, outlier_weights):
    x, w = np.asarray(x), np.asarray(w)
    if outlier_weights not in OUTLIER_WEIGHTS:
        raise ValueError(
            f"outlier_weights must be one of {OUTLIER_WEIGHTS}, got {outlier_weights!r}"
        )
    if w.ndim != 2:
        raise ValueError(f"w must be (out_features, in_features), got shape {w.shape}")
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1] if x.ndim else 0} features, w expects {w.shape[1]}: shapes {x.shape}, {w.shape}"
        )
    if w.shape[1] > MAX_K_INT32:
        raise ValueError(
            f"K = {w.shape[1]} overflows int32 accumulation; split K below {MAX_K_INT32}"
        )
    if bias is not None and np.shape(bias) != (w.shape[0],):
        raise ValueError(f"bias must have shape ({w.shape[0]},), got {np.shape(bias)}")
    n_bad = int(np.count_nonzero(~np.isfinite(w)))
    if n_bad:
        raise ValueError(
            f"w has {n_bad} non-finite values; the weights must be finite (they are "
            "quantized without outlier decomposition)"
        )


def matmul(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    threshold: float = 6.0,
    outlier_weights: str = "full",
) -> np.ndarray:
    """LLM.int8() Y = X W^T + b with the mixed-precision decomposition; float64 result.

    Paper (arXiv:2208.07339) §3.2: Y = X[:, O] W[:, O]^T in 16 bit + the §3.1 vector-wise int8
    product of the other columns.

    ``x``: (..., K); ``w``: (N, K); ``bias``: (N,) or None. ``threshold`` τ (0 = no
    decomposition, pure vector-wise int8). ``outlier_weights``: "full" (paper: outlier columns
    times the full-precision weight columns) or "dequantized" (bitsandbytes with
    ``has_fp16_weights=False``: times the dequantized int8 weight columns).
    """
    _check_matmul_args(x, w, bias, outlier_weights)
    x, w = np.asarray(x), np.asarray(w)
    lead, K = x.shape[:-1], x.shape[-1]
    X = x.reshape(_rows(x.shape), K).astype(np.float64)  # (tokens, K)  the input's values
    W = w.astype(np.float64)  # (N, K)
    # Step 1: outlier columns O from the input itself, and vector-wise codes of the rest.
    X8, c_x, O = vectorwise_quant(
        x.reshape(_rows(x.shape), K), threshold
    )  # (tokens, K), (tokens,), (K,)
    W8, c_w, _ = vectorwise_quant(w, 0.0)  # (N, K), (N,)  no threshold on the weights
    # Step 2: the int8 product of the non-outlier columns (outlier columns are zero in X8).
    Y_int8 = int8_matmul(X8, c_x, W8, c_w)  # (tokens, N)
    # Step 3: the 16-bit product of the outlier columns.
    if outlier_weights == "full":
        W_O = W[:, O]  # (N, |O|)
    else:
        W_O = vectorwise_dequant(W8, c_w)[:, O].astype(np.float64)  # (N, |O|)
    Y_outlier = X[:, O] @ W_O.T  # (tokens, N)
    Y = Y_int8 + Y_outlier  # (tokens, N)
    if bias is not None:
        Y = Y + np.asarray(bias).astype(np.float64)[None, :]
    return Y.reshape(*lead, w.shape[0])


def matmul_grad(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    threshold: float = 6.0,
    outlier_weights: str = "full",
    *,
    grad_output: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gradients of ``matmul`` for training with int8 weights; float64 (grad_x, grad_w, grad_bias).

    The paper (arXiv:2208.07339) covers inference only (§3.1-3.2); this follows the backward of
    bitsandbytes' ``MatMul8bitLt``, with a column-wise pairing for grad_w that is consistent
    with the forward's quantization.

    * grad_x = G · dequant(W8): through the int8 weights actually used (bitsandbytes: fp16 matmul).
    * grad_w = int8 product of column-wise quantized G (one scale per output feature) and
      column-wise quantized X (one scale per input feature; outlier columns zeroed), scaled by
      1/127², plus G^T X[:, O] in full precision for the outlier columns O of the forward.
    * grad_bias = Σ_tokens G (None without bias).

    ``outlier_weights`` only changes the forward; it is accepted so the signature mirrors ``matmul``.
    """
    _check_matmul_args(x, w, bias, outlier_weights)
    x, w = np.asarray(x), np.asarray(w)
    K, N = x.shape[-1], w.shape[0]
    if np.shape(grad_output) != x.shape[:-1] + (N,):
        raise ValueError(
            f"grad_output has shape {np.shape(grad_output)}, expected x.shape[:-1] + (N,) = {x.shape[:-1] + (N,)}"
        )
    X = x.reshape(_rows(x.shape), K)  # (tokens, K)
    G = np.asarray(grad_output, dtype=np.float64).reshape(_rows(x.shape), N)  # (tokens, N)
    # grad_x through the dequantized int8 weights.
    W8, c_w, _ = vectorwise_quant(w, 0.0)  # (N, K), (N,)
    W_dq = vectorwise_dequant(W8, c_w).astype(np.float64)  # (N, K)
    grad_x = G @ W_dq  # (tokens, K)
    # grad_w: column-wise quantization of G and of X (rows of their transposes).
    _, _, O = vectorwise_quant(X, threshold)  # (K,)  the forward's outlier columns
    X_T = np.where(O[None, :], 0.0, X.astype(np.float64)).T  # (K, tokens)  outlier columns removed
    G8_T, c_g, _ = vectorwise_quant(G.T, 0.0)  # (N, tokens), (N,)  one scale per output feature
    X8_T, c_xt, _ = vectorwise_quant(X_T, 0.0)  # (K, tokens), (K,)  one scale per input feature
    grad_w_int8 = int8_matmul(G8_T, c_g, X8_T, c_xt)  # (N, K)
    X_O = np.where(O[None, :], X.astype(np.float64), 0.0)  # (tokens, K)  only outlier columns
    grad_w = grad_w_int8 + G.T @ X_O  # (N, K)
    grad_bias = G.sum(axis=0) if bias is not None else None  # (N,)
    return grad_x.reshape(x.shape), grad_w, grad_bias


def outlier_features(
    hidden_states: np.ndarray,
    threshold: float = 6.0,
    min_layer_frac: float = 0.25,
    min_token_frac: float = 0.06,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The paper's systematic outlier features in per-layer hidden states.

    Paper (arXiv:2208.07339) §4 criteria: magnitude ≥ 6, in ≥ 25 % of the layers, at ≥ 6 % of
    the sequence positions (the paper's analysis criteria; bitsandbytes has no such function).

    ``hidden_states``: (layers, tokens, d) (a list of (tokens, d) arrays is stacked); padding
    tokens must be removed by the caller. A feature dimension h is an outlier feature when
    |value| ≥ ``threshold`` in at least ``min_layer_frac`` of the layers and at at least
    ``min_token_frac`` of the token positions (in any layer).

    Returns ``(dims, magnitude, layer_frac, token_frac)`` sorted by dimension: dims int64 (F,),
    magnitude float32 (F,) = max |value| over layers and tokens, layer_frac and token_frac
    float64 (F,) = the fractions of layers and of token positions where h reaches the threshold.
    """
    if not (0 <= min_layer_frac <= 1 and 0 <= min_token_frac <= 1):
        raise ValueError(
            f"min_layer_frac and min_token_frac must lie in [0, 1], got {min_layer_frac}, {min_token_frac}"
        )
    if not np.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a finite number > 0, got {threshold}")
    H = np.abs(
        np.asarray(
            np.stack(list(hidden_states))
            if isinstance(hidden_states, (list, tuple))
            else hidden_states
        ).astype(np.float32)
    )
    if H.ndim != 3:
        raise ValueError(f"hidden_states must be (layers, tokens, d), got shape {H.shape}")
    L, T, D = H.shape
    if L == 0 or T == 0:
        empty = np.zeros(0)
        return np.zeros(0, dtype=np.int64), empty.astype(np.float32), empty, empty
    hit = H >= np.float32(threshold)  # (L, T, D)
    layer_frac = hit.any(axis=1).sum(axis=0) / L  # (D,)  fraction of layers where h hits τ
    token_frac = hit.any(axis=0).sum(axis=0) / T  # (D,)  fraction of token positions (any layer)
    magnitude = H.max(axis=(0, 1))  # (D,)
    is_feature = (
        (layer_frac >= min_layer_frac) & (token_frac >= min_token_frac) & (magnitude >= threshold)
    )
    dims = np.flatnonzero(is_feature).astype(np.int64)  # (F,)
    return (
        dims,
        magnitude[dims].astype(np.float32),
        layer_frac[dims].astype(np.float64),
        token_frac[dims].astype(np.float64),
    )
