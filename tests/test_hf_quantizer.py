"""The transformers quantizer (lowbit.fast.hf_quantizer) and its weight-only modules.

A tiny LLaMA (2 layers, hidden 64) is saved once as a dense checkpoint; each method then
quantizes it while loading. The oracle is lowbit's own fast fake-quantizer: a dense copy of the
float model whose linear weights are set to that function's output must give the same logits,
bit for bit, as the quantized model (LLM.int8() is compared with ``Linear8bitLt.from_linear``
instead, since its activations are quantized too). A saved quantized model reloads without
the config and gives identical buffers and logits; a load without lowbit imported fails loudly.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("lowbit.fast.hf_quantizer needs transformers >= 5", allow_module_level=True)

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lowbit.fast import formats, uniform  # noqa: E402
from lowbit.fast import hf_quantizer as hq  # noqa: E402
from lowbit.fast.convert import load_quantized, replace_linears, save_quantized  # noqa: E402
from lowbit.fast.hf_quantizer import LowbitConfig  # noqa: E402
from lowbit.fast.nn import (  # noqa: E402
    FormatLinear,
    Linear8bitLt,
    MXLinear,
    NVFP4Linear,
    RTNLinear,
)
from tests.tiny_models import tiny_llama  # noqa: E402

# method options -> the module class and lowbit's fast function for one weight
CASES = {
    "rtn4-g48-asym": dict(method="rtn", bits=4, group_size=48, symmetric=False),
    "rtn8-channel": dict(method="rtn", bits=8, group_size=0),
    "e4m3fn": dict(method="format", fmt="e4m3fn"),
    "int4": dict(method="format", fmt="int4"),
    "mxfp4-b48": dict(method="mx", fmt="e2m1", block=48),
    "mxfp8": dict(method="mx", fmt="e4m3fn"),
    "nvfp4": dict(method="nvfp4"),
}
CLASSES = {"rtn": RTNLinear, "format": FormatLinear, "mx": MXLinear, "nvfp4": NVFP4Linear}


def _fake_quant(w: torch.Tensor, config: LowbitConfig) -> torch.Tensor:
    """lowbit's fast fake-quantizer for ``config`` applied to one weight (out, in)."""
    opts: dict[str, Any] = config.options
    if config.method == "rtn":
        g = opts["group_size"]
        grain: dict[str, Any] = (
            dict(granularity="group", group_size=g) if g else dict(granularity="channel")
        )
        return uniform.quantize(w, opts["bits"], symmetric=opts["symmetric"], **grain)
    if config.method == "format":
        fmt = formats.parse_format(opts["fmt"])
        s = w.abs().amax(dim=1, keepdim=True) / fmt.max_value
        return formats.quantize(w / torch.where(s > 0, s, 1.0), fmt) * s
    if config.method == "mx":
        return formats.quantize_mx(w, opts["fmt"], opts["block"])
    return formats.quantize_nvfp4(w)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """The float model and the folder it was saved to (attention with biases: bias buffers
    are covered too)."""
    model = tiny_llama(attention_bias=True)
    with torch.no_grad():  # one all-zero output row: its scale is 0 and it must stay 0
        model.model.layers[0].mlp.up_proj.weight[5].zero_()
    path = tmp_path_factory.mktemp("dense")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))


def _load(path, **kwargs) -> Any:
    loaded: Any = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    model, info = loaded
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not problems, f"load report not clean: {problems}"
    return model.eval()


def _assert_reloads_identically(model: Any, config: LowbitConfig, tmp_path, ids):
    """save_pretrained, then from_pretrained(folder) without a config: same modules, the same
    buffers bit for bit (codes loaded, not re-quantized), the same logits."""
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == config.to_dict() and saved["quant_method"] == "lowbit"
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["lowbit"]) == config.to_dict()
        for name in _linears(model):  # lm_head stays float
            assert f.get_tensor(f"{name}.weight").dtype == model.get_submodule(name).weight.dtype
        for name, mod in model.named_modules():
            if isinstance(mod, config.module_class):
                marker = f.get_tensor(f"{name}.weight")  # never a float weight
                assert marker.dtype == torch.uint8 and marker.dim() == 1
    reloaded = _load(tmp_path)
    assert type(reloaded.config.quantization_config) is LowbitConfig
    assert reloaded.config.quantization_config == config
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_on_load_is_lowbits_fast_function_and_reloads(case, dense, ids, tmp_path):
    float_model, path = dense
    config = LowbitConfig(**CASES[case])
    model = _load(path, quantization_config=config)
    cls = CLASSES[config.method]
    expected = copy.deepcopy(float_model)
    for name, linear in _linears(float_model).items():
        mod = model.get_submodule(name)
        if name == "lm_head":
            assert type(mod) is nn.Linear and torch.equal(mod.weight, linear.weight)
            continue
        assert type(mod) is cls, name
        dense_shape = tuple(linear.weight.shape)
        assert not list(mod.parameters()), "the float placeholder weight is gone"
        assert not any(b.is_floating_point() and b.shape == dense_shape for b in mod.buffers())
        w_hat = _fake_quant(linear.weight.detach(), config)
        assert torch.equal(mod.dequantized_weight(), w_hat), name
        with torch.no_grad():
            expected.get_submodule(name).weight.copy_(w_hat)
    up = model.model.layers[0].mlp.up_proj
    assert torch.equal(up.dequantized_weight()[5], torch.zeros(64))  # the zero row
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, expected(ids).logits)
        assert torch.isfinite(logits).all()
    _assert_reloads_identically(model, config, tmp_path, ids)
    model.dequantize()  # back to nn.Linear with the dequantized weights: the same model
    assert all(type(model.get_submodule(n)) is nn.Linear for n in _linears(float_model))
    assert not hasattr(model.config, "quantization_config")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)


