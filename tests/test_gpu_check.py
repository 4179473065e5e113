"""benchmarks/gpu_check.py on a machine without a GPU: the dry run shows the whole plan, the real
run refuses clearly, and the table judges each ratio against the gate its benchmark states."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402


def test_dry_run_prints_every_step_and_needs_no_gpu(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "o"), "--budget", "400"]) == 0
    out = capsys.readouterr().out
    assert "pytest -m gpu" in out and "LOWBIT_NATIVE_TRITON=1" in out
    for name in ("formats", "llm_int8", "fpq", "omniquant", "int4_training"):
        assert f"benchmarks/{name}.py gpu_section(quick=False)" in out
    for goal in ("M1", "M4", "M5", "C1", "C3", "C7a", "C9", "O1", "O2", "M6", "M8", "C8"):
        assert goal in out
    assert str(tmp_path / "o" / "gpu_check.json") in out
    assert "[144 s]" in out  # the pytest step's share of a 400 s budget
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_dry_run_as_a_command():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--quick"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--quick shapes" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_real_run_without_cuda_refuses(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_bad_budget_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--budget", "0", "--dry-run"])
    assert "--budget must be positive" in capsys.readouterr().err


def test_table_judges_ratios_against_the_stated_gates():
    sections = {
        "formats": {
            "rows": [
                ["M4", "fake quant E2M1 vs copy", 0.85, "gate 0.80, target 0.90"],
                ["M4", "fake quant E2M1 vs eager torch", 2.5, "gate 3x, target 5x"],
                ["O2", "launches", 3.0, "<= 3"],
            ]
        },
        "fpq": {"error": "stopped after 60 s", "rows": []},
    }
    lines = gpu_check.table(sections)
    assert any(" ok " in line and "vs copy" in line for line in lines)
    assert any("FAIL" in line and "eager" in line for line in lines)
    assert any("FAIL section did not finish: stopped after 60 s" in line for line in lines)
    o2 = next(line for line in lines if line.startswith("O2"))
    assert "FAIL" not in o2 and " ok " not in o2  # no gate stated: reported, not judged
    assert gpu_check.gate_of("of copy bandwidth (gate 0.80)") == 0.8
    assert gpu_check.gate_of("x bf16 linear") is None
