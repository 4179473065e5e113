"""Linear8bitLt (lowbit.fast.nn), the module registry, and model conversion / safetensors round
trip (lowbit.fast.convert), on toy layers, a tiny LLaMA and a tiny GPT-2 (Conv1D layers) built
from configs, and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import pkgutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lowbit.fast
import lowbit.fast.nn as qnn
from lowbit.fast import llm_int8 as F
from lowbit.fast.convert import (
    conv1d_to_linear,
    load_quantized,
    replace_linears,
    restore_linears,
    save_quantized,
)
from lowbit.fast.nn import (
    QUANTIZED_MODULES,
    FPQLinear,
    Linear8bitLt,
    QuantizedLinear,
    register_module,
)
from lowbit.fast.testing.pairs import PAIRS
from lowbit.fast.testing.tiers import MATMUL
from lowbit.reference import llm_int8 as R


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


@pytest.mark.parametrize(
    "make",
    [
        lambda: Linear8bitLt.from_linear(nn.Linear(6, 3)),
        lambda: FPQLinear.from_linear(nn.Linear(6, 3), calib_inputs=torch.randn(4, 6)),
    ],
)
def test_quantized_linears_refuse_integer_scalar_and_non_tensor_inputs(make):
    """An int64 batch used to come back as int64 garbage and a 0-d input raised IndexError
    deep inside nn: each is now one line that says what to pass."""
    mod = make()
    name = type(mod).__name__
    with pytest.raises(
        ValueError, match=f"^{name} expects a floating-point input, got torch.int64"
    ):
        mod(torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=rf"^{name} expects \(\.\.\., 6\) inputs, got shape \(\)"):
        mod(torch.tensor(1.0))
    with pytest.raises(TypeError, match="expects a torch tensor, got ndarray"):
        mod(np.ones((2, 6), np.float32))
    assert mod(torch.ones(2, 6)).dtype == torch.float32


def _saved_mlp(tmp_path):
    """A two-layer MLP with its first layer in LLM.int8(), saved; returns (path, state, meta)."""
    from safetensors import safe_open

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    model[0] = Linear8bitLt.from_linear(model[0])
    path = tmp_path / "mlp.safetensors"
    save_quantized(model, path)
    with safe_open(path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lowbit"])
    return path, state, meta


def _fresh_mlp():
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))


def _tampered(tmp_path, state, meta, name="bad.safetensors"):
    from safetensors.torch import save_file

    path = tmp_path / name
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(state, path, metadata={"lowbit": text})
    return path


def test_load_quantized_validates_tensors_and_metadata(tmp_path):
    """A float32 weight_codes tensor was truncated into int8 (12.7 -> 12) and malformed metadata
    raised KeyError / AttributeError from deep frames: each is now one line naming file and key."""
    path, state, meta = _saved_mlp(tmp_path)
    x = torch.randn(3, 8)
    good = load_quantized(_fresh_mlp(), path)
    assert isinstance(good[0], Linear8bitLt) and good(x).shape == (3, 2)

    def error(st, md):
        bad = _tampered(tmp_path, st, md)
        with pytest.raises(ValueError) as info:
            load_quantized(_fresh_mlp(), bad)
        msg = str(info.value)
        assert "\n" not in msg and "bad.safetensors" in msg, msg
        return msg

    floats = {**state, "0.weight_codes": state["0.weight_codes"].float() + 0.7}
    assert "'0.weight_codes' is stored as torch.float32, the model expects torch.int8" in error(
        floats, meta
    )
    wide = {**state, "0.weight_absmax": torch.zeros(7)}
    assert "'0.weight_absmax' has shape (7,), the model expects (6,)" in error(wide, meta)
    fewer = {k: v for k, v in state.items() if k != "2.bias"}
    assert "lacks ['2.bias']" in error(fewer, meta)
    assert "has unexpected ['extra']" in error({**state, "extra": torch.zeros(1)}, meta)
    no_threshold = copy.deepcopy(meta)
    del no_threshold["0"]["config"]["threshold"]
    assert "config of '0' (Linear8bitLt) lacks key 'threshold'" in error(state, no_threshold)
    assert "entry '0' needs a 'class' str, got None" in error(state, {"0": {"config": {}}})
    assert "entry '0' needs a 'config' dict" in error(state, {"0": {"class": "Linear8bitLt"}})
    assert "entry '0' must be an object" in error(state, {"0": "Linear8bitLt"})
    assert "must map module names" in error(state, "[1, 2]")
    assert "is not JSON" in error(state, "{not json")
    assert "names module '5'" in error(state, {"5": meta["0"]})
    assert "unknown quantized module class 'Nope'" in error(
        state, {"0": {**meta["0"], "class": "Nope"}}
    )
    bad_dtype = copy.deepcopy(meta)
    bad_dtype["0"]["config"]["weight_dtype"] = "int3"
    assert "config of '0' is invalid" in error(state, bad_dtype)
    # float tensors outside quantized modules may change float dtype, as load_state_dict allows
    half = {**state, "2.weight": state["2.weight"].half()}
    load_quantized(_fresh_mlp(), _tampered(tmp_path, half, meta, "half.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors' is not a readable safetensors file"):
        load_quantized(_fresh_mlp(), garbage)


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


# ---- the module package and its registry ------------------------------------------------------


def test_nn_is_a_package_whose_method_files_all_register():
    """lowbit.fast.nn is listed as "nn" (the pairs' TORCH_ONLY_MODULES relies on it), every
    method file in fast/nn/ is imported by the package (its one registration line), and each
    module class of the protocol defined there (a QuantizedLinear, or a trainable one such as
    Int4Linear) is registered and re-exported under its name."""
    infos = {m.name: m for m in pkgutil.iter_modules(lowbit.fast.__path__)}
    assert "nn" in infos and infos["nn"].ispkg
    methods = [m.name for m in pkgutil.iter_modules(qnn.__path__)]
    assert {"llm_int8", "fpq"} <= set(methods)
    defined = []
    for name in methods:
        module = importlib.import_module(f"lowbit.fast.nn.{name}")
        classes = [
            c
            for c in vars(module).values()
            if inspect.isclass(c)
            and issubclass(c, nn.Module)
            and all(
                callable(getattr(c, m, None)) for m in ("from_config", "lowbit_config", "to_linear")
            )
            and c.__module__ == module.__name__
        ]
        assert classes, (
            f"fast/nn/{name}.py defines no quantized module (from_config, lowbit_config, to_linear)"
        )
        defined += classes
    for cls in defined:
        assert QUANTIZED_MODULES.get(cls.__name__) is cls, f"{cls.__name__} is not registered"
        assert getattr(qnn, cls.__name__) is cls, (
            f"lowbit.fast.nn does not re-export {cls.__name__}"
        )
    # the import line of each method file is in the package's __init__ (the registration line)
    init = Path(qnn.__file__).read_text(encoding="utf-8")
    for name in methods:
        assert f"from lowbit.fast.nn.{name} import" in init, f"fast/nn/__init__.py lacks {name}"


def test_registry_refuses_duplicate_names_and_non_modules():
    assert QUANTIZED_MODULES["Linear8bitLt"] is Linear8bitLt
    assert QUANTIZED_MODULES["FPQLinear"] is FPQLinear
    assert register_module(Linear8bitLt) is Linear8bitLt  # the same class again: a no-op

    class Linear8bitLt_(Linear8bitLt):  # noqa: N801
        pass

    Linear8bitLt_.__name__ = "Linear8bitLt"  # another class under a registered name
    before = dict(QUANTIZED_MODULES)
    with pytest.raises(ValueError, match="'Linear8bitLt' is already registered"):
        register_module(Linear8bitLt_)

    class NoConfig(torch.nn.Module):
        def to_linear(self):
            return torch.nn.Linear(1, 1)

    with pytest.raises(ValueError, match="lacks from_config, lowbit_config"):
        register_module(NoConfig)
    with pytest.raises(ValueError, match="nn.Module subclass"):
        register_module(object)  # type: ignore[arg-type]
    assert QUANTIZED_MODULES == before  # nothing was added by the refused calls


# ---- GPT-2: Hugging Face Conv1D layers --------------------------------------------------------

GPT2_CONV1D = [f"transformer.h.{i}.{n}" for i in (0, 1) for n in
               ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # fmt: skip


def _tiny_gpt2(seed: int = 0):
    """GPT2LMHeadModel from a config (no download), Conv1D biases made non-zero (they init to 0)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name in GPT2_CONV1D:
            model.get_submodule(name).bias.normal_(0.0, 0.02)
    return model


def _linear_twin(model):
    """The same model with each Conv1D replaced by a hand-made nn.Linear holding weight.T."""
    twin = copy.deepcopy(model)
    for name in GPT2_CONV1D:
        conv = twin.get_submodule(name)
        assert type(conv).__name__ == "Conv1D"
        lin = nn.Linear(conv.nx, conv.nf)
        with torch.no_grad():
            lin.weight.copy_(conv.weight.T)  # Conv1D stores (in, out)
            lin.bias.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, lin)
    return twin


