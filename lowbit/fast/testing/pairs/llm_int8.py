"""LLM.int8() pairs (lowbit.{reference,fast}.llm_int8). The strategies and the plain-torch naive
matmul are module level: tests/test_llm_int8.py imports them."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from lowbit.fast.testing.pairs import Call, Pair, register
from lowbit.fast.testing.tiers import MATMUL


def llm_int8_x_arrays(dtypes, max_rows=65, max_cols=70):
    """Activations (rows, cols) with outlier columns and zero rows, in one of ``dtypes``.

    scale None = a random power of ten (float16: 1e-3 to 10, so that the x10-x100 outlier
    columns stay finite); 2.0 puts typical values just below the thresholds.
    """
    from lowbit.fast.testing.strategies import float_arrays, numpy_dtype

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
