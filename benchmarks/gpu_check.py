"""The first-GPU check: one command that, on a CUDA machine, runs every Triton kernel natively
against the reference and measures the GPU speed goals of docs/benchmarks.md, in one lease.

1. ``pytest -m gpu`` with ``LOWBIT_NATIVE_TRITON=1``: every kernel against the reference at real
   and ragged sizes natively, CUDA-graph capture of each quantized forward (O1), launch
   counts (O2). Log and JUnit XML go to the output folder.
2. The GPU sections of ``benchmarks/formats.py`` (M4, M5), ``benchmarks/llm_int8.py`` (M1, M2,
   C1, C3, C7a-c, O1, O2; C7 against bitsandbytes when it imports) and ``benchmarks/fpq.py``
   (M4 with real biases, M5-like encode, the FP linear) and ``benchmarks/omniquant.py`` (C9, the
   W4A16 linear, and the activation quantizer); each asserts correctness first.
3. One table of every ratio against its gate, and ``gpu_check.json`` (ratios, raw times, the
   hardware and software context) in the output folder.

Each step gets a share of the time budget (``--budget``, default 450 s: a 15-minute lease
leaves room for one rerun); a step that runs over is stopped and reported, and the rest still
run. ``--quick`` uses the benchmarks' smaller shapes. ``--dry-run`` prints the plan (commands,
shapes, the output files) and exits: it needs no GPU, and CI runs it.

Usage: ``python benchmarks/gpu_check.py [--out DIR] [--quick] [--budget S] [--dry-run]``
(DIR defaults to ``$OUT`` when set, else ``benchmarks/results/gpu``). The GPU machine has no
package registry: for C7, download bitsandbytes' manylinux wheel here (``pip download --no-deps
bitsandbytes==0.50.2 -d .whl``, ``.whl`` ignored by git), carry ``.whl``, and start the command
with ``pip install --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from lowbit.fast._io import atomic_write_text

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# What each benchmark's gpu_section measures, at (full, --quick) sizes: the plan the dry run shows.
SECTIONS = {
    "formats": [
        "M4 fake quant E2M1 / E3M0 / E4M3 and MX block-32 MXFP4, bf16 (32768 x 4096 | 4096 x 4096),"
        " vs same-run copy bandwidth and eager torch",
        "M5 encode + pack: E2M1 4-bit packed, E4M3 8-bit codes, MXFP8 codes + scales",
    ],
    "llm_int8": [
        "M1 int8 row quantize bf16 (16384 x 8192 | 4096 x 8192) vs copy; M2 dequantize",
        "C1 / C3 W8A8 int8 GEMM, dequant in the epilogue, vs bf16 (8192^3 | 4096^3)",
        "C7a/b LLM.int8 linear vs bitsandbytes Linear8bitLt (fp16, N = K = 8192 | 4096,"
        " M in 1, 32, 512, 4096, 8192 | 1, 32, 512), when bitsandbytes imports",
        "C7c LLM.int8 linear vs bf16 linear; O1 CUDA-graph capture; O2 launches per forward",
    ],
    "fpq": [
        "M4 real-bias fake quant E2M1 / E3M0 / E4M3, per-tensor and per-channel bias, bf16"
        " (16384 x 8192 | 8192 x 8192), vs copy and eager torch",
        "M5-like encode to uint8 codes; FP linear W4A4 / W4A8 on codes vs bf16 linear, 4096^3",
    ],
    "omniquant": [
        "C9 W4A16 g128 linear (packed codes, OmniQuantLinear) vs bf16 linear, M in 1, 16, 2048,"
        " (N, K) in (4096, 4096), (11008, 4096), (4096, 11008) | (4096, 4096)",
        "per-token asymmetric activation quantizer bf16 (16384 x 4096 | 4096 x 4096) vs copy",
    ],
    "int4_training": [
        "M6 / M7 fused block-Hadamard + LSQ quantize, blocks 16, 64, 256, bf16 (16384 x 8192 |"
        " 4096 x 4096), vs copy and vs Hadamard then quantize",
        "M8 bit-splitting gradient quantizer fp32 vs copy",
        "C8 Int4Linear fwd+bwd vs bf16 nn.Linear (8192 tokens, N = K = 8192 | 2048, 4096)",
    ],
}
STEP_SHARE = {
    "pytest": 0.36,
    "formats": 0.11,
    "llm_int8": 0.18,
    "fpq": 0.12,
    "omniquant": 0.12,
    "int4_training": 0.11,
}
GATE = re.compile(r"gate\s*([0-9.]+)\s*(x)?")


def plan(out: Path, quick: bool, budget: float) -> list[str]:
    lines = [
        f"output folder: {out}",
        f"time budget: {budget:.0f} s ({'--quick shapes' if quick else 'full shapes'});"
        " sizes below read full | --quick",
        f"1. [{STEP_SHARE['pytest'] * budget:.0f} s] LOWBIT_NATIVE_TRITON=1 {sys.executable} -m"
        f" pytest -m gpu -q -p no:cacheprovider --junitxml {out / 'pytest-gpu.xml'}"
        f" > {out / 'pytest-gpu.log'}",
    ]
    for i, (name, items) in enumerate(SECTIONS.items(), start=2):
        lines.append(
            f"{i}. [{STEP_SHARE[name] * budget:.0f} s] benchmarks/{name}.py gpu_section(quick={quick})"
        )
        lines += [f"     - {item}" for item in items]
    lines.append(f"{len(SECTIONS) + 2}. the ratio table; {out / 'gpu_check.json'}")
    return lines


def gate_of(goal: str) -> float | None:
    """The gate in a benchmark row's goal text ('gate 0.80, target 0.90' -> 0.8), if any."""
    m = GATE.search(goal)
    return float(m.group(1)) if m else None


