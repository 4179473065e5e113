"""Triton kernels for the formats against the reference, bit for bit.

``interpret`` tests call the kernels directly on CPU tensors under ``TRITON_INTERPRET=1`` (set
by conftest). The interpreter pays per program, so every launch is one big program over tens of
thousands of elements. ``gpu`` tests run the fast path on CUDA (which dispatches to the
kernels) natively; they are skipped without a CUDA device.
"""

from __future__ import annotations

import itertools
import os

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.fast.testing.strategies import random_fp32
from lowbit.reference import formats as R
from tests.harness import to_numpy, to_torch

kf = pytest.importorskip("lowbit.kernels.formats")

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")

# The interpret tests hand CPU tensors to the kernels: only the interpreter runs those.
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="kernels on CPU tensors need TRITON_INTERPRET=1 (the native run is `-m gpu`)",
)

SOURCES = {"float16": (np.float16, torch.float16), "bfloat16": (ml_dtypes.bfloat16, torch.bfloat16)}


def same_values(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return ((a == b) & (np.signbit(a) == np.signbit(b))) | (np.isnan(a) & np.isnan(b))


def all_patterns(src: str) -> tuple[np.ndarray, torch.Tensor]:
    np_dtype, torch_dtype = SOURCES[src]
    bits = np.arange(2**16, dtype=np.uint16)
    return bits.view(np_dtype), torch.from_numpy(bits.view(np.int16).copy()).view(torch_dtype)


# ---- exhaustive: every fp16 / bf16 pattern, every named format, both saturation modes ------------------


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("src", sorted(SOURCES))
def test_every_fp16_bf16_pattern_matches_reference(src):
    x_all, t_all = all_patterns(src)
    nan = np.isnan(x_all.astype(np.float32))
    for (name, fmt), saturate in itertools.product(R.NAMED_FORMATS.items(), (True, False)):
        # formats without NaN: the reference raises on NaN, the kernel does not check
        keep = np.ones_like(nan) if fmt.has_nan else ~nan
        x, t = x_all[keep], t_all[torch.from_numpy(keep)]
        codes = kf.encode(t, fmt, saturate=saturate)
        np.testing.assert_array_equal(
            codes.numpy(), R.encode(x, fmt, saturate=saturate), err_msg=f"{name} {saturate}"
        )
        q = kf.quantize(t, fmt, saturate=saturate)
        assert q.dtype == t.dtype
        ok = same_values(to_numpy(q), R.quantize(x, fmt, saturate=saturate))
        assert ok.all(), f"{name} saturate={saturate}: x={x[~ok][:4]}"


# ---- float32 inputs, a spread of formats (all specials, unsigned, biases), int formats ----------------


def kernel_spread() -> list:
    out = []
    for ebits, mbits, specials, signed in itertools.product(
        (1, 2, 3, 4, 5, 8), (0, 1, 2, 3, 6), ("none", "fn", "ieee"), (True, False)
    ):
        if ebits + mbits + signed > 8 or (specials == "ieee" and mbits == 0):
            continue
        default = 2 ** (ebits - 1) - 1
        bias = default + ((ebits + mbits) % 3 - 1) * 2  # default, default - 2, default + 2
        for b in (default, bias):
            try:
                out.append(R.FPFormat(ebits, mbits, bias=b, specials=specials, signed=signed))
            except ValueError:
                pass
    return sorted(set(out), key=str)


SPREAD = kernel_spread()


@pytest.mark.interpret
@needs_interpreter
def test_fp32_spread_of_formats_matches_reference():
    x = random_fp32(1 << 12, seed=1)
    x_finite = x[~np.isnan(x)]
    assert len(SPREAD) > 60
    for fmt in SPREAD[::3] + [R.E8M0FNU, R.FP16, R.BF16, R.FPFormat(1, 14, bias=-2)]:
        xs = x if fmt.has_nan else x_finite
        t = torch.from_numpy(xs)
        for saturate in (True, False):
            if not saturate and not fmt.has_nan and not (fmt.signed and fmt.has_zero):
                continue  # the reference raises on negative/zero values here
            ref = R.encode(xs, fmt, saturate=saturate)
            np.testing.assert_array_equal(
                kf.encode(t, fmt, saturate=saturate).numpy(), ref, err_msg=str(fmt)
            )
        ok = same_values(kf.quantize(t, fmt).numpy(), R.quantize(xs, fmt))
        assert ok.all(), f"{fmt}: x={xs[~ok][:4]}"


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("fmt", ["int2", "int4", "uint4", "int8", "uint8", "int12"])
def test_int_formats_match_reference(fmt):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(3000) * 10.0 ** rng.integers(-2, 5, 3000),
                        np.arange(-300, 300) + 0.5, [np.inf, -np.inf, 0.0, -0.0]]).astype(np.float32)  # fmt: skip
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.from_numpy(x).to(dtype)
        xn = to_numpy(t)
        np.testing.assert_array_equal(kf.encode(t, fmt).numpy(), R.encode(xn, fmt))
        assert same_values(to_numpy(kf.quantize(t, fmt)), R.quantize(xn, fmt)).all()


