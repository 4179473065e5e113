"""OmniQuant: the LWC quantizer and its gradients, the per-token activation quantizer, the LET
transformations and the readable one-layer calibration (reference and fast path).

Independent truths: a line-by-line torch transcription of the official quantizer run through
torch autograd (gradients), float64 algebra of the unquantized block (LET), the shared uniform
quantizer (no clipping), and finite differences for the smooth parts of the loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.fast import omniquant as F
from lowbit.fast import uniform as FU
from lowbit.reference import omniquant as R


def official_quantizer(w, bits, group_size, gamma, beta, symmetric):
    """The official UniformAffineQuantizer (per row or group), transcribed op by op."""
    rows, n = w.shape
    x = w.reshape(-1, group_size) if group_size else w
    xmin, xmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if gamma is not None:  # lowbit rounds the clipping factors to float32 (see the reference)
        xmax = torch.sigmoid(gamma.reshape(-1, 1)).float().to(w.dtype) * xmax
        xmin = torch.sigmoid(beta.reshape(-1, 1)).float().to(w.dtype) * xmin
    if symmetric:
        absmax = torch.max(xmax.abs(), xmin.abs())
        scale = (absmax / (2 ** (bits - 1) - 1)).clamp(1e-5, 1e4)
        zero_point = (2 ** (bits - 1) - 1) * torch.ones_like(scale)
    else:
        scale = ((xmax - xmin) / (2**bits - 1)).clamp(1e-5, 1e4)
        zero_point = -xmin / scale
    round_zero_point = zero_point.clamp(-1e4, 1e4).round()
    u = x / scale
    x_int = (u.round() - u).detach() + u  # round_ste
    x_int = (x_int + round_zero_point).clamp(0, 2**bits - 1)
    return ((x_int - round_zero_point) * scale).reshape(rows, n)


def _weights(seed, rows=6, n=32):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, (rows, n))
    w[1] = 0.0  # zero row: s clamps to 1e-5, values 0
    w[2] = np.abs(w[2]) + 0.2  # all positive: the range does not include 0
    w[3, :4] = w[3].max()  # tied maxima share the range gradient
    return rng, w


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group_size", [None, 8], ids=["channel", "g8"])
@pytest.mark.parametrize("lwc", [True, False], ids=["lwc", "minmax"])
def test_gradients_match_the_official_autograd_graph(symmetric, group_size, lwc):
    """Reference analytic gradients == torch autograd through the official quantizer's graph
    (float64, to rounding); the fast Function's autograd and quantize_weight_grad agree too.
    Group size 8 divides 32, as the official code requires for its reshape."""
    rng, w = _weights(0)
    ng = R.group_count(32, group_size)
    g = rng.standard_normal((6, ng)) + 2.0 if lwc else None
    b = rng.standard_normal((6, ng)) + 2.0 if lwc else None
    go = rng.standard_normal(w.shape)
    wt = torch.tensor(w, requires_grad=True)
    gt = None if g is None else torch.tensor(g, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    y = official_quantizer(wt, 4, group_size, gt, bt, symmetric)
    y.backward(torch.tensor(go))
    np.testing.assert_array_equal(
        R.quantize_weight(w, 4, group_size, g, b, symmetric), y.detach().numpy()
    )
    ref = R.quantize_weight_grad(w, 4, group_size, g, b, symmetric, grad_output=go)
    truth = [wt.grad] + ([gt.grad, bt.grad] if lwc else [])
    # torch's sigmoid backward uses the float64 sigmoid a, lowbit's its float32 rounding: the
    # relative error of a (1 - a) is up to 2^-24 / (1 - a), below 1e-5 for these logits (a < 0.99)
    for got, want, rtol in zip(ref, truth, (1e-12, 1e-5, 1e-5)):
        np.testing.assert_allclose(got, want.numpy(), rtol=rtol, atol=1e-14)
    if not lwc:
        assert ref[1] is None and ref[2] is None
    # the fast path: its Function's autograd and its explicit gradient function
    wf = torch.tensor(w, requires_grad=True)
    gf = None if g is None else torch.tensor(g, requires_grad=True)
    bf = None if b is None else torch.tensor(b, requires_grad=True)
    F.quantize_weight(wf, 4, group_size, gf, bf, symmetric).backward(torch.tensor(go))
    explicit = F.quantize_weight_grad(
        torch.tensor(w), 4, group_size, None if g is None else torch.tensor(g),
        None if b is None else torch.tensor(b), symmetric, grad_output=torch.tensor(go),
    )  # fmt: skip
    for i, t in enumerate([wf] + ([gf, bf] if lwc else [])):
        np.testing.assert_allclose(t.grad.numpy(), ref[i], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(explicit[i].numpy(), ref[i], rtol=1e-12, atol=1e-14)
    # activations: per token, no clipping: the same graph row by row
    x = rng.standard_normal((3, 5, 16))
    xt = torch.tensor(x, requires_grad=True)
    official_quantizer(xt.reshape(-1, 16), 4, None, None, None, False).backward(
        torch.tensor(go[:, :16].repeat(3, axis=0)[:15])
    )
    gx = R.quantize_activation_grad(
        x, 4, grad_output=go[:, :16].repeat(3, axis=0)[:15].reshape(x.shape)
    )
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-12, atol=1e-14)
    fx = F.quantize_activation_grad(
        torch.tensor(x),
        4,
        grad_output=torch.tensor(go[:, :16].repeat(3, axis=0)[:15].reshape(x.shape)),
    )
    np.testing.assert_allclose(fx.numpy(), gx, rtol=1e-12, atol=1e-14)
    assert np.array_equal(R.quantize_activation_grad(x, 16, grad_output=x), x)


def test_without_logits_lwc_is_min_max_rtn_of_the_uniform_quantizer():
    """gamma = beta = None: the shared uniform quantizer's asymmetric RTN (rows that span 0,
    ranges far above the 1e-5 scale floor), per channel and per group, float32 and float64."""
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        w = rng.standard_normal((16, 96)).astype(dtype)
        for group_size, kw in [
            (None, {"granularity": "channel"}),
            (32, {"granularity": "group", "group_size": 32}),
        ]:
            for bits in (2, 3, 4, 8):
                ours = R.quantize_weight(w, bits, group_size)
                rtn = FU.quantize(torch.tensor(w), bits, symmetric=False, **kw).numpy()
                np.testing.assert_array_equal(ours, rtn)


def test_zero_rows_short_last_groups_and_symmetric_grid():
    """Zero rows give zeros, never NaN; a shorter last group is quantized from its own
    elements; the symmetric grid is [-(2^(b-1) - 1), 2^(b-1)] · s."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 20))
    w[0] = 0.0
    for fn in (
        lambda a, **k: R.quantize_weight(a, **k),
        lambda a, **k: F.quantize_weight(torch.tensor(a), **k).numpy(),
    ):
        out = fn(w, bits=3, group_size=8)
        assert np.isfinite(out).all() and np.all(out[0] == 0.0)
        np.testing.assert_array_equal(
            out[:, 16:], R.quantize_weight(w[:, 16:], 3)
        )  # the 4-long tail
        codes, scale, zp = R.encode_weight(w, 4, None, symmetric=True)
        assert np.all(zp == 7) and codes.max() <= 15
    x = np.array([[-7.0, 0.0, 7.0]])
    codes, scale, zp = R.encode_weight(x, 4, symmetric=True)
    assert scale[0, 0] == 1.0 and codes.tolist() == [[0, 7, 14]]
    assert np.array_equal(R.quantize_activation(np.zeros((2, 0)), 4), np.zeros((2, 0)))


