"""The public testing kit, ``lowbit.fast.testing``: it accepts correct code (lowbit's own fast
path and torch's casts where they agree), rejects wrong code with a report that names the
worst element bit by bit, classifies an exhaustive sweep's mismatches against independently
counted truth, and fails in one line on bad input or a missing Hypothesis."""

from __future__ import annotations

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit.fast.testing as kit
from lowbit.fast import formats as fast
from lowbit.reference import formats as ref


def _ties_away_e2m1(x: torch.Tensor, fmt, **unused) -> torch.Tensor:
    """E2M1 fake quantization that rounds ties away from zero (the classic bug)."""
    a = x.abs().float().clamp(max=6.0)
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign((torch.floor(a / step + 0.5) * step).clamp(max=6.0), x.float()).to(
        x.dtype
    )


E2M1_INPUTS = kit.strategies.values_for(ref.parse_format("e2m1fn"), specials=False).map(
    lambda v: (v.astype(np.float32), "e2m1fn")
)


def test_lowbit_fast_path_passes_on_the_ops_own_inputs():
    for op in ("formats.encode", "formats.quantize", "uniform.encode"):
        module, name = op.split(".")
        fn = getattr(__import__(f"lowbit.fast.{module}", fromlist=[name]), name)
        kit.assert_matches_reference(fn, op, max_examples=15)


def test_a_ties_away_quantizer_fails_with_the_worst_element_in_bits():
    with pytest.raises(AssertionError) as failure:
        kit.assert_matches_reference(
            _ties_away_e2m1, "formats.quantize", inputs=E2M1_INPUTS, max_examples=100
        )
    lines = str(failure.value).splitlines()
    assert lines[0].startswith("formats.quantize: output 0 differs under tier A (bit-exact): ")
    assert " elements; worst at index " in lines[0]
    labels = [line.split()[0] for line in lines[1:4]]
    assert labels == ["input", "yours", "reference"]
    x = float(lines[1].split()[1])
    yours, theirs = float(lines[2].split()[1]), float(lines[3].split()[1])
    # independent truth: x is a tie of E2M1's grid, yours went away from zero, the reference to
    # the neighbour with the even code
    grid = ref.values("e2m1fn")
    grid = np.unique(grid[np.isfinite(grid)])
    below, above = grid[grid < x].max(), grid[grid > x].min()
    assert x == (below + above) / 2 and abs(yours) == max(abs(below), abs(above))
    assert theirs in (below, above) and theirs != yours
    assert "s=" in lines[2] and " e=" in lines[2] and " m=" in lines[2]
    assert f"fp32 0x{int(np.float32(x).view(np.uint32)):08x}" in lines[1]


def test_explicit_inputs_and_keyword_arguments_reach_both_sides():
    x = np.array([[2.5, -0.25, 7.0, -0.0]], np.float32)
    kit.assert_matches_reference(fast.quantize, "formats.quantize", inputs=[(x, "e2m1fn")])
    no_ties = x[:, 2:]  # 7.0 and -0.0 pass; then 2.5 and -0.25, both ties, fail
    with pytest.raises(AssertionError, match="2 of 4 elements"):
        kit.assert_matches_reference(
            _ties_away_e2m1, "formats.quantize", inputs=[(no_ties, "e2m1fn"), (x, "e2m1fn")]
        )
    # saturate=False reaches the reference too: torch's float8 cast saturates, so 1e4 differs
    big = np.array([1e4, 1.0], np.float32)

    def cast(x, fmt, saturate=True):
        return x.to(torch.float8_e4m3fn).view(torch.uint8)

    kit.assert_matches_reference(cast, "formats.encode", inputs=[(big, "e4m3fn")], saturate=True)
    with pytest.raises(AssertionError, match=r"1 of 2 elements.*\n  input +10000\.0"):
        kit.assert_matches_reference(
            cast, "formats.encode", inputs=[(big, "e4m3fn")], saturate=False
        )


def test_codes_are_split_into_the_formats_fields():
    fmt = ref.parse_format("e4m3fn")
    assert kit.describe_code(0x7E, fmt) == "126 = 0b01111110 (s=0 e=1111 m=110)"
    assert kit.describe_code(0x7E, "e4m3fn") == kit.describe_code(0x7E, fmt)
    assert kit.describe_code(5) == "5 = 0b101"
    assert kit.describe_code(-3) == "-3 = 0b11111101 (int8)"  # int8 codes: two's complement
    assert kit.describe_bits(-2.0, np.float16) == "-2.0 = fp16 0xc000 (s=1 e=10000 m=0000000000)"
    assert kit.describe_bits(1.0, ml_dtypes.bfloat16).startswith("1.0 = bf16 0x3f80 (s=0")
    # bits of the value rounded to the dtype (ml_dtypes: 0.1 is 0x3dcd in bf16), not truncated
    bf16_bits = int(np.array(0.1, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16))
    assert kit.describe_bits(0.1, ml_dtypes.bfloat16).startswith(f"0.1 = bf16 0x{bf16_bits:04x}")
    assert "fp16 0x7c00" in kit.describe_bits(1e6, np.float16)  # beyond float16: Inf, no warning


