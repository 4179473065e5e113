"""``Int4Linear`` and ``convert_for_training``: the module computes exactly the functions of
``lowbit.fast.int4_training`` (which the reference pins), trains, swaps into Hugging Face models
and back, saves and loads, and runs under DistributedDataParallel (2 gloo processes)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from torch import nn

from lowbit.fast import int4_training as F
from lowbit.fast.convert import load_quantized, restore_linears, save_quantized
from lowbit.fast.hadamard import block_hadamard
from lowbit.fast.nn import QUANTIZED_MODULES
from lowbit.fast.nn import int4_training as N
from lowbit.fast.nn.int4_training import Int4Linear, convert_for_training


def _layer(seed=0, n_in=64, out=24, **options):
    torch.manual_seed(seed)
    return Int4Linear.from_linear(nn.Linear(n_in, out), **options)


def test_first_batch_sets_the_block_and_the_steps():
    layer = _layer()
    x = torch.randn(40, 64)
    x[:, 3] *= 30
    layer(x)
    block = F.hq_search(x, layer.weight.detach())[0]
    assert layer.block == block and bool(layer.initialized)
    assert torch.equal(layer.step_x.detach(), F.lsq_init(block_hadamard(x, block)))
    assert torch.equal(
        layer.step_w.detach(), F.lsq_init(block_hadamard(layer.weight.detach(), block))
    )
    assert "Int4Linear" in QUANTIZED_MODULES


@pytest.mark.parametrize("sampling", [False, True])
def test_forward_and_backward_are_the_functions(sampling):
    """Bit for bit: y = hq_linear + b, and the gradients are int4_linear_backward's with the
    seed the layer drew (then through |step|)."""
    layer = _layer(1, sampling=sampling, clip="full")
    x = torch.randn(3, 11, 64)
    layer(x)  # initialise
    calls = layer.calls
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    expected = F.hq_linear(
        x, layer.weight.detach(), layer.step_x.detach(), layer.step_w.detach(), layer.block
    )
    assert torch.equal(y.detach(), expected + layer.bias.detach())
    g = torch.randn_like(y)
    y.backward(g)
    seed = N._mix(layer.seed, calls, 0)
    gx, gw, gsx, gsw = F.int4_linear_backward(
        g, x, layer.weight.detach(), layer.step_x.detach(), layer.step_w.detach(), layer.block,
        sampling=sampling, clip="full", seed=seed,
    )  # fmt: skip
    assert torch.equal(xg.grad, gx) and torch.equal(layer.weight.grad, gw)
    assert torch.equal(layer.step_x.grad, gsx) and torch.equal(layer.step_w.grad, gsw)
    assert torch.equal(layer.bias.grad, g.reshape(-1, 24).sum(0))


def test_each_training_step_draws_new_rows():
    layer = _layer(2)
    x = torch.randn(64, 64)
    grads = []
    for _ in range(2):
        layer.zero_grad()
        layer(x).pow(2).sum().backward()
        grads.append(layer.weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])  # a new seed per step
    again = _layer(2)
    for g in grads:
        again.zero_grad()
        again(x).pow(2).sum().backward()
        assert torch.equal(again.weight.grad, g)  # and reproducible from the base seed


def test_negative_step_uses_its_magnitude():
    layer = _layer(3)
    x = torch.randn(16, 64)
    y = layer(x)
    with torch.no_grad():
        layer.step_x.neg_()
    y2 = layer(x)
    assert torch.equal(y, y2)
    y2.sum().backward()
    layer2 = _layer(3)
    layer2(x)
    layer2.calls = layer.calls - 1
    layer2(x).sum().backward()
    assert torch.equal(layer.step_x.grad, -layer2.step_x.grad)


def test_non_finite_output_gradient_gives_nan_gradients():
    layer = _layer(4)
    x = torch.randn(8, 64, requires_grad=True)
    y = layer(x)
    g = torch.ones_like(y)
    g[0, 0] = math.inf
    y.backward(g)
    for t in (x.grad, layer.weight.grad, layer.bias.grad, layer.step_x.grad, layer.step_w.grad):
        assert torch.isnan(t).all()


def test_gradscaler_skips_the_step_on_overflow():
    layer = _layer(5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    x = torch.randn(8, 64)
    layer(x)
    before = layer.weight.detach().clone()
    scaler.scale(layer(x).float().pow(2).sum() * 1e30).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(layer.weight.detach(), before) and scaler.get_scale() < 2.0**120


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_come_back_in_their_dtype(dtype):
    layer = _layer(6)
    x = torch.randn(8, 64, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == dtype and layer.weight.grad.dtype == torch.float32


def test_eval_before_any_training_batch_is_refused():
    layer = _layer().eval()
    with pytest.raises(ValueError, match=r"no step sizes yet: run one batch in train\(\) mode"):
        layer(torch.randn(2, 64))


def test_bad_options_get_one_line_errors():
    with pytest.raises(ValueError, match=r"block=3 must be a power of two dividing in_features=64"):
        Int4Linear(64, 8, block=3)
    with pytest.raises(ValueError, match="clip='x' is invalid"):
        Int4Linear(64, 8, clip="x")
    with pytest.raises(ValueError, match=r"expects \(\.\.\., 64\) inputs"):
        Int4Linear(64, 8)(torch.randn(2, 32))
    with pytest.raises(ValueError, match="block=48 must be a power of two"):
        convert_for_training(nn.Sequential(nn.Linear(64, 64)), block=48)


def _regression_data(seed=0, n=512, d=64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[:, 5] *= 8  # an outlier feature
    w = torch.randn(1, d, generator=gen) / math.sqrt(d)
    y = torch.tanh(x @ w.t() * 2) + 0.05 * torch.randn(n, 1, generator=gen)
    return x, y


def _train(model, x, y, steps=150, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        i = torch.arange(step * 64, step * 64 + 64) % len(x)
        loss = nn.functional.mse_loss(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("sampling", [False, True])
def test_a_small_network_trains_in_int4(sampling):
    x, y = _regression_data()
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    q = convert_for_training(_copy(fp), sampling=sampling, progress=False, skip=())
    assert sum(isinstance(m, Int4Linear) for m in q.modules()) == 2
    fp_losses, q_losses = _train(fp, x, y), _train(q, x, y)
    start, end = sum(q_losses[:10]) / 10, sum(q_losses[-10:]) / 10
    assert end < 0.3 * start  # it learns
    assert end < 3 * sum(fp_losses[-10:]) / 10 + 0.02  # and stays near full precision


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_convert_a_bert_model_train_and_restore():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=3)  # fmt: skip
    model = BertForSequenceClassification(config)
    fp_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convert_for_training(model, progress=False)
    converted = [n for n, m in model.named_modules() if isinstance(m, Int4Linear)]
    assert (
        "classifier" not in converted and len(converted) == len(fp_names) - 1
    )  # 6 per layer + pooler
    ids = torch.randint(0, 100, (4, 12))
    labels = torch.tensor([0, 1, 2, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    trained = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    restore_linears(model)
    query = model.bert.encoder.layer[0].attention.self.query
    assert type(query) is nn.Linear and torch.equal(query.weight, trained)


def test_convert_a_llama_model_per_layer_and_save_load():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    convert_for_training(model, layers=["q_proj", "v_proj", "down_proj"], progress=False)
    kinds = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert kinds == {"q_proj", "v_proj", "down_proj"}
    assert type(model.lm_head) is nn.Linear
    ids = torch.randint(0, 100, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()  # the first batch initialises
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "int4.safetensors")
        save_quantized(model, path)
        torch.manual_seed(1)
        fresh = load_quantized(LlamaForCausalLM(config), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, logits)
    counters = [m.calls for m in fresh.modules() if isinstance(m, Int4Linear)]
    assert counters == [1] * 6  # the step counter (the seeds' position) came back too


def test_a_resumed_run_draws_the_seeds_an_uninterrupted_run_draws(tmp_path):
    def train(model, steps):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for k in range(steps):
            x = torch.randn(32, 64, generator=torch.Generator().manual_seed(k))
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def fresh():
        torch.manual_seed(0)
        return convert_for_training(nn.Sequential(nn.Linear(64, 16)), skip=(), progress=False)

    straight = fresh()
    train(straight, 4)
    first = fresh()
    train(first, 2)
    save_quantized(first, tmp_path / "half.safetensors")
    resumed = load_quantized(fresh(), tmp_path / "half.safetensors")
    assert resumed[0].calls == 2
    batches = [torch.randn(32, 64, generator=torch.Generator().manual_seed(k)) for k in (2, 3)]
    opt = torch.optim.SGD(resumed.parameters(), lr=0.05)
    for x in batches:  # steps 2 and 3, with sampling: equal only if the seeds continue
        loss = resumed(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(resumed[0].weight, straight[0].weight)


# ---- DistributedDataParallel, 2 gloo processes on this machine --------------------------------------


def _mlp(options) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 4))
    return convert_for_training(model, skip=(), progress=False, **options)


def _shards():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 16, 64, generator=gen), torch.randn(2, 16, 4, generator=gen)
    return x, y


def _initialised(options, folder) -> nn.Module:
    model = _mlp(options)
    path = os.path.join(folder, "init.pt")
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
    else:  # one batch in a single process sets the blocks and steps for every run
        x, _ = _shards()
        model(x.reshape(-1, 64))
        torch.save(model.state_dict(), path)
    for layer in model.modules():
        if isinstance(layer, Int4Linear):
            layer.calls = 0
    return model


def _ddp_worker(rank: int, world: int, folder: str, options: dict, tag: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to find free (and lose to another process)
    store = f"file://{os.path.join(folder, tag)}.store"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_initialised(options, folder))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _shards()
        for _ in range(2):
            loss = nn.functional.mse_loss(model(x[rank]), y[rank])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if rank == 0:
            torch.save(model.module.state_dict(), os.path.join(folder, f"{tag}.pt"))
        # both ranks leave together: a rank that tears gloo down while the other still talks
        # to it aborts ("terminate called without an active exception", seen on a loaded CI)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _one_process(options, folder, ranks=(0, 1)) -> dict:
    """The same two steps in one process: each shard's gradient with its rank's seeds,
    averaged (what DDP's all-reduce computes)."""
    model = _initialised(options, folder)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _shards()
    for _ in range(2):
        opt.zero_grad()
        calls = {id(m): m.calls for m in model.modules() if isinstance(m, Int4Linear)}
        for shard, rank in enumerate(ranks):
            for m in model.modules():
                if isinstance(m, Int4Linear):
                    m.calls = calls[id(m)]
            original = N._rank
            N._rank = lambda rank=rank: rank  # type: ignore[assignment]
            try:
                (nn.functional.mse_loss(model(x[shard]), y[shard]) / len(ranks)).backward()
            finally:
                N._rank = original
        opt.step()
    return model.state_dict()


def _spawn(folder, options, tag):
    import torch.multiprocessing as mp

    _initialised(options, folder)  # init.pt exists before the ranks start
    mp.spawn(_ddp_worker, args=(2, folder, options, tag), nprocs=2, join=True)
    return torch.load(os.path.join(folder, f"{tag}.pt"))


def _assert_close(a: dict, b: dict, exact: bool = False) -> None:
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ddp_two_ranks_equal_one_process_and_reproduce_from_seeds():
    with tempfile.TemporaryDirectory() as folder:
        # deterministic: no sampling, nearest residual -> 2 ranks = 1 process over both shards
        det = {"sampling": False, "residual": "nearest"}
        os.makedirs(os.path.join(folder, "det"))
        ddp = _spawn(os.path.join(folder, "det"), det, "ddp")
        _assert_close(ddp, _one_process(det, os.path.join(folder, "det")))
        # sampling on: each rank draws its own rows; the run is reproducible from the seeds,
        # and one process with each shard's rank seeds computes the same weights
        sampled = {"sampling": True}
        os.makedirs(os.path.join(folder, "lss"))
        first = _spawn(os.path.join(folder, "lss"), sampled, "first")
        second = _spawn(os.path.join(folder, "lss"), sampled, "second")
        _assert_close(first, second, exact=True)
        _assert_close(first, _one_process(sampled, os.path.join(folder, "lss")))
        same_seed = _one_process(sampled, os.path.join(folder, "lss"), ranks=(0, 0))
        assert not torch.equal(same_seed["0.weight"], first["0.weight"])  # rank seeds differ


# ---- the 2026 comparison recipe: FP4 training as current hardware does it ---------------------


def test_mxfp4_stochastic_rounding_is_unbiased():
    """Mean over seeds against x, per element within a Hoeffding bound (family-wise 1e-6):
    each draw is one of the two MXFP4 neighbours, so its range is one grid step."""
    from lowbit.fast import formats

    torch.manual_seed(0)
    x = torch.randn(4, 64) * torch.randn(64).exp()
    repeats = 1000
    draws = torch.stack([N._mx_fp4(x, seed=k) for k in range(repeats)]).double()
    _, codes = formats.encode_mx(x, "e2m1", 32)
    scale = torch.repeat_interleave(torch.exp2(codes.double() - 127), 32, -1)  # per element
    assert (0.75 * x / scale).abs().max() <= 6  # the 3/4 shrink: nothing above E2M1's max
    q = (draws[0] * 0.75 / scale).float()  # a draw, in E2M1 units: on the E2M1 grid
    assert torch.equal(formats.quantize(q, "e2m1"), q)
    # a draw is one of two grid neighbours, at most 2 E2M1 units apart: 2 scale / 0.75 in x
    bound = 2 * scale / 0.75 * math.sqrt(math.log(2 * x.numel() / 1e-6) / (2 * repeats))
    assert ((draws.mean(0) - x.double()).abs() <= bound).all()


def test_fp4_training_linear_forward_and_gradients():
    from lowbit.fast import formats

    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    layer = N.FP4TrainingLinear(lin)
    x = torch.randn(40, 64, requires_grad=True)
    y = layer(x)
    expected = (
        formats.quantize_mx(x.detach(), "e2m1", 32)
        @ formats.quantize_mx(lin.weight.detach(), "e2m1", 32).t()
    )
    torch.testing.assert_close(y.detach(), expected + lin.bias.detach(), rtol=0, atol=0)
    g = torch.randn_like(y)
    y.backward(g)
    cos = lambda a, b: float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0))  # noqa: E731
    assert cos(x.grad, g @ lin.weight.detach()) > 0.95
    assert cos(layer.weight.grad, g.t() @ x.detach()) > 0.95
    assert torch.equal(layer.bias.grad, g.sum(0))
    q = N._random_hadamard(48, 16, 3, "cpu")
    torch.testing.assert_close(q @ q.t(), torch.eye(48), rtol=0, atol=1e-6)


