"""lowbit.fast: the methods in torch + Triton, with the reference's API (the mirror rule), and
the torch-only parts: quantized modules (``lowbit.fast.nn``), model conversion and
safetensors save/load (``convert``), the report and the command line."""

from lowbit.reference import __version__ as __version__
