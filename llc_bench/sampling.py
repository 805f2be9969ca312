"""devinterp-style `sample()` for any JAX model: chains on a (weight-restricted) local posterior, per-sample losses at every draw in an xarray DataTree, and LLC / BIF / susceptibility post-processing.

sample() is a thin adapter over the experiment pipeline's engine, in four stages: validate (the
arguments, once, at the edge: llc_bench.sampling_options), build (the posterior of
llc_bench.sampling_posterior, the registry's sampler wrapped by llc_bench.samplers.wrappers, the draw
functions), run (llc_bench.runner.start_chains) and assemble (the tree: llc_bench.sampling_store).
Post-processing of the tree is in llc_bench.sampling_estimates; every name is importable from here.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.curvature import build_algorithm, step_size_summary
from llc_bench.discretization import curvature_probe_fn, step_bias_summary
from llc_bench.jaxcache import enable_compilation_cache
from llc_bench.rules import usable_chains
from llc_bench.runner import LiveChains, run_chains, start_chains
from llc_bench.samplers.base import wrap
from llc_bench.samplers.wrappers import clip_to_box, full_batch, initial_noise
from llc_bench.sampling_estimates import (
    LLCResult,
    chain_result,
    compute_bif,
    compute_llc,
    compute_susceptibilities,
)
from llc_bench.sampling_options import (
    FORMAT_VERSION,
    FULL_LOSS_STEPS,
    METHOD_ALIASES,
    V1_NAMES,
    LossFn,
    Request,
    SampleArgs,
    _as_dataset,
    _check_lr,
    _json_normalize,
    _key,
    _observable_specs,
    _refuse_v1_names,
    _sampler_settings,
    check_dataset_sizes,
    check_method,
    default_full_loss_every,
    observable_indices,
    options_record,
)
from llc_bench.sampling_posterior import Restriction, SamplingPosterior, free_mask, param_paths
from llc_bench.sampling_store import _check_output_path, _reuse_store, sample_tree, write_and_reopen

__all__ = [
    "FORMAT_VERSION", "FULL_LOSS_STEPS", "METHOD_ALIASES", "V1_NAMES", "LLCResult", "LossFn", "Restriction",
    "SamplingPosterior", "chain_result", "compute_bif", "compute_llc", "compute_susceptibilities",
    "default_full_loss_every", "free_mask", "observable_indices", "param_paths", "run_chains", "sample",
    "_check_lr", "_sampler_settings", "_wrap_algorithm",
]

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
        enable_compilation_cache()


def _prefetch_imports_once() -> None:
    """Import what the tree and compute_llc need (xarray; the health checks and the ArviZ groups with
    arviz-stats, arviz-base and scipy.stats: about 1 s) in a background thread while the chains compile and run: JAX releases the
    interpreter lock there. Started after every import sample() itself needs, so the two threads
    never wait on each other's module locks. Once per process."""
    global _PREFETCHED
    if _PREFETCHED:
        return
    _PREFETCHED = True
    threading.Thread(target=_import_later_modules, name="llc_bench-imports", daemon=True).start()


def _import_later_modules() -> None:
    for module in ("xarray", "llc_bench.health", "llc_bench.diagnostics"):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the main thread's own import reports any real error
            return


