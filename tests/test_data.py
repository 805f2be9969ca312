"""Input distributions, noise models and NLLs against known moments, tail masses and closed forms."""

import dataclasses
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
    # input_df = 12 keeps the 8th moment finite, so the plug-in SE of the covariance is reliable.
    cfg = DataConfig(n=40_000, in_dim=4, distribution=distribution, input_df=12.0,
                     mixture_components=3, manifold_dim=2, spectrum_decay=1.5, box_half_width=2.0)
    x = np.asarray(sample_inputs(jax.random.key(3), cfg), dtype=np.float64)
    assert x.shape == (cfg.n, cfg.in_dim)
    mean, cov = (np.asarray(a, dtype=np.float64) for a in population_moments(cfg))
    z_mean, z_cov = _moment_z_scores(x, mean, cov)
    assert z_mean < Z and z_cov < Z, (z_mean, z_cov)


def test_anisotropic_spectrum_and_manifold_scale():
    cfg = DataConfig(in_dim=5, distribution="anisotropic", spectrum_decay=2.0, spectrum_scale=3.0)
    _, cov = population_moments(cfg)
    np.testing.assert_allclose(np.linalg.eigvalsh(np.asarray(cov, np.float64))[::-1],
                               3.0 * np.arange(1, 6) ** -2.0, rtol=1e-4)
    # The manifold embedding is normalized to unit average variance and stays full rank.
    _, cov = population_moments(DataConfig(in_dim=6, distribution="manifold", manifold_dim=2))
    eig = np.linalg.eigvalsh(np.asarray(cov, np.float64))
    assert abs(eig.sum() / 6 - 1) < 1e-4 and eig.min() > 1e-6


def test_manifold_is_a_k_dimensional_sheet():
    # Points are a smooth function of a 2-d latent: the same key gives the same latent, and
    # jittering the latent direction-by-direction spans only 2 tangent directions.
    cfg = DataConfig(n=1, in_dim=6, distribution="manifold", manifold_dim=2)
    from llc_bench.data import input_structure
    s = input_structure(cfg)
    embed = lambda z: jnp.sin(s.embed_b @ z) @ s.embed_a.T + s.embed_c @ z  # noqa: E731
    jac = jax.jacfwd(embed)(jnp.array([0.3, -0.7]))
    assert jac.shape == (6, 2) and np.linalg.matrix_rank(np.asarray(jac)) == 2


def test_student_t_inputs_have_heavy_tails():
    # The marginal of a multivariate t_ν is univariate t_ν; for ν = 3,
    # P(|t| > a) = 1 − (2/π)[a/(√3(1 + a²/3)) + arctan(a/√3)].
    cfg = DataConfig(n=100_000, in_dim=2, distribution="student_t", input_df=3.0)
    x0 = np.asarray(sample_inputs(jax.random.key(0), cfg))[:, 0]
    a = 5.0
    p = 1 - (2 / math.pi) * (a / (math.sqrt(3) * (1 + a * a / 3)) + math.atan(a / math.sqrt(3)))
    frac = np.mean(np.abs(x0) > a)
    assert abs(frac - p) < Z * math.sqrt(p * (1 - p) / cfg.n), (frac, p)


def test_inputs_reproducible_and_key_dependent():
    cfg = DataConfig(n=50, in_dim=3, distribution="mixture")
    a = sample_inputs(jax.random.key(1), cfg)
    np.testing.assert_array_equal(a, sample_inputs(jax.random.key(1), cfg))
    assert not np.allclose(a, sample_inputs(jax.random.key(2), cfg))
    # The distribution's structure (here the means) is fixed unless asked otherwise.
    m1, _ = population_moments(cfg)
    m2, _ = population_moments(cfg, structure_key=jax.random.key(9))
    assert not np.allclose(m1, m2)


# ---- noise ---------------------------------------------------------------------------------

def _noise(cfg, n=100_000, out_dim=2, seed=0):
    cfg = dataclasses.replace(cfg, n=n, in_dim=3, out_dim=out_dim)
    x = sample_inputs(jax.random.key(seed), cfg)
    y_clean = jnp.tanh(x[:, :out_dim])
    y = add_noise(jax.random.key(seed + 1), x, y_clean, cfg)
    assert y.shape == y_clean.shape
    return cfg, np.asarray(x, np.float64), np.asarray(y - y_clean, np.float64)


@pytest.mark.parametrize("noise", ["gaussian", "student_t", "outliers", "heteroscedastic"])
def test_noise_residual_variance(noise):
    cfg, x, eps = _noise(DataConfig(noise=noise, noise_scale=0.3, noise_df=10.0,
                                    outlier_fraction=0.1, outlier_scale=5.0, hetero_slope=1.0))
    assert abs(eps.mean()) < Z * eps.std() / math.sqrt(eps.size)
    sq = eps**2
    target = residual_variance(cfg, x)
    assert abs(sq.mean() - target) < Z * sq.std() / math.sqrt(sq.size), (sq.mean(), target)


def test_no_noise_is_exact():
    _, _, eps = _noise(DataConfig(noise="none"), n=100)
    assert np.all(eps == 0)


def test_heteroscedastic_scale_follows_x0():
    cfg, x, eps = _noise(DataConfig(noise="heteroscedastic", noise_scale=0.2, hetero_slope=2.0))
    sigma = np.asarray(noise_sigma(jnp.asarray(x), cfg), np.float64)[:, None]
    np.testing.assert_allclose(sigma[:, 0], 0.2 * (1 + 2.0 * np.abs(x[:, 0])), rtol=1e-5)
    std = eps / sigma  # standardized residuals are N(0, 1) wherever x is
    small, large = np.abs(x[:, 0]) < 0.5, np.abs(x[:, 0]) > 1.5
    for mask in (small, large):
        v = std[mask] ** 2
        assert abs(v.mean() - 1) < Z * v.std() / math.sqrt(v.size)


