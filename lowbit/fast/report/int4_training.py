"""Report section "int4_training": training transformers with 4-bit integers (Xi et al.,
NeurIPS 2023, arXiv 2306.11987), two experiments on this machine's CPUs.

* **Language model** (the paper's pre-training claim, small): a LLaMA decoder built from a
  config (2 blocks, width 128, tied embeddings, the report model's tokenizer with its ids
  renumbered to the ones the plays use), trained from scratch on every passage of the
  calibration plays with four recipes of the paper, the same seed, data and steps: ``FP32``; ``LSQ only`` (INT4 LSQ forward without the Hadamard transform, bit splitting
  without sampling); ``HQ + bit split`` (what the released CUDA kernels run); ``HQ + LSS`` (the
  paper: leverage-score sampling on). Every linear of the blocks is an ``Int4Linear``; the
  embedding and the head stay in float. Quality: the loss on the evaluation plays' tokens (a
  held-out text, never trained on); the claim to check is FP <= HQ + LSS (a small gap) <
  LSQ only. Two more recipes go beyond the paper: ``MXFP4 (2026)`` and ``NVFP4 (2026)``, FP4
  training as current hardware does it (an FP4 forward, stochastically rounded gradients, a
  16 x 16 random Hadamard transform on the weight-gradient GEMM's inputs;
  ``FP4TrainingLinear``, emulated).
* **Fine-tuning** (the paper's GLUE experiment, small): MiniLM with a linear head learns which
  of the four shipped plays a passage comes from, from passages early in each play, and is
  scored on later passages of the same plays (the two sets never overlap). FP32 against every
  encoder linear as ``Int4Linear`` (HQ + LSS). Quality: held-out accuracy.

Both are short so that the section fits the report's time: the default run trains the language
models for 50 steps and leaves the fine-tuning to ``--full`` (``INT4_TRAINING``;
``INT4_TRAINING_FULL``: 100 steps and the fine-tuning; ``--quick`` runs both for a few steps);
``lowbit train`` runs longer versions of the same functions (``train_language_models``,
``fine_tune_play_classifier``). The section saves the loss curves
(``int4_training_curves.png``) and the accuracy bars (``int4_training_accuracy.png``).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.fast.data import CALIB_PLAYS, EVAL_PLAYS, load_texts, play_passages
from lowbit.fast.nn.int4_training import convert_for_training

from .context import ReportContext
from .frame import Row, Section, for_tier, png, pyplot

__all__ = [
    "INT4_TRAINING",
    "INT4_TRAINING_QUICK",
    "INT4_TRAINING_FULL",
    "RECIPES",
    "TrainingRun",
    "tiny_llama",
    "language_model_data",
    "train_language_models",
    "fine_tune_play_classifier",
    "curves_figure",
    "accuracy_figure",
    "int4_training_rows",
    "run_training",
    "TRAIN_DEFAULTS",
    "SECTION",
]

# Int4Linear options per recipe (None: the float model)
RECIPES: dict[str, dict[str, Any] | None] = {
    "FP32": None,
    "LSQ only": {"block": 1, "sampling": False},
    "HQ + bit split": {"sampling": False},
    "HQ + LSS": {"sampling": True},
    "MXFP4 (2026)": {"recipe": "mxfp4"},
    "NVFP4 (2026)": {"recipe": "nvfp4"},
}

INT4_TRAINING_FULL: dict[str, Any] = {
    "lm_steps": 100,
    "lm_lr": 3e-3,
    "lm_seq_len": 64,
    "lm_batch": 8,
    "eval_batches": 4,
    "eval_every": 20,
    "fine_tune": True,  # the MiniLM play classifier (minilm only)
    "train_per_play": 32,
    "test_per_play": 16,
    "epochs": 2,
    "cls_lr": 2e-4,
    "cls_batch": 16,
}
INT4_TRAINING: dict[str, Any] = {
    **INT4_TRAINING_FULL,
    "lm_steps": 50,
    "eval_every": 10,
    "fine_tune": False,
}
INT4_TRAINING_QUICK: dict[str, Any] = {  # both experiments, for a few steps: a smoke test
    **INT4_TRAINING_FULL,
    "lm_steps": 6,
    "eval_batches": 1,
    "eval_every": 3,
    "train_per_play": 4,
    "test_per_play": 4,
    "epochs": 1,
    "cls_batch": 8,
}


@dataclass
class TrainingRun:
    """One recipe's run: losses per step, held-out evaluations, the final figure and time."""

    recipe: str
    train_losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_values: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.eval_values[-1] if self.eval_values else math.nan


