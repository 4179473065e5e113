"""The report section "int4_training" and ``lowbit train``: the experiments run end to end at
``--quick`` settings on the real MiniLM context, their rows and figures are complete, and the
command line fails in one line on bad input before any work."""

from __future__ import annotations

import pytest
import torch

from lowbit.fast import cli, report
from lowbit.fast.nn.int4_training import Int4Linear
from lowbit.fast.report import int4_training as section


@pytest.fixture(scope="module")
def ctx():
    return report.build_context("minilm", calib_size=4, eval_size=8, progress=False, quick=True)


def test_section_is_registered():
    assert "int4_training" in report.SECTIONS
    assert report.SECTIONS["int4_training"].build is section.int4_training_rows


def test_quick_section_rows_and_figures(ctx):
    rows = section.int4_training_rows(ctx)
    configs = [r.config for r in rows]
    assert configs == [f"LM {name}" for name in section.RECIPES] + [
        "fine-tune FP32",
        "fine-tune HQ + LSS",
    ]
    n_lm = len(section.RECIPES)
    lm, fine = rows[:n_lm], rows[n_lm:]
    assert all(r.metric == "held-out loss" and 0 < r.quality < 20 for r in lm)
    assert all(r.metric == "accuracy" and 0 <= r.quality <= 1 for r in fine)
    assert {"int4_training_curves.png", "int4_training_accuracy.png"} <= set(ctx.figures)
    assert all(ctx.figures[k].startswith(b"\x89PNG") for k in ctx.figures)
    table = report.format_table(rows, "quality")
    assert "(held-out loss)" in table and "(accuracy)" in table


def test_the_default_run_leaves_the_fine_tuning_to_full(ctx, monkeypatch):
    """Without --quick / --full the section trains the language models only (time budget)."""
    monkeypatch.setattr(ctx, "quick", False)
    monkeypatch.setattr(section, "train_language_models", lambda c, s: [])
    monkeypatch.setattr(section, "curves_figure", lambda runs, title: b"")
    monkeypatch.setattr(section, "fine_tune_play_classifier", lambda *a, **k: pytest.fail("ran"))
    assert section.int4_training_rows(ctx) == []
    assert section.INT4_TRAINING["lm_steps"] < section.INT4_TRAINING_FULL["lm_steps"]
    assert section.INT4_TRAINING_FULL["fine_tune"] and section.TRAIN_DEFAULTS["fine_tune"]


def test_language_model_data_splits_plays_and_compacts_the_vocabulary(ctx):
    vocab, train, test = section.language_model_data(ctx.tokenizer, 64)
    assert 1000 < vocab < ctx.tokenizer.vocab_size
    assert train.shape[1] == test.shape[1] == 64 and int(train.max()) < vocab
    assert len(train) > 200 and len(test) > 200  # every passage of two plays each


def test_every_encoder_linear_trains_in_int4(ctx):
    """The fine-tuning recipe converts the encoder's 36 linears and keeps the head in float."""
    model = section._Classifier(ctx.fresh_copy(), 4)
    from lowbit.fast.nn.int4_training import convert_for_training

    convert_for_training(model.encoder, progress=False)
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 36
    assert type(model.head) is torch.nn.Linear


def test_play_split_never_overlaps():
    train, test = section._play_split(32, 16)
    assert len(train) == 4 * 32 and len(test) == 4 * 16
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert sorted({y for _, y in test}) == [0, 1, 2, 3]


def _one_line_error(capsys, argv, fragment):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--steps", "0"], "expected a positive integer"),
        (["train", "--model", "gpt2"], "unknown model 'gpt2'"),
        (["train", "--epochs", "x"], "expected a positive integer, got 'x'"),
    ],
)
def test_train_command_bad_input(argv, fragment, capsys, monkeypatch):
    monkeypatch.setattr(report, "build_context", lambda *a, **k: pytest.fail("loaded a model"))
    _one_line_error(capsys, argv, fragment)


def test_train_command_checks_the_output_folder_first(tmp_path, capsys, monkeypatch):
    import lowbit.fast.report.context as context

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(context, "build_context", lambda *a, **k: pytest.fail("loaded a model"))
    _one_line_error(
        capsys, ["train", "--out", str(blocker / "sub")], "cannot write to output folder"
    )


def test_train_command_passes_options_through(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(section, "run_training", lambda *a, **k: seen.update(args=a, **k) or [])
    assert (
        cli.main(
            ["train", "--steps", "7", "--epochs", "2", "--out", str(tmp_path), "--no-progress"]
        )
        == 0
    )
    assert seen == {
        "args": ("minilm", str(tmp_path)),
        "lm_steps": 7,
        "epochs": 2,
        "progress": False,
    }
    assert "--steps" in cli._parser()._subparsers._group_actions[0].choices["train"].format_help()
