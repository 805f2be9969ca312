"""The local tempered posterior around w*: p(w) ∝ exp(−nβ L_n(w) − γ/2 ‖w − w*‖²) on a flat parameter vector."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

# per_sample_loss(w_flat (d,), x (m, in_dim), y (m, out_dim)) -> (m,) negative log-likelihoods
PerSampleLoss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def inverse_temperature(n: int, beta0: float = 1.0) -> float:
    """β = β0 / log n (Watanabe's WBIC temperature)."""
    return beta0 / math.log(n)


def gamma_from_radius(d: int, prior_radius: float) -> float:
    """γ = d / r²: a Gaussian localizer whose typical radius is r in d dimensions."""
    return d / prior_radius**2


def register_posterior(cls: type) -> type:
    """Register a Posterior dataclass (or subclass) as a JAX pytree: every field not named in
    cls.STATIC is a leaf, the STATIC ones (per_sample_loss, flags that choose code paths) are
    static data compared by value (functions by identity).

    As a pytree the posterior is an ordinary argument of a jitted function: a compiled chunk
    then serves every posterior of the same shapes, dtypes and static data, whatever its
    data, w*, nβ and γ are (closed over instead, they would be constants of the executable).
    """
    names = [f.name for f in dataclasses.fields(cls)]
    static = [name for name in names if name in cls.STATIC]
    return jax.tree_util.register_dataclass(
        cls, data_fields=[name for name in names if name not in static], meta_fields=static)


@register_posterior
@dataclass(frozen=True, eq=False)
class Posterior:
    """Everything a sampler needs: the data, the loss, w*, nβ and γ. Positions are flat (d,) vectors.

    `loss_at_wstar` is the full-data L_n(w*), computed once here and never from minibatches.
    A pytree (`register_posterior`): x, y, w_star, n_beta, gamma and loss_at_wstar are leaves
    (Python floats stay floats on the host; traced they are scalars), per_sample_loss is static.
    `n` and `dim` come from shapes, so they stay Python ints under tracing.
    """

    STATIC: ClassVar[tuple[str, ...]] = ("per_sample_loss",)

    per_sample_loss: PerSampleLoss
    x: jax.Array
    y: jax.Array
    w_star: jax.Array
    n_beta: float
    gamma: float
    loss_at_wstar: float

    @classmethod
    def build(cls, per_sample_loss: PerSampleLoss, x, y, w_star, *, beta0: float = 1.0,
              gamma: float | None = None, prior_radius: float | None = None) -> Posterior:
        n = x.shape[0]
        d = w_star.shape[0]
        if (gamma is None) == (prior_radius is None):
            raise ValueError("give exactly one of gamma or prior_radius")
        g = gamma if gamma is not None else gamma_from_radius(d, prior_radius)
        loss0 = float(jnp.mean(per_sample_loss(w_star, x, y)))
        return cls(per_sample_loss, x, y, w_star, n * inverse_temperature(n, beta0), float(g), loss0)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.w_star.shape[0])

    def batch_loss(self, w: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
        """L_m(w): mean per-sample negative log-likelihood on a batch."""
        return jnp.mean(self.per_sample_loss(w, x, y))

    def full_loss(self, w: jax.Array) -> jax.Array:
        """L_n(w) on the full dataset."""
        return self.batch_loss(w, self.x, self.y)

    def localization(self, w: jax.Array) -> jax.Array:
        return 0.5 * self.gamma * jnp.sum((w - self.w_star) ** 2)

    def logdensity(self, w: jax.Array) -> jax.Array:
        """Full-data log-density −nβ L_n(w) − γ/2 ‖w − w*‖² (up to a constant)."""
        return -self.n_beta * self.full_loss(w) - self.localization(w)

    def loss_from_logdensity(self, w: jax.Array, logdensity: jax.Array) -> jax.Array:
        """L_n(w) recovered from a cached logdensity(w), with no extra pass over the data.

        logdensity = −nβ L_n − γ/2 ‖w − w*‖², so L_n = −(logdensity + γ/2 ‖w − w*‖²) / nβ.
        """
        return -(logdensity + self.localization(w)) / self.n_beta

    def minibatch_loss_and_grads(self, w: jax.Array, x: jax.Array, y: jax.Array):
        """(L_m(w), ∇L_m(w), γ (w − w*)): the pieces every SG-MCMC update combines.

        Kept apart because RMSProp-SGLD preconditions on the loss gradient alone.
        """
        loss, grad = jax.value_and_grad(self.batch_loss)(w, x, y)
        return loss, grad, self.gamma * (w - self.w_star)