def test_llm_int8_on_load_is_linear8bitlt_from_linear_and_reloads(dense, ids, tmp_path):
    float_model, path = dense
    config = LowbitConfig(method="llm_int8", threshold=6.0)
    model = _load(path, quantization_config=config)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(2))
    x[..., 7] *= 40  # an outlier feature column: the decomposition takes part
    for name, linear in _linears(float_model).items():
        mod = model.get_submodule(name)
        if name == "lm_head":
            assert type(mod) is nn.Linear
            continue
        want = Linear8bitLt.from_linear(linear, threshold=6.0)
        assert type(mod) is Linear8bitLt and mod.threshold == 6.0
        assert torch.equal(mod.weight_codes, want.weight_codes)
        assert torch.equal(mod.weight_absmax, want.weight_absmax)
        xi = x[..., : linear.in_features]
        with torch.no_grad():
            assert torch.equal(mod(xi), want(xi)), name
    expected = replace_linears(
        copy.deepcopy(float_model),
        lambda _, lin: Linear8bitLt.from_linear(lin, threshold=6.0),
        progress=False,
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)
    _assert_reloads_identically(model, config, tmp_path, ids)


def test_load_without_lowbit_imported_fails_loudly(dense, tmp_path):
    """The pitfall: transformers does not know quant_method "lowbit", warns and loads into
    float Linears. The marker under `<layer>.weight` has a shape no weight has, so the load
    stops (RuntimeError after a report listing every quantized weight as MISMATCH) instead of
    casting int8 codes into float weights."""
    _, path = dense
    _load(path, quantization_config=LowbitConfig(method="llm_int8")).save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        except RuntimeError as err:
            print("RAISED:", err)
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, ignore_mismatched_sizes=True)
        print("LOADED WITH ignore_mismatched_sizes:", type(model.model.layers[0].mlp.up_proj).__name__)
        assert not any(m.startswith("lowbit") for m in sys.modules), "lowbit got imported"
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out, err = run.stdout, run.stderr
    assert "Unknown quantization type, got lowbit" in err
    assert "RAISED: You set `ignore_mismatched_sizes` to `False`, thus raising an error" in out
    assert "model.layers.{0, 1}.mlp.up_proj.weight" in err and "MISMATCH" in err
    assert "ckpt: torch.Size([" in err  # the 1-D marker, not an (out, in) weight
    assert "LOADED WITH ignore_mismatched_sizes: Linear" in out


def test_non_finite_weight_is_refused_while_loading(dense, tmp_path):
    """The module's one-line error reaches transformers' load report (its CONVERSION row),
    and the load stops."""
    float_model, _ = dense
    broken = copy.deepcopy(float_model)
    with torch.no_grad():
        broken.model.layers[1].self_attn.q_proj.weight[2, 3] = float("nan")
    broken.save_pretrained(tmp_path)
    report = io.StringIO()
    handler = logging.StreamHandler(report)
    logging.getLogger("transformers").addHandler(handler)  # the report is a logged warning
    try:
        with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
            AutoModelForCausalLM.from_pretrained(
                tmp_path, quantization_config=LowbitConfig("nvfp4")
            )
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert "NVFP4Linear.from_linear: the weight has 1 NaN/Inf values" in report.getvalue()


