"""The step size's first-order bias of λ̂: against the exact discretized stationary law of a Gaussian,
with and without a preconditioner and minibatch noise, and the samplers' declared preconditioners."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from test_samplers_sgmcmc import regression_llc_posterior

from llc_bench.curvature import auto_step_size
from llc_bench.discretization import StepBias, chain_roots, step_bias, step_bias_summary, with_draws
from llc_bench.posterior import Posterior
from llc_bench.samplers import get_spec
from llc_bench.samplers.curvature_sgld import (
    CurvatureSGLDSettings,
    apply_preconditioner,
    curvature_preconditioner,
)
from llc_bench.samplers.rmsprop_sgld import RMSPropSGLDSettings, chain_preconditioners
from llc_bench.samplers.sgld import SGLDSettings

Z = 3.5


@pytest.fixture(scope="module")
def regression():
    """(posterior, H = xᵀx/n, C = the per-sample gradient covariance at w*) of a d = 8 linear regression."""
    post, hess = regression_llc_posterior()
    x, y = np.asarray(post.x, np.float64), np.asarray(post.y, np.float64)[:, 0]
    grads = -x * (y - x @ np.asarray(post.w_star, np.float64))[:, None]
    return post, hess, np.cov(grads.T, bias=True)


def exact_lambda(post, hess, cov, eps, batch, root=None):
    """λ̂'s expectation under the chain's exact stationary law: in u = P^{-1/2} w the update is linear,
    u ← (I − εB/2) u + √ε ξ − (ε/2) ζ with B = P^{1/2}(nβH + γ)P^{1/2}, Cov ζ = nβ²/m P^{1/2} C P^{1/2},
    so Σ_u solves a discrete Lyapunov equation; λ̂ = nβ/2 tr(P^{1/2} H P^{1/2} Σ_u)."""
    d = hess.shape[0]
    r = np.eye(d) if root is None else root
    b = r @ (post.n_beta * hess + post.gamma * np.eye(d)) @ r
    noise = np.zeros((d, d)) if batch is None else post.n_beta**2 / batch * r @ cov @ r
    a = np.eye(d) - eps / 2 * b
    sigma = scipy.linalg.solve_discrete_lyapunov(a, eps * np.eye(d) + eps**2 / 4 * noise)
    return post.n_beta / 2 * np.trace(r @ hess @ r @ sigma)


@pytest.mark.parametrize("batch", [None, 50])
@pytest.mark.parametrize("preconditioned", [False, True])
def test_first_order_bias_matches_the_exact_discretized_lambda(regression, batch, preconditioned):
    """At c = 0.1 the first-order bias is within a few percent of the exact one (the rest is O(ε²)),
    with minibatch noise carrying most of it at m = 50 and a preconditioner that slows the stiffest
    directions tenfold."""
    post, hess, cov = regression
    roots, root = None, None
    if preconditioned:
        vectors, scales, _ = curvature_preconditioner(post, CurvatureSGLDSettings(kappa=10.0, max_rank=8))
        root_fn = jax.tree_util.Partial(apply_preconditioner, vectors, scales, power=0.5)
        root = np.asarray(jax.vmap(root_fn)(jnp.eye(8)), np.float64)
        assert np.linalg.eigvalsh(root @ root).min() == pytest.approx(0.1, rel=1e-3)  # κ = 10 did slow some
        roots = [root_fn] * 4
    eps = auto_step_size(post, roots[0] if roots else None, batch, 0.1).step_size
    truth = post.n_beta / 2 * np.trace(hess @ np.linalg.inv(post.n_beta * hess + post.gamma * np.eye(8)))
    exact = exact_lambda(post, hess, cov, eps, batch, root) - truth
    positions = np.broadcast_to(np.asarray(post.w_star), (4, 8))
    bias = step_bias(post, positions, eps, roots or [None] * 4, batch, jax.random.key(0), num_probes=64)
    assert abs(bias.value - exact) < Z * bias.se + 0.04 * exact, (bias, exact)
    assert (bias.noise > bias.curvature) == (batch is not None)  # m = 50: the noise dominates
    assert 0.015 < exact / truth < 0.05  # a real bias of 2–4%


def test_diagonal_hessian_trace_is_exact(regression):
    """Rademacher probes give zᵀHz = tr H exactly when H is diagonal: no scatter, and (ε/8) nβ tr H."""
    from test_samplers_sgmcmc import quadratic_posterior

    post = quadratic_posterior(dim=5, h=2.0)
    bias = step_bias(post, np.zeros((3, 5), np.float32), 1e-4, [None] * 3, None, jax.random.key(1), num_probes=2)
    assert bias.value == pytest.approx(1e-4 / 8 * post.n_beta * 2.0 * 5, rel=1e-5)
    assert bias.se == pytest.approx(0.0, abs=1e-9) and bias.noise == 0.0 and bias.num_products == 6


def test_samplers_declare_their_constant_preconditioner(regression):
    post, _, _ = regression
    states = jnp.zeros((3, 8))
    v = jnp.arange(8.0)
    np.testing.assert_array_equal(chain_roots(get_spec("sgld"), SGLDSettings(), None, states, [0, 2])[1](v), v)
    assert get_spec("sghmc").constant_root(None) is None  # another dynamics: no estimate
    # RMSProp-SGLD: G frozen after burn-in has one; adapting while drawing has none
    spec = get_spec("rmsprop_sgld")
    alg = spec.build(post, RMSPropSGLDSettings(step_size=1e-4, batch_size=8))
    state, _, _ = jax.vmap(alg.warmup)(jax.random.split(jax.random.key(0), 3), states)
    state = state._replace(preconditioner=state.preconditioner._replace(  # as after some burn-in
        square_avg=jnp.abs(jax.random.normal(jax.random.key(1), (3, 8))), count=jnp.full((3,), 7, jnp.int32)))
    assert chain_roots(spec, RMSPropSGLDSettings(adapt="always"), None, state, [0, 1]) is None
    assert spec.constant_root(RMSPropSGLDSettings(adapt="always")) is None  # known from the settings alone
    roots = chain_roots(spec, RMSPropSGLDSettings(), None, state, [0, 1])
    np.testing.assert_allclose(roots[1](roots[1](v)), chain_preconditioners(state, RMSPropSGLDSettings())[1] * v,
                               rtol=1e-5)
    # curvature_sgld: each chain's own P from its params
    settings = CurvatureSGLDSettings(kappa=10.0, max_rank=8)
    vectors, scales, _ = curvature_preconditioner(post, settings)
    params = get_spec("curvature_sgld").build(post, dataclasses.replace(settings, step_size=1e-4)).warmup(
        jax.random.key(0), jnp.zeros(8))[1]
    params = jax.tree.map(lambda a: jnp.stack([a, a]), params)
    root = chain_roots(get_spec("curvature_sgld"), settings, params, states[:2], [0, 1])[1]
    dense = np.eye(8) + np.asarray(vectors) @ np.diag(np.asarray(scales) - 1) @ np.asarray(vectors).T
    np.testing.assert_allclose(root(root(v)), dense @ np.asarray(v), rtol=1e-4, atol=1e-4)


def test_covariance_term_from_the_draws():
    """with_draws: (ε/8)(mean probe − Cov(φ, probe)) per chain, plus the Gaussian noise part, and the
    pooled covariance it subtracts; a probe independent of φ leaves only the mean."""
    rng = np.random.default_rng(0)
    phi = rng.normal(size=(4, 500))
    probes = 10.0 + 3.0 * phi + rng.normal(size=(4, 500))  # Cov(φ, probe) = 3
    gaussian = StepBias(value=1.0, se=0.1, curvature=10.0, noise=2.0, num_products=8)
    out = with_draws(gaussian, 0.8, phi, probes)
    centred = (phi - phi.mean()) * (probes - probes.mean())
    assert out.covariance == pytest.approx(0.1 * centred.mean(), rel=1e-12)
    assert out.covariance == pytest.approx(0.3, rel=0.1)
    assert out.value_draws == pytest.approx(0.1 * (probes.mean() - centred.mean()) + 0.1 * 2.0, rel=1e-12)
    assert out.num_probes_draws == 2000 and out.value == 1.0  # the Gaussian estimate is kept beside it
    independent = with_draws(gaussian, 0.8, phi, 10.0 + rng.normal(size=(4, 500)))
    assert independent.value_draws == pytest.approx(0.1 * 10.0 + 0.2, abs=0.02)
    assert with_draws(gaussian, 0.8, phi[:, :1] * np.nan, probes[:, :1]) == gaussian  # nothing to use


def test_summary_is_none_without_a_declared_preconditioner(regression):
    post, _, _ = regression
    positions = np.zeros((2, 8), np.float32)
    assert step_bias_summary(get_spec("sghmc"), post, None, None, positions, positions, [True, True], 1e-4,
                             jax.random.key(0)) is None
    assert step_bias_summary(get_spec("sgld"), post, SGLDSettings(batch_size=16), None, positions, positions,
                             [False, False], 1e-4, jax.random.key(0)) is None  # no chain alive
    live = step_bias_summary(get_spec("sgld"), post, SGLDSettings(batch_size=16), None, positions, positions,
                             [True, False], 1e-4, jax.random.key(0))
    assert live.num_products == 2 * 4 and live.noise > 0  # one chain, NUM_PROBES probes, two traces
    assert live.value_draws is None  # no probes at the draws


def quartic_posterior(n: int = 1000, gamma: float = 1.0) -> Posterior:
    """L_n(w) = w⁴ for every sample (one parameter): the flattest direction a DLN has, in miniature."""

    def per_sample_loss(w, x, y):
        return jnp.full((x.shape[0],), jnp.sum(w**4))

    return Posterior.build(per_sample_loss, jnp.zeros((n, 1)), jnp.zeros((n, 1)), jnp.zeros(1), gamma=gamma)


@pytest.mark.slow
def test_covariance_term_corrects_a_quartic():
    """SGLD at ε = 2e-3 on U = nβ w⁴ + γ/2 w² (full batches, no gradient noise) reads λ̂ several SE above
    the exact E[nβ w⁴] (quadrature); the Gaussian estimate overcorrects it several SE below, and with the
    covariance term from the draws (run.step_bias_draws) llc_debiased is back within 3.5 SE."""
    from scipy.integrate import quad
    from test_llc_regular import regular_config

    from llc_bench.config import replace
    from llc_bench.experiment import run_sampler

    post = quartic_posterior()
    nb, gamma = float(post.n_beta), float(post.gamma)
    weight = quad(lambda w: np.exp(-nb * w**4 - gamma / 2 * w**2), -3, 3)[0]
    exact = quad(lambda w: nb * w**4 * np.exp(-nb * w**4 - gamma / 2 * w**2), -3, 3)[0] / weight
    cfg = replace(regular_config(), **{"sampler.sgld.num_draws": 20000, "sampler.sgld.num_burnin_steps": 1000,
                                       "run.num_chains": 64, "run.step_bias_draws": True, "run.restart_scale": 0.0})
    run = run_sampler(cfg, "sgld", post, settings=SGLDSettings(step_size=2e-3, batch_size=post.n))
    s, se = run.summary, run.estimate.se
    bias = s["step_bias"]
    assert run.estimate.mean - exact > 3.5 * se, (run.estimate.mean, exact, se)
    assert exact - (run.estimate.mean - bias["value"]) > 3.5 * se, (bias, exact, se)
    assert s["llc_debiased"] == pytest.approx(run.estimate.mean - bias["value_draws"])
    assert abs(s["llc_debiased"] - exact) < 3.5 * math.hypot(se, bias["se_draws"]), (s["llc_debiased"], exact, bias)
    assert bias["num_probes_draws"] == 64 * 20000 and bias["covariance"] > 0
