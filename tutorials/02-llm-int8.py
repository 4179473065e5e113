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
# # LLM.int8(): vector-wise int8 with outlier decomposition
#
# Dettmers et al., *LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale*
# (NeurIPS 2022, arXiv:2208.07339) quantize both operands of every linear layer to int8 and
# multiply them on integer tensor cores. Two ideas make that work:
#
# 1. **Vector-wise quantization** (Section 3.1): one absmax scale per row of X (per token) and one per
#    output feature of W, so that a product $Y_{ij} = S_{ij}\, c_{x,i}\, c_{w,j} / 127^2$ with
#    $S = X_8 W_8^\top$ accumulated exactly in int32.
# 2. **Mixed-precision decomposition** (Section 3.2): a few *feature dimensions* of the hidden
#    states carry huge values ("outlier features"). Every column $h$ of X holding a value with
#    $|x| \ge \tau = 6$ is taken out of the int8 product and multiplied in 16 bits:
#    $Y = \sum_{h \in O} X_h W_h^\top + S \cdot \sum_{h \notin O} X_{8,h} W_{8,h}^\top$.
#    The set $O$ is found from each input batch itself; no calibration.
#
# This tutorial looks for outliers in a real model (all-MiniLM-L6-v2), shows why one scale
# per tensor fails, runs the decomposition step by step with `lowbit.reference.llm_int8`,
# and checks the fast path (`lowbit.fast.llm_int8`, `lowbit.fast.nn.Linear8bitLt`) against it.

# %%
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from lowbit.fast import llm_int8 as fast
from lowbit.fast.convert import replace_linears
from lowbit.fast.data import load_texts
from lowbit.fast.models import embed, load_minilm
from lowbit.fast.nn import Linear8bitLt
from lowbit.reference import llm_int8 as ref

torch.manual_seed(0)
model, tokenizer = load_minilm()
texts = list(load_texts("calib", 12))
print(f"{len(texts)} passages, e.g.: {texts[0][:80]}...")

# %% [markdown]
# ## 1. Outliers in the real model
#
# LLM.int8() decomposes the *inputs of the linear layers*, and that is where the paper looks
# for outlier features too (the inputs of the attention projections and of the feed-forward
# expansion). We record, with forward pre-hooks, the input of every linear of model width
# (384): per layer the query/key/value input (one shared tensor), the attention-output
# projection input and the feed-forward expansion input; real tokens only.

# %%
batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
mask = batch["attention_mask"].bool()
watched = []  # (name, linear) in model order
for i, layer in enumerate(model.encoder.layer):
    watched += [
        (f"layer {i + 1} query/key/value", layer.attention.self.query),
        (f"layer {i + 1} attention output", layer.attention.output.dense),
        (f"layer {i + 1} FFN expansion", layer.intermediate.dense),
    ]
captured = {}
hooks = [
    lin.register_forward_pre_hook(
        lambda mod, args, name=name: captured.__setitem__(name, args[0][mask])
    )
    for name, lin in watched
]
with torch.no_grad():
    model(**batch)
for h in hooks:
    h.remove()
H = torch.stack([captured[name] for name, _ in watched]).numpy()  # (inputs, tokens, 384)
L, T, D = H.shape
print(f"{L} linear inputs x {T} tokens x {D} features; max |x| = {np.abs(H).max():.1f}")

per_input = (np.abs(H) >= 6.0).any(axis=1)  # (inputs, D): feature reaches 6 in that input
for (name, _), row in zip(watched, per_input):
    dims = np.flatnonzero(row)
    print(f"{name:28s}: {len(dims):3d} features with |x| >= 6, e.g. {dims[:6].tolist()}")

# %% [markdown]
# The paper calls a feature dimension an *outlier feature* when its magnitude reaches 6 in at
# least 25 % of the layers and at at least 6 % of the sequence positions (here: of the linear
# inputs above, and of the tokens). `outlier_features` applies exactly those criteria; with the
# token criterion dropped we also see the rarer candidates.