# ---- the config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(method="gptq"), r"method='gptq' is unknown; use one of"),
        (dict(method="rtn", fmt="e4m3fn"), r"'rtn' takes bits, group_size, symmetric, not fmt"),
        (dict(method="nvfp4", block=16), r"'nvfp4' takes no options, not block"),
        (dict(method="llm_int8", bits=8), r"'llm_int8' takes threshold, not bits"),
        (dict(method="rtn", bits=12), r"bits=12 is invalid; use an int from 2 to 8"),
        (dict(method="rtn", bits=4.0), r"bits=4.0 is invalid"),
        (dict(method="rtn", group_size=-1), r"group_size=-1 is invalid; .* 0 for one scale"),
        (dict(method="rtn", symmetric="yes"), r"symmetric='yes' is invalid"),
        (dict(method="format", fmt="e9z"), r"fmt='e9z' is not a format"),
        (dict(method="format", fmt="uint4"), r"is unsigned; weights need a signed format"),
        (dict(method="format", fmt="e5m10"), r"has 16 bits; use a format of at most 8 bits"),
        (dict(method="mx", fmt="int4"), r"is not a float format"),
        (dict(method="mx", block=0), r"block=0 is invalid; use a positive int"),
        (dict(method="llm_int8", threshold=-1.0), r"threshold must be a finite number >= 0"),
        (dict(method="llm_int8", threshold="6"), r"threshold='6' is invalid"),
        (dict(method="rtn", modules_to_not_convert="lm_head"), r"pass a list of module names"),
        (dict(method="rtn", bitz=4), r"unknown option\(s\) \['bitz'\]"),
        (dict(method="rtn", quant_method="gptq"), r"quant_method='gptq'; it must be 'lowbit'"),
    ],
)
def test_bad_config_values_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        LowbitConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_defaults_and_dict_round_trip():
    assert LowbitConfig("rtn").to_dict() == {
        "quant_method": "lowbit",
        "method": "rtn",
        "bits": 4,
        "group_size": 128,
        "symmetric": True,
        "modules_to_not_convert": ["lm_head"],
    }
    assert LowbitConfig("llm_int8").threshold == 6.0
    # None means one scale per output channel, as in the rest of lowbit (not "the default")
    assert LowbitConfig("rtn", group_size=None).group_size == 0
    with pytest.raises(ValueError, match="takes threshold, not group_size"):
        LowbitConfig("llm_int8", group_size=None)
    assert LowbitConfig("mx").to_dict()["fmt"] == "e2m1"
    assert LowbitConfig("format").fmt == "e4m3fn" and LowbitConfig("format").bits is None
    for kwargs in [*CASES.values(), dict(method="llm_int8", threshold=0.0)]:
        config = LowbitConfig(**kwargs, modules_to_not_convert=[])
        d = json.loads(json.dumps(config.to_dict()))
        again = LowbitConfig.from_dict(d)
        assert again == config and again.to_dict() == d
        assert dict(config) == d  # __iter__, as transformers reads configs


def test_registered_with_transformers_and_reregistration_is_safe(monkeypatch):
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lowbit"] is LowbitConfig
    assert AUTO_QUANTIZER_MAPPING["lowbit"] is hq.LowbitHfQuantizer
    hq._register()  # a second registration of the same classes is a no-op
    assert AUTO_QUANTIZER_MAPPING["lowbit"] is hq.LowbitHfQuantizer

    class Other(transformers.utils.quantization_config.QuantizationConfigMixin):
        pass

    monkeypatch.setitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "lowbit", Other)
    with pytest.raises(ValueError, match="already registered with transformers by .*Other"):
        hq._register()


def test_transformers_before_5_is_refused_in_one_line():
    with pytest.raises(ImportError, match=r"needs transformers >= 5 \(found 4\.57\.1\)") as info:
        hq._check_transformers("4.57.1")
    assert "\n" not in str(info.value)
    hq._check_transformers("5.0.0.dev0")
    hq._check_transformers(transformers.__version__)


def test_skipped_modules_stay_float(dense):
    float_model, path = dense
    # transformers' matching: a name prefix (at a module boundary) or a suffix
    skip = ["lm_head", "model.layers.1.mlp", "q_proj"]
    model = _load(path, quantization_config=LowbitConfig("format", modules_to_not_convert=skip))
    for name in _linears(float_model):
        mod = model.get_submodule(name)
        kept = name == "lm_head" or name.startswith("model.layers.1.mlp.") or "q_proj" in name
        assert type(mod) is (nn.Linear if kept else FormatLinear), name


def test_tied_output_head_stays_float_even_when_not_skipped(tmp_path, ids):
    tiny_llama(tie=True, num_hidden_layers=1).save_pretrained(tmp_path)
    model = _load(tmp_path, quantization_config=LowbitConfig("rtn", modules_to_not_convert=[]))
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.model.layers[0].mlp.up_proj) is RTNLinear


