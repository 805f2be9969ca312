"""Input distributions, noise models and NLLs against known moments, tail masses and closed forms."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llc_bench.config import DISTRIBUTIONS, NOISES, DataConfig
from llc_bench.data import (
    add_noise,
    noise_sigma,
    per_sample_nll,
    population_moments,
    residual_variance,
    sample_inputs,
)

Z = 5.0  # |estimate − truth| / SE bound; ~30 entries per test, so false alarms are ~1e-5

# One input configuration per distribution, shared by all tests so that each compiles once.
# input_df = 12 keeps the 8th moment finite, so the plug-in SE of the covariance is reliable.
BASE = DataConfig(n=40_000, in_dim=4, out_dim=2, input_df=12.0, mixture_components=3,
                  manifold_dim=2, spectrum_decay=1.5, spectrum_scale=2.0, box_half_width=2.0)


def _moment_z_scores(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> tuple[float, float]:
    """Largest z-score of the sample mean and of the sample covariance entries (plug-in SEs)."""
    n = x.shape[0]
    z_mean = np.abs(x.mean(0) - mean) / np.sqrt(np.diag(cov) / n)
    c = x - x.mean(0)
    prods = c[:, :, None] * c[:, None, :]
    se = prods.std(0) / math.sqrt(n)
    z_cov = np.abs(prods.mean(0) - cov) / se
    return float(z_mean.max()), float(z_cov.max())


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_input_moments(distribution):
    cfg = dataclasses.replace(BASE, distribution=distribution)
    x = np.asarray(sample_inputs(jax.random.key(3), cfg), dtype=np.float64)
    assert x.shape == (cfg.n, cfg.in_dim)
    mean, cov = (np.asarray(a, dtype=np.float64) for a in population_moments(cfg))
    z_mean, z_cov = _moment_z_scores(x, mean, cov)
    assert z_mean < Z and z_cov < Z, (z_mean, z_cov)
    eig = np.linalg.eigvalsh(cov)[::-1]
    if distribution == "anisotropic":  # λ_i = 2 i^(−1.5) along rotated axes
        np.testing.assert_allclose(eig, 2.0 * np.arange(1, 5) ** -1.5, rtol=1e-4)
        assert np.abs(cov - np.diag(np.diag(cov))).max() > 0.05  # the axes are not the coordinates
    if distribution == "manifold":  # normalized to unit average variance, still full rank
        assert abs(eig.sum() / 4 - 1) < 1e-4 and eig.min() > 1e-4
    if distribution == "mixture":  # K = 3 spread means inflate the covariance well beyond I
        assert eig[0] > 2


def test_inputs_reproducible_and_key_dependent():
    cfg = dataclasses.replace(BASE, distribution="mixture")
    a = sample_inputs(jax.random.key(1), cfg)
    np.testing.assert_array_equal(a, sample_inputs(jax.random.key(1), cfg))
    assert not np.allclose(a, sample_inputs(jax.random.key(2), cfg))
    # The distribution's structure (here the means) is fixed unless asked otherwise.
    m1, _ = population_moments(cfg)
    m2, _ = population_moments(cfg, structure_key=jax.random.key(9))
    assert not np.allclose(m1, m2)
    # The noise settings do not touch the inputs.
    np.testing.assert_array_equal(a, sample_inputs(jax.random.key(1), dataclasses.replace(cfg, noise="none")))


# ---- noise ---------------------------------------------------------------------------------

NOISE_BASE = dataclasses.replace(BASE, noise_scale=0.3, noise_df=10.0, outlier_fraction=0.08,
                                 outlier_scale=20.0, hetero_slope=1.0)


@functools.cache
def _noise(noise):
    """(cfg, x, ε) for 40k samples with 2 outputs, one draw per noise model for the whole module."""
    cfg = dataclasses.replace(NOISE_BASE, noise=noise)
    x = sample_inputs(jax.random.key(0), cfg)
    y_clean = jnp.tanh(x[:, :2])
    y = add_noise(jax.random.key(1), x, y_clean, cfg)
    assert y.shape == y_clean.shape
    return cfg, np.asarray(x, np.float64), np.asarray(y - y_clean, np.float64)


def _t_tail(nu, a):
    """P(|t_ν| > a) by quadrature of the t density (the part beyond 10⁴ is below 1e-30 for ν = 10)."""
    t = np.linspace(a, 1e4, 2_000_001)
    log_c = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
    return 2 * np.trapezoid(np.exp(log_c - (nu + 1) / 2 * np.log1p(t * t / nu)), t)


@pytest.mark.parametrize("noise", ["gaussian", "student_t", "outliers", "heteroscedastic"])
def test_noise_residual_variance(noise):
    cfg, x, eps = _noise(noise)
    assert abs(eps.mean()) < Z * eps.std() / math.sqrt(eps.size)
    sq = eps**2
    target = residual_variance(cfg, x)
    assert abs(sq.mean() - target) < Z * sq.std() / math.sqrt(sq.size), (sq.mean(), target)


def test_no_noise_is_exact():
    _, _, eps = _noise("none")
    assert np.all(eps == 0)


def test_heteroscedastic_scale_follows_x0():
    cfg, x, eps = _noise("heteroscedastic")
    sigma = np.asarray(noise_sigma(jnp.asarray(x, jnp.float32), cfg), np.float64)
    np.testing.assert_allclose(sigma, 0.3 * (1 + np.abs(x[:, 0])), rtol=1e-5)
    std = eps / sigma[:, None]  # standardized residuals are N(0, 1) wherever x is
    for mask in (np.abs(x[:, 0]) < 0.5, np.abs(x[:, 0]) > 1.5):
        v = std[mask] ** 2
        assert abs(v.mean() - 1) < Z * v.std() / math.sqrt(v.size)


def test_outlier_fraction():
    # A sample is an outlier as a whole; with κ = 20, |ε_1| > 4σ almost only for outliers:
    # P = p·erfc(4/(κ√2)) + (1−p)·erfc(4/√2).
    cfg, _, eps = _noise("outliers")
    p, kappa, sigma = cfg.outlier_fraction, cfg.outlier_scale, cfg.noise_scale
    q = p * math.erfc(4 / (kappa * math.sqrt(2))) + (1 - p) * math.erfc(4 / math.sqrt(2))
    frac = np.mean(np.abs(eps[:, 0]) > 4 * sigma)
    assert abs(frac - q) < Z * math.sqrt(q * (1 - q) / eps.shape[0]), (frac, q)
    # Both outputs of an outlier are wide: joint exceedances are ~p·P², not ~P².
    both = np.mean(np.all(np.abs(eps) > 4 * sigma, axis=1))
    q2 = p * math.erfc(4 / (kappa * math.sqrt(2))) ** 2
    assert abs(both - q2) < Z * math.sqrt(q2 / eps.shape[0])


def test_student_t_noise_tail():
    cfg, _, eps = _noise("student_t")
    a = 4.0  # P(|t_10| > 4) ≈ 2.5e-3, forty times the Gaussian value
    p = _t_tail(cfg.noise_df, a)
    frac = np.mean(np.abs(eps / cfg.noise_scale) > a)
    assert abs(frac - p) < Z * math.sqrt(p * (1 - p) / eps.size), (frac, p)


# ---- negative log-likelihoods --------------------------------------------------------------

NLL_CFG = DataConfig(noise_scale=0.5, hetero_slope=1.5, noise_df=4.0, outlier_fraction=0.2,
                     outlier_scale=6.0)
X0 = 0.7  # σ(x) = 0.5 (1 + 1.5·0.7) for the heteroscedastic model


def _closed_form(noise, r):
    """Exact −log p(r) (m,) for residuals r (m, o), from the textbook densities in numpy float64."""
    s, nu, p, k = 0.5, 4.0, 0.2, 6.0
    o = r.shape[1]

    def gauss(s):
        return np.sum(0.5 * r**2 / s**2, 1) + o * (math.log(s) + 0.5 * math.log(2 * math.pi))

    match noise:
        case "none":
            return gauss(1.0)
        case "gaussian":
            return gauss(s)
        case "heteroscedastic":
            return gauss(s * (1 + 1.5 * X0))
        case "student_t":
            log_c = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
            return -np.sum(log_c - math.log(s) - (nu + 1) / 2 * np.log1p(r**2 / (nu * s * s)), 1)
        case "outliers":
            return -np.logaddexp(math.log(1 - p) - gauss(s), math.log(p) - gauss(k * s))


@pytest.mark.parametrize("noise", NOISES)
def test_nll_closed_form_normalization_and_dropped_constants(noise):
    cfg = dataclasses.replace(NLL_CFG, noise=noise)
    full, light = per_sample_nll(cfg, normalized=True), per_sample_nll(cfg)
    # A grid of y for one sample at x_0 = 0.7, prediction 0.3: t_4's tail beyond |r| = 400 is ~1e-10.
    y = np.linspace(-400.0, 400.0, 80_001)
    pred = jnp.full((y.size, 1), 0.3)
    x = jnp.tile(jnp.array([[X0, 0.0]]), (y.size, 1))
    got = np.asarray(full(pred, jnp.asarray(y)[:, None], x), np.float64)
    want = _closed_form(noise, (y - 0.3)[:, None])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert abs(np.trapezoid(np.exp(-got), y) - 1) < 1e-3
    # The dropped terms do not depend on the prediction (up to float32 rounding of the NLL).
    gap = got - np.asarray(light(pred, jnp.asarray(y)[:, None], x), np.float64)
    assert np.all(np.abs(gap - gap[y.size // 2]) <= 1e-5 + 4e-7 * np.abs(got))


@pytest.mark.parametrize("noise", NOISES)
def test_nll_two_outputs_and_stability(noise):
    cfg = dataclasses.replace(NLL_CFG, noise=noise)
    nll = per_sample_nll(cfg, normalized=True)
    r = np.array([[0.5, -0.2], [1.0, 0.0], [3.0, -2.0], [1e4, -1e4]])
    x = jnp.tile(jnp.array([[X0, 1.0]]), (4, 1))
    out = np.asarray(nll(jnp.zeros((4, 2)), jnp.asarray(r, jnp.float32), x), np.float64)
    # The mixture couples the outputs (one outlier indicator per sample); the rest factorize.
    np.testing.assert_allclose(out, _closed_form(noise, r), rtol=1e-5)
    if noise in ("outliers", "student_t"):  # heavy tails: finite loss and gradient far out
        grad = jax.grad(lambda p: jnp.sum(nll(p, jnp.asarray(r, jnp.float32), x)))(jnp.zeros((4, 2)))
        assert np.all(np.isfinite(np.asarray(grad)))
