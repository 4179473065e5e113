"""The tiny LLaMA that the export and quantizer tests build from a config (no download): hidden
64, intermediate 128, 2 layers, 4 heads sharing 2 KV heads (so q and k differ in shape and in
llama.cpp's permutation), vocabulary 256; seeded, in eval mode."""

from __future__ import annotations

from typing import Any

import torch
import transformers


def tiny_llama(tie: bool = False, **overrides: Any) -> transformers.LlamaForCausalLM:
    """The tiny LLaMA; ``tie`` ties the embeddings, ``overrides`` change config fields."""
    options: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**options | overrides)).eval()
