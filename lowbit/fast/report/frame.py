"""The report's shared frame: ``Row``, ``Section``, the metrics every section uses, the table
and CSV writers, the plots, and ``run_report`` (the run loop). Nothing here knows any method."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.fast import data as text_data
from lowbit.fast._io import atomic_write_bytes
from lowbit.fast._io import check_out_dir as _check_out_dir

from .context import DEFAULT_SIZES, MODELS, QUICK_SIZES, Context, ReportContext, build_context

__all__ = [
    "Row",
    "Section",
    "TIERS",
    "tier_of",
    "for_tier",
    "FakeQuantLinear",
    "rel_err",
    "mean",
    "bits_with_row_scales",
    "png",
    "pyplot",
    "format_table",
    "run_report",
]


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
    # what ``quality`` measures when it is not the report's metric (e.g. "accuracy" for a
    # training experiment); such rows are left out of the quality-vs-bits plot
    metric: str | None = None


TIERS = ("default", "quick", "full")
"""The report's settings tiers: ``lowbit report`` (under 3 minutes), ``--quick`` (a smoke test,
numbers not meaningful) and ``--full`` (longer calibration and training, every experiment)."""


def tier_of(ctx: ReportContext) -> str:
    """The tier ``ctx`` runs at: "quick", "full" or "default"."""
    return "quick" if ctx.quick else "full" if ctx.full else "default"


def for_tier(ctx: ReportContext, default: Any, *, quick: Any, full: Any) -> Any:
    """``default``, or ``quick`` / ``full`` under ``--quick`` / ``--full``: a section's settings."""
    return {"default": default, "quick": quick, "full": full}[tier_of(ctx)]


@dataclass(frozen=True)
class Section:
    """One method's part of the report, declared in that method's own section module.

    ``build(ctx)`` returns its rows. ``evaluations`` (model evaluations it runs at the default
    settings) and ``extra_seconds`` (calibration / search / training time on an idle 2-core
    machine at the default, ``--quick`` and ``--full`` settings, in ``TIERS`` order, including
    the evaluations a tier adds or drops) give the rough time printed before the run starts.
    """

    key: str  # the name --methods takes
    title: str
    build: Callable[[ReportContext], list[Row]]
    evaluations: int
    extra_seconds: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def expected_seconds(self, seconds_per_evaluation: float, tier: str = "default") -> float:
        return self.evaluations * seconds_per_evaluation + self.extra_seconds[TIERS.index(tier)]


# -- metrics ---------------------------------------------------------------------------------
def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| in float64; 0 when exact is all zeros and approx too."""
    exact, approx = exact.detach().double(), approx.detach().double()
    norm = float(exact.norm())
    diff = float((approx - exact).norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def mean(values: Sequence[float]) -> float:
    """The mean of ``values``; 0.0 for none (a model without quantizable linears)."""
    return sum(values) / len(values) if values else 0.0


def bits_with_row_scales(bits: float, widths: Sequence[int], counts: Sequence[int]) -> float:
    """Average bits per element with one float32 scale per row of each width."""
    total = sum(c * (bits + 32.0 / w) for w, c in zip(widths, counts))
    return total / sum(counts)


class FakeQuantLinear(nn.Module):
    """A linear with fixed fake-quantized weights and an input quantizer ``act`` (RTN baselines:
    the quantizers themselves are ``lowbit.fast.uniform``'s)."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_q: torch.Tensor,
        act: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.weight_q = weight_q
        self.bias = linear.bias
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.act(x), self.weight_q, self.bias)


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
        cells = [_cell(k, getattr(row, k)) for k, _ in _COLUMNS]
        if row.metric is not None:
            cells[[k for k, _ in _COLUMNS].index("quality")] += f" ({row.metric})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _rows_csv(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(Row)], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
    return buffer.getvalue()


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(figure: Any) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(figure)
    return buffer.getvalue()


