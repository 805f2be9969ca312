"""Chain runner: result shapes, draw positions, exact draw statistics, no retracing, determinism, divergence, minibatches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_utils import gaussian_posterior

from llc_bench.posterior import Posterior
from llc_bench.progress import Bar, progress_enabled
from llc_bench.runner import (
    ChainResult,
    baseline_loss,
    chain_keys,
    chain_shardings,
    chunk_plan,
    random_directions,
    run_chains,
    run_chains_with_state,
    start_chains,
    summarize_tuned,
)
from llc_bench.samplers.base import Algorithm, StepInfo

NAN = jnp.float32(jnp.nan)


def _info(loss, grad_evals=1.0, accept=NAN, energy=NAN):
    return StepInfo(loss=loss, accept=accept, energy_change=energy, diverging=jnp.asarray(False),
                    grad_evals=jnp.float32(grad_evals))


def iid_gaussian(posterior: Posterior, mean, cov, traces: list | None = None) -> Algorithm:
    """Exact sampler: each step ignores the state and draws from the known Gaussian posterior."""
    mean_j = jnp.asarray(mean, jnp.float32)
    chol = jnp.asarray(np.linalg.cholesky(cov), jnp.float32)

    def warmup(key, position):
        # Per-chain "tuned" leaves for summarize_tuned (no random op here: threefry is slow to compile).
        del key
        return position, {"step_size": jnp.float32(0.25) + 0 * position[0], "mass": jnp.ones(3)}, jnp.float32(2.0)

    def step(key, state, params, batch):
        del state, params, batch
        if traces is not None:
            traces.append(1)  # runs once per trace, never per call
        w = mean_j + chol @ jax.random.normal(key, mean_j.shape)
        return w, _info(posterior.full_loss(w), grad_evals=0.5)

    return Algorithm(warmup, step, lambda s: s, None)


def langevin_toy(posterior: Posterior, step_size: float, batch_size: int) -> Algorithm:
    """Plain SGLD with minibatches: w ← w − ε/2 (γ(w − w*) + nβ ∇L_m) + √ε η.

    It also reports the batch's sample indices (column 0 of x) via StepInfo: accept = the first index,
    energy_change = their mean.
    """

    def warmup(key, position):
        del key
        return position, (), jnp.float32(0.0)

    def step(key, w, params, batch):
        del params
        loss, grad, loc = posterior.minibatch_loss_and_grads(w, *batch)
        w = w - 0.5 * step_size * (loc + posterior.n_beta * grad) + jnp.sqrt(step_size) * jax.random.normal(key, w.shape)
        index = batch[0][:, 0]
        return w, _info(loss, grad_evals=batch_size / posterior.n, accept=index[0], energy=jnp.mean(index))

    return Algorithm(warmup, step, lambda s: s, batch_size)


def exploding_walk(fire_step: int, where: str) -> Algorithm:
    """Random walk with a step counter; chains whose warm-up coin is heads go non-finite at step `fire_step`.

    where='position' puts NaN in the position, where='loss' reports an infinite loss at a finite position.
    """

    def warmup(key, w):
        return (w, jnp.int32(0), jax.random.bernoulli(key)), (), jnp.float32(0.0)

    def step(key, state, params, batch):
        del params, batch
        w, t, fires = state
        w_new = w + 0.1 * jax.random.normal(key, w.shape)
        bad = fires & (t == fire_step)
        loss = jnp.sum(w_new**2)
        if where == "position":
            w_new = jnp.where(bad, jnp.nan, w_new)
        else:
            loss = jnp.where(bad, jnp.inf, loss)
        return (w_new, t + 1, fires), _info(loss)

    return Algorithm(warmup, step, lambda s: s[0], None)


def _data_posterior(n=64, dim=3, seed=0):
    """Noise-free linear regression (so minibatches matter); x[:, 0] is the sample index, unused by the loss."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    x = np.concatenate([np.arange(n, dtype=np.float32)[:, None], features], axis=1)
    w_true = rng.normal(size=dim).astype(np.float32)
    y = (features @ w_true)[:, None]

    def per_sample_loss(w, xb, yb):
        return 0.5 * (yb[:, 0] - xb[:, 1:] @ w) ** 2

    return Posterior.build(per_sample_loss, jnp.asarray(x), jnp.asarray(y), jnp.asarray(w_true), gamma=1.0)


