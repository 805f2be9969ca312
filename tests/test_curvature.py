"""Automatic SG step size: Lanczos top eigenvalues against dense ones, the gradient-noise term against its closed form, ε end to end."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_utils import dln_posterior

from llc_bench.curvature import (
    auto_step_size,
    build_algorithm,
    gradient_cvp,
    loss_hvp,
    resolve_step_size,
    top_eigenvalue,
)
from llc_bench.posterior import Posterior
from llc_bench.samplers import get_spec
from llc_bench.samplers.base import AUTO_STEP_CONSTANT
from llc_bench.samplers.rmsprop_sgld import RMSPropSGLDSettings, preconditioner_at_wstar
from llc_bench.samplers.sgld import SGLDSettings


def regression(n: int = 500, d: int = 40, noise: float = 0.5, seed: int = 0):
    """L_n = mean ½ (y − x·w)² at its least-squares w*: ∇²L_n = xᵀx/n, per-sample gradient −x r."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(0.3, 2.0, d)  # a spread spectrum, as in real Hessians
    y = x @ rng.normal(size=d) + noise * rng.normal(size=n)
    w_star = np.linalg.lstsq(x, y, rcond=None)[0]

    def per_sample_loss(w, xb, yb):
        return 0.5 * (yb[:, 0] - xb @ w) ** 2

    post = Posterior.build(per_sample_loss, jnp.asarray(x, jnp.float32), jnp.asarray(y[:, None], jnp.float32),
                           jnp.asarray(w_star, jnp.float32), gamma=3.0)
    r = y - x @ w_star
    grads = -x * r[:, None]
    return post, x.T @ x / n, np.cov(grads.T, bias=True)


@pytest.fixture(scope="module")
def problem():
    return regression()


def test_hvp_and_cvp_are_the_dense_matrices(problem):
    post, hess, cov = problem
    v = np.random.default_rng(1).normal(size=post.dim)
    w = post.w_star
    np.testing.assert_allclose(np.asarray(loss_hvp(post)(w, jnp.asarray(v, jnp.float32))), hess @ v, rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gradient_cvp(post)(w, jnp.asarray(v, jnp.float32))), cov @ v,
                               rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("dim", [1, 5, 300])
def test_top_eigenvalue_lanczos_and_dense(dim):
    rng = np.random.default_rng(dim)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eig = np.sort(rng.uniform(0.1, 1.0, size=dim))
    eig[-1] = 3.0 if dim > 1 else eig[-1]
    if dim > 2:
        eig[-2] = 2.9  # a small gap: Lanczos still resolves it, power iteration would take ~100s of steps
    a = (q * eig) @ q.T
    value, count = top_eigenvalue(lambda v: a @ v, dim, np.float64)
    assert value == pytest.approx(eig[-1], rel=1e-3)
    assert count == dim if dim <= 32 else count <= 100


def test_auto_step_size_formula(problem):
    """ε = c / (nβ h_max + γ + nβ² s²_max/m), every piece against numpy; m = None drops the noise term."""
    post, hess, cov = problem
    h_max, s2_max = np.linalg.eigvalsh(hess)[-1], np.linalg.eigvalsh(cov)[-1]
    auto = auto_step_size(post, batch_size=50)
    assert auto.h_max == pytest.approx(h_max, rel=2e-3)
    assert auto.curvature == pytest.approx(post.n_beta * h_max + post.gamma, rel=2e-3)
    assert auto.noise == pytest.approx(post.n_beta**2 * s2_max / 50, rel=5e-3)
    assert auto.step_size == pytest.approx(AUTO_STEP_CONSTANT / (auto.curvature + auto.noise), rel=1e-12)
    assert 5 <= auto.num_hvp <= 100 and 5 <= auto.num_cvp <= 100  # Lanczos, d = 40
    quiet = auto_step_size(post, constant=0.2)
    assert quiet.noise == 0.0 and quiet.num_cvp == 0
    assert quiet.step_size == pytest.approx(0.2 / (post.n_beta * h_max + post.gamma), rel=2e-3)


def test_rmsprop_auto_uses_the_preconditioned_problem(problem):
    """h_max of G^{1/2} H G^{1/2}, localization bounded by γ max G, G = 1/(√E[g²] + a) from batches at w*."""
    post, hess, cov = problem
    settings = RMSPropSGLDSettings(step_size="auto", batch_size=50, eps=0.1)
    g = np.asarray(preconditioner_at_wstar(post, settings), np.float64)
    assert np.all((g > 0) & (g <= 10.0 + 1e-6))
    # E[(∇L_m)²] at w* = diag(C)/m (the full gradient is 0): G within the Monte Carlo error of 32 batches
    np.testing.assert_allclose(g, 1 / (np.sqrt(np.diag(cov) / 50) + 0.1), rtol=0.15)
    resolved, auto = resolve_step_size(get_spec("rmsprop_sgld"), post, settings)
    s = np.sqrt(g)
    h_pre = np.linalg.eigvalsh(s[:, None] * hess * s[None, :])[-1]
    c_pre = np.linalg.eigvalsh(s[:, None] * cov * s[None, :])[-1]
    assert auto.h_max == pytest.approx(h_pre, rel=2e-3)
    expected = 0.1 / (post.n_beta * h_pre + post.gamma * g.max() + post.n_beta**2 * c_pre / 50)
    assert resolved.step_size == pytest.approx(expected, rel=5e-3)
    assert resolved.adapt == settings.adapt and resolved.batch_size == 50


