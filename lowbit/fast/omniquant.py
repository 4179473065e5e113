"""OmniQuant (arXiv 2308.13137) — fast path, torch.

Mirrors ``lowbit.reference.omniquant`` function by function (same names, parameters, defaults
and errors; the formulas and choices are in that module's docstring). The weight quantizer is
a ``torch.autograd.Function`` (``LWCQuantize``) whose backward is the reference's analytic
gradient, the official code's autograd graph without its rounding noise: the official
``round_ste`` computes (rint(u) - u) + u, which is not always rint(u) in floating point and then
moves the clamp's boundary now and then. The activation quantizer is the same Function per
token with no clipping. Forward values are bit for bit the reference's. On CUDA, where no
gradient is needed, ``quantize_activation`` runs the Triton kernel
``lowbit.kernels.omniquant.quantize_activation`` (bit for bit the same values).

The model-level calibration (block by block, Hugging Face BERT and LLaMA) is
``lowbit.fast.nn.omniquant.calibrate``; it uses these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lowbit.fast._tensors import takes_tensors
from lowbit.kernels import on_triton_device
from lowbit.reference.omniquant import (
    CLIP_MAX,
    CLIP_MIN,
    LWC_INIT,
    SCALE_FLOOR,
    LinearCalibration,
    MLPCalibration,
    _check_bits,
    _check_group_size,
    _diverged,
    group_count,
)

__all__ = [
    "CLIP_MIN",
    "CLIP_MAX",
    "LWC_INIT",
    "SCALE_FLOOR",
    "group_count",
    "LWCQuantize",
    "encode_weight",
    "decode_weight",
    "quantize_weight",
    "quantize_weight_grad",
    "quantize_activation",
    "quantize_activation_grad",
    "truncate_scale",
    "smooth_scale",
    "let_norm_linears",
    "let_v_o",
    "let_q_k",
    "rotary_scale",
    "LinearCalibration",
    "calibrate_linear",
    "MLPCalibration",
    "calibrate_mlp",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.amax())) and bool(torch.isfinite(x.amin()))


def _working(x: torch.Tensor, name: str = "w") -> torch.Tensor:
    if x.dtype not in _FLOATS:
        raise ValueError(
            f"{name} must be floating point (float16/bfloat16/float32/float64), got {_name(x.dtype)}"
        )
    if x.dim() < 2:
        raise ValueError(f"{name} must be 2-D (rows, inputs) or more, got shape {tuple(x.shape)}")
    x_w = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    # checked on CPU only: on CUDA the check would sync the device on every call
    # (two reductions, no full-size mask: amax and amin propagate NaN, and Inf shows in them)
    if x_w.device.type == "cpu" and x_w.numel() and not _finite(x_w.detach()):
        bad = int((~torch.isfinite(x_w)).sum())
        raise ValueError(
            f"{name} has {bad} non-finite values; OmniQuant needs finite input (np.nan_to_num)"
        )
    return x_w


def _check_logits(logits, name: str, want: tuple) -> torch.Tensor | None:
    if logits is None:
        return None
    if (
        not isinstance(logits, torch.Tensor)
        or not logits.is_floating_point()
        or tuple(logits.shape) != want
    ):
        got = (
            f"{_name(logits.dtype)} {tuple(logits.shape)}"
            if isinstance(logits, torch.Tensor)
            else type(logits).__name__
        )
        raise ValueError(f"{name} must be a float array of shape {want} (rows, groups), got {got}")
    if logits.device.type == "cpu" and not bool(torch.isfinite(logits.detach()).all()):
        raise ValueError(
            f"{name} must be finite: the LWC logits diverged (lower the LWC learning rate)"
        )
    return logits


def _grouped(x: torch.Tensor, G: int, fill: float) -> torch.Tensor:
    """(rows, n) -> (rows, n_groups, G), the last group padded with ``fill``."""
    rows, n = x.shape
    ng = max(-(-n // G), 1)
    if ng * G != n:
        x = torch.nn.functional.pad(x, (0, ng * G - n), value=fill)
    return x.reshape(rows, ng, G)


def _sigmoid(logits: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """sigmoid in float64 rounded to float32, as the reference, (rows, groups, 1)."""
    if logits is None:
        return None
    g = logits.detach().to(torch.float64)
    return (1.0 / (1.0 + torch.exp(-g))).float().to(like.dtype)[..., None]


def _const(like: torch.Tensor, value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _forward(x: torch.Tensor, bits: int, G: int, gamma, beta, symmetric: bool) -> dict[str, Any]:
    """The quantizer's intermediates, as ``lowbit.reference.omniquant._forward`` (x: (rows, n))."""
    a, b = _sigmoid(gamma, x), _sigmoid(beta, x)
    n = x.shape[1]
    xg = _grouped(x, G, 0.0)  # (rows, groups, G)
    real = None  # the mask of real (not padding) elements, only where the last group is short
    if xg.shape[1] * G != n:
        real = _grouped(torch.ones_like(x, dtype=torch.bool), G, False)
        hi = torch.where(real, xg, -torch.inf).amax(-1, keepdim=True)  # (rows, groups, 1)
        lo = torch.where(real, xg, torch.inf).amin(-1, keepdim=True)
    else:
        hi, lo = xg.amax(-1, keepdim=True), xg.amin(-1, keepdim=True)
    if n == 0:
        hi, lo = torch.zeros_like(hi), torch.zeros_like(lo)
    x_max = hi if a is None else a * hi
    x_min = lo if b is None else b * lo
    levels = 2**bits - 1
    if symmetric:
        half = _const(x, 2 ** (bits - 1) - 1)
        s_raw = torch.maximum(x_max.abs(), x_min.abs()) / half
        z = half.expand_as(s_raw)
    else:
        s_raw = (x_max - x_min) / _const(x, levels)
    s = s_raw.clamp(CLIP_MIN, CLIP_MAX)
    if not symmetric:
        z = torch.round(torch.clamp(-x_min / s, -1e4, 1e4))
    r = torch.div(xg, s).round_()
    q = (r + z).clamp_(0, levels)
    return dict(x=xg, real=real, hi=hi, lo=lo, a=a, b=b, s_raw=s_raw, s=s, z=z, r=r, q=q,
                levels=levels, symmetric=symmetric, bits=bits, n=n)  # fmt: skip