def _label(row: Row) -> str:
    return (
        row.config.removesuffix(" W+A")
        if row.method == "formats"
        else f"{row.method}\n{row.config}"
    )


def _error_plot(rows: Sequence[Row]) -> bytes:
    plt = pyplot()
    # One bar pair per row that measured an error; the formats' W+A rows carry both.
    chosen = [r for r in rows if r.weight_rel_err is not None or r.act_rel_err is not None]
    chosen = [r for r in chosen if not (r.method == "formats" and r.config.endswith(" W"))]
    chosen = [r for r in chosen if r.method != "FP32"]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(chosen) + 2), 4))
    positions = range(len(chosen))
    for offset, key, label in (
        (-0.2, "weight_rel_err", "weight"),
        (0.2, "act_rel_err", "activation"),
    ):
        values = [getattr(r, key) or 0.0 for r in chosen]
        axis.bar([p + offset for p in positions], values, width=0.4, label=label)
    axis.set_xticks(
        list(positions), [_label(r) for r in chosen], rotation=30, ha="right", fontsize=8
    )
    if any((r.weight_rel_err or 0) > 0 or (r.act_rel_err or 0) > 0 for r in chosen):
        axis.set_yscale("log")
    axis.set_xlabel("row of the report table (its quantization as configured in that row)")
    axis.set_ylabel("mean relative error ||Q(x) - x|| / ||x||")
    axis.set_title("Weight and activation quantization error per row (missing bar: not quantized)")
    axis.legend()
    if not chosen:
        axis.text(0.5, 0.5, "no rows measured an error", ha="center", transform=axis.transAxes)
    return png(figure)