# ---- the modules on their own ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_modules_dequantize_to_the_fast_functions_on_odd_shapes(dtype):
    """in_features 70: no block or group divides it; a zero row; 16-bit and float64 weights."""
    torch.manual_seed(3)
    linear = nn.Linear(70, 9).to(dtype)
    with torch.no_grad():
        linear.weight[4].zero_()
    w = linear.weight.detach()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    ww = w.to(work)
    cases = [
        (RTNLinear.from_linear(linear, bits=3), uniform.quantize(w, 3)),
        (
            RTNLinear.from_linear(linear, bits=4, group_size=32, symmetric=False),
            uniform.quantize(w, 4, symmetric=False, granularity="group", group_size=32),
        ),
        (MXLinear.from_linear(linear, "e2m1", 32), formats.quantize_mx(w, "e2m1", 32)),
        (MXLinear.from_linear(linear, "e3m2", 16), formats.quantize_mx(w, "e3m2", 16)),
        (NVFP4Linear.from_linear(linear), formats.quantize_nvfp4(w)),
    ]
    for fmt in ("e4m3fn", "e5m2", "e2m1", "int4", "int8"):
        s = ww.abs().amax(dim=1, keepdim=True) / formats.parse_format(fmt).max_value
        want = formats.quantize(ww / torch.where(s > 0, s, 1.0), fmt) * s
        cases.append((FormatLinear.from_linear(linear, fmt), want))
    x = torch.randn(2, 3, 70, dtype=dtype)
    for mod, want in cases:
        got = mod.dequantized_weight()
        assert got.dtype == work
        assert torch.equal(got.to(dtype), want.to(dtype)), mod
        assert torch.equal(got[4], torch.zeros(70, dtype=work)), mod
        y = mod(x)
        assert y.dtype == dtype and y.shape == (2, 3, 9)
        assert torch.equal(y, nn.functional.linear(x, got.to(dtype), linear.bias))
        assert mod.weight_packed.dtype == torch.uint8


def test_modules_pack_codes_and_round_trip_through_save_quantized(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(33, 8), nn.ReLU(), nn.Linear(8, 5, bias=False))
    x = torch.randn(4, 33)
    for make in (
        lambda lin: RTNLinear.from_linear(lin, bits=4, group_size=16, symmetric=False),
        lambda lin: FormatLinear.from_linear(lin, "e2m1"),
        lambda lin: MXLinear.from_linear(lin, "e2m1", 32),
        NVFP4Linear.from_linear,
    ):
        quantized = copy.deepcopy(model)
        quantized[0] = make(model[0])
        assert quantized[0].weight_packed.shape == (8, 17)  # two 4-bit codes per byte
        save_quantized(quantized, tmp_path / "m.safetensors")
        fresh = load_quantized(copy.deepcopy(model), tmp_path / "m.safetensors")
        assert type(fresh[0]) is type(quantized[0])
        assert fresh[0].lowbit_config() == quantized[0].lowbit_config()
        assert torch.equal(fresh(x), quantized(x))
        restored = fresh[0].to_linear()
        assert torch.equal(restored.weight, fresh[0].dequantized_weight())


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda lin: RTNLinear.from_linear(lin),
            r"RTNLinear.from_linear: the weight has 2 NaN/Inf",
        ),
        (lambda lin: FormatLinear.from_linear(lin), r"FormatLinear.from_linear: the weight has 2"),
        (lambda lin: MXLinear.from_linear(lin), r"MXLinear.from_linear: the weight has 2"),
        (lambda lin: NVFP4Linear.from_linear(lin), r"NVFP4Linear.from_linear: the weight has 2"),
    ],
)
def test_modules_refuse_non_finite_weights(make, match):
    linear = nn.Linear(40, 3)
    with torch.no_grad():
        linear.weight[0, 0] = float("inf")
        linear.weight[2, 39] = float("nan")
    with pytest.raises(ValueError, match=match):
        make(linear)


def test_modules_refuse_what_they_cannot_store():
    with pytest.raises(ValueError, match=r"RTNLinear: bits=12 is invalid; use an int from 2 to 8"):
        RTNLinear(8, 2, bits=12)
    with pytest.raises(ValueError, match=r"RTNLinear: group_size=0 is invalid"):
        RTNLinear(8, 2, group_size=0)
    with pytest.raises(ValueError, match=r"FormatLinear: fmt='e5m10' has 16 bits"):
        FormatLinear(8, 2, fmt="e5m10")
    with pytest.raises(ValueError, match=r"MXLinear: fmt='int8' is not a float format"):
        MXLinear(8, 2, fmt="int8")
    with pytest.raises(ValueError, match=r"expects an nn.Linear, got Conv1d"):
        NVFP4Linear.from_linear(nn.Conv1d(2, 2, 1))  # type: ignore[arg-type]
