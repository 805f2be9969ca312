"""Curvature-preconditioned SGLD: the stiffest Hessian directions at w* slowed to a common curvature, so one ε can move the flat ones."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import (
    AT_LEAST_ONE,
    AUTO,
    AUTO_CONSTANT,
    AUTO_STEP_CONSTANT,
    STEP_EPSILON,
    STEP_SIZE,
    Algorithm,
    Range,
    SamplerSpec,
    is_auto,
    minibatch_step_info,
    setting,
    validate_settings,
)


@dataclass(frozen=True)
class CurvatureSGLDSettings:
    """step_size: ε (the SGLD convention) or "auto" (the default): ε = c / (curvature + gradient
    noise) of the preconditioned posterior at w*, re-measured after burn-in.

    kappa: eigen-directions of ∇²L_n(w*) with h > h_max/kappa are slowed to h_max/kappa, so ε may
    be up to kappa times plain SGLD's. max_rank: at most this many directions are preconditioned
    (more stiff directions than that only limit ε). hessian_rows: the eigen-directions are taken
    from the Hessian on the first hessian_rows samples (all of them when n is smaller).
    """

    AUTO_IN_BUILD: ClassVar[bool] = True  # build() resolves step_size = "auto" itself

    step_size: float | str = setting(AUTO, STEP_SIZE)
    batch_size: int = setting(256, AT_LEAST_ONE)
    auto_constant: float = setting(AUTO_STEP_CONSTANT, AUTO_CONSTANT)
    kappa: float = setting(10.0, Range(1, low_closed=True))
    max_rank: int = setting(64, AT_LEAST_ONE)
    hessian_rows: int = setting(8192, AT_LEAST_ONE)

    def __post_init__(self):
        validate_settings(self)


class CurvatureParams(NamedTuple):
    """Per chain: ε and the preconditioner P = I + V diag(s − 1) Vᵀ (V orthonormal, 0 < s <= 1)."""

    step_size: jax.Array  # ()
    vectors: jax.Array  # (d, k)
    scales: jax.Array  # (k,)


def apply_preconditioner(vectors: jax.Array, scales: jax.Array, v: jax.Array, power: float = 1.0) -> jax.Array:
    """P^power v for P = I + V diag(s − 1) Vᵀ: v + V ((s^power − 1) ⊙ Vᵀv)."""
    return v + vectors @ ((scales**power - 1.0) * (vectors.T @ v))


def curvature_preconditioner(posterior: Posterior, settings: CurvatureSGLDSettings, seed: int = 0):
    """(V (d, k), s (k,), Hessian-vector products in full-data equivalents): the top eigenpairs
    h_1 >= … of ∇²L_n(w*) and s_i = (h_1/kappa) / h_i for every h_i above h_1/kappa (k <= max_rank)."""
    from llc_bench.curvature import top_eigenpairs

    rows = settings.hessian_rows
    values, vectors, count = top_eigenpairs(posterior, settings.max_rank, rows, seed=seed)
    dtype = np.dtype(jnp.asarray(posterior.w_star).dtype)
    floor = values[0] / settings.kappa if values.size and values[0] > 0 else 0.0
    keep = values > floor if floor > 0 else np.zeros(values.shape, bool)
    used_rows = min(rows, posterior.n)
    return (jnp.asarray(vectors[:, keep], dtype), jnp.asarray(floor / values[keep], dtype),
            count * used_rows / posterior.n)


def build(posterior: Posterior, settings: CurvatureSGLDSettings) -> Algorithm:
    """SGLD with a constant preconditioner P built once at w*, on one chain, minibatch from the runner:

        w ← w − ε/2 · P ( γ (w − w*) + nβ ∇L_m(w) ) + √ε · P^{1/2} η,   η ~ N(0, I)

    P = I + V diag(s − 1) Vᵀ shrinks the top eigen-directions of ∇²L_n(w*) (h_i > h_max/kappa) to
    curvature h_max/kappa and leaves every other direction alone. A constant P leaves the
    stationary law exp(−nβ L_n − γ/2 ‖w − w*‖²) unchanged up to discretization (it is SGLD in the
    coordinates u = P^{-1/2} w), and lets ε be about kappa times larger than plain SGLD's: what
    limits plain SGLD on a singular model is the ε its stiffest directions allow, while the flat,
    singular directions need many such steps to fill in. ε follows the sgld convention; "auto"
    measures the curvature of P^{1/2} ∇²L_n P^{1/2} (llc_bench.curvature.PreconditionedAutoStep).
    StepInfo.loss is L_m at the position before the step; grad_evals = m/n (building P is counted
    in the auto step's products). State = the position (d,).
    """
    start = time.perf_counter()
    vectors, scales, setup = curvature_preconditioner(posterior, settings)
    seconds = time.perf_counter() - start
    n_beta, n = posterior.n_beta, posterior.n
    auto = None
    epsilon = settings.step_size
    if is_auto(settings.step_size):
        from llc_bench.curvature import PreconditionedAutoStep

        auto = PreconditionedAutoStep(posterior, settings, lambda v: apply_preconditioner(vectors, scales, v, 0.5),
                                      setup_products=setup, setup_seconds=seconds)
        epsilon = auto.step_size

    def warmup(rng_key, position):
        del rng_key  # nothing to tune
        return position, CurvatureParams(jnp.asarray(epsilon, position.dtype), vectors, scales), \
            jnp.zeros((), position.dtype)

    def step(rng_key, state, params: CurvatureParams, batch):
        x_b, y_b = batch
        loss, loss_grad, loc_grad = posterior.minibatch_loss_and_grads(state, x_b, y_b)
        drift = apply_preconditioner(params.vectors, params.scales, n_beta * loss_grad + loc_grad)
        noise = apply_preconditioner(params.vectors, params.scales, jax.random.normal(rng_key, state.shape, state.dtype), 0.5)
        new_position = state - 0.5 * params.step_size * drift + jnp.sqrt(params.step_size) * noise
        return new_position, minibatch_step_info(loss, x_b.shape[0], n)

    def position(state):
        return state

    algorithm = Algorithm(warmup=warmup, step=step, position=position, batch_size=settings.batch_size)
    if auto is None:
        return algorithm

    def retune(states, params, alive):
        alive = np.asarray(alive, bool)
        positions = np.asarray(states)[alive]
        if positions.shape[0] == 0:
            return params
        eps = auto.retune(positions)
        return params._replace(step_size=jnp.full_like(params.step_size, eps))

    return algorithm._replace(retune=retune, notes=auto)


SPEC = SamplerSpec(
    name="curvature_sgld",
    settings=CurvatureSGLDSettings,
    build=build,
    description="SGLD preconditioned by the top Hessian eigen-directions at w*: w ← w − ε/2 P∇U + √ε P^½ η",
    minibatch=True,
    metropolis=False,
    step_size=STEP_EPSILON,
)
