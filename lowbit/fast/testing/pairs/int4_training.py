"""4-bit training pairs (lowbit.reference.int4_training <-> lowbit.fast.int4_training).

Codes, splits, sampled rows and everything computed from exact integer products are bit-exact
(tier A): both sides run the same operations in the same precision with the same hashed random
numbers. Two kinds of output are not: the sampled weight gradient, a float GEMM because the 1/p
row weights sit between its factors (tier B, against a naive float32 product with the
reference's own kept rows), and values reduced by a float64 sum whose order differs between
NumPy and torch (the LSQ step and its gradient, the block search's errors, the full backward:
tests/test_int4_training.py compares those, with the sums' tolerance).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from lowbit.fast.testing.pairs import Call, Pair, register
from lowbit.fast.testing.strategies import float_arrays, float_dtypes, numpy_dtype
from lowbit.fast.testing.tiers import EXACT, MATMUL, FormatTier

BITS = st.sampled_from([2, 3, 4, 4, 8])
ROUNDINGS = st.sampled_from(["half_even", "half_away"])
SEEDS = st.integers(0, 2**40)


@st.composite
def _floats(draw, shape=None, max_rows=40, max_cols=70, zero_rows=True) -> np.ndarray:
    dtype = numpy_dtype(draw(float_dtypes))
    return draw(float_arrays(shape=shape, dtype=dtype, scale=1.0 if dtype == np.float16 else None,
                             outlier_cols=True, zero_rows=zero_rows, max_rows=max_rows,
                             max_cols=max_cols))  # fmt: skip


def _step_for(draw, x: np.ndarray, bits: int) -> np.float64:
    """Around the LSQ init (some clipping, some not), or a step that puts x on exact ties."""
    mean = float(np.abs(x.astype(np.float64)).mean()) if x.size else 1.0
    return np.float64(max(mean, 1e-3) * draw(st.sampled_from([0.1, 0.5, 1.0, 4.0])) / bits)


@st.composite
def lsq_calls(draw) -> Call:
    bits = draw(BITS)
    x = draw(_floats())
    step = _step_for(draw, x, bits)
    if x.size and draw(st.booleans()):  # exact ties: k + 1/2 steps
        ties = np.random.default_rng(0).integers(-9, 9, x.shape) + 0.5
        x = (ties * 0.25).astype(x.dtype)
        step = np.float64(0.25)
    return Call((x, step, bits), {"rounding": draw(ROUNDINGS)})


@st.composite
def init_calls(draw) -> Call:
    return Call((draw(_floats()),), {"bits": draw(BITS)})


@st.composite
def hq_linear_calls(draw) -> Call:
    block = draw(st.sampled_from([1, 2, 16, 64]))
    n = block * draw(st.integers(1, 4))
    x = draw(_floats(shape=(draw(st.integers(0, 20)), n)))
    w = draw(_floats(shape=(draw(st.integers(1, 20)), n)))
    bits = draw(BITS)
    return Call((x, w, _step_for(draw, x, bits), _step_for(draw, w, bits), block, bits),
                {"rounding": draw(ROUNDINGS)})  # fmt: skip


@st.composite
def split_calls(draw) -> Call:
    g = draw(_floats())
    if draw(st.integers(0, 9)) == 0:
        g = np.zeros_like(g)  # a zero gradient splits into zero codes
    return Call((g, draw(st.sampled_from([2, 3, 4, 4, 8]))),
                {"clip": draw(st.sampled_from(["code", "full"])), "seed": draw(SEEDS),
                 "residual": draw(st.sampled_from(["stochastic", "nearest"]))})  # fmt: skip


@st.composite
def merge_calls(draw) -> Call:
    from lowbit.reference.int4_training import bit_split

    call = draw(split_calls())
    F, S, sigma = bit_split(*call.args, **call.kwargs)
    return Call((F, S, sigma, call.args[1]))


@st.composite
def score_calls(draw) -> Call:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = draw(st.integers(0, 200))
    scores = rng.exponential(size=n) ** draw(st.sampled_from([1.0, 3.0]))
    if n:
        scores[rng.random(n) < draw(st.sampled_from([0.0, 0.3]))] = 0.0
        if draw(st.booleans()):  # a few dominant rows force the capping loop
            scores[: max(1, n // 20)] *= 1e3
    budget = draw(st.sampled_from([0.0, 1.0, n / 4, n / 2, float(n), 2.0 * n]))
    return Call((scores.astype(np.float32), budget))


@st.composite
def sample_calls(draw) -> Call:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = rng.random(draw(st.integers(0, 300)))
    p[rng.random(p.size) < 0.2] = draw(st.sampled_from([0.0, 1.0]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return Call((p.astype(dtype), draw(SEEDS)), {"stream": draw(st.integers(0, 3))})


@st.composite
def estimator_calls(draw, side: str) -> Call:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tokens, out, n_in = draw(st.integers(1, 40)), draw(st.integers(1, 30)), draw(st.integers(1, 50))
    bits = draw(st.sampled_from([2, 4, 4, 8]))
    g = draw(_floats(shape=(tokens, out)))
    F, S, sigma = _split(g, bits, draw(SEEDS))
    Qn, Qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    rows = tokens if side == "weight" else out
    q = rng.integers(-Qn, Qp + 1, (rows, n_in)).astype(np.int8)
    if draw(st.booleans()):
        q[rng.integers(0, rows)] = 0  # a token (or an output) with zero codes
    step = np.float64(10.0 ** draw(st.integers(-3, 1)))
    return Call((F, S, sigma, q, step, bits),
                {"sampling": draw(st.booleans()), "seed": draw(SEEDS)})  # fmt: skip


def _split(g, bits, seed):
    from lowbit.reference.int4_training import bit_split

    return bit_split(g, bits, clip="full", seed=seed)


def _estimator_tier(call: Call):
    """Exact integer products; the sampled weight gradient is a float GEMM (tier B)."""
    return MATMUL if call.kwargs["sampling"] else EXACT


def _input_tier(call: Call):
    """Exact, except that float64 probabilities differ in the last bits with the order of
    their float64 sum (at most 2N = 80 terms: relative error below 2^-46)."""
    if call.kwargs["sampling"] and call.args[2].dtype == np.float64:
        return FormatTier(mbits=45, min_subnormal=0)
    return EXACT


def _naive_grad_weight(F, S, sigma, q_x, step_x, bits=4, *, sampling=True, seed=0):
    """float32 (nb F/sigma)^T D q_x s_x + ..., D from the reference's own probabilities and
    kept rows (tier A on their own: lss_probabilities, lss_sample)."""
    from lowbit.reference.int4_training import lss_probabilities, lss_sample

    Fn, Sn, qn = F.numpy(), S.numpy(), q_x.numpy()
    n, nb = Fn.shape[0], 2**bits - 2
    x_norm = np.linalg.norm(qn.astype(np.float64), axis=1)
    scores = np.concatenate([nb * np.linalg.norm(Fn.astype(np.float64), axis=1) * x_norm,
                             np.linalg.norm(Sn.astype(np.float64), axis=1) * x_norm])  # fmt: skip
    d = np.ones(2 * n)
    if sampling:
        p = lss_probabilities(scores.astype(np.float32), n).astype(np.float64)
        kept = lss_sample(p, seed, 1)
        d = np.where(kept, 1 / np.where(kept, p, 1), 0)
    work = torch.float64 if sigma.dtype == torch.float64 else torch.float32
    sig, s = sigma.to(work), torch.as_tensor(step_x).to(work)
    x_hat = q_x.to(work) * s
    dt = torch.from_numpy(d).to(work)
    high = (F.to(work) * nb / sig * dt[:n, None]).t() @ x_hat
    low = (S.to(work) / sig * dt[n:, None]).t() @ x_hat
    return high + low


register(Pair("int4_training.lsq_encode", lsq_calls()))
register(Pair("int4_training.lsq_quantize", lsq_calls()))
register(Pair("int4_training.hq_linear", hq_linear_calls()))
register(Pair("int4_training.bit_split", split_calls()))
register(Pair("int4_training.bit_merge", merge_calls()))
register(Pair("int4_training.lss_probabilities", score_calls()))
register(Pair("int4_training.lss_sample", sample_calls()))
register(Pair("int4_training.lss_grad_input", estimator_calls("input"), tier=_input_tier))
register(
    Pair(
        "int4_training.lss_grad_weight",
        estimator_calls("weight"),
        tier=_estimator_tier,
        naive=_naive_grad_weight,
    )
)
# float64 sums in a different order: the step is within the sum's rounding of the reference's
register(Pair("int4_training.lsq_init", init_calls(), tier=FormatTier(mbits=40, min_subnormal=0)))
_SUMS = "tests/test_int4_training.py::test_fast_reductions_match_the_reference"
for _op in ("lsq_quantize_grad", "hq_search", "int4_linear_backward"):
    register(Pair(f"int4_training.{_op}", init_calls(), tested_in=_SUMS))
