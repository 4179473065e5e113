"""LLM-FP4 (FPQ) benchmark: correctness first, then ratios measured side by side (PERF.md).

CPU (always): the reference (NumPy) vs the fast path (torch) for ``quantize`` with a per-tensor
integer bias, a per-row real bias and a per-column real bias, for ``encode``, and for one layer's
``search`` (P5); every pair is checked bit for bit (search: same formats and biases) before it is
timed.

GPU (only when CUDA is available): PERF M4 (one-pass fake quant, E2M1 / E3M0 / E4M3, per-tensor
and per-channel real bias, bf16 in/out) against same-run copy bandwidth and the eager torch path;
M5-like encode to one uint8 code per element (the 4-bit nibble packing is a separate step here,
so M5's "encode + pack" is not fused); the W4A4 / W4A8 FP linear on codes against a bf16
``torch.nn.functional.linear`` at M = N = K = 4096.

Usage: ``python benchmarks/fpq.py [--quick]``; prints a ratio table and writes
``benchmarks/results/fpq.json`` (raw times, hardware context).
"""

# The timed lambdas are called inside the loop iteration that defines them.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import os
import platform

import numpy as np
import torch
from _common import interleaved, med, write_results
from lowbit.fast import fpq as fast
from lowbit.reference import fpq as ref
from lowbit.reference.formats import FPFormat

E3M0, E2M1, E4M3 = FPFormat(3, 0), FPFormat(2, 1), FPFormat(4, 3)


