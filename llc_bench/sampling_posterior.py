"""The local posterior sample() targets: weight restrictions (parameter paths -> the flat vector w of
free entries) and SamplingPosterior, the Posterior with devinterp's weight decay and gradient accumulation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from llc_bench.posterior import Posterior, register_posterior
from llc_bench.runner import key_name

# ---------------------------------------------------------------------------------------------
# Weight restrictions: parameter paths -> the flat vector of free entries
# ---------------------------------------------------------------------------------------------


def param_paths(params) -> list[str]:
    """'/'-joined path of every leaf of `params` in flattening order, e.g. 'params/Dense_0/kernel'."""
    return ["/".join(key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _flatten_mask_spec(spec: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'params': {'Dense_0': {'kernel': m}}} or {'params/Dense_0/kernel': m} -> {'params/Dense_0/kernel': m}."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten_mask_spec(value, path))
        else:
            out[path.strip("/")] = value
    return out


def free_mask(params, param_masks) -> np.ndarray:
    """(D,) bool over ravel_pytree(params): True for the entries sampling may move.

    param_masks None: everything free. Otherwise a mapping from parameter paths (or nested dicts
    mirroring the pytree) to a boolean mask of the parameter's exact shape, or None for the whole
    parameter; a path naming a subtree ('params/Dense_0') with None frees every leaf under it.
    Every parameter not named is frozen.
    """
    leaves = jax.tree_util.tree_leaves(params)
    paths = param_paths(params)
    if param_masks is None:
        return np.ones(sum(int(np.size(leaf)) for leaf in leaves), bool)
    if not isinstance(param_masks, Mapping):
        raise ValueError(f"param_masks must be a dict of parameter path -> mask or None, got {type(param_masks).__name__}")
    masks: list[np.ndarray | None] = [None] * len(leaves)
    for spec_path, mask in _flatten_mask_spec(param_masks).items():
        hits = [i for i, p in enumerate(paths) if p == spec_path or p.startswith(spec_path + "/")]
        if not hits:
            raise ValueError(f"param_masks: no parameter at path {spec_path!r}; parameter paths are {paths}")
        if mask is not None and (len(hits) != 1 or paths[hits[0]] != spec_path):
            raise ValueError(f"param_masks: {spec_path!r} names a group of parameters; a mask array must name "
                             "one parameter (use None to free the whole group)")
        for i in hits:
            if masks[i] is not None:
                raise ValueError(f"param_masks: parameter {paths[i]!r} is named more than once")
            shape = np.shape(leaves[i])
            if mask is None:
                masks[i] = np.ones(shape, bool)
                continue
            m = np.asarray(mask)
            if m.shape != shape:
                raise ValueError(f"param_masks: mask for {paths[i]!r} has shape {m.shape}, "
                                 f"but the parameter has shape {shape}")
            if m.dtype != bool:
                if not (np.issubdtype(m.dtype, np.integer) and np.isin(m, (0, 1)).all()):
                    raise ValueError(f"param_masks: mask for {paths[i]!r} must be boolean (or 0/1), got {m.dtype}")
                m = m.astype(bool)
            masks[i] = m
    flat = np.concatenate([np.zeros(np.size(leaf), bool) if m is None else m.reshape(-1)
                           for leaf, m in zip(leaves, masks, strict=True)])
    if not flat.any():
        raise ValueError("param_masks leaves no parameter free to sample")
    return flat


@dataclass(frozen=True)
class Restriction:
    """The map between the model's parameter pytree and the flat vector w of free entries sampled.

    params(w) = unravel(w_all with w_all[free_index] = w); with every entry free it is unravel(w).
    """

    w_all: jax.Array  # (D,) ravel_pytree(params at w*)
    unravel: Callable[[jax.Array], Any]
    free_index: np.ndarray  # (d,) positions of the free entries in w_all

    @classmethod
    def build(cls, params, param_masks) -> Restriction:
        w_all, unravel = ravel_pytree(params)
        mask = free_mask(params, param_masks)
        return cls(w_all, unravel, np.flatnonzero(mask))

    @property
    def all_free(self) -> bool:
        return self.free_index.size == self.w_all.size

    @property
    def w_star(self) -> jax.Array:
        # gathered on the host: an eager device gather would compile a kernel for nothing
        return self.w_all if self.all_free else jnp.asarray(np.asarray(self.w_all)[self.free_index])

    def params(self, w: jax.Array):
        return self.unravel(w if self.all_free else self.w_all.at[self.free_index].set(w))


# ---------------------------------------------------------------------------------------------
# The posterior sample() targets and the sampler built on it
# ---------------------------------------------------------------------------------------------


@register_posterior
@dataclass(frozen=True, eq=False)
class SamplingPosterior(Posterior):
    """Posterior plus devinterp's extras on the free vector w:

        p(w) ∝ exp(−nβ L_n(w) − γ/2 ‖w − w*‖² − λ/2 ‖w‖²)      (λ = weight_decay: a N(0, 1/λ) prior)

    and gradient accumulation: a minibatch of accumulation_steps · b samples is processed as
    accumulation_steps sequential chunks of b whose loss gradients are averaged (the same
    gradient as one batch, at the memory of one chunk).
    """

    # static: weight_decay = 0 drops its term from the compiled code, and the chunk count is a shape
    STATIC: ClassVar[tuple[str, ...]] = ("per_sample_loss", "weight_decay", "accumulation_steps")

    weight_decay: float = 0.0
    accumulation_steps: int = 1

    def localization(self, w: jax.Array) -> jax.Array:
        out = 0.5 * self.gamma * jnp.sum((w - self.w_star) ** 2)
        if self.weight_decay:
            out = out + 0.5 * self.weight_decay * jnp.sum(w**2)
        return out

    def minibatch_loss_and_grads(self, w: jax.Array, x: jax.Array, y: jax.Array):
        prior_grad = self.gamma * (w - self.w_star)
        if self.weight_decay:
            prior_grad = prior_grad + self.weight_decay * w
        k = self.accumulation_steps
        if k == 1:
            loss, grad = jax.value_and_grad(self.batch_loss)(w, x, y)
            return loss, grad, prior_grad
        xs = x.reshape(k, x.shape[0] // k, *x.shape[1:])
        ys = y.reshape(k, y.shape[0] // k, *y.shape[1:])

        def accumulate(acc, chunk):
            loss, grad = jax.value_and_grad(self.batch_loss)(w, *chunk)
            return (acc[0] + loss, acc[1] + grad), None

        zero = (jnp.zeros((), w.dtype), jnp.zeros_like(w))
        (loss, grad), _ = jax.lax.scan(accumulate, zero, (xs, ys))
        return loss / k, grad / k, prior_grad

