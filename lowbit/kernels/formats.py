"""Triton kernels for the number formats: fake quantization, encode, encode + pack, OCP MX block
quantization (E8M0 shared scales) and NVFP4 (E4M3 scales per 16 values, a float32 tensor scale).

Every kernel computes with integer bit operations (no ``rint``, no casts to bf16/fp8), in
float32 except NVFP4's, which takes the reference's float64 steps (its scale and element
roundings are decided on float64 values, exactly), so the same code runs natively on CUDA and
on CPU under ``TRITON_INTERPRET=1``, and its results are the reference's bit for bit (:mod:`lowbit.reference.formats` documents the
steps; :mod:`lowbit.fast.formats` has the same algorithm in torch, ``_encode_bits``).

The launchers take torch tensors (fp16/bf16/fp32; flattened, non-contiguous inputs are copied)
and a format from the reference. Stochastic rounding takes its uniforms from a ``noise`` tensor
(one float32 in [0, 1) per element), so a seeded ``torch.Generator`` makes it reproducible and
tests can feed the same noise to the reference. Data-dependent errors of the reference (NaN into
a format without a NaN code) are not raised here: a kernel cannot raise without a host sync.
Such a NaN is encoded as a zero magnitude, like the reference's own loop sees it. Stochastic
rounding of integer formats takes x - floor(x) in float32 (exact for |x| >= 0.5 or integer x;
the reference's is float64); for float formats it compares u * 2^shift < remainder exactly.

Public launchers: ``quantize``, ``encode``, ``encode_pack``, ``encode_mx``, ``quantize_mx``,
``encode_nvfp4``, ``quantize_nvfp4``.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from lowbit.reference.formats import E2M1FN, E4M3FN, E8M0FNU, FPFormat, IntFormat, parse_format

__all__ = [
    "quantize",
    "encode",
    "encode_pack",
    "encode_mx",
    "quantize_mx",
    "encode_nvfp4",
    "quantize_nvfp4",
]

# Elements per program: 1024 natively; far more under the interpreter, which pays ~1 ms per
# program but vectorises each one with NumPy.
BLOCK = 1 << 16 if os.environ.get("TRITON_INTERPRET") == "1" else 1024


# ---- shared device functions ---------------------------------------------------------------------


@triton.jit
def _fp_code(
    x,  # float32 values
    noise,  # float32 uniforms in [0, 1) (used when STOCHASTIC)
    scale_exp,  # int32 exponent s: encode x / 2^s (used when SCALED, MX)
    M: tl.constexpr,  # mantissa bits of the format
    EMIN: tl.constexpr,  # exponent of the smallest normal binade
    SUBNORMALS: tl.constexpr,  # False: field 0 is a normal binade, no zero (E8M0FNU)
    MAX_CODE: tl.constexpr,  # largest finite code magnitude
    OVERFLOW_CODE: tl.constexpr,  # code magnitude for overflow (max, Inf or NaN)
    NO_CODE_CODE: tl.constexpr,  # code for values the format cannot hold (negative/zero)
    NAN_CODE: tl.constexpr,  # canonical NaN code (0 when the format has none)
    SIGNED: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    SIGN_SHIFT: tl.constexpr,  # ebits + mbits: position of the sign bit
    STOCHASTIC: tl.constexpr,
    SCALED: tl.constexpr,
):
    # 1. sign and magnitude bits; Inf and NaN become magnitude 0 for steps 2-5
    bits = x.to(tl.int32, bitcast=True)
    negative = bits < 0
    absbits = bits & 0x7FFFFFFF
    nan = absbits > 0x7F800000
    inf = absbits == 0x7F800000
    nonzero = absbits != 0
    absbits = tl.where(absbits >= 0x7F800000, 0, absbits)
    # 2. binade exponent e = max(floor(log2(a / 2^s)), emin); float32 subnormals read
    #    floor(log2 mantissa) off the exponent of the mantissa converted to float (exact)
    E = absbits >> 23
    mant = absbits & 0x7FFFFF
    mant_log2 = (mant.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
    log2a = tl.where(E > 0, E - 127, mant_log2 - 149)
    lsb_exp = tl.maximum(E, 1) - 150  # a = sig * 2^lsb_exp
    if SCALED:
        log2a = log2a - scale_exp
        lsb_exp = lsb_exp - scale_exp
    e = tl.maximum(log2a, EMIN)
    sig = tl.where(E > 0, mant | 0x800000, mant)
    # 3-4. q = sig * 2^(lsb_exp - (e - M)): keep sig >> shift, round on the remainder
    shift = tl.minimum(e - M - lsb_exp, 25)
    rshift = tl.maximum(shift, 0)
    lshift = tl.maximum(-shift, 0)  # only for tiny inputs under MX scaling: exact
    r = (sig >> rshift) << lshift
    rem = sig & ((1 << rshift) - 1)
    if STOCHASTIC:
        # round up iff u < rem / 2^shift, tested exactly as u * 2^shift < rem: three exact
        # power-of-two scalings (Inf on overflow, where the answer is "no" anyway)
        todo = tl.minimum(tl.maximum(e - M - lsb_exp, 0), 300)
        t = noise
        for _ in tl.static_range(3):
            part = tl.minimum(todo, 100)
            t = t * _pow2(part)
            todo = todo - part
        r = r + (t < rem.to(tl.float32)).to(tl.int32)  # rem < 2^24: exact
    else:
        half = 1 << tl.maximum(rshift - 1, 0)
        up = (rem > half) | ((rem == half) & ((r & 1) == 1))
        r = r + up.to(tl.int32)
    # 5. code magnitude: a carry of r lands on the next binade's first code
    code = (e - EMIN) * (1 << M) + r
    if not SUBNORMALS:
        code = tl.maximum(code - (1 << M), 0)
    # 6. overflow, values without a code, NaN, sign
    code = tl.where((code > MAX_CODE) | inf, OVERFLOW_CODE, code)
    if not SIGNED:
        code = tl.where(negative & nonzero & ~nan, NO_CODE_CODE, code)
    if not HAS_ZERO:
        code = tl.where(~nonzero, NO_CODE_CODE, code)
    code = tl.where(nan, NAN_CODE, code)
    if SIGNED:
        code = code | (negative.to(tl.int32) << SIGN_SHIFT)
    return code


@triton.jit
def _int_code(
    x,  # float32 values
    noise,  # float32 uniforms (used when STOCHASTIC)
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    MASK: tl.constexpr,  # 2^bits - 1: two's complement code
    STOCHASTIC: tl.constexpr,
):
    x = tl.where(x != x, 0.0, x)
    x = tl.minimum(tl.maximum(x, QMIN - 1.0), QMAX + 1.0)  # |x| < 2^22: the magic add is exact
    q = (x + 12582912.0) - 12582912.0  # round half to even in float32
    if STOCHASTIC:
        floor = q - (q > x).to(tl.float32)
        q = floor + (noise < x - floor).to(tl.float32)
    q = tl.minimum(tl.maximum(q, QMIN), QMAX)
    return q.to(tl.int32) & MASK


@triton.jit
def _as_f32(raw, IN_BF16: tl.constexpr):
    """Loaded values as float32; bf16 arrives as int16 bits and is widened exactly by a shift
    (the interpreter's bf16 -> fp32 cast flushes subnormals)."""
    if IN_BF16:
        return ((raw.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    return raw.to(tl.float32)


@triton.jit
def _pow2(s):
    """2^s as float32 for integer s in [-149, 127], built from bits (subnormals included)."""
    normal = ((tl.maximum(s, -126) + 127) << 23).to(tl.float32, bitcast=True)
    sub = (1 << tl.minimum(tl.maximum(s + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(s >= -126, normal, sub)


@triton.jit
def _bf16_bits(v):
    """float32 -> bfloat16 bits, round half to even (interpreter casts to bf16 truncate)."""
    bits = v.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where((bits & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded).to(tl.int16)


@triton.jit
def _store_values(ptrs, value, mask, OUT_BF16: tl.constexpr):
    """Store float32 values in the output's dtype; bf16 as rounded bits (see _bf16_bits)."""
    if OUT_BF16:
        tl.store(ptrs, _bf16_bits(value), mask=mask)
    else:
        tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


# ---- elementwise kernels -------------------------------------------------------------------------


@triton.jit
def _encode_kernel(
    x_ptr,  # *fp16/bf16/fp32, n_elements values (contiguous)
    noise_ptr,  # *fp32 uniforms, read when STOCHASTIC
    table_ptr,  # *out dtype: value of every code, read when QUANTIZE
    out_ptr,  # *uint8/uint16 codes, or *out dtype values when QUANTIZE
    n_elements,  # number of elements
    M: tl.constexpr,
    EMIN: tl.constexpr,
    SUBNORMALS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    OVERFLOW_CODE: tl.constexpr,
    NO_CODE_CODE: tl.constexpr,
    NAN_CODE: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    SIGN_SHIFT: tl.constexpr,
    IS_INT: tl.constexpr,  # integer format: QMIN/QMAX/MASK below
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    MASK: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    QUANTIZE: tl.constexpr,  # write decoded values (table lookup) instead of codes
    IN_BF16: tl.constexpr,  # x_ptr holds bf16 bits as int16
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = _as_f32(tl.load(x_ptr + offs, mask=mask, other=0), IN_BF16)
    noise = 0.0
    if STOCHASTIC:
        noise = tl.load(noise_ptr + offs, mask=mask, other=0.0)
    if IS_INT:
        code = _int_code(x, noise, QMIN, QMAX, MASK, STOCHASTIC)
    else:
        code = _fp_code(
            x, noise, 0, M, EMIN, SUBNORMALS, MAX_CODE, OVERFLOW_CODE, NO_CODE_CODE, NAN_CODE,
            SIGNED, HAS_ZERO, SIGN_SHIFT, STOCHASTIC, False,
        )  # fmt: skip
    if QUANTIZE:
        value = tl.load(table_ptr + code, mask=mask)  # already in the output dtype
        tl.store(out_ptr + offs, value, mask=mask)
    else:
        tl.store(out_ptr + offs, code.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _encode_pack_kernel(
    x_ptr,  # *fp16/bf16/fp32 (rows, n) contiguous
    out_ptr,  # *uint8 (rows, n_bytes) contiguous
    n,  # elements per row
    n_bytes,  # bytes per row: ceil(n / PER_BYTE)
    stride_xr,  # row stride of x (elements)
    stride_or,  # row stride of out (bytes)
    M: tl.constexpr,
    EMIN: tl.constexpr,
    SUBNORMALS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    OVERFLOW_CODE: tl.constexpr,
    NO_CODE_CODE: tl.constexpr,
    NAN_CODE: tl.constexpr,
    SIGNED: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    SIGN_SHIFT: tl.constexpr,
    IS_INT: tl.constexpr,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    MASK: tl.constexpr,
    BITS: tl.constexpr,  # bits per packed code (1, 2, 4 or 8)
    PER_BYTE: tl.constexpr,  # 8 // BITS codes per byte
    IN_BF16: tl.constexpr,  # x_ptr holds bf16 bits as int16
    BLOCK: tl.constexpr,  # bytes per program
):
    row = tl.program_id(0)
    byte = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    slot = tl.arange(0, PER_BYTE)  # (PER_BYTE,)
    col = byte[:, None] * PER_BYTE + slot[None, :]  # (BLOCK, PER_BYTE)
    mask = col < n
    x = _as_f32(tl.load(x_ptr + row * stride_xr + col, mask=mask, other=0), IN_BF16)
    if IS_INT:
        code = _int_code(x, 0.0, QMIN, QMAX, MASK, False)
    else:
        code = _fp_code(
            x, 0.0, 0, M, EMIN, SUBNORMALS, MAX_CODE, OVERFLOW_CODE, NO_CODE_CODE, NAN_CODE,
            SIGNED, HAS_ZERO, SIGN_SHIFT, False, False,
        )  # fmt: skip
    code = tl.where(mask, code, 0)  # padding codes are zero, as in pack()
    packed = tl.sum(code << (slot[None, :] * BITS), axis=1)  # disjoint bits: sum == OR
    tl.store(out_ptr + row * stride_or + byte, packed.to(tl.uint8), mask=byte < n_bytes)


# ---- MX kernel ---------------------------------------------------------------------------------------


@triton.jit
def _mx_kernel(
    x_ptr,  # *fp16/bf16/fp32 (rows, n) contiguous
    out_ptr,  # *uint8 codes (rows, n), or values (rows, n) in x's dtype when QUANTIZE
    scale_ptr,  # *uint8 E8M0 scale codes (rows, n_blocks), written when not QUANTIZE
    table_ptr,  # *fp32 value of every element code
    n,  # elements per row
    n_blocks,  # MX blocks per row: ceil(n / MX_BLOCK)
    M: tl.constexpr,
    EMIN: tl.constexpr,
    SUBNORMALS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    MAX_CODE: tl.constexpr,
    SIGN_SHIFT: tl.constexpr,
    EMAX_ELEM: tl.constexpr,  # exponent of the element format's largest binade
    MX_BLOCK: tl.constexpr,  # values sharing one scale (32 in MX)
    BLOCK_P2: tl.constexpr,  # MX_BLOCK rounded up to a power of two
    GROUPS: tl.constexpr,  # MX blocks per program
    QUANTIZE: tl.constexpr,  # write decode(code) * 2^s instead of codes and scales
    OUT_BF16: tl.constexpr,  # values are written as bf16 bits (out_ptr is int16)
    IN_BF16: tl.constexpr,  # x_ptr holds bf16 bits as int16
):
    row = tl.program_id(0)
    blk = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # (GROUPS,)
    j = tl.arange(0, BLOCK_P2)  # (BLOCK_P2,)
    col = blk[:, None] * MX_BLOCK + j[None, :]  # (GROUPS, BLOCK_P2)
    mask = (j[None, :] < MX_BLOCK) & (col < n)
    x = _as_f32(tl.load(x_ptr + row * n + col, mask=mask, other=0), IN_BF16)
    # shared exponent s = floor(log2 amax) - emax_elem, clamped to E8M0's [-127, 127]; a block
    # with NaN or Inf inside, or with s above 127, gets the NaN scale and zero codes
    finite = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) < 0x7F800000
    x = tl.where(finite, x, 0.0)
    amax = tl.max(tl.abs(x), axis=1)  # (GROUPS,)
    abits = amax.to(tl.int32, bitcast=True)
    aE = abits >> 23
    a_log2_sub = ((abits & 0x7FFFFF).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 276
    a_log2 = tl.where(aE > 0, aE - 127, a_log2_sub)
    s = tl.where(amax > 0, a_log2 - EMAX_ELEM, -127)
    nan_block = (tl.min(finite.to(tl.int32), axis=1) == 0) | (s > 127)  # (GROUPS,)
    s = tl.minimum(tl.maximum(s, -127), 127)
    x = tl.where(nan_block[:, None], 0.0, x)
    code = _fp_code(
        x, 0.0, s[:, None], M, EMIN, SUBNORMALS, MAX_CODE, MAX_CODE, 0, 0, True, HAS_ZERO,
        SIGN_SHIFT, False, True,
    )  # fmt: skip
    if QUANTIZE:
        value = tl.load(table_ptr + code, mask=mask) * _pow2(s)[:, None]  # one rounding
        value = tl.where(nan_block[:, None], float("nan"), value)
        _store_values(out_ptr + row * n + col, value, mask, OUT_BF16)
    else:
        tl.store(out_ptr + row * n + col, code.to(tl.uint8), mask=mask)
        scale = tl.where(nan_block, 255, s + 127)
        tl.store(scale_ptr + row * n_blocks + blk, scale.to(tl.uint8), mask=blk < n_blocks)


# ---- NVFP4 kernel ------------------------------------------------------------------------------------


@triton.jit
def _e4m3_code_f64(v):
    """E4M3FN code of v >= 0 (float64), round to nearest even, saturating at 448: the rounding
    point found with int64 bit operations on v's own bits (exact for every float64)."""
    bits = v.to(tl.int64, bitcast=True)
    E = (bits >> 52) & 0x7FF
    log2v = E - 1023
    e = tl.maximum(log2v, -6)  # E4M3's smallest normal binade
    sig = (bits & 0xFFFFFFFFFFFFF) | 0x10000000000000
    shift = tl.minimum(49 + e - log2v, 62)  # keep 3 mantissa bits in binade e; tiny v -> 0
    r = sig >> shift
    rem = sig & ((tl.full(shift.shape, 1, tl.int64) << shift) - 1)
    half = tl.full(shift.shape, 1, tl.int64) << (shift - 1)
    r = r + ((rem > half) | ((rem == half) & ((r & 1) == 1))).to(tl.int64)
    code = (e + 6) * 8 + r
    return tl.where(E == 0, 0, tl.minimum(code, 126)).to(tl.int32)


@triton.jit
def _e2m1_code_f64(q):
    """E2M1 code of a float64 q, nearest even, saturating at 6: the magnitude code is the number
    of rounding boundaries below |q| (a tie goes up where the upper code is even)."""
    a = tl.abs(q)
    mag = (a > 0.25).to(tl.int32)
    mag += ((a > 0.75) | (a == 0.75)).to(tl.int32)
    mag += (a > 1.25).to(tl.int32)
    mag += ((a > 1.75) | (a == 1.75)).to(tl.int32)
    mag += (a > 2.5).to(tl.int32)
    mag += ((a > 3.5) | (a == 3.5)).to(tl.int32)
    mag += (a > 5.0).to(tl.int32)
    negative = q.to(tl.int64, bitcast=True) < 0  # -0.0 keeps its sign bit, as in encode()
    return mag | (negative.to(tl.int32) << 3)


@triton.jit
def _nvfp4_kernel(
    x_ptr,  # *fp16/bf16/fp32 (rows, n) contiguous
    g_ptr,  # *fp32 the global scale (one value)
    out_ptr,  # *uint8 codes (rows, n), or values in x's dtype when QUANTIZE
    scale_ptr,  # *uint8 E4M3FN scale codes (rows, n_blocks), written when not QUANTIZE
    e4m3_ptr,  # *fp32 value of every E4M3FN code
    e2m1_ptr,  # *fp32 value of every E2M1 code
    n,
    n_blocks,
    GROUPS: tl.constexpr,  # NVFP4 blocks (of 16) per program
    QUANTIZE: tl.constexpr,
    OUT_BF16: tl.constexpr,
    IN_BF16: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    col = blk[:, None] * 16 + tl.arange(0, 16)[None, :]  # (GROUPS, 16)
    mask = col < n
    x = _as_f32(tl.load(x_ptr + row * n + col, mask=mask, other=0), IN_BF16)
    g = tl.load(g_ptr).to(tl.float64)
    # the reference's float64 steps: a block with NaN or Inf gets the NaN scale, zero codes
    finite = (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) < 0x7F800000
    nan_block = tl.min(finite.to(tl.int32), axis=1) == 0  # (GROUPS,)
    x64 = tl.where(finite, x, 0.0).to(tl.float64)
    amax = tl.max(tl.abs(x64), axis=1)
    scale_code = _e4m3_code_f64((g * amax) / 6.0)
    scale = tl.load(e4m3_ptr + scale_code).to(tl.float64)  # (GROUPS,)
    positive = scale > 0
    scaled = (x64 * g) / tl.where(positive, scale, 1.0)[:, None]
    scaled = tl.where((positive & ~nan_block)[:, None], scaled, 0.0)
    code = _e2m1_code_f64(scaled)
    if QUANTIZE:
        value = tl.load(e2m1_ptr + code).to(tl.float64) * scale[:, None] / g
        value = tl.where(nan_block[:, None], float("nan"), value.to(tl.float32))
        _store_values(out_ptr + row * n + col, value, mask, OUT_BF16)
    else:
        tl.store(out_ptr + row * n + col, code.to(tl.uint8), mask=mask)
        scale_code = tl.where(nan_block, 127, scale_code)
        tl.store(scale_ptr + row * n_blocks + blk, scale_code.to(tl.uint8), mask=blk < n_blocks)


# ---- launchers -------------------------------------------------------------------------------------


def _fmt_args(fmt: FPFormat | IntFormat, saturate: bool) -> dict:
    """The format as kernel constants (one compilation per format and option set)."""
    if isinstance(fmt, IntFormat):
        return dict(
            M=0, EMIN=0, SUBNORMALS=True, MAX_CODE=0, OVERFLOW_CODE=0, NO_CODE_CODE=0, NAN_CODE=0,
            SIGNED=True, HAS_ZERO=True, SIGN_SHIFT=0, IS_INT=True, QMIN=fmt.qmin, QMAX=fmt.qmax,
            MASK=2**fmt.bits - 1,
        )  # fmt: skip
    if saturate or not fmt.has_nan:
        overflow = fmt.max_code
    else:
        overflow = fmt.inf_code if fmt.has_inf else fmt.nan_code
    return dict(
        M=fmt.mbits,
        EMIN=fmt.emin,
        SUBNORMALS=fmt.subnormals,
        MAX_CODE=fmt.max_code,
        OVERFLOW_CODE=overflow,
        NO_CODE_CODE=0 if saturate or not fmt.has_nan else fmt.nan_code,
        NAN_CODE=max(fmt.nan_code, 0),
        SIGNED=fmt.signed,
        HAS_ZERO=fmt.has_zero,
        SIGN_SHIFT=fmt.ebits + fmt.mbits,
        IS_INT=False,
        QMIN=0,
        QMAX=0,
        MASK=0,
    )


def _check_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"kernels take fp16/bf16/fp32 tensors, got {x.dtype}: convert it first")
    return x.contiguous()


def _raw(x: torch.Tensor) -> torch.Tensor:
    """What the kernels load: bf16 as its int16 bits (see _as_f32)."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


@functools.lru_cache(maxsize=64)
def _table_cpu(fmt: FPFormat | IntFormat, dtype: torch.dtype) -> torch.Tensor:
    from lowbit.fast.formats import values

    return values(fmt).to(dtype)  # float64 -> dtype: one rounding, as the reference


def _table(fmt: FPFormat | IntFormat, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _table_cpu(fmt, dtype).to(device)


def _elementwise(x, fmt, saturate, noise, quantize_values):
    fmt = parse_format(fmt)
    x = _check_input(x)
    n = x.numel()
    code_dtype = torch.uint8 if fmt.bits <= 8 else torch.uint16
    if quantize_values:
        out = _raw(torch.empty_like(x))
        table = _raw(_table(fmt, x.dtype, x.device))  # bf16 values are copied as bits
    else:
        # uint16 stores go through int16 (same bits; Triton has no uint16 pointer in every backend)
        out = torch.empty(
            x.shape,
            dtype=torch.uint8 if code_dtype == torch.uint8 else torch.int16,
            device=x.device,
        )
        table = out
    if noise is not None:
        noise = noise.reshape(-1).to(device=x.device, dtype=torch.float32).contiguous()
        if noise.numel() != n:
            raise ValueError(
                f"noise has {noise.numel()} elements for {n} inputs: give one per element"
            )
    if n:
        _encode_kernel[(triton.cdiv(n, BLOCK),)](
            _raw(x), noise if noise is not None else x, table, out, n,
            **_fmt_args(fmt, saturate), STOCHASTIC=noise is not None,
            QUANTIZE=quantize_values, IN_BF16=x.dtype == torch.bfloat16, BLOCK=BLOCK,
        )  # fmt: skip
    if quantize_values:
        return out.view(x.dtype)
    return out.view(torch.uint16) if code_dtype == torch.uint16 else out


# Bytes per element: read 2-4 (x) [+ 4 noise], write 1-2 (codes) or 2-4 (values); no FLOPs to speak of
# (~40 integer ops per element), so all of these are memory-bound: compare with copy bandwidth.
def quantize(
    x: torch.Tensor, fmt, *, saturate: bool = True, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake quantization ``decode(encode(x))`` in x's dtype (stochastic when ``noise`` is given)."""
    return _elementwise(x, fmt, saturate, noise, True)


# Bytes per element: read 2-4, write 1 (<= 8-bit formats) or 2.
def encode(
    x: torch.Tensor, fmt, *, saturate: bool = True, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes of ``fmt`` (uint8 up to 8 bits, else uint16), same shape as ``x``."""
    return _elementwise(x, fmt, saturate, noise, False)


# Bytes per element: read 2-4, write bits/8.
def encode_pack(
    x: torch.Tensor, fmt, *, saturate: bool = True, bits: int | None = None
) -> torch.Tensor:
    """Encode and pack along the last axis in one pass: ``pack(encode(x), bits)`` with
    ``bits`` in (1, 2, 4, 8) (default: the format's bits rounded up to one of those)."""
    fmt = parse_format(fmt)
    if bits is None:
        bits = next(b for b in (1, 2, 4, 8) if b >= fmt.bits) if fmt.bits <= 8 else 0
    if bits not in (1, 2, 4, 8) or fmt.bits > bits:
        raise ValueError(
            f"encode_pack packs {fmt.bits}-bit codes into bits in (1, 2, 4, 8) >= {fmt.bits}, got {bits}: "
            "use encode() then lowbit.fast.formats.pack() for other widths"
        )
    x = _check_input(torch.atleast_1d(x))
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    per_byte = 8 // bits
    n_bytes = -(-n // per_byte)
    out = torch.empty(x.shape[:-1] + (n_bytes,), dtype=torch.uint8, device=x.device)
    if rows and n:
        block = min(BLOCK // per_byte, triton.next_power_of_2(n_bytes))
        _encode_pack_kernel[(rows, triton.cdiv(n_bytes, block))](
            _raw(x), out, n, n_bytes, n, n_bytes, **_fmt_args(fmt, saturate),
            BITS=bits, PER_BYTE=per_byte, IN_BF16=x.dtype == torch.bfloat16, BLOCK=block,
        )  # fmt: skip
    return out


def _block_outputs(x: torch.Tensor, n_blocks: int, quantize_values: bool):
    """The block kernels' outputs: values in x's dtype (bf16 stored as int16 bits), or uint8
    codes with uint8 scale codes per block; and whether the values are bf16 bits."""
    out_bf16 = quantize_values and x.dtype == torch.bfloat16
    if quantize_values:
        out = torch.empty(x.shape, dtype=torch.int16 if out_bf16 else x.dtype, device=x.device)
        return out, out, out_bf16
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty(x.shape[:-1] + (n_blocks,), dtype=torch.uint8, device=x.device)
    return out, scales, out_bf16


def _mx(x: torch.Tensor, fmt, block: int, quantize_values: bool):
    fmt = parse_format(fmt)
    if not isinstance(fmt, FPFormat) or not fmt.signed or fmt.bits > 8:
        raise ValueError(f"MX element format must be a signed float format of <= 8 bits, got {fmt}")
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r} is invalid: use a positive block size (MX uses 32)")
    shape = x.shape
    x = _check_input(torch.atleast_1d(x))
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    n_blocks = -(-n // block)
    block_p2 = triton.next_power_of_2(block)
    groups = max(
        1, min(BLOCK // 32, max(1, 4096 // block_p2), triton.next_power_of_2(max(n_blocks, 1)))
    )
    table = _table(fmt, torch.float32, x.device)
    out, scales, out_bf16 = _block_outputs(x, n_blocks, quantize_values)
    if rows and n:
        _mx_kernel[(rows, triton.cdiv(n_blocks, groups))](
            _raw(x), out, scales, table, n, n_blocks,
            M=fmt.mbits, EMIN=fmt.emin, SUBNORMALS=fmt.subnormals, HAS_ZERO=fmt.has_zero, MAX_CODE=fmt.max_code, SIGN_SHIFT=fmt.ebits + fmt.mbits,
            EMAX_ELEM=math.frexp(fmt.max_value)[1] - 1, MX_BLOCK=block, BLOCK_P2=block_p2,
            GROUPS=groups, QUANTIZE=quantize_values, OUT_BF16=out_bf16,
            IN_BF16=x.dtype == torch.bfloat16,
        )  # fmt: skip
    if quantize_values:
        return (out.view(torch.bfloat16) if out_bf16 else out).reshape(shape)
    return out, scales


# Bytes per element: read 2-4, write 1 + 1/block (scales); one pass, the block max stays in registers.
def encode_mx(x: torch.Tensor, fmt, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MX along the last axis -> (uint8 element codes, uint8 E8M0 scale codes)."""
    return _mx(x, fmt, block, False)


# Bytes per element: read 2-4, write 2-4 (values in x's dtype).
def quantize_mx(x: torch.Tensor, fmt, block: int = 32) -> torch.Tensor:
    """OCP MX fake quantization along the last axis, in x's dtype."""
    return _mx(x, fmt, block, True)


def _nvfp4(x: torch.Tensor, global_scale: torch.Tensor, quantize_values: bool):
    shape = x.shape
    x = _check_input(torch.atleast_1d(x))
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    n_blocks = -(-n // 16)
    groups = max(1, min(BLOCK // 16, triton.next_power_of_2(max(n_blocks, 1))))
    g = global_scale.to(device=x.device, dtype=torch.float32).reshape(1).contiguous()
    out, scales, out_bf16 = _block_outputs(x, n_blocks, quantize_values)
    if rows and n:
        _nvfp4_kernel[(rows, triton.cdiv(n_blocks, groups))](
            _raw(x), g, out, scales, _table(E4M3FN, torch.float32, x.device),
            _table(E2M1FN, torch.float32, x.device), n, n_blocks, GROUPS=groups,
            QUANTIZE=quantize_values, OUT_BF16=out_bf16, IN_BF16=x.dtype == torch.bfloat16,
        )  # fmt: skip
    if quantize_values:
        return (out.view(torch.bfloat16) if out_bf16 else out).reshape(shape)
    return out, scales


# Bytes per element: read 2-4, write 1 + 1/16 (scales); float64 arithmetic per element.
def encode_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 along the last axis with the given float32 global scale -> (uint8 E2M1 codes,
    uint8 E4M3FN scale codes per 16 values): the reference's float64 steps."""
    return _nvfp4(x, global_scale, False)


# Bytes per element: read 2-4, write 2-4.
def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 fake quantization along the last axis, in x's dtype (through float32)."""
    return _nvfp4(x, global_scale, True)


assert E8M0FNU.nan_code == 255  # the NaN scale code written by _mx_kernel
assert E4M3FN.nan_code == 127 and E4M3FN.max_code == 126  # _nvfp4_kernel's constants
