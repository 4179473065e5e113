"""GGUF export (llama.cpp's format) of LLaMA-architecture models: ``export(..., "gguf")``.

``write_gguf(model, path, ...)`` writes one ``.gguf`` file with gguf-py's ``GGUFWriter``: the
metadata llama.cpp's ``llama`` architecture needs, the tokenizer when one is given, and every
tensor under llama.cpp's name (``token_embd``, ``blk.N.attn_q`` / ``attn_k`` / ``attn_v`` /
``attn_output`` / ``ffn_gate`` / ``ffn_up`` / ``ffn_down`` / ``attn_norm`` / ``ffn_norm``,
``output_norm``, ``output``). Linear layers not in ``ignore`` (default: ``lm_head``) are
quantized; the embeddings, the norms and the ignored linears are written as F32 (exact for
float32, float16 and bfloat16 models). With tied embeddings and an F32 head no ``output.weight``
is written: llama.cpp (and transformers' loader) reuse ``token_embd``.

Block layouts (32 values along the inputs per block; checked bit for bit against
``gguf.quants.dequantize``, which is what transformers' GGUF loader runs):

* Q8_0 (``method="rtn", bits=8``), 34 bytes: float16 d, then 32 int8 codes q; W = q * d.
* Q4_0 (``method="rtn", bits=4``), 18 bytes: float16 d, then 16 bytes; byte j holds q[j] + 8 in
  its low nibble and q[j + 16] + 8 in its high nibble (split halves, not adjacent pairs);
  W = (nibble - 8) * d. lowbit's symmetric codes lie in [-7, 7], so nibble 0 is never used.
* MXFP4 (``method="mxfp4"``), 17 bytes: one E8M0 scale byte e, then 16 bytes of E2M1 codes in
  the same split-half nibble order; W = E2M1(code) * 2^(e - 127) (OCP MX v1.0).

Semantics. RTN: the scale of each group is lowbit's symmetric absmax scale,
absmax / (2^(b-1) - 1), as ``lowbit.fast.uniform`` computes it (per group of ``group_size``
inputs, or per output channel for ``group_size=None``), rounded to float16 (GGUF's scale type)
*before* the codes are computed; the codes are ``uniform.encode(W, scale=<that float16 scale
as float32>)``. The file therefore holds exactly lowbit's quantization with float16 scales:
the loaded weights equal ``uniform.quantize(W, bits, scale=s16)`` bit for bit. A group of 128
inputs (or a whole row) repeats its scale over its blocks of 32, which is exact; so is
lowbit's shorter last group when a layer's inputs are a multiple of 32 that the group size does
not divide. An all-zero group keeps scale 0 and zero codes (no NaN). MXFP4: the element codes
and E8M0 scales are ``lowbit.fast.formats.encode_mx(W, "e2m1", 32)``'s, bit for bit.

llama.cpp's converter reorders the rows of ``q_proj`` (with the number of heads) and ``k_proj``
(with the number of KV heads) from rotate-half order to interleaved pairs: within each head,
row 2i + j of the file is row j * head_dim / 2 + i of the model. Blocks lie along the inputs,
so the rows of codes and scales move whole (no requantization). transformers' loader undoes it.

Refused (one-line ``ValueError`` naming the fix; ``--format compressed-tensors`` holds all of
them): architectures other than ``llama`` (and LLaMA variants the ``llama`` GGUF architecture
cannot describe: biases, activations other than SiLU, RoPE scaling), a quantized layer whose
inputs are not a multiple of 32, a float16-overflowing scale, non-finite weights, tensors
llama.cpp has no name for, and tokenizers that are not byte-level BPE (GPT-2 style, written as
``tokenizer.ggml.model = "gpt2"``). Without a tokenizer the file says ``"no_vocab"`` and
carries ``llama.vocab_size``: llama.cpp loads it but cannot tokenize text; add a vocabulary
with llama.cpp's own converter, or pass ``tokenizer=``.

The file is built in memory (about the size of the quantized model) and then written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.fast import formats, uniform
from lowbit.fast.export import _kept

__all__ = ["write_gguf", "BLOCK", "llama_cpp_row_order", "gguf_tensor_name"]

BLOCK = 32  # values per Q8_0 / Q4_0 / MXFP4 block
ARCH = "llama"
_OTHER = "use --format compressed-tensors"
_FP16_MAX = 65504.0

# Hugging Face LLaMA module paths -> llama.cpp tensor names (without ".weight")
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_IN_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

# llama.cpp's token types (gguf.TokenType), by number so the file is readable here
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

# transformers' pre-tokenizer for Llama 3 (and llama.cpp's "llama-bpe")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gguf_tensor_name(hf_name: str) -> str | None:
    """llama.cpp's name for a LLaMA state-dict key (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``), or None where llama.cpp has none."""
    if not hf_name.endswith(".weight"):
        return None
    module = hf_name.removesuffix(".weight")
    if module in _TOP:
        return f"{_TOP[module]}.weight"
    m = _LAYER.fullmatch(module)
    if m and m.group(2) in _IN_BLOCK:
        return f"blk.{m.group(1)}.{_IN_BLOCK[m.group(2)]}.weight"
    return None


