"""devinterp-style `sample()` for any JAX model: chains on a (weight-restricted) local posterior, per-sample losses at every draw in an xarray DataTree, and LLC / BIF / susceptibility post-processing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from llc_bench.config import SEED_LIMIT
from llc_bench.posterior import Posterior, register_posterior
from llc_bench.runner import key_name
from llc_bench.samplers.base import STEP_EPSILON, wrap

# Format of the stored tree; bump when variables change meaning so old stores are not reused.
FORMAT_VERSION = 2

# devinterp's names for the same samplers
METHOD_ALIASES = {"sgmcmc_sgld": "sgld"}


def _minibatch_methods() -> tuple[str, ...]:
    from llc_bench.samplers import SAMPLER_NAMES, get_spec

    return tuple(name for name in SAMPLER_NAMES if get_spec(name).minibatch)

# loss_fn(apply_fn, params, x (m, ...), y (m, ...)) -> (m,) per-sample negative log-likelihoods
LossFn = Callable[[Callable, Any, jax.Array, jax.Array], jax.Array]


# ---------------------------------------------------------------------------------------------
# Weight restrictions: parameter paths -> the flat vector of free entries
# ---------------------------------------------------------------------------------------------


def param_paths(params) -> list[str]:
    """'/'-joined path of every leaf of `params` in flattening order, e.g. 'params/Dense_0/kernel'."""
    return ["/".join(key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _flatten_mask_spec(spec: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'params': {'Dense_0': {'kernel': m}}} or {'params/Dense_0/kernel': m} -> {'params/Dense_0/kernel': m}."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten_mask_spec(value, path))
        else:
            out[path.strip("/")] = value
    return out


def free_mask(params, param_masks) -> np.ndarray:
    """(D,) bool over ravel_pytree(params): True for the entries sampling may move.

    param_masks None: everything free. Otherwise a mapping from parameter paths (or nested dicts
    mirroring the pytree) to a boolean mask of the parameter's exact shape, or None for the whole
    parameter; a path naming a subtree ('params/Dense_0') with None frees every leaf under it.
    Every parameter not named is frozen.
    """
    leaves = jax.tree_util.tree_leaves(params)
    paths = param_paths(params)
    if param_masks is None:
        return np.ones(sum(int(np.size(leaf)) for leaf in leaves), bool)
    if not isinstance(param_masks, Mapping):
        raise ValueError(f"param_masks must be a dict of parameter path -> mask or None, got {type(param_masks).__name__}")
    masks: list[np.ndarray | None] = [None] * len(leaves)
    for spec_path, mask in _flatten_mask_spec(param_masks).items():
        hits = [i for i, p in enumerate(paths) if p == spec_path or p.startswith(spec_path + "/")]
        if not hits:
            raise ValueError(f"param_masks: no parameter at path {spec_path!r}; parameter paths are {paths}")
        if mask is not None and (len(hits) != 1 or paths[hits[0]] != spec_path):
            raise ValueError(f"param_masks: {spec_path!r} names a group of parameters; a mask array must name "
                             "one parameter (use None to free the whole group)")
        for i in hits:
            if masks[i] is not None:
                raise ValueError(f"param_masks: parameter {paths[i]!r} is named more than once")
            shape = np.shape(leaves[i])
            if mask is None:
                masks[i] = np.ones(shape, bool)
                continue
            m = np.asarray(mask)
            if m.shape != shape:
                raise ValueError(f"param_masks: mask for {paths[i]!r} has shape {m.shape}, "
                                 f"but the parameter has shape {shape}")
            if m.dtype != bool:
                if not (np.issubdtype(m.dtype, np.integer) and np.isin(m, (0, 1)).all()):
                    raise ValueError(f"param_masks: mask for {paths[i]!r} must be boolean (or 0/1), got {m.dtype}")
                m = m.astype(bool)
            masks[i] = m
    flat = np.concatenate([np.zeros(np.size(leaf), bool) if m is None else m.reshape(-1)
                           for leaf, m in zip(leaves, masks, strict=True)])
    if not flat.any():
        raise ValueError("param_masks leaves no parameter free to sample")
    return flat


@dataclass(frozen=True)
class Restriction:
    """The map between the model's parameter pytree and the flat vector w of free entries sampled.

    params(w) = unravel(w_all with w_all[free_index] = w); with every entry free it is unravel(w).
    """

    w_all: jax.Array  # (D,) ravel_pytree(params at w*)
    unravel: Callable[[jax.Array], Any]
    free_index: np.ndarray  # (d,) positions of the free entries in w_all

    @classmethod
    def build(cls, params, param_masks) -> Restriction:
        w_all, unravel = ravel_pytree(params)
        mask = free_mask(params, param_masks)
        return cls(w_all, unravel, np.flatnonzero(mask))

    @property
    def all_free(self) -> bool:
        return self.free_index.size == self.w_all.size

    @property
    def w_star(self) -> jax.Array:
        # gathered on the host: an eager device gather would compile a kernel for nothing
        return self.w_all if self.all_free else jnp.asarray(np.asarray(self.w_all)[self.free_index])

    def params(self, w: jax.Array):
        return self.unravel(w if self.all_free else self.w_all.at[self.free_index].set(w))


# ---------------------------------------------------------------------------------------------
# The posterior sample() targets and the sampler built on it
# ---------------------------------------------------------------------------------------------


@register_posterior
@dataclass(frozen=True, eq=False)
class SamplingPosterior(Posterior):
    """Posterior plus devinterp's extras on the free vector w:

        p(w) ∝ exp(−nβ L_n(w) − γ/2 ‖w − w*‖² − λ/2 ‖w‖²)      (λ = weight_decay: a N(0, 1/λ) prior)

    and gradient accumulation: a minibatch of accumulation_steps · b samples is processed as
    accumulation_steps sequential chunks of b whose loss gradients are averaged (the same
    gradient as one batch, at the memory of one chunk).
    """

    # static: weight_decay = 0 drops its term from the compiled code, and the chunk count is a shape
    STATIC: ClassVar[tuple[str, ...]] = ("per_sample_loss", "weight_decay", "accumulation_steps")

    weight_decay: float = 0.0
    accumulation_steps: int = 1

    def localization(self, w: jax.Array) -> jax.Array:
        out = 0.5 * self.gamma * jnp.sum((w - self.w_star) ** 2)
        if self.weight_decay:
            out = out + 0.5 * self.weight_decay * jnp.sum(w**2)
        return out

    def minibatch_loss_and_grads(self, w: jax.Array, x: jax.Array, y: jax.Array):
        prior_grad = self.gamma * (w - self.w_star)
        if self.weight_decay:
            prior_grad = prior_grad + self.weight_decay * w
        k = self.accumulation_steps
        if k == 1:
            loss, grad = jax.value_and_grad(self.batch_loss)(w, x, y)
            return loss, grad, prior_grad
        xs = x.reshape(k, x.shape[0] // k, *x.shape[1:])
        ys = y.reshape(k, y.shape[0] // k, *y.shape[1:])

        def accumulate(acc, chunk):
            loss, grad = jax.value_and_grad(self.batch_loss)(w, *chunk)
            return (acc[0] + loss, acc[1] + grad), None

        zero = (jnp.zeros((), w.dtype), jnp.zeros_like(w))
        (loss, grad), _ = jax.lax.scan(accumulate, zero, (xs, ys))
        return loss / k, grad / k, prior_grad


def _set_position(state, position):
    if isinstance(state, jax.Array):
        return position
    if hasattr(state, "_replace") and "position" in getattr(state, "_fields", ()):
        return state._replace(position=position)
    raise ValueError(f"bounding_box_size: cannot set the position of a {type(state).__name__} state")


def _full_batch(algorithm, posterior: Posterior):
    """An SG algorithm whose every step gets all n points: the runner draws no indices (batch_size None)."""

    def transform(algorithm, posterior):
        inner_step = algorithm.step

        def step(rng_key, state, params, batch):
            del batch  # None: the runner treats batch_size None as a full-batch sampler
            return inner_step(rng_key, state, params, (posterior.x, posterior.y))

        return algorithm._replace(step=step, batch_size=None)

    return wrap(algorithm, posterior, transform, "full_batch")


def _wrap_algorithm(algorithm, posterior: Posterior, init_noise: float | None, box: float | None):
    """init_noise: w ← w* + init_noise · N(0, I) once per chain before warm-up; box: clip every
    step's position to [w* − box, w* + box] (both on the free entries only)."""
    return wrap(algorithm, posterior, lambda a, p: _noise_and_box(a, p.w_star, init_noise, box),
                ("init_noise_box", init_noise, box))


