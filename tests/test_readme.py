"""The README stays true: its example runs and prints what its comments say, and CI can find
its test command."""

import pathlib
import re

import numpy as np

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def _python_block(heading: str) -> str:
    """The one python block under the README's ``## heading``."""
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return block


def test_readme_example_runs_and_its_comments_hold():
    block = _python_block("A taste")
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


def test_readme_hugging_face_example_quantizes_saves_and_loads(tmp_path, monkeypatch):
    """The "Quantize a Hugging Face model" block as written: every linear becomes a
    Linear8bitLt, and the model loaded back computes what the quantized one computes."""
    import torch

    from lowbit.fast.nn import Linear8bitLt

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with torch.no_grad():
        exec(
            compile(_python_block("Quantize a Hugging Face model"), "README.md", "exec"), namespace
        )
    model, restored, tokenizer = namespace["model"], namespace["restored"], namespace["tokenizer"]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in restored.modules() if isinstance(m, Linear8bitLt)]
    assert not linears and len(quantized) == 36  # MiniLM: 6 blocks x 6 linears
    assert (tmp_path / "minilm-int8.safetensors").is_file()
    batch = tokenizer(
        ["a quantized sentence", "and another one"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        a = model(**batch).last_hidden_state
        b = restored(**batch).last_hidden_state
    assert torch.equal(a, b)
