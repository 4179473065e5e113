"""Export quantized models to the on-disk formats other engines load (``lowbit export``).

``export(model, out_dir, format="compressed-tensors", method=..., ...)`` quantizes the
``nn.Linear`` layers of a Hugging Face model (except ``ignore``, the output head by default),
or takes the lowbit modules it already holds, and writes what the format's own loader reads.
The folder appears only once complete: everything is written into a hidden sibling folder that
is renamed into place. The layouts are those measured with the libraries' own loaders
(``../shared/spec/interop.md``); the user guide is docs/export.md.

``"compressed-tensors"`` (vLLM, transformers, llm-compressor): a model folder with
``config.json`` (its ``quantization_config``), the tokenizer's files and ``model.safetensors``.
Per quantized linear ``<p>``, by method:

* ``"rtn"``, format ``pack-quantized`` (W3A16 / W4A16 / W8A16): lowbit's shared uniform
  quantizer (``lowbit.fast.uniform``, round to nearest); ``<p>.weight_packed`` int32
  ``[O, ceil(I * b / 32)]``, the codes offset by 2^(b-1) in one little-endian bit stream per
  row (dense across words: compressed-tensors >= 0.18), ``<p>.weight_scale`` ``[O, I / G]``
  in the model's dtype, ``<p>.weight_shape`` and, asymmetric, ``<p>.weight_zero_point`` int32
  packed along the output rows. W = (q - zp) · s, bit for bit ``uniform.decode`` in float32.
* ``"omniquant"``, format ``pack-quantized`` with zero points: a calibrated model's
  ``OmniQuantLinear`` codes, float32 scales and zero points as they are.
* ``"fp8"``, format ``float-quantized`` (W8A16): ``<p>.weight`` float8_e4m3fn codes of W / s,
  s = max|W_row| / 448 per output channel (a zero row keeps s = 0), ``<p>.weight_scale``.
* ``"llm_int8"``, format ``int-quantized`` (W8A8): LLM.int8()'s row-wise int8 codes and
  ``<p>.weight_scale`` = absmax / 127 (float32); the loader quantizes activations per token.
  The outlier decomposition has no representation in the format and is left out.
* ``"mxfp4"`` / ``"nvfp4"``, formats ``mxfp4-`` / ``nvfp4-pack-quantized`` (W4A16): E2M1
  codes two a byte (element 2i in the low nibble) with E8M0 scales per 32 inputs, or E4M3
  scales per 16 inputs and a float32 global scale per layer (``nvfp4_export_scale``: a power
  of two, so every weight is exact in bfloat16), ``lowbit.fast.formats``' codes bit for bit.

``"bitsandbytes"`` (transformers' int8 checkpoints, ``method="llm_int8"``): ``<p>.weight``
int8, ``<p>.SCB`` the float32 row absmax, ``<p>.weight_format`` 0, and a
``quantization_config`` with ``load_in_8bit`` and the modules' ``llm_int8_threshold``.
transformers loads it as ``bitsandbytes.nn.Linear8bitLt`` (on CPU with ``device_map="cpu"``).

``"gguf"`` (llama.cpp, transformers; LLaMA-architecture models): a folder holding
``model.gguf``, RTN as Q8_0 / Q4_0 with float16 scales, or MXFP4; see ``lowbit.fast._gguf``.

What a format cannot hold exactly is refused with one line naming what can: a bit width or
group size the format lacks, groups that do not divide a layer (compressed-tensors has no
shorter last group), zero points where the format has none, non-finite weights, lowbit modules
of another method.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.fast import _io, formats, uniform

__all__ = ["FORMATS", "METHODS", "COMPRESSED_TENSORS_VERSION", "pack_rows", "check_out_dir"]
__all__ += ["check_options", "export", "nvfp4_export_scale"]

FORMATS = ("compressed-tensors", "bitsandbytes", "gguf")
# The methods each format holds (the first is its default). compressed-tensors: round-to-nearest
# integers (pack-quantized), FP8 E4M3 (float-quantized), LLM.int8()'s vector-wise int8 weights
# (int-quantized W8A8), MXFP4 and NVFP4 (mxfp4- / nvfp4-pack-quantized), OmniQuant's calibrated
# OmniQuantLinear modules (pack-quantized); bitsandbytes: LLM.int8(); GGUF: RTN as Q8_0 / Q4_0,
# MXFP4.
METHODS = {
    "compressed-tensors": ("rtn", "fp8", "llm_int8", "mxfp4", "nvfp4", "omniquant"),
    "bitsandbytes": ("llm_int8",),
    "gguf": ("rtn", "mxfp4"),
}
# Methods whose bits and blocks are fixed: (bits, inputs per scale or None for one per output
# channel, what to pass instead of other values)
FIXED = {
    "fp8": (8, None, "--bits 8 --group-size 0"),
    "llm_int8": (8, None, "--bits 8 --group-size 0"),
    "mxfp4": (4, 32, "--bits 4 --group-size 32"),
    "nvfp4": (4, 16, "--bits 4 --group-size 16"),
}
AUTO = "auto"  # bits / group_size: the method's own (rtn: 4 bits, groups of 128; GGUF 32)
GGUF_FILE = "model.gguf"
GGUF_BLOCK = 32  # Q8_0, Q4_0 and MXFP4 blocks
COMPRESSED_TENSORS_VERSION = "0.20.1"
PACK_BITS = tuple(range(2, 9))  # any width up to a byte packs into the bit stream


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


def _scheme_words(bits: int, group: int | None) -> str:
    return f"{bits}-bit weights with one scale per " + (
        "output channel" if group is None else f"{group} inputs"
    )


def check_options(
    format: str,
    method: str,
    bits: int | None | str = AUTO,
    group_size: int | None | str = AUTO,
    symmetric: bool = True,
) -> tuple[int | None, int | None]:
    """The ``(bits, group_size)`` the export will use, or a one-line ``ValueError`` for an
    option the format cannot hold, naming what can (run before any work). ``AUTO`` (or bits
    None) picks the method's own; ``group_size`` None or 0 means one scale per output channel."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if method not in METHODS[format]:
        other = [f for f, ms in METHODS.items() if method in ms]
        hint = f" (format {other[0]} holds it)" if other else ""
        raise ValueError(
            f"format {format} cannot hold method {method!r}{hint}; choose one of "
            f"{', '.join(METHODS[format])}"
        )
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be True or False, got {symmetric!r}")
    if bits is not None and bits != AUTO and (isinstance(bits, bool) or not isinstance(bits, int)):
        raise ValueError(f"bits must be an integer (or None: the method's own), got {bits!r}")
    if group_size != AUTO and group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
            raise ValueError(
                "group_size must be a positive integer, None or 0 (one scale per output "
                f"channel) or 'auto', got {group_size!r}"
            )
        group_size = group_size or None
    if method == "omniquant":
        if bits not in (None, AUTO) or group_size != AUTO or not symmetric:
            raise ValueError(
                "method omniquant exports the calibrated OmniQuantLinear modules with their own "
                "bits, groups and zero points: leave bits, group_size and symmetric unset"
            )
        return None, None
    if method in FIXED:
        want_bits, want_group, flags = FIXED[method]
        if bits not in (None, AUTO, want_bits) or group_size not in (AUTO, want_group):
            raise ValueError(
                f"method {method} has {_scheme_words(want_bits, want_group)}: leave bits and "
                f"group_size unset, or pass bits={want_bits}, group_size={want_group} ({flags})"
            )
        if not symmetric:
            raise ValueError(
                f"method {method} has no zero points: pass symmetric=True (drop --asymmetric); "
                "method rtn in format compressed-tensors holds zero points"
            )
        return want_bits, want_group
    # rtn
    b = 4 if bits in (None, AUTO) else int(bits)  # type: ignore[arg-type]
    g = (GGUF_BLOCK if format == "gguf" else 128) if group_size == AUTO else group_size
    assert g is None or isinstance(g, int)
    if format == "gguf":
        if b not in (4, 8) or not symmetric:
            raise ValueError(
                "GGUF holds symmetric 4- and 8-bit integers (Q4_0, Q8_0) with float16 scales: "
                "pass bits 4 or 8 with symmetric=True (--bits 4 or 8, no --asymmetric), or use "
                "format compressed-tensors (2-8 bits, zero points)"
            )
        if g is not None and g % GGUF_BLOCK:
            raise ValueError(
                f"GGUF blocks hold {GGUF_BLOCK} values: a group size of {g} cannot be expressed; "
                f"pass a multiple of {GGUF_BLOCK} (or None, --group-size 0: per channel), or use "
                "format compressed-tensors (any group size dividing the layers)"
            )
        return b, g
    if b not in PACK_BITS:
        raise ValueError(
            f"compressed-tensors pack-quantized holds 2- to 8-bit weights, not {b}-bit: "
            "pass bits 2 to 8 (--bits)"
        )
    return b, g


