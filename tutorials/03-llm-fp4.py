# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LLM-FP4: floating-point quantization with a searched format and exponent bias
#
# Liu et al., *LLM-FP4: 4-Bit Floating-Point Quantized Transformers* (EMNLP 2023,
# arXiv:2310.16836) quantize weights **and** activations of transformers to 4-bit floats. Three
# ideas carry the method:
#
# 1. an FP format's **exponent bias is a real number** and acts as the scale: a format
#    `E`/`M` with bias `b` clips at `Qmax(b) = (2 − 2^−M) · 2^(2^E − 1 − b)`;
# 2. the **format (E/M split) and the bias are searched** per tensor to minimise the layer's
#    output error (weights per output channel, activations per tensor);
# 3. activations with channel outliers get **per-channel biases** `t + k_c` — a real tensor part
#    and integer shifts — whose shifts are **folded into the weights' exponent bias**, so the
#    GEMM still sees one activation scale ("pre-shifted exponent bias").
#
# This tutorial walks through each with the reference (`lowbit.reference.fpq`, NumPy) and checks
# the fast path (`lowbit.fast.fpq`, torch) and the Triton kernels against it.

# %%
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU through the interpreter; it must be on before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import time

import matplotlib.pyplot as plt
import numpy as np

from lowbit.fast import fpq as fast
from lowbit.reference import fpq as ref
from lowbit.reference.formats import FPFormat

rng = np.random.default_rng(0)
E3M0, E2M1, E1M2 = FPFormat(3, 0), FPFormat(2, 1), FPFormat(1, 2)


def nm(f: FPFormat) -> str:
    return f"E{f.ebits}M{f.mbits}"


# %% [markdown]
# ## 1. FP grid vs INT grid on a long-tailed distribution
#
# Transformer activations are long-tailed: most values are small, a few are large. An INT4 grid
# spends its 15 levels evenly; an FP4 grid puts them densely near zero and sparsely in the tail.
# Below both grids are fitted to the same Student-t sample with min-max scaling (INT4: step =
# absmax / 7; FP: bias from the absmax, `bias_from_max`).

# %%
x = rng.standard_t(df=3, size=20000).astype(np.float32)  # long-tailed
absmax = float(np.abs(x).max())


def int4_minmax(v: np.ndarray) -> np.ndarray:
    step = absmax / 7
    return np.clip(np.rint(v / step), -7, 7) * step


results = {"INT4": int4_minmax(x)}
for fmt in (E3M0, E2M1, E1M2):
    results[nm(fmt)] = ref.quantize(x, fmt, ref.bias_from_max(absmax, fmt))
for name, xq in results.items():
    print(f"{name:5s} MSE {np.mean((xq - x) ** 2):.4f}  distinct levels {np.unique(xq).size}")

fig, ax = plt.subplots(figsize=(8, 3))
ax.hist(x, bins=400, range=(-absmax, absmax), color="0.8", log=True)
for i, (name, xq) in enumerate([("INT4", results["INT4"]), ("E2M1", results["E2M1"])]):
    levels = np.unique(xq)
    ax.vlines(levels, 1, 10 ** (3 + i), colors=f"C{i}", label=f"{name} levels", lw=1)
ax.set_xlabel("value")
ax.set_ylabel("count (log)")
ax.legend()
ax.set_title("Student-t(3) sample: INT4 vs E2M1 levels (min-max scaled)")
plt.show()

# %% [markdown]
# ## 2. The quantizer, step by step
#
# `ref.quantize(x, fmt, bias)` follows the paper's four steps:
#
# 1. clip: `xc = clamp(x, −Qmax(b), Qmax(b))`;
# 2. binade: `p = max(floor(log2|xc| + b), 1)` — zeros and subnormals land in `p = 1`;
# 3. step: `2^(p − M − b)`;
# 4. round half to even: `xq = round(xc / step) · step`.
#
# The reference reads `floor(log2|·|)` with `frexp`, which is exact at powers of two (a float
# `log2` can land one binade off there). Here the steps are recomputed for a few inputs and
# compared with the reference.

