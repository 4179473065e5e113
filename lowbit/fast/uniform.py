"""Uniform integer quantization (round to nearest, "RTN") — fast path (torch).

Mirrors ``lowbit.reference.uniform``: the same functions, parameters, defaults and errors, bit
for bit the same codes, scales, zero points and values (see the reference's docstring for the
formulas and the choices: working precision, zero-including asymmetric ranges, zero scales,
the scale shapes of each granularity). Tensors in, tensors out, on x's device.

* ``encode(x, bits=8, *, symmetric=True, granularity="channel", group_size=None,
  clip_ratio=1.0)`` -> ``(codes, scale, zero_point)``; ``zero_point`` is None when symmetric.
* ``decode(codes, scale, zero_point=None, *, group_size=None, dtype=None)`` -> values
  (float32, or ``dtype``: a torch dtype, or the reference's NumPy spelling).
* ``quantize(x, bits=8, *, ...)`` -> fake-quantized values in x's dtype.

Implementation notes:

* Vectorised torch on every device (no Triton kernel yet): reductions over the last
  dimension (groups: one reshape for the full groups, one reduction for a shorter last
  group), then one division, round, clamp and cast.
* Divisions are by tensors, never by Python scalars: on CUDA, ``t / 127`` is computed as
  ``t * (1/127)`` (torch's CPU-scalar optimisation), which differs from the correctly rounded
  quotient in the last bit now and then. The constants 2^(b-1) - 1 and 2^b - 1 are 0-dim
  tensors on x's device, so CPU and CUDA both divide exactly as the reference does.
* Host synchronisation: ``encode`` checks that x is finite (and, asymmetric, that the scale is)
  with one ``.all()``, one sync per call; everything else is sync-free. ``decode`` never syncs.
* ``decode`` to float16 / bfloat16 from a float64 scale: torch's cast rounds through float32,
  and the reference does the same on purpose.
* Non-tensor input raises ``TypeError`` naming the parameter (convert with ``torch.as_tensor``).
"""

from __future__ import annotations

import numpy as np
import torch

from lowbit.fast._tensors import takes_tensors
from lowbit.reference.uniform import (  # constants, checks, shape helpers: shared
    GRANULARITIES,
    MAX_BITS,
    MIN_BITS,
    _broadcasts_to,
    _check_bits,
    _check_clip_ratio,
    _check_granularity,
    _check_group_size,
    _check_symmetric,
    _n_groups,
    _scale_shape,
)

__all__ = ["encode", "decode", "quantize", "GRANULARITIES", "MIN_BITS", "MAX_BITS"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NOT_CODES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the reference's (NumPy's) spelling, for identical errors."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# argument checks (same wording as the reference)
# ---------------------------------------------------------------------------------------------


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_working(x) -> torch.Tensor:
    """x in the working precision (float32, or float64 for float64); checks dtype and rank."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"x must be floating point (float16/bfloat16/float32/float64), got {_name(x.dtype)}"
        )
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension, got a scalar: use x.reshape(1)")
    return x.to(_working_dtype(x.dtype))


def _raise_not_finite(x_w: torch.Tensor) -> None:
    n_bad = int((~torch.isfinite(x_w)).sum())
    if n_bad:
        raise ValueError(
            f"x has {n_bad} non-finite values; uniform quantization needs finite input "
            "(replace NaN/Inf, e.g. with np.nan_to_num)"
        )
    raise ValueError(
        f"the range max(x) - min(x) overflows {_name(x_w.dtype)}; quantize float64 input (x.astype(np.float64))"
    )


def _out_dtype(dtype) -> torch.dtype:
    """torch dtypes, and the reference's NumPy / ml_dtypes spellings (np.float64, bfloat16)."""
    if dtype is None:
        return torch.float32
    name = _name(dtype) if isinstance(dtype, torch.dtype) else np.dtype(dtype).name
    by_name = {_name(d): d for d in _FLOAT_DTYPES}
    if name not in by_name:
        raise ValueError(
            f"dtype must be floating point (float16/bfloat16/float32/float64), got {name}"
        )
    return by_name[name]


# ---------------------------------------------------------------------------------------------
# reductions and broadcasting per granularity
# ---------------------------------------------------------------------------------------------


