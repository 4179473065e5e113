"""The main job: quantize a real model every registered way and compare (``lowbit report``).

``run_report(model="minilm", methods=None, ...)`` loads the model (``lowbit.fast.models``) and
the shipped text (``lowbit.fast.data``: calibration and evaluation passages come from
different plays), builds one ``Context``, asks every selected builder in ``ROW_BUILDERS``
for its ``Row``s, and writes to ``out_dir`` (each file atomically: temp file, then rename):

* ``report.md``: the markdown table (also printed), ``report.csv``: the same rows;
* ``error_per_format.png``: weight and activation relative error per row;
* ``activation_channels.png``: per-channel max |x| of a few linears' calibration inputs,
  where BERT's outlier channels (the reason for LLM.int8 and LLM-FP4) stand out.

Quality is the mean cosine between the quantized and the full-precision sentence
embeddings on the evaluation passages (MiniLM; 1 is perfect, higher is better) or the
perplexity on them (SmolLM2; lower is better). The first row is always the unquantized model.

Method builders: ``ROW_BUILDERS[key] = builder`` with ``builder(ctx) -> list[Row]``. The
built-in ``"formats"`` builder fake-quantizes with every named format (E5M2 ... E2M1FN, int8,
int4) using per-row absmax scales: each linear's weight per output channel ("W" rows) and,
in addition, each linear's input per token ("W+A" rows, applied by forward pre-hooks).
Other builders are appended at the end of this file by the method modules' authors.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from lowbit.fast import data as text_data
from lowbit.fast import models as real_models
from lowbit.fast._io import atomic_write_bytes
from torch import nn

__all__ = [
    "Row",
    "Context",
    "ROW_BUILDERS",
    "MODELS",
    "DEFAULT_CALIB_SIZE",
    "DEFAULT_EVAL_SIZE",
    "DEFAULT_SIZES",
    "build_context",
    "formats_rows",
    "format_table",
    "run_report",
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


@dataclass
class Row:
    """One line of the comparison table."""

    method: str  # e.g. "formats", "LLM.int8()", "FPQ"
    config: str  # e.g. "E2M1 W", "W8A8 vector-wise + decomposition (6.0)"
    wbits: float | None  # bits per weight incl. scales, None if weights untouched
    abits: float | None
    weight_rel_err: float | None  # mean over linears of ||Wq - W|| / ||W||
    act_rel_err: float | None  # same over captured linear inputs
    quality: float  # embedding cosine vs FP (MiniLM) or perplexity (SmolLM2)
    size_mb: float  # weights of the quantized linears as stored
    seconds: float  # wall time of quantization + evaluation for this row
    note: str = ""


class Context:
    """Everything a row builder needs; built once per report run.

    ``model`` is the full-precision model (float32, eval mode) and is never modified:
    builders quantize ``fresh_copy()``. ``calib_inputs()`` captures the inputs of every
    quantizable linear on the calibration passages (padding dropped, at most
    ``max_calib_tokens`` tokens); linears that share one input tensor (q/k/v, gate/up)
    share one captured tensor.
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
        self.quality_name = "embedding cosine" if model_name == "minilm" else "perplexity"
        self.higher_is_better = model_name == "minilm"
        self.figures: dict[str, bytes] = {}  # extra PNGs from builders, written by run_report
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

    @torch.no_grad()
    def calib_inputs(self) -> dict[str, torch.Tensor]:
        """Inputs ``(tokens, in_features)`` of every linear on the calibration texts (cached)."""
        if self._calib_inputs is not None:
            return self._calib_inputs
        from tqdm.auto import tqdm

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
            batches = list(self._batches(self.calib_texts))
            for batch in tqdm(
                batches, desc="capture linear inputs", disable=not self.progress, leave=False
            ):
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
        return Context(model, net, tokenizer, calib_texts, eval_texts, progress=progress)
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
    )


# -- the built-in "formats" rows ------------------------------------------------------------
def _report_formats() -> list[Any]:
    from lowbit.reference import formats as ref_formats

    return [
        ref_formats.E5M2,
        ref_formats.E4M3FN,
        ref_formats.E3M2FN,
        ref_formats.E2M3FN,
        ref_formats.E2M1FN,
        ref_formats.IntFormat(8),
        ref_formats.IntFormat(4),
    ]