# ---- stochastic rounding with shared noise ---------------------------------------------------------


@pytest.mark.interpret
@needs_interpreter
def test_stochastic_with_shared_noise_is_bit_exact():
    rng = np.random.default_rng(3)
    for fmt in SPREAD[::5] + [R.E4M3FN, R.E2M1FN, R.IntFormat(4), R.IntFormat(8, signed=False)]:
        grid = R.values(fmt)
        grid = grid[np.isfinite(grid)]
        x = rng.choice(grid, 2000) * (1 + rng.uniform(-0.3, 0.3, 2000))
        x[:200] = rng.uniform(-1, 1, 200) * 2.0**-30  # far below the grid: tiny round-up chances
        if isinstance(fmt, R.IntFormat):
            # the kernel's x - floor(x) is float32: exact for |x| >= 0.5 (the reference's is float64)
            x = np.where(np.abs(x) < 0.5, 0.0, x)
        if not (isinstance(fmt, R.IntFormat) or fmt.signed):
            x = np.abs(x)
        x = x.astype(np.float32)
        noise = torch.rand(x.size, generator=torch.Generator().manual_seed(fmt.bits))
        noise[:50] = 0.0  # u = 0 rounds up exactly when the remainder is nonzero
        ref = R._encode(x.astype(np.float64), fmt, True, noise.double().numpy())
        got = kf.encode(torch.from_numpy(x), fmt, noise=noise)
        np.testing.assert_array_equal(got.numpy(), ref, err_msg=str(fmt))


