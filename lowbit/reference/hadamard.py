"""Hadamard transforms — reference, NumPy + Numba.

"Training Transformers with 4-bit Integers" (Xi, Li, Chen, Zhu; NeurIPS 2023, arXiv
2306.11987), section 4 (the Hadamard quantizer): before quantizing the input X and the weight W
of a linear layer to 4 bits, both are multiplied along the reduction dimension by the same
orthonormal block-diagonal Hadamard matrix H. Since H H^T = I,

    (X H) (W H)^T = X H H^T W^T = X W^T,

so the product is unchanged, but an outlier channel of X is spread over all the channels of its
block (a 1-hot row becomes a flat row of magnitude 1/sqrt(block)), and 4-bit codes lose less.

* ``hadamard(n)``: the n x n Sylvester Hadamard matrix, orthonormal: H_1 = [1],
  H_2n = [[H_n, H_n], [H_n, -H_n]] / sqrt(2), so H[i, j] = (-1)^popcount(i & j) / sqrt(n). It is
  symmetric and its own inverse (H H = I).
* ``fwht(x)``: x @ hadamard(n) along the last axis (n a power of two) by the fast Walsh-Hadamard
  transform, log2(n) butterfly stages of (a + b, a - b), n log2(n) additions instead of n^2
  multiply-adds (speed goal P4); the 1/sqrt(n) normalisation is applied once, at the end.
* ``block_hadamard(x, block)``: x @ blockdiag(H_block, ..., H_block) along the last axis: the
  transform of each run of ``block`` consecutive channels (MiniLM's 384 = 3 x 128, SmolLM2's
  576 = 9 x 64). ``block=1`` is the identity.
* ``block_sizes(n, max_block=1024)``: the block sizes 1, 2, 4, ... <= max_block that divide n (the
  candidates of the Hadamard quantizer's block-size search).

Precision: the butterflies run in float32 for float16 / bfloat16 / float32 input and in float64
for float64 input, and the result is returned in the input's dtype. ``lowbit.fast.hadamard``
runs the same stages in the same order, so the two agree bit for bit. Non-finite values spread
as they do in a matmul: a NaN or Inf makes its whole block NaN (Inf - Inf).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numba import njit

__all__ = ["hadamard", "fwht", "block_hadamard", "block_sizes"]

_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float64")


def _check_power_of_two(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name} must be an int power of two (1, 2, 4, ...), got {n!r}")
    n = int(n)
    if n < 1 or n & (n - 1):
        raise ValueError(f"{name} must be a power of two (1, 2, 4, ..., 2**k), got {n}")
    return n


def _check_float(x, name: str = "x") -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.name not in _FLOAT_NAMES:
        raise ValueError(
            f"{name} must be floating point (float16/bfloat16/float32/float64), got {x.dtype}"
        )
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension (the transformed one)")
    return x


def hadamard(n: int) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of order ``n`` (a power of two), float64.

    H[i, j] = (-1)^popcount(i & j) / sqrt(n): the recursion H_2n = [[H_n, H_n], [H_n, -H_n]] / sqrt(2)
    written out, with each entry rounded once (the recursion would round log2(n) times).
    """
    n = _check_power_of_two(n, "n")
    i = np.arange(n, dtype=np.int64)
    both = i[:, None] & i[None, :]  # (n, n)
    parity = np.zeros((n, n), dtype=np.int64)
    for bit in range(max(n.bit_length() - 1, 0)):
        parity ^= (both >> bit) & 1  # popcount(i & j) mod 2
    sign = 1.0 - 2.0 * parity  # (n, n) of ±1
    return sign * (1.0 / math.sqrt(n))


@njit(cache=True)
def _butterflies(rows: np.ndarray) -> None:
    """In place on (rows, n): the log2(n) stages of the unnormalised Walsh-Hadamard transform.

    Stage h pairs element j with j + h inside each run of 2h elements: (a, b) -> (a + b, a - b).
    Rows are independent, so each row goes through all its stages while it is in cache.
    """
    n_rows, n = rows.shape
    for r in range(n_rows):
        row = rows[r]
        h = 1
        while h < n:
            for start in range(0, n, 2 * h):
                lo = row[start : start + h]  # the a's of this run
                hi = row[start + h : start + 2 * h]  # the b's
                for j in range(h):
                    a = lo[j]
                    b = hi[j]
                    lo[j] = a + b
                    hi[j] = a - b
            h *= 2


def _transform(x: np.ndarray, block: int) -> np.ndarray:
    """Orthonormal transform of each run of ``block`` elements along the last axis."""
    work = np.float64 if x.dtype == np.float64 else np.float32
    rows = np.ascontiguousarray(x.astype(work).reshape(-1, block))  # (numel / block, block)
    _butterflies(rows)
    rows = rows * work(1.0 / math.sqrt(block))  # one rounding for the normalisation
    return rows.reshape(x.shape).astype(x.dtype)


def fwht(x: np.ndarray) -> np.ndarray:
    """The fast Walsh-Hadamard transform along the last axis: x @ hadamard(n), n = x.shape[-1].

    Args:
        x: float array (..., n), n a power of two.

    Returns:
        The transformed array, same shape and dtype.
    """
    x = _check_float(x)
    _check_power_of_two(x.shape[-1], "x.shape[-1]")
    return _transform(x, x.shape[-1])


def block_hadamard(x: np.ndarray, block: int) -> np.ndarray:
    """x @ blockdiag(H_block, ...) along the last axis: each run of ``block`` channels transformed.

    Args:
        x: float array (..., n), n a multiple of ``block``.
        block: a power of two dividing n (1 returns a copy of x).

    Returns:
        The transformed array, same shape and dtype. It is its own inverse:
        ``block_hadamard(block_hadamard(x, b), b) == x`` up to rounding.
    """
    x = _check_float(x)
    block = _check_power_of_two(block, "block")
    n = x.shape[-1]
    if n % block:
        sizes = block_sizes(n) if n else []
        raise ValueError(
            f"block={block} does not divide the last dimension {n}; use one of {sizes}"
        )
    if block == 1:
        return x.copy()
    return _transform(x, block)


def block_sizes(n: int, max_block: int = 1024) -> list[int]:
    """The powers of two 1, 2, 4, ... up to ``max_block`` that divide ``n`` (n >= 1)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    max_block = _check_power_of_two(max_block, "max_block")
    sizes, b = [], 1
    while b <= max_block and int(n) % b == 0:
        sizes.append(b)
        b *= 2
    return sizes
