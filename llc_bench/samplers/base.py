"""The one interface every sampler implements: a pure (warmup, step) pair over a flat position, vmapped by the runner."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from llc_bench.posterior import Posterior

# (x_batch (m, in_dim), y_batch (m, out_dim)) for minibatch samplers; None for full-batch ones.
Batch = tuple[jax.Array, jax.Array] | None


# step_size = "auto" (SG samplers): ε = c / (curvature + gradient noise) of −log π, at w* and again
# where the chains are after burn-in (llc_bench.curvature). Along every direction the stationary
# variance is then biased by at most ≈ c/4 to first order (2.5% at c = 0.1): discretization plus
# minibatch noise. Measured (README, "Automatic step size"): λ̂ of λ = d/2 regression +1.6% ± 0.5%
# (c = 0.1) and +3.9% (c = 0.2); two deep linear networks (λ = 10, 30k steps) −0.9% ± 3.0% and
# −1.1% ± 1.4% at c = 0.1. Smaller c mixes more slowly (more steps: see not_converged).
AUTO = "auto"
AUTO_STEP_CONSTANT = 0.1


def is_auto(step_size) -> bool:
    return isinstance(step_size, str) and step_size == AUTO


def check_step_size(step_size, auto_constant: float = AUTO_STEP_CONSTANT) -> None:
    """A step size is a finite number > 0 or "auto"; anything else is a ValueError saying so.

    auto_constant (c of "auto") must lie in (0, 4): ε κ < 4 is the stability limit.
    """
    if not (isinstance(auto_constant, int | float) and 0 < auto_constant < 4):
        raise ValueError(f"auto_constant must lie in (0, 4) (ε·curvature < 4 is the stability limit), "
                         f"got {auto_constant!r}")
    if is_auto(step_size):
        return
    ok = isinstance(step_size, int | float) and not isinstance(step_size, bool)
    if not (ok and math.isfinite(step_size) and step_size > 0):
        raise ValueError(f'step_size must be a finite number > 0 or "auto", got {step_size!r}')


class StepSizeParams(NamedTuple):
    """The tuned parameters of an SG sampler: its ε (per chain). step_size = "auto" re-measures it
    after burn-in (Algorithm.retune), so the step reads it from here, not from the settings."""

    step_size: jax.Array  # ()


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
    end_burnin(state) -> state, or None
        Called once on every chain's state after the last burn-in step (e.g. RMSProp-SGLD freezes
        its preconditioner there); None: nothing changes between burn-in and drawing.
    retune(states (C, ...), params (C, ...), alive (C,) bool) -> params, or None
        Called once on the host after end_burnin, before the first draw, with every chain's state:
        step_size = "auto" re-measures the curvature where the chains are (llc_bench.curvature).
    notes: what the sampler measured on the host (step_size = "auto": a curvature.AutoStep), or None.
    """

    warmup: Callable[[jax.Array, jax.Array], tuple[Any, Any, jax.Array]]
    step: Callable[[jax.Array, Any, Any, Batch], tuple[Any, StepInfo]]
    position: Callable[[Any], jax.Array]
    batch_size: int | None  # minibatch size m for SG samplers; None = full batch
    end_burnin: Callable[[Any], Any] | None = None
    retune: Callable[[Any, Any, Any], Any] | None = None
    notes: Any = None


class SamplerSpec(NamedTuple):
    """Registry entry: a settings dataclass (frozen, with defaults) and a builder."""

    name: str
    settings: type
    build: Callable[[Posterior, Any], Algorithm]
    description: str
