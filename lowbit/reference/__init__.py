"""lowbit.reference: every method in NumPy/Numba, step by step as the papers describe it (one
module per method); ``lowbit.fast`` mirrors each function in torch + Triton.

``__version__`` is the installed distribution's version (``lowbit.fast`` and
``lowbit.kernels`` re-export it)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lowbit")
except PackageNotFoundError:  # pragma: no cover - the source folders on sys.path, not installed
    __version__ = "0+unknown"
