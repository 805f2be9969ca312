"""Empirical risk minimization with optax: finds w* in jitted chunks, stopping when the full-data gradient is small."""

from __future__ import annotations

import functools
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


def make_optimizer(name: str, learning_rate: float | jax.Array) -> optax.GradientTransformation:
    """optax.adam or optax.sgd; the learning rate may be traced (it only scales the update)."""
    match name:
        case "adam":
            return optax.adam(learning_rate)
        case "sgd":
            return optax.sgd(learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; known: adam, sgd")


class _Compiled(NamedTuple):
    run_chunk: Callable  # (carry, stop, x, y, key, lr, tol) -> carry
    loss_and_norm: Callable  # (w, x, y) -> (L(w), ‖∇L(w)‖)


@functools.lru_cache(maxsize=16)
def _compile(loss_fn: LossFn, optimizer_name: str, batch_size: int) -> _Compiled:
    """The jitted training loop for one loss, optimizer and batch size (0 = full batch).

    Cached so that repeated runs (seeds, learning rates, tolerances, which are traced) reuse the
    compiled program; the loss function is keyed by identity.
    """
    value_and_grad = jax.value_and_grad(loss_fn)

    def body(carry: _Carry, x, y, key, lr, tol) -> _Carry:
        optimizer = make_optimizer(optimizer_name, lr)
        if batch_size == 0:
            _, grad = value_and_grad(carry.w, x, y)
            grad_norm = optax.tree.norm(grad)
            # Converged at w: keep it (the loop condition then ends the chunk).
            active = grad_norm >= tol
        else:
            idx = jax.random.randint(jax.random.fold_in(key, carry.step), (batch_size,), 0, x.shape[0])
            _, grad = value_and_grad(carry.w, x[idx], y[idx])
            grad_norm, active = jnp.asarray(jnp.inf, grad.dtype), jnp.asarray(True)
        updates, opt_state = optimizer.update(grad, carry.opt_state, carry.w)
        w = jnp.where(active, optax.apply_updates(carry.w, updates), carry.w)
        opt_state = jax.tree.map(lambda new, old: jnp.where(active, new, old), opt_state, carry.opt_state)
        return _Carry(w, opt_state, carry.step + active.astype(jnp.int32), grad_norm)

    @jax.jit
    def run_chunk(carry: _Carry, stop, x, y, key, lr, tol) -> _Carry:
        # stop is traced, so the last (shorter) chunk reuses the compiled loop.
        def cond(c):
            return (c.step < stop) & (c.grad_norm >= tol)  # NaN ≥ tol is False: stops on NaN too

        return jax.lax.while_loop(cond, lambda c: body(c, x, y, key, lr, tol), carry)

    @jax.jit
    def loss_and_norm(w, x, y):
        loss, grad = value_and_grad(w, x, y)
        return loss, optax.tree.norm(grad)

    return _Compiled(run_chunk, loss_and_norm)


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
    batch_size = 0 if cfg.batch_size == 0 or cfg.batch_size >= n else cfg.batch_size
    compiled = _compile(loss_fn, cfg.optimizer, batch_size)
    w0 = jnp.asarray(w0_flat)
    lr, tol = jnp.asarray(cfg.learning_rate, w0.dtype), jnp.asarray(cfg.grad_tol, w0.dtype)
    init_state = make_optimizer(cfg.optimizer, cfg.learning_rate).init(w0)
    carry = _Carry(w0, init_state, jnp.asarray(0, jnp.int32), jnp.asarray(jnp.inf, w0.dtype))
    chunk = max(1, math.ceil(cfg.steps / NUM_CHUNKS))
    done = 0
    with Bar("ERM", total=cfg.steps, enabled=progress_enabled(progress)) as bar:
        while done < cfg.steps:
            stop = min(done + chunk, cfg.steps)
            carry = compiled.run_chunk(carry, jnp.asarray(stop, jnp.int32), x, y, key, lr, tol)
            steps_taken = int(carry.step)
            bar.advance(steps_taken - done)
            if batch_size == 0 and steps_taken < stop:
                break  # converged or non-finite gradient inside the chunk
            if batch_size:
                _, grad_norm = compiled.loss_and_norm(carry.w, x, y)
                if not float(grad_norm) >= cfg.grad_tol:
                    break
            done = stop
    loss, grad_norm = compiled.loss_and_norm(carry.w, x, y)
    report = TrainReport(float(loss), float(grad_norm), int(carry.step), bool(grad_norm < cfg.grad_tol))
    return carry.w, report
