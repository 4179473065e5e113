"""LLM.int8(): reference vs independent truth (hand-computed vectors, bitsandbytes' CPU backend,
float64), numpy vs numba, fast vs reference in every dtype, gradients, and the Triton kernels
under TRITON_INTERPRET=1 (native + CUDA-graph capture on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.fast import llm_int8 as F
from lowbit.fast.testing.pairs import PAIRS
from lowbit.fast.testing.pairs.llm_int8 import (
    llm_int8_matmul_calls,
    llm_int8_naive_matmul,
    llm_int8_x_arrays,
)
from lowbit.fast.testing.tiers import EXACT, FP32, MATMUL
from lowbit.reference import llm_int8 as R
from tests.harness import assert_matches_reference, to_torch

DTYPES = ["float16", "bfloat16", "float32"]


# ---------------------------------------------------------------------------------------------
# reference: hand-computed vectors (the spec's 2x4 case) and guards
# ---------------------------------------------------------------------------------------------


def test_spec_vector_2x4_outlier_column_zeroed_and_excluded_from_absmax():
    x = np.array([[1.0, 2.0, 7.0, -3.0], [0.5, -1.0, 2.0, 1.0]], dtype=np.float32)
    codes, absmax, cols = R.vectorwise_quant(x, threshold=6.0)
    # Row 0: |7| >= 6 is excluded, absmax 3; row 1: absmax 2 (its entry in column 2 counts).
    np.testing.assert_array_equal(absmax, [3.0, 2.0])
    np.testing.assert_array_equal(cols, [False, False, True, False])
    # round(127 * [1, 2, -3] / 3) = [42 (42.33), 85 (84.67), -127]; row 1: 127 * [.5, -1, 1] / 2.
    np.testing.assert_array_equal(codes, [[42, 85, 0, -127], [32, -64, 0, 64]])
    # Without a threshold the 7 is an ordinary element.
    codes0, absmax0, cols0 = R.vectorwise_quant(x, threshold=0.0)
    np.testing.assert_array_equal(absmax0, [7.0, 2.0])
    assert not cols0.any()
    np.testing.assert_array_equal(codes0[0], np.rint(127 * x[0] / 7))


def test_single_row_outlier_and_one_dimensional_input():
    x = np.array([1.0, -8.0, 4.0], dtype=np.float32)
    codes, absmax, cols = R.vectorwise_quant(x, threshold=6.0)
    assert codes.shape == (3,) and absmax.shape == ()
    np.testing.assert_array_equal(codes, [32, 0, 127])  # 127 * 1/4 = 31.75 -> 32
    np.testing.assert_array_equal(cols, [False, True, False])


def test_zero_rows_tiny_rows_and_empty_inputs_never_give_nan():
    x = np.zeros((3, 5), dtype=np.float32)
    x[1] = 1e-38  # absmax below 2**-121: 127/absmax would overflow float32
    x[2] = [1, 2, 3, 4, 5]
    for impl in (R, F):
        xin = x if impl is R else torch.from_numpy(x)
        codes, absmax, _ = impl.vectorwise_quant(xin, threshold=6.0)
        codes, absmax = np.asarray(codes), np.asarray(absmax)
        np.testing.assert_array_equal(codes[:2], 0)
        np.testing.assert_array_equal(absmax[:2], np.float32([0.0, 1e-38]))
        deq = np.asarray(
            impl.vectorwise_dequant(impl.vectorwise_quant(xin)[0], impl.vectorwise_quant(xin)[1])
        )
        assert np.isfinite(deq).all()
    for shape in [(0, 4), (3, 0), (0, 0)]:
        e = np.zeros(shape, dtype=np.float32)
        c, a, o = R.vectorwise_quant(e, 6.0)
        assert c.shape == shape and a.shape == (shape[0],) and o.shape == (shape[1],)
        assert_matches_reference("llm_int8.vectorwise_quant", e, threshold=6.0)
    y = R.matmul(np.zeros((0, 4), np.float32), np.ones((3, 4), np.float32))
    assert y.shape == (0, 3)
    assert F.matmul(torch.zeros(0, 4), torch.ones(3, 4)).shape == (0, 3)


@pytest.mark.parametrize("impl", [R, F], ids=["reference", "fast"])
def test_bad_input_raises_one_line_value_error(impl):
    T = (lambda a: a) if impl is R else (lambda a: torch.from_numpy(np.asarray(a)))
    x = np.ones((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="threshold"):
        impl.vectorwise_quant(T(x), threshold=-1.0)
    nan = x.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        impl.vectorwise_quant(T(nan), threshold=6.0)
    inf = x.copy()
    inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        impl.vectorwise_quant(T(inf), threshold=0.0)
    impl.vectorwise_quant(T(inf), threshold=6.0)  # Inf is an outlier: fine
    with pytest.raises(ValueError, match="float"):
        impl.vectorwise_quant(T(np.ones((2, 3), dtype=np.int32)))
    with pytest.raises(ValueError, match="features"):
        impl.matmul(T(x), T(np.ones((4, 5), np.float32)))
    w_nan = np.ones((4, 3), np.float32)
    w_nan[1, 2] = np.nan  # named "x" before: the weights went through vectorwise_quant's check
    with pytest.raises(ValueError, match="^w has 1 non-finite values; the weights must be finite"):
        impl.matmul(T(x), T(w_nan))
    with pytest.raises(ValueError, match="^x has 1 non-finite values"):
        impl.matmul(T(nan), T(np.ones((4, 3), np.float32)))
    with pytest.raises(ValueError, match="outlier_weights"):
        impl.matmul(T(x), T(np.ones((4, 3), np.float32)), outlier_weights="fp16")
    with pytest.raises(ValueError, match="int8"):
        impl.vectorwise_dequant(T(np.ones((2, 3), np.int32)), T(np.ones(2, np.float32)))
    with pytest.raises(ValueError, match="at least one dimension"):  # 0-d codes: no column axis
        impl.vectorwise_dequant(T(np.array(5, np.int8)), T(np.array(1.0, np.float32)))


def test_matmul_grad_checks_grad_output_shape_before_reshaping():
    x, w = np.ones((2, 3, 4), np.float32), np.ones((5, 4), np.float32)
    # 30 elements reshape to (6, 5) but are not (2, 3, 5); 7 elements do not reshape at all.
    for bad in (np.ones((3, 2, 5)), np.ones((6, 5)), np.ones(7)):
        with pytest.raises(ValueError, match=r"grad_output has shape .* expected"):
            R.matmul_grad(x, w, grad_output=bad)
    assert R.matmul_grad(x, w, grad_output=np.ones((2, 3, 5)))[0].shape == x.shape


# ---------------------------------------------------------------------------------------------
# reference vs bitsandbytes' CPU backend (independent oracle), and the reference's numpy row
# quantizer vs its numba loop (they must agree bit for bit)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bnb_functional():
    """bitsandbytes' functional module; only the oracle tests that take it skip without it."""
    return pytest.importorskip("bitsandbytes.functional")


