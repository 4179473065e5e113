"""Hadamard transforms — fast path (torch), the twin of ``lowbit.reference.hadamard``.

The same functions with the same parameters (see the reference for the maths). ``fwht`` and
``block_hadamard`` run the reference's butterfly stages as whole-tensor operations, one
``torch.stack((a + b, a - b))`` per stage, in the same order and working precision, so the two
agree bit for bit; ``hadamard(n)`` builds the same float64 matrix. Autograd passes through
(the transform is linear and its own transpose). On CUDA the 4-bit training layer fuses the
transform with its quantizer in a Triton kernel instead (``lowbit.kernels.int4_training``).
"""

from __future__ import annotations

import math

import torch

from lowbit.fast._tensors import takes_tensors
from lowbit.reference.hadamard import _check_power_of_two, block_sizes

__all__ = ["hadamard", "fwht", "block_hadamard", "block_sizes"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    if x.dtype not in _FLOATS:
        raise ValueError(
            f"{name} must be floating point (float16/bfloat16/float32/float64), "
            f"got {str(x.dtype).removeprefix('torch.')}"
        )
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the transformed one)")
    return x


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order ``n`` (a power of two), float64.

    The same entries as ``lowbit.reference.hadamard.hadamard``; move it with ``.to(x)``.
    """
    n = _check_power_of_two(n, "n")
    i = torch.arange(n)
    both = i[:, None] & i[None, :]  # (n, n)
    parity = torch.zeros((n, n), dtype=torch.int64)
    for bit in range(max(n.bit_length() - 1, 0)):
        parity ^= (both >> bit) & 1
    sign = 1.0 - 2.0 * parity.to(torch.float64)
    return sign * (1.0 / math.sqrt(n))


def _butterflies(x: torch.Tensor, block: int) -> torch.Tensor:
    """The reference's stages on a float32/float64 copy of x; returns x's dtype."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work, copy=True).reshape(-1, block)  # (numel / block, block)
    scale = torch.tensor(1.0 / math.sqrt(block), dtype=work, device=y.device)
    # chunks of about 1 MiB stay in cache through all the stages
    step = (1 << 20) // (block * y.element_size()) if y.device.type == "cpu" else len(y)
    step = max(1, min(step, len(y)))
    spare = torch.empty((step, block), dtype=work, device=y.device)
    for rows in y.split(step):
        # each stage reads one buffer and writes the other: two passes, no temporaries
        src, dst = rows, spare[: len(rows)]
        h = 1
        while h < block:
            a, b = src.view(len(rows), block // (2 * h), 2, h).unbind(2)  # runs of 2h: halves
            out = dst.view(len(rows), block // (2 * h), 2, h)
            torch.add(a, b, out=out[:, :, 0])
            torch.sub(a, b, out=out[:, :, 1])
            src, dst = dst, src
            h *= 2
        torch.mul(src, scale, out=rows)
    return y.reshape(x.shape).to(x.dtype)


class _Transform(torch.autograd.Function):
    """The transform is linear, symmetric and orthonormal: its backward is itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, block: int) -> torch.Tensor:
        ctx.block = block
        return _butterflies(x.detach(), block)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _butterflies(grad, ctx.block), None


def _transform(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        return _Transform.apply(x, block)
    return _butterflies(x, block)


@takes_tensors
def fwht(x: torch.Tensor) -> torch.Tensor:
    """The fast Walsh-Hadamard transform along the last axis: x @ hadamard(n), n = x.shape[-1].

    Args:
        x: float tensor (..., n), n a power of two.

    Returns:
        The transformed tensor, same shape and dtype.
    """
    x = _check_float(x)
    _check_power_of_two(x.shape[-1], "x.shape[-1]")
    return _transform(x, x.shape[-1])


@takes_tensors
def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """x @ blockdiag(H_block, ...) along the last axis: each run of ``block`` channels transformed.

    Args:
        x: float tensor (..., n), n a multiple of ``block``.
        block: a power of two dividing n (1 returns a copy of x).

    Returns:
        The transformed tensor, same shape and dtype (its own inverse up to rounding).
    """
    x = _check_float(x)
    block = _check_power_of_two(block, "block")
    n = x.shape[-1]
    if n % block:
        sizes = block_sizes(n) if n else []
        raise ValueError(
            f"block={block} does not divide the last dimension {n}; use one of {sizes}"
        )
    if block == 1:
        return x.clone()
    return _transform(x, block)
