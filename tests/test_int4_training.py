"""4-bit training (arXiv 2306.11987): LSQ against its textbook autograd form, the Hadamard
quantizer's forward, bit splitting and leverage-score sampling, with statistical tests of what
is claimed unbiased and of the variance formulas.

Every statistical test states its false-failure rate: z-tests fail at |z| > 5 (a rate of
5.7e-7 under the null for a normal statistic), and per-element tests use Hoeffding bounds
sized for a family-wise rate of 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lowbit.fast import int4_training as F
from lowbit.reference import int4_training as R
from lowbit.reference.hadamard import block_hadamard

Z_LIMIT = 5.0  # two-sided normal tail 5.7e-7
FAMILY_RATE = 1e-6


def T(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _hoeffding(n_tests: int, repeats: int, value_range: float) -> float:
    """Deviation of a mean of ``repeats`` bounded draws exceeded with family-wise rate 1e-6."""
    return value_range * math.sqrt(math.log(2 * n_tests / FAMILY_RATE) / (2 * repeats))


def _z(samples: np.ndarray, expected: float, variance: float | None = None) -> float:
    """z of the mean of iid samples against ``expected`` (the exact variance, or the sample's)."""
    var = np.var(samples, ddof=1) if variance is None else variance
    return float((np.mean(samples) - expected) / math.sqrt(var / len(samples)))


# ---- LSQ -----------------------------------------------------------------------------------------


def _lsq_textbook(x, s, Qn, Qp):
    """LSQ as Esser et al. write it: the step's gradient scaled by kappa, STE rounding."""
    kappa = 1.0 / math.sqrt(x.numel() * Qp)
    s_scaled = s * kappa + (s - s * kappa).detach()  # the value s, the gradient kappa ds
    v = torch.clamp(x / s_scaled, -Qn, Qp)
    return (v + (torch.round(v) - v).detach()) * s_scaled


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_gradients_match_the_textbook_autograd(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((37, 23)) * 3
    g = rng.standard_normal(x.shape)
    step = 0.4
    xt = T(x).requires_grad_(True)
    st = torch.tensor(step, dtype=torch.float64, requires_grad=True)
    Qn, Qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    _lsq_textbook(xt, st, Qn, Qp).backward(T(g))
    grad_x, grad_step = R.lsq_quantize_grad(x, step, g, bits)
    # autograd multiplies (1 / s) by s: one rounding away from the straight-through 1
    np.testing.assert_allclose(grad_x, xt.grad.numpy(), rtol=2**-52, atol=0)
    np.testing.assert_allclose(grad_step, st.grad.numpy(), rtol=1e-12)
    # and the forward is the textbook's
    np.testing.assert_array_equal(
        R.lsq_quantize(x, step, bits), _lsq_textbook(T(x), T(np.float64(step)), Qn, Qp).numpy()
    )


def test_rounding_modes_differ_only_at_ties():
    x = np.array([2.5, -2.5, 0.5, -0.5, 1.5, 2.4999998, 0.49999997, -3.5], dtype=np.float32)
    assert R.lsq_encode(x, 1.0, rounding="half_even").tolist() == [2, -2, 0, 0, 2, 2, 0, -4]
    assert R.lsq_encode(x, 1.0, rounding="half_away").tolist() == [3, -3, 1, -1, 2, 2, 0, -4]
    for mode in ("half_even", "half_away"):
        assert np.array_equal(
            R.lsq_encode(x, 1.0, rounding=mode), F.lsq_encode(T(x), 1.0, rounding=mode).numpy()
        )


def test_codes_are_clamped_to_the_signed_range():
    x = np.linspace(-20, 20, 101)
    for bits in (2, 4, 8):
        q = R.lsq_encode(x, 0.1, bits)
        assert (
            q.dtype == np.int8 and q.min() == -(2 ** (bits - 1)) and q.max() == 2 ** (bits - 1) - 1
        )


def test_lsq_init_is_the_official_formula():
    x = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    expected = 2 * np.abs(x.astype(np.float64)).mean() / math.sqrt(7) + 1e-10
    assert R.lsq_init(x) == np.float32(expected)
    assert R.lsq_init(np.zeros((3, 4))) == 1e-10  # zero input: a positive step, never 0


# ---- the Hadamard quantizer's forward ----------------------------------------------------------------


def test_hq_linear_is_the_product_of_the_fake_quantized_transforms():
    """Y = s_x s_w q_x q_w^T equals X^~ W^~^T computed independently in float64, and approximates
    X W^T without any inverse transform."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 384)).astype(np.float32)
    x[:, 7] *= 40  # an outlier channel
    w = rng.standard_normal((96, 384)).astype(np.float32) * 0.05
    block = 128
    xh, wh = block_hadamard(x, block), block_hadamard(w, block)
    sx, sw = R.lsq_init(xh), R.lsq_init(wh)
    y = R.hq_linear(x, w, sx, sw, block)
    x_hat = R.lsq_quantize(xh.astype(np.float64), np.float64(sx), rounding="half_away")
    w_hat = R.lsq_quantize(wh.astype(np.float64), np.float64(sw), rounding="half_away")
    truth = x_hat @ w_hat.T
    np.testing.assert_allclose(y, truth, rtol=2**-22, atol=2**-22 * np.abs(truth).max())
    assert np.array_equal(y, F.hq_linear(T(x), T(w), T(sx), T(sw), block).numpy())
    rel = np.linalg.norm(y - x @ w.T) / np.linalg.norm(x @ w.T)
    no_h = R.hq_linear(x, w, R.lsq_init(x), R.lsq_init(w), 1)
    rel_no_h = np.linalg.norm(no_h - x @ w.T) / np.linalg.norm(x @ w.T)
    assert rel < 0.5 * rel_no_h  # the Hadamard transform halves the error with an outlier


def test_block_search_picks_the_smallest_product_of_errors():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[:, 3] *= 50
    w = rng.standard_normal((32, 256)).astype(np.float32)
    best, blocks, errors = R.hq_search(x, w)
    assert blocks.tolist() == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert best == blocks[np.argmin(errors)] and best > 1
    # each error recomputed from its definition, in float64 with the LSQ init step
    for b, err in zip(blocks, errors):
        parts = []
        for t in (x, w):
            th = block_hadamard(t, int(b))
            back = block_hadamard(R.lsq_quantize(th, R.lsq_init(th)), int(b))
            parts.append(np.linalg.norm((back - t).astype(np.float64)))
        assert err == pytest.approx(parts[0] * parts[1], rel=1e-12)
    assert R.hq_search(np.zeros((4, 8)), np.zeros((2, 8)))[0] == 1  # ties: the first block


# ---- bit splitting ---------------------------------------------------------------------------------------


def _gradient(seed: int, shape=(24, 16)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(shape) * rng.exponential(size=shape) ** 2  # heavy tails
    return g.astype(np.float32)


def test_split_codes_and_reconstruction_bounds():
    g = _gradient(0)
    for clip, limit in (("code", 6), ("full", 7)):
        Fc, Sc, sigma = R.bit_split(g, clip=clip, seed=1)
        assert Fc.dtype == Sc.dtype == np.int8
        assert np.abs(Fc).max() <= limit and np.abs(Sc).max() <= limit
        err = np.abs(R.bit_merge(Fc, Sc, sigma) - g) * sigma  # in units of 1 / sigma
        unclipped = np.abs(g) * sigma <= 90  # below the ±6 clamp of both parts
        assert err[unclipped].max() < 1 + 1e-4  # one stochastic unit (spec 5: <= (0.5 + 0.5))
        if clip == "full":
            assert err.max() < 1 + 1e-4
    assert sigma == np.float32(196) / (np.float32(2) * (np.abs(g).max() + np.float32(1e-8)))


def test_full_split_is_unbiased_with_the_stated_variance():
    g = _gradient(2)
    repeats = 600
    _, _, sigma = R.bit_split(g, clip="full", seed=0)
    draws = np.stack([R.bit_merge(*R.bit_split(g, clip="full", seed=k)) for k in range(repeats)])
    err = (draws.astype(np.float64) - g) * float(sigma)  # (repeats, ...) in units of 1 / sigma
    # the residual's fraction f: the error is 1 - f with probability f and -f otherwise
    t = g.astype(np.float32) * sigma
    r = t - np.float32(14) * np.clip(np.rint(t / np.float32(14)), -8, 7)
    f = (r - np.floor(r)).astype(np.float64)
    # per element: Hoeffding on a range-1 variable
    bound = _hoeffding(g.size, repeats, 1.0)
    assert np.abs(err.mean(axis=0)).max() < bound
    # all elements: the sum of all errors is a sum of independent terms with known variance
    var = f * (1 - f)
    z = err.sum() / math.sqrt(repeats * var.sum())
    assert abs(z) < Z_LIMIT
    # variance: the sum of the per-element sample variances against the formula, with the
    # standard error of a Bernoulli sample variance (fourth central moment mu4)
    mu4 = var * (1 - 3 * var)
    sample_var = err.var(axis=0, ddof=1)
    se = math.sqrt(((mu4 - var**2 * (repeats - 3) / (repeats - 1)) / repeats).sum())
    assert abs(sample_var.sum() - var.sum()) / se < Z_LIMIT


def test_code_clip_is_biased_at_the_largest_gradients():
    """The released kernels' ±6 clamp: the largest |g| come back as about 90/98 of max|g|."""
    g = _gradient(4)
    i = np.unravel_index(np.argmax(np.abs(g)), g.shape)
    repeats = 200
    merged = np.stack(
        [R.bit_merge(*R.bit_split(g, clip="code", seed=k))[i] for k in range(repeats)]
    )
    ratio = merged.mean() / g[i]
    assert ratio == pytest.approx(90 / 98, abs=1e-4)  # deterministic: both parts clamp
    sigma = R.bit_split(g, clip="full")[2]
    full = np.stack([R.bit_merge(*R.bit_split(g, clip="full", seed=k))[i] for k in range(repeats)])
    assert full.mean() / g[i] == pytest.approx(
        1, abs=_hoeffding(1, repeats, 1) / float(abs(g[i]) * sigma)
    )


def test_zero_and_empty_gradients_split_into_zeros():
    for g in (np.zeros((5, 3), np.float32), np.zeros((0, 4), np.float32)):
        Fc, Sc, sigma = R.bit_split(g)
        assert not Fc.any() and not Sc.any() and np.isfinite(sigma)
        Ft, St, sigt = F.bit_split(T(g))
        assert not Ft.any() and not St.any() and torch.isfinite(sigt)


@pytest.mark.parametrize("residual", ["stochastic", "nearest"])
def test_large_gradients_split_like_the_reference_across_cpu_chunks(residual):
    """The torch split runs in chunks of 2^17 values on CPU; a (700, 513) gradient spans
    three chunks and a ragged tail, and every chunk must draw the reference's uniforms."""
    g = np.random.default_rng(5).standard_normal((700, 513)).astype(np.float32)
    g[3, 7] = 40.0  # one large value, clipped by the code variant
    for clip in ("code", "full"):
        ref = R.bit_split(g, clip=clip, seed=11, residual=residual)
        fast = F.bit_split(T(g), clip=clip, seed=11, residual=residual)
        assert all(np.array_equal(a, b.numpy()) for a, b in zip(ref, fast))


# ---- leverage-score sampling ---------------------------------------------------------------------------


def _water_filling(scores: np.ndarray, budget: float) -> np.ndarray:
    """Independent oracle: cap the k largest at 1 with the smallest k for which the rest,
    scaled to sum to budget - k, stay at or below 1."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order].astype(np.float64)
    p = np.zeros_like(s)
    for k in range(len(s) + 1):
        rest = s[k:].sum()
        if rest == 0 or k >= budget:
            p[:k] = 1
            break
        scale = (budget - k) / rest
        if s[k] * scale <= 1:
            p[:k], p[k:] = 1, s[k:] * scale
            break
    out = np.empty_like(p)
    out[order] = p
    return out


@pytest.mark.parametrize("case", range(6))
def test_probabilities_are_the_water_filling_solution(case):
    rng = np.random.default_rng(case)
    scores = rng.exponential(size=200) ** 3
    scores[:5] *= 1e3  # dominant rows
    scores[rng.random(200) < 0.2] = 0
    budget = [100, 50, 10, 150, 180, 1][case]
    p = R.lss_probabilities(scores.astype(np.float32), budget)
    assert p.dtype == np.float32 and p.max() <= 1 and p.min() >= 0
    assert p.sum() == pytest.approx(min(budget, np.count_nonzero(scores)), rel=1e-5)
    np.testing.assert_allclose(
        p, _water_filling(scores.astype(np.float32), budget), rtol=1e-5, atol=1e-7
    )


def test_probability_edge_cases():
    assert not R.lss_probabilities(np.zeros(6, np.float32), 3).any()  # nothing to keep
    p = R.lss_probabilities(np.array([1, 2, 0, 3], np.float32), 10)  # budget above the rows
    assert p.tolist() == [1, 1, 0, 1]
    assert R.lss_probabilities(np.zeros(0, np.float32), 0).shape == (0,)


def test_sampling_keeps_each_row_with_its_probability():
    p = np.concatenate([[0.0, 1.0], np.linspace(0.01, 0.99, 40)])
    repeats = 4000
    kept = np.stack([R.lss_sample(p, seed=k) for k in range(repeats)])
    assert not kept[:, 0].any() and kept[:, 1].all()
    assert np.abs(kept.mean(axis=0) - p).max() < _hoeffding(p.size, repeats, 1.0)
    z = (kept.sum() - repeats * p.sum()) / math.sqrt(repeats * (p * (1 - p)).sum())
    assert abs(z) < Z_LIMIT
    assert not np.array_equal(R.lss_sample(p, 1, stream=1), R.lss_sample(p, 1, stream=2))
    assert np.array_equal(R.lss_sample(p, 7), F.lss_sample(T(p), 7).numpy())


def _estimator_case(seed=0, tokens=48, out=20, n_in=24):
    rng = np.random.default_rng(seed)
    g = _gradient(seed, (tokens, out))
    g[rng.random(tokens) < 0.5] *= 0.01  # unequal rows: sampling matters
    Fc, Sc, sigma = R.bit_split(g, clip="full", seed=seed)
    q = rng.integers(-8, 8, (tokens, n_in)).astype(np.int8)
    q_w = rng.integers(-8, 8, (out, n_in)).astype(np.int8)
    return Fc, Sc, sigma, q, q_w


def _projection_test(estimate, exact: np.ndarray, repeats: int, variance: float) -> None:
    """Unbiasedness and the variance formula, on one random projection <estimate, R> of the
    estimator (iid over seeds, so a z-test applies; the variance by the fourth moment)."""
    rng = np.random.default_rng(99)
    proj = rng.standard_normal(exact.shape)
    samples = np.array(
        [float((estimate(k).astype(np.float64) * proj).sum()) for k in range(repeats)]
    )
    truth = float((exact * proj).sum())
    assert abs(_z(samples, truth, variance)) < Z_LIMIT
    centred = samples - truth
    m4 = np.mean(centred**4)
    se = math.sqrt(max(m4 - variance**2, 1e-300) / repeats)
    assert abs(np.mean(centred**2) - variance) / se < Z_LIMIT


def test_lss_weight_gradient_is_unbiased_with_the_stated_variance():
    Fc, Sc, sigma, q_x, _ = _estimator_case()
    step = 0.05
    n = Fc.shape[0]
    exact = R.lss_grad_weight(Fc, Sc, sigma, q_x, step, sampling=False).astype(np.float64)
    # variance of <G^, R>: sum over the 2N split rows of (1 - p)/p (a_i^T R b_i)^2
    rows = np.concatenate([14 * Fc, Sc]).astype(np.float64) / float(sigma)  # (2N, out)
    x_hat = np.concatenate([q_x, q_x]).astype(np.float64) * step  # (2N, in)
    scores = np.linalg.norm(rows, axis=1) * np.linalg.norm(x_hat, axis=1)
    p = R.lss_probabilities(scores.astype(np.float32), n).astype(np.float64)
    proj = np.random.default_rng(99).standard_normal(exact.shape)
    contrib = np.einsum("io,oj,ij->i", rows, proj, x_hat)
    kept_p = np.where(p > 0, p, 1)
    variance = float(((1 - p) / kept_p * contrib**2).sum())
    assert (p < 1).sum() > n // 2  # sampling is active
    _projection_test(
        lambda k: R.lss_grad_weight(Fc, Sc, sigma, q_x, step, seed=k), exact, 1500, variance
    )


def test_lss_input_gradient_is_unbiased_with_the_stated_variance():
    Fc, Sc, sigma, _, q_w = _estimator_case(1)
    step = 0.02
    n = Fc.shape[0]
    exact = R.lss_grad_input(Fc, Sc, sigma, q_w, step, sampling=False).astype(np.float64)
    rows = np.concatenate([14 * Fc, Sc]).astype(np.float64) / float(sigma)
    p = R.lss_probabilities(np.linalg.norm(rows, axis=1).astype(np.float32), n).astype(np.float64)
    proj = np.random.default_rng(99).standard_normal(exact.shape)
    w_hat = q_w.astype(np.float64) * step
    contrib = np.einsum("io,oj,ij->i", rows, w_hat, np.concatenate([proj, proj]))
    variance = float(((1 - p) / np.where(p > 0, p, 1) * contrib**2).sum())
    assert (p < 1).sum() > n // 2  # sampling is active
    _projection_test(
        lambda k: R.lss_grad_input(Fc, Sc, sigma, q_w, step, seed=k), exact, 1500, variance
    )


def test_without_sampling_the_estimators_are_the_exact_split_products():
    Fc, Sc, sigma, q_x, q_w = _estimator_case(2)
    g_split = R.bit_merge(Fc, Sc, sigma).astype(np.float64)
    gw = R.lss_grad_weight(Fc, Sc, sigma, q_x, 0.1, sampling=False)
    np.testing.assert_allclose(gw, g_split.T @ (q_x * 0.1), rtol=1e-5, atol=1e-6 * np.abs(gw).max())
    gx = R.lss_grad_input(Fc, Sc, sigma, q_w, 0.1, sampling=False)
    np.testing.assert_allclose(gx, g_split @ (q_w * 0.1), rtol=1e-5, atol=1e-6 * np.abs(gx).max())


# ---- the whole backward -------------------------------------------------------------------------------


def _layer(seed=0, tokens=40, n_in=64, out=24):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    w = (rng.standard_normal((out, n_in)) * 0.1).astype(np.float32)
    g = _gradient(seed, (tokens, out))
    block = 32
    sx, sw = R.lsq_init(block_hadamard(x, block)), R.lsq_init(block_hadamard(w, block))
    return g, x, w, sx, sw, block


def _ste_gradients(g, x, w, sx, sw, block):
    """The exact (unsplit, unsampled) straight-through gradients, float64."""
    xh, wh = (
        block_hadamard(x, block).astype(np.float64),
        block_hadamard(w, block).astype(np.float64),
    )
    vx, vw = xh / float(sx), wh / float(sw)
    x_hat = R.lsq_quantize(xh, np.float64(sx), rounding="half_away")
    w_hat = R.lsq_quantize(wh, np.float64(sw), rounding="half_away")
    gx = (g @ w_hat) * ((vx >= -8) & (vx <= 7))
    gw = (g.T @ x_hat) * ((vw >= -8) & (vw <= 7))
    return block_hadamard(gx, block), block_hadamard(gw, block)


@pytest.mark.parametrize("sampling", [False, True])
def test_full_backward_is_unbiased_for_the_ste_gradient(sampling):
    g, x, w, sx, sw, block = _layer()
    gx_exact, gw_exact = _ste_gradients(g, x, w, sx, sw, block)
    repeats = 300
    proj_x = np.random.default_rng(1).standard_normal(gx_exact.shape)
    proj_w = np.random.default_rng(2).standard_normal(gw_exact.shape)
    sx_samples, sw_samples = [], []
    for k in range(repeats):
        gx, gw, _, _ = R.int4_linear_backward(
            g, x, w, sx, sw, block, sampling=sampling, clip="full", seed=k
        )
        sx_samples.append(float((gx * proj_x).sum()))
        sw_samples.append(float((gw * proj_w).sum()))
    assert abs(_z(np.array(sx_samples), float((gx_exact * proj_x).sum()))) < Z_LIMIT
    assert abs(_z(np.array(sw_samples), float((gw_exact * proj_w).sum()))) < Z_LIMIT


def test_full_backward_step_gradients_are_lsq_of_the_estimates():
    g, x, w, sx, sw, block = _layer(3)
    gx, gw, gsx, gsw = R.int4_linear_backward(
        g, x, w, sx, sw, block, sampling=False, clip="full", seed=0
    )
    Fc, Sc, sigma = R.bit_split(g, clip="full", seed=0)
    xh, wh = block_hadamard(x, block), block_hadamard(w, block)
    q_w = R.lsq_encode(wh, sw, rounding="half_away")
    gxh = R.lss_grad_input(Fc, Sc, sigma, q_w, sw, sampling=False)
    _, expected = R.lsq_quantize_grad(xh, sx, gxh, rounding="half_away")
    assert gsx == expected


# ---- fast path against the reference where float64 sums decide the last bits ----------------------------


@pytest.mark.parametrize("seed", range(4))
def test_fast_reductions_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    dtype = [np.float32, np.float64, np.float32, np.float16][seed]
    g, x, w, sx, sw, block = _layer(seed, tokens=17 + seed, n_in=64, out=9 + seed)
    x, w, g = x.astype(dtype), w.astype(dtype), g.astype(dtype)
    rtol = 1e-12 if dtype == np.float64 else 2**-23
    # LSQ's gradient: grad_x exact, the step's float64 sum to its rounding
    for rounding in ("half_even", "half_away"):
        upstream = rng.standard_normal(x.shape).astype(dtype)
        gx_ref, gs_ref = R.lsq_quantize_grad(x, sx, upstream, rounding=rounding)
        gx_fast, gs_fast = F.lsq_quantize_grad(T(x), T(sx), T(upstream), rounding=rounding)
        assert np.array_equal(gx_ref, gx_fast.numpy())
        np.testing.assert_allclose(gs_fast.numpy(), gs_ref, rtol=rtol)
    # the block search
    best_r, blocks_r, err_r = R.hq_search(x, w)
    best_f, blocks_f, err_f = F.hq_search(T(x), T(w))
    assert best_r == best_f and np.array_equal(blocks_r, blocks_f.numpy())
    np.testing.assert_allclose(err_f.numpy(), err_r, rtol=1e-12)
    # the whole backward: grad_x exact (integer products, then exact scalings), grad_w exact
    # without sampling (tier B with it), the step gradients to the sums' rounding
    for sampling in (False, True):
        ref = R.int4_linear_backward(g, x, w, sx, sw, block, sampling=sampling, seed=seed)
        fast = F.int4_linear_backward(
            T(g), T(x), T(w), T(sx), T(sw), block, sampling=sampling, seed=seed
        )
        if sampling and dtype == np.float64:  # p from float64 sums: the last bits
            scale = np.abs(ref[0]).max()  # the Hadamard transform sums them: absolute terms
            np.testing.assert_allclose(fast[0].numpy(), ref[0], rtol=2**-45, atol=2**-45 * scale)
        else:
            assert np.array_equal(ref[0], fast[0].numpy())
        if sampling:
            np.testing.assert_allclose(
                fast[1].numpy(), ref[1], rtol=1e-5, atol=1e-5 * np.abs(ref[1]).max()
            )
        else:
            assert np.array_equal(ref[1], fast[1].numpy())
        for r, f in zip(ref[2:], fast[2:]):
            np.testing.assert_allclose(f.numpy(), r, rtol=rtol if not sampling else 1e-4)


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [R, F])
def test_bad_input_gets_one_line_errors(module):
    wrap = (lambda a: a) if module is R else T
    x = wrap(np.ones((4, 8), np.float32))
    with pytest.raises(ValueError, match="bits must be from 2 to 8"):
        module.lsq_encode(x, 0.1, 9)
    with pytest.raises(ValueError, match="rounding='up' is invalid"):
        module.lsq_encode(x, 0.1, rounding="up")
    with pytest.raises(
        ValueError, match="step must be positive and finite, got 0.0; start from lsq_init"
    ):
        module.lsq_encode(x, 0.0)
    with pytest.raises(ValueError, match="clip='none' is invalid"):
        module.bit_split(x, clip="none")
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        module.bit_split(x, seed=-1)
    bad = np.ones((4, 8), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="g has 1 non-finite values; 4-bit training needs finite"):
        module.bit_split(wrap(bad))
    with pytest.raises(ValueError, match="F must be int8 codes"):
        module.bit_merge(wrap(np.ones((2, 2), np.float32)), wrap(np.ones((2, 2), np.int8)), 1.0)
    with pytest.raises(ValueError, match="block=3 does not divide|power of two"):
        module.hq_linear(x, x, 0.1, 0.1, 3)
    with pytest.raises(ValueError, match=r"w must be \(out, 8\)"):
        module.hq_linear(x, wrap(np.ones((4, 6), np.float32)), 0.1, 0.1, 2)
    with pytest.raises(ValueError, match="scores must be finite and non-negative"):
        module.lss_probabilities(wrap(np.array([1.0, -1.0], np.float32)), 1)
    with pytest.raises(ValueError, match="shapes do not match a linear layer"):
        module.int4_linear_backward(wrap(np.ones((4, 3), np.float32)), x, x, 0.1, 0.1, 2)


def test_empty_batches():
    x = np.zeros((0, 16), np.float32)
    w = np.ones((4, 16), np.float32)
    assert R.hq_linear(x, w, 0.1, 0.1, 16).shape == (0, 4)
    assert F.hq_linear(T(x), T(w), 0.1, 0.1, 16).shape == (0, 4)
    g = np.zeros((0, 4), np.float32)
    for module, wrap in ((R, lambda a: a), (F, T)):
        gx, gw, gsx, gsw = module.int4_linear_backward(wrap(g), wrap(x), wrap(w), 0.1, 0.1, 16)
        assert gx.shape == (0, 16) and gw.shape == (4, 16)
        assert (
            not np.asarray(gw).any()
            and np.isfinite(np.asarray(gsx))
            and np.isfinite(np.asarray(gsw))
        )
