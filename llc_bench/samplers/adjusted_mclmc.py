"""Full-batch Metropolis-adjusted MCLMC (BlackJAX adjusted_mclmc_dynamic), tuned per chain by adjusted_mclmc_find_L_and_step_size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.adaptation.mclmc_adaptation import MCLMCAdaptationState
from blackjax.mcmc.adjusted_mclmc_dynamic import make_random_trajectory_length_fn

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import (
    AT_LEAST_ONE,
    OPEN_UNIT,
    STEP_TUNED,
    Algorithm,
    SamplerSpec,
    StepInfo,
    bind,
    setting,
    validate_settings,
)
from llc_bench.samplers.mclmc import (
    GRADS_PER_INTEGRATOR_STEP,
    INTEGRATOR,
    centered_logdensity,
    curvature_probe,
    initial_params,
    safe_variances,
)

START_FACTOR = 1.0


@dataclass(frozen=True)
class AdjustedMCLMCSettings:
    """Adjusted-MCLMC settings. Step size, trajectory length L and diagonal M⁻¹ are tuned.

    num_tuning_steps is the tuner's `num_steps`; with its default fractions (0.1, 0.1, 0) it runs
    0.3·num_tuning_steps proposals (two dual-averaging passes).

    scale_probe: start the tuner at ε₀ = ¼√d/√λ_max, λ_max the largest curvature of −log π at the
    start (scale_probe_iters gradients; see mclmc.initial_params), instead of BlackJAX's
    unit-scale ε₀ = 0.2√d.
    """

    num_tuning_steps: int = setting(2000, AT_LEAST_ONE)
    target_accept: float = setting(0.9, OPEN_UNIT)  # dual-averaging target for the Metropolis acceptance
    diagonal_preconditioning: bool = True
    scale_probe: bool = True
    scale_probe_iters: int = setting(10, AT_LEAST_ONE)

    def __post_init__(self):
        validate_settings(self)


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
    second dual-averaging pass. As in mclmc: the chain runs in δ = w − w* (float32 variance
    estimates), the tuner starts from the posterior's curvature scale (settings.scale_probe) and
    M⁻¹ is floored positive. Metropolis-exact stationary law. Work: 2 gradients per integration
    step; warm-up 1 + scale-probe gradients + 2·(integration steps of every tuning proposal, as
    the tuner sums them). energy_change is NaN: BlackJAX's info keeps only the potential part of ΔE.
    """
    return bind(make, posterior, settings)


def make(posterior: Posterior, settings: AdjustedMCLMCSettings, hyper=()) -> Algorithm:
    """`build`'s algorithm on `posterior` (concrete, or traced inside the runner); nothing in hyper."""
    del hyper
    kernel = blackjax.adjusted_mclmc_dynamic.build_kernel(
        integration_steps_fn=make_random_trajectory_length_fn(random_trajectory_length=True),
        integrator=INTEGRATOR,
    )
    logdensity = centered_logdensity(posterior)
    w_star = jnp.asarray(posterior.w_star)
    dim, gamma = posterior.dim, posterior.gamma
    probe_grads = settings.scale_probe_iters if settings.scale_probe else 0

    def warmup(rng_key, position):
        init_key, tune_key, probe_key = jax.random.split(rng_key, 3)
        # random_generator_arg: the key that draws each transition's number of integration steps
        state = blackjax.adjusted_mclmc_dynamic.init(position - w_star, logdensity, init_key)
        floor_curv = jnp.maximum(gamma, 1e-8)  # γ may be traced
        if settings.scale_probe:
            lam = curvature_probe(logdensity, state.position, state.logdensity_grad, probe_key,
                                  settings.scale_probe_iters, floor_curv)
            L0, eps0 = initial_params(dim, gamma, lam, step_factor=START_FACTOR)
            params0 = MCLMCAdaptationState(L0, eps0, jnp.ones((dim,), state.position.dtype))
        else:
            lam = jnp.asarray(floor_curv, state.position.dtype)
            params0 = None
        state, tuned, num_integrator_steps = blackjax.adjusted_mclmc_find_L_and_step_size(
            mclmc_kernel=kernel,
            logdensity_fn=logdensity,
            num_steps=settings.num_tuning_steps,
            state=state,
            rng_key=tune_key,
            target=settings.target_accept,
            diagonal_preconditioning=settings.diagonal_preconditioning,
            params=params0,
        )
        imm = jnp.broadcast_to(jnp.asarray(tuned.inverse_mass_matrix), (dim,))
        if settings.diagonal_preconditioning:
            imm = safe_variances(imm, 1e-4 / lam)
        params = AdjustedMCLMCParams(jnp.asarray(tuned.step_size), jnp.asarray(tuned.L), imm)
        # the tuner sums info.num_integration_steps over every proposal it made: exact
        grad_evals = 1 + probe_grads + GRADS_PER_INTEGRATOR_STEP * jnp.asarray(num_integrator_steps)
        return state, params, grad_evals.astype(jnp.float32)

    def step(rng_key, state, params: AdjustedMCLMCParams, batch):
        del batch  # full batch
        new_state, info = kernel(rng_key, state, logdensity, params.step_size,
                                 inverse_mass_matrix=params.inverse_mass_matrix,
                                 integration_steps_params=(params.L / params.step_size,))
        nan = jnp.full((), jnp.nan, new_state.logdensity.dtype)
        position = new_state.position + w_star
        return new_state, StepInfo(
            loss=posterior.loss_from_logdensity(position, new_state.logdensity),
            accept=info.acceptance_rate,
            energy_change=nan,
            diverging=info.is_divergent,
            grad_evals=(GRADS_PER_INTEGRATOR_STEP * info.num_integration_steps).astype(jnp.float32),
        )

    return Algorithm(warmup=warmup, step=step, position=lambda state: state.position + w_star,
                     batch_size=None)


SPEC = SamplerSpec(
    name="adjusted_mclmc",
    settings=AdjustedMCLMCSettings,
    build=build,
    description="Full-batch Metropolis-adjusted MCLMC (random trajectory lengths), tuned step size, L and diagonal mass",
    minibatch=False,
    metropolis=True,
    step_size=STEP_TUNED,
)
