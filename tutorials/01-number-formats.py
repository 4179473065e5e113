# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Number formats: how low-bit floats are built
#
# Every quantization method in lowbit ends by rounding numbers onto a small grid: an 8-bit
# float (E4M3, E5M2), a 6- or 4-bit float (E3M2, E2M3, E2M1, E3M0, E1M2), or an integer. This
# tutorial builds those grids from their bits with the **reference**
# (`lowbit.reference.formats`, NumPy + Numba, written to be read), then checks the **fast path**
# (`lowbit.fast.formats`, torch) and the **Triton kernel** against it.
#
# What you will see:
#
# 1. how a value is built from sign, exponent and mantissa bits (one E4M3 code, step by step);
# 2. the grids of E2M1, E3M0, E1M2 and E4M3, and the relative error they cause at each magnitude;
# 3. subnormals and ties, decided by the reference's rounding steps;
# 4. overflow: saturating, IEEE-style, and what `ml_dtypes` and torch's casts do;
# 5. stochastic rounding, and why it is unbiased;
# 6. MX block scaling (OCP MX v1.0) and NVFP4;
# 7. the fast path and the Triton kernel checked bit for bit, and a small benchmark.

# %%
import os

import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels run on CPU through Triton's interpreter. It must be switched
    # on before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import time

import matplotlib.pyplot as plt
import ml_dtypes
import numpy as np

from lowbit.reference import formats as ref
from lowbit.reference.formats import FPFormat

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. A float from its bits
#
# A float format with `E` exponent bits, `M` mantissa bits and bias `b` stores a code
# `sign | exponent field f | mantissa m`. With emin = 1 − b (the exponent of the smallest
# normal binade):
#
# * **normal** (f > 0): value = (−1)^sign · (2^M + m) · 2^(f − b − M), i.e. 1.m × 2^(f − b);
# * **subnormal** (f = 0): value = (−1)^sign · m · 2^(emin − M), i.e. 0.m × 2^emin — no implicit
#   leading one, so the grid continues evenly down to zero;
# * **specials**: `"ieee"` formats (E5M2, fp16) reserve the all-ones exponent for ±Inf and NaN,
#   `"fn"` formats (E4M3FN) reserve only the all-ones code for NaN, and `"none"` formats (the
#   MX element formats and LLM-FP4's formats) use every code for a number.
#
# Take the E4M3FN code `0b0_1011_101` (E = 4, M = 3, b = 7):

# %%
fmt = ref.E4M3FN
code = 0b0_1011_101
sign = code >> (fmt.ebits + fmt.mbits)
field = (code >> fmt.mbits) & (2**fmt.ebits - 1)
mantissa = code & (2**fmt.mbits - 1)
by_hand = (-1) ** sign * (2**fmt.mbits + mantissa) * 2.0 ** (field - fmt.bias - fmt.mbits)
print(f"code {code:#04x} = {code:08b}: sign {sign}, exponent field {field}, mantissa {mantissa}")
print(f"(2^{fmt.mbits} + {mantissa}) * 2^({field} - {fmt.bias} - {fmt.mbits}) = {by_hand}")
print("reference _code_value:", ref._code_value(code, fmt))
print("reference decode     :", ref.decode(np.array([code], np.uint8), fmt)[0])
print("ml_dtypes            :", float(np.array([code], np.uint8).view(ml_dtypes.float8_e4m3fn)[0]))

# %% [markdown]
# The same walk for a subnormal code, the largest finite code, and the NaN code. `max_value`,
# `min_normal` and `min_subnormal` are not typed in anywhere: they are the decoded values of
# codes, from one formula for every format.

# %%
for name, c in [
    ("smallest subnormal", 0b0_0000_001),
    ("a subnormal", 0b0_0000_011),
    ("smallest normal", 0b0_0001_000),
    ("largest finite", 0b0_1111_110),
    ("NaN (all ones)", 0b0_1111_111),
]:
    print(f"{name:>19}: {c:08b} -> {ref._code_value(c, fmt)!r}")
print(f"max {fmt.max_value}, min normal {fmt.min_normal}, min subnormal {fmt.min_subnormal}")

# %% [markdown]
# ## 2. The grids
#
# LLM-FP4 (Liu et al., 2023) quantizes weights and activations to 4-bit floats with every code
# a number (no Inf/NaN). With the default bias 2^(E−1) − 1 their non-negative values are below.
# E2M1 is also OCP MX's FP4 element (`e2m1fn`); E4M3 without specials reaches 480, one step past
# OCP's E4M3FN (448), which gives that code to NaN. The
# [formats page](../../formats/) lists every value of every format of up to 6 bits.

