"""Number formats: any ExMy float, n-bit integers, OCP MX and NVFP4 block scaling — the reference.

Sources: IEEE 754-2019 (binary interchange formats, roundTiesToEven); OCP 8-bit Floating Point
Specification (OFP8) rev. 1.0 (E5M2, E4M3FN); OCP Microscaling Formats (MX) v1.0 (E3M2FN,
E2M3FN, E2M1FN elements, E8M0FNU shared scales, block size 32); NVIDIA's NVFP4 (E2M1 elements,
E4M3FN scales per 16 values, a float32 tensor scale; its layout as compressed-tensors stores it).
Names follow ml_dtypes.

A float format has 1 sign bit (unless unsigned), ``ebits`` exponent bits and ``mbits`` mantissa
bits. A code is the bit pattern ``sign | exponent field | mantissa field`` in the low bits of an
unsigned integer. With ``bias`` b, emin = 1 - b (the smallest normal exponent) and M = mbits:

    exponent field f > 0 (normal):   value = (2^M + mantissa) * 2^(f - b - M)
    exponent field f = 0 (subnormal): value = mantissa * 2^(emin - M)

A format without subnormals (E8M0FNU) treats f = 0 as a normal binade and has no zero.
``specials`` says which codes are not numbers: "ieee" reserves the all-ones exponent for Inf
(mantissa 0) and NaN (mantissa != 0); "fn" reserves only the all-ones code for NaN; "none"
makes every code a finite number. The largest finite code follows from that in one formula
(``FPFormat.max_code``), and every limit is the decoded value of a code.

Encoding (``encode``) is written as the textbook algorithm, one step per line:

1. sign s and magnitude a = |x|;
2. binade exponent e = max(floor(log2 a), emin), from ``frexp`` so exact powers of two are exact;
3. the grid step in that binade, step = 2^(e - M), and q = a / step (exact: a power-of-two scaling);
4. round q to an integer significand r: nearest, ties to even r (this is IEEE's tie rule for
   M >= 1, and also what ml_dtypes and LLM-FP4's ``torch.round(x / step)`` do for M = 0, where
   ties within a binade go up); or stochastically, r = floor(q) + [u < q - floor(q)];
5. the code magnitude is (e - emin) * 2^M + r (minus 2^M without subnormals): a carry of r into
   the next binade lands on the next code automatically;
6. overflow (code above ``max_code``): saturate to ±max, or (``saturate=False``) go to Inf, else
   NaN, else saturate — exactly ``x.astype(ml_dtypes.<format>)``.

Public functions:

* ``FPFormat``, ``IntFormat``: frozen dataclasses describing formats; limits derived.
* ``E5M2, E4M3FN, E3M2FN, E2M3FN, E2M1FN, E8M0FNU`` (and ``FP16, BF16`` as self-checks).
* ``parse_format(name)``: "e2m1", "e4m3fn", "e5m2", "int4", "uint8", "e3m2_b5", ...
* ``encode(x, fmt, *, rounding, saturate, seed)`` -> codes (uint8 up to 8 bits, else uint16).
* ``decode(codes, fmt, dtype=None)`` -> values (float32, or ``dtype``).
* ``quantize(x, fmt, ...)`` = decode(encode(x)) in x's dtype (fake quantization).
* ``values(fmt)``: every code's value, in code order.
* ``pack(codes, bits)`` / ``unpack(packed, bits, n=None)``: little-endian bit streams (two 4-bit
  codes per byte, element 0 in the low nibble; four 6-bit codes per 3 bytes; ...).
* ``encode_mx``, ``decode_mx``, ``quantize_mx``: OCP MX block scaling with E8M0 shared scales.
* ``encode_nvfp4``, ``decode_nvfp4``, ``quantize_nvfp4``, ``nvfp4_global_scale``: NVIDIA's
  NVFP4 (E2M1 elements, E4M3 scales per 16 values or 16 x 16 tiles, a float32 tensor scale).

Choices where the sources leave room: NaN input to a format without a NaN code raises
``ValueError`` (ml_dtypes returns an arbitrary code); integer formats have no Inf/NaN, so they
always saturate; negative input to an unsigned format saturates to its smallest value (or, with
``saturate=False``, becomes NaN like ml_dtypes' E8M0FNU).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numba import njit

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

Specials = Literal["none", "fn", "ieee"]
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = 2.0**-149  # smallest float32 subnormal: every code must decode exactly in float32


def _magnitude_value(mag: int, fmt: FPFormat) -> float:
    """Value of a code magnitude (sign bit clear) that holds a finite number."""
    M = fmt.mbits
    field = mag >> M  # exponent field
    mantissa = mag & (2**M - 1)
    with np.errstate(over="ignore"):  # an invalid bias may overflow: __post_init__ reports it
        if field == 0 and fmt.subnormals:
            return float(np.ldexp(float(mantissa), fmt.emin - M))  # subnormal: no implicit one
        return float(np.ldexp(float(2**M + mantissa), field - fmt.bias - M))  # type: ignore[operator]


def _is_integer(value: object) -> bool:
    """A Python or NumPy integer, but not a bool (``FPFormat(True, 2)`` is a mistake)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_flags(fmt: object, *fields: str) -> None:
    for field in fields:
        value = getattr(fmt, field)
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{field}={value!r} is invalid: pass True or False")
        object.__setattr__(fmt, field, bool(value))