def _values(f: dict[str, Any]) -> torch.Tensor:
    v = (f["q"] - f["z"]).mul_(f["s"])
    return v.reshape(v.shape[0], -1)[:, : f["n"]]


def _masked(real: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """``real & t`` (t where no element is padding)."""
    return t if real is None else real & t


def _backward(f: dict[str, Any], grad: torch.Tensor):
    """(grad_x (rows, n), grad_gamma (rows, g) or None, grad_beta or None): the reference's
    ``quantize_weight_grad`` formulas."""
    real, s, z, r, q, levels = f["real"], f["s"], f["z"], f["r"], f["q"], f["levels"]
    gy = _grouped(grad.to(s.dtype), f["x"].shape[-1], 0.0)
    inside = _masked(real, q == r + z)  # not clipped: the clamp left r + z as it was
    grad_x = torch.where(inside, gy, 0.0)
    # ∂x̂/∂s = (q - z) - [inside] · x / s (STE), then times the incoming gradient, in place
    dxhat_ds = (q - z).sub_(torch.where(inside, f["x"] / s, 0.0))
    gs = dxhat_ds.mul_(gy)
    grad_s = (gs if real is None else gs.masked_fill_(~real, 0.0)).sum(-1, keepdim=True)
    s_raw = f["s_raw"]
    grad_s_raw = torch.where((s_raw >= CLIP_MIN) & (s_raw <= CLIP_MAX), grad_s, 0.0)
    a = 1.0 if f["a"] is None else f["a"]
    b = 1.0 if f["b"] is None else f["b"]
    hi, lo = f["hi"], f["lo"]
    x_max, x_min = a * hi, b * lo
    if f["symmetric"]:
        grad_absmax = grad_s_raw / (2 ** (f["bits"] - 1) - 1)
        share = torch.where(
            x_max.abs() > x_min.abs(), 1.0, torch.where(x_max.abs() == x_min.abs(), 0.5, 0.0)
        ).to(s.dtype)
        grad_x_max = grad_absmax * share * torch.sign(x_max)
        grad_x_min = grad_absmax * (1.0 - share) * torch.sign(x_min)
    else:
        grad_x_max = grad_s_raw / levels
        grad_x_min = -grad_s_raw / levels
    grad_gamma = None if f["a"] is None else (grad_x_max * hi * a * (1 - a))[..., 0]
    grad_beta = None if f["b"] is None else (grad_x_min * lo * b * (1 - b))[..., 0]
    is_hi = _masked(real, f["x"] == hi)
    is_lo = _masked(real, f["x"] == lo)
    for tied, grad_bound in ((is_hi, grad_x_max * a), (is_lo, grad_x_min * b)):
        count = tied.sum(-1, keepdim=True, dtype=torch.float32).clamp_min(1)
        grad_x.add_(torch.where(tied, grad_bound / count, 0.0))
    grad_x = grad_x.reshape(grad_x.shape[0], -1)[:, : f["n"]]
    return grad_x, grad_gamma, grad_beta


class LWCQuantize(torch.autograd.Function):
    """x̂ = LWC fake quantization of ``x`` (rows, n) (see the module docstring); gradients
    for x, gamma and beta from the analytic formulas. ``gamma``/``beta`` (rows, groups) or None."""

    @staticmethod
    def forward(ctx, x, gamma, beta, bits: int, G: int, symmetric: bool):  # type: ignore[override]
        f = _forward(x, bits, G, gamma, beta, symmetric)
        ctx.f = f
        ctx.logit_dtypes = (
            None if gamma is None else gamma.dtype,
            None if beta is None else beta.dtype,
        )
        return _values(f)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad_x, grad_gamma, grad_beta = _backward(ctx.f, grad)
        dg, db = ctx.logit_dtypes
        return (
            grad_x,
            None if grad_gamma is None else grad_gamma.to(dg),
            None if grad_beta is None else grad_beta.to(db),
            None,
            None,
            None,
        )


def _prepare(w, bits, group_size, gamma, beta, symmetric):
    bits = _check_bits(bits)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    x = _working(w)
    lead = tuple(x.shape[:-1])
    x = x.reshape(-1, x.shape[-1])
    G = _check_group_size(group_size, x.shape[1])
    want = (*lead, group_count(x.shape[1], group_size))
    g = _check_logits(gamma, "gamma", want)
    bt = _check_logits(beta, "beta", want)
    flat = (x.shape[0], want[-1])
    g = None if g is None else g.reshape(flat)
    bt = None if bt is None else bt.reshape(flat)
    return x, bits, G, g, bt, symmetric, lead


@takes_tensors
def encode_weight(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int | None = None,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero_point)`` of ``quantize_weight`` (see the reference)."""
    x, bits, G, g, bt, symmetric, lead = _prepare(w, bits, group_size, gamma, beta, symmetric)
    with torch.no_grad():
        f = _forward(x, bits, G, g, bt, symmetric)
    q = f["q"] if f["real"] is None else torch.where(f["real"], f["q"], 0.0)
    codes = q.reshape(x.shape[0], -1)[:, : x.shape[1]]
    dtype = torch.uint8 if bits <= 8 else torch.int32
    return (
        codes.to(dtype).reshape(*lead, x.shape[1]),
        f["s"][..., 0].reshape(*lead, -1),
        f["z"][..., 0].to(torch.int32).reshape(*lead, -1),
    )


@takes_tensors
def decode_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int | None = None,
    dtype=None,
) -> torch.Tensor:
    """x̂ = (q - z) · s per group (see the reference)."""
    ints = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    if codes.dtype not in ints or zero_point.dtype not in ints:
        raise ValueError(
            f"codes and zero_point must be integers (from encode_weight), got {_name(codes.dtype)}, {_name(zero_point.dtype)}"
        )
    n = codes.shape[-1]
    want = (*codes.shape[:-1], group_count(n, group_size))
    if tuple(scale.shape) != want or tuple(zero_point.shape) != want:
        raise ValueError(
            f"scale and zero_point must have shape {want} for group_size={group_size}, got {tuple(scale.shape)}, {tuple(zero_point.shape)}"
        )
    G = _check_group_size(group_size, n)

    def rep(v: torch.Tensor) -> torch.Tensor:
        return v.repeat_interleave(G, dim=-1)[..., :n]

    values = (codes.long() - rep(zero_point.long())).to(scale.dtype) * rep(scale)
    if dtype is None:
        return values
    from lowbit.fast.uniform import _out_dtype

    return values.to(_out_dtype(dtype))


@takes_tensors
def quantize_weight(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int | None = None,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    symmetric: bool = False,
) -> torch.Tensor:
    """LWC fake quantization (see the reference); differentiable in w, gamma and beta
    through ``LWCQuantize``. Returns w's dtype."""
    x, bits, G, g, bt, symmetric, lead = _prepare(w, bits, group_size, gamma, beta, symmetric)
    y = LWCQuantize.apply(x, g, bt, bits, G, symmetric)
    return y.reshape(*lead, x.shape[1]).to(w.dtype)


@takes_tensors
def quantize_weight_grad(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int | None = None,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    symmetric: bool = False,
    *,
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_w, grad_gamma, grad_beta)`` of ``quantize_weight`` (see the reference)."""
    x, bits, G, g, bt, symmetric, lead = _prepare(w, bits, group_size, gamma, beta, symmetric)
    if tuple(grad_output.shape) != tuple(w.shape):
        raise ValueError(
            f"grad_output must have w's shape {tuple(w.shape)}, got {tuple(grad_output.shape)}"
        )
    with torch.no_grad():
        f = _forward(x, bits, G, g, bt, symmetric)
        gx, gg, gb = _backward(f, grad_output.reshape(x.shape))
    return (
        gx.reshape(*lead, x.shape[1]),
        None if gg is None else gg.reshape(*lead, -1),
        None if gb is None else gb.reshape(*lead, -1),
    )


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@takes_tensors
def quantize_activation(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic per-token asymmetric fake quantization (see the reference); ``bits >= 16`` is
    the identity. Differentiable (STE, the token's range carries the scale's gradient)."""
    bits = _check_bits(bits, 2, 32)
    if bits >= 16:
        return x
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., features), got a scalar")
    if x.numel() == 0:
        return x.clone()
    if (
        on_triton_device(x)
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and not (torch.is_grad_enabled() and x.requires_grad)
    ):  # the kernel reads x as it is: no float32 copy first
        from lowbit.kernels import omniquant as kernels

        return kernels.quantize_activation(_rows(x), bits).reshape(x.shape)
    rows = _working(_rows(x), "x")
    return (
        LWCQuantize.apply(rows, None, None, bits, rows.shape[1], False).reshape(x.shape).to(x.dtype)
    )


