"""LLC estimator on synthetic AR(1) losses with known mean and known standard error."""

import math

import numpy as np
import pytest

from llc_bench.estimator import (
    batch_means_variance,
    block_bootstrap_ci,
    estimate_from_result,
    estimate_llc,
    wnv,
)
from llc_bench.runner import ChainResult

N_BETA = 100.0
L_STAR = 0.3
TRUE_LLC = 5.0
SIGMA = 0.01  # stationary SD of the loss draws: nβ σ = 1 in λ units


def ar1_draws(rng, shape, phi, sigma=SIGMA, mean=L_STAR + TRUE_LLC / N_BETA):
    """Stationary AR(1): x_0 ~ N(0, σ²), x_t = φ x_{t-1} + √(1 - φ²) σ ε_t, shifted by the mean."""
    *lead, num_draws = shape
    noise = rng.standard_normal((*lead, num_draws))
    x = np.empty((*lead, num_draws))
    x[..., 0] = sigma * noise[..., 0]
    innovation = math.sqrt(1 - phi**2) * sigma
    for t in range(1, num_draws):
        x[..., t] = phi * x[..., t - 1] + innovation * noise[..., t]
    return mean + x


def ar1_mean_sd(phi, num_draws, sigma=SIGMA):
    """Exact SD of the mean of D stationary AR(1) draws: σ²/D² (D + 2 Σ_{k<D} (D - k) φ^k)."""
    k = np.arange(1, num_draws)
    return sigma * math.sqrt(num_draws + 2 * np.sum((num_draws - k) * phi**k)) / num_draws


def test_point_estimate_and_running():
    draws = np.array([[0.31, 0.33, 0.32, 0.36], [0.30, 0.34, 0.35, 0.33]])
    est = estimate_llc(draws, loss_at_wstar=0.3, n_beta=10.0)
    np.testing.assert_allclose(est.per_chain, [10 * (0.33 - 0.3), 10 * (0.33 - 0.3)])
    assert est.mean == pytest.approx(10 * (draws.mean() - 0.3))
    assert est.running.shape == draws.shape
    np.testing.assert_allclose(est.running[:, -1], est.per_chain)
    np.testing.assert_allclose(est.running[:, 0], 10 * (draws[:, 0] - 0.3))
    np.testing.assert_allclose(est.running[0, 1], 10 * (0.32 - 0.3))
    assert est.se_between == pytest.approx(0.0, abs=1e-12)
    assert est.se == est.se_between
    assert (est.status, est.excluded, est.num_chains_used) == ("ok", (), 2)


def test_ar1_standard_errors_match_analytic():
    rng = np.random.default_rng(0)
    phi, num_chains, num_draws = 0.9, 8, 2000
    draws = ar1_draws(rng, (num_chains, num_draws), phi)
    est = estimate_llc(draws, L_STAR, N_BETA)
    analytic = N_BETA * ar1_mean_sd(phi, num_draws) / math.sqrt(num_chains)
    assert 1 / 1.5 < est.se_batch_means / analytic < 1.5
    assert 1 / 1.5 < est.se_between / analytic < 1.5
    assert abs(est.mean - TRUE_LLC) < 3 * analytic
    np.testing.assert_allclose(est.running[:, -1], est.per_chain)


@pytest.mark.parametrize("phi", [0.0, 0.8])
def test_ar1_coverage_over_seeds(phi):
    # 40 independent replicates of 8 chains: z = (λ̂ - λ) / SE should look standard (t7 for between).
    rng = np.random.default_rng(1)
    reps, num_chains, num_draws = 40, 8, 1000
    draws = ar1_draws(rng, (reps, num_chains, num_draws), phi)
    z_between, z_batch = [], []
    for rep in range(reps):
        est = estimate_llc(draws[rep], L_STAR, N_BETA)
        z_between.append((est.mean - TRUE_LLC) / est.se_between)
        z_batch.append((est.mean - TRUE_LLC) / est.se_batch_means)
    for z in (np.array(z_between), np.array(z_batch)):
        assert np.all(np.abs(z) < 4.5)
        assert np.mean(np.abs(z) < 3) >= 0.95
        assert 0.7 < np.std(z) < 1.45


def test_batch_means_variance_iid():
    # i.i.d. draws: Var(x̄) = σ²/D.
    rng = np.random.default_rng(2)
    chain = rng.standard_normal(10_000)
    assert batch_means_variance(chain) == pytest.approx(1e-4, rel=0.35)
    assert math.isnan(batch_means_variance(np.ones(3)))


def test_nan_chain_is_excluded_and_reported():
    rng = np.random.default_rng(3)
    draws = ar1_draws(rng, (4, 200), 0.5)
    clean = estimate_llc(draws[[0, 2, 3]], L_STAR, N_BETA)
    draws[1, 150:] = np.nan
    est = estimate_llc(draws, L_STAR, N_BETA)
    assert est.status == "diverged"
    assert est.excluded == (1,)
    assert est.num_chains_used == 3
    assert math.isnan(est.per_chain[1])
    assert est.mean == pytest.approx(clean.mean)
    assert est.se == pytest.approx(clean.se)
    assert math.isfinite(est.se_batch_means)


def test_diverged_at_excludes_finite_chain():
    rng = np.random.default_rng(4)
    draws = ar1_draws(rng, (3, 100), 0.0)
    draws[2] = 1e30  # finite but absurd: the sampler flagged it, so it must not be averaged
    est = estimate_llc(draws, L_STAR, N_BETA, diverged_at=np.array([-1, -1, 57]))
    assert est.excluded == (2,)
    assert est.status == "diverged"
    assert est.mean < 10


