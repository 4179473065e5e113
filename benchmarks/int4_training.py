"""4-bit training benchmark: correctness first, then ratios measured side by side
(docs/benchmarks.md).

CPU (always):

* P4: the fast Walsh-Hadamard transform (the reference's Numba butterflies) against a dense
  matmul with ``hadamard(n)`` at dim 4096 (float32, 4096 rows), and per block size of a
  block-diagonal transform (16 ... 1024 on 4096 x 4096), with the faster of the two named;
* P5: the fast path (torch) against the reference (NumPy) for LSQ's encode, the block
  Hadamard transform, bit splitting and the whole backward of one layer;
* ``Int4Linear`` forward + backward against ``nn.Linear`` (float32) at a MiniLM-sized layer.

GPU (only when CUDA is available): M6 (block-diagonal Hadamard vs copy, via the fused kernel
with the quantizer's store only), M7 (fused Hadamard + quantize vs Hadamard, then quantize),
M8 (the bit-splitting gradient quantizer vs copy) and C8 (``Int4Linear`` forward + backward
vs bf16 ``nn.Linear`` at 8192 tokens, N = K = 8192).

Usage: ``python benchmarks/int4_training.py [--quick]``; prints a ratio table and writes
``benchmarks/results/int4_training.json``.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import torch
from _common import interleaved, med, write_results

from lowbit.fast import hadamard as fast_h
from lowbit.fast import int4_training as fast
from lowbit.fast.nn.int4_training import Int4Linear
from lowbit.reference import hadamard as ref_h
from lowbit.reference import int4_training as ref

Row = tuple[str, str, float, str]


def p4_section(n: int, repeat: int) -> tuple[dict, list[Row]]:
    x = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    dense = ref_h.hadamard(n).astype(np.float32)
    assert np.abs(ref_h.fwht(x[:8]).astype(np.float64) - x[:8] @ ref_h.hadamard(n)).max() < 1e-3
    times = interleaved({"fwht": lambda: ref_h.fwht(x), "dense": lambda: x @ dense}, repeat)
    rows: list[Row] = [
        ("P4", f"fast Walsh-Hadamard (numba) vs dense matmul, dim {n}",
         med(times["dense"]) / med(times["fwht"]), "gate 5x, target 8x"),
    ]  # fmt: skip
    raw: dict = {"full": times}
    for block in (16, 64, 256, 1024):
        if block > n:
            continue
        h = ref_h.hadamard(block).astype(np.float32)
        t = interleaved(
            {
                "butterflies": lambda b=block: ref_h.block_hadamard(x, b),
                "dense": lambda b=block, h=h: (x.reshape(-1, b) @ h).reshape(x.shape),
            },
            repeat,
        )
        ratio = med(t["dense"]) / med(t["butterflies"])
        faster = "butterflies" if ratio > 1 else "dense matmul"
        rows.append(("P4", f"block {block}: dense / butterflies (faster: {faster})", ratio, ""))
        raw[f"block_{block}"] = t
    return raw, rows


def p5_section(n: int, repeat: int) -> tuple[dict, list[Row]]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, n)).astype(np.float32)
    w = (rng.standard_normal((n, n)) * 0.05).astype(np.float32)
    g = rng.standard_normal((n, n)).astype(np.float32)
    block = 128
    xt, wt, gt = (torch.from_numpy(a) for a in (x, w, g))
    sx = ref.lsq_init(ref_h.block_hadamard(x, block))
    sw = ref.lsq_init(ref_h.block_hadamard(w, block))
    # correctness first
    assert np.array_equal(ref.lsq_encode(x, sx), fast.lsq_encode(xt, torch.from_numpy(sx)).numpy())
    assert np.array_equal(ref_h.block_hadamard(x, block), fast_h.block_hadamard(xt, block).numpy())
    assert all(
        np.array_equal(a, b.numpy())
        for a, b in zip(ref.bit_split(g, seed=1), fast.bit_split(gt, seed=1))
    )
    ref_back = ref.int4_linear_backward(g, x, w, sx, sw, block, sampling=False, seed=2)
    fast_back = fast.int4_linear_backward(
        gt, xt, wt, float(sx), float(sw), block, sampling=False, seed=2
    )
    assert np.array_equal(ref_back[0], fast_back[0].numpy()), "backward differs"
    pairs = {
        "lsq_encode": (lambda: ref.lsq_encode(x, sx), lambda: fast.lsq_encode(xt, float(sx))),
        "block_hadamard 128": (
            lambda: ref_h.block_hadamard(x, block),
            lambda: fast_h.block_hadamard(xt, block),
        ),
        "bit_split": (lambda: ref.bit_split(g, seed=1), lambda: fast.bit_split(gt, seed=1)),
        "int4_linear_backward (LSS)": (
            lambda: ref.int4_linear_backward(g, x, w, sx, sw, block, seed=2),
            lambda: fast.int4_linear_backward(gt, xt, wt, float(sx), float(sw), block, seed=2),
        ),
    }
    raw, rows = {}, []
    for name, (r, f) in pairs.items():
        t = interleaved({"reference": r, "fast": f}, repeat)
        raw[name] = t
        rows.append(("P5", f"fast vs reference {name} ({n}x{n})", med(t["reference"]) / med(t["fast"]), "gate 1x, target 3x"))  # fmt: skip
    return raw, rows


def layer_section(repeat: int) -> tuple[dict, list[Row]]:
    """One MiniLM-sized layer (1536 -> 384, 2048 tokens): Int4Linear fwd+bwd vs nn.Linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(1536, 384)
    x = torch.randn(2048, 1536)
    raw, rows = {}, []
    for sampling in (False, True):
        layer = Int4Linear.from_linear(lin, sampling=sampling)
        layer(x)  # the first batch: block search and LSQ init, not timed

        def step(module):
            xg = x.clone().requires_grad_(True)
            module(xg).sum().backward()

        t = interleaved(
            {"nn.Linear": lambda: step(lin), "Int4Linear": lambda layer=layer: step(layer)}, repeat
        )
        raw[f"sampling={sampling}"] = t
        rows.append(("-", f"Int4Linear fwd+bwd time / nn.Linear (1536->384, 2048 tokens, sampling={sampling})",
                     med(t["Int4Linear"]) / med(t["nn.Linear"]), "CPU emulation: the cost, not a speed-up"))  # fmt: skip
    return raw, rows


