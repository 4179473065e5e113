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
# # Training with 4-bit integers: the Hadamard quantizer, bit splitting and leverage scores
#
# Xi, Li, Chen and Zhu, *Training Transformers with 4-bit Integers* (NeurIPS 2023,
# arXiv:2306.11987) run all three matmuls of every linear layer in INT4, the forward
# $Y = XW^\top$ and the two backward ones, $\nabla_X = G W$ and $\nabla_W = G^\top X$:
#
# * **Forward, the Hadamard quantizer (HQ, section 4).** Outlier channels ruin a 4-bit
#   per-tensor quantizer. Multiplying $X$ and $W$ by the same orthonormal block-diagonal
#   Hadamard matrix $H$ along the reduction dimension changes nothing in the product,
#   $(XH)(WH)^\top = XW^\top$, but spreads each outlier over its block. Both are then quantized
#   with a learned step size (LSQ): $q = \operatorname{clamp}(\lfloor x/s \rceil, -8, 7)$.
# * **Backward, bit splitting and leverage-score sampling (LSS, section 5).** The output
#   gradient $G$ is too wide for 4 bits, so it is split into two INT4 matrices,
#   $G \approx (14F + S)/\sigma$, a high part and a stochastically rounded residual. Stacked,
#   $[F; S]$ has twice the rows; LSS keeps about half of them, each with a probability
#   proportional to its leverage score, and divides the kept rows by that probability, which
#   keeps the estimator unbiased at the cost of one INT4 GEMM.
#
# This tutorial follows the reference (`lowbit.reference.hadamard`,
# `lowbit.reference.int4_training`, NumPy) step by step and then trains with the fast path's
# `Int4Linear` (`lowbit.fast.nn.int4_training`).

# %%
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math
import time

import matplotlib.pyplot as plt
import numpy as np

from lowbit.fast import int4_training as fast
from lowbit.fast.nn.int4_training import convert_for_training
from lowbit.reference import hadamard as H
from lowbit.reference import int4_training as ref

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The Hadamard transform spreads an outlier
#
# A batch of activations with one outlier channel (channel 5, 40 times the others), the
# situation of BERT's and LLaMA's residual streams. After `block_hadamard(x, 64)` the outlier's
# energy is shared by the 64 channels of its block, and the 4-bit per-tensor quantizer's step
# no longer has to cover one huge channel.

# %%
x = rng.standard_normal((256, 128)).astype(np.float32)
x[:, 5] *= 40
x_h = H.block_hadamard(x, 64)
errors = {}
for name, t, block in (("no transform", x, 1), ("Hadamard, block 64", x_h, 64)):
    step = ref.lsq_init(t)
    back = H.block_hadamard(ref.lsq_quantize(t, step), block)  # quantize, transform back
    errors[name] = np.linalg.norm(back - x) / np.linalg.norm(x)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
axes[0].bar(range(128), np.abs(x).max(0), color="C3", label="x")
axes[0].bar(range(128), np.abs(x_h).max(0), color="C0", alpha=0.8, label="x H")
axes[0].set_xlabel("channel")
axes[0].set_ylabel("max |value| over the batch")
axes[0].set_title("an outlier channel, before and after the transform")
axes[0].legend()
axes[1].bar(list(errors), list(errors.values()), color=["C3", "C0"])
axes[1].set_ylabel("relative error of the 4-bit x")
axes[1].set_title("4-bit LSQ at its initial step")
plt.tight_layout()
plt.show()
print({k: round(float(v), 3) for k, v in errors.items()})

# %% [markdown]
# The product does not need an inverse transform: $\tilde X \tilde W^\top = XW^\top$ (up to
# rounding). The layer picks its block once, on its first batch, as the official code does:
# `hq_search` tries every power of two dividing the input width and keeps the one with the
# smallest $\lVert \hat X - X\rVert\,\lVert \hat W - W\rVert$.

# %%
w = (rng.standard_normal((64, 128)) * 0.1).astype(np.float32)
print("max |XH (WH)^T - XW^T| =", float(np.abs(x_h @ H.block_hadamard(w, 64).T - x @ w.T).max()))
best, blocks, errs = ref.hq_search(x, w)
print("block search:", dict(zip(blocks.tolist(), np.round(errs, 1).tolist())), "-> best", best)

