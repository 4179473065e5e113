"""``lowbit.fast.export`` and ``lowbit export``: the folders load with the other library's own
loader (transformers + compressed-tensors ``from_pretrained``), and the loaded model computes
bit for bit what a dense model holding lowbit's dequantized weights computes (float32)."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import transformers

from lowbit.fast import cli, export, formats, uniform
from lowbit.fast.models import embed, load_minilm
from lowbit.fast.nn import FormatLinear, MXLinear, RTNLinear
from tests.tiny_models import tiny_llama

pytest.importorskip("compressed_tensors")


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


def _layers_match_lowbit_modules(loaded, model, make, dtype=torch.float32):
    """Each loaded attention / MLP input projection computes what lowbit's own module for the
    same float linear computes (``make(linear)``), bit for bit."""
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(11)).to(dtype)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        mine = make(model.get_submodule(name)).to(dtype)
        with torch.no_grad():
            assert torch.equal(loaded.get_submodule(name)(x), mine(x)), name


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
    "bits, group_size",
    [(4, 32), (4, None), (8, None), (8, 32), (3, 32), (2, 32), (5, None)],
    ids=str,
)
def test_symmetric_pack_quantized_loads_bit_exact(tmp_path, bits, group_size):
    model = tiny_llama()
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
    _layers_match_lowbit_modules(
        loaded, model, lambda lin: RTNLinear.from_linear(lin, bits, group_size, symmetric=True)
    )


def test_asymmetric_loads_bit_exact_with_dequantize(tmp_path):
    """Zero points load only through CompressedTensorsConfig(dequantize=True): the default path
    expects an unpacked [O, I/G] zero point (an upstream bug, llm-compressor #1618)."""
    model = tiny_llama()
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
    model = tiny_llama()
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
    _layers_match_lowbit_modules(loaded, model, lambda lin: FormatLinear.from_linear(lin, "e4m3fn"))
    with pytest.raises(ValueError, match="--bits 8 --group-size 0"):
        export.export(model, tmp_path / "bad", method="fp8", bits=4, progress=False)


def test_tied_embeddings_stay_tied_and_the_model_is_untouched(tmp_path):
    model = tiny_llama(tie=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export.export(model, tmp_path / "ct", bits=4, group_size=32, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a folder like any other, not 0700
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

    model = tiny_llama()
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
        export.export(tiny_llama(), tmp_path / "ct", bits=4, group_size=32, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial one


def test_what_the_format_cannot_hold_is_refused_in_one_line(tmp_path):
    model = tiny_llama()
    cases = [
        (dict(bits=9), "2- to 8-bit"),
        (dict(group_size=48), "'model.layers.0.self_attn.q_proj' has 64 inputs"),
        (dict(format="onnx"), "unknown export format 'onnx'"),
        (dict(method="gptq"), "cannot hold method 'gptq'"),
        (dict(format="bitsandbytes", method="rtn"), "(format compressed-tensors holds it)"),
        (dict(method="mxfp4", group_size=16), "bits=4, group_size=32 (--bits 4 --group-size 32)"),
        (dict(method="nvfp4", group_size="auto", symmetric=False), "has no zero points"),
        (
            dict(method="llm_int8", bits=4, group_size="auto"),
            "group_size=None (--bits 8 --group-size 0)",
        ),
        (dict(method="omniquant", group_size="auto"), "run lowbit.fast.nn.omniquant.calibrate"),
        (dict(method="omniquant"), "leave bits, group_size and symmetric unset"),
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
    assert cli.main(["export", "--format", "gguf", "--out", fresh]) == 2  # MiniLM is a BERT
    assert cli.main(["export", "--method", "omniquant", "--bits", "9", "--out", fresh]) == 2
    assert not (tmp_path / "fresh").exists()


def _dense_folder(model, tmp_path, quantize, ignore=("lm_head",)):
    """A dense copy of ``model`` whose linears hold ``quantize(weight)``, saved as a plain
    checkpoint: loaded in another dtype, everything else is cast exactly as the export is."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in ignore:
                m.weight.copy_(quantize(m.weight))
    dense.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.mark.parametrize("method", ["mxfp4", "nvfp4"])
def test_fp4_pack_quantized_loads_bit_exact_in_bfloat16(tmp_path, method):
    """MXFP4 (E8M0 scales per 32) and NVFP4 (E4M3 scales per 16, a float32 global scale):
    the loader runs them in bfloat16 only; its logits equal those of a dense bfloat16 model
    holding lowbit's fake-quantized weights, bit for bit (zero rows and blocks included)."""
    from safetensors import safe_open

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3].zero_()  # a zero row
        model.model.layers[1].self_attn.o_proj.weight[:, :32].zero_()  # zero blocks
    out = export.export(model, tmp_path / method, method=method, progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == f"{method}-pack-quantized"
    q = "model.layers.0.mlp.up_proj"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        packed, scale = f.get_tensor(f"{q}.weight_packed"), f.get_tensor(f"{q}.weight_scale")
    assert packed.dtype == torch.uint8 and packed.shape == (128, 32)
    w = model.model.layers[0].mlp.up_proj.weight
    if method == "mxfp4":
        codes, scales = formats.encode_mx(w, "e2m1", 32)
        quantize = lambda w: formats.quantize_mx(w, "e2m1", 32)  # noqa: E731
    else:
        codes, scales, _ = formats.encode_nvfp4(w, global_scale=_power_of_two_scale(w))
        scale = scale.view(torch.uint8)
        quantize = _nvfp4_as_exported
    assert torch.equal(packed & 15, codes[:, 0::2]) and torch.equal(packed >> 4, codes[:, 1::2])
    assert torch.equal(scale, scales)
    if method == "nvfp4":  # a power of two within a factor 2 of 2688 / amax
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            g = f.get_tensor(f"{q}.weight_global_scale").item()
        assert math.log2(g).is_integer() and 1 <= 2688 / w.abs().max().item() / g < 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    dense = transformers.AutoModelForCausalLM.from_pretrained(
        _dense_folder(model, tmp_path, quantize), dtype=torch.bfloat16
    ).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.isfinite(logits).all() and torch.equal(logits, dense(ids).logits)
        plain = transformers.AutoModelForCausalLM.from_pretrained(
            _dense_folder(model, tmp_path / "fp", lambda w: w), dtype=torch.bfloat16
        )
        assert not torch.equal(logits, plain(ids).logits)  # it did quantize
    if method == "mxfp4":  # (lowbit's NVFP4Linear keeps NVFP4's usual global scale 2688 / amax)
        _layers_match_lowbit_modules(loaded, model, MXLinear.from_linear, torch.bfloat16)


def _power_of_two_scale(w: torch.Tensor) -> float:
    """NVFP4's global scale 2688 / amax rounded down to a power of two (float64 math)."""
    return 2.0 ** math.floor(math.log2(2688.0 / w.abs().max().double().item()))


def _nvfp4_as_exported(w: torch.Tensor) -> torch.Tensor:
    return formats.quantize_nvfp4(w, global_scale=_power_of_two_scale(w))


def _w8a8_input(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' dynamic per-token symmetric int8 activations, written from the
    format's definition: scale = amax / 127.5 (the range [-128, 127] over 255 steps)."""
    s = x.abs().amax(-1, keepdim=True) / 127.5
    return torch.clamp(torch.round(x / s), -128, 127) * s


def test_int8_w8a8_loads_bit_exact_and_tracks_lowbit_int8(tmp_path, capsys):
    """int-quantized W8A8 from LLM.int8()'s row-wise weights: the loaded logits equal a dense
    float32 model with W = q · (absmax / 127) and the format's per-token activations, bit for
    bit; each layer stays within the activation-rounding bound of lowbit's own vector-wise
    int8 (Linear8bitLt, threshold 0), whose activation grid is amax / 127 instead."""
    from lowbit.fast import llm_int8
    from lowbit.fast.nn import Linear8bitLt

    model = tiny_llama()
    with pytest.warns(UserWarning, match="no representation for LLM.int8"):
        out = export.export(model, tmp_path / "w8a8", method="llm_int8", progress=False)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert config["format"] == "int-quantized" and group["input_activations"]["dynamic"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                codes, absmax, _ = llm_int8.vectorwise_quant(m.weight, 0.0)
                m.weight.copy_(codes.float() * (absmax[:, None] / 127.0))
                m.register_forward_pre_hook(lambda mod, args: (_w8a8_input(args[0]),))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, dense(ids).logits)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(8))
    for name, theirs in loaded.named_modules():
        if not name.endswith(("q_proj", "up_proj")):
            continue
        fp = model.get_submodule(name)
        mine = Linear8bitLt.from_linear(fp, threshold=0.0)
        w = mine.dequantized_weight().double()
        with torch.no_grad():
            got, ours = theirs(x).double(), mine(x).double()
        exact = x.double() @ w.T  # the same weights, unquantized activations
        # |x - x̂| <= step / 2 per element: the output moves at most sum_k |W_jk| step_k / 2
        step = x.abs().amax(-1, keepdim=True).double() / 127.0  # lowbit's; the format's is finer
        bound = (step / 2) * w.abs().sum(1) * 1.001 + 1e-6  # plus float32 rounding
        assert ((got - exact).abs() <= bound).all() and ((ours - exact).abs() <= bound).all()
    assert cli.main(["export", "--method", "llm_int8", "--out", str(tmp_path / "cli"),
                     "--no-progress"]) == 0  # fmt: skip
    assert "outlier decomposition has no representation" in capsys.readouterr().out


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, False), (2, 32, False),
                                                         (3, None, True)], ids=str)  # fmt: skip
def test_omniquant_calibrated_weights_load_bit_exact(tmp_path, bits, group_size, symmetric):
    """A calibrated OmniQuant model (LWC + LET folded in) as pack-quantized with zero points
    (the symmetric quantizer's too: its codes reach 2^b - 1 - z = 2^(b-1), one above the
    signed range): the loader's float32 logits equal lowbit's own OmniQuantLinear model."""
    from lowbit.fast.nn.omniquant import OmniQuantLinear, calibrate

    model = tiny_llama()
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i))
               for i in range(2)]  # fmt: skip
    calibrate(model, batches, wbits=bits, group_size=group_size, symmetric=symmetric, lwc=True,
              let=True, epochs=2, progress=False)  # fmt: skip
    assert isinstance(model.model.layers[0].self_attn.q_proj, OmniQuantLinear)
    out = export.export(model, tmp_path / "oq", method="omniquant", progress=False)
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"
    ]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (
        bits, group_size, False,
    )  # fmt: skip
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True),
    ).eval()  # fmt: skip
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_omniquant_and_other_refusals(tmp_path):
    from lowbit.fast.convert import replace_linears
    from lowbit.fast.nn.omniquant import OmniQuantLinear

    def positive(name, lin):  # a group that does not straddle zero: its zero point is < 0
        if name.endswith("q_proj"):
            lin.weight.data = lin.weight.data.abs() + 0.1
            return OmniQuantLinear.from_linear(lin, bits=4, group_size=32)
        return None

    model = tiny_llama()
    replace_linears(model, positive, progress=False)
    with pytest.raises(ValueError, match="zero points outside the 4-bit code range"):
        export.export(model, tmp_path / "a", method="omniquant", progress=False)
    with pytest.raises(ValueError, match="OmniQuantLinear, which compressed-tensors with method "
                       "rtn cannot hold"):  # fmt: skip
        export.export(model, tmp_path / "b", group_size=32, progress=False)
    odd = tiny_llama(vocab_size=64, intermediate_size=80, num_hidden_layers=1)
    with pytest.raises(ValueError, match="80 inputs, which group size 32 does not divide"):
        export.export(odd, tmp_path / "c", method="mxfp4", progress=False)
    export.export(odd, tmp_path / "d", method="nvfp4", progress=False)  # 80 = 5 blocks of 16
    with torch.no_grad():
        odd.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    for method in ("nvfp4", "llm_int8", "fp8"):
        with pytest.raises(ValueError, match="non-finite weights"):
            export.export(odd, tmp_path / "e", method=method, progress=False)
    assert not (tmp_path / "e").exists()


