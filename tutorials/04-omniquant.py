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
# # OmniQuant: learned clipping and learned equivalent transformations
#
# Shao et al., *OmniQuant: Omnidirectionally Calibrated Quantization for Large Language Models*
# (ICLR 2024, arXiv:2308.13137) keep the plain uniform quantizer and learn two small sets of
# parameters instead, one transformer block at a time, by gradient descent on the block's
# output error:
#
# * **LWC**, learnable weight clipping (section 3.2): each weight row (or group) quantizes the
#   range $[\sigma(\beta)\min W, \sigma(\gamma)\max W]$ instead of $[\min W, \max W]$; $\gamma$
#   and $\beta$ are learned logits, initialised at 4 ($\sigma(4) = 0.982$).
# * **LET**, learnable equivalent transformation (section 3.3): per-channel scales $s$ (and
#   shifts $\delta$) with $XW^\top + b = \big((X-\delta)/s\big)\big(W\operatorname{diag}(s)\big)^\top
#   + (b + W\delta)$. Outlier channels of $X$ are divided down and the weights absorb them;
#   the transformation is folded into the previous norm or linear, so it costs nothing at
#   inference.
#
# The quantizer is $s = (x_{max} - x_{min})/(2^b - 1)$, $z = \lfloor -x_{min}/s \rceil$,
# $\hat x = (\operatorname{clamp}(\lfloor x/s \rceil + z, 0, 2^b - 1) - z)\,s$; gradients pass the
# rounding straight through (STE). This tutorial follows the reference
# (`lowbit.reference.omniquant`, NumPy, analytic gradients) and checks the fast path
# (`lowbit.fast.omniquant`, torch autograd) and the model-level calibration
# (`lowbit.fast.nn.omniquant`) against it.

# %%
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU through the interpreter; it must be on before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import time

import matplotlib.pyplot as plt
import numpy as np

from lowbit.fast import omniquant as fast
from lowbit.reference import omniquant as ref

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. LWC on one layer: the learned clipping range
#
# A 3-bit layer whose weights have heavy tails (Student-t, 3 degrees of freedom): min-max
# spends most of the 8 levels on a few extreme weights. `calibrate_linear` trains $\gamma,
# \beta$ with a hand-written Adam on the layer's output error; every gradient comes from
# `quantize_weight_grad`, the analytic gradient of the official code's autograd graph.

# %%
x = rng.standard_normal((512, 64))
w = rng.standard_t(3, size=(16, 64)) * 0.05
y = x @ w.T

rtn = ref.quantize_weight(w, bits=3)  # min-max round to nearest
result = ref.calibrate_linear(x, w, wbits=3, lwc=True, let=False, steps=300, lwc_lr=5e-2)
lwc = ref.quantize_weight(w, 3, None, result.gamma, result.beta)


def mse(wq: np.ndarray) -> float:
    return float(np.mean((x @ wq.T - y) ** 2))


print(f"output MSE  min-max RTN: {mse(rtn):.3e}   LWC: {mse(lwc):.3e}")

sig = lambda g: 1 / (1 + np.exp(-g))  # noqa: E731
rows = np.arange(w.shape[0])
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.vlines(rows, w.min(1), w.max(1), color="lightgray", lw=6, label="min-max range")
ax1.vlines(
    rows, sig(result.beta[:, 0]) * w.min(1), sig(result.gamma[:, 0]) * w.max(1), color="C0", lw=2,
    label="learned range",
)  # fmt: skip
ax1.set(xlabel="output row", ylabel="weight", title="LWC clipping per row (W3)")
ax1.legend()
ax2.plot(result.losses)
ax2.set(xlabel="Adam step", ylabel="output MSE", title="one-layer calibration", yscale="log")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. LET moves an outlier channel into the weights
#
# Give two input channels a 40x larger range (BERT and LLaMA activations have a few such
# channels). The SmoothQuant-style initialisation $s_j = \max|X_j|^{\alpha} / \max|W_{:j}|^{1-\alpha}$
# ($\alpha = 0.5$) divides them down; the weights' columns grow by the same factor, and the
# product is unchanged.

