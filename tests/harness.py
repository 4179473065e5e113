"""``assert_matches_reference``: run the reference and the fast path on the same inputs,
compare with the pair's tolerance tier, and on failure show the worst element bit by bit.

Inputs are NumPy arrays (what the reference takes); the fast path gets them as torch tensors
(``to_torch``), so one call site drives both. Outputs may be arrays or tuples of arrays.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from tests.tolerances import EXACT, MatmulTier

try:  # bf16 arrays on the NumPy side
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None


def to_torch(value: Any) -> Any:
    """NumPy arrays (bf16 included) become tensors; tuples/lists/dicts recurse; the rest passes."""
    if isinstance(value, np.ndarray):
        if _BF16 is not None and value.dtype == _BF16:
            return torch.from_numpy(value.view(np.uint16).copy()).view(torch.bfloat16)
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, tuple):
        return tuple(to_torch(v) for v in value)
    if isinstance(value, list):
        return [to_torch(v) for v in value]
    if isinstance(value, dict):
        return {k: to_torch(v) for k, v in value.items()}
    return value


def to_numpy(value: Any) -> Any:
    """Tensors become NumPy (bf16 as ml_dtypes.bfloat16); tuples/lists recurse."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            return (
                t.view(torch.uint16).numpy().view(_BF16) if _BF16 is not None else t.float().numpy()
            )
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return t.float().numpy()
        return t.numpy()
    if isinstance(value, (tuple, list)):
        return type(value)(to_numpy(v) for v in value)
    return value


def _flat_outputs(out: Any) -> list[np.ndarray]:
    if isinstance(out, (tuple, list)):
        return [np.asarray(o) for o in out]
    return [np.asarray(out)]


def describe_bits(v: float) -> str:
    """sign/exponent/mantissa of a value as float32 bits (what a kernel author debugs with)."""
    b = int(np.array(v, dtype=np.float32).view(np.uint32))
    return f"{v!r} = fp32 0x{b:08x} (s={b >> 31} e={(b >> 23) & 0xFF:08b} m={b & 0x7FFFFF:023b})"


def _fail(name: str, i_out: int, fast: np.ndarray, ref: np.ndarray, bad: np.ndarray, tier) -> None:
    f64 = np.asarray(fast).astype(np.float64)
    r64 = np.asarray(ref).astype(np.float64)
    with np.errstate(invalid="ignore"):
        err = np.where(bad, np.abs(f64 - r64), -1.0)
    err = np.where(np.isnan(err), np.inf, err)
    idx = np.unravel_index(int(np.argmax(err)), err.shape) if err.ndim else ()
    fv, rv = f64[idx], r64[idx]
    msg = (
        f"{name}: output {i_out} differs under tier {tier.name}: "
        f"{int(bad.sum())} of {bad.size} elements; worst at index {tuple(int(i) for i in idx)}\n"
        f"  fast      {describe_bits(float(fv))}\n"
        f"  reference {describe_bits(float(rv))}"
    )
    if np.asarray(fast).dtype.kind in "ui":
        msg += f"\n  codes: fast 0b{int(fv):b}, reference 0b{int(rv):b}"
    raise AssertionError(msg)


def compare(name: str, fast_out: Any, ref_out: Any, tier, naive_out: Any = None) -> None:
    """Compare (tuples of) outputs element-wise under ``tier``; raise with the worst element."""
    fasts, refs = _flat_outputs(to_numpy(fast_out)), _flat_outputs(ref_out)
    assert len(fasts) == len(refs), (
        f"{name}: fast returns {len(fasts)} outputs, reference {len(refs)}"
    )
    naives = _flat_outputs(to_numpy(naive_out)) if naive_out is not None else [None] * len(refs)
    for i, (f, r, n) in enumerate(zip(fasts, refs, naives)):
        assert f.shape == r.shape, (
            f"{name}: output {i} shape {f.shape} (fast) != {r.shape} (reference)"
        )
        if {f.dtype.kind, r.dtype.kind} & set("uib"):
            # codes, masks and indices: the dtype is part of the contract (uint8/uint16 codes)
            assert f.dtype == r.dtype, f"{name}: output {i} dtype {f.dtype} (fast) != {r.dtype}"
        if isinstance(tier, MatmulTier):
            assert n is not None, f"{name}: tier B needs a naive same-precision result"
            bad = tier.check_with_naive(f, r, n)
        else:
            bad = tier.check(f, r)
        if np.any(bad):
            _fail(name, i, f, r, bad, tier)


