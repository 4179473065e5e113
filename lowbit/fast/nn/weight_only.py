"""Weight-only quantized linears for the methods that need no calibration data.

Four modules follow the quantized-module protocol of ``lowbit.fast.nn``; each stores the weight
as integer codes plus scales (buffers, never a dequantized float weight), dequantizes it in
``forward`` and multiplies in the input's dtype (activations are not quantized):

* ``RTNLinear``: lowbit's shared uniform integer quantizer (``lowbit.fast.uniform``), ``bits``
  2..8, per output channel (``group_size=None``) or per group of ``group_size`` inputs (a
  shorter last group when ``group_size`` does not divide ``in_features``, as ``uniform``
  does), symmetric or asymmetric. Symmetric codes q in [-Q, Q] are stored offset by 2^(b-1).
* ``FormatLinear``: a number format of ``lowbit.fast.formats`` (an ExMy float such as
  ``"e4m3fn"`` or an integer format such as ``"int4"``) with one scale per output channel,
  s = max|W_row| / fmt.max_value (an all-zero row gets s = 0 and stays zero).
* ``MXLinear``: OCP MX blocks (``formats.encode_mx``): element format ``fmt`` (``"e2m1"``
  for MXFP4), one E8M0 scale per ``block`` inputs (32); a shorter last block is zero-padded.
* ``NVFP4Linear``: NVFP4 (``formats.encode_nvfp4``): E2M1 elements, one E4M3 scale per 16
  inputs and one float32 global scale per layer.

Codes are packed little-endian along ``in_features`` with ``formats.pack`` (``weight_packed``,
uint8): two 4-bit codes per byte, so a 4-bit layer really holds 4 bits per weight. Each
module's ``dequantized_weight()`` is bit for bit the output of lowbit's fast fake-quantizer
for the same weight (``uniform.quantize``, ``formats.quantize`` with the row scale,
``formats.quantize_mx``, ``formats.quantize_nvfp4``) in float32 (float64 for float64 weights):
tests check it. A weight with NaN or Inf is refused with a one-line ``ValueError`` (the fast
functions would turn it into a NaN block or a saturated value without a word).

These modules back the ``rtn``, ``format``, ``mx`` and ``nvfp4`` methods of
``lowbit.fast.hf_quantizer`` (quantize while loading with transformers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lowbit.fast import formats, uniform
from lowbit.fast.nn import QuantizedLinear, register_module

__all__ = ["RTNLinear", "FormatLinear", "MXLinear", "NVFP4Linear"]


def _work_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The precision the fast functions compute in: float64 for float64 weights, else float32."""
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


def _packed_width(n: int, bits: int) -> int:
    """Bytes per row that ``formats.pack`` writes for ``n`` codes of ``bits`` bits."""
    per_group, group_bytes = formats._group(bits)  # whole groups of codes fill whole bytes
    return -(-n // per_group) * group_bytes


def _dense_weight(cls: type, linear: nn.Linear) -> torch.Tensor:
    """The weight of ``linear`` (detached), refused with one line if it is not finite."""
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f"{cls.__name__}.from_linear expects an nn.Linear, got {type(linear).__name__}"
        )
    w = linear.weight.detach()
    if not w.is_floating_point():
        raise ValueError(
            f"{cls.__name__}.from_linear: the weight is {w.dtype}, expected a float dtype"
        )
    bad = int((~torch.isfinite(w)).sum())  # one sync, at quantization time only
    if bad:
        raise ValueError(
            f"{cls.__name__}.from_linear: the weight has {bad} NaN/Inf values; "
            "replace them (e.g. torch.nan_to_num) before quantizing"
        )
    return w