# %%
x_out = rng.standard_normal((512, 64))
x_out[:, [5, 40]] *= 40.0
w2 = rng.standard_normal((32, 64)) * 0.05
s = ref.smooth_scale(np.abs(x_out).max(0), w2, alpha=0.5)
x_let, w_let = x_out / s, w2 * s
print("product unchanged:", np.allclose(x_let @ w_let.T, x_out @ w2.T, rtol=1e-12))

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for ax, (a, b, title) in zip(
    axes, [(x_out, x_let, "activations: max |X_j|"), (w2, w_let, "weights: max |W_:j|")]
):
    ax.bar(np.arange(64), np.abs(a).max(0), color="lightgray", label="before")
    ax.bar(np.arange(64), np.abs(b).max(0), color="C1", alpha=0.7, label="after LET")
    ax.set(xlabel="input channel j", title=title)
    ax.legend()
plt.tight_layout()
plt.show()

for bits in (4, 6):
    err_plain = np.mean((ref.quantize_activation(x_out, bits) @ w2.T - x_out @ w2.T) ** 2)
    err_let = np.mean(
        (ref.quantize_activation(x_let, bits) @ ref.quantize_weight(w_let, bits).T - x_out @ w2.T)
        ** 2
    )
    err_rtn = np.mean(
        (ref.quantize_activation(x_out, bits) @ ref.quantize_weight(w2, bits).T - x_out @ w2.T) ** 2
    )
    print(f"W{bits}A{bits} output MSE  RTN: {err_rtn:.3e}  with LET init: {err_let:.3e}"
          f"  (activation rounding alone: {err_plain:.3e})")  # fmt: skip

# %% [markdown]
# The paper's point is that these scales are a starting point: LET learns them too, with the
# gradient of `let_linear_loss_grad` (scale and shift enter the loss through both $X'$ and $W'$).

# %% [markdown]
# ## 3. The fast path computes what the reference computes
#
# `lowbit.fast.omniquant` is the same quantizer in torch: the forward bit for bit, the
# gradients from a `torch.autograd.Function` whose backward is the reference's formula.

# %%
wt = torch.from_numpy(w.astype(np.float32))
g = rng.standard_normal((16, 2)).astype(np.float32) + 3
b = rng.standard_normal((16, 2)).astype(np.float32) + 3
gt, bt = torch.from_numpy(g), torch.from_numpy(b)
same = np.array_equal(
    ref.quantize_weight(w.astype(np.float32), 3, 32, g, b),
    fast.quantize_weight(wt, 3, 32, gt, bt).numpy(),
)
gw = wt.clone().requires_grad_(True)
gg, gb = gt.clone().requires_grad_(True), bt.clone().requires_grad_(True)
up = rng.standard_normal(w.shape).astype(np.float32)
(fast.quantize_weight(gw, 3, 32, gg, gb) * torch.from_numpy(up)).sum().backward()
r_w, r_g, r_b = ref.quantize_weight_grad(w.astype(np.float32), 3, 32, g, b, grad_output=up)
print("forward bit for bit:", same)
for name, a, c in (("w", r_w, gw.grad), ("gamma", r_g, gg.grad), ("beta", r_b, gb.grad)):
    print(f"grad {name:5}: max |autograd - analytic| = {np.abs(a - c.numpy()).max():.1e}")

# %% [markdown]
# ## 4. Block-wise calibration of a real model
#
# `lowbit.fast.nn.omniquant.calibrate` runs the official loop on a Hugging Face model: for each
# block, the full-precision block's output (on the full-precision chain) is the target, the
# quantized block runs on the already-quantized chain, AdamW trains the LWC logits (and the LET
# scales), then LET is folded into the weights and every linear becomes a packed
# `OmniQuantLinear`. Here: all-MiniLM-L6-v2 at W3A16 with groups of 128 inputs, a short run.
#
# Only transformations that are exact equivalences are applied (each proven in float64 by the
# tests, inside the real Hugging Face blocks):
#
# * LLaMA (pre-RMSNorm): norm → q/k/v and norm → gate/up; v → o with grouped-query attention
#   (SmolLM2 has 9 query heads and 3 KV heads: one scale per KV channel, repeated for the query
#   heads that share it); q/k with one scale per rotary pair $(i, i + d/2)$, so that RoPE
#   commutes with the scaling.
# * BERT (post-LayerNorm): v → o (with a shift when activations are quantized; attention rows
#   sum to 1, so the shift passes through) and q/k. Not norm → linear: the LayerNorm's output is
#   also the residual stream, which a scaled norm would change.

