"""OmniQuant on models: ``OmniQuantLinear`` (packed codes, exactly the fake-quantized layer,
safetensors round trip), the block-wise ``calibrate`` on tiny BERT and LLaMA (GQA) models built
from configs, its LET wiring proven exact in float64 inside the real Hugging Face blocks, and
the attention-input quantizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.fast import omniquant as F
from lowbit.fast.convert import load_quantized, save_quantized
from lowbit.fast.models import block_output, capture_block_inputs, transformer_blocks
from lowbit.fast.nn import omniquant as noq
from lowbit.fast.nn.omniquant import OmniQuantLinear, calibrate, quantize_attention_inputs

transformers = pytest.importorskip("transformers")


def _tiny_llama(dtype=torch.float32, init=0.02):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=True, initializer_range=init,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _tiny_bert(dtype=torch.float32):
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).to(dtype).eval()


def _batches(n=3, length=9, pad=True):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (2, length), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[1, length - 3 :] = 0  # a padded second sequence
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _calls(model, block, batches):
    """The calls reaching ``block`` (no KV cache: the same call may run twice)."""
    no_cache = {"use_cache": False} if "use_cache" in model.config.to_dict() else {}
    return capture_block_inputs(model, block, batches, **no_cache).calls


def _hidden(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ---- OmniQuantLinear -----------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size,in_features", [(4, None, 40), (3, 16, 40), (2, 8, 43)])
def test_omniquant_linear_is_the_fake_quantized_layer(bits, group_size, in_features):
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 6)
    with torch.no_grad():
        lin.weight[2] = 0.0  # a zero row
    groups = F.group_count(in_features, group_size)
    gamma = torch.randn(6, groups) + 2.0
    beta = torch.randn(6, groups) + 2.0
    mod = OmniQuantLinear.from_linear(lin, bits, group_size, 4, gamma, beta)
    want_w = F.quantize_weight(lin.weight.detach(), bits, group_size, gamma, beta)
    assert torch.equal(mod.dequantized_weight(), want_w)
    # bit stream per row: ceil(in * bits / 8) bytes, padded to whole pack groups
    assert mod.weight_packed.dtype == torch.uint8
    assert mod.weight_packed.shape[1] * 8 >= in_features * bits
    assert mod.weight_packed.shape[1] * 8 < (in_features + 8) * bits
    codes, _, _ = F.encode_weight(lin.weight.detach(), bits, group_size, gamma, beta)
    assert torch.equal(mod.codes(), codes)
    x = torch.randn(3, 5, in_features)
    want = nn.functional.linear(F.quantize_activation(x, 4), want_w, lin.bias.detach())
    assert torch.equal(mod(x), want)
    assert mod(torch.zeros(0, in_features)).shape == (0, 6)
    x16 = mod(x.to(torch.bfloat16))
    assert x16.dtype == torch.bfloat16


def test_omniquant_linear_config_and_safetensors_round_trip(tmp_path):
    model = _tiny_llama()
    calibrate(model, _batches(2), wbits=3, group_size=16, epochs=1, progress=False)
    ids = _batches(1)[0]
    out = _hidden(model, ids)
    path = tmp_path / "omni.safetensors"
    save_quantized(model, path)
    fresh = load_quantized(_tiny_llama(), path)
    assert torch.equal(_hidden(fresh, ids), out)
    q = fresh.model.layers[0].self_attn.q_proj
    assert isinstance(q, OmniQuantLinear) and (q.bits, q.group_size) == (3, 16)
    assert OmniQuantLinear.from_config(q.lowbit_config()).lowbit_config() == q.lowbit_config()
    with pytest.raises(ValueError, match="bits must be from 2 to 8"):
        OmniQuantLinear(8, 4, bits=9)
    with pytest.raises(ValueError, match="expects an nn.Linear"):
        OmniQuantLinear.from_linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="floating-point input"):
        q(torch.ones(2, 32, dtype=torch.long))


# ---- LET inside the real blocks: exact in float64 --------------------------------------------


def _perturbed_plan(model, opts):
    """A _Plan for block 0 with random LET parameters (far from 1: a real test)."""
    block = transformer_blocks(model)[0]
    plan = noq._Plan(block, model.config, opts)
    g = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64) * 3.0 + 0.25

    d = model.config.hidden_size
    if plan.kind == "llama":
        hd = d // plan.heads
        plan.let = {
            "qkv_scale": rand(d), "fc1_scale": rand(d),
            "out_scale": rand(plan.kv * hd), "qk_half": rand(plan.kv, hd // 2),
        }  # fmt: skip
    else:
        plan.let = {
            "qk_scale": rand(d), "out_scale": rand(d),
            "out_shift": torch.randn(d, generator=g, dtype=torch.float64),
        }  # fmt: skip
    return block, plan


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_bert])
def test_let_in_the_block_is_an_exact_equivalence(make):
    """The LET transformations calibrate applies (GQA v -> o, rotary q/k pairs, norm -> linears
    for LLaMA; v -> o with shift and q/k for BERT) leave the block's output unchanged."""
    model = make(torch.float64)
    opts = noq._settings(
        wbits=4, abits=16, group_size=None, symmetric=False, lwc=False, let=True, alpha=0.5,
        epochs=0, lwc_lr=1e-2, let_lr=5e-3, aug_loss=False,
    )  # fmt: skip
    block, plan = _perturbed_plan(model, opts)
    args, kwargs = _calls(model, block, _batches(1))[0]
    with torch.no_grad():
        want = block_output(block(*args, **kwargs))
        norms, W, B = plan.transformed()
        params = dict(norms)
        for key, path in plan.names.items():
            params[f"{path}.weight"] = W[key]
            if B[key] is not None:
                params[f"{path}.bias"] = B[key]
        got = block_output(torch.func.functional_call(block, params, args, kwargs))
        changed = max(float((W[k] - plan.linears[k].weight).abs().max()) for k in W)
    assert changed > 0.1  # the weights really moved
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-12


