"""sample()'s arguments, checked and resolved once at the edge: the validated request, the sampler
settings in the ε convention, the observables, the default full-data schedule and the options record."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.artifacts import jsonable
from llc_bench.config import SEED_LIMIT
from llc_bench.rng import sampler_key
from llc_bench.samplers import SAMPLER_NAMES, get_spec
from llc_bench.samplers.base import STEP_EPSILON
from llc_bench.sampling_posterior import Restriction, param_paths

# Format of the stored tree; bump when variables change meaning so old stores are not reused.
FORMAT_VERSION = 3

# devinterp's names for the same samplers
METHOD_ALIASES = {"sgmcmc_sgld": "sgld"}

# loss_fn(apply_fn, params, x (m, ...), y (m, ...)) -> (m,) per-sample negative log-likelihoods
LossFn = Callable[[Callable, Any, jax.Array, jax.Array], jax.Array]


def _minibatch_methods() -> tuple[str, ...]:
    return tuple(name for name in SAMPLER_NAMES if get_spec(name).minibatch)



def _as_dataset(data, what: str) -> tuple[jax.Array, jax.Array]:
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise ValueError(f"{what} must be a pair (x, y) of arrays with the same leading length")
    x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(f"{what}: x and y need the same leading length >= 1, got {x.shape} and {y.shape}")
    return x, y


def _observable_specs(observables, batches_per_draw: int, batch_size: int):
    """name -> (x, y, batches): each observable's dataset and its batches per draw."""
    if observables is None:
        return {}
    if not isinstance(observables, Mapping):
        raise ValueError("observables must be a dict name -> (x, y) or name -> ((x, y), batches_per_draw)")
    out = {}
    for name, value in observables.items():
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"observable name {name!r} must be a Python identifier (it names variables)")
        batches = batches_per_draw
        if isinstance(value, tuple | list) and len(value) == 2 and isinstance(value[1], int | np.integer):
            value, batches = value
        if int(batches) < 1:
            raise ValueError(f"observable {name!r}: batches_per_draw must be >= 1, got {batches}")
        x, y = _as_dataset(value, f"observable {name!r}")
        needed = int(batches) * batch_size
        if x.shape[0] < needed:
            raise ValueError(f"observable {name!r} has {x.shape[0]} samples, fewer than batches_per_draw × "
                             f"batch_size = {batches} × {batch_size} = {needed}; pass (dataset, k) with fewer "
                             "batches or a smaller batch_size")
        out[name] = (x, y, int(batches))
    return out


def _sampler_settings(method: str, *, lr, batch_size: int, accumulation: int, noise_level: float,
                      kwargs: dict, aliased: dict):
    """The registry settings dataclass for `method`, with lr in the ε convention (scaled by σ², see sample()).

    aliased: sample() keywords that spell a sampler's setting (spec.aliases, e.g. rmsprop_eps) -> value or None.
    """
    kwargs = dict(kwargs or {})
    spec = get_spec(method)
    own = spec.aliases or {}
    for alias, value in aliased.items():
        if value is None:
            continue
        if alias not in own:
            owners = [n for n in SAMPLER_NAMES if alias in (get_spec(n).aliases or {})]
            raise ValueError(f"{alias} is only valid with sampling_method={owners[0]!r}, not {method!r}")
        key = own[alias]
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{alias}={value} conflicts with sampling_method_kwargs[{key!r}]={kwargs[key]}")
        kwargs[key] = value
    for reserved, instead in (("step_size", "lr"), ("batch_size", "batch_size")):
        if reserved in kwargs:
            raise ValueError(f"set {reserved!r} through sample()'s {instead!r}, not sampling_method_kwargs")
    if spec.step_size == STEP_EPSILON:
        if lr == "auto":  # resolved on the (tempered) posterior, once it is built
            kwargs.update(step_size="auto", batch_size=batch_size * accumulation)
        elif (not isinstance(lr, numbers.Real) or isinstance(lr, bool)
              or not (math.isfinite(lr) and lr > 0)):
            raise ValueError(f'{method} needs a positive lr (the SGLD step size ε) or lr="auto", got {lr!r}')
        else:
            kwargs.update(step_size=float(lr) * noise_level**2, batch_size=batch_size * accumulation)
    elif lr is not None:
        raise ValueError(f"{method} tunes its own step size; pass lr=None (tuning options go in sampling_method_kwargs)")
    allowed = [f.name for f in dataclasses.fields(spec.settings)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"sampling_method_kwargs {unknown} are not options of {method!r}; allowed: "
                         f"{[a for a in allowed if a not in ('step_size', 'batch_size')]}")
    return spec, spec.settings(**kwargs)


