"""NVFP4 block scaling (lowbit.reference.formats, lowbit.fast.formats) against independent
truth: ml_dtypes' E2M1 and E4M3 casts, exhaustive nearest-value search over each block's
grid, and the format's edge cases (zero, NaN and Inf blocks, underflowing scales, values beyond
float32, ragged tiles, 16-bit dtypes). The fast path's agreement bit for bit is the pair
tests' job (lowbit/fast/testing/pairs/formats.py); here both sides run the edge cases."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.fast import formats as F
from lowbit.reference import formats as R

E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def _both(fn_name, x, **kwargs):
    """The reference's and the fast path's result, as NumPy."""
    ref = getattr(R, fn_name)(x, **kwargs)
    fast = getattr(F, fn_name)(torch.from_numpy(np.asarray(x)), **kwargs)
    return ref, fast


def test_codes_are_ml_dtypes_casts_of_the_documented_steps():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((12, 64)) * np.exp(2 * rng.standard_normal((12, 1)))).astype(
        np.float32
    )
    codes, scales, g = R.encode_nvfp4(x)
    x64 = x.astype(np.float64)
    assert g == np.float32(448 * 6 / np.abs(x64).max())
    blocks = x64.reshape(12, 4, 16)
    amax = np.abs(blocks).max(-1)
    want_scales = ((float(g) * amax) / 6).astype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(scales, want_scales.view(np.uint8))
    s = want_scales.astype(np.float64)[..., None]
    want_codes = ((blocks * float(g)) / s).astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    assert np.array_equal(codes, want_codes.reshape(12, 64))
    # the block holding the tensor's amax uses the largest scale and element (448 and 6)
    i, j = np.unravel_index(np.abs(x64).argmax(), x.shape)
    assert scales[i, j // 16] == 0x7E and codes[i, j] & 0x7 == 7


@pytest.mark.parametrize("block_2d", [False, True])
def test_every_value_is_a_nearest_point_of_its_block_grid(block_2d):
    """Exhaustive oracle: the dequantized value is the closest of the 15 values v · s / g of
    its block (s its decoded scale), or saturates at ±6 s / g."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((35, 50)) * 3.0
    q, qf = _both("quantize_nvfp4", x, block_2d=block_2d)
    assert np.array_equal(q, qf.numpy())
    codes, scales, g = R.encode_nvfp4(x, block_2d=block_2d)
    s = R.decode(scales, R.E4M3FN, dtype=np.float64)
    per_value = (
        np.repeat(np.repeat(s, 16, 0), 16, 1)[:35, :50] if block_2d else np.repeat(s, 16, 1)[:, :50]
    )
    grid = np.concatenate([-E2M1_VALUES[::-1], E2M1_VALUES])  # (16,)
    candidates = grid[None, None, :] * per_value[..., None] / float(g)
    best = np.abs(x[..., None] - candidates).min(-1)
    assert np.all(np.abs(x - q) <= best * (1 + 1e-12) + 1e-300)


def test_2d_tiles_share_scales_between_a_weight_and_its_transpose():
    w = np.random.default_rng(2).standard_normal((40, 72)).astype(np.float32)
    c, s, g = R.encode_nvfp4(w, block_2d=True)
    ct, st, gt = R.encode_nvfp4(w.T, block_2d=True)
    assert s.shape == (3, 5) and g == gt
    assert np.array_equal(s, st.T) and np.array_equal(c, ct.T)
    fast = F.encode_nvfp4(torch.from_numpy(w), block_2d=True)
    assert np.array_equal(fast[0].numpy(), c) and np.array_equal(fast[1].numpy(), s)


def test_non_finite_blocks_decode_to_nan_and_leave_the_rest_alone():
    x = np.linspace(-3, 3, 64).reshape(2, 32)
    x[0, 3] = np.nan
    x[1, 20] = -np.inf
    clean = x.copy()
    clean[0, 3] = clean[1, 20] = 0.0
    for impl, arr in ((R, x), (F, torch.from_numpy(x))):
        codes, scales, g = impl.encode_nvfp4(arr)
        scales = np.asarray(scales)
        assert scales[0, 0] == scales[1, 1] == R.E4M3FN.nan_code
        assert float(g) == np.float32(448 * 6 / 3.0)  # the global scale ignores NaN and Inf
        q = np.asarray(impl.quantize_nvfp4(arr))
        assert np.isnan(q[0, :16]).all() and np.isnan(q[1, 16:]).all()
        assert np.isfinite(q[0, 16:]).all() and np.isfinite(q[1, :16]).all()
        assert np.array_equal(q[0, 16:], R.quantize_nvfp4(clean)[0, 16:])


