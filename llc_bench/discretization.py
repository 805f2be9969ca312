"""The step size's first-order bias of λ̂ for SGLD with a constant preconditioner, estimated where the chains ended."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.curvature import gradient_cvp, loss_hvp
from llc_bench.posterior import Posterior

# Hutchinson probes per chain. The traces are over the stiff directions, which the preconditioner
# makes alike, so one Rademacher probe has a relative spread of about √(2/rank(H)); the summary's
# `se` says what the probes left.
NUM_PROBES = 4


class StepBias(NamedTuple):
    """What `step_bias` estimated (plain floats, ready for summary.json).

    value        E_ε[λ̂] − λ̂(ε → 0) to first order in ε: (ε/8)(curvature + noise)
    se           its standard error over the probes and chains
    curvature    mean nβ·tr(P^{1/2} ∇²L_n P^{1/2}) at the chains
    noise        mean nβ²/m·tr(P^{1/2} C P^{1/2}) at the chains (C: the per-sample gradient
                 covariance; 0 with full-data gradients)
    num_products Hessian- and covariance-vector products spent, on the full data
    """

    value: float
    se: float
    curvature: float
    noise: float
    num_products: int

    def record(self) -> dict:
        return dict(self._asdict())


def step_bias(posterior: Posterior, positions, step_size: float, roots: Sequence[Callable | None],
              batch_size: int | None, rng_key: jax.Array, num_probes: int = NUM_PROBES) -> StepBias:
    """First-order bias of λ̂ = nβ E[L_n − L_n(w*)] from the step size ε of the chain

        w ← w − ε/2 · P (γ (w − w*) + nβ ∇L_m(w)) + √ε · P^{1/2} η,

    estimated at the (K, d) `positions` (the chains' last states, one root each): `roots[k]`
    applies P^{1/2} of chain k (None: P = I). batch_size m, or None for full-data gradients.

    In u = P^{-1/2} w, on a Gaussian with curvature B = P^{1/2}(nβ H + γ) P^{1/2} and minibatch
    gradient noise of covariance N = nβ²/m · P^{1/2} C P^{1/2}, the chain's stationary covariance
    Σ solves Σ = A Σ A + ε I + (ε²/4) N with A = I − εB/2, so to first order in ε
    (BΣ₁ + Σ₁B)/2 = (ε/4)(B + N) around Σ₀ = B⁻¹, whatever B and N's eigenvectors. λ̂ reads
    (nβ/2) tr(P^{1/2} H P^{1/2} Σ), which is ½ tr(B Σ) on the directions where nβ h ≫ γ, and so
    gains (ε/8)(nβ tr(P H) + nβ²/m tr(P C)). (The flat directions, where B is γ's alone and C
    vanishes, do not enter λ̂; γ's share on the stiff ones is dropped, a relative error of γ/(nβ h).)
    Both traces are Hutchinson estimates with `num_probes` Rademacher vectors per chain, at each
    chain's own position. With full batches and no preconditioner it is (ε/8) nβ tr H: on one
    direction, ½ · εb/4 against the exact ½ · (1/(1 − εb/4) − 1).

    Off a Gaussian the exact first-order bias of E[U] is (ε/8)(E[ΔU] − Cov(U, ΔU)), and this keeps
    the first term only: on a direction flatter than quadratic it is too large (twice the truth on
    U = w⁴; scripts/step_bias_quartic.py). On a singular model λ̂ minus it therefore errs low.
    """
    positions = np.asarray(positions)
    num_chains, dim = positions.shape
    dtype = positions.dtype
    hvp, cvp = loss_hvp(posterior), gradient_cvp(posterior)
    n_beta = float(posterior.n_beta)
    noise_weight = 0.0 if batch_size is None else n_beta**2 / batch_size
    curvature, noise = np.zeros((num_chains, num_probes)), np.zeros((num_chains, num_probes))
    for k in range(num_chains):
        w = jnp.asarray(positions[k])
        probes = jax.random.rademacher(jax.random.fold_in(rng_key, k), (num_probes, dim), dtype)
        root = roots[k]
        u = probes if root is None else jax.vmap(root)(probes)
        curvature[k] = n_beta * np.asarray(jax.vmap(lambda v, w=w: jnp.vdot(v, hvp(w, v)))(u), np.float64)
        if noise_weight:
            noise[k] = noise_weight * np.asarray(jax.vmap(lambda v, w=w: jnp.vdot(v, cvp(w, v)))(u), np.float64)
    values = step_size / 8.0 * (curvature + noise)
    count = values.size
    se = float(np.std(values, ddof=1) / math.sqrt(count)) if count > 1 else math.nan
    products = num_chains * num_probes * (2 if noise_weight else 1)
    return StepBias(float(np.mean(values)), se, float(np.mean(curvature)), float(np.mean(noise)), products)


def step_bias_summary(spec, posterior: Posterior, settings, params, states, positions, alive, step_size,
                      rng_key: jax.Array, full_batch: bool = False) -> StepBias | None:
    """`step_bias` of a finished run: positions (C, d) the chains' last positions, alive (C,) the
    chains λ̂ used. None unless the sampler declares its constant preconditioner
    (SamplerSpec.preconditioner_roots) and has one for these chains (RMSProp-SGLD with
    adapt="always" has not: its G moves while it draws), ε is known and some chain is alive."""
    if spec.preconditioner_roots is None or step_size is None:
        return None
    roots = spec.preconditioner_roots(settings, params, states)
    live = np.flatnonzero(np.asarray(alive, bool))
    if roots is None or live.size == 0:
        return None
    batch = None if full_batch else settings.batch_size
    return step_bias(posterior, np.asarray(positions)[live], float(step_size), [roots[c] for c in live], batch,
                     rng_key)
