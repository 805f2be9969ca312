"""SGLD: stochastic-gradient Langevin dynamics on the local tempered posterior (BlackJAX kernel, ε convention)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import blackjax
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
    FinalCheck,
    SamplerSpec,
    StepSizeParams,
    bind,
    identity_root,
    minibatch_step_info,
    numeric_step_size,
    setting,
    validate_settings,
)


@dataclass(frozen=True)
class SGLDSettings:
    """step_size is ε, devinterp's `lr` (not BlackJAX's h = ε/2), or "auto": ε = c / (nβ h_max + γ
    + nβ² s²_max/m) from the largest Hessian eigenvalue h_max of L_n at w* and the largest
    per-sample gradient variance s²_max there (llc_bench.curvature.auto_step_size), c = auto_constant."""

    step_size: float | str = setting(1e-4, STEP_SIZE)
    batch_size: int = setting(256, POSITIVE)
    auto_constant: float = setting(AUTO_STEP_CONSTANT, AUTO_CONSTANT)  # c of step_size = "auto"

    def __post_init__(self):
        validate_settings(self)


def blackjax_step_size(epsilon: float) -> float:
    """BlackJAX's h for our ε: its update x + h ∇log π + √(2h) ξ equals ours when h = ε/2.

    The only place the two conventions meet; published hyperparameters (devinterp, the guide) are in ε.
    """
    return 0.5 * epsilon


def build(posterior: Posterior, settings: SGLDSettings) -> Algorithm:
    """SGLD on one chain, with minibatch (x_b, y_b) of size m supplied by the runner:

        w ← w − ε/2 · ( γ (w − w*) + nβ ∇L_m(w) ) + √ε · η,   η ~ N(0, I)

    ε = settings.step_size (the sampling guide's / devinterp's convention), carried per chain in
    params (StepSizeParams); run through `blackjax.sgld`'s kernel with h = blackjax_step_size(ε) =
    ε/2. "auto": llc_bench.curvature.build_algorithm (ε at w*, re-measured after burn-in).
    State = the position (d,).
    StepInfo.loss is L_m at the position *before* the step (the loss whose gradient drives the step,
    as devinterp's loss traces record it); grad_evals = m/n.
    """
    return bind(make, posterior, settings, StepSizeParams(numeric_step_size(settings, "sgld")))


def make(posterior: Posterior, settings: SGLDSettings, hyper: StepSizeParams) -> Algorithm:
    """`build`'s algorithm with ε = hyper.step_size (a float, or traced inside the runner)."""
    kernel = blackjax.sgld.build_kernel()
    n_beta = posterior.n_beta
    n = posterior.n

    def warmup(rng_key, position):
        del rng_key  # nothing to tune
        return position, StepSizeParams(jnp.asarray(hyper.step_size, position.dtype)), jnp.zeros((), position.dtype)

    def step(rng_key, state, params: StepSizeParams, batch):
        x_b, y_b = batch
        loss, loss_grad, loc_grad = posterior.minibatch_loss_and_grads(state, x_b, y_b)
        logdensity_grad = -(n_beta * loss_grad + loc_grad)
        # The gradient is computed here (we need the loss too), so the estimator just returns it.
        new_position = kernel(rng_key, state, lambda position, minibatch: logdensity_grad, batch,
                              blackjax_step_size(params.step_size))
        info = minibatch_step_info(loss, x_b.shape[0], n)
        return new_position, info

    def position(state):
        return state

    return Algorithm(warmup=warmup, step=step, position=position, batch_size=settings.batch_size)


@jax.jit
def _logdensity_and_grad(posterior: Posterior, w):
    # the posterior an argument: one compilation for every posterior of these shapes
    return jax.value_and_grad(posterior.logdensity)(w)


def mala_check(posterior: Posterior, positions, step_size: float, rng_key):
    """MALA-style diagnostic at the chains' final positions: would a Metropolis test accept a
    full-gradient SGLD proposal of this ε? (No accept step is taken; low values mean ε is coarse.)"""
    from llc_bench.health import mala_acceptance

    check = mala_acceptance(functools.partial(_logdensity_and_grad, posterior), positions, step_size, rng_key)
    return check.mean_accept, check.flag


SPEC = SamplerSpec(
    name="sgld",
    settings=SGLDSettings,
    build=build,
    description="SGLD (BlackJAX kernel): w ← w − ε/2 (γ(w − w*) + nβ∇L_m) + √ε η, minibatch gradients, unadjusted",
    minibatch=True,
    metropolis=False,
    step_size=STEP_EPSILON,
    checks=(FinalCheck("mala_accept", mala_check),),
    preconditioner_root=identity_root,
)
