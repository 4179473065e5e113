"""A Hugging Face transformers (>= 5) quantizer for lowbit: quantize while loading.

``import lowbit.fast.hf_quantizer`` registers quant_method ``"lowbit"`` with transformers'
public ``register_quantization_config`` / ``register_quantizer``. Then::

    AutoModelForCausalLM.from_pretrained(path, quantization_config=LowbitConfig(method="rtn"))

swaps every ``nn.Linear`` (except ``modules_to_not_convert``, default ``["lm_head"]``) for a
lowbit module on the meta device and quantizes each dense weight as it is read from the
checkpoint, so the float model is never held in memory whole. Methods (none needs
calibration data):

* ``"llm_int8"``: ``lowbit.fast.nn.Linear8bitLt`` (LLM.int8(), option ``threshold``=6.0);
* ``"rtn"``: ``RTNLinear``, lowbit's uniform integer quantizer (``bits``=4,
  ``group_size``=128, 0 for one scale per output channel, ``symmetric``=True);
* ``"format"``: ``FormatLinear``, a number format with one scale per output channel
  (``fmt``="e4m3fn"; any signed ExMy float or intN of at most 8 bits);
* ``"mx"``: ``MXLinear``, OCP MX blocks (``fmt``="e2m1", ``block``=32);
* ``"nvfp4"``: ``NVFP4Linear`` (E2M1, blocks of 16 with E4M3 scales, float32 global scale).

``save_pretrained`` writes safetensors with the modules' buffers (codes and scales) and the
config (quant_method ``"lowbit"`` and the options) in config.json; ``from_pretrained(folder)``
rebuilds the modules on meta from that config and loads the saved codes as they are (no
re-quantization), as long as this module was imported first.

Why a marker under ``<layer>.weight``: without lowbit imported, transformers only warns
"Unknown quantization type" and loads the checkpoint into a float model. A lowbit checkpoint
therefore stores, for every quantized layer, a 1-D uint8 tensor under ``<layer>.weight``
(the bytes of a short note that says to import lowbit). Its shape cannot match the float
weight, so such a load stops with transformers' ``RuntimeError`` ("You set
`ignore_mismatched_sizes` to `False`, thus raising an error") after a load report that lists
every quantized layer's weight as MISMATCHED, instead of casting codes into float weights or
initialising them at random. With ``ignore_mismatched_sizes=True`` the report still shows
them. With lowbit imported the marker is ignored on load and written again on save.

Scope: ``nn.Linear`` layers (not GPT-2's ``Conv1D``), no disk offload while quantizing,
no training (``is_trainable`` is False: the codes are buffers).
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["LowbitConfig", "LowbitHfQuantizer", "METHODS", "QUANT_METHOD"]

QUANT_METHOD = "lowbit"
METHODS = ("llm_int8", "rtn", "format", "mx", "nvfp4")
# the options each method takes, and their defaults (LowbitConfig resolves the unset ones)
_OPTIONS: dict[str, dict[str, Any]] = {
    "llm_int8": {"threshold": 6.0},
    "rtn": {"bits": 4, "group_size": 128, "symmetric": True},
    "format": {"fmt": "e4m3fn"},
    "mx": {"fmt": "e2m1", "block": 32},
    "nvfp4": {},
}
_ALL_OPTIONS = ("threshold", "bits", "group_size", "symmetric", "fmt", "block")
_MODULE_NAMES = {
    "llm_int8": "Linear8bitLt",
    "rtn": "RTNLinear",
    "format": "FormatLinear",
    "mx": "MXLinear",
    "nvfp4": "NVFP4Linear",
}
# What a float model finds under `<layer>.weight` in a lowbit checkpoint (see the docstring).
_MARKER_NOTE = (
    "lowbit checkpoint: the quantized weights are the weight_* tensors; "
    "import lowbit.fast.hf_quantizer before from_pretrained"
)


def _check_transformers(version: str) -> None:
    """One line instead of failures deep in loading: the v5 quantizer hooks are needed."""
    from packaging.version import InvalidVersion, Version

    try:
        major = Version(version).major
    except InvalidVersion:
        major = 0
    if major < 5:
        raise ImportError(
            f"lowbit.fast.hf_quantizer needs transformers >= 5 (found {version}): "
            "pip install -U 'transformers>=5', or quantize after loading with "
            "lowbit.fast.convert.replace_linears"
        )


try:
    import transformers
except ImportError:  # pragma: no cover - the models extra is not installed
    raise ImportError(
        "lowbit.fast.hf_quantizer needs transformers >= 5: pip install 'transformers>=5'"
    ) from None
_check_transformers(transformers.__version__)

from transformers.core_model_loading import ConversionOps  # noqa: E402
from transformers.quantizers import (  # noqa: E402
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.quantizers_utils import should_convert_module  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

from lowbit.fast.nn import QUANTIZED_MODULES  # noqa: E402


class LowbitConfig(QuantizationConfigMixin):
    """What ``from_pretrained(..., quantization_config=LowbitConfig(...))`` quantizes with.

    Args:
        method: ``"llm_int8"``, ``"rtn"``, ``"format"``, ``"mx"`` or ``"nvfp4"``.
        threshold: LLM.int8()'s outlier threshold (``llm_int8``; default 6.0, 0 disables).
        bits: integer bits, 2..8 (``rtn``; default 4).
        group_size: inputs per scale (``rtn``; default 128; 0 or None = one scale per output
            channel).
        symmetric: symmetric or asymmetric (zero point) integers (``rtn``; default True).
        fmt: number format (``format``: default ``"e4m3fn"``; ``mx``: default ``"e2m1"``).
        block: MX block size (``mx``; default 32).
        modules_to_not_convert: module names (or name patterns, as transformers matches
            them) kept in full precision; default ``["lm_head"]``, ``[]`` converts all.

    An option that the method does not take is refused (``ValueError``), so a typo cannot
    silently quantize with the defaults. ``to_dict`` writes the method's resolved options;
    ``from_dict`` reads them back.
    """

    # the method's options hold their resolved values, the others None
    threshold: float | None
    bits: int | None
    group_size: int | None
    symmetric: bool | None
    fmt: str | None
    block: int | None

    def __init__(
        self,
        method: str,
        threshold: float | None = None,
        bits: int | None = None,
        group_size: int | None | str = "default",
        symmetric: bool | None = None,
        fmt: str | None = None,
        block: int | None = None,
        modules_to_not_convert: list[str] | None = None,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(
                f"LowbitConfig: quant_method={quant_method!r}; it must be {QUANT_METHOD!r} "
                "(load other checkpoints with their own config class)"
            )
        if kwargs:
            raise ValueError(
                f"LowbitConfig: unknown option(s) {sorted(kwargs)}; the options are "
                f"{list(_ALL_OPTIONS)} and modules_to_not_convert"
            )
        if method not in METHODS:
            raise ValueError(f"LowbitConfig: method={method!r} is unknown; use one of {METHODS}")
        if group_size is None:  # as everywhere in lowbit: one scale per output channel
            group_size = 0
        given = dict(
            threshold=threshold,
            bits=bits,
            group_size=None if group_size == "default" else group_size,
            symmetric=symmetric,
            fmt=fmt,
            block=block,
        )
        defaults = _OPTIONS[method]
        foreign = [k for k, v in given.items() if v is not None and k not in defaults]
        if foreign:
            takes = ", ".join(defaults) or "no options"
            raise ValueError(
                f"LowbitConfig: method={method!r} takes {takes}, not {', '.join(foreign)}; "
                "drop it or choose the method that uses it"
            )
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]
        self.method = method
        for key in _ALL_OPTIONS:  # the method's options resolved, the others None
            value = defaults.get(key) if given[key] is None else given[key]
            setattr(self, key, value if key in defaults else None)
        if modules_to_not_convert is None:
            modules_to_not_convert = ["lm_head"]
        if isinstance(modules_to_not_convert, str) or not all(
            isinstance(m, str) for m in modules_to_not_convert
        ):
            raise ValueError(
                f"LowbitConfig: modules_to_not_convert={modules_to_not_convert!r}; "
                "pass a list of module names, e.g. ['lm_head']"
            )
        self.modules_to_not_convert = list(modules_to_not_convert)
        self._validate()

    @property
    def options(self) -> dict[str, Any]:
        """The method's options, resolved (``to_dict`` writes these)."""
        return {key: getattr(self, key) for key in _OPTIONS[self.method]}

    @property
    def module_class(self) -> type[nn.Module]:
        """The lowbit module class the method swaps in for ``nn.Linear``."""
        return QUANTIZED_MODULES[_MODULE_NAMES[self.method]]

    def module_options(self) -> dict[str, Any]:
        """The keyword options of the module's ``from_linear`` (group_size 0 -> None)."""
        opts = self.options
        if self.method == "rtn":
            opts["group_size"] = opts["group_size"] or None
        return opts

    def _validate(self) -> None:
        if self.method == "rtn":
            g = self.group_size
            if isinstance(g, bool) or not isinstance(g, int) or g < 0:
                raise ValueError(
                    f"LowbitConfig: group_size={g!r} is invalid; use a positive int (e.g. 128) "
                    "or 0 for one scale per output channel"
                )
        if self.method == "llm_int8":
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)):
                raise ValueError(
                    f"LowbitConfig: threshold={t!r} is invalid; use a float >= 0 (6.0, 0 = off)"
                )
        try:  # the module's constructor checks the rest, with its own one-line message
            self.empty_module(1, 1, bias=False, dtype=torch.float32, device="cpu")
        except (TypeError, ValueError) as err:
            raise ValueError(f"LowbitConfig(method={self.method!r}): {err}") from None

    def empty_module(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str = "meta",
    ) -> nn.Module:
        """The method's module for one linear layer, with empty buffers on ``device``.

        Built by the constructor with ``device=``: under a ``torch.device("meta")`` context the
        modules' own argument checks (e.g. ``float(torch.tensor(t))``) cannot run.
        """
        cls: Any = self.module_class
        shape = {
            "in_features": in_features,
            "out_features": out_features,
            "bias": bias,
            "weight_dtype": str(dtype).removeprefix("torch."),
        }
        # transformers calls this under a torch.device("meta") context: the checks' scalars
        # must live on the CPU, the buffers go to `device` explicitly
        with torch.device("cpu"):
            return cls(**cls._base_args(shape), **self.module_options(), device=device)

    def to_dict(self) -> dict[str, Any]:
        """quant_method, method, the method's resolved options and modules_to_not_convert."""
        return {
            "quant_method": QUANT_METHOD,
            "method": self.method,
            **self.options,
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LowbitConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


class _LowbitQuantize(ConversionOps):
    """transformers' quantize op: one dense checkpoint weight -> the lowbit module's buffers.

    It builds the module's ``from_linear`` result from the tensor, drops the module's float
    placeholder ``weight`` (which only made transformers route the checkpoint tensor here)
    and returns the buffers, which transformers then sets on the module.
    """

    def __init__(self, hf_quantizer: LowbitHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(  # type: ignore[override]
        self,
        input_dict: dict[str, Any],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        missing_keys: set[str] | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        if model is None or full_layer_name is None or len(input_dict) != 1:
            raise ValueError(
                "lowbit quantize op: expected one weight with model and full_layer_name "
                f"(got {sorted(input_dict)}); this transformers version loads differently"
            )
        value = next(iter(input_dict.values()))
        value = value[0] if isinstance(value, list) else value
        prefix, _, _ = full_layer_name.rpartition(".")
        module: Any = model.get_submodule(prefix)
        want = (module.out_features, module.in_features)
        if tuple(value.shape) != want:
            raise ValueError(
                f"lowbit: checkpoint weight {full_layer_name!r} has shape {tuple(value.shape)}, "
                f"the layer expects {want}; load the checkpoint the model config describes"
            )
        dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        dense.weight = nn.Parameter(value, requires_grad=False)
        opts = self.hf_quantizer.quantization_config.module_options()
        quantized = type(module).from_linear(dense, **opts)
        del module._parameters["weight"]  # the placeholder: the module now holds codes
        module._lowbit_pending = False
        module.weight_dtype = value.dtype
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {
            f"{prefix}.{name}": t.contiguous()
            for name, t in quantized.named_buffers()
            if name != "bias"
        }


class LowbitHfQuantizer(HfQuantizer):
    """The transformers quantizer of quant_method ``"lowbit"`` (see the module docstring)."""

    requires_calibration = False
    quantization_config: LowbitConfig

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any):
        if not isinstance(quantization_config, LowbitConfig):
            raise ValueError(
                f"LowbitHfQuantizer needs a LowbitConfig, got {type(quantization_config).__name__}"
            )
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if not self.pre_quantized and isinstance(device_map, dict):
            if "disk" in device_map.values():
                raise ValueError(
                    "lowbit quantizes while loading and cannot offload to disk; "
                    "drop 'disk' from device_map (or quantize, save, then load with offload)"
                )

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        prefix, _, name = param_name.rpartition(".")
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            return False
        return name == "weight" and bool(getattr(module, "_lowbit_pending", False))

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        config = self.quantization_config
        skip = list(config.modules_to_not_convert)
        skip += list(getattr(model, "_keep_in_fp32_modules", None) or [])
        # a layer whose weight is tied to another (lm_head to the embeddings) keeps a float
        # weight: the tie needs one, and the checkpoint stores it only once
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        skip += [re.escape(k.removesuffix(".weight")) for k in (*tied, *tied.values())]
        targets = [
            (name, mod)
            for name, mod in model.named_modules()
            if name and isinstance(mod, nn.Linear) and should_convert_module(name, skip)
        ]
        if not targets:
            warnings.warn(
                f"lowbit: no nn.Linear left to quantize (modules_to_not_convert={skip})",
                stacklevel=2,
            )
        for name, linear in targets:
            shell: Any = config.empty_module(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                dtype=linear.weight.dtype,
            )
            if not self.pre_quantized:
                # a float placeholder: the checkpoint's `<name>.weight` must find a parameter
                # to be routed to the quantize op (which removes it again)
                shell.weight = nn.Parameter(
                    torch.empty_like(linear.weight, device="meta"), requires_grad=False
                )
                shell._lowbit_pending = True
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, shell)
        if self.pre_quantized and targets:
            # the marker tensors under `<name>.weight` are expected: not "unexpected keys"
            names = "|".join(re.escape(name) for name, _ in targets)
            ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
            holder: Any = model  # a PreTrainedModel: the attribute is per instance
            holder._keys_to_ignore_on_load_unexpected = ignore | {rf"^(?:{names})\.weight$"}

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        pending = [n for n, m in model.named_modules() if getattr(m, "_lowbit_pending", False)]
        if pending:
            raise ValueError(
                f"lowbit: {len(pending)} layer(s) got no weight from the checkpoint (first: "
                f"{pending[0]!r}); load a checkpoint that matches the model config"
            )
        return model

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: every lowbit module back to an ``nn.Linear`` holding its
        dequantized weight in the layer's original dtype (``restore_linears``)."""
        from lowbit.fast.convert import restore_linears

        return restore_linears(model)

    def get_quantize_ops(self) -> ConversionOps:
        return _LowbitQuantize(self)

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, Any], dict]:
        """The model's state dict plus one marker tensor per lowbit layer under
        ``<layer>.weight`` (see the module docstring), and the config as metadata."""
        state = model.state_dict()
        lowbit_classes = tuple(QUANTIZED_MODULES.values())
        note = list(_MARKER_NOTE.encode("ascii"))
        for name, module in model.named_modules():
            if name and isinstance(module, lowbit_classes) and f"{name}.weight" not in state:
                # a fresh tensor per layer: transformers drops tensors that share storage
                state[f"{name}.weight"] = torch.tensor(note, dtype=torch.uint8)
        return state, {QUANT_METHOD: json.dumps(self.quantization_config.to_dict())}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _register() -> None:
    """Register the config and the quantizer under ``"lowbit"``; a re-import of this module
    (importlib.reload) replaces its own earlier classes, anything else is a conflict."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
    )

    for mapping, cls, register in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, LowbitConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, LowbitHfQuantizer, register_quantizer),
    ):
        known = mapping.get(QUANT_METHOD)
        if known is None:
            register(QUANT_METHOD)(cls)  # type: ignore[operator]
        elif (known.__module__, known.__qualname__) == (cls.__module__, cls.__qualname__):
            mapping[QUANT_METHOD] = cls  # type: ignore[index,assignment]
        else:
            raise ValueError(
                f"quant_method {QUANT_METHOD!r} is already registered with transformers by "
                f"{known.__module__}.{known.__qualname__}; unregister it before importing lowbit's"
            )


_register()
