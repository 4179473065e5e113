"""LLM.int8() benchmark: correctness first, then ratios measured side by side (the speed goals of docs/benchmarks.md).

CPU (always): row-wise int8 quantization of a float32 4096 x 4096 matrix with planted outlier
columns, NumPy reference loop vs its Numba twin (P1 bit-identical, P2 speed), the public
reference ``vectorwise_quant`` vs the torch fast path (P5), the LLM.int8 matmul reference vs
fast, and the cold Numba compile time (P7).

GPU (only when CUDA is available): M1 quantize and M2 dequantize (the eager fast path) vs copy
bandwidth, C1 int8 GEMM vs bf16, C3 W8A8 linear with dynamic per-token activation quantization
vs bf16 linear (M = 4096, three (N, K)), C7a/b LLM.int8 linear vs bitsandbytes ``Linear8bitLt(has_fp16_weights=False)``, C7c vs bf16
linear, O1 CUDA-graph capture, O2 launches per forward. M3 (row + column quantize in one
kernel) is not implemented: lowbit's backward quantizes rows and columns in two launches.

Usage: ``python benchmarks/llm_int8.py [--quick]``; prints a ratio table and writes
``benchmarks/results/llm_int8.json`` (raw times, hardware context).
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import torch
from _common import cold_numba_compile_seconds, interleaved, med, write_results

from lowbit.fast import llm_int8 as fast
from lowbit.reference import llm_int8 as ref

# P7: first call (compile) of the numba row loop in a fresh process with an empty cache.
COLD_COMPILE_CODE = (
    "import time, numpy as np, numba;"
    "from lowbit.reference.llm_int8 import _quant_rows_numba; t=time.perf_counter();"
    "_quant_rows_numba(np.ones((2, 3), np.float32), np.float32(6));"
    "print(time.perf_counter() - t)"
)


def cpu_section(n: int, repeat: int) -> tuple[dict, list[tuple[str, str, float, str]]]:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n)).astype(np.float32)
    A[:, rng.choice(n, size=max(1, n // 200), replace=False)] *= 20.0  # ~0.5 % outlier columns
    tau = np.float32(6.0)
    At = torch.from_numpy(A)

    # Correctness first: every implementation gives the same codes, scales and mask.
    c_np, a_np = ref._quant_rows_numpy(A, tau)
    c_nb, a_nb = ref._quant_rows_numba(A, tau)
    assert np.array_equal(c_np, c_nb) and np.array_equal(
        a_np.view(np.uint32), a_nb.view(np.uint32)
    ), "P1 failed"
    rc, ra, ro = ref.vectorwise_quant(A, 6.0)
    fc, fa, fo = fast.vectorwise_quant(At, 6.0)
    assert (
        np.array_equal(rc, fc.numpy())
        and np.array_equal(ra, fa.numpy())
        and np.array_equal(ro, fo.numpy())
    )

    q_times = interleaved(
        {
            "numpy row loop": lambda: ref._quant_rows_numpy(A, tau),
            "numba row loop": lambda: ref._quant_rows_numba(A, tau),
            "reference vectorwise_quant": lambda: ref.vectorwise_quant(A, 6.0),
            "fast vectorwise_quant (torch)": lambda: fast.vectorwise_quant(At, 6.0),
        },
        repeat,
    )

    m, k, nout = max(16, n // 16), n // 4, n // 4
    X = A[:m, :k].copy()
    W = (rng.standard_normal((nout, k)) * 0.05).astype(np.float32)
    Xt, Wt = torch.from_numpy(X), torch.from_numpy(W)
    y_ref = ref.matmul(X, W, threshold=6.0)
    y_fast = fast.matmul(Xt, Wt, threshold=6.0).numpy()
    naive = X.astype(np.float64) @ W.T.astype(np.float64)
    assert np.abs(y_fast - y_ref).max() <= 1e-5 * np.abs(y_ref).max() + 1e-6, (
        "fast matmul disagrees"
    )
    mm_times = interleaved(
        {
            "reference matmul": lambda: ref.matmul(X, W, threshold=6.0),
            "fast matmul (torch)": lambda: fast.matmul(Xt, Wt, threshold=6.0),
            "fp32 matmul (torch)": lambda: Xt @ Wt.T,
        },
        repeat,
    )
    cold = cold_numba_compile_seconds(COLD_COMPILE_CODE)

    t = {k_: med(v) for k_, v in {**q_times, **mm_times}.items()}
    rows = [
        (
            "P2",
            "numba vs numpy row-wise int8 quantize",
            t["numpy row loop"] / t["numba row loop"],
            "gate 1.8x, target 2.5x",
        ),
        (
            "P5",
            "fast (torch) vs reference vectorwise_quant",
            t["reference vectorwise_quant"] / t["fast vectorwise_quant (torch)"],
            "gate 1x, target 3x",
        ),
        (
            "P5'",
            "fast (torch) vs numpy row loop",
            t["numpy row loop"] / t["fast vectorwise_quant (torch)"],
            "",
        ),
        (
            "-",
            f"fast vs reference matmul ({m}x{k} @ {k}x{nout})",
            t["reference matmul"] / t["fast matmul (torch)"],
            "",
        ),
        (
            "-",
            "fast LLM.int8 matmul (quantize + torch._int_mm) vs fp32 torch matmul",
            t["fp32 matmul (torch)"] / t["fast matmul (torch)"],
            "CPU, incl. weight quantization per call",
        ),
        ("P7", "cold numba compile (s, not a ratio)", cold, "gate 2 s, target 1 s"),
    ]
    raw = {
        "shape": [n, n],
        "matmul_shape": [m, k, nout],
        "times_s": {**q_times, **mm_times},
        "cold_numba_compile_s": cold,
        "matmul_rel_err_vs_fp64": float(np.linalg.norm(y_ref - naive) / np.linalg.norm(naive)),
    }
    return raw, rows


def gpu_section(
    quick: bool,
) -> tuple[dict, list[tuple[str, str, float, str]]]:  # pragma: no cover - GPU only
    import triton
    from triton.testing import do_bench

    from lowbit.fast.nn import Linear8bitLt
    from lowbit.kernels.int8 import int8_linear, rowwise_quant

    dev = "cuda"
    rows: list[tuple[str, str, float, str]] = []
    raw: dict = {"device": torch.cuda.get_device_name()}

    def bench(fn) -> float:
        return do_bench(fn, return_mode="median")

    # M1: bf16 -> int8 + row scales, 256 MiB input, vs same-run copy bandwidth.
    M, K = (4096, 8192) if quick else (16384, 8192)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    src, dst = x.clone(), torch.empty_like(x)
    codes, absmax, _ = rowwise_quant(x, 0.0)
    ref_codes, ref_absmax, _ = ref.vectorwise_quant(x[:64].float().cpu().numpy())
    assert np.array_equal(codes[:64].cpu().numpy(), ref_codes)
    t_copy = [bench(lambda: dst.copy_(src)) for _ in range(2)]
    t_q = [bench(lambda: rowwise_quant(x, 0.0)) for _ in range(2)]
    copy_gbs = 2 * x.numel() * 2 / (min(t_copy) * 1e-3) / 1e9
    q_gbs = (x.numel() * 3 + M * 4) / (min(t_q) * 1e-3) / 1e9
    rows.append(
        ("M1", "int8 row quantize GB/s / copy GB/s", q_gbs / copy_gbs, "gate 0.80, target 0.90")
    )
    raw["M1"] = {"copy_ms": t_copy, "quant_ms": t_q}

    # M2: int8 + row scales -> float32, the fast path's dequantize (eager torch: no kernel of its
    # own), bytes: 1 read + 4 written per element, against the same copy.
    deq = fast.vectorwise_dequant(codes[:64], absmax[:64]).cpu().numpy()
    assert np.array_equal(deq, ref.vectorwise_dequant(ref_codes, ref_absmax))
    t_dq = [bench(lambda: fast.vectorwise_dequant(codes, absmax)) for _ in range(2)]
    dq_gbs = (x.numel() * 5 + M * 4) / (min(t_dq) * 1e-3) / 1e9
    rows.append(("M2", "int8 dequantize GB/s / copy GB/s", dq_gbs / copy_gbs, "gate 0.80, target 0.90"))  # fmt: skip
    raw["M2"] = {"dequant_ms": t_dq}

    # C3: W8A8 linear with dynamic per-token activation quantization (weights quantized once),
    # M = 4096, bf16 in and out, against torch's bf16 linear.
    for N, K in [(4096, 4096)] if quick else [(4096, 4096), (14336, 4096), (4096, 14336)]:
        xa = torch.randn(4096, K, device=dev, dtype=torch.bfloat16)
        wl = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        cw, sw, _ = rowwise_quant(wl, 0.0)

        def w8a8(xa=xa, cw=cw, sw=sw):
            cx, sx, _ = rowwise_quant(xa, 0.0)
            return int8_linear(cx, sx, cw, sw, out_dtype=torch.bfloat16)

        t_lin = [bench(lambda xa=xa, wl=wl: torch.nn.functional.linear(xa, wl)) for _ in range(2)]
        t_w8 = [bench(w8a8) for _ in range(2)]
        rows.append(("C3", f"W8A8 linear incl. act quant vs bf16, M=4096 N={N} K={K}", min(t_lin) / min(t_w8), "gate 1.25x, target 1.4x"))  # fmt: skip
        raw[f"C3_{N}x{K}"] = {"bf16_ms": t_lin, "w8a8_ms": t_w8}

    # C1: W8A8 int8 GEMM with dequant epilogue vs bf16 matmul, 8192^3.
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ca, sa, _ = rowwise_quant(a, 0.0)
    cb, sb, _ = rowwise_quant(b, 0.0)
    S = int8_linear(ca[:64], sa[:64], cb[:64], sb[:64], out_int32=True)
    assert torch.equal(S.cpu().long(), ca[:64].cpu().long() @ cb[:64].cpu().long().T)
    t_bf16 = [bench(lambda: a @ b.T) for _ in range(2)]
    t_i8 = [bench(lambda: int8_linear(ca, sa, cb, sb, out_dtype=torch.bfloat16)) for _ in range(2)]
    rows.append(
        (
            "C1",
            f"int8 GEMM (dequant fused) vs bf16, {n}^3",
            min(t_bf16) / min(t_i8),
            "gate 1.5x, target 1.7x",
        )
    )
    raw["C1"] = {"bf16_ms": t_bf16, "int8_ms": t_i8}

    # C7: LLM.int8 linear (threshold 6, ~0.5 % outlier columns), fp16, N = K = 8192.
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    lin = torch.nn.Linear(n, n, bias=True, device=dev, dtype=torch.float16)
    ours = Linear8bitLt.from_linear(lin, threshold=6.0)
    if bnb is not None:
        theirs = bnb.nn.Linear8bitLt(n, n, bias=True, has_fp16_weights=False, threshold=6.0)
        theirs.weight = bnb.nn.Int8Params(
            lin.weight.detach().cpu().clone(), requires_grad=False, has_fp16_weights=False
        )
        theirs.bias = torch.nn.Parameter(lin.bias.detach().cpu().clone())
        theirs = theirs.to(dev)
    bf16_lin = torch.nn.Linear(n, n, device=dev, dtype=torch.bfloat16)
    outlier_cols = torch.randperm(n, device=dev)[: max(1, n // 200)]
    for m_tokens in [1, 32, 512] if quick else [1, 32, 512, 4096, 8192]:
        xx = torch.randn(m_tokens, n, device=dev, dtype=torch.float16)
        xx[:, outlier_cols] *= 10
        y = ours(xx)
        y_ref = ref.matmul(
            xx[:8].float().cpu().numpy(),
            lin.weight.detach().float().cpu().numpy(),
            lin.bias.detach().float().cpu().numpy(),
            6.0,
            "dequantized",
        )
        assert np.allclose(
            y[:8].float().cpu().numpy(), y_ref, rtol=2e-2, atol=2e-2 * np.abs(y_ref).max()
        )
        t_ours = [bench(lambda xx=xx: ours(xx)) for _ in range(2)]
        entry = {"ours_ms": t_ours}
        if bnb is not None:
            t_bnb = [bench(lambda xx=xx: theirs(xx)) for _ in range(2)]
            entry["bnb_ms"] = t_bnb
            rid = "C7a" if m_tokens >= 512 else "C7b"
            rows.append(
                (
                    rid,
                    f"LLM.int8 linear vs bitsandbytes, M={m_tokens}",
                    min(t_bnb) / min(t_ours),
                    "gate 2x, target 3x" if rid == "C7a" else "gate 1.5x, target 2.5x",
                )
            )
        if m_tokens == n:
            xb = xx.bfloat16()
            t_b = [bench(lambda xb=xb: bf16_lin(xb)) for _ in range(2)]
            entry["bf16_ms"] = t_b
            rows.append(
                (
                    "C7c",
                    f"LLM.int8 linear vs bf16 linear, {n}^3",
                    min(t_b) / min(t_ours),
                    "gate 1.15x, target 1.4x",
                )
            )
        raw[f"C7_M{m_tokens}"] = entry

    # O1: CUDA-graph capture of the layer (fails if the forward syncs with the host).
    xg = torch.randn(64, n, device=dev, dtype=torch.float16)
    xg[:, 5] *= 30
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ours(xg)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    captured = True
    try:
        with torch.cuda.graph(graph):
            out = ours(xg)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ours(xg))
    except Exception as exc:  # report, do not hide
        captured = False
        raw["O1_error"] = repr(exc)
    rows.append(
        ("O1", "CUDA-graph capture of Linear8bitLt forward (1 = ok)", float(captured), "must be 1")
    )
    # O2: kernel launches per forward, counted with the profiler.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ours(xg)
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    rows.append(("O2", "GPU kernels (incl. memset) per LLM.int8 forward", float(launches), "<= 3"))
    raw["triton"] = triton.__version__
    return raw, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (1024^2 on CPU)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine two OpenMP threads wait on each other)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 1024 if args.quick else 4096
    result: dict = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    result["cpu_section"], rows = cpu_section(n, args.repeat)
    if torch.cuda.is_available():
        result["gpu_section"], gpu_rows = gpu_section(args.quick)
        rows += gpu_rows
    else:
        rows.append(("GPU", "no CUDA device: M1, C1, C7a-c, O1, O2 not measured", float("nan"), ""))
    result["ratios"] = [{"id": r[0], "what": r[1], "value": r[2], "goal": r[3]} for r in rows]
    write_results("llm_int8", result)
    print(f"\nLLM.int8() benchmark ({'quick, ' if args.quick else ''}CPU {n}x{n} float32)")
    print(f"{'id':5} {'ratio':>8}  what (goal)")
    for rid, what, value, goal in rows:
        print(f"{rid:5} {value:8.2f}  {what}{f' ({goal})' if goal else ''}")


if __name__ == "__main__":
    main()
