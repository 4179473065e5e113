"""Render the "Number formats" docs page from the format registry.

Every number on the page is computed here from ``lowbit.reference.formats`` at docs build time
(``docs/hooks.py`` calls ``render()``), so the page cannot drift from the code. Run it as a script
to print the page: ``python docs/gen_formats_page.py``. ``tests/test_docs.py`` parses the page
and checks its numbers against the registry and, independently, against ``ml_dtypes``.
"""

from __future__ import annotations

import math

from lowbit.reference import formats as F

# LLM-FP4 (arXiv 2310.16836) uses formats where every code is a finite number ("none" specials).
LLM_FP4_FORMATS: dict[str, F.FPFormat] = {
    "E5M2": F.FPFormat(5, 2, specials="none"),
    "E4M3": F.FPFormat(4, 3, specials="none"),
    "E3M0": F.FPFormat(3, 0, specials="none"),
    "E2M1": F.FPFormat(2, 1, specials="none"),
    "E1M2": F.FPFormat(1, 2, specials="none"),
}
INT_FORMATS: dict[str, F.IntFormat] = {"int4": F.IntFormat(4), "int8": F.IntFormat(8)}
# Value grids are listed for formats with at most this many bits (64 codes).
MAX_GRID_BITS = 6

_SPECIALS = {
    "ieee": "±Inf, NaN (all-ones exponent)",
    "fn": "NaN (all-ones code), no Inf",
    "none": "none: every code is a number",
}


