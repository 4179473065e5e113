"""Number formats, fast path: torch on any device, a Triton kernel on CUDA.

The same public functions as :mod:`lowbit.reference.formats` (which documents the formats and
the encoding steps), taking and returning ``torch.Tensor``. Formats themselves are data and are
re-exported from the reference unchanged.

How the torch path computes (``_encode_bits``): the input is viewed as its IEEE bits (float32
for fp16/bf16/fp32 inputs, float64 for float64 and integer inputs; the up-cast is exact). The
significand ``sig`` (with its implicit bit) and the binade exponent come out of the bits, and
rounding to the format's grid is an integer shift by ``shift`` bits: the kept bits ``r = sig >>
shift``, the remainder ``rem`` decides (round half to even on ``r``, or ``noise * 2^shift < rem``
for stochastic rounding, the reference's ``noise < q - floor(q)`` without its rounding). Every
step is exact, so the result is the reference's bit for bit (for stochastic rounding: except
where the reference's float64 ``q`` underflows, below 2^-1000, and the noise is exactly 0); steps 5-6 (code magnitude, overflow, specials, sign) are the
reference's, written with ``torch.where``.

On CPU, for large float32/fp16/bf16 tensors and round-to-nearest, ``encode``/``quantize`` use a
lookup table built by that same function over all 65,536 fp16 or bf16 bit patterns. Float32
inputs index the bf16 table after rounding to odd at bit 16 (top 16 bits OR-ed with a sticky
bit for the low 16), which preserves round-half-even exactly whenever the format's rounding bit
lies at bit 17 or above (mantissa bits <= 5 and a smallest step >= 2^-131; ``_fp32_lut_exact``).
``quantize_mx`` scales each block by 2^-s (exact above 2^-126, and below that every element
format in reach of the table rounds to zero anyway) and uses the same tables.

On CUDA (with Triton importable) fp16/bf16/fp32 inputs go to :mod:`lowbit.kernels.formats`.

Errors: the same ``ValueError`` as the reference. The data-dependent ones (NaN into a format
without NaN code, values without any code under ``saturate=False``, codes out of range) need a
look at the values; they are checked on CPU only. On CUDA (any non-CPU device) they are
**not checked** (no host-device synchronisation): a NaN without a NaN code encodes as a zero
magnitude (code 0 or the smallest value, with its sign), a value without a code becomes the
smallest value, and ``decode`` masks codes to the format's bits. Lookup tables of code values
are copied to a device once and cached there (``_values_table``).

Stochastic rounding draws its uniforms from ``torch.Generator(device).manual_seed(seed)``, so
results are reproducible per device but differ from the reference's NumPy stream; tests feed
identical noise to ``_encode`` here and in the reference to compare bit for bit.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from lowbit.fast._tensors import takes_tensors
from lowbit.kernels import on_triton_device
from lowbit.reference.formats import (
    BF16,
    E2M1FN,
    E2M3FN,
    E3M2FN,
    E4M3FN,
    E5M2,
    E8M0FNU,
    FP16,
    NAMED_FORMATS,
    FPFormat,
    IntFormat,
    parse_format,
)

__all__ = [
    "FPFormat",
    "IntFormat",
    "E5M2",
    "E4M3FN",
    "E3M2FN",
    "E2M3FN",
    "E2M1FN",
    "E8M0FNU",
    "FP16",
    "BF16",
    "NAMED_FORMATS",
    "parse_format",
    "encode",
    "decode",
    "quantize",
    "values",
    "pack",
    "unpack",
    "encode_mx",
    "decode_mx",
    "quantize_mx",
    "NVFP4_BLOCK",
    "nvfp4_global_scale",
    "encode_nvfp4",
    "decode_nvfp4",
    "quantize_nvfp4",
]

# Lookup tables are worth building only for tensors larger than this (tests lower it).
_LUT_MIN_NUMEL = 1 << 16

# IEEE layouts of the working precisions: (integer view, mantissa bits P, exponent bias B).
_LAYOUT = {
    torch.float32: (torch.int32, 23, 127),
    torch.float64: (torch.int64, 52, 1023),
}


def _use_kernel(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32) and on_triton_device(x)


def _torch_dtype(dtype) -> torch.dtype | None:
    """Accept torch dtypes and NumPy / ml_dtypes dtypes (the reference's spelling)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = np.dtype(dtype).name
    if name == "bfloat16":
        return torch.bfloat16
    out = getattr(torch, name, None)
    if not isinstance(out, torch.dtype):
        raise ValueError(
            f"dtype={dtype!r} is not supported: use a float dtype such as torch.float32"
        )
    return out


def _working(x: torch.Tensor) -> torch.Tensor:
    """Flat contiguous working copy: float32 for <= 32-bit floats, float64 otherwise (exact)."""
    if x.dtype.is_complex or not (
        x.dtype.is_floating_point or x.dtype == torch.bool or _is_int(x.dtype)
    ):
        raise ValueError(
            f"cannot quantize an array of dtype {_name(x.dtype)}: pass floating-point values"
        )
    wdt = (
        torch.float32
        if x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        else torch.float64
    )
    xw = x.reshape(-1).to(wdt).contiguous()
    if x.dtype == torch.float16:
        # torch's scalar (non-vectorised) fp16 -> fp32 conversion drops the sign of NaN; put
        # the sign bits back (a no-op for every other value)
        sign = (x.reshape(-1).view(torch.int16) < 0).to(torch.int32) << 31
        xw = (xw.view(torch.int32) | sign).view(torch.float32)
    return xw


def _name(dtype: torch.dtype) -> str:
    """'float32' rather than 'torch.float32': error messages read as the reference's."""
    return str(dtype).removeprefix("torch.")


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _on_host(t: torch.Tensor) -> bool:
    """Whether the host may look at ``t``'s values (CPU); elsewhere (CUDA, or the meta device
    the tests use to trace device placement) the value checks are skipped, never synced."""
    return t.device.type == "cpu"


def _codes_in_range(codes: torch.Tensor, fmt: FPFormat | IntFormat) -> torch.Tensor:
    """``codes`` checked to lie in [0, 2^bits) on the host, as the reference checks them; off the
    host (no sync) masked to the format's bits instead."""
    if not _on_host(codes):
        return codes & (2**fmt.bits - 1)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**fmt.bits):
        raise ValueError(
            f"codes out of range for {fmt.name} ({fmt.bits} bits): max is {2**fmt.bits - 1}"
        )
    return codes


