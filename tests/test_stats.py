"""The statistics math on hand-made cases whose answer is known."""

import pytest
import torch

from sfsd.errors import DataError, NumericalError
from sfsd.features.stats import (
    InputMoments,
    check_finite,
    covariance_factor,
    eigh_descending,
    energy_kept,
    output_eigen,
    output_moments,
)


def test_accumulated_moments_equal_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=g, dtype=torch.float64) * 3 + 5  # non-zero mean
    acc = InputMoments.zeros(7)
    for chunk in x.split(137):  # uneven batches
        acc.update(chunk.float(), flush_every=3)
    xf = x.float().double()
    assert acc.count == 1000
    torch.testing.assert_close(acc.second_moment(), xf.T @ xf / 1000, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc.mean(), xf.mean(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(acc.covariance(), torch.cov(xf.T, correction=0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc.mean_abs(), xf.abs().mean(0), rtol=1e-9, atol=1e-9)


def test_mean_abs_by_hand_over_flushed_and_staged_batches():
    """Column 0 sees |1|, |-3|, |0|, |-1|, |2| -> 7/5; column 1 sees 2, 4, 0, 2, 2 -> 2; E[x] differs (-1/5, 6/5)."""
    acc = InputMoments.zeros(2)
    acc.update(torch.tensor([[1.0, -2.0], [-3.0, 4.0]]), flush_every=2)
    acc.update(torch.tensor([[0.0, 0.0], [-1.0, 2.0]]), flush_every=2)  # flushed here
    acc.update(torch.tensor([[2.0, 2.0]]), flush_every=2)  # still staged: mean_abs flushes it
    assert acc.count == 5
    torch.testing.assert_close(acc.mean_abs(), torch.tensor([7 / 5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(acc.mean(), torch.tensor([-1 / 5, 6 / 5], dtype=torch.float64))
    assert acc.xabs.dtype == torch.float64 and acc.xabs.device.type == "cpu"


def test_moments_without_sum_abs_refuse_mean_abs_only():
    """Statistics loaded from a file collected before sum |x| was saved: every other moment works."""
    acc = InputMoments(torch.eye(2, dtype=torch.float64) * 4, torch.tensor([2.0, 0.0], dtype=torch.float64), 4)
    torch.testing.assert_close(acc.mean(), torch.tensor([0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(acc.second_moment(), torch.eye(2, dtype=torch.float64))
    with pytest.raises(DataError, match="rerun collection"):
        acc.mean_abs()


def test_empty_batch_changes_nothing():
    acc = InputMoments.zeros(3)
    acc.update(torch.ones(2, 3))
    acc.update(torch.zeros(0, 3))
    assert acc.count == 2
    torch.testing.assert_close(acc.mean(), torch.ones(3, dtype=torch.float64))


def test_output_moments_equal_moments_of_hooked_outputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) + torch.arange(6.0, dtype=torch.float64)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    acc = InputMoments.zeros(6)
    acc.update(x)
    mu, cov = output_moments(w, b, acc.mean(), acc.covariance())
    y = x @ w.T + b
    torch.testing.assert_close(mu, y.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cov, torch.cov(y.T, correction=0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cov, cov.T, rtol=0, atol=1e-12)


def test_eigh_descending_reconstructs_and_is_orthonormal():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(9, 5, generator=g, dtype=torch.float64)
    c = a @ a.T  # rank 5 of 9: four (near-)zero eigenvalues
    eig = eigh_descending(c)
    assert torch.all(eig.values[:-1] >= eig.values[1:])
    v = eig.vectors
    torch.testing.assert_close(v.T @ v, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(v @ torch.diag(eig.values) @ v.T, c, rtol=0, atol=1e-9)
    assert torch.all(eig.values >= 0)


def test_negative_roundoff_eigenvalues_are_clamped_and_counted():
    c = torch.diag(torch.tensor([3.0, 1.0, -1e-15], dtype=torch.float64))
    eig = eigh_descending(c)
    assert eig.n_clamped == 1
    assert eig.min_raw == pytest.approx(-1e-15)
    assert eig.values.tolist() == [3.0, 1.0, 0.0]


def test_energy_kept_is_cumulative_fraction():
    e = energy_kept(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    assert e.tolist() == [0.75, 1.0, 1.0]


def test_check_finite_names_the_tensor():
    with pytest.raises(NumericalError, match=r"block 4: attn_in\.xxt has 1 NaN"):
        check_finite({"attn_in.xxt": torch.tensor([1.0, float("nan")])}, "block 4")


def test_output_eigen_factor_path_equals_eigh_of_formed_covariance():
    """A widening Linear (out > in) takes the SVD-of-factor path: same spectrum and subspaces."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    x_cov = torch.cov(x.T, correction=0)
    w = torch.randn(10, 6, generator=g, dtype=torch.float64)
    factor = covariance_factor(x_cov)
    assert factor is not None
    fast = output_eigen(w, x_cov, factor)
    slow = eigh_descending(w @ x_cov @ w.T)
    torch.testing.assert_close(fast.values, slow.values, rtol=1e-9, atol=1e-9)
    assert fast.values[6:].eq(0).all()
    v = fast.vectors
    torch.testing.assert_close(v.T @ v, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(v @ torch.diag(fast.values) @ v.T, w @ x_cov @ w.T, rtol=0, atol=1e-9)
    # a singular input covariance has no Cholesky factor: the eigh path is used instead
    assert covariance_factor(torch.zeros(3, 3, dtype=torch.float64)) is None
    narrowing = output_eigen(w.T, w @ x_cov @ w.T + torch.eye(10, dtype=torch.float64), None)
    assert narrowing.vectors.shape == (6, 6)
