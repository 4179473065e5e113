"""lowbit.kernels: Triton kernels and their launchers, one module per family
(``lowbit.kernels.formats``, ``.int8``, ``.fpq``). Importing this package does not import
Triton; the fast path asks ``on_triton_device`` before it calls a kernel."""

from __future__ import annotations

import functools

from lowbit.reference import __version__ as __version__


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton is a Linux dependency
        return False
    return True


def on_triton_device(t) -> bool:
    """True when tensor ``t`` lives where the kernels run: on CUDA, with Triton importable."""
    return bool(t.is_cuda) and triton_available()