def _code_dtype(fmt: FPFormat | IntFormat) -> torch.dtype:
    return torch.uint8 if fmt.bits <= 8 else torch.uint16


def _check_rounding(rounding: str, seed) -> None:
    if rounding not in ("nearest_even", "stochastic"):
        raise ValueError(f"rounding={rounding!r} is invalid: use 'nearest_even' or 'stochastic'")
    if rounding == "stochastic" and seed is None:
        raise ValueError("rounding='stochastic' needs seed=<int> so results are reproducible")


def _noise(n: int, rounding: str, seed, like: torch.Tensor) -> torch.Tensor | None:
    """Uniform [0, 1) per element in the working precision, or None for nearest-even."""
    if rounding == "nearest_even":
        return None
    gen = torch.Generator(device=like.device).manual_seed(int(seed))
    return torch.rand(n, generator=gen, device=like.device, dtype=like.dtype)


# ---- the bit-level encoder -------------------------------------------------------------------------


def _floor_log2(absbits: torch.Tensor, P: int, B: int) -> torch.Tensor:
    """floor(log2 a) from the bits of a finite a >= 0 (very negative for a = 0)."""
    E = absbits >> P
    mant = absbits & ((1 << P) - 1)
    # subnormal input: floor(log2 mant) read off the exponent of mant converted to float (exact)
    fdt = torch.float32 if P == 23 else torch.float64
    mant_log2 = (mant.to(fdt).view(absbits.dtype) >> P) - B
    return torch.where(E > 0, E - B, mant_log2 - (B - 1 + P))


