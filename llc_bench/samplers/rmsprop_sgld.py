"""RMSProp-preconditioned SGLD (seed 000's default recommendation), written by hand: BlackJAX has none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import Algorithm, SamplerSpec, minibatch_step_info


@dataclass(frozen=True)
class RMSPropSGLDSettings:
    """step_size is ε (DESIGN.md / devinterp `lr`); eps is the stability constant a (devinterp `rmsprop_eps`).

    bias_correction=True (the default) divides v by 1 − α^{t+1}, so the first steps are not
    inflated by a v that starts at zero; False reproduces devinterp's rmsprop_sgld exactly.
    """

    step_size: float = 1e-4
    batch_size: int = 256
    alpha: float = 0.99
    eps: float = 0.1
    bias_correction: bool = True

    def __post_init__(self):
        # a bounds the per-parameter step at ε/a; the guide says never a > 1, and a <= 0 makes the
        # first step (v = 0) infinite.
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"rmsprop_sgld eps (the constant a) must be in (0, 1], got {self.eps}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"rmsprop_sgld alpha must be in [0, 1), got {self.alpha}")


class PreconditionerState(NamedTuple):
    square_avg: jax.Array  # (d,) v: running mean of the squared loss gradient
    count: jax.Array  # () int32 t: updates applied so far


class RMSPropSGLDState(NamedTuple):
    position: jax.Array  # (d,)
    preconditioner: PreconditionerState


def rmsprop_preconditioner(alpha: float, a: float, bias_correction: bool):
    """An optax-style (init, update) pair: update(loss_grad, state) -> (G, state), G = 1/(√v̂ + a).

    v ← α v + (1 − α) g²;  v̂ = v / (1 − α^{t+1}) if bias_correction else v.
    Only the loss gradient enters v: the localization term is deterministic and would otherwise
    shrink the step of parameters merely because they sit far from w*.
    """

    def init(position: jax.Array) -> PreconditionerState:
        return PreconditionerState(jnp.zeros_like(position), jnp.zeros((), jnp.int32))

    def update(loss_grad: jax.Array, state: PreconditionerState):
        square_avg = alpha * state.square_avg + (1.0 - alpha) * loss_grad**2
        count = state.count + 1
        if bias_correction:
            v_hat = square_avg / (1.0 - jnp.asarray(alpha, square_avg.dtype) ** count)
        else:
            v_hat = square_avg
        return 1.0 / (jnp.sqrt(v_hat) + a), PreconditionerState(square_avg, count)

    return init, update


def build(posterior: Posterior, settings: RMSPropSGLDSettings) -> Algorithm:
    """RMSProp-SGLD on one chain, minibatch (x_b, y_b) of size m supplied by the runner:

        v ← α v + (1 − α) (∇L_m(w))²                 (loss gradient only)
        v̂ = v / (1 − α^{t+1})   (bias_correction=True, default; v̂ = v otherwise, as devinterp)
        G = 1 / (√v̂ + a)                              (diagonal, a = settings.eps)
        w ← w − ε/2 · G ⊙ ( γ (w − w*) + nβ ∇L_m(w) ) + √(ε G) ⊙ η,   η ~ N(0, I)

    ε = settings.step_size in the DESIGN.md convention (G = 1 gives SGLD with the same ε); the
    largest per-parameter step factor εG is ε/a, reached where v̂ = 0. State = (position, (v, t)).
    StepInfo.loss is L_m at the position before the step; grad_evals = m/n.

    Known bias beyond O(ε): G follows the chain's recent gradients and there is no Γ (divergence
    of G) correction term. When the chain relaxes more slowly than v forgets (≈ 1/(1 − α) steps)
    and √v̂ is comparable to a, v tracks the position and the stationary law tilts toward large
    gradients. On tests/sampler_utils' Gaussian (nβ ≈ 22, √v̂ ≈ 0.2–0.3 vs a = 0.1) the defaults
    inflate variances by ≈ 10–20%; α = 0.999 cuts that to ≲ 5%. Where √v̂ ≪ a (large nβ) or v
    is dominated by position-independent minibatch noise, G is nearly constant and the effect
    should be small (not measured here).
    """
    epsilon = settings.step_size
    n_beta = posterior.n_beta
    n = posterior.n
    precond_init, precond_update = rmsprop_preconditioner(
        settings.alpha, settings.eps, settings.bias_correction
    )

    def warmup(rng_key, position):
        del rng_key  # nothing to tune; v starts at zero as in RMSProp
        state = RMSPropSGLDState(position, precond_init(position))
        return state, (), jnp.zeros((), position.dtype)

    def step(rng_key, state, params, batch):
        del params
        x_b, y_b = batch
        w = state.position
        loss, loss_grad, loc_grad = posterior.minibatch_loss_and_grads(w, x_b, y_b)
        g, precond = precond_update(loss_grad, state.preconditioner)
        noise = jax.random.normal(rng_key, w.shape, w.dtype)
        new_w = w - 0.5 * epsilon * g * (loc_grad + n_beta * loss_grad) + jnp.sqrt(epsilon * g) * noise
        info = minibatch_step_info(loss, x_b.shape[0], n)
        return RMSPropSGLDState(new_w, precond), info

    def position(state):
        return state.position

    return Algorithm(warmup=warmup, step=step, position=position, batch_size=settings.batch_size)


SPEC = SamplerSpec(
    name="rmsprop_sgld",
    settings=RMSPropSGLDSettings,
    build=build,
    description="RMSProp-preconditioned SGLD: G = 1/(√v̂ + a), w ← w − ε/2 G(γ(w − w*) + nβ∇L_m) + √(εG) η; "
    "bias-corrected v by default",
)
