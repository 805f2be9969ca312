"""Typed, frozen, nested configuration: one section per pipeline stage, validated once at the edge."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w

from llc_bench.samplers import SAMPLER_NAMES, get_spec
from llc_bench.samplers.base import SettingError
from llc_bench.types import ConfigError

DISTRIBUTIONS = ("gaussian", "anisotropic", "mixture", "manifold", "student_t", "uniform")
NOISES = ("none", "gaussian", "heteroscedastic", "student_t", "outliers")
ACTIVATIONS = ("relu", "tanh", "gelu", "identity")
TEACHER_KINDS = ("mlp", "dln")
DLN_GENERATORS = ("chained", "rand_rank", "deepest")
OPTIMIZERS = ("adam", "sgd")
ESTIMATE_FROM = ("auto", "full", "minibatch")

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
JOB_SPEC_PREFIXES = ("sweep", "tune", "bench")


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
    generator: str = "rand_rank"  # dln only: chained, rand_rank or deepest (llc_bench.models.dln_teacher_layers)
    sv_band: tuple[float, ...] = (1.0, 2.0)  # dln chained only: [low, high] of the end-to-end singular values
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
    # λ̂ from "full": the full-data L_n at the draws (every num_steps_bw_draws steps); "minibatch": the
    # per-step loss (SG samplers: L_m of each step's own batch, free, every post-burn-in step);
    # "auto": "minibatch" for SG samplers, "full" for full-batch ones. SG runs always report the
    # other estimate beside it (summary "cross_check"). "full" by measurement: the per-step λ̂ agreed
    # with it everywhere, with an SE as large or up to 4× larger (README, "The per-step estimator").
    estimate_from: str = "full"
    # > 0: run on (at most max_doublings times) until SE(λ̂)/|λ̂| <= target_rel_se and the run is not
    # not_converged: after a not_converged attempt the run doubles, its first half becomes burn-in and
    # the sampler is retuned where the chains are; else the draws double. still_spreading is withdrawn
    # when λ̂ holds across a doubling (llc_bench.experiment._sample_to_target); 0 = one run of num_draws
    target_rel_se: float = 0.0
    max_doublings: int = 3
    # > 0: when a run is still_spreading, restart its chains at w* + s·(w_end − w*) and compare λ̂
    # (llc_bench.restart): a change flags restart_disagrees, no change withdraws still_spreading. s is
    # the largest of restart_scale, restart_scale/√2, … (not below 2; curvature_sgld: not above 3) from
    # which a short probe loses no chain. 0 = no restart (still_spreading then stands).
    restart_scale: float = 10.0
    # SGLD family: at every draw one Hutchinson probe of nβ tr(P ∇²L) at each chain, so the step size's
    # estimated bias (summary "step_bias") gets the term a non-Gaussian posterior adds
    # (llc_bench.discretization.with_draws); costs about 4 forward passes of 4,096 rows per chain and draw.
    step_bias_draws: bool = False
    out_dir: str = "results"  # each run writes <out_dir>/<run_id>/


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
    # sampler name -> its Schedule: run.num_burnin_steps etc. unless [sampler.<name>] overrides them
    schedule: dict[str, Schedule] = field(default_factory=dict)


SCHEDULE_KEYS = ("num_burnin_steps", "num_draws", "num_steps_bw_draws")


@dataclass(frozen=True)
class Schedule:
    """Steps of one sampler: a full-batch HMC step costs far more than an SGLD step, so each may differ."""

    num_burnin_steps: int
    num_draws: int
    num_steps_bw_draws: int


SECTIONS = {
    "data": DataConfig,
    "teacher": TeacherConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "posterior": PosteriorConfig,
    "run": RunConfig,
}

CHOICES = {
    "data.distribution": DISTRIBUTIONS,
    "data.noise": NOISES,
    "teacher.kind": TEACHER_KINDS,
    "teacher.activation": ACTIVATIONS,
    "teacher.generator": DLN_GENERATORS,
    "model.activation": ACTIVATIONS,
    "train.optimizer": OPTIMIZERS,
    "run.estimate_from": ESTIMATE_FROM,
}

# Numeric bounds: key -> kind. "pos" > 0, "nonneg" >= 0, "unit" in [0, 1], "open_unit" in (0, 1),
# "seed" in [0, 2^32): JAX keys keep 32 bits of an integer seed, so larger seeds would alias smaller ones.
BOUNDS = {
    "data.n": "pos", "data.in_dim": "pos", "data.out_dim": "pos",
    "data.spectrum_decay": "nonneg", "data.spectrum_scale": "pos",
    "data.mixture_components": "pos", "data.mixture_spread": "nonneg", "data.manifold_dim": "pos",
    "data.input_df": "pos", "data.box_half_width": "pos", "data.noise_scale": "nonneg",
    "data.hetero_slope": "nonneg", "data.noise_df": "pos", "data.outlier_fraction": "unit",
    "data.outlier_scale": "pos",
    "teacher.weight_scale": "pos", "teacher.rank": "nonneg",
    "model.target_params": "pos", "model.depth": "nonneg",
    "train.learning_rate": "pos", "train.steps": "nonneg", "train.batch_size": "nonneg",
    "train.grad_tol": "nonneg",
    "posterior.beta0": "pos", "posterior.gamma": "nonneg", "posterior.prior_radius": "pos",
    "run.seed": "seed", "run.num_chains": "pos", "run.num_burnin_steps": "nonneg",
    "run.num_draws": "pos", "run.num_steps_bw_draws": "pos", "run.num_projections": "nonneg",
    "run.chunk_size": "nonneg", "run.target_rel_se": "nonneg", "run.max_doublings": "nonneg",
    "run.restart_scale": "nonneg",
}
SEED_LIMIT = 2**32
_BOUND_TEXT = {"pos": "> 0", "nonneg": ">= 0", "unit": "in [0, 1]", "open_unit": "in (0, 1)",
               "seed": f"an integer in [0, 2^32 = {SEED_LIMIT})"}


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"{key}: {message}")


def _field_types(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _split_list(key: str, text: str) -> list[str]:
    """'[8, 16]', '(8, 16)' or '8,16' -> ['8', '16']; a torn bracket or an empty item is refused, not repaired."""
    body = text.strip()
    closing = {"[": "]", "(": ")"}.get(body[:1])
    if closing is not None:
        if len(body) < 2 or body[-1] != closing:
            raise _fail(key, f"unbalanced brackets in {text!r}; write a list like [a, b]")
        body = body[1:-1]
    if any(c in body for c in "[]()"):
        raise _fail(key, f"malformed list {text!r}; write a flat list like [a, b]")
    items = [v.strip() for v in body.split(",")]
    if items == [""]:
        return []
    if "" in items:
        raise _fail(key, f"empty item in list {text!r}; write a list like [a, b]")
    return [v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'" else v for v in items]


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a TOML / command-line value to the field's declared type, or raise ConfigError."""
    origin, args = get_origin(hint), get_args(hint)
    if args and type(None) in args and origin is not tuple:  # Optional[...]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        elem = args[0]
        if isinstance(value, str):
            value = _split_list(key, value)
        if not isinstance(value, list | tuple):
            value = [value]
        return tuple(_coerce(key, v, elem) for v in value)
    if args and set(args) == {float, str}:  # a step size: a number or "auto"
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                raise _fail(key, f'must be a number > 0 or "auto" (got {value!r})') from None
        return _coerce(key, value, float)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise _fail(key, f"must be true or false (got {value!r})")
    if hint is int:
        if isinstance(value, bool):
            raise _fail(key, f"must be an integer (got {value!r})")
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise _fail(key, f"must be an integer (got {value!r})") from None
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                raise _fail(key, f"must be an integer (got {value!r})")
            value = int(value)
        if not isinstance(value, int):
            raise _fail(key, f"must be an integer (got {value!r})")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise _fail(key, f"must be a number (got {value!r})")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise _fail(key, f"must be a number (got {value!r})") from None
        if not math.isfinite(value):
            raise _fail(key, f"must be a finite number (got {value!r})")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _fail(key, f"must be a string (got {value!r})")
        return value
    raise _fail(key, f"unsupported type {hint}")


