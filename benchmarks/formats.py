"""Number formats benchmark: correctness first, then ratios measured side by side (the speed goals of docs/benchmarks.md).

CPU (always), float32 4096 x 4096 random-normal data:

* P1: the reference's two versions of encoding steps 2-5, the Numba loop ``_encode_fp_loop`` and
  NumPy ``_encode_fp_numpy``, agree bit for bit (mismatches counted, round-to-nearest and with
  stochastic noise).
* P3: their speed, numba vs numpy.
* P5: the fast path (torch, CPU) vs the reference for ``quantize`` (E4M3FN, E2M1FN, int8) and
  ``quantize_mx`` (MXFP4); also the torch bit-level path without lookup tables, for information.
* P6: lowbit ``encode`` of E4M3FN / E2M1FN vs ``x.astype(ml_dtypes.<format>)`` (same codes).
* P7: cold Numba compile of ``_encode_fp_loop`` in a fresh process with an empty cache.

GPU (only when CUDA is available), bf16 inputs of 256 MiB: M4 one-pass fake quantization (E2M1,
E3M0, E4M3; MX block-32) against same-run copy bandwidth and the eager torch path; M5 encode +
pack (4-bit two per byte, 8-bit codes, MX codes + scales) against copy bandwidth.

Usage: ``python benchmarks/formats.py [--quick] [--repeat N]``; prints a ratio table and writes
``benchmarks/results/formats.json`` (raw times, hardware context).
"""

from __future__ import annotations

import argparse
import os
import platform

import ml_dtypes
import numpy as np
import torch
from _common import cold_numba_compile_seconds, interleaved, med, write_results

from lowbit.fast import formats as fast
from lowbit.reference import formats as ref

E3M0 = ref.FPFormat(3, 0)


# P7: import + first call of the numba loop in a fresh process with an empty cache dir, minus the
# same process's second call (so only compilation is counted).
COLD_COMPILE_CODE = (
    "import time, numpy as np;"
    "from lowbit.reference.formats import _encode_fp_loop as f;"
    "a = np.ones(8); e = np.empty(0);"
    "t = time.perf_counter(); f(a, e, 3, -6, True); t1 = time.perf_counter() - t;"
    "t = time.perf_counter(); f(a, e, 3, -6, True); t2 = time.perf_counter() - t;"
    "print(t1 - t2)"
)


def codes_of(y: np.ndarray) -> np.ndarray:
    return y.view(np.uint8)


