"""RMSProp-preconditioned SGLD, written by hand (BlackJAX has none): preconditioner adapted during burn-in, then frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import (
    AUTO_CONSTANT,
    AUTO_STEP_CONSTANT,
    POSITIVE,
    STEP_EPSILON,
    STEP_SIZE,
    Algorithm,
    DiagonalPreconditioner,
    OneOf,
    Range,
    SamplerSpec,
    StepSizeParams,
    bind,
    minibatch_step_info,
    numeric_step_size,
    setting,
    validate_settings,
)

ADAPT_MODES = ("burnin", "always")
# Minibatch gradients at w* averaged for the preconditioner that step_size = "auto" measures under.
PRECONDITIONER_BATCHES = 32


@dataclass(frozen=True)
class RMSPropSGLDSettings:
    """step_size is ε (devinterp's `lr`) or "auto"; eps is the stability constant a (devinterp `rmsprop_eps`).

    adapt="burnin" (the default) adapts v during burn-in only and then freezes it, so the draws come
    from SGLD with a constant diagonal preconditioner: the right stationary law up to the O(ε)
    discretization bias. adapt="always" keeps adapting while drawing, as devinterp does: G then
    follows the chain's own gradients and the stationary law is biased (see `build`).
    bias_correction=True (the default) divides v by 1 − α^t, so the first steps are not
    inflated by a v that starts at zero; False with adapt="always" reproduces devinterp's
    rmsprop_sgld exactly. step_size="auto": llc_bench.curvature.auto_step_size with G estimated
    at w* (`preconditioner_at_wstar`, declared in SPEC.diagonal_preconditioner).
    """

    step_size: float | str = setting(1e-4, STEP_SIZE)
    batch_size: int = setting(256, POSITIVE)
    alpha: float = setting(0.99, Range(0, 1, low_closed=True))
    # a bounds the per-parameter step at ε/a; the guide says never a > 1, and a <= 0 makes the
    # first step (v = 0) infinite.
    eps: float = setting(0.1, Range(0, 1, high_closed=True, why="the guide says never set a > 1"))
    bias_correction: bool = True
    adapt: str = setting("burnin", OneOf(ADAPT_MODES))
    auto_constant: float = setting(AUTO_STEP_CONSTANT, AUTO_CONSTANT)  # c of step_size = "auto"

    def __post_init__(self):
        validate_settings(self)


class PreconditionerState(NamedTuple):
    square_avg: jax.Array  # (d,) v: running mean of the squared loss gradient
    count: jax.Array  # () int32 t: updates applied so far
    frozen: jax.Array  # () bool: v and t no longer change (adapt="burnin", after burn-in)


class RMSPropSGLDState(NamedTuple):
    position: jax.Array  # (d,)
    preconditioner: PreconditionerState


def rmsprop_preconditioner(alpha: float, a: float, bias_correction: bool):
    """An optax-style (init, update, freeze) triple: update(loss_grad, state) -> (G, state), G = 1/(√v̂ + a).

    v ← α v + (1 − α) g²;  v̂ = v / (1 − α^t) (t = updates so far, v̂ = 0 while t = 0) if
    bias_correction else v. Only the loss gradient enters v: the localization term is
    deterministic and would otherwise shrink the step of parameters merely because they sit far
    from w*. freeze(state) stops the updates: G is a constant from then on.
    """

    def init(position: jax.Array) -> PreconditionerState:
        return PreconditionerState(jnp.zeros_like(position), jnp.zeros((), jnp.int32), jnp.zeros((), bool))

    def update(loss_grad: jax.Array, state: PreconditionerState):
        square_avg = jnp.where(state.frozen, state.square_avg,
                               alpha * state.square_avg + (1.0 - alpha) * loss_grad**2)
        count = jnp.where(state.frozen, state.count, state.count + 1)
        if bias_correction:
            debias = 1.0 - jnp.asarray(alpha, square_avg.dtype) ** count
            v_hat = jnp.where(count > 0, square_avg / jnp.where(count > 0, debias, 1.0), 0.0)
        else:
            v_hat = square_avg
        return 1.0 / (jnp.sqrt(v_hat) + a), PreconditionerState(square_avg, count, state.frozen)

    def freeze(state: PreconditionerState) -> PreconditionerState:
        return state._replace(frozen=jnp.ones((), bool))

    return init, update, freeze


def chain_preconditioners(states: RMSPropSGLDState, settings: RMSPropSGLDSettings) -> np.ndarray:
    """(C, d) the G = 1/(√v̂ + a) each chain's state holds now (frozen after burn-in by default)."""
    v = np.asarray(states.preconditioner.square_avg, np.float64)
    t = np.asarray(states.preconditioner.count, np.float64)[:, None]
    if settings.bias_correction:
        v = np.where(t > 0, v / np.where(t > 0, 1.0 - settings.alpha**t, 1.0), 0.0)
    return 1.0 / (np.sqrt(v) + settings.eps)


def preconditioner_root(settings: RMSPropSGLDSettings):
    """SamplerSpec.preconditioner_root: (params, state) -> v -> G^{1/2} v with the chain's frozen
    G; None with adapt="always", whose G moves while it draws."""
    if settings.adapt == "always":
        return None
    update = rmsprop_preconditioner(settings.alpha, settings.eps, settings.bias_correction)[1]

    def root_of(params, state: RMSPropSGLDState):
        del params
        frozen = state.preconditioner._replace(frozen=jnp.ones((), bool))  # G as it stands, no update
        root = jnp.sqrt(update(jnp.zeros_like(state.position), frozen)[0])
        return lambda v: root.astype(v.dtype) * v

    return root_of


def preconditioner_at_wstar(posterior: Posterior, settings: RMSPropSGLDSettings,
                            num_batches: int | None = None, full_batch: bool = False) -> jax.Array:
    """(d,) G = 1/(√v + a) with v = mean over fixed minibatches at w* of (∇L_m(w*))²: the stationary
    v of a chain sitting at w*, for the automatic step size.

    On the posterior v also holds the full-data gradient (zero at w*), so v is larger and G
    smaller there: G(w*) overstates the curvature the chain sees, which errs on the stable side.
    The batches (settings.batch_size samples, with replacement, as the runner draws them) come
    from a fixed key; full_batch: v = (∇L_n(w*))², the gradient every step then uses.
    """
    w = jnp.asarray(posterior.w_star)
    if full_batch:
        return 1.0 / (jnp.abs(jax.grad(posterior.full_loss)(w)) + settings.eps)
    num_batches = num_batches or PRECONDITIONER_BATCHES
    n = posterior.n
    idx = jax.random.randint(jax.random.key(0), (num_batches, settings.batch_size), 0, n)
    return 1.0 / (jnp.sqrt(_mean_square_grad(posterior, w, idx)) + settings.eps)


def _at_wstar(posterior: Posterior, settings: RMSPropSGLDSettings, full_batch: bool) -> tuple[jax.Array, float]:
    """(G at w*, its cost in full-data gradients: PRECONDITIONER_BATCHES minibatches, or none with full_batch)."""
    cost = 0.0 if full_batch else PRECONDITIONER_BATCHES * settings.batch_size / posterior.n
    return preconditioner_at_wstar(posterior, settings, full_batch=full_batch), cost


@jax.jit
def _mean_square_grad(posterior: Posterior, w, idx):
    # the posterior an argument: one compilation for every posterior of these shapes
    def one(i):
        return posterior.minibatch_loss_and_grads(w, posterior.x[i], posterior.y[i])[1] ** 2

    return jnp.mean(jax.lax.map(one, idx), axis=0)


def build(posterior: Posterior, settings: RMSPropSGLDSettings) -> Algorithm:
    """RMSProp-SGLD on one chain, minibatch (x_b, y_b) of size m supplied by the runner:

        v ← α v + (1 − α) (∇L_m(w))²                 (loss gradient only; during burn-in only
                                                      with adapt="burnin", the default)
        v̂ = v / (1 − α^t)   (bias_correction=True, default; v̂ = v otherwise, as devinterp)
        G = 1 / (√v̂ + a)                              (diagonal, a = settings.eps)
        w ← w − ε/2 · G ⊙ ( γ (w − w*) + nβ ∇L_m(w) ) + √(ε G) ⊙ η,   η ~ N(0, I)

    ε = settings.step_size, carried per chain in params (StepSizeParams; G = 1 gives SGLD with the
    same ε; a number here: "auto" is resolved by llc_bench.curvature.build_algorithm, ε at w*
    re-measured after burn-in with each chain's frozen G, both from SPEC.diagonal_preconditioner). The largest per-parameter step
    factor εG is ε/a, reached where v̂ = 0. State = (position, (v, t, frozen)); the runner calls
    Algorithm.end_burnin after the last burn-in step, which freezes (v, t) when adapt="burnin".
    With no burn-in, v stays 0 and G = 1/a. StepInfo.loss is L_m at the position before the step;
    grad_evals = m/n.

    adapt="burnin": while drawing, G is a constant matrix, so the chain is preconditioned SGLD
    with the stationary law of SGLD in u = G^{-1/2} w: exact up to O(ε) (and minibatch noise).
    To first order λ̂ reads high by (ε/8)·tr(G·(nβ H + nβ² C/m)) (H the Hessian of L_n, C the
    per-sample gradient covariance, m the batch size). G is up to 1/a, so this is up to 1/a times
    SGLD's bias at the same ε. Measured on the default experiment (G median ≈ 8): predicted 5.1,
    2.8 and 1.8 at (ε, m) = (5e-6, 256), (2.5e-6, 256), (2.5e-6, 512), measured λ̂ − 298 = 7.5,
    3.9 and 2.5 (SE 1.2-1.6).

    adapt="always" (devinterp): known bias beyond O(ε). G follows the chain's recent gradients
    and there is no Γ (divergence of G) correction term. When the chain relaxes more slowly than v
    forgets (≈ 1/(1 − α) steps) and √v̂ is comparable to a, v tracks the position and the
    stationary law tilts toward large gradients. On tests/sampler_utils' Gaussian (nβ ≈ 22,
    √v̂ ≈ 0.2–0.3 vs a = 0.1) α = 0.99 inflates variances by ≈ 10–20% (α = 0.999: ≲ 5%); on a
    one-parameter quadratic (λ = ½, n = 1000, full batch) λ̂ was +45% at ε = 4e-4.
    """
    return bind(make, posterior, settings, StepSizeParams(numeric_step_size(settings, "rmsprop_sgld")))


def make(posterior: Posterior, settings: RMSPropSGLDSettings, hyper: StepSizeParams) -> Algorithm:
    """`build`'s algorithm with ε = hyper.step_size (a float, or traced inside the runner)."""
    n_beta = posterior.n_beta
    n = posterior.n
    precond_init, precond_update, precond_freeze = rmsprop_preconditioner(
        settings.alpha, settings.eps, settings.bias_correction
    )

    def warmup(rng_key, position):
        del rng_key  # nothing to tune; v starts at zero as in RMSProp
        state = RMSPropSGLDState(position, precond_init(position))
        return state, StepSizeParams(jnp.asarray(hyper.step_size, position.dtype)), jnp.zeros((), position.dtype)

    def end_burnin(state):
        if settings.adapt == "always":
            return state
        return state._replace(preconditioner=precond_freeze(state.preconditioner))

    def step(rng_key, state, params: StepSizeParams, batch):
        x_b, y_b = batch
        w = state.position
        eps = params.step_size
        loss, loss_grad, loc_grad = posterior.minibatch_loss_and_grads(w, x_b, y_b)
        g, precond = precond_update(loss_grad, state.preconditioner)
        noise = jax.random.normal(rng_key, w.shape, w.dtype)
        new_w = w - 0.5 * eps * g * (loc_grad + n_beta * loss_grad) + jnp.sqrt(eps * g) * noise
        info = minibatch_step_info(loss, x_b.shape[0], n)
        return RMSPropSGLDState(new_w, precond), info

    def position(state):
        return state.position

    return Algorithm(warmup=warmup, step=step, position=position, batch_size=settings.batch_size,
                     end_burnin=end_burnin)


SPEC = SamplerSpec(
    name="rmsprop_sgld",
    settings=RMSPropSGLDSettings,
    build=build,
    description="RMSProp-preconditioned SGLD: G = 1/(√v̂ + a), w ← w − ε/2 G(γ(w − w*) + nβ∇L_m) + √(εG) η; "
    "v adapted during burn-in, then frozen (adapt=\"always\": devinterp's biased variant)",
    minibatch=True,
    metropolis=False,
    step_size=STEP_EPSILON,
    aliases={"rmsprop_eps": "eps", "rmsprop_alpha": "alpha"},
    diagonal_preconditioner=DiagonalPreconditioner(at_wstar=_at_wstar, of_chains=chain_preconditioners),
    preconditioner_root=preconditioner_root,
)
