"""lowbit's own tests compare the fast path with the reference through the installed kit
(``lowbit.fast.testing``), so the kit users get is the one these tests exercise.

``assert_matches_reference(op, *args, tier=..., naive=..., grad=...)`` here runs
``lowbit.fast.<op>`` against ``lowbit.reference.<op>`` on the same NumPy arguments.
"""

from lowbit.fast.testing.harness import check_op as assert_matches_reference
from lowbit.fast.testing.harness import check_types, compare, describe_bits, to_numpy, to_torch

__all__ = [
    "assert_matches_reference",
    "check_types",
    "compare",
    "describe_bits",
    "to_numpy",
    "to_torch",
]
