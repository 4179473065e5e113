"""The comparison machinery of ``lowbit.fast.testing``: run the reference and the code under
test (lowbit's fast path, or your kernel) on the same inputs, compare under a tolerance tier,
and on failure show the worst element bit by bit (``check_op``, ``compare``).

Inputs are NumPy arrays (what the reference takes); the code under test gets them as torch
tensors (``to_torch``), so one call site drives both. Outputs may be arrays, tensors or tuples
of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lowbit.fast.testing.tiers import EXACT, MatmulTier

try:  # bf16 arrays on the NumPy side
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None


@dataclass(frozen=True)
class Call:
    """The arguments of one call, as the reference takes them: NumPy arrays and plain values."""

    args: tuple
    kwargs: dict = field(default_factory=dict)


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


# (bits, exponent bits, mantissa bits) of the float dtypes a value may be shown in
_FLOAT_LAYOUTS = {"float16": (16, 5, 10), "bfloat16": (16, 8, 7), "float32": (32, 8, 23),
                  "float64": (64, 11, 52)}  # fmt: skip


def describe_bits(v: float, dtype: Any = np.float32) -> str:
    """A value with its sign / exponent / mantissa bits in ``dtype`` (float16, bfloat16,
    float32 or float64; float32 for anything else): what a kernel author debugs with."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    name = name if name in _FLOAT_LAYOUTS else "float32"
    n, e, m = _FLOAT_LAYOUTS[name]
    with np.errstate(over="ignore", invalid="ignore"):  # a value beyond the dtype shows as Inf
        if name == "bfloat16" and _BF16 is not None:
            b = int(np.array(v, dtype=np.float32).astype(_BF16).view(np.uint16))
        elif name == "bfloat16":  # pragma: no cover - without ml_dtypes: round to nearest even
            u = int(np.array(v, dtype=np.float32).view(np.uint32))
            b = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 if (u & 0x7FFFFFFF) <= 0x7F800000 else u >> 16
        else:
            b = int(np.array(v, dtype=name).view(f"uint{n}"))
    name_short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
    return (
        f"{v!r} = {name_short[name]} 0x{b:0{n // 4}x} "
        f"(s={b >> (n - 1)} e={(b >> m) & ((1 << e) - 1):0{e}b} m={b & ((1 << m) - 1):0{m}b})"
    )


def describe_code(code: int, fmt: Any = None, bits: int | None = None) -> str:
    """An integer code in binary (negative ones in two's complement over ``bits``, default the
    smallest of 8 / 16 / 32 / 64 that holds them), split into sign / exponent / mantissa fields
    when ``fmt`` (a lowbit FPFormat or its name) is known."""
    code = int(code)
    if isinstance(fmt, str):
        fmt = _format_or_none(fmt)
    ebits, mbits = getattr(fmt, "ebits", None), getattr(fmt, "mbits", None)
    if ebits is None or mbits is None:
        if code >= 0:
            return f"{code} = 0b{code:b}"
        width = bits or next(w for w in (8, 16, 32, 64) if code >= -(1 << (w - 1)))
        return f"{code} = 0b{code & ((1 << width) - 1):0{width}b} (int{width})"
    signed = getattr(fmt, "signed", True)
    fields = [f"e={(code >> mbits) & ((1 << ebits) - 1):0{ebits}b}"]
    if mbits:
        fields.append(f"m={code & ((1 << mbits) - 1):0{mbits}b}")
    if signed:
        fields.insert(0, f"s={(code >> (ebits + mbits)) & 1}")
    return f"{code} = 0b{code:0{ebits + mbits + int(signed)}b} ({' '.join(fields)})"


def _format_or_none(value: Any) -> Any:
    """A lowbit float format from an argument (a format object or a format name), else None."""
    if hasattr(value, "ebits"):
        return value
    if isinstance(value, str):
        from lowbit.reference.formats import parse_format

        try:
            fmt = parse_format(value)
        except (ValueError, KeyError):
            return None
        return fmt if hasattr(fmt, "ebits") else None
    return None


def _fail(
    name: str,
    i_out: int,
    fast: np.ndarray,
    ref: np.ndarray,
    bad: np.ndarray,
    tier,
    label: str = "fast",
    inputs: Sequence[Any] = (),
    fmt: Any = None,
) -> None:
    """Raise the report for output ``i_out``; ``inputs`` are the call's positional arguments,
    ``fmt`` splits the codes of output 0 into fields."""
    f64 = np.asarray(fast).astype(np.float64)
    r64 = np.asarray(ref).astype(np.float64)
    with np.errstate(invalid="ignore"):
        err = np.where(bad, np.abs(f64 - r64), -1.0)
    err = np.where(np.isnan(err), np.inf, err)
    idx = np.unravel_index(int(np.argmax(err)), err.shape) if err.ndim else ()
    fv, rv = f64[idx], r64[idx]
    width = max(len(label), len("reference"))
    lines = [
        f"{name}: output {i_out} differs under tier {tier.name}: "
        f"{int(bad.sum())} of {bad.size} elements; worst at index {tuple(int(i) for i in idx)}"
    ]
    # the input element at that index, where an input has the output's shape (element-wise ops)
    for k, x in enumerate(inputs):
        if isinstance(x, np.ndarray) and x.shape == np.shape(fast) and x.dtype.kind in "fV":
            shown = float(np.asarray(x, dtype=np.float64)[idx])
            lines.append(f"  {'input':<{width}} {describe_bits(shown, x.dtype)} (argument {k})")
            break
    if np.asarray(fast).dtype.kind in "ui":
        bits = np.asarray(ref).dtype.itemsize * 8
        code_fmt = fmt if i_out == 0 else None  # later outputs are scales, not element codes
        lines.append(f"  {label:<{width}} {describe_code(int(fv), code_fmt, bits)}")
        lines.append(f"  {'reference':<{width}} {describe_code(int(rv), code_fmt, bits)}")
    else:
        out_dtype = np.asarray(ref).dtype
        lines.append(f"  {label:<{width}} {describe_bits(float(fv), out_dtype)}")
        lines.append(f"  {'reference':<{width}} {describe_bits(float(rv), out_dtype)}")
    raise AssertionError("\n".join(lines))


