"""Report section "omniquant": OmniQuant (Shao et al., ICLR 2024, arXiv 2308.13137).

Five settings from the paper's tables: W4A16 and W3A16 g128, W2A16 g64 (weights per output
channel or per group of 128 / 64 inputs), W6A6 and W4A4 (activations per token, Q/K/V in
attention too); the default run keeps the three where RTN is worst and OmniQuant gains most
(``OMNIQUANT_DEFAULT``), ``--full`` runs all five. Each gets three rows: RTN (min-max, asymmetric: the shared uniform quantizer's
codes, tests/test_omniquant.py), LWC (learned clipping), LWC+LET (plus the learned equivalent
transformation). Every row is built by ``lowbit.fast.nn.omniquant.calibrate`` and stores real
packed ``OmniQuantLinear`` weights.

The calibration is much shorter than the paper's (``OMNIQUANT_CALIB``: 8 passages, 3 epochs of
one step per passage; ``OMNIQUANT_CALIB_FULL``: 16 passages in batches of two, the same 24
steps per block; the paper: 128 samples x 20 epochs), so the LWC
learning rate is raised to 5e-2 (official 1e-2) to let the logits move in that many steps; the
rows' notes say so. W2 and W4A4 use ``aug_loss`` as the official scripts do.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from lowbit.fast import omniquant as oq
from lowbit.fast.nn.omniquant import OmniQuantLinear, calibrate

from .context import ReportContext
from .frame import Row, Section, for_tier, mean, rel_err

__all__ = ["OMNIQUANT_CALIB", "OMNIQUANT_CALIB_QUICK", "OMNIQUANT_CALIB_FULL"]
__all__ += ["OMNIQUANT_SETTINGS", "OMNIQUANT_DEFAULT", "omniquant_rows", "SECTION"]

OMNIQUANT_CALIB: dict[str, Any] = {"passages": 8, "batch_size": 1, "epochs": 3, "lwc_lr": 5e-2}
OMNIQUANT_CALIB_QUICK: dict[str, Any] = {
    "passages": 2,
    "batch_size": 2,
    "epochs": 1,
    "lwc_lr": 5e-2,
}
OMNIQUANT_CALIB_FULL: dict[str, Any] = {
    "passages": 16,
    "batch_size": 2,
    "epochs": 3,
    "lwc_lr": 5e-2,
}

# (label, wbits, abits, group_size, extra calibrate options): the paper's settings
OMNIQUANT_SETTINGS: tuple[tuple[str, int, int, int | None, dict[str, Any]], ...] = (
    ("W4A16", 4, 16, None, {}),
    ("W3A16 g128", 3, 16, 128, {}),
    ("W2A16 g64", 2, 16, 64, {"aug_loss": True}),
    ("W6A6", 6, 6, None, {}),
    ("W4A4", 4, 4, None, {"aug_loss": True}),
)
OMNIQUANT_DEFAULT = ("W3A16 g128", "W2A16 g64", "W4A4")  # the settings without --full

_METHODS = (("RTN", False, False), ("LWC", True, False), ("LWC+LET", True, True))


def _stored_bits(model: nn.Module, names: list[str]) -> tuple[float, int]:
    """(bits per weight as stored: codes + a float32 scale and an int16 zero point per group,
    weights)."""
    bits, count = 0.0, 0
    for n in names:
        mod = model.get_submodule(n)
        assert isinstance(mod, OmniQuantLinear)
        weights = mod.in_features * mod.out_features
        bits += mod.bits * weights + 48.0 * mod.weight_scale.numel()
        count += weights
    return bits / max(count, 1), count


def omniquant_rows(ctx: ReportContext) -> list[Row]:
    """RTN, LWC and LWC+LET rows at W3A16 g128, W2A16 g64 and W4A4 (``--full``: W4A16 and W6A6
    too)."""
    settings = for_tier(
        ctx, OMNIQUANT_CALIB, quick=OMNIQUANT_CALIB_QUICK, full=OMNIQUANT_CALIB_FULL
    )
    batches = ctx.calib_batches(settings["batch_size"], settings["passages"])
    fp_linears = ctx.linears()
    names = list(fp_linears)
    inputs = ctx.calib_inputs()
    passages = min(settings["passages"], len(ctx.calib_texts))
    train_note = (
        f"{passages} passages, {settings['epochs']} epochs of "
        f"{len(batches)} steps (paper: 128 x 20), lwc_lr {settings['lwc_lr']} (code 1e-2)"
    )
    rows: list[Row] = []
    for label, wbits, abits, group_size, extra in OMNIQUANT_SETTINGS:
        if not ctx.full and label not in OMNIQUANT_DEFAULT:
            continue
        for method, lwc, let in _METHODS:
            start = time.perf_counter()
            model = ctx.fresh_copy()
            trained = lwc or let
            calibrate(
                model, batches, wbits=wbits, abits=abits, group_size=group_size,
                lwc=lwc, let=let, epochs=settings["epochs"] if trained else 0,
                lwc_lr=settings["lwc_lr"], progress=ctx.progress,
                **(extra if trained else {}),
            )  # fmt: skip
            quality = ctx.evaluate(model)
            wbits_stored, count = _stored_bits(model, names)
            w_err = a_err = None
            if not let:  # LET rescales the stored weights: they are not comparable with W
                packed = [model.get_submodule(n) for n in names]
                w_err = mean(
                    [
                        rel_err(m.dequantized_weight(), fp_linears[n].weight)
                        for n, m in zip(names, packed)
                        if isinstance(m, OmniQuantLinear)
                    ]
                )
                if abits < 16:
                    a_err = mean(
                        [rel_err(oq.quantize_activation(x, abits), x) for x in inputs.values()]
                    )
            notes = ["min-max, asymmetric"] if not trained else [train_note]
            if trained and extra.get("aug_loss"):
                notes.append("aug_loss")
            if abits < 16:
                notes.append("A per token, Q/K/V too")
            rows.append(
                Row(
                    "OmniQuant",
                    f"{label} {method}",
                    wbits_stored,
                    None if abits >= 16 else float(abits),
                    w_err,
                    a_err,
                    quality,
                    wbits_stored * count / 8 / 1e6,
                    time.perf_counter() - start,
                    "; ".join(notes),
                )  # fmt: skip
            )
    return rows


SECTION = Section(
    "omniquant", "OmniQuant", omniquant_rows, evaluations=9, extra_seconds=(32.0, 3.0, 75.0)
)