# %%
fmt, b = E2M1, 0.7  # a real-valued bias
qmax = float(ref.max_from_bias(b, fmt))
vals = np.array([0.0, 0.03, 0.3, 0.6, 1.234, 2.5, 4.0, 100.0])
xc = np.clip(vals, -qmax, qmax)
with np.errstate(divide="ignore"):
    p = np.maximum(np.floor(np.log2(np.abs(xc)) + b), 1)
step = 2.0 ** (p - fmt.mbits - b)
by_hand = np.rint(xc / step) * step
print(f"E2M1 with b = {b}: Qmax = {qmax:.4f}")
for v, pi, s, h, r in zip(vals, p, step, by_hand, ref.quantize(vals, fmt, b)):
    print(f"x = {v:7.3f}  p = {pi:3.0f}  step = {s:.4f}  by hand {h:.5f}  reference {r:.5f}")
assert np.allclose(by_hand, ref.quantize(vals, fmt, b), rtol=2**-22)  # float32 realisation of 2^b

# %% [markdown]
# At the format's own integer bias this *is* the ordinary format cast — the same grid and tie rule
# as `lowbit.reference.formats.quantize` (E2M1 at bias 1 is OCP FP4: 0, 0.5, 1, 1.5, 2, 3, 4, 6).
# And `max_from_bias` / `bias_from_max` are inverses (exactly at integer biases).

# %%
from lowbit.reference import formats  # noqa: E402

grid = np.linspace(-7, 7, 2001)
assert np.array_equal(ref.quantize(grid, E2M1, 1), formats.quantize(grid, formats.E2M1FN))
print("E2M1 levels at b = 1:", np.unique(np.abs(ref.quantize(grid, E2M1, 1))))
print("bias_from_max(max_from_bias(1.0)) =", ref.bias_from_max(ref.max_from_bias(1.0, E2M1), E2M1))

# %% [markdown]
# ## 3. Why the format matters: error vs E/M split
#
# For each 4-bit split the best clip is found by a 1-D scan of the bias, on three distributions.
# Heavier tails want more exponent bits; a uniform-ish distribution wants mantissa bits (E1M2 is
# an INT-like grid).

# %%
dists = {
    "uniform": rng.uniform(-1, 1, 20000),
    "normal": rng.standard_normal(20000),
    "student-t(2)": rng.standard_t(2, 20000),
}
splits = [E3M0, E2M1, E1M2]
best = np.zeros((len(dists), len(splits)))
for i, v in enumerate(dists.values()):
    for j, f in enumerate(splits):
        b0 = float(ref.bias_from_max(np.abs(v).max(), f))
        errs = [np.mean((ref.quantize(v, f, b0 + d) - v) ** 2) for d in np.linspace(-1, 6, 57)]
        best[i, j] = min(errs) / np.mean(v**2)
fig, ax = plt.subplots(figsize=(7, 3))
for j, f in enumerate(splits):
    ax.bar(np.arange(len(dists)) + 0.25 * j, best[:, j], width=0.25, label=nm(f))
ax.set_xticks(np.arange(len(dists)) + 0.25, list(dists))
ax.set_yscale("log")
ax.set_ylabel("relative MSE (best bias)")
ax.legend()
plt.show()
for name, row in zip(dists, best):
    print(f"{name:13s} best split: {nm(splits[int(np.argmin(row))])}")

# %% [markdown]
# ## 4. The search
#
# `ref.search(x, w, b)` scores candidates by the **layer output** MSE against the FP layer.
# Candidates are `γ_i · b0` for `γ_i = 0.01 + i (1.2 − 0.01)/100`, `i = 0..100` (the code multiplies
# the *bias*; `search_space="max"` scales the clip max instead), plus the current and min-max biases.
# Weight biases are chosen per output channel, the activation bias per tensor. Every candidate
# format (E3M0, E2M1, E1M2 at 4 bits) keeps its own biases, and each bias step tunes them all —
# the official code's interval searches loop over every mantissa width — so the format step that
# follows compares *searched* formats, not a searched incumbent against min-max rivals. One round
# is w-bias, w-format, a-bias, a-format (FPQ: w-bias, a-bias, w-format, a-format). Below, a
# synthetic layer whose inputs have a few outlier channels (as in BERT).

