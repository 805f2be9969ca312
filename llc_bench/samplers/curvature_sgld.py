"""Curvature-preconditioned SGLD: the stiffest Hessian directions at w* slowed to a common curvature, so one ε can move the flat ones."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.curvature import AutoStep, hessian_products, top_eigenpairs
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
    bind,
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
    (more stiff directions than that only limit ε); how many are used is found at w* (from 64,
    doubling while the last is still stiff). hessian_rows: the eigen-directions are taken
    from the Hessian on the first hessian_rows samples (all of them when n is smaller).
    rebuild_at_burnin (with "auto"): after burn-in each chain's P is rebuilt from the Hessian where
    that chain is, and ε measured under it; the stiff directions of a singular model turn as the
    chains leave w*, and a P from w* alone then limits ε (measured: tenfold on a deep linear network).
    """

    step_size: float | str = setting(AUTO, STEP_SIZE)
    batch_size: int = setting(256, AT_LEAST_ONE)
    auto_constant: float = setting(AUTO_STEP_CONSTANT, AUTO_CONSTANT)
    kappa: float = setting(30.0, Range(1, low_closed=True))
    max_rank: int = setting(1024, AT_LEAST_ONE)
    hessian_rows: int = setting(8192, AT_LEAST_ONE)
    rebuild_at_burnin: bool = True  # "auto": rebuild P where each chain is after burn-in

    def __post_init__(self):
        validate_settings(self)


MIN_RANK = 64  # first guess of how many directions are stiff; doubled while too few
RANK_MARGIN = 16  # directions kept beyond the stiff ones found at w* (they may stiffen elsewhere)
REBUILD_POWER_ITERS = 2  # subspace iterations when rebuilding from the vectors of w*


class CurvatureParams(NamedTuple):
    """Per chain: ε and the preconditioner P = I + V diag(s − 1) Vᵀ (V orthonormal, 0 < s <= 1)."""

    step_size: jax.Array  # ()
    vectors: jax.Array  # (d, k)
    scales: jax.Array  # (k,)


def apply_preconditioner(vectors: jax.Array, scales: jax.Array, v: jax.Array, power: float = 1.0) -> jax.Array:
    """P^power v for P = I + V diag(s − 1) Vᵀ: v + V ((s^power − 1) ⊙ Vᵀv)."""
    return v + vectors @ ((scales**power - 1.0) * (vectors.T @ v))


def curvature_preconditioner(posterior: Posterior, settings: CurvatureSGLDSettings, seed: int = 0, at=None,
                             start=None, products=None):
    """(V (d, k), s (k,), Hessian-vector products in full-data equivalents) at w* (or at `at`): the
    k top eigenpairs h_1 >= … of ∇²L_n, s_i = (h_1/kappa) / h_i where h_i is above h_1/kappa and 1
    elsewhere. start None: k starts at MIN_RANK and doubles (up to max_rank and d) while the k-th
    value is still above h_1/kappa, then k is cut to the stiff directions plus RANK_MARGIN. start
    (d, k): k is kept (one shape for every chain), the subspace iteration starts from these vectors
    and needs only REBUILD_POWER_ITERS rounds. products: llc_bench.curvature.hessian_products of
    this posterior and hessian_rows, shared by every call (None: built here)."""
    rows = settings.hessian_rows
    products = products if products is not None else hessian_products(posterior, rows)
    limit = min(settings.max_rank, posterior.dim)
    if start is not None:
        values, vectors, count = top_eigenpairs(posterior, start.shape[1], rows, seed=seed, at=at,
                                                start=start, power_iters=REBUILD_POWER_ITERS, products=products)
    else:
        k, count, vectors = min(MIN_RANK, limit), 0, None
        while True:
            values, vectors, used = top_eigenpairs(posterior, k, rows, seed=seed, at=at, start=vectors,
                                                   products=products)
            count += used
            if not (values.size and values[-1] > values[0] / settings.kappa) or k >= limit:
                break
            k = min(2 * k, limit)
        keep = min(k, int(np.sum(values > values[0] / settings.kappa)) + RANK_MARGIN) if values.size else k
        values, vectors = values[:keep], vectors[:, :keep]
    dtype = np.dtype(jnp.asarray(posterior.w_star).dtype)
    floor = values[0] / settings.kappa if values.size and values[0] > 0 else 0.0
    scales = np.ones_like(values)
    if floor > 0:
        stiff = values > floor
        scales[stiff] = floor / values[stiff]
    used_rows = min(rows, posterior.n)
    return jnp.asarray(vectors, dtype), jnp.asarray(scales, dtype), count * used_rows / posterior.n


