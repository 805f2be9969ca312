"""The one interface every sampler implements: a pure (warmup, step) pair over a flat position, vmapped by the runner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from llc_bench.posterior import Posterior

# (x_batch (m, in_dim), y_batch (m, out_dim)) for minibatch samplers; None for full-batch ones.
Batch = tuple[jax.Array, jax.Array] | None


class StepInfo(NamedTuple):
    """Per-step scalars, identical fields for every sampler (NaN where a field does not apply)."""

    # SG samplers: minibatch L_m at the position the step started from (the loss the gradient used,
    # as in the guide's loss traces); full-batch samplers: full-data L_n at the new position.
    loss: jax.Array
    accept: jax.Array  # Metropolis acceptance probability (NaN for unadjusted samplers)
    energy_change: jax.Array  # MCLMC energy change / HMC energy error (NaN where not applicable)
    diverging: jax.Array  # bool: the sampler's own divergence flag (HMC/NUTS); False otherwise
    grad_evals: jax.Array  # work of this step in full-data gradient equivalents (SGLD: m/n)


def minibatch_step_info(loss: jax.Array, batch_size: int, n: int) -> StepInfo:
    """StepInfo of an unadjusted minibatch step: no acceptance or energy, work m/n of a full gradient."""
    nan = jnp.full((), jnp.nan, loss.dtype)
    return StepInfo(loss=loss, accept=nan, energy_change=nan, diverging=jnp.zeros((), bool),
                    grad_evals=jnp.asarray(batch_size / n, loss.dtype))


class Algorithm(NamedTuple):
    """A sampler bound to one posterior and its settings. All functions act on ONE chain.

    warmup(rng_key, position) -> (state, params, warmup_grad_evals)
        Initialization and any tuning (window adaptation, MCLMC tuner). `params` holds what tuning
        found (step size, mass matrix, L, ...) as a pytree of arrays; () if nothing is tuned.
    step(rng_key, state, params, batch) -> (state, StepInfo)
    position(state) -> flat (d,) position
    """

    warmup: Callable[[jax.Array, jax.Array], tuple[Any, Any, jax.Array]]
    step: Callable[[jax.Array, Any, Any, Batch], tuple[Any, StepInfo]]
    position: Callable[[Any], jax.Array]
    batch_size: int | None  # minibatch size m for SG samplers; None = full batch


class SamplerSpec(NamedTuple):
    """Registry entry: a settings dataclass (frozen, with defaults) and a builder."""

    name: str
    settings: type
    build: Callable[[Posterior, Any], Algorithm]
    description: str
