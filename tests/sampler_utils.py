"""Test helpers: Gaussian targets expressed as posteriors, and a bare vmapped driver for one Algorithm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.posterior import Posterior


def gaussian_posterior(dim: int = 3, n: int = 100, gamma: float = 1.0, seed: int = 0, corr: float = 0.6):
    """A posterior that is exactly Gaussian, plus its mean and covariance.

    L_n(w) = ½ (w − μ)ᵀ A (w − μ) for every sample (data ignored), so the log-density is
    −nβ L_n − γ/2 ‖w − w*‖², Gaussian with precision Λ = nβ A + γ I and mean Λ⁻¹ (nβ A μ + γ w*).
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    scales = np.linspace(0.5, 2.0, dim)
    a = (q * scales) @ q.T
    a = a + corr * np.ones((dim, dim)) / dim
    mu = rng.normal(size=dim)
    w_star = np.zeros(dim)
    a_j, mu_j = jnp.asarray(a, jnp.float32), jnp.asarray(mu, jnp.float32)

    def per_sample_loss(w, x, y):
        r = w - mu_j
        return jnp.full((x.shape[0],), 0.5 * r @ a_j @ r)

    x = jnp.zeros((n, 1))
    y = jnp.zeros((n, 1))
    post = Posterior.build(per_sample_loss, x, y, jnp.asarray(w_star, jnp.float32), gamma=gamma)
    prec = post.n_beta * a + gamma * np.eye(dim)
    cov = np.linalg.inv(prec)
    mean = cov @ (post.n_beta * a @ mu + gamma * w_star)
    return post, mean, cov


def run_algorithm(algorithm, posterior, key, num_chains: int, num_steps: int):
    """Warm up and run `num_chains` vmapped chains for `num_steps`; returns positions (C, T, d) and infos."""
    init_keys, run_key = jax.random.split(key)
    positions0 = jnp.broadcast_to(posterior.w_star, (num_chains, posterior.dim))
    states, params, _ = jax.vmap(algorithm.warmup)(jax.random.split(init_keys, num_chains), positions0)

    def one_step(carry, step_key):
        keys = jax.random.split(step_key, num_chains)
        batch = None
        if algorithm.batch_size is not None:
            # A key of its own for the batch indices: reusing the sampler's key would correlate
            # the minibatch with the injected noise (the runner folds in 0 and 1 the same way).
            batch_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
            keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
            idx = jax.vmap(lambda k: jax.random.randint(k, (algorithm.batch_size,), 0, posterior.n))(batch_keys)
            batch = (posterior.x[idx], posterior.y[idx])
            step = jax.vmap(algorithm.step)
        else:
            step = jax.vmap(algorithm.step, in_axes=(0, 0, 0, None))
        new, info = step(keys, carry, params, batch)
        return new, (jax.vmap(algorithm.position)(new), info)

    @jax.jit
    def run(states, key):
        return jax.lax.scan(one_step, states, jax.random.split(key, num_steps))

    _, (positions, infos) = run(states, run_key)
    return np.asarray(positions).transpose(1, 0, 2), jax.tree.map(lambda a: np.asarray(a).T, infos)


def dln_posterior():
    """A noise-free two-layer linear network at a rank-1 teacher (d = 24, n = 2000, γ = 1): its
    curvature grows away from w* along the directions that leave the end-to-end map unchanged."""
    rng = np.random.default_rng(4)
    n, d_in, h, d_out = 2000, 4, 4, 2
    a, b = rng.normal(size=(d_in, 1)), rng.normal(size=(1, d_out))
    w1 = np.zeros((d_in, h))
    w1[:, :1] = a
    w2 = np.zeros((h, d_out))
    w2[:1] = b
    x = rng.uniform(-1, 1, size=(n, d_in))
    y = x @ w1 @ w2
    w_star = np.concatenate([w1.ravel(), w2.ravel()])

    def per_sample_loss(w, xb, yb):
        m1, m2 = w[: d_in * h].reshape(d_in, h), w[d_in * h:].reshape(h, d_out)
        return 0.5 * jnp.sum((xb @ m1 @ m2 - yb) ** 2, axis=-1)

    return Posterior.build(per_sample_loss, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
                           jnp.asarray(w_star, jnp.float32), gamma=1.0)
