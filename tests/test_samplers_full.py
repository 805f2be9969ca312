"""Full-batch samplers (HMC, NUTS, MCLMC, adjusted MCLMC) against an exact correlated Gaussian posterior."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_utils import gaussian_posterior

from llc_bench.samplers import get_spec
from llc_bench.samplers.adjusted_mclmc import AdjustedMCLMCSettings
from llc_bench.samplers.hmc import HMCSettings
from llc_bench.samplers.mclmc import MCLMCSettings, mclmc_tuning_steps, mclmc_warmup_grad_evals
from llc_bench.samplers.nuts import NUTSSettings

# XLA's backend optimizations triple compile time here and buy nothing at these sizes
FAST_COMPILE = {"xla_backend_optimization_level": 0}
NAMES = ("hmc", "nuts", "mclmc", "adjusted_mclmc")
DIM, CHAINS, STEPS = 4, 64, 500
SEED = 20240601

# Shortened warm-ups keep the default suite fast; XLA compile time, not sampling, dominates
# (the MCLMC tuner alone builds three scans of the kernel). The slow test runs the defaults.
# frac_tune3=0 drops the MCLMC tuner's autocorrelation phase (one scan + an ESS fewer to compile).
FAST_SETTINGS = {
    "hmc": HMCSettings(num_warmup=300),
    "nuts": NUTSSettings(num_warmup=300),
    "mclmc": MCLMCSettings(num_tuning_steps=1500, frac_tune3=0.0),
    "adjusted_mclmc": AdjustedMCLMCSettings(num_tuning_steps=1000),
}


def make_driver(algorithm, posterior, num_chains: int, num_steps: int):
    """One jitted function key -> (warmup grad evals, params, positions (T, C, d), infos (T, C)).

    Like sampler_utils.run_algorithm (same key use), but compiled once so it can be called again
    for the determinism check, and it keeps what warm-up returned.
    """

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def drive(key):
        init_key, run_key = jax.random.split(key)
        positions0 = jnp.broadcast_to(posterior.w_star, (num_chains, posterior.dim))
        states, params, warm = jax.vmap(algorithm.warmup)(jax.random.split(init_key, num_chains), positions0)
        step = jax.vmap(algorithm.step, in_axes=(0, 0, 0, None))

        def one_step(carry, step_key):
            new, info = step(jax.random.split(step_key, num_chains), carry, params, None)
            return new, (jax.vmap(algorithm.position)(new), info)

        _, (positions, infos) = jax.lax.scan(one_step, states, jax.random.split(run_key, num_steps))
        return warm, params, positions, infos

    return drive


@dataclasses.dataclass
class Run:
    posterior: object
    mean: np.ndarray
    cov: np.ndarray
    settings: object
    drive: object
    warm: np.ndarray  # (C,)
    params: object  # per-chain pytree
    positions: np.ndarray  # (C, T, d)
    infos: object  # StepInfo of (C, T)
    raw: tuple  # device outputs, for the bitwise determinism check


def sample(name: str, settings, dim=DIM, chains=CHAINS, steps=STEPS, seed=SEED) -> Run:
    post, mean, cov = gaussian_posterior(dim=dim)
    algorithm = get_spec(name).build(post, settings)
    drive = make_driver(algorithm, post, chains, steps)
    raw = jax.block_until_ready(drive(jax.random.key(seed)))
    warm, params, positions, infos = raw
    return Run(post, mean, cov, settings, drive, np.asarray(warm), jax.tree.map(np.asarray, params),
               np.asarray(positions).transpose(1, 0, 2), jax.tree.map(lambda a: np.asarray(a).T, infos), raw)


_RUNS: dict[str, Run] = {}


@pytest.fixture(scope="module", params=NAMES)
def run(request) -> Run:
    """Each sampler compiled and run once per module; every test below reads the same draws."""
    name = request.param
    if name not in _RUNS:
        _RUNS[name] = sample(name, FAST_SETTINGS[name])
    return _RUNS[name]


def mean_z(positions, mean):
    """(pooled mean − truth) / MCSE per coordinate, MCSE from the spread of independent chain means."""
    chain_means = positions.mean(axis=1)
    mcse = chain_means.std(axis=0, ddof=1) / np.sqrt(chain_means.shape[0])
    return (chain_means.mean(axis=0) - mean) / mcse, mcse


def second_moment_z(positions, mean, cov):
    """Per entry of E[(w − μ)(w − μ)ᵀ] about the true mean: (estimate − Σ) / MCSE and relative error."""
    r = positions - mean
    per_chain = np.einsum("cti,ctj->cij", r, r) / r.shape[1]
    est = per_chain.mean(axis=0)
    mcse = per_chain.std(axis=0, ddof=1) / np.sqrt(per_chain.shape[0])
    return (est - cov) / mcse, mcse


def test_recovers_mean(run):
    z, mcse = mean_z(run.positions, run.mean)
    sd = np.sqrt(np.diag(run.cov))
    # the check has power: MCSE well below the posterior scale (stuck chains would inflate it)
    assert np.all(mcse < 0.05 * sd), mcse / sd
    assert np.all(np.abs(z) < 3.5), z


def test_recovers_covariance(run):
    z, mcse = second_moment_z(run.positions, run.mean, run.cov)
    iu = np.triu_indices(DIM)
    var = np.diag(run.cov)
    # relative MCSE of the variances below 5%, so |z| < 4 pins each variance to within ~20%
    assert np.all(np.diag(mcse) < 0.05 * var), np.diag(mcse) / var
    assert np.all(np.abs(z[iu]) < 4.0), z[iu]
    # the posterior is correlated: off-diagonal entries are recovered too, not only variances
    corr = run.cov / np.sqrt(np.outer(var, var))
    assert np.max(np.abs(corr[iu][corr[iu] < 0.999])) > 0.2


def test_loss_is_full_data_loss_at_new_position(run):
    """StepInfo.loss, rebuilt from the cached log-density, equals L_n at the returned position."""
    pos = run.positions[:, -5:].reshape(-1, DIM)
    direct = np.asarray(jax.vmap(run.posterior.full_loss)(jnp.asarray(pos)))
    np.testing.assert_allclose(run.infos.loss[:, -5:].reshape(-1), direct, rtol=1e-4, atol=1e-5)


def test_no_divergences_and_finite(run):
    assert not run.infos.diverging.any()
    assert np.isfinite(run.positions).all()
    assert np.isfinite(run.infos.loss).all()


def test_tuned_params_are_per_chain_and_sensible(run):
    """vmapped warm-up: every chain tunes its own step size and diagonal M⁻¹ ≈ posterior variances."""
    step_size = run.params.step_size
    imm = run.params.inverse_mass_matrix
    assert step_size.shape == (CHAINS,) and imm.shape == (CHAINS, DIM)
    assert np.all(step_size > 0) and np.unique(step_size).size > CHAINS // 2
    ratio = imm / np.diag(run.cov)
    # windowed sample variances (HMC/NUTS) or step-weighted averages (MCLMC) over a few hundred
    # correlated draws: each chain within a factor ~2.5, the average across chains close
    assert np.all((ratio > 0.4) & (ratio < 2.5)), ratio
    assert np.all(np.abs(ratio.mean(axis=0) - 1) < 0.2), ratio.mean(axis=0)


def test_same_seed_same_draws_other_seed_different(run):
    again = jax.block_until_ready(run.drive(jax.random.key(SEED)))
    for a, b in zip(jax.tree.leaves(run.raw), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = run.drive(jax.random.key(SEED + 1))
    assert not np.array_equal(np.asarray(other[2]), np.asarray(run.raw[2]))


# --- work accounting ------------------------------------------------------------------------


def test_work_per_step(run):
    g = run.infos.grad_evals
    name = {HMCSettings: "hmc", NUTSSettings: "nuts", MCLMCSettings: "mclmc",
            AdjustedMCLMCSettings: "adjusted_mclmc"}[type(run.settings)]
    if name == "hmc":
        assert np.all(g == run.settings.num_integration_steps)
    elif name == "nuts":
        assert np.all((g >= 1) & (g <= 2**run.settings.max_num_doublings - 1))
        assert np.all(g == np.round(g)) and g.std() > 0
    elif name == "mclmc":
        assert np.all(g == 2)  # isokinetic McLachlan: two gradients per step
    else:
        # 2 gradients per integration step, N = ⌈U·s⌉ with E[N] = L/ε for each chain
        assert np.all(g % 2 == 0) and np.all(g >= 2)
        expected = 2 * run.params.L / run.params.step_size
        np.testing.assert_allclose(g.mean(axis=1), expected, rtol=0.15)
        np.testing.assert_allclose(g.mean(), expected.mean(), rtol=0.03)


def test_warmup_work(run):
    w = run.warm
    assert w.shape == (CHAINS,) and np.all(w > 0)
    s = run.settings
    if isinstance(s, HMCSettings):
        assert np.all(w == 1 + s.num_warmup * s.num_integration_steps)
    elif isinstance(s, NUTSSettings):
        assert np.all((w > s.num_warmup) & (w <= 1 + s.num_warmup * (2**s.max_num_doublings - 1)))
        assert np.unique(w).size > 1  # NUTS work is random, counted per chain
    elif isinstance(s, MCLMCSettings):
        assert np.all(w == mclmc_warmup_grad_evals(s))
    else:
        # the curvature probe's gradients, then two dual-averaging passes: 0.1 + 0.1 then 0.1 of
        # num_tuning_steps proposals, each of ⌈U·s⌉ ≥ 1 integration steps of 2 gradients
        proposals = 3 * int(0.1 * s.num_tuning_steps)
        w = w - (s.scale_probe_iters if s.scale_probe else 0)
        assert np.all((w >= 1 + 2 * proposals) & (w % 2 == 1)), w
        assert np.all(w < 1 + 2 * proposals * 20)


def test_mclmc_tuning_step_formula():
    # hand count for the defaults: 200 + 200 + round(200/3) = 67 re-tuning + 200 (L phase)
    default = MCLMCSettings()
    assert mclmc_tuning_steps(default) == 667
    # + two curvature probes of 20 gradients (raw, then preconditioned)
    assert mclmc_warmup_grad_evals(default) == 1 + 2 * 20 + 2 * 667
    unprobed = dataclasses.replace(default, scale_probe=False)
    assert mclmc_warmup_grad_evals(unprobed) == 1 + 2 * 667
    assert mclmc_warmup_grad_evals(dataclasses.replace(default, diagonal_preconditioning=False)) == 1 + 20 + 2 * 600
    assert mclmc_tuning_steps(dataclasses.replace(default, diagonal_preconditioning=False)) == 600
    assert mclmc_tuning_steps(dataclasses.replace(default, frac_tune3=0.0)) == 467


def counting_posterior(dim=3):
    """The Gaussian posterior with a host-side counter of per_sample_loss evaluations (= gradients)."""
    post, _, _ = gaussian_posterior(dim=dim)
    calls = [0]
    inner = post.per_sample_loss

    def per_sample_loss(w, x, y):
        jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
        return inner(w, x, y)

    return dataclasses.replace(post, per_sample_loss=per_sample_loss), calls


def measured_warmup_and_step_work(name, settings):
    """Run warm-up and one step of ONE chain, counting actual log-density evaluations."""
    post, calls = counting_posterior()
    algorithm = get_spec(name).build(post, settings)
    warmup = jax.jit(algorithm.warmup, compiler_options=FAST_COMPILE)
    step = jax.jit(algorithm.step, compiler_options=FAST_COMPILE)
    state, params, reported = warmup(jax.random.key(1), post.w_star)
    jax.effects_barrier()
    warm_calls = calls[0]
    _, info = step(jax.random.key(2), state, params, None)
    jax.effects_barrier()
    return float(reported), warm_calls, float(info.grad_evals), calls[0] - warm_calls


def test_hmc_counted_work_equals_actual_gradient_evaluations():
    reported, actual, step_reported, step_actual = measured_warmup_and_step_work(
        "hmc", HMCSettings(num_warmup=40, num_integration_steps=5))
    assert reported == actual == 1 + 40 * 5
    assert step_reported == step_actual == 5


@pytest.mark.slow
@pytest.mark.parametrize("name,settings", [
    ("nuts", NUTSSettings(num_warmup=60, max_num_doublings=5)),
    # the defaults: round(200 / 3) = 67 re-tuning steps run, where BlackJAX's own count says 66
    ("mclmc", MCLMCSettings()),
    ("adjusted_mclmc", AdjustedMCLMCSettings(num_tuning_steps=300)),
])
def test_counted_work_equals_actual_gradient_evaluations(name, settings):
    reported, actual, step_reported, step_actual = measured_warmup_and_step_work(name, settings)
    assert reported == actual
    assert step_reported == step_actual


# --- acceptance and energy ------------------------------------------------------------------


def test_acceptance_near_target_after_warmup(run):
    accept = run.infos.accept
    if isinstance(run.settings, MCLMCSettings):
        assert np.isnan(accept).all()  # unadjusted: no Metropolis step
        return
    target = run.settings.target_accept
    # dual averaging ends on the averaged iterate, whose step is a little smaller than the one
    # that hits the target exactly; Stan shows the same upward offset
    assert target - 0.05 < accept.mean() < min(target + 0.15, 0.99), accept.mean()
    assert np.all(accept.mean(axis=1) > target - 0.2)


def test_energy_change(run):
    de = run.infos.energy_change
    if isinstance(run.settings, HMCSettings):
        # the Metropolis probability is min(1, exp(−ΔH)): energy_change is exactly that ΔH
        np.testing.assert_allclose(run.infos.accept, np.minimum(1.0, np.exp(-de)), rtol=1e-4, atol=1e-5)
    elif isinstance(run.settings, NUTSSettings):
        assert np.isfinite(de).all() and np.abs(de).mean() < 1.0
    elif isinstance(run.settings, MCLMCSettings):
        # the tuner sets ε so that Var[ΔE]/d ≈ desired_energy_var
        ratio = np.mean(de**2) / DIM / run.settings.desired_energy_var
        assert 0.3 < ratio < 3.0, ratio
    else:
        assert np.isnan(de).all()


# --- settings and registry ------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_registry_and_default_settings(name):
    spec = get_spec(name)
    assert spec.name == name and spec.description
    settings = spec.settings()
    assert dataclasses.is_dataclass(settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.num_warmup = 1  # any attribute: frozen


def test_defaults_match_the_brief():
    assert HMCSettings() == HMCSettings(num_warmup=500, num_integration_steps=16, target_accept=0.8,
                                        frac_jitter=0.2)
    assert NUTSSettings() == NUTSSettings(num_warmup=500, target_accept=0.8, max_num_doublings=8)
    assert MCLMCSettings() == MCLMCSettings(2000, True, 5e-4, 0.1, 0.1, 0.1)
    assert AdjustedMCLMCSettings() == AdjustedMCLMCSettings(2000, 0.9, True)


@pytest.mark.parametrize("cls,bad", [
    (HMCSettings, {"target_accept": 1.0}),
    (HMCSettings, {"num_integration_steps": 0}),
    (NUTSSettings, {"max_num_doublings": 0}),
    (MCLMCSettings, {"frac_tune2": 1.5}),
    (MCLMCSettings, {"desired_energy_var": 0.0}),
    (AdjustedMCLMCSettings, {"target_accept": 0.0}),
])
def test_settings_reject_bad_values(cls, bad):
    with pytest.raises(ValueError):
        cls(**bad)


# --- slow: the defaults, more chains, tighter checks -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_default_settings_recover_gaussian_moments(name):
    r = sample(name, get_spec(name).settings(), dim=5, chains=128, steps=1000, seed=7)
    z, mcse = mean_z(r.positions, r.mean)
    assert np.all(np.abs(z) < 3.5), z
    assert np.all(mcse < 0.02 * np.sqrt(np.diag(r.cov)))
    z2, mcse2 = second_moment_z(r.positions, r.mean, r.cov)
    iu = np.triu_indices(5)
    assert np.all(np.abs(z2[iu]) < 4.0), z2[iu]
    assert np.all(np.diag(mcse2) < 0.02 * np.diag(r.cov))
    assert not r.infos.diverging.any()


@pytest.mark.slow
def test_hmc_jitter_unfreezes_second_moments():
    """Without jitter some chains sit near a half-period and keep |w − μ|: variance MCSE balloons."""
    def variance_rel_mcse(frac_jitter):
        r = sample("hmc", HMCSettings(num_warmup=300, frac_jitter=frac_jitter))
        _, mcse = second_moment_z(r.positions, r.mean, r.cov)
        return np.diag(mcse) / np.diag(r.cov)

    fixed, jittered = variance_rel_mcse(0.0), variance_rel_mcse(0.2)
    assert fixed.max() > 2 * jittered.max(), (fixed, jittered)
