"""The repository's layout does not hide installed packages.

Python puts the current folder first on ``sys.path`` (``python -m pytest``, ``python -c``, a
notebook started at the root), so a folder at the repository root imports under its own name.
A root-level ``kernels/`` hid the ``kernels`` package that transformers >= 5.25 requires, and
every model load failed; the code therefore lives under ``lowbit/``."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_root_folder_shadows_an_installed_package():
    installed = importlib.metadata.packages_distributions()
    importable = [
        p.name
        for p in ROOT.iterdir()
        if p.is_dir() and p.name.isidentifier() and any(p.glob("*.py"))
    ]
    shadowing = {
        name: installed[name]
        for name in importable
        if name in installed and set(installed[name]) != {"lowbit"}
    }
    assert not shadowing, (
        f"root folders {shadowing} hide installed packages of the same name; move them under lowbit/"
    )


def test_the_code_folders_are_the_lowbit_namespace():
    import lowbit.fast
    import lowbit.kernels
    import lowbit.reference

    for module in (lowbit.reference, lowbit.fast, lowbit.kernels):
        (path,) = module.__path__
        assert Path(path) == ROOT / "lowbit" / module.__name__.split(".")[1]
    assert not (ROOT / "lowbit" / "__init__.py").exists()