@given(
    x=llm_int8_x_arrays(DTYPES + ["float64"], 129, 129), threshold=st.sampled_from([0.0, 6.0, 2.5])
)
def test_vectorwise_quant_matches_bitsandbytes_cpu(bnb_functional, x, threshold):
    codes, absmax, cols = R.vectorwise_quant(x, threshold)
    # bitsandbytes' CPU backend computes in the tensor's dtype; the reference (like its CUDA
    # kernel) in float32, so the oracle gets the float32 values (exact for fp16/bf16).
    x32 = torch.from_numpy(np.asarray(x).astype(np.float32))
    b_codes, b_absmax, b_cols = bnb_functional.int8_vectorwise_quant(
        x32.clone(), threshold=threshold
    )
    np.testing.assert_array_equal(absmax, b_absmax.numpy())
    live = absmax > 0  # bitsandbytes divides by zero on all-zero rows (backend-dependent codes)
    np.testing.assert_array_equal(codes[live], b_codes.numpy()[live])
    expected_cols = np.zeros(x.shape[1], bool)
    if b_cols is not None:
        expected_cols[b_cols.numpy()] = True
    np.testing.assert_array_equal(cols, expected_cols)
    deq = R.vectorwise_dequant(codes, absmax)
    b_deq = bnb_functional.int8_vectorwise_dequant(
        torch.from_numpy(codes), torch.from_numpy(absmax)
    )
    np.testing.assert_array_equal(deq, b_deq.numpy())


