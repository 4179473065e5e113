"""Training with 4-bit integers (arXiv 2306.11987) as a module: ``Int4Linear``, and
``convert_for_training`` to swap it into a model (and, when asked, ``Int4Embedding`` after the
embedding tables).

``Int4Linear`` is a trainable drop-in for ``nn.Linear`` whose three matmuls run on INT4 codes:
the forward quantizes X H and W H with learned LSQ steps (the Hadamard quantizer), the backward
splits the output gradient into two INT4 matrices and, with ``sampling=True`` (the paper),
keeps about half of their rows by leverage-score sampling. The math, the official code's
choices and the tests are in ``lowbit.reference.int4_training``; this module is its
``torch.autograd.Function`` and the training bookkeeping:

* the float weight (the optimizer's master copy) and the bias are ``nn.Parameter``s, and so are
  the two LSQ steps ``step_x``, ``step_w`` (used as |step|, as the official code does);
* the first forward in training mode picks the Hadamard block (``hq_search``, unless ``block``
  was given) and initialises the steps (``lsq_init``). Under ``torch.distributed`` rank 0's
  block is broadcast and the steps are averaged over the ranks, so DDP replicas stay equal;
* every training forward draws a new seed for its backward from (``seed``, the call count,
  the rank): the sampled rows differ between steps and between ranks, and a run is
  reproducible from its seeds;
* a non-finite output gradient (an fp16 overflow) gives NaN gradients, so ``GradScaler``
  skips the step as it does for ``nn.Linear``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lowbit.fast import int4_training as _int4
from lowbit.fast.hadamard import block_hadamard
from lowbit.fast.nn import register_module
from lowbit.reference.hadamard import block_sizes
from lowbit.reference.int4_training import _CLIPS, _RESIDUALS, _ROUNDINGS, _check_choice, _levels

__all__ = ["Int4Linear", "Int4Embedding", "FP4TrainingLinear", "convert_for_training"]

_STEP_FLOOR = 1e-10  # |step| below this is raised to it: a step that crossed 0 stays usable


def _mix(*values: int) -> int:
    """One 63-bit seed from several non-negative ints (splitmix64 finaliser per value)."""
    h = 0
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h >> 1


def _poison(*tensors: torch.Tensor) -> torch.Tensor:
    """0 when every tensor is finite, NaN otherwise (a 0-d tensor: no device sync)."""
    finite = torch.ones((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        if t.numel():  # one pass: NaN propagates into min and max, +-Inf shows in them
            low, high = torch.aminmax(t)
            finite = finite & torch.isfinite(low) & torch.isfinite(high)
    return torch.where(finite, 0.0, math.nan)


class _Int4LinearFunction(torch.autograd.Function):
    """y = s_x s_w (q_x q_w^T) + b forward; bit splitting + LSS backward."""

    @staticmethod
    def forward(ctx, x, weight, step_x, step_w, bias, layer: Int4Linear, seed: int):
        rows = x.reshape(-1, x.shape[-1])
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        block, bits, rounding = layer._block, layer.bits, layer.rounding
        s_x = step_x.detach().abs().clamp_min(_STEP_FLOOR).to(work)
        s_w = step_w.detach().abs().clamp_min(_STEP_FLOOR).to(work)
        q_x, x_h = _int4._hq_codes(rows.detach().to(work), s_x, block, bits, rounding)  # X~
        q_w, w_h = _int4._hq_codes(weight.detach().to(work), s_w, block, bits, rounding)  # W~
        y = _int4._int_matmul(q_x, q_w.t()).to(work) * (s_x * s_w)
        # codes cannot hold NaN or Inf: a non-finite input or weight makes the output NaN (as
        # nn.Linear's would be) instead of vanishing into some code; no device sync
        y = y + _poison(rows, weight.detach())
        if bias is not None:
            y = y + bias.detach().to(work)
        ctx.save_for_backward(x_h, w_h, q_x, q_w, s_x, s_w, step_x.detach(), step_w.detach())
        ctx.options = (block, bits, layer.sampling, layer.clip, rounding)
        ctx.residual, ctx.seed = layer.residual, seed
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.shapes = (x.shape, x.dtype, weight.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x_h, w_h, q_x, q_w, s_x, s_w, step_x, step_w = ctx.saved_tensors
        block, bits, sampling, clip, rounding = ctx.options
        x_shape, x_dtype, w_dtype = ctx.shapes
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(x_h.dtype)
        # an Inf/NaN gradient poisons every output (as nn.Linear's would): GradScaler skips
        poison = _poison(g)
        g_clean = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        grad_x_h, grad_w_h, grad_s_x, grad_s_w = _int4._backward_parts(
            g_clean,
            x_h,
            w_h,
            s_x,
            s_w,
            bits,
            sampling,
            clip,
            ctx.seed,
            rounding,
            ctx.residual,
            codes=(q_x, q_w),
        )
        grad_x = (block_hadamard(grad_x_h, block) + poison).reshape(x_shape).to(x_dtype)
        grad_w = (block_hadamard(grad_w_h, block) + poison).to(w_dtype)
        # the forward used |step|: d|s|/ds = sign(s)
        grad_step_x = ((grad_s_x + poison) * torch.sign(step_x)).to(step_x.dtype)
        grad_step_w = ((grad_s_w + poison) * torch.sign(step_w)).to(step_w.dtype)
        grad_bias = None
        if ctx.bias_dtype is not None:
            grad_bias = (g.sum(dim=0) + poison).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_step_x, grad_step_w, grad_bias, None, None


@register_module
class Int4Linear(nn.Module):
    """A trainable linear layer computed in INT4: the Hadamard quantizer with LSQ forward,
    bit splitting with leverage-score sampling backward (Xi et al., NeurIPS 2023).

    Args:
        in_features: as ``nn.Linear``.
        out_features: as ``nn.Linear``.
        bias: as ``nn.Linear``.
        bits: code width of activations, weights and both gradient parts (4).
        block: the Hadamard block (a power of two dividing ``in_features``); ``None`` searches
            it on the first training batch as the official code does (``hq_search``).
        sampling: leverage-score sampling in the backward (the paper; ``False`` keeps every
            row, as the released CUDA kernels do).
        clip: ``"code"`` (the released kernels' ±6 clamp of the gradient parts) or ``"full"``.
        rounding: the forward codes' rounding, ``"half_away"`` (CUDA kernel) or ``"half_even"``.
        residual: ``"stochastic"`` (unbiased) or ``"nearest"`` rounding of the split residual.
        seed: the base of the per-step seeds of the backward's random numbers.
        max_block: the largest block the search tries (1024).

    Parameters: ``weight`` (out, in), ``bias`` (out,), ``step_x``, ``step_w`` (0-d). Buffers:
    ``block_size`` (0 until chosen), ``initialized`` (the steps were set from data). The
    training-step counter ``calls`` is saved with them (``_extra_state``).
    """

    block_size: torch.Tensor
    initialized: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 4,
        block: int | None = None,
        sampling: bool = True,
        clip: str = "code",
        rounding: str = "half_away",
        residual: str = "stochastic",
        seed: int = 0,
        max_block: int = 1024,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        _levels(bits)
        _check_choice(clip, "clip", _CLIPS)
        _check_choice(rounding, "rounding", _ROUNDINGS)
        _check_choice(residual, "residual", _RESIDUALS)
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"Int4Linear needs in_features, out_features >= 1, got {in_features}, {out_features}"
            )
        candidates = block_sizes(in_features, max_block)
        if block is not None and block not in candidates:
            raise ValueError(
                f"block={block} must be a power of two dividing in_features={in_features}: "
                f"one of {candidates}, or None to search"
            )
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.sampling, self.clip = int(bits), bool(sampling), clip
        self.rounding, self.residual, self.seed = rounding, residual, int(seed)
        self.max_block = int(max_block)
        self.calls = 0  # training forwards so far: part of each backward's seed
        self._ready = False  # the buffers below were read once (no device sync per forward)
        self._block = 0
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.step_x = nn.Parameter(torch.ones((), **factory))
        self.step_w = nn.Parameter(torch.ones((), **factory))
        self.register_buffer("block_size", torch.tensor(block or 0, device=device))
        self.register_buffer("initialized", torch.tensor(False, device=device))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    @property
    def block(self) -> int:
        """The Hadamard block in use (1 = no transform); 0 before the first training batch."""
        return int(self.block_size)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> Int4Linear:
        """An ``Int4Linear`` holding a copy of ``linear``'s weight and bias (``options`` as the
        constructor's); the steps (and the block, unless given) come from the first batch."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **options,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None and layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def _initialise(self, x: torch.Tensor) -> None:
        """Block search and LSQ init on the first batch (agreed across ranks under DDP)."""
        rows = x.detach().reshape(-1, self.in_features).float()
        w = self.weight.detach().float()
        if self.block == 0:
            block = _int4.hq_search(rows, w, self.bits, self.max_block)[0]
            self.block_size.fill_(_broadcast_int(block, self.block_size.device))
        s_x = _int4.lsq_init(block_hadamard(rows, self.block), self.bits)
        s_w = _int4.lsq_init(block_hadamard(w, self.block), self.bits)
        self.step_x.copy_(_mean_over_ranks(s_x))
        self.step_w.copy_(_mean_over_ranks(s_w))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(
                f"Int4Linear expects a floating-point tensor, got {getattr(x, 'dtype', type(x))}"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Int4Linear expects (..., {self.in_features}) inputs, got shape {tuple(x.shape)}"
            )
        if not self._ready:  # the first call (or the first after load_state_dict)
            if not bool(self.initialized):
                if not self.training:
                    raise ValueError(
                        "Int4Linear has no step sizes yet: run one batch in train() mode first "
                        "(the first training batch sets the Hadamard block and the LSQ steps)"
                    )
                self._initialise(x)
            self._block, self._ready = int(self.block_size), True
        seed = 0
        if self.training and torch.is_grad_enabled():
            seed = _mix(self.seed, self.calls, _rank())
            self.calls += 1
        return _Int4LinearFunction.apply(
            x, self.weight, self.step_x, self.step_w, self.bias, self, seed
        )

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False  # read the loaded block and flag on the next forward

    def get_extra_state(self) -> torch.Tensor:
        # the step counter travels with checkpoints, so a resumed run draws new seeds instead
        # of repeating those of its first steps (a tensor: safetensors holds nothing else)
        return torch.tensor(self.calls, dtype=torch.int64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.calls = int(state)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the forward computes with, back in the input basis: Q(W H) H^T, (out, in)."""
        block = self.block or 1
        w_h = block_hadamard(self.weight.detach().float(), block)
        s_w = self.step_w.detach().abs().clamp_min(_STEP_FLOOR).float()
        w_q = _int4.lsq_quantize(w_h, s_w, self.bits, rounding=self.rounding)
        return block_hadamard(w_q, block)

    def to_linear(self, quantized: bool = False) -> nn.Linear:
        """A plain ``nn.Linear`` with the trained float weight (the master copy), or with
        ``dequantized_weight()`` when ``quantized=True``."""
        w = self.dequantized_weight() if quantized else self.weight.detach()
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None and lin.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def lowbit_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": str(self.weight.dtype).removeprefix("torch."),
            "bits": self.bits,
            "block": self.block or None,
            "sampling": self.sampling,
            "clip": self.clip,
            "rounding": self.rounding,
            "residual": self.residual,
            "seed": self.seed,
            "max_block": self.max_block,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Int4Linear:
        options = dict(config)
        dtype = getattr(torch, options.pop("dtype", "float32"))
        return cls(
            options.pop("in_features"),
            options.pop("out_features"),
            options.pop("bias"),
            dtype=dtype,
            **options,
        )

    def extra_repr(self) -> str:
        block = self.block or "search"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, block={block}, "
            f"sampling={self.sampling}, clip={self.clip!r}"
        )


# ---- the 2026 comparison: FP4 training as current hardware does it (emulated) -------------------


def _mx_fp4(x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """MXFP4 fake quantization along the last axis (E2M1 elements, blocks of 32, E8M0 scales):
    round to nearest even, or stochastically with ``seed`` (then the block is first scaled by
    3/4 so that no element lies above the largest E2M1 value, 6, where rounding would clip:
    MX's scale puts the block's largest |x| in [4, 8) scale units, 3/4 of it in [3, 6). This is
    the unbiased variant of Tseng et al. 2025; the 3/4 is undone after the rounding)."""
    from lowbit.fast import formats

    if seed is None:
        return formats.quantize_mx(x, "e2m1", 32)
    _, scale_codes = formats.encode_mx(x, "e2m1", 32)  # the scale of the unshrunk block
    scale = torch.exp2(scale_codes.to(torch.float32) - 127)
    scale = torch.repeat_interleave(scale, 32, dim=-1)[..., : x.shape[-1]]
    q = formats.quantize(0.75 * x / scale, "e2m1", rounding="stochastic", seed=seed)
    return q * scale / 0.75


def _nv_fp4(x: torch.Tensor, seed: int | None = None, tiles: bool = False) -> torch.Tensor:
    """NVFP4 fake quantization (E2M1 elements, an E4M3 scale per 16 values along the last axis
    or per 16 x 16 tile, a float32 tensor scale): round to nearest even, or stochastically
    with ``seed``. Stochastic blocks take the next E4M3 scale up where the nearest one is
    below amax / 6, so that no element lies above 6 scale units, where rounding would clip:
    the unbiased variant (the recipe's round-to-nearest scale clips up to 1/16 above 6)."""
    from lowbit.fast import formats

    if seed is None:
        return formats.quantize_nvfp4(x, block_2d=tiles)
    _, scale_codes, g = formats.encode_nvfp4(x)  # 1 x 16 blocks along the last axis
    n = x.shape[-1]
    blocks = torch.nn.functional.pad(x.double(), (0, -n % 16)).reshape(*x.shape[:-1], -1, 16)
    need = g.double() * blocks.abs().amax(-1) / 6  # the exact scale that maps amax onto 6
    scale = formats.decode(scale_codes, "e4m3fn", dtype=torch.float64)
    bumped = formats.decode(torch.clamp(scale_codes + 1, max=126), "e4m3fn", dtype=torch.float64)
    scale = torch.where(scale < need, bumped, scale)
    unit = torch.repeat_interleave(scale / g.double(), 16, dim=-1)[..., :n]  # x per E2M1 unit
    unit = torch.where(unit > 0, unit, 1.0)  # an all-zero block: any unit, its codes are 0
    q = formats.quantize((x.double() / unit), "e2m1", rounding="stochastic", seed=seed)
    return (q * unit).float()


_FP4_QUANTIZERS = {"mxfp4": _mx_fp4, "nvfp4": _nv_fp4}


def _random_hadamard(n: int, block: int, seed: int, device) -> torch.Tensor:
    """blockdiag(D_i H_block), n = a multiple of ``block``: random signs D_i (seeded) times the
    orthonormal Hadamard matrix, so the product is orthogonal (Q Q^T = I)."""
    from lowbit.fast.hadamard import hadamard

    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n // block, block, 1), generator=gen).float() * 2 - 1
    blocks = signs * hadamard(block).float()  # (n / block, block, block)
    return torch.block_diag(*blocks).to(device)


class _FP4TrainingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seed: int, fmt: str):
        rows = x.reshape(-1, x.shape[-1]).float()
        w = weight.float()
        fp4 = _FP4_QUANTIZERS[fmt]
        # blocks along the reduction dim (in); NVFP4 weights in 16 x 16 tiles, so that the
        # dgrad's W^T is the same quantized matrix, transposed
        w_q = _nv_fp4(w, tiles=True) if fmt == "nvfp4" else fp4(w)
        y = fp4(rows) @ w_q.t()
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(rows, w, w_q)
        ctx.fmt = fmt
        ctx.seed, ctx.has_bias, ctx.shapes = (
            seed,
            bias is not None,
            (x.shape, x.dtype, weight.dtype),
        )
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        rows, w, w_q = ctx.saved_tensors
        x_shape, x_dtype, w_dtype = ctx.shapes
        fp4 = _FP4_QUANTIZERS[ctx.fmt]
        g = grad_y.reshape(-1, grad_y.shape[-1]).float()  # (tokens, out)
        # dgrad: reduction over out; the gradient rounded stochastically
        w_t = w_q.t() if ctx.fmt == "nvfp4" else fp4(w.t().contiguous())
        grad_x = fp4(g, ctx.seed) @ w_t.t()
        # wgrad: reduction over tokens, both operands rotated by a 16 x 16 random Hadamard
        tokens = g.shape[0]
        padded = -(-tokens // 16) * 16
        g_pad = torch.nn.functional.pad(g, (0, 0, 0, padded - tokens))
        x_pad = torch.nn.functional.pad(rows, (0, 0, 0, padded - tokens))
        q = _random_hadamard(padded, 16, ctx.seed + 1, g.device)  # (tokens, tokens), orthogonal
        g_rot = fp4((q.t() @ g_pad).t().contiguous(), ctx.seed + 2)  # (out, tokens)
        x_rot = fp4((q.t() @ x_pad).t().contiguous())  # (in, tokens)
        grad_w = g_rot @ x_rot.t()
        grad_b = g.sum(0) if ctx.has_bias else None
        return grad_x.reshape(x_shape).to(x_dtype), grad_w.to(w_dtype), grad_b, None, None


class FP4TrainingLinear(nn.Module):
    """A comparison recipe beyond the paper: FP4 training as 2025-26 hardware does it, emulated
    in float32 (FP4 fake quantization, not a 4-bit GEMM).

    ``fmt="mxfp4"``: X and W in MXFP4 (E2M1, blocks of 32 along the reduction dimension, E8M0
    scales), round to nearest; the output gradient rounded stochastically (after the 3/4
    shrink that keeps it unbiased). ``fmt="nvfp4"``: NVFP4 (blocks of 16 with E4M3 scales and a
    tensor scale; W in 16 x 16 tiles), the gradient rounded stochastically with its block scale
    rounded up where needed (unbiased). Both: the weight-gradient GEMM, whose reduction runs
    over tokens, rotates both operands by a 16 x 16 random Hadamard transform first (Tseng et
    al., "Training LLMs with MXFP4", 2025; NVIDIA's NVFP4 recipe). A new seed per training
    step, as ``Int4Linear``. Not registered for saving: it is an experiment.
    """

    def __init__(self, linear: nn.Linear, seed: int = 0, fmt: str = "mxfp4"):
        super().__init__()
        if fmt not in _FP4_QUANTIZERS:
            raise ValueError(f"fmt={fmt!r} is invalid: use 'mxfp4' or 'nvfp4'")
        self.fmt = fmt
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.seed, self.calls = int(seed), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = 0
        if self.training and torch.is_grad_enabled():
            seed = _mix(self.seed, self.calls, _rank()) % (1 << 62)
            self.calls += 1
        return _FP4TrainingFunction.apply(x, self.weight, self.bias, seed, self.fmt)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None and lin.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.to(self.weight.device)


# ---- embedding outputs (asked for: the paper's BERT recipe quantizes them too) ------------------


class _Int4EmbeddingOutputFunction(torch.autograd.Function):
    """e^ = Q(e H) H^T: the embedding output through the Hadamard quantizer; LSQ gradients."""

    @staticmethod
    def forward(ctx, e, step, block: int, bits: int, rounding: str):
        Qn, Qp = _levels(bits)
        work = torch.float64 if e.dtype == torch.float64 else torch.float32
        s = step.detach().abs().clamp_min(_STEP_FLOOR).to(work)
        e_h = block_hadamard(e.detach().to(work), block)
        codes = _int4._encode(e_h, s, Qn, Qp, rounding)
        out = block_hadamard(codes.to(work) * s, block) + _poison(e)
        ctx.save_for_backward(e_h / s, step.detach())
        ctx.options = (block, bits, rounding, e.dtype)
        return out.to(e.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        v, step = ctx.saved_tensors
        block, bits, rounding, dtype = ctx.options
        Qn, Qp = _levels(bits)
        g_h = block_hadamard(grad_out.to(v.dtype), block)
        grad_e_h, grad_s = _int4._lsq_grad(v, g_h, Qn, Qp, rounding)
        grad_step = (grad_s * torch.sign(step)).to(step.dtype)
        return block_hadamard(grad_e_h, block).to(dtype), grad_step, None, None, None


def _table_options(e: nn.Embedding) -> dict[str, Any]:
    """nn.Embedding's constructor arguments for a copy of ``e`` that uses e's table tensor."""
    names = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type")
    options = {name: getattr(e, name) for name in (*names, "scale_grad_by_freq", "sparse")}
    return {**options, "_weight": e.weight.detach()}


class Int4Embedding(nn.Embedding):
    """An ``nn.Embedding`` whose output goes through the Hadamard quantizer with a learned LSQ
    step, as the official BERT recipe's ``QIdentity`` after the word, position and token-type
    embeddings (``convert_for_training(..., embeddings=True)``).

    The first training batch picks the Hadamard block (the smallest reconstruction error of
    the output, the activation half of ``hq_search``'s score) and initialises ``step``
    (``lsq_init``), agreed across ranks like ``Int4Linear``'s. The gradient reaching the table
    is LSQ's straight-through one, in full precision: the official code also rounds it to 4 bits
    stochastically, but no matmul consumes it (the table's gradient is a scatter-add), so there
    is no INT4 product to emulate. The weight is the wrapped embedding's own ``Parameter``, so
    an output head tied to it stays tied. Not registered for saving: swap back with
    ``restore_linears`` (``to_linear`` returns the plain ``nn.Embedding``).
    """

    block_size: torch.Tensor
    initialized: torch.Tensor

    def __init__(
        self,
        embedding: nn.Embedding,
        *,
        bits: int = 4,
        block: int | None = None,
        rounding: str = "half_away",
        max_block: int = 1024,
    ):
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"Int4Embedding wraps an nn.Embedding, got {type(embedding).__name__}")
        dim = embedding.embedding_dim
        candidates = block_sizes(dim, max_block)
        if block is not None and block not in candidates:
            raise ValueError(
                f"block={block} must be a power of two dividing embedding_dim={dim}: "
                f"one of {candidates}, or None to search"
            )
        _levels(bits)
        _check_choice(rounding, "rounding", _ROUNDINGS)
        super().__init__(**_table_options(embedding))
        self.weight = embedding.weight  # the same Parameter, so ties survive
        self.bits, self.rounding, self.max_block = int(bits), rounding, int(max_block)
        device = embedding.weight.device
        self.step = nn.Parameter(torch.ones((), device=device, dtype=embedding.weight.dtype))
        self.register_buffer("block_size", torch.tensor(block or 0, device=device))
        self.register_buffer("initialized", torch.tensor(False, device=device))
        self._ready, self._block = False, 0

    @property
    def block(self) -> int:
        """The Hadamard block in use; 0 before the first training batch."""
        return int(self.block_size)

    @torch.no_grad()
    def _initialise(self, e: torch.Tensor) -> None:
        rows = e.detach().reshape(-1, self.embedding_dim).float()
        if self.block == 0:
            blocks = block_sizes(self.embedding_dim, self.max_block)
            errors = torch.stack([_int4._hq_error(rows, g, self.bits) for g in blocks])
            best = blocks[int(torch.argmin(errors.cpu()))]  # the first of tied minima
            self.block_size.fill_(_broadcast_int(best, self.block_size.device))
        step = _int4.lsq_init(block_hadamard(rows, self.block), self.bits)
        self.step.copy_(_mean_over_ranks(step))
        self.initialized.fill_(True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = super().forward(ids)
        if not self._ready:
            if not bool(self.initialized):
                if not self.training:
                    raise ValueError(
                        "Int4Embedding has no step size yet: run one batch in train() mode first"
                    )
                self._initialise(e)
            self._block, self._ready = int(self.block_size), True
        return _Int4EmbeddingOutputFunction.apply(
            e, self.step, self._block, self.bits, self.rounding
        )

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False

    def to_linear(self) -> nn.Embedding:
        """The plain ``nn.Embedding`` again, holding the trained table (the same Parameter)."""
        plain = nn.Embedding(**_table_options(self))
        plain.weight = self.weight  # nn.Embedding would wrap a new Parameter around _weight
        return plain

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, block={self.block or 'search'}"


# ---- torch.distributed helpers (no-ops on one process) -------------------------------------------


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _broadcast_int(value: int, device) -> int:
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.broadcast(t, src=0)
    return int(t)


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return value
    t = value.detach().clone().reshape(1)
    torch.distributed.all_reduce(t)
    return (t / torch.distributed.get_world_size()).reshape(())


# ---- swapping the layers of a model -------------------------------------------------------------


def convert_for_training(
    model: nn.Module,
    *,
    layers: Callable[[str, nn.Linear], bool] | Iterable[str] | None = None,
    skip: tuple[str, ...] = ("lm_head", "classifier", "score", "qa_outputs"),
    progress: bool = True,
    recipe: str = "int4",
    embeddings: bool = False,
    **options: Any,
) -> nn.Module:
    """Swap ``Int4Linear`` in for the linears of ``model`` (in place) and return it.

    Args:
        model: any model with ``nn.Linear`` layers (BERT and LLaMA families from transformers
            included).
        layers: which linears to convert: a predicate ``(name, linear) -> bool``, or names (a
            linear is converted when its name ends with one of them, e.g. ``["q_proj",
            "v_proj"]``); ``None`` converts every linear not in ``skip``.
        skip: names kept in full precision (the heads, as in the paper's recipe).
        progress: a progress bar over the layers.
        recipe: ``"int4"`` (``Int4Linear``, the paper), or ``"mxfp4"`` / ``"nvfp4"``
            (``FP4TrainingLinear``, the FP4 recipes of current hardware, emulated: a
            comparison).
        embeddings: also quantize the output of every ``nn.Embedding`` (``Int4Embedding``:
            word, position and token-type tables, as the official BERT recipe does); by default
            the embeddings stay in full precision. Only with ``recipe="int4"``.
        **options: ``Int4Linear``'s options (``bits``, ``sampling``, ``clip``, ``block``, ...);
            only ``seed`` for the FP4 recipes. ``bits``, ``rounding`` and ``max_block`` apply to
            the embeddings too.

    Swap back with ``lowbit.fast.convert.restore_linears(model)`` (the trained float weights
    and tables).
    """
    from lowbit.fast.convert import replace_linears

    if layers is None:
        chosen: Callable[[str, nn.Linear], bool] = lambda name, linear: True  # noqa: E731
    elif callable(layers):
        chosen = layers
    else:
        suffixes = tuple(layers)
        chosen = lambda name, linear: name.endswith(suffixes)  # noqa: E731
    if recipe not in ("int4", *_FP4_QUANTIZERS):
        raise ValueError(
            f"recipe={recipe!r} is invalid: use 'int4' (the paper), 'mxfp4' or 'nvfp4'"
        )
    if recipe != "int4":
        unknown = sorted(set(options) - {"seed"})
        if unknown:
            raise ValueError(f"recipe={recipe!r} takes only seed=, got {', '.join(unknown)}")
    else:
        Int4Linear(1024, 1, **options)  # check the options once, before any layer is touched

    if embeddings and recipe != "int4":
        raise ValueError("embeddings=True quantizes with the paper's recipe: use recipe='int4'")

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        if not chosen(name, linear):
            return None
        if recipe != "int4":
            return FP4TrainingLinear(linear, fmt=recipe, **options)
        return Int4Linear.from_linear(linear, **options)

    replace_linears(model, make, skip=skip, progress=progress)
    if embeddings:
        from lowbit.fast.convert import _set_submodule, _skipped

        shared = {k: options[k] for k in ("bits", "rounding", "max_block") if k in options}
        tables = [
            (name, mod)
            for name, mod in model.named_modules()
            if type(mod) is nn.Embedding and not _skipped(name, skip)
        ]
        for name, table in tables:
            _set_submodule(model, name, Int4Embedding(table, **shared))
    return model
