"""``export(..., "gguf")``: llama.cpp's format for LLaMA models (``lowbit.fast._gguf``).

The truth is built here, independently of the code under test: RTN weights with NumPy (absmax
scales in float32, rounded to float16, then round-half-even codes), MXFP4 weights with
ml_dtypes' E2M1 cast (OCP: scale 2^(floor(log2 absmax) - 2), saturating), the block bytes
packed by hand, llama.cpp's q/k permutation written out with NumPy, and the file read back with
gguf-py's own ``GGUFReader`` + ``gguf.quants.dequantize`` and transformers' GGUF loader.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from lowbit.fast import _gguf, export
from tests.tiny_models import tiny_llama

gguf = pytest.importorskip("gguf")


N_HEAD, N_KV = 4, 2  # tiny_llama's heads: q and k permute differently
CASES = {  # id -> (method, bits, group_size, ggml type)
    "q8_0-g32": ("rtn", 8, 32, "Q8_0"),
    "q4_0-g32": ("rtn", 4, 32, "Q4_0"),
    "q4_0-g128": ("rtn", 4, 128, "Q4_0"),
    "q4_0-channel": ("rtn", 4, None, "Q4_0"),
    "mxfp4": ("mxfp4", 4, 32, "MXFP4"),
}
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


# ---- the truth, written here ----------------------------------------------------------------


def _rtn(w: np.ndarray, bits: int, group: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(codes, float16 scale per block of 32): absmax / Q in float32, rounded to float16."""
    q_max = 2 ** (bits - 1) - 1
    rows, n = w.shape
    g = n if group is None else group
    scale = np.zeros((rows, -(-n // g)), np.float32)
    for j in range(scale.shape[1]):
        scale[:, j] = np.abs(w[:, j * g : (j + 1) * g]).max(axis=1) / np.float32(q_max)
    s16 = scale.astype(np.float16)
    per_value = np.repeat(s16.astype(np.float32), g, axis=1)[:, :n]
    codes = np.clip(np.rint(w / np.where(per_value == 0, 1, per_value)), -q_max, q_max)
    return codes.astype(np.int8), np.repeat(s16, g // 32, axis=1)[:, : n // 32]


def _mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E2M1 codes, E8M0 codes) per block of 32, OCP MX v1.0 via ml_dtypes."""
    rows, n = w.shape
    blocks = w.astype(np.float64).reshape(rows, n // 32, 32)
    amax = np.abs(blocks).max(-1)
    e = np.where(amax > 0, np.frexp(amax)[1] - 1 - 2, -127).clip(-127, 127)  # E2M1 emax = 2
    scaled = np.clip(blocks / np.exp2(e)[..., None], -6, 6)  # OCP MX saturates
    codes = scaled.astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(rows, n)
    return codes, (e + 127).astype(np.uint8)


def _values(w: np.ndarray, method: str, bits: int, group: int | None) -> np.ndarray:
    """The weights the file must hold, float32."""
    rows, n = w.shape
    if method == "mxfp4":
        codes, e = _mxfp4(w)
        v = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64).reshape(rows, n // 32, 32)
        return (
            (v * np.exp2(e.astype(np.float64) - 127)[..., None]).reshape(rows, n).astype(np.float32)
        )
    codes, d = _rtn(w, bits, group)
    return codes.astype(np.float32) * np.repeat(d.astype(np.float32), 32, axis=1)


def _block_bytes(w: np.ndarray, method: str, bits: int, group: int | None) -> np.ndarray:
    """The blocks packed by hand with Python integers: uint8 (rows, bytes)."""
    rows, n = w.shape
    out = []
    if method == "mxfp4":
        codes, e = _mxfp4(w)
    else:
        codes, d = _rtn(w, bits, group)
    for r in range(rows):
        row = bytearray()
        for b in range(n // 32):
            q = [int(c) for c in codes[r, 32 * b : 32 * b + 32]]
            if method == "mxfp4":
                row.append(int(e[r, b]))
                row += bytes(q[j] | q[j + 16] << 4 for j in range(16))
                continue
            row += d[r, b].tobytes()  # float16, little endian
            if bits == 8:
                row += bytes(c & 0xFF for c in q)
            else:
                row += bytes((q[j] + 8) | (q[j + 16] + 8) << 4 for j in range(16))
        out.append(list(row))
    return np.array(out, dtype=np.uint8)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q / k rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _model_with_zeros(tie: bool = False) -> torch.nn.Module:
    """The tiny LLaMA with an all-zero row and an all-zero block of 32 (scale 0, no NaN)."""
    model = tiny_llama(tie)
    with torch.no_grad():
        up = model.model.layers[0].mlp.up_proj.weight
        up[3].zero_()
        up[5, 32:64].zero_()
    return model


def _dense(model: torch.nn.Module, method: str, bits: int, group: int | None, ignore=("lm_head",)):
    dense = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, m in dense.named_modules():
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in ignore:
                w = m.weight.detach().numpy()
                m.weight.copy_(torch.from_numpy(_values(w, method, bits, group)))
    return dense


def _load(out: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        out, gguf_file="model.gguf", dtype=torch.float32
    ).eval()


def _tensors(path: Path) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """name -> (ggml type, raw data, values via gguf.quants.dequantize)."""
    reader = gguf.GGUFReader(path)
    return {
        t.name: (
            t.tensor_type.name,
            np.array(t.data),
            gguf.quants.dequantize(t.data, t.tensor_type),
        )
        for t in reader.tensors
    }


@functools.cache
def _exported(case: str, root: str) -> Path:
    method, bits, group, _ = CASES[case]
    return export.export(_model_with_zeros(), Path(root) / case, "gguf", method=method, bits=bits,
                         group_size=group, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("gguf"))


# ---- loading, bit for bit ---------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_file_bit_exact(case, root):
    method, bits, group, _ = CASES[case]
    model = _model_with_zeros()
    loaded = _load(_exported(case, root))
    dense = _dense(model, method, bits, group)
    with torch.no_grad():
        logits = loaded(IDS).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, dense(IDS).logits)
        assert not torch.equal(logits, model(IDS).logits)  # it did quantize


@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_holds_the_expected_blocks(case, root):
    """Raw bytes packed by hand, and values through gguf.quants.dequantize, per tensor."""
    method, bits, group, ggml_type = CASES[case]
    tensors = _tensors(_exported(case, root) / "model.gguf")
    state = _model_with_zeros().state_dict()
    names = {_gguf.gguf_tensor_name(k): k for k in state}
    assert set(tensors) == set(names)
    for name, (kind, raw, values) in tensors.items():
        w = state[names[name]].numpy()
        quantized = name.startswith("blk.") and "norm" not in name
        assert kind == (ggml_type if quantized else "F32"), name
        n_head = N_HEAD if ".attn_q." in name else N_KV if ".attn_k." in name else None
        if n_head is not None:
            values = _unpermute(values, n_head)
        if not quantized:
            np.testing.assert_array_equal(values, w, err_msg=name)
            continue
        np.testing.assert_array_equal(values, _values(w, method, bits, group), err_msg=name)
        expected = _block_bytes(w, method, bits, group)
        if n_head is not None:
            expected = _permute(expected, n_head)  # whole rows of blocks move
        np.testing.assert_array_equal(raw, expected, err_msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_zero_rows_and_blocks_get_scale_zero(case, root):
    method, _, group, _ = CASES[case]
    kind, raw, values = _tensors(_exported(case, root) / "model.gguf")["blk.0.ffn_up.weight"]
    size = raw.shape[1] // 2  # bytes per block: 64 inputs, two blocks per row
    scale_bytes = 1 if method == "mxfp4" else 2  # E8M0 code 0 (2^-127) or float16 +0
    assert np.isfinite(values).all() and not values[3].any() and not values[5, 32:64].any()
    assert not raw[3, :scale_bytes].any() and not raw[3, size : size + scale_bytes].any()
    if group == 32:  # the zero block has a scale of its own
        assert not raw[5, size : size + scale_bytes].any() and values[5, :32].any()


def test_on_grid_weights_give_gguf_quantizers_bytes(tmp_path):
    """Where gguf-py's own quantizers have no choice to make (weights on the grid, each block's
    absmax on it too, no ties), their bytes and the export's are the same."""
    model = tiny_llama()
    rng = np.random.default_rng(0)
    q8 = rng.integers(-127, 128, size=(64, 64)).astype(np.float32)
    q8[:, ::32] = 127  # every block reaches 127 d
    e2m1 = np.array([0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    mx = rng.choice(e2m1, size=(64, 64)) * np.float32(2.0**-5)
    mx[:, ::32] = 6 * 2.0**-5  # every block reaches 6 * 2^s
    for method, bits, grid, ggml_type in (
        ("rtn", 8, q8 * 2.0**-7, "Q8_0"),
        ("mxfp4", 4, mx, "MXFP4"),
    ):
        with torch.no_grad():
            for m in (
                model.model.layers[0].self_attn.q_proj,
                model.model.layers[0].self_attn.k_proj,
            ):
                m.weight.copy_(torch.from_numpy(grid[: m.weight.shape[0]]))
        out = export.export(model, tmp_path / method, "gguf", method=method, bits=bits,
                            group_size=32, progress=False)  # fmt: skip
        tensors = _tensors(out / "model.gguf")
        qtype = gguf.GGMLQuantizationType[ggml_type]
        for name, n_head in (("blk.0.attn_q.weight", N_HEAD), ("blk.0.attn_k.weight", N_KV)):
            w = grid[: tensors[name][1].shape[0]]
            theirs = gguf.quants.quantize(_permute(w, n_head), qtype)
            np.testing.assert_array_equal(tensors[name][1], theirs, err_msg=name)


# ---- the permutation --------------------------------------------------------------------------


def test_q_and_k_rows_are_in_llama_cpp_order(root):
    """File row 2i + j of a head is its model row j * head_dim / 2 + i (head_dim 16 here)."""
    tensors = _tensors(_exported("q8_0-g32", root) / "model.gguf")
    model = _model_with_zeros()
    for name, m, n_head in (("attn_q", "q_proj", N_HEAD), ("attn_k", "k_proj", N_KV)):
        want = _values(
            getattr(model.model.layers[1].self_attn, m).weight.detach().numpy(), "rtn", 8, 32
        )
        got = tensors[f"blk.1.{name}.weight"][2]
        for head in range(n_head):
            for i in range(8):
                for j in range(2):
                    np.testing.assert_array_equal(
                        got[16 * head + 2 * i + j], want[16 * head + 8 * j + i]
                    )
        assert not np.array_equal(got, want)


def test_without_the_permutation_the_loaded_model_is_wrong(tmp_path, monkeypatch):
    """The bit-exact tests above would catch a missing permutation: this model needs it."""
    model = tiny_llama()
    monkeypatch.setattr(_gguf, "llama_cpp_row_order", lambda rows, n_head: torch.arange(rows))
    out = export.export(model, tmp_path / "unpermuted", "gguf", bits=8, progress=False)
    with torch.no_grad():
        assert not torch.allclose(_load(out)(IDS).logits, _dense(model, "rtn", 8, 32)(IDS).logits)


# ---- ties, metadata, tokenizer ----------------------------------------------------------------


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    model = tiny_llama(tie=True)
    out = export.export(model, tmp_path / "tied", "gguf", bits=4, progress=False)
    assert "output.weight" not in _tensors(out / "model.gguf")
    loaded = _load(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, _dense(model, "rtn", 4, 32)(IDS).logits)
    # a quantized tied head is written on its own (and loads untied)
    out = export.export(model, tmp_path / "head", "gguf", bits=8, ignore=(), progress=False)
    assert _tensors(out / "model.gguf")["output.weight"][0] == "Q8_0"
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    loaded = _load(out)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, _dense(untied, "rtn", 8, 32, ignore=())(IDS).logits)


def test_ignored_q_and_k_stay_f32_and_are_still_permuted(tmp_path):
    model = tiny_llama()
    out = export.export(model, tmp_path / "f32qk", "gguf", bits=8,
                        ignore=("lm_head", "q_proj", "k_proj"), progress=False)  # fmt: skip
    kind, _, values = _tensors(out / "model.gguf")["blk.0.attn_q.weight"]
    q = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert kind == "F32" and np.array_equal(values, _permute(q.numpy(), N_HEAD))
    with torch.no_grad():
        want = _dense(model, "rtn", 8, 32, ignore=("lm_head", "q_proj", "k_proj"))
        assert torch.equal(_load(out)(IDS).logits, want(IDS).logits)


def test_metadata_llama_cpp_needs(root):
    reader = gguf.GGUFReader(_exported("q4_0-g32", root) / "model.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    want = {
        "general.architecture": "llama", "general.file_type": 2, "llama.context_length": 2048,
        "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 128,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": 10000.0,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.vocab_size": 256, "tokenizer.ggml.model": "no_vocab",
        "general.quantization_version": 2,
    }  # fmt: skip
    assert {k: fields.get(k) for k in want} == want
    assert fields["llama.attention.layer_norm_rms_epsilon"] == np.float32(1e-6)
    assert "general.name" in fields


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog", "hello, 123"] * 20, trainer
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>"
    )


SENTENCES = ["the quick brown fox", "Hello world, 12345!", "<|im_start|>lazy dogs\n  jump"]


def test_a_byte_level_bpe_tokenizer_round_trips(tmp_path):
    tokenizer = _byte_level_tokenizer()
    model = tiny_llama(vocab_size=304, num_hidden_layers=1)
    out = export.export(model, tmp_path / "tok", "gguf", tokenizer=tokenizer, progress=False)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out / "model.gguf").fields.items()}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == 304 and tokens[300:] == [f"[PAD{i}]" for i in range(300, 304)]
    assert types[:2] == [3, 3] and types[2] == 1 and types[300:] == [5] * 4
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 0
    loaded = transformers.AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    for text in SENTENCES:
        assert loaded(text).input_ids == tokenizer(text).input_ids, text


