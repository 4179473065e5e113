"""OmniQuant pairs (lowbit.reference.omniquant <-> lowbit.fast.omniquant).

The quantizer's values and codes are bit-exact (tier A): the same divisions, rint and clamps
in the working precision, the logits' sigmoid rounded once from float64. Gradients and the
LET transformations have dedicated tests in tests/test_omniquant.py (they need float64
inputs and tolerances from the sums they take).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from lowbit.fast.testing.pairs import Call, Pair, register
from lowbit.fast.testing.strategies import float_arrays, numpy_dtype

DTYPES = ["float32", "float16", "bfloat16", "float64"]
GROUPS = st.sampled_from([None, None, 1, 3, 8, 16, 32, 33, 128])


@st.composite
def weight_calls(draw) -> Call:
    """Weights with outlier rows/columns and zero rows, every dtype, group sizes that do and do
    not divide the row, with LWC logits (around the 4.0 init and far from it) or without."""
    dtype = numpy_dtype(draw(st.sampled_from(DTYPES)))
    scale = draw(st.sampled_from([1e-2, 1.0])) if dtype == np.float16 else None
    w = draw(float_arrays(dtype=dtype, scale=scale, outlier_rows=True, outlier_cols=True,
                          zero_rows=True, max_rows=40, max_cols=70))  # fmt: skip
    group_size = draw(GROUPS)
    n_groups = 1 if group_size is None else -(-w.shape[1] // group_size)
    kwargs = {"bits": draw(st.sampled_from([2, 3, 4, 6, 8])), "group_size": group_size,
              "symmetric": draw(st.booleans())}  # fmt: skip
    if draw(st.booleans()):
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        center = draw(st.sampled_from([4.0, 0.0, -3.0]))
        kwargs["gamma"] = center + rng.standard_normal((w.shape[0], n_groups))
        kwargs["beta"] = center + rng.standard_normal((w.shape[0], n_groups))
    return Call((w,), kwargs)


@st.composite
def activation_calls(draw) -> Call:
    dtype = numpy_dtype(draw(st.sampled_from(DTYPES)))
    scale = 1.0 if dtype == np.float16 else None
    if draw(st.booleans()):
        x = draw(float_arrays(dtype=dtype, scale=scale, outlier_cols=True, zero_rows=True,
                              max_rows=40, max_cols=70))  # fmt: skip
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 40)))
        x = draw(float_arrays(shape=shape, dtype=dtype, scale=scale))
    return Call((x,), {"bits": draw(st.sampled_from([2, 4, 6, 8, 16]))})


@st.composite
def decode_calls(draw) -> Call:
    from lowbit.reference.omniquant import encode_weight

    call = draw(weight_calls())
    codes, scale, zp = encode_weight(*call.args, **call.kwargs)
    return Call((codes, scale, zp), {"group_size": call.kwargs["group_size"]})


@st.composite
def scales(draw) -> Call:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = rng.standard_normal(draw(st.integers(1, 50))) * draw(st.sampled_from([1e-3, 1e-2, 1.0]))
    s[0] = draw(st.sampled_from([0.0, -0.0, 1e-2, -1e-2, 0.5]))
    return Call((s,))


register(Pair("omniquant.quantize_weight", weight_calls()))
register(Pair("omniquant.encode_weight", weight_calls()))
register(Pair("omniquant.decode_weight", decode_calls()))
register(Pair("omniquant.quantize_activation", activation_calls()))
register(Pair("omniquant.truncate_scale", scales()))
_GRADS = "tests/test_omniquant.py::test_gradients_match_the_official_autograd_graph"
_LET = "tests/test_omniquant.py::test_let_transformations_are_exact_equivalences"
register(Pair("omniquant.quantize_weight_grad", weight_calls(), tested_in=_GRADS))
register(Pair("omniquant.quantize_activation_grad", activation_calls(), tested_in=_GRADS))
register(
    Pair(
        "omniquant.calibrate_linear",
        scales(),
        tested_in="tests/test_omniquant.py::test_fast_calibrate_linear_follows_the_reference",
    )
)
register(
    Pair(
        "omniquant.calibrate_mlp",
        scales(),
        tested_in="tests/test_omniquant.py::test_fast_calibrate_mlp_follows_the_reference",
    )
)
for _op in ("smooth_scale", "let_norm_linears", "let_v_o", "let_q_k", "rotary_scale"):
    register(Pair(f"omniquant.{_op}", scales(), tested_in=_LET))
