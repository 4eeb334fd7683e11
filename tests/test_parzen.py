"""The Parzen-window estimate against hand-computed values and a closed form, and its choice of sigma."""

from __future__ import annotations

import math

import pytest
import torch

from aaekit.evaluation.parzen import mean_and_standard_error, parzen_estimate, parzen_log_likelihoods


def skewed_data():
    """Samples, validation and test rows from three different skewed distributions (the best sigma lies inside
    the tests' grids)."""
    g = torch.Generator().manual_seed(2)
    samples = torch.rand(200, 10, generator=g, dtype=torch.float64) ** 2
    validation = torch.rand(40, 10, generator=g, dtype=torch.float64)
    test = torch.rand(30, 10, generator=g, dtype=torch.float64) ** 3
    return samples, validation, test


def naive(x, samples, sigma):
    """log p(x) per row, holding the whole (n, N, D) difference tensor."""
    d2 = ((x[:, None, :] - samples[None, :, :]) ** 2).sum(-1)
    log_kernel = -d2 / (2 * sigma**2) - 0.5 * x.shape[1] * math.log(2 * math.pi * sigma**2)
    return torch.logsumexp(log_kernel, dim=1) - math.log(len(samples))


def test_exact_small_cases_by_hand():
    # 1-D, samples at 0 and 2, x = 1, sigma = 1: both kernels give N(1; 0, 1), so log p = log N(1; 0, 1).
    samples = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    ll = parzen_log_likelihoods(torch.tensor([[1.0]], dtype=torch.float64), samples, [1.0])
    assert ll.item() == pytest.approx(-0.5 - 0.5 * math.log(2 * math.pi), abs=1e-12)

    # 2-D, samples at (0,0) and (3,4), x = (0,0), sigma = 1: 0.5 (1 + exp(-25/2)) / (2 pi).
    samples = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    ll = parzen_log_likelihoods(torch.zeros(1, 2, dtype=torch.float64), samples, [1.0, 2.0])
    expected_1 = math.log(0.5) - math.log(2 * math.pi) + math.log1p(math.exp(-12.5))
    # sigma = 2: 0.5 (1 + exp(-25/8)) / (2 pi 4)
    expected_2 = math.log(0.5) - math.log(8 * math.pi) + math.log1p(math.exp(-25 / 8))
    assert ll[0, 0].item() == pytest.approx(expected_1, abs=1e-12)
    assert ll[1, 0].item() == pytest.approx(expected_2, abs=1e-12)


def test_far_points_do_not_underflow():
    # A point 100 sigma from every sample: exp underflows, log-sum-exp must not (-inf would be wrong).
    samples = torch.zeros(3, 4)
    ll = parzen_log_likelihoods(torch.full((1, 4), 50.0), samples, [0.5])
    expected = -(4 * 50.0**2) / (2 * 0.25) - 2 * math.log(2 * math.pi * 0.25)
    assert torch.isfinite(ll).all()
    assert ll.item() == pytest.approx(expected, rel=1e-5)


def test_blocks_do_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    samples, x = torch.rand(300, 20, generator=g), torch.rand(50, 20, generator=g)
    whole = parzen_log_likelihoods(x, samples, [0.1, 0.3], batch_size=1000)
    blocks = parzen_log_likelihoods(x, samples, [0.1, 0.3], batch_size=7)
    # float32 distances from |x|^2 + |s|^2 - 2 x.s: a block of other height may take another matmul kernel,
    # so agreement is to float32 rounding of values around -50, not bitwise
    torch.testing.assert_close(whole, blocks, rtol=1e-5, atol=1e-4)


