"""The mirror rule, checked: every public fast function has a registered reference twin with
the same parameters and defaults, and every registered pair agrees under Hypothesis."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import lowbit.fast
import lowbit.reference
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.harness import assert_matches_reference
from tests.pairs import PAIRS, TORCH_ONLY_MODULES


def _public_fast_functions():
    for info in pkgutil.iter_modules(lowbit.fast.__path__):
        if info.name.startswith("_") or info.name in TORCH_ONLY_MODULES:
            continue
        module = importlib.import_module(f"lowbit.fast.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(obj):
                continue
            if obj.__module__ != module.__name__:
                continue  # imported helpers are not this module's API
            yield f"{info.name}.{name}", obj


FAST_FUNCTIONS = dict(_public_fast_functions())


def test_every_public_fast_function_has_a_pair():
    missing = sorted(set(FAST_FUNCTIONS) - set(PAIRS))
    assert not missing, (
        f"public fast functions without a pair in tests/pairs/<method>.py: {missing}"
    )


@pytest.mark.parametrize("op", sorted(FAST_FUNCTIONS))
def test_signatures_mirror_the_reference(op):
    module, name = op.rsplit(".", 1)
    ref_module = importlib.import_module(f"lowbit.reference.{module}")
    assert hasattr(ref_module, name), f"lowbit.reference.{module} has no {name} (mirror rule)"
    ref_sig = inspect.signature(getattr(ref_module, name))
    fast_sig = inspect.signature(FAST_FUNCTIONS[op])
    ref_params = [(p.name, p.kind, p.default) for p in ref_sig.parameters.values()]
    fast_params = [(p.name, p.kind, p.default) for p in fast_sig.parameters.values()]
    assert ref_params == fast_params, f"{op}: reference {ref_sig} != fast {fast_sig}"


@pytest.mark.parametrize("op", sorted(op for op, p in PAIRS.items() if p.tested_in is None))
def test_pair_agrees(op):
    pair = PAIRS[op]

    @given(st.data())
    def run(data):
        call = data.draw(pair.inputs, label="call")
        assert_matches_reference(
            op,
            *call.args,
            tier=pair.tier_for(call),
            naive=pair.naive,
            grad=pair.grad,
            grad_argnums=pair.grad_argnums,
            grad_tier=pair.grad_tier,
            **call.kwargs,
        )

    run()


def _public_reference_functions():
    for info in pkgutil.iter_modules(lowbit.reference.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"lowbit.reference.{info.name}")
        for name, obj in vars(module).items():
            if (
                inspect.isfunction(obj)
                and not name.startswith("_")
                and obj.__module__ == module.__name__
            ):
                yield f"{info.name}.{name}"


def test_every_public_reference_function_has_a_fast_twin():
    """The other direction of the mirror rule. Analytic gradients (``*_grad``) are the
    exception: the fast path gets them from autograd, and the pairs check one against the other."""

    def has_twin(op: str) -> bool:
        module, name = op.rsplit(".", 1)  # re-exported data helpers (parse_format) count too
        return hasattr(importlib.import_module(f"lowbit.fast.{module}"), name)

    missing = sorted(
        op for op in _public_reference_functions() if not op.endswith("_grad") and not has_twin(op)
    )
    assert not missing, f"reference functions without a fast twin: {missing}"