def _reduce_last(v: torch.Tensor, op: str) -> torch.Tensor:
    """max/min over the last dim including 0 (keepdim), +0 for zero; 0 for empty rows."""
    if v.shape[-1] == 0:
        return v.new_zeros((*v.shape[:-1], 1))
    if op == "max":
        r = v.amax(dim=-1, keepdim=True).clamp(min=0)
    else:
        r = v.amin(dim=-1, keepdim=True).clamp(max=0)
    return r + 0.0  # -0 -> +0, as in the reference


def _reduce(v: torch.Tensor, op: str, granularity: str, G: int | None) -> torch.Tensor:
    """Per tensor (1,)*ndim, per row (..., 1) or per group (..., n_groups), 0 included."""
    if granularity == "tensor":
        return _reduce_last(v.reshape(1, v.numel()), op).reshape((1,) * v.ndim)
    if granularity in ("channel", "token"):
        return _reduce_last(v, op)
    assert G is not None
    lead, n = v.shape[:-1], v.shape[-1]
    n_full = n // G
    parts = []
    if n_full:
        full = v[..., : n_full * G].reshape(*lead, n_full, G)  # (..., n_full, G)
        parts.append(_reduce_last(full, op).squeeze(-1))  # (..., n_full)
    if n % G:
        parts.append(_reduce_last(v[..., n_full * G :], op))  # (..., 1): the shorter last group
    if not parts:
        return v.new_zeros((*lead, 0))
    return torch.cat(parts, dim=-1)  # (..., n_groups)


def _per_element(stat: torch.Tensor, n: int, G: int | None) -> torch.Tensor:
    """(..., n_groups) repeated G times along the last dim and cut to n; others unchanged."""
    if G is None:
        return stat
    k = stat.shape[-1]
    expanded = stat.unsqueeze(-1).expand(*stat.shape, G)  # (..., k, G), no copy
    return expanded.reshape(*stat.shape[:-1], k * G)[..., :n]  # (..., n)


def _static_params(scale, zero_point, symmetric: bool, want: tuple, x_w: torch.Tensor, c_ratio):
    """Given (calibrated) parameters, checked as the reference checks them; one host sync."""
    if scale.dtype not in _FLOAT_DTYPES or tuple(scale.shape) != want:
        raise ValueError(
            f"scale must be a float array of shape {want} (as encode returns it), got {_name(scale.dtype)} {tuple(scale.shape)}"
        )
    if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
        raise ValueError("scale must be finite and >= 0 (calibrate it with encode)")
    if c_ratio != 1.0:
        raise ValueError(
            "clip_ratio applies when scales are computed; with a given scale leave it at 1.0"
        )
    s = scale.to(device=x_w.device, dtype=x_w.dtype)
    if symmetric:
        if zero_point is not None:
            raise ValueError("zero_point is only used with symmetric=False; drop it")
        return s, None
    if (
        not isinstance(zero_point, torch.Tensor)
        or zero_point.dtype in _NOT_CODES
        or tuple(zero_point.shape) != want
    ):
        raise ValueError(
            f"symmetric=False with a given scale needs zero_point: integers of shape {want}"
        )
    return s, zero_point.to(device=x_w.device, dtype=x_w.dtype)