def build(posterior: Posterior, settings: CurvatureSGLDSettings) -> Algorithm:
    """SGLD with a constant preconditioner P, on one chain, minibatch from the runner:

        w ← w − ε/2 · P ( γ (w − w*) + nβ ∇L_m(w) ) + √ε · P^{1/2} η,   η ~ N(0, I)

    P = I + V diag(s − 1) Vᵀ shrinks the top eigen-directions of ∇²L_n(w*) (h_i > h_max/kappa) to
    curvature h_max/kappa and leaves every other direction alone. A constant P leaves the
    stationary law exp(−nβ L_n − γ/2 ‖w − w*‖²) unchanged up to discretization (it is SGLD in the
    coordinates u = P^{-1/2} w), and lets ε be about kappa times larger than plain SGLD's: what
    limits plain SGLD on a singular model is the ε its stiffest directions allow, while the flat,
    singular directions need many such steps to fill in. ε follows the sgld convention; "auto"
    measures the curvature of P^{1/2} ∇²L_n P^{1/2} (llc_bench.curvature.AutoStep with its root;
    `build_auto`, which SPEC declares, so that llc_bench.curvature.build_algorithm leaves it here).
    P is built at w* for burn-in; with "auto" and rebuild_at_burnin each chain's P is rebuilt where
    it is after burn-in and ε re-measured under it (Algorithm.retune); P and ε stay fixed during the
    draws, and are measured again only where run.target_rel_se continues a run that has not
    converged (its draws so far become burn-in).
    StepInfo.loss is L_m at the position before the step; grad_evals = m/n (building P is counted
    in the auto step's products). State = the position (d,).
    """
    return build_auto(posterior, settings, False)


def build_auto(posterior: Posterior, settings: CurvatureSGLDSettings, full_batch: bool) -> Algorithm:
    """`build`, with full_batch: the steps will see exact full-data gradients (no gradient-noise term in "auto")."""
    start = time.perf_counter()
    products = hessian_products(posterior, settings.hessian_rows)
    vectors, scales, setup = curvature_preconditioner(posterior, settings, products=products)
    seconds = time.perf_counter() - start
    auto = None
    epsilon = settings.step_size
    if is_auto(settings.step_size):
        auto = AutoStep(posterior, settings, full_batch,
                        preconditioner=lambda v: apply_preconditioner(vectors, scales, v, 0.5),
                        setup_products=setup, setup_seconds=seconds)
        epsilon = auto.step_size
    algorithm = bind(make, posterior, settings, CurvatureParams(epsilon, vectors, scales))
    if auto is None:
        return algorithm
    return algorithm._replace(retune=_retune(posterior, settings, auto, products), notes=auto)


