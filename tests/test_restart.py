"""The over-dispersed restart: it withdraws still_spreading along level valleys and flags a quartic plateau."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from llc_bench.config import from_dict
from llc_bench.experiment import run_sampler
from llc_bench.posterior import Posterior
from llc_bench.restart import (
    RESTART_MIN_FRACTION,
    RESTART_MIN_SCALE,
    RESTART_MIN_SHIFT,
    RESTART_Z,
    candidate_scales,
    restart_positions,
    restart_verdict,
    stable_scale,
)
from llc_bench.rules import run_status
from llc_bench.samplers.sgld import SGLDSettings

CURVED, FLAT, H = 4, 100, 4.0


def test_restart_positions_scale_the_displacement_from_w_star():
    w_star = jnp.array([1.0, -2.0])
    got = restart_positions(w_star, jnp.array([[1.5, -2.0], [0.0, 0.0]]), 3.0)
    np.testing.assert_allclose(np.asarray(got), [[2.5, -2.0], [-2.0, 4.0]])


def test_restart_verdict_needs_both_significance_and_size():
    record, flag = restart_verdict(100.0, 1.0, 100.0 + 0.9 * RESTART_Z * math.sqrt(2), 1.0, 3.0)
    assert record["agrees"] is None and flag is None  # 5.1% apart, within the noise: undecided
    record, flag = restart_verdict(100.0, 0.5, 101.0, 0.5, 3.0)
    assert record["agrees"] is True and flag is None  # 1 + 2·0.71 <= 5: shown equal within 5%
    record, flag = restart_verdict(100.0, 0.01, 100.0 + 0.5 * RESTART_MIN_SHIFT * 100, 0.01, 3.0)
    assert record["agrees"] is True and flag is None  # significant but immaterial
    shift = 0.5 * (RESTART_MIN_SHIFT + RESTART_MIN_FRACTION) * 100  # material, inside the equivalence margin
    record, flag = restart_verdict(100.0, 0.01, 100.0 + shift, 0.01, 3.0)
    assert record["agrees"] is False and flag.code == "restart_disagrees"
    record, flag = restart_verdict(20.7, 0.2, 599.0, 300.0, 10.0)
    assert record["agrees"] is None and flag is None  # a restart far too noisy withdraws nothing
    record, flag = restart_verdict(28.0, 0.3, 46.0, 0.8, 3.0)
    assert record["agrees"] is False and flag.code == "restart_disagrees"
    assert record["z"] == pytest.approx(18.0 / math.hypot(0.3, 0.8))
    assert run_status("ok", [flag]) == "not_converged"
    record, flag = restart_verdict(28.0, 0.3, float("nan"), float("nan"), 3.0)
    assert record["agrees"] is None and flag is None  # no evidence either way


def test_restart_positions_keep_the_stiff_component():
    """Only the part of w − w* outside a chain's stiff directions is scaled."""
    w_star = jnp.array([1.0, 0.0, 0.0])
    stiff = jnp.array([[[1.0], [0.0], [0.0]], [[0.0], [0.6], [0.8]]])  # (C = 2, d = 3, k = 1)
    offsets = jnp.array([[2.0, 1.0, -1.0], [0.0, 0.6, 0.8]])
    got = np.asarray(restart_positions(w_star, w_star + offsets, 5.0, stiff))
    np.testing.assert_allclose(got, [[3.0, 5.0, -5.0], [1.0, 0.6, 0.8]], atol=1e-6)


def test_candidate_scales_halve_down_to_the_floor():
    np.testing.assert_allclose(candidate_scales(10.0), [10.0, 7.0711, 5.0, 3.5355, 2.5], rtol=1e-4)
    np.testing.assert_allclose(candidate_scales(4.0), [4.0, 2.8284, 2.0], rtol=1e-4)
    assert candidate_scales(3.0)[-1] > RESTART_MIN_SCALE and candidate_scales(1.5) == [1.5]
    assert min(candidate_scales(100.0)) >= RESTART_MIN_SCALE


