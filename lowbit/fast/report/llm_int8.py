"""Report section "llm_int8": LLM.int8() (Dettmers et al., 2022, arXiv 2208.07339) at W8A8.

Rows: per-tensor absmax (the paper's failing baseline: ``lowbit.fast.uniform`` with one scale
per tensor for each weight and each input), vector-wise (``Linear8bitLt`` with threshold 0:
per-token and per-output-channel scales), and vector-wise + decomposition at 6.0 (outlier
columns of each batch in full precision). The last row's note carries the outlier analysis of
the paper's section 4.1 on the calibration text, and ``llm_int8_outlier_dims.png`` shows which
feature dimensions exceed the threshold in which linear input.
"""

from __future__ import annotations

import time

import torch

from lowbit.fast import llm_int8 as int8
from lowbit.fast import uniform
from lowbit.fast.convert import replace_linears
from lowbit.fast.nn import Linear8bitLt

from .context import ReportContext
from .frame import FakeQuantLinear, Row, Section, bits_with_row_scales, mean, png, pyplot, rel_err

__all__ = ["llm_int8_rows", "SECTION"]


def _per_tensor(t: torch.Tensor) -> torch.Tensor:
    return uniform.quantize(t, 8, symmetric=True, granularity="tensor")


def _outlier_note(ctx: ReportContext, inputs: dict[str, torch.Tensor]) -> str:
    """The paper's section 4.1 analysis on the calibration text, and its figure."""
    from matplotlib.ticker import MaxNLocator

    fp_linears = ctx.linears()
    # Fraction of outlier columns per linear input at τ = 6 on the calibration tokens.
    mean_frac = mean(
        [float(int8.vectorwise_quant(x, 6.0)[2].float().mean()) for x in inputs.values()]
    )
    # The analysis runs on the hidden states that enter the linears (attention projections,
    # FFN expansion), not on the residual stream: take every distinct captured input of model
    # width, in model order (q/k/v share one tensor).
    widths = [lin.in_features for lin in fp_linears.values()]
    width = max(widths, key=widths.count)
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

    plt = pyplot()
    per_layer = (H.abs() >= 6.0).any(dim=1)  # (sub-layers, d)
    fig, ax = plt.subplots(figsize=(7, 3))
    for layer in range(per_layer.shape[0]):
        dims = per_layer[layer].nonzero().flatten().tolist()
        ax.scatter(dims, [layer] * len(dims), s=10, color="C3")
    ax.set(
        xlabel="feature dimension",
        ylabel="linear input (model order)",
        title=f"{ctx.model_name}: feature dimensions where some token has |x| >= 6",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, H.shape[-1])
    ctx.figures["llm_int8_outlier_dims.png"] = png(fig)
    return (
        f"outlier columns per input at 6.0: {mean_frac:.2%}; paper-criteria outlier features "
        f"(over {len(stack)} linear inputs): {describe(systematic)}; in >= 25 % of inputs at any "
        f"token share: {describe(candidates)}"
    )


def llm_int8_rows(ctx: ReportContext) -> list[Row]:
    """W8A8 rows of LLM.int8(): per-tensor absmax, vector-wise, vector-wise + decomposition (6.0)."""
    fp_linears = ctx.linears()
    inputs = ctx.calib_inputs()
    counts = [lin.weight.numel() for lin in fp_linears.values()]
    widths = [lin.in_features for lin in fp_linears.values()]

    def act_err_vectorwise(tau: float) -> float:
        errs = []
        for x in inputs.values():
            codes, absmax, cols = int8.vectorwise_quant(x, tau)
            xq = torch.where(cols[None, :], x, int8.vectorwise_dequant(codes, absmax))
            errs.append(rel_err(xq, x))
        return mean(errs)

    rows: list[Row] = []
    note = _outlier_note(ctx, inputs)
    configs = [
        ("W8A8 absmax per-tensor", None, "one scale per tensor"),
        ("W8A8 vector-wise", 0.0, "activation scales per token"),
        ("W8A8 vector-wise + decomposition (6.0)", 6.0, note),
    ]
    for label, tau, row_note in configs:
        start = time.perf_counter()
        model = ctx.fresh_copy()
        if tau is None:
            w_err = mean(
                [
                    rel_err(_per_tensor(lin.weight.detach()), lin.weight)
                    for lin in fp_linears.values()
                ]
            )
            act = mean([rel_err(_per_tensor(x), x) for x in inputs.values()])
            wbits = sum(c * (8 + 32.0 / c) for c in counts) / sum(counts)
            replace_linears(
                model,
                lambda name, lin: (
                    FakeQuantLinear(lin, _per_tensor(lin.weight.detach()), _per_tensor)
                    if name in fp_linears
                    else None
                ),
                progress=False,
            )
        else:
            errs = []
            for lin in fp_linears.values():
                c, a, _ = int8.vectorwise_quant(lin.weight.detach(), 0.0)
                errs.append(rel_err(int8.vectorwise_dequant(c, a), lin.weight))
            w_err = mean(errs)
            act = act_err_vectorwise(tau)
            wbits = bits_with_row_scales(8, widths, counts)

            def to_int8(name, lin, tau=tau):
                return Linear8bitLt.from_linear(lin, threshold=tau) if name in fp_linears else None

            replace_linears(model, to_int8, progress=False)
        quality = ctx.evaluate(model)
        rows.append(
            Row(
                "LLM.int8()",
                label,
                wbits,
                8.0,
                w_err,
                act,
                quality,
                sum(c * wbits / 8 for c in counts) / 1e6,
                time.perf_counter() - start,
                row_note,
            )
        )
    return rows


SECTION = Section(
    "llm_int8", "LLM.int8()", llm_int8_rows, evaluations=3, extra_seconds=(3.0, 1.0, 3.0)
)
