"""The main job: quantize a real model every registered way and compare (``lowbit report``).

``run_report(model="minilm", methods=None, ...)`` loads the model (``lowbit.fast.models``) and
the shipped text (``lowbit.fast.data``: calibration and evaluation passages come from
different plays), builds one ``Context``, runs every selected section and writes to
``out_dir`` (each file atomically: temp file, then rename):

* ``report.md``: the markdown table (also printed), ``report.csv``: the same rows;
* ``quality_vs_bits.png``: quality against bits per weight, one point per row, by method;
* ``error_per_format.png``: weight and activation relative error per row;
* ``activation_channels.png``: per-channel max |x| of a few linears' calibration inputs,
  where BERT's outlier channels (the reason for LLM.int8 and LLM-FP4) stand out;
* any figure a section adds (``llm_int8_outlier_dims.png``).

Quality is the mean cosine between the quantized and the full-precision sentence
embeddings on the evaluation passages (MiniLM; 1 is perfect, higher is better) or the
perplexity on them (SmolLM2; lower is better). The first row is always the unquantized model.

Layout: ``context.py`` (what sections receive: ``ReportContext``, ``Context``), ``frame.py``
(``Row``, ``Section``, metrics, writers, plots, the run loop) and one section module per
method, each defining ``SECTION``. Adding a method adds its module and one name to
``SECTION_MODULES`` below.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

from .context import (
    DEFAULT_CALIB_SIZE,
    DEFAULT_EVAL_SIZE,
    DEFAULT_SIZES,
    MODELS,
    QUICK_SIZES,
    BlockInputs,
    Context,
    ReportContext,
    build_context,
)
from .frame import TIERS, Row, Section, for_tier, format_table
from .frame import run_report as _run_sections

# One line per method: the section modules, in report order.
SECTION_MODULES = ("formats", "llm_int8", "fpq", "omniquant", "int4_training")

SECTIONS: dict[str, Section] = {}
for _name in SECTION_MODULES:
    _section = importlib.import_module(f"{__name__}.{_name}").SECTION
    SECTIONS[_section.key] = _section

# Each section's row builder by key (what ``--methods`` takes; kept for existing callers).
ROW_BUILDERS: dict[str, Callable[[ReportContext], list[Row]]] = {
    key: section.build for key, section in SECTIONS.items()
}

from .formats import formats_rows  # noqa: E402
from .fpq import fpq_rows  # noqa: E402
from .llm_int8 import llm_int8_rows  # noqa: E402
from .omniquant import omniquant_rows  # noqa: E402

__all__ = [
    "Row",
    "Section",
    "TIERS",
    "for_tier",
    "Context",
    "ReportContext",
    "BlockInputs",
    "SECTIONS",
    "SECTION_MODULES",
    "ROW_BUILDERS",
    "MODELS",
    "DEFAULT_CALIB_SIZE",
    "DEFAULT_EVAL_SIZE",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "build_context",
    "formats_rows",
    "llm_int8_rows",
    "fpq_rows",
    "omniquant_rows",
    "format_table",
    "run_report",
]


def run_report(
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
) -> list[Row]:
    """Run the selected sections (default: all) on ``model``, print and write the report.

    ``calib_size`` / ``eval_size``: passages of each split (default per model,
    ``DEFAULT_SIZES``: 32 / 64 for MiniLM, 8 / 16 for SmolLM2; ``QUICK_SIZES`` with
    ``quick=True``, which also shrinks each section's own settings: a smoke test). ``full=True``
    runs every experiment at the longer settings (about 6 minutes on MiniLM against the
    default's 3).

    Prints the plan with a rough expected time (stderr) before the sections start. Raises
    ``ValueError`` for an unknown model or method, sizes out of range or an unwritable
    ``out_dir``, and ``lowbit.fast.models.ModelNotInstalled`` when the model's files are
    missing — all before any work is done. Files appear in ``out_dir`` only once complete.
    """
    return _run_sections(
        SECTIONS, model, methods, calib_size, eval_size, out_dir, progress,
        quick=quick, full=full, seed=seed, smollm2_path=smollm2_path,
        context_factory=lambda *args, **kwargs: build_context(*args, **kwargs),
    )  # fmt: skip