def tiny_llama(vocab_size: int, seed: int = 0) -> nn.Module:
    """A LLaMA decoder of a few million parameters (most of them in the tied embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _bar(iterable, desc: str, total: int, progress: bool):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _token_ids(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    return torch.tensor(tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"])


def language_model_data(tokenizer, seq_len: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(vocabulary size, training windows, held-out windows): every passage of the calibration
    plays to train on, of the evaluation plays to test on, cut into ``seq_len`` windows, the
    token ids renumbered to those that occur (a few thousand instead of the tokenizer's
    30,522, so the tied embedding stays small)."""
    train_ids = _token_ids(tokenizer, load_texts("calib"))
    test_ids = _token_ids(tokenizer, load_texts("eval"))
    used, compact = torch.unique(torch.cat([train_ids, test_ids]), return_inverse=True)
    train_ids, test_ids = compact[: len(train_ids)], compact[len(train_ids) :]

    def windows(ids: torch.Tensor) -> torch.Tensor:
        return ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)

    return len(used), windows(train_ids), windows(test_ids)


def train_language_models(
    ctx: ReportContext,
    settings: dict[str, Any] | None = None,
    recipes: Sequence[str] = tuple(RECIPES),
    seed: int = 0,
) -> list[TrainingRun]:
    """Train ``tiny_llama`` once per recipe on the calibration plays; evaluate the loss on the
    evaluation plays every ``eval_every`` steps. Same initial weights, batches and seed."""
    s = {**INT4_TRAINING, **(settings or {})}
    vocab, train_windows, test_windows = language_model_data(ctx.tokenizer, s["lm_seq_len"])
    held_out = list(test_windows[: s["eval_batches"] * s["lm_batch"]].split(s["lm_batch"]))
    order = torch.randint(
        len(train_windows),
        (s["lm_steps"], s["lm_batch"]),
        generator=torch.Generator().manual_seed(seed),
    )
    initial = tiny_llama(vocab, seed)
    runs = []
    for recipe in recipes:
        start = time.perf_counter()
        model = copy.deepcopy(initial)
        options = RECIPES[recipe]
        if options is not None:
            convert_for_training(model, progress=False, seed=seed, **options)
        run = TrainingRun(recipe)
        optimizer = torch.optim.AdamW(model.parameters(), lr=s["lm_lr"])
        desc = f"INT4 training LM, {recipe}"
        for step in _bar(range(1, s["lm_steps"] + 1), desc, s["lm_steps"], ctx.progress):
            model.train()
            loss = _lm_loss(model, train_windows[order[step - 1]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.train_losses.append(float(loss.detach()))
            if step % s["eval_every"] == 0 or step == s["lm_steps"]:
                run.eval_steps.append(step)
                run.eval_values.append(_held_out_loss(model, held_out))
        run.seconds = time.perf_counter() - start
        runs.append(run)
    return runs


@torch.no_grad()
def _held_out_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    model.eval()
    return sum(float(_lm_loss(model, ids)) for ids in batches) / len(batches)


def _play_split(train_per_play: int, test_per_play: int) -> tuple[list, list]:
    """(passage, label) pairs: each play's first passages train, its last ones test."""
    train, test = [], []
    for label, play in enumerate(CALIB_PLAYS + EVAL_PLAYS):
        passages = play_passages(play)
        if train_per_play + test_per_play > len(passages):
            raise ValueError(f"{play} has {len(passages)} passages, fewer than requested")
        train += [(p, label) for p in passages[:train_per_play]]
        test += [(p, label) for p in passages[-test_per_play:]]
    return train, test


class _Classifier(nn.Module):
    """Mean-pooled encoder states -> a linear head over the plays."""

    def __init__(self, encoder: nn.Module, classes: int):
        super().__init__()
        self.encoder = encoder
        config: Any = encoder.config  # a transformers PretrainedConfig
        self.head = nn.Linear(int(config.hidden_size), classes)

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return self.head((states * mask).sum(1) / mask.sum(1).clamp_min(1))


def _batches(tokenizer, pairs: list, size: int, shuffle_seed: int | None) -> Iterator:
    order = list(range(len(pairs)))
    if shuffle_seed is not None:
        order = torch.randperm(
            len(pairs), generator=torch.Generator().manual_seed(shuffle_seed)
        ).tolist()
    for i in range(0, len(order), size):
        chunk = [pairs[j] for j in order[i : i + size]]
        enc = tokenizer([p for p, _ in chunk], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")  # fmt: skip
        yield enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in chunk])


def fine_tune_play_classifier(
    ctx: ReportContext,
    recipes: Sequence[str] = ("FP32", "HQ + LSS"),
    settings: dict[str, Any] | None = None,
    seed: int = 0,
) -> list[TrainingRun]:
    """Fine-tune the report's encoder (MiniLM) with a linear head to name a passage's play;
    ``eval_values`` holds the held-out accuracy after each epoch."""
    s = {**INT4_TRAINING, **(settings or {})}
    train, test = _play_split(s["train_per_play"], s["test_per_play"])
    classes = len(CALIB_PLAYS + EVAL_PLAYS)
    runs = []
    for recipe in recipes:
        start = time.perf_counter()
        torch.manual_seed(seed)
        model = _Classifier(ctx.fresh_copy(), classes)
        options = RECIPES[recipe]
        if options is not None:
            convert_for_training(model.encoder, progress=False, seed=seed, **options)
        optimizer = torch.optim.AdamW(model.parameters(), lr=s["cls_lr"])
        run = TrainingRun(recipe)
        steps_per_epoch = math.ceil(len(train) / s["cls_batch"])
        for epoch in range(s["epochs"]):
            model.train()
            batches = _batches(ctx.tokenizer, train, s["cls_batch"], seed + epoch)
            desc = f"INT4 training fine-tune, {recipe}, epoch {epoch + 1}/{s['epochs']}"
            for ids, mask, labels in _bar(batches, desc, steps_per_epoch, ctx.progress):
                loss = nn.functional.cross_entropy(model(ids, mask), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                run.train_losses.append(float(loss.detach()))
            run.eval_steps.append(epoch + 1)
            run.eval_values.append(_accuracy(model, ctx.tokenizer, test, s["cls_batch"]))
        run.seconds = time.perf_counter() - start
        runs.append(run)
    return runs


@torch.no_grad()
def _accuracy(model: nn.Module, tokenizer, pairs: list, size: int) -> float:
    model.eval()
    right = 0
    for ids, mask, labels in _batches(tokenizer, pairs, size, None):
        right += int((model(ids, mask).argmax(-1) == labels).sum())
    return right / len(pairs)


def _smooth(values: Sequence[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - width] if i >= width else 0.0)
        out.append(total / min(i + 1, width))
    return out


def curves_figure(runs: Sequence[TrainingRun], title: str) -> bytes:
    """Training loss (running mean) and held-out loss against the step, one colour per recipe."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k, run in enumerate(runs):
        steps = range(1, len(run.train_losses) + 1)
        left.plot(steps, _smooth(run.train_losses, 10), color=f"C{k}", label=run.recipe)
        right.plot(run.eval_steps, run.eval_values, "o-", color=f"C{k}", label=run.recipe)
    left.set_title("training loss (running mean of 10 steps)")
    right.set_title("held-out loss (evaluation plays)")
    for axis in (left, right):
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("cross-entropy (nats per token)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    return png(figure)


def accuracy_figure(runs: Sequence[TrainingRun], chance: float) -> bytes:
    """Held-out accuracy per epoch, one bar group per recipe."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    epochs = max(len(r.eval_values) for r in runs)
    width = 0.8 / max(len(runs), 1)
    for k, run in enumerate(runs):
        axis.bar([e + (k - (len(runs) - 1) / 2) * width for e in run.eval_steps], run.eval_values,
                 width=width, color=f"C{k}", label=run.recipe)  # fmt: skip
    axis.axhline(chance, color="grey", linestyle="--", label=f"chance ({chance:.2f})")
    axis.set_xticks(list(range(1, epochs + 1)))
    axis.set_xlabel("epoch")
    axis.set_ylabel("held-out accuracy (later passages of the same plays)")
    axis.set_ylim(0, 1)
    axis.set_title("MiniLM fine-tuned to name the play of a passage: FP32 vs INT4 linears")
    axis.legend(fontsize=8)
    return png(figure)


def _row(run: TrainingRun, kind: str, metric: str, note: str) -> Row:
    """A table row for one run; bits per weight and activation as the recipe computes them."""
    options = RECIPES[run.recipe]
    if options is None:
        bits = 32.0
    elif options.get("recipe") == "mxfp4":
        bits = 4.25  # E2M1 + one 8-bit scale per 32 values
    elif options.get("recipe") == "nvfp4":
        bits = 4.5  # E2M1 + one 8-bit scale per 16 values (the tensor scale is negligible)
    else:
        bits = float(options.get("bits", 4))
    return Row("INT4 training", f"{kind} {run.recipe}", bits, bits, None, None, run.final, 0.0,
               run.seconds, note, metric=metric)  # fmt: skip


def int4_training_rows(ctx: ReportContext, settings: dict[str, Any] | None = None) -> list[Row]:
    """One row per LM recipe (held-out loss) and per fine-tuning recipe (held-out accuracy);
    ``settings`` overrides ``INT4_TRAINING`` (``INT4_TRAINING_QUICK`` / ``_FULL`` under
    ``--quick`` / ``--full``); the fine-tuning runs where ``settings["fine_tune"]`` says so."""
    tier = for_tier(ctx, INT4_TRAINING, quick=INT4_TRAINING_QUICK, full=INT4_TRAINING_FULL)
    s = {**tier, **(settings or {})}
    lm_runs = train_language_models(ctx, s)
    ctx.figures["int4_training_curves.png"] = curves_figure(
        lm_runs, f"LLaMA (2 blocks, width 128) from scratch, {s['lm_steps']} steps"
    )
    rows = [
        _row(run, "LM", "held-out loss", f"held-out loss after {s['lm_steps']} steps from "
             f"scratch (train {sum(run.train_losses[-10:]) / len(run.train_losses[-10:]):.3f})")
        for run in lm_runs
    ]  # fmt: skip
    if ctx.model_name != "minilm" or not s["fine_tune"]:
        return rows
    cls_runs = fine_tune_play_classifier(ctx, settings=s)
    classes = len(CALIB_PLAYS + EVAL_PLAYS)
    ctx.figures["int4_training_accuracy.png"] = accuracy_figure(cls_runs, 1 / classes)
    note = (
        f"{classes} plays, {s['train_per_play']} passages each to train, "
        f"{s['test_per_play']} later ones to test, {s['epochs']} epochs"
    )
    rows += [_row(run, "fine-tune", "accuracy", note) for run in cls_runs]
    return rows


TRAIN_DEFAULTS: dict[str, Any] = {**INT4_TRAINING_FULL, "lm_steps": 600, "epochs": 5,
                                  "train_per_play": 96, "test_per_play": 32}  # fmt: skip


def run_training(
    model: str = "minilm",
    out_dir: str | os.PathLike[str] = "lowbit-train",
    *,
    lm_steps: int = TRAIN_DEFAULTS["lm_steps"],
    epochs: int = TRAIN_DEFAULTS["epochs"],
    progress: bool = True,
    smollm2_path: str | os.PathLike[str] | None = None,
) -> list[Row]:
    """``lowbit train``: the section's experiments at full length, on every calibration passage
    (the LM) and 96 / 32 passages per play (the fine-tuning); writes ``training.md``,
    ``training.csv`` and the two figures to ``out_dir`` (each file atomically)."""
    from lowbit.fast._io import atomic_write_bytes

    from .context import build_context
    from .frame import _check_out_dir, _rows_csv, format_table

    if lm_steps < 1 or epochs < 1:
        raise ValueError(f"--steps and --epochs must be >= 1, got {lm_steps}, {epochs}")
    out = Path(out_dir)
    _check_out_dir(out)
    ctx = build_context(model, None, 64, progress=progress, smollm2_path=smollm2_path)  # type: ignore[arg-type]
    settings = {**TRAIN_DEFAULTS, "lm_steps": lm_steps, "epochs": epochs,
                "eval_every": max(1, lm_steps // 12)}  # fmt: skip
    rows = int4_training_rows(ctx, settings)
    table = format_table(rows, "quality")
    header = (
        f"# lowbit train: 4-bit training on {model}\n\nLM: a LLaMA (2 blocks, width 128) from "
        f"scratch, {lm_steps} steps on the calibration plays, loss on the evaluation plays. "
        f"Fine-tuning: {epochs} epochs, accuracy on later passages of the same plays.\n\n"
    )
    payloads = {"training.md": (header + table).encode(), "training.csv": _rows_csv(rows).encode(),
                **ctx.figures}  # fmt: skip
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, payload in payloads.items():
            atomic_write_bytes(out / name, payload)
    except OSError as err:
        raise OSError(err.errno, f"cannot write the results: {err.strerror}", str(out)) from err
    print(table, end="")
    return rows


SECTION = Section(
    "int4_training", "INT4 training", int4_training_rows, evaluations=0,
    extra_seconds=(42.0, 10.0, 115.0),
)  # fmt: skip