RUN = dict(num_chains=3, num_burnin_steps=10, num_draws=7, num_steps_bw_draws=3, num_projections=2,
           chunk_size=4, progress=False)


@pytest.fixture(scope="module")
def gaussian():
    return gaussian_posterior(dim=3, n=100)


@pytest.fixture(scope="module")
def iid_runs(gaussian):
    """Runs of the exact sampler shared by several tests (each run compiles three executables)."""
    post, mean, cov = gaussian
    traces: dict[str, list] = {"a": [], "e": []}
    key = jax.random.key(3)
    runs = {
        "a": run_chains("iid", iid_gaussian(post, mean, cov, traces["a"]), post, key, **RUN),
        "b": run_chains("iid", iid_gaussian(post, mean, cov), post, key, **RUN),
        "d": run_chains("iid", iid_gaussian(post, mean, cov), post, jax.random.key(4), **RUN),
        # 5 burn-in chunks of 2 steps and 7 draw chunks of one 3-step block each.
        "e": run_chains("iid", iid_gaussian(post, mean, cov, traces["e"]), post, key,
                        **{**RUN, "num_chains": 5, "chunk_size": 2}),
    }
    return runs, traces


def test_shapes_and_draw_steps(gaussian, iid_runs):
    post, _, _ = gaussian
    r = iid_runs[0]["a"]
    assert isinstance(r, ChainResult)
    C, T, D, P = 3, 10 + 7 * 3, 7, 2
    for field in ("loss_trace", "accept", "energy_change", "diverging"):
        assert getattr(r, field).shape == (C, T), field
    assert r.diverging.dtype == bool
    assert r.draw_loss.shape == (C, D) and r.projections.shape == (C, D, P)
    assert r.diverged_at.shape == (C,) and (r.diverged_at == -1).all()
    # Draw d after step B + (d+1) k - 1: the last step of each k-block after burn-in.
    np.testing.assert_array_equal(r.draw_steps, [12, 15, 18, 21, 24, 27, 30])
    assert r.draw_steps[-1] == T - 1
    # The iid sampler reports L_n of its new position, so each draw equals that step's loss.
    np.testing.assert_allclose(r.draw_loss, r.loss_trace[:, r.draw_steps], rtol=1e-6)
    np.testing.assert_allclose(r.warmup_grad_evals, 2.0)
    np.testing.assert_allclose(r.grad_evals, 2.0 + 0.5 * T)
    assert r.num_burnin_steps == 10 and r.n_beta == post.n_beta
    # λ̂'s baseline is L_n(w*) computed as the draws compute L_n: the same value up to float32 rounding
    assert r.loss_at_wstar == baseline_loss(post, C) == pytest.approx(post.loss_at_wstar, rel=1e-6)
    assert r.wall_s > 0 and r.compile_s > 0 and r.warmup_s >= 0
    assert r.tuned == {"step_size": 0.25}  # the (3,) 'mass' leaf is not a scalar
    assert np.isnan(r.accept).all() and not r.diverging.any() and np.isfinite(r.loss_trace).all()


