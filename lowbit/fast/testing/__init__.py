"""Test your own quantization kernel against lowbit's reference, bit for bit.

The kit lowbit's own tests use, installed with the package (Hypothesis is the optional extra
``pip install 'lowbit[testing]'``):

* ``assert_matches_reference(fn, op)``: your ``fn``, with the signature of
  ``lowbit.reference.<op>`` (e.g. ``op="formats.encode"``), runs on the inputs lowbit's own
  tests draw for that op (tile-edge shapes, ties, subnormals, overflow, Inf / NaN, outlier
  rows) or on ``inputs``; its results are compared with the reference under the op's tier
  (bit-exact for codes). On a mismatch, ``AssertionError`` names the worst element: the input
  there, both outputs with their sign / exponent / mantissa bits, and how many elements differ.
* ``exhaustive_16bit(fn, op, fmt)``: every float16 and bfloat16 bit pattern through both,
  mismatches counted by class (NaN, Inf, overflow, tie, subnormal, zero, other).
* ``strategies``: the Hypothesis strategies (``formats``, ``shapes``, ``bit_patterns``,
  ``outlier_rows``, ``values_for(fmt)``, ...); the tiers ``EXACT``, ``MATMUL``, ``FormatTier``.
* a pytest fixture, ``lowbit_oracle``, registered when lowbit is installed:
  ``def test_mine(lowbit_oracle): lowbit_oracle.assert_matches_reference(my_encode, "formats.encode")``.

``fn`` receives torch tensors (on ``device`` when given, else on the CPU) or, with
``numpy_inputs=True``, NumPy arrays; it may return either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowbit.fast.testing.harness import (
    Call,
    check_op,
    compare,
    describe_bits,
    describe_code,
    resolve_reference,
    to_numpy,
    to_torch,
)
from lowbit.fast.testing.tiers import (
    BF16,
    EXACT,
    FP16,
    FP32,
    MATMUL,
    ExactTier,
    FormatTier,
    MatmulTier,
    format_tier,
)

__all__ = [
    "assert_matches_reference",
    "Call",
    "exhaustive_16bit",
    "ExhaustiveReport",
    "ops",
    "compare",
    "describe_bits",
    "describe_code",
    "to_numpy",
    "to_torch",
    "EXACT",
    "MATMUL",
    "FP32",
    "FP16",
    "BF16",
    "ExactTier",
    "FormatTier",
    "MatmulTier",
    "format_tier",
]


def __getattr__(name: str) -> Any:
    if name == "strategies":  # imported on use: it needs Hypothesis
        import lowbit.fast.testing.strategies as module

        return module
    raise AttributeError(f"module 'lowbit.fast.testing' has no attribute {name!r}")


def _pairs() -> dict:
    from lowbit.fast.testing.pairs import PAIRS

    return PAIRS


def ops() -> list[str]:
    """The ops ``assert_matches_reference`` can draw inputs for, e.g. "formats.encode"."""
    return sorted(op for op, pair in _pairs().items() if pair.tested_in is None)


def _converter(device: Any, numpy_inputs: bool) -> Callable[[Any], Any]:
    """NumPy arguments -> what ``fn`` takes: tensors (on ``device``) or NumPy copies."""
    if numpy_inputs and device is not None:
        raise ValueError("numpy_inputs=True hands fn NumPy arrays, which have no device: pass one")
    if numpy_inputs:
        return lambda value: _map(value, np.ndarray, lambda a: np.array(a, copy=True))

    def convert(value: Any) -> Any:
        import torch

        out = to_torch(value)
        return out if device is None else _map(out, torch.Tensor, lambda t: t.to(device))

    return convert


def _map(value: Any, leaf: type, f: Callable) -> Any:
    """``f`` applied to every ``leaf`` instance inside tuples, lists and dicts."""
    if isinstance(value, leaf):
        return f(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(v, leaf, f) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, leaf, f) for k, v in value.items()}
    return value


def _check_op_name(op: Any) -> None:
    if not isinstance(op, str) or op.count(".") != 1:
        raise ValueError(f"op must name a reference function as 'module.function', got {op!r}")
    try:
        resolve_reference(op)
    except (ImportError, AttributeError):
        raise ValueError(
            f"lowbit has no reference function {op!r}; lowbit.fast.testing.ops() lists them"
        ) from None


def assert_matches_reference(
    fn: Callable[..., Any],
    op: str,
    *,
    inputs: Any = None,
    tier: Any = None,
    max_examples: int = 200,
    seed: int = 0,
    device: Any = None,
    numpy_inputs: bool = False,
    **kwargs: Any,
) -> None:
    """Check ``fn`` against ``lowbit.reference.<op>`` on many inputs; raise ``AssertionError``
    with a bit-level report of the worst element of the first (shrunk) failing input.

    ``inputs``: a Hypothesis strategy of argument tuples, or a list of argument tuples (NumPy
    arrays and plain values, as the reference takes them); default: lowbit's own strategy for
    ``op`` (``ops()`` lists the ops that have one). ``tier``: ``EXACT``, a ``FormatTier`` or a
    ``MatmulTier`` (default: the op's own tier, bit-exact for codes). ``max_examples`` and
    ``seed`` drive Hypothesis (the same seed draws the same inputs). Keyword arguments go to
    both sides on every call (e.g. ``saturate=False``), over those the strategy draws. A list
    of calls with a ``tier`` runs without Hypothesis. A reference that refuses an input raises
    ``ValueError`` ("lowbit.reference.<op> rejects this input: ..."), not a mismatch.
    """
    _check_op_name(op)
    if not callable(fn):
        raise ValueError(f"fn must be a callable with the signature of lowbit.reference.{op}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be a positive integer, got {max_examples!r}")
    convert = _converter(device, numpy_inputs)
    explicit = isinstance(inputs, list)
    if explicit and not inputs:
        raise ValueError("inputs is an empty list: give at least one argument tuple")
    # the op's own strategy and tier live with lowbit's pairs (which need Hypothesis); explicit
    # calls with a tier run without them
    pair = None if explicit and tier is not None else _pairs().get(op)

    def run(call: Any) -> None:
        call_tier = tier if tier is not None else (pair.tier_for(call) if pair else EXACT)
        naive = pair.naive if pair is not None and isinstance(call_tier, MatmulTier) else None
        if isinstance(call_tier, MatmulTier) and naive is None:
            raise ValueError(
                f"tier B (MatmulTier) needs lowbit's naive computation of {op}, which it has "
                "not: pass tier=EXACT or a FormatTier"
            )
        check_op(op, *call.args, tier=call_tier, naive=naive, fn=fn, label="yours",
                 to_inputs=convert, **{**call.kwargs, **kwargs})  # fmt: skip

    if explicit:  # each call in turn, no Hypothesis needed
        for args in inputs:
            run(_as_call(args))
        return
    from lowbit.fast.testing._hypothesis import st

    if inputs is None:
        if pair is None or pair.tested_in is not None:
            raise ValueError(
                f"lowbit has no input strategy for {op!r}: pass inputs= (a strategy or a list "
                "of argument tuples)"
            )
        strategy = pair.inputs
    elif isinstance(inputs, st.SearchStrategy):
        strategy = inputs.map(_as_call)
    else:
        raise ValueError(
            "inputs must be a Hypothesis strategy or a list of argument tuples, got "
            f"{type(inputs).__name__}"
        )
    _run_hypothesis(run, strategy, max_examples, seed)


def _as_call(args: Any) -> Call:
    if isinstance(args, Call):
        return args
    return Call(tuple(args) if isinstance(args, (tuple, list)) else (args,))


def _run_hypothesis(run: Callable[[Any], None], strategy: Any, max_examples: int, seed: int):
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    @fixed_seed(seed)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        phases=[p for p in Phase if p != Phase.explain],  # the report says what differs
        report_multiple_bugs=False,  # one AssertionError, not an ExceptionGroup
    )
    @given(strategy)
    def check(call: Any) -> None:
        run(call)

    check()


# ---- exhaustive 16-bit sweeps ------------------------------------------------------------------

# an input's class is the first that applies: a tie in the subnormal range counts as a tie
_CLASSES = ("NaN", "Inf", "overflow", "tie", "subnormal", "zero", "other")


@dataclass
class ExhaustiveReport:
    """Mismatches of an ``exhaustive_16bit`` sweep: counts per input dtype and class, and the
    first few mismatching inputs of each class."""

    op: str
    fmt: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    skipped_nan: int = 0  # NaN inputs left out: the reference refuses them for this format

    @property
    def mismatches(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def __str__(self) -> str:
        head = f"{self.op} on every float16 and bfloat16 bit pattern, format {self.fmt}: "
        skipped = (
            f"  ({self.skipped_nan} NaN inputs skipped: the reference refuses them in {self.fmt})"
            if self.skipped_nan
            else ""
        )
        if not self.mismatches:
            return head + "no mismatches" + (f"\n{skipped}" if skipped else "")
        lines = [head + f"{self.mismatches} mismatches", "", "| input | " +
                 " | ".join(_CLASSES) + " | total |", "|---" * (len(_CLASSES) + 2) + "|"]  # fmt: skip
        for dtype, counts in self.counts.items():
            cells = [str(counts.get(c, 0)) for c in _CLASSES]
            lines.append(f"| {dtype} | " + " | ".join(cells) + f" | {sum(counts.values())} |")
        for cls in _CLASSES:
            for example in self.examples.get(cls, []):
                lines.append(f"  {cls}: {example}")
        if skipped:
            lines.append(skipped)
        return "\n".join(lines)


def _input_classes(x: np.ndarray, fmt: Any) -> np.ndarray:
    """The class of each input value against ``fmt`` (first match in ``_CLASSES`` order)."""
    from lowbit.reference.formats import values

    with np.errstate(invalid="ignore"):  # bfloat16 NaN payloads
        v = np.asarray(x, dtype=np.float64)
    a = np.abs(v)
    grid = np.unique(np.asarray(values(fmt), dtype=np.float64))
    grid = grid[np.isfinite(grid)]
    ties = (grid[1:] + grid[:-1]) / 2 if grid.size > 1 else grid[:0]
    top = float(np.max(np.abs(grid))) if grid.size else np.inf
    min_normal = float(getattr(fmt, "min_normal", 0.0))
    with np.errstate(invalid="ignore"):
        masks = [
            np.isnan(v),
            np.isinf(v),
            a > top,
            np.isin(v, ties),
            (a > 0) & (a < min_normal),
            v == 0,
        ]
    cls = np.full(v.shape, len(_CLASSES) - 1)
    for k in reversed(range(len(masks))):  # the first matching class wins
        cls = np.where(masks[k], k, cls)
    return cls


def exhaustive_16bit(
    fn: Callable[..., Any],
    op: str,
    fmt: Any,
    *,
    tier: Any = None,
    device: Any = None,
    numpy_inputs: bool = False,
    raise_on_mismatch: bool = True,
    **kwargs: Any,
) -> ExhaustiveReport:
    """Run ``fn(x, fmt, **kwargs)`` and ``lowbit.reference.<op>(x, fmt, **kwargs)`` on all
    65,536 float16 and all 65,536 bfloat16 bit patterns (an element-wise op: ``formats.encode``,
    ``formats.quantize``, ``fpq.quantize``, ...); count the mismatching inputs by class.

    Raises ``AssertionError`` with the table when anything differs (``raise_on_mismatch=False``:
    only return the ``ExhaustiveReport``). ``tier`` defaults to ``EXACT``. Where the reference
    refuses NaN inputs (a format without a NaN code), they are left out and counted in
    ``skipped_nan``. Outputs of another shape than the input (block scales) must match too.
    """
    try:
        import ml_dtypes
    except ImportError as err:  # pragma: no cover - ml_dtypes comes with lowbit[testing]
        raise ImportError(
            "exhaustive_16bit needs ml_dtypes for bfloat16 arrays: pip install 'lowbit[testing]'"
        ) from err

    from lowbit.reference.formats import parse_format

    _check_op_name(op)
    fmt_obj = parse_format(fmt) if isinstance(fmt, str) else fmt
    if not hasattr(fmt_obj, "mbits"):
        raise ValueError(f"fmt must be a lowbit format or its name, got {fmt!r}")
    ref_fn = resolve_reference(op)
    convert = _converter(device, numpy_inputs)
    check_tier = EXACT if tier is None else tier
    if isinstance(check_tier, MatmulTier):
        raise ValueError(
            "exhaustive_16bit compares element-wise results: pass EXACT or a FormatTier"
        )
    report = ExhaustiveReport(op, getattr(fmt_obj, "name", str(fmt)))
    bits = np.arange(2**16, dtype=np.uint16)
    for name, dtype in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        x = bits.view(dtype)
        try:
            ref_outs = ref_fn(x, fmt, **kwargs)
        except ValueError:
            # a format without a NaN code refuses NaN inputs: sweep everything else
            with np.errstate(invalid="ignore"):
                keep = ~np.isnan(x.astype(np.float32))
            if keep.all():
                raise
            report.skipped_nan += int(x.size - keep.sum())
            x = x[keep]
            ref_outs = ref_fn(x, fmt, **kwargs)
        yours = to_numpy(fn(convert(x), fmt, **kwargs))
        refs = list(ref_outs) if isinstance(ref_outs, (tuple, list)) else [ref_outs]
        mine = list(yours) if isinstance(yours, (tuple, list)) else [yours]
        refs, mine = [np.asarray(r) for r in refs], [np.asarray(m) for m in mine]
        if len(mine) != len(refs) or any(m.shape != r.shape for m, r in zip(mine, refs)):
            raise AssertionError(
                f"{op}: your function returns shapes {[m.shape for m in mine]}, the "
                f"reference {[r.shape for r in refs]}"
            )
        for k, (m, r) in enumerate(zip(mine, refs)):
            if {m.dtype.kind, r.dtype.kind} & set("uib") and m.dtype != r.dtype:
                raise AssertionError(
                    f"{op}: output {k} has dtype {m.dtype} (yours), {r.dtype} (reference)"
                )
            if r.shape != x.shape:  # e.g. block scales: compared whole, not classified
                compare(f"{op} ({name} sweep)", m, r, check_tier, label="yours")
        bad = np.zeros(x.shape, dtype=bool)
        first_bad = np.full(x.shape, -1)  # which output differs first, per input
        for k, (m, r) in enumerate(zip(mine, refs)):
            if r.shape == x.shape:
                wrong = check_tier.check(m, r)
                first_bad = np.where(wrong & ~bad, k, first_bad)
                bad |= wrong
        classes = _input_classes(x, fmt_obj)
        counts = {c: int(np.sum(bad & (classes == k))) for k, c in enumerate(_CLASSES)}
        report.counts[name] = {c: n for c, n in counts.items() if n}
        for k, cls in enumerate(_CLASSES):
            for i in np.flatnonzero(bad & (classes == k))[: 2 - len(report.examples.get(cls, []))]:
                j = int(first_bad[i])
                ours, theirs = mine[j].reshape(-1)[i], refs[j].reshape(-1)[i]
                if refs[j].dtype.kind in "ui":
                    code_fmt = fmt_obj if j == 0 else None
                    shown = (
                        describe_code(int(ours), code_fmt),
                        describe_code(int(theirs), code_fmt),
                    )
                else:
                    shown = (repr(float(ours)), repr(float(theirs)))
                where = f" (output {j})" if len(refs) > 1 else ""
                report.examples.setdefault(cls, []).append(
                    f"{describe_bits(float(x[i]), dtype)}: yours {shown[0]}, reference "
                    f"{shown[1]}{where}"
                )
    if raise_on_mismatch and report.mismatches:
        raise AssertionError(str(report))
    return report
