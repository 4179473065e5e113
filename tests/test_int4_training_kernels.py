"""4-bit training's Triton kernels (lowbit.kernels.int4_training) under the interpreter on small
shapes, natively with ``-m gpu``: the fused Hadamard + LSQ quantizer and the bit-splitting
gradient quantizer bit for bit against the fast path (which the reference pins), and the CUDA
dispatch of ``Int4Linear`` (kernels + the int8 GEMM) bit for bit against the CPU path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.fast import int4_training as F
from lowbit.fast.hadamard import block_hadamard
from lowbit.fast.nn.int4_training import Int4Linear


def _kernels():
    return pytest.importorskip("lowbit.kernels.int4_training")


def _data(seed: int, m: int, k: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.randn(k, generator=g).exp()
    return x.to(dtype)


@pytest.mark.interpret
@settings(max_examples=12)
@given(
    m=st.integers(1, 20), blocks=st.integers(1, 3), block=st.sampled_from([1, 2, 8, 32, 64]),
    rounding=st.sampled_from(["half_away", "half_even"]), bits=st.sampled_from([2, 4, 8]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 99),
)  # fmt: skip
def test_hadamard_quantize_kernel_is_the_fast_path(m, blocks, block, rounding, bits, dtype, seed):
    K = _kernels()
    x = _data(seed, m, block * blocks, dtype)
    if m > 1:
        x[1] = 0  # a zero row
    step = F.lsq_init(block_hadamard(x.float(), block), bits) * 0.5
    codes, x_h = K.hadamard_quantize(x, step, block, bits, rounding, keep_transform=True)
    want_h = block_hadamard(x.float(), block)  # the layer transforms in float32
    assert torch.equal(x_h, want_h)
    assert torch.equal(codes, F.lsq_encode(want_h, step, bits, rounding=rounding))


@pytest.mark.interpret
@settings(max_examples=12)
@given(
    n=st.integers(1, 40), c=st.integers(1, 70), clip=st.sampled_from(["code", "full"]),
    residual=st.sampled_from(["stochastic", "nearest"]), bits=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 2**40), zero=st.booleans(),
)  # fmt: skip
def test_bit_split_kernel_is_the_fast_path(n, c, clip, residual, bits, seed, zero):
    K = _kernels()
    g = _data(seed % 1000, n, c) * (0 if zero else 1e-3)
    F_ref, S_ref, sigma = F.bit_split(g, bits, clip=clip, seed=seed, residual=residual)
    key = F._stream_key(seed, 0)
    F_k, S_k, f_norm, s_norm = K.bit_split(g, sigma, key, bits, clip, residual)
    assert torch.equal(F_k, F_ref) and torch.equal(S_k, S_ref)
    assert torch.equal(f_norm, (F_ref.int() ** 2).sum(1)) and torch.equal(
        s_norm, (S_ref.int() ** 2).sum(1)
    )


@pytest.mark.interpret
def test_hadamard_quantize_kernel_refuses_blocks_it_cannot_hold():
    K = _kernels()
    with pytest.raises(ValueError, match="block=512 must be a power of two <= 256"):
        K.hadamard_quantize(torch.zeros(2, 512), torch.tensor(1.0), 512)
    codes, t = K.hadamard_quantize(torch.zeros(0, 64), torch.tensor(1.0), 64)
    assert codes.shape == (0, 64) and t is None


def _trained_pair(sampling: bool):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 40)
    x = torch.randn(24, 64)
    layer = Int4Linear.from_linear(lin, sampling=sampling, block=32)
    layer(x)  # initialise
    return layer, x


@pytest.mark.interpret
@pytest.mark.parametrize("sampling", [False, True])
def test_cuda_dispatch_glue_under_interpreter(monkeypatch, sampling):
    """Int4Linear with every kernel dispatched (fused quantizer, int8 GEMM, bit split), run on
    CPU tensors through the interpreter: output and gradients bit for bit the torch path's."""
    import lowbit.fast.int4_training as fast_int4

    _kernels()
    layer, x = _trained_pair(sampling)
    want = {}
    for dispatched in (False, True):
        if dispatched:
            monkeypatch.setattr(fast_int4, "on_triton_device", lambda t: True)
        layer.zero_grad()
        layer.calls = 1
        xg = x.clone().requires_grad_(True)
        y = layer(xg)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        got = {"y": y.detach(), "x": xg.grad, **{n: p.grad for n, p in layer.named_parameters()}}
        if not dispatched:
            want = got
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.gpu
@pytest.mark.parametrize("sampling", [False, True])
def test_native_int4_linear_matches_the_cpu_path(sampling):
    layer, x = _trained_pair(sampling)
    outputs = {}
    for device in ("cpu", "cuda"):
        layer = layer.to(device)
        layer.zero_grad()
        layer.calls = 1
        xg = x.to(device).clone().requires_grad_(True)
        y = layer(xg)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape))
        outputs[device] = [y.detach().cpu(), xg.grad.cpu(), layer.weight.grad.cpu()]
    for a, b in zip(outputs["cpu"], outputs["cuda"]):
        if sampling:  # the sampled weight gradient is a float GEMM (cuBLAS vs CPU order)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
        else:
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_int4_linear_forward_is_cuda_graph_capturable():
    layer, x = _trained_pair(False)
    layer = layer.cuda().eval()
    x = x.cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        layer(x)  # warm-up: Triton compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
