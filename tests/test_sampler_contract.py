"""The contract every registered sampler meets, checked through the real chain runner: Gaussian moments
within Monte Carlo error, bitwise determinism, divergence freezing, work accounting, acceptance iff Metropolis.

A sampler added to the registry is tested here without any change to this file: ε-convention
samplers run with step_size = "auto" and a small batch, self-tuned ones with their defaults
(shortened below only where compile time would make the default suite slow).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_utils import gaussian_posterior

from llc_bench.curvature import build_algorithm
from llc_bench.estimator import estimate_from_result
from llc_bench.experiment import _summarize, sampler_key
from llc_bench.runner import chain_keys, run_chains
from llc_bench.samplers import SAMPLER_NAMES, get_spec
from llc_bench.samplers.base import STEP_EPSILON

Z = 3.5  # normal quantile of every Monte Carlo tolerance (two-sided p ≈ 5e-4 per entry)
CHAINS, BURNIN, DRAWS, THIN = 32, 400, 600, 2
POISON_STEP = BURNIN + 21  # poisoned chains go non-finite at this step (a draw-phase step)
BATCH = 4  # of the Gaussian posterior's n = 100 (its loss ignores the data: no gradient noise)
# Optional speed-ups for samplers whose default warm-up costs seconds of compile time; a sampler
# not listed runs with its defaults.
FAST = {
    "hmc": {"num_warmup": 300},
    "nuts": {"num_warmup": 300},
    "mclmc": {"num_tuning_steps": 1500, "frac_tune3": 0.0},
    "adjusted_mclmc": {"num_tuning_steps": 1000},
}
# Unadjusted samplers: O(step) bias of the stationary covariance, relative to the scale. With
# step_size = "auto" (c = 0.1) the bound is ≈ c/4 = 2.5%; MCLMC's tuned energy error gives less.
UNADJUSTED_BIAS = 0.03


def contract_settings(name: str):
    spec = get_spec(name)
    overrides = dict(FAST.get(name, {}))
    if spec.step_size == STEP_EPSILON:
        overrides.update(step_size="auto", batch_size=BATCH)
    return spec.settings(**overrides)


# --- a wrapper that pushes some chains non-finite at POISON_STEP -----------------------------


class Poisoned(NamedTuple):
    inner: Any
    t: jax.Array  # () int32 steps taken
    poison: jax.Array  # () bool


def poisoned_chain(warmup_key) -> jax.Array:
    """Which chains the wrapper poisons: about a quarter, chosen from each chain's warm-up key."""
    return jax.random.uniform(jax.random.fold_in(warmup_key, 7)) < 0.25


def poison(algorithm):
    """`algorithm` with every floating leaf of a poisoned chain's state set to NaN at POISON_STEP."""

    def warmup(rng_key, position):
        state, params, work = algorithm.warmup(rng_key, position)
        return Poisoned(state, jnp.zeros((), jnp.int32), poisoned_chain(rng_key)), params, work

    def step(rng_key, state, params, batch):
        inner, info = algorithm.step(rng_key, state.inner, params, batch)
        t = state.t + 1
        hit = state.poison & (t == POISON_STEP + 1)
        inner = jax.tree.map(lambda a: jnp.where(hit, jnp.nan, a) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                             inner)
        return Poisoned(inner, t, state.poison), info

    end_burnin = None if algorithm.end_burnin is None else (
        lambda s: s._replace(inner=algorithm.end_burnin(s.inner)))
    retune = None if algorithm.retune is None else (
        lambda states, params, alive: algorithm.retune(states.inner, params, alive))
    return algorithm._replace(warmup=warmup, step=step, position=lambda s: algorithm.position(s.inner),
                              end_burnin=end_burnin, retune=retune)


# --- one run per sampler, shared by every test ------------------------------------------------


@dataclasses.dataclass
class Run:
    name: str
    spec: Any
    settings: Any
    posterior: Any
    mean: np.ndarray
    cov: np.ndarray
    algorithm: Any
    result: Any  # ChainResult
    positions: np.ndarray  # (C, D, d) at the draws
    poisoned: np.ndarray  # (C,) bool


def run_once(run: Run, key) -> tuple:
    result = run_chains(run.name, run.algorithm, run.posterior, key, num_chains=CHAINS, num_burnin_steps=BURNIN,
                        num_draws=DRAWS, num_steps_bw_draws=THIN, num_projections=2, progress=False,
                        draw_fn=lambda w, c, d, data: w)
    return result, result.draw_outputs


_RUNS: dict[str, Run] = {}


@pytest.fixture(scope="module", params=SAMPLER_NAMES)
def run(request) -> Run:
    name = request.param
    if name not in _RUNS:
        post, mean, cov = gaussian_posterior()
        spec, settings = get_spec(name), contract_settings(name)
        algorithm = poison(build_algorithm(spec, post, settings))
        key = sampler_key(0, name)
        poisoned = np.asarray(jax.vmap(poisoned_chain)(chain_keys(key, CHAINS).warmup))
        r = Run(name, spec, settings, post, mean, cov, algorithm, None, None, poisoned)
        r.result, r.positions = run_once(r, key)
        _RUNS[name] = r
    return _RUNS[name]


def healthy(run: Run) -> np.ndarray:
    return run.positions[~run.poisoned]


# --- the contract -----------------------------------------------------------------------------


