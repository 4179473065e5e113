"""What every benchmark shares: interleaved timing with medians (docs/benchmarks.md), the cold Numba
compile measurement (P7), and writing the results JSON atomically."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lowbit.fast._io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved(fns: dict, repeat: int = 7) -> dict[str, list[float]]:
    """Every candidate once per round (interleaved), ``repeat`` rounds; seconds per call.
    One warm-up call each first (JIT compilation, lookup tables, caches)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def med(ts: list[float]) -> float:
    return statistics.median(ts)


def cold_numba_compile_seconds(code: str) -> float:
    """P7: run ``code`` (which prints the compile time in seconds on its last line) in a fresh
    process with an empty Numba cache directory, so ``cache=True`` cannot help."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
    return float(out.stdout.strip().splitlines()[-1])


def write_results(name: str, result: dict) -> Path:
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(result, indent=2))
    return path
