"""The mirror rule, checked: every public fast function has a registered reference twin with
the same parameters and defaults, and every registered pair agrees under Hypothesis."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowbit.fast
import lowbit.reference
from lowbit.fast.testing.pairs import PAIRS, TORCH_ONLY_MODULES
from tests.harness import assert_matches_reference

ROOT = Path(__file__).resolve().parents[1]


# Re-exported reference helpers that take and return no arrays (format names and lists): the
# fast module offers them under the same name so that code can import everything from one side.
SHARED_HELPERS = {
    "formats.parse_format",
    "fpq.default_formats",
    "omniquant.group_count",
    "hadamard.block_sizes",
}


def _fast_modules():
    for info in pkgutil.iter_modules(lowbit.fast.__path__):
        if not info.name.startswith("_") and info.name not in TORCH_ONLY_MODULES:
            yield info.name, importlib.import_module(f"lowbit.fast.{info.name}")


def _public_callables(module):
    """Every public callable of a module that is not a class: the names of ``__all__``, and any
    other public name bound to a callable defined in the module (a function, but also an
    ``lru_cache`` or ``partial`` wrapper, which ``inspect.isfunction`` does not see)."""
    names = set(getattr(module, "__all__", ()))
    for name, obj in vars(module).items():
        defined_here = getattr(obj, "__module__", None) == module.__name__
        if not name.startswith("_") and callable(obj) and defined_here:
            names.add(name)
    for name in sorted(names):
        obj = getattr(module, name)
        if callable(obj) and not inspect.isclass(obj):
            yield name, obj


def _public_fast_functions():
    for mod_name, module in _fast_modules():
        for name, obj in _public_callables(module):
            if f"{mod_name}.{name}" not in SHARED_HELPERS:
                yield f"{mod_name}.{name}", obj


FAST_FUNCTIONS = dict(_public_fast_functions())


def test_every_public_fast_function_has_a_pair():
    missing = sorted(set(FAST_FUNCTIONS) - set(PAIRS))
    assert not missing, (
        f"public fast functions without a pair in lowbit/fast/testing/pairs/<method>.py: {missing}"
    )


def test_fast_functions_are_not_the_reference_functions():
    """A fast function that is the reference's own (an import instead of a torch version)
    passes every pair test trivially; only the array-free SHARED_HELPERS may be shared."""
    shared = []
    for mod_name, module in _fast_modules():
        ref_module = importlib.import_module(f"lowbit.reference.{mod_name}")
        for name, obj in _public_callables(module):
            ref_obj = getattr(ref_module, name, None)
            if f"{mod_name}.{name}" not in SHARED_HELPERS and ref_obj is not None:
                if obj is ref_obj or getattr(obj, "__module__", "").startswith("lowbit.reference"):
                    shared.append(f"{mod_name}.{name}")
    assert not shared, f"fast functions that are reference functions: {shared}"
    for op in SHARED_HELPERS:
        module, name = op.rsplit(".", 1)
        assert getattr(importlib.import_module(f"lowbit.fast.{module}"), name) is getattr(
            importlib.import_module(f"lowbit.reference.{module}"), name
        ), f"{op} is listed as a shared helper but is not the reference's"


def test_the_meta_test_sees_wrapped_and_imported_functions(monkeypatch):
    """The checks above catch what the review found slipping through: a public lru_cache
    function with no twin, and a fast function replaced by an import of the reference's."""
    import functools

    from lowbit.fast import fpq as fast_fpq
    from lowbit.reference import fpq as ref_fpq

    @functools.lru_cache
    def table(bits: int) -> int:
        return bits

    table.__module__ = fast_fpq.__name__
    monkeypatch.setattr(fast_fpq, "table", table, raising=False)
    monkeypatch.setattr(fast_fpq, "bias_from_max", ref_fpq.bias_from_max)
    found = dict(_public_fast_functions())
    assert "fpq.table" in found and "fpq.table" not in PAIRS
    with pytest.raises(AssertionError, match=r"fpq\.bias_from_max"):
        test_fast_functions_are_not_the_reference_functions()


def test_pairs_driven_elsewhere_name_a_test_that_exists():
    """``tested_in`` names the dedicated test of a pair the Hypothesis runner skips."""
    for op, pair in PAIRS.items():
        if pair.tested_in is None:
            continue
        target = pair.tested_in.split(" ", 1)[0]
        path, _, test_name = target.partition("::")
        file = ROOT / path
        assert file.is_file(), f"{op}: tested_in names {path}, which does not exist"
        assert re.search(rf"^def {re.escape(test_name)}\(", file.read_text(), re.M), (
            f"{op}: tested_in names {target}, which does not exist"
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
            **call.kwargs,
        )

    run()