def _const(like: torch.Tensor, value: int) -> torch.Tensor:
    """A 0-dim tensor on ``like``'s device: dividing by it is an exact division on CUDA too."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


@takes_tensors
def encode(
    x: torch.Tensor,
    bits: int = 8,
    *,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
    clip_ratio: float = 1.0,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes, scale and zero point (None if symmetric); see the reference's ``encode``.

    Codes int8/int16 (symmetric) or uint8/int32 (asymmetric); scale float32 (float64 for
    float64 x) shaped (1,) * ndim, (..., 1) or (..., n_groups); zero_point int32 like scale.
    ``scale`` / ``zero_point`` given: static quantization with them (see the reference).
    """
    bits = _check_bits(bits)
    symmetric = _check_symmetric(symmetric)
    G = _check_granularity(granularity, group_size)
    c_ratio = _check_clip_ratio(clip_ratio)
    x_w = _as_working(x)  # (..., n)
    n = x_w.shape[-1]
    # clip ratio rounded to the working precision, like the reference's np.asarray(c, wdt)
    c = float(torch.tensor(c_ratio, dtype=x_w.dtype))
    finite = torch.isfinite(x_w).all()
    static = None
    if scale is not None or zero_point is not None:
        if scale is None:
            raise ValueError("zero_point was given without scale; pass both (or neither)")
        want = _scale_shape(tuple(x_w.shape), granularity, G)
        static = _static_params(scale, zero_point, symmetric, want, x_w, c_ratio)
    if symmetric:
        Q = 2 ** (bits - 1) - 1
        if static is not None:
            s = static[0]  # (..., k) given
        else:
            absmax = _reduce(x_w.abs(), "max", granularity, G)  # (..., k)
            s = (absmax * c) / _const(absmax, Q)  # (..., k)
        if not bool(finite):  # the one host sync
            _raise_not_finite(x_w)
        s_div = torch.where(s == 0, 1.0, s)
        q = torch.round(x_w / _per_element(s_div, n, G)).clamp(-Q, Q)  # (..., n)
        return q.to(torch.int8 if bits <= 8 else torch.int16), s, None
    Q = 2**bits - 1
    if static is not None:
        s, z = static  # (..., k) given
        if not bool(finite):
            _raise_not_finite(x_w)
        s_div = torch.where(s == 0, 1.0, s)
        q = torch.round(x_w / _per_element(s_div, n, G)) + _per_element(z, n, G)  # (..., n)
        q = q.clamp(0, Q)
        return q.to(torch.uint8 if bits <= 8 else torch.int32), s, z.to(torch.int32)
    x_min = _reduce(x_w, "min", granularity, G) * c  # (..., k)
    x_max = _reduce(x_w, "max", granularity, G) * c  # (..., k)
    s = (x_max - x_min) / _const(x_max, Q)  # (..., k)
    if not bool(finite & torch.isfinite(s).all()):  # the one host sync
        _raise_not_finite(x_w)
    s_div = torch.where(s == 0, 1.0, s)
    z = torch.round(-x_min / s_div).clamp(0, Q)  # (..., k)
    q = torch.round(x_w / _per_element(s_div, n, G)) + _per_element(z, n, G)  # (..., n)
    q = q.clamp(0, Q)
    return q.to(torch.uint8 if bits <= 8 else torch.int32), s, z.to(torch.int32)


@takes_tensors
def decode(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    group_size: int | None = None,
    dtype=None,
) -> torch.Tensor:
    """x̂ = (q - z) · s in the scale's precision, returned as float32 or ``dtype``; no sync."""
    out_dtype = _out_dtype(dtype)
    if codes.dtype in _NOT_CODES or codes.dtype.is_complex:
        raise ValueError(f"codes must be integers (from encode), got {_name(codes.dtype)}")
    if scale.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"scale must be floating point (from encode), got {_name(scale.dtype)}")
    if codes.ndim < 1:
        raise ValueError("codes must have at least one dimension, got a scalar")
    G = None if group_size is None else _check_group_size(group_size)
    n = codes.shape[-1]
    if G is not None:
        want = (*codes.shape[:-1], _n_groups(n, G))
        if tuple(scale.shape) != want:
            raise ValueError(
                f"scale has shape {tuple(scale.shape)}, expected {want} for group_size={G} (codes {tuple(codes.shape)})"
            )
    elif not _broadcasts_to(tuple(scale.shape), tuple(codes.shape)):
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} does not broadcast to codes {tuple(codes.shape)}; "
            "pass group_size for per-group scales"
        )
    q = codes.to(torch.int32)  # (..., n)
    if zero_point is not None:
        if zero_point.dtype in _NOT_CODES or tuple(zero_point.shape) != tuple(scale.shape):
            raise ValueError(
                f"zero_point must be integers shaped like scale {tuple(scale.shape)}, "
                f"got {_name(zero_point.dtype)} {tuple(zero_point.shape)}"
            )
        q = q - _per_element(zero_point.to(torch.int32), n, G)  # (..., n) exact
    s = scale.to(_working_dtype(scale.dtype))
    values = q.to(s.dtype) * _per_element(s, n, G)  # (..., n)  one rounding
    return values.to(out_dtype)


@takes_tensors
def quantize(
    x: torch.Tensor,
    bits: int = 8,
    *,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: int | None = None,
    clip_ratio: float = 1.0,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fake quantization ``decode(*encode(x, ...), dtype=x.dtype)``, in x's dtype."""
    codes, s, z = encode(
        x,
        bits,
        symmetric=symmetric,
        granularity=granularity,
        group_size=group_size,
        clip_ratio=clip_ratio,
        scale=scale,
        zero_point=zero_point,
    )
    G = group_size if granularity == "group" else None
    return decode(codes, s, z, group_size=G, dtype=x.dtype)
