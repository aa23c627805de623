"""The decomposition math on hand-made cases whose answer is known."""

import logging
import time

import pytest
import torch

from sfsd.decompose.methods import (
    ASVD_FLOOR,
    Factors,
    asvd,
    feature_space,
    laser,
    laser_rank,
    max_rank,
    rbf_kernel,
    vendi_rebuild,
    vendi_score,
    vendi_select,
    weight_space,
    whitened,
)
from sfsd.errors import ConfigError, NumericalError
from sfsd.features.stats import eigh_descending

F64 = torch.float64


def _layer(out, inp, with_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=F64)
    b = torch.randn(out, generator=g, dtype=F64) if with_bias else None
    return w, b


def _out_error(factors: Factors, w, b, x):
    """Mean squared output error of the factored layer on the rows of x."""
    y = x @ w.T + (0 if b is None else b)
    w_hat, b_hat = factors.dense()
    y_hat = x @ w_hat.T + (0 if b_hat is None else b_hat)
    return float((y - y_hat).square().sum(1).mean())


def test_max_rank_known_numbers():
    assert max_rank(4096, 4096) == 2048
    assert max_rank(576, 1536) == 418
    assert max_rank(1536, 576) == 418
    assert max_rank(4096, 11008) == 2985


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 7), (7, 5)])
def test_full_rank_reproduces_the_layer(with_bias, shape):
    out, inp = shape
    w, b = _layer(out, inp, with_bias)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(out, out, generator=g, dtype=F64)
    eig = eigh_descending(a @ a.T + 0.1 * torch.eye(out, dtype=F64))  # arbitrary full-rank covariance
    mu = torch.randn(out, generator=g, dtype=F64)
    for mode in ("intended", "none"):
        fs = feature_space(w, b, eig.vectors, mu, out, bias_compensation=mode)
        w_hat, b_hat = fs.dense()
        torch.testing.assert_close(w_hat, w)
        if b is None and mode == "none":
            assert b_hat is None
        else:
            torch.testing.assert_close(b_hat, torch.zeros(out, dtype=F64) if b is None else b)
    full = min(out, inp)
    ws = weight_space(w, b, full)
    torch.testing.assert_close(ws.dense()[0], w)
    assert ws.bias is b or torch.equal(ws.bias, b)
    m2 = a[:inp, :inp] if inp <= out else torch.randn(inp, inp, generator=g, dtype=F64)
    wh, used = whitened(w, b, m2 @ m2.T + torch.eye(inp, dtype=F64), full)
    assert used == 0.0
    torch.testing.assert_close(wh.dense()[0], w)
    assert wh.first.shape == (full, inp) and wh.second.shape == (out, full)
    scales = torch.rand(inp, generator=g, dtype=F64) * 10 + 0.01
    av = asvd(w, b, scales, full)
    torch.testing.assert_close(av.dense()[0], w)
    assert av.bias is b or torch.equal(av.bias, b)
    assert av.first.shape == (full, inp) and av.second.shape == (out, full)


def test_factors_keep_the_weight_dtype():
    w, b = _layer(6, 4, True)
    w32, b32 = w.float(), b.float()
    eig = eigh_descending(torch.eye(6, dtype=F64))
    for f in (feature_space(w32, b32, eig.vectors, b, 3), weight_space(w32, b32, 3),
              whitened(w32, b32, torch.eye(4), 3)[0], asvd(w32, b32, torch.ones(4), 3)):
        assert f.first.dtype == f.second.dtype == f.bias.dtype == torch.float32
        assert f.rank == 3


@pytest.fixture(scope="module")
def synthetic():
    """Inputs x = A z + m + small noise (rank-3 structure, non-zero mean) and a layer with a bias."""
    g = torch.Generator().manual_seed(7)
    inp, out, n = 12, 10, 4000
    a = torch.randn(inp, 3, generator=g, dtype=F64) * torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    m = 4.0 * torch.randn(inp, generator=g, dtype=F64)
    x = torch.randn(n, 3, generator=g, dtype=F64) @ a.T + m + 0.05 * torch.randn(n, inp, generator=g, dtype=F64)
    w, b = _layer(out, inp, True, seed=8)
    return x, w, b