def compare(
    name: str,
    fast_out: Any,
    ref_out: Any,
    tier,
    naive_out: Any = None,
    *,
    label: str = "fast",
    inputs: Sequence[Any] = (),
    fmt: Any = None,
) -> None:
    """Compare (tuples of) outputs element-wise under ``tier``; raise ``AssertionError`` with
    the worst element (the input there, both outputs and their bits) and the mismatch count.
    ``label`` names the side under test in the message; ``inputs`` (NumPy arguments) and ``fmt``
    (to split codes into fields) make the report more telling."""
    fasts, refs = _flat_outputs(to_numpy(fast_out)), _flat_outputs(ref_out)
    assert len(fasts) == len(refs), (
        f"{name}: {label} returns {len(fasts)} outputs, reference {len(refs)}"
    )
    naives = _flat_outputs(to_numpy(naive_out)) if naive_out is not None else [None] * len(refs)
    for i, (f, r, n) in enumerate(zip(fasts, refs, naives)):
        assert f.shape == r.shape, (
            f"{name}: output {i} shape {f.shape} ({label}) != {r.shape} (reference)"
        )
        if {f.dtype.kind, r.dtype.kind} & set("uib"):
            # codes, masks and indices: the dtype is part of the contract (uint8/uint16 codes)
            assert f.dtype == r.dtype, f"{name}: output {i} dtype {f.dtype} ({label}) != {r.dtype}"
        if isinstance(tier, MatmulTier):
            assert n is not None, f"{name}: tier B needs a naive same-precision result"
            bad = tier.check_with_naive(f, r, n)
        else:
            bad = tier.check(f, r)
        if np.any(bad):
            _fail(name, i, f, r, bad, tier, label, inputs, fmt)


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


def resolve_reference(op: str) -> Callable:
    """'formats.encode' -> lowbit.reference.formats.encode."""
    module, func = op.rsplit(".", 1)
    return getattr(importlib.import_module(f"lowbit.reference.{module}"), func)


def resolve(op: str) -> tuple[Callable, Callable]:
    """'formats.encode' -> (lowbit.reference.formats.encode, lowbit.fast.formats.encode)."""
    module, func = op.rsplit(".", 1)
    fast = getattr(importlib.import_module(f"lowbit.fast.{module}"), func)
    return resolve_reference(op), fast


def check_op(
    op: str,
    *args: Any,
    tier=EXACT,
    naive: Callable[..., Any] | None = None,
    grad: Callable[..., Any] | None = None,
    grad_argnums: Sequence[int] = (),
    grad_tier=None,
    grad_seed: int = 0,
    fn: Callable[..., Any] | None = None,
    label: str = "fast",
    to_inputs: Callable[[Any], Any] = to_torch,
    **kwargs: Any,
) -> None:
    """Run ``lowbit.reference.<op>`` on NumPy inputs and ``lowbit.fast.<op>`` on the same
    inputs as tensors, and compare under ``tier``. ``fn`` replaces the fast function (someone's
    own kernel, named ``label`` in failures; ``to_inputs`` converts the NumPy arguments for it).

    tier B (``MatmulTier``) needs ``naive(*torch_args, **torch_kwargs)``, the same computation
    in the working precision with plain torch. With ``grad`` (the reference's analytic
    gradient, called as ``grad(*args, grad_output=g, **kwargs)`` and returning one array per
    entry of ``grad_argnums``), the fast path's autograd gradients are checked too, against a
    random upstream gradient drawn with ``grad_seed``. Every other keyword goes to the op.
    """
    if fn is None:
        ref_fn, fast_fn = resolve(op)
        ref_out = ref_fn(*args, **kwargs)
    else:  # someone's kernel: a reference that refuses the input is not the kernel's failure
        ref_fn, fast_fn = resolve_reference(op), fn
        try:
            ref_out = ref_fn(*args, **kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"lowbit.reference.{op} rejects this input: {err}") from err
    t_args, t_kwargs = to_inputs(args), to_inputs(kwargs)
    for i in grad_argnums:
        t_args[i].requires_grad_(True)
    fast_out = fast_fn(*t_args, **t_kwargs)
    naive_out = naive(*to_torch(args), **to_torch(kwargs)) if naive is not None else None
    # tier B: the reference computes in float64 (the oracle); the fast path returns the working
    # precision, as the naive same-precision torch computation does
    if fn is None:  # lowbit's own fast path: tensors in, tensors of the reference's dtypes out
        check_types(op, fast_out, to_numpy(naive_out) if isinstance(tier, MatmulTier) else ref_out)
    fmt = next((f for f in map(_format_or_none, (*args, *kwargs.values())) if f is not None), None)
    compare(op, fast_out, ref_out, tier, naive_out, label=label, inputs=args, fmt=fmt)
    if grad is None:
        return
    out0 = fast_out[0] if isinstance(fast_out, (tuple, list)) else fast_out
    g = np.random.default_rng(grad_seed).standard_normal(tuple(out0.shape))
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
