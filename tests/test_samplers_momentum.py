"""SGHMC and SGNHT: the documented update, SGLD as SGHMC's a = 1 limit, the exact discretized stationary covariance, the thermostat's fixed point, and their settings at every entry point."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_utils import gaussian_posterior, run_algorithm

from llc_bench import cli
from llc_bench.config import ConfigError, load_config
from llc_bench.samplers import get_spec
from llc_bench.samplers.sghmc import SGHMCSettings
from llc_bench.samplers.sgld import SGLDSettings
from llc_bench.samplers.sgnht import SGNHTSettings

Z = 3.5


@pytest.fixture(scope="module")
def gaussian():
    return gaussian_posterior()


def test_sghmc_with_full_friction_is_sgld(gaussian):
    """a = 1, β̂ = 0: p is redrawn each step and w ← w − ε/2 ∇U + √ε ξ, SGLD's update with the same key."""
    post, _, _ = gaussian
    w0 = post.w_star + jnp.asarray([0.3, -0.2, 0.1])
    batch = (post.x[:4], post.y[:4])
    sgld = get_spec("sgld").build(post, SGLDSettings(step_size=1e-2, batch_size=4))
    sghmc = get_spec("sghmc").build(post, SGHMCSettings(step_size=1e-2, batch_size=4, alpha=1.0))
    key = jax.random.key(3)
    w_sgld, info_sgld = sgld.step(key, *sgld.warmup(key, w0)[:2], batch)
    state, params, _ = sghmc.warmup(key, w0)
    new, info = sghmc.step(key, state, params, batch)
    np.testing.assert_allclose(np.asarray(new.position), np.asarray(w_sgld), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(new.position - w0)).min() > 1e-3  # the step moved every coordinate
    assert float(info.loss) == pytest.approx(float(info_sgld.loss))
    assert float(info.grad_evals) == pytest.approx(4 / post.n)


def discretized_cov(cov: np.ndarray, eps: float, a: float) -> np.ndarray:
    """Stationary covariance of the symplectic SGHMC update on a Gaussian: (Λ − εΛ²/(4(2 − a)))⁻¹."""
    prec = np.linalg.inv(cov)
    return np.linalg.inv(prec - eps * prec @ prec / (4 * (2 - a)))


def chain_cov(positions: np.ndarray, burn: int):
    x = positions[:, burn:]
    r = x - x.mean(axis=(0, 1))
    per_chain = np.einsum("cti,ctj->cij", r, r) / r.shape[1]
    return per_chain.mean(0), per_chain.std(0, ddof=1) / math.sqrt(x.shape[0])


@pytest.mark.parametrize("name,settings", [
    ("sghmc", SGHMCSettings(step_size=1.2e-2, batch_size=4, alpha=0.2)),
    ("sgnht", SGNHTSettings(step_size=1.2e-2, batch_size=4, alpha=0.2)),
])
def test_stationary_covariance_is_the_exact_discretized_one(gaussian, name, settings):
    """At ε λ_max ≈ 0.56 the step bias is large (+8% on the stiffest direction at a = 0.2, +16% for
    SGLD's (Λ − εΛ²/4)⁻¹): the chains must land on the a-dependent formula of sghmc.build. For
    sgnht this also checks that the thermostat settles at ξ = A (any other friction changes the law)."""
    post, _, cov = gaussian
    positions, _ = run_algorithm(get_spec(name).build(post, settings), post, jax.random.key(5), 128, 4000)
    est, se = chain_cov(positions, 1500)
    exact = discretized_cov(cov, settings.step_size, settings.alpha)
    assert (np.abs(est - exact) / se).max() < Z, (est, exact, se)
    sgld_law = discretized_cov(cov, settings.step_size, 1.0)
    assert (np.abs(est - sgld_law) / se).max() > 2 * Z  # the two laws are told apart


