"""ERM: exact SGD iterates and stopping step, least-squares recovery, determinism, chunking invariance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llc_bench.train as train
from llc_bench.config import TrainConfig
from llc_bench.train import train_erm


@pytest.fixture(scope="module")
def regression():
    """Linear least squares: x (256, 3), y = x A + noise; the minimizer is lstsq's."""
    x = jax.random.normal(jax.random.key(0), (256, 3))
    a = jnp.array([[1.0, 0.5], [2.0, 0.0], [-1.0, 1.0]])
    y = x @ a + 0.1 * jax.random.normal(jax.random.key(1), (256, 2))
    w_ls = np.linalg.lstsq(np.asarray(x, np.float64), np.asarray(y, np.float64), rcond=None)[0]
    return x, y, w_ls.ravel(), x @ a, np.asarray(a).ravel()


def lsq_loss(w, x, y):
    return 0.5 * jnp.mean(jnp.sum((x @ w.reshape(3, 2) - y) ** 2, -1))


def test_sgd_iterates_and_stopping_step_are_exact():
    # L(w) = ½ a (w − c)²: SGD gives w_t − c = (1 − η a)^t (w_0 − c), and training stops at the
    # first t with |∇L(w_t)| = a |w_t − c| < tol.
    a, c, eta, tol, w0 = 2.0, 3.0, 0.1, 1e-3, 0.0
    loss = lambda w, x, y: 0.5 * a * jnp.sum((w - c) ** 2)  # noqa: E731
    t_stop = math.ceil(math.log(tol / (a * abs(w0 - c))) / math.log(1 - eta * a))
    cfg = TrainConfig(optimizer="sgd", learning_rate=eta, steps=1000, grad_tol=tol)
    dummy = jnp.zeros((4, 1))
    w, report = train_erm(jax.random.key(0), loss, jnp.array([w0]), dummy, dummy, cfg)
    assert report.steps == t_stop and report.converged
    np.testing.assert_allclose(float(w[0]) - c, (1 - eta * a) ** t_stop * (w0 - c), atol=1e-6)
    assert report.grad_norm < tol and report.final_loss == pytest.approx(0.5 * a * (float(w[0]) - c) ** 2)
    # With grad_tol = 0 every step runs.
    _, report = train_erm(jax.random.key(0), loss, jnp.array([w0]), dummy, dummy,
                          TrainConfig(optimizer="sgd", learning_rate=eta, steps=37, grad_tol=0.0))
    assert report.steps == 37 and not report.converged


# SGD is checked exactly above; batch 64 is shared with the determinism test (one compile).
@pytest.mark.parametrize("optimizer, lr, batch", [("adam", 0.05, 0), ("adam", 0.02, 64)])
def test_recovers_least_squares(regression, optimizer, lr, batch):
    x, y, w_ls, y_clean, a = regression
    if batch:  # minibatch noise keeps Adam off a noisy optimum; exact targets make every batch agree
        y, w_ls = y_clean, a
    cfg = TrainConfig(optimizer=optimizer, learning_rate=lr, steps=3000, batch_size=batch, grad_tol=1e-3)
    w, report = train_erm(jax.random.key(2), lsq_loss, jnp.zeros(6), x, y, cfg)
    assert report.converged and report.steps < cfg.steps
    # ‖w − w_ls‖ ≤ ‖∇L‖ / λ_min(XᵀX/n) for this quadratic; λ_min ≈ 1 here, so 1e-2 is safe.
    np.testing.assert_allclose(np.asarray(w), w_ls, atol=1e-2)
    assert report.final_loss == pytest.approx(float(lsq_loss(w, x, y)), rel=1e-6)


def test_deterministic_and_chunking_invariant(regression, monkeypatch):
    x, y = regression[:2]
    cfg = TrainConfig(optimizer="adam", learning_rate=0.01, steps=120, batch_size=64, grad_tol=0.0)
    w1, r1 = train_erm(jax.random.key(3), lsq_loss, jnp.zeros(6), x, y, cfg)
    w2, r2 = train_erm(jax.random.key(3), lsq_loss, jnp.zeros(6), x, y, cfg, progress=True)
    np.testing.assert_array_equal(w1, w2)
    assert r1 == r2 and r1.steps == 120
    w3, _ = train_erm(jax.random.key(4), lsq_loss, jnp.zeros(6), x, y, cfg)
    assert not np.array_equal(w1, w3)  # other key, other minibatches
    # The chunk size only changes where the loop pauses, not the iterates.
    monkeypatch.setattr(train, "NUM_CHUNKS", 7)
    w4, r4 = train_erm(jax.random.key(3), lsq_loss, jnp.zeros(6), x, y, cfg)
    np.testing.assert_array_equal(w1, w4)
    assert r4 == r1


def test_non_finite_gradient_stops_unconverged():
    loss = lambda w, x, y: jnp.sum(jnp.sqrt(w - 1.0))  # noqa: E731 - NaN gradient at w = 0
    dummy = jnp.zeros((2, 1))
    w, report = train_erm(jax.random.key(0), loss, jnp.zeros(2), dummy, dummy,
                          TrainConfig(steps=50, grad_tol=1e-3))
    assert report.steps == 0 and not report.converged and math.isnan(report.grad_norm)
    np.testing.assert_array_equal(w, jnp.zeros(2))
