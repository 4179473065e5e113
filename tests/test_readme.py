"""The README stays true: its example runs and prints what its comments say, and CI can find
its test command."""

import pathlib
import re

import numpy as np

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_example_runs_and_its_comments_hold():
    (block,) = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    ref, x = namespace["ref"], namespace["x"]
    assert ref.quantize(x, "e2m1").tolist() == [0.5, -3.0, 4.0, 6.0]
    import ml_dtypes

    assert np.array_equal(
        ref.encode(x, ref.E4M3FN, saturate=False), x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    )


def test_readme_has_exactly_one_test_command_for_ci():
    section = re.findall(r"<!-- test-command -->(.*?)<!-- /test-command -->", README, flags=re.S)
    assert len(section) == 1
    lines = [ln for ln in section[0].strip().splitlines() if not ln.startswith("```")]
    assert len(lines) == 1 and "pytest" in lines[0]
