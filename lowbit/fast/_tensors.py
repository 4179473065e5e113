"""One check shared by every public function of ``lowbit.fast``: tensor parameters get tensors.

The fast path mirrors the NumPy reference, so passing it a NumPy array (or a list) is an easy
mistake; without this check it fails deep inside with ``AttributeError: 'numpy.ndarray' object
has no attribute 'is_floating_point'``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

_P = ParamSpec("_P")
_R = TypeVar("_R")
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def takes_tensors(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator: raise ``TypeError`` when a parameter annotated ``torch.Tensor`` gets anything
    else (``None`` is accepted where the annotation allows it, a non-empty list or tuple of
    tensors where it says ``Sequence[torch.Tensor]``). The string annotations are read once,
    when the function is decorated."""
    checked = []  # (position or None, name, accepts None, accepts a sequence of tensors)
    for i, p in enumerate(inspect.signature(func).parameters.values()):
        note = p.annotation if isinstance(p.annotation, str) else ""
        if note.startswith("torch.Tensor"):
            position = i if p.kind in _POSITIONAL else None
            checked.append((position, p.name, "None" in note, "Sequence[torch.Tensor]" in note))

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        for position, name, optional, sequence in checked:
            if position is not None and position < len(args):
                value = args[position]
            elif name in kwargs:
                value = kwargs[name]
            else:
                continue  # left at its default
            if isinstance(value, torch.Tensor) or (optional and value is None):
                continue
            if sequence and isinstance(value, (list, tuple)):
                if value and all(isinstance(v, torch.Tensor) for v in value):
                    continue
            kind = type(value)
            got = kind.__qualname__
            if kind.__module__ != "builtins":
                got = f"{kind.__module__}.{got}"
            raise TypeError(
                f"{func.__name__}: {name} must be a torch tensor, got {got}; convert it with "
                f"torch.as_tensor({name}) (lowbit.reference takes NumPy arrays)"
            )
        return func(*args, **kwargs)

    return wrapper
