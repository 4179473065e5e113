"""The uniform integer quantizer (lowbit.{reference,fast}.uniform) against independent truths.

The reference/fast agreement itself is the pair tests' job (lowbit/fast/testing/pairs/uniform.py). Here:
hand-derived codes, an exact-arithmetic oracle that loops over rows and groups and picks the
nearest code by brute force, the plain-torch baseline the module replaces, torch's own
fake-quantization where its conventions coincide, zero rows, short last groups, shapes and
dtypes, and the one-line errors.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit.fast import uniform as F
from lowbit.reference import uniform as R
from tests.harness import to_numpy, to_torch

BF16 = np.dtype(ml_dtypes.bfloat16)


def both(fn_name: str, x, *args, **kwargs):
    """Call the reference on NumPy x and the fast path on torch x; NumPy results of both."""
    ref = getattr(R, fn_name)(x, *args, **kwargs)
    fast = getattr(F, fn_name)(*to_torch((x, *args)), **to_torch(kwargs))
    return ref, to_numpy(fast)


def assert_same(a, b) -> None:
    """Equal arrays of equal dtype, bit for bit (signs of zero included); None == None."""
    if a is None or b is None:
        assert a is None and b is None, (a, b)
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    if a.dtype.kind in "iub":
        np.testing.assert_array_equal(a, b)
    else:
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        np.testing.assert_array_equal(a64, b64)
        np.testing.assert_array_equal(np.signbit(a64), np.signbit(b64))


# ---------------------------------------------------------------------------------------------
# hand-derived cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_symmetric_4bit_exact_scale_ties_to_even(dtype):
    # 4 bits symmetric: Q = 2^3 - 1 = 7; absmax = 7 -> s = 7/7 = 1 exactly, so x/s = x and
    # every .5 is an exact tie: -3.5 -> -4, 0.5 -> 0, 2.5 -> 2, 1.5 -> 2 (to even); 7, -7 exact.
    x = np.array([[-3.5, 0.5, 7.0, 2.5, -7.0, 1.5]], dtype=dtype)
    for codes, s, z in both("encode", x, 4):
        assert_same(codes, np.array([[-4, 0, 7, 2, -7, 2]], dtype=np.int8))
        assert_same(s, np.array([[1.0]], dtype=dtype))
        assert z is None
    for xq in both("quantize", x, 4):
        assert_same(xq, np.array([[-4.0, 0.0, 7.0, 2.0, -7.0, 2.0]], dtype=dtype))


def test_row_minus1_half_2_at_4_bits():
    # Symmetric, Q = 7, absmax = 2, s = 2/7: x/s = [-3.5, 1.75, 7] in exact arithmetic.
    # float64: fl(2/7) < 2/7 and -1/fl(2/7) rounds back to exactly -3.5 -> tie -> -4 (even).
    # float32: fl32(2/7) = 0.2857143 > 2/7, so -1/s = -3.4999998 -> -3; 0.5/s = 1.7499999 -> 2;
    # 2/s = 6.9999995 -> 7. The working precision decides which side of the tie x lies on.
    assert Fraction(float(np.float32(2) / np.float32(7))) > Fraction(2, 7)
    x = np.array([[-1.0, 0.5, 2.0]])
    for codes, s, _ in both("encode", x, 4):
        assert_same(codes, np.array([[-4, 2, 7]], dtype=np.int8))
        assert_same(s, np.array([[2.0 / 7.0]]))
    for codes, s, _ in both("encode", x.astype(np.float32), 4):
        assert_same(codes, np.array([[-3, 2, 7]], dtype=np.int8))
        assert_same(s, np.array([[2.0 / 7.0]], dtype=np.float32))
    # Asymmetric, 2^4 - 1 = 15 steps over [min(-1, 0), max(2, 0)] = [-1, 2]: s = fl32(3/15) =
    # fl32(0.2) = 0.2000000030; z = rint(1/s) = rint(4.99999993) = 5; x/s = [-4.9999999,
    # 2.4999999, 9.9999998] -> rint [-5, 2, 10] -> + z -> codes [0, 7, 15].
    for codes, s, z in both("encode", x.astype(np.float32), 4, symmetric=False):
        assert_same(codes, np.array([[0, 7, 15]], dtype=np.uint8))
        assert_same(s, np.array([[0.2]], dtype=np.float32))
        assert_same(z, np.array([[5]], dtype=np.int32))
    # dequantized: (q - z) * s = [-5, 2, 10] * 0.2 in float32
    for xq in both("quantize", x.astype(np.float32), 4, symmetric=False):
        assert_same(xq, (np.array([[-5, 2, 10]], dtype=np.float32) * np.float32(0.2)))


def test_asymmetric_hand_cases_zero_in_range():
    # 4 bits, [-5, 10]: s = 15/15 = 1, z = rint(5/1) = 5; x/s = x -> rint: -5, 0 (0.5 tie to
    # even), 2 (1.5 to even), 10, -2 (-2.5 to even) -> + 5: [0, 5, 7, 15, 3].
    x = np.array([[-5.0, 0.5, 1.5, 10.0, -2.5]], dtype=np.float32)
    for codes, s, z in both("encode", x, 4, symmetric=False):
        assert_same(codes, np.array([[0, 5, 7, 15, 3]], dtype=np.uint8))
        assert_same(s, np.array([[1.0]], dtype=np.float32))
        assert_same(z, np.array([[5]], dtype=np.int32))
    # positive row, 2 bits: the range is [0, 3] (0 included), s = 3/3 = 1, z = 0: codes = x.
    # negative row: range [-3, 0], s = 1, z = 3: -3 -> 0, -1 -> 2.
    for row, want_codes, want_z in [([1.0, 2.0, 3.0], [1, 2, 3], 0), ([-3.0, -1.0], [0, 2], 3)]:
        x = np.array([row], dtype=np.float32)
        for codes, s, z in both("encode", x, 2, symmetric=False):
            assert_same(codes, np.array([want_codes], dtype=np.uint8))
            assert_same(s, np.array([[1.0]], dtype=np.float32))
            assert_same(z, np.array([[want_z]], dtype=np.int32))
        for xq in both("quantize", x, 2, symmetric=False):
            assert_same(xq, x)  # every value lies on the grid


def test_clip_ratio_saturates_the_largest_values():
    # 3 bits symmetric (Q = 3), absmax 6, clip 0.5: s = 0.5 * 6 / 3 = 1; 6 -> clamp(6) = 3,
    # -4.5 -> clamp(-4) = -3, 2.5 -> 2 (tie to even), 1 -> 1.
    x = np.array([[6.0, -4.5, 2.5, 1.0]], dtype=np.float32)
    for codes, s, _ in both("encode", x, 3, clip_ratio=0.5):
        assert_same(codes, np.array([[3, -3, 2, 1]], dtype=np.int8))
        assert_same(s, np.array([[1.0]], dtype=np.float32))
    # asymmetric 2 bits, [-2, 4] * 0.5 = [-1, 2]: s = 3/3 = 1, z = 1; 4 -> 4+1 -> 3 (clamped),
    # -2 -> -2+1 -> 0 (clamped), 1 -> 2.
    x = np.array([[4.0, -2.0, 1.0]], dtype=np.float32)
    for codes, s, z in both("encode", x, 2, symmetric=False, clip_ratio=0.5):
        assert_same(codes, np.array([[3, 0, 2]], dtype=np.uint8))
        assert_same(s, np.array([[1.0]], dtype=np.float32))
        assert_same(z, np.array([[1]], dtype=np.int32))


# ---------------------------------------------------------------------------------------------
# exact oracle: loops over rows and groups, Fractions, nearest code by brute force
# ---------------------------------------------------------------------------------------------


def _round_to(value: Fraction, wdt: np.dtype) -> float:
    """Round an exact result of ONE operation on working-precision operands to ``wdt``.

    Fraction -> float64 is correctly rounded; for float32, rounding that float64 again to
    float32 is innocuous because 53 >= 2 * 24 + 2 (double rounding cannot go wrong for a single
    +, -, *, / of float32 operands).
    """
    v = float(value)
    return float(np.float32(v)) if wdt == np.float32 else v


def _nearest_code(t: float, lo: int, hi: int, z: int) -> int:
    """argmin over every code q in [lo, hi] of |t - (q - z)|, ties to even (q - z)."""
    q = np.arange(lo, hi + 1)
    dist = np.abs(np.float64(t) - (q - z).astype(np.float64))  # exact: small integers
    best = q[dist == dist.min()]
    if best.size == 2:
        best = best[(best - z) % 2 == 0]
    assert best.size == 1
    return int(best[0])


def oracle_encode(x: np.ndarray, bits: int, symmetric: bool, G: int | None, clip: float):
    """Per-row (G None) or per-group encode of a 2-D array, one group at a time."""
    wdt = np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)
    xw = x.astype(np.float64)  # exact copy of every value
    rows, n = x.shape
    width = n if G is None else G
    c = Fraction(float(np.asarray(clip, dtype=wdt)))
    codes = np.zeros((rows, n), dtype=np.int64)
    scales, zeros = [], []
    for i in range(rows):
        s_row, z_row = [], []
        for start in range(0, max(n, 1), width):
            group = [Fraction(float(v)) for v in xw[i, start : start + width]]
            if symmetric:
                Q = 2 ** (bits - 1) - 1
                absmax = max([abs(v) for v in group], default=Fraction(0))
                s = _round_to(Fraction(_round_to(c * absmax, wdt)) / Q, wdt)
                lo, hi, z = -Q, Q, 0
            else:
                Q = 2**bits - 1
                x_min = _round_to(c * min(group + [Fraction(0)]), wdt)
                x_max = _round_to(c * max(group + [Fraction(0)]), wdt)
                span = _round_to(Fraction(x_max) - Fraction(x_min), wdt)
                s = _round_to(Fraction(span) / Q, wdt)
                s_div = s if s != 0 else 1.0
                t_z = _round_to(-Fraction(x_min) / Fraction(s_div), wdt)
                z = min(max(round(t_z), 0), Q)  # Python's round: half to even
                lo, hi = 0, Q
            s_div = s if s != 0 else 1.0
            for j, v in enumerate(group):
                t = _round_to(v / Fraction(s_div), wdt)  # the quotient x / s in wdt
                codes[i, start + j] = _nearest_code(t, lo, hi, z)
            s_row.append(s)
            z_row.append(z)
        scales.append(s_row[: 1 if G is None else -(-n // G)])
        zeros.append(z_row[: 1 if G is None else -(-n // G)])
    return codes, np.array(scales, dtype=wdt), np.array(zeros, dtype=np.int64)


@st.composite
def oracle_cases(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8, 16]))
    dtype = draw(st.sampled_from([np.float16, BF16, np.float32, np.float64]))
    max_side = 4 if bits == 16 else 12
    rows, n = draw(st.integers(1, max_side)), draw(st.integers(1, 3 * max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((rows, n)) * 10.0 ** draw(st.integers(-2, 2))
    if draw(st.booleans()):  # on a half-step grid: real ties
        x = np.round(x * 4) / 4
    if draw(st.booleans()):
        x[rng.integers(0, rows)] = 0.0
    if draw(st.booleans()):
        x = np.abs(x)  # one-signed rows: the asymmetric range is extended to 0
    G = draw(st.one_of(st.none(), st.integers(1, n + 2)))
    clip = draw(st.sampled_from([1.0, 0.8, 0.37]))
    return x.astype(dtype), bits, draw(st.booleans()), G, clip


@given(oracle_cases())
def test_encode_and_quantize_match_the_exact_oracle(case):
    x, bits, symmetric, G, clip = case
    kwargs = {"symmetric": symmetric, "clip_ratio": clip}
    kwargs |= {"granularity": "group", "group_size": G} if G else {"granularity": "channel"}
    want_q, want_s, want_z = oracle_encode(x, bits, symmetric, G, clip)
    for codes, s, z in both("encode", x, bits, **kwargs):
        np.testing.assert_array_equal(codes.astype(np.int64), want_q)
        assert_same(s, want_s)
        if symmetric:
            assert z is None
        else:
            np.testing.assert_array_equal(z, want_z)
    # values: (q - z) * s rounded once to the working precision, then to x's dtype
    wdt = want_s.dtype
    s_el = np.repeat(want_s, G or x.shape[1], axis=1)[:, : x.shape[1]]
    z_el = np.repeat(want_z, G or x.shape[1], axis=1)[:, : x.shape[1]]
    want_v = np.vectorize(lambda q, s: _round_to(Fraction(int(q)) * Fraction(float(s)), wdt))(
        want_q - z_el, s_el
    )
    for xq in both("quantize", x, bits, **kwargs):
        assert_same(xq, want_v.astype(wdt).astype(x.dtype))


def _near_ties(seed: int, bits: int, shape=(113, 203)) -> np.ndarray:
    """float32 rows whose x/s lie within an ulp of k + 1/2 (s = absmax / Q is not a power of
    two): the codes there depend on the last bit of the quotient."""
    rng = np.random.default_rng(seed)
    Q = 2 ** (bits - 1) - 1
    absmax = rng.uniform(0.5, 2.0, size=(shape[0], 1))
    k = rng.integers(-Q, Q, size=shape) + 0.5  # real ties k + 1/2 in [-Q + 1/2, Q - 1/2]
    x = (k * (absmax / Q)).astype(np.float32)
    x[:, :1] = absmax.astype(np.float32)  # the row absmax itself
    return x


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_codes_come_from_the_correctly_rounded_quotient(bits):
    # x / s rounded once to float32, then rint: computed here in float64 (53 >= 2 * 24 + 2, so
    # rounding the float64 quotient to float32 is the correctly rounded float32 quotient).
    x = _near_ties(bits, bits)
    Q = 2 ** (bits - 1) - 1
    s = (np.abs(x).max(axis=1, keepdims=True).astype(np.float64) / Q).astype(np.float32)
    t = (x.astype(np.float64) / s.astype(np.float64)).astype(np.float32)
    want = np.clip(np.rint(t), -Q, Q).astype(np.int8)
    for codes, scale, _ in both("encode", x, bits):
        assert_same(scale, s)
        assert_same(codes, want)
    # the data is sharp enough to tell a division from a multiplication by 1/s
    recip = np.clip(np.rint(x * (np.float32(1) / s)), -Q, Q).astype(np.int8)
    assert (recip != want).any()
    # and the float64 path rounds the float64 quotient (exact Fractions on a corner)
    x64 = x[:20, :30].astype(np.float64) * (1 + 2.0**-40)
    codes, scale, _ = R.encode(x64, bits)
    for i, j in [(i, j) for i in range(20) for j in range(30)]:
        t64 = float(Fraction(float(x64[i, j])) / Fraction(float(scale[i, 0])))
        assert codes[i, j] == min(max(round(t64), -Q), Q)
    assert_same(F.encode(torch.from_numpy(x64), bits)[0].numpy(), codes)


# ---------------------------------------------------------------------------------------------
# the plain-torch baseline this module replaces, and torch's own fake quantization
# ---------------------------------------------------------------------------------------------


def _outlier_weights(seed: int, shape=(113, 203), dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.05
    w[:, torch.randint(0, shape[1], (3,), generator=g)] *= 30.0  # outlier input columns
    return w.to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_per_channel_is_the_torch_round_baseline(bits, dtype):
    w = _outlier_weights(bits, dtype=dtype)
    qmax = 2 ** (bits - 1) - 1
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = absmax / qmax
    base_codes = torch.round(w / scale).clamp(-qmax, qmax)
    baseline = base_codes * scale
    codes, s, z = F.encode(w, bits)
    assert z is None and torch.equal(s, scale)
    assert torch.equal(codes.to(dtype), base_codes)
    assert torch.equal(F.quantize(w, bits), baseline)
    assert torch.equal(torch.from_numpy(R.quantize(w.numpy(), bits)), baseline)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_the_float32_baseline_rounded_once(dtype):
    w = _outlier_weights(7, dtype=dtype)
    w32 = w.float()
    scale = w32.abs().amax(dim=1, keepdim=True) / 7
    baseline = (torch.round(w32 / scale).clamp(-7, 7) * scale).to(dtype)
    out = F.quantize(w, 4)
    assert out.dtype == dtype and torch.equal(out, baseline)
    assert torch.equal(to_torch(R.quantize(to_numpy(w), 4)), baseline)


def test_per_tensor_is_the_report_per_tensor_int8_baseline():
    # fast/report.py's LLM.int8() per-tensor row: scale = amax / 127, round, clamp, rescale
    w = _outlier_weights(3)
    amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    baseline = torch.round(w / scale).clamp(-127, 127) * scale
    out = F.quantize(w, 8, granularity="tensor")
    assert torch.equal(out, baseline)
    assert F.encode(w, 8, granularity="tensor")[1].shape == (1, 1)


def _power_of_two_rows(seed: int, bits: int, symmetric: bool, rows: int = 37, n: int = 65):
    """Rows whose scale is an exact power of two (so 1/s is exact and torch's reciprocal
    multiply agrees with division), on a quarter-step grid (exact ties), with their s and z."""
    rng = np.random.default_rng(seed)
    k = rng.integers(-6, 4, size=(rows, 1)).astype(np.float64)
    step = 2.0**k  # (rows, 1)  the scale
    if symmetric:
        Q = 2 ** (bits - 1) - 1
        grid = rng.integers(-4 * Q, 4 * Q + 1, size=(rows, n)) / 4.0
        grid[:, 0] = rng.choice([-Q, Q], size=rows)  # absmax = Q * step
        z = np.zeros((rows, 1), dtype=np.int64)
    else:
        Q = 2**bits - 1
        z = rng.integers(0, Q + 1, size=(rows, 1))  # x_min = -z * step, x_max = (Q - z) * step
        grid = rng.integers(0, 4 * Q + 1, size=(rows, n)) / 4.0 - z
        grid[:, 0], grid[:, 1] = -z[:, 0], Q - z[:, 0]
    return grid * step, step, z


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_torch_fake_quantize_per_channel_on_power_of_two_scales(bits, symmetric):
    # torch computes zero_point + nearbyint(x * (1/s)), clamps to [quant_min, quant_max] and
    # returns (q - z) * s: our convention, once 1/s is exact (s a power of two).
    x64, step, z = _power_of_two_rows(bits, bits, symmetric)
    Q = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    lo = -Q if symmetric else 0
    for dtype in (torch.float32, torch.float64):
        x = torch.from_numpy(x64).to(dtype)
        codes, s, zp = F.encode(x, bits, symmetric=symmetric)
        assert torch.equal(s, torch.from_numpy(step).to(dtype))
        if not symmetric:
            assert torch.equal(zp, torch.from_numpy(z).to(torch.int32))
        want = torch.fake_quantize_per_channel_affine(
            x.float(), s.flatten().float(), torch.from_numpy(z).flatten().int(), 0, lo, Q
        )
        assert torch.equal(F.quantize(x, bits, symmetric=symmetric).float(), want)
        ref = R.quantize(x.numpy(), bits, symmetric=symmetric)
        assert torch.equal(torch.from_numpy(ref).float(), want)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_codes_match_torch_quantize_per_channel_where_conventions_coincide():
    # torch.quantize_per_channel rounds (x/s + z) rather than x/s and then adds z: the two
    # agree except on ties with an odd zero point. qint8 (z = 0): identical everywhere.
    x64, step, _ = _power_of_two_rows(11, 8, True)
    x = torch.from_numpy(x64).float()
    codes, s, _ = F.encode(x, 8)
    tq = torch.quantize_per_channel(
        x, s.flatten().double(), torch.zeros(len(s)).long(), 0, torch.qint8
    )
    assert torch.equal(codes, tq.int_repr())
    # quint8 with even zero points: identical (x/s + z is a tie exactly when x/s is)
    x64, step, z = _power_of_two_rows(12, 8, False)
    even = (z % 2 == 0)[:, 0]
    x = torch.from_numpy(x64[even]).float()
    codes, s, zp = F.encode(x, 8, symmetric=False)
    tq = torch.quantize_per_channel(x, s.flatten().double(), zp.flatten().long(), 0, torch.quint8)
    assert torch.equal(codes, tq.int_repr())
    # the documented difference: z = 3 and x/s = 0.5: ours rint(0.5) + 3 = 3, torch's rint(3.5) = 4
    x = torch.tensor([[-3.0, 0.5, 252.0]])  # range [-3, 252]: s = 255/255 = 1, z = 3
    codes, s, zp = F.encode(x, 8, symmetric=False)
    assert s.item() == 1.0 and zp.item() == 3 and codes[0, 1].item() == 3
    tq = torch.quantize_per_channel(x, s.flatten().double(), zp.flatten().long(), 0, torch.quint8)
    assert tq.int_repr()[0, 1].item() == 4


# ---------------------------------------------------------------------------------------------
# zero rows, short groups, shapes and dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "granularity,group_size", [("tensor", None), ("channel", None), ("group", 4)]
)
def test_zero_rows_give_zero_codes_and_no_nan(symmetric, granularity, group_size):
    x = np.array(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [-0.0, 0.0, -0.0, -0.0, 0.0, 0.0],
            [1.0, -2.0, 0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
    if granularity == "tensor":
        x = x[:2]  # an all-zero tensor
    kwargs = {"symmetric": symmetric, "granularity": granularity, "group_size": group_size}
    for codes, s, z in both("encode", x, 4, **kwargs):
        zero_scale = s == 0
        assert zero_scale.any()
        assert not np.signbit(s).any()  # +0, whatever the signs of the zeros in x
        s_el = np.repeat(s, group_size, axis=-1)[..., :6] if group_size else s
        in_zero_scale = np.broadcast_to(s_el == 0, codes.shape)
        assert (codes[in_zero_scale] == 0).all()
        if not symmetric:
            assert (z[zero_scale] == 0).all()
    for xq in both("quantize", x, 4, **kwargs):
        assert np.isfinite(xq).all() and not np.signbit(xq[in_zero_scale]).any()
        assert (xq[in_zero_scale] == 0).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_scale_that_underflows_to_zero_gives_zero_codes(symmetric):
    # absmax = 2^-149 (the smallest float32): s = absmax / Q rounds to 0; dividing by s would
    # give Inf codes (saturated to the top code), dividing by 1 gives the code of 0.
    x = np.array([[2.0**-149, -(2.0**-149), 0.0], [1.0, 0.5, -1.0]], dtype=np.float32)
    for codes, s, z in both("encode", x, 8, symmetric=symmetric):
        assert s[0, 0] == 0 and s[1, 0] > 0
        assert (codes[0] == (0 if symmetric else z[0, 0])).all() and (z is None or z[0, 0] == 0)
    for xq in both("quantize", x, 8, symmetric=symmetric):
        assert (xq[0] == 0).all() and not np.signbit(xq[0]).any()


@pytest.mark.parametrize("symmetric", [True, False])
def test_short_last_group_uses_only_its_own_elements(symmetric):
    # n = 10, G = 4: groups [0:4], [4:8], [8:10]; the last group holds only 0.3 and 0.6.
    x = np.array([[100.0, 1, 2, 3, -50.0, 4, 5, 6, 0.3, 0.6]], dtype=np.float32)
    Q = 7 if symmetric else 15
    for codes, s, _ in both("encode", x, 4, symmetric=symmetric, granularity="group", group_size=4):
        assert s.shape == (1, 3)
        assert s[0, 2] == np.float32(0.6) / np.float32(Q)  # range [0, 0.6] either way
        assert codes[0, 9] == Q  # 0.6 is the top of its own group's grid
    # against an explicit loop over groups
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 23)).astype(np.float32) * rng.uniform(0.1, 10, (9, 1))
    for G in (1, 5, 7, 22, 23, 40):
        for codes, s, z in both(
            "encode", x, 5, symmetric=symmetric, granularity="group", group_size=G
        ):
            for g, start in enumerate(range(0, 23, G)):
                part = x[:, start : start + G]
                c2, s2, z2 = R.encode(part, 5, symmetric=symmetric)
                assert_same(s[:, g : g + 1], s2)
                assert_same(codes[:, start : start + G], c2)
                assert_same(None if z is None else z[:, g : g + 1], z2)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "shape", [(7,), (5, 9), (2, 3, 17), (0,), (0, 9), (4, 0), (2, 0, 5), (3, 4, 0)]
)
def test_scale_shapes_and_dtypes(shape, symmetric):
    x = np.ones(shape, dtype=np.float32)
    n = shape[-1]
    cases = {
        ("tensor", None): (1,) * len(shape),
        ("channel", None): (*shape[:-1], 1),
        ("token", None): (*shape[:-1], 1),
        ("group", 4): (*shape[:-1], math.ceil(n / 4)),
    }
    for (granularity, G), want in cases.items():
        for bits, x_dtype in [(4, np.float32), (16, np.float64), (8, np.float16)]:
            xx = x.astype(x_dtype)
            kw = {"symmetric": symmetric, "granularity": granularity, "group_size": G}
            for codes, s, z in both("encode", xx, bits, **kw):
                assert codes.shape == shape and s.shape == want
                code_dtype = {(True, 4): np.int8, (True, 8): np.int8, (True, 16): np.int16}
                code_dtype |= {(False, 4): np.uint8, (False, 8): np.uint8, (False, 16): np.int32}
                assert codes.dtype == code_dtype[(symmetric, bits)]
                assert s.dtype == (np.float64 if x_dtype == np.float64 else np.float32)
                assert z is None if symmetric else (z.dtype == np.int32 and z.shape == want)
                for value_dtype, dtype in [(np.float32, None), (np.float64, np.float64)]:
                    for v in both("decode", codes, s, z, group_size=G, dtype=dtype):
                        assert v.shape == shape and v.dtype == value_dtype
            for xq in both("quantize", xx, bits, **kw):
                assert xq.shape == shape and xq.dtype == xx.dtype
                if xx.size:  # ones: top of every grid (the asymmetric range is [0, 1])
                    assert (xq == 1).all()


@pytest.mark.parametrize("dtype", [np.float16, BF16])
def test_decode_float64_to_16_bits_rounds_through_float32(dtype):
    # v = 1 + 2^-11 + 2^-30 lies just above the tie between 1 and the next float16 / bfloat16
    # value; rounded directly it goes up, through float32 (where it becomes the tie itself) it
    # goes to the even neighbour 1. torch's casts take the second route; lowbit follows it.
    eps = 2.0**-10 if dtype == np.float16 else 2.0**-7
    v = 1 + eps / 2 + 2.0**-30
    assert np.array(v).astype(dtype).astype(np.float64) == 1 + eps  # direct: up
    codes, scale = np.ones((1, 1), dtype=np.int8), np.array([[v]])
    for out in both("decode", codes, scale, dtype=dtype):
        assert_same(out, np.ones((1, 1), dtype=dtype))


def test_decode_of_fast_codes_keeps_the_device_and_bf16_dtype():
    x = _outlier_weights(1, shape=(16, 40), dtype=torch.bfloat16)
    codes, s, z = F.encode(x, 4, symmetric=False, granularity="group", group_size=16)
    v = F.decode(codes, s, z, group_size=16, dtype=torch.bfloat16)
    assert v.dtype == torch.bfloat16 and v.device == x.device
    assert torch.equal(v, F.quantize(x, 4, symmetric=False, granularity="group", group_size=16))


# ---------------------------------------------------------------------------------------------
# errors: one line, the same on both sides
# ---------------------------------------------------------------------------------------------

X = np.array([[1.0, -2.0, 3.0]], dtype=np.float32)
BAD_ENCODE_CALLS = [
    ((X,), {"granularity": "row"}, ValueError, "granularity must be one of"),
    ((X,), {"granularity": "group"}, ValueError, "needs group_size"),
    ((X,), {"group_size": 32}, ValueError, "only used with granularity='group'"),
    ((X,), {"granularity": "group", "group_size": 0}, ValueError, "positive int"),
    ((X,), {"granularity": "group", "group_size": 2.5}, TypeError, "positive int"),
    ((X, 1), {}, ValueError, "bits must be from 2 to 16"),
    ((X, 17), {}, ValueError, "bits must be from 2 to 16"),
    ((X, True), {}, TypeError, "bits must be an int"),
    ((X, 4.0), {}, TypeError, "bits must be an int"),
    ((X,), {"clip_ratio": 0.0}, ValueError, "clip_ratio must lie in (0, 1]"),
    ((X,), {"clip_ratio": 1.5}, ValueError, "clip_ratio must lie in (0, 1]"),
    ((X,), {"clip_ratio": float("nan")}, ValueError, "clip_ratio must lie in (0, 1]"),
    ((X,), {"symmetric": "yes"}, TypeError, "symmetric must be True or False"),
    ((np.array([[1.0, np.nan, np.inf]]),), {}, ValueError, "x has 2 non-finite values"),
    ((np.array([[np.inf]]),), {"symmetric": False}, ValueError, "x has 1 non-finite values"),
    ((np.array([[1, 2]]),), {}, ValueError, "x must be floating point"),
    ((np.array(1.0, dtype=np.float32),), {}, ValueError, "at least one dimension"),
    ((np.array([[-3e38, 3e38]], dtype=np.float32),), {"symmetric": False}, ValueError, "overflows"),
]


@pytest.mark.parametrize("fn", ["encode", "quantize"])
@pytest.mark.parametrize("args,kwargs,exc,text", BAD_ENCODE_CALLS)
def test_bad_arguments_raise_the_same_one_line_error(fn, args, kwargs, exc, text):
    with pytest.raises(exc) as ref_err:
        getattr(R, fn)(*args, **kwargs)
    with pytest.raises(exc) as fast_err:
        getattr(F, fn)(*to_torch(args), **kwargs)
    assert text in str(ref_err.value) and "\n" not in str(ref_err.value)
    assert str(fast_err.value) == str(ref_err.value)


CODES, SCALE, ZP = R.encode(np.ones((2, 6), dtype=np.float32), 4, symmetric=False)
BAD_DECODE_CALLS = [
    ((CODES.astype(np.float32), SCALE), {}, "codes must be integers"),
    ((CODES, SCALE.astype(np.int32)), {}, "scale must be floating point"),
    ((CODES, np.ones((2, 2), np.float32)), {}, "does not broadcast"),
    ((CODES, SCALE), {"group_size": 4}, "expected (2, 2) for group_size=4"),
    ((CODES, SCALE, ZP.astype(np.float32)), {}, "zero_point must be integers"),
    ((CODES, SCALE, np.zeros((2, 6), np.int32)), {}, "zero_point must be integers"),
    ((CODES, SCALE), {"dtype": np.int32}, "dtype must be floating point"),
]


@pytest.mark.parametrize("args,kwargs,text", BAD_DECODE_CALLS)
def test_bad_decode_arguments_raise_the_same_one_line_error(args, kwargs, text):
    with pytest.raises(ValueError) as ref_err:
        R.decode(*args, **kwargs)
    with pytest.raises(ValueError) as fast_err:
        F.decode(*to_torch(args), **kwargs)
    assert text in str(ref_err.value) and "\n" not in str(ref_err.value)
    assert str(fast_err.value) == str(ref_err.value)


@pytest.mark.parametrize("fn", ["encode", "quantize"])
def test_fast_path_rejects_numpy_with_a_hint(fn):
    with pytest.raises(TypeError, match=r"x must be a torch tensor.*torch\.as_tensor\(x\)"):
        getattr(F, fn)(X)
    with pytest.raises(TypeError, match=r"codes must be a torch tensor.*torch\.as_tensor\(codes\)"):
        F.decode(CODES, torch.from_numpy(SCALE))


@pytest.mark.parametrize("mod", [R, F], ids=["reference", "fast"])
def test_static_scale_is_used_and_out_of_range_values_clamp(mod):
    """A calibrated per-tensor scale (absmax 2 at 8 bits: s = 2/127) applied to new data:
    3.0 lies outside the calibrated range and clamps to 127; -1.0 is -63.5 steps, a tie that
    goes to the even code -64; asymmetric with s = 1/255 * 4, z = 128 (range [-2, 2])."""
    calib = np.array([[2.0, -0.5]], dtype=np.float32)
    x = np.array([[3.0, -1.0, 0.0]], dtype=np.float32)
    wrap = (lambda a: torch.from_numpy(a)) if mod is F else (lambda a: a)
    _, s, _ = mod.encode(wrap(calib), 8, granularity="tensor")
    codes, s_out, z = mod.encode(wrap(x), 8, granularity="tensor", scale=s)
    assert np.asarray(codes).tolist() == [[127, -64, 0]] and z is None
    assert float(np.asarray(s_out).reshape(())) == np.float32(2.0) / np.float32(127.0)
    s_a = np.full((1, 1), 4.0 / 255.0, dtype=np.float32)
    z_a = np.full((1, 1), 128, dtype=np.int32)
    codes_a, _, _ = mod.encode(
        wrap(x), 8, symmetric=False, granularity="tensor", scale=wrap(s_a), zero_point=wrap(z_a)
    )
    # 3 / s = 191.25 -> 191 + 128 = 319 -> clamps to 255; -1 / s = -63.75 -> -64 + 128 = 64
    assert np.asarray(codes_a).tolist() == [[255, 64, 128]]
    with pytest.raises(ValueError, match="needs zero_point"):
        mod.encode(wrap(x), 8, symmetric=False, granularity="tensor", scale=wrap(s_a))
    with pytest.raises(ValueError, match=r"scale must be a float array of shape \(1, 1\)"):
        mod.encode(wrap(x), 8, granularity="channel", scale=wrap(np.ones((2, 1), np.float32)))
    with pytest.raises(ValueError, match="clip_ratio applies when scales are computed"):
        mod.encode(wrap(x), 8, granularity="tensor", scale=s, clip_ratio=0.5)