@takes_tensors
def quantize_activation_grad(
    x: torch.Tensor, bits: int = 8, *, grad_output: torch.Tensor
) -> torch.Tensor:
    """The gradient of ``quantize_activation`` (see the reference)."""
    bits = _check_bits(bits, 2, 32)
    if bits >= 16:
        return grad_output.to(x.dtype)
    rows = _working(_rows(x), "x")
    with torch.no_grad():
        f = _forward(rows, bits, rows.shape[1], None, None, False)
        gx, _, _ = _backward(f, _rows(grad_output))
    return gx.reshape(x.shape)


# ---- LET (paper section 3.3) ------------------------------------------------------------------


class _Truncate(torch.autograd.Function):
    """|s| < 1e-2 -> ±1e-2 (0 -> +1e-2), gradient straight through (the official
    ``TruncateFunction``)."""

    @staticmethod
    def forward(ctx, s):  # type: ignore[override]
        floor = torch.full_like(s, SCALE_FLOOR)
        floor = torch.where(s < 0, -floor, floor)
        return torch.where(s.abs() < SCALE_FLOOR, floor, s)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


@takes_tensors
def truncate_scale(scale: torch.Tensor) -> torch.Tensor:
    """|s| < 1e-2 -> sign(s) · 1e-2, 0 -> +1e-2 (see the reference); straight-through gradient."""
    return _Truncate.apply(scale)