def _rope(t, cos, sin):
    half = t.shape[-1] // 2
    rotated = np.concatenate([-t[..., half:], t[..., :half]], axis=-1)  # rotate_half
    return t * cos + rotated * sin


def _attention(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, kv_heads, rope):
    """Multi-head attention (grouped-query when kv_heads < heads) in float64."""
    T, hd = x.shape[0], wq.shape[0] // heads
    q = (x @ wq.T + (0 if bq is None else bq)).reshape(T, heads, hd).transpose(1, 0, 2)
    k = (x @ wk.T + (0 if bk is None else bk)).reshape(T, kv_heads, hd).transpose(1, 0, 2)
    v = (x @ wv.T + (0 if bv is None else bv)).reshape(T, kv_heads, hd).transpose(1, 0, 2)
    if rope:
        pos = np.arange(T)[:, None] / 10000 ** (np.arange(0, hd, 2) / hd)
        cos, sin = np.cos(np.concatenate([pos, pos], -1)), np.sin(np.concatenate([pos, pos], -1))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    rep = heads // kv_heads
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    a = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
    a = np.exp(a - a.max(-1, keepdims=True))
    p = a / a.sum(-1, keepdims=True)
    o = (p @ v).transpose(1, 0, 2).reshape(T, heads * hd)
    return o @ wo.T + (0 if bo is None else bo)


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