def _check_bound(key: str, value: Any, kind: str) -> None:
    if value is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        ok = {"pos": v > 0, "nonneg": v >= 0, "unit": 0 <= v <= 1, "open_unit": 0 < v < 1,
              "seed": 0 <= v < SEED_LIMIT}[kind]
        if not ok:
            raise _fail(key, f"must be {_BOUND_TEXT[kind]} (got {value!r})")


def build_section(section: str, cls, raw: dict) -> Any:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in raw.items():
        key = f"{section}.{name}"
        if name not in names:
            raise _fail(key, f"unknown key{_suggest(name, names)}; allowed: {', '.join(names)}")
        kwargs[name] = _coerce(key, value, hints[name])
    try:
        return cls(**kwargs)
    except SettingError as exc:  # a settings class checking its own fields (llc_bench.samplers.base)
        raise _fail(f"{section}.{exc.field}", exc.message) from None
    except ValueError as exc:  # a settings class's own __post_init__ check
        message = str(exc)
        raise (ConfigError(message) if message.startswith(f"{section}.") else _fail(section, message)) from None


def _validate(cfg: Config) -> None:
    """Cross-field checks; per-field types and bounds were checked while building."""
    for section, cls in SECTIONS.items():
        obj = getattr(cfg, section)
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            value = getattr(obj, f.name)
            if key in CHOICES and value not in CHOICES[key]:
                raise _fail(key, f"unknown value {value!r}{_suggest(value, CHOICES[key])}; "
                                 f"allowed: {', '.join(CHOICES[key])}")
            if key in BOUNDS:
                _check_bound(key, value, BOUNDS[key])
    d, t, m, p, r = cfg.data, cfg.teacher, cfg.model, cfg.posterior, cfg.run
    if d.distribution == "manifold" and d.manifold_dim > d.in_dim:
        raise _fail("data.manifold_dim", f"must be <= data.in_dim = {d.in_dim} (got {d.manifold_dim})")
    for key, widths in (("teacher.widths", t.widths), ("model.widths", m.widths)):
        if widths is not None and any(w <= 0 for w in widths):
            raise _fail(key, f"widths must be positive integers (got {list(widths)})")
    if d.n < 2:
        raise _fail("data.n", f"must be >= 2: β = β0 / log n needs log n > 0 (got {d.n})")
    if m.widths is None and m.target_params is None:
        raise _fail("model.widths", "give model.widths or model.target_params")
    if m.widths is None:
        from llc_bench.models import hidden_widths_for_target  # deferred: flax, for this one check

        try:
            hidden_widths_for_target(d.in_dim, d.out_dim, m.target_params, m.depth, m.bias)
        except ValueError as exc:
            raise _fail("model.target_params", str(exc)) from None
    if len(t.sv_band) != 2 or not 0 < t.sv_band[0] <= t.sv_band[1]:
        raise _fail("teacher.sv_band", f"must be [low, high] with 0 < low <= high (got {list(t.sv_band)})")
    if t.rank is not None:
        smallest = min((d.in_dim, *t.widths, d.out_dim))
        if t.rank > smallest:
            raise _fail("teacher.rank", f"must be <= the smallest teacher width {smallest} (got {t.rank})")
    if cfg.train.batch_size > d.n:
        raise _fail("train.batch_size", f"must be <= data.n = {d.n} (got {cfg.train.batch_size})")
    if (p.gamma is None) == (p.prior_radius is None):
        raise _fail("posterior.gamma", "set exactly one of posterior.gamma and posterior.prior_radius "
                                       "(set the other to \"none\")")
    if not r.samplers:
        raise _fail("run.samplers", "needs at least one sampler")
    for name in r.samplers:
        if name not in SAMPLER_NAMES:
            raise _fail("run.samplers", f"unknown sampler {name!r}{_suggest(name, SAMPLER_NAMES)}; "
                                        f"allowed: {', '.join(SAMPLER_NAMES)}")
    for name, settings in cfg.sampler.items():
        # each settings object validated its own fields when it was built; the data size it cannot know
        batch = getattr(settings, "batch_size", None) if get_spec(name).minibatch else None
        if batch is not None and batch > d.n:
            raise _fail(f"sampler.{name}.batch_size", f"must be <= data.n = {d.n} (got {batch})")


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise _fail(dotted, "is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value, e.g. data.n=5000")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:  # TOML literal if it is one (numbers, booleans, quoted strings, arrays)
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word or comma list; coerced by the field's type later
    return key, value