# %%
from lowbit.fast.nn.omniquant import OmniQuantLinear, calibrate
from lowbit.fast.report.context import build_context

ctx = build_context("minilm", calib_size=8, eval_size=16, progress=False)
batches = ctx.calib_batches(batch_size=2)
rtn_model, oq_model = ctx.fresh_copy(), ctx.fresh_copy()
calibrate(rtn_model, batches, wbits=3, group_size=128, lwc=False, epochs=0, progress=False)
t0 = time.perf_counter()
report = calibrate(
    oq_model, batches, wbits=3, group_size=128, epochs=3, lwc_lr=5e-2, progress=False
)
seconds = time.perf_counter() - t0
print(f"calibrated {len(report.blocks)} blocks in {seconds:.1f} s")
print(f"embedding cosine vs FP   RTN: {ctx.evaluate(rtn_model):.4f}   OmniQuant (LWC): "
      f"{ctx.evaluate(oq_model):.4f}")  # fmt: skip

plt.figure(figsize=(5, 3))
for blk in report.blocks:
    plt.plot(range(1, len(blk.losses) + 1), blk.losses, marker="o", label=f"block {blk.index}")
plt.gca().set(xlabel="epoch", ylabel="mean block MSE", title="block loss during calibration")
plt.legend(fontsize=7, ncol=2)
plt.tight_layout()
plt.show()

# %% [markdown]
# The packed layer stores 3-bit codes as a bit stream (three bytes per eight weights), a float32
# scale and an int16 zero point per group; its weight is bit for bit the fake-quantized weight
# the last training step used, so nothing shifts between "evaluate after training" and
# "evaluate the saved model" (the official code merges in fp16 and does shift).

# %%
q = oq_model.encoder.layer[0].attention.self.query
print(q)
print("codes bytes per row:", q.weight_packed.shape[1], "for", q.in_features, "weights")
lwc_logits = report.blocks[0].lwc["q"]
w_fp = ctx.model.encoder.layer[0].attention.self.query.weight.detach()
print(
    "packed weight == trained fake quantization:",
    torch.equal(q.dequantized_weight(), fast.quantize_weight(w_fp, 3, 128, *lwc_logits)),
)

# %% [markdown]
# ## 5. The W4A16 kernel
#
# On CUDA a 4-bit weight-only `OmniQuantLinear` runs a Triton kernel that unpacks the codes in
# registers and moves the dequantization out of the inner product,
# $\sum_k x_k (q_k - z)s = s\,(\sum_k x_k q_k - z \sum_k x_k)$, so the tensor cores multiply exact
# integer codes. Here it runs through the Triton interpreter on a small layer.

# %%
from lowbit.kernels import omniquant as kernels

lin = torch.nn.Linear(64, 24)
mod = OmniQuantLinear.from_linear(lin, bits=4, group_size=32)
xs = torch.randn(5, 64)
y_kernel = kernels.w4a16_linear(
    xs, mod.weight_packed, mod.weight_scale, mod.weight_zero, mod.bias, group_size=32
)
print("kernel vs module (torch):", float((y_kernel - mod(xs)).abs().max()))

# %% [markdown]
# ## 6. The report rows
#
# `lowbit report --methods omniquant` (and `--model smollm2`) quantizes the model at W4A16,
# W3A16 g128, W2A16 g64, W6A6 and W4A4 with RTN, LWC and LWC+LET, storing real packed weights;
# the table and its discussion are on the [benchmarks page](../benchmarks.md). As in the paper,
# the learned rows beat RTN, most at 3 and 2 bits.
#
# **References.** Shao et al., ICLR 2024, arXiv:2308.13137 (sections 3.1-3.3); the official code
# OpenGVLab/OmniQuant; Xiao et al., SmoothQuant, arXiv:2211.10438 (the LET initialisation).