def test_bitsandbytes_fp16_arithmetic_differs_by_at_most_one_code(bnb_functional):
    # Finding, recorded: for float16 input bitsandbytes' CPU backend computes 127/absmax and the
    # product in float16, so a few codes differ by one from the float32 arithmetic of its CUDA
    # kernel and of the reference. Never more than one.
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((256, 512)) * 2).astype(np.float16)
    codes, _, _ = R.vectorwise_quant(x, 6.0)
    b_codes, _, _ = bnb_functional.int8_vectorwise_quant(torch.from_numpy(x), threshold=6.0)
    diff = np.abs(codes.astype(int) - b_codes.numpy().astype(int))
    assert diff.max() <= 1


@given(
    x=llm_int8_x_arrays(["float16", "float32"], 129, 129),
    threshold=st.sampled_from([0.0, 6.0, 1.0]),
)
def test_numpy_and_numba_row_quantization_agree_bit_for_bit(x, threshold):
    X = np.asarray(x).astype(np.float32)
    tau = np.float32(threshold)
    c1, a1 = R._quant_rows_numpy(X, tau)
    c2, a2 = R._quant_rows_numba(X, tau)
    EXACT.check(c1, c2)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(a1.view(np.uint32), a2.view(np.uint32))


def test_round_half_to_even_at_exact_ties():
    # absmax 127 makes the scale exactly 1: x = k + 0.5 ties go to the even neighbour.
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5]], dtype=np.float32)
    codes, _, _ = R.vectorwise_quant(x)
    np.testing.assert_array_equal(codes[0], [127, 0, 2, 2, 0, -2, 126])
    np.testing.assert_array_equal(F.vectorwise_quant(torch.from_numpy(x))[0].numpy(), codes)


# ---------------------------------------------------------------------------------------------
# the matmul: reference vs float64 truth, fast vs reference in every dtype, gradients
# ---------------------------------------------------------------------------------------------


def test_int8_matmul_is_exact_integer_product_times_scales():
    rng = np.random.default_rng(0)
    cx = rng.integers(-127, 128, (5, 300)).astype(np.int8)
    cw = rng.integers(-127, 128, (7, 300)).astype(np.int8)
    ax, aw = rng.random(5).astype(np.float32), rng.random(7).astype(np.float32)
    y = R.int8_matmul(cx, ax, cw, aw)
    S = np.array([[sum(int(a) * int(b) for a, b in zip(r, c)) for c in cw] for r in cx])
    # S is exact; the float64 scaling may differ in the last bits (x * (1/16129) vs x / 16129).
    np.testing.assert_allclose(
        y, S * np.outer(ax.astype(np.float64), aw) / 16129.0, rtol=4 * 2.0**-52, atol=0
    )


def test_decomposition_recovers_planted_outliers():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[:, [3, 77]] *= 40.0  # two systematic outlier features
    w = (rng.standard_normal((128, 256)) * 0.05).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    err = {}
    for t in (0.0, 6.0):
        err[t] = np.linalg.norm(R.matmul(x, w, threshold=t) - exact) / np.linalg.norm(exact)
    assert err[6.0] < err[0.0] / 5  # the paper's point: outliers wreck the row scales
    _, _, cols = R.vectorwise_quant(x, 6.0)
    assert set(np.flatnonzero(cols)) >= {3, 77}
    # Without outliers both outlier_weights variants are the same computation.
    small = x[:, :3]
    np.testing.assert_array_equal(
        R.matmul(small, w[:, :3], outlier_weights="full"),
        R.matmul(small, w[:, :3], outlier_weights="dequantized"),
    )


def _matmul_calls(dtypes=DTYPES):
    """(x, w, bias, kwargs) from the pair's strategy (lowbit/fast/testing/pairs/llm_int8.py)."""
    return llm_int8_matmul_calls(dtypes).map(lambda c: (*c.args, c.kwargs))


@given(call=_matmul_calls())
def test_fast_matmul_matches_reference_in_fp16_bf16_fp32(call):
    x, w, bias, kwargs = call
    assert_matches_reference(
        "llm_int8.matmul", x, w, bias, tier=MATMUL, naive=PAIRS["llm_int8.matmul"].naive, **kwargs
    )


def test_matmul_pair_naive_is_the_plain_torch_one():
    assert PAIRS["llm_int8.matmul"].naive is llm_int8_naive_matmul