# %% [markdown]
# ## 2. LSQ: a learned step size
#
# The step starts at $s = 2\,\overline{|x|}/\sqrt{7}$ and is then learned with the gradient of
# Esser et al.: straight through for $x$ inside the range, and for $s$ the sum of
# $\lfloor v\rceil - v$ (inside) or the clamp bound (outside), scaled by
# $1/\sqrt{n \cdot 7}$. A step too small clips, too large rounds coarsely; the loss
# $\lVert \hat x - x\rVert^2$ is minimised near where its gradient crosses zero.

# %%
t = x_h.astype(np.float64)
steps = np.linspace(0.2, 3.0, 40) * float(ref.lsq_init(t))
mse, grad = [], []
for s in steps:
    x_hat = ref.lsq_quantize(t, s)
    mse.append(float(np.mean((x_hat - t) ** 2)))
    _, g_s = ref.lsq_quantize_grad(t, s, 2 * (x_hat - t) / t.size)  # d mse / d s
    grad.append(float(g_s))
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.plot(steps, mse, label="quantization MSE")
ax2 = ax.twinx()
ax2.plot(steps, grad, color="C1", label="LSQ gradient of the MSE")
ax2.axhline(0, color="grey", lw=0.5)
ax.axvline(float(ref.lsq_init(t)), color="grey", linestyle="--", label="initial step")
ax.set_xlabel("step size s")
ax.set_ylabel("MSE")
ax2.set_ylabel("d MSE / d s (LSQ)")
ax.set_title("LSQ's step gradient points to the MSE's minimum")
fig.legend(loc="upper center", fontsize=8)
plt.show()

# %% [markdown]
# ## 3. Bit splitting reconstructs a gradient
#
# $\sigma = 196 / (2\max|G|)$ maps $G$ onto $[-98, 98]$; $F = \lfloor G\sigma/14 \rceil$ and
# the residual $G\sigma - 14F \in [-7, 7]$ is rounded stochastically into $S$. With
# `clip="full"` the split is unbiased; the released CUDA kernels clamp both parts to $\pm 6$
# (`clip="code"`), which returns the largest gradients at $90/98$ of their value.

# %%
g = (rng.standard_normal((64, 32)) * rng.exponential(size=(64, 32)) ** 2).astype(np.float32)
for clip in ("full", "code"):
    F, S, sigma = ref.bit_split(g, clip=clip, seed=0)
    merged = ref.bit_merge(F, S, sigma)
    i = np.unravel_index(np.argmax(np.abs(g)), g.shape)
    print(f"clip={clip!r}: F in [{F.min()}, {F.max()}], S in [{S.min()}, {S.max()}], "
          f"max error {np.abs(merged - g).max() * sigma:.2f}/sigma, "
          f"largest gradient comes back at {merged[i] / g[i]:.3f}")  # fmt: skip

# the unbiasedness check: the mean over seeds converges to G
means = [np.mean([ref.bit_merge(*ref.bit_split(g, clip="full", seed=k)) for k in range(n)], 0)
         for n in (1, 10, 100)]  # fmt: skip
print("mean |average over seeds - G| x sigma:",
      [round(float(np.abs(m - g).mean() * sigma), 4) for m in means])  # fmt: skip

# %% [markdown]
# ## 4. Leverage-score sampling keeps the rows that matter
#
# For $\nabla_W = G^\top X$ the score of a split row is $\lVert g_i\rVert\,\lVert x_i\rVert$:
# tokens with small gradients or small inputs contribute little and are mostly dropped.
# `lss_probabilities` scales the scores to an expected budget of $N$ rows (half of the $2N$),
# capping at 1 and redistributing (the official fix-up loop); `lss_sample` draws them with a
# seed. The estimator divides the kept rows by $p_i$, so its mean over seeds is the exact
# product.

# %%
tokens = 48
g = (
    rng.standard_normal((tokens, 32)) * np.where(rng.random(tokens) < 0.3, 3.0, 0.2)[:, None]
).astype(np.float32)
q_x = rng.integers(-8, 8, (tokens, 40)).astype(np.int8)
F, S, sigma = ref.bit_split(g, clip="full", seed=1)
x_norm = np.linalg.norm(q_x.astype(float), axis=1)
scores = np.concatenate([14 * np.linalg.norm(F.astype(float), axis=1) * x_norm,
                         np.linalg.norm(S.astype(float), axis=1) * x_norm])  # fmt: skip