def run_pytest(out: Path, timeout: float) -> dict:
    env = dict(os.environ, LOWBIT_NATIVE_TRITON="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    cmd += ["--junitxml", str(out / "pytest-gpu.xml")]
    start = time.perf_counter()
    with open(out / "pytest-gpu.log", "w") as log:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = (out / "pytest-gpu.log").read_text().strip().splitlines()[-1:]
    return {"returncode": rc, "seconds": time.perf_counter() - start, "summary": tail}


def run_section(name: str, quick: bool, timeout: float) -> dict:
    """One benchmark's gpu_section in a child process (a hung kernel cannot stop the rest)."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import {name} as m; "
        f"raw, rows = m.gpu_section({quick}); "
        "print('@@RESULT@@' + json.dumps({'raw': raw, 'rows': rows}, default=str))"
    )
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s", "rows": [], "seconds": timeout}
    result: dict = {"seconds": time.perf_counter() - start, "rows": []}
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    if proc.returncode != 0 or not marker:
        result["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result["stderr_tail"] = proc.stderr[-4000:]
        return result
    result.update(json.loads(marker[0][len("@@RESULT@@") :]))
    return result


def context() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version()}
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        info["driver"] = smi.stdout.strip() or None
    return info


def table(sections: dict) -> list[str]:
    lines = [f"{'id':6} {'ratio':>8} {'gate':>6}  {'':4} what (goal)"]
    for name, res in sections.items():
        if res.get("error"):
            lines.append(f"{name:6} {'-':>8} {'-':>6}  FAIL section did not finish: {res['error']}")
        for rid, what, value, goal in res.get("rows", []):
            gate = gate_of(goal)
            verdict = "" if gate is None else ("ok" if value >= gate else "FAIL")
            gate_text = "-" if gate is None else f"{gate:g}"
            lines.append(f"{rid:6} {value:8.2f} {gate_text:>6}  {verdict:4} {what} ({goal})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results" / "gpu"
    parser.add_argument("--out", type=Path, default=default_out, help="output folder")
    parser.add_argument("--quick", action="store_true", help="the benchmarks' smaller shapes")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all steps")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be positive, got {args.budget:g}")
    print("\n".join(plan(args.out, args.quick, args.budget)))
    if args.dry_run:
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (or pass --dry-run)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result: dict = {"context": context(), "quick": args.quick}
    result["pytest"] = run_pytest(args.out, STEP_SHARE["pytest"] * args.budget)
    print(f"pytest -m gpu: {result['pytest']}", flush=True)
    sections = {}
    for name in SECTIONS:
        sections[name] = run_section(name, args.quick, STEP_SHARE[name] * args.budget)
        print(f"{name}: {sections[name].get('error') or 'done'} in {sections[name]['seconds']:.0f} s", flush=True)  # fmt: skip
    result["sections"] = sections
    result["seconds"] = time.perf_counter() - start
    lines = table(sections)
    result["table"] = lines
    atomic_write_text(args.out / "gpu_check.json", json.dumps(result, indent=2, default=str))
    print(f"\nGPU check on {result['context'].get('gpu')} in {result['seconds']:.0f} s")
    print("\n".join(lines))
    failed = result["pytest"]["returncode"] != 0 or any(s.get("error") for s in sections.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
