"""Linear8bitLt (lowbit.fast.nn) and model conversion / safetensors round trip (lowbit.fast.convert),
on toy layers, a tiny LLaMA built from a config, and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lowbit.fast import llm_int8 as F
from lowbit.fast.convert import load_quantized, replace_linears, restore_linears, save_quantized
from lowbit.fast.nn import QUANTIZED_MODULES, Linear8bitLt
from lowbit.reference import llm_int8 as R
from torch import nn

from tests.pairs import PAIRS
from tests.tolerances import MATMUL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_linear8bitlt_matches_reference_dequantized_variant(dtype, threshold):
    torch.manual_seed(0)
    lin = nn.Linear(70, 33).to(dtype)
    mod = Linear8bitLt.from_linear(lin, threshold=threshold)
    x = torch.randn(2, 9, 70).to(dtype)
    x[..., 4] *= 20  # an outlier feature
    y = mod(x)
    assert y.dtype == dtype and y.shape == (2, 9, 33)
    # Bit-identical to the functional fast path with the bitsandbytes outlier variant.
    y_fn = F.matmul(x, lin.weight.detach(), lin.bias.detach(), threshold, "dequantized")
    assert torch.equal(y, y_fn)
    to_np = lambda t: t.float().numpy()  # noqa: E731
    ref = R.matmul(
        to_np(x), to_np(lin.weight.detach()), to_np(lin.bias.detach()), threshold, "dequantized"
    )
    naive = PAIRS["llm_int8.matmul"].naive(
        x, lin.weight.detach(), lin.bias.detach(), threshold, "dequantized"
    )
    assert not MATMUL.check_with_naive(to_np(y), ref, to_np(naive)).any()
    # Weights stored once as int8 + one float32 scale per output feature.
    assert mod.weight_codes.dtype == torch.int8 and mod.weight_absmax.dtype == torch.float32
    codes, absmax, _ = R.vectorwise_quant(to_np(lin.weight.detach()))
    np.testing.assert_array_equal(mod.weight_codes.numpy(), codes)
    back = mod.to_linear()
    assert isinstance(back, nn.Linear) and back.weight.dtype == dtype
    assert torch.equal(
        back.weight.detach(), torch.from_numpy(R.vectorwise_dequant(codes, absmax)).to(dtype)
    )


def test_linear8bitlt_gradients_flow_to_input_and_bias():
    torch.manual_seed(1)
    lin = nn.Linear(16, 8)
    mod = Linear8bitLt.from_linear(lin, threshold=6.0)
    mod.bias.requires_grad_(True)
    x = torch.randn(5, 16, requires_grad=True)
    mod(x).sum().backward()
    wdq = R.vectorwise_dequant(mod.weight_codes.numpy(), mod.weight_absmax.numpy())
    # float32 sums of 8 terms of size <= max|W|: the error bound is 8 * 2**-24 * 8 * max|W|.
    bound = 64 * 2.0**-24 * float(np.abs(wdq).max())
    np.testing.assert_allclose(x.grad.numpy(), np.ones((5, 8)) @ wdq, rtol=0, atol=bound)
    np.testing.assert_array_equal(mod.bias.grad.numpy(), np.full(8, 5.0))


def test_linear8bitlt_config_round_trip_and_errors():
    mod = Linear8bitLt.from_linear(nn.Linear(12, 4, bias=False), threshold=3.0)
    shell = Linear8bitLt.from_config(mod.lowbit_config())
    shell.load_state_dict(mod.state_dict(), strict=True)
    x = torch.randn(3, 12)
    assert torch.equal(shell(x), mod(x))
    assert "Linear8bitLt" in QUANTIZED_MODULES
    with pytest.raises(ValueError, match="expects"):
        mod(torch.randn(3, 5))
    with pytest.raises(ValueError, match="nn.Linear"):
        Linear8bitLt.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt(4, 4, threshold=-1)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_convert_llama_skips_lm_head_and_round_trips(tmp_path):
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    replace_linears(model, lambda name, lin: Linear8bitLt.from_linear(lin), progress=False)
    assert type(model.lm_head) is nn.Linear  # skipped by default (tied to the embeddings)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear8bitLt)
    assert isinstance(model.model.layers[1].mlp.down_proj, Linear8bitLt)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    path = tmp_path / "tiny.safetensors"
    save_quantized(model, path)
    fresh = load_quantized(_tiny_llama(), path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)
    restore_linears(fresh)
    assert not any(isinstance(m, Linear8bitLt) for m in fresh.modules())
    with pytest.raises(ValueError, match="does not exist"):
        load_quantized(_tiny_llama(), tmp_path / "missing.safetensors")


def _minilm():
    try:
        from lowbit.fast.models import load_minilm

        return load_minilm()
    except Exception as exc:  # model package missing
        pytest.skip(f"all-MiniLM-L6-v2 not available: {exc}")


def test_minilm_int8_quality_and_safetensors_round_trip(tmp_path):
    from lowbit.fast.models import embed

    model, tok = _minilm()
    texts = ["Now is the winter of our discontent.", "To be, or not to be, that is the question."]
    fp = embed(model, tok, texts)
    replace_linears(
        model, lambda name, lin: Linear8bitLt.from_linear(lin, threshold=6.0), progress=False
    )
    n_int8 = sum(isinstance(m, Linear8bitLt) for m in model.modules())
    assert n_int8 == 36  # 6 layers x (q, k, v, attention output, intermediate, output)
    q = embed(model, tok, texts)
    assert float((q * fp).sum(-1).min()) > 0.99
    path = tmp_path / "minilm-int8.safetensors"
    save_quantized(model, path)
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write left no temporary file
    fresh, _ = _minilm()
    load_quantized(fresh, path)
    assert torch.equal(embed(fresh, tok, texts), q)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.slow
def test_report_rows_on_minilm_order_the_methods():
    """The report rows on real MiniLM: per-tensor absmax is clearly worst (the paper's point)."""
    from lowbit.fast import report

    _minilm()
    ctx = report.build_context("minilm", 8, 8, progress=False)
    rows = report.ROW_BUILDERS["llm_int8"](ctx)
    assert [r.config for r in rows] == [
        "W8A8 absmax per-tensor",
        "W8A8 vector-wise",
        "W8A8 vector-wise + decomposition (6.0)",
    ]
    per_tensor, vectorwise, decomposed = (r.quality for r in rows)
    assert per_tensor < vectorwise and per_tensor < decomposed
    assert decomposed > 0.99
    assert "llm_int8_outlier_dims.png" in ctx.figures