def _kept(name: str, ignore: Sequence[str]) -> bool:
    """Whether module ``name`` is quantized: ``ignore`` names modules (``lm_head``) or paths."""
    return name not in ignore and name.split(".")[-1] not in ignore


def _layers(model: nn.Module, method: str, format: str, ignore: Sequence[str]) -> dict[str, Any]:
    """The layers written quantized, by name: the ``nn.Linear``s not ignored, quantized by
    ``method``, and the lowbit modules that the method exports as they are (``Linear8bitLt``
    for llm_int8, ``OmniQuantLinear`` for omniquant, whose plain linears stay dense). Refused:
    any other lowbit module (its quantization is not the method's), and a linear whose weight is
    tied to another tensor (the file would hold one quantized, one float copy)."""
    from lowbit.fast.nn import Linear8bitLt, QuantizedLinear
    from lowbit.fast.nn.omniquant import OmniQuantLinear

    as_is = {"llm_int8": Linear8bitLt, "omniquant": OmniQuantLinear}.get(method)
    uses: dict[int, int] = {}  # how many names each parameter has (tied weights: several)
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    layers: dict[str, Any] = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, QuantizedLinear)) or not _kept(name, ignore):
            continue
        if isinstance(m, nn.Linear) and uses[id(m.weight)] > 1:
            raise ValueError(
                f"layer {name!r} shares its weight with another layer (tied embeddings), which "
                f"{format} cannot quantize: keep it in ignore (as by default), or untie it"
            )
        if isinstance(m, QuantizedLinear) and (as_is is None or not isinstance(m, as_is)):
            holds = "bitsandbytes or compressed-tensors with method llm_int8"
            if isinstance(m, OmniQuantLinear):
                holds = "compressed-tensors with method omniquant"
            elif not isinstance(m, Linear8bitLt):
                holds = "no export format yet: pass the float model with method rtn"
            raise ValueError(
                f"layer {name!r} is a lowbit {type(m).__name__}, which {format} with method "
                f"{method} cannot hold: export it as {holds}"
            )
        if method != "omniquant" or isinstance(m, OmniQuantLinear):
            layers[name] = m
    if not layers:
        what = "OmniQuantLinear layers (run lowbit.fast.nn.omniquant.calibrate first)"
        raise ValueError(
            f"the model has no {what if method == 'omniquant' else 'linear layers'} to export "
            "(all ignored?)"
        )
    return layers