# ---- calibrate ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_bert])
def test_calibrate_without_training_is_rtn(make):
    """No LWC, no LET, no epochs: every linear becomes min-max RTN of its original weight."""
    model = make()
    original = copy.deepcopy(model)
    report = calibrate(model, _batches(2), wbits=4, lwc=False, epochs=0, progress=False)
    assert [b.losses for b in report.blocks] == [[], []]
    pairs = [(n, m) for n, m in model.named_modules() if isinstance(m, OmniQuantLinear)]
    assert len(pairs) == 2 * (7 if make is _tiny_llama else 6)
    for name, mod in pairs:
        w = original.get_submodule(name).weight.detach()
        assert torch.equal(mod.dequantized_weight(), F.quantize_weight(w, 4))


@pytest.mark.parametrize(
    "make,opts",
    [
        (_tiny_llama, dict(wbits=3, group_size=16, let=True)),
        (_tiny_llama, dict(wbits=4, abits=6, let=True, aug_loss=True)),
        (_tiny_bert, dict(wbits=4, abits=4, let=True)),
        (_tiny_bert, dict(wbits=2, group_size=8)),
    ],
)
def test_calibrated_block_computes_the_training_forward(make, opts):
    """After calibration the packed block computes exactly the fake-quantized block the last
    step trained (LET folded in float32, no fp16 merge mismatch), and training lowered the loss."""
    model = make()
    original = copy.deepcopy(model)
    batches = _batches(3)
    report = calibrate(model, batches, epochs=4, lwc_lr=5e-2, progress=False, **opts)
    first = report.blocks[0]
    assert first.losses[-1] < first.losses[0]
    settings = report.settings
    block, trained = transformer_blocks(original)[0], transformer_blocks(model)[0]
    plan = noq._Plan(block, original.config, settings)
    plan.let, plan.lwc = first.let, first.lwc
    calls = _calls(original, block, batches)
    if settings["abits"] < 16:
        quantize_attention_inputs(original, settings["abits"])
    with torch.no_grad(), noq._activation_quant(plan.linears.values(), settings["abits"]):
        for args, kwargs in calls:
            want = block_output(torch.func.functional_call(block, plan.overrides(), args, kwargs))
            got = block_output(trained(*args, **kwargs))
            assert torch.equal(got, want)