def test_magnitudes_beyond_float32_make_a_nan_block_not_a_clamped_one():
    x = np.array([[1e300, 1.0] + [0.5] * 14 + [2.0] * 16])
    ref, fast = _both("quantize_nvfp4", x)
    assert np.isnan(ref[0, :16]).all() and np.isfinite(ref[0, 16:]).all()
    assert np.array_equal(ref, fast.numpy(), equal_nan=True)


def test_zero_empty_and_underflowing_blocks():
    for x in (np.zeros((3, 20), np.float32), np.zeros((0, 16), np.float32)):
        codes, scales, g = R.encode_nvfp4(x)
        assert g == 1.0 and not codes.any() and not scales.any()
        assert np.array_equal(R.quantize_nvfp4(x), x)
        assert np.array_equal(F.quantize_nvfp4(torch.from_numpy(x)).numpy(), x)
    # the second block's scale g * amax_b / 6 is below E4M3's smallest subnormal / 2: it
    # flushes to zero (scale code 0, zero codes) instead of dividing by zero
    x = np.array([[1.0] * 16 + [1e-7] * 16], dtype=np.float32)
    ref, fast = _both("encode_nvfp4", x)
    assert ref[1][0, 1] == 0 and not ref[0][0, 16:].any()
    assert np.array_equal(ref[1], fast[1].numpy())
    assert np.array_equal(R.quantize_nvfp4(x)[0, 16:], np.zeros(16, np.float32))


def test_tiny_tensors_clamp_the_global_scale_to_float32():
    x = np.full((1, 16), 1e-40)  # 2688 / 1e-40 overflows float32
    codes, scales, g = R.encode_nvfp4(x)
    assert g == np.finfo(np.float32).max
    q = R.quantize_nvfp4(x)
    assert np.all(np.isfinite(q))
    assert np.array_equal(q, F.quantize_nvfp4(torch.from_numpy(x)).numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_16_and_32_bit_inputs_come_back_in_their_dtype_via_float32(dtype):
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(3)).to(dtype)
    q = F.quantize_nvfp4(x)
    assert q.dtype == dtype
    codes, scales, g = F.encode_nvfp4(x)
    f32 = F.decode_nvfp4(codes, scales, g, dtype=torch.float32)
    assert torch.equal(q, f32.to(dtype))
    ref = R.quantize_nvfp4(x.float().numpy())  # the same values through the reference
    assert torch.equal(q, torch.from_numpy(ref).to(dtype))


def test_given_global_scale_is_used_and_bad_arguments_get_one_line_errors():
    x = np.random.default_rng(4).standard_normal((2, 32))
    codes, scales, g = R.encode_nvfp4(x, global_scale=100.0)
    assert g == np.float32(100.0)
    for bad in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="global_scale"):
            R.encode_nvfp4(x, global_scale=bad)
        with pytest.raises(ValueError, match="global_scale"):
            F.encode_nvfp4(torch.from_numpy(x), global_scale=bad)
    for impl, arr in ((R, x[0]), (F, torch.from_numpy(x[0]))):
        with pytest.raises(ValueError, match="block_2d needs"):
            impl.encode_nvfp4(arr, block_2d=True)
    with pytest.raises(ValueError, match="scales shape"):
        R.decode_nvfp4(codes, scales[:, :1], g)
    with pytest.raises(ValueError, match="scales shape"):
        F.decode_nvfp4(torch.from_numpy(codes), torch.from_numpy(scales[:, :1]), float(g))
    with pytest.raises(ValueError, match="cannot quantize"):
        F.encode_nvfp4(torch.zeros(4, dtype=torch.complex64))


def test_the_fast_e2m1_boundary_count_is_encode_on_every_tie_and_neighbour():
    bounds = torch.tensor(
        [0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0], dtype=torch.float64
    )
    near = torch.cat(
        [bounds, torch.nextafter(bounds, bounds + 1), torch.nextafter(bounds, bounds - 1)]
    )
    q = torch.cat([near, -near, torch.randn(1000, dtype=torch.float64) * 4, torch.tensor([1e300])])
    assert torch.equal(F._e2m1_codes(q), F.encode(q, R.E2M1FN, saturate=True))
