"""pytest plugin (entry point ``pytest11``, registered when lowbit is installed): the
``lowbit_oracle`` fixture, which is the kit ``lowbit.fast.testing`` itself.

    def test_my_encode(lowbit_oracle):
        lowbit_oracle.assert_matches_reference(my_encode, "formats.encode", max_examples=100)

Importing this module loads nothing but pytest, so it costs other test suites nothing.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def lowbit_oracle() -> Any:
    """``lowbit.fast.testing``: ``assert_matches_reference``, ``exhaustive_16bit``,
    ``strategies`` and the tolerance tiers."""
    import lowbit.fast.testing as kit

    return kit
