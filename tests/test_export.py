"""``lowbit.fast.export`` and ``lowbit export``: the folders load with the other library's own
loader (transformers + compressed-tensors ``from_pretrained``), and the loaded model computes
bit for bit what a dense model holding lowbit's dequantized weights computes (float32)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers

from lowbit.fast import cli, export, uniform
from lowbit.fast.models import load_minilm

pytest.importorskip("compressed_tensors")


def _tiny_llama(tie: bool = False) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _dense_copy(model, bits, group_size, symmetric, ignore=("lm_head",)):
    """The same architecture holding lowbit's RTN weights, dequantized (the comparison)."""
    dense = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in ignore:
                m.weight.copy_(
                    uniform.quantize(
                        m.weight, bits, symmetric=symmetric, group_size=group_size,
                        granularity="channel" if group_size is None else "group",
                    )
                )  # fmt: skip
    return dense


def _pack_by_hand(values: np.ndarray, bits: int) -> np.ndarray:
    """A row-wise little-endian bit stream built with Python integers (independent of torch)."""
    rows = []
    for row in values:
        stream = 0
        for j, v in enumerate(row.tolist()):
            stream |= int(v) << (j * bits)
        words = -(-len(row) * bits // 32)
        rows.append([(stream >> (32 * k)) & 0xFFFFFFFF for k in range(words)])
    return np.array(rows, dtype=np.uint64).astype(np.uint32).view(np.int32)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_rows_is_the_little_endian_bit_stream(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=(5, 37))
    packed = export.pack_rows(torch.from_numpy(values), bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-37 * bits // 32))
    np.testing.assert_array_equal(packed.numpy(), _pack_by_hand(values, bits))


def test_four_bit_codes_go_low_nibble_first():
    packed = export.pack_rows(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), 4)
    assert int(packed[0, 0]) == np.array(0xF7654321, np.uint32).view(np.int32)


@pytest.mark.parametrize(
    "bits, group_size", [(4, 32), (4, None), (8, None), (8, 32), (3, 32)], ids=str
)
def test_symmetric_pack_quantized_loads_bit_exact(tmp_path, bits, group_size):
    model = _tiny_llama()
    out = export.export(model, tmp_path / "ct", bits=bits, group_size=group_size, progress=False)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    q = "model.layers.0.self_attn.q_proj"
    assert {f"{q}.weight_packed", f"{q}.weight_scale", f"{q}.weight_shape"} <= keys
    assert f"{q}.weight" not in keys and "lm_head.weight" in keys  # the head stays float
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    dense = _dense_copy(model, bits, group_size, True)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, dense(ids).logits)
        assert not torch.equal(dense(ids).logits, model(ids).logits)  # it did quantize


def test_asymmetric_loads_bit_exact_with_dequantize(tmp_path):
    """Zero points load only through CompressedTensorsConfig(dequantize=True): the default path
    expects an unpacked [O, I/G] zero point (an upstream bug, llm-compressor #1618)."""
    model = _tiny_llama()
    out = export.export(model, tmp_path / "ct", bits=4, group_size=32, symmetric=False,
                        progress=False)  # fmt: skip
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
    ).eval()  # fmt: skip
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, _dense_copy(model, 4, 32, False)(ids).logits)


def test_fp8_float_quantized_loads_bit_exact(tmp_path):
    from lowbit.fast import formats

    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3].zero_()  # a zero row: scale 0, no NaN
    out = export.export(model, tmp_path / "fp8", method="fp8", bits=8, group_size=None,
                        progress=False)  # fmt: skip
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float-quantized"
    dense = copy.deepcopy(model)
    with torch.no_grad():  # W = e4m3(W / s) * s, s = row absmax / 448, written independently
        for name, m in dense.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                s = m.weight.abs().amax(1, keepdim=True) / 448
                q = formats.quantize(m.weight / torch.where(s > 0, s, 1.0), "e4m3fn") * s
                m.weight.copy_(q)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.isfinite(logits).all() and torch.equal(logits, dense(ids).logits)
    with pytest.raises(ValueError, match="--bits 8 --group-size 0"):
        export.export(model, tmp_path / "bad", method="fp8", bits=4, progress=False)