def _tensor_parameters(func):
    return [
        p.name
        for p in inspect.signature(func).parameters.values()
        if isinstance(p.annotation, str) and p.annotation.startswith("torch.Tensor")
    ]


TAKES_TENSORS = sorted(op for op, f in FAST_FUNCTIONS.items() if _tensor_parameters(f))


def test_every_tensor_taking_fast_function_is_covered_below():
    """The check below runs pair inputs; the functions without a Hypothesis pair are checked
    here by hand: fpq.search in detail, the others given NumPy for every required argument
    (the first tensor parameter is named)."""
    import numpy as np
    import torch

    from lowbit.fast import fpq

    by_hand = set(TAKES_TENSORS) - {op for op, p in PAIRS.items() if p.tested_in is None}
    assert "fpq.search" in by_hand
    for op in sorted(by_hand - {"fpq.search"}):
        func, name = FAST_FUNCTIONS[op], op.rsplit(".", 1)[1]
        params = inspect.signature(func).parameters.values()
        required = [p for p in params if p.default is inspect.Parameter.empty]
        args = [np.ones((2, 2)) for p in required if p.kind != inspect.Parameter.KEYWORD_ONLY]
        kwargs = {
            p.name: np.ones((2, 2)) for p in required if p.kind == inspect.Parameter.KEYWORD_ONLY
        }
        first = _tensor_parameters(func)[0]
        with pytest.raises(TypeError, match=f"^{name}: {first} must be a torch tensor, got numpy"):
            func(*args, **kwargs)

    x, w = np.ones((4, 3), np.float32), np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="^search: x must be a torch tensor, got numpy.ndarray"):
        fpq.search(x, torch.from_numpy(w))
    with pytest.raises(TypeError, match="^search: b must be a torch tensor, got list"):
        fpq.search(torch.from_numpy(x), torch.from_numpy(w), [0.0, 1.0])


@pytest.mark.parametrize("op", [op for op in TAKES_TENSORS if PAIRS[op].tested_in is None])
def test_fast_functions_given_numpy_or_lists_raise_type_error(op):
    """Every tensor parameter of every fast function, given the NumPy array the reference takes
    (or a list): a one-line TypeError naming the parameter, not an AttributeError from deep
    inside (``'numpy.ndarray' object has no attribute 'is_floating_point'``)."""
    import numpy as np
    from hypothesis import assume, settings

    from tests.harness import to_torch

    func, name = FAST_FUNCTIONS[op], op.rsplit(".", 1)[1]
    tensor_params = _tensor_parameters(func)
    signature = inspect.signature(func)

    @settings(max_examples=10, deadline=None)
    @given(st.data())
    def run(data):
        call = data.draw(PAIRS[op].inputs, label="call")
        bound = signature.bind(*call.args, **call.kwargs).arguments
        arrays = [p for p in tensor_params if isinstance(bound.get(p), np.ndarray)]
        assume(arrays)
        for param in arrays:
            for wrong in (bound[param], bound[param].tolist()):
                kwargs = {k: (wrong if k == param else to_torch(v)) for k, v in bound.items()}
                with pytest.raises(TypeError) as info:
                    func(**kwargs)
                msg = str(info.value)
                assert msg.startswith(f"{name}: {param} must be a torch tensor, got "), msg
                assert "\n" not in msg and "torch.as_tensor" in msg

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


def test_harness_rejects_arrays_and_other_dtypes_from_the_fast_side():
    """``check_types``, which every pair runs: a NumPy result (a fast function that fell back to
    the reference) and a float result of another dtype both fail."""
    import numpy as np
    import torch

    from tests.harness import check_types

    ref = (np.zeros(3, np.float32), np.zeros(3, np.uint8))
    check_types("ok", (torch.zeros(3), torch.zeros(3, dtype=torch.uint8)), ref)
    with pytest.raises(AssertionError, match="expected a torch.Tensor"):
        check_types("numpy", (np.zeros(3, np.float32), torch.zeros(3, dtype=torch.uint8)), ref)
    with pytest.raises(AssertionError, match="float64"):
        check_types(
            "dtype", (torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.uint8)), ref
        )