def _encode_bits(
    xw: torch.Tensor,
    fmt: FPFormat,
    saturate: bool,
    noise: torch.Tensor | None,
    scale_exp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Codes (int32/int64) of the flat working tensor ``xw`` (float32 or float64), computing
    x / 2^scale_exp on the fly (MX) without dividing. No value checks here."""
    idt, P, B = _LAYOUT[xw.dtype]
    M, emin = fmt.mbits, fmt.emin
    bits = xw.view(idt)
    # 1. sign and magnitude bits; Inf and NaN become magnitude 0 for steps 2-5
    negative = bits < 0
    inf_bits = ((1 << (idt.itemsize * 8 - 1 - P)) - 1) << P
    absbits = bits & ((1 << (idt.itemsize * 8 - 1)) - 1)
    nan = absbits > inf_bits
    inf = absbits == inf_bits
    nonzero = absbits != 0  # Inf counts as nonzero (for "no code" below)
    absbits = torch.where(absbits >= inf_bits, torch.zeros_like(absbits), absbits)
    # 2. binade exponent e = max(floor(log2(a / 2^s)), emin)
    E = absbits >> P
    log2a = _floor_log2(absbits, P, B)
    if scale_exp is not None:
        log2a = log2a - scale_exp
    e = torch.clamp(log2a, min=emin)
    # 3. the significand with its implicit bit: a = sig * 2^(max(E, 1) - B - P)
    mant = absbits & ((1 << P) - 1)
    sig = torch.where(E > 0, mant | (1 << P), mant)
    lsb_exp = torch.clamp(E, min=1) - (B + P)
    if scale_exp is not None:
        lsb_exp = lsb_exp - scale_exp
    # 4. round q = sig * 2^(lsb_exp - (e - M)) to an integer r: shift right by `shift` bits
    # (P + 2 bits already round to 0; a negative shift only arises for tiny inputs under MX
    # scaling, where q is an exact integer: shift left)
    shift = torch.clamp(e - M - lsb_exp, max=P + 2)
    rshift, lshift = torch.clamp(shift, min=0), torch.clamp(-shift, min=0)
    one = torch.ones_like(sig)
    r = (sig >> rshift) << lshift
    rem = sig & ((one << rshift) - 1)
    if noise is None:
        half = one << torch.clamp(rshift - 1, min=0)  # rem = 0 when rshift = 0: no rounding
        r = r + ((rem > half) | ((rem == half) & ((r & 1) == 1))).to(idt)
    else:
        # round up iff u < rem / 2^shift, tested exactly as u * 2^shift < rem (scaling by powers
        # of two is exact; overflow to Inf only where the answer is "no" anyway). The shift is
        # capped where u * 2^cap > rem holds for every u > 0 the noise can hold.
        cap = 300 if P == 23 else 1250
        todo = torch.clamp(e - M - lsb_exp, 0, cap)
        t = noise.to(torch.promote_types(noise.dtype, xw.dtype))
        step = 100 if t.dtype == torch.float32 else 1000  # 2^step is finite in t's precision
        for _ in range(-(-cap // step)):
            part = torch.clamp(todo, max=step)
            t = torch.ldexp(t, part.to(t.dtype))
            todo = todo - part
        r = r + (t < rem.to(t.dtype)).to(idt)  # rem < 2^(P+1): exact in t's precision
    # 5. code magnitude; a carry of r lands on the next binade's first code
    code = (e - emin) * (1 << M) + r
    if not fmt.subnormals:
        code = torch.clamp(code - (1 << M), min=0)
    # 6. overflow, values without a code, NaN, sign
    overflow = (code > fmt.max_code) | inf
    if saturate or not fmt.has_nan:
        overflow_code = fmt.max_code
    else:
        overflow_code = fmt.inf_code if fmt.has_inf else fmt.nan_code
    code = torch.where(overflow, overflow_code, code)
    if not fmt.signed or not fmt.has_zero:
        no_code = ~nan & ((negative & nonzero) if not fmt.signed else torch.zeros_like(nan))
        if not fmt.has_zero:
            no_code = no_code | (~nan & ~nonzero)
        code = torch.where(no_code, 0 if saturate or not fmt.has_nan else fmt.nan_code, code)
    if fmt.has_nan:
        code = torch.where(nan, fmt.nan_code, code)
    if fmt.signed:
        code = code | (negative.to(idt) << (fmt.ebits + fmt.mbits))
    return code


# The bit-level encoder makes ~40 passes; on CPU it runs over chunks that stay in cache.
_CHUNK = 1 << 14  # below torch's parallel grain (32768): no thread hand-offs per op


def _encode_bits_chunked(
    xw: torch.Tensor,
    fmt: FPFormat,
    saturate: bool,
    noise: torch.Tensor | None,
    scale_exp: torch.Tensor | None = None,
) -> torch.Tensor:
    """``_encode_bits`` over cache-sized chunks on CPU (one call on CUDA)."""
    n = xw.numel()
    if not _on_host(xw) or n <= _CHUNK:
        return _encode_bits(xw, fmt, saturate, noise, scale_exp)
    out = torch.empty(n, dtype=_LAYOUT[xw.dtype][0])
    for i in range(0, n, _CHUNK):
        j = min(i + _CHUNK, n)
        out[i:j] = _encode_bits(
            xw[i:j],
            fmt,
            saturate,
            None if noise is None else noise[i:j],
            None if scale_exp is None else scale_exp[i:j],
        )
    return out


def _check_values(xw: torch.Tensor, fmt: FPFormat | IntFormat, saturate: bool) -> None:
    """The reference's data-dependent errors (CPU only: they need the host to look)."""
    if not _on_host(xw):
        return
    if not isinstance(fmt, IntFormat) and fmt.has_nan:
        return
    # max() propagates NaN: one reduction pass decides whether counting is needed at all
    nan = torch.isnan(xw) if xw.numel() and bool(torch.isnan(xw.max())) else None
    count = int(nan.sum()) if nan is not None else 0
    if count and isinstance(fmt, IntFormat):
        raise ValueError(f"{count} NaN value(s) cannot be encoded in {fmt.name}: remove them")
    if count:
        raise ValueError(
            f"{count} NaN value(s) cannot be encoded in {fmt.name}, which has no NaN code: "
            "remove them or use a format with NaN (e.g. e4m3fn)"
        )
    if isinstance(fmt, IntFormat) or saturate:
        return
    no_code = torch.zeros(xw.shape, dtype=torch.bool)
    if not fmt.signed:
        no_code |= torch.signbit(xw) & (xw != 0)
    if not fmt.has_zero:
        no_code |= xw == 0
    count = int(no_code.sum())
    if count:
        raise ValueError(
            f"{count} value(s) have no code in {fmt.name} (negative or zero): pass saturate=True"
        )


def _encode_int(xw: torch.Tensor, fmt: IntFormat, noise: torch.Tensor | None) -> torch.Tensor:
    """Integers: round (nearest even or stochastic), clamp to [qmin, qmax], two's complement."""
    x = torch.clamp(xw, fmt.qmin - 1.0, fmt.qmax + 1.0)  # also maps +-Inf into range
    if noise is None:
        q = torch.round(x)  # torch.round is round half to even
    else:
        floor = torch.floor(x)
        q = floor + (noise < x - floor).to(x.dtype)
    q = torch.clamp(q, fmt.qmin, fmt.qmax).to(torch.int32)
    return torch.where(torch.isnan(x), 0, q) & (2**fmt.bits - 1)


def _encode(
    x: torch.Tensor, fmt: FPFormat | IntFormat, saturate: bool, noise: torch.Tensor | None
) -> torch.Tensor:
    """encode() with the rounding noise given (None = nearest even); the twin of the
    reference's ``_encode`` so that tests can feed both the same noise. Torch path only."""
    xw = _working(x)
    if isinstance(fmt, IntFormat) and noise is not None:
        xw = xw.double()  # x - floor(x) must be the reference's float64 difference
    if noise is not None:
        noise = noise.reshape(-1).to(x.device)
    _check_values(xw, fmt, saturate)
    if isinstance(fmt, IntFormat):
        code = _encode_int(xw, fmt, noise)
    else:
        code = _encode_bits_chunked(xw, fmt, saturate, noise)
    return code.to(_code_dtype(fmt)).reshape(x.shape)


# ---- lookup tables (CPU, round-to-nearest) ---------------------------------------------------------


def _fp32_lut_exact(fmt: FPFormat) -> bool:
    """Whether a float32 rounded to odd at bit 16 (its top 16 bits, OR-ed with a sticky bit for
    the low 16) encodes like the float32 itself: true when every rounding bit sits at position
    17 or above (M <= 5 and the smallest grid step 2^(emin-M) >= 2^-131). Ties then lie on
    multiples of 2^17, and round-to-odd never moves a value across one."""
    return fmt.mbits <= 5 and fmt.emin - fmt.mbits + 149 >= 18


@functools.lru_cache(maxsize=64)
def _lut(fmt: FPFormat, saturate: bool, kind: str) -> torch.Tensor:
    """Codes of every 16-bit key: fp16 patterns, or bf16 patterns (= float32 rounded to odd)."""
    key = torch.arange(2**16, dtype=torch.int32)
    if kind == "fp16":
        x = (key - ((key >> 15) << 16)).to(torch.int16).view(torch.float16).float()
    else:
        x = (key.to(torch.int64) << 16).to(torch.int32).view(torch.float32)  # wraps the sign
    return _encode_bits(x, fmt, saturate, None).to(_code_dtype(fmt))


def _lut_kind(x: torch.Tensor, fmt, rounding: str) -> str | None:
    if not _on_host(x) or not isinstance(fmt, FPFormat) or rounding != "nearest_even":
        return None
    if x.numel() < _LUT_MIN_NUMEL:
        return None
    if x.dtype == torch.float16:
        return "fp16"
    if x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and _fp32_lut_exact(fmt)):
        return "bf16"
    return None