# ---- refusals ---------------------------------------------------------------------------------


def test_what_gguf_cannot_hold_is_refused_in_one_line(tmp_path):
    def refused(model, match, **kwargs):
        out = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        with pytest.raises(ValueError, match=match) as info:
            export.export(model, out, "gguf", progress=False, **kwargs)
        assert "\n" not in str(info.value) and not out.exists()  # nothing half-written
        return str(info.value)

    model = tiny_llama()
    assert "compressed-tensors" in refused(model, "symmetric", symmetric=False)
    assert "compressed-tensors" in refused(model, "--bits 4 or 8", bits=3)
    assert "compressed-tensors" in refused(model, "multiple of 32", group_size=48)
    odd = tiny_llama(intermediate_size=80, num_hidden_layers=1)
    assert "compressed-tensors" in refused(odd, "80 inputs, not a multiple of GGUF's 32")
    bert = transformers.BertModel(
        transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64)
    )  # fmt: skip
    assert "compressed-tensors" in refused(bert, "LLaMA-architecture models .* not 'bert'")
    big = copy.deepcopy(model)
    with torch.no_grad():
        big.model.layers[0].mlp.up_proj.weight[0, 0] = 1e7  # 1e7 / 127 > 65504
    assert "compressed-tensors" in refused(big, "overflows float16", bits=8)
    nan = copy.deepcopy(model)
    with torch.no_grad():
        nan.model.layers[1].self_attn.v_proj.weight[2, 2] = float("nan")
    refused(nan, "NaN or Inf")
    word_level = transformers.PreTrainedTokenizerFast(
        tokenizer_object=__import__("tokenizers").Tokenizer(
            __import__("tokenizers").models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")
        )
    )
    refused(model, "byte-level BPE", tokenizer=word_level)
    biased = tiny_llama(num_hidden_layers=1, attention_bias=True)
    assert "compressed-tensors" in refused(biased, "no attention / MLP biases")
    extra = copy.deepcopy(model)
    extra.model.register_parameter("extra", torch.nn.Parameter(torch.zeros(4)))
    assert "compressed-tensors" in refused(extra, "'model.extra' has no llama.cpp name")


# ---- SmolLM2 ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_exports_with_its_tokenizer_bit_exact(tmp_path):
    from lowbit.fast import models

    try:
        path = models.smollm2_path()
    except models.ModelNotInstalled as err:
        pytest.skip(str(err))
    model, tokenizer = models.load_smollm2(path)
    source_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer(SENTENCES[:2], return_tensors="pt", padding=True).input_ids
    for method, bits in (("rtn", 8), ("mxfp4", 4)):
        out = export.export(model, tmp_path / method, "gguf", method=method, bits=bits,
                            tokenizer=tokenizer, progress=False)  # fmt: skip
        loaded_tokenizer = transformers.AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
        for text in [*SENTENCES, "The year 2024 had 366 days."]:
            assert loaded_tokenizer(text).input_ids == source_tokenizer(text).input_ids, text
        loaded = _load(out)
        dense = _dense(model, method, bits, 32)
        with torch.no_grad():
            logits = loaded(ids).logits
            assert torch.equal(logits, dense(ids).logits)
            assert not torch.equal(logits, model(ids).logits)
        del loaded, dense
