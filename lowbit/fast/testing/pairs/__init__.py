"""Registry of reference/fast pairs (DESIGN.md section 2, the mirror rule).

Every public function of ``lowbit.fast.<module>`` is registered with a Hypothesis strategy for
its inputs (NumPy side) and its tolerance tier. lowbit's ``tests/test_pairs.py`` runs every pair
under Hypothesis and fails when a public fast function is missing from ``PAIRS`` or its
signature differs from the reference's; ``lowbit.fast.testing.assert_matches_reference`` draws
a user's inputs from the same strategies.

One file per method, ``lowbit/fast/testing/pairs/<method>.py``, calls ``register(Pair(...))``
at import; a new method adds its file and its name to ``METHODS`` below (strategies that
several methods share live in ``lowbit.fast.testing.strategies``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowbit.fast.testing._hypothesis import st  # one line if Hypothesis is missing
from lowbit.fast.testing.harness import Call
from lowbit.fast.testing.tiers import EXACT, ExactTier, FormatTier, MatmulTier

TIERS = (ExactTier, FormatTier, MatmulTier)


@dataclass(frozen=True)
class Pair:
    op: str  # "<module>.<function>", e.g. "formats.encode"
    inputs: st.SearchStrategy[Call]
    # A tier, or a function Call -> tier (format-dependent tiers).
    tier: Any = EXACT
    # Tier B: the same computation in working precision with plain torch (torch args).
    naive: Callable[..., Any] | None = None
    # (Analytic gradients are checked by dedicated tests that call assert_matches_reference
    # with grad=..., e.g. tests/test_llm_int8.py: their inputs need one dtype.)
    # Functions registered only for the meta-test (e.g. driven by dedicated tests that
    # need a model): give the reason here and no strategy is run.
    tested_in: str | None = None

    def tier_for(self, call: Call):
        return self.tier if isinstance(self.tier, TIERS) else self.tier(call)


PAIRS: dict[str, Pair] = {}

# Fast modules that are not mirrored (they exist only on the torch side: DESIGN.md section 1).
TORCH_ONLY_MODULES = {"nn", "convert", "cli", "models", "report", "data", "testing", "export"}
TORCH_ONLY_MODULES |= {"hf_quantizer"}


def register(pair: Pair) -> Pair:
    if pair.op in PAIRS:
        raise ValueError(f"pair {pair.op!r} registered twice")
    PAIRS[pair.op] = pair
    return pair


# One line per method: the files whose import registers that method's pairs.
METHODS = ("formats", "uniform", "llm_int8", "fpq", "omniquant", "hadamard", "int4_training")

for _method in METHODS:
    importlib.import_module(f"lowbit.fast.testing.pairs.{_method}")