@pytest.mark.parametrize("with_bias", [False, True])
def test_feature_space_beats_weight_space_on_its_features(synthetic, with_bias):
    x, w, b = synthetic
    b = b if with_bias else None
    y = x @ w.T + (0 if b is None else b)
    mu, cov = y.mean(0), torch.cov(y.T, correction=0)  # float64, straight from the features
    second_moment = x.T @ x / x.shape[0]
    eig = eigh_descending(cov)
    for rank in (1, 2, 3):
        fs = feature_space(w, b, eig.vectors, mu, rank)
        none = feature_space(w, b, eig.vectors, mu, rank, bias_compensation="none")
        ws = weight_space(w, b, rank)
        wh, _ = whitened(w, b, second_moment, rank)
        e_fs, e_none, e_ws, e_wh = (_out_error(f, w, b, x) for f in (fs, none, ws, wh))
        # intended compensation: the error is exactly the dropped variance
        assert e_fs == pytest.approx(float(eig.values[rank:].sum()), rel=1e-6)
        assert e_fs < e_ws
        assert e_fs < e_none
        assert e_wh <= e_ws * (1 + 1e-9)
        assert e_fs <= e_wh * (1 + 1e-9)  # centred (SFSD) is optimal among affine rank-r maps


def test_whitened_adds_jitter_to_a_singular_second_moment(caplog):
    w, b = _layer(4, 6, False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 2, generator=g, dtype=F64) @ torch.randn(2, 6, generator=g, dtype=F64)  # rank 2
    with caplog.at_level(logging.WARNING, logger="sfsd.decompose.methods"):
        f, used = whitened(w, b, x.T @ x / 50, 4, jitter=1e-8)
    assert used >= 1e-8
    assert "jitter" in caplog.text
    torch.testing.assert_close(f.dense()[0], w, rtol=1e-5, atol=1e-5)  # full rank: still exact


def test_asvd_with_equal_channel_scales_is_weight_space_svd():
    w, b = _layer(6, 9, True, seed=4)
    for rank in (1, 3, 6):
        ws = weight_space(w, b, rank)
        for scales in (torch.ones(9, dtype=F64), torch.full((9,), 7.5, dtype=F64)):
            av = asvd(w, b, scales, rank)
            torch.testing.assert_close(av.dense()[0], ws.dense()[0])
            torch.testing.assert_close(av.first.abs(), ws.first.abs())  # the same factors, up to sign
            torch.testing.assert_close(av.second.abs(), ws.second.abs())
            assert torch.equal(av.bias, b)
    torch.testing.assert_close(asvd(w, b, torch.rand(9, dtype=F64), 3, alpha=0.0).dense()[0],
                               weight_space(w, b, 3).dense()[0])  # alpha 0: no scaling


def test_asvd_diagonal_weight_known_factors():
    """W = diag(1, 2, 3) plus a zero column, mean |x| = (16, 1, 0.25, 4): s = (4, 1, 0.5, 2) and
    W S = diag(4, 2, 1.5), so rank 2 keeps input channels 0 and 1 (plain SVD keeps 2 and 1):
    W1 = Sigma_2 V_2^T S^-1 = [[1, 0, 0, 0], [0, 2, 0, 0]] and W2 = [e0, e1], up to sign."""
    w = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0]], dtype=F64)
    b = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    f = asvd(w, b, torch.tensor([16.0, 1.0, 0.25, 4.0], dtype=F64), 2)
    torch.testing.assert_close(f.first.abs(), torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]], dtype=F64))
    torch.testing.assert_close(f.second.abs(), torch.tensor([[1.0, 0], [0, 1.0], [0, 0]], dtype=F64))
    torch.testing.assert_close(f.dense()[0], torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 0]], dtype=F64))
    assert torch.equal(f.bias, b)
    torch.testing.assert_close(weight_space(w, b, 2).dense()[0],
                               torch.tensor([[0.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0]], dtype=F64))