def _noise_and_box(algorithm, w_star: jax.Array, init_noise: float | None, box: float | None):
    inner_warmup, inner_step = algorithm.warmup, algorithm.step
    clip = (lambda w: jnp.clip(w, w_star - box, w_star + box)) if box is not None else (lambda w: w)
    warmup, step = inner_warmup, inner_step
    if init_noise:
        def warmup(rng_key, position):
            noise_key, key = jax.random.split(rng_key)
            position = clip(position + init_noise * jax.random.normal(noise_key, position.shape, position.dtype))
            return inner_warmup(key, position)
    if box is not None:
        def step(rng_key, state, params, batch):
            state, info = inner_step(rng_key, state, params, batch)
            return _set_position(state, clip(algorithm.position(state))), info
    return algorithm._replace(warmup=warmup, step=step)


# ---------------------------------------------------------------------------------------------
# Option resolution and validation (once, at the edge)
# ---------------------------------------------------------------------------------------------


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
    from llc_bench.samplers import SAMPLER_NAMES, get_spec

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
    from llc_bench.artifacts import jsonable

    return json.loads(json.dumps(jsonable(obj), sort_keys=True, default=str))


def _key(seed: int, purpose: str) -> jax.Array:
    """The experiment pipeline's per-sampler key derivation, also used for sample()'s auxiliary streams."""
    from llc_bench.experiment import sampler_key

    return sampler_key(seed, purpose)


def observable_indices(seed: int, n: int, size: int) -> np.ndarray:
    """`size` sorted distinct indices of an n-point observable, from the seed and n only (numpy, host side).

    Not keyed by the observable's name: identical datasets get identical points, so their BIF is
    an exact symmetric matrix.
    """
    rng = np.random.default_rng([seed, 0x0B5E7AB1E, n])
    return np.sort(rng.permutation(n)[:size]).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# sample()
# ---------------------------------------------------------------------------------------------

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


_CACHE_SET = False
_PREFETCHED = False
# The runner's compiled chunks of the last few sample() calls, by everything that shapes them: a
# rerun with the same model functions (the same objects) and options skips tracing and lowering.
_EXECUTABLES: dict = {}
_EXECUTABLES_KEPT = 4


# Options that reach the compiled code only as argument values (the posterior's data, w*, nβ and
# γ, ε, keys from the seed, the observables' rows): runs differing only in these share executables.
_TRACED_OPTIONS = frozenset({"lr", "n_beta", "localization", "noise_level", "weight_decay", "seed",
                             "params_sha256", "dataset", "observables"})


def _code_options(options: dict, params, all_free: bool, weight_decay: float) -> dict:
    """The options the compiled code depends on: `options` less the traced ones, plus the shapes
    those leave out. weight_decay is static (0 drops its term), so its tempered value stays; the
    values of masked-out parameters are constants of the loss unless every entry is free."""
    code = {k: v for k, v in options.items() if k not in _TRACED_OPTIONS}
    code["sampler_settings"] = {k: v for k, v in options["sampler_settings"].items() if k != "step_size"}
    code["weight_decay_tempered"] = weight_decay
    code["param_shapes"] = [[list(np.shape(leaf)), str(jnp.result_type(leaf))] for leaf in jax.tree_util.tree_leaves(params)]
    code["dataset_n"] = options["dataset"]["n"]
    code["observables"] = {k: {"n": v["n"], "batches_per_draw": v["batches_per_draw"]}
                           for k, v in options["observables"].items()}
    if not all_free:
        code["params_sha256"] = options["params_sha256"]
    return code


def _executables_for(apply_fn, loss_fn, options: dict) -> dict:
    """The executables dict of this (apply_fn, loss_fn, code options (`_code_options`), JAX set-up), new if never seen."""
    setup = (str(jax.devices()), jax.config.jax_enable_x64, jax.config.jax_threefry_partitionable,
             str(jax.config.jax_default_prng_impl))
    key = (id(apply_fn), id(loss_fn), json.dumps(options, sort_keys=True), setup)
    entry = _EXECUTABLES.pop(key, None)
    if entry is None or entry[0] is not apply_fn or entry[1] is not loss_fn:
        entry = (apply_fn, loss_fn, {})  # the functions are kept alive, so their ids stay theirs
    _EXECUTABLES[key] = entry  # most recent last
    while len(_EXECUTABLES) > _EXECUTABLES_KEPT:
        del _EXECUTABLES[next(iter(_EXECUTABLES))]
    return entry[2]