# %%
for min_token_frac in (0.06, 0.0):
    dims, magnitude, layer_frac, token_frac = ref.outlier_features(H, 6.0, 0.25, min_token_frac)
    print(f"criteria: >= 25% of inputs, >= {min_token_frac:.0%} of tokens -> {len(dims)} features")
    for d, m, lf, tf in zip(dims, magnitude, layer_frac, token_frac):
        print(f"  dim {d:3d}: max |x| {m:6.1f}, in {lf:4.0%} of inputs, at {tf:5.1%} of tokens")

# %% [markdown]
# The paper finds that such features become systematic with scale: from about 6.7B
# parameters they sit in every layer and at most tokens. A 22M-parameter encoder has only a
# handful, each in a part of the layers; the decomposition handles them all the same, because
# it looks at every batch, not at a list of features.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
axes[0].bar(np.arange(L), per_input.sum(axis=1))
axes[0].set(
    xlabel="linear input (model order)",
    ylabel="features with |x| >= 6",
    title="outlier dimensions per input",
)
axes[1].imshow(np.abs(H).max(axis=1), aspect="auto", cmap="magma", interpolation="nearest")
axes[1].set(
    xlabel="feature dimension", ylabel="linear input", title="max |x| per input and feature"
)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Why one scale per tensor fails
#
# Absmax quantization (Section 2.1) maps the largest magnitude to 127. With one scale for the
# whole tensor, the few large values set the step for everything else: most of the ordinary
# values land on a handful of codes. One scale per token is better, but an outlier in a token
# still coarsens that whole token; the decomposition takes the outlier columns out of the int8
# part. We take the linear input with the most large values.

# %%
k = int(np.argmax((np.abs(H) >= 6.0).sum(axis=(1, 2))))
name, linear = watched[k]
X = H[k]  # (tokens, 384)
print(f"input of the {name} linear")
step_tensor = np.abs(X).max() / 127
codes_tensor = np.rint(X / step_tensor)
codes_vec, absmax_vec, _ = ref.vectorwise_quant(X, threshold=0.0)
codes_dec, absmax_dec, cols = ref.vectorwise_quant(X, threshold=6.0)


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


x_tensor = codes_tensor * step_tensor
x_vec = ref.vectorwise_dequant(codes_vec, absmax_vec)
x_dec = np.where(cols[None, :], X, ref.vectorwise_dequant(codes_dec, absmax_dec))
print(
    f"per-tensor absmax: step {step_tensor:.4f}, {np.mean(np.abs(codes_tensor) <= 2):.0%} of codes in [-2, 2], error {rel_err(x_tensor, X):.4f}"
)
print(
    f"vector-wise:       median step {np.median(absmax_vec) / 127:.4f}, error {rel_err(x_vec, X):.4f}"
)
print(
    f"+ decomposition:   {cols.sum()} outlier columns kept in 16 bit, median step {np.median(absmax_dec) / 127:.4f}, error {rel_err(x_dec, X):.4f}"
)

# %% [markdown]
# ## 3. The decomposition step by step (reference)
#
# The same linear with the input above. Step 1 finds the outlier columns and quantizes the rest
# per token; step 2 is the int8 product with the outer-product scale; step 3 multiplies the
# outlier columns in full precision; their sum is `ref.matmul`.

# %%
W = linear.weight.detach().numpy()  # (out, 384)
b = linear.bias.detach().numpy()
X8, c_x, O = ref.vectorwise_quant(X, threshold=6.0)  # step 1: codes, per-token absmax, O
W8, c_w, _ = ref.vectorwise_quant(W)  # weights: one absmax per output feature
Y_int8 = ref.int8_matmul(X8, c_x, W8, c_w)  # step 2: exact int32 product, times c_x c_w / 127^2
Y_outlier = X[:, O].astype(np.float64) @ W[:, O].T.astype(np.float64)  # step 3: 16-bit part
Y = Y_int8 + Y_outlier + b
exact = X.astype(np.float64) @ W.T.astype(np.float64) + b
assert np.array_equal(Y, ref.matmul(X, W, b, threshold=6.0))
print(f"|O| = {O.sum()} of {len(O)} columns")
for tau in (0.0, 6.0):
    print(
        f"threshold {tau}: relative error of Y {rel_err(ref.matmul(X, W, b, threshold=tau), exact):.5f}"
    )