def _gpt2_ids():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def _conv1d_inputs(model, ids):
    """(tokens, in) inputs of each Conv1D on ids (the calibration set of the FPQ conversions)."""
    inputs = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: inputs.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))
        )
        for n in GPT2_CONV1D
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return inputs


def test_conv1d_to_linear_is_the_transposed_layer():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    conv = Conv1D(nf=5, nx=7)
    with torch.no_grad():
        conv.bias.normal_()
    lin = conv1d_to_linear(conv)
    assert type(lin) is nn.Linear and (lin.in_features, lin.out_features) == (7, 5)
    assert lin.weight.is_contiguous() and torch.equal(lin.weight, conv.weight.T)
    assert torch.equal(lin.bias, conv.bias) and lin.bias.data_ptr() != conv.bias.data_ptr()
    x = torch.randn(3, 4, 7)
    # float32 sums of 7 products, possibly in another order: a few ulps of the largest term sum
    torch.testing.assert_close(lin(x), conv(x), rtol=0, atol=16 * 2.0**-24 * 7 * 8.0)
    with pytest.raises(ValueError, match="expects a transformers Conv1D"):
        conv1d_to_linear(nn.Conv1d(7, 5, 1))


@pytest.mark.parametrize(
    "method, max_rel_err",
    [
        # int8 vector-wise weights and per-token activations: one step is absmax/127, and the
        # 64..256-wide Gaussian rows/tokens of GPT-2 have absmax ~3 sigma, so each operand's
        # rounding error has RMS ~3/127/sqrt(12) ~ 0.7 % of its scale, ~1 % per layer for both;
        # the residual stream keeps 2 blocks from compounding it much (measured 0.6 %).
        ("int8", 0.03),
        # FP8 E4M3 weights and activations (3 mantissa bits): relative rounding error <= 2^-4,
        # RMS ~2 % per operand, ~3 % per layer for both (measured 2.1 %).
        ("fpq_e4m3", 0.06),
        # FP4 E2M1 weights only (1 mantissa bit): relative error <= 2^-2, RMS ~7-10 % per
        # weight, averaged over 64..256 products per output (measured 6.9 %).
        ("fpq_w4", 0.15),
    ],
)
def test_gpt2_conv1d_quantizes_like_the_equivalent_linear(tmp_path, method, max_rel_err):
    """replace_linears on GPT-2's Conv1D layers builds the same quantized modules as on a
    hand-made nn.Linear twin (bit-identical logits), close to the FP model; the safetensors round
    trip into a fresh GPT-2 skeleton (other weights) is bit-identical; restore_linears gives
    nn.Linear back."""
    model, ids = _tiny_gpt2(), _gpt2_ids()
    twin = _linear_twin(model)
    with torch.no_grad():
        ref = model(ids).logits
        # the twin is the same function up to float32 summation order (sums of <= 256 terms)
        torch.testing.assert_close(twin(ids).logits, ref, rtol=1e-5, atol=1e-5)
    calib = _conv1d_inputs(model, ids)  # one calibration set for both models
    make = {
        "int8": lambda name, lin: Linear8bitLt.from_linear(lin, threshold=6.0),
        "fpq_e4m3": lambda name, lin: FPQLinear.from_linear(
            lin, w_format=(4, 3), a_format=(4, 3), calib_inputs=calib[name]
        ),
        "fpq_w4": lambda name, lin: FPQLinear.from_linear(lin, w_format=(2, 1), a_format=None),
    }[method]
    cls = FPQLinear if method.startswith("fpq") else Linear8bitLt
    replace_linears(model, make, progress=False)
    replace_linears(twin, make, progress=False)
    assert all(isinstance(model.get_submodule(n), cls) for n in GPT2_CONV1D)
    assert type(model.lm_head) is nn.Linear  # skipped by default (tied to the embeddings)
    with torch.no_grad():
        out = model(ids).logits
        assert torch.equal(out, twin(ids).logits)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < max_rel_err, rel
    path = tmp_path / f"gpt2-{method}.safetensors"
    save_quantized(model, path)
    fresh = load_quantized(_tiny_gpt2(seed=1), path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, out)
    restore_linears(fresh)
    for n in GPT2_CONV1D:
        assert type(fresh.get_submodule(n)) is nn.Linear
    if method == "fpq_w4":  # weight-only: the restored linears compute exactly what it computed
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, out)


