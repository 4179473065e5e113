"""Quantized drop-in replacements for ``nn.Linear``, one file per method, and their registry.

Every quantized module follows one protocol (used by ``lowbit.fast.convert``):

* drop-in for ``nn.Linear``: ``in_features``, ``out_features``, ``forward(x)`` on
  (..., in_features) inputs of any float dtype, returning x's dtype;
* ``from_linear(linear, **opts)`` builds it from a trained ``nn.Linear``; ``to_linear()`` gives
  back a plain ``nn.Linear`` holding ``dequantized_weight()``;
* ``lowbit_config()`` -> JSON-serialisable shapes and options, and ``from_config(config)`` an
  empty shell whose registered buffers/parameters are then filled by ``load_state_dict``;
* registered by class name in ``QUANTIZED_MODULES`` (``@register_module``), which is how
  ``lowbit.fast.convert.load_quantized`` finds the class named in a checkpoint.

``QuantizedLinear`` implements the shared part (shape checks, the bias buffer, ``to_linear``,
the common config entries); a method's module subclasses it, but any ``nn.Module`` with
``from_config``, ``lowbit_config`` and ``to_linear`` can be registered (a plug-in from outside
lowbit included).

Modules: ``Linear8bitLt`` (LLM.int8(), arXiv 2208.07339, ``lowbit.fast.nn.llm_int8``),
``FPQLinear`` (LLM-FP4, arXiv 2310.16836, ``lowbit.fast.nn.fpq``), ``OmniQuantLinear``
(OmniQuant, arXiv 2308.13137, ``lowbit.fast.nn.omniquant``, which also holds its block-wise
``calibrate``) and the trainable ``Int4Linear`` (4-bit training, arXiv 2306.11987,
``lowbit.fast.nn.int4_training``, with ``convert_for_training``), and the weight-only
``RTNLinear``, ``FormatLinear``, ``MXLinear`` and ``NVFP4Linear`` (the uniform quantizer and
the number formats, ``lowbit.fast.nn.weight_only``, which ``lowbit.fast.hf_quantizer`` swaps
in while transformers loads a model). Adding a method: write
``lowbit/fast/nn/<method>.py`` with its class decorated by ``@register_module``, and add one import line
at the bottom of this file (it registers the class and re-exports it from ``lowbit.fast.nn``).
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["QuantizedLinear", "QUANTIZED_MODULES", "register_module"]

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

QUANTIZED_MODULES: dict[str, type[nn.Module]] = {}
"""The registered quantized module classes by class name (filled by ``register_module``):
``lowbit.fast.convert.load_quantized`` rebuilds the class a checkpoint names from here."""

_PROTOCOL = ("from_config", "lowbit_config", "to_linear")

_M = TypeVar("_M", bound=type[nn.Module])


def register_module(cls: _M) -> _M:
    """Class decorator: add ``cls`` to ``QUANTIZED_MODULES`` under its class name.

    The name is what ``save_quantized`` writes into a checkpoint and ``load_quantized`` looks
    up, so it must be unique: a second class with a registered name is refused. Registering the
    same class object again is a no-op.

    Args:
        cls: an ``nn.Module`` subclass with ``from_config``, ``lowbit_config`` and ``to_linear``.

    Returns:
        ``cls`` unchanged.

    Raises:
        ValueError: ``cls`` is not an ``nn.Module`` class, lacks part of the protocol, or its
            name is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"register_module expects an nn.Module subclass, got {cls!r}")
    missing = [m for m in _PROTOCOL if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(
            f"register_module: {cls.__name__} lacks {', '.join(missing)} of the quantized-module protocol; subclass QuantizedLinear or define them"
        )
    name = cls.__name__
    known = QUANTIZED_MODULES.get(name)
    if known is not None and known is not cls:
        raise ValueError(
            f"register_module: a quantized module named {name!r} is already registered ({known.__module__}.{known.__qualname__}); give {cls.__module__}.{cls.__qualname__} another class name"
        )
    QUANTIZED_MODULES[name] = cls
    return cls


class QuantizedLinear(nn.Module):
    """Base class of the quantized linears: what every method's module shares.

    It holds ``in_features``, ``out_features``, ``weight_dtype`` (the dtype of the linear it was
    built from, which ``to_linear`` restores) and the ``bias`` buffer (or ``None``); it provides
    ``to_linear()`` through the subclass's ``dequantized_weight()``, the common config entries
    (``_base_config`` / ``_base_args``) and the reshaping of (..., in_features) inputs
    (``_rows``). A subclass adds its buffers, ``from_linear``, ``dequantized_weight``,
    ``lowbit_config``, ``from_config`` and ``forward``, and is decorated with
    ``@register_module``.
    """

    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_dtype: torch.dtype,
        device: torch.device | str | None,
    ):
        super().__init__()
        if in_features < 0 or out_features < 0:
            raise ValueError(
                f"in_features and out_features must be >= 0, got {in_features}, {out_features}"
            )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight_dtype = weight_dtype
        if bias:
            self.register_buffer(
                "bias", torch.zeros(out_features, dtype=weight_dtype, device=device)
            )
        else:
            self.bias = None

    def dequantized_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The weight the module computes with, as a float tensor of shape (out, in).

        Each subclass implements it from its stored codes and scales; ``to_linear`` copies it.
        """
        raise NotImplementedError

    def _copy_bias(self, linear: nn.Linear) -> None:
        """Copy the layer bias of the ``nn.Linear`` being quantized (``from_linear``)."""
        if linear.bias is not None:
            assert self.bias is not None
            with torch.no_grad():
                self.bias.copy_(linear.bias.detach())

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weights.

        Its weight is ``dequantized_weight()`` cast to the original ``weight_dtype``, its bias a
        copy of ``bias``; it lives on the module's device. This is what
        ``lowbit.fast.convert.restore_linears`` swaps back in.
        """
        w = self.dequantized_weight()
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=self.weight_dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(w.to(self.weight_dtype))
            if self.bias is not None and lin.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def _base_config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "weight_dtype": str(self.weight_dtype).removeprefix("torch."),
        }

    @classmethod
    def _base_args(cls, config: dict[str, Any]) -> dict[str, Any]:
        dtype_name = config.get("weight_dtype", "float32")
        if dtype_name not in _DTYPES:
            raise ValueError(
                f"{cls.__name__} config: unknown weight_dtype {dtype_name!r}; expected one of {sorted(_DTYPES)}"
            )
        return dict(
            in_features=int(config["in_features"]),
            out_features=int(config["out_features"]),
            bias=bool(config["bias"]),
            weight_dtype=_DTYPES[dtype_name],
        )

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (tokens, in_features), with a clear error on a wrong input type,
        dtype (integer tensors would come back as integer garbage) or width."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{name} expects a torch tensor, got {type(x).__name__}: convert it with torch.as_tensor"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"{name} expects a floating-point input, got {x.dtype}: cast it, e.g. x.float()"
            )
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{name} expects (..., {self.in_features}) inputs, got shape {tuple(x.shape)}"
            )
        return x.reshape(math.prod(x.shape[:-1]), self.in_features)


# The method modules, one line each: the import registers the class (@register_module) and
# re-exports it as lowbit.fast.nn.<Class> (the `as` form marks the re-export for ruff and mypy).
# They import the base class above, so they come last.
from lowbit.fast.nn.fpq import FPQLinear as FPQLinear  # noqa: E402
from lowbit.fast.nn.int4_training import Int4Linear as Int4Linear  # noqa: E402
from lowbit.fast.nn.llm_int8 import Linear8bitLt as Linear8bitLt  # noqa: E402
from lowbit.fast.nn.omniquant import OmniQuantLinear as OmniQuantLinear  # noqa: E402
from lowbit.fast.nn.weight_only import FormatLinear as FormatLinear  # noqa: E402
from lowbit.fast.nn.weight_only import MXLinear as MXLinear  # noqa: E402
from lowbit.fast.nn.weight_only import NVFP4Linear as NVFP4Linear  # noqa: E402
from lowbit.fast.nn.weight_only import RTNLinear as RTNLinear  # noqa: E402

# the re-exported classes, for `from lowbit.fast.nn import *` (the docs show them per submodule)
__all__ += sorted(
    n for n, c in QUANTIZED_MODULES.items() if c.__module__.startswith(f"{__name__}.")
)