def test_asvd_beats_weight_space_on_unequal_channel_scales():
    """With input channels of very different magnitude, the activation-weighted error E||(W - W_hat) x||^2
    of ASVD is well below that of plain SVD at every rank (and not below whitened SVD's, its optimum)."""
    g = torch.Generator().manual_seed(11)
    inp, out, n = 16, 12, 5000
    scales = torch.logspace(-2, 1.5, inp, dtype=F64)[torch.randperm(inp, generator=g)]
    x = torch.randn(n, inp, generator=g, dtype=F64) * scales
    w, b = _layer(out, inp, True, seed=12)
    second_moment = x.T @ x / n
    for rank in (1, 3, 6, 9):
        e_ws = _out_error(weight_space(w, b, rank), w, b, x)
        e_av = _out_error(asvd(w, b, x.abs().mean(0), rank), w, b, x)
        e_wh = _out_error(whitened(w, b, second_moment, rank)[0], w, b, x)
        assert e_av < (0.75 if rank == 1 else 0.2) * e_ws  # measured: 0.56 at rank 1, 0.09 and below above
        assert e_wh <= e_av * (1 + 1e-9)


def test_asvd_dead_channel_is_clamped_and_stays_finite():
    """A channel never active (mean |x| = 0) is clamped at ASVD_FLOOR x the largest mean: the factors are
    finite, full rank is still exact, and W_hat = U_k U_k^T W (the dead column too)."""
    w, b = _layer(5, 6, False, seed=5)
    scales = torch.tensor([2.0, 0.0, 1.0, 3.0, 0.5, 1.5], dtype=F64)
    full = asvd(w, b, scales, 5)
    assert torch.isfinite(full.first).all()
    torch.testing.assert_close(full.dense()[0], w)
    low = asvd(w, b, scales, 2)
    assert torch.isfinite(low.first).all() and float(low.first.abs().max()) < 1e3 * float(w.abs().max())
    u = low.second
    torch.testing.assert_close(low.dense()[0], u @ (u.T @ w))
    # a floor-sized channel gives the same factors as the zero one
    floored = scales.clone()
    floored[1] = ASVD_FLOOR * 3.0
    torch.testing.assert_close(asvd(w, b, floored, 2).dense()[0], low.dense()[0])
    # every channel dead: no information, plain SVD
    torch.testing.assert_close(asvd(w, b, torch.zeros(6, dtype=F64), 2).dense()[0], weight_space(w, b, 2).dense()[0])


def test_asvd_bad_arguments():
    w, b = _layer(4, 6, True)
    with pytest.raises(ConfigError):
        asvd(w, b, torch.ones(6), 5)
    with pytest.raises(ConfigError, match="alpha"):
        asvd(w, b, torch.ones(6), 2, alpha=-0.5)
    with pytest.raises(ValueError, match="mean"):
        asvd(w, b, torch.ones(4), 2)
    with pytest.raises(NumericalError):
        asvd(w, b, torch.tensor([1.0, float("nan"), 1, 1, 1, 1]), 2)


def test_rank_out_of_range_is_a_config_error():
    w, b = _layer(4, 6, True)
    with pytest.raises(ConfigError):
        weight_space(w, b, 5)
    with pytest.raises(ConfigError):
        feature_space(w, b, torch.eye(4, dtype=F64), b, 0)


def test_laser():
    w, _ = _layer(8, 12, False)
    assert torch.equal(laser(w, 0), w)
    assert laser_rank(4096, 1) == 3686 and laser_rank(10, 3) == 7 and laser_rank(8, 10) == 0
    for rate, k in ((1, 7), (5, 4), (9, 0)):
        approx = laser(w, rate)
        assert approx.shape == w.shape and approx.dtype == w.dtype
        assert int(torch.linalg.matrix_rank(approx)) == k
    # the rank-k approximation is the truncated SVD
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(laser(w, 5), (u[:, :4] * s[:4]) @ vh[:4])
    for bad in (-0.1, 10.5, float("nan")):
        with pytest.raises(ConfigError):
            laser(w, bad)


def test_vendi_score_known_values():
    assert vendi_score(torch.ones(5, 5)) == pytest.approx(1.0)
    assert vendi_score(torch.eye(6)) == pytest.approx(6.0)
    assert vendi_score(torch.eye(4), quality=torch.tensor([1.0, 2.0, 3.0, 2.0])) == pytest.approx(8.0)
    # two identical blocks of two orthogonal directions: effectively 2 items
    k = torch.kron(torch.eye(2), torch.ones(2, 2))
    assert vendi_score(k) == pytest.approx(2.0)