# ---- encode + pack ----------------------------------------------------------------------------------


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize(
    "fmt, bits",
    [
        ("e2m1fn", 4),
        ("int4", 4),
        ("e4m3fn", 8),
        ("e5m2", 8),
        ("e3m2fn", 8),
        ("e1m0", 2),
        ("uint2", 2),
        ("e1m1u", 2),
    ],
)
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 33), (2, 3, 64)])
def test_encode_pack_matches_reference(fmt, bits, shape):
    rng = np.random.default_rng(len(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.from_numpy(x).to(dtype)
        got = kf.encode_pack(t, fmt, bits=bits)
        expect = R.pack(R.encode(to_numpy(t), fmt), bits)
        np.testing.assert_array_equal(got.numpy(), expect)
    # non-contiguous input
    t = torch.from_numpy(np.ascontiguousarray(np.swapaxes(x[..., None], -1, -2))).squeeze(-2)
    np.testing.assert_array_equal(
        kf.encode_pack(t, fmt, bits=bits).numpy(), R.pack(R.encode(x, fmt), bits)
    )


def test_encode_pack_rejects_other_widths():
    with pytest.raises(ValueError, match="encode\\(\\) then"):
        kf.encode_pack(torch.zeros(4), "e3m2fn", bits=6)
    with pytest.raises(ValueError, match="bf16"):
        kf.encode(torch.zeros(4, dtype=torch.float64), "e2m1")


# ---- OCP MX -----------------------------------------------------------------------------------------


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize(
    "name", ["e4m3fn", "e5m2", "e3m2fn", "e2m3fn", "e2m1fn", "e6m1", "e2m1_b5"]
)
def test_mx_matches_reference(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 200)) * 10.0 ** rng.integers(-20, 20, (9, 1))
    x[0, :32] = 0.0  # all-zero block
    x[1, 40] = np.nan  # NaN block
    x[2, 70] = np.inf  # Inf in a block
    x[3, :] = 2.0**-140  # the scale clamps at 2^-127
    x[4, 5] = 1e30  # an outlier
    x[5, :] = 2.0**126  # e2m1_b5 (largest binade 2^-2): s = 128 overflows E8M0 -> NaN scale
    x[6, 33] = -np.inf
    x = x.astype(np.float32)
    for dtype, block in ((torch.float32, 32), (torch.float16, 7), (torch.bfloat16, 16)):
        t = torch.from_numpy(x).to(dtype)
        xn = to_numpy(t)
        codes, scales = kf.encode_mx(t, name, block)
        rc, rs = R.encode_mx(xn, name, block)
        np.testing.assert_array_equal(codes.numpy(), rc, err_msg=f"{dtype} {block}")
        np.testing.assert_array_equal(scales.numpy(), rs, err_msg=f"{dtype} {block}")
        q = kf.quantize_mx(t, name, block)
        assert q.dtype == dtype
        ok = same_values(to_numpy(q), R.quantize_mx(xn, name, block))
        assert ok.all(), f"{dtype} block={block}: x={xn[~ok][:4]}"


@pytest.mark.interpret
@needs_interpreter
def test_kernels_take_empty_0d_and_strided_inputs():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    for t in (x[:0], x[0, 0], x.T, x[:, ::3]):
        ref = R.encode(t.numpy(), "e4m3fn")
        assert torch.equal(kf.encode(t, "e4m3fn"), to_torch(ref))
        assert same_values(kf.quantize(t, "e2m1").numpy(), R.quantize(t.numpy(), "e2m1")).all()
        assert same_values(
            kf.quantize_mx(t, "e2m1", 4).numpy(), R.quantize_mx(t.numpy(), "e2m1", 4)
        ).all()


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("n", [1, 63, 64, 65, 127, 200])
def test_small_blocks_mask_partial_tiles(monkeypatch, n):
    """With 64-element programs (the interpreted launch normally uses one program of 2^16) the
    last program is partial for every n not a multiple of 64: masked loads and stores must
    neither drop nor invent elements, for the element-wise, packing and MX kernels."""
    monkeypatch.setattr(kf, "BLOCK", 64)
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((3, n)) * 4).astype(np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(kf.encode(t, "e4m3fn").numpy(), R.encode(x, "e4m3fn"))
    assert same_values(kf.quantize(t, "e2m1").numpy(), R.quantize(x, "e2m1")).all()
    for fmt, bits in (("e2m1fn", 4), ("e1m0", 2)):
        np.testing.assert_array_equal(
            kf.encode_pack(t, fmt, bits=bits).numpy(), R.pack(R.encode(x, fmt), bits)
        )
    codes, scales = kf.encode_mx(t, "e2m1fn", 32)
    rc, rs = R.encode_mx(x, "e2m1fn", 32)
    np.testing.assert_array_equal(codes.numpy(), rc)
    np.testing.assert_array_equal(scales.numpy(), rs)


# ---- NVFP4 -------------------------------------------------------------------------------------------


def _nvfp4_ties() -> np.ndarray:
    """Blocks built on every tie: a block scale at each E4M3 midpoint (amax = 6 m, g = 1), and
    blocks with an exact scale s whose elements sit on every E2M1 rounding boundary b · s and
    one float32 step either side of it."""
    e4m3 = R.values(R.E4M3FN)[:127]  # +0 ... 448
    mids = (e4m3[1:] + e4m3[:-1]) / 2
    rows = [np.concatenate([[6 * m], np.full(15, m)]) for m in mids[::3]]
    bounds = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    for s in e4m3[8::9]:  # exact scales across the binades
        for sign in (1.0, -1.0):
            elems = np.concatenate([bounds, np.nextafter(bounds.astype(np.float32), np.float32(9))])
            rows.append(np.concatenate([[6 * s], sign * elems * s, [0.0]]).astype(np.float32))
            below = np.nextafter((bounds * s).astype(np.float32), np.float32(0))
            rows.append(np.concatenate([[6 * s], sign * below, [0.0] * 8]))
    return np.stack(rows).astype(np.float32)


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("src", ["float32", "float16", "bfloat16"])
def test_nvfp4_matches_reference_on_ties_and_specials(src):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((40, 96)) * np.exp(3 * rng.standard_normal((40, 96)))).astype(
        np.float32
    )
    x[1, :16] = 0.0
    x[2, 5], x[3, 40], x[4, 70] = np.inf, -np.inf, np.nan
    x[5, :16] *= 1e-12  # a block whose scale underflows
    x[6, 3] = -0.0
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        src
    ]
    for data, g in ((x, None), (_nvfp4_ties(), 1.0)):
        t = torch.from_numpy(data).to(torch_dtype)
        xn = t.float().numpy()
        rc, rs, rg = R.encode_nvfp4(xn, global_scale=g)
        codes, scales = kf.encode_nvfp4(t, torch.tensor(rg))
        np.testing.assert_array_equal(codes.numpy(), rc)
        np.testing.assert_array_equal(scales.numpy(), rs)
        want = torch.from_numpy(R.quantize_nvfp4(xn, global_scale=g)).to(torch_dtype)
        assert same_values(to_numpy(kf.quantize_nvfp4(t, torch.tensor(rg))), to_numpy(want)).all()


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("n", [1, 15, 17, 48, 100])
def test_nvfp4_partial_blocks_and_programs(monkeypatch, n):
    monkeypatch.setattr(kf, "BLOCK", 64)  # 4 blocks of 16 per program: partial programs too
    x = (np.random.default_rng(n).standard_normal((3, n)) * 5).astype(np.float32)
    rc, rs, g = R.encode_nvfp4(x)
    codes, scales = kf.encode_nvfp4(torch.from_numpy(x), torch.tensor(g))
    np.testing.assert_array_equal(codes.numpy(), rc)
    np.testing.assert_array_equal(scales.numpy(), rs)