# %%
grid_formats = {
    "E2M1": FPFormat(2, 1),
    "E3M0": FPFormat(3, 0),
    "E1M2": FPFormat(1, 2),
    "E4M3": FPFormat(4, 3),
}
for name, f in grid_formats.items():
    non_negative = np.unique(np.abs(ref.values(f)))  # codes with the sign bit set mirror these
    shown = non_negative if len(non_negative) <= 16 else f"{len(non_negative)} values"
    print(f"{name}: bias {f.bias}, max {f.max_value}: {shown}")

# %%
fig, axes = plt.subplots(4, 1, figsize=(9, 6.5))
for ax, (name, f) in zip(axes, grid_formats.items()):
    v = ref.values(f)
    ax.plot(v, np.zeros_like(v), "|", markersize=18, color="tab:blue")
    ax.set_yticks([])
    ax.set_ylabel(name, rotation=0, labelpad=22)
    if name == "E4M3":
        ax.set_xscale("symlog", linthresh=f.min_normal)
        ax.set_xlabel("value (symlog: linear below the smallest normal, 2^-6)")
    ax.grid(axis="x", alpha=0.3)
axes[0].set_title("Every value of four 4- and 8-bit float formats (bias 2^(E-1) - 1)")
fig.tight_layout()
plt.show()

# %% [markdown]
# Floats space their values evenly inside each binade [2^e, 2^(e+1)) and double the spacing
# from one binade to the next: the **relative** error stays roughly constant across magnitudes,
# at most 2^−(M+1) for round to nearest. More exponent bits buy range, more mantissa bits buy
# precision. Below the smallest normal the subnormals keep an absolute step, so the relative error
# grows, and below half the smallest value everything rounds to zero. Above the largest value
# the input saturates (clamps to ±max) and the error climbs towards 1. E1M2 has a single normal
# binade: it is an integer grid with step 0.5 in disguise.

# %%
x = np.logspace(-3, 2.5, 4000)  # positive magnitudes, float64
fig, ax = plt.subplots(figsize=(9, 4))
for name, f in grid_formats.items():
    q = ref.quantize(x, f)  # nearest even, saturating at max
    ax.plot(x, np.abs(q - x) / x, label=f"{name} (2^-(M+1) = {2.0 ** -(f.mbits + 1):g})", lw=1)
ax.set_xscale("log")
ax.set_ylim(0, 1.05)
ax.set_xlabel("|x|")
ax.set_ylabel("relative error |q(x) - x| / |x|")
ax.set_title("Relative rounding error vs magnitude (1 = flushed to zero; right: clamped at max)")
ax.legend()
ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## 3. Subnormals and ties
#
# `encode` follows the textbook algorithm, one step per line (see the reference's module
# docstring): binade exponent e = max(floor(log2|x|), emin), grid step 2^(e − M), q = |x| / step,
# then round q to an integer significand r — to nearest, ties to the **even** r — and the code is
# (e − emin) · 2^M + r. Let us replay those steps for a few ties in E2M1 and E3M0.


# %%
def rounding_steps(x: float, f: FPFormat) -> None:
    """Print the reference's rounding steps for one positive x (mirrors ref.encode)."""
    e = max(np.frexp(x)[1] - 1, f.emin)  # binade exponent, clamped to the subnormal binade
    step = 2.0 ** (e - f.mbits)
    q = x / step
    r = int(np.floor(q))
    frac = q - r
    tie = frac == 0.5
    r_rounded = r + (frac > 0.5 or (tie and r % 2 == 1))
    result = ref.quantize(np.array([x]), f)[0]
    print(
        f"{f.name:>7} x={x:<5}: e={e:>2}, step={step:<5} q={q:<4} floor={r}, frac={frac:.2f}"
        f"{' (tie)' if tie else '      '} -> r={r_rounded} -> {r_rounded * step:<4} | reference: {result}"
    )


E2M1, E3M0 = grid_formats["E2M1"], grid_formats["E3M0"]
for value in (0.25, 0.75, 2.5, 3.5, 5.0):
    rounding_steps(value, E2M1)
for value in (0.375, 3.0, 6.0, 12.0):
    rounding_steps(value, E3M0)

