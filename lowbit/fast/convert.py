"""Swap quantized modules into any model and back, and save/load quantized models.

Works on any ``nn.Module`` tree (Hugging Face BERT, LLaMA and GPT-2 families included): the
functions only look at ``nn.Linear`` leaves, at Hugging Face ``Conv1D`` leaves (GPT-2's linear
layers, weight stored transposed) and at modules that follow the quantized-module protocol of
``lowbit.fast.nn`` (``to_linear()``, ``lowbit_config()``, ``from_config()``).

Public functions:

* ``replace_linears(model, make, *, skip=("lm_head",), progress=True)``: for every
  ``nn.Linear`` or ``Conv1D`` whose qualified name does not end with an entry of ``skip``, call
  ``make(name, linear)`` and swap in what it returns (``None`` leaves the layer alone). A
  ``Conv1D`` is handed to ``make`` as the equivalent ``nn.Linear``, so every quantized module
  works on GPT-2 unchanged. Warns when nothing was replaced.
* ``restore_linears(model)``: swap every quantized module back to the plain ``nn.Linear``
  its ``to_linear()`` returns (dequantized weights; a former ``Conv1D`` comes back as an
  equivalent ``nn.Linear``).
* ``conv1d_to_linear(conv)``: the ``nn.Linear`` equivalent to a ``Conv1D`` (weight transposed).
* ``save_quantized(model, path)``: one safetensors file (atomic write) with the full state
  dict and, in its metadata, which modules are quantized and how (``"lowbit"`` key).
* ``load_quantized(model, path)``: rebuild the quantized modules into a freshly built
  full-precision skeleton from that metadata, then load the state dict strictly.

transformers is optional: ``Conv1D`` is recognised by its class name, its ``nf`` attribute and
its 2-D weight, never imported.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable
from typing import cast

import torch
from torch import nn

from lowbit.fast._io import atomic_write_bytes

__all__ = [
    "replace_linears",
    "restore_linears",
    "save_quantized",
    "load_quantized",
    "conv1d_to_linear",
]

METADATA_KEY = "lowbit"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (``""`` is not allowed: no root swap)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT-1): ``y = x @ W + b``
    with W stored (in, out) and ``nf`` = out features. Recognised without importing
    transformers."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(getattr(module, "nf", None), int)
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and weight.shape[1] == module.nf
    )


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what a Hugging Face ``Conv1D`` computes.

    Its weight is the Conv1D weight transposed to (out, in) and made contiguous (a copy), its
    bias a copy of the Conv1D bias; dtype, device and ``requires_grad`` are kept. The outputs
    agree up to float rounding (``torch.addmm`` on W vs ``linear`` on W.T may sum in another
    order).

    Raises:
        ValueError: ``conv`` is not a Conv1D (class name ``Conv1D``, int ``nf``, 2-D weight).
    """
    if not _is_conv1d(conv):
        raise ValueError(
            f"conv1d_to_linear expects a transformers Conv1D (nf attribute, (in, nf) weight), got {type(conv).__name__}"
        )
    weight = cast(torch.Tensor, conv.weight)  # (in, out)
    bias = cast("torch.Tensor | None", getattr(conv, "bias", None))  # (out,)
    in_features, out_features = weight.shape
    # built on the meta device: no random init of a weight that is overwritten at once
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(
        weight.detach().t().contiguous(), requires_grad=weight.requires_grad
    )  # (out, in)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return linear


def replace_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module | None],
    *,
    skip: tuple[str, ...] = ("lm_head",),
    progress: bool = True,
) -> nn.Module:
    """Swap ``make(name, linear)`` in for every linear layer not named in ``skip``; return ``model``.

    The linear layers are the ``nn.Linear`` submodules and the Hugging Face ``Conv1D`` ones
    (GPT-2). A ``Conv1D`` is first converted to the equivalent ``nn.Linear``
    (``conv1d_to_linear``: weight transposed to (out, in)), and ``make`` receives that, so every
    quantized module of ``lowbit.fast.nn`` works on it unchanged; if ``make`` returns ``None``
    the original ``Conv1D`` stays in place.

    The list of linears is taken before any swap, so a ``make`` that returns a module
    containing linears does not recurse. ``make`` returning ``None`` keeps the layer. When
    nothing was replaced (no linear layer, all of them in ``skip``, or ``make`` returned
    ``None`` for all) a ``UserWarning`` says so and ``model`` is returned unchanged. The root
    module itself is never swapped.
    """
    if not callable(make):
        raise ValueError(
            "replace_linears: `make` must be a callable (name, linear) -> module or None"
        )
    if isinstance(skip, str):
        skip = (skip,)
    linears = [
        (name, mod)
        for name, mod in model.named_modules()
        if name and (isinstance(mod, nn.Linear) or _is_conv1d(mod))
    ]
    targets = [(name, mod) for name, mod in linears if not _skipped(name, skip)]
    iterator: Iterable[tuple[str, nn.Module]] = targets
    if progress and targets:
        from tqdm.auto import tqdm

        iterator = tqdm(targets, desc="quantizing linears", leave=False)
    replaced = 0
    for name, mod in iterator:
        linear = mod if isinstance(mod, nn.Linear) else conv1d_to_linear(mod)
        new = make(name, linear)
        if new is not None:
            _set_submodule(model, name, new)
            replaced += 1
    if not replaced:
        if not linears:
            why = "the model has no nn.Linear or Conv1D submodule"
        else:
            why = (
                f"of its {len(linears)} nn.Linear/Conv1D layers {len(linears) - len(targets)} "
                f"matched skip={skip!r} and `make` returned None for the other {len(targets)}"
            )
        warnings.warn(f"replace_linears replaced nothing: {why}", stacklevel=2)
    return model


