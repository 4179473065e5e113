"""Every tutorial runs top to bottom as a plain script.

Tutorials are jupytext percent-format scripts (`tutorials/NN-name.py`); the docs render them
with their outputs, so a tutorial that raises would also break the docs build. Each one runs in a
fresh subprocess (its own imports, its own Triton interpreter setting), one test per file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted(
    p for p in (ROOT / "tutorials").glob("*.py") if re.match(r"^\d\d-[\w-]+\.py$", p.name)
)
TIMEOUT_S = 300  # a tutorial should take well under a minute on 2 CPU cores


def test_tutorials_are_collected():
    assert any(p.name.startswith("01-") for p in TUTORIALS), "tutorials/01-*.py is missing"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path: Path) -> None:
    env = dict(os.environ)
    env.update(
        MPLBACKEND="Agg",  # plt.show() is a no-op without a display
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    if not env.get("LOWBIT_NATIVE_TRITON"):
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, str(path)],
        cwd=ROOT,  # where the docs build executes them too
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{path.name} exited with {result.returncode}\n"
        f"--- stdout (tail) ---\n{result.stdout[-3000:]}\n--- stderr (tail) ---\n{result.stderr[-5000:]}"
    )
