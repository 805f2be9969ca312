"""SGNHT: stochastic-gradient Nosé–Hoover thermostat (SGHMC whose friction adapts to the gradient noise), in SGLD's ε convention."""

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
    StepSizeParams,
    bind,
    minibatch_step_info,
    numeric_step_size,
    setting,
    validate_settings,
)


@dataclass(frozen=True)
class SGNHTSettings:
    """step_size is ε as in SGLD (η = ε/2) or "auto" (SGLD's rule, llc_bench.curvature); alpha is
    A, the injected noise per step (the variance 2Aη of Ding et al.'s N(0, 2Aη) in v = √η p),
    and the thermostat's starting friction ξ₀ = A."""

    step_size: float | str = setting(1e-4, STEP_SIZE)
    batch_size: int = setting(256, POSITIVE)
    alpha: float = setting(0.1, Range(0, 1, high_closed=True))
    auto_constant: float = setting(AUTO_STEP_CONSTANT, AUTO_CONSTANT)  # c of step_size = "auto"

    def __post_init__(self):
        validate_settings(self)


class ThermostatState(NamedTuple):
    position: jax.Array  # (d,)
    momentum: jax.Array  # (d,) p in units of its stationary standard deviation: p ~ N(0, I)
    friction: jax.Array  # () ξ, friction per step


def build(posterior: Posterior, settings: SGNHTSettings) -> Algorithm:
    """SGNHT on one chain, minibatch (x_b, y_b) of size m supplied by the runner; η = ε/2,
    A = alpha, ∇U = γ (w − w*) + nβ ∇L_m(w):

        p' = (1 − ξ) p − √η ∇U(w) + √(2A) ζ,   ζ ~ N(0, I)
        w ← w + √η p'
        ξ ← ξ + η (pᵀ(p + p')/(2d) − 1),       then p ← p'

    With v = √η p this is Ding et al. (2014)'s update (momentum kick, then position, then
    thermostat): the friction ξ rises while the momentum is hotter than N(0, I), so it absorbs
    minibatch gradient noise that a fixed friction (sghmc) would turn into bias. The thermostat
    reads the kinetic energy as pᵀ(p + p')/2 rather than p'ᵀp': on a Gaussian target its mean is
    exactly d at ξ = A in this discretization, whereas p'ᵀp'/d sits near 1 + A/2 there and would
    settle ξ ≈ A(1 + A/2), cooling the positions by ≈ A/2. ξ moves by O(η) per step, so it needs
    many steps (≈ A/η) to adapt: give it burn-in. BlackJAX's sgnht kernel moves w with the old
    momentum and kicks p with the gradient at the old position (forward Euler, stable only for
    ηκ < ξ), so it is not used here.

    ε rides per chain in params (StepSizeParams; "auto" re-measures it after burn-in); p is in
    units of √η. State = (w, p, ξ) with p ~ N(0, I) and ξ = A at warm-up. StepInfo.loss is L_m at
    the position before the step; grad_evals = m/n.
    """
    return bind(make, posterior, settings, StepSizeParams(numeric_step_size(settings, "sgnht")))


def make(posterior: Posterior, settings: SGNHTSettings, hyper: StepSizeParams) -> Algorithm:
    """`build`'s algorithm with ε = hyper.step_size (a float, or traced inside the runner)."""
    a = settings.alpha
    n_beta, n, dim = posterior.n_beta, posterior.n, posterior.dim

    def warmup(rng_key, position):
        momentum = jax.random.normal(rng_key, position.shape, position.dtype)
        state = ThermostatState(position, momentum, jnp.asarray(a, position.dtype))
        return state, StepSizeParams(jnp.asarray(hyper.step_size, position.dtype)), jnp.zeros((), position.dtype)

    def step(rng_key, state: ThermostatState, params: StepSizeParams, batch):
        x_b, y_b = batch
        w, p, xi = state
        eta = 0.5 * params.step_size
        loss, loss_grad, loc_grad = posterior.minibatch_loss_and_grads(w, x_b, y_b)
        noise = jax.random.normal(rng_key, w.shape, w.dtype)
        new_p = (1.0 - xi) * p - jnp.sqrt(eta) * (loc_grad + n_beta * loss_grad) + jnp.sqrt(2.0 * a) * noise
        kinetic = jnp.vdot(p, p + new_p) / (2 * dim)
        new_state = ThermostatState(w + jnp.sqrt(eta) * new_p, new_p, xi + eta * (kinetic - 1.0))
        return new_state, minibatch_step_info(loss, x_b.shape[0], n)

    return Algorithm(warmup=warmup, step=step, position=lambda state: state.position,
                     batch_size=settings.batch_size)


SPEC = SamplerSpec(
    name="sgnht",
    settings=SGNHTSettings,
    build=build,
    description="SGNHT (Nosé–Hoover thermostat friction ξ, symplectic Euler): p ← (1 − ξ)p − √(ε/2) ∇U_m + √(2A) ζ, "
    "w ← w + √(ε/2) p, ξ tracks the kinetic energy",
    minibatch=True,
    metropolis=False,
    step_size=STEP_EPSILON,
)