def test_calibrate_beats_rtn_at_three_bits():
    """Weights of std 0.3 (the default 0.02 makes the block losses ~1e-6 and their LWC
    gradients ~1e-12, below Adam's eps: nothing moves); the final hidden states are closer to
    full precision than RTN's."""
    model, rtn = _tiny_llama(init=0.3), _tiny_llama(init=0.3)
    batches = _batches(4)
    calibrate(rtn, batches, wbits=3, lwc=False, epochs=0, progress=False)
    calibrate(model, batches, wbits=3, epochs=8, lwc_lr=5e-2, progress=False)
    ref = _tiny_llama(init=0.3).model(**batches[0]).last_hidden_state
    err_rtn = float(((rtn.model(**batches[0]).last_hidden_state - ref) ** 2).mean())
    err_oq = float(((model.model(**batches[0]).last_hidden_state - ref) ** 2).mean())
    assert err_oq < 0.95 * err_rtn


def test_padding_is_left_out_of_the_loss():
    y = torch.zeros(2, 3, 4)
    target = torch.zeros(2, 3, 4)
    target[1, 2] = 100.0  # a padding position
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert float(noq._masked_mse(y, target, mask)) == 0.0
    assert float(noq._masked_mse(y, target, None)) > 0.0


def test_calibrate_bad_input():
    with pytest.raises(ValueError, match="at least one calibration batch"):
        calibrate(_tiny_llama(), [], progress=False)
    with pytest.raises(TypeError, match="tokenizer output"):
        calibrate(_tiny_llama(), [[1, 2, 3]], progress=False)
    with pytest.raises(ValueError, match="no transformer block list"):
        calibrate(nn.Sequential(nn.Linear(2, 2)), _batches(1), progress=False)
    with pytest.raises(ValueError, match="bits must be from 2 to 8"):
        calibrate(_tiny_llama(), _batches(1), wbits=1, progress=False)
    with pytest.raises(ValueError, match="lwc_lr must be a positive"):
        calibrate(_tiny_llama(), _batches(1), lwc_lr=float("nan"), progress=False)
    with pytest.raises(ValueError, match=r"blocks are bfloat16: call model.float\(\) first"):
        calibrate(_tiny_llama(torch.bfloat16), _batches(1), progress=False)
    with pytest.raises(TypeError, match="let must be True or False"):
        calibrate(_tiny_llama(), _batches(1), let=1, progress=False)


def test_calibrate_stops_on_a_non_finite_loss_or_weight():
    model = _tiny_llama()
    with torch.no_grad():  # finite, but the full-precision target overflows
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 3e38
    with pytest.raises(ValueError, match=r"block 1: the loss is (nan|inf) .* lower the learning"):
        calibrate(model, _batches(1), epochs=1, progress=False)
    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"self_attn.v_proj.weight .* 1 non-finite"):
        calibrate(model, _batches(1), epochs=1, progress=False)


def test_input_ids_tensors_are_accepted():
    model = _tiny_llama()
    ids = [b["input_ids"] for b in _batches(2)]
    report = calibrate(model, ids, epochs=1, progress=False)
    assert len(report.blocks) == 2 and all(len(b.losses) == 1 for b in report.blocks)


# ---- attention inputs -------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_bert])
def test_attention_inputs_are_quantized_per_token_and_head(make, monkeypatch):
    model = make()
    batch = _batches(1)[0]
    fp = _hidden(model, batch)
    seen = []
    real = F.quantize_activation

    def spy(x, bits=8):
        seen.append((tuple(x.shape), bits))
        return real(x, bits)

    monkeypatch.setattr(noq.oq, "quantize_activation", spy)
    quantize_attention_inputs(model, 4)
    q4 = _hidden(model, batch)
    heads = model.config.num_attention_heads
    assert (tuple(seen[0][0][:2]), seen[0][1]) == ((2, heads), 4)  # (batch, heads, tokens, d)
    assert len(seen) == 3 * 2  # Q, K, V in each of the two blocks
    assert not torch.equal(q4, fp)
    quantize_attention_inputs(model, 16)
    assert torch.equal(_hidden(model, batch), fp)
    with pytest.raises(ValueError, match="Hugging Face PreTrainedModel"):
        quantize_attention_inputs(nn.Linear(2, 2), 4)


# ---- the report section ---------------------------------------------------------------------