def test_outlier_fraction():
    # A sample is an outlier as a whole; with κ = 20, |ε_1| > 4σ almost only for outliers:
    # P = p·erfc(4/(κ√2)) + (1−p)·erfc(4/√2).
    p, kappa, sigma = 0.08, 20.0, 0.1
    cfg, _, eps = _noise(DataConfig(noise="outliers", noise_scale=sigma, outlier_fraction=p,
                                    outlier_scale=kappa), out_dim=1)
    q = p * math.erfc(4 / (kappa * math.sqrt(2))) + (1 - p) * math.erfc(4 / math.sqrt(2))
    frac = np.mean(np.abs(eps[:, 0]) > 4 * sigma)
    assert abs(frac - q) < Z * math.sqrt(q * (1 - q) / eps.shape[0]), (frac, q)


def test_student_t_noise_tail():
    cfg, _, eps = _noise(DataConfig(noise="student_t", noise_scale=0.5, noise_df=3.0), out_dim=1)
    a = 5.0
    p = 1 - (2 / math.pi) * (a / (math.sqrt(3) * (1 + a * a / 3)) + math.atan(a / math.sqrt(3)))
    frac = np.mean(np.abs(eps[:, 0] / 0.5) > a)
    assert abs(frac - p) < Z * math.sqrt(p * (1 - p) / eps.shape[0])


# ---- negative log-likelihoods --------------------------------------------------------------

NLL_CFG = DataConfig(noise_scale=0.5, hetero_slope=1.5, noise_df=4.0, outlier_fraction=0.2,
                     outlier_scale=6.0)


def _closed_form(noise, r, x0):
    """Exact −log p(r) for one output, from the textbook densities (plain math, no JAX)."""
    s, nu, p, k = 0.5, 4.0, 0.2, 6.0
    gauss = lambda r, s: 0.5 * r * r / (s * s) + math.log(s) + 0.5 * math.log(2 * math.pi)  # noqa: E731
    match noise:
        case "none":
            return gauss(r, 1.0)
        case "gaussian":
            return gauss(r, s)
        case "heteroscedastic":
            return gauss(r, s * (1 + 1.5 * abs(x0)))
        case "student_t":
            log_c = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
            return -(log_c - math.log(s) - (nu + 1) / 2 * math.log1p(r * r / (nu * s * s)))
        case "outliers":
            dens = (1 - p) * math.exp(-gauss(r, s)) + p * math.exp(-gauss(r, k * s))
            return -math.log(dens)


@pytest.mark.parametrize("noise", NOISES)
def test_nll_closed_form_and_dropped_constants(noise):
    cfg = dataclasses.replace(NLL_CFG, noise=noise)
    full, light = per_sample_nll(cfg, normalized=True), per_sample_nll(cfg)
    r = jnp.array([[0.0], [0.3], [-1.1], [2.5]])
    x = jnp.array([[0.0, 1.0], [-0.4, 2.0], [1.2, 0.0], [2.0, -1.0]])
    pred = jnp.array([[0.2], [-0.1], [0.7], [1.0]])
    got = np.asarray(full(pred, pred + r, x))
    want = [_closed_form(noise, float(r[i, 0]), float(x[i, 0])) for i in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The dropped terms do not depend on the prediction.
    gap1 = np.asarray(full(pred, pred + r, x) - light(pred, pred + r, x))
    gap2 = np.asarray(full(pred + 3.0, pred + r, x) - light(pred + 3.0, pred + r, x))
    np.testing.assert_allclose(gap1, gap2, atol=1e-5)


@pytest.mark.parametrize("noise", NOISES)
def test_normalized_nll_integrates_to_one(noise):
    cfg = dataclasses.replace(NLL_CFG, noise=noise)
    nll = per_sample_nll(cfg, normalized=True)
    y = np.linspace(-400.0, 400.0, 1_600_001)  # t_4 tail beyond 400 carries ~1e-10
    x = jnp.tile(jnp.array([[0.7, 0.0]]), (y.size, 1))
    dens = np.exp(-np.asarray(nll(jnp.full((y.size, 1), 0.3), jnp.asarray(y)[:, None], x), np.float64))
    assert abs(np.trapezoid(dens, y) - 1) < 1e-3


@pytest.mark.parametrize("noise", NOISES)
def test_nll_sums_outputs_and_is_stable(noise):
    cfg = dataclasses.replace(NLL_CFG, noise=noise)
    nll = per_sample_nll(cfg)
    pred = jnp.zeros((3, 2))
    y = jnp.array([[0.5, -0.2], [1.0, 0.0], [1e4, -1e4]])
    x = jnp.ones((3, 2))
    out = np.asarray(nll(pred, y, x))
    assert out.shape == (3,) and np.all(np.isfinite(out))
    if noise != "outliers":  # the mixture couples outputs; every other model factorizes
        split = nll(pred[:, :1], y[:, :1], x) + nll(pred[:, 1:], y[:, 1:], x)
        np.testing.assert_allclose(out, np.asarray(split), rtol=1e-6)
    grad = jax.grad(lambda p: jnp.sum(nll(p, y, x)))(pred)
    assert np.all(np.isfinite(np.asarray(grad)))