def test_gaussian_moments_within_mcse(run):
    """Pooled mean and covariance of the healthy chains against the exact Gaussian; MCSE from the
    spread of independent per-chain statistics."""
    x = healthy(run)
    assert x.shape[0] >= 16 and np.isfinite(x).all()
    chain_means = x.mean(axis=1)
    mcse = chain_means.std(axis=0, ddof=1) / math.sqrt(x.shape[0])
    z = np.abs(chain_means.mean(axis=0) - run.mean) / mcse
    assert z.max() < Z, (run.name, z)
    r = x - run.mean
    per_chain = np.einsum("cti,ctj->cij", r, r) / r.shape[1]
    cov_mcse = per_chain.std(axis=0, ddof=1) / math.sqrt(x.shape[0])
    scale = np.sqrt(np.outer(np.diag(run.cov), np.diag(run.cov)))
    bias = 0.0 if run.spec.metropolis else UNADJUSTED_BIAS * scale
    excess = np.abs(per_chain.mean(axis=0) - run.cov) - (Z * cov_mcse + bias)
    assert excess.max() < 0, (run.name, per_chain.mean(axis=0), run.cov, cov_mcse)
    # the draws are a sample, not the start: they spread over the posterior scale
    assert np.all(x.std(axis=(0, 1)) > 0.5 * np.sqrt(np.diag(run.cov)))


def test_same_seed_bitwise_other_seed_different(run):
    again, positions = run_once(run, sampler_key(0, run.name))
    np.testing.assert_array_equal(positions, run.positions)
    np.testing.assert_array_equal(again.draw_loss, run.result.draw_loss)
    np.testing.assert_array_equal(again.grad_evals, run.result.grad_evals)
    np.testing.assert_array_equal(again.loss_trace, run.result.loss_trace)
    _, other = run_once(run, sampler_key(1, run.name))
    both = np.isfinite(other) & np.isfinite(positions)
    assert both.mean() > 0.5 and np.mean(other[both] != positions[both]) > 0.9


def test_non_finite_chain_is_frozen_and_reported(run):
    res = run.result
    assert run.poisoned.any() and (~run.poisoned).sum() >= 16
    np.testing.assert_array_equal(res.diverged_at, np.where(run.poisoned, POISON_STEP, -1))
    after = res.draw_steps >= POISON_STEP
    assert after.any() and (~after).any()
    assert np.isnan(res.draw_loss[run.poisoned][:, after]).all()
    assert np.isfinite(res.draw_loss[run.poisoned][:, ~after]).all()
    assert np.isfinite(res.draw_loss[~run.poisoned]).all()
    assert np.isnan(run.positions[run.poisoned][:, after]).all()
    est = estimate_from_result(res, "full")
    assert sorted(int(c) for c in est.excluded) == sorted(np.flatnonzero(run.poisoned).tolist())
    assert est.status == "diverged" and np.isfinite(est.mean)


def counted_step_work(run: Run) -> tuple[float, float]:
    """(reported, actual) work of one step of one chain; actual = rows of data evaluated / n."""
    rows = [0]
    inner = run.posterior.per_sample_loss

    def per_sample_loss(w, x, y):
        jax.debug.callback(lambda: rows.__setitem__(0, rows[0] + x.shape[0]))
        return inner(w, x, y)

    post = dataclasses.replace(run.posterior, per_sample_loss=per_sample_loss)
    settings = run.settings
    if run.spec.step_size == STEP_EPSILON:
        settings = dataclasses.replace(settings, step_size=1e-3)  # "auto" would count its own products
    algorithm = run.spec.build(post, settings)
    state, params, _ = jax.jit(algorithm.warmup)(jax.random.key(1), post.w_star)
    batch = (post.x[:BATCH], post.y[:BATCH]) if algorithm.batch_size else None
    jax.effects_barrier()
    rows[0] = 0
    _, info = jax.jit(algorithm.step)(jax.random.key(2), state, params, batch)
    jax.effects_barrier()
    return float(info.grad_evals), rows[0] / post.n


def test_work_accounting(run):
    res, spec = run.result, run.spec
    steps = BURNIN + DRAWS * THIN
    per_step = (res.grad_evals - res.warmup_grad_evals) / steps
    assert np.all(res.warmup_grad_evals >= 0)
    if spec.minibatch:
        assert run.algorithm.batch_size == BATCH
        np.testing.assert_allclose(per_step, BATCH / run.posterior.n, rtol=1e-6)
    else:
        assert run.algorithm.batch_size is None
        assert np.all(per_step >= 1) and np.all(res.warmup_grad_evals >= 1)
    reported, actual = counted_step_work(run)
    assert reported == pytest.approx(actual, rel=1e-6) and actual > 0


def test_acceptance_reported_iff_metropolis(run):
    from llc_bench.diagnostics import convergence, to_datatree

    res = run.result
    accept = res.accept[~run.poisoned]
    est = estimate_from_result(res, "full")
    summary = _summarize(run.spec, res, est, convergence(to_datatree(res, est.running)), [], None, run.posterior)
    if run.spec.metropolis:
        assert np.isfinite(accept).all() and np.all((accept >= 0) & (accept <= 1 + 1e-6))
        assert 0.3 < summary["accept_rate"] <= 1.0
        assert summary["accept_rate"] == pytest.approx(float(np.mean(accept)), rel=1e-6)
    else:
        assert np.isnan(accept).all()
        assert summary["accept_rate"] is None
