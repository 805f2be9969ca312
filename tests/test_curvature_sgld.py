"""Curvature-preconditioned SGLD: top eigenpairs against a dense eigendecomposition, the exact
discretized stationary covariance of the preconditioned update, and the step size it gains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_utils import dln_posterior, gaussian_posterior, run_algorithm

from llc_bench.curvature import auto_step_size, build_algorithm, top_eigenpairs
from llc_bench.posterior import Posterior
from llc_bench.runner import start_chains
from llc_bench.samplers import get_spec
from llc_bench.samplers.curvature_sgld import (
    CurvatureSGLDSettings,
    apply_preconditioner,
    curvature_preconditioner,
)
from llc_bench.samplers.sgld import SGLDSettings

Z = 3.5


def low_rank_regression(n: int = 400, d: int = 30, rank: int = 6, seed: int = 0) -> Posterior:
    """Linear regression whose inputs span `rank` of the d feature directions: ∇²L_n has rank `rank`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, rank)) * np.geomspace(1.0, 30.0, rank) @ rng.normal(size=(rank, d))
    y = x @ rng.normal(size=d)

    def per_sample_loss(w, xb, yb):
        return 0.5 * (yb[:, 0] - xb @ w) ** 2

    return Posterior.build(per_sample_loss, jnp.asarray(x, jnp.float32), jnp.asarray(y[:, None], jnp.float32),
                           jnp.zeros(d, jnp.float32), gamma=1.0)


def test_top_eigenpairs_match_dense_hessian():
    post = low_rank_regression()
    dense = np.asarray(jax.hessian(post.full_loss)(post.w_star), np.float64)
    values, vectors = np.linalg.eigh(dense)
    values, vectors = values[::-1], vectors[:, ::-1]
    top, basis, count = top_eigenpairs(post, 4, oversample=4)
    assert count == 6 * 8  # (power_iters + 2) rounds of k + oversample products
    np.testing.assert_allclose(top, values[:4], rtol=1e-3)
    # the same directions: |cos| between matching eigenvectors ≈ 1 (the spectrum has no ties)
    np.testing.assert_allclose(np.abs(np.sum(basis * vectors[:, :4], axis=0)), 1.0, atol=1e-3)
    # rank 6 <= k + oversample: the subspace holds the whole range and the 7th value is 0
    seven, _, _ = top_eigenpairs(post, 7, oversample=3)
    assert abs(seven[6]) < 1e-4 * values[0]


@pytest.fixture(scope="module")
def stiff_gaussian():
    """Gaussian with curvatures spread over two decades: the preconditioner has work to do."""
    return gaussian_posterior(dim=5, n=64, gamma=1.0, corr=0.0, seed=3)


def test_preconditioned_update_lands_on_its_exact_discretized_covariance(stiff_gaussian):
    """In u = P^{-1/2} w the update is SGLD on precision Λ_u = P^{1/2} Λ P^{1/2}, whose stationary
    covariance at step ε is (Λ_u − εΛ_u²/4)⁻¹: so Cov(w) = P^{1/2} (Λ_u − εΛ_u²/4)⁻¹ P^{1/2}. A wrong
    noise scale (P instead of P^{1/2}) or a missing P in the drift moves it by many SEs."""
    post, true_mean, true_cov = stiff_gaussian
    lam = np.linalg.inv(true_cov)
    h = np.linalg.eigvalsh(lam)
    eps = 0.4 / h.max() * 3.0  # 0.4 / (curvature after preconditioning ≈ h_max / 3): a large, resolved bias
    settings = CurvatureSGLDSettings(step_size=float(eps), batch_size=4, kappa=3.0, max_rank=5)
    alg = get_spec("curvature_sgld").build(post, settings)
    _, params, _ = alg.warmup(jax.random.key(0), post.w_star)
    vectors, scales = np.asarray(params.vectors, np.float64), np.asarray(params.scales, np.float64)
    assert 1 <= vectors.shape[1] <= 5 and np.all(scales <= 1.0) and scales.min() < 0.5
    root = np.eye(post.dim) + vectors @ np.diag(np.sqrt(scales) - 1) @ vectors.T
    lam_u = root @ lam @ root
    expected = root @ np.linalg.inv(lam_u - eps * lam_u @ lam_u / 4) @ root
    positions, _ = run_algorithm(alg, post, jax.random.key(7), 128, 3000)
    burn = 500
    x = positions[:, burn:, :]
    mean = x.mean(axis=(0, 1))
    chain_means = x.mean(axis=1)
    mean_se = chain_means.std(axis=0, ddof=1) / np.sqrt(x.shape[0])
    centered = x - mean
    per_chain_cov = np.einsum("ctd,cte->cde", centered, centered) / x.shape[1]
    cov = per_chain_cov.mean(axis=0)
    cov_se = per_chain_cov.std(axis=0, ddof=1) / np.sqrt(x.shape[0])
    assert (np.abs(mean - true_mean) / mean_se).max() < Z
    assert (np.abs(cov - expected) / cov_se).max() < Z
    # the preconditioner matters: plain SGLD's discretized covariance at this ε is far off
    plain = np.linalg.inv(lam - eps * lam @ lam / 4) if np.all(eps * h < 4) else None
    assert plain is None or (np.abs(cov - plain) / cov_se).max() > 2 * Z


