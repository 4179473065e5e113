"""mkdocs hooks: generated pages and an import tree for mkdocstrings.

Registered in mkdocs.yml (``hooks: [docs/hooks.py]``). At build time they

* generate ``formats.md`` from the format registry (``docs/gen_formats_page.py``);
* generate one API page per module name found in lowbit/reference/, lowbit/fast/ and
  lowbit/kernels/ (so a page exists
  exactly for the modules that exist), and add them and the tutorials to the nav;
* add every ``tutorials/NN-*.py`` as a page, which mkdocs-jupyter renders (executing it unless
  ``LOWBIT_DOCS_EXECUTE=false``), with progress bars and library chatter off (they would show as
  stderr boxes on the pages);
* serve MathJax 3 from the site (``javascripts/mathjax/tex-svg.js``, taken from the installed
  django-static-mathjax wheel), so maths renders with no CDN at build or view time.

Nothing is written into docs/: generated pages live only in the build.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.lowbit")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lowbit"
SUBPACKAGES = ("reference", "fast", "kernels")  # lowbit/<name>/ == lowbit.<name>
TUTORIAL_PATTERN = re.compile(r"^(\d\d)-[\w-]+\.py$")
NAV_INSERT_BEFORE = "Benchmarks"  # the generated nav sections go in front of this entry
MATHJAX_URI = "javascripts/mathjax/tex-svg.js"  # mkdocs.yml's extra_javascript names it
# Set for the tutorials' kernels (they inherit the build's environment): tqdm (TQDM_* override
# its defaults), Hugging Face Hub and transformers would print bars and notices to stderr.
QUIET_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # tqdm.auto warns at import in a kernel without ipywidgets
    "PYTHONWARNINGS": "ignore:IProgress not found",
}

# API page titles and order; modules not listed here are appended alphabetically.
API_TITLES = {
    "formats": "Number formats",
    "uniform": "Uniform integer quantizer",
    "llm_int8": "LLM.int8()",
    "fpq": "LLM-FP4 (FPQ)",
    "omniquant": "OmniQuant",
    "int4_training": "INT4 training",
    "hadamard": "Hadamard",
    "int8": "int8 kernels",
    "nn": "Quantized modules (nn)",
    "convert": "Model conversion",
    "report": "Report",
    "models": "Models",
    "data": "Data",
    "cli": "Command line",
    "testing": "Testing kit",
    "export": "Export",
    "hf_quantizer": "Hugging Face quantizer",
}
SUBPACKAGE_TITLES = {
    "reference": "Reference (NumPy / Numba)",
    "fast": "Fast path (torch)",
    "kernels": "Triton kernels",
}


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "lowbit_docs_gen_formats", Path(__file__).with_name("gen_formats_page.py")
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def api_modules() -> dict[str, list[str]]:
    """Module name -> subpackages that define it, for public modules (no leading underscore)."""
    found: dict[str, list[str]] = {}
    for sub in SUBPACKAGES:
        # modules (name.py) and packages (name/__init__.py: nn, report)
        paths = [
            *(PACKAGE / sub).glob("*.py"),
            *(p.parent for p in (PACKAGE / sub).glob("*/__init__.py")),
        ]
        for path in sorted(paths, key=lambda p: p.stem):
            if not path.stem.startswith("_"):
                found.setdefault(path.stem, []).append(sub)
    order = list(API_TITLES)
    rank = {stem: (order.index(stem) if stem in order else len(order), stem) for stem in found}
    return {stem: found[stem] for stem in sorted(found, key=rank.__getitem__)}


def mathjax_bundle() -> Path:
    """MathJax 3's single-file TeX-to-SVG bundle from the django-static-mathjax wheel (the docs
    extra installs it)."""
    try:
        path = Path(str(importlib.resources.files("mathjax") / "static/mathjax/es5/tex-svg.js"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise RuntimeError(
            "MathJax is missing: install the docs extra (pip install -e '.[docs]'), which brings django-static-mathjax"
        )
    return path


def tutorials() -> list[Path]:
    return sorted(p for p in (ROOT / "tutorials").glob("*.py") if TUTORIAL_PATTERN.match(p.name))


def _tutorial_title(path: Path) -> str:
    """First markdown heading of the tutorial, else its file name."""
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#\s+#\s+(.+)$", line)
        if m:
            return m.group(1).strip()
    return path.stem


def api_page(stem: str, subs: list[str]) -> str:
    lines = [f"# {API_TITLES.get(stem, stem)}", ""]
    lines += [
        f"`{stem}` is defined in: " + ", ".join(f"`lowbit.{s}.{stem}`" for s in subs) + ".",
        "",
    ]
    for sub in subs:
        lines += [
            f"## {SUBPACKAGE_TITLES[sub]}: `lowbit.{sub}.{stem}`",
            "",
            f"::: lowbit.{sub}.{stem}",
            "",
        ]
        # a package (fast/nn/: one file per method): each public submodule gets its section
        rank = {name: i for i, name in enumerate(API_TITLES)}
        submodules = sorted(
            (PACKAGE / sub / stem).glob("[!_]*.py"),
            key=lambda p: (rank.get(p.stem, len(rank)), p.stem),
        )
        for path in submodules:
            lines += [
                f"### `lowbit.{sub}.{stem}.{path.stem}`",
                "",
                f"::: lowbit.{sub}.{stem}.{path.stem}",
                "    options:",
                "      heading_level: 4",
                "",
            ]
    return "\n".join(lines)


@event_priority(100)  # the quiet environment is set before other plugins start
def on_config(config):
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    nav = config.nav
    if nav is None:
        return config
    generated = [
        {"Tutorials": [{_tutorial_title(p): f"tutorials/{p.name}"} for p in tutorials()]},
        {"API reference": [{API_TITLES.get(s, s): f"api/{s}.md"} for s in api_modules()]},
    ]
    keys = [next(iter(entry)) if isinstance(entry, dict) else None for entry in nav]
    if "Tutorials" in keys:  # `mkdocs serve` may hand the same config in again
        return config
    at = keys.index(NAV_INSERT_BEFORE) if NAV_INSERT_BEFORE in keys else len(nav)
    nav[at:at] = generated
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps the tutorial files
def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "formats.md", content=_load_generator().render()))
    files.append(File.generated(config, MATHJAX_URI, abs_src_path=str(mathjax_bundle())))
    for stem, subs in api_modules().items():
        files.append(File.generated(config, f"api/{stem}.md", content=api_page(stem, subs)))
    for path in tutorials():
        # A plain File rooted at the repository (not File.generated): mkdocs-jupyter's wrapper
        # recomputes abs_src_path from src_dir + src_uri.
        files.append(
            File(
                f"tutorials/{path.name}",
                src_dir=str(ROOT),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files
