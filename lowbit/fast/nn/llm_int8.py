"""LLM.int8() (arXiv 2208.07339) as a quantized module: ``Linear8bitLt``.

Follows the quantized-module protocol of ``lowbit.fast.nn``; the math is in
``lowbit.fast.llm_int8``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.fast import llm_int8 as _llm_int8
from lowbit.fast.nn import QuantizedLinear, register_module

__all__ = ["Linear8bitLt"]


@register_module
class Linear8bitLt(QuantizedLinear):
    """LLM.int8() linear layer: int8 weights (one absmax per output feature) stored once,
    activations quantized per token at run time, with outlier decomposition above ``threshold``.

    The outlier columns of each input batch are multiplied with the dequantized int8 weight
    columns, as bitsandbytes' ``Linear8bitLt(has_fp16_weights=False)`` does (the full-precision
    weights are not kept). ``threshold=0`` disables the decomposition (pure vector-wise int8).
    The weights are frozen; gradients flow to the input and the bias.

    Buffers: ``weight_codes`` int8 (out, in), ``weight_absmax`` float32 (out,), ``bias`` (out,)
    in the original linear's dtype (if any).
    """

    weight_codes: torch.Tensor
    weight_absmax: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 6.0,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__(in_features, out_features, bias, weight_dtype, device)
        _llm_int8._check_threshold(threshold)
        self.threshold = float(threshold)
        self.register_buffer(
            "weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_absmax", torch.zeros(out_features, dtype=torch.float32, device=device)
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> Linear8bitLt:
        """Quantize a trained ``nn.Linear`` (weights row-wise absmax int8, no threshold)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            threshold=threshold,
            weight_dtype=w.dtype,
            device=w.device,
        )
        codes, absmax, _ = _llm_int8.vectorwise_quant(w, 0.0)
        mod.weight_codes.copy_(codes)
        mod.weight_absmax.copy_(absmax)
        mod._copy_bias(linear)
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """W ≈ q · c / 127 (float32)."""
        return _llm_int8.vectorwise_dequant(self.weight_codes, self.weight_absmax)

    def lowbit_config(self) -> dict[str, Any]:
        """JSON-serialisable shapes and options: ``in_features``, ``out_features``, ``bias``,
        ``weight_dtype`` and ``threshold`` (``from_config`` takes this dict back)."""
        return {**self._base_config(), "threshold": self.threshold}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Linear8bitLt:
        """An empty module of the shape and options in ``config`` (a ``lowbit_config()``): its
        buffers are zeros until ``load_state_dict`` fills them (``load_quantized`` does)."""
        return cls(**cls._base_args(config), threshold=float(config["threshold"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) in x's dtype (see the class docstring)."""
        X = self._rows(x)
        Y = _llm_int8._frozen_linear(
            X, self.weight_codes, self.weight_absmax, self.bias, self.threshold
        )
        return Y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}"
        )
