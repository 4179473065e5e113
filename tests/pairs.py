"""Registry of reference/fast pairs (DESIGN.md section 2, the mirror rule).

Every public function of ``lowbit.fast.<module>`` is registered here with a Hypothesis
strategy for its inputs (NumPy side) and its tolerance tier. ``tests/test_pairs.py`` runs every
pair under Hypothesis through ``assert_matches_reference`` and fails when a public fast function
is missing from ``PAIRS`` or its signature differs from the reference's.

Each method adds one section at the end of this file: ``register(Pair(...))`` calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from tests.tolerances import EXACT, ExactTier, FormatTier, MatmulTier

TIERS = (ExactTier, FormatTier, MatmulTier)


@dataclass(frozen=True)
class Call:
    """The arguments of one call: NumPy arrays and plain values."""

    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pair:
    op: str  # "<module>.<function>", e.g. "formats.encode"
    inputs: st.SearchStrategy[Call]
    # A tier, or a function Call -> tier (format-dependent tiers).
    tier: Any = EXACT
    # Tier B: the same computation in working precision with plain torch (torch args).
    naive: Callable[..., Any] | None = None
    # Analytic reference gradient and which positional arguments it differentiates.
    grad: Callable[..., Any] | None = None
    grad_argnums: tuple[int, ...] = ()
    grad_tier: Any = None
    # Functions registered only for the meta-test (e.g. driven by dedicated tests that
    # need a model): give the reason here and no strategy is run.
    tested_in: str | None = None

    def tier_for(self, call: Call):
        return self.tier if isinstance(self.tier, TIERS) else self.tier(call)


PAIRS: dict[str, Pair] = {}

# Fast modules that are not mirrored (they exist only on the torch side: DESIGN.md section 1).
TORCH_ONLY_MODULES = {"nn", "convert", "cli", "models", "report", "data"}


def register(pair: Pair) -> Pair:
    if pair.op in PAIRS:
        raise ValueError(f"pair {pair.op!r} registered twice")
    PAIRS[pair.op] = pair
    return pair


# ---------------------------------------------------------------------------------------------
# Sections per method follow (append yours at the end; import its strategies locally).
# ---------------------------------------------------------------------------------------------


# --- LLM.int8() (lowbit.{reference,fast}.llm_int8) ----------------------------------------------
# Strategies and the plain-torch naive matmul are module level: tests/test_llm_int8.py imports them.


def llm_int8_x_arrays(dtypes, max_rows=65, max_cols=70):
    """Activations (rows, cols) with outlier columns and zero rows, in one of ``dtypes``.

    scale None = a random power of ten (float16: 1e-3 to 10, so that the x10-x100 outlier
    columns stay finite); 2.0 puts typical values just below the thresholds.
    """
    from tests.strategies import float_arrays, numpy_dtype

    def arrays(dtype, scale):
        return float_arrays(
            dtype=numpy_dtype(dtype),
            scale=scale,
            outlier_cols=True,
            zero_rows=True,
            max_rows=max_rows,
            max_cols=max_cols,
        )

    def scales(dtype):
        if dtype == "float16":
            return st.sampled_from([10.0**e for e in range(-3, 2)] + [2.0])
        return st.sampled_from([None, 2.0])

    return (
        st.sampled_from(dtypes)
        .flatmap(lambda d: st.tuples(st.just(d), scales(d)))
        .flatmap(lambda ds: arrays(*ds))
    )


@st.composite
def llm_int8_matmul_calls(draw, dtypes, max_rows=40, max_cols=70):
    """Call((x, w, bias), {threshold, outlier_weights}) with w and bias in x's dtype."""
    import numpy as np

    x = draw(llm_int8_x_arrays(dtypes, max_rows, max_cols))
    n = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = (rng.standard_normal((n, x.shape[-1])) * 0.1).astype(x.dtype)
    bias = rng.standard_normal(n).astype(x.dtype) if draw(st.booleans()) else None
    return Call(
        (x, w, bias),
        {
            "threshold": draw(st.sampled_from([0.0, 6.0, 3.5])),
            "outlier_weights": draw(st.sampled_from(["full", "dequantized"])),
        },
    )