def test_convert_for_training_mxfp4_recipe():
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    convert_for_training(model, recipe="mxfp4", skip=(), progress=False)
    assert sum(isinstance(m, N.FP4TrainingLinear) for m in model.modules()) == 2
    x, y = _regression_data()
    losses = _train(model, x, y)
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])
    with pytest.raises(ValueError, match="recipe='mxfp4' takes only seed="):
        convert_for_training(nn.Linear(8, 8), recipe="mxfp4", sampling=False)
    with pytest.raises(ValueError, match="recipe='fp8' is invalid"):
        convert_for_training(nn.Linear(8, 8), recipe="fp8")


def test_non_finite_input_gives_nan_output_not_a_code():
    layer = _layer(7)
    x = torch.randn(6, 64)
    layer(x)
    for bad in (math.nan, math.inf):
        x_bad = x.clone()
        x_bad[2, 3] = bad
        assert torch.isnan(layer(x_bad)).all()


def test_an_empty_batch_passes_through():
    layer = _layer(8)
    layer(torch.randn(4, 64))
    x = torch.zeros(0, 64, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 24)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.isfinite(layer.weight.grad).all()


def test_a_half_precision_layer_trains():
    """A model kept in bfloat16 (weights, bias, steps): gradients come back in their dtypes."""
    torch.manual_seed(9)
    layer = Int4Linear.from_linear(nn.Linear(64, 16).to(torch.bfloat16))
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    for p in layer.parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16