def test_auto_step_size_is_kappa_times_plain_sgld(stiff_gaussian):
    """Every direction above h_max/κ is slowed to exactly h_max/κ (max_rank covers them all), and the
    target has no gradient noise, so ε_auto grows by (nβ h_max + γ) / (nβ h_max/κ + γ)."""
    post, _, _ = stiff_gaussian
    kappa = 4.0
    plain = build_algorithm(get_spec("sgld"), post, SGLDSettings(step_size="auto", batch_size=4))
    curv = build_algorithm(get_spec("curvature_sgld"), post,
                           CurvatureSGLDSettings(step_size="auto", batch_size=4, kappa=kappa, max_rank=5))
    h_max = plain.notes.at_wstar.h_max
    ratio = curv.notes.at_wstar.step_size / plain.notes.at_wstar.step_size
    expected = (post.n_beta * h_max + post.gamma) / (post.n_beta * h_max / kappa + post.gamma)
    assert ratio == pytest.approx(expected, rel=0.02)
    assert curv.notes.at_wstar.h_max == pytest.approx(h_max / kappa, rel=0.02)
    # building P is counted in the work of the automatic step
    assert curv.notes.num_products > curv.notes.at_wstar.num_hvp


def test_apply_preconditioner_powers_compose():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(8, 3)))
    vectors, scales = jnp.asarray(q, jnp.float32), jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
    v = jnp.asarray(rng.normal(size=8), jnp.float32)
    half = apply_preconditioner(vectors, scales, apply_preconditioner(vectors, scales, v, 0.5), 0.5)
    np.testing.assert_allclose(half, apply_preconditioner(vectors, scales, v), rtol=1e-5, atol=1e-6)
    dense = np.eye(8) + q @ np.diag(np.asarray(scales) - 1) @ q.T
    np.testing.assert_allclose(apply_preconditioner(vectors, scales, v), dense @ np.asarray(v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field, value", [("kappa", 0.5), ("max_rank", 0), ("hessian_rows", -1),
                                          ("step_size", "fast")])
def test_bad_settings_say_what_is_allowed(field, value):
    with pytest.raises(ValueError, match=field if field != "step_size" else "step_size"):
        CurvatureSGLDSettings(**{field: value})


def test_build_auto_drops_the_noise_term_for_full_batch_steps(stiff_gaussian):
    """curvature_sgld resolves "auto" itself (SPEC.build_auto); build_algorithm hands it full_batch,
    and exact gradients have no minibatch noise to bound."""
    post, _, _ = stiff_gaussian
    settings = CurvatureSGLDSettings(step_size="auto", batch_size=4, kappa=4.0, max_rank=5)
    minibatch = build_algorithm(get_spec("curvature_sgld"), post, settings).notes.at_wstar
    full = build_algorithm(get_spec("curvature_sgld"), post, settings, full_batch=True).notes.at_wstar
    assert full.noise == 0.0 and full.num_cvp == 0 and full.h_max == minibatch.h_max
    assert full.step_size == pytest.approx(full.constant / full.curvature, rel=1e-12)