def _lut_key(x: torch.Tensor) -> torch.Tensor:
    """Flat int32 keys in [0, 2^16): the 16-bit pattern, or a float32 rounded to odd at bit 16
    (in-place integer ops: each pass over the data costs as much as the lookup)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        key = x.reshape(-1).view(torch.int16).to(torch.int32)
    else:
        bits = x.reshape(-1).view(torch.int32)
        key = bits & 0xFFFF
        key += 0xFFFF  # bit 16 set iff the low half is nonzero (the sticky bit)
        key |= bits
        key >>= 16
    key &= 0xFFFF
    return key


def _lookup(table: torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
    """table[index] through index_select (several times faster than advanced indexing on CPU)."""
    if table.dtype == torch.uint16:  # index_select has no uint16 kernel: move the bits as int16
        return _lookup(table.view(torch.int16), index, shape).view(torch.uint16)
    return torch.index_select(table, 0, index.reshape(-1)).reshape(shape)


# ---- public API ----------------------------------------------------------------------------------------


@takes_tensors
def encode(
    x: torch.Tensor,
    fmt: FPFormat | IntFormat | str,
    *,
    rounding: str = "nearest_even",
    saturate: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """Values -> codes of ``fmt`` (uint8 up to 8 bits, else uint16), same shape as ``x``.

    Same semantics as :func:`lowbit.reference.formats.encode`; stochastic rounding draws from
    ``torch.Generator(x.device).manual_seed(seed)``.
    """
    fmt = parse_format(fmt)
    _check_rounding(rounding, seed)
    if _use_kernel(x):
        from lowbit.kernels import formats as kf

        noise = _noise(x.numel(), rounding, seed, x.new_empty(0, dtype=torch.float32))
        return kf.encode(x, fmt, saturate=saturate, noise=noise)
    kind = _lut_kind(x, fmt, rounding)
    if kind is not None:
        _check_values(x.reshape(-1), fmt, saturate)
        return _lookup(_lut(fmt, saturate, kind), _lut_key(x), x.shape)
    wdt = (
        torch.float32
        if x.dtype in (torch.float16, torch.bfloat16, torch.float32)
        else torch.float64
    )
    if isinstance(fmt, IntFormat) and rounding == "stochastic":
        wdt = torch.float64  # x - floor(x) as the reference computes it
    like = x.new_empty(0, dtype=wdt)
    return _encode(x, fmt, saturate, _noise(x.numel(), rounding, seed, like))


@functools.lru_cache(maxsize=64)
def _values_cached(fmt: FPFormat | IntFormat) -> torch.Tensor:
    code = torch.arange(2**fmt.bits, dtype=torch.int64)
    if isinstance(fmt, IntFormat):
        signed = torch.where(code >= 2 ** (fmt.bits - 1), code - 2**fmt.bits, code)
        return (signed if fmt.signed else code).to(torch.float64)
    width, M = fmt.ebits + fmt.mbits, fmt.mbits
    mag = code & (2**width - 1)
    field, mantissa = mag >> M, mag & (2**M - 1)
    if fmt.subnormals:
        # subnormal: mantissa * 2^(emin - M); normal: (2^M + mantissa) * 2^(field - bias - M)
        sig = torch.where(field == 0, mantissa, mantissa + 2**M)
        exp = torch.where(field == 0, fmt.emin - M, field - fmt.bias - M)
    else:
        sig, exp = mantissa + 2**M, field - fmt.bias - M
    value = torch.ldexp(sig.to(torch.float64), exp.to(torch.float64))
    if fmt.specials == "fn":
        value = torch.where(mag == 2**width - 1, math.nan, value)
    elif fmt.specials == "ieee":
        top = field == 2**fmt.ebits - 1
        value = torch.where(top, torch.where(mantissa == 0, math.inf, math.nan), value)
    negative = (
        ((code >> width) & 1).bool() if fmt.signed else torch.zeros_like(code, dtype=torch.bool)
    )
    return torch.where(negative, -value, value)


@functools.lru_cache(maxsize=128)
def _values_table(
    fmt: FPFormat | IntFormat, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``values(fmt)`` cast to ``dtype`` (on the host, exact IEEE rounding) and resident on
    ``device``: copied once per (format, device, dtype), so the lookups in ``decode`` and
    ``quantize_mx`` do no host-to-device copy after the first call (none inside a CUDA graph
    captured after a warm-up call)."""
    return _values_cached(fmt).to(dtype).to(device)