def _sha256(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _fn_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _json_normalize(obj):
    return json.loads(json.dumps(jsonable(obj), sort_keys=True, default=str))


def _key(seed: int, purpose: str) -> jax.Array:
    """The experiment pipeline's per-sampler key derivation, also used for sample()'s auxiliary streams."""
    return sampler_key(seed, purpose)


def observable_indices(seed: int, n: int, size: int) -> np.ndarray:
    """`size` sorted distinct indices of an n-point observable, from the seed and n only (numpy, host side).

    Not keyed by the observable's name: identical datasets get identical points, so their BIF is
    an exact symmetric matrix.
    """
    rng = np.random.default_rng([seed, 0x0B5E7AB1E, n])
    return np.sort(rng.permutation(n)[:size]).astype(np.int32)


# SG methods evaluate the full-data L_n about every FULL_LOSS_STEPS · n/m steps by default. An L_n
# costs ≈ n/m forward passes of a batch and an SG step ≈ 3 (forward, backward, noise), so the
# full-data draws cost ≈ 1/(3 · FULL_LOSS_STEPS) ≈ 8% of the steps, while a 2,000-step run at
# n/m = 39 still gets 10 of them per chain: λ̂ with a between-chain SE, the trace and the
# cross-check. Measured there (scripts/bench_sample.py, a loaded 2-core CPU): sample() at most 14%
# above the bare SG scan, everything included, and λ̂ with about the SE of the per-step λ̂.
FULL_LOSS_STEPS = 4


def default_full_loss_every(method: str, n: int, batch_size: int, full_batch: bool, num_steps_bw_draws: int,
                            num_draws: int) -> int:
    """full_loss_every=None: 1 for full-batch methods, else the draw interval nearest FULL_LOSS_STEPS · n/m
    steps, at most num_draws; a divisor of num_draws within 25% of it when there is one (the runner
    then needs no padded steps after the last full-data draw)."""
    if method not in _minibatch_methods():
        return 1
    m = n if full_batch else batch_size
    target = FULL_LOSS_STEPS * n / (m * num_steps_bw_draws)
    every = int(min(max(1, round(target)), num_draws))
    divisors = [j for j in range(max(1, math.ceil(target / 1.25)), min(num_draws, math.floor(target * 1.25)) + 1)
                if num_draws % j == 0]
    return min(divisors, key=lambda j: abs(j - target)) if divisors else every


# devinterp v1 keyword -> how sample() spells it
V1_NAMES = {
    "nbeta": "n_beta",
    "optimizer_kwargs": "sampling_method_kwargs (lr, n_beta, localization, noise_level, weight_decay and "
                        "bounding_box_size are sample() arguments)",
    "grad_accum_steps": "gradient_accumulation_steps",
    "temperature": "n_beta",
    "loader": "dataset",
    "callbacks": "observables and compute_llc / compute_bif / compute_susceptibilities on the returned tree",
    "device": "JAX's default device (no argument)",
    "cores": "num_chains (chains run vectorized)",
    "verbose": "progress",
}


def _refuse_v1_names(extra: dict) -> None:
    """Unknown keywords get a TypeError; devinterp v1 names get one that says how to spell them here."""
    for name in extra:
        if name in V1_NAMES:
            raise TypeError(f"sample(): {name!r} is devinterp v1's name; use {V1_NAMES[name]}")
        known = ["apply_fn", "params", "loss_fn", "dataset", *(f.name for f in dataclasses.fields(SampleArgs))]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"sample() got an unexpected keyword argument {name!r}{hint}")


def _check_lr(lr) -> None:
    """lr: None (samplers that tune their own step), a finite number > 0 or "auto"; _sampler_settings says which is needed."""
    if lr is None or (isinstance(lr, str) and lr == "auto"):
        return
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f'lr must be a finite number > 0 or "auto" (or None for self-tuning samplers), got {lr!r}')