def test_resolve_leaves_numeric_step_sizes_alone(problem):
    post, _, _ = problem
    settings = SGLDSettings(step_size=1e-5)
    assert resolve_step_size(get_spec("sgld"), post, settings) == (settings, None)


def test_settings_refuse_bad_step_sizes():
    for bad in ("fast", -1e-4, 0.0, float("nan"), True):
        with pytest.raises(ValueError, match='step_size must be a finite number > 0 or "auto"'):
            SGLDSettings(step_size=bad)
    with pytest.raises(ValueError, match="auto_constant"):
        RMSPropSGLDSettings(step_size="auto", auto_constant=5.0)
    assert SGLDSettings(step_size="auto").step_size == "auto"


def test_build_algorithm_resolves_auto_and_build_refuses_it(problem):
    """build_algorithm gives the automatic ε, carried in params, and the same step as a build with
    that number; the sampler's own build, given "auto", says where it is resolved."""
    post, _, _ = problem
    settings = SGLDSettings(step_size="auto", batch_size=50)
    eps = resolve_step_size(get_spec("sgld"), post, settings)[0].step_size
    for name in ("sgld", "rmsprop_sgld", "sghmc", "sgnht"):
        spec = get_spec(name)
        with pytest.raises(ValueError, match=f'^{name}: step_size = "auto" is resolved by llc_bench.curvature.build_algorithm'):
            spec.build(post, spec.settings(step_size="auto", batch_size=50))
    alg = build_algorithm(get_spec("sgld"), post, settings)
    assert alg.retune is not None and alg.notes.step_size == eps
    w0 = post.w_star + 0.1
    state, params, _ = alg.warmup(jax.random.key(1), w0)
    assert float(params.step_size) == pytest.approx(eps, rel=1e-6)
    key = jax.random.key(0)
    batch = (post.x[:50], post.y[:50])
    new, _ = alg.step(key, state, params, batch)
    ref_alg = get_spec("sgld").build(post, SGLDSettings(step_size=eps, batch_size=50))
    ref_state, ref_params, _ = ref_alg.warmup(jax.random.key(1), w0)
    assert ref_alg.retune is None
    ref, _ = ref_alg.step(key, ref_state, ref_params, batch)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(ref))


def test_auto_remeasures_where_the_chains_are():
    """After burn-in the draws use min(ε at w*, ε at each live chain): here smaller, as measured."""
    from llc_bench.runner import run_chains

    post = dln_posterior()
    alg = build_algorithm(get_spec("sgld"), post, SGLDSettings(step_size="auto", batch_size=200))
    auto = alg.notes
    eps0 = auto.step_size
    result = run_chains("sgld", alg, post, jax.random.key(0), num_chains=3, num_burnin_steps=3000,
                        num_draws=10, num_steps_bw_draws=10, progress=False)
    assert len(auto.at_burnin) == 3 and auto.step_size < eps0
    assert auto.step_size == pytest.approx(min(a.step_size for a in auto.at_burnin), rel=1e-12)
    assert result.tuned["step_size"] == pytest.approx(auto.step_size, rel=1e-6)  # the draws' ε
    summary = auto.summary()
    assert summary["curvature_burnin"] > summary["curvature"] + summary["gradient_noise"]
    assert summary["step_size_wstar"] == eps0 and summary["step_size"] == auto.step_size
    # the ε at a chain's position is the same measurement as at w*, moved there
    c0 = auto.at_burnin[0]
    assert c0.step_size == pytest.approx(c0.constant / (c0.curvature + c0.noise), rel=1e-12)


@pytest.mark.parametrize("dim", [3, 200])
def test_zero_and_rank_one_operators(dim):
    """The gradient covariance of a noise-free target at w* is 0; Lanczos must not choke on it."""
    assert top_eigenvalue(lambda v: 0.0 * v, dim, np.float64)[0] == 0.0
    u = np.arange(1.0, dim + 1) / np.linalg.norm(np.arange(1.0, dim + 1))
    value, _ = top_eigenvalue(lambda v: 2.5 * u * (u @ v), dim, np.float64)
    assert value == pytest.approx(2.5, rel=1e-3)


