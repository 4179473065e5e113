"""Hadamard transforms: the matrix's algebra, the fast transform against the dense product,
and the invariance the Hadamard quantizer relies on, X~ W~^T = X W^T."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.fast import hadamard as F
from lowbit.fast.testing.tiers import MatmulTier
from lowbit.reference import hadamard as R

SIZES = [1, 2, 4, 8, 64, 128, 1024]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_orthonormal_symmetric_and_its_own_inverse(n):
    H = R.hadamard(n)
    assert np.array_equal(H, H.T)
    assert np.array_equal(np.abs(H), np.full((n, n), 1 / np.sqrt(n)))  # entries ±1/sqrt(n)
    assert np.abs(H @ H.T - np.eye(n)).max() < 1e-13 * max(np.log2(n), 1)
    assert np.abs(H @ H - np.eye(n)).max() < 1e-13 * max(np.log2(n), 1)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_hadamard_follows_the_sylvester_recursion(n):
    h = R.hadamard(n // 2) * np.sqrt(n // 2)  # the ±1 matrix
    expected = np.block([[h, h], [h, -h]])
    assert np.array_equal(R.hadamard(n) * np.sqrt(n), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 16, 256, 1024])
def test_fast_transform_equals_the_dense_matmul(n, dtype):
    x = np.random.default_rng(n).standard_normal((33, n)).astype(dtype)
    truth = x.astype(np.float64) @ R.hadamard(n)
    naive = (torch.from_numpy(x) @ F.hadamard(n).to(torch.from_numpy(x).dtype)).numpy()
    for fast in (R.fwht(x), F.fwht(torch.from_numpy(x)).numpy()):
        assert fast.dtype == dtype
        assert not MatmulTier().check_with_naive(fast, truth, naive).any()


@pytest.mark.parametrize("block", [1, 2, 64, 128])
def test_block_hadamard_is_the_block_diagonal_product(block):
    n = 384
    x = np.random.default_rng(block).standard_normal((5, 7, n))
    dense = np.kron(np.eye(n // block), R.hadamard(block))  # blockdiag(H, ..., H)
    np.testing.assert_allclose(R.block_hadamard(x, block), x @ dense, rtol=0, atol=1e-13)


@pytest.mark.parametrize("block", [1, 4, 64, 128])
def test_transformed_product_is_unchanged(block):
    """(X H)(W H)^T = X W^T: the Hadamard quantizer needs no inverse on the output."""
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((13, 384)), rng.standard_normal((29, 384))
    xt, wt = R.block_hadamard(x, block), R.block_hadamard(w, block)
    np.testing.assert_allclose(xt @ wt.T, x @ w.T, rtol=0, atol=1e-12)
    np.testing.assert_allclose(R.block_hadamard(xt, block), x, rtol=0, atol=1e-14)  # self-inverse
    np.testing.assert_allclose(np.linalg.norm(xt), np.linalg.norm(x), rtol=1e-14)  # Parseval


def test_an_outlier_is_spread_over_its_block():
    x = np.zeros((1, 128))
    x[0, 5] = 100.0
    y = R.block_hadamard(x, 64)
    np.testing.assert_allclose(np.abs(y[0, :64]), 100 / 8)  # flat over the first block
    assert np.all(y[0, 64:] == 0)  # the other block is untouched


def test_non_finite_values_spread_to_their_block_only():
    x = np.ones((2, 8), dtype=np.float32)
    x[0, 1] = np.inf
    y = R.block_hadamard(x, 4)
    assert not np.isfinite(y[0, :4]).any() and np.isfinite(y[0, 4:]).all()
    assert np.isfinite(y[1]).all()
    assert np.array_equal(y, F.block_hadamard(torch.from_numpy(x), 4).numpy(), equal_nan=True)


def test_autograd_passes_the_transform_back():
    """The transform is symmetric and orthonormal, so its gradient is the same transform."""
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 64, dtype=torch.float64)
    (F.block_hadamard(x, 16) * g).sum().backward()
    torch.testing.assert_close(x.grad, F.block_hadamard(g, 16), rtol=0, atol=1e-14)


def test_block_sizes_are_the_dividing_powers_of_two():
    assert R.block_sizes(384) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert R.block_sizes(576) == [1, 2, 4, 8, 16, 32, 64]
    assert R.block_sizes(4096, max_block=1024)[-1] == 1024
    assert R.block_sizes(7) == [1]


@pytest.mark.parametrize("module", [R, F])
def test_bad_input_gets_one_line_errors(module):
    arr = np.zeros((2, 12), np.float32)
    x = arr if module is R else torch.from_numpy(arr)
    with pytest.raises(ValueError, match=r"power of two .* got 12"):
        module.fwht(x)
    with pytest.raises(
        ValueError, match=r"block=8 does not divide the last dimension 12; use one of \[1, 2, 4\]"
    ):
        module.block_hadamard(x, 8)
    with pytest.raises(ValueError, match="power of two"):
        module.block_hadamard(x, 3)
    with pytest.raises(ValueError, match="power of two"):
        module.hadamard(0)
    ints = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="floating point"):
        module.fwht(ints if module is R else torch.from_numpy(ints))
    if module is F:
        with pytest.raises(TypeError, match="torch.as_tensor"):
            F.fwht(arr)


def test_empty_inputs():
    for module, x in ((R, np.zeros((0, 64), np.float32)), (F, torch.zeros(0, 64))):
        assert module.fwht(x).shape == (0, 64)
        assert module.block_hadamard(x, 16).shape == (0, 64)
    assert R.block_hadamard(np.zeros((3, 0)), 16).shape == (3, 0)