def make(posterior: Posterior, settings: CurvatureSGLDSettings, hyper: CurvatureParams) -> Algorithm:
    """`build`'s algorithm with ε and P from hyper (measured on the host; traced inside the runner)."""
    n = posterior.n
    n_beta = posterior.n_beta

    def warmup(rng_key, position):
        del rng_key  # nothing to tune
        return position, CurvatureParams(jnp.asarray(hyper.step_size, position.dtype), hyper.vectors,
                                         hyper.scales), jnp.zeros((), position.dtype)

    def step(rng_key, state, params: CurvatureParams, batch):
        x_b, y_b = batch
        loss, loss_grad, loc_grad = posterior.minibatch_loss_and_grads(state, x_b, y_b)
        # P ∇U and P^{1/2} η with one pass over V each way: [∇U, η] + V ([s − 1, √s − 1] ⊙ Vᵀ[∇U, η])
        both = jnp.stack([n_beta * loss_grad + loc_grad, jax.random.normal(rng_key, state.shape, state.dtype)], axis=1)
        factors = jnp.stack([params.scales - 1.0, jnp.sqrt(params.scales) - 1.0], axis=1)
        drift, noise = (both + params.vectors @ (factors * (params.vectors.T @ both))).T
        new_position = state - 0.5 * params.step_size * drift + jnp.sqrt(params.step_size) * noise
        return new_position, minibatch_step_info(loss, x_b.shape[0], n)

    def position(state):
        return state

    return Algorithm(warmup=warmup, step=step, position=position, batch_size=settings.batch_size)


def _retune(posterior: Posterior, settings: CurvatureSGLDSettings, auto, products):
    """Algorithm.retune of step_size = "auto": P rebuilt where each chain is (rebuild_at_burnin), ε
    re-measured under it (host-side, on the concrete posterior). The subspace iteration starts from
    the chain's current P (the one of w* at the first call)."""

    def retune(states, params, alive):
        live = np.flatnonzero(np.asarray(alive, bool))
        positions = np.asarray(states)
        if live.size == 0:
            return params
        if not settings.rebuild_at_burnin:
            eps = auto.retune(positions[live])
            return params._replace(step_size=jnp.full_like(params.step_size, eps))
        start = time.perf_counter()
        chain_vectors, chain_scales = np.array(params.vectors), np.array(params.scales)
        roots = []
        for c in live:
            v, s, used = curvature_preconditioner(posterior, settings, seed=int(c) + 1, at=positions[c],
                                                  start=chain_vectors[c], products=products)
            chain_vectors[c], chain_scales[c] = v, s
            auto.setup_products += used
            roots.append(lambda u, v=v, s=s: apply_preconditioner(v, s, u, 0.5))
        auto.seconds += time.perf_counter() - start
        eps = auto.retune(positions[live], roots, rebuilt=True)
        return CurvatureParams(jnp.full_like(params.step_size, eps), jnp.asarray(chain_vectors),
                               jnp.asarray(chain_scales))

    return retune


def preconditioner_root(settings: CurvatureSGLDSettings):
    """SamplerSpec.preconditioner_root: (params, state) -> v -> P^{1/2} v with the chain's P (as
    its draws used it); every setting keeps P fixed while drawing."""
    del settings

    def root_of(params: CurvatureParams, state):
        del state
        return functools.partial(apply_preconditioner, params.vectors, params.scales, power=0.5)

    return root_of


def stiff_basis(params: CurvatureParams) -> jax.Array:
    """SamplerSpec.stiff_basis: each chain's V (C, d, k), the directions P slows (and RANK_MARGIN more)."""
    return params.vectors


# The over-dispersed restart's largest scale for this sampler. Its ε along the flat directions is about
# kappa times plain SGLD's, so its chains spread far more in the same steps, and a scale that suits
# SGLD's (10) starts them where that ε diverges: measured on the scoreboard's deep linear networks,
# every chain diverged within two steps from s = 10 (and from s = 5 on one instance), while from s = 2
# and 3 plateaus moved (31.8 -> 70.0 and 71.9, λ = 70.5; 911.9 -> 947.2 and 1155, λ = 1009.5) and
# instances whose λ is all quadratic held within 0.8%.
RESTART_SCALE_CAP = 3.0


SPEC = SamplerSpec(
    name="curvature_sgld",
    settings=CurvatureSGLDSettings,
    build=build,
    description="SGLD preconditioned by the top Hessian eigen-directions at w*: w ← w − ε/2 P∇U + √ε P^½ η",
    minibatch=True,
    metropolis=False,
    step_size=STEP_EPSILON,
    build_auto=build_auto,
    preconditioner_root=preconditioner_root,
    stiff_basis=stiff_basis,
    restart_scale_cap=RESTART_SCALE_CAP,
)
