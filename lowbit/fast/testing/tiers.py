"""The three tolerance tiers of DESIGN.md section 5, written once.

A) ``EXACT``: bit-exact (codes, scales, masks, packed bytes, sampled indices, and values that
   are decoded from codes). NaNs must sit in the same places.
B) ``MatmulTier``: for matmuls and reductions the fast result may differ from a float64 truth
   by at most ``factor`` times the error of a naive same-precision torch computation, plus a
   noise floor that covers the case where the naive result happens to be exact.
C) ``FormatTier``: otherwise the tolerance comes from the number format:
   ``rtol = 2**-mbits`` (one unit in the last place of the format) and ``atol = min_subnormal``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ExactTier:
    name: str = "A (bit-exact)"

    def check(self, fast: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Return a boolean mask of elements that violate the tier."""
        fast, ref = np.asarray(fast), np.asarray(ref)
        # ml_dtypes' bfloat16 has kind "V": its NaNs must still compare equal
        if "f" in (fast.dtype.kind, ref.dtype.kind) or "bfloat16" in (
            fast.dtype.name,
            ref.dtype.name,
        ):
            f = fast.astype(np.float64)
            r = ref.astype(np.float64)
            both_nan = np.isnan(f) & np.isnan(r)
            same = (f == r) & (np.signbit(f) == np.signbit(r))
            return ~(same | both_nan)
        return fast != ref


@dataclass(frozen=True)
class FormatTier:
    """rtol = 2**-mbits, atol = min_subnormal of the format the values live in."""

    mbits: int
    min_subnormal: float
    name: str = "C (format-derived)"

    def check(self, fast: np.ndarray, ref: np.ndarray) -> np.ndarray:
        f = np.asarray(fast, dtype=np.float64)
        r = np.asarray(ref, dtype=np.float64)
        both_nan = np.isnan(f) & np.isnan(r)
        with np.errstate(invalid="ignore"):
            close = np.abs(f - r) <= self.min_subnormal + 2.0**-self.mbits * np.abs(r)
        return ~(close | both_nan | (f == r))


@dataclass(frozen=True)
class MatmulTier:
    """Tier B: |fast - truth| <= factor * max|naive - truth| + floor * max|truth|.

    ``truth`` is the float64 reference result, ``naive`` the same computation done in the
    working precision with plain torch ops (e.g. ``(x.half() @ w.half().T)``). The comparison
    is on the max norm of the error, so one unlucky element does not fail the whole test.
    """

    factor: float = 2.0
    floor: float = 2.0**-20
    name: str = "B (matmul: <= 2x naive error)"

    def check_with_naive(
        self, fast: np.ndarray, truth: np.ndarray, naive: np.ndarray
    ) -> np.ndarray:
        f = np.asarray(fast, dtype=np.float64)
        t = np.asarray(truth, dtype=np.float64)
        n = np.asarray(naive, dtype=np.float64)
        if t.size == 0:
            return np.zeros(t.shape, dtype=bool)
        finite = np.isfinite(t)
        both = finite & np.isfinite(n)
        # The floor is relative to the result's scale, so tiny outputs get no free pass; the
        # budget comes from finite elements only (an Inf or NaN would make it Inf or NaN).
        naive_err = float(np.max(np.abs(n[both] - t[both]))) if both.any() else 0.0
        scale = float(np.max(np.abs(t[finite]))) if finite.any() else 0.0
        budget = self.factor * naive_err + self.floor * scale + 1e-30
        with np.errstate(invalid="ignore"):
            within = np.abs(f - t) <= budget  # False where f is NaN: a NaN never passes
            special = (f == t) | (np.isnan(f) & np.isnan(t))  # Inf / NaN truth: the same value
        return np.where(finite, ~within, ~special)


EXACT = ExactTier()
MATMUL = MatmulTier()


def format_tier(fmt) -> FormatTier:
    """Tier C for a lowbit format (anything with ``mbits`` and ``min_subnormal``)."""
    return FormatTier(mbits=fmt.mbits, min_subnormal=fmt.min_subnormal)


# Named floating-point working precisions, for tier C on plain torch dtypes.
FP32 = FormatTier(mbits=23, min_subnormal=2.0**-149)
FP16 = FormatTier(mbits=10, min_subnormal=2.0**-24)
BF16 = FormatTier(mbits=7, min_subnormal=2.0**-133)
