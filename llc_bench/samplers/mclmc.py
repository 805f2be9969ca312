"""Full-batch unadjusted MCLMC on the local posterior, tuned per chain by blackjax.mclmc_find_L_and_step_size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.mcmc import integrators

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import Algorithm, SamplerSpec, StepInfo
from llc_bench.samplers.hmc import loss_from_logdensity

# The isokinetic McLachlan integrator (BlackJAX's MCLMC default) alternates momentum and
# position updates with coefficients (b1, a1, b2, a1, b1); each position update costs one
# value_and_grad, so one integrator step costs 2 gradient evaluations.
INTEGRATOR = integrators.isokinetic_mclachlan
GRADS_PER_INTEGRATOR_STEP = len(integrators.mclachlan_coefficients) // 2


@dataclass(frozen=True)
class MCLMCSettings:
    """MCLMC settings. L, step size and the diagonal preconditioner are tuned, not set.

    num_tuning_steps is the tuner's `num_steps`: its three phases run frac_tune1, frac_tune2
    (plus a third of it again with diagonal preconditioning) and frac_tune3 of it.
    """

    num_tuning_steps: int = 2000
    diagonal_preconditioning: bool = True
    desired_energy_var: float = 5e-4  # target Var[energy change] per dimension (sets the step size)
    frac_tune1: float = 0.1  # step size only
    frac_tune2: float = 0.1  # step size + posterior variances (→ L, preconditioner)
    frac_tune3: float = 0.1  # L from the autocorrelation time (skipped if it gives < 2 steps)

    def __post_init__(self):
        if self.num_tuning_steps < 1 or self.desired_energy_var <= 0:
            raise ValueError("num_tuning_steps and desired_energy_var must be positive")
        for f in (self.frac_tune1, self.frac_tune2, self.frac_tune3):
            if not 0.0 <= f <= 1.0:
                raise ValueError("frac_tune* must lie in [0, 1]")


class MCLMCParams(NamedTuple):
    """What the MCLMC tuner found for one chain."""

    L: jax.Array  # () momentum decoherence length
    step_size: jax.Array  # ()
    inverse_mass_matrix: jax.Array  # (d,) diagonal (ones without preconditioning)


def mclmc_tuning_steps(settings: MCLMCSettings) -> int:
    """Integrator steps blackjax.mclmc_find_L_and_step_size actually runs for these settings.

    Mirrors its phase lengths. Computed here rather than taken from the tuner's third return
    value, which counts num_steps2 // 3 re-tuning steps where round(num_steps2 / 3) are run.
    """
    n = settings.num_tuning_steps
    n1, n2, n3 = (round(n * f) for f in (settings.frac_tune1, settings.frac_tune2, settings.frac_tune3))
    retune = round(n2 / 3) if settings.diagonal_preconditioning and n2 > 1 else 0
    return n1 + n2 + retune + (n3 if n3 >= 2 else 0)


def mclmc_warmup_grad_evals(settings: MCLMCSettings) -> int:
    """1 (initial value_and_grad) + 2 gradients per tuning step."""
    return 1 + GRADS_PER_INTEGRATOR_STEP * mclmc_tuning_steps(settings)


def build(posterior: Posterior, settings: MCLMCSettings) -> Algorithm:
    """Unadjusted microcanonical Langevin Monte Carlo (Robnik et al.), no Metropolis step.

    Each step: one isokinetic McLachlan step of size ε with unit-speed momentum u (velocity
    scaled by the diagonal M⁻¹), then partial momentum refresh u ← (c u + √(1−c²) z)/‖·‖,
    c = exp(−ε/L). Tuning per chain: ε so that Var[ΔE]/d ≈ desired_energy_var, M⁻¹ = posterior
    variances, L from the autocorrelation time. The stationary law is biased by O(ε); the
    energy-variance target controls it. Work: 2 gradients per step; warm-up
    mclmc_warmup_grad_evals(settings). `diverging` flags steps BlackJAX rejected for NaNs.
    """
    kernel = blackjax.mclmc.build_kernel(integrator=INTEGRATOR,
                                         desired_energy_var=settings.desired_energy_var)
    warmup_grad_evals = mclmc_warmup_grad_evals(settings)

    def warmup(rng_key, position):
        init_key, tune_key = jax.random.split(rng_key)
        state = blackjax.mclmc.init(position, posterior.logdensity, init_key)
        state, tuned, _ = blackjax.mclmc_find_L_and_step_size(
            mclmc_kernel=kernel,
            num_steps=settings.num_tuning_steps,
            state=state,
            rng_key=tune_key,
            logdensity_fn=posterior.logdensity,
            frac_tune1=settings.frac_tune1,
            frac_tune2=settings.frac_tune2,
            frac_tune3=settings.frac_tune3,
            desired_energy_var=settings.desired_energy_var,
            diagonal_preconditioning=settings.diagonal_preconditioning,
        )
        dim = posterior.dim
        params = MCLMCParams(
            jnp.asarray(tuned.L), jnp.asarray(tuned.step_size),
            # without preconditioning the tuner leaves its initial ones(d) in place
            jnp.broadcast_to(jnp.asarray(tuned.inverse_mass_matrix), (dim,)),
        )
        return state, params, jnp.float32(warmup_grad_evals)

    def step(rng_key, state, params: MCLMCParams, batch):
        del batch  # full batch
        new_state, info = kernel(rng_key, state, posterior.logdensity, params.inverse_mass_matrix,
                                 params.L, params.step_size)
        return new_state, StepInfo(
            loss=loss_from_logdensity(posterior, new_state.position, new_state.logdensity),
            accept=jnp.full((), jnp.nan, new_state.logdensity.dtype),
            energy_change=info.energy_change,
            diverging=jnp.logical_not(info.nonans),
            grad_evals=jnp.float32(GRADS_PER_INTEGRATOR_STEP),
        )

    return Algorithm(warmup=warmup, step=step, position=lambda state: state.position, batch_size=None)


SPEC = SamplerSpec(
    name="mclmc",
    settings=MCLMCSettings,
    build=build,
    description="Full-batch unadjusted MCLMC (isokinetic McLachlan), tuned L, step size and diagonal preconditioner",
)