class _TinyLlamaContext:
    """A stand-in for the report's ``Context`` around the tiny LLaMA (seconds, not minutes)."""

    model_name = "tiny-llama"
    quality_name = "hidden-state cosine"
    higher_is_better = True
    progress = False

    def __init__(self, quick: bool, full: bool = False):
        self.quick, self.full = quick, full
        self.figures: dict[str, bytes] = {}
        self.calib_texts, self.eval_texts = ["calibration"], ["evaluation"]
        self.model = _tiny_llama(init=0.3)
        self.eval_batch = _batches(1, length=12, pad=False)[0]

    def linears(self, model=None):
        model = self.model if model is None else model
        return {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and "lm_head" not in n
        }

    def fresh_copy(self):
        return copy.deepcopy(self.model)

    def calib_inputs(self):
        return {"x": torch.randn(16, 32, generator=torch.Generator().manual_seed(0))}

    def calib_batches(self, batch_size=None, passages=None):
        return _batches(3)

    def evaluate(self, model):
        with torch.no_grad():
            ref = self.model.model(**self.eval_batch).last_hidden_state
            out = model.model(**self.eval_batch).last_hidden_state
        return float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean())

    tokenizer = None  # no text: sections that train on tokens need the real Context

    def token_batches(self, seq_len=64, batch_size=8, split="calib"):
        raise NotImplementedError("this stand-in has no token stream")


@pytest.mark.parametrize("tier", ["quick", "default", "full"])
def test_report_section_rows(tier):
    from lowbit.fast import report
    from lowbit.fast.report import omniquant as section

    ctx = _TinyLlamaContext(quick=tier == "quick", full=tier == "full")
    assert isinstance(ctx, report.ReportContext)
    rows = report.omniquant_rows(ctx)
    labels = [r.config for r in rows]
    settings = [s[0] for s in section.OMNIQUANT_SETTINGS]
    if tier != "full":  # the three settings where OmniQuant gains most
        settings = [s for s in settings if s in section.OMNIQUANT_DEFAULT]
        assert settings == ["W3A16 g128", "W2A16 g64", "W4A4"]
    assert labels == [f"{s} {m}" for s in settings for m in ("RTN", "LWC", "LWC+LET")]
    by = {r.config: r for r in rows}
    # stored bits: codes + 48 bits of scale and zero point per group; per channel (and with
    # g64 / g128 here, as no linear has more than 64 inputs) that is one group per row
    lins = ctx.linears().values()
    per_row = 48 * sum(m.out_features for m in lins) / sum(m.weight.numel() for m in lins)
    assert by["W4A4 RTN"].wbits == pytest.approx(4 + per_row)
    assert by["W2A16 g64 RTN"].wbits == pytest.approx(2 + per_row)
    assert by["W4A4 RTN"].abits == 4.0 and by["W3A16 g128 RTN"].abits is None
    assert by["W3A16 g128 LWC+LET"].weight_rel_err is None  # LET-rescaled: not comparable
    assert by["W4A4 RTN"].act_rel_err is not None
    if tier == "full":
        assert by["W4A16 RTN"].wbits == pytest.approx(4 + per_row)
        assert by["W6A6 RTN"].act_rel_err is not None and by["W4A16 RTN"].abits is None
    assert all(-1.0 <= r.quality <= 1.0 + 1e-6 for r in rows)
    calib = report.for_tier(
        ctx,
        section.OMNIQUANT_CALIB,
        quick=section.OMNIQUANT_CALIB_QUICK,
        full=section.OMNIQUANT_CALIB_FULL,
    )
    assert f"{calib['epochs']} epochs" in by["W3A16 g128 LWC"].note
    assert "aug_loss" in by["W4A4 LWC+LET"].note and "Q/K/V" in by["W4A4 RTN"].note
    if tier != "quick":  # training helps where RTN is worst
        assert by["W3A16 g128 LWC"].quality > by["W3A16 g128 RTN"].quality


def test_half_keeps_the_scales_and_train_mode_gives_no_dropout():
    model = _tiny_bert()
    model.train()  # dropout on: calibrate must capture in eval mode
    a = calibrate(copy.deepcopy(model), _batches(2), epochs=1, progress=False)
    b = calibrate(copy.deepcopy(model), _batches(2), epochs=1, progress=False)
    assert [blk.losses for blk in a.blocks] == [blk.losses for blk in b.blocks]
    calibrate(model, _batches(2), epochs=0, lwc=False, progress=False)
    assert model.training  # the mode is given back
    q = model.encoder.layer[0].attention.self.query
    w = q.dequantized_weight()
    model.half()
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.float16
    assert torch.equal(q.dequantized_weight(), w)


def test_calibrate_refuses_architectures_whose_let_is_not_exact():
    cfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="model types llama, mistral, qwen2, bert, roberta"):
        calibrate(model, _batches(1), progress=False)