# ---- embedding outputs (convert_for_training(embeddings=True)) -----------------------------------


def test_embedding_output_is_the_hadamard_quantizer_with_lsq_gradients():
    """Int4Embedding computes Q(e H) H^T with the fast functions, and its gradients are LSQ's
    (lsq_quantize_grad) carried back through the transform, against an independent autograd
    form: e^ = H^T (s · (clamp(v) + stop_grad(round(clamp(v)) - clamp(v)))), v = e H / s, with
    s's gradient scaled by 1 / sqrt(numel Qp)."""
    torch.manual_seed(0)
    table = nn.Embedding(30, 64)
    emb = N.Int4Embedding(table, block=16, rounding="half_even")
    ids = torch.randint(0, 30, (3, 7))
    out = emb(ids)
    assert emb.block == 16 and emb.weight is table.weight
    e = table(ids).detach()
    e_h = block_hadamard(e, 16)
    assert float(emb.step.detach()) == pytest.approx(float(F.lsq_init(e_h)), rel=1e-6)
    step = emb.step.detach()
    expected = block_hadamard(F.lsq_quantize(e_h, step, rounding="half_even"), 16)
    assert torch.equal(out.detach(), expected)
    g = torch.randn_like(out)
    out.backward(g)
    # the textbook LSQ graph in float64, through the transform
    s = step.double().clone().requires_grad_(True)
    e64 = e.double().clone().requires_grad_(True)
    kappa = 1 / math.sqrt(e.numel() * 7)
    s_scaled = s * kappa + (s - s * kappa).detach()  # value s, gradient scaled by kappa
    v = block_hadamard(e64, 16) / s_scaled
    v_c = v.clamp(-8, 7)
    textbook = block_hadamard((v_c + (torch.round(v_c) - v_c).detach()) * s_scaled, 16)
    textbook.backward(g.double())
    grad_table = torch.zeros(30, 64, dtype=torch.float64).index_add_(
        0, ids.reshape(-1), e64.grad.reshape(-1, 64)
    )
    assert torch.allclose(emb.weight.grad.double(), grad_table, rtol=1e-5, atol=1e-6)
    assert float(emb.step.grad) == pytest.approx(float(s.grad), rel=1e-4)


