"""ArviZ diagnostics: DataTree layout, R̂ and ESS on chains with known behaviour, NaN chains excluded."""

import numpy as np
import pytest

from llc_bench.diagnostics import (
    autocorrelation,
    convergence,
    ess_evolution,
    healthy_chains,
    to_datatree,
)
from llc_bench.runner import ChainResult

C, T, B, D, P = 4, 1000, 200, 400, 3


def ar1(rng, shape, phi):
    """Stationary AR(1) with unit marginal variance along the last axis."""
    x = np.empty(shape)
    x[..., 0] = rng.normal(size=shape[:-1])
    eps = rng.normal(size=shape) * np.sqrt(1 - phi**2)
    for t in range(1, shape[-1]):
        x[..., t] = phi * x[..., t - 1] + eps[..., t]
    return x


def make_result(draw_loss, projections=None, diverged_at=None, loss_trace=None) -> ChainResult:
    c, d = draw_loss.shape
    rng = np.random.default_rng(123)
    steps = np.arange(B, B + 2 * d, 2)
    trace = rng.normal(size=(c, B + 2 * d)) if loss_trace is None else loss_trace
    nan = np.full(trace.shape, np.nan)
    return ChainResult(
        sampler="sgld", loss_trace=trace, accept=nan, energy_change=nan,
        diverging=np.zeros(trace.shape, bool), draw_loss=draw_loss, draw_steps=steps,
        projections=rng.normal(size=(c, d, P)) if projections is None else projections,
        diverged_at=-np.ones(c, int) if diverged_at is None else diverged_at,
        grad_evals=np.full(c, 7.0), warmup_grad_evals=np.full(c, 2.0), num_burnin_steps=B,
        loss_at_wstar=0.25, n_beta=20.0, wall_s=1.0, warmup_s=0.1, compile_s=0.2, tuned={},
    )


def test_datatree_layout_and_values():
    rng = np.random.default_rng(0)
    draw_loss = 1.0 + rng.normal(size=(C, D))
    res = make_result(draw_loss)
    tree = to_datatree(res)
    post, stats = tree["posterior"], tree["sample_stats"]
    assert post["L_n"].dims == ("chain", "draw") and post["theta_proj"].dims == ("chain", "draw", "proj")
    np.testing.assert_array_equal(post["draw"].values, np.arange(D))
    np.testing.assert_array_equal(post["draw_step"].values, res.draw_steps)
    # default llc is the per-draw summand nβ (L_n − L*)
    np.testing.assert_allclose(post["llc"].values, 20.0 * (draw_loss - 0.25))
    assert stats["loss"].dims == ("chain", "step") and stats["loss"].shape == res.loss_trace.shape
    assert stats["diverging"].dtype == bool and stats["grad_evals"].dims == ("chain",)
    np.testing.assert_array_equal(stats["grad_evals"].values, 7.0)
    assert tree.attrs["sampler"] == "sgld" and tree.attrs["n_beta"] == 20.0
    assert tree.attrs["loss_at_wstar"] == 0.25 and tree.attrs["num_burnin_steps"] == B

    running = np.cumsum(post["llc"].values, axis=1) / np.arange(1, D + 1)
    np.testing.assert_allclose(to_datatree(res, running)["posterior"]["llc"].values, running)
    with pytest.raises(ValueError):
        to_datatree(res, running[:, :-1])


def test_rhat_near_one_for_iid_and_large_for_shifted_chains():
    rng = np.random.default_rng(1)
    iid = convergence(to_datatree(make_result(rng.normal(size=(C, D)))))
    assert abs(iid["L_n"]["rhat"] - 1.0) < 0.01
    assert np.all(np.abs(iid["theta_proj"]["rhat"] - 1.0) < 0.01)
    shifted = rng.normal(size=(C, D)) + np.array([0.0, 0.0, 1.0, 1.0])[:, None]
    assert convergence(to_datatree(make_result(shifted)))["L_n"]["rhat"] > 1.1


def test_ess_near_total_for_iid_and_small_for_ar095():
    rng = np.random.default_rng(2)
    iid = convergence(to_datatree(make_result(rng.normal(size=(C, D)))))["L_n"]
    assert 0.8 * C * D < iid["ess_bulk"] < 1.2 * C * D
    assert 0.7 * C * D < iid["ess_tail"] < 1.3 * C * D
    # MCSE of the mean of unit-variance iid draws is 1/√(CD)
    assert iid["mcse_mean"] == pytest.approx(1 / np.sqrt(C * D), rel=0.15)
    phi = 0.95
    ar = convergence(to_datatree(make_result(ar1(rng, (C, D), phi))))["L_n"]
    # theory: ESS ≈ CD (1 − φ)/(1 + φ) ≈ 41 of 1600
    assert ar["ess_bulk"] < 0.1 * C * D
    theory = C * D * (1 - phi) / (1 + phi)
    assert theory / 2.5 < ar["ess_bulk"] < 2.5 * theory  # ESS of a short AR chain is itself noisy


def test_diverged_chains_are_excluded_not_averaged():
    rng = np.random.default_rng(3)
    draw_loss = rng.normal(size=(C, D))
    draw_loss[1, 300:] = np.nan
    diverged_at = np.array([-1, 800, -1, -1])
    draw_loss[3] += 1e6  # finite but flagged by the runner: also excluded
    diverged_at[3] = 5
    out = convergence(to_datatree(make_result(draw_loss, diverged_at=diverged_at)))
    assert out["chains_used"] == [0, 2] and out["chains_excluded"] == [1, 3]
    assert np.isfinite(out["L_n"]["rhat"]) and abs(out["L_n"]["mean"]) < 0.2
    np.testing.assert_array_equal(healthy_chains(draw_loss), [0, 2, 3])


def test_convergence_is_nan_safe():
    rng = np.random.default_rng(4)
    one = convergence(to_datatree(make_result(rng.normal(size=(1, D)))))["L_n"]
    assert np.isnan(one["rhat"]) and np.isfinite(one["ess_bulk"])
    none = convergence(to_datatree(make_result(np.full((C, D), np.nan))))
    assert none["chains_used"] == [] and np.isnan(none["L_n"]["ess_bulk"])
    few = convergence(to_datatree(make_result(rng.normal(size=(C, 3)))))["L_n"]
    assert np.isnan(few["rhat"]) and np.isnan(few["ess_bulk"])


def test_autocorrelation_of_ar1_is_geometric():
    rng = np.random.default_rng(5)
    x = ar1(rng, (C, 20000), 0.8)
    x[2, 7] = np.inf
    rho = autocorrelation(x, max_lag=3)
    assert rho.shape == (C, 4) and np.all(np.isnan(rho[2]))
    good = rho[[0, 1, 3]]
    np.testing.assert_allclose(good[:, 0], 1.0)
    np.testing.assert_allclose(good.mean(axis=0), 0.8 ** np.arange(4), atol=0.03)


def test_ess_evolution_grows_with_draws():
    rng = np.random.default_rng(6)
    evo = ess_evolution(rng.normal(size=(C, D)), num_points=5)
    assert evo.shape == (5, 2)
    np.testing.assert_array_equal(evo[:, 0], [4, 103, 202, 301, 400])
    assert np.all(np.diff(evo[1:, 1]) > 0)
    assert evo[-1, 1] == pytest.approx(C * D, rel=0.2)