def test_draw_loss_mean_matches_exact_expectation(gaussian):
    post, mean, cov = gaussian
    r = run_chains("iid", iid_gaussian(post, mean, cov), post, jax.random.key(1), num_chains=8,
                   num_burnin_steps=0, num_draws=500, num_steps_bw_draws=1, num_projections=3, progress=False)
    # E[½ (w−μ)ᵀA(w−μ)] under N(m, Σ) is ½ (tr(AΣ) + (m−μ)ᵀA(m−μ)); recover A, μ from the loss itself.
    a = np.asarray(jax.hessian(post.full_loss)(jnp.zeros(3)), np.float64)
    mu = np.linalg.solve(a, -np.asarray(jax.grad(post.full_loss)(jnp.zeros(3)), np.float64))
    expected = 0.5 * (np.trace(a @ cov) + (mean - mu) @ a @ (mean - mu))
    draws = r.draw_loss.ravel()
    mcse = draws.std(ddof=1) / np.sqrt(draws.size)  # iid draws: MCSE = sd / √N
    assert abs(draws.mean() - expected) < 4 * mcse
    # Projections on the (recomputable) directions: mean (m − w*) @ P, covariance Pᵀ Σ P.
    directions = np.asarray(random_directions(chain_keys(jax.random.key(1), 8).projection, 3, 3), np.float64)
    np.testing.assert_allclose(np.linalg.norm(directions, axis=0), 1.0, rtol=1e-6)
    proj = r.projections.reshape(-1, 3)
    target_mean = (mean - np.asarray(post.w_star)) @ directions
    se = np.sqrt(np.diag(directions.T @ cov @ directions) / proj.shape[0])
    assert (np.abs(proj.mean(0) - target_mean) < 4 * se).all()
    np.testing.assert_allclose(np.cov(proj.T), directions.T @ cov @ directions, rtol=0.15, atol=1e-4)


def test_chunk_function_traced_once_per_phase(iid_runs):
    _, traces = iid_runs
    # One trace of the burn-in chunk + one of the draw chunk, for 3 chunks (a) as for 12 (e).
    assert len(traces["a"]) == 2
    assert len(traces["e"]) == 2