def test_tier_b_never_passes_a_nan():
    truth, naive = np.array([1.0, 2.0, np.inf]), np.array([1.0, 2.0 + 1e-6, np.inf])
    assert not kit.MATMUL.check_with_naive(naive, truth, naive).any()
    assert kit.MATMUL.check_with_naive(np.array([np.nan, 2.0, np.inf]), truth, naive).tolist() == [
        True,
        False,
        False,
    ]
    assert kit.MATMUL.check_with_naive(np.array([1.0, 2.0, 5.0]), truth, naive)[2]


def test_the_ops_own_keywords_reach_both_sides():
    """``seed`` is an argument of bit splitting's stochastic rounding, not of the kit: both
    sides get it (the fast path draws the reference's random numbers for a seed)."""
    from lowbit.fast import int4_training as fast_int4

    g = np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)
    calls = [kit.Call((g, 4), {"seed": 7})]

    def seven(g, bits, **kw):  # passes only if the reference ran with seed 7 too
        assert kw["seed"] == 7
        return fast_int4.bit_split(g, bits, seed=7)

    kit.assert_matches_reference(seven, "int4_training.bit_split", inputs=calls)
    with pytest.raises(AssertionError, match="differs"):  # another seed: other roundings
        kit.assert_matches_reference(
            lambda g, bits, **kw: fast_int4.bit_split(g, bits, **{**kw, "seed": 8}),
            "int4_training.bit_split",
            inputs=calls,
        )


def test_numpy_inputs_and_numpy_outputs():
    def encode_numpy(x, fmt, **kwargs):
        assert isinstance(x, np.ndarray)
        return ref.encode(x, fmt, **kwargs)

    kit.assert_matches_reference(encode_numpy, "formats.encode", numpy_inputs=True, max_examples=5)

    def encode_on(x, fmt, **kwargs):
        assert isinstance(x, torch.Tensor) and x.device.type == "cpu"
        return fast.encode(x, fmt, **kwargs)

    kit.assert_matches_reference(encode_on, "formats.encode", device="cpu", max_examples=5)


def _e4m3_overflow_count(x: np.ndarray) -> tuple[int, int]:
    """(finite inputs that round past 448, infinities): counted in float64, not by the kit."""
    with np.errstate(invalid="ignore"):
        v = np.asarray(x, np.float64)
    return int(np.sum(np.isfinite(v) & (np.abs(v) > 464))), int(np.sum(np.isinf(v)))


def test_exhaustive_sweep_of_torchs_e4m3_cast():
    def cast(x, fmt, saturate=True):
        return x.to(torch.float8_e4m3fn).view(torch.uint8)

    assert kit.exhaustive_16bit(cast, "formats.encode", "e4m3fn", saturate=True).mismatches == 0
    report = kit.exhaustive_16bit(
        cast, "formats.encode", "e4m3fn", saturate=False, raise_on_mismatch=False
    )
    bits = np.arange(2**16, dtype=np.uint16)
    for name, dtype in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        overflow, inf = _e4m3_overflow_count(bits.view(dtype))
        assert report.counts[name] == {"Inf": inf, "overflow": overflow}
    with pytest.raises(AssertionError, match="45232 mismatches") as raised:
        kit.exhaustive_16bit(cast, "formats.encode", "e4m3fn", saturate=False)
    assert "| float16 | 0 | 2 | 14718 |" in str(raised.value)


def test_exhaustive_sweep_classifies_ties_and_signed_zeros():
    def no_sign_zero(x, fmt, **kwargs):
        out = _ties_away_e2m1(x, fmt)
        return torch.where(out == 0, torch.zeros_like(out), out)  # -0.0 becomes +0.0

    report = kit.exhaustive_16bit(
        no_sign_zero, "formats.quantize", "e2m1fn", raise_on_mismatch=False
    )
    grid = np.unique(ref.values("e2m1fn"))
    ties = (grid[1:] + grid[:-1]) / 2
    assert report.skipped_nan == 2046 + 254  # E2M1 has no NaN code: NaN inputs are left out
    assert "2300 NaN inputs skipped" in str(report)
    clean = kit.exhaustive_16bit(fast.quantize, "formats.quantize", "e2m1fn")
    assert str(clean).endswith(
        "no mismatches\n  (2300 NaN inputs skipped: the reference refuses them in e2m1fn)"
    )
    for name, dtype in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        with np.errstate(invalid="ignore"):
            x = np.arange(2**16, dtype=np.uint16).view(dtype).astype(np.float64)
        x = x[~np.isnan(x)]
        away = np.isin(x, ties) & (np.abs(ref.quantize(x, "e2m1fn")) < np.abs(x))
        counts = report.counts[name]
        # the ties the reference rounds down: +-0.25, +-1.25, +-2.5, +-5
        assert counts["tie"] == int(away.sum()) == 8
        assert counts["zero"] == 1  # -0.0
        # tiny negatives round to -0.0 in both, then the function under test flips the sign
        tiny = (x < 0) & (ref.quantize(x, "e2m1fn") == 0) & ~np.isin(x, ties)
        assert counts["subnormal"] + counts.get("other", 0) == int(tiny.sum())
        assert "NaN" not in counts and "Inf" not in counts


