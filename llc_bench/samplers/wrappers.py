"""Algorithm → Algorithm wrappers that compose (like Optax's `chain`): box clipping, initial noise, full batch.

Each takes an `Algorithm` (llc_bench.samplers.base) and returns one with the same interface, so
they nest in any order; the order is part of the meaning. sample() builds

    full_batch(initial_noise(clip_to_box(algorithm, w_star, box), scale), x, y)

(each only when its option is set): the noisy start is drawn first and then clipped into the box,
and every step is clipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llc_bench.samplers.base import Algorithm


def set_position(state, position: jax.Array):
    """`state` with its position replaced: the state itself for samplers whose state is the position
    (SGLD), else a NamedTuple's `position` field."""
    if isinstance(state, jax.Array):
        return position
    if hasattr(state, "_replace") and "position" in getattr(state, "_fields", ()):
        return state._replace(position=position)
    raise ValueError(f"bounding_box_size: cannot set the position of a {type(state).__name__} state")


def clip_to_box(algorithm: Algorithm, w_star: jax.Array, box: float) -> Algorithm:
    """Keep every position in the box [w* − box, w* + box] (elementwise).

    warmup(key, w) = inner.warmup(key, clip(w)); step: the inner step, then the new state's position
    replaced by clip(position), with clip(w) = min(max(w, w* − box), w* + box). Nothing else of the
    state (momentum, preconditioner) changes; StepInfo is the inner step's. A position already in the
    box is returned bit for bit, so from w* the warm-up is the inner one's.
    """
    inner_warmup, inner_step, position_of = algorithm.warmup, algorithm.step, algorithm.position

    def clip(w):
        return jnp.clip(w, w_star - box, w_star + box)

    def warmup(rng_key, position):
        return inner_warmup(rng_key, clip(position))

    def step(rng_key, state, params, batch):
        state, info = inner_step(rng_key, state, params, batch)
        return set_position(state, clip(position_of(state))), info

    return algorithm._replace(warmup=warmup, step=step)


def initial_noise(algorithm: Algorithm, scale: float) -> Algorithm:
    """Start each chain at w + scale · η, η ~ N(0, I), instead of at the position it is given (w*).

    warmup(key, w) = inner.warmup(k2, w + scale · normal(k1, w.shape)) with (k1, k2) = split(key);
    step is unchanged. scale = 0 returns `algorithm` itself (the key is then not split).
    """
    if not scale:
        return algorithm
    inner_warmup = algorithm.warmup

    def warmup(rng_key, position):
        noise_key, key = jax.random.split(rng_key)
        return inner_warmup(key, position + scale * jax.random.normal(noise_key, position.shape, position.dtype))

    return algorithm._replace(warmup=warmup)


def full_batch(algorithm: Algorithm, x: jax.Array, y: jax.Array) -> Algorithm:
    """An SG algorithm whose every step gets all n points: step(key, state, params, batch) =
    inner.step(key, state, params, (x, y)), and batch_size None, so the runner draws no indices."""
    inner_step = algorithm.step

    def step(rng_key, state, params, batch):
        del batch  # None: the runner treats batch_size None as a full-batch sampler
        return inner_step(rng_key, state, params, (x, y))

    return algorithm._replace(step=step, batch_size=None)
