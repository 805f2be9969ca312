"""Typed, frozen, nested configuration: one section per pipeline stage, validated once at the edge."""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

DISTRIBUTIONS = ("gaussian", "anisotropic", "mixture", "manifold", "student_t", "uniform")
NOISES = ("none", "gaussian", "heteroscedastic", "student_t", "outliers")
ACTIVATIONS = ("relu", "tanh", "gelu", "identity")
TEACHER_KINDS = ("mlp", "dln")
DLN_GENERATORS = ("rand_rank", "deepest")
OPTIMIZERS = ("adam", "sgd")
ESTIMATE_FROM = ("full", "minibatch")

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad configuration value: the message is one line naming the key and what is allowed."""


@dataclass(frozen=True)
class DataConfig:
    """Teacher-student data: n samples of x ~ distribution, y = teacher(x) + noise."""

    n: int = 10_000
    in_dim: int = 32
    out_dim: int = 1
    distribution: str = "gaussian"
    # anisotropic: covariance eigenvalues spectrum_scale * i^(-spectrum_decay), i = 1..in_dim
    spectrum_decay: float = 1.0
    spectrum_scale: float = 1.0
    # mixture of Gaussians: components with means ~ N(0, mixture_spread^2 I), unit covariance
    mixture_components: int = 4
    mixture_spread: float = 3.0
    # manifold: a manifold_dim-dimensional latent pushed through a fixed smooth curved embedding
    manifold_dim: int = 2
    # student_t inputs (heavy tails)
    input_df: float = 3.0
    # uniform box [-box_half_width, box_half_width]^in_dim (Lau et al. use 10)
    box_half_width: float = 10.0
    noise: str = "gaussian"
    noise_scale: float = 0.1  # sigma of Gaussian noise; scale of Student-t noise
    hetero_slope: float = 0.5  # heteroscedastic: sigma(x) = noise_scale * (1 + hetero_slope * |x_0|)
    noise_df: float = 3.0  # Student-t noise degrees of freedom
    outlier_fraction: float = 0.05
    outlier_scale: float = 10.0  # outliers get N(0, (outlier_scale * noise_scale)^2) noise


@dataclass(frozen=True)
class TeacherConfig:
    """The network that generates targets. For kind='dln', widths are hidden widths, rank the end-to-end rank."""

    kind: str = "mlp"
    widths: tuple[int, ...] = (32, 32)
    activation: str = "relu"
    bias: bool = True
    rank: int | None = None  # dln only: rank of the end-to-end matrix (None = full rank)
    generator: str = "rand_rank"  # dln only
    weight_scale: float = 1.0  # teacher weights ~ N(0, weight_scale^2 / fan_in)


@dataclass(frozen=True)
class ModelConfig:
    """The student network. Give `widths` (hidden layer widths) or `target_params` (with `depth`)."""

    widths: tuple[int, ...] | None = None
    target_params: int | None = 10_000
    depth: int = 2  # number of hidden layers when sizing by target_params
    activation: str = "relu"
    bias: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """ERM with optax to find w*."""

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    steps: int = 2_000
    batch_size: int = 0  # 0 = full batch
    grad_tol: float = 1e-3  # converged when the full-data gradient norm falls below this
    use_teacher: bool = False  # w* = the teacher's parameters (DLN benchmark protocol)


@dataclass(frozen=True)
class PosteriorConfig:
    """Local tempered posterior p(w) ~ exp(-n beta L_n(w) - gamma/2 ||w - w*||^2), beta = beta0 / log n."""

    beta0: float = 1.0
    gamma: float | None = 100.0
    prior_radius: float | None = None  # if set, gamma = d / prior_radius^2 (gamma must then be None)


@dataclass(frozen=True)
class RunConfig:
    """Which samplers, how many chains and steps, where results go. Step counts follow devinterp's names."""

    seed: int = 0
    samplers: tuple[str, ...] = ("sgld", "rmsprop_sgld", "hmc", "mclmc")
    num_chains: int = 4
    num_burnin_steps: int = 200
    num_draws: int = 200
    num_steps_bw_draws: int = 5
    num_projections: int = 4
    chunk_size: int = 0  # steps per jitted chunk between progress updates; 0 = automatic
    estimate_from: str = "full"  # "full": full-data L_n at draws; "minibatch": per-step sampler loss
    out_dir: str = "results/runs"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # sampler name -> that sampler's frozen settings dataclass (see llc_bench.samplers)
    sampler: dict[str, Any] = field(default_factory=dict)
