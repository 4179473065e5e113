"""OmniQuant benchmark: correctness first, then ratios measured side by side (docs/benchmarks.md).

CPU (always): P5 for the LWC weight quantizer and its analytic gradient (NumPy reference vs the
torch fast path, 4-bit, group 128, float32), and the calibration cost on all-MiniLM-L6-v2:
seconds per AdamW step and per block at the report's settings, weight-only and W4A4; and
the peak memory of calibrating SmolLM2-135M against its float32 weights (when installed).

GPU (only when CUDA is available): C9, the W4A16 group-128 dequantize-GEMM of
``OmniQuantLinear`` against torch's bf16 linear, at decode (M = 1, 16) and prefill (M = 2048)
shapes, and the per-token activation quantizer's bandwidth against a same-run copy.

Usage: ``python benchmarks/omniquant.py [--quick]``; prints a ratio table and writes
``benchmarks/results/omniquant.json`` (raw times, hardware context).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from _common import interleaved, med, write_results

from lowbit.fast import omniquant as fast
from lowbit.reference import omniquant as ref


def cpu_section(n: int, repeat: int) -> tuple[dict, list[tuple[str, str, float, str]]]:
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((n, n)) * 0.02).astype(np.float32)
    G = 128
    gamma = (4.0 + rng.standard_normal((n, n // G))).astype(np.float32)
    beta = (4.0 + rng.standard_normal((n, n // G))).astype(np.float32)
    grad = rng.standard_normal((n, n)).astype(np.float32)
    Wt, gt, bt, dt = (torch.from_numpy(a) for a in (W, gamma, beta, grad))

    # Correctness first: the forward bit for bit, the gradients to float32 rounding.
    y_ref = ref.quantize_weight(W, 4, G, gamma, beta)
    assert np.array_equal(y_ref, fast.quantize_weight(Wt, 4, G, gt, bt).numpy()), "forward differs"
    g_ref = ref.quantize_weight_grad(W, 4, G, gamma, beta, grad_output=grad)
    g_fast = fast.quantize_weight_grad(Wt, 4, G, gt, bt, grad_output=dt)
    for a, b in zip(g_ref, g_fast):
        assert np.allclose(a, b.numpy(), rtol=1e-5, atol=1e-6), "gradients differ"

    times = interleaved(
        {
            "reference quantize_weight": lambda: ref.quantize_weight(W, 4, G, gamma, beta),
            "fast quantize_weight": lambda: fast.quantize_weight(Wt, 4, G, gt, bt),
            "reference quantize_weight_grad": lambda: ref.quantize_weight_grad(
                W, 4, G, gamma, beta, grad_output=grad
            ),
            "fast quantize_weight_grad": lambda: fast.quantize_weight_grad(
                Wt, 4, G, gt, bt, grad_output=dt
            ),
        },
        repeat,
    )
    t = {k: med(v) for k, v in times.items()}
    rows = [
        ("P5", f"fast vs reference quantize_weight ({n}x{n}, W4 g128)",
         t["reference quantize_weight"] / t["fast quantize_weight"], "gate 1x, target 3x"),
        ("P5", f"fast vs reference quantize_weight_grad ({n}x{n}, W4 g128)",
         t["reference quantize_weight_grad"] / t["fast quantize_weight_grad"], "gate 1x, target 3x"),
    ]  # fmt: skip
    return {"shape": [n, n], "times_s": times}, rows


def calibration_section(quick: bool) -> tuple[dict, list[tuple[str, str, float, str]]]:
    """Seconds per calibration step and per block on MiniLM at the report's settings."""
    from lowbit.fast.nn.omniquant import calibrate
    from lowbit.fast.report import omniquant as section
    from lowbit.fast.report.context import build_context

    ctx = build_context("minilm", progress=False)
    settings = dict(section.OMNIQUANT_CALIB)
    if quick:
        settings["epochs"] = 1
    batches = ctx.calib_batches(settings["batch_size"], settings["passages"])
    raw: dict = {"settings": settings, "steps_per_block": settings["epochs"] * len(batches)}
    rows = []
    for label, opts in (
        ("W4A16 LWC", dict(wbits=4)),
        ("W4A4 LWC+LET", dict(wbits=4, abits=4, let=True, aug_loss=True)),
    ):
        model = ctx.fresh_copy()
        t0 = time.perf_counter()
        report = calibrate(
            model, batches, epochs=settings["epochs"], lwc_lr=settings["lwc_lr"], progress=False,
            **opts,
        )  # fmt: skip
        total = time.perf_counter() - t0
        per_block = [b.seconds for b in report.blocks]
        steps = raw["steps_per_block"]
        raw[label] = {"total_s": total, "per_block_s": per_block}
        rows.append(("-", f"MiniLM {label}: seconds per block ({steps} steps)", med(per_block), "not a ratio"))  # fmt: skip
        rows.append(("-", f"MiniLM {label}: ms per step", 1e3 * med(per_block) / steps, "not a ratio"))  # fmt: skip
    return raw, rows