# Over 80 lines: the docstring documents each keyword (devinterp's names and ours); the body is four stage calls.
def sample(apply_fn: Callable, params, loss_fn: LossFn, dataset, *, observables=None, lr: float | str | None = None,
           n_beta: float, localization: float, num_chains: int, num_draws: int, num_burnin_steps: int = 0,
           num_steps_bw_draws: int = 1, batch_size: int = 32, gradient_accumulation_steps: int = 1,
           sampling_method: str = "sgld", sampling_method_kwargs: dict | None = None,
           rmsprop_eps: float | None = None, rmsprop_alpha: float | None = None, noise_level: float = 1.0,
           weight_decay: float = 0.0, bounding_box_size: float | None = None, init_noise: float | None = None,
           param_masks=None, batches_per_draw: int = 3, seed: int = 0, output_path: str | Path | None = None,
           save_metrics: bool = False, overwrite: bool = False, progress: bool = True, full_batch: bool = False,
           per_sample_losses: bool = True, full_loss_every: int | None = None, sampling_loss: bool = False,
           step_bias: bool = False, **devinterp_v1):
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
      step_bias: estimate the step size's first-order bias of λ̂ (llc_bench.discretization; sgld,
        rmsprop_sgld with its default adapt="burnin", curvature_sgld): one probe of nβ tr(P ∇²L) per
        chain at every full-data draw (a Hessian-vector product on 4,096 rows drawn afresh), and at
        the end 4 Hutchinson probes per chain at the chains' last positions on the full data (with
        minibatches, as many gradient-covariance products too). attrs["run"]["step_bias"] holds the
        record, in λ̂'s units; compute_llc subtracts its `applied` value (the first-order bias with
        the covariance term a non-Gaussian posterior adds) as LLCResult.llc_debiased. The formula
        assumes unclipped steps: with bounding_box_size it holds only while the box is not reached.
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
      curvature_probe(chain, full_draw)   with step_bias: one Rademacher probe of nβ tr(P ∇²L) (nβ
                                          tempered by noise_level as the chains are)
      full_loss_at_wstar ()               full-data L_n(w*), computed as full_loss is (λ̂'s baseline)
      n_beta ()                           nβ as given
      metrics_{accept,energy_change,diverging}(chain, step)  more per-step sampler info (save_metrics)
    Root attrs: `options` (every resolved option plus fingerprints of params, masks and data),
    `run` (sampler settings, d, timings, work).
    Groups, as in the experiment pipeline's trees (llc_bench.diagnostics.to_datatree):
      posterior(chain, full_draw)         L_n (= full_loss), llc = nβ (L_n − full_loss_at_wstar),
                                          theta_proj(chain, full_draw, proj): w − w* on 4 fixed random
                                          unit directions. Its draws are the full-data draws, so its
                                          sample dims are (chain, full_draw) (attrs["sample_dims"]; pass
                                          sample_dims=["chain", "full_draw"] to ArviZ functions)
      sample_stats(chain, step)           loss (= metrics_loss), grad_evals, warmup_grad_evals,
                                          diverged_at; accept, energy_change, diverging with save_metrics
    llc_bench.diagnostics.convergence(tree) reads them; chain_result(tree) is the run as a ChainResult
    for llc_bench.health.check_health and the llc_bench.plots figures.

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
    _refuse_v1_names(devinterp_v1)
    request = _validate(apply_fn, params, loss_fn, dataset, SampleArgs.of(locals()))
    if request.path is not None and request.path.exists():
        reused = _reuse_store(request.path, request.options, request.args.overwrite)
        if reused is not None:
            return reused
    _enable_cache_once()
    built = _build(apply_fn, params, loss_fn, request)
    chains = _run(request, built)
    return _assemble(request, built, chains)


# ---------------------------------------------------------------------------------------------
# The stages: validate → build → run → assemble
# ---------------------------------------------------------------------------------------------


def _validate(apply_fn: Callable, params, loss_fn: LossFn, dataset, args: SampleArgs) -> Request:
    """Every argument checked and resolved, before any work; a ValueError names the first bad one."""
    method, spec, settings = check_method(args)
    x, y = _as_dataset(dataset, "dataset")
    full_loss_every = check_dataset_sizes(args, method, int(x.shape[0]))
    path = _check_output_path(args.output_path)
    obs = _observable_specs(args.observables, args.batches_per_draw, args.batch_size)
    restriction = Restriction.build(params, args.param_masks)
    if not jnp.issubdtype(restriction.w_all.dtype, jnp.floating):
        raise ValueError(f"params must be floating point, got {restriction.w_all.dtype}")

    def per_sample_loss(w, xb, yb):
        return loss_fn(apply_fn, restriction.params(w), xb, yb)

    n = int(x.shape[0])
    out_shape = jax.eval_shape(per_sample_loss, restriction.w_star, x[:2], y[:2])
    if getattr(out_shape, "shape", None) != (min(2, n),):
        raise ValueError(f"loss_fn must return per-sample losses of shape (m,), got {getattr(out_shape, 'shape', out_shape)} "
                         f"for a batch of {min(2, n)}")
    options = options_record(args, method=method, settings=settings, full_loss_every=full_loss_every,
                             apply_fn=apply_fn, loss_fn=loss_fn, params=params, restriction=restriction,
                             x=x, y=y, obs=obs)
    return Request(args, method, spec, settings, x, y, full_loss_every, path, obs, restriction, per_sample_loss,
                   options)


@dataclass(frozen=True)
class _Built:
    """What the run needs: the posterior, the wrapped sampler, the draw functions and the compiled chunks."""

    posterior: SamplingPosterior
    algorithm: Any  # llc_bench.samplers.Algorithm
    init_loss: jax.Array  # (n,) per-sample losses at w*
    executables: dict
    draw_fn: Callable | None
    full_draw_fn: Callable
    draw_data: dict
    obs_index: dict  # name -> (k, b) the observable's fixed points


def _build(apply_fn: Callable, params, loss_fn: LossFn, request: Request) -> _Built:
    """The posterior at the tempered nβ, γ, λ (divided by σ²), its sampler and the draw functions."""
    args, x, y = request.args, request.x, request.y
    temper = float(args.noise_level) ** 2
    w_star = request.restriction.w_star
    executables = _executables_for(apply_fn, loss_fn, _json_normalize(_code_options(
        request.options, params, request.restriction.all_free, float(args.weight_decay) / temper)))
    if "init_loss" not in executables:
        # The first call's per_sample_loss, kept: a later one with the same code options computes the
        # same function, and keeping the object keeps the posterior's static part (and pytree) equal.
        executables["per_sample_loss"] = request.per_sample_loss
        executables["init_loss"] = jax.jit(request.per_sample_loss)
    request = dataclasses.replace(request, per_sample_loss=executables["per_sample_loss"])
    init_loss = executables["init_loss"](w_star, x, y)
    loss_at_wstar = float(jnp.mean(init_loss))
    posterior = SamplingPosterior(request.per_sample_loss, x, y, w_star, float(args.n_beta) / temper,
                                  float(args.localization) / temper, loss_at_wstar,
                                  weight_decay=float(args.weight_decay) / temper,
                                  accumulation_steps=args.gradient_accumulation_steps)
    algorithm = build_algorithm(request.spec, posterior, request.settings, full_batch=args.full_batch)
    algorithm = _wrap_algorithm(algorithm, posterior, args.init_noise, args.bounding_box_size)
    if args.full_batch:
        algorithm = wrap(algorithm, posterior, lambda a, p: full_batch(a, p.x, p.y), "full_batch")
    draw_fn, draw_data, obs_index = _draw_functions(request)
    full_draw_fn, full_draw_data = _full_draw_function(request, algorithm)
    draw_data = {**draw_data, **full_draw_data}
    return _Built(posterior, algorithm, init_loss, executables, draw_fn, full_draw_fn, draw_data, obs_index)


def _wrap_algorithm(algorithm, posterior, init_noise: float | None, box: float | None):
    """initial_noise(clip_to_box(algorithm, w*, box), init_noise), each only when set: w ← w* +
    init_noise · N(0, I) once per chain before warm-up, clipped into the box, and every step's
    position clipped to [w* − box, w* + box] (both on the free entries only). Applied through
    `wrap`, so the runner can repeat them on a traced posterior (w* an argument, not a constant)."""
    def transform(algorithm, posterior):
        if box is not None:
            algorithm = clip_to_box(algorithm, posterior.w_star, box)
        return initial_noise(algorithm, init_noise or 0.0)

    return wrap(algorithm, posterior, transform, ("init_noise_box", init_noise, box))


def _draw_functions(request: Request):
    """(draw_fn or None, draw_data, obs_index): what the runner evaluates at every draw (the
    observables' fixed points and, with sampling_loss, fresh random sampling batches)."""
    args, per_sample_loss = request.args, request.per_sample_loss
    batch_size, k_sampling, n = args.batch_size, args.batches_per_draw, request.n
    fixed, obs_index = {}, {}
    for name, (ox, oy, k) in request.obs.items():
        idx = observable_indices(args.seed, int(ox.shape[0]), k * batch_size)
        obs_index[name] = idx.reshape(k, batch_size)
        fixed[name] = tuple(jnp.asarray(np.asarray(a)[idx].reshape(k, batch_size, *a.shape[1:])) for a in (ox, oy))
    draw_data = {"x": request.x, "y": request.y, "w_star": request.restriction.w_star,
                 "key": _key(args.seed, "sample:sampling_batches"), "obs": fixed}

    def batch_losses(w, xs, ys):
        # One batch at a time: the memory of a batch, not of all k.
        losses = jax.lax.map(lambda xy: per_sample_loss(w, *xy), (xs, ys))
        return losses if args.per_sample_losses else jnp.mean(losses, axis=-1)

    def draw_fn(w, chain, draw, data):
        out = {}
        if args.sampling_loss:
            key = jax.random.fold_in(jax.random.fold_in(data["key"], chain), draw)
            idx = jax.random.randint(key, (k_sampling, batch_size), 0, n)
            out["sampling_loss"] = batch_losses(w, data["x"][idx], data["y"][idx])
            if args.per_sample_losses:
                out["sampling_index"] = idx.astype(jnp.int32)
        for name, (xs, ys) in data["obs"].items():
            out[f"loss_{name}"] = batch_losses(w, xs, ys)
        return out

    return (draw_fn if request.obs or args.sampling_loss else None), draw_data, obs_index


def _distance(w, chain, draw, data):
    """‖w − w*‖ at the full-data draws."""
    return {"distance": jnp.linalg.norm(w - data["w_star"])}


def _full_draw_function(request: Request, algorithm) -> tuple[Callable, dict]:
    """(full_draw_fn, what it adds to draw_data): what every full-data draw evaluates besides L_n:
    ‖w − w*‖, and with step_bias the per-draw curvature probe
    (llc_bench.discretization.curvature_probe_fn) with its key."""
    if not request.args.step_bias:
        return _distance, {}
    probe, probe_key = curvature_probe_fn(request.spec, request.settings, algorithm.position,
                                          _key(request.args.seed, "sample:step_bias"))
    position = algorithm.position

    def distance_and_probe(state, chain, draw, data, params, posterior):
        return {**_distance(position(state), chain, draw, data),
                **probe(state, chain, draw, data["step_bias_key"], params, posterior)}

    distance_and_probe.reads_state = True
    return distance_and_probe, {"step_bias_key": probe_key}


def _run(request: Request, built: _Built) -> LiveChains:
    """The chains, on the pipeline's runner with the pipeline's key for this sampler."""
    args = request.args
    _prefetch_imports_once()
    return start_chains(request.method, built.algorithm, built.posterior, _key(args.seed, request.method),
                        num_chains=args.num_chains, num_burnin_steps=args.num_burnin_steps, num_draws=args.num_draws,
                        num_steps_bw_draws=args.num_steps_bw_draws, progress=args.progress,
                        draw_fn=built.draw_fn, draw_data=built.draw_data,
                        full_loss_every=request.full_loss_every, full_draw_fn=built.full_draw_fn,
                        executables=built.executables)


def _step_bias(request: Request, built: _Built, chains: LiveChains) -> dict | None:
    """step_bias's record (llc_bench.discretization.step_bias_summary at the chains' last positions,
    with the per-draw probes' covariance term), in the units of λ̂ at the nβ given to sample(): the
    chains sample the posterior tempered by noise_level, whose nβ is nβ / σ², so its bias of
    nβ E[L_n − L_n(w*)] is scaled by σ². None without step_bias or when no estimate exists."""
    if not request.args.step_bias:
        return None
    result, algorithm = chains.result, built.algorithm
    step = step_size_summary(request.settings, algorithm.notes)["step_size"]
    bias = step_bias_summary(request.spec, built.posterior, request.settings, chains.params, chains.states,
                             jax.vmap(algorithm.position)(chains.states),
                             usable_chains(diverged_at=result.diverged_at), step,
                             _key(request.args.seed, "sample:step_bias_end"), full_batch=request.args.full_batch,
                             result=result)
    if bias is None:
        return None
    return bias.scaled(float(request.args.n_beta) / float(built.posterior.n_beta)).record()


def _assemble(request: Request, built: _Built, chains: LiveChains):
    """The tree, written to and read back from output_path when one is given."""
    tree = sample_tree(request, chains.result, built.init_loss, built.obs_index, built.algorithm.notes,
                       step_bias=_step_bias(request, built, chains))
    if request.path is None:
        return tree
    return write_and_reopen(tree, request.path)