def values(fmt: FPFormat | IntFormat | str) -> torch.Tensor:
    """Every code's value in code order (float64), e.g. 16 values for E2M1FN."""
    return _values_cached(parse_format(fmt)).clone()


@takes_tensors
def decode(codes: torch.Tensor, fmt: FPFormat | IntFormat | str, dtype=None) -> torch.Tensor:
    """Codes -> values (float32 unless ``dtype`` is given): a lookup into ``values(fmt)``."""
    fmt = parse_format(fmt)
    out_dtype = _torch_dtype(dtype) or torch.float32
    if not _is_int(codes.dtype):
        raise ValueError(
            f"codes must be an unsigned integer array, got {_name(codes.dtype)}: use encode()"
        )
    idx = _codes_in_range(codes.to(torch.int32), fmt)
    return _lookup(_values_table(fmt, codes.device, out_dtype), idx, codes.shape)


@takes_tensors
def quantize(
    x: torch.Tensor,
    fmt: FPFormat | IntFormat | str,
    *,
    rounding: str = "nearest_even",
    saturate: bool = True,
    seed: int | None = None,
) -> torch.Tensor:
    """Fake quantization: ``decode(encode(x))`` returned in x's floating dtype (float32 for
    integer inputs) — the same values as ``x.astype(ml_dtypes.<fmt>).astype(x.dtype)``."""
    fmt = parse_format(fmt)
    _check_rounding(rounding, seed)
    out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    if _use_kernel(x):
        from lowbit.kernels import formats as kf

        noise = _noise(x.numel(), rounding, seed, x.new_empty(0, dtype=torch.float32))
        return kf.quantize(x, fmt, saturate=saturate, noise=noise)
    kind = _lut_kind(x, fmt, rounding)
    if kind is not None:
        _check_values(x.reshape(-1), fmt, saturate)
        return _lookup(_quantize_lut(fmt, saturate, kind, out_dtype), _lut_key(x), x.shape)
    if isinstance(fmt, IntFormat) and rounding == "nearest_even":
        # integers: round and clamp give the decoded value directly (exact in the working
        # precision), cast once to the output dtype like the reference's float64 decode
        xw = _working(x)
        _check_values(xw, fmt, saturate)
        q = torch.clamp(torch.round(xw), fmt.qmin, fmt.qmax) + 0.0  # -0 + 0 = +0: code 0 is +0
        return torch.where(torch.isnan(xw), 0.0, q).to(out_dtype).reshape(x.shape)
    codes = encode(x, fmt, rounding=rounding, saturate=saturate, seed=seed)
    # decoded in float64 then cast once, like the reference (no double rounding)
    return decode(codes, fmt, dtype=torch.float64).to(out_dtype)


@functools.lru_cache(maxsize=64)
def _quantize_lut(fmt: FPFormat, saturate: bool, kind: str, out_dtype: torch.dtype) -> torch.Tensor:
    return _lookup(_values_cached(fmt), _lut(fmt, saturate, kind).to(torch.int32), -1).to(out_dtype)


# ---- packing -------------------------------------------------------------------------------------------


def _group(bits: int) -> tuple[int, int]:
    """Codes per group and bytes per group so that a group fills whole bytes."""
    if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is invalid: pack codes of 1..8 bits")
    codes_per_group = math.lcm(bits, 8) // bits
    return codes_per_group, codes_per_group * bits // 8


