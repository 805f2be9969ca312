"""Largest curvature of the local posterior at w* from Hessian-vector products, and the automatic SG step size ε = c / curvature."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import AUTO, is_auto

__all__ = ["AUTO", "AUTO_STEP_CONSTANT", "AutoStepSize", "auto_step_size", "is_auto", "loss_hvp",
           "resolve_step_size", "top_eigenvalue"]

# ε = AUTO_STEP_CONSTANT / curvature. Stability of a Langevin step on a quadratic needs ε κ < 4;
# at ε κ = c the stationary variance along the stiffest direction is 1/(1 − c/4) times the exact
# one (+2.6% at c = 0.1), and softer directions are biased less. Measured on λ = d/2 regression,
# a one-parameter quadratic and deep linear networks (README, "Automatic step size").
AUTO_STEP_CONSTANT = 0.1

# Below this dimension the Hessian is built densely from d products (exact, and ARPACK needs d > 2).
DENSE_MAX_DIM = 32
# ARPACK (implicitly restarted Lanczos) settings for the top eigenvalue: a relative tolerance far
# below the Monte Carlo error ε changes anything by, and a cap on the number of restarts.
LANCZOS_TOL = 1e-3
LANCZOS_NCV = 16
LANCZOS_MAX_RESTARTS = 8
# Minibatch gradients at w* averaged for RMSProp's preconditioner estimate.
PRECONDITIONER_BATCHES = 32


class AutoStepSize(NamedTuple):
    """What `auto_step_size` measured and chose (plain floats, ready for summary.json).

    step_size  ε = constant / curvature (the ε convention: BlackJAX h = ε/2)
    h_max      largest eigenvalue of ∇²L_n(w*), or of G^{1/2} ∇²L_n(w*) G^{1/2} with a diagonal
               preconditioner G
    curvature  nβ h_max + c_loc max(G): c_loc the localization's curvature (γ, plus a weight decay)
    num_hvp    full-data Hessian-vector products spent on h_max
    """

    step_size: float
    h_max: float
    curvature: float
    num_hvp: int
    constant: float

    def record(self) -> dict:
        return dict(self._asdict())


def loss_hvp(posterior: Posterior):
    """(w, v) -> ∇²L_n(w) v on the full data (forward-over-reverse: jax.jvp of jax.grad), jitted."""
    grad = jax.grad(posterior.full_loss)

    @jax.jit
    def hvp(w, v):
        return jax.jvp(grad, (w,), (v,))[1]

    return hvp


def top_eigenvalue(matvec, dim: int, dtype=np.float32, seed: int = 0) -> tuple[float, int]:
    """(largest eigenvalue, number of matvecs) of a symmetric operator given by `matvec`.

    dim <= DENSE_MAX_DIM: the dense matrix from `dim` products and numpy's eigvalsh. Otherwise
    scipy's eigsh (ARPACK, implicitly restarted Lanczos) from a fixed random start; typically
    20–60 products. A Lanczos estimate never exceeds the true value; it converges from below.
    """
    count = 0

    def apply(v):
        nonlocal count
        count += 1
        return np.asarray(matvec(np.asarray(v, dtype).reshape(dim)), np.float64)

    if dim <= DENSE_MAX_DIM:
        dense = np.stack([apply(e) for e in np.eye(dim)], axis=1)
        return float(np.linalg.eigvalsh(0.5 * (dense + dense.T))[-1]), count
    op = LinearOperator((dim, dim), matvec=apply, dtype=np.float64)
    v0 = np.random.default_rng(seed).normal(size=dim)
    ncv = min(LANCZOS_NCV, dim - 1)
    try:
        value = eigsh(op, k=1, which="LA", v0=v0, ncv=ncv, tol=LANCZOS_TOL,
                      maxiter=LANCZOS_MAX_RESTARTS, return_eigenvectors=False)[0]
    except ArpackNoConvergence as exc:  # keep the best Ritz value found
        if exc.eigenvalues.size == 0:
            raise
        value = exc.eigenvalues[0]
    return float(value), count


def localization_curvature(posterior: Posterior) -> float:
    """Second derivative of the localization term along a unit vector (it is isotropic: γ, plus any weight decay)."""
    w = jnp.asarray(posterior.w_star)
    e = jnp.ones_like(w) / math.sqrt(w.size)
    hv = jax.jvp(jax.grad(posterior.localization), (w,), (e,))[1]
    return float(jnp.vdot(e, hv))


def auto_step_size(posterior: Posterior, preconditioner=None, constant: float | None = None) -> AutoStepSize:
    """ε = constant / (nβ h_max + c_loc · max G) at w*, from full-data Hessian-vector products.

    Without a preconditioner (G = I) this is ε = c / (nβ h_max + γ) with h_max the largest
    eigenvalue of ∇²L_n(w*): the stiffest direction of −log π then moves by ε κ = c per step.
    With a diagonal preconditioner G (RMSProp-SGLD: w ← w − ε/2 G ∇U + √(εG) η, i.e. SGLD in
    u = G^{-1/2} w) the curvature that limits ε is that of G^{1/2} ∇²U G^{1/2}; its loss part is
    computed exactly (h_max of G^{1/2} ∇²L_n G^{1/2}) and the localization part bounded by
    c_loc · max G, reached along the flat directions where G is largest. constant: c (None =
    AUTO_STEP_CONSTANT).
    """
    constant = AUTO_STEP_CONSTANT if constant is None else constant
    w = jnp.asarray(posterior.w_star)
    hvp = loss_hvp(posterior)
    if preconditioner is None:
        def matvec(v):
            return hvp(w, jnp.asarray(v, w.dtype))
        g_max = 1.0
    else:
        scale = jnp.sqrt(jnp.asarray(preconditioner, w.dtype))

        def matvec(v):
            return scale * hvp(w, scale * jnp.asarray(v, w.dtype))
        g_max = float(jnp.max(preconditioner))
    h_max, count = top_eigenvalue(matvec, posterior.dim, np.dtype(w.dtype))
    h_max = max(h_max, 0.0)  # w* a minimum: a negative top eigenvalue is round-off
    curvature = posterior.n_beta * h_max + localization_curvature(posterior) * g_max
    if not (math.isfinite(curvature) and curvature > 0):
        raise ValueError(f"step_size = \"auto\": the posterior's curvature at w* is {curvature!r}; "
                         "give a numeric step size (nβ h_max + γ must be > 0)")
    return AutoStepSize(constant / curvature, h_max, curvature, count, constant)


def resolve_step_size(posterior: Posterior, settings):
    """(settings with a numeric step_size, AutoStepSize or None): settings unchanged unless step_size == "auto".

    RMSProp-SGLD is measured with its preconditioner estimated at w*
    (llc_bench.samplers.rmsprop_sgld.preconditioner_at_wstar).
    """
    if not is_auto(getattr(settings, "step_size", None)):
        return settings, None
    from llc_bench.samplers.rmsprop_sgld import RMSPropSGLDSettings, preconditioner_at_wstar

    precond = preconditioner_at_wstar(posterior, settings) if isinstance(settings, RMSPropSGLDSettings) else None
    auto = auto_step_size(posterior, precond)
    return dataclasses.replace(settings, step_size=auto.step_size), auto