def test_rbf_kernel():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    k = rbf_kernel(x, bandwidth=5.0)
    torch.testing.assert_close(k.diagonal(), torch.ones(3, dtype=F64))
    assert float(k[0, 1]) == pytest.approx(torch.exp(torch.tensor(-0.5)).item())
    assert float(k[0, 2]) == 1.0
    # median pairwise distance: distances are 5, 0, 5 -> 5
    torch.testing.assert_close(rbf_kernel(x), k)


def _clusters():
    """Three far-apart clusters of near-duplicates: rows 0-3, 4-6 and 7-9."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]], dtype=F64)
    labels = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    rows = centres[labels] + 0.01 * torch.randn(len(labels), 4, generator=g, dtype=F64)
    return rows, labels


@pytest.mark.parametrize("exact", [False, True])
def test_vendi_greedy_takes_one_per_cluster_before_a_duplicate(exact):
    rows, labels = _clusters()
    kern = rbf_kernel(rows, bandwidth=2.0)
    picked = vendi_select(rows, 3, kernel=kern, exact=exact)
    assert sorted(labels[i] for i in picked) == [0, 1, 2]
    # min-diversity: near-duplicates of the first pick come first
    low = vendi_select(rows, 4, kernel=kern, min_diversity=True, exact=exact)
    assert [labels[i] for i in low] == [0, 0, 0, 0]


@pytest.mark.parametrize("exact", [False, True])
def test_vendi_quality_prefers_the_heavier_row(exact):
    # rows 0/1 and 2/3 are pairs of identical directions; 1 and 2 are the heavier of their pair
    rows = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    kern = torch.kron(torch.eye(2), torch.ones(2, 2))  # a pair is one item
    picked = vendi_select(rows, 2, kernel=kern, use_quality=True, exact=exact)
    assert picked == [2, 1]
    assert vendi_select(rows, 2, kernel=kern, exact=exact) == [0, 2]  # unweighted: lowest index
    picked = vendi_select(rows, 2, kernel=kern, use_quality=True, quality=torch.tensor([5.0, 1, 1, 1]))
    assert picked[0] == 0


def test_surrogate_greedy_agrees_with_exact_greedy_on_clusters():
    rows, _ = _clusters()
    kern = rbf_kernel(rows, bandwidth=2.0)
    assert vendi_select(rows, 6, kernel=kern) == vendi_select(rows, 6, kernel=kern, exact=True)


def test_vendi_select_arguments():
    rows, _ = _clusters()
    with pytest.raises(ConfigError):
        vendi_select(rows, 0)
    with pytest.raises(ConfigError):
        vendi_select(rows, 11)
    with pytest.raises(ConfigError):
        vendi_select(rows, 2, quality=torch.ones(10))


def test_vendi_rebuild():
    w, _ = _layer(9, 5, False)
    torch.testing.assert_close(vendi_rebuild(w, list(range(9))), w)
    rebuilt = vendi_rebuild(w, [1, 4, 7])
    assert int(torch.linalg.matrix_rank(rebuilt)) == 3
    torch.testing.assert_close(rebuilt[[1, 4, 7]], w[[1, 4, 7]])  # chosen rows are kept exactly
    # duplicated rows add no rank: each row becomes its projection onto w0
    w2 = torch.cat([w[:2], w[:2]])
    rebuilt = vendi_rebuild(w2, [0, 2])
    proj = torch.outer(w2 @ w[0], w[0]) / w[0].dot(w[0])
    torch.testing.assert_close(rebuilt, proj)
    assert int(torch.linalg.matrix_rank(rebuilt)) == 1


def test_vendi_select_smoke_size():
    """1536 rows of 576 values (a SmolLM2 MLP weight's shape), k = 64: seconds, not minutes."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(1536, 576, generator=g)
    started = time.perf_counter()
    picked = vendi_select(rows, 64, use_quality=True)
    elapsed = time.perf_counter() - started
    assert len(set(picked)) == 64
    print(f"vendi_select 1536x576, k=64: {elapsed:.2f}s")