# %%
T, d_in, d_out = 256, 64, 48
X = rng.standard_normal((T, d_in)) * np.exp(rng.standard_normal(d_in) * 0.5)
X[:, [3, 17]] *= 30.0  # outlier channels
W = rng.standard_normal((d_out, d_in)) * 0.1
Y = X @ W.T


def mse_of(a_fmt, a_bias, w_fmt, w_bias):
    return float(np.mean((ref.linear(X, W, a_fmt, a_bias, w_fmt, w_bias) - Y) ** 2))


minmax = mse_of(
    E2M1,
    ref.bias_from_max(np.abs(X).max(), E2M1),
    E2M1,
    ref.bias_from_max(np.abs(W).max(axis=1), E2M1),
)
t0 = time.perf_counter()
base = ref.search(X, W, n_candidates=50, rounds=2)
fpq = ref.search(X, W, n_candidates=50, rounds=2, preshifted=True)
print(f"search time (reference, 2 searches): {time.perf_counter() - t0:.1f} s")
print(f"MinMax E2M1 W4A4        MSE {minmax:.4f}")
print(f"FPQ baseline (per tensor) MSE {base.mse:.4f}  W {nm(base.w_format)}  A {nm(base.a_format)}")
print(f"FPQ (pre-shifted bias)    MSE {fpq.mse:.4f}  W {nm(fpq.w_format)}  A {nm(fpq.a_format)}")

# %% [markdown]
# The joint search against the nine single-format searches (`w_formats=[...]`, `a_formats=[...]`,
# same grid): on this layer it lands on the best pair. That is not guaranteed in general — the
# search is coordinate descent (each step an exact minimisation over its candidates), and it can
# settle at a different point than a search that starts from the final formats.

# %%
for label, res, pre in (("baseline", base, False), ("FPQ", fpq, True)):
    singles = {
        (nm(fw), nm(fa)): ref.search(
            X, W, n_candidates=50, rounds=2, preshifted=pre, w_formats=[fw], a_formats=[fa]
        ).mse
        for fw in splits
        for fa in splits
    }
    best_pair = min(singles, key=singles.get)
    print(
        f"{label:8s} joint MSE {res.mse:.4f}; best single-format search W {best_pair[0]} "
        f"A {best_pair[1]} MSE {singles[best_pair]:.4f}"
    )

# %% [markdown]
# ## 5. The pre-shifted exponent bias and its fold
#
# Per-channel biases `b_c` (from each channel's absmax) become `t + k_c` with a real tensor
# bias `t = min_c b_c` and integer shifts `k_c ∈ [0, 2^E − 1]` (`ref.preshift`). Since
# `Q_{t+k}(x) = 2^−k Q_t(2^k x)`, reading the activation codes at `t` gives `2^k` times the
# simulated values, and reading the weight codes at `b_o + k_c` (`ref.fold_preshift`) gives
# exactly `2^−k` times theirs: every product is unchanged, and the GEMM sees one activation scale.

# %%
a_fmt, w_fmt = fpq.a_format, fpq.w_format
print("shifts k_c of the first 20 channels:", fpq.a_shift[:20])
t, k = fpq.a_tensor_bias, fpq.a_shift
Xs = ref.quantize(X.astype(np.float32), a_fmt, t + k)  # simulated per-channel quantization
Ws = ref.quantize(W.astype(np.float32), w_fmt, fpq.w_bias[:, None])
Xf = ref.decode(ref.encode(X.astype(np.float32), a_fmt, t + k), a_fmt, t)  # one tensor bias
Wf = ref.decode(
    ref.encode(W.astype(np.float32), w_fmt, fpq.w_bias[:, None]),
    w_fmt,
    ref.fold_preshift(fpq.w_bias, k),
)
print("activations are 2^k x simulated:", np.array_equal(Xf, np.ldexp(Xs, k)))
print("folded layer == simulated layer, bit for bit:", np.array_equal(Xf @ Wf.T, Xs @ Ws.T))