# %% [markdown]
# * **0.25 in E2M1** lies halfway between 0 and the smallest subnormal 0.5. Both are in the
#   subnormal binade (step 0.5); r = 0 is even, so 0.25 rounds to **0**. 0.75 (between 0.5 and 1)
#   rounds to 1, whose significand is even.
# * **2.5 in E2M1** lies between 2 (mantissa 0) and 3 (mantissa 1): ties go to the even mantissa,
#   **2**. 5.0 between 4 and 6 goes to 4.
# * **3.0 in E3M0** has no mantissa bits: in every normal binade the significand is r = 1 (odd),
#   so a tie always rounds *up* to r = 2, which carries into the next binade: 3 → **4**, 6 → 8,
#   12 → 16. This is also what `torch.round(x / step) * step` does in LLM-FP4's code and what
#   `ml_dtypes` does for E8M0.
#
# `ml_dtypes` implements E2M1 as `float4_e2m1fn`; the reference agrees with it on all these ties:

# %%
ties = np.array([0.25, 0.75, 2.5, 3.5, 5.0, -2.5], np.float32)
print("reference:", ref.quantize(ties, "e2m1fn"))
print("ml_dtypes:", ties.astype(ml_dtypes.float4_e2m1fn).astype(np.float32))

# %% [markdown]
# ## 4. Overflow: saturate, IEEE, ml_dtypes, torch
#
# What should 1000 become in E4M3FN, whose largest value is 448? Quantization code wants
# `saturate=True` (the default): clamp to ±max. IEEE / OCP *casting* (`saturate=False`) sends
# overflow to Inf where the format has one (E5M2), else to NaN (E4M3FN), else saturates (formats
# without specials). `saturate=False` is exactly `x.astype(ml_dtypes.<format>)`. torch's own
# float8 casts are a third opinion:

# %%
x = np.array([440.0, 464.0, 470.0, 1000.0, 70000.0, np.inf], np.float32)
rows = {}
for name, ml_type, torch_type in [
    ("e4m3fn", ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn),
    ("e5m2", ml_dtypes.float8_e5m2, torch.float8_e5m2),
]:
    rows[f"{name} saturate=True"] = ref.quantize(x, name, saturate=True)
    rows[f"{name} saturate=False"] = ref.quantize(x, name, saturate=False)
    rows[f"{name} ml_dtypes"] = x.astype(ml_type).astype(np.float32)
    rows[f"{name} torch cast"] = torch.from_numpy(x).to(torch_type).float().numpy()
print(f"{'x':>24}: " + " ".join(f"{v:>8}" for v in x))
for label, values in rows.items():
    print(f"{label:>24}: " + " ".join(f"{v:>8}" for v in values))

# %% [markdown]
# 464 is the midpoint between 448 and the next step (480, which E4M3FN does not have): it ties
# down to the even 448, anything above overflows. With torch 2.13 on CPU the cast to
# `float8_e4m3fn` *saturates* (even Inf becomes 448), while the cast to `float8_e5m2` follows IEEE
# (overflow to Inf) — compare with the reference in both modes before trusting a kernel that
# claims to match "the" cast.
#
# ## 5. Stochastic rounding is unbiased
#
# Round-to-nearest has a systematic error for a fixed input: 0.3 always becomes 0.5 in E2M1
# (error +0.2). Stochastic rounding picks one of the two neighbours, the upper one with
# probability (x − lower) / (upper − lower), so the *expected* result is x itself. Training with
# low-bit gradients relies on this. Each sample below is drawn with the reference's seeded
# stochastic rounding:

# %%
n = 20_000
inputs = np.array([0.3, 1.1, 2.6, 4.9], np.float64)
samples = ref.quantize(np.repeat(inputs[None, :], n, axis=0), E2M1, rounding="stochastic", seed=1)
for i, v in enumerate(inputs):
    s = samples[:, i]
    lower, upper = np.unique(s)  # always exactly the two neighbours
    p = (v - lower) / (upper - lower)
    stderr = (upper - lower) * np.sqrt(p * (1 - p) / n)
    print(
        f"x={v}: neighbours {lower}, {upper}; mean {s.mean():.4f} (x ± 4 s.e. = {v} ± {4 * stderr:.4f}); "
        f"nearest-even gives {ref.quantize(np.array([v]), E2M1)[0]}"
    )
    assert abs(s.mean() - v) < 4 * stderr  # fails by chance with probability ~6e-5

