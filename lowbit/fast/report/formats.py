"""Report section "formats": every named number format, weights per output channel ("W" rows)
and, in addition, every linear's input per token ("W+A" rows, applied by forward pre-hooks).

Integer rows use the shared uniform quantizer (``lowbit.fast.uniform``, symmetric, scale =
absmax / qmax); float rows scale each row by absmax / format max and round with
``lowbit.fast.formats.quantize``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from lowbit.fast import formats as fast_formats
from lowbit.fast import uniform
from lowbit.reference import formats as ref_formats

from .context import ReportContext
from .frame import Row, Section, bits_with_row_scales, mean, rel_err

__all__ = ["REPORT_FORMATS", "absmax_fake_quant", "formats_rows", "SECTION"]

REPORT_FORMATS: tuple[Any, ...] = (
    ref_formats.E5M2,
    ref_formats.E4M3FN,
    ref_formats.E3M2FN,
    ref_formats.E2M3FN,
    ref_formats.E2M1FN,
    ref_formats.IntFormat(8),
    ref_formats.IntFormat(4),
)


def absmax_fake_quant(x: torch.Tensor, fmt: Any) -> torch.Tensor:
    """Fake-quantize each row of ``x`` (last dim) with scale = row absmax / format max.

    Per output channel for a weight (out, in), per token for an activation (..., in). Integer
    formats go through the uniform quantizer; an all-zero row stays zero (never NaN).
    """
    if isinstance(fmt, ref_formats.IntFormat):
        return uniform.quantize(x, fmt.bits, symmetric=True, granularity="channel")
    absmax = x.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    scale = absmax / fmt.max_value
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return fast_formats.quantize(x / scale, fmt) * scale


class InputFakeQuant:
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
            self.last = (x, absmax_fake_quant(x, self.fmt))
        return (self.last[1], *args[1:])


def formats_rows(ctx: ReportContext) -> list[Row]:
    """Weight-only ("W") and weight+activation ("W+A") rows for every format of ``REPORT_FORMATS``."""
    from tqdm.auto import tqdm

    fp_linears = ctx.linears()
    inputs = ctx.calib_inputs()
    widths = [lin.in_features for lin in fp_linears.values()]
    counts = [lin.weight.numel() for lin in fp_linears.values()]
    rows: list[Row] = []
    bar = tqdm(REPORT_FORMATS, desc="formats", disable=not ctx.progress, leave=False)
    for fmt in bar:
        name = fmt.name.upper() if fmt.name.startswith("e") else fmt.name
        bar.set_description(f"formats {name}")
        wbits = bits_with_row_scales(fmt.bits, widths, counts)
        size_mb = sum(c * (fmt.bits + 32.0 / w) for w, c in zip(widths, counts)) / 8 / 1e6

        start = time.perf_counter()
        model = ctx.fresh_copy()
        w_errs = []
        with torch.no_grad():
            for lin, fp_lin in zip(ctx.linears(model).values(), fp_linears.values()):
                w_q = absmax_fake_quant(fp_lin.weight, fmt)
                w_errs.append(rel_err(w_q, fp_lin.weight))
                lin.weight.copy_(w_q)
        weight_err = mean(w_errs)
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
                    errors_by_tensor[id(x)] = rel_err(absmax_fake_quant(x, fmt), x)
        act_err = mean([errors_by_tensor[id(x)] for x in inputs.values()])
        abits = bits_with_row_scales(fmt.bits, widths, [1] * len(widths))
        hook = InputFakeQuant(fmt)
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


SECTION = Section("formats", "number formats", formats_rows, evaluations=2 * len(REPORT_FORMATS))