@settings(max_examples=20)
@given(call=_matmul_calls(["float64"]))
def test_fast_gradients_match_reference_float64(call):
    # float64 input: the fast gradients are float64 computations of the same formulas, equal to
    # matmul_grad at float32 precision element by element (codes are recomputed bit-exactly).
    x, w, bias, kwargs = call

    def grad(*args, grad_output, **kw):
        return R.matmul_grad(*args, grad_output=grad_output, **kw)[:2]

    assert_matches_reference(
        "llm_int8.matmul",
        x,
        w,
        bias,
        tier=MATMUL,
        naive=llm_int8_naive_matmul,
        grad=grad,
        grad_argnums=(0, 1),
        grad_tier=FP32,
        **kwargs,
    )


def _naive_grads(x, w, g, threshold):
    """matmul_grad's formulas in plain float32 torch (codes from the reference quantizer)."""
    G = torch.from_numpy(np.asarray(g, np.float32))
    Wdq = torch.from_numpy(R.vectorwise_dequant(*R.vectorwise_quant(w)[:2]))
    naive_gx = G @ Wdq
    _, _, O = R.vectorwise_quant(x, threshold)
    X = torch.from_numpy(np.asarray(x, np.float32))
    gq, gs, _ = R.vectorwise_quant(G.numpy().T.copy())
    xq, xs, _ = R.vectorwise_quant(np.where(O[None, :], 0, X.numpy()).T.copy())
    naive_gw = (torch.from_numpy(gq).float() @ torch.from_numpy(xq).float().T) * (
        torch.from_numpy(gs)[:, None] * torch.from_numpy(xs)[None, :]
    ) / 16129.0 + G.T @ X.masked_fill(~torch.from_numpy(O)[None, :], 0)
    return naive_gx, naive_gw


@settings(max_examples=20)
@given(call=_matmul_calls(["float32"]))
def test_fast_gradients_match_reference_float32(call):
    x, w, bias, kwargs = call
    xt, wt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    bt = torch.from_numpy(bias).requires_grad_() if bias is not None else None
    y = F.matmul(xt, wt, bt, **kwargs)
    g = np.random.default_rng(0).standard_normal(y.shape)
    grads = torch.autograd.grad(
        y, [xt, wt] + ([bt] if bt is not None else []), torch.from_numpy(g).float()
    )
    ref = R.matmul_grad(x, w, bias, **kwargs, grad_output=g)
    naive_gx, naive_gw = _naive_grads(x, w, g.astype(np.float32), kwargs["threshold"])
    G = torch.from_numpy(g).float()
    for fast_g, ref_g, naive_g in zip(grads, ref, (naive_gx, naive_gw, G.sum(0))):
        bad = MATMUL.check_with_naive(fast_g.numpy(), ref_g, naive_g.numpy())
        assert not bad.any(), f"{int(bad.sum())} gradient elements outside tier B"


def test_grad_w_consistent_pairing_beats_bitsandbytes_mismatch():
    # Column-wise quantized grad_output (the reference) approximates G^T X far better than the
    # row-quantized grad_output dequantized with column statistics (bitsandbytes >= 0.45).
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    w = (rng.standard_normal((32, 64)) * 0.1).astype(np.float32)
    g = rng.standard_normal((256, 32)) * np.exp(
        rng.standard_normal((256, 1))
    )  # token-varying scale
    exact = g.T @ x.astype(np.float64)
    _, grad_w, _ = R.matmul_grad(x, w, threshold=0.0, grad_output=g)
    rel = np.linalg.norm(grad_w - exact) / np.linalg.norm(exact)
    g8, _, _ = R.vectorwise_quant(g)  # row-wise (per token) codes
    _, col_stats, _ = R.vectorwise_quant(g.T)  # column statistics
    x8t, xs, _ = R.vectorwise_quant(x.T.copy())
    mismatch = R.int8_matmul(np.ascontiguousarray(g8.T), col_stats, x8t, xs)
    rel_mismatch = np.linalg.norm(mismatch - exact) / np.linalg.norm(exact)
    # rel is about 2 % here (tokens with small scale lose precision under a per-feature scale).
    assert rel < 0.03 and rel_mismatch > 10 * rel, (rel, rel_mismatch)