def _rss_kib(field: str) -> int:
    """A /proc/self/status memory line (VmRSS, VmHWM) in KiB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_section(quick: bool) -> tuple[dict, list[tuple[str, str, float, str]]]:
    """Peak memory of ``calibrate`` on SmolLM2-135M (W4A4 LWC+LET, aug_loss) above the loaded
    model, against the model's float32 weights: one block's activations and training state are
    held at a time. Linux: the peak RSS is reset through /proc/self/clear_refs before the run."""
    from lowbit.fast.models import ModelNotInstalled
    from lowbit.fast.nn.omniquant import calibrate
    from lowbit.fast.report.context import build_context

    try:
        ctx = build_context("smollm2", progress=False)
    except ModelNotInstalled as exc:
        return {"skipped": str(exc)}, [
            ("-", "SmolLM2 not installed: peak memory not measured", float("nan"), "")
        ]
    model = ctx.model  # calibrated in place: nothing else uses it in this process
    batches = ctx.calib_batches(2)
    weights_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    report = calibrate(
        model, batches, wbits=4, abits=4, let=True, aug_loss=True, epochs=1 if quick else 2,
        lwc_lr=5e-2, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    peak_mb = (_rss_kib("VmHWM") - before) / 1024
    raw = {
        "model_float32_mb": weights_mb, "calibration_peak_above_model_mb": peak_mb,
        "rss_before_mb": before / 1024, "calib_tokens": tokens, "blocks": len(report.blocks),
        "seconds": seconds,
    }  # fmt: skip
    rows = [
        ("mem", f"SmolLM2 calibrate peak above the loaded model, MB ({tokens} tokens)", peak_mb, "not a ratio"),
        ("mem", "SmolLM2 float32 weights, MB", weights_mb, "not a ratio"),
        ("mem", "calibration peak / float32 model", peak_mb / weights_mb, "one block at a time: << 1"),
    ]  # fmt: skip
    return raw, rows


def gpu_section(quick: bool) -> tuple[dict, list[tuple[str, str, float, str]]]:  # pragma: no cover
    from triton.testing import do_bench

    from lowbit.fast.nn.omniquant import OmniQuantLinear
    from lowbit.kernels import omniquant as kernels

    dev = "cuda"
    rows: list[tuple[str, str, float, str]] = []
    raw: dict = {"device": torch.cuda.get_device_name()}
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    for N, K in shapes:
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
        mod = OmniQuantLinear.from_linear(lin.float(), 4, 128).to(dev)
        w_bf16 = mod.dequantized_weight().to(torch.bfloat16)
        for M in (1, 16, 2048):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            y = mod(x)
            truth = x.double() @ mod.dequantized_weight().double().T
            assert (y.double() - truth).abs().max() <= 0.05 * truth.abs().max(), "kernel differs"
            t_ref = [
                do_bench(lambda x=x, w=w_bf16: torch.nn.functional.linear(x, w)) for _ in range(2)
            ]
            t_q = [do_bench(lambda x=x, mod=mod: mod(x)) for _ in range(2)]
            kind = "decode" if M <= 16 else "prefill"
            goal = "gate 2.0x, target 2.8x" if M <= 16 else "gate 0.9x, target 1.0x"
            rows.append(("C9", f"W4A16 g128 {kind} M={M} N={N} K={K} vs bf16", min(t_ref) / min(t_q), goal))  # fmt: skip
            raw[f"C9_{M}x{N}x{K}"] = {"bf16_ms": t_ref, "w4a16_ms": t_q}
    x = torch.randn(4096 if quick else 16384, 4096, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(x)
    t_copy = [do_bench(lambda: dst.copy_(x)) for _ in range(2)]
    t_act = [do_bench(lambda: kernels.quantize_activation(x, 4)) for _ in range(2)]
    rows.append(("M-", "per-token activation quantize GB/s / copy GB/s (3 vs 2 passes of bytes)", (3 / 2) * min(t_copy) / min(t_act), ""))  # fmt: skip
    raw["act_quant"] = {"copy_ms": t_copy, "quant_ms": t_act}
    return raw, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024^2 quantizer, one epoch")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 1024 if args.quick else 2048
    result: dict = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    result["cpu_section"], rows = cpu_section(n, args.repeat)
    result["calibration"], cal_rows = calibration_section(args.quick)
    rows += cal_rows
    result["peak_memory"], mem_rows = peak_memory_section(args.quick)
    rows += mem_rows
    if torch.cuda.is_available():
        result["gpu_section"], gpu_rows = gpu_section(args.quick)
        rows += gpu_rows
    else:
        rows.append(("GPU", "no CUDA device: C9 not measured", float("nan"), ""))
    result["ratios"] = [{"id": r[0], "what": r[1], "value": r[2], "goal": r[3]} for r in rows]
    write_results("omniquant", result)
    print(f"\nOmniQuant benchmark ({'quick, ' if args.quick else ''}CPU)")
    print(f"{'id':5} {'value':>8}  what (goal)")
    for rid, what, value, goal in rows:
        print(f"{rid:5} {value:8.2f}  {what}{f' ({goal})' if goal else ''}")


if __name__ == "__main__":
    main()