def test_stable_scale_steps_back_from_starts_where_the_step_size_is_unstable():
    """L = ½h‖w₁..₄‖² + q Σ w⁴ over 100 flat-at-w* directions, SGLD at ε nβ h = 0.1, q = 1/2. A flat
    coordinate follows w ← w − (ε/2) nβ 4q w³ (noise aside), which overshoots without bound once
    (ε/2) nβ 4q w² > 2: from |w| = s that is 0.025 s², 2.5 at s = 10 and 1.25 at s = 10/√2, so the
    probe must drop 10 and keep 10/√2; from |w| = 4s every scale down to 2.5 is unstable while the
    chains' own positions (0.4) are not: the walls bind. Lost chains (NaN) do not count against a scale."""
    from llc_bench.samplers import get_spec

    post = valley_posterior(0.5)
    settings = SGLDSettings(step_size=0.1 / (post.n_beta * H), batch_size=10)
    algorithm = get_spec("sgld").build(post, settings)
    positions = jnp.concatenate([jnp.zeros((4, CURVED)), jnp.ones((4, FLAT))], axis=1)
    positions = positions.at[3].set(jnp.nan)
    probed = stable_scale("sgld", algorithm, post, positions, seed=0, scale=10.0, num_chains=4, num_burnin_steps=2000)
    assert probed.scale == pytest.approx(10 / math.sqrt(2)) and len(probed.tried) == 2 and probed.grad_evals > 0
    assert not probed.walls_bind
    # from |w| = 4: unstable at every scale down to 2.5 (|w| = 10), stable where the chains are
    probed = stable_scale("sgld", algorithm, post, positions * 4.0, seed=0, scale=10.0, num_chains=4,
                          num_burnin_steps=2000)
    assert probed.scale is None and probed.tried == candidate_scales(10.0) and probed.walls_bind
    # from |w| = 40 the chains' own positions are unstable too: that shows nothing about the walls
    probed = stable_scale("sgld", algorithm, post, positions * 40.0, seed=0, scale=10.0, num_chains=4,
                          num_burnin_steps=2000)
    assert probed.scale is None and not probed.walls_bind


def valley_posterior(quartic: float) -> Posterior:
    """L = ½ h ‖w₁..₄‖² + quartic · Σ w₅..₁₀₄⁴, γ = 1e-3. quartic = 0: 100 level directions, λ = 2;
    quartic > 0: directions flat only to second order, λ = 2 + 100/4 = 27, reached only once the
    chains spread to |w| ~ (nβ·quartic)^(-1/4) ≈ 13 at quartic = 1e-6, about 8× farther than 4,000
    SGLD steps go (at 2e-5 the rise is already visible in the loss trace, and the trend checks catch it)."""

    def per_sample_loss(w, x, y):
        value = 0.5 * H * jnp.sum(w[:CURVED] ** 2) + quartic * jnp.sum(w[CURVED:] ** 4)
        return jnp.full((x.shape[0],), value)

    zeros = jnp.zeros((200, 1))
    return Posterior.build(per_sample_loss, zeros, zeros, jnp.zeros(CURVED + FLAT), gamma=1e-3)


@pytest.fixture(scope="module")
def runs():
    """SGLD at ε = 0.1/(nβ h) for 500 + 3,500 steps on both posteriors, with the restart; 64 chains so
    that the level valley's two λ̂ (≈ 2) are resolved to the equivalence test's 5%."""
    cfg = from_dict({"run": {"samplers": ["sgld"], "num_chains": 64, "num_burnin_steps": 500, "num_draws": 350,
                             "num_steps_bw_draws": 10, "restart_scale": 3.0}})
    out = {}
    for name, quartic in (("level", 0.0), ("quartic", 1e-6)):
        post = valley_posterior(quartic)
        settings = SGLDSettings(step_size=0.1 / (post.n_beta * H), batch_size=10)
        out[name] = run_sampler(cfg, "sgld", post, settings=settings)
    return out


def test_restart_withdraws_still_spreading_along_level_valleys(runs):
    """The flat directions never enter the loss: λ̂ = 2 from either start, so the run is ok."""
    run = runs["level"]
    restart = run.summary["restart_check"]
    assert restart is not None and restart["agrees"] is True  # it ran: the chains were still spreading
    assert abs(restart["llc_restart"] - run.estimate.mean) < 0.1 * run.estimate.mean
    assert abs(run.estimate.mean - 2.0) < 4 * run.estimate.se + 0.05
    assert run.summary["status"] == "ok", run.summary["warnings"]
    assert restart["grad_evals"] > 0 and restart["num_burnin_steps"] == 500


def test_restart_flags_a_quartic_plateau(runs):
    """From w* the quartic directions are still free: λ̂ ≈ 2 + a little, far below λ = 27. Restarted 3×
    farther out they hold energy the base run never reached: the restart reads higher, not_converged."""
    run = runs["quartic"]
    restart = run.summary["restart_check"]
    assert run.estimate.mean < 6.0  # the plateau (λ = 27)
    assert restart["agrees"] is False and restart["llc_restart"] > 2 * run.estimate.mean
    codes = [w.split(":")[0] for w in run.summary["warnings"]]
    assert "restart_disagrees" in codes and "still_spreading" in codes
    assert run.summary["status"] == "not_converged"


