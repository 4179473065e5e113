"""Hypothesis for the parts of the kit that draw inputs, with one clear line when it is missing
(it is an optional extra, not a dependency of lowbit)."""

MISSING = (
    "lowbit.fast.testing draws its inputs with Hypothesis, which is not installed: "
    "pip install 'lowbit[testing]'"
)

try:
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(MISSING) from err

__all__ = ["MISSING", "st"]