def _quality_plot(rows: Sequence[Row], quality_name: str, higher_is_better: bool) -> bytes:
    """Quality against bits per weight: one point per row, coloured by method (the Pareto view)."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    rows = [r for r in rows if r.metric is None]  # other metrics have their own figures
    methods = list(dict.fromkeys(r.method for r in rows))

    def kind(r: Row) -> str:
        if r.method == "FP32":
            return "unquantized"
        return "weights only" if r.abits is None else "weights + activations"

    markers = {"unquantized": "s", "weights only": "o", "weights + activations": "^"}
    for k, method in enumerate(methods):
        for what, marker in markers.items():
            points = [
                r for r in rows if r.method == method and r.wbits is not None and kind(r) == what
            ]
            if not points:
                continue
            axis.scatter(
                [r.wbits for r in points],
                [r.quality for r in points],
                color=f"C{k}",
                marker=marker,
                s=36,
                label=f"{method} ({what})",
            )
            for r in points:
                axis.annotate(
                    r.config, (r.wbits, r.quality), fontsize=6, xytext=(3, 3),
                    textcoords="offset points",
                )  # fmt: skip
    axis.set_xscale("log", base=2)
    ticks = [4, 6, 8, 16, 32]
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.set_xlabel("bits per weight, scales included (log scale)")
    direction = "higher" if higher_is_better else "lower"
    axis.set_ylabel(f"{quality_name} vs full precision ({direction} is better)")
    axis.set_title("Quality against bits per weight, one point per report row")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    return png(figure)


def _channel_plot(ctx: ReportContext) -> bytes:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
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
        axis.set_ylabel("max |x|")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(
            f"{name}: max |x| per input channel (top channel {top}: "
            f"{float(channel_max[top]):.1f}, {float(channel_max[top]) / max(median, 1e-12):.0f}x median)",
            fontsize=8,
        )
    axes[-1, 0].set_xlabel("input channel")
    figure.suptitle(f"{ctx.model_name}: linear inputs on calibration text", fontsize=10)
    figure.tight_layout()
    return png(figure)


# -- the run loop ----------------------------------------------------------------------------
def _check_methods(methods: str | Sequence[str] | None, sections: dict[str, Section]) -> list[str]:
    if methods is None:
        return list(sections)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError(f"no method given to --methods; choose from {', '.join(sections)}")
    unknown = [m for m in methods if m not in sections]
    if unknown:
        raise ValueError(
            f"unknown method {', '.join(map(repr, unknown))} in --methods; "
            f"choose from {', '.join(sections)}"
        )
    return methods


def _check_size(flag: str, size: Any, split: str) -> None:
    available = len(text_data.load_texts(split))
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= available:
        raise ValueError(f"{flag} must be an integer from 1 to {available}, got {size!r}")


def run_report(
    sections: dict[str, Section],
    model: str = "minilm",
    methods: str | Sequence[str] | None = None,
    calib_size: int | None = None,
    eval_size: int | None = None,
    out_dir: str | os.PathLike[str] = "lowbit-report",
    progress: bool = True,
    *,
    quick: bool = False,
    full: bool = False,
    seed: int = 0,
    smollm2_path: str | os.PathLike[str] | None = None,
    context_factory: Callable[..., Context] = build_context,
) -> list[Row]:
    """Run the selected ``sections`` on ``model``, print and write the report (see the package
    docstring); ``context_factory`` takes ``build_context``'s arguments."""
    chosen = _check_methods(methods, sections)
    if quick and full:
        raise ValueError("--quick and --full exclude each other; pass one of them")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} for --model; choose one of {', '.join(MODELS)}")
    defaults = QUICK_SIZES if quick else DEFAULT_SIZES[model]
    calib_size = defaults[0] if calib_size is None else calib_size
    eval_size = defaults[1] if eval_size is None else eval_size
    _check_size("--calib-size", calib_size, "calib")
    _check_size("--eval-size", eval_size, "eval")
    out = Path(out_dir)
    _check_out_dir(out)

    ctx = context_factory(
        model,
        calib_size,
        eval_size,
        seed=seed,
        progress=progress,
        quick=quick,
        full=full,
        smollm2_path=smollm2_path,
    )
    tier = tier_of(ctx)
    start = time.perf_counter()
    fp_quality = ctx.fp_quality
    per_evaluation = time.perf_counter() - start
    plan = ", ".join(
        f"{sections[k].title} (~{sections[k].expected_seconds(per_evaluation, tier):.0f} s)"
        for k in chosen
    )
    total = sum(sections[k].expected_seconds(per_evaluation, tier) for k in chosen)
    flag = "" if tier == "default" else f" (--{tier})"
    print(
        f"lowbit report on {model}{flag}: {plan}; expected about {total / 60:.1f} min on an "
        "idle 2-core machine",
        file=sys.stderr,
    )
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
            per_evaluation,
            f"{len(fp_counts)} linears, {ctx.quality_name} on {len(ctx.eval_texts)} passages",
        )
    ]
    for key in chosen:
        rows.extend(sections[key].build(ctx))

    table = format_table(rows, ctx.quality_name)
    label = {"default": "", "quick": " (--quick: tiny calibration, a smoke test)",
             "full": " (--full: longer calibration and training, every experiment)"}[tier]  # fmt: skip
    header = (
        f"# lowbit report: {model}{label}\n\n"
        f"Quality: {ctx.quality_name} ({'higher' if ctx.higher_is_better else 'lower'} is better) "
        f"on {len(ctx.eval_texts)} evaluation passages; calibration on {len(ctx.calib_texts)} "
        f"passages from other plays. Sizes count the quantized linears' weights and scales.\n\n"
    )
    payloads = {
        "report.md": (header + table).encode(),
        "report.csv": _rows_csv(rows).encode(),
        "quality_vs_bits.png": _quality_plot(rows, ctx.quality_name, ctx.higher_is_better),
        "error_per_format.png": _error_plot(rows),
        "activation_channels.png": _channel_plot(ctx),
        **ctx.figures,
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, payload in payloads.items():
            atomic_write_bytes(out / name, payload)
    except OSError as err:  # name the report's folder, not a temporary file
        raise OSError(err.errno, f"cannot write the report: {err.strerror}", str(out)) from err
    print(table, end="")
    return rows