# %% [markdown]
# ## 6. The fast path and the kernels, checked against the reference
#
# `lowbit.fast.fpq` mirrors every function; its quantizer is bit-identical to the reference,
# including real and per-channel biases. The Triton kernels (here through the interpreter unless
# a GPU is present) quantize in one pass and run the FP4 linear on codes with the fold applied.

# %%
from lowbit.kernels import fpq as kernels  # noqa: E402

xt = torch.from_numpy(X.astype(np.float32))
bias_c = t + k
assert torch.equal(fast.quantize(xt, a_fmt, torch.from_numpy(bias_c)), torch.from_numpy(Xs))
scale, scale_inv = fast._bias_scales(torch.from_numpy(bias_c))
small = xt[:32]
kq = kernels.fake_quant(small, a_fmt.ebits, a_fmt.mbits, scale, scale_inv)
print("Triton fake-quant == reference:", torch.equal(kq, torch.from_numpy(Xs[:32])))
codes = kernels.fake_quant(small, a_fmt.ebits, a_fmt.mbits, scale, scale_inv, codes=True)
w_codes = torch.from_numpy(ref.encode(W.astype(np.float32), w_fmt, fpq.w_bias[:, None]))
_, a_si = fast._bias_scales(torch.as_tensor(t))
_, w_si = fast._bias_scales(torch.from_numpy(fpq.w_bias))
y_kernel = kernels.fpq_linear(
    codes,
    w_codes,
    torch.from_numpy(k),
    a_si.float(),
    w_si.float(),
    (a_fmt.ebits, a_fmt.mbits),
    (w_fmt.ebits, w_fmt.mbits),
)
print(
    "Triton FP linear vs reference layer, max abs diff:",
    float((y_kernel.double() - torch.from_numpy(Xs[:32] @ Ws.T).double()).abs().max()),
)

f_res = fast.search(
    torch.from_numpy(X), torch.from_numpy(W), n_candidates=50, rounds=2, preshifted=True
)
print(
    "fast search picks the same formats:",
    (f_res.w_format, f_res.a_format) == (fpq.w_format, fpq.a_format),
    f"MSE {f_res.mse:.4f}",
)

# %% [markdown]
# A small CPU timing of the quantizer (reference NumPy vs fast torch, same bits):

# %%
big = rng.standard_normal((1024, 1024)).astype(np.float32)
bias_rows = ref.bias_from_max(np.abs(big).max(axis=1, keepdims=True), E2M1)
t0 = time.perf_counter()
for _ in range(3):
    r = ref.quantize(big, E2M1, bias_rows)
t_ref = (time.perf_counter() - t0) / 3
bt, bb = torch.from_numpy(big), torch.from_numpy(bias_rows)
t0 = time.perf_counter()
for _ in range(3):
    f = fast.quantize(bt, E2M1, bb)
t_fast = (time.perf_counter() - t0) / 3
assert np.array_equal(f.numpy(), r)
print(
    f"1024x1024 E2M1, per-row real bias: reference {t_ref * 1e3:.1f} ms, fast {t_fast * 1e3:.1f} ms ({t_ref / t_fast:.1f}x)"
)

# %% [markdown]
# ## References
#
# * S.-Y. Liu, Z. Liu, X. Huang, P. Dong, K.-T. Cheng. *LLM-FP4: 4-Bit Floating-Point Quantized
#   Transformers.* EMNLP 2023. arXiv:2310.16836. Code: github.com/nbasyl/LLM-FP4.
# * The official code's known bugs (a dead last search candidate, an off-by-one index into the
#   8-bit formats, NaN on all-zero rows) are fixed here; `lowbit.reference.fpq`'s docstrings
#   say where lowbit departs from it.