def llama_cpp_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Indices r with ``file_rows = weight[r]``: llama.cpp's q/k permutation. Each head's rows
    [first half | second half] (transformers' rotate-half RoPE) become interleaved pairs
    (llama.cpp's RoPE on adjacent values): file row 2i + j of a head is its row j * d/2 + i."""
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of even size")
    half = rows // n_head // 2
    return torch.arange(rows).reshape(n_head, 2, half).transpose(1, 2).reshape(-1)


# ---- blocks ---------------------------------------------------------------------------------


def _split_half_nibbles(codes: np.ndarray) -> np.ndarray:
    """(rows, blocks, 32) 4-bit values -> (rows, blocks, 16) bytes: byte j = v[j] | v[j+16] << 4."""
    lo, hi = codes[..., : BLOCK // 2], codes[..., BLOCK // 2 :]
    return (lo | (hi << 4)).astype(np.uint8)


def _rtn_scale_f16(name: str, w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """lowbit's symmetric absmax scale per group (or row), rounded to float16: (rows, k)."""
    granularity = "channel" if group_size is None else "group"
    _, s, _ = uniform.encode(w, bits, granularity=granularity, group_size=group_size)
    s16 = s.to(torch.float16)
    if not bool(torch.isfinite(s16).all()):
        raise ValueError(
            f"layer {name!r} needs a scale of {float(s.max()):.4g}, which overflows float16 "
            f"(GGUF's scale type, largest {_FP16_MAX:g}): rescale the weights, or {_OTHER} "
            "(float32 scales)"
        )
    return s16


def _rtn_blocks(name: str, w: torch.Tensor, bits: int, group_size: int | None) -> np.ndarray:
    """Q8_0 / Q4_0 blocks of lowbit's RTN codes with float16 scales: uint8 (rows, bytes)."""
    rows, n = w.shape
    nb = n // BLOCK
    s16 = _rtn_scale_f16(name, w, bits, group_size)
    granularity = "channel" if group_size is None else "group"
    # codes computed with the float16 scale, so codes and stored scale agree exactly
    codes, _, _ = uniform.encode(
        w, bits, granularity=granularity, group_size=group_size, scale=s16.float()
    )
    per_block = n // BLOCK if group_size is None else group_size // BLOCK
    d = s16.repeat_interleave(per_block, dim=1)[:, :nb]  # (rows, nb); last group may be short
    d_bytes = d.contiguous().numpy().view(np.uint8).reshape(rows, nb, 2)
    q = codes.numpy().reshape(rows, nb, BLOCK)
    if bits == 8:
        body = q.astype(np.int8).view(np.uint8)
    else:
        body = _split_half_nibbles((q.astype(np.int16) + 8).astype(np.uint8))
    return np.concatenate([d_bytes, body], axis=-1).reshape(rows, -1)


def _mxfp4_blocks(w: torch.Tensor) -> np.ndarray:
    """MXFP4 blocks of lowbit's OCP MX codes: uint8 (rows, bytes)."""
    rows, n = w.shape
    nb = n // BLOCK
    codes, scales = formats.encode_mx(w.float(), "e2m1", BLOCK)
    # lowbit's E2M1 code (sign | exponent | mantissa) is ggml's kvalues index
    body = _split_half_nibbles(codes.numpy().astype(np.uint8).reshape(rows, nb, BLOCK))
    e = scales.numpy().astype(np.uint8).reshape(rows, nb, 1)
    return np.concatenate([e, body], axis=-1).reshape(rows, -1)


# ---- checks ---------------------------------------------------------------------------------


def _check_config(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ValueError(
            f"GGUF export writes LLaMA-architecture models (model_type 'llama'), not "
            f"{model_type!r}: {_OTHER}"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError(f"GGUF's llama architecture has no attention / MLP biases: {_OTHER}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(
            f"GGUF's llama architecture uses SiLU, this model {config.hidden_act!r}: {_OTHER}"
        )
    # transformers 5 keeps RoPE in rope_parameters (rope_scaling in older versions)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"RoPE scaling {rope_type!r} does not load back from GGUF in transformers: {_OTHER}"
        )


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim or config.hidden_size // config.num_attention_heads)


# ---- tokenizer ------------------------------------------------------------------------------


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizers pre-tokenizer (its JSON), or None."""

    def byte_level(p: dict[str, Any], regex: bool) -> bool:
        return (
            p.get("type") == "ByteLevel"
            and not p.get("add_prefix_space", False)
            and bool(p.get("use_regex", True)) == regex
        )

    if pre is None:
        return None
    if byte_level(pre, True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        if len(parts) == 2 and byte_level(parts[1], True):
            if parts[0].get("type") == "Digits" and parts[0].get("individual_digits"):
                return "smollm"
        if len(parts) == 2 and byte_level(parts[1], False) and parts[0].get("type") == "Split":
            pattern = parts[0].get("pattern", {})
            if pattern.get("Regex") == _LLAMA3_SPLIT and parts[0].get("behavior") == "Isolated":
                return "llama-bpe"
    return None


def _tokenizer_fields(tokenizer: Any, n_vocab: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values of a byte-level BPE tokenizer (transformers' fast one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            "GGUF export needs a fast (tokenizers-backed) tokenizer; load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True), or pass tokenizer=None"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise ValueError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3 style); this "
            f"one is {model.get('type')} with pre-tokenizer "
            f"{(spec.get('pre_tokenizer') or {}).get('type')}: pass tokenizer=None and convert "
            "the tokenizer with llama.cpp's convert_hf_to_gguf.py"
        )
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ValueError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model embeds "
            f"{n_vocab} tokens: resize the embeddings (model.resize_token_embeddings)"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # ids the tokenizer never produces
    types = [_UNUSED] * n_vocab
    for token, i in vocab.items():
        tokens[i], types[i] = token, _NORMAL
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if i < n_vocab:
            types[i] = _CONTROL if added.special else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields: dict[str, Any] = {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types}
    fields["merges"] = merges
    for key in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            fields[key] = token_id
    add_bos = getattr(tokenizer, "add_bos_token", None)
    if isinstance(add_bos, bool):
        fields["add_bos"] = add_bos
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields["chat_template"] = template
    return fields


def _add_tokenizer(writer: Any, fields: dict[str, Any]) -> None:
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    writer.add_add_space_prefix(False)  # byte-level BPE: spaces are part of the tokens
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "add_bos": writer.add_add_bos_token,
        "chat_template": writer.add_chat_template,
    }
    for key, add in adders.items():
        if key in fields:
            add(fields[key])


# ---- the file -------------------------------------------------------------------------------


def _tensors_to_write(
    model: nn.Module, ignore: Sequence[str]
) -> list[tuple[str, str, torch.Tensor, bool]]:
    """(hf name, gguf name, weight, quantize?) for every tensor of the file, in model order."""
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    state = model.state_dict()
    embed = state.get("model.embed_tokens.weight")
    head = state.get("lm_head.weight")
    tied = (
        embed is not None
        and head is not None
        and head.data_ptr() == embed.data_ptr()
        and head.shape == embed.shape
    )
    out = []
    for key, value in state.items():
        gguf_name = gguf_tensor_name(key)
        if gguf_name is None:
            raise ValueError(
                f"tensor {key!r} has no llama.cpp name (GGUF's llama architecture has none for "
                f"it; a lowbit quantized module or an extra layer?): export a plain "
                f"LlamaForCausalLM, or {_OTHER}"
            )
        module = key.removesuffix(".weight")
        quantize = module in linears and _kept(module, ignore)
        if tied and key == "lm_head.weight" and not quantize:
            continue  # llama.cpp and transformers reuse token_embd
        out.append((key, gguf_name, value.detach().cpu(), quantize))
    return out


def write_gguf(
    model: nn.Module,
    path: str | Path,
    *,
    method: str,
    bits: int | None,
    group_size: int | None,
    tokenizer: Any = None,
    ignore: Sequence[str] = ("lm_head",),
    progress: bool = True,
) -> None:
    """Write ``model`` (a transformers ``LlamaForCausalLM``) to ``path`` as one GGUF file.

    ``method="rtn"``: ``bits`` 8 (Q8_0) or 4 (Q4_0), symmetric, ``group_size`` a multiple of 32
    or None (one scale per output channel); ``method="mxfp4"``: MXFP4 (E2M1, E8M0 scale per 32
    values). Scales, layouts, the q/k permutation and what is refused: the module docstring.
    ``tokenizer``: a byte-level BPE transformers tokenizer, or None.
    """
    import gguf
    from tqdm.auto import tqdm

    if method == "rtn":
        if bits not in (4, 8) or (group_size is not None and group_size % BLOCK):
            raise ValueError(
                f"GGUF holds 4- or 8-bit RTN weights in groups of a multiple of {BLOCK} (or per "
                f"channel), not bits={bits}, group_size={group_size}: pass --bits 4 or 8 and "
                f"--group-size {BLOCK} (or 0), or {_OTHER}"
            )
        qtype = gguf.GGMLQuantizationType.Q8_0 if bits == 8 else gguf.GGMLQuantizationType.Q4_0
        ftype = gguf.LlamaFileType.MOSTLY_Q8_0 if bits == 8 else gguf.LlamaFileType.MOSTLY_Q4_0
    elif method == "mxfp4":
        qtype = gguf.GGMLQuantizationType.MXFP4
        ftype = gguf.LlamaFileType.MOSTLY_MXFP4_MOE  # llama.cpp's only MXFP4 file type
    else:
        raise ValueError(f"GGUF export holds methods rtn and mxfp4, not {method!r}")
    config = getattr(model, "config", None)
    _check_config(config)
    assert config is not None
    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    head_dim = _head_dim(config)

    entries = _tensors_to_write(model, ignore)
    for key, _, w, quantize in entries:  # refuse before any work
        # abs().amax() is NaN or Inf exactly when w holds one (and much faster than isfinite)
        if w.numel() and not math.isfinite(float(w.abs().amax())):
            raise ValueError(
                f"tensor {key!r} holds NaN or Inf values: GGUF quantization needs finite "
                "weights; repair the checkpoint first"
            )
        if quantize and w.shape[-1] % BLOCK:
            raise ValueError(
                f"layer {key.removesuffix('.weight')!r} has {w.shape[-1]} inputs, not a multiple "
                f"of GGUF's {BLOCK}-value blocks: add it to ignore (kept as F32), or {_OTHER}"
            )
    n_vocab = int(config.vocab_size)
    tok_fields = None if tokenizer is None else _tokenizer_fields(tokenizer, n_vocab)

    name = str(getattr(config, "_name_or_path", "") or "").rstrip("/").split("/")[-1]
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name or "lowbit-export")
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    if head_dim * n_head != int(config.hidden_size):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if tok_fields is None:
        writer.add_tokenizer_model("no_vocab")  # llama.cpp requires the key
    else:
        _add_tokenizer(writer, tok_fields)

    for key, gguf_name, w, quantize in tqdm(
        entries, desc="export gguf", disable=not progress, leave=False
    ):
        if quantize:
            if method == "mxfp4":
                rows = _mxfp4_blocks(w)
            else:
                rows = _rtn_blocks(key, w, int(bits or 0), group_size)  # bits checked above
        else:
            rows = w.to(torch.float32).contiguous().numpy()
        # rows move whole: blocks lie along the inputs, so codes and scales go with their row
        if ".attn_q." in gguf_name:
            rows = rows[llama_cpp_row_order(rows.shape[0], n_head).numpy()]
        elif ".attn_k." in gguf_name:
            rows = rows[llama_cpp_row_order(rows.shape[0], n_kv).numpy()]
        rows = np.ascontiguousarray(rows)
        writer.add_tensor(gguf_name, rows, raw_dtype=qtype if quantize else None)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