def _enable_cache_once() -> None:
    """JAX's persistent compilation cache on, as the command line has it (llc_bench.jaxcache), unless the
    caller already chose a cache directory or set LLC_BENCH_JAX_CACHE=off. Once per process."""
    global _CACHE_SET
    if _CACHE_SET:
        return
    _CACHE_SET = True
    if not jax.config.jax_compilation_cache_dir:
        from llc_bench.jaxcache import enable_compilation_cache

        enable_compilation_cache()


def _prefetch_imports_once() -> None:
    """Import what the tree and compute_llc need (xarray; the health checks with arviz-stats and
    scipy.stats: about 1 s) in a background thread while the chains compile and run: JAX releases the
    interpreter lock there. Started after every import sample() itself needs, so the two threads
    never wait on each other's module locks. Once per process."""
    global _PREFETCHED
    if _PREFETCHED:
        return
    _PREFETCHED = True
    import threading

    threading.Thread(target=_import_later_modules, name="llc_bench-imports", daemon=True).start()


def _import_later_modules() -> None:
    import importlib

    for module in ("xarray", "llc_bench.health"):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the main thread's own import reports any real error
            return


def sample(apply_fn: Callable, params, loss_fn: LossFn, dataset, *, observables=None, lr: float | str | None = None,
           n_beta: float, localization: float, num_chains: int, num_draws: int, num_burnin_steps: int = 0,
           num_steps_bw_draws: int = 1, batch_size: int = 32, gradient_accumulation_steps: int = 1,
           sampling_method: str = "sgld", sampling_method_kwargs: dict | None = None,
           rmsprop_eps: float | None = None, rmsprop_alpha: float | None = None, noise_level: float = 1.0,
           weight_decay: float = 0.0, bounding_box_size: float | None = None, init_noise: float | None = None,
           param_masks=None, batches_per_draw: int = 3, seed: int = 0, output_path: str | Path | None = None,
           save_metrics: bool = False, overwrite: bool = False, progress: bool = True, full_batch: bool = False,
           per_sample_losses: bool = True, full_loss_every: int | None = None, sampling_loss: bool = False,
           **devinterp_v1):
    """Sample the local posterior of `params` and record per-sample losses at every draw (devinterp's sample()).

    Model and loss: `loss_fn(apply_fn, params, x, y) -> (m,)` per-sample negative log-likelihoods
    of a batch (x, y) (leading axis m); `params` is any pytree of float arrays (e.g. flax
    variables); `dataset = (x, y)` with a common leading length n is the sampling dataset.

    Posterior, on the vector w of FREE parameter entries (d of them, see param_masks):

        p(w) ∝ exp(−nβ L_n(w) − γ/2 ‖w − w*‖² − λ/2 ‖w‖²)

    nβ = n_beta exactly as given (devinterp convention, no β0 / log n), γ = localization,
    λ = weight_decay. SGLD step (ε = lr, σ = noise_level, L_m = batch mean of loss_fn):
    lr="auto" (SG methods) sets ε = c / curvature of the (tempered) posterior at w*
    (llc_bench.curvature); the ε used, h_max and the number of Hessian-vector products are in
    the tree's attrs["run"].

        w ← w − ε/2 · ( γ (w − w*) + λ w + nβ ∇L_m(w) ) + σ √ε · η,   η ~ N(0, I)

    σ ≠ 1 is run as exact SGLD at step σ²ε on the posterior with nβ, γ, λ divided by σ² (the
    same update), i.e. it samples p^(1/σ²): it breaks the posterior guarantee, as in devinterp.
    "rmsprop_sgld" preconditions the same update (llc_bench.samplers.rmsprop_sgld; eps/alpha via
    rmsprop_eps/rmsprop_alpha or sampling_method_kwargs; its preconditioner adapts during burn-in
    only, then stays fixed: adapt="always" with bias_correction=False is devinterp's exact,
    biased, update). "hmc", "nuts", "mclmc", "adjusted_mclmc" (full batch, self-tuned: lr must be
    None; their settings via sampling_method_kwargs) target the same posterior; noise_level then
    tempers it the same way. "sgmcmc_sgld" is accepted as devinterp's name for "sgld".

    Minibatches: each step draws batch_size · gradient_accumulation_steps indices uniformly with
    replacement (llc_bench.runner), processed in gradient_accumulation_steps chunks, so even
    batch_size = n is not the full batch. full_batch=True (SG methods): every step's gradient is the
    exact full-data ∇L_n over all n points, in gradient_accumulation_steps chunks (which must divide
    n); batch_size then only sizes the draw batches and the observables' points.
    Steps: num_burnin_steps + num_draws · num_steps_bw_draws per chain; a draw follows every
    num_steps_bw_draws-th step after burn-in.

    What is evaluated when (nothing is evaluated that was not asked for):
      every step       the sampler's own loss (metrics_loss; SG methods: L_m of the step's minibatch
                       at its start position): the per-step λ̂ over every post-burn-in step
                       (compute_llc(source="minibatch"), and the cross-check), at no extra cost.
      every draw       the observables (if any) and the sampling batches (sampling_loss=True).
      every full_loss_every-th draw   the full-data L_n (full_loss) and ‖w − w*‖ (distance): λ̂
                       (compute_llc's default), the trace and the diagnostics. Default (None):
                       1 for full-batch methods; for SG methods the draw interval nearest
                       4 · n / (m · num_steps_bw_draws) (m = batch_size × gradient_accumulation_steps;
                       a divisor of num_draws within 25% of it if there is one; at most num_draws),
                       i.e. a full-data L_n about every 4 n/m steps, which costs about 8% of the steps
                       (an L_n costs ≈ n/m forward passes of a batch, a step ≈ 3 of them).

    Options:
      param_masks: weight restriction, see `free_mask`; only masked entries move, everything else
        stays exactly at its value in `params`; localization, noise and prior act on w only.
      bounding_box_size: clip w to [w* − r, w* + r] after every step (SG methods only).
      init_noise: start each chain at w* + init_noise · N(0, I) (free entries; localization stays at w*).
      observables: name -> (x, y) or name -> ((x, y), batches_per_draw). Each observable gets
        batches_per_draw · batch_size points chosen ONCE (without replacement, sorted; from the seed
        and the dataset size only, so identical datasets get identical points) and evaluated at
        every draw of every chain.
      batches_per_draw: default batches per observable, and the number of fresh random sampling
        batches evaluated at each draw when sampling_loss=True.
      sampling_loss: evaluate batches_per_draw fresh random batches of the sampling dataset at every
        draw (devinterp's estimate, compute_llc(source="sampling"); costs batches_per_draw forward
        passes per draw). Off by default: the per-step loss is the same estimate for free.
      full_loss_every: draws between full-data L_n evaluations (see above); 1 = every draw.
      seed: an integer in [0, 2^32) (JAX keys keep 32 bits). Chains use the experiment pipeline's key (llc_bench.experiment.sampler_key(seed,
        method)); the sampling batches at draws use sampler_key(seed, "sample:sampling_batches")
        folded with chain and draw; observable points come from `observable_indices(seed, n)`.

    Output: an xarray DataTree (root dataset; C chains, D draws, F full-data draws, T steps,
    k = batches_per_draw, b = batch_size). By default it holds per-sample losses: sampling_loss and
    sampling_index take C·D·k·b values each, and each observable C·D·k_obs·b, about 8·C·D·k·b bytes
    per dataset (4·10⁸ bytes for 4 chains × 1000 draws × 3 batches × 8192). per_sample_losses=False
    keeps only each batch's mean loss (dims chain, draw, batch; no sampling_index): compute_llc and
    compute_susceptibilities' χ work unchanged, the per-point results (compute_bif, χ per sample) need
    the per-sample losses.
      init_loss(chain, sample_init)       per-sample losses of the full dataset at w* (same for every
                                          chain; its own dim because n ≠ b)
      metrics_loss(chain, step)           the sampler's per-step loss, every step (burn-in included)
      full_loss(chain, full_draw)         full-data L_n(w) at every full_loss_every-th draw; coords
                                          full_draw_step (its step) and full_draw_index (its draw)
      sampling_loss(chain, draw, batch, sample)  per-sample losses on k fresh random batches
      sampling_index(chain, draw, batch, sample) their dataset indices (both with sampling_loss=True)
      loss_<obs>(chain, draw, batch_<obs>, sample)  per-sample losses on the observable's fixed points
      index_<obs>(batch_<obs>, sample)    those points' indices in the observable's dataset
      distance(chain, full_draw)          ‖w − w*‖ over the free entries
      diverged_at(chain)                  first non-finite step, −1 if none (its draws are NaN)
      full_loss_at_wstar ()               full-data L_n(w*), computed as full_loss is (λ̂'s baseline)
      n_beta ()                           nβ as given
      metrics_{accept,energy_change,diverging}(chain, step)  more per-step sampler info (save_metrics)
    Root attrs: `options` (every resolved option plus fingerprints of params, masks and data),
    `run` (sampler settings, d, timings, work).

    output_path: the tree is written as a Zarr store atomically (temp dir, then rename) and the
    returned tree is read back from it. If a store already exists there, it is reused (no
    sampling) when its stored options equal the new ones exactly; otherwise a ValueError names the
    differing options, unless overwrite=True, which replaces it (the old store stays in place until
    the new one is complete). A path that is a regular file, or whose directory cannot be written,
    is refused before sampling. The fingerprints cover array contents and the names of
    apply_fn/loss_fn, not their code.

    Every argument is checked before any work, and a ValueError names it. devinterp v1's names
    (nbeta, optimizer_kwargs, grad_accum_steps, ...) raise a TypeError that gives the name used here.
    """
    from llc_bench.runner import run_chains

    # ---- validate and resolve ---------------------------------------------------------------
    _refuse_v1_names(devinterp_v1)
    method = METHOD_ALIASES.get(sampling_method, sampling_method)
    from llc_bench.samplers import SAMPLER_NAMES, get_spec

    if method not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampling_method {sampling_method!r}; allowed: "
                         f"{list(SAMPLER_NAMES + tuple(METHOD_ALIASES))}")
    minibatch = get_spec(method).minibatch
    for name, value, low in (("num_chains", num_chains, 1), ("num_draws", num_draws, 1),
                             ("num_burnin_steps", num_burnin_steps, 0), ("num_steps_bw_draws", num_steps_bw_draws, 1),
                             ("batch_size", batch_size, 1), ("gradient_accumulation_steps", gradient_accumulation_steps, 1),
                             ("batches_per_draw", batches_per_draw, 1)):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value, ok, rule in (("n_beta", n_beta, lambda v: v > 0, "> 0"),
                                  ("localization", localization, lambda v: v >= 0, ">= 0"),
                                  ("noise_level", noise_level, lambda v: v > 0, "> 0"),
                                  ("weight_decay", weight_decay, lambda v: v >= 0, ">= 0"),
                                  ("bounding_box_size", bounding_box_size, lambda v: v > 0, "> 0 or None"),
                                  ("init_noise", init_noise, lambda v: v >= 0, ">= 0 or None")):
        required = name in ("n_beta", "localization", "noise_level", "weight_decay")
        if (value is not None or required) and not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                                      and math.isfinite(value) and ok(value)):
            raise ValueError(f"{name} must be {rule}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    if full_loss_every is not None and (isinstance(full_loss_every, bool) or not isinstance(full_loss_every, int | np.integer)
                                        or not 1 <= full_loss_every <= num_draws):
        raise ValueError(f"full_loss_every must be None or an integer in [1, num_draws = {num_draws}], "
                         f"got {full_loss_every!r}")
    _check_lr(lr)
    if full_batch and not minibatch:
        raise ValueError(f"full_batch applies to {_minibatch_methods()}; {method!r} always uses the full batch")
    if bounding_box_size is not None and not minibatch:
        raise ValueError(f"bounding_box_size is only supported for {_minibatch_methods()}, not {method!r}")
    spec, settings = _sampler_settings(
        method, lr=lr, batch_size=batch_size, accumulation=gradient_accumulation_steps,
        noise_level=float(noise_level), kwargs=sampling_method_kwargs,
        aliased={"rmsprop_eps": rmsprop_eps, "rmsprop_alpha": rmsprop_alpha})
    x, y = _as_dataset(dataset, "dataset")
    n = int(x.shape[0])
    if full_loss_every is None:
        full_loss_every = default_full_loss_every(method, n, batch_size * gradient_accumulation_steps, full_batch,
                                                  num_steps_bw_draws, num_draws)
    if full_batch and n % gradient_accumulation_steps:
        raise ValueError(f"full_batch: gradient_accumulation_steps = {gradient_accumulation_steps} must divide "
                         f"the dataset size n = {n}")
    if minibatch and not full_batch and batch_size * gradient_accumulation_steps > n:
        raise ValueError(f"batch_size × gradient_accumulation_steps = {batch_size * gradient_accumulation_steps} "
                         f"must be <= the dataset size n = {n}")
    path = _check_output_path(output_path)
    obs = _observable_specs(observables, batches_per_draw, batch_size)
    restriction = Restriction.build(params, param_masks)
    if not jnp.issubdtype(restriction.w_all.dtype, jnp.floating):
        raise ValueError(f"params must be floating point, got {restriction.w_all.dtype}")

    def per_sample_loss(w, xb, yb):
        return loss_fn(apply_fn, restriction.params(w), xb, yb)

    out_shape = jax.eval_shape(per_sample_loss, restriction.w_star, x[:2], y[:2])
    if getattr(out_shape, "shape", None) != (min(2, n),):
        raise ValueError(f"loss_fn must return per-sample losses of shape (m,), got {getattr(out_shape, 'shape', out_shape)} "
                         f"for a batch of {min(2, n)}")

    options = _json_normalize({
        "format_version": FORMAT_VERSION,
        "sampling_method": method,
        "sampler_settings": dataclasses.asdict(settings),
        "sampling_method_kwargs": sampling_method_kwargs or {},
        "lr": lr, "n_beta": n_beta, "localization": localization, "num_chains": num_chains,
        "num_draws": num_draws, "num_burnin_steps": num_burnin_steps, "num_steps_bw_draws": num_steps_bw_draws,
        "batch_size": batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
        "rmsprop_eps": rmsprop_eps, "rmsprop_alpha": rmsprop_alpha, "noise_level": noise_level,
        "weight_decay": weight_decay, "bounding_box_size": bounding_box_size, "init_noise": init_noise,
        "batches_per_draw": batches_per_draw, "seed": seed, "save_metrics": save_metrics,
        "full_batch": bool(full_batch), "per_sample_losses": bool(per_sample_losses),
        "full_loss_every": int(full_loss_every), "sampling_loss": bool(sampling_loss),
        "apply_fn": _fn_name(apply_fn), "loss_fn": _fn_name(loss_fn),
        "params_sha256": _sha256(*jax.tree_util.tree_leaves(params)),
        "param_paths": param_paths(params),
        "free_sha256": _sha256(restriction.free_index),
        "num_params_free": int(restriction.free_index.size),
        "dataset": {"n": n, "sha256": _sha256(x, y)},
        "observables": {name: {"n": int(ox.shape[0]), "batches_per_draw": k, "sha256": _sha256(ox, oy)}
                        for name, (ox, oy, k) in obs.items()},
    })

    if path is not None and path.exists():
        reused = _reuse_store(path, options, overwrite)
        if reused is not None:
            return reused
    _enable_cache_once()

    # ---- posterior, sampler, draws -----------------------------------------------------------
    temper = float(noise_level) ** 2
    w_star = restriction.w_star
    executables = _executables_for(apply_fn, loss_fn, _json_normalize(_code_options(
        options, params, restriction.all_free, float(weight_decay) / temper)))
    if "init_loss" not in executables:
        # The first call's per_sample_loss, kept: a later one with the same code options computes the
        # same function, and keeping the object keeps the posterior's static part (and pytree) equal.
        executables["per_sample_loss"] = per_sample_loss
        executables["init_loss"] = jax.jit(per_sample_loss)
    per_sample_loss = executables["per_sample_loss"]
    init_loss = executables["init_loss"](w_star, x, y)
    loss_at_wstar = float(jnp.mean(init_loss))
    posterior = SamplingPosterior(per_sample_loss, x, y, w_star, float(n_beta) / temper,
                                  float(localization) / temper, loss_at_wstar,
                                  weight_decay=float(weight_decay) / temper,
                                  accumulation_steps=gradient_accumulation_steps)
    from llc_bench.curvature import build_algorithm
    from llc_bench.experiment import auto_step_grad_evals, step_size_summary

    algorithm = _wrap_algorithm(build_algorithm(spec, posterior, settings, full_batch=full_batch), posterior,
                                init_noise, bounding_box_size)
    if full_batch:
        algorithm = _full_batch(algorithm, posterior)

    fixed = {}
    obs_index = {}
    for name, (ox, oy, k) in obs.items():
        idx = observable_indices(seed, int(ox.shape[0]), k * batch_size)
        obs_index[name] = idx.reshape(k, batch_size)
        fixed[name] = tuple(jnp.asarray(np.asarray(a)[idx].reshape(k, batch_size, *a.shape[1:])) for a in (ox, oy))
    draw_data = {"x": x, "y": y, "w_star": w_star, "key": _key(seed, "sample:sampling_batches"), "obs": fixed}
    k_sampling = batches_per_draw

    def batch_losses(w, xs, ys):
        # One batch at a time: the memory of a batch, not of all k.
        losses = jax.lax.map(lambda xy: per_sample_loss(w, *xy), (xs, ys))
        return losses if per_sample_losses else jnp.mean(losses, axis=-1)

    def distance(w, chain, draw, data):
        return {"distance": jnp.linalg.norm(w - data["w_star"])}

    def draw_fn(w, chain, draw, data):
        out = {}
        if sampling_loss:
            key = jax.random.fold_in(jax.random.fold_in(data["key"], chain), draw)
            idx = jax.random.randint(key, (k_sampling, batch_size), 0, n)
            out["sampling_loss"] = batch_losses(w, data["x"][idx], data["y"][idx])
            if per_sample_losses:
                out["sampling_index"] = idx.astype(jnp.int32)
        for name, (xs, ys) in data["obs"].items():
            out[f"loss_{name}"] = batch_losses(w, xs, ys)
        return out

    _prefetch_imports_once()
    result = run_chains(method, algorithm, posterior, _key(seed, method), num_chains=num_chains,
                        num_burnin_steps=num_burnin_steps, num_draws=num_draws,
                        num_steps_bw_draws=num_steps_bw_draws, progress=progress,
                        draw_fn=draw_fn if obs or sampling_loss else None, draw_data=draw_data,
                        full_loss_every=full_loss_every, full_draw_fn=distance,
                        executables=executables)

    # ---- the tree ----------------------------------------------------------------------------
    import xarray as xr

    draws = result.draw_outputs
    chain_dim = np.arange(num_chains)
    data_vars = {
        "init_loss": (("chain", "sample_init"), np.broadcast_to(np.asarray(init_loss), (num_chains, n))),
        "full_loss": (("chain", "full_draw"), result.draw_loss),
        "metrics_loss": (("chain", "step"), result.loss_trace),
        "distance": (("chain", "full_draw"), result.full_draw_outputs["distance"]),
        "diverged_at": (("chain",), result.diverged_at),
        "full_loss_at_wstar": ((), np.float64(result.loss_at_wstar)),
        "n_beta": ((), np.float64(n_beta)),
    }
    if sampling_loss:
        data_vars["sampling_loss"] = (("chain", "draw", "batch", "sample")[:draws["sampling_loss"].ndim],
                                      draws["sampling_loss"])
        if per_sample_losses:
            data_vars["sampling_index"] = (("chain", "draw", "batch", "sample"), draws["sampling_index"])
    for name in obs:
        dims = ("chain", "draw", f"batch_{name}", "sample")[:draws[f"loss_{name}"].ndim]
        data_vars[f"loss_{name}"] = (dims, draws[f"loss_{name}"])
        data_vars[f"index_{name}"] = ((f"batch_{name}", "sample"), obs_index[name])
    if save_metrics:
        for field in ("accept", "energy_change", "diverging"):
            data_vars[f"metrics_{field}"] = (("chain", "step"), getattr(result, field))
    draw_steps = num_burnin_steps + (np.arange(num_draws) + 1) * num_steps_bw_draws - 1
    coords = {"chain": chain_dim, "draw": np.arange(num_draws), "draw_step": ("draw", draw_steps),
              "full_draw_step": ("full_draw", result.draw_steps),
              "full_draw_index": ("full_draw", np.arange(full_loss_every - 1, num_draws, full_loss_every)),
              "step": np.arange(result.loss_trace.shape[1])}
    ds = xr.Dataset(data_vars, coords=coords)
    run_info = {
        "sampler_description": spec.description,
        "num_params": int(restriction.w_all.size),
        "num_params_free": int(restriction.free_index.size),
        "n": n,
        "loss_at_wstar": result.loss_at_wstar,
        "grad_evals": float(np.sum(result.grad_evals)),
        "wall_s": result.wall_s, "warmup_s": result.warmup_s, "compile_s": result.compile_s,
        "tuned": result.tuned,
        # ε of the tempered run (σ² lr) and, for lr="auto", what chose it
        **step_size_summary(settings, algorithm.notes),
    }
    run_info["grad_evals"] += auto_step_grad_evals(algorithm.notes, n)
    ds.attrs = {"options": options, "run": _json_normalize(run_info)}
    tree = xr.DataTree(ds)
    if path is None:
        return tree
    from llc_bench.artifacts import write_datatree_atomic

    write_datatree_atomic(tree, path)
    return xr.open_datatree(path, engine="zarr", consolidated=False)


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
    import difflib
    import inspect

    for name in extra:
        if name in V1_NAMES:
            raise TypeError(f"sample(): {name!r} is devinterp v1's name; use {V1_NAMES[name]}")
        known = [p for p in inspect.signature(sample).parameters if p != "devinterp_v1"]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TypeError(f"sample() got an unexpected keyword argument {name!r}{hint}")


