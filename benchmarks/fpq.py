"""LLM-FP4 (FPQ) benchmark: correctness first, then ratios measured side by side (the speed goals of docs/benchmarks.md).

CPU (always): the reference (NumPy) vs the fast path (torch) for ``quantize`` with a per-tensor
integer bias, a per-row real bias and a per-column real bias, for ``encode``, and for one layer's
``search`` (P5); every pair is checked bit for bit (search: same formats and biases) before it is
timed.

CPU search (always, two torch threads): the batched search of ``lowbit.fast.fpq`` against a
faithful copy of the search it replaced (``_old_search`` below: one quantize + GEMM per
candidate, and only the incumbent format's biases tuned, the bug the rewrite fixed) on
report-like layers (256 tokens, 384 -> 384 and 384 -> 1536, W4A4, baseline and pre-shifted), at
the report's grid (20 candidates, 2 rounds) and the code's defaults (100, 3). The new search
does more work (it tunes every candidate format), so two ratios: wall time per search, and
time per scored candidate (quantize + GEMM + error of one candidate bias or format). A third
timing runs the new search with its float32 GEMMs instead of the exact integer scoring that
float32 CPU searches use (``int_scoring=False``): the integer scoring's own speed-up.

GPU (only when CUDA is available): M4 (one-pass fake quant, E2M1 / E3M0 / E4M3, per-tensor
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
SEARCH_DEFAULTS = dict(
    wbits=4, abits=4, gamma1=0.01, gamma2=1.2, search_space="bias", w_formats=None, a_formats=None
)  # fmt: skip


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
            "fast vs reference (x)",
        )
    )
    return raw, table


# ---- the search this module's batched search replaced (baseline for the timing only) -------------
# A faithful copy of lowbit.fast.fpq.search before the batched rewrite: one Python iteration of
# quantize + GEMM per candidate, and each bias step tunes only the incumbent format (the bug the
# rewrite fixed: the format step then compared a searched incumbent with min-max others). Do not
# use it for anything but this timing.


def _old_search(
    x, w, b=None, *, wbits=4, abits=4, preshifted=False, gamma1=0.01, gamma2=1.2,
    n_candidates=100, rounds=3, search_space="bias",
):  # fmt: skip
    from lowbit.reference.fpq import _candidates

    wfmts, afmts = ref.default_formats(wbits), ref.default_formats(abits)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, w = x.to(work), w.to(work)
    dev = x.device
    bias_vec = torch.zeros(w.shape[0], dtype=work, device=dev) if b is None else b.to(work)
    y_fp = x @ w.T + bias_vec
    factors = (
        gamma1
        + torch.arange(n_candidates + 1, dtype=torch.float64, device=dev)
        * (gamma2 - gamma1)
        / n_candidates
    )
    log2_factors = torch.from_numpy(np.log2(factors.cpu().numpy())).to(dev)
    w_absmax = w.abs().amax(dim=1)
    w_b0 = [fast.bias_from_max(w_absmax, f) for f in wfmts]
    w_cur = [v.clone() for v in w_b0]
    if preshifted:
        a_b0c = [fast.bias_from_max(x.abs().amax(dim=0), f) for f in afmts]
        a_b0 = [v.min() for v in a_b0c]
    else:
        a_b0 = [fast.bias_from_max(x.abs().amax(), f) for f in afmts]
    a_cur = [v.clone() for v in a_b0]

    def mse(y, dim=None):
        d = y.sub_(y_fp).square_()
        return d.mean() if dim is None else d.mean(dim=dim)

    def a_effective(j, t):
        if not preshifted:
            return t
        t_out, k = fast.preshift(a_b0c[j], afmts[j], tensor_bias=t)
        return t_out + k

    def output(iw, wb, ia, ab):
        return fast.linear(x, w, afmts[ia], a_effective(ia, ab), wfmts[iw], wb, bias_vec)

    iw = min(range(len(wfmts)), key=lambda i: abs(wfmts[i].mbits - (wbits - 1) // 2))
    ia = min(range(len(afmts)), key=lambda i: abs(afmts[i].mbits - (abits - 1) // 2))
    for _ in range(int(rounds)):
        for step in ("wb", "ab", "wf", "af") if preshifted else ("wb", "wf", "ab", "af"):
            if step == "wb":
                Xq = fast.quantize(x, afmts[ia], a_effective(ia, a_cur[ia])).to(work)
                cands = torch.cat(
                    [
                        w_cur[iw][None],
                        w_b0[iw][None],
                        _candidates(w_b0[iw], factors, log2_factors, search_space),
                    ]
                )
                best_err = torch.full((w.shape[0],), float("inf"), dtype=work, device=dev)
                best = w_cur[iw].clone()
                for cand in cands:
                    Wq = fast.quantize(w, wfmts[iw], cand[:, None]).to(work)
                    err = mse(Xq @ Wq.T + bias_vec, dim=0)
                    better = err < best_err
                    best = torch.where(better, cand, best)
                    best_err = torch.where(better, err, best_err)
                w_cur[iw] = best
            elif step == "ab":
                cands = torch.cat(
                    [
                        a_cur[ia][None],
                        a_b0[ia][None],
                        _candidates(a_b0[ia], factors, log2_factors, search_space),
                    ]
                )
                Wq = fast.quantize(w, wfmts[iw], w_cur[iw][:, None]).to(work)
                errs = torch.stack(
                    [
                        mse(
                            fast.quantize(x, afmts[ia], a_effective(ia, c)).to(work) @ Wq.T
                            + bias_vec
                        )
                        for c in cands
                    ]
                )
                a_cur[ia] = cands[int(torch.argmin(errs))]
            elif step == "wf":
                errs = torch.stack(
                    [mse(output(j, w_cur[j], ia, a_cur[ia])) for j in range(len(wfmts))]
                )
                iw = int(torch.argmin(errs))
            else:
                errs = torch.stack(
                    [mse(output(iw, w_cur[iw], j, a_cur[j])) for j in range(len(afmts))]
                )
                ia = int(torch.argmin(errs))
    return wfmts[iw], afmts[ia], float(mse(output(iw, w_cur[iw], ia, a_cur[ia])))


def _count_new_evaluations(fn) -> int:
    """Candidates the batched search scores in its bias steps, counted where they are scored:
    the float path's batched quantizer ``_fake_quant_into(x, fmt, b, ...)``, one call per batch,
    and the integer scorer's ``w_errors`` / ``a_errors(self, j, cands, ...)`` (their fixed
    candidates, plus the current bias whose error they give too). Both hold them in args[2]."""
    count = 0
    hooks = {(fast, "_fake_quant_into"): 0, (fast._IntScorer, "w_errors"): 1}
    hooks[(fast._IntScorer, "a_errors")] = 1
    originals = {key: getattr(*key) for key in hooks}

    def counting(inner, extra):
        def wrapper(*args):
            nonlocal count
            count += args[2].shape[0] + extra
            return inner(*args)

        return wrapper

    for key, extra in hooks.items():
        setattr(*key, counting(originals[key], extra))
    try:
        fn()
    finally:
        for key, inner in originals.items():
            setattr(*key, inner)
    return count


def search_section(quick: bool) -> tuple[dict, list[tuple[str, str, float, str]]]:
    """The batched search against ``_old_search`` at two torch threads (see the module docstring).
    Scored candidates: old rounds * 2 * (n + 3) bias candidates; new: counted; both add
    rounds * (3 + 3) + 1 format evaluations. Also the time of the new search's bias-candidate
    GEMMs alone ((tokens, in) @ (in, out) in float32 each), the floor of a search that scores
    those candidates with float32 GEMMs (the integer scoring goes below it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    rng = np.random.default_rng(1)
    T, d_in = 256, 384
    X = rng.standard_normal((T, d_in)) * np.exp(rng.standard_normal(d_in))
    X[:, rng.choice(d_in, size=4, replace=False)] *= 20.0  # outlier channels, as in BERT
    Xt = torch.from_numpy(X).float()
    grids = [(20, 2)] if quick else [(20, 2), (100, 3)]
    raw: dict = {}
    table = []
    totals = {"old": 0.0, "new": 0.0}
    try:
        for d_out in (384, 1536):
            Wt = torch.from_numpy(rng.standard_normal((d_out, d_in)) * 0.05).float()
            for n_cand, rounds in grids:
                for preshifted in (False, True):
                    kw = dict(n_candidates=n_cand, rounds=rounds, preshifted=preshifted)
                    full = dict(SEARCH_DEFAULTS, **kw)
                    n_new = _count_new_evaluations(lambda: fast.search(Xt, Wt, **kw))
                    n_fmt = rounds * 6 + 1
                    n_old = rounds * 2 * (n_cand + 3) + n_fmt
                    n_new += n_fmt
                    times = interleaved(
                        {
                            "old": lambda: _old_search(Xt, Wt, **kw),
                            "new": lambda: fast.search(Xt, Wt, **kw),
                            "float": lambda: fast._search(Xt, Wt, None, **full, int_scoring=False),
                        },
                        1 if quick else 3,
                    )
                    t_old, t_new, t_float = (med(times[k]) for k in ("old", "new", "float"))
                    if (n_cand, rounds) == (20, 2):
                        totals["old"] += t_old
                        totals["new"] += t_new
                    # the floor of float32 scoring of the same candidates: their GEMMs
                    Xq, Wq = Xt.clone(), Wt.clone()
                    gemm = med(interleaved({"gemm": lambda: Xq @ Wq.T}, 20)["gemm"])
                    floor = gemm * (n_new - n_fmt)
                    tag = f"{T}x{d_in}->{d_out} {'FPQ' if preshifted else 'base'} n={n_cand} r={rounds}"
                    raw[tag] = {
                        **times,
                        "evaluations_old": n_old,
                        "evaluations_new": n_new,
                        "gemm_s": gemm,
                    }
                    table.append(("search", f"{tag}: {t_old:.3f} s -> {t_new:.3f} s", t_old / t_new, "old / new, per search (x)"))  # fmt: skip
                    table.append(("search", f"{tag}: float32 GEMMs {t_float:.3f} s", t_float / t_new, "float32-scored / int-scored (x)"))  # fmt: skip
                    table.append(
                        (
                            "search",
                            f"{tag}: {n_old} -> {n_new} candidates scored",
                            (t_old / n_old) / (t_new / n_new),
                            "old / new, per scored candidate (x)",
                        )
                    )
                    table.append(
                        (
                            "search",
                            f"{tag}: GEMMs alone {floor:.3f} s",
                            t_new / floor,
                            "new / its candidates' fp32 GEMMs (x; < 1: integer scoring)",
                        )
                    )
    finally:
        torch.set_num_threads(threads)
    table.append(
        (
            "search",
            f"all n=20 r=2 searches: {totals['old']:.2f} s -> {totals['new']:.2f} s",
            totals["old"] / totals["new"],
            "old / new, the report's grid (x)",
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
    sraw, stable = search_section(args.quick)
    table += stable
    result = {"context": context, "cpu": raw, "cpu_search_2_threads": sraw}
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
