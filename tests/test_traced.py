"""Traced inputs: runs whose posteriors differ only in data, w*, nβ and γ (same shapes) and whose
settings differ only in the SG step size reuse one compilation, and compute what a fresh
compilation of the second run computes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llc_bench.compiled import as_arrays
from llc_bench.curvature import build_algorithm
from llc_bench.posterior import Posterior
from llc_bench.runner import clear_executables, run_chains
from llc_bench.samplers import SAMPLER_NAMES, get_spec
from llc_bench.samplers.base import Algorithm, current_binding, rebind, wrap

N, DIM = 64, 3
RUN = dict(num_chains=2, num_burnin_steps=20, num_draws=5, num_steps_bw_draws=4, num_projections=2,
           chunk_size=10, progress=False)
SETTINGS = {  # (first run, second run): the second changes ε only where there is one
    "sgld": ({"step_size": 1e-3, "batch_size": 8}, {"step_size": 3e-3, "batch_size": 8}),
    "rmsprop_sgld": ({"step_size": 1e-3, "batch_size": 8}, {"step_size": 3e-3, "batch_size": 8}),
    "hmc": ({"num_warmup": 30, "num_integration_steps": 4}, {"num_warmup": 30, "num_integration_steps": 4}),
    "mclmc": ({"num_tuning_steps": 60}, {"num_tuning_steps": 60}),
}


def problem(seed: int):
    """Noisy linear regression data (x, y) and a w* (the weights that made it)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, DIM)).astype(np.float32)
    w_true = rng.normal(size=DIM).astype(np.float32)
    y = (x @ w_true + 0.3 * rng.normal(size=N)).astype(np.float32)[:, None]
    return jnp.asarray(x), jnp.asarray(y), jnp.asarray(w_true)


def make_loss(traces: list):
    def per_sample_loss(w, xb, yb):
        traces.append(1)  # Python side effect: runs only while JAX traces the loss
        return 0.5 * (yb[:, 0] - xb @ w) ** 2

    return per_sample_loss


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_run_differing_in_traced_values_only_compiles_nothing(name):
    traces: list = []
    loss = make_loss(traces)
    spec = get_spec(name)
    first_settings, second_settings = (spec.settings(**s) for s in SETTINGS[name])
    post_a = Posterior.build(loss, *problem(0), gamma=1.0)
    x, y, w = problem(1)
    post_b = Posterior.build(loss, x, y, w, beta0=0.5, gamma=30.0)
    assert (post_a.n_beta, post_a.gamma) != (post_b.n_beta, post_b.gamma)
    key = jax.random.key(3)

    clear_executables()
    first = run_chains(name, spec.build(post_a, first_settings), post_a, key, **RUN)
    assert traces and first.compile_s > 0
    traces.clear()
    second = run_chains(name, spec.build(post_b, second_settings), post_b, key, **RUN)
    assert not traces
    assert not np.array_equal(second.loss_trace, first.loss_trace)

    clear_executables()
    fresh = run_chains(name, spec.build(post_b, second_settings), post_b, key, **RUN)
    assert traces  # compiled again, from scratch
    for field in ("loss_trace", "draw_loss", "projections", "grad_evals", "draw_spread"):
        np.testing.assert_array_equal(getattr(second, field), getattr(fresh, field), err_msg=field)
    assert second.loss_at_wstar == fresh.loss_at_wstar
    assert second.tuned == fresh.tuned


def test_static_settings_and_shapes_compile_again():
    """A different batch size (a shape) or number of data rows is not a traced difference."""
    traces: list = []
    loss = make_loss(traces)
    spec = get_spec("sgld")
    post = Posterior.build(loss, *problem(0), gamma=1.0)
    clear_executables()
    run_chains("sgld", spec.build(post, spec.settings(step_size=1e-3, batch_size=8)), post, jax.random.key(0), **RUN)
    traces.clear()
    run_chains("sgld", spec.build(post, spec.settings(step_size=1e-3, batch_size=4)), post, jax.random.key(0), **RUN)
    assert traces
    traces.clear()
    fewer = dataclasses.replace(post, x=post.x[:32], y=post.y[:32])
    run_chains("sgld", spec.build(fewer, spec.settings(step_size=1e-3, batch_size=4)), fewer, jax.random.key(0), **RUN)
    assert traces


def freeze(algorithm: Algorithm, posterior=None) -> Algorithm:
    """The SG algorithm with ε = 0 in every step: the chains never leave w*."""
    step = algorithm.step
    return algorithm._replace(step=lambda k, s, q, b: step(k, s, q._replace(step_size=0.0 * q.step_size), b))


def test_a_wrapper_without_wrap_runs_as_given_and_wrap_keeps_the_binding():
    """An Algorithm whose step was replaced by hand keeps its closed-over posterior: the runner runs
    that step, not a rebound (or cached) one of the sampler it came from. `wrap` keeps the binding:
    the wrapped step runs, and another posterior of the same shapes reuses its executables."""
    traces: list = []
    post = Posterior.build(make_loss(traces), *problem(0), gamma=1.0)
    inner = get_spec("sgld").build(post, get_spec("sgld").settings(step_size=1e-3, batch_size=8))
    clear_executables()
    moving = run_chains("sgld", inner, post, jax.random.key(0), **RUN)
    assert np.all(moving.draw_spread > 0)
    by_hand = freeze(inner)
    assert by_hand.binding is not None  # stale: its step is not the one the binding made
    np.testing.assert_array_equal(run_chains("frozen", by_hand, post, jax.random.key(0), **RUN).draw_spread, 0.0)

    wrapped = wrap(inner, post, freeze, "freeze")
    np.testing.assert_array_equal(run_chains("frozen", wrapped, post, jax.random.key(0), **RUN).draw_spread, 0.0)
    other = dataclasses.replace(post, n_beta=2 * post.n_beta, w_star=post.w_star + 1.0)
    traces.clear()
    again = run_chains("frozen", wrap(inner, other, freeze, "freeze"), other, jax.random.key(0), **RUN)
    assert not traces
    np.testing.assert_array_equal(again.draw_spread, 0.0)
    assert np.all(again.loss_trace != moving.loss_trace)  # at the other w*


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_registered_sampler_binds_and_traces_its_posterior(name):
    """Each registry build returns an algorithm whose binding is current and keyed, and whose warm-up
    and step trace with the posterior and hyper abstract (no Python branch on nβ, γ or ε)."""
    from sampler_utils import gaussian_posterior
    from test_sampler_contract import contract_settings

    post = gaussian_posterior()[0]
    algorithm = build_algorithm(get_spec(name), post, contract_settings(name))
    binding = current_binding(algorithm)
    assert binding is not None and hash(binding.key) is not None
    keys = jax.random.split(jax.random.key(0), 2)
    positions = jnp.broadcast_to(post.w_star, (2, post.dim))

    def warmup_then_step(posterior, hyper):
        rebound = rebind(algorithm, posterior, hyper)
        state, params, _ = jax.vmap(rebound.warmup)(keys, positions)
        batch = None if rebound.batch_size is None else (posterior.x[:rebound.batch_size], posterior.y[:rebound.batch_size])
        return jax.vmap(rebound.step, in_axes=(0, 0, 0, None))(keys, state, params, batch)

    state, info = jax.eval_shape(warmup_then_step, as_arrays(post), as_arrays(binding.hyper))
    assert info.loss.shape == (2,)