def cpu_section(n: int, repeat: int) -> tuple[dict, list[tuple[str, str, float, str]]]:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n)).astype(np.float32)
    A[:, rng.choice(n, size=max(1, n // 100), replace=False)] *= 20.0  # outlier columns
    At = torch.from_numpy(A)
    cases = {
        "quantize E2M1, integer bias": (E2M1, 1.0),
        "quantize E2M1, real bias per row": (
            E2M1,
            ref.bias_from_max(np.abs(A).max(axis=1, keepdims=True), E2M1),
        ),
        "quantize E4M3, real bias per column": (
            E4M3,
            ref.bias_from_max(np.abs(A).max(axis=0), E4M3),
        ),
    }
    raw: dict = {}
    table = []
    for label, (fmt, bias) in cases.items():
        tb = torch.as_tensor(bias)
        r, f = ref.quantize(A, fmt, bias), fast.quantize(At, fmt, tb)
        assert np.array_equal(r, f.numpy()), f"{label}: fast != reference"
        times = interleaved(
            {"ref": lambda: ref.quantize(A, fmt, bias), "fast": lambda: fast.quantize(At, fmt, tb)},
            repeat,
        )
        raw[label] = times
        table.append(("P5", label, med(times["ref"]) / med(times["fast"]), "fast vs reference (x)"))
    bias = ref.bias_from_max(np.abs(A).max(axis=1, keepdims=True), E2M1)
    tb = torch.from_numpy(bias)
    assert np.array_equal(ref.encode(A, E2M1, bias), fast.encode(At, E2M1, tb).numpy())
    times = interleaved(
        {"ref": lambda: ref.encode(A, E2M1, bias), "fast": lambda: fast.encode(At, E2M1, tb)},
        repeat,
    )
    raw["encode E2M1 per row"] = times
    table.append(
        (
            "P5",
            "encode E2M1, real bias per row",
            med(times["ref"]) / med(times["fast"]),
            "fast vs reference (x)",
        )
    )

    # One layer's search (reduced candidates so the reference finishes quickly).
    T, d_in, d_out = 256, 384, 384
    X = rng.standard_normal((T, d_in)) * np.exp(rng.standard_normal(d_in))
    W = rng.standard_normal((d_out, d_in)) * 0.05
    kw = dict(n_candidates=20, rounds=2, preshifted=True)
    r = ref.search(X, W, **kw)
    f = fast.search(torch.from_numpy(X), torch.from_numpy(W), **kw)  # float64 in: same arithmetic
    assert (r.w_format, r.a_format) == (f.w_format, f.a_format)
    assert np.array_equal(r.w_bias, f.w_bias.numpy()) and np.array_equal(r.a_bias, f.a_bias.numpy())
    Xf, Wf = torch.from_numpy(X).float(), torch.from_numpy(W).float()
    times = interleaved(
        {"ref": lambda: ref.search(X, W, **kw), "fast": lambda: fast.search(Xf, Wf, **kw)},
        max(1, repeat // 3),
    )
    raw["search 256x384x384"] = times
    table.append(
        (
            "P5",
            "search (21 candidates, 2 rounds, FPQ) 256x384->384",
            med(times["ref"]) / med(times["fast"]),
            "fast (fp32 GEMMs) vs reference (x)",
        )
    )
    return raw, table


def gpu_section(quick: bool) -> tuple[dict, list[tuple[str, str, float, str]]]:
    import triton.testing
    from lowbit.kernels import fpq as kernels

    bench = lambda fn: triton.testing.do_bench(fn, return_mode="median")  # noqa: E731  ms, L2 flushed
    raw: dict = {}
    table = []
    rows, cols = (8192, 8192) if quick else (16384, 8192)  # 256 MiB of bf16 without --quick
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(x)
    nbytes = 2 * x.numel() * x.element_size()  # read + write
    for fmt in (E2M1, E3M0, E4M3):
        for gran, bias in (
            ("tensor", torch.tensor(float(fmt.bias) + 0.3, device="cuda", dtype=torch.float64)),
            ("channel", fast.bias_from_max(x.float().abs().amax(dim=0), fmt)),
        ):
            ref_small = ref.quantize(x[:64].float().cpu().numpy(), fmt, bias.cpu().numpy())
            got = fast.quantize(x[:64], fmt, bias).float().cpu().numpy()
            want = torch.from_numpy(ref_small).to(torch.bfloat16).float().numpy()
            assert np.array_equal(got, want), f"M4 {fmt.name}/{gran}: kernel != reference"
            scale, scale_inv = fast._bias_scales(bias)
            t_copy = bench(lambda: dst.copy_(x))
            t_kernel = bench(lambda: kernels.fake_quant(x, fmt.ebits, fmt.mbits, scale, scale_inv))
            t_eager = bench(
                lambda: (lambda q: (q[0] * q[1]).float().to(x.dtype))(
                    fast._round_scaled(x, fmt, bias)
                )
            )
            t_codes = bench(
                lambda: kernels.fake_quant(x, fmt.ebits, fmt.mbits, scale, scale_inv, codes=True)
            )
            key = f"{fmt.name} per-{gran}"
            raw[key] = {
                "copy_ms": t_copy,
                "kernel_ms": t_kernel,
                "eager_ms": t_eager,
                "codes_ms": t_codes,
                "bytes": nbytes,
            }
            table.append(
                ("M4", f"fake quant {key}", t_copy / t_kernel, "of copy bandwidth (gate 0.80)")
            )
            table.append(("M4", f"fake quant {key}", t_eager / t_kernel, "x eager torch (gate 3x)"))
            table.append(
                (
                    "M5*",
                    f"encode {key} (uint8 codes)",
                    (t_copy * 0.75) / t_codes,
                    "of copy bw, bytes-adjusted (no packing)",
                )
            )
    M = N = K = 4096
    a = torch.randn(M, K, device="cuda")
    w = torch.randn(N, K, device="cuda") * 0.05
    for w_fmt, a_fmt in ((E2M1, E2M1), (E2M1, E4M3)):
        tb = fast.bias_from_max(a.abs().amax(dim=0), a_fmt)
        t, k = fast.preshift(tb, a_fmt)
        wb = fast.bias_from_max(w.abs().amax(dim=1), w_fmt)
        s, _ = fast._bias_scales(t + k)
        a_codes = kernels.fake_quant(a, a_fmt.ebits, a_fmt.mbits, s, 1 / s, codes=True)
        w_codes = kernels.pack_nibbles(fast.encode(w, w_fmt, wb[:, None]))
        _, a_si = fast._bias_scales(t)
        _, w_si = fast._bias_scales(wb)
        run = lambda: kernels.fpq_linear(
            a_codes,
            w_codes,
            k,
            a_si.float(),
            w_si.float(),
            (a_fmt.ebits, a_fmt.mbits),
            (w_fmt.ebits, w_fmt.mbits),
            w_packed=True,
            out_dtype=torch.bfloat16,
        )  # noqa: E731
        y = run().float()
        truth = fast.linear(a, w, a_fmt, t + k, w_fmt, wb)
        assert float((y - truth).abs().max()) <= 2e-2 * float(truth.abs().max()), (
            "FP linear kernel != simulated layer"
        )
        ab, wbf = a.bfloat16(), w.bfloat16()
        t_bf16 = bench(lambda: torch.nn.functional.linear(ab, wbf))
        t_fp = bench(run)
        tag = f"W4A{a_fmt.bits}"
        raw[f"fp linear {tag}"] = {"bf16_ms": t_bf16, "fpq_ms": t_fp, "shape": [M, N, K]}
        table.append(("FP linear", f"{tag} codes in, 4096^3", t_bf16 / t_fp, "x bf16 linear"))
    return raw, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    args = parser.parse_args()
    n, repeat = (1024, 5) if args.quick else (4096, 7)
    # One torch thread, like NumPy: ratios compare the code, not the thread count (and on a shared
    # 2-core machine two OpenMP threads lose badly whenever another process holds a core).
    torch.set_num_threads(1)
    context = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "n": n,
    }
    raw, table = cpu_section(n, repeat)
    result = {"context": context, "cpu": raw}
    if torch.cuda.is_available():
        graw, gtable = gpu_section(args.quick)
        result["gpu"] = graw
        table += gtable
    print(f"{'id':10s} {'what':58s} {'ratio':>8s}  meaning")
    for gid, what, ratio, meaning in table:
        print(f"{gid:10s} {what:58s} {ratio:8.2f}  {meaning}")
    result["table"] = [list(r) for r in table]
    write_results("fpq", result)


if __name__ == "__main__":
    main()
