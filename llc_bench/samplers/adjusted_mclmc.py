"""Full-batch Metropolis-adjusted MCLMC (BlackJAX adjusted_mclmc_dynamic), tuned per chain by adjusted_mclmc_find_L_and_step_size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.mcmc.adjusted_mclmc_dynamic import make_random_trajectory_length_fn

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import Algorithm, SamplerSpec, StepInfo
from llc_bench.samplers.hmc import loss_from_logdensity
from llc_bench.samplers.mclmc import GRADS_PER_INTEGRATOR_STEP, INTEGRATOR


@dataclass(frozen=True)
class AdjustedMCLMCSettings:
    """Adjusted-MCLMC settings. Step size, trajectory length L and diagonal M⁻¹ are tuned.

    num_tuning_steps is the tuner's `num_steps`; with its default fractions (0.1, 0.1, 0) it runs
    0.3·num_tuning_steps proposals (two dual-averaging passes).
    """

    num_tuning_steps: int = 2000
    target_accept: float = 0.9  # dual-averaging target for the Metropolis acceptance
    diagonal_preconditioning: bool = True

    def __post_init__(self):
        if self.num_tuning_steps < 1:
            raise ValueError("num_tuning_steps must be >= 1")
        if not 0.0 < self.target_accept < 1.0:
            raise ValueError("target_accept must lie in (0, 1)")


class AdjustedMCLMCParams(NamedTuple):
    """What the adjusted-MCLMC tuner found for one chain."""

    step_size: jax.Array  # ()
    L: jax.Array  # () mean trajectory length; mean integration steps per proposal = L / step_size
    inverse_mass_matrix: jax.Array  # (d,) diagonal (ones without preconditioning)


def build(posterior: Posterior, settings: AdjustedMCLMCSettings) -> Algorithm:
    """Metropolis-adjusted microcanonical HMC with randomized trajectory lengths.

    Each step: draw a fresh unit-speed momentum, run N isokinetic McLachlan steps of size ε
    (velocity scaled by the diagonal M⁻¹) with N = ⌈U·s⌉, U ~ U(0, 1), s chosen so that
    E[N] = L/ε, then accept with probability min(1, exp(−ΔE)); no refresh inside the trajectory.
    Random N breaks the periodicity a fixed trajectory length would have. Tuning per chain
    (adjusted_mclmc_find_L_and_step_size, frac_tune 0.1/0.1/0): dual averaging of ε to
    `target_accept` with L/ε pinned at 2 (BlackJAX's default), posterior variances → M⁻¹, then a
    second dual-averaging pass. Metropolis-exact stationary law. Work: 2 gradients per
    integration step; warm-up 1 + 2·(integration steps of every tuning proposal, as the tuner
    sums them). energy_change is NaN: BlackJAX's info keeps only the potential part of ΔE.
    """
    kernel = blackjax.adjusted_mclmc_dynamic.build_kernel(
        integration_steps_fn=make_random_trajectory_length_fn(random_trajectory_length=True),
        integrator=INTEGRATOR,
    )

    def warmup(rng_key, position):
        init_key, tune_key = jax.random.split(rng_key)
        # random_generator_arg: the key that draws each transition's number of integration steps
        state = blackjax.adjusted_mclmc_dynamic.init(position, posterior.logdensity, init_key)
        state, tuned, num_integrator_steps = blackjax.adjusted_mclmc_find_L_and_step_size(
            mclmc_kernel=kernel,
            logdensity_fn=posterior.logdensity,
            num_steps=settings.num_tuning_steps,
            state=state,
            rng_key=tune_key,
            target=settings.target_accept,
            diagonal_preconditioning=settings.diagonal_preconditioning,
        )
        params = AdjustedMCLMCParams(
            jnp.asarray(tuned.step_size), jnp.asarray(tuned.L),
            jnp.broadcast_to(jnp.asarray(tuned.inverse_mass_matrix), (posterior.dim,)),
        )
        # the tuner sums info.num_integration_steps over every proposal it made: exact
        grad_evals = 1 + GRADS_PER_INTEGRATOR_STEP * jnp.asarray(num_integrator_steps)
        return state, params, grad_evals.astype(jnp.float32)

    def step(rng_key, state, params: AdjustedMCLMCParams, batch):
        del batch  # full batch
        new_state, info = kernel(rng_key, state, posterior.logdensity, params.step_size,
                                 inverse_mass_matrix=params.inverse_mass_matrix,
                                 integration_steps_params=(params.L / params.step_size,))
        nan = jnp.full((), jnp.nan, new_state.logdensity.dtype)
        return new_state, StepInfo(
            loss=loss_from_logdensity(posterior, new_state.position, new_state.logdensity),
            accept=info.acceptance_rate,
            energy_change=nan,
            diverging=info.is_divergent,
            grad_evals=(GRADS_PER_INTEGRATOR_STEP * info.num_integration_steps).astype(jnp.float32),
        )

    return Algorithm(warmup=warmup, step=step, position=lambda state: state.position, batch_size=None)


SPEC = SamplerSpec(
    name="adjusted_mclmc",
    settings=AdjustedMCLMCSettings,
    build=build,
    description="Full-batch Metropolis-adjusted MCLMC (random trajectory lengths), tuned step size, L and diagonal mass",
)
