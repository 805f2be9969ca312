"""Full-batch HMC on the local posterior, tuned per chain by BlackJAX's Stan-style window adaptation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.adaptation.base import get_filter_adapt_info_fn
from blackjax.mcmc import metrics

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import (
    AT_LEAST_ONE,
    OPEN_UNIT,
    STEP_TUNED,
    Algorithm,
    Range,
    SamplerSpec,
    StepInfo,
    bind,
    setting,
    validate_settings,
)

# Velocity Verlet (window_adaptation's and hmc/nuts' default integrator) evaluates the
# gradient once per leapfrog step: the end-of-step gradient is reused at the next start.
GRADS_PER_LEAPFROG = 1


@dataclass(frozen=True)
class HMCSettings:
    """HMC settings. Step size and diagonal inverse mass matrix are tuned, not set."""

    num_warmup: int = setting(500, AT_LEAST_ONE)  # window-adaptation steps (each costs num_integration_steps grads)
    num_integration_steps: int = setting(16, AT_LEAST_ONE)  # leapfrog steps per draw, fixed
    target_accept: float = setting(0.8, OPEN_UNIT)  # dual-averaging target for the Metropolis acceptance
    # Each draw uses ε·(1 + frac_jitter·U(−1, 1)). A fixed ε·L can sit near a half-period of
    # some direction of a near-Gaussian posterior, which then maps w − μ to −(w − μ) and never
    # changes |w − μ|: second moments (hence λ̂) freeze per chain. 0 = plain BlackJAX HMC.
    frac_jitter: float = setting(0.2, Range(0, 1, low_closed=True))

    def __post_init__(self):
        validate_settings(self)


class HMCParams(NamedTuple):
    """What window adaptation found for one chain."""

    step_size: jax.Array  # ()
    inverse_mass_matrix: jax.Array  # (d,) diagonal


def hmc_step_info(posterior: Posterior, state, new_state, info, params: HMCParams, num_leapfrog) -> StepInfo:
    """StepInfo of one HMC/NUTS transition from `state` to `new_state` with `num_leapfrog` steps."""
    return StepInfo(
        loss=posterior.loss_from_logdensity(new_state.position, new_state.logdensity),
        accept=info.acceptance_rate,
        energy_change=hmc_energy_change(info, state.logdensity, params.inverse_mass_matrix),
        diverging=info.is_divergent,
        grad_evals=jnp.asarray(GRADS_PER_LEAPFROG * num_leapfrog, jnp.float32),
    )


def hmc_energy_change(info, previous_logdensity: jax.Array, inverse_mass_matrix: jax.Array) -> jax.Array:
    """H(proposal) − H(start) of one HMC/NUTS transition (Metropolis uses exp of minus this).

    H(start) = −log π(w) + ½ pᵀ M⁻¹ p with the momentum drawn for this transition; costs O(d).
    """
    kinetic = metrics.default_metric(inverse_mass_matrix).kinetic_energy(info.momentum)
    return info.energy - (-previous_logdensity + kinetic)


def window_warmup(posterior: Posterior, algorithm, num_warmup: int, target_accept: float,
                  **kernel_parameters):
    """A warmup(rng_key, position) running blackjax.window_adaptation on one chain.

    Returns (state, HMCParams, grad_evals) with grad_evals = 1 (initial value_and_grad)
    + Σ over warm-up steps of info.num_integration_steps (one gradient per leapfrog step).
    """
    adaptation = blackjax.window_adaptation(
        algorithm,
        posterior.logdensity,
        is_mass_matrix_diagonal=True,
        target_acceptance_rate=target_accept,
        # keep only the per-step leapfrog count: the default keeps every state and proposal
        adaptation_info_fn=get_filter_adapt_info_fn(info_keys={"num_integration_steps"}),
        **kernel_parameters,
    )

    def warmup(rng_key, position):
        (state, parameters), info = adaptation.run(rng_key, position, num_steps=num_warmup)
        params = HMCParams(jnp.asarray(parameters["step_size"]),
                           jnp.asarray(parameters["inverse_mass_matrix"]))
        leapfrogs = jnp.sum(jnp.asarray(info.info.num_integration_steps))
        grad_evals = (1 + GRADS_PER_LEAPFROG * leapfrogs).astype(jnp.float32)
        return state, params, grad_evals

    return warmup


def build(posterior: Posterior, settings: HMCSettings) -> Algorithm:
    """HMC with a fixed number of velocity-Verlet leapfrog steps and a Metropolis correction.

    Each draw: p ~ N(0, M), L = num_integration_steps leapfrog steps of size
    ε·(1 + frac_jitter·U(−1, 1)), accept with probability min(1, exp(−ΔH)). ε and the diagonal
    M⁻¹ are tuned per chain by Stan's window adaptation (dual averaging to `target_accept`;
    M⁻¹ = windowed sample variances; no jitter during warm-up). Work: L gradients per draw;
    warm-up 1 + num_warmup·L.
    """
    return bind(make, posterior, settings)


def make(posterior: Posterior, settings: HMCSettings, hyper=()) -> Algorithm:
    """`build`'s algorithm on `posterior` (concrete, or traced inside the runner); nothing in hyper."""
    del hyper
    kernel = blackjax.hmc.build_kernel()
    n_leapfrog = settings.num_integration_steps

    def step(rng_key, state, params: HMCParams, batch):
        del batch  # full batch
        step_size = params.step_size
        if settings.frac_jitter > 0:
            rng_key, jitter_key = jax.random.split(rng_key)
            step_size = step_size * (1 + settings.frac_jitter * jax.random.uniform(jitter_key, minval=-1, maxval=1))
        new_state, info = kernel(rng_key, state, posterior.logdensity, step_size,
                                 params.inverse_mass_matrix, n_leapfrog)
        return new_state, hmc_step_info(posterior, state, new_state, info, params, n_leapfrog)

    warmup = window_warmup(posterior, blackjax.hmc, settings.num_warmup, settings.target_accept,
                           num_integration_steps=n_leapfrog)
    return Algorithm(warmup=warmup, step=step, position=lambda state: state.position, batch_size=None)


SPEC = SamplerSpec(
    name="hmc",
    settings=HMCSettings,
    build=build,
    description="Full-batch HMC (velocity Verlet, fixed steps, jittered ε), window-adapted step size and diagonal mass",
    minibatch=False,
    metropolis=True,
    step_size=STEP_TUNED,
)
