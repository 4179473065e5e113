"""OmniQuant (Shao et al., ICLR 2024, arXiv 2308.13137) on real models: ``OmniQuantLinear``,
the block-wise ``calibrate`` and the attention-input quantizer.

* ``OmniQuantLinear``: packed integer weights (``bits`` per code as a little-endian bit stream
  per row, ``lowbit.fast.formats.pack``: 4-bit two per byte, 3-bit eight codes in three bytes),
  a float32 scale and an integer zero point per row or group, and dynamic per-token activation
  quantization at ``act_bits`` (16 = off). Its weight is bit for bit the LWC fake-quantized
  weight the calibration trained with. On CUDA a 4-bit weight-only layer runs the Triton
  W4A16 dequantize-GEMM (``lowbit.kernels.omniquant``; float32 sums, tier B against float64);
  elsewhere it computes ``linear(x, x̂)`` in float32, exactly the calibration's forward.
* ``calibrate(model, batches, ...)``: paper section 3.1 (Algorithm 1), the official
  ``omniquant()`` loop: block by block, LWC and LET parameters trained with AdamW on the MSE
  between the full-precision block's output (on the full-precision chain) and the quantized
  block's output (on the already-quantized chain), then LET folded into the weights, the weights
  packed, and the quantized chain pushed through the finished block. One block's activations
  and training state are in memory at a time.
* ``quantize_attention_inputs(model, bits)``: Q and K (after RoPE) and V quantized per token and
  head at ``bits`` inside attention, as the official ``QuantMatMul`` does for weight-activation
  runs; softmax outputs stay in full precision.

Which LET transformations are applied (only exact equivalences, proven in float64 by
tests/test_omniquant.py and, inside the real blocks, tests/test_omniquant_model.py):

* LLaMA family (pre-RMSNorm): norm -> q/k/v and norm -> gate/up (scales only: RMSNorm has no
  bias to absorb a shift, and the official code trains no LLaMA shifts), v -> o with
  grouped-query attention (one scale per KV channel, repeated for the query heads that share
  it; the official code fails on GQA), q/k with one scale per rotary pair so that RoPE commutes
  with it (the official code does not enforce it).
* BERT family (post-LayerNorm): v -> o (scale, and a shift when activations are quantized) and
  q/k. The norm -> linear LET is not an equivalence here: the LayerNorm's output is also the
  residual stream, so dividing it by s would change the residual.
* down_proj / the BERT output dense: no LET (as in the official code).

Deviations from the official code, each on purpose: calibration and the merge run in float32
(no fp16 AMP, no ``half()`` before the merge: the packed weight is exactly the trained one); the
LET shift is initialised with (max + min) / 2 over all calibration tokens instead of an EMA
dominated by the first sample; padding tokens are left out of the loss.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from lowbit.fast import formats
from lowbit.fast import models as real_models
from lowbit.fast import omniquant as oq
from lowbit.fast.nn import QuantizedLinear, register_module
from lowbit.reference.omniquant import _check_bits, _check_group_size, _diverged

__all__ = ["OmniQuantLinear", "BlockReport", "CalibrationReport", "calibrate"]
__all__ += ["quantize_attention_inputs", "LLAMA_FAMILY", "BERT_FAMILY"]


@register_module
class OmniQuantLinear(QuantizedLinear):
    """OmniQuant linear layer: packed ``bits``-wide weight codes with a scale and a zero point
    per row (``group_size=None``) or per group of ``group_size`` inputs, and dynamic per-token
    asymmetric activation quantization at ``act_bits`` (``act_bits=16``: weight-only).

    The weight is x̂ = (q - z) · s (``lowbit.fast.omniquant.decode_weight``), which is bit for
    bit what ``quantize_weight`` returned while calibrating, so the module computes exactly the
    calibration's fake-quantized forward. The weights are frozen; gradients flow to the input.

    Buffers: ``weight_packed`` uint8 (out, bytes per row) holding each row as a bit stream
    (``lowbit.fast.formats.pack``), ``weight_scale`` float32 (out, groups), ``weight_zero``
    int16 (out, groups) (the zero point is not clamped to the code range, as in the official
    quantizer), ``bias`` (out,) in the original dtype (if any).
    """

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int | None = None,
        act_bits: int = 16,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__(in_features, out_features, bias, weight_dtype, device)
        self.bits = _check_bits(bits, 2, 8)
        self.act_bits = _check_bits(act_bits, 2, 16)
        _check_group_size(group_size, in_features)
        self.group_size = None if group_size is None else int(group_size)
        groups = oq.group_count(in_features, group_size)
        per_group, group_bytes = formats._group(self.bits)  # formats.pack: whole groups of codes
        row_bytes = -(-in_features // per_group) * group_bytes
        self.register_buffer(
            "weight_packed",
            torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "weight_scale", torch.zeros(out_features, groups, dtype=torch.float32, device=device)
        )
        self.register_buffer(
            "weight_zero", torch.zeros(out_features, groups, dtype=torch.int16, device=device)
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int | None = None,
        act_bits: int = 16,
        gamma: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
        symmetric: bool = False,
    ) -> OmniQuantLinear:
        """Quantize a trained ``nn.Linear`` with the LWC quantizer: ``gamma`` / ``beta`` are the
        learned clipping logits of shape (out, groups) (None: plain min-max, i.e. RTN)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_weight(
            linear.weight.detach(),
            None if linear.bias is None else linear.bias.detach(),
            bits=bits,
            group_size=group_size,
            act_bits=act_bits,
            gamma=gamma,
            beta=beta,
            symmetric=symmetric,
        )

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        bits: int = 4,
        group_size: int | None = None,
        act_bits: int = 16,
        gamma: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
        symmetric: bool = False,
        weight_dtype: torch.dtype | None = None,
    ) -> OmniQuantLinear:
        """``from_linear`` on a bare weight (out, in) and bias: what ``calibrate`` uses after
        folding LET into the weights."""
        mod = cls(
            weight.shape[1],
            weight.shape[0],
            bias=bias is not None,
            bits=bits,
            group_size=group_size,
            act_bits=act_bits,
            weight_dtype=weight.dtype if weight_dtype is None else weight_dtype,
            device=weight.device,
        )
        w = weight.detach().float()
        with torch.no_grad():
            codes, scale, zero = oq.encode_weight(
                w,
                mod.bits,
                group_size,
                None if gamma is None else gamma.detach().float(),
                None if beta is None else beta.detach().float(),
                symmetric,
            )
            mod.weight_packed.copy_(formats.pack(codes, mod.bits))
            mod.weight_scale.copy_(scale)
            mod.weight_zero.copy_(zero.to(torch.int16))  # |z| <= 1e4 (the official clamp)
            if bias is not None:
                assert mod.bias is not None
                mod.bias.copy_(bias.detach())
        return mod

    def _apply(self, fn, recurse=True):
        # model.half() / .to(bfloat16) would round the float32 scales: they stay float32 (and
        # the zero points and codes stay integers); only the device follows.
        scale = self.weight_scale
        out = super()._apply(fn, recurse)
        self.weight_scale = scale.to(self.weight_packed.device)
        return out

    def codes(self) -> torch.Tensor:
        """The (out, in) weight codes, unpacked (uint8)."""
        return formats.unpack(self.weight_packed, self.bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """x̂ = (q - z) · s per row or group (float32)."""
        return oq.decode_weight(
            self.codes(), self.weight_scale, self.weight_zero.to(torch.int32), self.group_size
        )

    def _triton_ok(self, X: torch.Tensor) -> bool:
        """Whether the Triton W4A16 kernel computes this forward: CUDA, 4-bit weight-only, a
        16-bit input, and groups the kernel can step through (whole groups per row, a multiple
        of 16 long)."""
        from lowbit.kernels import on_triton_device

        if not (self.bits == 4 and self.act_bits >= 16 and on_triton_device(X) and X.shape[0]):
            return False
        G = self.group_size or self.in_features
        return (
            X.dtype in (torch.float16, torch.bfloat16)  # float32: the torch path (cuBLAS)
            and self.in_features % G == 0
            and G % 16 == 0
            and not (torch.is_grad_enabled() and X.requires_grad)  # the kernel has no backward
        )

    def lowbit_config(self) -> dict[str, Any]:
        """JSON-serialisable shapes and options: ``in_features``, ``out_features``, ``bias``,
        ``weight_dtype``, ``bits``, ``group_size`` and ``act_bits`` (``from_config`` takes this
        dict back)."""
        return {
            **self._base_config(),
            "bits": self.bits,
            "group_size": self.group_size,
            "act_bits": self.act_bits,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OmniQuantLinear:
        """An empty module of the shape and options in ``config`` (a ``lowbit_config()``): its
        buffers are zeros until ``load_state_dict`` fills them (``load_quantized`` does)."""
        group = config.get("group_size")
        return cls(
            **cls._base_args(config),
            bits=int(config["bits"]),
            group_size=None if group is None else int(group),
            act_bits=int(config.get("act_bits", 16)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) in x's dtype (see the class docstring)."""
        X = self._rows(x)
        if self._triton_ok(X):
            from lowbit.kernels import omniquant as kernels

            Y = kernels.w4a16_linear(
                X, self.weight_packed, self.weight_scale, self.weight_zero, self.bias,
                group_size=self.group_size or self.in_features,
            )  # fmt: skip
            return Y.reshape(*x.shape[:-1], self.out_features)
        # float64 inputs are computed in float64, everything else in float32
        work = torch.float64 if X.dtype == torch.float64 else torch.float32
        Xq = oq.quantize_activation(X.to(work), self.act_bits) if X.shape[0] else X.to(work)
        Y = nn.functional.linear(
            Xq,
            # dequantized per call, not cached: a float32 copy per layer would undo the packing
            self.dequantized_weight().to(work),
            None if self.bias is None else self.bias.to(work),
        )
        return Y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
            f"act_bits={self.act_bits}"
        )


# ---- attention inputs (Q, K after RoPE, V) ------------------------------------------------------

_ATTENTION_PREFIX = "lowbit_omniquant_"


def _attention_modules(model: nn.Module) -> list[Any]:
    """The self-attention modules: those holding q/k/v projections (LLaMA q_proj..., BERT query...)."""
    found = []
    for module in model.modules():
        names = set(dict(module.named_children()))
        if {"q_proj", "k_proj", "v_proj"} <= names or {"query", "key", "value"} <= names:
            found.append(module)
    return found


def _register_attention(inner: str) -> str:
    """Register (once) an attention implementation that quantizes Q, K, V per token and head
    at the module's ``lowbit_qkv_bits``, then runs ``inner`` ("sdpa", "eager", ...)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _ATTENTION_PREFIX + inner
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def attention(module, query, key, value, attention_mask, **kwargs):
        bits = getattr(module, "lowbit_qkv_bits", 16)
        query, key, value = (oq.quantize_activation(t, bits) for t in (query, key, value))
        if inner in ALL_ATTENTION_FUNCTIONS:
            run = ALL_ATTENTION_FUNCTIONS[inner]
        else:  # "eager": the modeling file's own function
            run = sys.modules[type(module).__module__].eager_attention_forward
        return run(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    mask_kind = inner if inner in ALL_MASK_ATTENTION_FUNCTIONS else "eager"
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_kind])
    return name


def quantize_attention_inputs(model: nn.Module, bits: int) -> nn.Module:
    """Quantize the attention matmuls' inputs: Q and K (after RoPE) and V, per token and head,
    asymmetric at ``bits`` (the official ``QuantMatMul``; ``bits=16`` turns it off again).

    It registers a Hugging Face attention implementation that wraps the model's current one
    and switches the model to it (``model.set_attn_implementation``). This is a run-time
    setting: a model loaded with ``lowbit.fast.convert.load_quantized`` needs this call again.

    Returns:
        ``model``, changed in place.

    Raises:
        ValueError: ``model`` is not a Hugging Face model or has no self-attention modules.
    """
    bits = _check_bits(bits, 2, 16)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ValueError(
            f"quantize_attention_inputs needs a Hugging Face PreTrainedModel, got {type(model).__name__}"
        )
    hf_model: Any = model
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no q/k/v self-attention modules")
    current = config._attn_implementation or "eager"
    inner = current.removeprefix(_ATTENTION_PREFIX)
    for module in modules:
        module.lowbit_qkv_bits = bits
    hf_model.set_attn_implementation(inner if bits >= 16 else _register_attention(inner))
    return model


# ---- block-wise calibration -----------------------------------------------------------------


@dataclass
class BlockReport:
    """One block's calibration: its architecture ("bert" or "llama"), the mean step loss of
    each epoch, the seconds it took, and the learned parameters: ``let`` (LET scales and
    shifts by name: ``qkv_scale``, ``fc1_scale``, ``out_scale``, ``out_shift``, ``qk_half``
    (one q/k scale per rotary pair) or ``qk_scale``) and ``lwc`` (``(gamma, beta)`` logits by
    linear: q, k, v, o, gate, up, down)."""

    index: int
    kind: str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    let: dict[str, torch.Tensor] = field(default_factory=dict)
    lwc: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass
class CalibrationReport:
    """What ``calibrate`` did: one ``BlockReport`` per block and the settings used."""

    blocks: list[BlockReport]
    settings: dict[str, Any]
    seconds: float = 0.0


# The model types whose blocks calibrate knows (the LET algebra is exact for them): LLaMA-style
# pre-RMSNorm decoders with plain x * w norms and full rotary embeddings, and BERT-style encoders.
# Qwen3 (q/k norms), Gemma (x * (1 + w) norms, sandwich norms) and partial-rotary models are not.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
BERT_FAMILY = ("bert", "roberta")


def _check_architecture(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY + BERT_FAMILY:
        raise ValueError(
            f"calibrate supports the model types {', '.join(LLAMA_FAMILY + BERT_FAMILY)}, got {model_type!r}: "
            "its LET would not be an exact equivalence"
        )
    kinds = set(getattr(config, "layer_types", None) or ())
    if len(kinds) > 1:
        raise ValueError(
            f"calibrate needs one kind of attention layer, {model_type} mixes {', '.join(sorted(kinds))}"
        )


class _Plan:
    """One block's learnable parameters and how they make the block's quantized weights.

    ``overrides()`` returns the parameters to substitute into the block (LET applied, then every
    linear's weight fake-quantized with LWC), differentiably; ``finish()`` writes them into the
    block for good (norms changed in place, linears replaced by ``OmniQuantLinear``).
    """

    def __init__(self, block: nn.Module, config: Any, opts: dict[str, Any]):
        self.block, self.opts = block, opts
        heads = int(config.num_attention_heads)
        self.heads = heads
        self.kv = int(getattr(config, "num_key_value_heads", None) or heads)
        if hasattr(block, "self_attn") and hasattr(block, "mlp"):
            self.kind = "llama"
            self.names = {
                "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj",
            }  # fmt: skip
        elif hasattr(block, "attention") and hasattr(block, "intermediate"):
            self.kind = "bert"
            self.names = {
                "q": "attention.self.query", "k": "attention.self.key",
                "v": "attention.self.value", "o": "attention.output.dense",
                "up": "intermediate.dense", "down": "output.dense",
            }  # fmt: skip
        else:
            raise ValueError(
                f"calibrate supports BERT- and LLaMA-family blocks, got {type(block).__name__}"
            )
        self.linears: dict[str, nn.Linear] = {}
        for key, path in self.names.items():
            lin = block.get_submodule(path)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"{path} of {type(block).__name__} is not an nn.Linear")
            bad = int((~torch.isfinite(lin.weight.detach())).sum())
            if bad:
                raise ValueError(
                    f"calibrate: {path}.weight of this {type(block).__name__} has {bad} non-finite values; fix the checkpoint first"
                )
            self.linears[key] = lin
        self.let: dict[str, torch.Tensor] = {}
        self.lwc: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def init(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Create LWC logits (4.0) and the SmoothQuant-style LET scales from the input
        statistics ``stats[key] = (per-channel max, per-channel min)`` of each linear."""
        o = self.opts
        for key, lin in self.linears.items():
            if o["lwc"]:
                shape = (lin.out_features, oq.group_count(lin.in_features, o["group_size"]))
                self.lwc[key] = (
                    torch.full(shape, oq.LWC_INIT, device=lin.weight.device, requires_grad=True),
                    torch.full(shape, oq.LWC_INIT, device=lin.weight.device, requires_grad=True),
                )
        if not o["let"]:
            return

        def absmax(key: str) -> torch.Tensor:
            hi, lo = stats[key]
            return torch.maximum(hi.abs(), lo.abs())

        def scale(act: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            s = oq.smooth_scale(act, weight.detach(), o["alpha"]).float()
            return s.requires_grad_(True)

        W = {k: lin.weight for k, lin in self.linears.items()}
        # v -> o: one scale per KV channel, from the o inputs and columns it multiplies
        group = self.heads // self.kv
        hd = W["o"].shape[1] // self.heads
        act_o = absmax("o").reshape(self.kv, group, hd).amax(1).reshape(-1)
        w_o = (
            W["o"].detach().abs().reshape(-1, self.kv, group, hd).amax(2).reshape(-1, self.kv * hd)
        )
        self.let["out_scale"] = scale(act_o, w_o)
        if self.kind == "llama":
            self.let["qkv_scale"] = scale(absmax("q"), W["q"])
            self.let["fc1_scale"] = scale(absmax("up"), W["up"])
            self.let["qk_half"] = torch.ones(
                self.kv, hd // 2, device=W["q"].device, requires_grad=True
            )
        else:
            self.let["qk_scale"] = torch.ones(
                W["q"].shape[0], device=W["q"].device, requires_grad=True
            )
            if o["abits"] < 16:  # a shift helps only quantized activations (official OPT)
                hi, lo = stats["o"]
                mid = ((hi + lo) / 2).reshape(self.kv, group, hd)[:, 0].reshape(-1)
                self.let["out_shift"] = mid.clone().requires_grad_(True)

    def parameters(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return list(self.let.values()), [t for pair in self.lwc.values() for t in pair]

    def transformed(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
        """LET applied: (norm overrides, {key: weight}, {key: bias}), before quantization."""
        W: dict[str, Any] = {k: lin.weight for k, lin in self.linears.items()}
        B: dict[str, Any] = {k: lin.bias for k, lin in self.linears.items()}
        norms: dict[str, torch.Tensor] = {}
        p = self.let
        if not p:
            return norms, W, B
        if self.kind == "llama":
            for norm, scale, keys in (
                ("input_layernorm", "qkv_scale", ("q", "k", "v")),
                ("post_attention_layernorm", "fc1_scale", ("gate", "up")),
            ):
                weight = cast(torch.Tensor, self.block.get_submodule(norm).weight)
                nw, _, ws, bs = oq.let_norm_linears(
                    weight, None, [W[k] for k in keys], [B[k] for k in keys], p[scale]
                )
                norms[f"{norm}.weight"] = nw
                W.update(zip(keys, ws))
                B.update(zip(keys, bs))
            qk, rotary = oq.rotary_scale(p["qk_half"], self.kv), True
        else:
            qk, rotary = p["qk_scale"], False
        W["v"], B["v"], W["o"], B["o"] = oq.let_v_o(
            W["v"], B["v"], W["o"], B["o"], p["out_scale"], p.get("out_shift"),
            num_heads=self.heads, num_kv_heads=self.kv,
        )  # fmt: skip
        W["q"], B["q"], W["k"], B["k"] = oq.let_q_k(
            W["q"], B["q"], W["k"], B["k"], qk,
            num_heads=self.heads, num_kv_heads=self.kv, rotary=rotary,
        )  # fmt: skip
        return norms, W, B

    def _quantize(self, key: str, w: torch.Tensor) -> torch.Tensor:
        o = self.opts
        gamma, beta = self.lwc.get(key, (None, None))
        return oq.quantize_weight(w, o["wbits"], o["group_size"], gamma, beta, o["symmetric"])

    def overrides(self) -> dict[str, torch.Tensor]:
        """The block's parameters as the quantized block sees them (differentiable)."""
        norms, W, B = self.transformed()
        out = dict(norms)
        for key, path in self.names.items():
            out[f"{path}.weight"] = self._quantize(key, W[key])
            if B[key] is not None:
                out[f"{path}.bias"] = B[key]
        return out

    @torch.no_grad()
    def finish(self) -> None:
        """Fold LET into the block and replace its linears by packed ``OmniQuantLinear``s."""
        norms, W, B = self.transformed()
        for name, value in norms.items():
            self.block.get_parameter(name).copy_(value)
        o = self.opts
        for key, path in self.names.items():
            gamma, beta = self.lwc.get(key, (None, None))
            module = OmniQuantLinear.from_weight(
                W[key].detach(), None if B[key] is None else B[key].detach(),
                bits=o["wbits"], group_size=o["group_size"], act_bits=o["abits"],
                gamma=gamma, beta=beta, symmetric=o["symmetric"],
                weight_dtype=self.linears[key].weight.dtype,
            )  # fmt: skip
            parent, _, child = path.rpartition(".")
            setattr(self.block.get_submodule(parent), child, module)


def _masked_mse(y: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the real tokens (all tokens without a mask)."""
    if mask is None:
        return ((y - target) ** 2).mean()
    m = mask.to(y.dtype)[..., None]
    count = m.sum() * y.shape[-1]
    return (((y - target) ** 2) * m).sum() / count.clamp_min(1.0)


@contextlib.contextmanager
def _activation_quant(linears: Iterable[nn.Linear], bits: int):
    """Per-token quantization of every linear's input (pre-hooks) while calibrating."""
    handles = []
    if bits < 16:
        for lin in linears:
            handles.append(
                lin.register_forward_pre_hook(lambda _m, a: (oq.quantize_activation(a[0], bits),))
            )
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _input_stats(linears: Mapping[str, nn.Linear], stats: dict[str, Any], masks: list):
    """Record each linear's per-input-channel max and min over the real tokens."""
    state = {"j": 0}

    def hook(key: str):
        def record(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            mask = masks[state["j"]]
            x = x[mask.bool()] if mask is not None and x.shape[:-1] == mask.shape else x
            x = x.reshape(-1, x.shape[-1]).float()
            if x.shape[0] == 0:
                return
            hi, lo = x.amax(0), x.amin(0)
            if key in stats:
                hi, lo = torch.maximum(stats[key][0], hi), torch.minimum(stats[key][1], lo)
            stats[key] = (hi, lo)

        return record

    handles = [lin.register_forward_pre_hook(hook(k)) for k, lin in linears.items()]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


def _settings(**opts: Any) -> dict[str, Any]:
    opts["wbits"] = _check_bits(opts["wbits"], 2, 8)
    opts["abits"] = _check_bits(opts["abits"], 2, 16)
    if opts["group_size"] is not None:
        _check_group_size(opts["group_size"], 1)
    for name in ("lwc", "let", "symmetric", "aug_loss"):
        if not isinstance(opts[name], bool):
            raise TypeError(f"{name} must be True or False, got {opts[name]!r}")
    if not 0.0 <= float(opts["alpha"]) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {opts['alpha']}")
    if (
        isinstance(opts["epochs"], bool)
        or not isinstance(opts["epochs"], int)
        or opts["epochs"] < 0
    ):
        raise ValueError(f"epochs must be an int >= 0, got {opts['epochs']!r}")
    for name in ("lwc_lr", "let_lr"):
        if not (math.isfinite(opts[name]) and opts[name] > 0):
            raise ValueError(f"{name} must be a positive number, got {opts[name]}")
    return opts


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
    *,
    wbits: int = 4,
    abits: int = 16,
    group_size: int | None = None,
    symmetric: bool = False,
    lwc: bool = True,
    let: bool = False,
    alpha: float = 0.5,
    epochs: int = 10,
    lwc_lr: float = 1e-2,
    let_lr: float = 5e-3,
    weight_decay: float = 0.0,
    aug_loss: bool = False,
    progress: bool = True,
) -> CalibrationReport:
    """OmniQuant block-wise calibration of a Hugging Face BERT- or LLaMA-family model, in place.

    Paper section 3.1 (Algorithm 1) and the official ``omniquant()`` (spec 3.4): for each
    transformer block in order,

    1. the full-precision block's output on the full-precision chain is the target;
    2. LWC logits (init 4.0) and, with ``let``, LET scales (SmoothQuant init with ``alpha``) and
       shifts are trained with AdamW (``lwc_lr``, ``let_lr``, ``weight_decay``) for ``epochs``
       passes over the batches, one step per batch, on the MSE between the target and the
       quantized block's output on the quantized chain (``aug_loss``: plus the MSE against the
       full-precision block on the quantized chain);
    3. LET is folded into the weights and norms, every linear becomes a packed
       ``OmniQuantLinear``, and the quantized chain moves on through the finished block.

    ``abits < 16`` quantizes the input of every linear in the blocks per token (embeddings and
    the LM head stay in full precision), and Q, K, V inside attention
    (``quantize_attention_inputs``). Which LET transformations each architecture gets is in the
    module docstring. The script settings of the paper: ``lwc`` for weight-only (W2: with
    ``aug_loss`` and 40 epochs), ``lwc`` + ``let`` for W6A6 and W4A4 (W4A4 with ``aug_loss``),
    20 epochs.

    Args:
        model: a Hugging Face BERT- or LLaMA-family model in float32: the calibration and
            the merge run in float32, so the packed weights are exactly the trained ones (the
            official code trains in fp16 AMP). Changed in place; if calibration stops with an
            error, the blocks before the failing one are already quantized.
        batches: the calibration data: tokenizer outputs (``model(**batch)``) or input-id tensors
            (``model(ids)``). Padding tokens (``attention_mask == 0``) are left out of the loss.
        wbits: weight bits (2..8).
        abits: activation bits (16 = weight-only).
        group_size: weight group length along the inputs, None = per output channel.
        symmetric: the symmetric weight grid instead of min/max with a zero point.
        lwc: train the clipping logits (init 4.0; False: plain min-max).
        let: train the equivalent transformation (SmoothQuant init with ``alpha``).
        alpha: the LET initialisation's migration strength.
        epochs: passes over the batches per block (0: no training, the initial values).
        lwc_lr: AdamW learning rate of the LWC logits.
        let_lr: AdamW learning rate of the LET scales and shifts.
        weight_decay: AdamW weight decay (the official ``--wd``, default 0).
        aug_loss: add the loss against the full-precision block on the quantized chain.
        progress: tqdm bars, one per block.

    Returns:
        a ``CalibrationReport`` with each block's losses per epoch.

    Raises:
        ValueError: no batches, an unsupported model, bad settings, or a loss that became
            non-finite (the message names the block and suggests lower learning rates).
    """
    from tqdm.auto import tqdm

    opts = _settings(
        wbits=wbits, abits=abits, group_size=group_size, symmetric=symmetric, lwc=lwc, let=let,
        alpha=alpha, epochs=epochs, lwc_lr=lwc_lr, let_lr=let_lr, aug_loss=aug_loss,
    )  # fmt: skip
    started = time.perf_counter()
    blocks = real_models.transformer_blocks(model)
    dtypes = {p.dtype for p in blocks.parameters()}
    if dtypes != {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ValueError(
            f"calibrate runs in float32 and the model's blocks are {names}: call model.float() first"
        )
    config: Any = model.config
    _check_architecture(config)
    batches = list(batches)
    masks = _token_masks(batches)
    was_training = model.training
    # by name: holding the parameters themselves would keep every replaced weight alive
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    reports = []
    try:
        model.eval()  # before the capture: no dropout in the calibration inputs
        model.requires_grad_(False)
        no_cache = {"use_cache": False} if "use_cache" in config.to_dict() else {}
        fp_in = real_models.capture_block_inputs(model, blocks[0], batches, **no_cache)
        if len(fp_in.calls) != len(batches):
            raise ValueError("calibrate: a batch did not reach the first transformer block")
        if abits < 16:
            quantize_attention_inputs(model, abits)
        q_in = fp_in  # the two streams: full-precision chain and quantized chain
        for i, block in enumerate(blocks):
            t0 = time.perf_counter()
            plan = _Plan(block, config, opts)
            stats: dict[str, Any] = {}
            attention = _attention_modules(block)
            with torch.no_grad(), _qkv_bits(attention, 16):
                with _input_stats(plan.linears, stats, masks) as state:
                    fp_out = []
                    for j, (args, kwargs) in enumerate(fp_in.calls):
                        state["j"] = j  # which batch's token mask the statistics use
                        fp_out.append(real_models.block_output(block(*args, **kwargs)))
                fp_out2 = q_in.run(block) if aug_loss else None
            plan.init(stats)
            report = BlockReport(i, plan.kind)
            let_params, lwc_params = plan.parameters()
            groups = [
                {"params": ps, "lr": lr}
                for ps, lr in ((let_params, let_lr), (lwc_params, lwc_lr))
                if ps
            ]
            steps = epochs * len(batches) if groups else 0
            optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay) if groups else None
            bar = tqdm(total=steps, desc=f"OmniQuant block {i}", disable=not progress, leave=False)
            step = 0
            with _activation_quant(plan.linears.values(), abits), contextlib.closing(bar):
                for _epoch in range(epochs if optimizer else 0):
                    total = 0.0
                    for j, (args, kwargs) in enumerate(q_in.calls):
                        step += 1
                        y = real_models.block_output(
                            torch.func.functional_call(block, plan.overrides(), args, kwargs)
                        )
                        loss = _masked_mse(y, fp_out[j], masks[j])
                        if fp_out2 is not None:
                            loss = loss + _masked_mse(y, fp_out2[j], masks[j])
                        value = float(loss.detach())
                        if not math.isfinite(value):
                            raise ValueError(
                                _diverged(
                                    f"block {i}", f"the loss is {value}", step, lwc_lr, let_lr
                                )
                            )
                        assert optimizer is not None
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        total += value
                        bar.update()
                        bar.set_postfix(loss=f"{value:.3g}")
                    report.losses.append(total / len(batches))
            report.let = {k: v.detach().clone() for k, v in plan.let.items()}
            report.lwc = {
                k: (g.detach().clone(), b.detach().clone()) for k, (g, b) in plan.lwc.items()
            }
            plan.finish()
            q_in = q_in.with_hidden_states(q_in.run(block))
            fp_in = fp_in.with_hidden_states(fp_out)
            report.seconds = time.perf_counter() - t0
            reports.append(report)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
        model.train(was_training)
    return CalibrationReport(reports, opts, time.perf_counter() - started)


@contextlib.contextmanager
def _qkv_bits(modules: list[Any], bits: int):
    """Temporarily set the attention-input bits (16 while computing full-precision targets)."""
    saved = [getattr(m, "lowbit_qkv_bits", 16) for m in modules]
    for m in modules:
        m.lowbit_qkv_bits = bits
    try:
        yield
    finally:
        for m, b in zip(modules, saved):
            m.lowbit_qkv_bits = b


def _token_masks(batches: list) -> list[torch.Tensor | None]:
    """Each batch's real-token mask (None for bare input ids), with the errors for no batches,
    wrong batch types and batches of padding only."""
    if not batches:
        raise ValueError("calibrate needs at least one calibration batch")
    masks: list[torch.Tensor | None] = []
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            masks.append(None)
        elif isinstance(batch, Mapping):
            mask = batch.get("attention_mask")
            masks.append(None if mask is None else mask.bool())
        else:
            raise TypeError(
                f"calibrate: each batch must be a tokenizer output (dict) or an input-id tensor, got {type(batch).__name__}"
            )
    if all(m is not None and not bool(m.any()) for m in masks):
        raise ValueError("calibrate: the calibration batches hold no real tokens (all padding)")
    return masks
