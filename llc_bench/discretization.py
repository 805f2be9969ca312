"""The step size's first-order bias of λ̂ for SGLD with a constant preconditioner: at the chains' last positions, and optionally from a probe at every draw."""

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
    value_draws  the first-order bias with the covariance term of a non-Gaussian posterior, from
                 one probe of nβ tr(PH) at every draw (run.step_bias_draws): (ε/8)(mean probe −
                 Cov(φ, probe)) + the noise part; its SE over chains
    covariance   (ε/8)·Cov(φ, nβ tr(PH)) over the draws, the part subtracted
    curvature_draws, num_probes_draws  the mean probe and how many there were
    """

    value: float
    se: float
    curvature: float
    noise: float
    num_products: int
    # with the probes at the draws (`with_draws`; None without them)
    value_draws: float | None = None
    se_draws: float | None = None
    covariance: float | None = None
    curvature_draws: float | None = None
    num_probes_draws: int | None = None

    @property
    def applied(self) -> float:
        """The estimate `llc_debiased` subtracts: with the covariance term when the draws had probes."""
        return self.value if self.value_draws is None else self.value_draws

    def record(self) -> dict:
        return {**self._asdict(), "applied": self.applied}

    def scaled(self, factor: float) -> StepBias:
        """The bias of λ̂ read at factor × the sampled posterior's nβ (the values, SEs and covariance
        scaled; the traces, properties of the sampled posterior, kept)."""
        def scale(value):
            return None if value is None else factor * value

        return self._replace(value=factor * self.value, se=factor * self.se, value_draws=scale(self.value_draws),
                             se_draws=scale(self.se_draws), covariance=scale(self.covariance))


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

    Off a Gaussian the first-order bias has a second term, −(ε/8) Cov(φ, nβ tr(PH)) (`with_draws`),
    and this keeps the first only: on a direction flatter than quadratic it is too large (twice the
    truth on U = w⁴; scripts/step_bias_quartic.py), so λ̂ minus it errs low on a singular model.
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


def chain_roots(spec, settings, params, states, chains) -> list | None:
    """The P^{1/2} map of each of `chains` (SamplerSpec.preconditioner_root on its params and
    state), or None when the sampler or its settings have no constant P."""
    root_of = spec.constant_root(settings)
    if root_of is None:
        return None
    return [root_of(jax.tree.map(lambda a, c=c: a[c], params), jax.tree.map(lambda a, c=c: a[c], states))
            for c in chains]


def step_bias_summary(spec, posterior: Posterior, settings, params, states, positions, alive, step_size,
                      rng_key: jax.Array, full_batch: bool = False, result=None) -> StepBias | None:
    """`step_bias` of a finished run: positions (C, d) the chains' last positions, alive (C,) the
    chains λ̂ used. None unless the sampler declares its constant preconditioner
    (SamplerSpec.preconditioner_root) and has one for these chains (RMSProp-SGLD with
    adapt="always" has not: its G moves while it draws), ε is known and some chain is alive.
    result: the run's ChainResult; when its draws carry `curvature_probe_fn`'s probes, the
    estimate also gets the covariance term (`with_draws`)."""
    live = np.flatnonzero(np.asarray(alive, bool))
    if step_size is None or live.size == 0:
        return None
    roots = chain_roots(spec, settings, params, states, live)
    if roots is None:
        return None
    batch = None if full_batch else settings.batch_size
    bias = step_bias(posterior, np.asarray(positions)[live], float(step_size), roots, batch, rng_key)
    probes = None if result is None or result.full_draw_outputs is None else result.full_draw_outputs.get(PROBE_KEY)
    if probes is None:
        return bias
    return with_draws(bias, float(step_size), result.n_beta * (result.draw_loss[live] - result.loss_at_wstar),
                      np.asarray(probes, np.float64)[live])


# Rows of the data each per-draw probe takes its Hessian from (a fresh uniform draw each time, so the
# probe is unbiased for the full-data Hessian).
PROBE_ROWS = 4096
PROBE_KEY = "curvature_probe"


def curvature_probe_fn(spec, settings, position_of: Callable, rng_key: jax.Array) -> tuple | None:
    """(full_draw_fn, draw_data) for the runner: at every full draw, one Rademacher probe of
    nβ tr(P^{1/2} ∇²L P^{1/2}) at each chain's position (position_of: the algorithm's
    state -> position), ∇²L on PROBE_ROWS rows drawn afresh (with replacement), under the chain's
    own P. `with_draws` turns them into the covariance term. None when the sampler or its
    settings have no constant P (SamplerSpec.constant_root)."""
    root_of = spec.constant_root(settings)
    if root_of is None:
        return None

    def probe(state, chain, draw, data, params, posterior):
        key = jax.random.fold_in(jax.random.fold_in(data, chain), draw)
        z_key, row_key = jax.random.split(key)
        position = position_of(state)
        u = root_of(params, state)(jax.random.rademacher(z_key, position.shape, position.dtype))
        rows = jax.random.randint(row_key, (PROBE_ROWS,), 0, posterior.n)
        x, y = posterior.x[rows], posterior.y[rows]
        hv = jax.jvp(jax.grad(lambda w: posterior.batch_loss(w, x, y)), (position,), (u,))[1]
        return {PROBE_KEY: posterior.n_beta * jnp.vdot(u, hv)}

    probe.reads_state = True
    return probe, jax.random.key_data(rng_key)


def with_draws(bias: StepBias, step_size: float, phi: np.ndarray, probes: np.ndarray) -> StepBias:
    """`bias` with the first-order term that a non-Gaussian posterior adds, from the draws.

    For an observable φ the first-order bias of unadjusted Langevin is ε·Cov(φ, ⅛|∇U|²_P − ¼ΔU_P)
    (P-weighted norm and Laplacian), which integration by parts turns into
    (ε/8)(E[∇φᵀP∇U] − Cov(φ, ΔU_P)) = (ε/8)(nβ E[tr(P H)] − Cov(φ, nβ tr(P H))) for
    φ = nβ(L_n − L_n(w*)) (γ's part of ΔU does not depend on w). On a Gaussian tr(PH) is constant and
    the covariance vanishes; on U = w⁴ it halves the first term. phi, probes (C, D): λ̂'s draws
    and one probe of nβ tr(PH) at each; the noise part stays the Gaussian one of `bias`.
    """
    phi = np.asarray(phi, np.float64)
    ok = np.isfinite(phi) & np.isfinite(probes)
    if ok.sum() < 4:
        return bias
    centred = (phi - phi[ok].mean()) * (probes - probes[ok].mean())
    per_chain = np.array([np.mean(probes[c][ok[c]]) - np.mean(centred[c][ok[c]])
                          for c in range(phi.shape[0]) if ok[c].any()])
    noise_part = step_size / 8.0 * bias.noise
    values = step_size / 8.0 * per_chain + noise_part
    se = float(np.std(values, ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
    return bias._replace(value_draws=float(np.mean(values)), se_draws=se,
                         covariance=float(step_size / 8.0 * np.mean(centred[ok])),
                         curvature_draws=float(np.mean(probes[ok])), num_probes_draws=int(ok.sum()))