def _check_lr(lr) -> None:
    """lr: None (samplers that tune their own step), a finite number > 0 or "auto"; _sampler_settings says which is needed."""
    if lr is None or (isinstance(lr, str) and lr == "auto"):
        return
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f'lr must be a finite number > 0 or "auto" (or None for self-tuning samplers), got {lr!r}')


def _check_output_path(output_path) -> Path | None:
    """Refuse, before any sampling, an output_path that could not take the store."""
    import tempfile

    if output_path is None:
        return None
    path = Path(output_path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_path {path} is a file, not a Zarr store; remove it or choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        raise ValueError(f"output_path {path}: its directory cannot be written ({err.strerror or err})") from None
    return path


def _reuse_store(path: Path, options: dict, overwrite: bool):
    """The stored tree if its options equal `options`; None if it is to be (re)written."""
    import xarray as xr

    try:
        stored = xr.open_datatree(path, engine="zarr", consolidated=False)
        stored_options = stored.attrs.get("options")
    except Exception as err:  # not a store sample() wrote
        stored, stored_options = None, None
        if not overwrite:
            raise ValueError(f"{path} exists and is not a readable sample() store ({err}); "
                             "pass overwrite=True to replace it") from err
    if stored_options == options:
        return stored
    if overwrite:
        # Replaced only once the new tree is complete (write_datatree_atomic): a failed run keeps the old store.
        if stored is not None:
            stored.close()
        return None
    stored_options = stored_options or {}
    differ = sorted(k for k in set(options) | set(stored_options) if options.get(k) != stored_options.get(k))
    raise ValueError(f"{path} holds a sample() run with different options ({', '.join(differ)}); "
                     "pass overwrite=True to replace it or choose another output_path")


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def _dataset(tree):
    import xarray as xr

    if isinstance(tree, xr.DataTree):
        return tree.to_dataset()
    if isinstance(tree, xr.Dataset):
        return tree
    raise TypeError(f"expected the DataTree returned by sample(), got {type(tree).__name__}")


def _burnin(num_burnin_draws: int, num_draws: int, need: int = 1) -> int:
    if not 0 <= num_burnin_draws <= num_draws - need:
        raise ValueError(f"num_burnin_draws must be in [0, {num_draws - need}] (leaving >= {need} draws), "
                         f"got {num_burnin_draws}")
    return num_burnin_draws


@dataclass(frozen=True)
class LLCResult:
    """λ̂ from a sample() tree: pooled over usable chains, with the experiment pipeline's health checks.

    status: "ok", "warnings" (health flags fired), "not_converged" (a trend flag: the draws are not
    yet stationary), "diverged" (chains excluded), "failed" (none usable).
    cross_check: SG methods, the per-step λ̂ beside the full-data draws' (llc_bench.estimator.
    cross_check; a disagreement is the flag `estimates_disagree`); None otherwise.
    """

    llc_mean: float
    llc_se: float
    per_chain: np.ndarray  # (C,) NaN for excluded chains
    status: str
    flags: tuple  # llc_bench.health.HealthFlag
    estimate: Any  # llc_bench.estimator.LLCEstimate (running estimate, SEs, excluded chains)
    loss_at_wstar: float
    n_beta: float
    source: str
    num_burnin_draws: int
    cross_check: dict | None = None


def _resolve_llc_source(ds, source: str) -> str:
    """source="auto": "minibatch" (the per-step loss) for SG methods, "full" for full-batch ones."""
    if source != "auto":
        return source
    from llc_bench.estimator import resolve_source

    return resolve_source("auto", str(ds.attrs.get("options", {}).get("sampling_method", "")))


def _full_draws(ds, burn: int) -> tuple[np.ndarray, np.ndarray]:
    """((C, F') full-data L_n, (F',) their steps) of the full-data draws at or after draw `burn`."""
    keep = np.asarray(ds["full_draw_index"]) >= burn
    return (np.asarray(ds["full_loss"], np.float64)[:, keep], np.asarray(ds["full_draw_step"])[keep])


def _llc_draws(ds, source: str, burn: int) -> tuple[np.ndarray, int]:
    """(C, N) loss series for λ̂ and the number of leading steps of metrics_loss to skip."""
    k = int(ds.attrs.get("options", {}).get("num_steps_bw_draws", 1))
    burn_steps = int(ds.attrs.get("options", {}).get("num_burnin_steps", 0)) + burn * k
    if source == "full":
        return _full_draws(ds, burn)[0], burn_steps
    if source == "sampling":  # batches have equal sizes: the mean of batch means is the mean of all
        if "sampling_loss" not in ds:
            raise ValueError("source='sampling' needs the sampling batches: sample(..., sampling_loss=True)")
        s = np.asarray(ds["sampling_loss"], np.float64)
        return s.reshape(*s.shape[:2], -1).mean(axis=2)[:, burn:], burn_steps
    if source == "minibatch":
        return np.asarray(ds["metrics_loss"], np.float64)[:, burn_steps:], burn_steps
    raise ValueError(f"source must be 'auto', 'full', 'sampling' or 'minibatch', got {source!r}")


def _baseline(ds) -> float:
    """L_n(w*) as the draws' L_n is computed (stores without it: the float64 mean of init_loss)."""
    if "full_loss_at_wstar" in ds:
        return float(ds["full_loss_at_wstar"])
    return float(np.mean(np.asarray(ds["init_loss"], np.float64)[0]))


def compute_llc(tree, num_burnin_draws: int = 0, source: str = "full") -> LLCResult:
    """λ̂ = nβ ( mean over usable chains and post-burn-in draws of L(w) − L_n(w*) ).

    L_n(w*) = full_loss_at_wstar: the FULL-data loss at w* (the mean of init_loss, computed the way the
    draws' full_loss is, so a chain that never moves gives exactly 0), never a minibatch average. Draws
    before `num_burnin_draws` are dropped (on top of the sampler's num_burnin_steps; for the per-step
    source, the steps up to that draw). L(w):
      source="full"      (default) full-data L_n(w) at the full-data draws (full_loss)
      source="minibatch" the sampler's own per-step loss at every post-burn-in step (metrics_loss;
                         SG methods: L_m of each step's independent minibatch, unbiased for L_n at
                         that step's position; free, noisier) = the pipeline's estimate_from="minibatch"
      source="auto"      "minibatch" for SG methods, "full" for full-batch ones
      source="sampling"  mean of the k fresh random batches at each draw (sampling_loss, needs
                         sample(..., sampling_loss=True); unbiased, noisier: devinterp's estimate)
    Per-chain values, SEs and exclusion of diverged / non-finite chains follow
    llc_bench.estimator.estimate_llc; health flags follow llc_bench.health.check_health on the
    same post-burn-in series and the full-data draws. For SG methods the per-step and the
    full-data λ̂ check each other (LLCResult.cross_check; flag `estimates_disagree`), as in the
    pipeline.
    """
    from llc_bench.estimator import cross_check, cross_check_flag, estimate_llc
    from llc_bench.health import check_health, run_status
    from llc_bench.runner import ChainResult

    ds = _dataset(tree)
    source = _resolve_llc_source(ds, source)
    num_chains, num_draws = ds.sizes["chain"], ds.sizes["draw"]
    burn = _burnin(num_burnin_draws, num_draws)
    draws, burn_steps = _llc_draws(ds, source, burn)
    loss_at_wstar = _baseline(ds)
    n_beta = float(ds["n_beta"])
    diverged_at = np.asarray(ds["diverged_at"], np.int64)
    estimate = estimate_llc(draws, loss_at_wstar, n_beta, diverged_at)
    full, full_steps = _full_draws(ds, burn)
    check = None
    if _resolve_llc_source(ds, "auto") == "minibatch" and full.shape[1] >= 1:  # SG: the two check each other
        per_step = estimate if source == "minibatch" else estimate_llc(
            _llc_draws(ds, "minibatch", burn)[0], loss_at_wstar, n_beta, diverged_at)
        full_est = estimate if source == "full" else estimate_llc(full, loss_at_wstar, n_beta, diverged_at)
        check = cross_check(per_step, full_est)

    def per_step(name, fill, dtype=float):
        return np.asarray(ds[name], dtype) if name in ds else np.full(ds["metrics_loss"].shape, fill, dtype)

    health_input = ChainResult(
        sampler=str(ds.attrs.get("options", {}).get("sampling_method", "")),
        loss_trace=np.asarray(ds["metrics_loss"], np.float64),
        accept=per_step("metrics_accept", np.nan),
        energy_change=per_step("metrics_energy_change", np.nan),
        diverging=per_step("metrics_diverging", False, bool),
        draw_loss=draws if source in ("full", "sampling") else full,
        draw_steps=np.asarray(ds["draw_step"])[burn:] if source == "sampling" else full_steps,
        projections=np.zeros((num_chains, full.shape[1], 0)),
        diverged_at=diverged_at,
        grad_evals=np.zeros(num_chains), warmup_grad_evals=np.zeros(num_chains),
        num_burnin_steps=burn_steps,
        loss_at_wstar=loss_at_wstar, n_beta=n_beta, wall_s=0.0, warmup_s=0.0, compile_s=0.0, tuned={},
        draw_spread=None if source == "sampling" or "distance" not in ds else
        np.asarray(ds["distance"], np.float64)[:, np.asarray(ds["full_draw_index"]) >= burn] ** 2,
    )
    flags = check_health(health_input, estimate_from="minibatch" if source == "minibatch" else "full")
    if cross_check_flag(check) is not None:
        flags.append(cross_check_flag(check))
    status = run_status(estimate.status, flags)
    return LLCResult(estimate.mean, estimate.se, estimate.per_chain, status, tuple(flags), estimate,
                     loss_at_wstar, n_beta, source, burn, check)


def _usable(ds, *series: np.ndarray) -> np.ndarray:
    ok = np.asarray(ds["diverged_at"]) < 0
    for s in series:
        ok &= np.all(np.isfinite(s.reshape(s.shape[0], -1)), axis=1)
    return ok


def _pooled_cov(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(C, N, I), (C, N, J) -> (I, J): Σ_c Σ_t (a − ā_c)(b − b̄_c) / (C (N − 1)), each chain centered on its own mean."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return np.einsum("cti,ctj->ij", a, b) / (a.shape[0] * (a.shape[1] - 1))


def _per_sample(ds) -> bool:
    return bool(ds.attrs.get("options", {}).get("per_sample_losses", True))


def _obs_losses(ds, name: str, burn) -> np.ndarray:
    """(C, N, I) per-sample losses, or (C, N, k) batch means when the tree stores only means, of the
    draws from `burn` on (an int) or of the draws listed in `burn` (an index array)."""
    var = f"loss_{name}"
    if var not in ds:
        have = [v[5:] for v in ds.data_vars if v.startswith("loss_")]
        raise ValueError(f"no observable {name!r} in this tree; observables: {have}")
    x = np.asarray(ds[var], np.float64)
    x = x[:, burn:] if isinstance(burn, int) else x[:, burn]
    return x.reshape(x.shape[0], x.shape[1], -1)


def compute_bif(tree, obs_a: str, obs_b: str | None = None, *, num_burnin_draws: int = 0,
                normalize: str = "covariance"):
    """Bayesian influence function: posterior covariance between per-sample losses of two observables.

        BIF[i, j] = Cov_β( ℓ_i(w), ℓ_j(w) ),   i over obs_a's points, j over obs_b's (obs_b = obs_a if None)

    pooled over usable chains and post-burn-in draws, each chain centered on its own means
    (Σ_c Σ_t (ℓ_i − ℓ̄_ic)(ℓ_j − ℓ̄_jc) / (C (D − 1))); normalize="correlation" divides by the
    pooled standard deviations. Interpretation: raising training point i's weight in the tempered
    likelihood exp(−β Σ_k ℓ_k), β = nβ/n, by ε changes E_β[ℓ_j] by −β · BIF[i, j] · ε to first
    order; devinterp reports the covariance (or correlation) itself, as here.

    Returns an xarray.DataArray (sample_a, sample_b) with coords index_a / index_b (the points'
    indices in each observable's dataset); NaN if no chain is usable.
    """
    import xarray as xr

    if normalize not in ("covariance", "correlation"):
        raise ValueError(f"normalize must be 'covariance' or 'correlation', got {normalize!r}")
    obs_b = obs_a if obs_b is None else obs_b
    ds = _dataset(tree)
    if not _per_sample(ds):
        raise ValueError("compute_bif needs per-sample losses; this tree has batch means only "
                         "(sample(..., per_sample_losses=True))")
    burn = _burnin(num_burnin_draws, ds.sizes["draw"], need=2)
    a, b = _obs_losses(ds, obs_a, burn), _obs_losses(ds, obs_b, burn)
    ok = _usable(ds, a, b)
    if ok.any():
        cov = _pooled_cov(a[ok], b[ok])
        if normalize == "correlation":
            sd_a = np.sqrt(np.diag(_pooled_cov(a[ok], a[ok])))
            sd_b = np.sqrt(np.diag(_pooled_cov(b[ok], b[ok])))
            with np.errstate(divide="ignore", invalid="ignore"):
                cov = cov / np.outer(sd_a, sd_b)
    else:
        cov = np.full((a.shape[2], b.shape[2]), np.nan)
    return xr.DataArray(
        cov, dims=("sample_a", "sample_b"),
        coords={"index_a": ("sample_a", np.asarray(ds[f"index_{obs_a}"]).reshape(-1)),
                "index_b": ("sample_b", np.asarray(ds[f"index_{obs_b}"]).reshape(-1))},
        attrs={"obs_a": obs_a, "obs_b": obs_b, "normalize": normalize, "num_chains_used": int(ok.sum()),
               "num_draws_used": int(a.shape[1])},
        name="bif",
    )


def compute_susceptibilities(tree, *, num_burnin_draws: int = 0, source: str = "full"):
    """Susceptibility of each observable: its linear response to the weight of the sampling data.

        χ_obs = −nβ · Cov_β( L(w), φ_obs(w) ) = nβ · ∂E_β[φ_obs] / ∂(nβ)

    φ_obs = mean loss on the observable's fixed points, L = the sampling dataset's loss
    (source="full": full-data L_n, at the draws that have it: every one with sample(...,
    full_loss_every=1), else every full_loss_every-th; "sampling": the mean of that draw's fresh
    random batches (sample(..., sampling_loss=True)), an unbiased but noisier proxy: batch noise is
    independent of w, so the covariance is unchanged in expectation). The identity follows from ∂/∂(nβ) E[φ] = −Cov(φ, L_n) for
    p ∝ exp(−nβ L_n − …). Sign: χ < 0 means the observable's expected loss falls when the
    sampling data are weighted more (a relative increase of nβ); χ > 0 means it rises.

    Covariances are pooled over usable chains and post-burn-in draws, each chain centered on its
    own means. Returns an xarray.Dataset with, per observable: `<obs>` (χ), `<obs>_se` (between-
    chain standard error of χ; NaN with one usable chain) and `<obs>_per_sample`
    (batch_<obs>, sample): χ_i = −nβ Cov(L, ℓ_i) for each of its points (only when the tree holds
    per-sample losses; with per_sample_losses=False χ comes from the batch means, which average to φ).
    """
    import xarray as xr

    ds = _dataset(tree)
    burn = _burnin(num_burnin_draws, ds.sizes["draw"], need=2)
    if source not in ("full", "sampling"):
        raise ValueError(f"source must be 'full' or 'sampling', got {source!r}")
    loss, _ = _llc_draws(ds, source, burn)
    rows = burn
    if source == "full":  # the draws with a full-data L_n
        index = np.asarray(ds["full_draw_index"])
        rows = index[index >= burn]
        if rows.size < 2:
            raise ValueError(f"source='full' has {rows.size} full-data draw(s) after burn-in, fewer than 2; "
                             "sample(..., full_loss_every=1) evaluates L_n at every draw")
    n_beta = float(ds["n_beta"])
    names = [v[5:] for v in ds.data_vars if v.startswith("loss_")]
    out = {}
    for name in names:
        per_sample = _obs_losses(ds, name, rows)  # (C, N, I)
        ok = _usable(ds, loss, per_sample)
        shape = ds[f"index_{name}"].shape
        dims = ds[f"index_{name}"].dims
        if not ok.any():
            out[name] = ((), np.nan)
            out[f"{name}_se"] = ((), np.nan)
            if _per_sample(ds):
                out[f"{name}_per_sample"] = (dims, np.full(shape, np.nan))
            continue
        L = loss[ok][:, :, None]
        phi = per_sample[ok].mean(axis=2, keepdims=True)
        chi = -n_beta * float(_pooled_cov(L, phi)[0, 0])
        per_chain = [-n_beta * float(_pooled_cov(L[c : c + 1], phi[c : c + 1])[0, 0]) for c in range(L.shape[0])]
        se = float(np.std(per_chain, ddof=1) / math.sqrt(len(per_chain))) if len(per_chain) > 1 else math.nan
        out[name] = ((), chi)
        out[f"{name}_se"] = ((), se)
        if _per_sample(ds):
            out[f"{name}_per_sample"] = (dims, (-n_beta * _pooled_cov(L, per_sample[ok])[0]).reshape(shape))
    return xr.Dataset(out, attrs={"n_beta": n_beta, "source": source, "num_burnin_draws": burn})