@takes_tensors
def smooth_scale(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant-style LET initialisation (see the reference), float64."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    x_max = act_absmax.to(torch.float64)
    w_max = weight.to(torch.float64).abs().amax(dim=0)
    s = x_max**alpha / w_max.clamp_min(1e-30) ** (1.0 - alpha)
    return s.clamp_min(CLIP_MIN)


@takes_tensors
def let_norm_linears(
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    biases,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
):
    """Norm -> linears LET (see the reference): ``(norm_weight', norm_bias', [W'], [b'])``."""
    s = truncate_scale(scale)
    if shift is None:
        beta_n = None if norm_bias is None else norm_bias / s
    else:
        beta_n = ((0.0 if norm_bias is None else norm_bias) - shift) / s
    new_w, new_b = [], []
    for w, b in zip(weights, biases):
        new_w.append(w * s[None, :])
        moved = None if shift is None else w @ shift
        new_b.append(moved if b is None else (b if moved is None else b + moved))
    return norm_weight / s, beta_n, new_w, new_b


def _per_query_channel(v: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if v.shape[-1] % num_kv_heads:
        raise ValueError(f"{v.shape[-1]} KV channels do not split into {num_kv_heads} heads")
    heads = v.reshape(num_kv_heads, -1)
    return heads.repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(-1)


@takes_tensors
def let_v_o(
    w_v: torch.Tensor,
    b_v: torch.Tensor | None,
    w_o: torch.Tensor,
    b_o: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
    *,
    num_heads: int = 1,
    num_kv_heads: int | None = None,
):
    """v -> o LET, grouped-query attention included (see the reference):
    ``(W_v', b_v', W_o', b_o')``."""
    kv = num_heads if num_kv_heads is None else num_kv_heads
    s = truncate_scale(scale)
    s_o = _per_query_channel(s, num_heads, kv)
    if shift is None:
        new_bv = None if b_v is None else b_v / s
        new_bo = b_o
    else:
        new_bv = ((0.0 if b_v is None else b_v) - shift) / s
        moved = w_o @ _per_query_channel(shift, num_heads, kv)
        new_bo = moved if b_o is None else b_o + moved
    return w_v / s[:, None], new_bv, w_o * s_o[None, :], new_bo


@takes_tensors
def rotary_scale(half_scale: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Per-KV-channel q/k scales from one scale per rotary pair (see the reference)."""
    half = half_scale.reshape(num_kv_heads, -1)
    return torch.cat([half, half], dim=1).reshape(-1)


@takes_tensors
def let_q_k(
    w_q: torch.Tensor,
    b_q: torch.Tensor | None,
    w_k: torch.Tensor,
    b_k: torch.Tensor | None,
    scale: torch.Tensor,
    *,
    num_heads: int = 1,
    num_kv_heads: int | None = None,
    rotary: bool = False,
):
    """Q/K LET (see the reference): ``(W_q', b_q', W_k', b_k')``."""
    kv = num_heads if num_kv_heads is None else num_kv_heads
    s = truncate_scale(scale)
    if rotary:
        heads = s.detach().reshape(kv, -1)
        d2 = heads.shape[1] // 2
        if heads.shape[1] % 2 or not torch.equal(heads[:, :d2], heads[:, d2:]):
            raise ValueError(
                "rotary=True needs one scale per rotary pair (i, i + d/2): build it with rotary_scale"
            )
    s_q = _per_query_channel(s, num_heads, kv)
    return (
        w_q / s_q[:, None],
        None if b_q is None else b_q / s_q,
        w_k * s[:, None],
        None if b_k is None else b_k * s,
    )


def _adam(params, loss_fn, steps: int, lr: dict, name: str, lwc_lr: float, let_lr: float):
    """The reference's ``_adam`` with autograd: the same moments, steps and errors."""
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v2 = {k: torch.zeros_like(v) for k, v in params.items()}
    losses = []
    for t in range(1, steps + 1):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = loss_fn(p)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ValueError(_diverged(name, f"the calibration loss is {value}", t, lwc_lr, let_lr))
        losses.append(value)
        loss.backward()
        with torch.no_grad():
            for k, param in p.items():
                g = param.grad
                assert g is not None  # every parameter enters the loss
                m[k] = 0.9 * m[k] + 0.1 * g
                v2[k] = 0.999 * v2[k] + 0.001 * g * g
                m_hat, v_hat = m[k] / (1 - 0.9**t), v2[k] / (1 - 0.999**t)
                step = lr[k.split("_")[0]]
                params[k] = param.detach() - step * m_hat / (v_hat.sqrt() + 1e-8)
                if not bool(torch.isfinite(params[k]).all()):
                    raise ValueError(
                        _diverged(name, f"the {k} parameters became non-finite", t, lwc_lr, let_lr)
                    )
    return losses


@takes_tensors
def calibrate_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    wbits: int = 4,
    abits: int = 16,
    group_size: int | None = None,
    symmetric: bool = False,
    lwc: bool = True,
    let: bool = True,
    let_shift: bool = False,
    alpha: float = 0.5,
    steps: int = 100,
    lwc_lr: float = 1e-2,
    let_lr: float = 5e-3,
    name: str = "linear",
) -> LinearCalibration:
    """OmniQuant on one linear layer (see the reference): the same initialisation and Adam
    steps, gradients from autograd through ``LWCQuantize``. float64; returns the reference's
    ``LinearCalibration`` holding torch tensors."""
    x, w = x.to(torch.float64), w.to(torch.float64)
    bias = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.to(torch.float64)
    y_fp = x @ w.T + bias
    n_groups = group_count(w.shape[1], group_size)
    params: dict[str, torch.Tensor] = {}
    if let:
        params["scale"] = smooth_scale(x.abs().amax(dim=0), w, alpha)
        if let_shift:
            params["shift"] = (x.amax(dim=0) + x.amin(dim=0)) / 2.0
    if lwc:
        params["gamma"] = torch.full(
            (w.shape[0], n_groups), LWC_INIT, dtype=torch.float64, device=x.device
        )
        params["beta"] = torch.full(
            (w.shape[0], n_groups), LWC_INIT, dtype=torch.float64, device=x.device
        )
    lr = {"scale": let_lr, "shift": let_lr, "gamma": lwc_lr, "beta": lwc_lr}

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        ones = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        s = truncate_scale(p["scale"]) if "scale" in p else ones
        delta = p.get("shift", torch.zeros_like(ones))
        xq = quantize_activation((x - delta) / s, abits)
        wq = quantize_weight(w * s, wbits, group_size, p.get("gamma"), p.get("beta"), symmetric)
        return ((xq @ wq.T + bias + w @ delta - y_fp) ** 2).mean()

    losses = _adam(params, loss_fn, steps, lr, name, lwc_lr, let_lr)
    return LinearCalibration(
        params.get("scale"), params.get("shift"), params.get("gamma"), params.get("beta"), losses
    )


@takes_tensors
def calibrate_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    wbits: int = 4,
    abits: int = 16,
    group_size: int | None = None,
    symmetric: bool = False,
    lwc: bool = True,
    let: bool = True,
    alpha: float = 0.5,
    steps: int = 100,
    lwc_lr: float = 1e-2,
    let_lr: float = 5e-3,
    name: str = "mlp",
) -> MLPCalibration:
    """OmniQuant on one LLaMA MLP sub-block (see the reference): the same initialisation and
    Adam steps, gradients from autograd. float64; returns the reference's ``MLPCalibration``
    holding torch tensors."""
    x = x.to(torch.float64)
    W = [w.to(torch.float64) for w in (w_gate, w_up, w_down)]
    y_fp = (torch.nn.functional.silu(x @ W[0].T) * (x @ W[1].T)) @ W[2].T
    params: dict[str, torch.Tensor] = {}
    if let:
        params["scale"] = smooth_scale(x.abs().amax(dim=0), W[1], alpha)
    if lwc:
        for key, w in zip(("gate", "up", "down"), W):
            shape = (w.shape[0], group_count(w.shape[1], group_size))
            params[f"gamma_{key}"] = torch.full(
                shape, LWC_INIT, dtype=torch.float64, device=x.device
            )
            params[f"beta_{key}"] = torch.full(
                shape, LWC_INIT, dtype=torch.float64, device=x.device
            )
    lr = {"scale": let_lr, "gamma": lwc_lr, "beta": lwc_lr}

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        s = (
            truncate_scale(p["scale"])
            if "scale" in p
            else torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        )

        def wq(key: str, w: torch.Tensor) -> torch.Tensor:
            gamma, beta = p.get(f"gamma_{key}"), p.get(f"beta_{key}")
            return quantize_weight(w, wbits, group_size, gamma, beta, symmetric)

        xq = quantize_activation(x / s, abits)
        h = torch.nn.functional.silu(xq @ wq("gate", W[0] * s).T) * (xq @ wq("up", W[1] * s).T)
        y = quantize_activation(h, abits) @ wq("down", W[2]).T
        return ((y - y_fp) ** 2).mean()

    return MLPCalibration(params, _adam(params, loss_fn, steps, lr, name, lwc_lr, let_lr))