# %%
x = np.linspace(0, 6, 601)
n = 2000
stochastic = ref.quantize(np.tile(x, (n, 1)), E2M1, rounding="stochastic", seed=2).mean(axis=0)
fig, ax = plt.subplots(figsize=(9, 3.5))
ax.plot(x, ref.quantize(x, E2M1) - x, label="nearest even: error q(x) - x")
ax.plot(x, stochastic - x, label=f"stochastic: mean error over {n} draws", alpha=0.8)
ax.axhline(0, color="black", lw=0.5)
ax.set_xlabel("x")
ax.set_ylabel("error")
ax.set_title("E2M1: rounding error for each input")
ax.legend()
plt.show()

# %% [markdown]
# ## 6. MX block scaling
#
# A 4-bit float covers a tiny range (E2M1: 0.5 … 6). OCP's Microscaling (MX) formats give every
# block of 32 values a shared power-of-two scale X = 2^s stored as an E8M0 code, chosen from the
# block's largest magnitude so that it lands in the element format's top binade:
# s = floor(log2 max|V|) − emax_elem. Outliers then only cost precision inside their own block.

# %%
x = rng.standard_normal((64, 256)).astype(np.float32)
x[:, 7] *= 40  # one outlier channel, like the activations LLM.int8 and LLM-FP4 are about


def rel_err(q: np.ndarray) -> float:
    return float(np.linalg.norm(q - x) / np.linalg.norm(x))


per_tensor_scale = np.abs(x).max() / ref.E2M1FN.max_value
results = {
    "E2M1, no scale": ref.quantize(x, "e2m1fn"),
    "E2M1, one absmax scale per tensor": ref.quantize(x / per_tensor_scale, "e2m1fn")
    * per_tensor_scale,
    "MXFP4 (E2M1, block 32)": ref.quantize_mx(x, "e2m1fn", block=32),
    "MXFP6 (E3M2, block 32)": ref.quantize_mx(x, "e3m2fn", block=32),
    "MXFP8 (E4M3FN, block 32)": ref.quantize_mx(x, "e4m3fn", block=32),
}
for name, q in results.items():
    print(f"{name:>34}: relative error {rel_err(q):.4f}")
codes, scales = ref.encode_mx(x, "e2m1fn", block=32)
print("scale exponents of row 0's blocks:", scales[0].astype(int) - 127)

# %% [markdown]
# NVIDIA's NVFP4 keeps E2M1 elements but scales smaller blocks, of 16, with an E4M3 scale
# (three mantissa bits instead of a bare power of two), and adds one float32 scale g for the
# whole tensor, which maps its largest magnitude onto 448 · 6 (the largest scale times the
# largest element). A value is decoded as e2m1 · scale / g. The finer scale puts each block's
# largest value at 6 instead of somewhere in [4, 8), so NVFP4 is more accurate than MXFP4 at
# the cost of 4.5 bits per value instead of 4.25 (a byte per 16 values against one per 32):

# %%
nv_codes, nv_scales, g = ref.encode_nvfp4(x)
print(f"global scale g = {g:.4g}; block scales of row 0: {ref.decode(nv_scales[0], 'e4m3fn')[:6]}")
print(
    f"{'NVFP4 (E2M1, block 16, E4M3 scales)':>34}: relative error {rel_err(ref.quantize_nvfp4(x)):.4f}"
)
print(
    f"{'NVFP4, 16 x 16 tiles (weights)':>34}: relative error "
    f"{rel_err(ref.quantize_nvfp4(x, block_2d=True)):.4f}"
)

# %% [markdown]
# ## 7. The fast path and the Triton kernel, checked against the reference
#
# `lowbit.fast.formats` has the same functions, parameters and defaults as the reference and
# takes `torch.Tensor`s: vectorised torch on CPU, a Triton kernel on CUDA. Since every float16
# input is one of 65,536 bit patterns, we can compare the codes of *every* input, bit for bit:

# %%
from lowbit.fast import formats as fast

x16 = np.arange(2**16, dtype=np.uint16).view(np.float16)
x16 = x16[~np.isnan(x16)]  # NaN cannot be encoded in formats without a NaN code
for name in ["e4m3fn", "e5m2", "e3m2fn", "e2m3fn", "e2m1fn", "e3m0", "e1m2"]:
    expected = ref.encode(x16, name)
    got = fast.encode(torch.from_numpy(x16), name).numpy()
    print(f"{name:>7}: {len(x16)} float16 inputs, {int((got != expected).sum())} mismatching codes")
    assert (got == expected).all()