def test_same_key_bit_identical_and_chunking_invariant(iid_runs):
    runs, _ = iid_runs
    a, b, d, e = runs["a"], runs["b"], runs["d"], runs["e"]
    for field in ("loss_trace", "draw_loss", "projections", "grad_evals", "diverged_at"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
        # Keys come from the global step index, so chunk boundaries and extra chains change nothing.
        np.testing.assert_allclose(getattr(a, field), getattr(e, field)[:3], rtol=1e-6, err_msg=field)
    assert a.tuned == b.tuned
    assert not np.allclose(a.draw_loss, d.draw_loss)
    # Different chains see different noise.
    for i in range(5):
        for j in range(i):
            assert not np.allclose(e.projections[i], e.projections[j])


@pytest.mark.parametrize(("where", "fire"), [("position", 13), ("loss", 3)])
def test_divergence_recorded_frozen_and_masked(where, fire):
    # fire=13: in the draw phase (burn-in is 10 steps, first draw after step 12); fire=3: in burn-in.
    post = _data_posterior()
    key = jax.random.key(2)
    fires = np.asarray(jax.vmap(jax.random.bernoulli)(chain_keys(key, 4).warmup))
    assert fires.any() and not fires.all()  # the seed gives both kinds of chain
    r, (w, t, _) = run_chains_with_state("walk", exploding_walk(fire, where), post, key, **{**RUN, "num_chains": 4})
    np.testing.assert_array_equal(r.diverged_at, np.where(fires, fire, -1))
    # Frozen at the last finite state: position finite, counter stopped at the step that failed.
    assert np.isfinite(np.asarray(w)).all()
    np.testing.assert_array_equal(np.asarray(t), np.where(fires, fire, r.loss_trace.shape[1]))
    dead, alive = fires, ~fires
    assert np.isnan(r.loss_trace[dead, fire:]).all() and np.isfinite(r.loss_trace[dead, :fire]).all()
    assert np.isfinite(r.loss_trace[alive]).all()
    after = r.draw_steps >= fire
    assert np.isnan(r.draw_loss[np.ix_(dead, after)]).all() and np.isfinite(r.draw_loss[np.ix_(dead, ~after)]).all()
    assert np.isnan(r.projections[dead][:, after]).all() and np.isfinite(r.projections[alive]).all()
    assert np.isfinite(r.draw_loss[alive]).all()
    # Work is still counted for the frozen chain's steps (it computes in lockstep with the others).
    np.testing.assert_allclose(r.grad_evals, r.loss_trace.shape[1])


def test_langevin_minibatches_per_chain_and_step():
    post = _data_posterior(n=64)
    m = 8
    r = run_chains("sgld", langevin_toy(post, 1e-4, batch_size=m), post, jax.random.key(0),
                   **{**RUN, "num_chains": 4, "num_burnin_steps": 50, "num_draws": 50, "num_steps_bw_draws": 2})
    T = r.loss_trace.shape[1]
    np.testing.assert_allclose(r.grad_evals, T * m / 64, rtol=1e-6)  # m/n per step, no warm-up work
    np.testing.assert_allclose(r.warmup_grad_evals, 0.0)
    assert (r.diverged_at == -1).all() and np.isfinite(r.draw_loss).all()
    assert (r.draw_loss > post.loss_at_wstar).all()  # w* is the exact minimizer (noise-free data)
    first = r.accept  # (C, T) first sample index of each step's batch
    assert first.min() >= 0 and first.max() <= 63 and (first == np.round(first)).all()
    # Chains draw their own batches, and batches change every step.
    for i in range(4):
        for j in range(i):
            assert (first[i] != first[j]).mean() > 0.9
    assert (np.diff(first, axis=1) != 0).mean() > 0.9
    # Uniform indices with replacement: the batch-mean index has mean (n − 1)/2 and sd √((n² − 1)/12/m).
    means = r.energy_change.ravel()
    assert abs(means.mean() - 31.5) < 4 * np.sqrt((64**2 - 1) / 12 / m / means.size)
    assert abs(means.std() / np.sqrt((64**2 - 1) / 12 / m) - 1) < 0.1


@pytest.mark.parametrize("walk", [False, True])
def test_extend_continues_the_chains_exactly(walk):
    """LiveChains.extend: 7 draws, then on to 16, equal one run of 16 draws field for field, work
    included (minibatch chains; or chains of which some diverge in the extension, at step 40)."""
    post = _data_posterior(n=64)
    alg = exploding_walk(40, "position") if walk else langevin_toy(post, 1e-4, batch_size=8)
    opts = {**RUN, "num_chains": 4, "draw_fn": lambda w, chain, draw, data: w[0] + draw}
    key = jax.random.key(5)
    short = start_chains("toy", alg, post, key, **opts)
    longer = short.extend(16)
    fresh, states = run_chains_with_state("toy", alg, post, key, **{**opts, "num_draws": 16})
    assert short.result.draw_loss.shape == (4, 7) and longer.num_draws == 16
    for field in ("loss_trace", "accept", "draw_loss", "draw_steps", "projections", "draw_spread", "grad_evals",
                  "diverged_at", "draw_outputs"):
        np.testing.assert_array_equal(getattr(longer.result, field), getattr(fresh, field), err_msg=field)
    jax.tree.map(np.testing.assert_array_equal, longer.states, states)
    if walk:
        assert ((fresh.diverged_at == 40) | (fresh.diverged_at == -1)).all() and (fresh.diverged_at == 40).any()
    with pytest.raises(ValueError, match="more than the 16 draws"):
        longer.extend(16)
    with pytest.raises(ValueError, match="full_loss_every"):
        start_chains("toy", alg, post, key, **{**opts, "full_loss_every": 7}).extend(14)


def test_extend_with_retune_draws_on_with_the_new_params():
    """extend(retune=True): Algorithm.retune sees the states where the chains stopped, the new draws
    use what it returns, and nothing before them changes; a retune that keeps the params changes
    nothing at all."""
    post = _data_posterior(n=64)
    seen = []

    def algorithm(factor):
        base = langevin_toy(post, 1e-4, batch_size=8)

        def warmup(key, position):
            return position, jnp.float32(1e-4), jnp.float32(0.0)

        def step(key, w, eps, batch):
            loss, grad, loc = post.minibatch_loss_and_grads(w, *batch)
            w = w - 0.5 * eps * (loc + post.n_beta * grad) + jnp.sqrt(eps) * jax.random.normal(key, w.shape)
            return w, _info(loss, grad_evals=8 / post.n)

        def retune(states, params, alive):
            seen.append(np.asarray(states))
            return params * factor

        return base._replace(warmup=warmup, step=step, retune=retune)

    opts = {**RUN, "num_chains": 4}
    key = jax.random.key(3)
    short = start_chains("toy", algorithm(0.25), post, key, **opts)
    assert len(seen) == 1 and short.result.tuned == pytest.approx({"value": 2.5e-5})
    same = short.extend(16)
    retuned = short.extend(16, retune=True)
    np.testing.assert_array_equal(seen[-1], np.asarray(short.states))
    assert retuned.result.tuned == pytest.approx({"value": 2.5e-5 / 4}) and same.result.tuned == short.result.tuned
    stop = short.result.loss_trace.shape[1]
    np.testing.assert_array_equal(retuned.result.loss_trace[:, :stop], short.result.loss_trace)
    np.testing.assert_array_equal(retuned.result.draw_loss[:, :7], short.result.draw_loss)
    # StepInfo.loss is the loss before the step: the steps after the first one differ
    assert (retuned.result.loss_trace[:, stop + 1:] != same.result.loss_trace[:, stop + 1:]).all()
    unchanged = start_chains("toy", algorithm(1.0), post, key, **opts)
    kept, plain = unchanged.extend(16, retune=True), unchanged.extend(16)
    for field in ("loss_trace", "draw_loss", "projections", "draw_spread", "grad_evals"):
        np.testing.assert_array_equal(getattr(kept.result, field), getattr(plain.result, field), err_msg=field)


def test_burned_in_to_drops_the_earlier_draws(iid_runs):
    a = iid_runs[0]["a"]  # 10 burn-in steps, draws after steps 12, 15, …, 30
    later = a.burned_in_to(16)
    np.testing.assert_array_equal(later.draw_steps, a.draw_steps[2:])
    np.testing.assert_array_equal(later.draw_loss, a.draw_loss[:, 2:])
    np.testing.assert_array_equal(later.projections, a.projections[:, 2:])
    np.testing.assert_array_equal(later.draw_spread, a.draw_spread[:, 2:])
    assert later.num_burnin_steps == 16 and later.loss_trace is a.loss_trace
    np.testing.assert_array_equal(later.grad_evals, a.grad_evals)
    assert a.burned_in_to(10).draw_loss.shape == a.draw_loss.shape
    for step in (9, 32):
        with pytest.raises(ValueError, match="step must be in"):
            a.burned_in_to(step)


def test_chunk_plan():
    assert chunk_plan(0, 5) == (0, 0)
    assert chunk_plan(10, 4) == (4, 3)  # 12 slots, 2 padded
    assert chunk_plan(10, 100) == (10, 1)
    assert chunk_plan(7, 1) == (1, 7)
    for total in range(1, 40):
        for target in range(1, 12):
            length, count = chunk_plan(total, target)
            assert length * count >= total and length * (count - 1) < total and length <= max(target, 1)


def test_summarize_tuned():
    params = {"step_size": jnp.array([0.1, 0.3]), "L": jnp.array([1.0, 3.0]), "imm": jnp.ones((2, 5))}
    assert summarize_tuned(params) == pytest.approx({"step_size": 0.2, "L": 2.0})
    assert summarize_tuned(()) == {}


def test_progress_switches(monkeypatch):
    assert not progress_enabled(False)
    monkeypatch.setenv("LLC_BENCH_NO_PROGRESS", "1")
    assert not progress_enabled(True)
    monkeypatch.delenv("LLC_BENCH_NO_PROGRESS")
    monkeypatch.setenv("CI", "true")
    assert not progress_enabled(True)
    monkeypatch.delenv("CI")
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    assert not progress_enabled(True)
    with Bar("noop", 10, enabled=False) as bar:  # disabled bars accept calls and do nothing
        bar.advance(3)
        bar.describe("x")
    with Bar("shown", 10, enabled=True) as bar:
        bar.advance(10)


_SHARDED_RUN = """
import sys
sys.path.insert(0, "tests")
import jax, numpy as np
from test_runner import RUN, _data_posterior, langevin_toy
from llc_bench.runner import run_chains_with_state
assert len(jax.devices()) == 2
post = _data_posterior()
algo = langevin_toy(post, 1e-4, 8)
run = {**RUN, "num_chains": 4}
a, _ = run_chains_with_state("sgld", algo, post, jax.random.key(0), **run)
b, state = run_chains_with_state("sgld", algo, post, jax.random.key(0), **run, devices=jax.devices())
assert len(state.sharding.device_set) == 2, state.sharding
for f in ("loss_trace", "draw_loss", "projections", "grad_evals", "diverged_at"):
    np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-6, err_msg=f)
from llc_bench.experiment import chain_devices
assert chain_devices(4) == jax.local_devices() and chain_devices(3) is None  # the pipeline shards by itself
print("ok")
"""


@pytest.mark.slow
def test_sharded_chains_match_single_device():
    # A fresh process: the forced host device count must be set before JAX initializes.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _SHARDED_RUN], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_sharding_needs_divisible_chains():
    with pytest.raises(ValueError, match="multiple"):
        chain_shardings([jax.devices()[0]] * 2, 3)


@pytest.mark.parametrize("with_draw_fn", [False, True])
def test_full_loss_every_evaluates_a_subset_of_the_same_draws(gaussian, with_draw_fn):
    """full_loss_every = 3 of 7 draws: L_n, projections and full_draw_fn at draws 2 and 5 only, equal
    to the every-draw run's there; the chains, the trace and draw_fn's outputs are unchanged. Without
    draw_fn the loop runs blocks of 9 steps (the last one partial, its draw dropped)."""
    post, mean, cov = gaussian
    draw_fn = (lambda w, c, d, data: {"w0": w[0] + data}) if with_draw_fn else None
    kwargs = {**RUN, "draw_fn": draw_fn, "draw_data": jnp.float32(1.0) if with_draw_fn else None,
              "full_draw_fn": lambda w, c, d, data: {"norm": jnp.linalg.norm(w)}}
    every = run_chains("iid", iid_gaussian(post, mean, cov), post, jax.random.key(3), **kwargs)
    sparse = run_chains("iid", iid_gaussian(post, mean, cov), post, jax.random.key(3), **kwargs, full_loss_every=3)
    np.testing.assert_array_equal(sparse.draw_steps, every.draw_steps[[2, 5]])
    np.testing.assert_allclose(sparse.draw_loss, every.draw_loss[:, [2, 5]], rtol=1e-6)
    np.testing.assert_allclose(sparse.projections, every.projections[:, [2, 5]], rtol=1e-6)
    np.testing.assert_allclose(sparse.full_draw_outputs["norm"], every.full_draw_outputs["norm"][:, [2, 5]], rtol=1e-6)
    assert every.full_draw_outputs["norm"].shape == (3, 7)
    np.testing.assert_allclose(sparse.loss_trace, every.loss_trace, rtol=1e-6)
    np.testing.assert_allclose(sparse.grad_evals, every.grad_evals, rtol=1e-6)
    if with_draw_fn:
        assert sparse.draw_outputs["w0"].shape == (3, 7)
        np.testing.assert_allclose(sparse.draw_outputs["w0"], every.draw_outputs["w0"], rtol=1e-6)
    with pytest.raises(ValueError, match="full_loss_every"):
        run_chains("iid", iid_gaussian(post, mean, cov), post, jax.random.key(3), **RUN, full_loss_every=8)