def test_all_chains_failed():
    draws = np.full((3, 50), np.nan)
    draws[0, :10] = 0.4
    est = estimate_llc(draws, L_STAR, N_BETA)
    assert est.status == "failed"
    assert est.num_chains_used == 0
    assert est.excluded == (0, 1, 2)
    for value in (est.mean, est.se, est.se_between, est.se_batch_means):
        assert math.isnan(value)
    assert np.all(np.isnan(est.per_chain))
    assert block_bootstrap_ci(draws, L_STAR, N_BETA) == pytest.approx(
        (math.nan, math.nan), nan_ok=True
    )


def test_single_chain_uses_batch_means():
    rng = np.random.default_rng(5)
    draws = ar1_draws(rng, (1, 2500), 0.5)
    est = estimate_llc(draws, L_STAR, N_BETA)
    assert math.isnan(est.se_between)
    assert est.se == est.se_batch_means
    analytic = N_BETA * ar1_mean_sd(0.5, 2500)
    assert 1 / 1.5 < est.se / analytic < 1.5


def make_result(draw_loss, loss_trace, num_burnin_steps, diverged_at):
    num_chains, num_steps = loss_trace.shape
    num_draws = draw_loss.shape[1]
    nan = np.full((num_chains, num_steps), np.nan)
    return ChainResult(
        sampler="test",
        loss_trace=loss_trace,
        accept=nan,
        energy_change=nan,
        diverging=np.zeros((num_chains, num_steps), bool),
        draw_loss=draw_loss,
        draw_steps=np.arange(num_burnin_steps, num_burnin_steps + num_draws),
        projections=np.zeros((num_chains, num_draws, 0)),
        diverged_at=diverged_at,
        grad_evals=np.full(num_chains, float(num_steps)),
        warmup_grad_evals=np.zeros(num_chains),
        num_burnin_steps=num_burnin_steps,
        loss_at_wstar=L_STAR,
        n_beta=N_BETA,
        wall_s=1.0,
        warmup_s=0.0,
        compile_s=0.0,
        tuned={},
    )


def test_estimate_from_result_sources():
    burnin, num_draws = 30, 100
    draw_loss = np.full((2, num_draws), L_STAR + 0.05)  # λ̂ = 5
    loss_trace = np.concatenate(
        [np.full((2, burnin), L_STAR), np.full((2, num_draws), L_STAR + 0.07)], axis=1
    )  # burn-in at L*: including it would drag λ̂ down
    result = make_result(draw_loss, loss_trace, burnin, np.array([-1, -1]))
    assert estimate_from_result(result).mean == pytest.approx(5.0)
    minibatch = estimate_from_result(result, source="minibatch")
    assert minibatch.mean == pytest.approx(7.0)
    assert minibatch.running.shape == (2, num_draws)
    diverged = make_result(draw_loss, loss_trace, burnin, np.array([-1, 80]))
    assert estimate_from_result(diverged, source="minibatch").excluded == (1,)
    with pytest.raises(ValueError):
        estimate_from_result(result, source="both")


def test_bootstrap_ci_contains_truth_and_tracks_autocorrelation():
    rng = np.random.default_rng(6)
    num_chains, num_draws = 4, 2000
    widths = {}
    for phi in (0.0, 0.9):
        draws = ar1_draws(rng, (num_chains, num_draws), phi)
        lo, hi = block_bootstrap_ci(draws, L_STAR, N_BETA, seed=0)
        assert lo < TRUE_LLC < hi
        est = estimate_llc(draws, L_STAR, N_BETA)
        assert lo < est.mean < hi
        widths[phi] = hi - lo
        # Width ~ 2 z_0.975 SE; the default b = 13 is short for φ = 0.9 (τ = 19), hence the slack.
        analytic = 2 * 1.96 * N_BETA * ar1_mean_sd(phi, num_draws) / math.sqrt(num_chains)
        assert 0.5 < widths[phi] / analytic < 1.5
    assert widths[0.9] > 2.0 * widths[0.0]  # analytic ratio √((1 + φ)/(1 - φ)) ≈ 4.4


def test_bootstrap_longer_blocks_widen_under_autocorrelation():
    rng = np.random.default_rng(7)
    draws = ar1_draws(rng, (4, 2000), 0.9)
    short = np.subtract(*block_bootstrap_ci(draws, L_STAR, N_BETA, block_len=1)[::-1])
    long = np.subtract(*block_bootstrap_ci(draws, L_STAR, N_BETA, block_len=100)[::-1])
    assert long > 2.5 * short
    assert block_bootstrap_ci(draws, L_STAR, N_BETA, seed=3) == block_bootstrap_ci(
        draws, L_STAR, N_BETA, seed=3
    )


def test_wnv():
    assert wnv(0.5, 8.0, 1000.0) == (2.0, 250.0)


@pytest.mark.parametrize(
    "draws,loss_at_wstar,n_beta",
    [
        (np.ones(5), L_STAR, N_BETA),
        (np.ones((2, 0)), L_STAR, N_BETA),
        (np.ones((2, 5)), math.nan, N_BETA),
        (np.ones((2, 5)), L_STAR, 0.0),
    ],
)
def test_invalid_inputs(draws, loss_at_wstar, n_beta):
    with pytest.raises(ValueError):
        estimate_llc(draws, loss_at_wstar, n_beta)