def test_gaussian_closed_form():
    """Samples of N(mu, s^2 I): the Parzen density is on average N(mu, (s^2 + sigma^2) I), and with sigma
    chosen on validation data it approaches the true log-likelihood of the data."""
    g = torch.Generator().manual_seed(1)
    dim, s, mu = 2, 1.5, torch.tensor([1.0, -2.0], dtype=torch.float64)
    draw = lambda n: mu + s * torch.randn(n, dim, generator=g, dtype=torch.float64)  # noqa: E731
    samples, validation, test = draw(20_000), draw(1000), draw(1000)

    def gaussian_ll(x, var):
        return -((x - mu) ** 2).sum(1) / (2 * var) - 0.5 * dim * math.log(2 * math.pi * var)

    sigma = 0.5
    parzen = parzen_log_likelihoods(test, samples, [sigma], batch_size=200)[0]
    smoothed = gaussian_ll(test, s**2 + sigma**2)
    assert (parzen - smoothed).abs().mean().item() < 0.03
    assert parzen.mean().item() == pytest.approx(smoothed.mean().item(), abs=0.02)

    result = parzen_estimate(
        samples, validation, test, sigmas=[0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0], batch_size=200
    )
    true_mean, _ = mean_and_standard_error(gaussian_ll(test, s**2))
    # The estimate is a little below the truth (the window blurs it) and within a few standard errors.
    assert result["log_likelihood"] == pytest.approx(true_mean, abs=0.05)
    assert result["log_likelihood"] <= true_mean + 3 * result["standard_error"]
    assert 0.1 <= result["sigma"] <= 0.5  # the grid chose 0.3; the fine grid between 0.2 and 0.5
    assert "warning" not in result


def test_sigma_is_the_best_of_the_grid_on_validation():
    """Checked against a naive computation that holds the whole (n, N, D) difference tensor."""
    samples, validation, test = skewed_data()
    grid = [0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    per_sigma = [naive(validation, samples, s).mean().item() for s in grid]
    result = parzen_estimate(samples, validation, test, sigmas=grid, batch_size=16, refine=False)
    assert result["validation_log_likelihood"] == pytest.approx(per_sigma, rel=1e-9)
    best = grid[max(range(len(grid)), key=per_sigma.__getitem__)]
    assert result["sigma"] == best
    assert 0 < grid.index(best) < len(grid) - 1  # the data were made so that the best is inside the grid
    test_ll = naive(test, samples, best)
    assert result["log_likelihood"] == pytest.approx(test_ll.mean().item(), rel=1e-9)
    assert result["standard_error"] == pytest.approx(test_ll.std().item() / math.sqrt(len(test)), rel=1e-9)
    assert result["num_samples"] == 200 and result["num_test"] == 30 and result["unit"] == "nats"


def test_sigma_is_refined_between_the_grid_neighbours_of_the_best():
    """After the grid, sigma is the best (by the naive computation) of a fine grid between the neighbours of
    the grid's best value, so it scores at least as well on validation; the test figure is scored with it."""
    samples, validation, test = skewed_data()
    grid = [0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    coarse = parzen_estimate(samples, validation, test, sigmas=grid, batch_size=16, refine=False)
    result = parzen_estimate(samples, validation, test, sigmas=grid, batch_size=16)
    i = grid.index(coarse["sigma"])
    fine = result["sigma_fine_grid"]
    assert (
        len(fine) >= 21 and fine[0] == pytest.approx(grid[i - 1]) and fine[-1] == pytest.approx(grid[i + 1])
    )
    assert coarse["sigma"] in fine
    per_sigma = [naive(validation, samples, s).mean().item() for s in fine]
    assert result["validation_log_likelihood_fine"] == pytest.approx(per_sigma, rel=1e-9)
    assert result["sigma"] == fine[max(range(len(fine)), key=per_sigma.__getitem__)]
    assert result["sigma"] != coarse["sigma"]  # the data were made so that the grid's value is not the best
    assert max(per_sigma) > max(coarse["validation_log_likelihood"])
    assert result["log_likelihood"] == pytest.approx(
        naive(test, samples, result["sigma"]).mean().item(), rel=1e-9
    )


def test_edge_of_grid_is_reported():
    g = torch.Generator().manual_seed(3)
    samples, x = torch.rand(100, 5, generator=g), torch.rand(20, 5, generator=g)
    result = parzen_estimate(samples, x, x, sigmas=[10.0, 20.0])
    assert result["sigma"] == 10.0
    assert "smallest of the grid" in result["warning"]