def test_no_restart_when_disabled():
    cfg = from_dict({"run": {"samplers": ["sgld"], "num_chains": 4, "num_burnin_steps": 200, "num_draws": 100,
                             "num_steps_bw_draws": 10, "restart_scale": 0.0}})
    post = valley_posterior(0.0)
    run = run_sampler(cfg, "sgld", post, settings=SGLDSettings(step_size=0.1 / (post.n_beta * H), batch_size=10))
    assert run.summary["restart_check"] is None
    assert "still_spreading" in [w.split(":")[0] for w in run.summary["warnings"]]


@pytest.mark.parametrize("scale", [3.0, 0.0])
def test_target_rel_se_settles_still_spreading_on_a_level_valley(scale):
    """Chains spreading along a level valley never stop. With the restart on, running to a target SE
    does not double the run for `still_spreading` (the restart settles it). Without it the run doubles
    once: the draws after the doubling (twice as far out) read the λ̂ of those before it, so the flag
    is withdrawn. Either way: ok."""
    cfg = from_dict({"run": {"samplers": ["sgld"], "num_chains": 64, "num_burnin_steps": 500, "num_draws": 350,
                             "num_steps_bw_draws": 10, "restart_scale": scale, "target_rel_se": 0.05,
                             "max_doublings": 2}})
    post = valley_posterior(0.0)
    run = run_sampler(cfg, "sgld", post, settings=SGLDSettings(step_size=0.1 / (post.n_beta * H), batch_size=10))
    record = run.summary["target_rel_se"]
    attempts = record["attempts"]
    assert attempts[0]["status"] == "not_converged" and attempts[0]["agrees_with_previous"] is None
    assert record["reached"] and run.summary["status"] == "ok", run.summary["warnings"]
    if scale:
        assert len(attempts) == 1
    else:
        assert [a["num_burnin_steps"] for a in attempts] == [500, 4000]
        assert attempts[1]["agrees_with_previous"] is True
        assert abs(attempts[1]["llc_mean"] - attempts[0]["llc_mean"]) < 0.05 * attempts[0]["llc_mean"]


def test_doubling_keeps_still_spreading_on_a_quartic_plateau():
    """Directions flat only to second order: the chains' energy in them grows with their spread, so λ̂
    rises from each doubling to the next, the attempts disagree, and nothing is withdrawn: the run ends
    not converged (still spreading, or, once the rise shows within the draws, not leveling)."""
    cfg = from_dict({"run": {"samplers": ["sgld"], "num_chains": 64, "num_burnin_steps": 500, "num_draws": 350,
                             "num_steps_bw_draws": 10, "restart_scale": 0.0, "target_rel_se": 0.05,
                             "max_doublings": 2}})
    post = valley_posterior(1e-6)
    run = run_sampler(cfg, "sgld", post, settings=SGLDSettings(step_size=0.1 / (post.n_beta * H), batch_size=10))
    attempts = run.summary["target_rel_se"]["attempts"]
    means = [a["llc_mean"] for a in attempts]
    assert len(attempts) == 3 and means[0] < means[1] < means[2] < 27.0, means
    assert [a["agrees_with_previous"] for a in attempts[1:]] == [False, False]
    codes = {w.split(":")[0] for w in run.summary["warnings"]}
    assert codes & {"still_spreading", "not_leveling"} and run.summary["status"] == "not_converged"


def test_the_restart_leaves_the_runs_own_tuning_in_the_summary():
    """step_size = "auto" re-measures ε after the restart's burn-in, on the same algorithm; the summary
    still reports the ε, curvature and tuning cost of the run's own draws (as without the restart), and
    the restart's record carries its own retune."""
    cfg = from_dict({"run": {"samplers": ["sgld"], "num_chains": 8, "num_burnin_steps": 500, "num_draws": 100,
                             "num_steps_bw_draws": 10, "restart_scale": 3.0}})
    post = valley_posterior(0.0)
    settings = SGLDSettings(step_size="auto", batch_size=10)
    with_restart = run_sampler(cfg, "sgld", post, settings=settings)
    without = run_sampler(cfg, "sgld", post, settings=settings, restart=False)
    restart = with_restart.summary["restart_check"]
    assert restart is not None
    for key in ("step_size", "h_max_burnin", "mala_accept"):
        assert with_restart.summary[key] == pytest.approx(without.summary[key], rel=1e-6), key
    # The iterative eigen-solvers stop on a tolerance, so two runs may differ by a product or two; the
    # restart's retune (8 chains, tens of products each) would add hundreds.
    chains_only = 8 * (restart["num_burnin_steps"] + 100 * 10) * 10 / 200  # batch 10 of n = 200
    restart_tuning = restart["grad_evals"] - chains_only
    assert restart_tuning > 8 * 10
    for key in ("num_hvp", "num_cvp"):
        assert abs(with_restart.summary[key] - without.summary[key]) <= 2, key
    assert abs(with_restart.summary["grad_evals"] - without.summary["grad_evals"]) < 0.1 * restart_tuning