@takes_tensors
def pack(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Pack ``bits``-wide codes along the last axis into a little-endian bit stream of bytes
    (element 0 in the low bits of byte 0); the last axis is zero-padded to a whole group.
    Range is checked on CPU only."""
    g, nbytes = _group(bits)
    if not _is_int(codes.dtype):
        raise ValueError(f"codes must be an integer array, got {_name(codes.dtype)}")
    c = codes.long()
    if _on_host(c) and c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes do not fit in {bits} bits: mask them or use a wider pack")
    c = torch.atleast_1d(c) & (2**bits - 1)
    n = c.shape[-1]
    c = torch.nn.functional.pad(c, (0, (-n) % g))
    groups = c.reshape(c.shape[:-1] + (c.shape[-1] // g, g))  # (..., groups, g)
    shifts = torch.arange(g, device=c.device) * bits
    word = (groups << shifts).sum(-1)  # (..., groups), disjoint bits: sum == OR, < 2^56
    byte_shifts = torch.arange(nbytes, device=c.device) * 8
    out = (word[..., None] >> byte_shifts) & 0xFF  # (..., groups, nbytes)
    return out.to(torch.uint8).reshape(c.shape[:-1] + (c.shape[-1] // g * nbytes,))


@takes_tensors
def unpack(packed: torch.Tensor, bits: int = 4, n: int | None = None) -> torch.Tensor:
    """Inverse of ``pack``: uint8 bytes -> uint8 codes along the last axis (first ``n`` kept)."""
    g, nbytes = _group(bits)
    packed = torch.atleast_1d(packed)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed data must be uint8, got {_name(packed.dtype)}")
    if packed.shape[-1] % nbytes:
        raise ValueError(
            f"last axis of {packed.shape[-1]} bytes is not a multiple of {nbytes} ({bits}-bit groups)"
        )
    groups = packed.long().reshape(packed.shape[:-1] + (packed.shape[-1] // nbytes, nbytes))
    byte_shifts = torch.arange(nbytes, device=packed.device) * 8
    word = (groups << byte_shifts).sum(-1)  # (..., groups)
    shifts = torch.arange(g, device=packed.device) * bits
    codes = (word[..., None] >> shifts) & (2**bits - 1)  # (..., groups, g)
    codes = codes.to(torch.uint8).reshape(packed.shape[:-1] + (packed.shape[-1] // nbytes * g,))
    if n is not None:
        if not 0 <= n <= codes.shape[-1]:
            raise ValueError(f"n={n} is out of range: the data holds {codes.shape[-1]} codes")
        codes = codes[..., :n]
    return codes


# ---- OCP MX block scaling --------------------------------------------------------------------------------


def _check_mx(fmt: FPFormat | IntFormat | str, block: int) -> FPFormat:
    fmt = parse_format(fmt)
    if not isinstance(fmt, FPFormat) or not fmt.signed:
        raise ValueError(f"MX element format must be a signed float format, got {fmt}")
    if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block={block!r} is invalid: use a positive block size (MX uses 32)")
    return fmt


def _mx_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """x as (..., blocks, block) in the working precision, zero-padded; and the true length."""
    x = torch.atleast_1d(x)
    xw = _working(x).reshape(x.shape)
    n = x.shape[-1]
    nblocks = -(-n // block)
    padded = torch.nn.functional.pad(xw, (0, nblocks * block - n))
    return padded.reshape(x.shape[:-1] + (nblocks, block)), n


def _mx_scale_exp(V: torch.Tensor, fmt: FPFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared exponent s per block (clamped to [-127, 127]) and the mask of blocks that get the
    NaN scale: NaN or +-Inf inside, or s above E8M0's 127 (the reference's policy)."""
    idt, P, B = _LAYOUT[V.dtype]
    finite = torch.isfinite(V)
    amax = torch.where(finite, V, 0.0).abs().amax(-1)  # (..., blocks)
    emax_elem = math.frexp(fmt.max_value)[1] - 1
    log2 = _floor_log2(amax.view(idt), P, B)
    s = torch.where(amax > 0, log2 - emax_elem, -127)
    nan_block = ~finite.all(-1) | (s > 127)
    return torch.clamp(s, -127, 127), nan_block


def _pow2_f32(s: torch.Tensor) -> torch.Tensor:
    """2^s as float32 for integer s in [-149, 127], from bits (subnormals included, exact)."""
    s = s.to(torch.int32)
    normal = (torch.clamp(s, min=-126) + 127) << 23
    sub = torch.ones_like(s) << torch.clamp(s + 149, 0, 22)
    return torch.where(s >= -126, normal, sub).view(torch.float32)


def _mx_element_codes(
    V: torch.Tensor, fmt: FPFormat, s: torch.Tensor, nan_block: torch.Tensor
) -> torch.Tensor:
    """Codes of V / 2^s (flat), zero in NaN-scaled blocks. float32 blocks are scaled by 2^-s, exact
    except below 2^-126 where formats with min_subnormal > 2^-125 round to zero either way, and
    then go through the lookup table; otherwise the bit-level encoder shifts its rounding point."""
    Vz = torch.where(nan_block[..., None], 0.0, V).reshape(-1)
    s_elem = s[..., None].expand(V.shape).reshape(-1)
    use_lut = (
        V.dtype == torch.float32
        and _on_host(V)
        and Vz.numel() >= _LUT_MIN_NUMEL
        and _fp32_lut_exact(fmt)
        and fmt.min_subnormal > 2.0**-125
    )
    if use_lut:
        y = Vz.reshape(V.shape) * _pow2_f32(-s)[..., None]  # (..., blocks, block)
        return _lookup(_lut(fmt, True, "bf16"), _lut_key(y), -1)
    return _encode_bits_chunked(Vz, fmt, True, None, scale_exp=s_elem)


@takes_tensors
def encode_mx(
    x: torch.Tensor, fmt: FPFormat | str, block: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX v1.0 quantization along the last axis -> (element codes, E8M0 scale codes);
    see :func:`lowbit.reference.formats.encode_mx`. Elements are rounded as x / 2^s."""
    fmt = _check_mx(fmt, block)
    if _use_kernel(x) and x.dim() >= 1 and fmt.bits <= 8:
        from lowbit.kernels import formats as kf

        return kf.encode_mx(x, fmt, block)
    V, n = _mx_blocks(x, block)
    s, nan_block = _mx_scale_exp(V, fmt)
    scale_codes = torch.where(nan_block, E8M0FNU.nan_code, s + 127).to(torch.uint8)
    codes = _mx_element_codes(V, fmt, s, nan_block).to(_code_dtype(fmt))
    codes = codes.reshape(V.shape[:-2] + (V.shape[-2] * block,))[..., :n]
    return codes, scale_codes


@takes_tensors
def decode_mx(
    codes: torch.Tensor, scales: torch.Tensor, fmt: FPFormat | str, block: int = 32, dtype=None
) -> torch.Tensor:
    """Inverse of ``encode_mx``: value_i = decode(P_i) * 2^(scale - 127); NaN scale -> NaN block."""
    fmt = _check_mx(fmt, block)
    n = codes.shape[-1]
    if tuple(scales.shape) != tuple(codes.shape[:-1]) + (-(-n // block),):
        raise ValueError(
            f"scales shape {tuple(scales.shape)} does not match codes {tuple(codes.shape)} with block={block}"
        )
    X = torch.repeat_interleave(decode(scales, E8M0FNU, dtype=torch.float64), block, dim=-1)[
        ..., :n
    ]
    out = (
        decode(codes, fmt, dtype=torch.float64) * X
    )  # exact: powers of two times short significands
    return out.to(_torch_dtype(dtype) or torch.float32)


@takes_tensors
def quantize_mx(x: torch.Tensor, fmt: FPFormat | str, block: int = 32) -> torch.Tensor:
    """MX fake quantization: ``decode_mx(*encode_mx(x))`` in x's floating dtype."""
    fmt = _check_mx(fmt, block)
    out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    if _use_kernel(x) and x.dim() >= 1 and fmt.bits <= 8:
        from lowbit.kernels import formats as kf

        return kf.quantize_mx(x, fmt, block)
    V, n = _mx_blocks(x, block)
    s, nan_block = _mx_scale_exp(V, fmt)
    codes = _mx_element_codes(V, fmt, s, nan_block)
    if V.dtype != torch.float32:  # float64 / integer inputs: decode in float64, like decode_mx
        scale_codes = torch.where(nan_block, E8M0FNU.nan_code, s + 127).to(torch.uint8)
        codes = codes.to(_code_dtype(fmt))  # uint16 for element formats over 8 bits
        codes = codes.reshape(V.shape[:-2] + (V.shape[-2] * block,))[..., :n]
        out = decode_mx(codes, scale_codes, fmt, block, dtype=torch.float64)
        return out.to(out_dtype).reshape(x.shape)
    # float32: value * 2^s is one correctly rounded product, the reference's float64 product
    # cast to float32; below 2^-126 it is far below fp16/bf16's smallest values too
    table = _values_table(fmt, V.device, torch.float32)
    values = _lookup(table, codes.to(torch.int32), V.shape) * _pow2_f32(s)[..., None]
    values = torch.where(nan_block[..., None], math.nan, values)
    values = values.reshape(V.shape[:-2] + (V.shape[-2] * block,))[..., :n]
    return values.to(out_dtype).reshape(x.shape)


# ---- NVFP4 block scaling ---------------------------------------------------------------------------

NVFP4_BLOCK = 16
_NVFP4_RANGE = E4M3FN.max_value * E2M1FN.max_value  # 448 * 6
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _nvfp4_blocks(x64: torch.Tensor, block_2d: bool) -> torch.Tensor:
    """x as (..., blocks, 16) or (..., row tiles, column tiles, 256), zero-padded."""
    b = NVFP4_BLOCK
    if not block_2d:
        n = x64.shape[-1]
        p = torch.nn.functional.pad(x64, (0, -n % b))
        return p.reshape(x64.shape[:-1] + (-(-n // b), b))
    if x64.dim() < 2:
        raise ValueError(
            f"block_2d needs a (..., rows, columns) array, got shape {tuple(x64.shape)}"
        )
    r, c = x64.shape[-2:]
    p = torch.nn.functional.pad(x64, (0, -c % b, 0, -r % b))
    tiles = p.reshape(p.shape[:-2] + (p.shape[-2] // b, b, p.shape[-1] // b, b))
    return tiles.transpose(-3, -2).reshape(
        p.shape[:-2] + (p.shape[-2] // b, p.shape[-1] // b, b * b)
    )


def _nvfp4_unblocks(V: torch.Tensor, shape: tuple, block_2d: bool) -> torch.Tensor:
    b = NVFP4_BLOCK
    if not block_2d:
        return V.reshape(V.shape[:-2] + (V.shape[-2] * b,))[..., : shape[-1]]
    tiles = V.reshape(V.shape[:-1] + (b, b)).transpose(-3, -2)
    full = tiles.reshape(tiles.shape[:-4] + (tiles.shape[-4] * b, tiles.shape[-2] * b))
    return full[..., : shape[-2], : shape[-1]]


def _as_float64(x: torch.Tensor) -> torch.Tensor:
    _working(x.reshape(-1)[:0])  # the dtype check and its message
    return x.to(torch.float64)


@takes_tensors
def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """(448 · 6) / amax as a 0-d float32 tensor (see the reference); 1 without a usable amax."""
    if x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        a = x.abs()  # up to 32 bits: |x| <= float32's max is finiteness, amax is exact here
        usable = torch.isfinite(a)
    else:
        a = _as_float64(x).abs()
        usable = a <= _FLOAT32_MAX
    if not a.numel():
        return torch.ones((), dtype=torch.float32, device=x.device)
    amax = torch.where(usable, a, 0.0).amax().double()
    g = torch.clamp(_NVFP4_RANGE / amax, max=_FLOAT32_MAX).to(torch.float32)
    return torch.where(amax > 0, g, 1.0)


def _global_scale(global_scale, x: torch.Tensor) -> torch.Tensor:
    if global_scale is None:
        return nvfp4_global_scale(x)
    g = torch.as_tensor(global_scale).to(device=x.device, dtype=torch.float32).reshape(())
    if g.device.type == "cpu" and not (torch.isfinite(g) and g > 0):  # no device sync on CUDA
        raise ValueError(
            f"global_scale={float(g)!r} is invalid: use a positive finite float32 "
            "(or None: (448 * 6) / amax of x)"
        )
    return g


# E2M1's rounding boundaries, and whether a tie there goes up (to the even code above)
_E2M1_BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
                (3.5, True), (5.0, False))  # fmt: skip


def _e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """E2M1 codes of float64 values, nearest even, saturating: the number of boundaries below
    |q| (what ``encode(q, E2M1FN)`` returns, in 7 comparisons instead of bit-level steps)."""
    a = q.abs()
    mag = torch.zeros(q.shape, dtype=torch.uint8, device=q.device)
    for bound, tie_up in _E2M1_BOUNDS:
        mag += (a >= bound) if tie_up else (a > bound)
    return mag | (torch.signbit(q).to(torch.uint8) << 3)


@takes_tensors
def encode_nvfp4(
    x: torch.Tensor, *, global_scale: float | torch.Tensor | None = None, block_2d: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 -> (E2M1 codes, E4M3FN block-scale codes, float32 global scale); the same float64
    steps as :func:`lowbit.reference.formats.encode_nvfp4`, so the codes agree bit for bit (on
    CUDA a Triton kernel takes them, for blocks of 16 along the last axis)."""
    g = _global_scale(global_scale, x)
    if _use_kernel(x) and not block_2d:
        from lowbit.kernels import formats as kf

        return (*kf.encode_nvfp4(x, g), g)
    x64 = torch.atleast_1d(_as_float64(x))
    V = _nvfp4_blocks(x64, block_2d)
    ok = V.abs() <= _FLOAT32_MAX
    nan_block = ~ok.all(-1)
    V = torch.where(ok, V, 0.0)
    amax = V.abs().amax(-1)
    g64 = g.double()
    scale_codes = encode((g64 * amax) / E2M1FN.max_value, E4M3FN, saturate=True)
    scale = decode(scale_codes, E4M3FN, dtype=torch.float64)[..., None]
    scaled = torch.where(scale > 0, (V * g64) / torch.where(scale > 0, scale, 1.0), 0.0)
    codes = _e2m1_codes(torch.where(nan_block[..., None], 0.0, scaled))
    scale_codes = torch.where(nan_block, E4M3FN.nan_code, scale_codes).to(torch.uint8)
    return _nvfp4_unblocks(codes, tuple(x64.shape), block_2d), scale_codes, g


@takes_tensors
def decode_nvfp4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    global_scale: float | torch.Tensor,
    *,
    block_2d: bool = False,
    dtype=None,
) -> torch.Tensor:
    """Inverse of ``encode_nvfp4``: decode(P) · decode(S) / g in float64, cast once."""
    codes = torch.atleast_1d(codes)
    b = NVFP4_BLOCK
    if block_2d:
        if codes.dim() < 2:
            raise ValueError(
                f"block_2d needs (..., rows, columns) codes, got shape {tuple(codes.shape)}"
            )
        want = tuple(codes.shape[:-2]) + (-(-codes.shape[-2] // b), -(-codes.shape[-1] // b))
    else:
        want = tuple(codes.shape[:-1]) + (-(-codes.shape[-1] // b),)
    if tuple(scales.shape) != want:
        raise ValueError(
            f"scales shape {tuple(scales.shape)} does not match codes {tuple(codes.shape)}: "
            f"expected {want} (one E4M3 scale per {'16 x 16 tile' if block_2d else '16 values'})"
        )
    g = _global_scale(global_scale, codes).double()
    elements = _nvfp4_blocks(decode(codes, E2M1FN, dtype=torch.float64), block_2d)
    values = elements * decode(scales, E4M3FN, dtype=torch.float64)[..., None] / g
    out = _nvfp4_unblocks(values, tuple(codes.shape), block_2d)
    return out.to(_torch_dtype(dtype) or torch.float32)


@takes_tensors
def quantize_nvfp4(
    x: torch.Tensor, *, global_scale: float | torch.Tensor | None = None, block_2d: bool = False
) -> torch.Tensor:
    """NVFP4 fake quantization in x's floating dtype (16-bit inputs via float32, as the
    reference)."""
    out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    if _use_kernel(x) and not block_2d:
        from lowbit.kernels import formats as kf

        return kf.quantize_nvfp4(x, _global_scale(global_scale, x))
    codes, scales, g = encode_nvfp4(x, global_scale=global_scale, block_2d=block_2d)
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    out = decode_nvfp4(codes, scales, g, block_2d=block_2d, dtype=work)
    return out.to(out_dtype).reshape(x.shape)