def test_cli_exports_omniquant_calibrated_minilm(tmp_path, capsys):
    out = tmp_path / "minilm-oq"
    argv = ["export", "--method", "omniquant", "--bits", "4", "--group-size", "128", "--out",
            str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "omniquant W4A16 g128 (LWC, zero points)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["pooler.dense"]  # calibrate leaves the pooler dense
    loaded = transformers.AutoModel.from_pretrained(
        out, quantization_config=transformers.CompressedTensorsConfig(dequantize=True)
    ).eval()
    # the loader computes what lowbit's calibrated model computes (the same calibration here)
    net, tokenizer = load_minilm(keep_pooler=True)
    cli._calibrate_omniquant(net, tokenizer, 4, 128, progress=False)
    texts = ["To be, or not to be", "that is the question", "Whether 'tis nobler in the mind"]
    with torch.no_grad():
        got, want = embed(loaded, tokenizer, texts), embed(net.eval(), tokenizer, texts)
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def smollm2():
    from lowbit.fast import models

    try:
        models.smollm2_path()
    except models.ModelNotInstalled as err:
        pytest.skip(str(err))
    return models.load_smollm2()


def test_smollm2_rtn_and_nvfp4_load_bit_exact(smollm2, tmp_path):
    """SmolLM2-135M (tied embeddings, 576 = 4.5 x 128 inputs: per channel, not g128)."""
    model, tokenizer = smollm2
    ids = tokenizer(["To be, or not to be, that is the question"], return_tensors="pt").input_ids
    out = export.export(model, tmp_path / "w4", bits=4, group_size=None, tokenizer=tokenizer,
                        progress=False)  # fmt: skip
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, _dense_copy(model, 4, None, True)(ids).logits)
    out = export.export(model, tmp_path / "nv", method="nvfp4", progress=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    dense = transformers.AutoModelForCausalLM.from_pretrained(
        _dense_folder(model, tmp_path, _nvfp4_as_exported), dtype=torch.bfloat16
    ).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, dense(ids).logits)