def llm_int8_naive_matmul(x, w, bias=None, threshold=6.0, outlier_weights="full"):
    """Tier B naive: LLM.int8() in plain torch at working precision, no int32 accumulator.

    Codes in float32 (as the spec, methods.md §2.2, computes them); the integer product and the
    scaling in the accumulation precision (float64 for float64 input, else float32, which holds
    every product sum exactly for K * 127² < 2**24); the outlier product X[:, O] W_O^T in x's
    own dtype (the paper's 16-bit part); the result rounded to x's dtype.
    """
    import torch

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    K = x.shape[-1]
    X = x.reshape(-1, K)
    X32 = X.float()
    out = X32.abs() >= threshold if threshold > 0 else torch.zeros_like(X32, dtype=torch.bool)
    O = out.any(dim=0)
    c_x = X32.masked_fill(out, 0).abs().amax(dim=1) if K else X32.new_zeros(X32.shape[0])
    X8 = torch.nan_to_num(
        torch.round(X32 * (127.0 / c_x)[:, None]), nan=0.0, posinf=0.0, neginf=0.0
    )
    X8 = X8.masked_fill(out | O[None, :], 0)
    w32 = w.float()
    c_w = w32.abs().amax(dim=1)
    W8 = torch.nan_to_num(torch.round(w32 * (127.0 / c_w)[:, None]), nan=0.0)
    Y = (X8.to(acc) @ W8.to(acc).T) * (c_x.to(acc)[:, None] * c_w.to(acc)[None, :]) / 16129.0
    W_O = w if outlier_weights == "full" else (W8 * c_w[:, None] / 127.0).to(x.dtype)
    Y = Y + (X.masked_fill(~O[None, :], 0) @ W_O.T).to(acc)
    if bias is not None:
        Y = Y + bias.to(acc)
    return Y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def _llm_int8_section() -> None:
    import numpy as np

    from tests.tolerances import MATMUL

    thresholds = st.sampled_from([0.0, 6.0, 3.5])

    register(
        Pair(
            op="llm_int8.vectorwise_quant",
            inputs=st.builds(
                lambda x, t: Call((x,), {"threshold": t}),
                llm_int8_x_arrays(["float16", "bfloat16", "float32", "float64"], 129, 129),
                thresholds,
            ),
        )
    )

    @st.composite
    def codes_and_absmax(draw, rows=None, cols=None):
        rows = draw(st.integers(0, 40)) if rows is None else rows
        cols = draw(st.integers(1, 70)) if cols is None else cols
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        codes = rng.integers(-127, 128, size=(rows, cols)).astype(np.int8)
        absmax = (rng.random(rows) * 10.0 ** draw(st.integers(-3, 3))).astype(np.float32)
        return codes, absmax

    register(
        Pair(
            op="llm_int8.vectorwise_dequant",
            inputs=codes_and_absmax().map(lambda ca: Call(ca)),
        )
    )

    @st.composite
    def int8_matmul_calls(draw):
        k = draw(st.integers(1, 70))
        cx, ax = draw(codes_and_absmax(cols=k))
        cw, aw = draw(codes_and_absmax(rows=draw(st.integers(1, 40)), cols=k))
        return Call((cx, ax, cw, aw))

    def naive_int8_matmul(cx, ax, cw, aw):
        return (cx.float() @ cw.float().T) * (ax[:, None] * aw[None, :]) / 16129.0

    register(
        Pair(
            op="llm_int8.int8_matmul",
            inputs=int8_matmul_calls(),
            tier=MATMUL,
            naive=naive_int8_matmul,
        )
    )

    register(
        Pair(
            op="llm_int8.matmul",
            inputs=llm_int8_matmul_calls(["float64", "float32", "float16"]),
            tier=MATMUL,
            naive=llm_int8_naive_matmul,
            # Gradients: tests/test_llm_int8.py (float64 element-wise against matmul_grad at
            # float32 precision, float32 tier B); a pair has one grad tier for every dtype.
        )
    )

    @st.composite
    def hidden_state_calls(draw):
        L, T, D = draw(st.integers(0, 6)), draw(st.integers(0, 40)), draw(st.integers(1, 48))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        H = rng.standard_normal((L, T, D)).astype(np.float32)
        if L and T:
            dims = rng.choice(D, size=min(D, 3), replace=False)
            H[:, :, dims] *= rng.choice([1.0, 3.0, 8.0], size=len(dims))
        return Call(
            (H,),
            {
                "threshold": draw(st.sampled_from([6.0, 4.0])),
                "min_token_frac": draw(st.sampled_from([0.06, 0.3])),
            },
        )

    register(Pair(op="llm_int8.outlier_features", inputs=hidden_state_calls()))


