"""The docs: the generated formats page, the code on the pages, and the site build.

The formats page is rendered from the registry (docs/gen_formats_page.py). Its numbers are
parsed back and checked twice: against the registry (the page shows what the code does) and
against independent truth (ml_dtypes' finfo and its bit-level casts for the OCP formats, the
LLM-FP4 grids written out in spec/methods.md section 1.2 for the others, two's complement for
the integers).
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from lowbit.fast.testing.strategies import ML_DTYPES
from lowbit.reference import formats as F

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_formats_page", DOCS / "gen_formats_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()
PAGE = GEN.render()

# ---- parsing the page back -------------------------------------------------------------------


def _number(cell: str) -> float:
    """First token of a cell as a float ("0.0625 (2^-4)" -> 0.0625); "none ..." -> nan."""
    token = cell.strip().split(" ")[0]
    if token in ("none", "—"):
        return math.nan
    return float(token)


def _tables(section: str) -> list[list[list[str]]]:
    """Markdown tables in a chunk of the page, as lists of rows of cells (header included)."""
    tables, current = [], []
    for line in section.splitlines():
        if line.startswith("|"):
            if not re.match(r"^\|(-+\|)+$", line):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _section(title: str) -> str:
    """Text from the heading `title` to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(title)}\s*$", PAGE, re.M)
    assert m, f"heading {title!r} not on the page"
    level = len(m.group(1))
    rest = PAGE[m.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def _float_rows() -> dict[str, dict[str, str]]:
    (table,) = _tables(_section("Float formats"))
    header, *rows = table
    out = {}
    for row in rows:
        label = re.match(r"`([^`]+)`", row[0]).group(1)
        out[label] = dict(zip(header, row))
    return out


def _grid_values(label: str, fmt) -> dict[int, float]:
    """code -> value as listed in the grid of `label` (non-negative half for floats)."""
    (table,) = _tables(_section(f"`{label}`"))
    values = {}
    if isinstance(fmt, F.IntFormat):
        codes, cells = table
        for code_cell, value_cell in zip(codes[1:], cells[1:]):
            values[int(code_cell.strip("`"), 2)] = float(value_cell)
        return values
    header, *rows = table
    mantissas = [0] if fmt.mbits == 0 else [int(h.strip("`"), 2) for h in header[1:]]
    for row in rows:
        field = int(row[0].strip("`"), 2)
        for m, cell in zip(mantissas, row[1:]):
            values[(field << fmt.mbits) | m] = float(cell)
    return values


FLOAT_ROWS = _float_rows()
# spec/methods.md 1.2: LLM-FP4 grids with bias 2^(E-1) - 1 (non-negative levels, and Qmax).
LLM_FP4_SPEC = {
    "E2M1": ([0, 0.5, 1, 1.5, 2, 3, 4, 6], 6.0),
    "E3M0": ([0, 0.25, 0.5, 1, 2, 4, 8, 16], 16.0),
    "E1M2": ([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5], 3.5),
    "E4M3": (None, 480.0),
    "E5M2": (None, 114688.0),
}
# the OCP format with the same exponent/mantissa widths (the same bottom of the range)
LLM_FP4_OCP_TWIN = {"E4M3": "e4m3fn", "E5M2": "e5m2", "E2M1": "e2m1fn"}


def _ml_dtypes_values(dtype, bits: int) -> np.ndarray:
    """Every code's value according to ml_dtypes (codes 0 .. 2^bits - 1)."""
    storage = np.uint16 if bits > 8 else np.uint8
    return np.arange(2**bits, dtype=storage).view(dtype).astype(np.float64)


# ---- the page against the registry -------------------------------------------------------------


def test_page_lists_every_named_and_llm_fp4_format():
    assert set(FLOAT_ROWS) == set(F.NAMED_FORMATS) | set(LLM_FP4_SPEC)
    for name in ("int4", "int8"):
        assert f"`{name}`" in _section("Integer formats")


@pytest.mark.parametrize("label", sorted(FLOAT_ROWS))
def test_float_row_matches_registry(label):
    row = FLOAT_ROWS[label]
    fmt = F.NAMED_FORMATS.get(label) or GEN.LLM_FP4_FORMATS[label]
    assert int(row["bits"]) == fmt.bits
    assert (int(row["E"]), int(row["M"]), int(row["bias"])) == (fmt.ebits, fmt.mbits, fmt.bias)
    assert _number(row["max"]) == fmt.max_value
    assert _number(row["min normal"]) == fmt.min_normal
    if fmt.subnormals:
        assert _number(row["min subnormal"]) == fmt.min_subnormal
    else:
        assert math.isnan(_number(row["min subnormal"]))


@pytest.mark.parametrize(
    "label,fmt", GEN.grid_formats(), ids=[lbl for lbl, _ in GEN.grid_formats()]
)
def test_grid_matches_registry(label, fmt):
    listed = _grid_values(label, fmt)
    table = F.values(fmt)
    if isinstance(fmt, F.IntFormat):
        assert listed == {c: float(table[c]) for c in range(2**fmt.bits)}
        return
    half = 2 ** (fmt.bits - 1) if fmt.signed else 2**fmt.bits
    assert sorted(listed) == list(range(half)), "every non-negative code is listed once"
    for code, value in listed.items():
        assert value == table[code], f"{label} code {code:b}"
    # the "distinct finite values" line is the grid and its negation
    line = re.search(r"Distinct finite values \((\d+)\): (.+)", _section(f"`{label}`"))
    distinct = [float(v) for v in line.group(2).split(", ")]
    expected = sorted({v for v in listed.values()} | {-v for v in listed.values()})
    assert distinct == expected and int(line.group(1)) == len(expected)


def test_int_rows_match_twos_complement():
    (table,) = _tables(_section("Integer formats"))
    header, *rows = table
    for row in rows:
        cells = dict(zip(header, row))
        bits = int(cells["bits"])
        assert (int(cells["min"]), int(cells["max"])) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    listed = _grid_values("int4", F.IntFormat(4))
    assert listed == {c: float(c - 16 if c >= 8 else c) for c in range(16)}


# ---- the page against independent truth --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_named_rows_match_ml_dtypes_finfo(name):
    row, info = FLOAT_ROWS[name], ml_dtypes.finfo(ML_DTYPES[name])
    assert int(row["bits"]) == info.bits
    assert (int(row["E"]), int(row["M"])) == (info.nexp, info.nmant)
    assert _number(row["max"]) == float(info.max)
    assert _number(row["min normal"]) == float(info.smallest_normal)
    if name != "e8m0fnu":  # ml_dtypes reports its smallest (normal) value; the page says "none"
        assert _number(row["min subnormal"]) == float(info.smallest_subnormal)
        assert int(row["bias"]) == 1 - info.minexp  # emin = 1 - bias


@pytest.mark.parametrize("name", ["e2m1fn", "e3m2fn", "e2m3fn"])
def test_grids_match_ml_dtypes_bit_patterns(name):
    fmt = F.NAMED_FORMATS[name]
    truth = _ml_dtypes_values(ML_DTYPES[name], fmt.bits)
    listed = _grid_values(name, fmt)
    assert listed == {code: float(truth[code]) for code in listed}


@pytest.mark.parametrize("label", sorted(LLM_FP4_SPEC))
def test_llm_fp4_rows_match_spec(label):
    levels, qmax = LLM_FP4_SPEC[label]
    row = FLOAT_ROWS[label]
    assert _number(row["max"]) == qmax
    if label in LLM_FP4_OCP_TWIN:  # same E, M and bias as the OCP format: same bottom of the range
        info = ml_dtypes.finfo(ML_DTYPES[LLM_FP4_OCP_TWIN[label]])
        assert _number(row["min normal"]) == float(info.smallest_normal)
        assert _number(row["min subnormal"]) == float(info.smallest_subnormal)
    if levels is not None:
        grid_label = label if f"### `{label}`" in PAGE else LLM_FP4_OCP_TWIN[label]
        fmt = GEN.LLM_FP4_FORMATS[label]
        assert sorted(set(_grid_values(grid_label, fmt).values())) == levels
        assert _number(row["min subnormal"]) == min(v for v in levels if v > 0)


def test_benchmark_tables_fill_only_their_section(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_tables", DOCS / "benchmark_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    result = tmp_path / "formats.json"
    result.write_text(
        '{"machine": {"cpu_count": 2}, "shape": [64, 64], "gpu": "skipped: no CUDA device",'
        ' "ratios": [{"id": "P3", "what": "numba vs numpy", "value": 1.234, "goal": "gate 1.2x"}]}'
    )
    page = tmp_path / "benchmarks.md"
    page.write_text(
        "# B\n<!-- bench:formats -->\nold\n<!-- /bench:formats -->\n"
        "<!-- bench:fpq -->\nkeep\n<!-- /bench:fpq -->\n"
    )
    tables.write("formats", tables.render(result), page)
    text = page.read_text()
    assert "| P3 | 1.23 | numba vs numpy | gate 1.2x |" in text
    assert "cpu_count 2" in text and "shape: 64 x 64" in text and "no CUDA device" in text
    assert "old" not in text and "keep" in text


# ---- code on the pages, and the build --------------------------------------------------------


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)


@pytest.mark.parametrize("page", ["index.md", "oracle.md", "export.md"])
def test_code_on_page_runs(page):
    blocks = _python_blocks(DOCS / page)
    assert blocks, f"no python code blocks in {page}"
    for block in blocks:
        subprocess.run([sys.executable, "-c", block], check=True, cwd=ROOT, timeout=120)


def _text(html_page: str) -> str:
    """Visible text of an HTML page without whitespace (tags split words at odd places)."""
    return "".join(html.unescape(re.sub(r"<[^>]+>", " ", html_page)).split())


def _first_line(docstring: str) -> str:
    """First docstring line as rendered text, without markup and whitespace."""
    return "".join(docstring.strip().splitlines()[0].replace("`", "").split())


def _build_site(tmp_path, execute: bool):
    """`mkdocs build --strict` into tmp_path/site, executing the tutorials or not."""
    pytest.importorskip("mkdocs", reason="needs the docs extra: pip install -e '.[docs]'")
    env = dict(os.environ, LOWBIT_DOCS_EXECUTE=str(execute).lower(), NO_MKDOCS_2_WARNING="1")
    env.pop("MPLBACKEND", None)  # conftest sets Agg; the notebook kernel needs its inline backend
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return site


def test_site_builds_strict_with_docstrings(tmp_path):
    """`mkdocs build --strict` without executing the tutorials (CI builds with them)."""
    site = _build_site(tmp_path, execute=False)
    api = _text((site / "api" / "formats" / "index.html").read_text(encoding="utf-8"))
    # the docstrings reached the page: griffe found lowbit.* in the source tree
    for function in (F.encode, F.quantize_mx, F.FPFormat):
        assert _first_line(function.__doc__) in api, f"docstring of {function.__name__} missing"
    fast = importlib.import_module("lowbit.fast.formats")
    assert _first_line(fast.__doc__) in api
    # the quantized-module package: the base and registry, and each method file's class
    qnn = importlib.import_module("lowbit.fast.nn")
    nn_page = _text((site / "api" / "nn" / "index.html").read_text(encoding="utf-8"))
    for obj in (qnn.QuantizedLinear, qnn.register_module, qnn.Linear8bitLt, qnn.FPQLinear):
        assert _first_line(obj.__doc__) in nn_page, f"docstring of {obj.__name__} missing"
    formats_page = _text((site / "formats" / "index.html").read_text(encoding="utf-8"))
    assert "e4m3fn" in formats_page and "448" in formats_page
    for tutorial in sorted((ROOT / "tutorials").glob("[0-9][0-9]-*.py")):
        assert (site / "tutorials" / tutorial.stem / "index.html").exists(), tutorial.name


def hooks_module():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def _tutorial_formulas() -> list[tuple[str, str, bool]]:
    """(tutorial, TeX, display) for every $...$ and $$...$$ in the tutorials' markdown cells."""
    found = []
    for path in sorted((ROOT / "tutorials").glob("[0-9][0-9]-*.py")):
        cells = path.read_text(encoding="utf-8").split("# %%")
        for cell in cells:
            if not cell.startswith(" [markdown]"):
                continue
            text = "\n".join(line[2:] for line in cell.splitlines()[1:] if line.startswith("#"))
            for m in re.finditer(r"\$\$(.+?)\$\$|(?<![\\$])\$([^$]+?)\$", text, re.S):
                found.append((path.name, m.group(1) or m.group(2), m.group(1) is not None))
    return found


MATHJAX_RENDER_JS = r"""
const [dir, input] = [process.argv.at(-1), require("fs").readFileSync(0, "utf8")];
require(dir + "/es5/node-main.js").init({loader: {load: ["input/tex", "output/svg", "adaptors/liteDOM"]}})
  .then((MathJax) => {
    const bad = [];
    for (const [tex, display] of JSON.parse(input)) {
      const html = MathJax.startup.adaptor.outerHTML(MathJax.tex2svg(tex, {display}));
      // parse errors become merror nodes; undefined macros are drawn in red (noundefined)
      if (html.includes("merror") || html.includes('"red"')) bad.push(tex);
    }
    console.log(JSON.stringify(bad));
  });
"""


def test_site_serves_mathjax_and_every_tutorial_formula_renders(tmp_path):
    """Maths renders offline: the site carries MathJax and its config (no CDN), tutorial pages
    load them and keep their formulas in the markdown cells MathJax is told to process, and
    every formula of the tutorials typesets without error through that same MathJax (node)."""
    site = _build_site(tmp_path, execute=False)
    bundle = site / "javascripts" / "mathjax" / "tex-svg.js"
    assert bundle.read_bytes() == hooks_module().mathjax_bundle().read_bytes()
    config = (site / "javascripts" / "mathjax-config.js").read_text(encoding="utf-8")
    assert "jp-RenderedMarkdown" in config and '["$", "$"]' in config
    formulas = _tutorial_formulas()
    assert len(formulas) >= 5  # tutorial 02 writes its maths in TeX
    for name in {f[0] for f in formulas}:
        page = (site / "tutorials" / name[:-3] / "index.html").read_text(encoding="utf-8")
        assert 'src="../../javascripts/mathjax/tex-svg.js"' in page
        assert "cdn" not in page.lower().split("mathjax")[0][-200:]
        tex = next(f[1] for f in formulas if f[0] == name)
        cell = page.rfind('class="jp-RenderedHTMLCommon jp-RenderedMarkdown', 0, page.find(tex))
        assert cell != -1, f"{name}: ${tex}$ is not inside a markdown cell MathJax processes"
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the formulas' typesetting is not checked")
    mathjax_dir = hooks_module().mathjax_bundle().parents[1]
    result = subprocess.run(
        [node, "-e", MATHJAX_RENDER_JS, str(mathjax_dir)],
        input=json.dumps([[tex, display] for _, tex, display in formulas]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_site_renders_tutorial_outputs_and_plots(tmp_path):
    """The real docs build (as in CI): tutorials are executed and their plots embedded."""
    site = _build_site(tmp_path, execute=True)
    page = (site / "tutorials" / "01-number-formats" / "index.html").read_text(encoding="utf-8")
    assert page.count('class="jp-RenderedImage') >= 3, "tutorial 01 has at least three plots"
    assert "0 mismatching codes" in page  # an executed output cell, not just the source
    for tutorial in sorted((ROOT / "tutorials").glob("[0-9][0-9]-*.py")):
        text = (site / "tutorials" / tutorial.stem / "index.html").read_text(encoding="utf-8")
        # progress bars and library notices would show as red stderr boxes (docs/hooks.py)
        stderr = re.search(r'<div[^>]*data-mime-type="application/vnd\.jupyter\.stderr"', text)
        assert stderr is None, f"{tutorial.name} shows a stderr output"
