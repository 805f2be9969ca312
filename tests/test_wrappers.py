"""Algorithm → Algorithm wrappers (llc_bench.samplers.wrappers): box clipping, initial noise, full batch, and their order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llc_bench.samplers.wrappers import clip_to_box, full_batch, initial_noise
from llc_bench.sampling import SamplingPosterior, _sampler_settings

D = 3
BOX = 0.03
SCALE = 0.02  # the box is 1.5 noise standard deviations wide on each side


def _posterior():
    kx, ky = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (64, D))
    y = jax.random.normal(ky, (64, 1))

    def loss(w, x, y):
        return 0.5 * jnp.sum((x @ w[:, None] - y) ** 2, axis=-1)

    return SamplingPosterior(loss, x, y, jnp.array([0.2, -0.1, 0.3]), 10.0, 1.0, 0.0)


def _algorithm(post, method="sgld", lr=10.0):
    spec, settings = _sampler_settings(method, lr=lr, batch_size=64, accumulation=1, noise_level=1.0,
                                       kwargs={}, aliased={})
    return spec.build(post, settings)


KEYS = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(4000))


def _start(algorithm, w_star):
    state, params, _ = jax.vmap(algorithm.warmup, in_axes=(0, None))(KEYS, w_star)
    return state, params, np.asarray(algorithm.position(state), np.float64) - np.asarray(w_star, np.float64)


def _steps(algorithm, state, params, batch, num_steps):
    """(num_steps, chains, d) positions after each step."""
    out = []
    for t in range(num_steps):
        keys = jax.vmap(lambda k, t=t: jax.random.fold_in(k, t))(KEYS)
        state, _ = jax.vmap(algorithm.step, in_axes=(0, 0, 0, None))(keys, state, params, batch)
        out.append(np.asarray(algorithm.position(state)))
    return np.stack(out)


@pytest.mark.parametrize("method", ["sgld", "rmsprop_sgld"])
def test_clip_to_box_keeps_every_position_in_the_box(method):
    post = _posterior()
    inner = _algorithm(post, method)
    boxed = clip_to_box(inner, post.w_star, BOX)
    state, params, start = _start(boxed, post.w_star)
    assert np.all(start == 0.0)  # w* is in the box: the warm-up starts exactly there
    w_star = np.asarray(post.w_star)
    positions = _steps(boxed, state, params, (post.x, post.y), 5)
    assert np.all(np.abs(positions - w_star) <= BOX + 1e-7)
    # ε = 10 throws the chains far out: most entries sit on a face of the box
    assert np.mean(np.isclose(np.abs(positions - w_star), BOX, rtol=0, atol=1e-7)) > 0.5
    # one step is exactly the inner step, then clip(w) = min(max(w, w* − box), w* + box)
    key = jax.random.key(5)
    s0, p0, _ = inner.warmup(key, post.w_star)
    unclipped = np.asarray(inner.position(inner.step(key, s0, p0, (post.x, post.y))[0]))
    clipped = np.asarray(boxed.position(boxed.step(key, s0, p0, (post.x, post.y))[0]))
    assert np.abs(unclipped - w_star).max() > BOX  # the clip had work to do
    np.testing.assert_array_equal(clipped, np.clip(unclipped, np.asarray(post.w_star - BOX),
                                                   np.asarray(post.w_star + BOX)))


def test_initial_noise_draws_the_documented_start():
    post = _posterior()
    inner = _algorithm(post)
    assert initial_noise(inner, 0.0) is inner and initial_noise(inner, None) is inner
    noisy = initial_noise(inner, SCALE)
    _, _, start = _start(noisy, post.w_star)
    # w* + scale · N(0, I): 12000 draws; SE of the mean 0.02/√12000 ≈ 1.8e-4, of the sd ≈ 1.3e-4
    assert abs(start.std() - SCALE) < 6e-4 and abs(start.mean()) < 8e-4
    assert np.abs(start).max() > 3.5 * SCALE  # untruncated tails
    # exactly: k1, k2 = split(key); start = w* + scale · normal(k1), warm-up with k2
    k1, _ = jax.random.split(KEYS[17])
    expected = post.w_star + SCALE * jax.random.normal(k1, (D,), post.w_star.dtype)
    np.testing.assert_allclose(start[17], np.asarray(expected - post.w_star, np.float64), rtol=0, atol=1e-7)
    # the steps are the inner algorithm's
    assert noisy.step is inner.step


def test_composition_order_decides_whether_the_start_is_clipped():
    post = _posterior()
    inner = _algorithm(post)
    noise_then_clip = initial_noise(clip_to_box(inner, post.w_star, BOX), SCALE)  # sample()'s order
    clip_then_noise = clip_to_box(initial_noise(inner, SCALE), post.w_star, BOX)
    state_a, params_a, a = _start(noise_then_clip, post.w_star)
    state_b, params_b, b = _start(clip_then_noise, post.w_star)
    # the same noise; only the first clips it: N(0, 0.02²) clipped at 1.5 sd has sd ≈ 0.0183
    np.testing.assert_allclose(a, np.clip(b, -BOX, BOX), atol=1e-7)
    assert np.abs(a).max() <= BOX + 1e-7 and 0.0175 < a.std() < 0.019
    assert np.abs(b).max() > BOX and abs(b.std() - SCALE) < 6e-4
    # after the first step both are in the box
    for algorithm, state, params in ((noise_then_clip, state_a, params_a), (clip_then_noise, state_b, params_b)):
        moved = _steps(algorithm, state, params, (post.x, post.y), 1)[0]
        assert np.abs(moved - np.asarray(post.w_star)).max() <= BOX + 1e-7


def test_full_batch_steps_on_all_points():
    post = _posterior()
    inner = _algorithm(post, lr=1e-3)
    whole = full_batch(inner, post.x, post.y)
    assert whole.batch_size is None and inner.batch_size == 64
    key = jax.random.key(3)
    state, params, _ = whole.warmup(key, post.w_star + 0.1)
    new_whole, info_whole = whole.step(key, state, params, None)
    new_inner, info_inner = inner.step(key, state, params, (post.x, post.y))
    np.testing.assert_array_equal(whole.position(new_whole), inner.position(new_inner))
    # the step's loss is L_n at its start: the full-data loss, not a minibatch's
    assert float(info_whole.loss) == pytest.approx(float(post.full_loss(post.w_star + 0.1)), rel=1e-6)
    assert float(info_whole.loss) == float(info_inner.loss)
