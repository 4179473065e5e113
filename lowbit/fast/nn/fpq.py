"""LLM-FP4 / FPQ (arXiv 2310.16836) as a quantized module: ``FPQLinear``.

Follows the quantized-module protocol of ``lowbit.fast.nn``; the quantizer, the search and the
pre-shifted exponent bias are in ``lowbit.fast.fpq`` (imported inside the functions, as
``lowbit.fast.fpq`` imports this package inside its functions too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.fast.nn import QuantizedLinear, register_module
from lowbit.kernels import on_triton_device

__all__ = ["FPQLinear"]


def _fpq_format(spec: Any) -> Any:
    """[E, M] (config) or an FPFormat -> a checked LLM-FP4 FPFormat."""
    from lowbit.reference.formats import FPFormat
    from lowbit.reference.fpq import _check_format

    if isinstance(spec, (list, tuple)):
        spec = FPFormat(int(spec[0]), int(spec[1]))
    fmt = _check_format(spec, "format")
    if fmt.bits > 8:
        raise ValueError(
            f"FPQLinear stores one code per byte at most: {fmt.name} has {fmt.bits} bits, use <= 8"
        )
    return fmt


@register_module
class FPQLinear(QuantizedLinear):
    """LLM-FP4 linear layer: FP weight codes with a real exponent bias per output channel, and
    static FP activation quantization with a real per-tensor bias t plus integer per-input-channel
    shifts k_c (the pre-shifted exponent bias; all zero for per-tensor activations).

    The shifts are folded into the weights' exponent bias (``lowbit.fast.fpq.fold_preshift``): on
    CUDA the activation codes are written at bias t + k_c and the Triton FP linear reads them
    raw and the weight codes at b_o + k_c; on CPU the same values come from the simulated layer,
    which is bit-identical product by product. The fold is used only where it is exact
    (exponent bits <= ``FOLD_MAX_EBITS`` = 5 for both formats); wider exponents run the simulated
    layer on CUDA too. ``a_format=None`` quantizes the weights only.

    Buffers: ``weight_codes`` uint8 (out, ceil(in / 2)) for 4-bit weights (two codes per byte,
    low nibble first) else (out, in); ``weight_bias`` float64 (out,); ``act_bias`` float64 ();
    ``act_shift`` int32 (in,); ``bias`` (out,) in the original dtype (if any).
    """

    weight_codes: torch.Tensor
    weight_bias: torch.Tensor
    act_bias: torch.Tensor
    act_shift: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        w_format: Any = (2, 1),
        a_format: Any = (2, 1),
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__(in_features, out_features, bias, weight_dtype, device)
        self.w_format = _fpq_format(w_format)
        self.a_format = None if a_format is None else _fpq_format(a_format)
        packed_cols = (in_features + 1) // 2 if self.w_format.bits == 4 else in_features
        self.register_buffer(
            "weight_codes", torch.zeros(out_features, packed_cols, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "weight_bias", torch.zeros(out_features, dtype=torch.float64, device=device)
        )
        self.register_buffer("act_bias", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer(
            "act_shift", torch.zeros(in_features, dtype=torch.int32, device=device)
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        result: Any = None,
        w_format: Any = (2, 1),
        a_format: Any = (2, 1),
        calib_inputs: torch.Tensor | None = None,
    ) -> FPQLinear:
        """Quantize a trained ``nn.Linear``.

        With ``result`` (an ``FPQSearchResult`` from ``lowbit.fast.fpq.search``) the searched
        formats and biases are used. Otherwise min-max ("MinMax" in the paper): weight biases
        from each row's absmax, one activation bias from the absmax of ``calib_inputs``
        (tokens, in), which is required unless ``a_format=None``.
        """
        from lowbit.fast import fpq

        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()
        if result is not None:
            w_fmt, a_fmt = result.w_format, result.a_format
            w_bias = torch.as_tensor(result.w_bias, dtype=torch.float64)
            t = torch.as_tensor(result.a_tensor_bias, dtype=torch.float64)
            shift = (
                torch.zeros(linear.in_features, dtype=torch.int64)
                if result.a_shift is None
                else torch.as_tensor(result.a_shift)
            )
        else:
            w_fmt = _fpq_format(w_format)
            a_fmt = None if a_format is None else _fpq_format(a_format)
            w_bias = fpq.bias_from_max(w.abs().amax(dim=1), w_fmt)
            shift = torch.zeros(linear.in_features, dtype=torch.int64)
            t = torch.zeros((), dtype=torch.float64)
            if a_fmt is not None:
                if calib_inputs is None:
                    raise ValueError(
                        "FPQLinear.from_linear: activation quantization needs calib_inputs (tokens, in) or a_format=None"
                    )
                t = fpq.bias_from_max(calib_inputs.detach().abs().amax().cpu(), a_fmt)
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            w_format=w_fmt,
            a_format=a_fmt,
            weight_dtype=linear.weight.dtype,
            device=w.device,
        )
        codes = fpq.encode(w, mod.w_format, w_bias.to(w.device)[:, None])
        if mod.w_format.bits == 4:
            from lowbit.kernels.fpq import pack_nibbles

            codes = pack_nibbles(codes)
        mod.weight_codes.copy_(codes)
        mod.weight_bias.copy_(w_bias)
        mod.act_bias.copy_(t)
        mod.act_shift.copy_(shift)
        mod._copy_bias(linear)
        return mod

    def _codes(self) -> torch.Tensor:
        """(out, in) weight codes, unpacked."""
        c = self.weight_codes
        if self.w_format.bits == 4:
            c = torch.stack([c & 0xF, c >> 4], dim=-1).reshape(self.out_features, -1)[
                :, : self.in_features
            ]
        return c

    def dequantized_weight(self) -> torch.Tensor:
        """Q(W) (float32), each row read with its exponent bias."""
        from lowbit.fast import fpq

        return fpq.decode(self._codes(), self.w_format, self.weight_bias[:, None])

    def _cached_weight(self) -> torch.Tensor:
        """dequantized_weight(), recomputed only when the buffers change (load, copy_, .to())."""
        key = tuple((t.data_ptr(), t._version) for t in (self.weight_codes, self.weight_bias))
        if getattr(self, "_weight_key", None) != key:
            self._weight_cache = self.dequantized_weight()
            self._weight_key = key
        return self._weight_cache

    def lowbit_config(self) -> dict[str, Any]:
        """JSON-serialisable shapes and options: ``in_features``, ``out_features``, ``bias``,
        ``weight_dtype``, ``w_format`` and ``a_format`` as [E, M] (``a_format`` None when the
        activations are not quantized); ``from_config`` takes this dict back."""
        a_format = None if self.a_format is None else [self.a_format.ebits, self.a_format.mbits]
        return {
            **self._base_config(),
            "w_format": [self.w_format.ebits, self.w_format.mbits],
            "a_format": a_format,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FPQLinear:
        """An empty module of the shape and formats in ``config`` (a ``lowbit_config()``): its
        buffers are zeros until ``load_state_dict`` fills them (``load_quantized`` does)."""
        return cls(
            **cls._base_args(config), w_format=config["w_format"], a_format=config["a_format"]
        )

    def act_biases(self) -> torch.Tensor:
        """Per-input-channel activation bias t + k_c (float64, (in,))."""
        return self.act_bias + self.act_shift.to(torch.float64)

    # The folded Triton layer decodes FP codes raw in float32 registers: activation values
    # 2^(max(field, 1) - M) up to 2^(2^E_a) and weight values scaled by 2^-k_c with k_c up to
    # 2^E_a - 1. Both stay normal float32 numbers (fold_preshift's exactness condition) for
    # E <= 5; E = 6, 7 (allowed by the format check) would leave the float32 exponent range.
    FOLD_MAX_EBITS = 5

    def _folded_is_exact(self) -> bool:
        """Whether the folded Triton layer computes the simulated layer exactly (see above)."""
        return (
            self.a_format is not None
            and self.a_format.ebits <= self.FOLD_MAX_EBITS
            and self.w_format.ebits <= self.FOLD_MAX_EBITS
        )

    def _cached_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(2^(t + k_c) float64 (in,), 2^-t float32, 2^-b_o float32 (out,)) for the folded layer,
        recomputed only when the bias buffers change (like ``_cached_weight``)."""
        from lowbit.fast import fpq

        bufs = (self.act_bias, self.act_shift, self.weight_bias)
        key = tuple((t.data_ptr(), t._version) for t in bufs)
        if getattr(self, "_scales_key", None) != key:
            a_scale, _ = fpq._bias_scales(self.act_biases())
            _, a_si = fpq._bias_scales(self.act_bias)
            _, w_si = fpq._bias_scales(self.weight_bias)
            self._scales_cache = (a_scale, a_si.float(), w_si.float())
            self._scales_key = key
        return self._scales_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) in x's dtype (see the class docstring)."""
        from lowbit.fast import fpq

        X = self._rows(x)
        if (
            self.a_format is not None
            and on_triton_device(X)
            and X.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and X.shape[0] > 0
            and self._folded_is_exact()
        ):
            from lowbit.kernels import fpq as kfpq

            a_scale, a_si, w_si = self._cached_scales()
            codes = kfpq.fake_quant(
                X, self.a_format.ebits, self.a_format.mbits, a_scale, codes=True
            )
            Y = kfpq.fpq_linear(
                codes, self.weight_codes, self.act_shift, a_si, w_si,
                (self.a_format.ebits, self.a_format.mbits), (self.w_format.ebits, self.w_format.mbits),
                bias=self.bias, w_packed=self.w_format.bits == 4, out_dtype=x.dtype,
            )  # fmt: skip
        else:
            # the simulated layer; float64 inputs are computed in float64 (as Linear8bitLt does)
            work = torch.float64 if X.dtype == torch.float64 else torch.float32
            Xq = X if self.a_format is None else fpq.quantize(X, self.a_format, self.act_biases())
            Y = nn.functional.linear(
                Xq.to(work),
                self._cached_weight().to(work),  # exact: <= 8 significant bits
                None if self.bias is None else self.bias.to(work),
            )
        return Y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        a = "none" if self.a_format is None else f"E{self.a_format.ebits}M{self.a_format.mbits}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"w=E{self.w_format.ebits}M{self.w_format.mbits}, a={a}, preshifted={bool((self.act_shift != 0).any())}"
        )