def test_embedding_block_search_picks_the_smallest_reconstruction_error():
    torch.manual_seed(1)
    table = nn.Embedding(40, 64)
    with torch.no_grad():
        table.weight[:, 5] += 30.0  # one outlier channel: a transform spreads it
    emb = N.Int4Embedding(table)
    e = table(torch.arange(40)).detach()
    emb(torch.arange(40))
    errors = {g: float(F._hq_error(e, g, 4)) for g in (1, 2, 4, 8, 16, 32, 64)}
    assert emb.block == min(errors, key=errors.get) and emb.block > 1


def test_convert_with_embeddings_keeps_ties_trains_and_restores():
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=128))  # fmt: skip
    convert_for_training(bert, embeddings=True, progress=False)
    tables = [n for n, m in bert.named_modules() if isinstance(m, N.Int4Embedding)]
    assert sorted(t.rsplit(".", 1)[-1] for t in tables) == [
        "position_embeddings", "token_type_embeddings", "word_embeddings"
    ]  # fmt: skip
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))  # fmt: skip
    convert_for_training(llama, embeddings=True, progress=False)
    assert isinstance(llama.model.embed_tokens, N.Int4Embedding)
    assert llama.lm_head.weight is llama.model.embed_tokens.weight  # the tie survives
    ids = torch.randint(0, 100, (2, 12))
    opt = torch.optim.AdamW(llama.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = llama(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert llama.model.embed_tokens.step.grad is not None
    trained = llama.model.embed_tokens.weight
    restore_linears(llama)
    assert type(llama.model.embed_tokens) is nn.Embedding
    assert llama.model.embed_tokens.weight is trained and llama.lm_head.weight is trained


def test_embedding_bad_input_and_eval_before_training():
    with pytest.raises(ValueError, match="block=3 must be a power of two"):
        N.Int4Embedding(nn.Embedding(5, 48), block=3)
    with pytest.raises(ValueError, match="wraps an nn.Embedding"):
        N.Int4Embedding(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="use recipe='int4'"):
        convert_for_training(nn.Sequential(nn.Embedding(5, 8)), recipe="mxfp4", embeddings=True)
    emb = N.Int4Embedding(nn.Embedding(5, 8)).eval()
    with pytest.raises(ValueError, match="run one batch in train"):
        emb(torch.tensor([1, 2]))
    table = nn.Embedding(5, 8)
    with torch.no_grad():
        table.weight[2, 3] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        N.Int4Embedding(table)(torch.tensor([2, 1]))  # no step can be set from a NaN batch
    emb = N.Int4Embedding(table)
    assert torch.isfinite(emb(torch.tensor([0, 1]))).all()  # rows without the NaN
    assert torch.isnan(emb(torch.tensor([2, 1]))).all()  # poisoned, not turned into a code


def test_nvfp4_stochastic_rounding_is_unbiased_and_never_clips():
    """Each draw is one of two NVFP4 neighbours, and the mean over seeds is x within a
    Hoeffding bound (family-wise 1e-6). Without the scale bump a block's largest element,
    up to 6.375 units, would clip to 6: a bias of up to 0.375 units, above the bound."""
    from lowbit.fast import formats

    torch.manual_seed(2)
    x = torch.randn(4, 64) * torch.randn(64).exp()
    repeats = 1000
    draws = torch.stack([N._nv_fp4(x, seed=k) for k in range(repeats)]).double()
    _, codes, g = formats.encode_nvfp4(x)
    up = formats.decode(torch.clamp(codes + 1, max=126), "e4m3fn", dtype=torch.float64)
    unit = torch.repeat_interleave(up, 16, -1) / g.double()  # >= the (possibly bumped) unit
    spread = draws.amax(0) - draws.amin(0)
    assert (spread <= 2 * unit * (1 + 1e-6)).all()  # two neighbours at most (float32 draws)
    bound = 2 * unit * math.sqrt(math.log(2 * x.numel() / 1e-6) / (2 * repeats))
    assert ((draws.mean(0) - x.double()).abs() <= bound).all()


def test_fp4_training_linear_nvfp4_forward_uses_tiled_weights_and_trains():
    from lowbit.fast import formats

    torch.manual_seed(3)
    lin = nn.Linear(64, 48)
    layer = N.FP4TrainingLinear(lin, fmt="nvfp4")
    x = torch.randn(40, 64)
    expected = (
        formats.quantize_nvfp4(x) @ formats.quantize_nvfp4(lin.weight.detach(), block_2d=True).t()
    )
    torch.testing.assert_close(layer(x).detach(), expected + lin.bias.detach(), rtol=0, atol=0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    convert_for_training(model, recipe="nvfp4", skip=(), progress=False)
    assert all(m.fmt == "nvfp4" for m in model.modules() if isinstance(m, N.FP4TrainingLinear))
    xr, yr = _regression_data()
    losses = _train(model, xr, yr)
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])
    with pytest.raises(ValueError, match="fmt='fp6' is invalid"):
        N.FP4TrainingLinear(lin, fmt="fp6")