# ---- native GPU runs (the fast path dispatches to the kernels) ----------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("src", sorted(SOURCES))
def test_gpu_every_pattern_matches_reference(src):
    from lowbit.fast import formats as F

    x_all, t_all = all_patterns(src)
    nan = np.isnan(x_all.astype(np.float32))
    for fmt, saturate in itertools.product(R.NAMED_FORMATS.values(), (True, False)):
        keep = np.ones_like(nan) if fmt.has_nan else ~nan
        x, t = x_all[keep], t_all[torch.from_numpy(keep)].cuda()
        np.testing.assert_array_equal(
            F.encode(t, fmt, saturate=saturate).cpu().numpy(), R.encode(x, fmt, saturate=saturate)
        )
        assert same_values(
            to_numpy(F.quantize(t, fmt, saturate=saturate)), R.quantize(x, fmt, saturate=saturate)
        ).all()


@pytest.mark.gpu
def test_gpu_fp32_mx_pack_and_stochastic():
    from lowbit.fast import formats as F

    x = random_fp32(1 << 20, seed=5)
    xf = x[np.isfinite(x)]
    t = torch.from_numpy(xf).cuda()
    for fmt in SPREAD[::4] + [R.E4M3FN, R.E2M1FN, R.IntFormat(8)]:
        np.testing.assert_array_equal(
            F.encode(t, fmt).cpu().numpy(), R.encode(xf, fmt), err_msg=str(fmt)
        )
    m = torch.from_numpy(xf[: 1 << 19].reshape(512, 1024)).cuda()
    for name in ("e4m3fn", "e2m1fn"):
        assert same_values(
            F.quantize_mx(m, name).cpu().numpy(),
            R.quantize_mx(xf[: 1 << 19].reshape(512, 1024), name),
        ).all()
        np.testing.assert_array_equal(kf.encode_pack(m, name, bits=4 if name == "e2m1fn" else 8).cpu().numpy(),
                                      R.pack(R.encode(m.cpu().numpy(), name), 4 if name == "e2m1fn" else 8))  # fmt: skip
    noise = torch.rand(t.numel(), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref = R._encode(xf.astype(np.float64), R.E2M1FN, True, noise.double().cpu().numpy())
    np.testing.assert_array_equal(kf.encode(t, "e2m1fn", noise=noise).cpu().numpy(), ref)


@pytest.mark.interpret
@needs_interpreter
def test_fast_dispatch_glue_through_the_kernels(monkeypatch):
    """What the fast path does on CUDA, run on CPU: force its kernel dispatch and compare with
    the reference (nearest) and with its own torch path on the same seeded noise (stochastic)."""
    from lowbit.fast import formats as F

    monkeypatch.setattr(
        F, "_use_kernel", lambda x: x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )
    x = torch.from_numpy(random_fp32(1 << 12, seed=9)).reshape(64, 64)
    x = torch.where(torch.isnan(x), 1.0, x)
    for fmt in ("e4m3fn", "e2m1fn", "int8"):
        for dtype in (torch.float32, torch.bfloat16):
            t = x.to(dtype)
            xn = to_numpy(t)
            np.testing.assert_array_equal(F.encode(t, fmt).numpy(), R.encode(xn, fmt))
            assert same_values(to_numpy(F.quantize(t, fmt)), R.quantize(xn, fmt)).all()
            # stochastic: the kernel and the torch path draw the same uniforms from the seed
            if fmt != "int8":  # int8: the kernel's x - floor(x) is float32 (see above)
                noise = torch.rand(t.numel(), generator=torch.Generator().manual_seed(4))
                expect = F._encode(t, R.parse_format(fmt), True, noise.double())
                got = F.encode(t, fmt, rounding="stochastic", seed=4)
                assert torch.equal(got, expect)
    for fmt in ("e4m3fn", "e2m1fn"):
        codes, scales = F.encode_mx(x, fmt)
        rc, rs = R.encode_mx(x.numpy(), fmt)
        np.testing.assert_array_equal(codes.numpy(), rc)
        np.testing.assert_array_equal(scales.numpy(), rs)
        assert same_values(F.quantize_mx(x, fmt).numpy(), R.quantize_mx(x.numpy(), fmt)).all()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = x.to(dtype)
        xn = to_numpy(t).astype(np.float32)
        codes, scales, g = F.encode_nvfp4(t)
        rc, rs, rg = R.encode_nvfp4(xn)
        assert float(g) == rg
        np.testing.assert_array_equal(codes.numpy(), rc)
        np.testing.assert_array_equal(scales.numpy(), rs)
        want = torch.from_numpy(R.quantize_nvfp4(xn)).to(dtype)
        assert same_values(to_numpy(F.quantize_nvfp4(t)), to_numpy(want)).all()


@pytest.mark.gpu
def test_gpu_nvfp4_fast_path_dispatches_and_matches_reference():
    from lowbit.fast import formats as F

    x = random_fp32(1 << 18, seed=9).reshape(256, 1024)
    x = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
    x[3, 7] = np.nan
    t = torch.from_numpy(x).cuda()
    codes, scales, g = F.encode_nvfp4(t)
    rc, rs, rg = R.encode_nvfp4(x)
    assert float(g) == rg
    np.testing.assert_array_equal(codes.cpu().numpy(), rc)
    np.testing.assert_array_equal(scales.cpu().numpy(), rs)
    for dtype in (torch.float32, torch.bfloat16):
        got = to_numpy(F.quantize_nvfp4(t.to(dtype)))
        want = to_numpy(F.quantize_nvfp4(t.to(dtype).cpu()))
        assert same_values(got, want).all()
