"""Paste benchmark results into docs/benchmarks.md.

Each ``benchmarks/<name>.py`` writes ``benchmarks/results/<name>.json`` with its raw times, its
hardware context and its ratios (``ratios``: dicts of id, what, value, goal; or ``table``: rows
[id, what, value, goal]). Results are measurements of one machine, so they are not regenerated at
docs build time (CI machines differ, and ``benchmarks/results/`` is not committed): this script
renders a JSON file as a markdown section and, with ``--write``, replaces the section between
``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->`` in docs/benchmarks.md (atomically).

    python docs/benchmark_tables.py benchmarks/results/formats.json --write
"""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from lowbit.fast._io import atomic_write_text

PAGE = Path(__file__).resolve().parent / "benchmarks.md"
_CONTEXT_KEYS = (
    "machine",
    "context",
    "host",
    "cpu",
    "threads",
    "torch",
    "numpy",
    "shape",
    "device",
)


def _context(result: dict) -> str:
    """One line of hardware / software context from whatever keys the benchmark wrote."""
    parts = []
    for key in _CONTEXT_KEYS:
        value = result.get(key)
        if value is None or isinstance(value, list) and not value:
            continue
        if isinstance(value, dict) and key not in ("machine", "context"):  # results, not context
            continue
        if isinstance(value, dict):
            scalars = {
                k: v for k, v in value.items() if isinstance(v, (str, int, float)) and v != ""
            }
            if not scalars:
                continue
            value = ", ".join(f"{k} {v}" for k, v in scalars.items())
        elif isinstance(value, list):
            value = " x ".join(str(v) for v in value)
        parts.append(str(value) if key in ("machine", "context") else f"{key}: {value}")
    return "; ".join(parts)


def _value(v) -> str:
    if isinstance(v, float) and v != v:  # NaN: not measured
        return "—"
    if isinstance(v, (int, float)):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def render(path: Path) -> str:
    result = json.loads(path.read_text(encoding="utf-8"))
    measured = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    lines = [
        f"Measured {measured:%Y-%m-%d %H:%M} UTC with `python benchmarks/{path.stem}.py` "
        f"(raw times in `benchmarks/results/{path.name}`).",
        "",
        f"Context: {_context(result)}.",
        "",
        "| id | ratio | what | goal |",
        "|---|---|---|---|",
    ]
    # "ratios": [{"id", "what", "value", "goal"}], or "table": [[id, what, value, goal]]
    rows = result.get("ratios") or [
        dict(zip(("id", "what", "value", "goal"), r)) for r in result.get("table", [])
    ]
    for row in rows:
        lines.append(f"| {row['id']} | {_value(row['value'])} | {row['what']} | {row['goal']} |")
    gpu = result.get("gpu")
    if isinstance(gpu, str):
        lines += ["", f"GPU section: {gpu}."]
    return "\n".join(lines)


def write(name: str, section: str, page: Path = PAGE) -> None:
    text = page.read_text(encoding="utf-8")
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(\n<!-- /bench:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page} has no <!-- bench:{name} --> ... <!-- /bench:{name} --> markers")
    text = pattern.sub(lambda m: m.group(1) + section + m.group(2), text)
    atomic_write_text(page, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="benchmarks/results/<name>.json")
    parser.add_argument("--write", action="store_true", help="replace the section in benchmarks.md")
    args = parser.parse_args()
    for path in args.results:
        section = render(path)
        if args.write:
            write(path.stem, section)
            print(f"updated the {path.stem} section of {PAGE}")
        else:
            print(section)


if __name__ == "__main__":
    main()