def read_toml(path: str | Path, what: str = "--config") -> dict:
    """Read a TOML file; an empty name, a missing or unreadable file, non-UTF-8 text or bad TOML is a ConfigError."""
    if not str(path).strip():
        raise ConfigError(f"{what}: empty file name; give the path of a TOML file")
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte {exc.start}); TOML files must be UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path}: invalid TOML ({exc})") from None


def preset_names() -> list[str]:
    # configs/ also holds sweep, tune and benchmark specs; those are not run presets
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml") if not p.stem.startswith(JOB_SPEC_PREFIXES))


def preset_path(name: str, what: str = "--preset") -> Path:
    """configs/<name>.toml of a run preset; only the names preset_names() lists (no paths, no job specs)."""
    names = preset_names()
    if name in names:
        return PRESET_DIR / f"{name}.toml"
    if isinstance(name, str) and name.startswith(JOB_SPEC_PREFIXES) and (PRESET_DIR / f"{name}.toml").is_file():
        command = next(p for p in JOB_SPEC_PREFIXES if name.startswith(p))
        raise ConfigError(f"{what}: {name!r} is a {command} spec, not a run preset; run it with "
                          f"main.py {command} --spec configs/{name}.toml (presets: {', '.join(names)})")
    raise ConfigError(f"{what}: unknown preset {name!r}{_suggest(str(name), names)}; allowed: {', '.join(names)}")


