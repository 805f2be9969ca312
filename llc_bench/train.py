"""Empirical risk minimization with optax: finds w* in jitted chunks, stopping when the full-data gradient is small."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from llc_bench.config import TrainConfig
from llc_bench.progress import Bar, progress_enabled

# loss_fn(w_flat (d,), x (m, in_dim), y (m, out_dim)) -> scalar mean loss
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Progress updates and minibatch convergence checks happen between chunks; the chunk count is
# fixed by cfg.steps alone so that results do not depend on whether a progress bar is shown.
NUM_CHUNKS = 50


@dataclass(frozen=True)
class TrainReport:
    """Outcome of ERM: full-data loss and gradient norm at the returned w*, updates applied, and
    whether ‖∇L_n(w*)‖ < grad_tol."""

    final_loss: float
    grad_norm: float
    steps: int
    converged: bool


class _Carry(NamedTuple):
    w: jax.Array  # (d,)
    opt_state: optax.OptState
    step: jax.Array  # () int32, updates applied so far
    grad_norm: jax.Array  # () full-batch: ‖∇L_n‖ at w; minibatch: +inf (checked between chunks)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """optax.adam or optax.sgd at cfg.learning_rate."""
    match cfg.optimizer:
        case "adam":
            return optax.adam(cfg.learning_rate)
        case "sgd":
            return optax.sgd(cfg.learning_rate)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known: adam, sgd")


def train_erm(key: jax.Array, loss_fn: LossFn, w0_flat: jax.Array, x: jax.Array, y: jax.Array,
              cfg: TrainConfig, progress: bool = False) -> tuple[jax.Array, TrainReport]:
    """Minimize L(w) = loss_fn(w, x, y) from w0 with cfg.optimizer for at most cfg.steps updates.

    Full batch when cfg.batch_size == 0 (or ≥ n): every step uses ∇L_n, and training stops before
    the first update at which ‖∇L_n(w)‖ < grad_tol. Minibatch: step t uses the batch of
    batch_size indices drawn with replacement from fold_in(key, t), and ‖∇L_n‖ is checked between
    chunks. Training also stops when the gradient norm is not finite (reported, not converged).
    The loop runs as jitted `lax.while_loop` chunks; a rich progress bar advances between them.
    """
    n = x.shape[0]
    full_batch = cfg.batch_size == 0 or cfg.batch_size >= n
    optimizer = make_optimizer(cfg)
    value_and_grad = jax.value_and_grad(loss_fn)
    tol = cfg.grad_tol

    def body(carry: _Carry, x, y) -> _Carry:
        if full_batch:
            _, grad = value_and_grad(carry.w, x, y)
            grad_norm = optax.tree.norm(grad)
            # Converged at w: keep it (the loop condition then ends the chunk).
            active = grad_norm >= tol
        else:
            idx = jax.random.randint(jax.random.fold_in(key, carry.step), (cfg.batch_size,), 0, n)
            _, grad = value_and_grad(carry.w, x[idx], y[idx])
            grad_norm, active = jnp.asarray(jnp.inf, grad.dtype), jnp.asarray(True)
        updates, opt_state = optimizer.update(grad, carry.opt_state, carry.w)
        w = jnp.where(active, optax.apply_updates(carry.w, updates), carry.w)
        opt_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), opt_state, carry.opt_state)
        return _Carry(w, opt_state, carry.step + active.astype(jnp.int32), grad_norm)

    @jax.jit
    def run_chunk(carry: _Carry, stop: jax.Array, x, y) -> _Carry:
        # stop is traced, so the last (shorter) chunk reuses the compiled loop.
        def cond(c):
            return (c.step < stop) & (c.grad_norm >= tol)  # NaN ≥ tol is False: stops on NaN too

        return jax.lax.while_loop(cond, lambda c: body(c, x, y), carry)

    @jax.jit
    def full_loss_and_norm(w, x, y):
        loss, grad = value_and_grad(w, x, y)
        return loss, optax.tree.norm(grad)

    w0 = jnp.asarray(w0_flat)
    carry = _Carry(w0, optimizer.init(w0), jnp.asarray(0, jnp.int32), jnp.asarray(jnp.inf, w0.dtype))
    chunk = max(1, math.ceil(cfg.steps / NUM_CHUNKS))
    done = 0
    with Bar("ERM", total=cfg.steps, enabled=progress_enabled(progress)) as bar:
        while done < cfg.steps:
            stop = min(done + chunk, cfg.steps)
            carry = run_chunk(carry, jnp.asarray(stop, jnp.int32), x, y)
            steps_taken = int(carry.step)
            bar.advance(steps_taken - done)
            if full_batch and steps_taken < stop:
                break  # converged or non-finite gradient inside the chunk
            if not full_batch:
                _, grad_norm = full_loss_and_norm(carry.w, x, y)
                if not float(grad_norm) >= tol:
                    break
            done = stop
    loss, grad_norm = full_loss_and_norm(carry.w, x, y)
    report = TrainReport(float(loss), float(grad_norm), int(carry.step), bool(grad_norm < tol))
    return carry.w, report
