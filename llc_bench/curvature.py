"""Largest curvature and gradient noise of the local posterior at w* from Hessian- and covariance-vector products, and the automatic SG step size built on them."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import AUTO, AUTO_STEP_CONSTANT, is_auto

__all__ = ["AUTO", "AUTO_STEP_CONSTANT", "AutoStep", "AutoStepSize", "auto_step", "auto_step_size",
           "build_algorithm", "gradient_cvp", "hessian_products", "is_auto", "loss_hvp", "resolve_step_size", "top_eigenpairs",
           "top_eigenvalue"]

# Below this dimension the Hessian is built densely from d products (exact, and ARPACK needs d > 2).
DENSE_MAX_DIM = 32
# ARPACK (implicitly restarted Lanczos) settings for the top eigenvalue: a relative tolerance far
# below the Monte Carlo error ε changes anything by, and a cap on the number of restarts.
LANCZOS_TOL = 1e-3
LANCZOS_NCV = 16
LANCZOS_MAX_RESTARTS = 8


class AutoStepSize(NamedTuple):
    """What `auto_step_size` measured and chose (plain floats, ready for summary.json).

    step_size   ε = constant / (curvature + noise) (the ε convention: BlackJAX h = ε/2)
    h_max       largest eigenvalue of ∇²L_n(w*), or of G^{1/2} ∇²L_n(w*) G^{1/2} with a diagonal
                preconditioner G
    curvature   nβ h_max + c_loc max(G): c_loc the localization's curvature (γ, plus a weight decay)
    noise       nβ² s²_max / m: s²_max the largest eigenvalue of the per-sample loss-gradient
                covariance at w* (G^{1/2} C G^{1/2}), m the batch size; 0 without a batch size
    num_hvp     full-data Hessian-vector products spent on h_max
    num_cvp     full-data gradient-covariance-vector products spent on s²_max
    """

    step_size: float
    h_max: float
    curvature: float
    noise: float
    num_hvp: int
    num_cvp: int
    constant: float

    def record(self) -> dict:
        return dict(self._asdict())


# The operator products below are jitted once as functions of the posterior (a pytree): every
# posterior of the same shapes and loss, whatever its data, w*, nβ and γ, reuses the compilation.


@jax.jit
def _loss_hvp(posterior: Posterior, w, v):
    return jax.jvp(jax.grad(posterior.full_loss), (w,), (v,))[1]


def loss_hvp(posterior: Posterior):
    """(w, v) -> ∇²L_n(w) v on the full data (forward-over-reverse: jax.jvp of jax.grad), jitted."""
    return functools.partial(_loss_hvp, posterior)


@jax.jit
def _gradient_cvp(posterior: Posterior, w, v):
    def per_sample(w):
        return posterior.per_sample_loss(w, posterior.x, posterior.y)

    losses, jv = jax.jvp(per_sample, (w,), (v,))
    pullback = jax.vjp(per_sample, w)[1]
    n = losses.shape[0]
    mean_grad = pullback(jnp.full((n,), 1.0 / n, losses.dtype))[0]
    return pullback(jv / n)[0] - mean_grad * jnp.vdot(mean_grad, v)


def gradient_cvp(posterior: Posterior):
    """(w, v) -> C v, C = covariance over the n samples of the per-sample loss gradient ∇ℓ_i(w), jitted.

    C v = Jᵀ(J v)/n − ḡ (ḡ·v) with J the (n, d) per-sample Jacobian: one jvp and one vjp.
    """
    return functools.partial(_gradient_cvp, posterior)


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
    v0 = np.random.default_rng(seed).normal(size=dim)
    v0 /= np.linalg.norm(v0)
    first = apply(v0)
    scale = np.linalg.norm(first)
    if not np.isfinite(scale):
        raise ValueError("the operator gave a non-finite product")
    if scale == 0.0:
        # e.g. the gradient covariance of a noise-free target at w*: the zero operator (ARPACK
        # cannot start from a vector it maps to 0)
        return 0.0, count
    op = LinearOperator((dim, dim), matvec=apply, dtype=np.float64)
    ncv = min(LANCZOS_NCV, dim - 1)
    try:
        value = eigsh(op, k=1, which="LA", v0=v0, ncv=ncv, tol=LANCZOS_TOL,
                      maxiter=LANCZOS_MAX_RESTARTS, return_eigenvectors=False)[0]
    except ArpackNoConvergence as exc:  # keep the best Ritz value found
        value = exc.eigenvalues[0] if exc.eigenvalues.size else float(v0 @ first)
    except ArpackError:  # an invariant subspace hit at once (an operator of tiny rank): one more try
        value = _power_iteration(apply, first / scale, scale)
    return float(value), count


def hessian_products(posterior: Posterior, num_rows: int | None = None, chunk: int = 16):
    """(w, basis (d, j)) -> ∇²L(w) @ basis, jitted, with L over the first `num_rows` samples (None:
    all n); `chunk` vectors at a time (vmapped). Build it once and pass it to every `top_eigenpairs`
    call on this posterior: one compilation per basis width instead of one per call."""
    n = posterior.n if num_rows is None else min(num_rows, posterior.n)
    x, y = jnp.asarray(posterior.x[:n]), jnp.asarray(posterior.y[:n])
    return lambda w, basis: _hessian_products(posterior, x, y, w, basis, chunk=chunk)


@functools.partial(jax.jit, static_argnames="chunk")
def _hessian_products(posterior: Posterior, x, y, w, basis, chunk: int):
    grad = jax.grad(lambda v: posterior.batch_loss(v, x, y))
    hv = jax.lax.map(lambda v: jax.jvp(grad, (w,), (v,))[1], basis.T, batch_size=chunk)
    return hv.T


def top_eigenpairs(posterior: Posterior, k: int, num_rows: int | None = None, power_iters: int = 4,
                   oversample: int = 10, seed: int = 0, at=None, start=None,
                   products=None) -> tuple[np.ndarray, np.ndarray, int]:
    """(values (k,), vectors (d, k), Hessian-vector products) of the k largest eigenpairs of ∇²L at w*
    (or at the point `at`). `start`: (d, j) vectors to begin the subspace with (e.g. the eigenvectors
    of a nearby point), filled up with random ones; fewer power iterations then suffice.

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011): Y = H Ω for a Gaussian Ω of
    k + oversample columns, `power_iters` rounds of orthonormalize-and-multiply, then Rayleigh–Ritz
    in the subspace. Exact when the rank of H is at most k + oversample (the subspace then holds
    its whole range). The loss is taken over the first `num_rows` samples (None: all n): the
    Hessian of a random subset is an unbiased estimate of the full one, and a preconditioner only
    needs its stiff directions roughly. products: `hessian_products(posterior, num_rows)`, to reuse
    its compilation across calls (None: built here).
    """
    products = products if products is not None else hessian_products(posterior, num_rows)
    w = jnp.asarray(posterior.w_star if at is None else at)
    width = min(k + oversample, posterior.dim)
    omega = jax.random.normal(jax.random.PRNGKey(seed), (posterior.dim, width), w.dtype)
    if start is not None:
        start = jnp.asarray(start, w.dtype)[:, :width]
        omega = omega.at[:, : start.shape[1]].set(start)
    basis = products(w, omega)
    for _ in range(power_iters):
        basis = products(w, jnp.linalg.qr(basis)[0])
    q = np.asarray(jnp.linalg.qr(basis)[0], np.float64)
    t = q.T @ np.asarray(products(w, jnp.asarray(q, w.dtype)), np.float64)
    values, small = np.linalg.eigh(0.5 * (t + t.T))
    order = np.argsort(values)[::-1][: min(k, width)]
    return values[order], q @ small[:, order], (power_iters + 2) * width


def _power_iteration(apply, v: np.ndarray, value: float, num_iters: int = 30) -> float:
    """Rayleigh quotient after a few power steps from a unit v (a fallback; it converges from below)."""
    for _ in range(num_iters):
        w = apply(v)
        norm = np.linalg.norm(w)
        if norm == 0.0:
            return 0.0
        value = float(v @ w)
        v = w / norm
    return value


def localization_curvature(posterior: Posterior) -> float:
    """Second derivative of the localization term along a unit vector (it is isotropic: γ, plus any weight decay)."""
    w = jnp.asarray(posterior.w_star)
    e = jnp.ones_like(w) / math.sqrt(w.size)
    hv = jax.jvp(jax.grad(posterior.localization), (w,), (e,))[1]
    return float(jnp.vdot(e, hv))


def auto_step_size(posterior: Posterior, preconditioner=None, batch_size: int | None = None,
                   constant: float | None = None, *, at=None, products=None) -> AutoStepSize:
    """ε = c / (nβ h_max + c_loc · max G + nβ² s²_max / m), from full-data operator products at w*
    (or at the point `at`).

    One Langevin step of size ε on a Gaussian with curvature κ_u along a direction u, driven by
    minibatch gradients whose noise has variance nβ² s_u²/m there, inflates the stationary
    variance along u by ε κ_u/4 (discretization) + ε nβ² s_u²/(4m) (gradient noise) to first
    order. ε as above bounds that by c/4 along every direction (the largest curvature and the
    largest noise need not share a direction, which only errs on the small side). Stability needs
    ε κ < 4. Without a preconditioner (G = I) and without gradient noise (full batch, or a
    noise-free target at w*) this is ε = c / (nβ h_max + γ).

    h_max: largest eigenvalue of ∇²L_n (Hessian-vector products, jax.jvp of jax.grad); s²_max:
    of the per-sample gradient covariance (`gradient_cvp`); both by Lanczos (`top_eigenvalue`).
    With a diagonal preconditioner G (a sampler's SamplerSpec.diagonal_preconditioner:
    w ← w − ε/2 G ∇U + √(εG) η, i.e. the Langevin step in u = G^{-1/2} w) both operators are
    taken as G^{1/2} · G^{1/2}, and the localization's part is
    bounded by c_loc · max G, reached along the flat directions where G is largest. A callable
    preconditioner applies P^{1/2} of a symmetric P with eigenvalues <= 1 (c_loc · 1). batch_size
    None: no gradient-noise term. constant: c (None = AUTO_STEP_CONSTANT). products: the
    (loss_hvp, gradient_cvp) pair of this posterior, to reuse their compilations.
    """
    constant = AUTO_STEP_CONSTANT if constant is None else constant
    w = jnp.asarray(posterior.w_star if at is None else at)
    dtype = np.dtype(w.dtype)
    hvp, cvp = products if products is not None else (loss_hvp(posterior), gradient_cvp(posterior))
    if preconditioner is None or callable(preconditioner):
        root, g_max = preconditioner, 1.0  # a callable applies P^{1/2}; its P must be <= I
    else:
        scale = jnp.sqrt(jnp.asarray(preconditioner, w.dtype))
        root, g_max = (lambda v: scale * v), float(jnp.max(preconditioner))

    def sandwich(product):
        if root is None:
            return lambda v: product(w, jnp.asarray(v, w.dtype))
        return lambda v: root(product(w, root(jnp.asarray(v, w.dtype))))

    h_max, num_hvp = top_eigenvalue(sandwich(hvp), posterior.dim, dtype)
    h_max = max(h_max, 0.0)  # w* a minimum: a negative top eigenvalue is round-off
    curvature = posterior.n_beta * h_max + localization_curvature(posterior) * g_max
    noise, num_cvp = 0.0, 0
    if batch_size is not None:
        s2_max, num_cvp = top_eigenvalue(sandwich(cvp), posterior.dim, dtype)
        noise = posterior.n_beta**2 * max(s2_max, 0.0) / batch_size
    if not (math.isfinite(curvature + noise) and curvature + noise > 0):
        raise ValueError(f"step_size = \"auto\": the posterior's curvature is {curvature!r}; "
                         "give a numeric step size (nβ h_max + γ must be > 0)")
    return AutoStepSize(constant / (curvature + noise), h_max, curvature, noise, num_hvp, num_cvp, constant)


def resolve_step_size(spec, posterior: Posterior, settings, full_batch: bool = False):
    """(settings with ε at w*, AutoStepSize or None): settings unchanged unless step_size == "auto".

    ε is measured as `build_algorithm` measures it before burn-in: under the spec's diagonal
    preconditioner estimated at w*, or by the spec's own build_auto. full_batch: every step uses
    the exact full-data gradient (sample(full_batch=True)), so there is no gradient-noise term.
    """
    if not is_auto(getattr(settings, "step_size", None)):
        return settings, None
    if spec.build_auto is not None:
        auto = spec.build_auto(posterior, settings, full_batch).notes
    else:
        auto = auto_step(spec, posterior, settings, full_batch)
    return dataclasses.replace(settings, step_size=auto.at_wstar.step_size), auto.at_wstar


class AutoStep:
    """step_size = "auto" for one SG sampler: ε at w* before the run, re-measured after burn-in.

    Before the run: `auto_step_size` at w* under the sampler's preconditioner there (a diagonal
    G estimated at w*, a constant P^{1/2} map, or none). After burn-in (`retune`, called by the
    runner through Algorithm.retune): the same measurement at every live chain's position (under
    each chain's own, frozen, preconditioner when given), and the draws use
    ε = min(ε at w*, min over chains of ε there). Singular models need this: where the chains go
    the curvature can be several times that at w* (measured: 2–7× on deep linear networks with
    γ = 1, where ε from w* alone biased λ̂ by +7% at c = 0.1 and +35% at c = 0.2).
    """

    def __init__(self, posterior: Posterior, settings, full_batch: bool = False, preconditioner=None,
                 setup_products: float = 0.0, setup_seconds: float = 0.0, setup_grad_evals: float = 0.0):
        """preconditioner: what `auto_step_size` takes, at w* and (unless `retune` is given others)
        at the chains: a (d,) diagonal G, or the P^{1/2} map of a constant P (eigenvalues <= 1), or
        None. setup_products / setup_seconds / setup_grad_evals: the cost of building it, in
        full-data Hessian-vector products, seconds and full-data gradients, added to what is reported."""
        start = time.perf_counter()
        self.posterior, self.settings, self.preconditioner = posterior, settings, preconditioner
        self.batch_size = None if full_batch else settings.batch_size
        self.setup_products, self.setup_grad_evals = setup_products, setup_grad_evals
        self.products = (loss_hvp(posterior), gradient_cvp(posterior))
        self.at_wstar = auto_step_size(posterior, preconditioner, self.batch_size, settings.auto_constant,
                                       products=self.products)
        self.at_burnin: tuple[AutoStepSize, ...] = ()  # the last retune's measurements
        self.measured: list[AutoStepSize] = [self.at_wstar]  # every measurement, for the cost
        self.step_size = self.at_wstar.step_size
        self.seconds = setup_seconds + time.perf_counter() - start

    def retune(self, positions: np.ndarray, preconditioners=None, rebuilt: bool = False) -> float:
        """ε for the draws from the (C, d) live chain positions (called again when a run that has
        not converged is continued: the last call sets ε, the summary's h_max_burnin and
        curvature_burnin, and every call's products count in the cost). preconditioners: per chain, a (d,)
        diagonal G or a P^{1/2} map; None: the one given at construction. rebuilt: the chains'
        preconditioners differ from the one ε at w* was measured under, which then no longer bounds ε."""
        start = time.perf_counter()
        self.at_burnin = tuple(
            auto_step_size(self.posterior, self.preconditioner if preconditioners is None else preconditioners[c],
                           self.batch_size, self.settings.auto_constant, at=positions[c], products=self.products)
            for c in range(positions.shape[0]))
        self.measured.extend(self.at_burnin)
        floor = [] if rebuilt else [self.at_wstar.step_size]
        self.step_size = min(floor + [a.step_size for a in self.at_burnin])
        self.seconds += time.perf_counter() - start
        return self.step_size

    @property
    def num_products(self) -> float:
        return sum(a.num_hvp + a.num_cvp for a in self.measured) + self.setup_products

    def summary(self) -> dict:
        """summary.json fields (the ε of the draws under "step_size")."""
        burn = self.at_burnin
        return {
            "step_size": self.step_size,
            "step_size_auto": True,
            "step_size_wstar": self.at_wstar.step_size,
            "h_max": self.at_wstar.h_max,
            "curvature": self.at_wstar.curvature,
            "gradient_noise": self.at_wstar.noise,
            "h_max_burnin": max((a.h_max for a in burn), default=None),
            "curvature_burnin": max((a.curvature + a.noise for a in burn), default=None),
            "num_hvp": sum(a.num_hvp for a in self.measured),
            "num_cvp": sum(a.num_cvp for a in self.measured),
            "step_size_constant": self.at_wstar.constant,
            "step_size_auto_s": self.seconds,
        }


def auto_step(spec, posterior: Posterior, settings, full_batch: bool = False) -> AutoStep:
    """The AutoStep at w* of a sampler without build_auto: under G at w* when its spec declares a
    diagonal_preconditioner (its estimate's cost counted), else with no preconditioner."""
    start = time.perf_counter()
    diagonal = spec.diagonal_preconditioner
    g, cost = (None, 0.0) if diagonal is None else diagonal.at_wstar(posterior, settings, full_batch)
    return AutoStep(posterior, settings, full_batch, g, setup_seconds=time.perf_counter() - start,
                    setup_grad_evals=cost)


def build_algorithm(spec, posterior: Posterior, settings, full_batch: bool = False):
    """spec.build(posterior, settings), with step_size = "auto" resolved: ε at w* for burn-in, and
    Algorithm.retune re-measuring it where the chains are before the first draw (`AutoStep`), under
    each chain's frozen G when the spec declares a diagonal_preconditioner. A spec with build_auto
    resolves "auto" itself: build_auto(posterior, settings, full_batch).

    The AutoStep is the algorithm's `notes`. full_batch: the steps will see exact full-data
    gradients (no gradient-noise term).
    """
    if not is_auto(getattr(settings, "step_size", None)):
        return spec.build(posterior, settings)
    if spec.build_auto is not None:
        return spec.build_auto(posterior, settings, full_batch)
    auto = auto_step(spec, posterior, settings, full_batch)
    algorithm = spec.build(posterior, dataclasses.replace(settings, step_size=auto.step_size))
    diagonal = spec.diagonal_preconditioner

    def retune(states, params, alive):
        alive = np.asarray(alive, bool)
        positions = np.asarray(jax.vmap(algorithm.position)(states))[alive]
        if positions.shape[0] == 0:
            return params
        precond = None if diagonal is None else np.asarray(diagonal.of_chains(states, settings))[alive]
        eps = auto.retune(positions, precond)
        return jax.tree.map(lambda p: jnp.full_like(p, eps), params)

    return algorithm._replace(retune=retune, notes=auto)


# A forward-over-reverse Hessian-vector product, or a jvp + vjp covariance product, costs about two gradients.
HVP_GRAD_EVALS = 2.0


def auto_step_grad_evals(auto: AutoStep | None) -> float:
    """Work of step_size = "auto" in full-data gradient equivalents: its operator products, plus
    the gradients that estimated a diagonal preconditioner at w*."""
    if auto is None:
        return 0.0
    return HVP_GRAD_EVALS * auto.num_products + auto.setup_grad_evals


def step_size_summary(settings, auto: AutoStep | None) -> dict:
    """summary.json fields of the step size: the ε the draws used (SG samplers), and for "auto" what chose it."""
    if auto is not None:
        return auto.summary()
    keys = ("step_size_wstar", "h_max", "curvature", "gradient_noise", "h_max_burnin", "curvature_burnin",
            "num_hvp", "num_cvp", "step_size_constant", "step_size_auto_s")
    return {"step_size": getattr(settings, "step_size", None), "step_size_auto": False, **dict.fromkeys(keys)}