# ---------------------------------------------------------------------------------------------
# The request: sample()'s keyword arguments, then everything resolved from them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleArgs:
    """sample()'s keyword arguments as given (see sample() for their meaning)."""

    observables: Any
    lr: Any
    n_beta: float
    localization: float
    num_chains: int
    num_draws: int
    num_burnin_steps: int
    num_steps_bw_draws: int
    batch_size: int
    gradient_accumulation_steps: int
    sampling_method: str
    sampling_method_kwargs: dict | None
    rmsprop_eps: float | None
    rmsprop_alpha: float | None
    noise_level: float
    weight_decay: float
    bounding_box_size: float | None
    init_noise: float | None
    param_masks: Any
    batches_per_draw: int
    seed: int
    output_path: str | Path | None
    save_metrics: bool
    overwrite: bool
    progress: bool
    full_batch: bool
    per_sample_losses: bool
    full_loss_every: int | None
    sampling_loss: bool
    step_bias: bool

    @classmethod
    def of(cls, arguments: Mapping) -> SampleArgs:
        """The fields picked out of a mapping that holds them all (sample()'s locals())."""
        return cls(**{f.name: arguments[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Request:
    """A checked sample() call: the arguments and what was resolved from them, before any sampling."""

    args: SampleArgs
    method: str  # the registry name (devinterp aliases resolved)
    spec: Any  # llc_bench.samplers.SamplerSpec
    settings: Any  # spec.settings, step size in the ε convention scaled by σ²
    x: jax.Array
    y: jax.Array
    full_loss_every: int
    path: Path | None
    obs: dict  # name -> (x, y, batches per draw)
    restriction: Restriction
    per_sample_loss: Callable  # (w (d,), x (m, ...), y (m, ...)) -> (m,)
    options: dict  # the JSON record stored in the tree's attrs (and the store's reuse key)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def _check_numbers(args: SampleArgs) -> None:
    """Counts, reals, seed, full_loss_every and lr: a ValueError naming the first bad one."""
    for name, low in (("num_chains", 1), ("num_draws", 1), ("num_burnin_steps", 0), ("num_steps_bw_draws", 1),
                      ("batch_size", 1), ("gradient_accumulation_steps", 1), ("batches_per_draw", 1)):
        value = getattr(args, name)
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, ok, rule in (("n_beta", lambda v: v > 0, "> 0"),
                           ("localization", lambda v: v >= 0, ">= 0"),
                           ("noise_level", lambda v: v > 0, "> 0"),
                           ("weight_decay", lambda v: v >= 0, ">= 0"),
                           ("bounding_box_size", lambda v: v > 0, "> 0 or None"),
                           ("init_noise", lambda v: v >= 0, ">= 0 or None")):
        value = getattr(args, name)
        required = name in ("n_beta", "localization", "noise_level", "weight_decay")
        if (value is not None or required) and not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                                                    and math.isfinite(value) and ok(value)):
            raise ValueError(f"{name} must be {rule}, got {value!r}")
    seed = args.seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    every, num_draws = args.full_loss_every, args.num_draws
    if every is not None and (isinstance(every, bool) or not isinstance(every, int | np.integer)
                              or not 1 <= every <= num_draws):
        raise ValueError(f"full_loss_every must be None or an integer in [1, num_draws = {num_draws}], "
                         f"got {every!r}")
    _check_lr(args.lr)


def check_method(args: SampleArgs):
    """(method, spec, settings): the sampler and its settings, once every number is checked."""
    method = METHOD_ALIASES.get(args.sampling_method, args.sampling_method)
    if method not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampling_method {args.sampling_method!r}; allowed: "
                         f"{list(SAMPLER_NAMES + tuple(METHOD_ALIASES))}")
    _check_numbers(args)
    minibatch = get_spec(method).minibatch
    if args.full_batch and not minibatch:
        raise ValueError(f"full_batch applies to {_minibatch_methods()}; {method!r} always uses the full batch")
    if args.bounding_box_size is not None and not minibatch:
        raise ValueError(f"bounding_box_size is only supported for {_minibatch_methods()}, not {method!r}")
    spec, settings = _sampler_settings(
        method, lr=args.lr, batch_size=args.batch_size, accumulation=args.gradient_accumulation_steps,
        noise_level=float(args.noise_level), kwargs=args.sampling_method_kwargs,
        aliased={"rmsprop_eps": args.rmsprop_eps, "rmsprop_alpha": args.rmsprop_alpha})
    _check_step_bias(args.step_bias, method, spec, settings)
    return method, spec, settings


def _check_step_bias(step_bias, method: str, spec, settings) -> None:
    """step_bias: a bool, and True only for a sampler whose draws are SGLD under a preconditioner
    that these settings keep constant (SamplerSpec.constant_root)."""
    if not isinstance(step_bias, bool | np.bool_):
        raise ValueError(f"step_bias must be True or False, got {step_bias!r}")
    if not step_bias:
        return
    if spec.preconditioner_root is None:
        allowed = [n for n in SAMPLER_NAMES if get_spec(n).preconditioner_root is not None]
        raise ValueError(f"step_bias applies to {allowed} (SGLD under a constant preconditioner), not {method!r}")
    if spec.constant_root(settings) is None:
        raise ValueError(f"step_bias needs a preconditioner fixed while drawing; {method!r} moves it "
                         f"{_what_moves_it(spec, settings)}")


def _what_moves_it(spec, settings) -> str:
    """Which settings make spec's preconditioner move while drawing: each one whose default value
    alone would keep it constant, as 'with name=value (name=default keeps it fixed)'."""
    default = spec.settings()

    def fixed_by_default(name: str) -> bool:
        try:
            return spec.constant_root(dataclasses.replace(settings, **{name: getattr(default, name)})) is not None
        except ValueError:  # the default does not combine with the other settings
            return False

    culprits = [f.name for f in dataclasses.fields(settings)
                if getattr(settings, f.name) != getattr(default, f.name) and fixed_by_default(f.name)]
    if not culprits:
        return "with these settings"
    return "with " + ", ".join(f"{name}={getattr(settings, name)!r} ({name}={getattr(default, name)!r} keeps it fixed)"
                               for name in culprits)


def check_dataset_sizes(args: SampleArgs, method: str, n: int) -> int:
    """The resolved full_loss_every, once the batch sizes are checked against the dataset size n."""
    full_loss_every = args.full_loss_every
    accumulation = args.gradient_accumulation_steps
    if full_loss_every is None:
        full_loss_every = default_full_loss_every(method, n, args.batch_size * accumulation, args.full_batch,
                                                  args.num_steps_bw_draws, args.num_draws)
    if args.full_batch and n % accumulation:
        raise ValueError(f"full_batch: gradient_accumulation_steps = {accumulation} must divide "
                         f"the dataset size n = {n}")
    if get_spec(method).minibatch and not args.full_batch and args.batch_size * accumulation > n:
        raise ValueError(f"batch_size × gradient_accumulation_steps = {args.batch_size * accumulation} "
                         f"must be <= the dataset size n = {n}")
    return int(full_loss_every)


def options_record(args: SampleArgs, *, method: str, settings, full_loss_every: int, apply_fn, loss_fn, params,
                   restriction: Restriction, x, y, obs: dict) -> dict:
    """Every resolved option plus fingerprints of params, masks and data, as JSON: the tree's
    attrs["options"], and what a stored tree must match exactly to be reused."""
    a = args
    return _json_normalize({
        "format_version": FORMAT_VERSION,
        "sampling_method": method,
        "sampler_settings": dataclasses.asdict(settings),
        "sampling_method_kwargs": a.sampling_method_kwargs or {},
        "lr": a.lr, "n_beta": a.n_beta, "localization": a.localization, "num_chains": a.num_chains,
        "num_draws": a.num_draws, "num_burnin_steps": a.num_burnin_steps, "num_steps_bw_draws": a.num_steps_bw_draws,
        "batch_size": a.batch_size, "gradient_accumulation_steps": a.gradient_accumulation_steps,
        "rmsprop_eps": a.rmsprop_eps, "rmsprop_alpha": a.rmsprop_alpha, "noise_level": a.noise_level,
        "weight_decay": a.weight_decay, "bounding_box_size": a.bounding_box_size, "init_noise": a.init_noise,
        "batches_per_draw": a.batches_per_draw, "seed": a.seed, "save_metrics": a.save_metrics,
        "full_batch": bool(a.full_batch), "per_sample_losses": bool(a.per_sample_losses),
        "full_loss_every": int(full_loss_every), "sampling_loss": bool(a.sampling_loss),
        "step_bias": bool(a.step_bias),
        "apply_fn": _fn_name(apply_fn), "loss_fn": _fn_name(loss_fn),
        "params_sha256": _sha256(*jax.tree_util.tree_leaves(params)),
        "param_paths": param_paths(params),
        "free_sha256": _sha256(restriction.free_index),
        "num_params_free": int(restriction.free_index.size),
        "dataset": {"n": int(x.shape[0]), "sha256": _sha256(x, y)},
        "observables": {name: {"n": int(ox.shape[0]), "batches_per_draw": k, "sha256": _sha256(ox, oy)}
                        for name, (ox, oy, k) in obs.items()},
    })