def _fast_quantize(x: torch.Tensor, fmt: Any) -> torch.Tensor:
    from lowbit.fast.formats import quantize

    return quantize(x, fmt)


def _absmax_fake_quant(x: torch.Tensor, fmt: Any) -> torch.Tensor:
    """Fake-quantize each row of ``x`` (last dim) with scale = row absmax / format max.

    Per output channel for a weight (out, in), per token for an activation (..., in).
    An all-zero row keeps scale 1 (it stays zero) instead of dividing by 0.
    """
    absmax = x.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    scale = absmax / fmt.max_value
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _fast_quantize(x / scale, fmt) * scale


class _InputFakeQuant:
    """Forward pre-hook: fake-quantize a linear's input per token.

    q, k and v (or gate and up) read the very same tensor; it is quantized once and the
    result reused (the last input is kept, so its id cannot be recycled meanwhile).
    """

    def __init__(self, fmt: Any) -> None:
        self.fmt = fmt
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.last is None or self.last[0] is not x:
            self.last = (x, _absmax_fake_quant(x, self.fmt))
        return (self.last[1], *args[1:])


def _rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| in float64; 0 when exact is all zeros and approx too."""
    exact, approx = exact.detach().double(), approx.detach().double()
    norm = float(exact.norm())
    diff = float((approx - exact).norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def _bits_with_row_scales(bits: int, widths: Sequence[int], counts: Sequence[int]) -> float:
    """Average bits per element with one float32 scale per row of each width."""
    total = sum(c * (bits + 32.0 / w) for w, c in zip(widths, counts))
    return total / sum(counts)


def formats_rows(ctx: Context) -> list[Row]:
    """Weight-only ("W") and weight+activation ("W+A") rows for every named format."""
    from tqdm.auto import tqdm

    fp_linears = ctx.linears()
    inputs = ctx.calib_inputs()
    widths = [lin.in_features for lin in fp_linears.values()]
    counts = [lin.weight.numel() for lin in fp_linears.values()]
    rows: list[Row] = []
    for fmt in tqdm(_report_formats(), desc="formats", disable=not ctx.progress, leave=False):
        name = fmt.name.upper() if fmt.name.startswith("e") else fmt.name
        wbits = _bits_with_row_scales(fmt.bits, widths, counts)
        size_mb = sum(c * (fmt.bits + 32.0 / w) for w, c in zip(widths, counts)) / 8 / 1e6

        start = time.perf_counter()
        model = ctx.fresh_copy()
        w_errs = []
        with torch.no_grad():
            for lin, fp_lin in zip(ctx.linears(model).values(), fp_linears.values()):
                w_q = _absmax_fake_quant(fp_lin.weight, fmt)
                w_errs.append(_rel_err(w_q, fp_lin.weight))
                lin.weight.copy_(w_q)
        weight_err = sum(w_errs) / len(w_errs)
        quality = ctx.evaluate(model)
        w_seconds = time.perf_counter() - start
        rows.append(
            Row("formats", f"{name} W", wbits, None, weight_err, None, quality, size_mb, w_seconds)
        )

        # Same weights, plus every linear's input fake-quantized per token.
        start = time.perf_counter()
        errors_by_tensor: dict[int, float] = {}  # shared inputs (q/k/v) are measured once
        with torch.no_grad():
            for x in inputs.values():
                if id(x) not in errors_by_tensor:
                    errors_by_tensor[id(x)] = _rel_err(_absmax_fake_quant(x, fmt), x)
        act_err = sum(errors_by_tensor[id(x)] for x in inputs.values()) / max(len(inputs), 1)
        abits = _bits_with_row_scales(fmt.bits, widths, [1] * len(widths))
        hook = _InputFakeQuant(fmt)
        handles = [lin.register_forward_pre_hook(hook) for lin in ctx.linears(model).values()]
        try:
            quality = ctx.evaluate(model)
        finally:
            for handle in handles:
                handle.remove()
            hook.last = None
        rows.append(
            Row(
                "formats",
                f"{name} W+A",
                wbits,
                abits,
                weight_err,
                act_err,
                quality,
                size_mb,
                w_seconds + time.perf_counter() - start,
                "per-channel W, per-token A",
            )
        )
    return rows


ROW_BUILDERS: dict[str, Callable[[Context], list[Row]]] = {"formats": formats_rows}


# -- output ----------------------------------------------------------------------------------
_COLUMNS = (
    ("method", "method"),
    ("config", "config"),
    ("wbits", "W bits"),
    ("abits", "A bits"),
    ("weight_rel_err", "W rel err"),
    ("act_rel_err", "A rel err"),
    ("quality", "quality"),
    ("size_mb", "size MB"),
    ("seconds", "time s"),
    ("note", "note"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if key in ("weight_rel_err", "act_rel_err"):
            return f"{value:.2e}"
        if key == "quality":
            return f"{value:.4f}"
        if key in ("wbits", "abits"):
            return f"{value:.2f}"
        return f"{value:.1f}"
    return str(value).replace("|", "/")


def format_table(rows: Sequence[Row], quality_name: str = "quality") -> str:
    """The rows as a markdown table (quality column titled ``quality_name``)."""
    headers = [quality_name if key == "quality" else title for key, title in _COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(k, getattr(row, k)) for k, _ in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _rows_csv(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(Row)], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    return buffer.getvalue()


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _error_plot(rows: Sequence[Row]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One bar pair per row that measured an error; the formats' W+A rows carry both.
    chosen = [r for r in rows if r.weight_rel_err is not None or r.act_rel_err is not None]
    chosen = [r for r in chosen if not (r.method == "formats" and r.config.endswith(" W"))]
    chosen = [r for r in chosen if r.method != "FP32"]
    labels = [
        r.config.removesuffix(" W+A") if r.method == "formats" else f"{r.method}\n{r.config}"
        for r in chosen
    ]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(chosen) + 2), 4))
    positions = range(len(chosen))
    for offset, key, label in (
        (-0.2, "weight_rel_err", "weight"),
        (0.2, "act_rel_err", "activation"),
    ):
        values = [getattr(r, key) or 0.0 for r in chosen]
        axis.bar([p + offset for p in positions], values, width=0.4, label=label)
    axis.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=8)
    if any((r.weight_rel_err or 0) > 0 or (r.act_rel_err or 0) > 0 for r in chosen):
        axis.set_yscale("log")
    axis.set_ylabel("mean relative error ||Q(x) - x|| / ||x||")
    axis.set_title("Quantization error per row (formats: per-channel W, per-token A)")
    axis.legend()
    if not chosen:
        axis.text(0.5, 0.5, "no rows measured an error", ha="center", transform=axis.transAxes)
    payload = _png(figure)
    plt.close(figure)
    return payload


def _channel_plot(ctx: Context) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = ctx.calib_inputs()
    unique: dict[int, str] = {}
    for name, x in inputs.items():  # one panel per distinct tensor (q/k/v share theirs)
        unique.setdefault(id(x), name)
    names = list(unique.values())

    def outlier_ratio(name: str) -> float:  # largest channel max over the median channel max
        channel_max = inputs[name].abs().amax(dim=0)
        return float(channel_max.max()) / max(float(channel_max.median()), 1e-12)

    # The four inputs with the strongest outlier channels, in model order.
    picks = sorted(sorted(names, key=outlier_ratio, reverse=True)[:4], key=names.index)
    figure, axes = plt.subplots(len(picks), 1, figsize=(9, 2.2 * len(picks)), squeeze=False)
    for axis, name in zip(axes[:, 0], picks):
        channel_max = inputs[name].abs().amax(dim=0)  # (in_features,)
        median = float(channel_max.median())
        top = int(channel_max.argmax())
        floor = max(float(channel_max.min()) / 2, 1e-6)  # log axis: fill down to a floor
        axis.stairs(channel_max.numpy(), baseline=floor, fill=True)  # one artist, not bars
        axis.set_yscale("log")
        axis.set_title(
            f"{name}: max |x| per input channel (top channel {top}: "
            f"{float(channel_max[top]):.1f}, {float(channel_max[top]) / max(median, 1e-12):.0f}x median)",
            fontsize=8,
        )
    axes[-1, 0].set_xlabel("input channel")
    figure.suptitle(f"{ctx.model_name}: linear inputs on calibration text", fontsize=10)
    figure.tight_layout()
    payload = _png(figure)
    plt.close(figure)
    return payload


def _check_methods(methods: str | Sequence[str] | None) -> list[str]:
    if methods is None:
        return list(ROW_BUILDERS)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError(f"no method given; choose from {', '.join(ROW_BUILDERS)}")
    unknown = [m for m in methods if m not in ROW_BUILDERS]
    if unknown:
        raise ValueError(
            f"unknown method {', '.join(map(repr, unknown))}; choose from {', '.join(ROW_BUILDERS)}"
        )
    return methods


def run_report(
    model: str = "minilm",
    methods: str | Sequence[str] | None = None,
    calib_size: int | None = None,
    eval_size: int | None = None,
    out_dir: str | os.PathLike[str] = "lowbit-report",
    progress: bool = True,
    *,
    seed: int = 0,
    smollm2_path: str | os.PathLike[str] | None = None,
) -> list[Row]:
    """Run the selected builders (default: all) on ``model``, print and write the report.

    ``calib_size`` / ``eval_size``: passages of each split (default per model,
    ``DEFAULT_SIZES``: 32 / 64 for MiniLM, 8 / 16 for SmolLM2).

    Raises ``ValueError`` for an unknown model or method or sizes out of range, and
    ``lowbit.fast.models.ModelNotInstalled`` when the model's files are missing — all
    before any work is done. Files appear in ``out_dir`` only once complete.
    """
    chosen = _check_methods(methods)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    calib_size = DEFAULT_SIZES[model][0] if calib_size is None else calib_size
    eval_size = DEFAULT_SIZES[model][1] if eval_size is None else eval_size
    for label, size, split in (
        ("calib_size", calib_size, "calib"),
        ("eval_size", eval_size, "eval"),
    ):
        available = len(text_data.load_texts(split))
        if not isinstance(size, int) or not 1 <= size <= available:
            raise ValueError(f"{label} must be an integer from 1 to {available}, got {size!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; pass another --out")
    # Find an unwritable destination now, not after minutes of quantization (and create
    # nothing yet: a run that fails early leaves no folder behind).
    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot write to output folder {out}: {existing} is not a writable folder; pass another --out"
        )

    ctx = build_context(
        model, calib_size, eval_size, seed=seed, progress=progress, smollm2_path=smollm2_path
    )
    start = time.perf_counter()
    fp_quality = ctx.fp_quality
    fp_counts = [lin.weight.numel() for lin in ctx.linears().values()]
    rows = [
        Row(
            "FP32",
            "unquantized",
            32.0,
            32.0,
            0.0,
            0.0,
            fp_quality,
            sum(fp_counts) * 4 / 1e6,
            time.perf_counter() - start,
            f"{len(fp_counts)} linears, {ctx.quality_name} on {len(ctx.eval_texts)} passages",
        )
    ]
    for key in chosen:
        rows.extend(ROW_BUILDERS[key](ctx))

    table = format_table(rows, ctx.quality_name)
    header = (
        f"# lowbit report: {model}\n\n"
        f"Quality: {ctx.quality_name} ({'higher' if ctx.higher_is_better else 'lower'} is better) "
        f"on {len(ctx.eval_texts)} evaluation passages; calibration on {len(ctx.calib_texts)} "
        f"passages from other plays. Sizes count the quantized linears' weights and scales.\n\n"
    )
    payloads = {
        "report.md": (header + table).encode(),
        "report.csv": _rows_csv(rows).encode(),
        "error_per_format.png": _error_plot(rows),
        "activation_channels.png": _channel_plot(ctx),
        **ctx.figures,
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, payload in payloads.items():
        atomic_write_bytes(out / name, payload)
    print(table, end="")
    return rows


# --- LLM.int8() rows (lowbit.fast.llm_int8, lowbit.fast.nn.Linear8bitLt) -----------------------
def llm_int8_rows(ctx: Context) -> list[Row]:
    """W8A8 rows of LLM.int8(): per-tensor absmax, vector-wise, vector-wise + decomposition (6.0).

    The per-tensor row fake-quantizes each weight and each input with one absmax per tensor
    (the paper's failing baseline); the other two swap in ``Linear8bitLt`` (real int8 codes,
    per-token activation scales, outlier columns of each batch in full precision above τ).
    The note carries the outlier analysis of the paper's Section 4.1 on the calibration text.
    """
    from lowbit.fast import llm_int8 as int8
    from lowbit.fast.convert import replace_linears
    from lowbit.fast.nn import Linear8bitLt

    fp_linears = ctx.linears()
    inputs = ctx.calib_inputs()
    counts = [lin.weight.numel() for lin in fp_linears.values()]

    def per_tensor(t: torch.Tensor) -> torch.Tensor:
        amax = t.abs().amax()
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        return torch.round(t / scale).clamp(-127, 127) * scale

    class _PerTensorInt8(nn.Module):
        def __init__(self, linear: nn.Linear):
            super().__init__()
            self.weight_q = per_tensor(linear.weight.detach())
            self.bias = linear.bias

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(per_tensor(x), self.weight_q, self.bias)

    def act_err_vectorwise(tau: float) -> float:
        errs = []
        for x in inputs.values():
            codes, absmax, cols = int8.vectorwise_quant(x, tau)
            xq = torch.where(cols[None, :], x, int8.vectorwise_dequant(codes, absmax))
            errs.append(_rel_err(xq, x))
        return sum(errs) / max(1, len(errs))

    def outlier_note() -> str:
        # Fraction of outlier columns per linear input at τ = 6 on the calibration tokens.
        fracs = [float(int8.vectorwise_quant(x, 6.0)[2].float().mean()) for x in inputs.values()]
        mean_frac = sum(fracs) / max(1, len(fracs))
        # The paper's analysis (Section 4.1) runs on the hidden states that enter the linears
        # (attention projections, FFN expansion), not on the residual stream: take every
        # distinct captured input of model width, in model order (q/k/v share one tensor).
        width = max(
            (lin.in_features for lin in fp_linears.values()),
            key=[lin.in_features for lin in fp_linears.values()].count,
        )
        seen: set[int] = set()
        stack = []
        for x in inputs.values():
            if x.shape[-1] == width and id(x) not in seen:
                seen.add(id(x))
                stack.append(x)
        tokens = min(x.shape[0] for x in stack)
        H = torch.stack([x[:tokens] for x in stack])  # (sub-layers, tokens, d)
        systematic = int8.outlier_features(H)  # >= 25 % of sub-layers and >= 6 % of tokens
        candidates = int8.outlier_features(H, min_token_frac=0.0)  # >= 25 % of sub-layers

        def describe(stats) -> str:
            dims, mag, lf, tf = stats
            if len(dims) == 0:
                return "none"
            top = torch.argsort(mag, descending=True)[:4]
            shown = ", ".join(
                f"{int(dims[k])} (max {float(mag[k]):.0f}, {float(lf[k]):.0%} layers, {float(tf[k]):.1%} tokens)"
                for k in top
            )
            return f"{len(dims)}: {shown}{', ...' if len(dims) > len(top) else ''}"

        # Figure for the report folder: which dimensions exceed the threshold, per linear input.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        per_layer = (H.abs() >= 6.0).any(dim=1)  # (sub-layers, d)
        fig, ax = plt.subplots(figsize=(7, 3))
        for layer in range(per_layer.shape[0]):
            dims = per_layer[layer].nonzero().flatten().tolist()
            ax.scatter(dims, [layer] * len(dims), s=10, color="C3")
        ax.set(
            xlabel="feature dimension",
            ylabel="linear input (model order)",
            title=f"{ctx.model_name}: input features with |x| >= 6",
        )
        ax.set_xlim(0, H.shape[-1])
        ctx.figures["llm_int8_outlier_dims.png"] = _png(fig)
        plt.close(fig)
        return (
            f"outlier columns per input at 6.0: {mean_frac:.2%}; paper-criteria outlier features "
            f"(over {len(stack)} linear inputs): {describe(systematic)}; in >= 25 % of inputs at any "
            f"token share: {describe(candidates)}"
        )

    rows: list[Row] = []
    note = outlier_note()
    configs = [
        ("W8A8 absmax per-tensor", None),
        ("W8A8 vector-wise", 0.0),
        ("W8A8 vector-wise + decomposition (6.0)", 6.0),
    ]
    for label, tau in configs:
        start = time.perf_counter()
        model = ctx.fresh_copy()
        if tau is None:
            w_err = [
                _rel_err(per_tensor(lin.weight.detach()), lin.weight.detach())
                for lin in fp_linears.values()
            ]
            a_err = [_rel_err(per_tensor(x), x) for x in inputs.values()]
            act = sum(a_err) / max(1, len(a_err))
            wbits = sum(c * (8 + 32.0 / c) for c in counts) / sum(counts)
            replace_linears(
                model,
                lambda name, lin: _PerTensorInt8(lin) if name in fp_linears else None,
                progress=False,
            )
        else:
            w_err = []
            for lin in fp_linears.values():
                c, a, _ = int8.vectorwise_quant(lin.weight.detach(), 0.0)
                w_err.append(_rel_err(int8.vectorwise_dequant(c, a), lin.weight.detach()))
            act = act_err_vectorwise(tau)
            wbits = _bits_with_row_scales(
                8, [lin.in_features for lin in fp_linears.values()], counts
            )
            replace_linears(
                model,
                lambda name, lin, tau=tau: (
                    Linear8bitLt.from_linear(lin, threshold=tau) if name in fp_linears else None
                ),
                progress=False,
            )
        quality = ctx.evaluate(model)
        rows.append(
            Row(
                "LLM.int8()",
                label,
                wbits,
                8.0,
                sum(w_err) / max(1, len(w_err)),
                act,
                quality,
                sum(c * wbits / 8 for c in counts) / 1e6,
                time.perf_counter() - start,
                note
                if tau == 6.0
                else ("activation scales per token" if tau == 0.0 else "one scale per tensor"),
            )
        )
    return rows


ROW_BUILDERS["llm_int8"] = llm_int8_rows


# --- LLM-FP4 / FPQ rows (lowbit.fast.fpq, lowbit.fast.nn.FPQLinear) ----------------------------
FPQ_SEARCH = {
    "n_candidates": 20,
    "rounds": 2,
    "max_tokens": 256,
}  # reduced from 100 / 3 / all: run time


def fpq_rows(ctx: Context) -> list[Row]:
    """LLM-FP4 rows at W4A4 and W4A8: MinMax INT4, MinMax E2M1, FPQ baseline (format + bias search,
    per-tensor activations), FPQ (pre-shifted per-channel activation bias), plus W8A8.

    Everything is static, calibrated on ``ctx.calib_inputs()`` with each layer's FP inputs (the
    official code's layer-wise calibration); weights per output channel throughout. The search
    runs with ``FPQ_SEARCH`` (fewer candidates/rounds/tokens than the code's 100/3/all: stated in
    the notes).
    """
    from lowbit.fast import fpq
    from lowbit.fast.convert import replace_linears
    from lowbit.fast.nn import FPQLinear
    from lowbit.reference.formats import FPFormat

    fp_linears = ctx.linears()
    inputs = ctx.calib_inputs()
    names = [n for n in fp_linears if n in inputs]
    counts = [fp_linears[n].weight.numel() for n in names]
    search_note = (
        f"search: {FPQ_SEARCH['n_candidates'] + 1} candidates, {FPQ_SEARCH['rounds']} rounds, "
        f"<= {FPQ_SEARCH['max_tokens']} tokens (code: 101, 3, all); embeddings not quantized"
    )

    class _MinMaxInt(nn.Module):
        """Symmetric INT fake quantization: weights per output channel, activations one static
        scale per tensor from the calibration absmax (the paper's "MinMax INT")."""

        weight_q: torch.Tensor
        a_scale: torch.Tensor

        def __init__(self, linear: nn.Linear, x: torch.Tensor, wbits: int, abits: int):
            super().__init__()
            self.qw, self.qa = 2 ** (wbits - 1) - 1, 2 ** (abits - 1) - 1
            w = linear.weight.detach()
            self.w_scale = (w.abs().amax(dim=1, keepdim=True) / self.qw).clamp_min(1e-30)
            self.weight_q = torch.round(w / self.w_scale).clamp(-self.qw, self.qw) * self.w_scale
            self.a_scale = (x.abs().amax() / self.qa).clamp_min(1e-30)
            self.bias = linear.bias

        def act(self, x: torch.Tensor) -> torch.Tensor:
            return torch.round(x / self.a_scale).clamp(-self.qa, self.qa) * self.a_scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(self.act(x), self.weight_q, self.bias)

    def errors(model: nn.Module) -> tuple[float, float]:
        w_err, a_err = [], []
        with torch.no_grad():
            for n in names:
                mod = model.get_submodule(n)
                w = fp_linears[n].weight.detach()
                x = inputs[n]
                if isinstance(mod, FPQLinear):
                    w_err.append(_rel_err(mod.dequantized_weight(), w))
                    xq = (
                        x
                        if mod.a_format is None
                        else fpq.quantize(x, mod.a_format, mod.act_biases())
                    )
                else:
                    assert isinstance(mod, _MinMaxInt)
                    w_err.append(_rel_err(mod.weight_q, w))
                    xq = mod.act(x)
                a_err.append(_rel_err(xq, x))
        return sum(w_err) / len(w_err), sum(a_err) / len(a_err)

    def stored_wbits(model: nn.Module) -> float:
        bits = 0.0
        for n in names:
            mod = model.get_submodule(n)
            if isinstance(mod, FPQLinear):  # codes + one float64 exponent bias per output channel
                bits += 8.0 * (mod.weight_codes.numel() + 8 * mod.weight_bias.numel())
            else:  # codes + one float32 scale per output channel
                assert isinstance(mod, _MinMaxInt)
                bits += float(
                    mod.weight_q.numel() * math.log2(2 * mod.qw + 2) + 32.0 * mod.weight_q.shape[0]
                )
        return bits / sum(counts)

    def row(label: str, abits: int, build: Callable[[nn.Module], dict], note: str) -> Row:
        start = time.perf_counter()
        model = ctx.fresh_copy()
        chosen = build(model)
        w_err, a_err = errors(model)
        quality = ctx.evaluate(model)
        wbits = stored_wbits(model)
        if chosen:
            fmts: dict[str, int] = {}
            for r in chosen.values():
                key = f"W E{r.w_format.ebits}M{r.w_format.mbits} / A E{r.a_format.ebits}M{r.a_format.mbits}"
                fmts[key] = fmts.get(key, 0) + 1
            top = ", ".join(f"{k} x{v}" for k, v in sorted(fmts.items(), key=lambda kv: -kv[1])[:3])
            note = f"{note}; formats: {top}"
        return Row(
            "FPQ", label, wbits, float(abits), w_err, a_err, quality,
            wbits * sum(counts) / 8 / 1e6, time.perf_counter() - start, note,
        )  # fmt: skip

    def minmax_int(wbits: int, abits: int):
        def build(model: nn.Module) -> dict:
            replace_linears(
                model,
                lambda n, lin: _MinMaxInt(lin, inputs[n], wbits, abits) if n in inputs else None,
                skip=(),
                progress=False,
            )
            return {}

        return build

    def minmax_fp(w_fmt: FPFormat, a_fmt: FPFormat):
        def build(model: nn.Module) -> dict:
            fpq._quantize_model(
                model, {n: inputs[n] for n in names}, minmax=(w_fmt, a_fmt), progress=False
            )
            return {}

        return build

    def searched(wbits: int, abits: int, preshifted: bool):
        def build(model: nn.Module) -> dict:
            return fpq._quantize_model(
                model, {n: inputs[n] for n in names}, wbits=wbits, abits=abits, preshifted=preshifted,
                progress=ctx.progress, **FPQ_SEARCH,
            )  # fmt: skip

        return build

    E2M1, E4M3 = FPFormat(2, 1), FPFormat(4, 3)
    rows: list[Row] = []
    for abits in (4, 8):
        tag = f"W4A{abits}"
        a_fp = E2M1 if abits == 4 else E4M3
        rows.append(
            row(
                f"{tag} MinMax INT",
                abits,
                minmax_int(4, abits),
                "symmetric INT, W per channel, A per tensor (static)",
            )
        )
        rows.append(
            row(
                f"{tag} MinMax E2M1",
                abits,
                minmax_fp(E2M1, a_fp),
                f"W E2M1 per channel, A E{a_fp.ebits}M{a_fp.mbits} per tensor",
            )
        )
        rows.append(
            row(
                f"{tag} FPQ baseline",
                abits,
                searched(4, abits, False),
                f"A per tensor; {search_note}",
            )
        )
        rows.append(
            row(f"{tag} FPQ", abits, searched(4, abits, True), f"pre-shifted A bias; {search_note}")
        )
    rows.append(
        row(
            "W8A8 MinMax INT",
            8,
            minmax_int(8, 8),
            "symmetric INT8, W per channel, A per tensor (static)",
        )
    )
    rows.append(row("W8A8 FPQ", 8, searched(8, 8, True), f"pre-shifted A bias; {search_note}"))
    return rows


ROW_BUILDERS["fpq"] = fpq_rows