def _weight(name: str, lin: nn.Linear, divisor: int | None = None, fix: str = "") -> torch.Tensor:
    """The finite (out, in) weight of a linear, on the CPU; a one-line error for what the
    format cannot hold: non-finite values, or inputs that ``divisor`` does not divide."""
    w = lin.weight.detach().cpu()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"layer {name!r} has non-finite weights: clean the model before export")
    if divisor is not None and w.shape[1] % divisor:
        raise ValueError(
            f"layer {name!r} has {w.shape[1]} inputs, which group size {divisor} does not divide: "
            f"compressed-tensors has no shorter last group; {fix}"
        )
    return w


def _pack_codes(
    name: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> dict[str, torch.Tensor]:
    """pack-quantized tensors from unsigned codes in [0, 2^bits) and, asymmetric, unsigned zero
    points (``zero``); symmetric codes come offset by 2^(bits-1)."""
    tensors = {
        f"{name}.weight_packed": pack_rows(codes.to(torch.int64), bits),
        f"{name}.weight_scale": scale.contiguous(),
        f"{name}.weight_shape": torch.tensor(list(codes.shape), dtype=torch.int64),
    }
    if zero is not None:
        # compressed-tensors' zero point is signed like its codes (z - 2^(b-1)) and stored with
        # the same offset, which gives lowbit's unsigned z back; packed along dim 0
        tensors[f"{name}.weight_zero_point"] = pack_rows(
            zero.to(torch.int64).T, bits
        ).T.contiguous()
    return tensors


def _stored_scale(name: str, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` rounded to the model's ``dtype``, where the file keeps it (float32 for
    float64 models); a one-line error where a nonzero scale would round to 0."""
    stored = scale.to(torch.float32 if dtype == torch.float64 else dtype)
    if bool(((stored == 0) & (scale > 0)).any()):
        raise ValueError(
            f"layer {name!r} has weights so small that their scale underflows {stored.dtype}: "
            "export the model in float32 (model.float())"
        )
    return stored


def _rtn_tensors(
    name: str, lin: nn.Linear, bits: int, group_size: int | None, symmetric: bool
) -> dict[str, torch.Tensor]:
    """pack-quantized: lowbit's uniform RTN codes. The scales are stored in the model's dtype
    (as compressed-tensors expects); for a 16-bit model they are rounded first and the codes
    computed with the rounded scale, so the file holds exactly q and s with W = (q - z) · s."""
    fix = "pass a group size that divides every layer's inputs, or none (per channel)"
    w = _weight(name, lin, group_size, fix)
    granularity = "channel" if group_size is None else "group"
    options: dict[str, Any] = dict(granularity=granularity, group_size=group_size)
    codes, scale, zero = uniform.encode(w, bits, symmetric=symmetric, **options)
    stored = _stored_scale(name, scale, w.dtype)
    if stored.dtype != scale.dtype:
        codes, _, zero = uniform.encode(
            w, bits, symmetric=symmetric, scale=stored.float(), zero_point=zero, **options
        )
    codes = codes.to(torch.int64) + (2 ** (bits - 1) if symmetric else 0)  # in [0, 2^b)
    return _pack_codes(name, codes, stored, zero, bits)


def _omniquant_tensors(name: str, m: Any) -> dict[str, torch.Tensor]:
    """pack-quantized with zero points: an OmniQuantLinear's codes, float32 scales and zero
    points as they are (x̂ = (q - z) · s in both). OmniQuant does not clamp its zero points to
    the code range; compressed-tensors stores them as codes, so one outside is refused."""
    if m.act_bits < 16:
        raise ValueError(
            f"layer {name!r} quantizes its activations (act_bits={m.act_bits}): compressed-tensors "
            "has no OmniQuant activation quantizer; export a weight-only calibration (abits=16)"
        )
    if m.group_size is not None and m.in_features % m.group_size:
        raise ValueError(
            f"layer {name!r} has {m.in_features} inputs, which group size {m.group_size} does not "
            "divide: compressed-tensors has no shorter last group; calibrate with a divisor"
        )
    zero = m.weight_zero.to(torch.int64).cpu()
    if bool(((zero < 0) | (zero >= 2**m.bits)).any()):
        raise ValueError(
            f"layer {name!r} has zero points outside the {m.bits}-bit code range (a group that "
            "does not straddle zero): compressed-tensors cannot store them; calibrate with "
            "symmetric=True, or export the float model with method rtn"
        )
    return _pack_codes(name, m.codes().cpu(), m.weight_scale.cpu().float(), zero, m.bits)


def _fp8_tensors(name: str, lin: nn.Linear) -> dict[str, torch.Tensor]:
    """float-quantized: FP8 E4M3 codes of W / s, s = row absmax / 448 (0 for a zero row) in
    the model's dtype, the codes computed with that stored scale."""
    w = _weight(name, lin).float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = _stored_scale(name, amax / 448.0, lin.weight.dtype)  # E4M3FN's largest: 448
    s = scale.float()
    codes = formats.encode(w / torch.where(s > 0, s, 1.0), "e4m3fn")  # saturating
    return {f"{name}.weight": codes.view(torch.float8_e4m3fn), f"{name}.weight_scale": scale}


def _as_int8(name: str, m: Any) -> Any:
    """A layer as lowbit's Linear8bitLt: as it is, or a plain linear quantized like
    ``Linear8bitLt.from_linear`` (row-wise absmax int8)."""
    from lowbit.fast.nn import Linear8bitLt

    if isinstance(m, Linear8bitLt):
        return m
    _weight(name, m)  # finite
    return Linear8bitLt.from_linear(m)


def _int8_tensors(name: str, m: Any) -> dict[str, torch.Tensor]:
    """int-quantized (W8A8): LLM.int8()'s row-wise int8 codes with scale absmax / 127 per row
    (float32, correctly rounded: W = q · s). The activations are quantized per token by the
    loader; the outlier decomposition has no representation in the format and is dropped."""
    q = _as_int8(name, m)
    absmax = q.weight_absmax.detach().cpu().float()[:, None]
    return {
        f"{name}.weight": q.weight_codes.detach().cpu().contiguous(),
        f"{name}.weight_scale": absmax / torch.tensor(127.0),
    }


def _mxfp4_tensors(name: str, lin: nn.Linear) -> dict[str, torch.Tensor]:
    """mxfp4-pack-quantized: OCP MXFP4 (E2M1 elements, one E8M0 scale per 32 inputs),
    ``lowbit.fast.formats.encode_mx`` bit for bit."""
    fix = "MXFP4 blocks hold 32 inputs (use method rtn for such layers, or ignore them)"
    codes, scales = formats.encode_mx(_weight(name, lin, 32, fix).float(), "e2m1", 32)
    # formats.pack's 4-bit layout is the format's: element 2i in the low nibble
    return {f"{name}.weight_packed": formats.pack(codes, 4), f"{name}.weight_scale": scales}


def nvfp4_export_scale(w: torch.Tensor) -> torch.Tensor:
    """The global scale the export gives a layer's NVFP4 weights: NVFP4's usual (448 · 6) /
    amax (``formats.nvfp4_global_scale``) rounded down to a power of two. Then every weight,
    e2m1 · scale / g with at most 6 significant bits, is exact in bfloat16 and float16: each
    loader decodes the same number whatever its order of operations (with 2688 / amax itself,
    compressed-tensors' bfloat16 decode and lowbit's, float64 to float32 to bfloat16, differ by
    one ulp in thousands of SmolLM2's weights). The block scales lose under one binade of
    E4M3's range."""
    _, exponent = torch.frexp(formats.nvfp4_global_scale(w))  # g = m · 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones((), dtype=torch.float32), exponent - 1)


def _nvfp4_tensors(name: str, lin: nn.Linear) -> dict[str, torch.Tensor]:
    """nvfp4-pack-quantized: NVFP4 (E2M1 elements, one E4M3 scale per 16 inputs, a float32
    global scale per layer: ``nvfp4_export_scale``), ``lowbit.fast.formats.encode_nvfp4`` bit
    for bit: W = e2m1 · scale / global."""
    fix = "NVFP4 blocks hold 16 inputs (use method rtn for such layers, or ignore them)"
    w = _weight(name, lin, 16, fix).float()
    codes, scales, g = formats.encode_nvfp4(w, global_scale=nvfp4_export_scale(w))
    return {
        f"{name}.weight_packed": formats.pack(codes, 4),
        f"{name}.weight_scale": scales.view(torch.float8_e4m3fn),
        f"{name}.weight_global_scale": g.reshape(1),
    }


def _bitsandbytes_tensors(name: str, m: Any) -> dict[str, torch.Tensor]:
    """bitsandbytes int8: the codes, the float32 row absmax (SCB) and the weight format 0."""
    q = _as_int8(name, m)
    return {
        f"{name}.weight": q.weight_codes.detach().cpu().contiguous(),
        f"{name}.SCB": q.weight_absmax.detach().cpu().float().contiguous(),
        f"{name}.weight_format": torch.tensor(0, dtype=torch.uint8),
    }


def _omniquant_scheme(layers: dict[str, Any]) -> tuple[int, int | None, bool]:
    """The one (bits, group_size, symmetric=False) of a calibrated model's OmniQuantLinears:
    written with zero points, which also hold the symmetric quantizer's z = 2^(b-1) - 1."""
    schemes = {(m.bits, m.group_size) for m in layers.values()}
    if len(schemes) > 1:
        raise ValueError(
            f"the OmniQuantLinear layers mix bits and group sizes {sorted(schemes, key=str)}: "
            "the export writes one scheme per model; calibrate with one setting"
        )
    bits, group_size = schemes.pop()
    return bits, group_size, False


# compressed-tensors: each method's format and its config group's quantization arguments
_CT_FORMATS = {
    "rtn": "pack-quantized",
    "omniquant": "pack-quantized",
    "fp8": "float-quantized",
    "llm_int8": "int-quantized",
    "mxfp4": "mxfp4-pack-quantized",
    "nvfp4": "nvfp4-pack-quantized",
}


def _ct_scheme(method: str, bits: int, group_size: int | None, symmetric: bool) -> dict[str, Any]:
    """The config group of a method: weights and input activations as compressed-tensors'
    ``QuantizationArgs`` serialise them (its presets W{b}A16, FP8 weight-only, INT8_W8A8,
    MXFP4A16, NVFP4A16)."""
    weights: dict[str, Any] = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": "channel" if group_size is None else "group",
        "group_size": group_size,
        "dynamic": False,
        "observer": "minmax",
    }
    activations = None
    if method == "fp8":
        weights["type"] = "float"
    elif method == "llm_int8":
        activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                       "group_size": None, "dynamic": True}  # fmt: skip
    elif method == "mxfp4":
        weights.update(type="float", scale_dtype="torch.uint8")
    elif method == "nvfp4":
        weights.update(type="float", strategy="tensor_group", scale_dtype="torch.float8_e4m3fn")
    return {
        "targets": ["Linear"],
        "weights": weights,
        "input_activations": activations,
        "output_activations": None,
        "format": _CT_FORMATS[method],
    }


def _quantization_config(
    method: str, scheme: dict[str, Any], dense: Sequence[str]
) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "format": _CT_FORMATS[method],
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme},
        "ignore": list(dense),
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


def _write_folder(
    staging: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], tokenizer: Any
) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(staging))


def _write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(staging)`` on a hidden sibling folder of ``out`` and rename it into place: a
    failed or interrupted export leaves no folder that looks complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkdtemp: its mode 0700 would become the finished folder's; mkdir applies
    # the umask as for any new folder
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        write(staging)
        if out.exists():
            out.rmdir()  # empty (checked before any work)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def export(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    format: str = "compressed-tensors",
    *,
    method: str | None = None,
    bits: int | None | str = AUTO,
    group_size: int | None | str = AUTO,
    symmetric: bool = True,
    tokenizer: Any = None,
    ignore: Sequence[str] = ("lm_head",),
    progress: bool = True,
) -> Path:
    """Quantize ``model``'s linears with ``method`` and write them in ``format`` to
    ``out_dir`` (see the module docstring; ``METHODS`` lists each format's methods, the first
    is the default); returns the folder's path.

    ``bits`` and ``group_size`` concern ``"rtn"``: 3, 4 or 8 bits (GGUF: 4 or 8), a group size
    dividing every quantized layer's inputs (GGUF: a multiple of 32) or None for one scale per
    output channel; ``AUTO``: 4 bits in groups of 128 (GGUF: 32). The other methods have fixed
    blocks (``FIXED``) or, for ``"omniquant"``, the calibrated modules' own; passing other
    values is refused. ``symmetric=False`` adds zero points (``"rtn"``). ``model`` is a Hugging
    Face ``PreTrainedModel`` (its ``config`` is written); it is not modified. ``out_dir`` must
    not exist or be empty: a half-written folder never looks complete.
    """
    from tqdm.auto import tqdm

    if format in METHODS and method is None:
        method = METHODS[format][0]  # rtn for compressed-tensors, llm_int8 for bitsandbytes
    nbits, group = check_options(format, str(method), bits, group_size, symmetric)
    assert method is not None
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError("export needs a Hugging Face PreTrainedModel (one with a .config)")
    out = check_out_dir(out_dir)
    if format == "gguf":
        from lowbit.fast import _gguf

        def write_gguf(staging: Path) -> None:
            _gguf.write_gguf(
                model, staging / GGUF_FILE, method=method, bits=nbits, group_size=group,
                tokenizer=tokenizer, ignore=ignore, progress=progress,
            )  # fmt: skip

        _write_atomically(out, write_gguf)
        return out
    layers = _layers(model, method, format, ignore)
    if method == "llm_int8" and format == "compressed-tensors":
        warnings.warn(
            "compressed-tensors int-quantized (W8A8) has no representation for LLM.int8()'s "
            "outlier decomposition: the loader quantizes every activation column to int8 (use "
            "format bitsandbytes to keep the decomposition)",
            UserWarning,
            stacklevel=2,
        )
    tensors = _unique_state(model)
    thresholds = set()
    for name, m in tqdm(layers.items(), desc=f"export {format}", disable=not progress,
                        leave=False):  # fmt: skip
        # the layer's own float weight or lowbit buffers give way to the format's tensors
        for key in dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False)):
            if key != "bias":
                tensors.pop(f"{name}.{key}", None)
        if format == "bitsandbytes":
            thresholds.add(getattr(m, "threshold", 6.0))  # plain linears: from_linear's 6.0
            tensors.update(_bitsandbytes_tensors(name, m))
        elif method == "rtn":
            assert nbits is not None
            tensors.update(_rtn_tensors(name, m, nbits, group, symmetric))
        elif method == "omniquant":
            tensors.update(_omniquant_tensors(name, m))
        else:
            make = {"fp8": _fp8_tensors, "llm_int8": _int8_tensors, "mxfp4": _mxfp4_tensors,
                    "nvfp4": _nvfp4_tensors}[method]  # fmt: skip
            tensors.update(make(name, m))
    config_dict = config.to_dict()
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers]
    if format == "bitsandbytes":
        if len(thresholds) > 1:
            raise ValueError(
                "bitsandbytes keeps one llm_int8_threshold per model; the layers use "
                f"{sorted(thresholds)}: rebuild them with one threshold"
            )
        config_dict["quantization_config"] = {
            "quant_method": "bitsandbytes",
            "load_in_8bit": True,
            "load_in_4bit": False,
            "llm_int8_threshold": thresholds.pop(),
            "llm_int8_skip_modules": list(ignore),
            "llm_int8_has_fp16_weight": False,
        }
    else:
        if method == "omniquant":
            nbits, group, symmetric = _omniquant_scheme(layers)
        assert nbits is not None
        if method in ("mxfp4", "nvfp4"):
            # compressed-tensors decodes FP4 in bfloat16 only: a float32 or float16 model
            # would load and then fail at its first matmul, so the folder says bfloat16
            config_dict["dtype"] = "bfloat16"
        scheme = _ct_scheme(method, nbits, group, symmetric)
        config_dict["quantization_config"] = _quantization_config(method, scheme, dense)

    _write_atomically(out, lambda staging: _write_folder(staging, tensors, config_dict, tokenizer))
    return out