def test_outlier_features_paper_criteria():
    rng = np.random.default_rng(4)
    H = rng.standard_normal((8, 100, 32)).astype(np.float32)
    H[:4, :10, 5] = 9.0  # half the layers, 10 % of tokens: an outlier feature
    H[0, :50, 6] = 9.0  # one layer of eight (12.5 %): not systematic
    H[:, :3, 7] = 9.0  # every layer but 3 % of tokens: not systematic
    dims, mag, lf, tf = R.outlier_features(H)
    np.testing.assert_array_equal(dims, [5])
    np.testing.assert_array_equal(mag, [9.0])
    np.testing.assert_array_equal(lf, [0.5])
    np.testing.assert_array_equal(tf, [0.1])
    assert_matches_reference("llm_int8.outlier_features", H)


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (tiny shapes), natively on CUDA with `-m gpu`
# ---------------------------------------------------------------------------------------------


def _kernels():
    return pytest.importorskip("lowbit.kernels.int8")


@pytest.mark.interpret
@settings(max_examples=12)
@given(x=llm_int8_x_arrays(DTYPES, 9, 70), threshold=st.sampled_from([0.0, 6.0, 2.0]))
def test_rowwise_quant_kernel_bit_exact(x, threshold):
    K = _kernels()
    codes, absmax, flags = K.rowwise_quant(to_torch(x), threshold, block_k=32)
    rc, ra, ro = R.vectorwise_quant(x, threshold)
    codes = codes.clone()
    if threshold > 0:
        codes[:, flags != 0] = 0  # the kernel zeroes outlier elements; consumers zero the columns
        np.testing.assert_array_equal(flags.numpy() != 0, ro)
    else:
        assert flags is None
    np.testing.assert_array_equal(codes.numpy(), rc)
    np.testing.assert_array_equal(absmax.numpy().view(np.uint32), ra.view(np.uint32))


@pytest.mark.interpret
@settings(max_examples=8)
@given(m=st.integers(1, 40), n=st.integers(1, 40), k=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_int8_gemm_kernel_int32_exact(m, n, k, seed):
    K = _kernels()
    rng = np.random.default_rng(seed)
    cx = rng.integers(-127, 128, (m, k)).astype(np.int8)
    cw = rng.integers(-127, 128, (n, k)).astype(np.int8)
    ones_m, ones_n = torch.ones(m), torch.ones(n)
    S = K.int8_linear(torch.from_numpy(cx), ones_m, torch.from_numpy(cw), ones_n, out_int32=True)
    np.testing.assert_array_equal(S.numpy(), cx.astype(np.int64) @ cw.astype(np.int64).T)


@pytest.mark.interpret
@settings(max_examples=8)
@given(call=_matmul_calls(["float16", "float32"]))
def test_fused_linear_kernel_matches_reference(call):
    K = _kernels()
    x, w, bias, kwargs = call
    X = x.reshape(-1, x.shape[-1])
    tau = kwargs["threshold"]
    codes, c_x, flags = K.rowwise_quant(torch.from_numpy(X), tau)
    wc, wa, _ = R.vectorwise_quant(w)
    y = K.int8_linear(
        codes,
        c_x,
        torch.from_numpy(wc),
        torch.from_numpy(wa),
        flags=flags,
        x=torch.from_numpy(X),
        w_full=torch.from_numpy(w) if kwargs["outlier_weights"] == "full" else None,
        bias=torch.from_numpy(bias) if bias is not None else None,
        out_dtype=torch.from_numpy(x).dtype,
    )
    ref = R.matmul(X, w, bias, **kwargs)
    naive = PAIRS["llm_int8.matmul"].naive(*to_torch((X, w, bias)), **kwargs)
    bad = MATMUL.check_with_naive(y.float().numpy(), ref, naive.float().numpy())
    assert not bad.any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("outlier_weights", ["full", "dequantized"])
def test_native_cuda_matmul_matches_reference(dtype, outlier_weights):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 520)).astype(np.float32)
    x[:, [7, 300]] *= 20
    w = (rng.standard_normal((260, 520)) * 0.05).astype(np.float32)
    b = rng.standard_normal(260).astype(np.float32)
    xt, wt, bt = (torch.from_numpy(a).to("cuda", dtype) for a in (x, w, b))
    y = F.matmul(xt, wt, bt, 6.0, outlier_weights).float().cpu().numpy()
    xr, wr, br = (t.float().cpu().numpy() for t in (xt, wt, bt))
    ref = R.matmul(xr, wr, br, 6.0, outlier_weights)
    naive = PAIRS["llm_int8.matmul"].naive(
        xt, wt, bt, threshold=6.0, outlier_weights=outlier_weights
    )
    assert not MATMUL.check_with_naive(y, ref, naive.float().cpu().numpy()).any()
    c, a, o = F.vectorwise_quant(xt, 6.0)
    rc, ra, ro = R.vectorwise_quant(xr, 6.0)
    np.testing.assert_array_equal(c.cpu().numpy(), rc)
    np.testing.assert_array_equal(a.cpu().numpy(), ra)
    np.testing.assert_array_equal(o.cpu().numpy(), ro)


