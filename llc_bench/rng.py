"""Named random streams: one typed JAX key per pipeline stage, derived from a single integer seed."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

# The position of a name is its fold-in index: append new streams, never reorder, or old seeds change.
STREAMS = ("data", "teacher", "init", "training", "sampling", "projection", "noise", "restart", "step_bias", "restart_probe")


def stream_key(seed: int, name: str) -> jax.Array:
    """key(seed) folded with STREAMS.index(name).

    Stages draw from separate streams so that changing, say, the number of samplers does not shift
    the data or the teacher: the same seed gives bit-identical inputs to every stage.
    """
    if name not in STREAMS:
        raise ValueError(f"unknown random stream {name!r}; known: {', '.join(STREAMS)}")
    return jax.random.fold_in(jax.random.key(seed), STREAMS.index(name))


def sampler_key(seed: int, name: str, stream: str = "sampling") -> jax.Array:
    """Each sampler's chains get their own stream, stable when other samplers are added or removed
    (`stream` "restart": the chains of the over-dispersed restart, llc_bench.restart; "restart_probe":
    the short runs that choose its scale)."""
    return jax.random.fold_in(stream_key(seed, stream), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def chain_keys(key: jax.Array, num_chains: int) -> jax.Array:
    """(num_chains,) keys, key_c = fold_in(key, c).

    fold_in rather than split so that chain c's key does not depend on how many chains run:
    rerunning with more chains reproduces the first ones exactly.
    """
    return jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(num_chains, dtype=jnp.uint32))