def fmt_number(v: float) -> str:
    """Shortest text that reads back as exactly ``v`` (integers without a trailing .0)."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "-Inf" if v < 0 else "Inf"
    if v == int(v) and abs(v) < 1e16:
        return str(int(v))
    return repr(float(v))


def _pow2(v: float) -> str:
    """``v`` followed by its power of two, e.g. ``0.0625 (2^-4)``, for exact powers of two."""
    mantissa, exponent = math.frexp(v)
    if mantissa == 0.5:
        return f"{fmt_number(v)} (2^{exponent - 1})"
    return fmt_number(v)


def all_float_formats() -> list[tuple[str, F.FPFormat, str]]:
    """(row label, format, where it comes from) for every float format on the page."""
    rows = [(name, fmt, "OCP / IEEE (named)") for name, fmt in F.NAMED_FORMATS.items()]
    rows += [(label, fmt, "LLM-FP4") for label, fmt in LLM_FP4_FORMATS.items()]
    return rows


def grid_formats() -> list[tuple[str, F.FPFormat | F.IntFormat]]:
    """Formats whose every value is listed, in page order."""
    out: list[tuple[str, F.FPFormat | F.IntFormat]] = []
    seen = set()
    for label, fmt, _ in all_float_formats():
        if fmt.bits <= MAX_GRID_BITS and fmt not in seen:
            seen.add(fmt)
            out.append((label, fmt))
    out += [(name, fmt) for name, fmt in INT_FORMATS.items() if fmt.bits <= MAX_GRID_BITS]
    return out


def _limits_table() -> list[str]:
    lines = [
        "| format | from | bits | E | M | bias | special codes | max | min normal | min subnormal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, fmt, source in all_float_formats():
        same = f" (= `{fmt.name}`)" if fmt.name != label else ""
        sign = "" if fmt.signed else " unsigned"
        subnormal = _pow2(fmt.min_subnormal) if fmt.subnormals else "none (no zero)"
        lines.append(
            f"| `{label}`{same} | {source}{sign} | {fmt.bits} | {fmt.ebits} | {fmt.mbits} | {fmt.bias} "
            f"| {_SPECIALS[fmt.specials]} | {fmt_number(fmt.max_value)} | {_pow2(fmt.min_normal)} "
            f"| {subnormal} |"
        )
    return lines


def _int_table() -> list[str]:
    lines = ["| format | bits | min | max | step |", "|---|---|---|---|---|"]
    for name, fmt in INT_FORMATS.items():
        lines.append(f"| `{name}` | {fmt.bits} | {fmt.qmin} | {fmt.qmax} | 1 |")
    return lines


def _grid(label: str, fmt: F.FPFormat | F.IntFormat) -> list[str]:
    """All values of a small format. Floats: one row per exponent field, one column per mantissa
    field, for the non-negative half (sign bit 0); the sign bit negates."""
    table = F.values(fmt)  # every code's value, in code order
    lines = [f"### `{label}`", ""]
    if isinstance(fmt, F.IntFormat):
        lines += [
            "| code | " + " | ".join(f"`{c:0{fmt.bits}b}`" for c in range(2**fmt.bits)) + " |"
        ]
        lines += ["|---" * (2**fmt.bits + 1) + "|"]
        lines += ["| value | " + " | ".join(fmt_number(v) for v in table) + " |", ""]
        return lines
    M = fmt.mbits
    header = "| exponent field \\ mantissa | " + " | ".join(
        f"`{m:0{M}b}`" if M else "(none)" for m in range(2**M)
    )
    lines += [header + " |", "|---" * (2**M + 1) + "|"]
    for field in range(2**fmt.ebits):
        cells = [fmt_number(table[(field << M) | m]) for m in range(2**M)]
        lines.append(f"| `{field:0{fmt.ebits}b}` | " + " | ".join(cells) + " |")
    finite = sorted({float(v) for v in table if math.isfinite(v)})
    lines += [
        "",
        f"Sign bit set: the same values negated. Distinct finite values ({len(finite)}): "
        + ", ".join(fmt_number(v) for v in finite),
        "",
    ]
    return lines


def render() -> str:
    """The page as markdown."""
    lines = [
        "# Number formats",
        "",
        "<!-- Generated by docs/gen_formats_page.py from lowbit.reference.formats at docs build "
        "time. Do not edit: change the registry instead. -->",
        "",
        "Every number on this page is computed from `lowbit.reference.formats` when the docs are "
        "built. A float format has a sign bit (unless unsigned), E exponent bits and M mantissa bits; "
        "with bias b, a code with exponent field f > 0 is (2^M + mantissa) · 2^(f - b - M) and a "
        "code with f = 0 is the subnormal mantissa · 2^(1 - b - M). "
        "See [tutorial 01](tutorials/01-number-formats.py) for a walk through the bits.",
        "",
        "Names follow `ml_dtypes`: `fn` = finite (no Inf; the all-ones code is NaN), `fnu` = finite "
        "and unsigned. LLM-FP4's formats reserve no codes, so their largest value is one step above "
        "the OCP format with the same exponent and mantissa widths. `e8m0fnu` is the MX shared-scale "
        "format: powers of two only, no zero and no subnormals. Parse any of them with "
        '`parse_format("e2m1")`, `parse_format("e4m3fn")`, `parse_format("int4")`.',
        "",
        "## Where lowbit goes beyond the design sketch",
        "",
        "* `FPFormat` has a sixth field, `subnormals` (default `True`). The five fields of the first "
        "design could not describe E8M0FNU, whose exponent field 0 is the normal value 2^-127 and "
        "which has no zero; `subnormals=False` says exactly that, and no format is special-cased.",
        "* `quantize` returns the input's dtype (fake quantization, the values of "
        "`x.astype(ml_dtypes.<fmt>).astype(x.dtype)`), and `decode` takes `dtype=` (float32 "
        "by default, float64 on request in the reference).",
        "* Ties round to the even *integer significand* (implicit bit included). For M >= 1 this "
        "is IEEE's rule; for M = 0 (E3M0, E8M0) ties inside a binade go up, as in ml_dtypes and "
        "LLM-FP4's `torch.round(x / step)`.",
        "",
        "## Float formats",
        "",
        *_limits_table(),
        "",
        "## Integer formats",
        "",
        "Symmetric quantizers usually use [-qmax, qmax] only; the code range is listed here.",
        "",
        *_int_table(),
        "",
        f"## Every value of the formats with at most {MAX_GRID_BITS} bits",
        "",
    ]
    for label, fmt in grid_formats():
        lines += _grid(label, fmt)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