@settings(max_examples=10)
@given(st.data())
def test_public_strategies_draw_what_they_promise(data):
    dtype = data.draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    x = data.draw(kit.strategies.bit_patterns(dtype))
    assert x.ndim == 2 and x.dtype.name == dtype
    fmt = data.draw(kit.strategies.formats())
    assert hasattr(fmt, "mbits") and hasattr(fmt, "bits")
    rows = data.draw(kit.strategies.outlier_rows())
    assert rows.dtype == np.float32 and np.isfinite(rows).all()
    assert data.draw(kit.strategies.shapes())[0] >= 1


@settings(max_examples=5)
@given(kit.strategies.bit_patterns("float16", shape=(64, 64)))
def test_bit_patterns_cover_every_class(x):
    v = x.astype(np.float64)  # 4096 random patterns: NaNs (1/32) and subnormals (1/32) appear
    assert np.isnan(v).any() and (np.abs(v[np.isfinite(v)]) < 2.0**-14).any()


def test_ops_lists_the_ops_with_strategies():
    ops = kit.ops()
    assert {"formats.encode", "formats.encode_mx", "uniform.quantize"} <= set(ops)
    assert "fpq.search" not in ops  # too slow for Hypothesis: tested on its own


def test_bad_input_fails_in_one_line():
    cases = [
        (lambda: kit.assert_matches_reference(fast.encode, "encode"), "'module.function'"),
        (lambda: kit.assert_matches_reference(fast.encode, "formats.nope"), "kit.ops()"),
        (lambda: kit.assert_matches_reference(None, "formats.encode"), "callable"),
        (
            lambda: kit.assert_matches_reference(fast.encode, "formats.encode", max_examples=0),
            "positive integer",
        ),
        (
            lambda: kit.assert_matches_reference(fast.encode, "formats.encode", inputs=3),
            "Hypothesis strategy or a list",
        ),
        (lambda: kit.assert_matches_reference(fast.encode, "fpq.search"), "pass inputs="),
        (
            lambda: kit.assert_matches_reference(fast.encode, "formats.encode", inputs=[]),
            "empty list",
        ),
        (
            lambda: kit.assert_matches_reference(
                fast.encode, "formats.encode", inputs=(np.zeros(2), "e4m3fn")
            ),
            "got tuple",
        ),
        (
            lambda: kit.assert_matches_reference(
                fast.encode, "formats.encode", numpy_inputs=True, device="cpu"
            ),
            "no device",
        ),
        (  # the reference refuses NaN in a format without NaN: the input's fault, said so
            lambda: kit.assert_matches_reference(
                fast.encode, "formats.encode", inputs=[(np.array([np.nan]), "e2m1fn")]
            ),
            "lowbit.reference.formats.encode rejects this input",
        ),
        (lambda: kit.exhaustive_16bit(fast.encode, "formats.encode", 3), "lowbit format"),
    ]
    for call, phrase in cases:
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert phrase.replace("kit.", "lowbit.fast.testing.") in message or phrase in message
        assert "\n" not in message


def test_the_fixture_is_the_kit(lowbit_oracle):
    assert lowbit_oracle is kit


def test_missing_hypothesis_names_the_extra():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import lowbit.fast.testing as kit\n"  # importable without Hypothesis
        "import numpy as np\n"  # a list of calls with a tier needs no Hypothesis
        "kit.assert_matches_reference(lambda x, f: x, 'formats.quantize', tier=kit.EXACT,\n"
        "                             inputs=[(np.zeros(3, np.float32), 'e2m1fn')])\n"
        "print('ran without Hypothesis')\n"
        "import lowbit.fast.testing.strategies\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == "ran without Hypothesis\n"
    assert done.stderr.strip().splitlines()[-1] == (
        "ImportError: lowbit.fast.testing draws its inputs with Hypothesis, which is not "
        "installed: pip install 'lowbit[testing]'"
    )
