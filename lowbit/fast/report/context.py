"""What report sections receive: the ``ReportContext`` protocol and its implementation ``Context``.

A section asks the context for what it needs; everything is computed lazily and cached, so
nothing runs that no selected section asked for:

* the model: ``model`` (full precision, float32, eval mode, never modified), ``fresh_copy()``
  to quantize, ``linears(model)`` (the quantizable ``nn.Linear`` layers by name);
* the text: ``calib_texts`` / ``eval_texts`` (passages from different plays);
* ``calib_batches(batch_size, passages)``: the calibration texts as tokenizer outputs (for
  methods that run the model themselves, e.g. OmniQuant's ``calibrate``);
* ``calib_inputs()``: every linear's inputs on the calibration text (tokens, in_features);
* ``block_inputs(model)``: block-by-block capture for methods that calibrate one transformer
  block at a time (OmniQuant): yields each block with its inputs computed through the blocks
  before it *as they are now* (already quantized in place by the caller), one block's
  activations in memory at a time;
* ``token_batches(...)`` and ``train(...)``: a small training hook (token stream from the
  shipped text, AdamW steps with a progress bar) for methods that train (4-bit training);
* ``evaluate(model)`` and ``fp_quality``: the report's quality measure;
* ``figures``: extra PNGs a section wants written next to the report;
* ``quick`` / ``full``: True under ``lowbit report --quick`` / ``--full`` (sections pick their
  own settings for the tier, ``frame.for_tier``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from lowbit.fast import data as text_data
from lowbit.fast import models as real_models
from lowbit.fast.models import BlockInputs

__all__ = [
    "MODELS",
    "DEFAULT_CALIB_SIZE",
    "DEFAULT_EVAL_SIZE",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "BlockInputs",
    "ReportContext",
    "Context",
    "build_context",
]

MODELS: tuple[str, ...] = ("minilm", "smollm2")
DEFAULT_CALIB_SIZE = 32  # passages of ~64 words: ~2,800 tokens
DEFAULT_EVAL_SIZE = 64
# (calib, eval) passages when not given: SmolLM2 is ~6x MiniLM's compute per token and has
# 210 linears, so its defaults are smaller to keep a 2-core run in minutes.
DEFAULT_SIZES: dict[str, tuple[int, int]] = {
    "minilm": (DEFAULT_CALIB_SIZE, DEFAULT_EVAL_SIZE),
    "smollm2": (8, 16),
}
QUICK_SIZES: tuple[int, int] = (4, 8)  # --quick: a smoke test of every section


@runtime_checkable
class ReportContext(Protocol):
    """What a report section may use (``Context`` implements it; tests may pass a stand-in)."""

    model_name: str
    model: nn.Module
    calib_texts: list[str]
    eval_texts: list[str]
    quality_name: str
    higher_is_better: bool
    progress: bool
    quick: bool
    full: bool
    figures: dict[str, bytes]
    tokenizer: Any

    def linears(self, model: nn.Module | None = None) -> dict[str, nn.Linear]: ...

    def fresh_copy(self) -> nn.Module: ...

    def calib_inputs(self) -> dict[str, torch.Tensor]: ...

    def calib_batches(self, batch_size: int | None = None, passages: int | None = None) -> list: ...

    def evaluate(self, model: nn.Module) -> float: ...

    def token_batches(
        self, seq_len: int = 64, batch_size: int = 8, split: str = "calib"
    ) -> Iterator[torch.Tensor]: ...


class Context:
    """Everything a report section needs; built once per report run (see the module docstring).

    Linears that share one input tensor (q/k/v, gate/up) share one captured tensor in
    ``calib_inputs()``; padding is dropped and at most ``max_calib_tokens`` tokens are kept.
    """

    def __init__(
        self,
        model_name: str,
        model: nn.Module,
        tokenizer: Any,
        calib_texts: Sequence[str],
        eval_texts: Sequence[str],
        *,
        max_length: int = 128,
        batch_size: int = 16,
        max_calib_tokens: int = 2048,
        progress: bool = True,
        quick: bool = False,
        full: bool = False,
    ) -> None:
        if model_name not in MODELS:
            raise ValueError(f"unknown model {model_name!r}; choose one of {', '.join(MODELS)}")
        if not calib_texts or not eval_texts:
            raise ValueError("Context needs at least one calibration and one evaluation text")
        self.model_name = model_name
        self.model = model.float().eval()
        self.tokenizer = tokenizer
        self.calib_texts = list(calib_texts)
        self.eval_texts = list(eval_texts)
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_calib_tokens = max_calib_tokens
        self.progress = progress
        if quick and full:
            raise ValueError("a report runs --quick or --full, not both")
        self.quick = quick
        self.full = full
        self.quality_name = "embedding cosine" if model_name == "minilm" else "perplexity"
        self.higher_is_better = model_name == "minilm"
        self.figures: dict[str, bytes] = {}  # extra PNGs from sections, written by run_report
        self._calib_inputs: dict[str, torch.Tensor] | None = None
        self._fp_embeddings: torch.Tensor | None = None
        self._fp_quality: float | None = None

    # -- the model ------------------------------------------------------------------------
    def linears(self, model: nn.Module | None = None) -> dict[str, nn.Linear]:
        """Quantizable linears of ``model`` (default: the FP model) by qualified name.

        Every ``nn.Linear`` except a language-model head (tied to the embeddings in SmolLM2).
        """
        model = self.model if model is None else model
        return {
            name: module
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not name.endswith("lm_head")
        }

    def fresh_copy(self) -> nn.Module:
        """A deep copy of the FP model, to quantize."""
        return copy.deepcopy(self.model)

    def blocks(self, model: nn.Module | None = None) -> nn.ModuleList:
        """The transformer blocks of ``model`` in order (BERT ``encoder.layer``, LLaMA ``model.layers``)."""
        return real_models.transformer_blocks(self.model if model is None else model)

    # -- calibration data -----------------------------------------------------------------
    def _batches(self, texts: Sequence[str]):
        for start in range(0, len(texts), self.batch_size):
            yield self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )

    def _bar(self, iterable, desc: str, total: int | None = None):
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, disable=not self.progress, leave=False)

    def calib_batches(
        self, batch_size: int | None = None, passages: int | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """The first ``passages`` calibration texts (all: None) as tokenizer outputs of
        ``batch_size`` texts (default: the context's), for ``model(**batch)``."""
        texts = self.calib_texts if passages is None else self.calib_texts[:passages]
        saved = self.batch_size
        self.batch_size = saved if batch_size is None else int(batch_size)
        try:
            return [dict(b) for b in self._batches(texts)]
        finally:
            self.batch_size = saved

    @torch.no_grad()
    def calib_inputs(self) -> dict[str, torch.Tensor]:
        """Inputs ``(tokens, in_features)`` of every linear on the calibration texts (cached)."""
        if self._calib_inputs is not None:
            return self._calib_inputs
        linears = self.linears()
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
        alias: dict[str, str] = {}  # linear -> first linear fed the same tensor
        state: dict[str, Any] = {"mask": None, "seen": {}}

        def hook(name: str):
            def capture(module: nn.Module, args: tuple) -> None:
                x = args[0]
                seen = state["seen"]
                if id(x) in seen:  # q/k/v (or gate/up) read the very same tensor
                    alias.setdefault(name, seen[id(x)][1])
                    return
                seen[id(x)] = (x, name)  # keep x alive so its id cannot be reused
                mask = state["mask"]
                if x.shape[:-1] == mask.shape:  # (batch, tokens, in): drop padding
                    x = x[mask]
                chunks[name].append(x.detach().reshape(-1, x.shape[-1]).float().clone())

            return capture

        handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
        taken = 0
        try:
            for batch in self._bar(list(self._batches(self.calib_texts)), "capture linear inputs"):
                if taken >= self.max_calib_tokens:
                    break
                mask = batch["attention_mask"].bool()
                # Keep only what fits under max_calib_tokens: cut the mask, not the batch.
                flat = mask.flatten().cumsum(0).reshape(mask.shape)
                state["mask"] = mask & (flat <= self.max_calib_tokens - taken)
                state["seen"] = {}
                self.model(**batch)
                taken += int(state["mask"].sum())
        finally:
            for handle in handles:
                handle.remove()
            state["seen"] = {}
        captured = {name: torch.cat(parts) for name, parts in chunks.items() if parts}
        for name, source in alias.items():
            captured[name] = captured[source]
        self._calib_inputs = {name: captured[name] for name in linears if name in captured}
        return self._calib_inputs

    @torch.no_grad()
    def block_inputs(self, model: nn.Module) -> Iterator[tuple[int, nn.Module, BlockInputs]]:
        """Block-by-block capture on the calibration texts: yields ``(i, block_i, inputs_i)``.

        ``inputs_0`` is captured by running ``model`` up to its first block; after the caller
        is done with block i (typically: it quantized the block in place), block i as it is
        then is run on ``inputs_i`` to give ``inputs_{i+1}``. So each block is calibrated on
        the outputs of the already-quantized blocks before it, and only one block's inputs
        are held at a time. Padding tokens stay in (attention masks them); the calibration
        texts are used whole, in batches of ``batch_size``.
        """
        blocks = self.blocks(model)
        no_cache = {} if self.model_name == "minilm" else {"use_cache": False}
        inputs = real_models.capture_block_inputs(
            model, blocks[0], self._batches(self.calib_texts), **no_cache
        )
        for i, block in enumerate(self._bar(blocks, "block-by-block calibration")):
            yield i, block, inputs
            if i + 1 < len(blocks):
                inputs = inputs.with_hidden_states(inputs.run(block))

    # -- training hook --------------------------------------------------------------------
    def token_batches(
        self, seq_len: int = 64, batch_size: int = 8, split: str = "calib"
    ) -> Iterator[torch.Tensor]:
        """Endless ``(batch_size, seq_len)`` input-id batches from the texts of ``split``
        ("calib" or "eval"), as one token stream cut into windows (cycled when it runs out)."""
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        texts = {"calib": self.calib_texts, "eval": self.eval_texts}[split]
        ids = self.tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
        stream = torch.tensor(ids, dtype=torch.long)
        windows = stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)
        if len(windows) == 0:
            raise ValueError(f"the {split} texts hold fewer than seq_len={seq_len} tokens")
        order = itertools.cycle(range(len(windows)))
        while True:
            yield windows[[next(order) for _ in range(batch_size)]]

    def train(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        steps: int,
        *,
        lr: float = 1e-4,
        seq_len: int = 64,
        batch_size: int = 8,
        desc: str = "train",
    ) -> list[float]:
        """``steps`` AdamW steps of ``loss_fn(model, input_ids)`` on ``token_batches``; returns
        the losses. The model is left in ``eval()`` mode afterwards."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        params = [p for p in model.parameters() if p.requires_grad]
        if steps and not params:
            raise ValueError("train: the model has no parameter with requires_grad=True")
        optimizer = torch.optim.AdamW(params, lr=lr) if params else None
        batches = self.token_batches(seq_len, batch_size)
        losses = []
        model.train()
        try:
            for _ in self._bar(range(steps), desc):
                assert optimizer is not None
                loss = loss_fn(model, next(batches))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        finally:
            model.eval()
        return losses

    # -- quality --------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, model: nn.Module) -> torch.Tensor:
        return real_models.embed(
            model, self.tokenizer, self.eval_texts, self.batch_size, self.max_length
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        """Quality of ``model`` (a quantized copy) on the evaluation texts.

        MiniLM: mean cosine between its embeddings and the FP model's (1.0 = unchanged).
        SmolLM2: token perplexity (lower is better).
        """
        model.eval()
        if self.model_name == "minilm":
            if self._fp_embeddings is None:
                self._fp_embeddings = self._embed(self.model)
            embeddings = self._embed(model)
            # Both sides are L2-normalised, so the row-wise dot product is the cosine.
            return float((embeddings * self._fp_embeddings).sum(dim=-1).mean())
        return real_models.perplexity(
            model, self.tokenizer, self.eval_texts, self.max_length, self.batch_size
        )

    @property
    def fp_quality(self) -> float:
        """Quality of the unquantized model (cached)."""
        if self._fp_quality is None:
            self._fp_quality = self.evaluate(self.model)
        return self._fp_quality


@contextlib.contextmanager
def _transformers_progress(enabled: bool):
    """Silence transformers' own loading bars too when progress is off."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the loaders raise ModelNotInstalled with the fix
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_context(
    model: str = "minilm",
    calib_size: int = DEFAULT_CALIB_SIZE,
    eval_size: int = DEFAULT_EVAL_SIZE,
    *,
    seed: int = 0,
    progress: bool = True,
    quick: bool = False,
    full: bool = False,
    smollm2_path: str | os.PathLike[str] | None = None,
) -> Context:
    """Load ``model`` ("minilm" or "smollm2") and the text splits into a ``Context``."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    calib_texts = text_data.load_texts("calib", calib_size, seed=seed)
    eval_texts = text_data.load_texts("eval", eval_size, seed=seed)
    with _transformers_progress(progress):
        if model == "minilm":
            net, tokenizer = real_models.load_minilm()
        else:
            net, tokenizer = real_models.load_smollm2(smollm2_path)
    if model == "minilm":
        return Context(
            model,
            net,
            tokenizer,
            calib_texts,
            eval_texts,
            progress=progress,
            quick=quick,
            full=full,
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # positions 0..n-1 for every text, as in perplexity()
    # 30 layers of 576..1536-wide inputs: keep the captured activations near 0.4 GB.
    return Context(
        model,
        net,
        tokenizer,
        calib_texts,
        eval_texts,
        batch_size=8,
        max_calib_tokens=1024,
        progress=progress,
        quick=quick,
        full=full,
    )