print(
    f"bitsandbytes variant (dequantized int8 weights on O): {rel_err(ref.matmul(X, W, b, 6.0, 'dequantized'), exact):.5f}"
)

# %% [markdown]
# ## 4. The fast path, checked against the reference
#
# `lowbit.fast.llm_int8` has the same functions on torch tensors (Triton kernels on a GPU,
# vectorised torch here). Codes, scales and outlier masks are bit-identical; the product is
# compared with the float64 reference.

# %%
Xt, Wt, bt = torch.from_numpy(X), torch.from_numpy(W), torch.from_numpy(b)
fc, fa, fo = fast.vectorwise_quant(Xt, 6.0)
assert (
    np.array_equal(fc.numpy(), X8)
    and np.array_equal(fa.numpy(), c_x)
    and np.array_equal(fo.numpy(), O)
)
Y_fast = fast.matmul(Xt, Wt, bt, threshold=6.0).numpy()
print(
    f"fast vs reference: max |diff| {np.abs(Y_fast - Y).max():.2e} (max |Y| {np.abs(Y).max():.1f}, float32 output)"
)

int8_model = copy.deepcopy(model)
replace_linears(
    int8_model, lambda name, lin: Linear8bitLt.from_linear(lin, threshold=6.0), progress=False
)
eval_texts = list(load_texts("eval", 8))
cos = (embed(int8_model, tokenizer, eval_texts) * embed(model, tokenizer, eval_texts)).sum(-1)
print(
    f"MiniLM with 36 Linear8bitLt layers: embedding cosine vs float32 {cos.mean():.4f} (min {cos.min():.4f})"
)

# %% [markdown]
# ## 5. A small CPU benchmark
#
# Row-wise quantization of a 1024 x 1024 float32 matrix: the NumPy reference, its Numba loop
# (bit-identical, goals P1/P2 of the benchmarks page), and the torch fast path. `benchmarks/llm_int8.py` runs the
# full set (and the GPU kernels against bitsandbytes when a GPU is present).

# %%
A = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
tau = np.float32(6.0)
assert np.array_equal(ref._quant_rows_numpy(A, tau)[0], ref._quant_rows_numba(A, tau)[0])


def best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


At = torch.from_numpy(A)
threads = torch.get_num_threads()
torch.set_num_threads(
    1
)  # one thread per library: on a busy 2-core machine two OpenMP threads wait on each other
t_np = best_of(lambda: ref._quant_rows_numpy(A, tau))
t_nb = best_of(lambda: ref._quant_rows_numba(A, tau))
t_fast = best_of(lambda: fast.vectorwise_quant(At, 6.0))
torch.set_num_threads(threads)
print(
    f"numpy {t_np * 1e3:.1f} ms, numba {t_nb * 1e3:.1f} ms ({t_np / t_nb:.1f}x), torch {t_fast * 1e3:.1f} ms ({t_np / t_fast:.1f}x)"
)

# %% [markdown]
# ## References
#
# * T. Dettmers, M. Lewis, Y. Belkada, L. Zettlemoyer. *LLM.int8(): 8-bit Matrix Multiplication
#   for Transformers at Scale.* NeurIPS 2022. arXiv:2208.07339.
# * bitsandbytes: `bitsandbytes.functional.int8_vectorwise_quant`, `MatMul8bitLt`
#   (the semantics lowbit follows, and where it deviates: see `lowbit.reference.llm_int8`).
# * T. Dettmers, *LLM.int8() and Emergent Features* (blog post, 2022).
