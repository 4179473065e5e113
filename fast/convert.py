"""Swap quantized modules into any model and back, and save/load quantized models.

Works on any ``nn.Module`` tree (Hugging Face BERT and LLaMA families included): the
functions only look at ``nn.Linear`` leaves and at modules that follow the quantized-module
protocol of ``lowbit.fast.nn`` (``to_linear()``, ``lowbit_config()``, ``from_config()``).

Public functions:

* ``replace_linears(model, make, *, skip=("lm_head",), progress=True)``: for every
  ``nn.Linear`` whose qualified name does not end with an entry of ``skip``, call
  ``make(name, linear)`` and swap in what it returns (``None`` leaves the layer alone).
* ``restore_linears(model)``: swap every quantized module back to the plain ``nn.Linear``
  its ``to_linear()`` returns (dequantized weights).
* ``save_quantized(model, path)``: one safetensors file (atomic write) with the full state
  dict and, in its metadata, which modules are quantized and how (``"lowbit"`` key).
* ``load_quantized(model, path)``: rebuild the quantized modules into a freshly built
  full-precision skeleton from that metadata, then load the state dict strictly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

from lowbit.fast._io import atomic_write_bytes
from torch import nn

__all__ = ["replace_linears", "restore_linears", "save_quantized", "load_quantized"]

METADATA_KEY = "lowbit"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (``""`` is not allowed: no root swap)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def replace_linears(
    model: nn.Module,
    make: Callable[[str, nn.Linear], nn.Module | None],
    *,
    skip: tuple[str, ...] = ("lm_head",),
    progress: bool = True,
) -> nn.Module:
    """Swap ``make(name, linear)`` in for every ``nn.Linear`` not named in ``skip``; return ``model``.

    The list of linears is taken before any swap, so a ``make`` that returns a module
    containing linears does not recurse. ``make`` returning ``None`` keeps the layer.
    """
    if not callable(make):
        raise ValueError(
            "replace_linears: `make` must be a callable (name, linear) -> module or None"
        )
    if isinstance(skip, str):
        skip = (skip,)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name and not _skipped(name, skip)
    ]
    iterator: Iterable[tuple[str, nn.Linear]] = targets
    if progress and targets:
        from tqdm.auto import tqdm

        iterator = tqdm(targets, desc="quantizing linears", leave=False)
    for name, linear in iterator:
        new = make(name, linear)
        if new is not None:
            _set_submodule(model, name, new)
    return model


def restore_linears(model: nn.Module) -> nn.Module:
    """Swap every module with a ``to_linear()`` method back to its plain ``nn.Linear``."""
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
    loaded strictly (every key must match).
    """
    from lowbit.fast.nn import QUANTIZED_MODULES
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(
            f"load_quantized: {path!r} does not exist; write it with save_quantized first"
        )
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        raise ValueError(
            f"load_quantized: {path!r} has no {METADATA_KEY!r} metadata; it was not written by save_quantized"
        )
    entries = json.loads(metadata[METADATA_KEY])
    for name, entry in entries.items():
        cls_name = entry["class"]
        if cls_name not in QUANTIZED_MODULES:
            raise ValueError(
                f"load_quantized: unknown quantized module class {cls_name!r} for {name!r}; "
                f"known: {sorted(QUANTIZED_MODULES)}"
            )
        shell = QUANTIZED_MODULES[cls_name].from_config(entry["config"])
        _set_submodule(model, name, shell)
    state = load_file(path)
    model.load_state_dict(state, strict=True)
    return model