p = ref.lss_probabilities(scores.astype(np.float32), tokens)
kept = ref.lss_sample(p, seed=3, stream=1)
fig, ax = plt.subplots(figsize=(10, 3))
ax.bar(range(2 * tokens), p, color=np.where(kept, "C0", "lightgrey"))
ax.axvline(tokens - 0.5, color="k", lw=0.8)
ax.set_xlabel("split row (left: the 14F rows, right: the S rows)")
ax.set_ylabel("keep probability p")
ax.set_title(f"LSS: {int(kept.sum())} of {2 * tokens} rows kept (blue), budget {tokens}")
plt.show()

exact = ref.lss_grad_weight(F, S, sigma, q_x, 0.1, sampling=False)
estimates = [ref.lss_grad_weight(F, S, sigma, q_x, 0.1, seed=k) for k in range(400)]
print(
    "relative error of one estimate:",
    round(float(np.linalg.norm(estimates[0] - exact) / np.linalg.norm(exact)), 3),
)
print(
    "relative error of the mean of 400:",
    round(float(np.linalg.norm(np.mean(estimates, 0) - exact) / np.linalg.norm(exact)), 3),
)

# %% [markdown]
# The fast path draws the same random numbers (a counter-based hash of the seed, the stream
# and the element index), so it is checked against the reference bit for bit, sampled rows
# included:

# %%
T = torch.from_numpy
fast_kept = fast.lss_sample(T(p), seed=3, stream=1)
print("same kept rows:", bool(np.array_equal(fast_kept.numpy(), kept)))
print(
    "same split:",
    all(
        np.array_equal(a, b.numpy())
        for a, b in zip(ref.bit_split(g, seed=5), fast.bit_split(T(g), seed=5))
    ),
)

# %% [markdown]
# ## 5. Training with `Int4Linear`
#
# `convert_for_training` swaps `Int4Linear` into a model (here a small MLP on a regression with
# one outlier feature; `lowbit report --methods int4_training` and `lowbit train` do it for a
# LLaMA language model and for MiniLM). The first training batch picks each layer's Hadamard
# block and initialises its steps; every step then draws new rows.


# %%
def data(n=2048, d=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[:, 5] *= 10
    w = torch.randn(1, d, generator=gen) / math.sqrt(d)
    return x, torch.tanh(2 * x @ w.t()) + 0.05 * torch.randn(n, 1, generator=gen)


def train(model, x, y, steps=200):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = torch.nn.functional.mse_loss(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


x_train, y_train = data()
recipes = {"FP32": None, "LSQ only": {"block": 1, "sampling": False},
           "HQ + bit split": {"sampling": False}, "HQ + LSS": {"sampling": True}}  # fmt: skip
curves = {}
for name, options in recipes.items():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 1))
    if options is not None:
        convert_for_training(model, skip=(), progress=False, **options)
    start = time.perf_counter()
    curves[name] = train(model, x_train, y_train)
    print(
        f"{name:15s} final loss {np.mean(curves[name][-20:]):.4f}  ({time.perf_counter() - start:.1f} s)"
    )

fig, ax = plt.subplots(figsize=(7, 3.5))
for name, losses in curves.items():
    ax.plot(np.convolve(losses, np.ones(10) / 10, mode="valid"), label=name)
ax.set_yscale("log")
ax.set_xlabel("optimizer step")
ax.set_ylabel("training MSE (running mean of 10)")
ax.set_title("A two-layer network trained in full precision and in INT4")
ax.legend()
plt.show()

# %% [markdown]
# `Int4Linear` keeps the float weights as the optimizer's master copy, so
# `lowbit.fast.convert.restore_linears(model)` gives back plain `nn.Linear`s with the trained
# weights (`to_linear(quantized=True)` gives the weights the INT4 forward used). On CUDA the
# layer runs the fused Hadamard + quantize kernel, the int8 GEMM (Hopper has no INT4 tensor
# cores; INT4 codes multiply exactly in int8) and the bit-splitting kernel.
#
# **References.** H. Xi, C. Li, J. Chen, J. Zhu, *Training Transformers with 4-bit Integers*,
# NeurIPS 2023 (arXiv:2306.11987), official code `xijiu9/Train_Transformers_with_INT4`;
# S. K. Esser et al., *Learned Step Size Quantization*, ICLR 2020.