@dataclass(frozen=True)
class FPFormat:
    """An ExMy floating-point format.

    Args:
        ebits: exponent bits (>= 1).
        mbits: mantissa (fraction) bits (>= 0).
        bias: exponent bias; defaults to ``2**(ebits - 1) - 1``.
        specials: "none" (every code finite), "fn" (only the all-ones code is NaN, no Inf),
            "ieee" (all-ones exponent holds Inf and NaN).
        signed: whether there is a sign bit.
        subnormals: False makes exponent field 0 a normal binade and removes zero (E8M0FNU).
    """

    ebits: int
    mbits: int
    bias: int | None = None
    specials: Specials = "none"
    signed: bool = True
    subnormals: bool = True

    def __post_init__(self) -> None:
        if not _is_integer(self.ebits) or self.ebits < 1:
            raise ValueError(f"ebits={self.ebits!r} is invalid: a float format needs ebits >= 1")
        if not _is_integer(self.mbits) or self.mbits < 0:
            raise ValueError(f"mbits={self.mbits!r} is invalid: use mbits >= 0")
        _check_flags(self, "signed", "subnormals")
        object.__setattr__(self, "ebits", int(self.ebits))
        object.__setattr__(self, "mbits", int(self.mbits))
        if self.specials not in ("none", "fn", "ieee"):
            raise ValueError(f"specials={self.specials!r} is invalid: use 'none', 'fn' or 'ieee'")
        if self.bits > 16:
            raise ValueError(
                f"e{self.ebits}m{self.mbits} has {self.bits} bits in total: at most 16 are supported"
            )
        if self.specials == "ieee" and self.mbits == 0:
            raise ValueError(
                "specials='ieee' needs mbits >= 1 (NaN is an all-ones exponent with a nonzero "
                "mantissa); use specials='fn' or 'none' for mbits=0"
            )
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (self.ebits - 1) - 1)
        elif not _is_integer(self.bias):
            raise ValueError(f"bias={self.bias!r} is invalid: the exponent bias is an integer")
        object.__setattr__(self, "bias", int(self.bias))  # type: ignore[arg-type]
        if self.max_code < 0 or (self.max_code == 0 and self.subnormals):
            raise ValueError(
                f"{self.name}: specials={self.specials!r} leave no finite nonzero value"
            )
        if not self.max_value <= _FLOAT32_MAX:
            raise ValueError(
                f"bias={self.bias} makes the max of e{self.ebits}m{self.mbits} ({self.max_value:.3g}) "
                f"exceed float32: raise the bias"
            )
        if self.min_subnormal < _FLOAT32_TINY:
            raise ValueError(
                f"bias={self.bias} makes the smallest value of e{self.ebits}m{self.mbits} "
                f"({self.min_subnormal:.3g}) underflow float32: lower the bias"
            )

    # ---- structure ------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Total width in bits: sign (if signed) + exponent + mantissa."""
        return int(self.signed) + self.ebits + self.mbits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade."""
        assert self.bias is not None
        return 1 - self.bias if self.subnormals else -self.bias

    @property
    def max_code(self) -> int:
        """Largest code magnitude (sign bit clear) that holds a finite number."""
        all_ones = 2 ** (self.ebits + self.mbits) - 1
        reserved = {"none": 0, "fn": 1, "ieee": 2**self.mbits}[self.specials]
        return all_ones - reserved

    @property
    def has_nan(self) -> bool:
        """Whether some code decodes to NaN (specials "fn" or "ieee")."""
        return self.specials != "none"

    @property
    def has_inf(self) -> bool:
        """Whether the format has ±Inf (specials "ieee" only)."""
        return self.specials == "ieee"

    @property
    def has_zero(self) -> bool:
        """Whether code 0 is zero; formats without subnormals (E8M0FNU) have no zero."""
        return self.subnormals

    @property
    def nan_code(self) -> int:
        """Canonical NaN code with the sign clear (-1 if the format has no NaN): quiet NaN
        (top mantissa bit) for "ieee", the all-ones code for "fn" — what ml_dtypes writes."""
        if self.specials == "ieee":
            return ((2**self.ebits - 1) << self.mbits) | (1 << (self.mbits - 1))
        if self.specials == "fn":
            return 2 ** (self.ebits + self.mbits) - 1
        return -1

    @property
    def inf_code(self) -> int:
        """Code of +Inf (-1 if the format has no Inf)."""
        return (2**self.ebits - 1) << self.mbits if self.has_inf else -1

    # ---- limits, all decoded from codes ------------------------------------------------------
    @property
    def max_value(self) -> float:
        """Largest finite value, decoded from ``max_code``."""
        return _magnitude_value(self.max_code, self)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, ``2**emin``."""
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (the smallest normal when there are no subnormals)."""
        return _magnitude_value(1 if self.subnormals else 0, self)

    @property
    def name(self) -> str:
        """A name that ``parse_format`` maps back to this format: the named format's key, else
        the short form ("e4m3", "e3m2fn_b5"), else, where the short form means a named format
        with other specials (ml_dtypes' "e5m2" is IEEE-like), the explicit "e5m2_none"."""
        for key, fmt in NAMED_FORMATS.items():
            if fmt == self:
                return key
        unsigned = "" if self.signed else "u"
        tail = "" if self.bias == 2 ** (self.ebits - 1) - 1 else f"_b{self.bias}"
        tail += "" if self.subnormals else "_nosub"
        suffix = {"none": "", "fn": "fn", "ieee": "ieee"}[self.specials]
        short = f"e{self.ebits}m{self.mbits}{suffix}{unsigned}{tail}"
        if NAMED_FORMATS.get(short) in (None, self):
            return short
        return f"e{self.ebits}m{self.mbits}{unsigned}_{self.specials}{tail}"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class IntFormat:
    """An n-bit integer format (two's complement when signed)."""

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if not _is_integer(self.bits) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits={self.bits!r} is invalid: integer formats have 2..16 bits")
        _check_flags(self, "signed")
        object.__setattr__(self, "bits", int(self.bits))

    @property
    def qmin(self) -> int:
        """Smallest code: ``-2**(bits-1)`` when signed, else 0."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest code: ``2**(bits-1) - 1`` when signed, else ``2**bits - 1``."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_value(self) -> float:
        """Largest value, ``qmax`` as a float (integer codes are their own values)."""
        return float(self.qmax)

    @property
    def mbits(self) -> int:
        """Bits of precision below the leading one at the top of the range (for tier C)."""
        return self.bits - 1

    @property
    def min_subnormal(self) -> float:
        return 1.0

    @property
    def name(self) -> str:
        """ "int4", "uint8", ...: what ``parse_format`` maps back to this format."""
        return f"{'' if self.signed else 'u'}int{self.bits}"

    def __str__(self) -> str:
        return self.name


E5M2 = FPFormat(5, 2, specials="ieee")
E4M3FN = FPFormat(4, 3, specials="fn")
E3M2FN = FPFormat(3, 2)
E2M3FN = FPFormat(2, 3)
E2M1FN = FPFormat(2, 1)
E8M0FNU = FPFormat(8, 0, specials="fn", signed=False, subnormals=False)
FP16 = FPFormat(5, 10, specials="ieee")
BF16 = FPFormat(8, 7, specials="ieee")

NAMED_FORMATS: dict[str, FPFormat] = {
    "e5m2": E5M2,
    "e4m3fn": E4M3FN,
    "e3m2fn": E3M2FN,
    "e2m3fn": E2M3FN,
    "e2m1fn": E2M1FN,
    "e8m0fnu": E8M0FNU,
    "float16": FP16,
    "bfloat16": BF16,
}
_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_FP_PATTERN = re.compile(r"^e(\d+)m(\d+)(fn|ieee)?(u)?(?:_(none|fn|ieee))?(?:_b(-?\d+))?(_nosub)?$")
_INT_PATTERN = re.compile(r"^(u?)int(\d+)$")


def parse_format(name: str | FPFormat | IntFormat) -> FPFormat | IntFormat:
    """Parse a format name: a named format ("e4m3fn", "e2m1fn", "e8m0fnu", "bf16"), a generic
    ``"e<E>m<M>[fn|ieee][u][_none|_fn|_ieee][_b<bias>][_nosub]"`` (no suffix: every code
    finite, as in LLM-FP4; ``_none`` etc. spell the specials out where the short name is taken,
    e.g. "e5m2_none"), or "int<n>" / "uint<n>". Formats pass through unchanged."""
    if isinstance(name, (FPFormat, IntFormat)):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in NAMED_FORMATS:
        return NAMED_FORMATS[key]
    m = _INT_PATTERN.match(key)
    if m:
        return IntFormat(int(m.group(2)), signed=not m.group(1))
    m = _FP_PATTERN.match(key)
    if m:
        ebits, mbits, specials, unsigned, explicit_specials, bias, nosub = m.groups()
        return FPFormat(
            int(ebits),
            int(mbits),
            bias=None if bias is None else int(bias),
            specials=explicit_specials or specials or "none",  # type: ignore[arg-type]
            signed=not unsigned,
            subnormals=not nosub,
        )
    raise ValueError(
        f"unknown format {name!r}: use a name like 'e2m1', 'e4m3fn', 'e5m2', 'e8m0fnu' or 'int4'"
    )


# ---- decoding: one code at a time, then as a table ----------------------------------------------


def _code_value(code: int, fmt: FPFormat) -> float:
    """Value of one code: sign, then NaN / Inf / finite magnitude."""
    width = fmt.ebits + fmt.mbits
    mag = code & (2**width - 1)
    negative = fmt.signed and (code >> width) & 1
    if fmt.specials == "fn" and mag == 2**width - 1:
        value = math.nan
    elif fmt.specials == "ieee" and mag >> fmt.mbits == 2**fmt.ebits - 1:
        value = math.inf if mag & (2**fmt.mbits - 1) == 0 else math.nan
    else:
        value = _magnitude_value(mag, fmt)
    return -value if negative else value


def values(fmt: FPFormat | IntFormat | str) -> np.ndarray:
    """Every code's value in code order (float64), e.g. 16 values for E2M1FN."""
    return _value_table(parse_format(fmt)).copy()


@functools.lru_cache(maxsize=64)
def _value_table(fmt: FPFormat | IntFormat) -> np.ndarray:
    """``values(fmt)``, computed once per format (65,536 Python-level decodes for 16 bits)."""
    codes = range(2**fmt.bits)
    if isinstance(fmt, IntFormat):
        table = np.array([_int_code_value(c, fmt) for c in codes], dtype=np.float64)
    else:
        table = np.array([_code_value(c, fmt) for c in codes], dtype=np.float64)
    table.flags.writeable = False
    return table


def _int_code_value(code: int, fmt: IntFormat) -> int:
    if fmt.signed and code >= 2 ** (fmt.bits - 1):
        return code - 2**fmt.bits  # two's complement
    return code


def _code_dtype(fmt: FPFormat | IntFormat) -> type:
    return np.uint8 if fmt.bits <= 8 else np.uint16


def _check_code_range(codes: np.ndarray, fmt: FPFormat | IntFormat) -> None:
    """Codes must lie in [0, 2^bits): a wider code would read another code's bits."""
    if codes.size and (codes.min() < 0 or codes.max() >= 2**fmt.bits):
        raise ValueError(
            f"codes out of range for {fmt.name} ({fmt.bits} bits): max is {2**fmt.bits - 1}"
        )


def decode(codes: np.ndarray, fmt: FPFormat | IntFormat | str, dtype=None) -> np.ndarray:
    """Codes -> values (float32 unless ``dtype`` is given, e.g. ``np.float64``).

    Decoding is a table lookup into ``values(fmt)``: every code of a <= 16-bit format is listed
    once, step by step, by ``_code_value``. Values beyond ``dtype``'s range become +-Inf (E8M0
    into float16), as a NumPy cast does, without its overflow warning.
    """
    fmt = parse_format(fmt)
    codes = np.asarray(codes)
    if codes.dtype.kind not in "ui":
        raise ValueError(
            f"codes must be an unsigned integer array, got {codes.dtype}: use encode()"
        )
    _check_code_range(codes, fmt)
    with np.errstate(over="ignore"):
        table = _value_table(fmt).astype(np.dtype(dtype) if dtype is not None else np.float32)
    return table[codes.astype(np.int64)]


# ---- encoding ------------------------------------------------------------------------------------


@njit(cache=True)
def _encode_fp_loop(a, noise, M, emin, subnormals):  # pragma: no cover
    """Steps 2-5 of the module docstring for each magnitude ``a`` (float64, finite, >= 0).

    Returns code magnitudes (int64) that may exceed the format's largest finite code (the
    caller handles overflow). ``noise`` is empty for round-to-nearest-even, else one uniform [0, 1) per element.
    """
    out = np.empty(a.size, dtype=np.int64)
    stochastic = noise.size > 0
    for i in range(a.size):
        # 2. binade exponent e = floor(log2 a), clamped to the subnormal/first binade
        if a[i] == 0.0:
            e = emin
        else:
            _, k = math.frexp(a[i])  # a = f * 2^k with f in [0.5, 1)
            e = max(k - 1, emin)
        # 3. grid step of this binade and the scaled magnitude (exact)
        step = math.ldexp(1.0, e - M)
        q = a[i] / step
        # 4. round to an integer significand r
        r = math.floor(q)
        frac = q - r
        if stochastic:
            if noise[i] < frac:
                r += 1
        elif frac > 0.5 or (frac == 0.5 and r % 2 == 1):
            r += 1
        # 5. code magnitude; a carry of r to 2^(M+1) lands on the next binade's first code
        code = (e - emin) * (1 << M) + r
        if not subnormals:
            code = max(code - (1 << M), 0)  # no zero: underflow goes to the smallest value
        out[i] = code
    return out


def _encode_fp_numpy(a: np.ndarray, noise: np.ndarray, fmt: FPFormat) -> np.ndarray:
    """The same steps 2-5, vectorised with NumPy: a second spelling of the numba loop, which
    the tests hold bit-identical to it (the encoder itself runs the loop)."""
    M, emin = fmt.mbits, fmt.emin
    _, k = np.frexp(a)
    e = np.where(a == 0, emin, np.maximum(k.astype(np.int64) - 1, emin))
    q = a / np.ldexp(1.0, (e - M).astype(np.int32))
    r = np.floor(q)
    frac = q - r
    if noise.size:
        r = r + (noise < frac)
    else:
        r = r + ((frac > 0.5) | ((frac == 0.5) & (np.fmod(r, 2) == 1)))
    code = (e - emin) * 2**M + r.astype(np.int64)
    if not fmt.subnormals:
        code = np.maximum(code - 2**M, 0)
    return code


def _check_rounding(rounding: str, seed) -> None:
    if rounding not in ("nearest_even", "stochastic"):
        raise ValueError(f"rounding={rounding!r} is invalid: use 'nearest_even' or 'stochastic'")
    if rounding == "stochastic" and seed is None:
        raise ValueError("rounding='stochastic' needs seed=<int> so results are reproducible")


def _is_float(dtype: np.dtype) -> bool:
    """NumPy floats and ml_dtypes' (bfloat16, float8_*), which NumPy sees as kind "V"."""
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float")))


def _as_float64(x) -> np.ndarray:
    x = np.asarray(x)
    if not (_is_float(x.dtype) or x.dtype.kind in "iub"):
        raise ValueError(f"cannot quantize an array of dtype {x.dtype}: pass floating-point values")
    with np.errstate(invalid="ignore"):  # NumPy warns when casting NaNs with payloads
        return x.astype(np.float64)


def _noise(shape: tuple, rounding: str, seed) -> np.ndarray:
    if rounding == "nearest_even":
        return np.empty(0)
    return np.random.default_rng(seed).random(shape).ravel()


def encode(
    x: np.ndarray,
    fmt: FPFormat | IntFormat | str,
    *,
    rounding: str = "nearest_even",
    saturate: bool = True,
    seed: int | None = None,
) -> np.ndarray:
    """Values -> codes of ``fmt`` (uint8 up to 8 bits, else uint16), same shape as ``x``.

    ``rounding="stochastic"`` needs ``seed`` and picks one of the two neighbours with
    probability proportional to closeness (unbiased). ``saturate=False`` follows IEEE/OCP
    casting (overflow -> Inf, else NaN, else max), exactly like ``x.astype(ml_dtypes.<fmt>)``.
    """
    fmt = parse_format(fmt)
    _check_rounding(rounding, seed)
    x64 = _as_float64(x)
    return _encode(x64, fmt, saturate, _noise(x64.shape, rounding, seed))


def _encode(
    x64: np.ndarray, fmt: FPFormat | IntFormat, saturate: bool, noise: np.ndarray
) -> np.ndarray:
    """encode() with the rounding noise given (empty = nearest even); tests share the noise."""
    if isinstance(fmt, IntFormat):
        return _encode_int(x64, fmt, noise)
    shape = x64.shape
    x = x64.ravel()
    nan = np.isnan(x)
    if nan.any() and not fmt.has_nan:
        raise ValueError(
            f"{int(nan.sum())} NaN value(s) cannot be encoded in {fmt.name}, which has no NaN code: "
            "remove them or use a format with NaN (e.g. e4m3fn)"
        )
    # 1. sign and magnitude
    negative = np.signbit(x)  # NaNs keep their sign, as in ml_dtypes and torch casts
    a = np.abs(np.where(nan, 0.0, x))
    inf = np.isinf(a)
    # values with no code at all: negative ones in an unsigned format, zero without a zero code
    no_code = ~nan & ((negative & (a > 0) & (not fmt.signed)) | ((a == 0) & (not fmt.has_zero)))
    if no_code.any() and not saturate and not fmt.has_nan:
        raise ValueError(
            f"{int(no_code.sum())} value(s) have no code in {fmt.name} (negative or zero): pass saturate=True"
        )
    # 2-5. round finite magnitudes to code magnitudes
    code = _encode_fp_loop(np.where(inf, 0.0, a), noise, fmt.mbits, fmt.emin, fmt.subnormals)
    # 6. overflow: saturate, or Inf / NaN / saturate when saturate=False
    overflow = (code > fmt.max_code) | inf
    if saturate or not fmt.has_nan:
        overflow_code = fmt.max_code
    else:
        overflow_code = fmt.inf_code if fmt.has_inf else fmt.nan_code
    code = np.where(overflow, overflow_code, code)
    # no code: the smallest value when saturating, else NaN (what ml_dtypes does for E8M0FNU)
    code = np.where(no_code, 0 if saturate else fmt.nan_code, code)
    code = np.where(nan, fmt.nan_code, code)
    if fmt.signed:
        code = code | (negative.astype(np.int64) << (fmt.ebits + fmt.mbits))
    return code.astype(_code_dtype(fmt)).reshape(shape)


def _encode_int(x64: np.ndarray, fmt: IntFormat, noise: np.ndarray) -> np.ndarray:
    """Integers: round (nearest even or stochastic), clamp to [qmin, qmax], two's complement."""
    if np.isnan(x64).any():
        raise ValueError(
            f"{int(np.isnan(x64).sum())} NaN value(s) cannot be encoded in {fmt.name}: remove them"
        )
    x = np.clip(x64.ravel(), fmt.qmin - 1.0, fmt.qmax + 1.0)  # also maps +-Inf into range
    if noise.size:
        floor = np.floor(x)
        q = floor + (noise < x - floor)
    else:
        q = np.rint(x)  # NumPy's rint is round half to even
    q = np.clip(q, fmt.qmin, fmt.qmax).astype(np.int64)
    code = np.where(q < 0, q + 2**fmt.bits, q)
    return code.astype(_code_dtype(fmt)).reshape(x64.shape)


def quantize(
    x: np.ndarray,
    fmt: FPFormat | IntFormat | str,
    *,
    rounding: str = "nearest_even",
    saturate: bool = True,
    seed: int | None = None,
) -> np.ndarray:
    """Fake quantization: ``decode(encode(x))`` returned in x's floating dtype (float32 for
    integer inputs) — the same values as ``x.astype(ml_dtypes.<fmt>).astype(x.dtype)``.

    The result is exact whenever x's dtype holds every value of ``fmt`` (all <= 8-bit named
    formats fit fp16/bf16 except E8M0FNU; everything fits float32). Otherwise the final cast
    rounds, and values beyond the dtype's range become +-Inf, as the ml_dtypes round trip does.
    """
    x = np.asarray(x)
    out_dtype = x.dtype if _is_float(x.dtype) else np.dtype(np.float32)
    codes = encode(x, fmt, rounding=rounding, saturate=saturate, seed=seed)
    with np.errstate(over="ignore"):  # a format wider than x's dtype (E8M0 into fp16) -> +-Inf
        return decode(codes, fmt, dtype=np.float64).astype(out_dtype)


# ---- packing ---------------------------------------------------------------------------------------


def _group(bits: int) -> tuple[int, int]:
    """Codes per group and bytes per group so that a group fills whole bytes."""
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is invalid: pack codes of 1..8 bits")
    codes_per_group = math.lcm(bits, 8) // bits
    return codes_per_group, codes_per_group * bits // 8


def pack(codes: np.ndarray, bits: int = 4) -> np.ndarray:
    """Pack ``bits``-wide codes along the last axis into a little-endian bit stream of bytes.

    Code i occupies stream bits [i*bits, (i+1)*bits): for 4-bit codes, element 0 is the low
    nibble of byte 0. The last axis is padded with zero codes to a whole group
    (2 codes for 4 bits, 4 codes / 3 bytes for 6 bits); ``unpack(..., n=)`` trims it.
    """
    g, nbytes = _group(bits)
    codes = np.asarray(codes)
    if codes.dtype.kind not in "ui":
        raise ValueError(f"codes must be an integer array, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes do not fit in {bits} bits: mask them or use a wider pack")
    codes = np.atleast_1d(codes).astype(np.uint64)
    n = codes.shape[-1]
    pad = (-n) % g
    codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (pad,), np.uint64)], axis=-1)
    groups = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // g, g))  # (..., groups, g)
    shifts = np.arange(g, dtype=np.uint64) * np.uint64(bits)
    word = np.bitwise_or.reduce(groups << shifts, axis=-1)  # (..., groups), <= 64 bits
    byte_shifts = np.arange(nbytes, dtype=np.uint64) * np.uint64(8)
    out = (word[..., None] >> byte_shifts) & np.uint64(0xFF)  # (..., groups, nbytes)
    return out.astype(np.uint8).reshape(codes.shape[:-1] + (codes.shape[-1] // g * nbytes,))


def unpack(packed: np.ndarray, bits: int = 4, n: int | None = None) -> np.ndarray:
    """Inverse of ``pack``: uint8 bytes -> uint8 codes along the last axis (first ``n`` kept)."""
    g, nbytes = _group(bits)
    packed = np.atleast_1d(np.asarray(packed))
    if packed.dtype != np.uint8:
        raise ValueError(f"packed data must be uint8, got {packed.dtype}")
    if packed.shape[-1] % nbytes:
        raise ValueError(
            f"last axis of {packed.shape[-1]} bytes is not a multiple of {nbytes} ({bits}-bit groups)"
        )
    groups = packed.astype(np.uint64).reshape(
        packed.shape[:-1] + (packed.shape[-1] // nbytes, nbytes)
    )
    byte_shifts = np.arange(nbytes, dtype=np.uint64) * np.uint64(8)
    word = np.bitwise_or.reduce(groups << byte_shifts, axis=-1)  # (..., groups)
    shifts = np.arange(g, dtype=np.uint64) * np.uint64(bits)
    codes = (word[..., None] >> shifts) & np.uint64(2**bits - 1)  # (..., groups, g)
    codes = codes.astype(np.uint8).reshape(packed.shape[:-1] + (packed.shape[-1] // nbytes * g,))
    if n is not None:
        if not 0 <= n <= codes.shape[-1]:
            raise ValueError(f"n={n} is out of range: the data holds {codes.shape[-1]} codes")
        codes = codes[..., :n]
    return codes


# ---- OCP MX block scaling ----------------------------------------------------------------------------


def _check_mx(fmt: FPFormat | IntFormat | str, block: int) -> FPFormat:
    fmt = parse_format(fmt)
    if not isinstance(fmt, FPFormat) or not fmt.signed:
        raise ValueError(f"MX element format must be a signed float format, got {fmt}")
    if not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block={block!r} is invalid: use a positive block size (MX uses 32)")
    return fmt


def encode_mx(x: np.ndarray, fmt: FPFormat | str, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """OCP MX v1.0 quantization along the last axis -> (element codes, E8M0 scale codes).

    For each block of ``block`` values V (the last block may be shorter):
      shared exponent  s = floor(log2(max|V|)) - emax_elem
                       (emax_elem = exponent of the element format's largest binade);
      scale            X = 2^s, stored as the E8M0 code s + 127;
      elements         P_i = encode(V_i / X, fmt) with saturation (the spec clamps to max normal).
    An all-zero block gets the smallest scale (2^-127) and zero codes; below that, s clamps to
    -127 and the elements round on the finer grid. A block that cannot be represented — it holds
    NaN or +-Inf, or its s exceeds 127 (E8M0's largest scale; float64 blocks like
    ``[1e300, 1]``) — gets the NaN scale code 0xFF and zero element codes, so it decodes to NaN
    entirely (the spec's "NaN scale" and microxcaling's golden path): an Inf never comes back finite,
    and a scale is never silently clamped downwards.
    """
    fmt = _check_mx(fmt, block)
    x64 = np.atleast_1d(_as_float64(x))
    n = x64.shape[-1]
    nblocks = -(-n // block)
    padded = np.concatenate([x64, np.zeros(x64.shape[:-1] + (nblocks * block - n,))], axis=-1)
    V = padded.reshape(x64.shape[:-1] + (nblocks, block))  # (..., blocks, block)
    finite = np.isfinite(V)
    amax = np.max(np.abs(np.where(finite, V, 0.0)), axis=-1)  # (..., blocks)
    emax_elem = math.frexp(fmt.max_value)[1] - 1
    _, k = np.frexp(amax)  # floor(log2 amax) = k - 1 for amax > 0
    s = np.where(amax > 0, k.astype(np.int64) - 1 - emax_elem, -127)
    nan_block = ~finite.all(axis=-1) | (s > 127)
    s = np.clip(s, -127, 127)
    scale_codes = np.where(nan_block, E8M0FNU.nan_code, s + 127).astype(np.uint8)
    X = np.ldexp(1.0, s.astype(np.int32))[..., None]  # (..., blocks, 1)
    scaled = np.where(nan_block[..., None], 0.0, V / X)
    codes = encode(scaled, fmt, saturate=True).reshape(padded.shape)[..., :n]
    return codes, scale_codes


def decode_mx(
    codes: np.ndarray, scales: np.ndarray, fmt: FPFormat | str, block: int = 32, dtype=None
) -> np.ndarray:
    """Inverse of ``encode_mx``: value_i = decode(P_i) * 2^(scale - 127); NaN scale -> NaN block.
    Values beyond ``dtype``'s range (large scales into float16) become +-Inf without a warning."""
    fmt = _check_mx(fmt, block)
    codes, scales = np.asarray(codes), np.asarray(scales)
    n = codes.shape[-1]
    if scales.shape != codes.shape[:-1] + (-(-n // block),):
        raise ValueError(
            f"scales shape {scales.shape} does not match codes {codes.shape} with block={block}"
        )
    X = np.repeat(decode(scales, E8M0FNU, dtype=np.float64), block, axis=-1)[..., :n]
    out = decode(codes, fmt, dtype=np.float64) * X
    with np.errstate(over="ignore"):
        return out.astype(np.dtype(dtype) if dtype is not None else np.float32)


def quantize_mx(x: np.ndarray, fmt: FPFormat | str, block: int = 32) -> np.ndarray:
    """MX fake quantization: ``decode_mx(*encode_mx(x))`` in x's floating dtype."""
    x = np.asarray(x)
    out_dtype = x.dtype if _is_float(x.dtype) else np.dtype(np.float32)
    codes, scales = encode_mx(x, fmt, block)
    return decode_mx(codes, scales, fmt, block, dtype=np.float64).astype(out_dtype).reshape(x.shape)


# ---- NVFP4 block scaling -----------------------------------------------------------------------------

NVFP4_BLOCK = 16  # values per E4M3 scale (a 16 x 16 tile with ``block_2d``)
_NVFP4_RANGE = E4M3FN.max_value * E2M1FN.max_value  # 448 * 6: the global scale maps amax here


def _nvfp4_blocks(x64: np.ndarray, block_2d: bool) -> np.ndarray:
    """x as (..., blocks, 16) or, with ``block_2d``, (..., row tiles, column tiles, 256),
    zero-padded to whole blocks."""
    b = NVFP4_BLOCK
    if not block_2d:
        n = x64.shape[-1]
        pad = [(0, 0)] * (x64.ndim - 1) + [(0, -n % b)]
        return np.pad(x64, pad).reshape(x64.shape[:-1] + (-(-n // b), b))
    if x64.ndim < 2:
        raise ValueError(f"block_2d needs a (..., rows, columns) array, got shape {x64.shape}")
    r, c = x64.shape[-2:]
    pad = [(0, 0)] * (x64.ndim - 2) + [(0, -r % b), (0, -c % b)]
    p = np.pad(x64, pad)
    lead, rt, ct = tuple(p.shape[:-2]), p.shape[-2] // b, p.shape[-1] // b
    tiles = p.reshape(lead + (rt, b, ct, b))
    return np.swapaxes(tiles, -3, -2).reshape(lead + (rt, ct, b * b))


def _nvfp4_unblocks(V: np.ndarray, shape: tuple, block_2d: bool) -> np.ndarray:
    """Inverse of ``_nvfp4_blocks``: back to ``shape`` (the padding dropped)."""
    b = NVFP4_BLOCK
    if not block_2d:
        return V.reshape(V.shape[:-2] + (V.shape[-2] * b,))[..., : shape[-1]]
    tiles = np.swapaxes(V.reshape(V.shape[:-1] + (b, b)), -3, -2)
    full = tiles.reshape(tiles.shape[:-4] + (tiles.shape[-4] * b, tiles.shape[-2] * b))
    return full[..., : shape[-2], : shape[-1]]


def _representable(x64: np.ndarray) -> np.ndarray:
    """Values NVFP4 can scale: finite and within float32's range (its scales are float32)."""
    return np.abs(x64) <= _FLOAT32_MAX  # False for NaN and +-Inf too


def nvfp4_global_scale(x: np.ndarray) -> np.float32:
    """The per-tensor scale g = (448 · 6) / amax, as float32: it maps the tensor's largest
    magnitude onto the largest block scale times the largest element. amax is taken over the
    values NVFP4 can hold (NaN, Inf and magnitudes beyond float32 are left out); a tensor with
    none of them, or only zeros, gets g = 1. g is clamped to float32's finite range."""
    x64 = np.asarray(_as_float64(x))
    ok = _representable(x64)
    amax = float(np.max(np.abs(np.where(ok, x64, 0.0)), initial=0.0))
    if amax == 0.0:
        return np.float32(1.0)
    return np.float32(min(_NVFP4_RANGE / amax, _FLOAT32_MAX))


def _check_global_scale(global_scale) -> np.float32:
    g = np.float32(global_scale)
    if not (np.isfinite(g) and g > 0):
        raise ValueError(
            f"global_scale={global_scale!r} is invalid: use a positive finite float32 "
            "(or None: (448 * 6) / amax of x)"
        )
    return g


def encode_nvfp4(
    x: np.ndarray, *, global_scale: float | None = None, block_2d: bool = False
) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """NVFP4 quantization -> (E2M1 element codes, E4M3FN block-scale codes, float32 global scale).

    NVIDIA's 4-bit format (Blackwell; the layout compressed-tensors stores as
    ``nvfp4-pack-quantized``): E2M1 elements in blocks of 16 along the last axis (or 16 x 16
    tiles of the last two axes with ``block_2d``, the weight layout of the NVFP4 training
    recipe, so that W and W^T share their scales), one E4M3FN scale per block, and a float32
    scale g for the whole tensor. Every step is float64 arithmetic (exact or rounded once, the
    same in every implementation), rounding to nearest, ties to even:

      g   = global_scale, or (448 · 6) / amax(x) rounded to float32 (``nvfp4_global_scale``);
      S_b = encode((g · amax_b) / 6, E4M3FN), saturating (amax_b: the block's largest |x|);
      P_i = encode((x_i · g) / decode(S_b), E2M1FN), saturating at ±6;
      x_i ≈ decode(P_i) · decode(S_b) / g.

    A block whose scale underflows E4M3 (amax_b < 2^-10 · 6 / g) or is all zero gets scale 0
    and zero codes. A block holding NaN, ±Inf, or a magnitude beyond float32 gets the NaN scale
    code (0x7F) and zero codes, so it decodes to NaN entirely (the MX policy of
    ``encode_mx``); the global scale ignores those values.
    """
    x64 = np.asarray(_as_float64(x))
    g = nvfp4_global_scale(x64) if global_scale is None else _check_global_scale(global_scale)
    V = _nvfp4_blocks(np.atleast_1d(x64), block_2d)  # (..., blocks, members)
    ok = _representable(V)
    nan_block = np.asarray(~ok.all(axis=-1))
    V = np.where(ok, V, 0.0)
    amax = np.max(np.abs(V), axis=-1)  # (..., blocks)
    scale_codes = encode((float(g) * amax) / E2M1FN.max_value, E4M3FN, saturate=True)
    scale = decode(scale_codes, E4M3FN, dtype=np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(scale > 0, (V * float(g)) / scale, 0.0)
    codes = encode(np.where(nan_block[..., None], 0.0, scaled), E2M1FN, saturate=True)
    scale_codes = np.where(nan_block, E4M3FN.nan_code, scale_codes).astype(np.uint8)
    return _nvfp4_unblocks(codes, np.atleast_1d(x64).shape, block_2d), scale_codes, g


def _check_nvfp4_shapes(codes: np.ndarray, scales: np.ndarray, block_2d: bool) -> None:
    b = NVFP4_BLOCK
    if block_2d:
        if codes.ndim < 2:
            raise ValueError(f"block_2d needs (..., rows, columns) codes, got shape {codes.shape}")
        want = codes.shape[:-2] + (-(-codes.shape[-2] // b), -(-codes.shape[-1] // b))
    else:
        want = codes.shape[:-1] + (-(-codes.shape[-1] // b),)
    if tuple(scales.shape) != tuple(want):
        raise ValueError(
            f"scales shape {tuple(scales.shape)} does not match codes {tuple(codes.shape)}: "
            f"expected {tuple(want)} (one E4M3 scale per {'16 x 16 tile' if block_2d else '16 values'})"
        )


def decode_nvfp4(
    codes: np.ndarray,
    scales: np.ndarray,
    global_scale: float | np.floating,
    *,
    block_2d: bool = False,
    dtype=None,
) -> np.ndarray:
    """Inverse of ``encode_nvfp4``: decode(P_i) · decode(S_b) / g, in float64 and cast once to
    ``dtype`` (float32 by default; the float64 quotient cast to float32 is the correctly rounded
    float32 quotient). A NaN scale gives a NaN block."""
    codes, scales = np.atleast_1d(np.asarray(codes)), np.asarray(scales)
    _check_nvfp4_shapes(codes, scales, block_2d)
    g = _check_global_scale(global_scale)
    elements = _nvfp4_blocks(decode(codes, E2M1FN, dtype=np.float64), block_2d)
    values = elements * decode(scales, E4M3FN, dtype=np.float64)[..., None] / float(g)
    out = _nvfp4_unblocks(values, codes.shape, block_2d)
    return out.astype(np.dtype(dtype) if dtype is not None else np.float32)


def quantize_nvfp4(
    x: np.ndarray, *, global_scale: float | None = None, block_2d: bool = False
) -> np.ndarray:
    """NVFP4 fake quantization in x's floating dtype (float32 for integers). 16-bit inputs
    round twice: to float32 (``decode_nvfp4``'s quotient), then to their dtype, as a float32
    dequantization followed by a cast does."""
    x = np.asarray(x)
    out_dtype = x.dtype if _is_float(x.dtype) else np.dtype(np.float32)
    codes, scales, g = encode_nvfp4(x, global_scale=global_scale, block_2d=block_2d)
    work = np.float64 if out_dtype == np.float64 else np.float32
    out = decode_nvfp4(codes, scales, g, block_2d=block_2d, dtype=work)
    return out.astype(out_dtype).reshape(x.shape)