def test_continuing_an_unconverged_run_rebuilds_p_where_the_chains_are():
    """extend(retune=True) on "auto": each chain's P is rebuilt at its current position (from its
    previous P) and ε is the automatic rule's under those Ps there; the products of both rebuilds count."""
    post = dln_posterior()
    settings = CurvatureSGLDSettings(batch_size=200, kappa=4.0, max_rank=8)
    alg = build_algorithm(get_spec("curvature_sgld"), post, settings)
    auto = alg.notes
    live = start_chains("curvature_sgld", alg, post, jax.random.key(1), num_chains=2, num_burnin_steps=500,
                        num_draws=10, num_steps_bw_draws=50, progress=False)
    first_products, first_eps = auto.num_products, auto.step_size
    positions = np.asarray(live.states)
    assert np.abs(positions - np.asarray(post.w_star)).max() > 0.05  # the chains have moved
    old = live._fixed.consts.params
    more = live.extend(20, retune=True)
    params = more._fixed.consts.params
    expected = []
    for c in range(2):
        v, s, _ = curvature_preconditioner(post, settings, seed=c + 1, at=positions[c], start=np.asarray(old.vectors[c]))
        np.testing.assert_allclose(np.asarray(params.scales[c]), np.asarray(s), rtol=1e-4)
        # the same subspace (eigenvectors up to sign and rotation within it)
        overlap = np.asarray(params.vectors[c]).T @ np.asarray(v)
        np.testing.assert_allclose(np.linalg.svd(overlap, compute_uv=False), 1.0, atol=1e-3)
        expected.append(auto_step_size(post, lambda u, v=v, s=s: apply_preconditioner(v, s, u, 0.5),
                                       settings.batch_size, settings.auto_constant, at=positions[c]).step_size)
    assert auto.step_size == pytest.approx(min(expected), rel=1e-3) and auto.step_size != first_eps
    np.testing.assert_allclose(np.asarray(params.step_size), auto.step_size, rtol=1e-6)
    assert more.result.tuned["step_size"] == pytest.approx(auto.step_size, rel=1e-6)
    assert auto.num_products > first_products + 2 * settings.max_rank


def test_restart_keeps_each_chains_stiff_directions_and_its_scale_cap():
    """The over-dispersed restart of curvature_sgld: run.restart_scale = 10 is cut to the sampler's cap,
    its stiff basis is each chain's V (orthonormal columns), and the restart keeps the component of
    w − w* in V while scaling the rest."""
    from llc_bench.estimator import estimate_from_result
    from llc_bench.restart import capped_scale, restart_positions, run_restart
    from llc_bench.samplers.curvature_sgld import RESTART_SCALE_CAP

    post = dln_posterior()
    settings = CurvatureSGLDSettings(batch_size=200, kappa=4.0, max_rank=8)
    spec = get_spec("curvature_sgld")
    alg = build_algorithm(spec, post, settings)
    live = start_chains("curvature_sgld", alg, post, jax.random.key(1), num_chains=2, num_burnin_steps=300,
                        num_draws=20, num_steps_bw_draws=20, progress=False)
    stiff = spec.stiff_basis(live.params)
    assert stiff.shape[:2] == (2, post.dim)
    for c in range(2):
        np.testing.assert_allclose(np.asarray(stiff[c].T @ stiff[c]), np.eye(stiff.shape[2]), atol=1e-4)
    assert capped_scale(spec, 10.0) == RESTART_SCALE_CAP and capped_scale(get_spec("sgld"), 10.0) == 10.0
    positions = np.asarray(live.states)
    starts = np.asarray(restart_positions(post.w_star, positions, 3.0, stiff))
    offset, moved = positions - np.asarray(post.w_star), starts - np.asarray(post.w_star)
    for c in range(2):
        v = np.asarray(stiff[c])
        np.testing.assert_allclose(v.T @ moved[c], v.T @ offset[c], atol=1e-4)  # kept
        flat = offset[c] - v @ (v.T @ offset[c])
        np.testing.assert_allclose(moved[c] - v @ (v.T @ moved[c]), 3.0 * flat, atol=1e-4)  # scaled
    estimate = estimate_from_result(live.result, "minibatch")
    record, _ = run_restart("curvature_sgld", alg, post, positions, estimate, seed=0,
                            scale=10.0, num_chains=2, num_burnin_steps=300, num_draws=20,
                            num_steps_bw_draws=20, num_projections=0, source="minibatch", params=live.params)
    assert record["scales_tried"][0] == RESTART_SCALE_CAP and record["chains_used"] == 2 and not record["walls_bind"]
    assert np.isfinite(record["llc_restart"]) and record["grad_evals"] > 0