def restore_linears(model: nn.Module) -> nn.Module:
    """Swap every module with a ``to_linear()`` method back to its plain ``nn.Linear``.

    The restored model computes what the quantized one computed with dequantized weights, but
    is not identical in class: a layer that was a Hugging Face ``Conv1D`` before
    ``replace_linears`` comes back as the equivalent ``nn.Linear`` (weight (out, in)), so code
    that expects ``Conv1D`` there (e.g. GPT-2's ``prune_heads``) does not apply to it.
    """
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if name and callable(getattr(mod, "to_linear", None))
    ]
    for name, mod in targets:
        _set_submodule(model, name, mod.to_linear())
    return model


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: mod
        for name, mod in model.named_modules()
        if name and callable(getattr(mod, "lowbit_config", None))
    }


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the full state dict and the quantized-module metadata to one safetensors file.

    The file is written to a temporary name in the same folder and renamed, so a crash
    never leaves a half-written file under ``path``.
    """
    from safetensors.torch import save

    path = os.fspath(path)
    meta = {
        name: {"class": type(mod).__name__, "config": mod.lowbit_config()}  # type: ignore[operator]
        for name, mod in _quantized_modules(model).items()
    }
    # safetensors refuses shared or non-contiguous storage: store independent contiguous copies.
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={METADATA_KEY: json.dumps(meta)}))


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild the quantized modules named in ``path``'s metadata into ``model`` and load it.

    ``model`` is a freshly built full-precision skeleton of the same architecture; each
    quantized layer is replaced by ``cls.from_config(config)`` and the state dict is then
    loaded strictly. The file is checked first, and every problem is one ``ValueError`` that
    names the file and the key: the metadata must be a JSON object of
    ``{module name: {"class": registered class, "config": {...}}}`` naming modules that exist
    in ``model``; the file must hold exactly the model's tensor names; every tensor must have
    the model's shape, and the model's dtype where that is an integer dtype or the tensor belongs
    to a quantized module (codes stored as float would otherwise be truncated silently). Other
    floating-point tensors may be stored in another float dtype, as ``load_state_dict`` allows.
    """
    from safetensors import SafetensorError, safe_open

    from lowbit.fast.nn import QUANTIZED_MODULES

    path = os.fspath(path)
    where = f"load_quantized: {path!r}"
    if not os.path.exists(path):
        raise ValueError(f"{where} does not exist; write it with save_quantized first")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{where} is not a readable safetensors file ({err})") from None
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"{where} has no {METADATA_KEY!r} metadata; it was not written by save_quantized"
        )
    entries = _parse_entries(metadata[METADATA_KEY], where)
    for name, entry in entries.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{where}: metadata names module {name!r}, which the model does not have; "
                "build the same architecture the file was saved from"
            ) from None
        cls = QUANTIZED_MODULES.get(entry["class"])
        if cls is None:
            raise ValueError(
                f"{where}: unknown quantized module class {entry['class']!r} for {name!r}; "
                f"known: {sorted(QUANTIZED_MODULES)}"
            )
        try:
            shell = cls.from_config(entry["config"])  # type: ignore[attr-defined]
        except KeyError as err:
            raise ValueError(
                f"{where}: the config of {name!r} ({cls.__name__}) lacks key {err.args[0]!r}"
            ) from None
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: the config of {name!r} is invalid: {err}") from None
        _set_submodule(model, name, shell)
    _check_tensors(model.state_dict(), state, set(entries), where)
    model.load_state_dict(state, strict=True)
    return model


def _parse_entries(text: str, where: str) -> dict[str, dict]:
    """The ``"lowbit"`` metadata as {module name: {"class": str, "config": dict}}, or a
    one-line error naming the key that is wrong."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: the {METADATA_KEY!r} metadata is not JSON ({err})") from None
    if not isinstance(entries, dict):
        raise ValueError(
            f"{where}: the {METADATA_KEY!r} metadata must map module names to entries, "
            f"got {type(entries).__name__}"
        )
    for name, entry in entries.items():
        if not name:
            raise ValueError(
                f"{where}: metadata names the root module ''; only submodules can be quantized"
            )
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: metadata entry {name!r} must be an object, got {entry!r}")
        for key, kind in (("class", str), ("config", dict)):
            if not isinstance(entry.get(key), kind):
                raise ValueError(
                    f"{where}: metadata entry {name!r} needs a {key!r} {kind.__name__}, "
                    f"got {entry.get(key)!r}"
                )
    return entries


def _check_tensors(
    expected: dict[str, torch.Tensor],
    stored: dict[str, torch.Tensor],
    quantized: set[str],
    where: str,
) -> None:
    """Same names, shapes and (see ``load_quantized``) dtypes as the model expects."""
    missing, extra = sorted(expected.keys() - stored), sorted(stored.keys() - expected)
    if missing or extra:
        parts = [
            f"lacks {missing[:3]}" if missing else "",
            f"has unexpected {extra[:3]}" if extra else "",
        ]
        raise ValueError(
            f"{where} {' and '.join(p for p in parts if p)} (of {len(missing)} missing, "
            f"{len(extra)} unexpected tensors): build the architecture the file was saved from"
        )
    for key, want in expected.items():
        got = stored[key]
        if got.shape != want.shape:
            raise ValueError(
                f"{where}: tensor {key!r} has shape {tuple(got.shape)}, the model expects "
                f"{tuple(want.shape)}"
            )
        in_quantized = any(key.startswith(name + ".") for name in quantized)
        floats = got.is_floating_point() and want.is_floating_point()
        if got.dtype != want.dtype and (in_quantized or not floats):
            raise ValueError(
                f"{where}: tensor {key!r} is stored as {got.dtype}, the model expects "
                f"{want.dtype}; re-save it with save_quantized"
            )
