"""Report section "fpq": LLM-FP4 (Liu et al., 2023, arXiv 2310.16836) at W4A4, W4A8 and W8A8.

Rows per bit width: MinMax INT (symmetric RTN from ``lowbit.fast.uniform``: weights per output
channel, activations one static scale per tensor from the calibration absmax: the paper's
"MinMax INT"), MinMax E2M1 (fixed formats, min-max biases), FPQ baseline (format + bias search,
per-tensor activations) and FPQ (pre-shifted per-channel activation bias), plus W8A8.

Everything is static, calibrated on ``ctx.calib_inputs()`` with each layer's FP inputs (the
official code's layer-wise calibration); weights per output channel throughout. The search runs
with ``FPQ_SEARCH`` (``FPQ_SEARCH_QUICK`` under ``--quick``, ``FPQ_SEARCH_FULL`` under
``--full``): fewer candidates, rounds and tokens than the code's 100 / 3 / all, stated in the
rows' notes. The W4A8 FPQ baseline row (within 0.001 of FPQ at 8-bit activations) runs only
under ``--full``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowbit.fast import fpq, uniform
from lowbit.fast.convert import replace_linears
from lowbit.fast.nn import FPQLinear
from lowbit.reference.formats import FPFormat

from .context import ReportContext
from .frame import FakeQuantLinear, Row, Section, for_tier, mean, rel_err

__all__ = ["FPQ_SEARCH", "FPQ_SEARCH_QUICK", "FPQ_SEARCH_FULL", "fpq_rows", "SECTION"]

# the code's: 100 candidates, 3 rounds, every token
FPQ_SEARCH = {"n_candidates": 6, "rounds": 2, "max_tokens": 128}
FPQ_SEARCH_QUICK = {"n_candidates": 4, "rounds": 1, "max_tokens": 64}
FPQ_SEARCH_FULL = {"n_candidates": 20, "rounds": 2, "max_tokens": 256}


class _MinMaxInt(FakeQuantLinear):
    """The paper's "MinMax INT": symmetric RTN, weights per output channel, activations with one
    static per-tensor scale taken from the calibration inputs."""

    def __init__(self, linear: nn.Linear, x: torch.Tensor, wbits: int, abits: int) -> None:
        w = linear.weight.detach()
        weight_q = uniform.quantize(w, wbits, symmetric=True, granularity="channel")
        _, a_scale, _ = uniform.encode(x, abits, symmetric=True, granularity="tensor")

        def act(t: torch.Tensor) -> torch.Tensor:  # (..., in): the scale is calibrated on 2-D rows
            rows = t.reshape(-1, t.shape[-1])
            q = uniform.quantize(rows, abits, symmetric=True, granularity="tensor", scale=a_scale)
            return q.reshape(t.shape)

        super().__init__(linear, weight_q, act)
        self.wbits = wbits


def fpq_rows(ctx: ReportContext) -> list[Row]:
    """LLM-FP4 rows at W4A4 and W4A8 (MinMax INT, MinMax E2M1, FPQ baseline, FPQ) and W8A8."""
    fp_linears = ctx.linears()
    inputs = ctx.calib_inputs()
    names = [n for n in fp_linears if n in inputs]
    counts = [fp_linears[n].weight.numel() for n in names]
    settings: dict[str, Any] = for_tier(
        ctx, FPQ_SEARCH, quick=FPQ_SEARCH_QUICK, full=FPQ_SEARCH_FULL
    )
    search_note = (
        f"search: {settings['n_candidates'] + 1} candidates, {settings['rounds']} rounds, "
        f"<= {settings['max_tokens']} tokens (code: 101, 3, all); embeddings not quantized"
    )

    def errors(model: nn.Module) -> tuple[float, float]:
        w_err, a_err = [], []
        with torch.no_grad():
            for n in names:
                mod = model.get_submodule(n)
                w = fp_linears[n].weight.detach()
                x = inputs[n]
                if isinstance(mod, FPQLinear):
                    w_err.append(rel_err(mod.dequantized_weight(), w))
                    xq = (
                        x
                        if mod.a_format is None
                        else fpq.quantize(x, mod.a_format, mod.act_biases())
                    )
                else:
                    assert isinstance(mod, _MinMaxInt)
                    w_err.append(rel_err(mod.weight_q, w))
                    xq = mod.act(x)
                a_err.append(rel_err(xq, x))
        return mean(w_err), mean(a_err)

    def stored_wbits(model: nn.Module) -> float:
        bits = 0.0
        for n in names:
            mod = model.get_submodule(n)
            if isinstance(mod, FPQLinear):  # codes + one float64 exponent bias per output channel
                bits += 8.0 * (mod.weight_codes.numel() + 8 * mod.weight_bias.numel())
            else:  # codes + one float32 scale per output channel
                assert isinstance(mod, _MinMaxInt)
                qw = 2 ** (mod.wbits - 1) - 1
                bits += float(
                    mod.weight_q.numel() * math.log2(2 * qw + 2) + 32.0 * mod.weight_q.shape[0]
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

    searches = [(4, 4, False), (4, 4, True), (4, 8, True), (8, 8, True)]
    if ctx.full:
        searches.insert(2, (4, 8, False))

    def searched(wbits: int, abits: int, preshifted: bool):
        k = searches.index((wbits, abits, preshifted)) + 1
        kind = "FPQ" if preshifted else "FPQ baseline"
        desc = f"{kind} W{wbits}A{abits} search, {k}/{len(searches)}"

        def build(model: nn.Module) -> dict:
            return fpq._quantize_model(
                model, {n: inputs[n] for n in names}, wbits=wbits, abits=abits, preshifted=preshifted,
                progress=ctx.progress, desc=desc, **settings,
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
        if (4, abits, False) in searches:
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


SECTION = Section(
    "fpq", "LLM-FP4 (FPQ)", fpq_rows, evaluations=9, extra_seconds=(45.0, 15.0, 110.0)
)
