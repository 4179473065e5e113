"""OmniQuant's Triton kernels (lowbit.kernels.omniquant) under the interpreter on small shapes,
natively with ``-m gpu``: the per-token activation quantizer bit for bit against the fast path,
the W4A16 dequantize-GEMM against float64 (tier B)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.fast import omniquant as F
from lowbit.fast.nn.omniquant import OmniQuantLinear
from lowbit.fast.testing.tiers import MATMUL


def _kernels():
    return pytest.importorskip("lowbit.kernels.omniquant")


def _rows(seed: int, m: int, k: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.randn(k, generator=g).exp()
    if kind == "edges" and m >= 3:
        x[0] = 0.0  # zero row: s = 1e-5
        x[1] = 3.0e3  # constant row: hi = lo, x / s = 3e8 (beyond the 2^22 rounding trick)
        x[2, ::2] = 1e-6  # tiny range
    if kind == "edges" and m >= 6:
        x[3, 0] = float("nan")  # the whole row becomes NaN, as torch's amax makes it
        x[4, -1] = float("inf")  # the scale saturates at 1e4
        x[5, 0] = float("-inf")
    return x


@pytest.mark.interpret
@settings(max_examples=10)
@given(
    m=st.integers(1, 9), k=st.integers(1, 80), bits=st.sampled_from([2, 3, 4, 6, 8]),
    kind=st.sampled_from(["plain", "edges"]), seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)  # fmt: skip
def test_activation_kernel_is_the_fast_path_bit_for_bit(m, k, bits, kind, seed, dtype):
    K = _kernels()
    x = _rows(seed, m, k, "edges" if kind == "edges" and m < 6 else "plain").to(dtype)
    got = K.quantize_activation(x, bits)
    want = F.quantize_activation(x, bits)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got.float().numpy(), want.float().numpy())


@pytest.mark.interpret
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_kernel_edge_rows(bits):
    """Zero, constant and tiny-range rows (the scale clamps), NaN and ±Inf rows, bit for bit
    with the torch path (which refuses non-finite input on CPU: its values are computed here
    with the check lifted, as on CUDA)."""
    import lowbit.fast.omniquant as fast_oq

    K = _kernels()
    x = _rows(7, 6, 33, "edges")
    got = K.quantize_activation(x, bits)
    with torch.no_grad():
        f = fast_oq._forward(x, bits, x.shape[1], None, None, False)
    want = fast_oq._values(f)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert torch.isnan(got[3]).all() and torch.isfinite(got[[0, 1, 2]]).all()


def _layer(seed: int, n: int, k: int, group_size: int | None) -> OmniQuantLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight[1] = 0.0  # a zero row
        lin.weight[2] += 5.0  # a row far from zero: zero point outside the code range
    return OmniQuantLinear.from_linear(lin, 4, group_size)


@pytest.mark.interpret
@pytest.mark.parametrize("m", [1, 5, 17])
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w4a16_kernel_matches_float64(m, group_size, dtype):
    K = _kernels()
    mod = _layer(m, 40, 64, group_size)
    x = torch.randn(m, 64).to(dtype)
    y = K.w4a16_linear(
        x, mod.weight_packed, mod.weight_scale, mod.weight_zero, mod.bias,
        group_size=group_size or 64,
    )  # fmt: skip
    assert y.dtype == dtype and y.shape == (m, 40)
    w = mod.dequantized_weight().double()
    truth = x.double() @ w.T + mod.bias.double()
    naive = (x @ w.to(dtype).T + mod.bias.to(dtype)).double()
    assert not MATMUL.check_with_naive(y.double().numpy(), truth.numpy(), naive.numpy()).any()


@pytest.mark.interpret
def test_w4a16_kernel_refuses_what_it_cannot_compute():
    K = _kernels()
    mod = _layer(0, 8, 48, 24)  # 24 is no multiple of 16
    with pytest.raises(ValueError, match="multiple of 16"):
        K.w4a16_linear(
            torch.randn(2, 48), mod.weight_packed, mod.weight_scale, mod.weight_zero,
            group_size=24,
        )  # fmt: skip
    assert K.block_k_for(128) == 128 and K.block_k_for(48) == 16 and K.block_k_for(24) is None
    empty = K.w4a16_linear(
        torch.randn(0, 48), _layer(0, 8, 48, 16).weight_packed,
        _layer(0, 8, 48, 16).weight_scale, _layer(0, 8, 48, 16).weight_zero, group_size=16,
    )  # fmt: skip
    assert empty.shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 2048])
def test_native_w4a16_and_activation_kernels(dtype, m):
    K = _kernels()
    mod = _layer(0, 768, 1024, 128).cuda()
    x = torch.randn(m, 1024, device="cuda").to(dtype)
    y = mod(x)  # dispatches to the kernel
    w = mod.dequantized_weight().double()
    truth = x.double() @ w.T + mod.bias.double()
    naive = (x @ w.to(dtype).T + mod.bias.to(dtype)).double()
    bad = MATMUL.check_with_naive(
        y.double().cpu().numpy(), truth.cpu().numpy(), naive.cpu().numpy()
    )
    assert not bad.any()
    xa = torch.randn(m, 1024, device="cuda")
    got = K.quantize_activation(xa, 4).cpu()
    assert torch.equal(got, F.quantize_activation(xa.cpu(), 4))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_dispatch_glue_under_interpreter(monkeypatch, dtype):
    """The CUDA branches (OmniQuantLinear -> w4a16_linear, quantize_activation -> its kernel)
    run on CPU tensors through the interpreter: the activations bit for bit, the layer tier B."""
    import lowbit.fast.omniquant as fast_oq
    import lowbit.kernels

    _kernels()
    mod = _layer(3, 40, 64, 32)
    x = torch.randn(2, 3, 64).to(dtype)
    want_y = mod(x)
    want_a = F.quantize_activation(x, 4)
    monkeypatch.setattr(lowbit.kernels, "on_triton_device", lambda t: True)
    monkeypatch.setattr(fast_oq, "on_triton_device", lambda t: True)
    got_a = F.quantize_activation(x, 4)
    np.testing.assert_array_equal(got_a.float().numpy(), want_a.float().numpy())
    with torch.no_grad():
        got_y = mod(x)
    assert got_y.shape == want_y.shape and got_y.dtype == dtype
    X = x.reshape(-1, 64)
    w = mod.dequantized_weight().double()
    truth = (X.double() @ w.T + mod.bias.double()).reshape(want_y.shape)
    naive = (X @ w.to(dtype).T + mod.bias.to(dtype)).double().reshape(want_y.shape)
    assert not MATMUL.check_with_naive(got_y.double().numpy(), truth.numpy(), naive.numpy()).any()
    # with autograd the torch path runs (the kernels have no backward)
    xg = x.float().requires_grad_(True)
    F.quantize_activation(xg, 4).sum().backward()
    assert xg.grad is not None


@pytest.mark.gpu
def test_omniquant_linear_forward_is_cuda_graph_capturable():
    mod = _layer(0, 256, 512, 128).cuda()
    x = torch.randn(16, 512, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mod(x)  # warm-up (Triton compiles outside the capture)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mod(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, mod(x), rtol=0, atol=0)