def _student_from_teacher(model: ModelConfig, teacher: TeacherConfig, model_raw: dict) -> ModelConfig:
    """train.use_teacher makes w* the teacher, so the student is the teacher's architecture.

    model.widths, model.activation and model.bias default to the teacher's (a "dln" teacher is
    linear without bias); one written in the config that differs is an error, not a silent override.
    """
    dln = teacher.kind == "dln"
    want = {"widths": (teacher.widths, "teacher.widths"),
            "activation": ("identity", 'teacher.kind = "dln"') if dln else (teacher.activation, "teacher.activation"),
            "bias": (False, 'teacher.kind = "dln"') if dln else (teacher.bias, "teacher.bias")}
    for name, (value, source) in want.items():
        given = getattr(model, name)
        if name in model_raw and given is not None and given != value:
            show = list if name == "widths" else repr
            raise _fail(f"model.{name}", f"{show(given)} contradicts the teacher's {show(value)} ({source}): "
                                         "train.use_teacher = true needs the student to equal the teacher; "
                                         f"drop model.{name} to take the teacher's")
    target_params = model.target_params if model.widths is not None else None
    return dataclasses.replace(model, widths=teacher.widths, activation=want["activation"][0],
                               bias=want["bias"][0], target_params=target_params)


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from a nested dict (TOML layout). Raises ConfigError."""
    sections = {}
    allowed = [*SECTIONS, "sampler"]
    for name in raw:
        if name not in allowed:
            raise _fail(name, f"unknown section{_suggest(name, allowed)}; allowed: {', '.join(allowed)}")
        if not isinstance(raw[name], dict):
            raise _fail(name, "must be a table of settings")
    for section, cls in SECTIONS.items():
        sections[section] = build_section(section, cls, raw.get(section, {}))
    sampler_raw = raw.get("sampler", {})
    for name in sampler_raw:
        if name not in SAMPLER_NAMES:
            raise _fail(f"sampler.{name}", f"unknown sampler{_suggest(name, SAMPLER_NAMES)}; "
                                          f"allowed: {', '.join(SAMPLER_NAMES)}")
    run_names = sections["run"].samplers
    samplers = {}
    schedules = {}
    run_cfg = sections["run"]
    for name in dict.fromkeys([*run_names, *sampler_raw]):
        if name not in SAMPLER_NAMES:
            continue  # reported by _validate with the run.samplers key
        own = dict(sampler_raw.get(name, {}))
        steps = {k: own.pop(k) for k in SCHEDULE_KEYS if k in own}
        samplers[name] = build_section(f"sampler.{name}", get_spec(name).settings, own)
        for k, v in steps.items():
            steps[k] = _coerce(f"sampler.{name}.{k}", v, int)
            _check_bound(f"sampler.{name}.{k}", steps[k], BOUNDS[f"run.{k}"])
        schedules[name] = Schedule(**{k: steps.get(k, getattr(run_cfg, k)) for k in SCHEDULE_KEYS})
    if sections["train"].use_teacher:
        sections["model"] = _student_from_teacher(sections["model"], sections["teacher"], raw.get("model", {}))
    cfg = Config(**sections, sampler=samplers, schedule=schedules)
    _validate(cfg)
    return cfg


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: Sequence[str] = (), layers: Sequence[dict] = ()) -> Config:
    """Defaults <- preset TOML <- --config file <- layers <- --set key=value overrides; validated once.

    layers: nested dicts in the TOML layout, merged in order as if each were one more file (copied:
    the caller's dicts are not changed); a bad value in one is the same ConfigError as in a file.
    """
    raw: dict = {}
    if preset is not None:  # "" is refused by preset_path, not read as "no preset"
        raw = deep_merge(raw, read_toml(preset_path(preset)))
    if config_file is not None:
        raw = deep_merge(raw, read_toml(config_file))
    for layer in layers:
        raw = deep_merge(raw, copy.deepcopy(layer))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return from_dict(raw)


def to_dict(cfg: Config) -> dict:
    """The fully resolved config as a TOML-ready nested dict (None as "none", tuples as lists)."""

    def clean(obj):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            out[f.name] = "none" if v is None else list(v) if isinstance(v, tuple) else v
        return out

    d = {section: clean(getattr(cfg, section)) for section in SECTIONS}
    d["sampler"] = {name: clean(s) for name, s in cfg.sampler.items()}
    for name, sched in cfg.schedule.items():
        # always explicit: a resolved config must not inherit schedules from whatever it is layered on
        d["sampler"].setdefault(name, {}).update({k: getattr(sched, k) for k in SCHEDULE_KEYS})
    return d


def to_toml(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def replace(cfg: Config, **dotted: Any) -> Config:
    """A copy with dotted-key changes (e.g. replace(cfg, **{"sampler.sgld.step_size": 1e-5})), revalidated."""
    raw = to_dict(cfg)
    for key, value in dotted.items():
        set_dotted(raw, key, value)
    return from_dict(raw)