@pytest.mark.gpu
def test_linear8bitlt_forward_is_cuda_graph_capturable():
    from lowbit.fast.nn import Linear8bitLt

    lin = torch.nn.Linear(512, 256).cuda().half()
    mod = Linear8bitLt.from_linear(lin, threshold=6.0)
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    x[:, 3] *= 30
    eager = mod(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mod(x)  # warm-up (Triton compiles outside the capture)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mod(x)
    x.copy_(torch.randn_like(x))
    x[:, 11] *= 30  # a different outlier column: the graph must follow the data
    graph.replay()
    torch.testing.assert_close(out, mod(x), rtol=0, atol=0)
    assert not torch.equal(out, eager)


@pytest.mark.interpret
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fast_kernel_path_glue_under_interpreter(monkeypatch, threshold, dtype):
    """The CUDA branch of lowbit.fast (kernels + glue) run on CPU tensors through the interpreter:
    codes/scales/masks bit-exact; products and gradients tier B against the reference."""
    _kernels()
    from lowbit.fast.nn import Linear8bitLt

    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 9, 40)) * 2).astype(np.float32)
    x[..., 3] *= 6
    w = (rng.standard_normal((24, 40)) * 0.1).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    xt, wt, bt = (torch.from_numpy(a).to(dtype) for a in (x, w, b))
    lin = torch.nn.Linear(40, 24).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(wt)
        lin.bias.copy_(bt)
    mod = Linear8bitLt.from_linear(lin, threshold=threshold)
    cpu_quant = F.vectorwise_quant(xt, threshold)
    monkeypatch.setattr(F, "_on_triton_device", lambda t: True)
    for got, want in zip(F.vectorwise_quant(xt, threshold), cpu_quant):
        assert torch.equal(got, want)
    # Products: tier B against the float64 reference, with the plain-torch naive of the pair.
    xr, wr, br = (t.float().numpy() for t in (xt, wt, bt))
    for variant in ("full", "dequantized"):
        y = F.matmul(xt, wt, bt, threshold, variant)
        ref = R.matmul(xr, wr, br, threshold, variant)
        naive = llm_int8_naive_matmul(xt, wt, bt, threshold=threshold, outlier_weights=variant)
        assert not MATMUL.check_with_naive(y.float().numpy(), ref, naive.float().numpy()).any()
    y_mod = mod(xt)  # Linear8bitLt keeps int8 weights only: bitsandbytes' dequantized outliers
    ref = R.matmul(xr, wr, br, threshold, "dequantized")
    naive = llm_int8_naive_matmul(xt, wt, bt, threshold=threshold, outlier_weights="dequantized")
    assert not MATMUL.check_with_naive(y_mod.float().numpy(), ref, naive.float().numpy()).any()
    int8_args = (*F.vectorwise_quant(xt[0])[:2], *F.vectorwise_quant(wt)[:2])
    y8 = F.int8_matmul(*int8_args)
    ref8 = R.int8_matmul(*(a.numpy() for a in int8_args))
    naive8 = PAIRS["llm_int8.int8_matmul"].naive(*int8_args)
    assert not MATMUL.check_with_naive(y8.numpy(), ref8, naive8.numpy()).any()
    # Gradients through the kernel path: tier B against matmul_grad with the plain-torch
    # formulas (rounded to x's dtype, like the fast gradients) as the naive result.
    g = torch.from_numpy(rng.standard_normal((2, 9, 24)).astype(np.float32)).to(dtype)
    xg, wg = xt.clone().requires_grad_(), wt.clone().requires_grad_()
    kernel_grads = torch.autograd.grad(F.matmul(xg, wg, None, threshold), [xg, wg], g)
    ref_grads = R.matmul_grad(xr, wr, None, threshold, grad_output=g.double().numpy())[:2]
    X2, G2 = xr.reshape(-1, 40), g.float().numpy().reshape(-1, 24)
    naive_gx, naive_gw = _naive_grads(X2, wr, G2, threshold)
    naive_grads = (naive_gx.to(dtype).reshape(xt.shape), naive_gw.to(dtype))
    for fast_g, ref_g, naive_g in zip(kernel_grads, ref_grads, naive_grads):
        assert not MATMUL.check_with_naive(
            fast_g.float().numpy(), ref_g, naive_g.float().numpy()
        ).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_fallback_off_cpu_is_sync_free(monkeypatch, dtype):
    """The torch branch on a non-CPU device (CUDA without Triton, or float64 on CUDA) must not
    compact the outlier columns with nonzero (a host sync); emulated on CPU by making the
    device check say "not CPU" and nonzero raise."""
    from lowbit.fast.nn import Linear8bitLt

    assert F._gather_outliers(torch.zeros(1)) and not F._gather_outliers(
        torch.zeros(1, device="meta")
    )
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 7, 30)) * 2).astype(np.float32)
    x[..., [4, 17]] *= 8  # outlier columns
    w = (rng.standard_normal((11, 30)) * 0.1).astype(np.float32)
    b = rng.standard_normal(11).astype(np.float32)
    xt, wt, bt = (torch.from_numpy(a).to(dtype) for a in (x, w, b))
    lin = torch.nn.Linear(30, 11).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(wt)
        lin.bias.copy_(bt)
    mod = Linear8bitLt.from_linear(lin, threshold=6.0)

    def no_sync(*args, **kwargs):
        raise AssertionError("nonzero() called on the sync-free path")

    monkeypatch.setattr(F, "_gather_outliers", lambda t: False)
    monkeypatch.setattr(torch.Tensor, "nonzero", no_sync)
    monkeypatch.setattr(torch, "nonzero", no_sync)
    xr, wr, br = (t.numpy() for t in (xt, wt, bt))
    for variant in ("full", "dequantized"):
        y = F.matmul(xt, wt, bt, 6.0, variant)
        ref = R.matmul(xr, wr, br, 6.0, variant)
        naive = llm_int8_naive_matmul(xt, wt, bt, threshold=6.0, outlier_weights=variant)
        assert not MATMUL.check_with_naive(y.numpy(), ref, naive.numpy()).any()
    with torch.no_grad():
        y_mod = mod(xt)
    ref = R.matmul(xr, wr, br, 6.0, "dequantized")
    naive = llm_int8_naive_matmul(xt, wt, bt, threshold=6.0, outlier_weights="dequantized")
    assert not MATMUL.check_with_naive(y_mod.numpy(), ref, naive.numpy()).any()