def _rtn_16bit(w: torch.Tensor) -> torch.Tensor:
    """Symmetric 4-bit g32 with the scale rounded to w's dtype first (float32 math otherwise)."""
    g = w.float().reshape(w.shape[0], -1, 32)
    s = (g.abs().amax(-1, keepdim=True) / 7).to(w.dtype).float()
    q = torch.clamp(torch.round(g / torch.where(s > 0, s, 1.0)), -7, 7)
    return (q * s).reshape(w.shape)


def _fp8_16bit(w: torch.Tensor) -> torch.Tensor:
    s = (w.float().abs().amax(1, keepdim=True) / 448).to(w.dtype).float()
    return formats.quantize(w.float() / torch.where(s > 0, s, 1.0), "e4m3fn") * s


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_models_export_and_load_in_their_dtype(tmp_path, dtype):
    """A float16 / bfloat16 model: its scales are stored in its dtype and the codes computed
    with them, so the loaded model equals a dense one of that dtype holding q · s16 (written
    here); every other method loads with the folder's own dtype and computes finite logits."""
    model = tiny_llama().to(dtype)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(12))
    for method, quantize in (("rtn", _rtn_16bit), ("fp8", _fp8_16bit)):
        out = export.export(model, tmp_path / method, method=method, group_size="auto" if
                            method == "fp8" else 32, progress=False)  # fmt: skip
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
        dense = transformers.AutoModelForCausalLM.from_pretrained(
            _dense_folder(model, tmp_path / method, quantize), dtype=dtype
        ).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, dense(ids).logits), method
    for method in ("llm_int8", "mxfp4", "nvfp4"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # llm_int8: the dropped decomposition
            out = export.export(model, tmp_path / method, method=method, progress=False)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # its dtype
        with torch.no_grad():
            assert torch.isfinite(loaded(ids).logits).all(), method


def test_tied_head_and_late_group_errors_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'lm_head' shares its weight .* keep it in ignore"):
        export.export(tiny_llama(tie=True), tmp_path / "t", group_size=32, ignore=(),
                      progress=False)  # fmt: skip
    # omniquant: a group size that does not divide MiniLM's layers, before the calibration
    argv = ["export", "--method", "omniquant", "--group-size", "100", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert not (tmp_path / "o").exists()