_llm_int8_section()


# ---- LLM-FP4 / FPQ (lowbit.reference.fpq <-> lowbit.fast.fpq) ---------------------------------------


def _fpq_section() -> None:
    import numpy as np

    from tests.strategies import float_arrays, fp_formats

    fpq_formats = fp_formats(specials=("none",), signed=True)  # LLM-FP4 reserves no code

    @st.composite
    def biases(draw, shape):
        """None, an integer, a real scalar, or a real per-row / per-column array (negative too)."""
        kind = draw(st.sampled_from(["none", "int", "real", "row", "col"]))
        seed = draw(st.integers(0, 2**32 - 1))
        rng = np.random.default_rng(seed)
        if kind == "none":
            return None
        if kind == "int":
            return draw(st.integers(-20, 30))
        if kind == "real":
            return float(rng.uniform(-20.0, 30.0))
        if kind == "row":
            return rng.uniform(-20.0, 30.0, size=(shape[0], 1))
        return rng.uniform(-20.0, 30.0, size=(shape[1],))

    @st.composite
    def quantize_calls(draw, dtypes=("float32", "float16", "float64", "bfloat16")):
        from tests.strategies import numpy_dtype

        fmt = draw(fpq_formats)
        dtype = numpy_dtype(draw(st.sampled_from(dtypes)))
        x = draw(
            float_arrays(dtype=dtype, outlier_cols=True, zero_rows=True, max_rows=40, max_cols=40)
        )
        return Call((x, fmt), {"bias": draw(biases(x.shape))})

    @st.composite
    def decode_calls(draw):
        fmt = draw(fpq_formats)
        shape = (draw(st.integers(1, 20)), draw(st.integers(1, 20)))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        codes = rng.integers(0, 2**fmt.bits, size=shape).astype(
            np.uint8 if fmt.bits <= 8 else np.uint16
        )
        return Call((codes, fmt), {"bias": draw(biases(shape))})

    @st.composite
    def max_from_bias_calls(draw):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return Call((rng.uniform(-40.0, 40.0, size=draw(st.integers(0, 30))), draw(fpq_formats)))

    @st.composite
    def bias_from_max_calls(draw):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        m = np.abs(rng.standard_normal(draw(st.integers(1, 30)))) * 10.0 ** rng.integers(-6, 6)
        m[rng.random(m.shape) < 0.2] = 0.0  # zero rows/channels
        return Call((m, draw(fpq_formats)))

    @st.composite
    def linear_calls(draw):
        x = draw(float_arrays(outlier_cols=True, zero_rows=True, max_rows=33, max_cols=33))
        out = draw(st.integers(1, 33))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        w = (rng.standard_normal((out, x.shape[1])) * 0.1).astype(np.float32)
        a_fmt, w_fmt = draw(fpq_formats), draw(fpq_formats)
        per_channel = draw(st.booleans())
        a_max = np.abs(x).max(axis=0) if per_channel else np.abs(x).max()
        a_bias = np.asarray(_ref_fpq().bias_from_max(a_max, a_fmt) + rng.uniform(-1.0, 1.0))
        w_bias = _ref_fpq().bias_from_max(np.abs(w).max(axis=1), w_fmt) + rng.uniform(
            -0.5, 0.5, out
        )
        b = (rng.standard_normal(out) * 0.1).astype(np.float32) if draw(st.booleans()) else None
        return Call((x, w, a_fmt, a_bias, w_fmt, w_bias), {"b": b})

    def linear_naive(x, w, a_fmt, a_bias, w_fmt, w_bias, b=None):
        """float32 GEMM of the *reference* quantizer's values (independent of the fast quantizer)."""
        import torch

        ref = _ref_fpq()
        xq = torch.from_numpy(ref.quantize(x.numpy(), a_fmt, np.asarray(a_bias)).astype(np.float32))
        wq = torch.from_numpy(
            ref.quantize(w.numpy(), w_fmt, np.asarray(w_bias)[:, None]).astype(np.float32)
        )
        y = xq @ wq.T
        return y if b is None else y + b

    @st.composite
    def preshift_calls(draw):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        a_bias = rng.uniform(-10.0, 20.0, size=draw(st.integers(1, 40)))
        t = draw(st.one_of(st.none(), st.floats(-10.0, 20.0)))
        return Call((a_bias, draw(fpq_formats)), {"tensor_bias": t})

    @st.composite
    def fold_calls(draw):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        w_bias = rng.uniform(-10.0, 20.0, size=draw(st.integers(1, 20)))
        shifts = rng.integers(0, 16, size=draw(st.integers(1, 20)))
        return Call((w_bias, shifts))

    def _ref_fpq():
        from lowbit.reference import fpq

        return fpq

    register(Pair(op="fpq.quantize", inputs=quantize_calls()))
    register(Pair(op="fpq.encode", inputs=quantize_calls()))  # every float dtype, bf16/fp16 too
    register(Pair(op="fpq.decode", inputs=decode_calls()))
    register(Pair(op="fpq.max_from_bias", inputs=max_from_bias_calls()))
    register(Pair(op="fpq.bias_from_max", inputs=bias_from_max_calls()))
    register(Pair(op="fpq.linear", inputs=linear_calls(), tier=MatmulTier(), naive=linear_naive))
    register(Pair(op="fpq.preshift", inputs=preshift_calls()))
    register(Pair(op="fpq.fold_preshift", inputs=fold_calls()))
    register(
        Pair(
            op="fpq.search",
            inputs=st.nothing(),
            tested_in="tests/test_fpq.py::test_fast_search_matches_reference (a search per example is too slow for Hypothesis)",
        )
    )