def gpu_section(quick: bool) -> tuple[dict, list[Row]]:  # pragma: no cover
    from triton.testing import do_bench

    from lowbit.kernels import int4_training as kernels

    dev = "cuda"
    raw: dict = {"device": torch.cuda.get_device_name()}
    rows: list[Row] = []
    m, k = (4096, 4096) if quick else (16384, 8192)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    step = torch.tensor(0.1, device=dev)
    copy_dst = torch.empty_like(x)
    t_copy = min(do_bench(lambda: copy_dst.copy_(x)) for _ in range(2))
    for block in (16, 64, 256):
        t_fused = min(
            do_bench(lambda b=block: kernels.hadamard_quantize(x, step, b)) for _ in range(2)
        )
        t_split = min(
            do_bench(
                lambda b=block: fast._encode(
                    fast_h.block_hadamard(x.float(), b), step, 8, 7, "half_away"
                )
            )
            for _ in range(2)
        )
        # bytes: the fused kernel reads 2 and writes 1 byte per element, a copy 2 + 2
        rows.append(("M6", f"fused Hadamard+quantize block {block} GB/s vs copy (bf16 {m}x{k})", (3 / 4) * t_copy / t_fused, "gate 0.80 copy"))  # fmt: skip
        rows.append(("M7", f"fused vs Hadamard then quantize, block {block}", t_split / t_fused, "gate 1.6x, target 1.9x"))  # fmt: skip
    g = torch.randn(m, k, device=dev)
    sigma = torch.tensor(1.0, device=dev)
    g_copy = torch.empty_like(g)
    t_gcopy = min(do_bench(lambda: g_copy.copy_(g)) for _ in range(2))
    t_bits = min(do_bench(lambda: kernels.bit_split(g, sigma, 12345)) for _ in range(2))
    rows.append(("M8", "bit-split gradient quantizer time / copy time (fp32 G)", t_bits / t_gcopy, "gate <= 2.5x copy"))  # fmt: skip
    n = 4096 if quick else 8192
    lin = torch.nn.Linear(n, n, device=dev, dtype=torch.bfloat16)
    layer = Int4Linear.from_linear(lin.float(), sampling=False, block=64).to(dev)
    tokens = torch.randn(2048 if quick else 8192, n, device=dev, dtype=torch.bfloat16)
    layer(tokens.float())

    def step_bf16():
        xg = tokens.clone().requires_grad_(True)
        lin(xg).sum().backward()

    def step_int4():
        xg = tokens.float().requires_grad_(True)
        layer(xg).sum().backward()

    t_bf16 = min(do_bench(step_bf16) for _ in range(2))
    t_int4 = min(do_bench(step_int4) for _ in range(2))
    rows.append(("C8", f"Int4Linear fwd+bwd vs bf16 nn.Linear ({tokens.shape[0]} tokens, N=K={n})", t_bf16 / t_int4, "gate 1.15x, target 1.4x"))  # fmt: skip
    raw.update(copy_ms=t_copy, bit_split_ms=t_bits, c8_bf16_ms=t_bf16, c8_int4_ms=t_int4)
    return raw, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 instead of 4096 / 2048 sizes")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    result["p4"], rows = p4_section(1024 if args.quick else 4096, args.repeat)
    result["p5"], p5_rows = p5_section(512 if args.quick else 2048, args.repeat)
    rows += p5_rows
    result["layer"], layer_rows = layer_section(args.repeat)
    rows += layer_rows
    if torch.cuda.is_available():
        result["gpu_section"], gpu_rows = gpu_section(args.quick)
        rows += gpu_rows
    else:
        rows.append(("GPU", "no CUDA device: M6, M7, M8, C8 not measured", float("nan"), ""))
    result["ratios"] = [{"id": r[0], "what": r[1], "value": r[2], "goal": r[3]} for r in rows]
    write_results("int4_training", result)
    print(f"\n4-bit training benchmark ({'quick, ' if args.quick else ''}CPU)")
    print(f"{'id':5} {'value':>8}  what (goal)")
    for rid, what, value, goal in rows:
        print(f"{rid:5} {value:8.2f}  {what}{f' ({goal})' if goal else ''}")


if __name__ == "__main__":
    main()