@pytest.mark.gpu
def test_float64_linear_on_cuda_does_not_sync():
    # float64 on CUDA runs the torch branch (the kernels take 16/32-bit floats).
    from lowbit.fast.nn import Linear8bitLt

    lin = torch.nn.Linear(64, 32).cuda().double()
    mod = Linear8bitLt.from_linear(lin, threshold=6.0)
    x = torch.randn(16, 64, device="cuda", dtype=torch.float64)
    x[:, 5] *= 30
    with torch.no_grad():
        mod(x)  # warm-up outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = mod(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ref = R.matmul(
        x.cpu().numpy(),
        lin.weight.detach().cpu().numpy(),
        lin.bias.detach().cpu().numpy(),
        6.0,
        "dequantized",
    )
    naive = llm_int8_naive_matmul(
        x, lin.weight.detach(), lin.bias.detach(), outlier_weights="dequantized"
    )
    assert not MATMUL.check_with_naive(y.cpu().numpy(), ref, naive.cpu().numpy()).any()


@pytest.mark.parametrize(
    "m,k,n", [(1, 1, 2), (4, 1, 3), (3, 2, 5), (17, 33, 2), (1, 16, 1), (0, 5, 3), (4, 0, 3)]
)
def test_fast_int8_product_exact_on_cpu_edge_shapes(m, k, n):
    # torch._int_mm on CPU is wrong for K = 1 (uninitialised output): the fast path must not use it.
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    cx = rng.integers(-127, 128, (m, k)).astype(np.int8)
    cw = rng.integers(-127, 128, (n, k)).astype(np.int8)
    S = F._int8_product(torch.from_numpy(cx), torch.from_numpy(cw))
    np.testing.assert_array_equal(S.numpy(), cx.astype(np.int64) @ cw.astype(np.int64).T)