_fpq_section()


# ---- number formats (lowbit.reference.formats <-> lowbit.fast.formats) ------------------------------


def _formats_section() -> None:
    import numpy as np
    from lowbit.reference.formats import FPFormat, IntFormat, parse_format

    from tests.strategies import (
        _cast,
        float_arrays,
        float_dtypes,
        fp_formats,
        int_formats,
        named_formats,
        numpy_dtype,
        shapes,
        values_for,
    )

    any_format = st.one_of(fp_formats(), int_formats(), named_formats().map(parse_format))
    mx_format = st.one_of(
        fp_formats(signed=True), st.sampled_from(["e4m3fn", "e5m2", "e3m2fn", "e2m3fn", "e2m1fn"])
    )
    blocks = st.sampled_from([1, 2, 7, 16, 31, 32, 33])

    def with_specials(draw, x: np.ndarray, nan: bool) -> np.ndarray:
        """Plant +-Inf (and NaN where allowed) at random places."""
        if x.size and draw(st.booleans()):
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            flat = x.reshape(-1).copy()
            idx = rng.integers(0, flat.size, size=max(1, flat.size // 10))
            flat[idx] = rng.choice(
                [np.inf, -np.inf] + ([np.nan, -np.nan] if nan else []), size=idx.size
            )
            x = flat.reshape(x.shape)
        return x

    @st.composite
    def encode_calls(draw):
        fmt = draw(any_format)
        x = draw(values_for(fmt, shape=draw(shapes(65, 65, allow_zero=True))))
        is_fp = isinstance(fmt, FPFormat)
        x = with_specials(draw, x, nan=is_fp and fmt.has_nan)
        saturate = draw(st.booleans())
        if is_fp and not saturate and not fmt.has_nan and not (fmt.signed and fmt.has_zero):
            saturate = True  # the reference raises on negative/zero values (tested separately)
        x = _cast(x, numpy_dtype(draw(float_dtypes)))
        return Call((x, fmt), {"saturate": saturate})

    @st.composite
    def decode_calls(draw):
        fmt = draw(any_format)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        shape = draw(shapes(65, 65, allow_zero=True))
        codes = rng.integers(0, 2**fmt.bits, size=shape).astype(
            np.uint8 if fmt.bits <= 8 else np.uint16
        )
        dtype = draw(st.sampled_from([None, np.float64, np.float16, "bfloat16"]))
        return Call(
            (codes, fmt), {"dtype": numpy_dtype(dtype) if isinstance(dtype, str) else dtype}
        )

    @st.composite
    def pack_calls(draw):
        bits = draw(st.integers(1, 8))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        # zero-size leading dims are left out: the reference's reshape(..., -1, g) is ambiguous
        # there (reported); 1-D empty inputs are in
        shape = draw(st.one_of(shapes(17, 70), st.tuples(st.integers(0, 70))))
        dtype = draw(st.sampled_from([np.uint8, np.int32, np.int64]))
        return Call((rng.integers(0, 2**bits, size=shape).astype(dtype), bits))

    @st.composite
    def unpack_calls(draw):
        bits = draw(st.integers(1, 8))
        nbytes = np.lcm(bits, 8) // 8
        rows, groups = (
            draw(st.integers(1, 9)),
            draw(st.integers(0, 20)),
        )  # rows >= 1: see pack_calls
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        packed = rng.integers(0, 256, size=(rows, groups * nbytes)).astype(np.uint8)
        total = groups * (np.lcm(bits, 8) // bits)
        n = draw(st.one_of(st.none(), st.integers(0, total)))
        return Call((packed, bits), {} if n is None else {"n": n})

    @st.composite
    def mx_calls(draw):
        fmt = draw(mx_format)
        dtype = numpy_dtype(draw(float_dtypes))
        x = draw(
            float_arrays(
                dtype=np.float64, outlier_cols=True, zero_rows=True, max_rows=40, max_cols=80
            )
        )
        x = _cast(with_specials(draw, x, nan=True), dtype)
        return Call((x, fmt), {"block": draw(blocks)})

    @st.composite
    def decode_mx_calls(draw):
        fmt = parse_format(draw(mx_format))
        block = draw(blocks)
        rows, n = draw(shapes(20, 80))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        codes = rng.integers(0, 2**fmt.bits, size=(rows, n)).astype(np.uint8)
        scales = rng.integers(0, 256, size=(rows, -(-n // block))).astype(np.uint8)
        return Call(
            (codes, scales, fmt),
            {"block": block, "dtype": draw(st.sampled_from([None, np.float64]))},
        )

    register(Pair("formats.encode", encode_calls()))
    register(Pair("formats.quantize", encode_calls()))
    register(Pair("formats.decode", decode_calls()))
    register(
        Pair(
            "formats.values",
            st.one_of(any_format, fp_formats(max_bits=12)).map(lambda f: Call((f,))),
        )
    )
    register(Pair("formats.pack", pack_calls()))
    register(Pair("formats.unpack", unpack_calls()))
    register(Pair("formats.encode_mx", mx_calls()))
    register(Pair("formats.quantize_mx", mx_calls()))
    register(Pair("formats.decode_mx", decode_mx_calls()))
    assert IntFormat  # int formats are drawn by int_formats()


_formats_section()