def cpu_section(n: int, repeat: int) -> tuple[dict, list[tuple[str, str, float, str]]]:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, n)).astype(np.float32)
    At = torch.from_numpy(A)
    a = np.abs(A).astype(np.float64).ravel()  # magnitudes, what steps 2-5 see
    empty = np.empty(0)
    e4m3, e2m1 = ref.E4M3FN, ref.E2M1FN

    # ---- correctness first -------------------------------------------------------------------
    mismatches = 0
    for fmt in (e4m3, e2m1, E3M0):
        loop = ref._encode_fp_loop(a, empty, fmt.mbits, fmt.emin, fmt.subnormals)
        mismatches += int(np.count_nonzero(loop != ref._encode_fp_numpy(a, empty, fmt)))
    noise = rng.random(a.size // 16)
    part = a[: noise.size]
    mismatches += int(
        np.count_nonzero(
            ref._encode_fp_loop(part, noise, 3, e4m3.emin, True)
            != ref._encode_fp_numpy(part, noise, e4m3)
        )
    )
    for fmt in (e4m3, e2m1, ref.IntFormat(8)):
        x = A * 20 if isinstance(fmt, ref.IntFormat) else A
        assert np.array_equal(
            fast.quantize(torch.from_numpy(x), fmt).numpy(), ref.quantize(x, fmt)
        ), fmt
    assert np.array_equal(fast.quantize_mx(At, "e2m1fn").numpy(), ref.quantize_mx(A, "e2m1fn"))
    ml = {"e4m3fn": ml_dtypes.float8_e4m3fn, "e2m1fn": ml_dtypes.float4_e2m1fn}
    for name, dt in ml.items():
        assert np.array_equal(
            fast.encode(At, name, saturate=False).numpy(), codes_of(A.astype(dt))
        ), name
    A20, At20 = A * 20, At * 20

    def direct(fmt):
        """The fast path's torch bit-level encoder without lookup tables."""
        old = fast._LUT_MIN_NUMEL
        fast._LUT_MIN_NUMEL = 1 << 62
        try:
            return fast.quantize(At, fmt)
        finally:
            fast._LUT_MIN_NUMEL = old

    times = interleaved(
        {
            "numba loop E4M3": lambda: ref._encode_fp_loop(a, empty, 3, e4m3.emin, True),
            "numpy E4M3": lambda: ref._encode_fp_numpy(a, empty, e4m3),
            "reference quantize E4M3": lambda: ref.quantize(A, e4m3),
            "fast quantize E4M3": lambda: fast.quantize(At, e4m3),
            "fast quantize E4M3 (no LUT)": lambda: direct(e4m3),
            "reference quantize E2M1": lambda: ref.quantize(A, e2m1),
            "fast quantize E2M1": lambda: fast.quantize(At, e2m1),
            "reference quantize int8": lambda: ref.quantize(A20, "int8"),
            "fast quantize int8": lambda: fast.quantize(At20, "int8"),
            "reference quantize_mx MXFP4": lambda: ref.quantize_mx(A, e2m1),
            "fast quantize_mx MXFP4": lambda: fast.quantize_mx(At, e2m1),
            "ml_dtypes astype E4M3": lambda: A.astype(ml_dtypes.float8_e4m3fn),
            "fast encode E4M3": lambda: fast.encode(At, e4m3, saturate=False),
            "ml_dtypes astype E2M1": lambda: A.astype(ml_dtypes.float4_e2m1fn),
            "fast encode E2M1": lambda: fast.encode(At, e2m1, saturate=False),
            "reference encode E4M3": lambda: ref.encode(A, e4m3, saturate=False),
        },
        repeat,
    )
    cold = cold_numba_compile_seconds(COLD_COMPILE_CODE)
    t = {k: med(v) for k, v in times.items()}
    rows = [
        ("P1", "numba vs numpy encode steps: mismatches", float(mismatches), "gate 0"),
        ("P3", "numba vs numpy encode steps (E4M3)", t["numpy E4M3"] / t["numba loop E4M3"], "gate 1.2x, target 2.5x"),
        ("P5", "fast vs reference quantize E4M3", t["reference quantize E4M3"] / t["fast quantize E4M3"], "gate 1x, target 3x"),
        ("P5", "fast vs reference quantize E2M1", t["reference quantize E2M1"] / t["fast quantize E2M1"], "gate 1x, target 3x"),
        ("P5", "fast vs reference quantize int8", t["reference quantize int8"] / t["fast quantize int8"], "gate 1x, target 3x"),
        ("P5", "fast vs reference quantize_mx MXFP4", t["reference quantize_mx MXFP4"] / t["fast quantize_mx MXFP4"], "gate 1x, target 3x"),
        ("P5'", "fast (no LUT) vs reference quantize E4M3", t["reference quantize E4M3"] / t["fast quantize E4M3 (no LUT)"], "information"),
        ("P6", "lowbit encode vs ml_dtypes astype E4M3FN", t["ml_dtypes astype E4M3"] / t["fast encode E4M3"], "gate 0.5x, target 1x"),
        ("P6", "lowbit encode vs ml_dtypes astype E2M1FN", t["ml_dtypes astype E2M1"] / t["fast encode E2M1"], "gate 0.5x, target 1x"),
        ("P6'", "reference encode vs ml_dtypes astype E4M3FN", t["ml_dtypes astype E4M3"] / t["reference encode E4M3"], "information"),
        ("P7", "cold numba compile of _encode_fp_loop (s)", cold, "gate 2 s, target 1 s"),
    ]  # fmt: skip
    return {
        "times_s": times,
        "median_s": t,
        "cold_compile_s": cold,
        "p1_mismatches": mismatches,
    }, rows


def gpu_section(quick: bool) -> tuple[dict, list[tuple[str, str, float, str]]]:  # pragma: no cover
    """M4 / M5 on CUDA. Bytes: fake quant reads and writes 2 bytes per bf16 element; encode +
    pack reads 2 and writes bits/8 (+ 1/32 for MX scales); copy moves 2 + 2."""
    import triton

    from lowbit.kernels import formats as kf

    n = (1 << 24) if quick else (1 << 27)  # 128M bf16 = 256 MiB
    x = torch.randn(n // 4096, 4096, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(x)

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, return_mode="median") / 1e3

    # correctness first, on a slice, against the reference
    xs = x[:64].float().cpu().numpy()
    for fmt in (ref.E2M1FN, E3M0, ref.E4M3FN):
        got = kf.quantize(x[:64], fmt).float().cpu().numpy()
        assert np.array_equal(got, ref.quantize(xs, fmt).astype(np.float32)), fmt
    assert np.array_equal(
        kf.encode_pack(x[:64], "e2m1fn").cpu().numpy(), ref.pack(ref.encode(xs, "e2m1fn"), 4)
    )

    def eager(fmt):
        """Eager torch fake quant: the fast path's torch encoder plus a table lookup."""
        table = fast.values(fmt).to(device="cuda", dtype=torch.bfloat16)
        return lambda: table[fast._encode_bits(x.reshape(-1).float(), fmt, True, None)].view_as(x)

    copy_s = [bench(lambda: dst.copy_(x)) for _ in range(2)]
    copy = min(copy_s)
    bytes_copy = 4 * x.numel()
    times, rows = {"copy": copy_s}, []
    for label, fmt in (("E2M1", ref.E2M1FN), ("E3M0", E3M0), ("E4M3", ref.E4M3FN)):
        k = [bench(lambda fmt=fmt: kf.quantize(x, fmt)) for _ in range(2)]
        e = [bench(eager(fmt)) for _ in range(2)]
        times[f"quantize {label}"], times[f"eager {label}"] = k, e
        rows.append(("M4", f"fake quant {label} vs copy", copy / min(k), "gate 0.80, target 0.90"))
        rows.append(
            ("M4", f"fake quant {label} vs eager torch", min(e) / min(k), "gate 3x, target 5x")
        )
    k = [bench(lambda: kf.quantize_mx(x, "e2m1fn")) for _ in range(2)]
    times["quantize_mx MXFP4"] = k
    rows.append(
        ("M4", "MX block-32 fake quant MXFP4 vs copy", copy / min(k), "gate 0.80, target 0.90")
    )
    for label, fn, out_bytes in (
        ("E2M1 4-bit packed", lambda: kf.encode_pack(x, "e2m1fn", bits=4), 0.5),
        ("E4M3 8-bit codes", lambda: kf.encode_pack(x, "e4m3fn", bits=8), 1.0),
        ("MXFP8 codes + scales", lambda: kf.encode_mx(x, "e4m3fn"), 1.0 + 1 / 32),
    ):
        k = [bench(fn) for _ in range(2)]
        times[label] = k
        bw = (2 + out_bytes) * x.numel() / min(k)
        rows.append(
            (
                "M5",
                f"encode + pack {label} vs copy (GB/s ratio)",
                bw / (bytes_copy / copy),
                "gate 0.75, target 0.85",
            )
        )
    info = {
        "device": torch.cuda.get_device_name(),
        "copy_GBps": bytes_copy / copy / 1e9,
        "times_s": times,
    }
    return info, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (1024^2 on CPU)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    n = 1024 if args.quick else 4096
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cpu, rows = cpu_section(n, args.repeat)
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "shape": [n, n],
        "cpu": cpu,
    }
    if torch.cuda.is_available():
        gpu, gpu_rows = gpu_section(args.quick)
        result["gpu"] = gpu
        rows += gpu_rows
    else:
        result["gpu"] = "skipped: no CUDA device"
    result["ratios"] = [{"id": r[0], "what": r[1], "value": r[2], "goal": r[3]} for r in rows]
    write_results("formats", result)
    print(f"\nNumber formats benchmark ({'quick, ' if args.quick else ''}CPU {n}x{n} float32)")
    print(f"{'id':5} {'ratio':>8}  what (goal)")
    for rid, what, value, goal in rows:
        print(f"{rid:5} {value:8.2f}  {what} ({goal})")
    if not torch.cuda.is_available():
        print("GPU section (M4, M5) skipped: no CUDA device")


if __name__ == "__main__":
    main()
