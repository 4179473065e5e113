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
# # Test your kernel against the reference
#
# You wrote a quantizer: a CUDA or Triton kernel, a torch function, a cast in another
# framework. `lowbit.fast.testing` tells you, bit for bit, where it disagrees with lowbit's
# reference. It is the kit lowbit's own tests run its fast path through:
#
# * `assert_matches_reference(fn, op)` runs your `fn` (it has the signature of
#   `lowbit.reference.<op>`, takes torch tensors and returns tensors or arrays) and the
#   reference on the inputs lowbit's tests draw for that op: shapes around tile edges, ties,
#   subnormals, overflow, signed zeros, Inf and NaN. Codes must match exactly. On a mismatch it
#   reports the worst element: the input there, both outputs with their bits, and how many
#   elements differ.
# * `exhaustive_16bit(fn, op, fmt)` tries all 65,536 float16 and all 65,536 bfloat16 bit
#   patterns and counts the mismatches by class.
# * `strategies` holds the Hypothesis strategies behind them, for your own properties.
# * In pytest, the fixture `lowbit_oracle` is the same module:
#   `def test_mine(lowbit_oracle): lowbit_oracle.assert_matches_reference(...)`.
#
# Install it with `pip install 'lowbit[testing]'` (it adds Hypothesis and ml_dtypes). Below are
# two worked examples: torch's own float8 cast, and a small quantizer with a deliberate bug.

# %%
import numpy as np
import torch

import lowbit.fast.testing as kit

# %% [markdown]
# ## 1. torch's `float8_e4m3fn` cast, exhaustively
#
# A cast from a 16-bit float has only 65,536 possible inputs per dtype, so it can be checked
# completely. The reference's `formats.encode(x, "e4m3fn", saturate=...)` offers both overflow
# behaviours: `saturate=True` clamps to ±448, `saturate=False` follows OCP casting (E4M3FN has
# no Inf, so overflow becomes NaN, as in `ml_dtypes`). Which one does torch implement? The
# function under test takes the reference's arguments and ignores those it does not need.


# %%
def torch_e4m3(x: torch.Tensor, fmt, saturate: bool = True) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).view(torch.uint8)


print(kit.exhaustive_16bit(torch_e4m3, "formats.encode", "e4m3fn", saturate=True))

# %% [markdown]
# No mismatch against the saturating reference, on all 131,072 inputs. Against OCP casting:

# %%
report = kit.exhaustive_16bit(
    torch_e4m3, "formats.encode", "e4m3fn", saturate=False, raise_on_mismatch=False
)
print(report)

# %% [markdown]
# Every mismatch is an overflow or an infinity. Values from 464 up (the midpoint between 448
# and the next step, 480, which E4M3FN spends on NaN) and ±Inf become ±448 (code 126) in torch,
# NaN (code 127) in the OCP cast. torch's float8 cast saturates, Inf included. Neither is
# wrong, but a kernel that claims to match one of them can now be held to it. Without
# `raise_on_mismatch=False` the same table is raised as an `AssertionError`, which is what a
# test wants. The [oracle page](../oracle.md) lists what `ml_dtypes` does.
#
# ## 2. A quantizer with a rounding bug
#
# Here is a hand-written E2M1 (FP4) fake quantizer in torch. It scales each value by the step
# of its binade and rounds with `floor(v + 0.5)`, which rounds ties **away from zero** where
# the format (and every OCP implementation) rounds them to even. Most inputs are not ties, so
# random tests often pass.


# %%
def my_e2m1_quantize(x: torch.Tensor, fmt, **unused) -> torch.Tensor:
    a = x.abs().float().clamp(max=6.0)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    q = torch.floor(a / step + 0.5) * step  # the bug: ties go up, not to even
    return torch.copysign(q.clamp(max=6.0), x.float()).to(x.dtype)  # keeps -0.0


x = torch.tensor([0.3, 1.1, 2.4, 5.2])
print("looks right:", my_e2m1_quantize(x, "e2m1fn").tolist())

# %% [markdown]
# `values_for(fmt)` draws values from every region of a format: grid points, exact midpoints
# (ties), near-ties, overflow, signed zeros. The function under test handles E2M1 in float32
# only, so the inputs are mapped to that one format and dtype:

# %%
from lowbit.reference.formats import parse_format

E2M1 = parse_format("e2m1fn")
inputs = kit.strategies.values_for(E2M1, specials=False).map(
    lambda v: (v.astype(np.float32), "e2m1fn")
)
try:
    kit.assert_matches_reference(my_e2m1_quantize, "formats.quantize", inputs=inputs, seed=0)
except AssertionError as failure:
    print(failure)

# %% [markdown]
# The report names the op, the tier (bit-exact: fake-quantized values are decoded codes), how
# many elements of the failing input differ, and the worst one: the input, which lies exactly
# halfway between two grid points, and both results with their sign, exponent and mantissa
# bits. Your function rounded the tie away from zero; the reference rounded it to the
# neighbour with the even mantissa. Hypothesis shrank the failing input first. Under pytest
# the same `AssertionError` fails the test, and Hypothesis adds the failing input to the
# message.
#
# Fixed, with torch's round-half-to-even, the same check passes:


# %%
def fixed_e2m1_quantize(x: torch.Tensor, fmt, **unused) -> torch.Tensor:
    a = x.abs().float().clamp(max=6.0)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    q = torch.round(a / step) * step  # ties to even
    return torch.copysign(q.clamp(max=6.0), x.float()).to(x.dtype)


kit.assert_matches_reference(fixed_e2m1_quantize, "formats.quantize", inputs=inputs, seed=0)
print("no mismatch")

# %% [markdown]
# ## 3. In your test suite
#
# With lowbit installed, pytest offers the `lowbit_oracle` fixture:
#
# ```python
# def test_my_kernel_rounds_like_the_reference(lowbit_oracle):
#     lowbit_oracle.assert_matches_reference(
#         my_cuda_encode, "formats.encode", device="cuda", max_examples=500
#     )
# ```
#
# `device="cuda"` hands your function CUDA tensors; `numpy_inputs=True` hands it NumPy arrays.
# Without `inputs=`, the inputs are lowbit's own strategy for the op, formats included (random
# ExMy floats, ints and the named formats): `kit.ops()` lists the ops that have one. For a
# kernel that supports only some formats, map a strategy to them as above.