def test_sgnht_thermostat_settles_at_the_injected_noise(gaussian):
    """No gradient noise: the friction's stationary mean is A (p'ᵀp'/d as the kinetic energy would
    settle it near A(1 + A/2) = 0.22 here)."""
    post, _, _ = gaussian
    algorithm = get_spec("sgnht").build(post, SGNHTSettings(step_size=4e-3, batch_size=4, alpha=0.2))
    init_keys = jax.random.split(jax.random.key(8), 64)
    states, params, _ = jax.vmap(algorithm.warmup)(init_keys, jnp.broadcast_to(post.w_star, (64, post.dim)))

    @jax.jit
    def run(states, key):
        def one(carry, k):
            keys = jax.random.split(k, 64)
            new, _ = jax.vmap(algorithm.step)(keys, carry, params, (jnp.zeros((64, 4, 1)), jnp.zeros((64, 4, 1))))
            return new, new.friction
        return jax.lax.scan(one, states, jax.random.split(key, 6000))

    _, xi = run(states, jax.random.key(9))
    per_chain = np.asarray(xi)[2000:].mean(axis=0)
    se = per_chain.std(ddof=1) / math.sqrt(per_chain.size)
    assert abs(per_chain.mean() - 0.2) < Z * se + 1e-3, (per_chain.mean(), se)
    assert abs(per_chain.mean() - 0.22) > 5 * se


@pytest.mark.parametrize("argv, message", [
    (["--set", "run.samplers=[sghmc]", "--set", "sampler.sghmc.noise_estimate=0.2"],
     "sampler.sghmc.noise_estimate: must be < alpha = 0.1"),
    (["--set", "run.samplers=[sgnht]", "--set", "sampler.sgnht.alpha=0"], "sampler.sgnht.alpha: must be in (0, 1]"),
    (["--set", "run.samplers=[sghmc]", "--set", "sampler.sghmc.step_size=-1"],
     'sampler.sghmc.step_size: must be > 0 or "auto"'),
])
def test_bad_settings_one_line_exit_2(argv, message, capsys):
    assert cli.main(["--preset", "quick", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_settings_from_config_and_cli_names():
    cfg = load_config("quick", None, ["run.samplers=[sghmc, sgnht]", "sampler.sghmc.step_size=auto",
                                      "sampler.sghmc.noise_estimate=0.0", "sampler.sgnht.alpha=0.05"])
    assert cfg.sampler["sghmc"] == SGHMCSettings(step_size="auto", noise_estimate=0.0)
    assert cfg.sampler["sgnht"].alpha == 0.05
    with pytest.raises(ConfigError, match="sampler.sghmc.alpha: must be in"):
        load_config("quick", None, ["run.samplers=[sghmc]", "sampler.sghmc.alpha=1.5"])


@pytest.mark.parametrize("name", ["sghmc", "sgnht"])
def test_sample_and_bench_accept_them(name):
    """sample() runs them as minibatch ε samplers (lr is their ε; lr=None is refused); a bench recipe
    lists them and treats them as SG samplers (the n-row posterior, SG targets)."""
    from llc_bench import bench_report, bench_suite
    from llc_bench.sampling import compute_llc, sample

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2)).astype(np.float32)
    y = (x @ np.array([[0.5], [-1.0]], np.float32)).astype(np.float32)

    def loss_fn(apply_fn, params, xb, yb):
        return 0.5 * jnp.sum((apply_fn(params, xb) - yb) ** 2, axis=-1)

    def apply_fn(params, xb):
        return xb @ params["w"]

    params = {"w": jnp.asarray([[0.5], [-1.0]], jnp.float32)}
    common = dict(n_beta=20.0, localization=1.0, num_chains=2, num_draws=20, batch_size=16,
                  sampling_method=name, progress=False)
    tree = sample(apply_fn, params, loss_fn, (x, y), lr=1e-3, **common)
    assert tree.attrs["run"]["step_size"] == pytest.approx(1e-3)
    assert np.isfinite(compute_llc(tree).llc_mean)
    with pytest.raises(ValueError, match="needs a positive lr"):
        sample(apply_fn, params, loss_fn, (x, y), lr=None, **common)
    raw = bench_suite.read_toml(bench_suite.DEFAULT_SPEC)
    raw["bench"]["samplers"] = [name]
    raw.pop("profile", None)
    recipe = bench_suite.parse_recipe(raw, "tiny.toml")
    assert recipe.samplers == (name,) and not bench_suite.full_batch(name)
    assert bench_report.targets_for(name) == bench_report.TARGETS["sg"]
