"""SGHMC: stochastic-gradient Hamiltonian Monte Carlo with constant friction, in SGLD's ε convention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import (
    AUTO_CONSTANT,
    AUTO_STEP_CONSTANT,
    POSITIVE,
    STEP_EPSILON,
    STEP_SIZE,
    Algorithm,
    Range,
    SamplerSpec,
    SettingError,
    StepSizeParams,
    bind,
    minibatch_step_info,
    numeric_step_size,
    setting,
    validate_settings,
)


@dataclass(frozen=True)
class SGHMCSettings:
    """step_size is ε as in SGLD (η = ε/2 is Chen et al.'s learning rate) or "auto"; alpha is the
    friction per step a (the momentum keeps 1 − a of itself each step); noise_estimate is β̂, the
    part of the friction that the minibatch gradient noise is assumed to supply (0 <= β̂ < a).

    step_size = "auto": SGLD's ε = c / (nβ h_max + γ + nβ² s²_max/m) (llc_bench.curvature). It
    bounds the discretization bias by c/4 for every a; the minibatch-noise part of the bias grows
    as 1/a (see `build`), so a small friction needs a matching noise_estimate or a larger batch.
    """

    step_size: float | str = setting(1e-4, STEP_SIZE)
    batch_size: int = setting(256, POSITIVE)
    alpha: float = setting(0.1, Range(0, 1, high_closed=True))
    noise_estimate: float = setting(0.0, Range(0, low_closed=True))
    auto_constant: float = setting(AUTO_STEP_CONSTANT, AUTO_CONSTANT)  # c of step_size = "auto"

    def __post_init__(self):
        validate_settings(self)
        if not self.noise_estimate < self.alpha:
            raise SettingError("noise_estimate", f"must be < alpha = {self.alpha:g}: the injected noise "
                               f"variance 2(alpha − noise_estimate)·η must be positive (got {self.noise_estimate!r})")


class MomentumState(NamedTuple):
    position: jax.Array  # (d,)
    momentum: jax.Array  # (d,) p in units of its stationary standard deviation: p ~ N(0, I)


def initial_state(rng_key, position) -> MomentumState:
    """The position with a momentum drawn from its stationary law N(0, I)."""
    return MomentumState(position, jax.random.normal(rng_key, position.shape, position.dtype))


def build(posterior: Posterior, settings: SGHMCSettings) -> Algorithm:
    """SGHMC on one chain, minibatch (x_b, y_b) of size m supplied by the runner; η = ε/2, a = alpha,
    β̂ = noise_estimate, ∇U = γ (w − w*) + nβ ∇L_m(w):

        p ← (1 − a) p − √η ∇U(w) + √(2(a − β̂)) ξ,   ξ ~ N(0, I)
        w ← w + √η p

    i.e. with v = √η p Chen et al. (2014)'s update v ← (1 − a) v − η ∇U + N(0, 2(a − β̂)η),
    w ← w + v: the momentum is kicked at the current position, then the position drifts with the
    new momentum (symplectic Euler). a = 1, β̂ = 0 is SGLD with the same ε exactly. On a Gaussian
    of curvature κ the stationary variance along an eigen-direction is (1/κ) / (1 − εκ/(4(2 − a)))
    (≤ SGLD's bias εκ/4; stable for εκ < 4(2 − a)); minibatch noise of variance V in ∇U adds
    ≈ εV/(4a) to first order, which β̂ = εV/4 cancels. Time per step is √η: a direction of
    curvature κ relaxes in ≈ 1/a steps when underdamped, ≈ a/(ηκ) when overdamped, against SGLD's
    1/(ηκ). BlackJAX's sghmc kernel redraws p at every call and its integrator moves w with the
    old momentum and kicks p with the gradient at the old position (forward Euler, stable only for
    ηκ < a), so it is not used here.

    ε rides per chain in params (StepSizeParams) so that step_size = "auto" can re-measure it after
    burn-in (llc_bench.curvature.build_algorithm); p is in units of √η, so a new ε leaves it
    stationary. State = (w, p) with p ~ N(0, I) at warm-up. StepInfo.loss is L_m at the position
    before the step; grad_evals = m/n.
    """
    return bind(make, posterior, settings, StepSizeParams(numeric_step_size(settings, "sghmc")))


def make(posterior: Posterior, settings: SGHMCSettings, hyper: StepSizeParams) -> Algorithm:
    """`build`'s algorithm with ε = hyper.step_size (a float, or traced inside the runner)."""
    a, noise_estimate = settings.alpha, settings.noise_estimate
    n_beta, n = posterior.n_beta, posterior.n

    def warmup(rng_key, position):
        state = initial_state(rng_key, position)
        return state, StepSizeParams(jnp.asarray(hyper.step_size, position.dtype)), jnp.zeros((), position.dtype)

    def step(rng_key, state: MomentumState, params: StepSizeParams, batch):
        x_b, y_b = batch
        w, p = state
        root_eta = jnp.sqrt(0.5 * params.step_size)
        loss, loss_grad, loc_grad = posterior.minibatch_loss_and_grads(w, x_b, y_b)
        noise = jax.random.normal(rng_key, w.shape, w.dtype)
        p = (1.0 - a) * p - root_eta * (loc_grad + n_beta * loss_grad) + jnp.sqrt(2.0 * (a - noise_estimate)) * noise
        return MomentumState(w + root_eta * p, p), minibatch_step_info(loss, x_b.shape[0], n)

    return Algorithm(warmup=warmup, step=step, position=lambda state: state.position,
                     batch_size=settings.batch_size)


SPEC = SamplerSpec(
    name="sghmc",
    settings=SGHMCSettings,
    build=build,
    description="SGHMC (constant friction a, symplectic Euler): p ← (1 − a)p − √(ε/2) ∇U_m + √(2a) ξ, "
    "w ← w + √(ε/2) p; a = 1 is SGLD",
    minibatch=True,
    metropolis=False,
    step_size=STEP_EPSILON,
)