def test_replace_linears_warns_when_it_replaced_nothing():
    class Conv1D(nn.Module):  # a look-alike name with a 3-D (convolution) weight: not a linear
        def __init__(self):
            super().__init__()
            self.nf = 4
            self.weight = nn.Parameter(torch.zeros(4, 4, 3))

    with pytest.warns(UserWarning, match="has no nn.Linear or Conv1D submodule"):
        model = nn.Sequential(nn.ReLU(), Conv1D())
        assert replace_linears(model, lambda n, m: Linear8bitLt.from_linear(m)) is model
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(
        UserWarning, match=r"of its 2 .* 1 matched skip=\('2',\) .* None for the other 1"
    ):
        replace_linears(model, lambda n, m: None, skip=("2",), progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one replacement: no warning
        replace_linears(model, lambda n, m: Linear8bitLt.from_linear(m) if n == "0" else None)
    assert isinstance(model[0], Linear8bitLt) and type(model[2]) is nn.Linear


class Float16Linear(QuantizedLinear):
    """A plug-in written outside lowbit: the weight rounded to float16 (the test's new method)."""

    weight16: torch.Tensor

    def __init__(self, in_features, out_features, bias=True, weight_dtype=torch.float32):
        super().__init__(in_features, out_features, bias, weight_dtype, None)
        self.register_buffer(
            "weight16", torch.zeros(out_features, in_features, dtype=torch.float16)
        )

    @classmethod
    def from_linear(cls, linear):
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        mod.weight16.copy_(linear.weight.detach())
        mod._copy_bias(linear)
        return mod

    def dequantized_weight(self):
        return self.weight16.float()

    def lowbit_config(self):
        return self._base_config()

    @classmethod
    def from_config(cls, config):
        return cls(**cls._base_args(config))

    def forward(self, x):
        return nn.functional.linear(x, self.dequantized_weight(), self.bias)


def test_a_module_registered_from_outside_round_trips(tmp_path):
    """The plug-in contract: register_module is all a new class needs for load_quantized."""
    assert "Float16Linear" not in QUANTIZED_MODULES
    register_module(Float16Linear)
    try:
        model, ids = _tiny_gpt2(), _gpt2_ids()
        replace_linears(model, lambda name, lin: Float16Linear.from_linear(lin), progress=False)
        assert all(isinstance(model.get_submodule(n), Float16Linear) for n in GPT2_CONV1D)
        with torch.no_grad():
            out = model(ids).logits
        path = tmp_path / "gpt2-fp16.safetensors"
        save_quantized(model, path)
        fresh = load_quantized(_tiny_gpt2(seed=1), path)
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, out)
    finally:
        QUANTIZED_MODULES.pop("Float16Linear", None)
    with pytest.raises(ValueError, match="unknown quantized module class 'Float16Linear'"):
        load_quantized(_tiny_gpt2(), path)  # without the registration the file cannot be read


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