@pytest.mark.parametrize("side", ["reference", "fast"])
def test_let_transformations_are_exact_equivalences(side):
    """Before quantization every LET is an identity of the block (float64, 1e-12 relative):
    LayerNorm (with shift) -> two linears, RMSNorm (no bias) -> linear, v -> o with a shift
    under grouped-query attention (9 query heads, 3 KV heads, as SmolLM2), q/k with one
    scale per rotary pair through RoPE; a scale that breaks a rotary pair is refused."""
    rng = np.random.default_rng(3)
    M = R if side == "reference" else F
    T, d, heads, kv, hd = 7, 36, 9, 3, 4

    def conv(v):
        return v if side == "reference" or v is None else torch.tensor(v)

    def back(v):
        return v if side == "reference" or v is None else v.numpy()

    x = rng.standard_normal((T, d)) * np.exp(rng.standard_normal(d))
    # norm -> linears
    g_n, b_n = rng.standard_normal(d), rng.standard_normal(d)
    w1, b1, w2 = rng.standard_normal((10, d)), rng.standard_normal(10), rng.standard_normal((5, d))
    s, delta = np.exp(rng.standard_normal(d)), rng.standard_normal(d)
    mu, sd = x.mean(1, keepdims=True), x.std(1, keepdims=True)
    xn = (x - mu) / sd
    for bias, shift in [(b_n, delta), (None, None), (None, delta)]:
        normed = xn * g_n + (0 if bias is None else bias)
        gn2, bn2, (w1_, w2_), (b1_, b2_) = M.let_norm_linears(
            conv(g_n), conv(bias), [conv(w1), conv(w2)], [conv(b1), None], conv(s), conv(shift)
        )
        normed2 = xn * back(gn2) + (0 if bn2 is None else back(bn2))
        _close(normed2 @ back(w1_).T + back(b1_), normed @ w1.T + b1)
        _close(normed2 @ back(w2_).T + (0 if b2_ is None else back(b2_)), normed @ w2.T)
    # attention: v -> o (GQA, with shift) and q/k through RoPE
    wq, wk = rng.standard_normal((heads * hd, d)), rng.standard_normal((kv * hd, d))
    wv, wo = rng.standard_normal((kv * hd, d)), rng.standard_normal((d, heads * hd))
    bv, bo = rng.standard_normal(kv * hd), rng.standard_normal(d)
    for rope in (False, True):
        ref = _attention(x, wq, None, wk, None, wv, bv, wo, bo, heads, kv, rope)
        s_v, d_v = np.exp(rng.standard_normal(kv * hd)), rng.standard_normal(kv * hd)
        wv2, bv2, wo2, bo2 = M.let_v_o(conv(wv), conv(bv), conv(wo), conv(bo), conv(s_v), conv(d_v),
                                       num_heads=heads, num_kv_heads=kv)  # fmt: skip
        s_qk = back(M.rotary_scale(conv(np.exp(rng.standard_normal(kv * hd // 2))), kv))
        wq2, _, wk2, _ = M.let_q_k(conv(wq), None, conv(wk), None, conv(s_qk), num_heads=heads,
                                   num_kv_heads=kv, rotary=rope)  # fmt: skip
        got = _attention(x, back(wq2), None, back(wk2), None, back(wv2), back(bv2), back(wo2),
                         back(bo2), heads, kv, rope)  # fmt: skip
        _close(got, ref)
    with pytest.raises(ValueError, match="rotary pair"):
        M.let_q_k(conv(wq), None, conv(wk), None, conv(np.exp(rng.standard_normal(kv * hd))),
                  num_heads=heads, num_kv_heads=kv, rotary=True)  # fmt: skip
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        M.let_v_o(conv(wv), None, conv(wo), None, conv(s_v), num_heads=9, num_kv_heads=2)
    # SmoothQuant initialisation: the same numbers on both sides
    _close(back(M.smooth_scale(conv(np.abs(x).max(0)), conv(w1), 0.5)),
           R.smooth_scale(np.abs(x).max(0), w1, 0.5))  # fmt: skip


def test_let_linear_gradient_matches_autograd_of_the_fast_path():
    """The reference's hand-derived LET/LWC gradients of a quantized linear's output error equal
    torch autograd through the fast path's Functions and plain LET algebra (float64)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((24, 16)) * np.exp(rng.standard_normal(16))
    w, b = rng.standard_normal((8, 16)) * 0.3, rng.standard_normal(8)
    y_t = x @ w.T + b + 0.01 * rng.standard_normal((24, 8))
    s, delta = np.exp(0.3 * rng.standard_normal(16)), 0.2 * rng.standard_normal(16)
    g, bt = 3 + rng.standard_normal((8, 2)), 3 + rng.standard_normal((8, 2))
    for abits in (16, 6):
        loss, grads = R.let_linear_loss_grad(x, w, b, s, delta, g, bt, y_target=y_t, wbits=4,
                                             abits=abits, group_size=8)  # fmt: skip
        P = {
            k: torch.tensor(v, requires_grad=True)
            for k, v in dict(scale=s, shift=delta, gamma=g, beta=bt).items()
        }
        X, W, B = torch.tensor(x), torch.tensor(w), torch.tensor(b)
        xl = (X - P["shift"]) / F.truncate_scale(P["scale"])
        wl = W * F.truncate_scale(P["scale"])
        y = (
            F.quantize_activation(xl, abits) @ F.quantize_weight(wl, 4, 8, P["gamma"], P["beta"]).T
            + B
            + W @ P["shift"]
        )
        t_loss = ((y - torch.tensor(y_t)) ** 2).mean()
        t_loss.backward()
        assert loss == pytest.approx(float(t_loss), rel=1e-12)
        for k, v in P.items():
            np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_calibrate_linear_lowers_the_error_and_stops_on_divergence():
    """Hand-written Adam on one W3 layer with an outlier input channel: LWC alone learns
    clipping that cuts the error well below min-max RTN; with LET the SmoothQuant start is
    already ~13x better and training keeps it there. A diverging run stops with one line
    naming the layer and asking for a lower learning rate."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 32))
    x[:, 3] *= 20.0  # an outlier channel for LET to move into the weights
    w = rng.standard_t(3, (16, 32)) * 0.2
    rtn = np.mean((x @ R.quantize_weight(w, 3).T - x @ w.T) ** 2)
    lwc = R.calibrate_linear(x, w, wbits=3, abits=16, let=False, steps=200)
    assert lwc.losses[0] < rtn and lwc.losses[-1] < 0.7 * lwc.losses[0]
    assert lwc.scale is None and lwc.gamma.shape == (16, 1)
    both = R.calibrate_linear(x, w, wbits=3, abits=16, let=True, steps=200)
    assert both.losses[-1] < 0.2 * lwc.losses[-1] and both.scale.shape == (32,)
    with pytest.raises(
        ValueError, match=r"layer7: the gamma parameters became non-finite at step 3; lower"
    ) as err:
        R.calibrate_linear(x, w, wbits=3, let=False, steps=30, lwc_lr=1e308, name="layer7")
    assert "\n" not in str(err.value)


def test_bad_input_is_one_line_on_both_sides():
    w = np.ones((4, 8), dtype=np.float32)
    cases = [
        ((w.astype(np.int32),), {}, "floating point"),
        ((np.ones(8, np.float32),), {}, "2-D"),
        ((np.where(w > 0, np.nan, w),), {}, "non-finite"),
        ((w,), {"bits": 1}, "bits must be from 2"),
        ((w,), {"group_size": 0}, "group_size"),
        ((w,), {"gamma": np.zeros((4, 2)), "beta": np.zeros((4, 1))}, "gamma must be"),
        ((w,), {"gamma": np.full((4, 1), np.inf), "beta": np.zeros((4, 1))}, "diverged"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            R.quantize_weight(*args, **kwargs)
        t_args = tuple(torch.tensor(a) for a in args)
        t_kwargs = {
            k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()
        }
        with pytest.raises((ValueError, TypeError), match=match):
            F.quantize_weight(*t_args, **t_kwargs)
    with pytest.raises(TypeError, match="w"):
        F.quantize_weight(w)
    x = np.array([[1.0, np.inf]], dtype=np.float32)
    for fn in (R.quantize_activation, lambda a, b: F.quantize_activation(torch.tensor(a), b)):
        with pytest.raises(ValueError, match="^x has 1 non-finite values"):
            fn(x, 4)


def test_fast_calibrate_linear_follows_the_reference():
    """The torch calibration (autograd through the fast Functions, the same Adam) takes the
    reference's steps: the same loss curve to float64 rounding, the same parameters."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((32, 16))
    x[:, 2] *= 10.0
    w = rng.standard_t(3, (8, 16)) * 0.2
    kw = dict(wbits=3, abits=8, group_size=8, let=True, let_shift=True, steps=15)
    ref = R.calibrate_linear(x, w, **kw)
    fast = F.calibrate_linear(torch.tensor(x), torch.tensor(w), **kw)
    np.testing.assert_allclose(fast.losses, ref.losses, rtol=1e-9)
    for k in ("scale", "shift", "gamma", "beta"):
        np.testing.assert_allclose(getattr(fast, k).numpy(), getattr(ref, k), rtol=1e-7, atol=1e-10)


def _mlp_case(seed: int = 8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((20, 16)) * np.exp(rng.standard_normal(16))
    w_gate, w_up = rng.standard_normal((24, 16)) * 0.3, rng.standard_normal((24, 16)) * 0.3
    w_down = rng.standard_t(3, (12, 24)) * 0.2
    return rng, x, w_gate, w_up, w_down


def test_let_mlp_gradient_matches_autograd_of_the_fast_path():
    """The chain rule by hand through a quantized SwiGLU MLP (two weight quantizers feeding
    the product, the activation quantizer between the layers) equals torch autograd through
    the fast path's Functions (float64)."""
    rng, x, w_gate, w_up, w_down = _mlp_case()
    y_t = rng.standard_normal((20, 12))
    # groups of 8, and of 12 (gate/up: 16 inputs, a short last group)
    for abits, group in ((16, 8), (6, 12)):
        fit = {"scale": np.exp(0.3 * rng.standard_normal(16))}
        for key, w in (("gate", w_gate), ("up", w_up), ("down", w_down)):
            shape = (w.shape[0], -(-w.shape[1] // group))
            fit[f"gamma_{key}"] = 3 + rng.standard_normal(shape)
            fit[f"beta_{key}"] = 3 + rng.standard_normal(shape)
        loss, grads = R.let_mlp_loss_grad(x, w_gate, w_up, w_down, fit, y_target=y_t, wbits=4,
                                          abits=abits, group_size=group)  # fmt: skip
        P = {k: torch.tensor(v, requires_grad=True) for k, v in fit.items()}
        X = torch.tensor(x)
        s = F.truncate_scale(P["scale"])

        def wq(key, w, P=P, group=group):
            return F.quantize_weight(w, 4, group, P[f"gamma_{key}"], P[f"beta_{key}"])

        xq = F.quantize_activation(X / s, abits)
        h = torch.nn.functional.silu(xq @ wq("gate", torch.tensor(w_gate) * s).T) * (
            xq @ wq("up", torch.tensor(w_up) * s).T
        )
        y = F.quantize_activation(h, abits) @ wq("down", torch.tensor(w_down)).T
        t_loss = ((y - torch.tensor(y_t)) ** 2).mean()
        t_loss.backward()
        assert loss == pytest.approx(float(t_loss.detach()), rel=1e-12)
        assert set(grads) == set(P)
        for k, v in P.items():
            np.testing.assert_allclose(grads[k], v.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_calibrate_mlp_lowers_the_error_and_the_fast_path_follows():
    _, x, w_gate, w_up, w_down = _mlp_case(9)
    x[:, 3] *= 30.0  # an outlier channel for LET to move
    kw = dict(wbits=3, abits=6)
    rtn = R.calibrate_mlp(x, w_gate, w_up, w_down, lwc=False, let=False, steps=1, **kw)
    ref = R.calibrate_mlp(x, w_gate, w_up, w_down, steps=60, lwc_lr=5e-2, **kw)
    assert ref.losses[-1] < 0.9 * ref.losses[0] and ref.losses[-1] < 0.5 * rtn.losses[0]
    with pytest.raises(ValueError, match="mlp7: .* lower the learning rates"):
        R.calibrate_mlp(x, w_gate, w_up, w_down, steps=5, let_lr=1e308, name="mlp7")


def test_fast_calibrate_mlp_follows_the_reference():
    _, x, w_gate, w_up, w_down = _mlp_case(10)
    kw = dict(wbits=3, abits=8, group_size=8, steps=12)
    ref = R.calibrate_mlp(x, w_gate, w_up, w_down, **kw)
    fast = F.calibrate_mlp(*(torch.tensor(a) for a in (x, w_gate, w_up, w_down)), **kw)
    np.testing.assert_allclose(fast.losses, ref.losses, rtol=1e-9)
    assert set(fast.params) == set(ref.params)
    for k, v in ref.params.items():
        np.testing.assert_allclose(fast.params[k].numpy(), v, rtol=1e-7, atol=1e-10)