def test_noise_free_target_has_no_noise_term():
    """Interpolated data (y = x w_true exactly): every per-sample gradient is 0 at w*, so ε = c/(nβ h_max + γ)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 50))
    y = x @ rng.normal(size=50)

    def per_sample_loss(w, xb, yb):
        return 0.5 * (yb[:, 0] - xb @ w) ** 2

    w_star = np.linalg.lstsq(x, y, rcond=None)[0]
    post = Posterior.build(per_sample_loss, jnp.asarray(x), jnp.asarray(y[:, None]), jnp.asarray(w_star), gamma=1.0)
    for name in ("sgld", "rmsprop_sgld"):
        spec = get_spec(name)
        _, auto = resolve_step_size(spec, post, spec.settings(step_size="auto", batch_size=20))
        assert auto.noise < 1e-6 * auto.curvature and auto.h_max > 0


def test_build_algorithm_asks_the_spec_for_its_diagonal_preconditioner(problem):
    """A spec declaring a diagonal G (here a constant G = g·I, so the answer is known): ε at w* is
    measured under it (h_max scales by g), its cost joins the work, and retune reads every live
    chain's G from the states through of_chains."""
    from llc_bench.curvature import auto_step_grad_evals
    from llc_bench.samplers.base import DiagonalPreconditioner

    post, hess, _ = problem
    g, cost, seen = 0.25, 1.5, []

    def at_wstar(posterior, settings, full_batch):
        return jnp.full(posterior.dim, g, jnp.float32), cost

    def of_chains(states, settings):
        seen.append(np.asarray(states).shape)
        return np.full(np.asarray(states).shape, g)

    plain_spec = get_spec("sgld")
    spec = plain_spec._replace(diagonal_preconditioner=DiagonalPreconditioner(at_wstar, of_chains))
    settings = SGLDSettings(step_size="auto", batch_size=50)
    plain = build_algorithm(plain_spec, post, settings, full_batch=True).notes
    alg = build_algorithm(spec, post, settings, full_batch=True)
    auto = alg.notes
    h_max = np.linalg.eigvalsh(hess)[-1]
    assert plain.at_wstar.h_max == pytest.approx(h_max, rel=2e-3)
    assert auto.at_wstar.h_max == pytest.approx(g * h_max, rel=2e-3) and auto.at_wstar.noise == 0.0
    assert auto_step_grad_evals(auto) == pytest.approx(auto_step_grad_evals(plain) + cost)
    states = jnp.stack([post.w_star, post.w_star + 0.01, post.w_star])
    params = alg.retune(states, jnp.zeros(3), jnp.array([True, True, False]))
    assert seen == [(3, post.dim)] and len(auto.at_burnin) == 2
    assert auto.at_burnin[0].h_max == pytest.approx(g * h_max, rel=2e-3)
    np.testing.assert_array_equal(np.asarray(params), np.float32(auto.step_size))


@pytest.mark.parametrize("name", ["sgld", "rmsprop_sgld", "curvature_sgld"])
def test_auto_step_is_invariant_to_the_units_of_the_loss(problem, name):
    """The posterior exp(−nβ L − γ/2 ‖w − w*‖²) is unchanged by L → aL, nβ → nβ/a, so the step the
    rule chooses must be too: the curvature term (nβ/a)(a h) and the noise term (nβ/a)²(a² s²)/m are
    the same numbers. For rmsprop_sgld G = 1/(√v + eps) scales by 1/a (eps negligible here), so ε
    scales by a and the step it takes, ε·G, is what stays. Scaling the whole potential instead
    (L → aL and γ → aγ at fixed nβ, full batch) must scale ε by exactly 1/a; rmsprop_sgld is left
    out of that half, since its full-batch G at an exact minimum is 1/eps (the gradient is 0)."""
    post, _, _ = problem
    spec = get_spec(name)
    extra = {"eps": 1e-9} if name == "rmsprop_sgld" else {}
    settings = spec.settings(step_size="auto", batch_size=50, **extra)

    def scaled(a, n_beta, gamma):
        return dataclasses.replace(post, per_sample_loss=lambda w, x, y: a * post.per_sample_loss(w, x, y),
                                   n_beta=n_beta, gamma=gamma, loss_at_wstar=a * post.loss_at_wstar)

    def step(p, full_batch=False):
        resolved, auto = resolve_step_size(spec, p, settings, full_batch)
        assert auto.h_max > 0
        if name == "rmsprop_sgld":
            g = np.asarray(preconditioner_at_wstar(p, settings), np.float64)
            return resolved.step_size * g, auto
        return resolved.step_size, auto

    a = 7.0
    base, auto = step(post)
    same, auto_same = step(scaled(a, post.n_beta / a, post.gamma))
    np.testing.assert_allclose(same, base, rtol=2e-3)
    if name == "rmsprop_sgld":
        # G^½ (aH) G^½ / a: the same h_max; nβ/a in front of it and of the noise term: ε scales by a
        assert auto_same.h_max == pytest.approx(auto.h_max, rel=2e-3)
        total = (auto_same.curvature + auto_same.noise) / (auto.curvature + auto.noise)
        assert total == pytest.approx(1 / a, rel=2e-3)
        return
    assert auto_same.curvature == pytest.approx(auto.curvature, rel=2e-3)
    assert auto_same.noise == pytest.approx(auto.noise, rel=2e-3) and auto.noise > 0.1 * auto.curvature
    full, _ = step(post, full_batch=True)
    hotter, _ = step(scaled(a, post.n_beta, a * post.gamma), full_batch=True)
    assert hotter == pytest.approx(full / a, rel=2e-3)

