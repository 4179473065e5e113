"""Export quantized models to the on-disk formats other engines load (``lowbit export``).

``export(model, out_dir, format="compressed-tensors", ...)`` quantizes every ``nn.Linear`` of a
Hugging Face model (except ``ignore``, the output head by default) with lowbit's shared uniform
quantizer (``lowbit.fast.uniform``, round to nearest: "RTN") and writes a complete model folder:
``config.json`` with a ``quantization_config``, the tokenizer's files when one is given, and
``model.safetensors``. The folder appears only once complete: everything is written into a
temporary sibling folder that is renamed into place.

Formats (the layouts are those the libraries' own loaders read, measured in
``../shared/spec/interop.md``):

* ``"compressed-tensors"``, format ``pack-quantized`` (what vLLM and llm-compressor load; W4A16,
  W3A16 and W8A16): per linear ``<p>.weight_packed`` int32 ``[O, ceil(I * b / 32)]``, the signed
  codes offset by 2^(b-1) in one little-endian bit stream per row (dense across words: the
  layout of compressed-tensors >= 0.18), ``<p>.weight_scale`` ``[O, I / G]`` in the model's
  dtype, ``<p>.weight_shape`` ``[O, I]`` and, asymmetric only, ``<p>.weight_zero_point`` int32,
  the signed zero points packed along the output rows. Values: W = (q - zp) * s, bit for bit
  lowbit's ``uniform.decode`` for a float32 model (16-bit models store 16-bit scales). ``method="rtn"``.
* ``"compressed-tensors"``, format ``float-quantized`` (FP8 weights, W8A16): ``<p>.weight``
  float8_e4m3fn codes of W / s with one scale s = max|W_row| / 448 per output channel (an
  all-zero row keeps scale 0 and zero codes), ``<p>.weight_scale`` ``[O, 1]``. W = w * s.
  ``method="fp8"``.
* ``"bitsandbytes"`` (Hugging Face's bitsandbytes int8 checkpoints, ``method="llm_int8"``): every
  linear as LLM.int8()'s row-wise absmax int8 (lowbit's ``Linear8bitLt``, exported as it is
  where the model already holds one): ``<p>.weight`` int8 ``[O, I]``, ``<p>.SCB`` float32
  ``[O]`` (the row absmax), ``<p>.weight_format`` 0; ``quantization_config`` with
  ``load_in_8bit`` and the modules' ``llm_int8_threshold``. transformers loads it as
  ``bitsandbytes.nn.Linear8bitLt`` (on CPU with ``device_map="cpu"``, which needs accelerate);
  in ``eval()`` that runs LLM.int8() in float16.

What a format cannot hold exactly is refused with one line naming what can: a group size that
does not divide a layer's inputs (lowbit's uniform quantizer would make the last group shorter;
compressed-tensors has no such group), bit widths other than 3, 4 and 8.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.fast import _io, uniform

__all__ = ["FORMATS", "METHODS", "COMPRESSED_TENSORS_VERSION", "pack_rows", "check_out_dir"]
__all__ += ["check_options", "export"]

FORMATS = ("compressed-tensors", "bitsandbytes")
# the methods each format holds: round-to-nearest integers (pack-quantized), FP8 E4M3
# (float-quantized), LLM.int8()'s vector-wise int8 weights (bitsandbytes)
METHODS = {"compressed-tensors": ("rtn", "fp8"), "bitsandbytes": ("llm_int8",)}
# The compressed-tensors release whose layouts these files follow (3-bit codes are packed
# densely across int32 words since 0.18.0; 4- and 8-bit layouts are the same in all versions).
COMPRESSED_TENSORS_VERSION = "0.20.1"
PACK_BITS = (3, 4, 8)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers ``values`` (rows, n), each < 2^bits, as int32 words (rows,
    ceil(n * bits / 32)): element j of a row occupies bits [j * bits, (j + 1) * bits) of the
    row's little-endian bit stream (for 4 bits: 8 per word, the first in the low nibble)."""
    rows, n = values.shape
    words = math.ceil(n * bits / 32)
    v = values.to(torch.int64)
    out = torch.zeros(rows, words, dtype=torch.int64)
    start = torch.arange(n) * bits  # first bit of each element
    for b in range(bits):  # one pass per bit of the code: a bit lands in exactly one word
        pos = start + b
        bit = (v >> b) & 1
        out.index_add_(1, pos // 32, bit << (pos % 32))
    # the words hold unsigned 32-bit patterns: reinterpret as int32 (two's complement)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir`` as a Path, if it can become the export's folder: absent, or an empty folder,
    in a writable place (``_io.check_out_dir``'s probe). One-line ``ValueError`` otherwise."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"output folder {out} exists and is not empty: pass another --out")
    _io.check_out_dir(out)
    return out


def check_options(
    format: str, method: str, bits: int, group_size: int | None, symmetric: bool
) -> None:
    """One-line ``ValueError`` for an option the format cannot hold (before any work)."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if method not in METHODS[format]:
        other = [f for f, ms in METHODS.items() if method in ms]
        hint = f" (format {other[0]} holds it)" if other else ""
        raise ValueError(
            f"format {format} cannot hold method {method!r}{hint}; choose one of "
            f"{', '.join(METHODS[format])}"
        )
    if method == "llm_int8":
        return
    if method == "fp8":
        if bits != 8 or group_size is not None or not symmetric:
            raise ValueError(
                "compressed-tensors float-quantized holds FP8 E4M3 weights with one scale per "
                "output channel: pass --bits 8 --group-size 0 without --asymmetric"
            )
        return
    if bits not in PACK_BITS:
        raise ValueError(
            f"compressed-tensors pack-quantized holds 3-, 4- or 8-bit weights, not {bits}-bit: "
            "pass --bits 3, 4 or 8"
        )
    if group_size is not None and (isinstance(group_size, bool) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be True or False, got {symmetric!r}")


def _kept(name: str, ignore: Sequence[str]) -> bool:
    """Whether module ``name`` is quantized: ``ignore`` names modules (``lm_head``) or paths."""
    return name not in ignore and name.split(".")[-1] not in ignore


def _quantizable(model: nn.Module, ignore: Sequence[str]) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and _kept(n, ignore)}


def _pack_linear(
    name: str, lin: nn.Linear, bits: int, group_size: int | None, symmetric: bool
) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one linear (pack-quantized)."""
    w = lin.weight.detach().cpu()
    out_f, in_f = w.shape
    if group_size is not None and in_f % group_size:
        raise ValueError(
            f"layer {name!r} has {in_f} inputs, which group size {group_size} does not divide: "
            "compressed-tensors has no shorter last group; pass a group size that divides every "
            "layer's inputs, or none (per channel)"
        )
    granularity = "channel" if group_size is None else "group"
    codes, scale, zero = uniform.encode(
        w, bits, symmetric=symmetric, granularity=granularity, group_size=group_size
    )
    offset = 2 ** (bits - 1)
    stored = codes.to(torch.int64) + (offset if symmetric else 0)  # unsigned, in [0, 2^b)
    tensors = {
        f"{name}.weight_packed": pack_rows(stored, bits),
        f"{name}.weight_scale": scale.to(w.dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not symmetric:
        assert zero is not None
        # compressed-tensors' zero point is signed like its codes (z - 2^(b-1)) and stored with
        # the same offset, which gives lowbit's unsigned z back; packed along dim 0
        tensors[f"{name}.weight_zero_point"] = pack_rows(
            zero.to(torch.int64).T, bits
        ).T.contiguous()
    return tensors


def _fp8_linear(name: str, lin: nn.Linear) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one linear (float-quantized: FP8 E4M3, per channel)."""
    from lowbit.fast import formats

    w = lin.weight.detach().cpu().float()
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0  # E4M3FN's largest finite value
    codes = formats.encode(w / torch.where(scale > 0, scale, 1.0), "e4m3fn")  # saturating
    return {
        f"{name}.weight": codes.view(torch.float8_e4m3fn),
        f"{name}.weight_scale": scale.to(lin.weight.dtype),
    }


def _bitsandbytes_state(
    model: nn.Module, ignore: Sequence[str], progress: bool
) -> tuple[dict[str, torch.Tensor], float]:
    """The bitsandbytes int8 state dict of ``model`` and its threshold: lowbit ``Linear8bitLt``
    modules as they are, other linears (not ignored) quantized like ``Linear8bitLt.from_linear``."""
    from tqdm.auto import tqdm

    from lowbit.fast.nn import Linear8bitLt, QuantizedLinear

    tensors = _unique_state(model)
    thresholds = set()
    modules = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, QuantizedLinear)) and _kept(name, ignore)
    ]
    for name, m in tqdm(modules, desc="export bitsandbytes", disable=not progress, leave=False):
        if isinstance(m, QuantizedLinear) and not isinstance(m, Linear8bitLt):
            raise ValueError(
                f"layer {name!r} is a lowbit {type(m).__name__}, which bitsandbytes int8 cannot "
                "hold: export it with format compressed-tensors, or quantize with Linear8bitLt"
            )
        if not isinstance(m, Linear8bitLt):
            assert isinstance(m, nn.Linear)
            m = Linear8bitLt.from_linear(m)
            tensors.pop(f"{name}.weight", None)
        else:
            tensors.pop(f"{name}.weight_codes", None)
            tensors.pop(f"{name}.weight_absmax", None)
        thresholds.add(m.threshold)
        tensors[f"{name}.weight"] = m.weight_codes.detach().cpu().contiguous()
        tensors[f"{name}.SCB"] = m.weight_absmax.detach().cpu().float().contiguous()
        tensors[f"{name}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
    if not modules:
        raise ValueError("the model has no linear layers to quantize (all ignored?)")
    if len(thresholds) > 1:
        raise ValueError(
            f"bitsandbytes keeps one llm_int8_threshold per model; the layers use {sorted(thresholds)}"
        )
    return tensors, thresholds.pop()


def _quantization_config(
    method: str, bits: int, group_size: int | None, symmetric: bool, ignore: Sequence[str]
) -> dict[str, Any]:
    fmt = "float-quantized" if method == "fp8" else "pack-quantized"
    weights = {
        "num_bits": bits,
        "type": "float" if method == "fp8" else "int",
        "symmetric": symmetric,
        "strategy": "channel" if group_size is None else "group",
        "group_size": group_size,
        "dynamic": False,
        "observer": "minmax",
    }
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": COMPRESSED_TENSORS_VERSION,
    }


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied tensors (the config re-ties them)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in model.state_dict().items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        if value.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = value.detach().cpu().contiguous()
    return out


def export(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    format: str = "compressed-tensors",
    *,
    method: str | None = None,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = True,
    tokenizer: Any = None,
    ignore: Sequence[str] = ("lm_head",),
    progress: bool = True,
) -> Path:
    """Quantize ``model``'s linears with ``method`` (``"rtn"``: ``lowbit.fast.uniform``;
    ``"fp8"``: E4M3 per channel; ``"llm_int8"``: row-wise int8; default: the format's first,
    ``METHODS``) and write them in ``format`` to ``out_dir`` (see the module
    docstring); returns the folder's path.

    ``bits`` 3, 4 or 8 (``"fp8"``: 8, with ``group_size=None``); ``group_size`` a divisor of
    every quantized layer's inputs (None: one scale per output channel); ``symmetric=False`` adds zero points. ``model`` is a Hugging
    Face ``PreTrainedModel`` (its ``config`` is written); it is not modified. ``out_dir`` must
    not exist or be empty: a half-written folder never looks complete.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if format in METHODS and method is None:
        method = METHODS[format][0]  # rtn for compressed-tensors, llm_int8 for bitsandbytes
    check_options(format, str(method), bits, group_size, symmetric)
    assert method is not None
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("export needs a Hugging Face PreTrainedModel (one with a .config)")
    out = check_out_dir(out_dir)
    config_dict = config.to_dict()
    if format == "bitsandbytes":
        tensors, threshold = _bitsandbytes_state(model, ignore, progress)
        config_dict["quantization_config"] = {
            "quant_method": "bitsandbytes",
            "load_in_8bit": True,
            "load_in_4bit": False,
            "llm_int8_threshold": threshold,
            "llm_int8_skip_modules": list(ignore),
            "llm_int8_has_fp16_weight": False,
        }
    else:
        linears = _quantizable(model, ignore)
        if not linears:
            raise ValueError("the model has no nn.Linear layers to quantize (all ignored?)")
        tensors = _unique_state(model)
        for name, lin in tqdm(linears.items(), desc=f"export {format}", disable=not progress,
                              leave=False):  # fmt: skip
            tensors.pop(f"{name}.weight", None)
            if method == "fp8":
                tensors.update(_fp8_linear(name, lin))
            else:
                tensors.update(_pack_linear(name, lin, bits, group_size, symmetric))
        config_dict["quantization_config"] = _quantization_config(
            method, bits, group_size, symmetric, ignore
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