def check_types(name: str, fast_out: Any, ref_out: Any) -> None:
    """Where the reference returns an array the fast path returns a tensor of the same dtype
    (floats included: a float64 result where the reference gives float32 is a contract break,
    as is a NumPy array from a fast function that fell back to the reference)."""
    if isinstance(ref_out, (tuple, list)):
        assert isinstance(fast_out, (tuple, list)) and len(fast_out) == len(ref_out), (
            f"{name}: fast returns {type(fast_out).__name__}, reference {len(ref_out)} outputs"
        )
        for i, (f, r) in enumerate(zip(fast_out, ref_out)):
            check_types(f"{name} output {i}", f, r)
    elif isinstance(ref_out, np.ndarray):
        assert isinstance(fast_out, torch.Tensor), (
            f"{name}: fast returns {type(fast_out).__name__}, expected a torch.Tensor"
        )
        fast_dtype = to_numpy(fast_out).dtype
        assert fast_dtype == ref_out.dtype, (
            f"{name}: dtype {fast_dtype} (fast) != {ref_out.dtype} (reference)"
        )


def resolve(op: str) -> tuple[Callable, Callable]:
    """'formats.encode' -> (lowbit.reference.formats.encode, lowbit.fast.formats.encode)."""
    module, func = op.rsplit(".", 1)
    ref = getattr(importlib.import_module(f"lowbit.reference.{module}"), func)
    fast = getattr(importlib.import_module(f"lowbit.fast.{module}"), func)
    return ref, fast


def assert_matches_reference(
    op: str,
    *args: Any,
    tier=EXACT,
    naive: Callable[..., Any] | None = None,
    grad: Callable[..., Any] | None = None,
    grad_argnums: Sequence[int] = (),
    grad_tier=None,
    seed: int = 0,
    **kwargs: Any,
) -> None:
    """Run ``lowbit.reference.<op>`` on NumPy inputs and ``lowbit.fast.<op>`` on the same
    inputs as tensors, and compare under ``tier``.

    tier B (``MatmulTier``) needs ``naive(*torch_args, **torch_kwargs)``, the same computation
    in the working precision with plain torch. With ``grad`` (the reference's analytic
    gradient, called as ``grad(*args, grad_output=g, **kwargs)`` and returning one array per
    entry of ``grad_argnums``), the fast path's autograd gradients are checked too.
    """
    ref_fn, fast_fn = resolve(op)
    ref_out = ref_fn(*args, **kwargs)
    t_args, t_kwargs = to_torch(args), to_torch(kwargs)
    for i in grad_argnums:
        t_args[i].requires_grad_(True)
    fast_out = fast_fn(*t_args, **t_kwargs)
    naive_out = naive(*to_torch(args), **to_torch(kwargs)) if naive is not None else None
    # tier B: the reference computes in float64 (the oracle); the fast path returns the working
    # precision, as the naive same-precision torch computation does
    check_types(op, fast_out, to_numpy(naive_out) if isinstance(tier, MatmulTier) else ref_out)
    compare(op, fast_out, ref_out, tier, naive_out)
    if grad is None:
        return
    out0 = fast_out[0] if isinstance(fast_out, (tuple, list)) else fast_out
    g = np.random.default_rng(seed).standard_normal(tuple(out0.shape))
    ref_grads = grad(*args, grad_output=g, **kwargs)
    fast_grads = torch.autograd.grad(
        out0,
        [t_args[i] for i in grad_argnums],
        torch.from_numpy(g).to(out0.dtype),
        allow_unused=True,
    )
    fast_grads = tuple(
        torch.zeros_like(t_args[i]) if fg is None else fg for i, fg in zip(grad_argnums, fast_grads)
    )
    compare(f"{op} (gradient)", fast_grads, tuple(ref_grads), grad_tier or tier)
