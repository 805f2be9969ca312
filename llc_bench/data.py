"""Teacher–student data: input distributions, noise models, and each noise model's exact per-sample NLL."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.config import DataConfig

# The random structure of a distribution (anisotropic axes, mixture means, manifold embedding) is
# part of the distribution, not of the draw: a fixed key, so train and test sets drawn with
# different keys come from the same distribution. Pass `structure_key` to vary it on purpose.
_STRUCTURE_SEED = 20_250_101

# The jitted samplers take cfg as a static argument; they see only the fields they use, so that a
# sweep over noise models does not recompile the input sampler, and vice versa.
_NOISE_FIELDS = ("noise", "noise_scale", "hetero_slope", "noise_df", "outlier_fraction", "outlier_scale")
_DEFAULT = DataConfig()


def _inputs_only(cfg: DataConfig) -> DataConfig:
    return dataclasses.replace(cfg, **{f: getattr(_DEFAULT, f) for f in _NOISE_FIELDS})


def _noise_only(cfg: DataConfig) -> DataConfig:
    return DataConfig(**{f: getattr(cfg, f) for f in _NOISE_FIELDS})


# per_sample_nll(pred (m, o), y (m, o), x (m, in_dim)) -> (m,)
PerSampleNLL = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class InputStructure(NamedTuple):
    """The fixed random pieces of the input distributions (each (0,)-shaped when unused)."""

    axes: jax.Array  # (in_dim, in_dim) orthogonal; anisotropic covariance Q diag(λ) Qᵀ
    means: jax.Array  # (K, in_dim) mixture component means
    embed_a: jax.Array  # (in_dim, M) manifold: x = A sin(B z) + C z
    embed_b: jax.Array  # (M, k)
    embed_c: jax.Array  # (in_dim, k)


def _default_structure_key() -> jax.Array:
    return jax.random.key(_STRUCTURE_SEED)


def anisotropic_spectrum(cfg: DataConfig) -> jax.Array:
    """λ_i = spectrum_scale · i^(−spectrum_decay), i = 1..in_dim."""
    i = jnp.arange(1, cfg.in_dim + 1, dtype=jnp.float32)
    return cfg.spectrum_scale * i ** (-cfg.spectrum_decay)


def _manifold_moments(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """Cov[x] for x = A sin(B z) + C z, z ~ N(0, I_k), in closed form (E[x] = 0 by oddness).

    With b_i the rows of B: E[sin(b_i·z) sin(b_j·z)] = ½(e^{−|b_i−b_j|²/2} − e^{−|b_i+b_j|²/2}),
    E[sin(b_i·z) z] = b_i e^{−|b_i|²/2}, E[z zᵀ] = I.
    """
    diff = jnp.sum((b[:, None, :] - b[None, :, :]) ** 2, -1)
    summ = jnp.sum((b[:, None, :] + b[None, :, :]) ** 2, -1)
    s = 0.5 * (jnp.exp(-0.5 * diff) - jnp.exp(-0.5 * summ))
    p = b * jnp.exp(-0.5 * jnp.sum(b**2, -1))[:, None]  # (M, k) = E[sin(Bz) zᵀ]
    cross = a @ p @ c.T
    return a @ s @ a.T + cross + cross.T + c @ c.T


def input_structure(cfg: DataConfig, structure_key: jax.Array | None = None) -> InputStructure:
    """Draw the fixed random structure of cfg.distribution from `structure_key` (default: a fixed key).

    Manifold embedding: B (M, k) with N(0, 1) entries (frequencies of order 1, so the sheet curves
    on the scale of the latent), A (in_dim, M) and C (in_dim, k) Gaussian, M = in_dim so that Cov[x]
    is full rank; A and C are rescaled so that tr Cov[x] = in_dim (unit average variance).
    """
    key = _default_structure_key() if structure_key is None else structure_key
    k_axes, k_means, k_a, k_b, k_c = jax.random.split(key, 5)
    empty = jnp.zeros((0,))
    axes = means = embed_a = embed_b = embed_c = empty
    d = cfg.in_dim
    if cfg.distribution == "anisotropic":
        q, r = jnp.linalg.qr(jax.random.normal(k_axes, (d, d)))
        axes = q * jnp.sign(jnp.diag(r))  # sign fix: Haar-distributed Q
    elif cfg.distribution == "mixture":
        means = cfg.mixture_spread * jax.random.normal(k_means, (cfg.mixture_components, d))
    elif cfg.distribution == "manifold":
        k = cfg.manifold_dim
        if not 1 <= k <= d:
            raise ValueError(f"manifold_dim must lie in [1, in_dim={d}], got {k}")
        embed_b = jax.random.normal(k_b, (d, k))
        embed_a = jax.random.normal(k_a, (d, d)) / math.sqrt(d)
        embed_c = jax.random.normal(k_c, (d, k)) / math.sqrt(k)
        norm = jnp.sqrt(jnp.trace(_manifold_moments(embed_a, embed_b, embed_c)) / d)
        embed_a, embed_c = embed_a / norm, embed_c / norm
    return InputStructure(axes, means, embed_a, embed_b, embed_c)


def population_moments(cfg: DataConfig, structure_key: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """(E[x] (in_dim,), Cov[x] (in_dim, in_dim)) of cfg.distribution, in closed form.

    gaussian: 0, I. anisotropic: 0, Q diag(λ) Qᵀ. mixture: μ̄, I + (1/K) Σ_k (μ_k − μ̄)(μ_k − μ̄)ᵀ.
    manifold: see _manifold_moments. student_t (multivariate, ν > 2): 0, ν/(ν−2) I.
    uniform on [−h, h]: 0, h²/3 I.
    """
    return _population_moments(dataclasses.replace(_inputs_only(cfg), n=_DEFAULT.n), structure_key)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _population_moments(cfg: DataConfig, structure_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    d = cfg.in_dim
    s = input_structure(cfg, structure_key)
    zero, eye = jnp.zeros(d), jnp.eye(d)
    match cfg.distribution:
        case "gaussian":
            return zero, eye
        case "anisotropic":
            return zero, (s.axes * anisotropic_spectrum(cfg)) @ s.axes.T
        case "mixture":
            mu = jnp.mean(s.means, 0)
            centred = s.means - mu
            return mu, eye + centred.T @ centred / cfg.mixture_components
        case "manifold":
            return zero, _manifold_moments(s.embed_a, s.embed_b, s.embed_c)
        case "student_t":
            nu = cfg.input_df
            return zero, (nu / (nu - 2) if nu > 2 else math.inf) * eye
        case "uniform":
            return zero, cfg.box_half_width**2 / 3 * eye
    raise ValueError(f"unknown input distribution {cfg.distribution!r}")


# cfg is a frozen (hashable) dataclass: static, so each configuration compiles once.
def sample_inputs(key: jax.Array, cfg: DataConfig, structure_key: jax.Array | None = None) -> jax.Array:
    """x (n, in_dim) drawn i.i.d. from cfg.distribution.

    - gaussian: N(0, I).
    - anisotropic: x = Q diag(√λ) ξ, ξ ~ N(0, I), λ_i = spectrum_scale · i^(−spectrum_decay).
    - mixture: c ~ Uniform{1..K}, x = μ_c + ξ, μ_k ~ N(0, mixture_spread² I) fixed.
    - manifold: z ~ N(0, I_k), x = A sin(B z) + C z (k = manifold_dim; a curved k-dim sheet).
    - student_t: multivariate t, x = ξ / √(g/ν), g ~ χ²_ν, ν = input_df (elliptical, heavy-tailed).
    - uniform: Uniform([−h, h]^in_dim), h = box_half_width.
    """
    return _sample_inputs(key, _inputs_only(cfg), structure_key)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sample_inputs(key: jax.Array, cfg: DataConfig, structure_key: jax.Array | None) -> jax.Array:
    n, d = cfg.n, cfg.in_dim
    s = input_structure(cfg, structure_key)
    k_main, k_aux = jax.random.split(key)
    match cfg.distribution:
        case "gaussian":
            return jax.random.normal(k_main, (n, d))
        case "anisotropic":
            xi = jax.random.normal(k_main, (n, d))
            return (xi * jnp.sqrt(anisotropic_spectrum(cfg))) @ s.axes.T
        case "mixture":
            comp = jax.random.randint(k_aux, (n,), 0, cfg.mixture_components)
            return s.means[comp] + jax.random.normal(k_main, (n, d))
        case "manifold":
            z = jax.random.normal(k_main, (n, cfg.manifold_dim))
            return jnp.sin(z @ s.embed_b.T) @ s.embed_a.T + z @ s.embed_c.T
        case "student_t":
            nu = cfg.input_df
            g = 2.0 * jax.random.gamma(k_aux, nu / 2, (n, 1))  # χ²_ν = 2 Gamma(ν/2)
            return jax.random.normal(k_main, (n, d)) / jnp.sqrt(g / nu)
        case "uniform":
            h = cfg.box_half_width
            return jax.random.uniform(k_main, (n, d), minval=-h, maxval=h)
    raise ValueError(f"unknown input distribution {cfg.distribution!r}")


def noise_sigma(x: jax.Array, cfg: DataConfig) -> jax.Array:
    """Per-sample noise scale (m,): noise_scale, or noise_scale·(1 + hetero_slope·|x_0|) when heteroscedastic."""
    base = jnp.full(x.shape[:1], cfg.noise_scale)
    if cfg.noise == "heteroscedastic":
        return base * (1.0 + cfg.hetero_slope * jnp.abs(x[:, 0]))
    return base


def add_noise(key: jax.Array, x: jax.Array, y_clean: jax.Array, cfg: DataConfig) -> jax.Array:
    """y = y_clean + ε, ε (m, o) from cfg.noise; ε is independent across samples and outputs, except
    that an outlier (noise "outliers") is a whole sample: all its outputs get the wide noise.

    none: ε = 0. gaussian: N(0, σ²). heteroscedastic: N(0, σ(x)²). student_t: σ·t_ν.
    outliers: with probability p = outlier_fraction N(0, (outlier_scale·σ)²), else N(0, σ²).
    """
    return _add_noise(key, x, y_clean, _noise_only(cfg))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _add_noise(key: jax.Array, x: jax.Array, y_clean: jax.Array, cfg: DataConfig) -> jax.Array:
    k_main, k_aux = jax.random.split(key)
    sigma = noise_sigma(x, cfg)[:, None]
    xi = jax.random.normal(k_main, y_clean.shape, dtype=y_clean.dtype)
    match cfg.noise:
        case "none":
            return y_clean
        case "gaussian" | "heteroscedastic":
            return y_clean + sigma * xi
        case "student_t":
            return y_clean + sigma * jax.random.t(k_main, cfg.noise_df, y_clean.shape, y_clean.dtype)
        case "outliers":
            is_out = jax.random.bernoulli(k_aux, cfg.outlier_fraction, y_clean.shape[:1])[:, None]
            return y_clean + jnp.where(is_out, cfg.outlier_scale, 1.0) * sigma * xi
    raise ValueError(f"unknown noise model {cfg.noise!r}")


def per_sample_nll(cfg: DataConfig, normalized: bool = False) -> PerSampleNLL:
    """The noise model's negative log-likelihood −log p(y | x, f) per sample, summed over outputs.

    With r = y − f (m, o) and o outputs, up to the dropped terms below:
    - none: ½‖r‖² (Gaussian with σ = 1; the data are exact, the loss is the squared error).
    - gaussian: ½‖r‖² / σ².
    - heteroscedastic: ½‖r‖² / σ(x)², σ(x) = noise_scale·(1 + hetero_slope·|x_0|).
    - student_t: (ν+1)/2 · Σ_j log(1 + r_j² / (ν σ²)).
    - outliers: −logsumexp(log(1−p) − ½‖r‖²/σ², log p − o·log κ − ½‖r‖²/(κσ)²), κ = outlier_scale.

    By default every term that does not depend on the prediction is dropped (it cancels in
    L_n(w) − L_n(w*)): o/2·log 2π + o·log σ(x), and for Student-t additionally
    o·[log Γ(ν/2) − log Γ((ν+1)/2) + ½ log(νπ)]. `normalized=True` keeps them, giving the exact
    −log density (used by tests; it integrates to one over y).
    """
    o_const = 0.5 * math.log(2 * math.pi)
    noise = cfg.noise

    def gaussian_const(x, o):  # o/2·log 2π + o·log σ(x)
        return o * (o_const + jnp.log(noise_sigma(x, cfg)))

    if noise == "none":
        def nll(pred, y, x):
            out = 0.5 * jnp.sum((y - pred) ** 2, -1)
            return out + y.shape[-1] * o_const if normalized else out
    elif noise in ("gaussian", "heteroscedastic"):
        def nll(pred, y, x):
            sigma = noise_sigma(x, cfg)
            out = 0.5 * jnp.sum((y - pred) ** 2, -1) / sigma**2
            return out + gaussian_const(x, y.shape[-1]) if normalized else out
    elif noise == "student_t":
        nu = cfg.noise_df
        t_const = math.lgamma(nu / 2) - math.lgamma((nu + 1) / 2) + 0.5 * math.log(nu * math.pi)

        def nll(pred, y, x):
            sigma = noise_sigma(x, cfg)[:, None]
            out = 0.5 * (nu + 1) * jnp.sum(jnp.log1p(((y - pred) / sigma) ** 2 / nu), -1)
            if normalized:
                out = out + jnp.sum(t_const + jnp.log(sigma) * jnp.ones_like(y), -1)
            return out
    elif noise == "outliers":
        p, kappa = cfg.outlier_fraction, cfg.outlier_scale
        log_p = math.log(p) if p > 0 else -math.inf
        log_q = math.log1p(-p) if p < 1 else -math.inf

        def nll(pred, y, x):
            o = y.shape[-1]
            q = 0.5 * jnp.sum((y - pred) ** 2, -1) / noise_sigma(x, cfg) ** 2
            terms = jnp.stack([log_q - q, log_p - o * math.log(kappa) - q / kappa**2], -1)
            out = -jax.nn.logsumexp(terms, -1)
            return out + gaussian_const(x, o) if normalized else out
    else:
        raise ValueError(f"unknown noise model {noise!r}")
    return jax.jit(nll)


def residual_variance(cfg: DataConfig, x: jax.Array | None = None) -> float:
    """E[ε²] per output coordinate under cfg.noise (averaged over x for heteroscedastic noise).

    none: 0. gaussian: σ². student_t: σ² ν/(ν−2). outliers: σ²((1−p) + p κ²).
    heteroscedastic: mean over the given x of σ(x)².
    """
    s2 = cfg.noise_scale**2
    match cfg.noise:
        case "none":
            return 0.0
        case "gaussian":
            return s2
        case "student_t":
            nu = cfg.noise_df
            return s2 * nu / (nu - 2) if nu > 2 else math.inf
        case "outliers":
            p = cfg.outlier_fraction
            return s2 * ((1 - p) + p * cfg.outlier_scale**2)
        case "heteroscedastic":
            if x is None:
                raise ValueError("heteroscedastic residual variance needs the inputs x")
            return float(np.mean(np.asarray(noise_sigma(x, cfg)) ** 2))
    raise ValueError(f"unknown noise model {cfg.noise!r}")