def _signed_format(cls: type, fmt: formats.FPFormat | formats.IntFormat | str, floats_only: bool):
    """``fmt`` parsed: signed, at most 8 bits, a name that parses back (it goes into configs)."""
    where = f"{cls.__name__}: fmt={fmt!r}"
    try:
        parsed = formats.parse_format(fmt)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{where} is not a format ({err}); use e.g. 'e4m3fn', 'e2m1' or 'int4'"
        ) from None
    if floats_only and not isinstance(parsed, formats.FPFormat):
        raise ValueError(f"{where} is not a float format; MX elements are ExMy floats, e.g. 'e2m1'")
    if not parsed.signed:
        raise ValueError(f"{where} is unsigned; weights need a signed format, e.g. 'e4m3fn'")
    if parsed.bits > 8:
        raise ValueError(f"{where} has {parsed.bits} bits; use a format of at most 8 bits")
    if formats.parse_format(parsed.name) != parsed:
        raise ValueError(f"{where} has no name that parses back; pass a named format string")
    return parsed


class _WeightOnlyLinear(QuantizedLinear):
    """Shared part: packed codes (``weight_packed``, uint8) and the forward in x's dtype."""

    weight_packed: torch.Tensor

    def _register_packed(self, bits: int, device: torch.device | str | None) -> None:
        self.code_bits = int(bits)
        shape = (self.out_features, _packed_width(self.in_features, bits))
        self.register_buffer("weight_packed", torch.zeros(shape, dtype=torch.uint8, device=device))

    @classmethod
    def _shell(cls, linear: nn.Linear, **options: Any) -> tuple[Any, torch.Tensor]:
        """An empty module shaped like ``linear`` with ``options``, and its finite weight."""
        w = _dense_weight(cls, linear)
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            weight_dtype=w.dtype,
            device=w.device,
            **options,
        )
        return mod, w

    def _store_codes(self, codes: torch.Tensor) -> None:
        self.weight_packed.copy_(formats.pack(codes, self.code_bits))

    def codes(self) -> torch.Tensor:
        """The unpacked codes, uint8 (out_features, in_features)."""
        return formats.unpack(self.weight_packed, self.code_bits, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features): ``F.linear`` in x's dtype with the
        dequantized weight (computed on each call: only the codes stay in memory)."""
        self._rows(x)  # the input checks; F.linear takes x as nn.Linear would
        w = self.dequantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            *(f"{k}={v}" for k, v in self._options().items()),
        ]
        return ", ".join(parts)

    def _options(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def lowbit_config(self) -> dict[str, Any]:
        """JSON-serialisable shapes and options (``from_config`` takes this dict back)."""
        return {**self._base_config(), **self._options()}


@register_module
class RTNLinear(_WeightOnlyLinear):
    """Round-to-nearest integer weights with lowbit's uniform quantizer (``lowbit.fast.uniform``).

    Buffers: ``weight_packed`` uint8 (codes packed ``bits`` wide; symmetric codes offset by
    2^(bits-1)), ``weight_scale`` (out, 1) or (out, groups) float32 (float64 for float64
    weights), ``weight_zero_point`` int32 like the scale (asymmetric only), ``bias``.
    ``dequantized_weight()`` equals ``uniform.quantize(W, bits, symmetric=...,
    granularity="channel" or "group", group_size=...)`` computed in that precision.
    """

    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int | None = None,
        symmetric: bool = True,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__(in_features, out_features, bias, weight_dtype, device)
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"RTNLinear: bits={bits!r} is invalid; use an int from 2 to 8")
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(
                f"RTNLinear: group_size={group_size!r} is invalid; use a positive int "
                "(e.g. 128) or None for one scale per output channel"
            )
        if not isinstance(symmetric, bool):
            raise ValueError(f"RTNLinear: symmetric={symmetric!r} is invalid; use True or False")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self._register_packed(bits, device)
        groups = 1 if group_size is None else -(-in_features // group_size)
        scale_dtype = _work_dtype(weight_dtype)
        self.register_buffer(
            "weight_scale", torch.zeros(out_features, groups, dtype=scale_dtype, device=device)
        )
        if symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer(
                "weight_zero_point",
                torch.zeros(out_features, groups, dtype=torch.int32, device=device),
            )

    def _granularity(self) -> dict[str, Any]:
        if self.group_size is None:
            return {"granularity": "channel"}
        return {"granularity": "group", "group_size": self.group_size}

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int | None = None,
        symmetric: bool = True,
    ) -> RTNLinear:
        """Quantize a trained ``nn.Linear`` with ``uniform.encode`` (round to nearest)."""
        mod, w = cls._shell(linear, bits=bits, group_size=group_size, symmetric=symmetric)
        codes, scale, zero = uniform.encode(w, bits, symmetric=symmetric, **mod._granularity())
        offset = 2 ** (bits - 1) if symmetric else 0  # symmetric codes are signed: shift them
        mod._store_codes(codes.to(torch.int32) + offset)
        mod.weight_scale.copy_(scale)
        if zero is not None and mod.weight_zero_point is not None:
            mod.weight_zero_point.copy_(zero)
        mod._copy_bias(linear)
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """W ≈ (q - z) · s, float32 (float64 for float64 weights)."""
        q = self.codes().to(torch.int32)
        if self.symmetric:
            q = q - 2 ** (self.bits - 1)
        G = self.group_size
        return uniform.decode(
            q,
            self.weight_scale,
            self.weight_zero_point,
            group_size=G,
            dtype=self.weight_scale.dtype,
        )

    def _options(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RTNLinear:
        """An empty module of the shape and options in ``config`` (a ``lowbit_config()``)."""
        g = config["group_size"]
        return cls(
            **cls._base_args(config),
            bits=int(config["bits"]),
            group_size=None if g is None else int(g),
            symmetric=bool(config["symmetric"]),
        )


@register_module
class FormatLinear(_WeightOnlyLinear):
    """Weights in a number format with one scale per output channel.

    s = max|W_row| / fmt.max_value, codes = ``formats.encode(W / s, fmt)`` (round to nearest
    even, saturating; an all-zero row has s = 0, W / 1 = 0). Buffers: ``weight_packed``
    uint8 (codes packed ``fmt.bits`` wide), ``weight_scale`` (out, 1) float32 (float64 for
    float64 weights), ``bias``. ``dequantized_weight()`` equals
    ``formats.quantize(W / s, fmt) * s`` computed in that precision.
    """

    weight_scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: formats.FPFormat | formats.IntFormat | str = "e4m3fn",
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__(in_features, out_features, bias, weight_dtype, device)
        self.fmt = _signed_format(type(self), fmt, floats_only=False)
        self._register_packed(self.fmt.bits, device)
        self.register_buffer(
            "weight_scale",
            torch.zeros(out_features, 1, dtype=_work_dtype(weight_dtype), device=device),
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, fmt: formats.FPFormat | formats.IntFormat | str = "e4m3fn"
    ) -> FormatLinear:
        """Quantize a trained ``nn.Linear``: row scales, then ``formats.encode``."""
        mod, w = cls._shell(linear, fmt=fmt)
        ww = w.to(_work_dtype(w.dtype))
        if ww.shape[1]:
            scale = ww.abs().amax(dim=1, keepdim=True) / mod.fmt.max_value  # (out, 1)
        else:
            scale = ww.new_zeros(ww.shape[0], 1)
        codes = formats.encode(ww / torch.where(scale > 0, scale, 1.0), mod.fmt)
        mod._store_codes(codes)
        mod.weight_scale.copy_(scale)
        mod._copy_bias(linear)
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """W ≈ decode(codes) · s, float32 (float64 for float64 weights)."""
        values = formats.decode(self.codes(), self.fmt, dtype=self.weight_scale.dtype)
        return values * self.weight_scale

    def _options(self) -> dict[str, Any]:
        return {"fmt": self.fmt.name}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FormatLinear:
        """An empty module of the shape and options in ``config`` (a ``lowbit_config()``)."""
        return cls(**cls._base_args(config), fmt=str(config["fmt"]))


@register_module
class MXLinear(_WeightOnlyLinear):
    """OCP MX weights (``formats.encode_mx``): blocks of ``block`` inputs share an E8M0 scale.

    Buffers: ``weight_packed`` uint8 (element codes packed ``fmt.bits`` wide),
    ``weight_scales`` uint8 (out, ceil(in / block)) E8M0 codes, ``bias``.
    ``dequantized_weight()`` equals ``formats.quantize_mx(W, fmt, block)`` (float32, float64
    for float64 weights).
    """

    weight_scales: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: formats.FPFormat | str = "e2m1",
        block: int = 32,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__(in_features, out_features, bias, weight_dtype, device)
        self.fmt = _signed_format(type(self), fmt, floats_only=True)
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(
                f"MXLinear: block={block!r} is invalid; use a positive int (MX uses 32)"
            )
        self.block = block
        self._register_packed(self.fmt.bits, device)
        blocks = -(-in_features // block)
        self.register_buffer(
            "weight_scales", torch.zeros(out_features, blocks, dtype=torch.uint8, device=device)
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, fmt: formats.FPFormat | str = "e2m1", block: int = 32
    ) -> MXLinear:
        """Quantize a trained ``nn.Linear`` with ``formats.encode_mx`` along ``in_features``."""
        mod, w = cls._shell(linear, fmt=fmt, block=block)
        codes, scales = formats.encode_mx(w, mod.fmt, block)
        if bool((scales == formats.E8M0FNU.nan_code).any()):
            raise ValueError(
                "MXLinear.from_linear: a block's scale exceeds E8M0's range (|w| above 2^127); "
                "rescale the weight"
            )
        mod._store_codes(codes)
        mod.weight_scales.copy_(scales)
        mod._copy_bias(linear)
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """W ≈ decode(codes) · 2^(scale - 127), float32 (float64 for float64 weights)."""
        work = _work_dtype(self.weight_dtype)
        return formats.decode_mx(self.codes(), self.weight_scales, self.fmt, self.block, dtype=work)

    def _options(self) -> dict[str, Any]:
        return {"fmt": self.fmt.name, "block": self.block}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MXLinear:
        """An empty module of the shape and options in ``config`` (a ``lowbit_config()``)."""
        return cls(**cls._base_args(config), fmt=str(config["fmt"]), block=int(config["block"]))


@register_module
class NVFP4Linear(_WeightOnlyLinear):
    """NVFP4 weights (``formats.encode_nvfp4``): E2M1 elements, an E4M3 scale per 16 inputs
    and a float32 global scale g = (448 · 6) / max|W| per layer.

    Buffers: ``weight_packed`` uint8 (two E2M1 codes per byte), ``weight_scales`` uint8
    (out, ceil(in / 16)) E4M3 codes, ``weight_global_scale`` float32 0-d, ``bias``.
    ``dequantized_weight()`` equals ``formats.quantize_nvfp4(W)`` (float32, float64 for
    float64 weights).
    """

    weight_scales: torch.Tensor
    weight_global_scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__(in_features, out_features, bias, weight_dtype, device)
        self._register_packed(formats.E2M1FN.bits, device)
        blocks = -(-in_features // formats.NVFP4_BLOCK)
        self.register_buffer(
            "weight_scales", torch.zeros(out_features, blocks, dtype=torch.uint8, device=device)
        )
        # 1, not 0, until loaded: decode_nvfp4 refuses a zero global scale
        self.register_buffer(
            "weight_global_scale", torch.ones((), dtype=torch.float32, device=device)
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NVFP4Linear:
        """Quantize a trained ``nn.Linear`` with ``formats.encode_nvfp4`` (1 x 16 blocks)."""
        mod, w = cls._shell(linear)
        codes, scales, g = formats.encode_nvfp4(w)
        if bool(((scales & 0x7F) == formats.E4M3FN.nan_code).any()):
            raise ValueError(
                "NVFP4Linear.from_linear: the weight has values beyond float32's range; "
                "rescale the weight"
            )
        mod._store_codes(codes)
        mod.weight_scales.copy_(scales)
        mod.weight_global_scale.copy_(g)
        mod._copy_bias(linear)
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """W ≈ decode(codes) · decode(scale) / g, float32 (float64 for float64 weights)."""
        work = _work_dtype(self.weight_dtype)
        return formats.decode_nvfp4(
            self.codes(), self.weight_scales, self.weight_global_scale, dtype=work
        )

    def _options(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NVFP4Linear:
        """An empty module of the shape in ``config`` (a ``lowbit_config()``)."""
        return cls(**cls._base_args(config))