def test_tied_embeddings_stay_tied_and_the_model_is_untouched(tmp_path):
    model = _tiny_llama(tie=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export.export(model, tmp_path / "ct", bits=4, group_size=32, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, _dense_copy(model, 4, 32, True)(ids).logits)


def test_cli_exports_minilm_that_transformers_loads(tmp_path, capsys):
    out = tmp_path / "minilm-w4"
    argv = ["export", "--model", "minilm", "--method", "rtn", "--bits", "4", "--group-size",
            "128", "--format", "compressed-tensors", "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "compressed-tensors, rtn W4A16 g128" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["quant_method"] == "compressed-tensors"
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 128
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # nothing left over

    fp, tokenizer = load_minilm()
    batch = tokenizer(["To be, or not to be", "that is the question"], padding=True,
                      return_tensors="pt")  # fmt: skip
    loaded = transformers.AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.pooler is not None  # exported too: no weight is missing or left random
    with torch.no_grad():
        got = loaded(**batch).last_hidden_state
        want = _dense_copy(fp, 4, 128, True)(**batch).last_hidden_state
    assert torch.equal(got, want)


def test_cli_fp8_and_bitsandbytes_defaults(tmp_path, capsys):
    out = tmp_path / "minilm-fp8"
    assert cli.main(["export", "--method", "fp8", "--out", str(out), "--no-progress"]) == 0
    assert "fp8 W8A16 per channel" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["format"] == "float-quantized" and weights["type"] == "float"
    assert weights["strategy"] == "channel" and weights["group_size"] is None
    int8 = tmp_path / "minilm-int8"
    assert (
        cli.main(["export", "--format", "bitsandbytes", "--out", str(int8), "--no-progress"]) == 0
    )
    assert "llm_int8 W8A8" in capsys.readouterr().out
    config = json.loads((int8 / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_8bit"] is True


def test_bitsandbytes_int8_loads_as_bitsandbytes_modules(tmp_path):
    """A Linear8bitLt model as a Hugging Face bitsandbytes checkpoint: transformers loads every
    linear as bitsandbytes.nn.Linear8bitLt holding lowbit's codes and row absmax exactly, and
    its LLM.int8() forward (float16, eval) is within tier B of lowbit's float64 result: at most
    twice the error of lowbit's own module run in float16."""
    bnb = pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    from lowbit.fast.convert import replace_linears
    from lowbit.fast.nn import Linear8bitLt
    from lowbit.fast.testing import MATMUL

    model = _tiny_llama()
    q = copy.deepcopy(model)
    replace_linears(q, lambda n, lin: Linear8bitLt.from_linear(lin) if n != "lm_head" else None,
                    progress=False)  # fmt: skip
    out = export.export(q, tmp_path / "bnb", "bitsandbytes", method="llm_int8", progress=False)
    # a dense model exports the same codes (quantized like Linear8bitLt.from_linear)
    dense_out = export.export(model, tmp_path / "bnb2", "bitsandbytes", method="llm_int8",
                              progress=False)  # fmt: skip
    from safetensors.torch import load_file

    assert (
        load_file(str(out / "model.safetensors")).keys()
        == load_file(str(dense_out / "model.safetensors")).keys()
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, device_map="cpu", dtype=torch.float16
    ).eval()
    ours = dict(q.named_modules())
    theirs = {n: m for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)}
    assert set(theirs) == {n for n, m in ours.items() if isinstance(m, Linear8bitLt)}
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(5)).half()
    for name, m in theirs.items():
        mine = ours[name]
        assert torch.equal(m.weight.data, mine.weight_codes)
        assert torch.equal(m.weight.SCB, mine.weight_absmax)
        if m.in_features == 64:
            with torch.no_grad():
                got = m(x).double().numpy()
                truth = mine(x.double()).numpy()  # lowbit's LLM.int8() in float64
                naive = mine(x).double().numpy()  # the same LLM.int8() in float16
            assert not MATMUL.check_with_naive(got, truth, naive).any(), name


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError):
        export.export(_tiny_llama(), tmp_path / "ct", bits=4, group_size=32, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial one


def test_what_the_format_cannot_hold_is_refused_in_one_line(tmp_path):
    model = _tiny_llama()
    cases = [
        (dict(bits=5), "3-, 4- or 8-bit"),
        (dict(group_size=48), "'model.layers.0.self_attn.q_proj' has 64 inputs"),
        (dict(format="gguf"), "unknown export format 'gguf'"),
        (dict(method="gptq"), "cannot hold method 'gptq'"),
        (dict(method="llm_int8"), "(format bitsandbytes holds it)"),
    ]
    for kwargs, phrase in cases:
        with pytest.raises(ValueError) as err:
            export.export(model, tmp_path / "x", progress=False, **{"group_size": 32, **kwargs})
        assert phrase in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export.export(model, tmp_path / "full", group_size=32, progress=False)
    with pytest.raises(ValueError, match="PreTrainedModel"):
        export.export(torch.nn.Linear(4, 4), tmp_path / "y", progress=False)
    assert cli.main(["export", "--out", str(tmp_path / "full")]) == 2  # before loading a model
    fresh = str(tmp_path / "fresh")
    assert cli.main(["export", "--format", "bitsandbytes", "--method", "rtn", "--out", fresh]) == 2
    assert not (tmp_path / "fresh").exists()