# %% [markdown]
# The Triton kernel is the code path a CUDA tensor takes. Its launcher can also be called
# directly, so on a machine without a GPU it runs here through Triton's interpreter (slow:
# a small input).

# %%
from lowbit.kernels import formats as kernels

x_small = torch.from_numpy(rng.standard_normal(4096).astype(np.float32) * 8)
device = "cuda" if torch.cuda.is_available() else "cpu"
for name in ["e4m3fn", "e2m1fn", "e3m0"]:
    expected = ref.encode(x_small.numpy(), name)
    got = kernels.encode(x_small.to(device), ref.parse_format(name)).cpu().numpy()
    print(f"{name:>7}: kernel on {device}: {int((got != expected).sum())} mismatching codes")
    assert (got == expected).all()

# MX block scaling: the fast path and the kernel against the reference (values, bit for bit)
x_mx = torch.from_numpy(rng.standard_normal((4, 96)).astype(np.float32))
expected_mx = ref.quantize_mx(x_mx.numpy(), "e2m1fn", block=32)
for label, got_mx in [
    ("fast", fast.quantize_mx(x_mx, "e2m1fn", block=32)),
    ("kernel", kernels.quantize_mx(x_mx.to(device), ref.E2M1FN, block=32).cpu()),
]:
    same = np.array_equal(got_mx.numpy(), expected_mx)
    print(f"MXFP4 quantize_mx, {label}: identical to the reference: {same}")
    assert same

# %% [markdown]
# ## 8. A small benchmark
#
# Encoding one million float32 values on this machine's CPU: the reference (Numba loop), the
# fast path (vectorised torch) and `ml_dtypes`' C++ cast. Medians of a few runs, measured side by
# side; `benchmarks/formats.py` measures more carefully (see the benchmarks page).


# %%
def median_seconds(fn, repeat: int = 5) -> float:
    fn()  # warm up (JIT compilation, caches)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


x_np = rng.standard_normal(1_000_000).astype(np.float32)
x_t = torch.from_numpy(x_np)
print(f"{'format':>7} {'reference':>10} {'fast torch':>11} {'ml_dtypes':>10}  reference/fast")
for name, ml_type in [("e4m3fn", ml_dtypes.float8_e4m3fn), ("e2m1fn", ml_dtypes.float4_e2m1fn)]:
    t_ref = median_seconds(lambda name=name: ref.encode(x_np, name))
    t_fast = median_seconds(lambda name=name: fast.encode(x_t, name))
    t_ml = median_seconds(lambda ml_type=ml_type: x_np.astype(ml_type))
    print(
        f"{name:>7} {t_ref * 1e3:>8.1f}ms {t_fast * 1e3:>9.1f}ms {t_ml * 1e3:>8.1f}ms"
        f"  {t_ref / t_fast:>13.1f}x"
    )

# %% [markdown]
# ## References
#
# * IEEE Standard for Floating-Point Arithmetic, IEEE 754-2019 (binary formats, subnormals,
#   roundTiesToEven, overflow to infinity).
# * P. Micikevicius et al., *OCP 8-bit Floating Point Specification (OFP8)*, rev. 1.0, Open Compute
#   Project, 2023 (E4M3FN and E5M2).
# * B. Rouhani et al., *OCP Microscaling Formats (MX) Specification* v1.0, Open Compute Project,
#   2023 (E8M0 shared scales, MXFP8 / MXFP6 / MXFP4, block size 32).
# * NVIDIA, NVFP4 (Blackwell's 4-bit format: E2M1 elements, E4M3 scales per 16 values and an
#   FP32 tensor scale), as stored by compressed-tensors' `nvfp4-pack-quantized` format and used
#   by the NVFP4 training recipe of NVIDIA's Transformer Engine (16 x 16 weight tiles).
# * S.-y. Liu, Z. Liu, X. Huang, P. Dong, K.-T. Cheng, *LLM-FP4: 4-Bit Floating-Point Quantized
#   Transformers*, EMNLP 2023, arXiv:2310.16836 (E2M1 / E3M0 / E1M2 without special codes).
# * `ml_dtypes` (JAX / OpenXLA): NumPy dtypes for float8, float6 and float4 formats,
#   https://github.com/jax-ml/ml_dtypes.
# * lowbit's [number formats page](../../formats/) and the API reference of
#   `lowbit.reference.formats`.
