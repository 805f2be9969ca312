"""One experiment end to end: config → target → posterior → chains per sampler → estimates, diagnostics → artifacts."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import xarray as xr

from llc_bench import artifacts
from llc_bench.config import Config, to_dict, to_toml
from llc_bench.curvature import auto_step_grad_evals, build_algorithm, step_size_summary
from llc_bench.diagnostics import convergence, to_datatree
from llc_bench.discretization import curvature_probe_fn, step_bias_summary
from llc_bench.estimator import (
    block_bootstrap_ci,
    cross_check,
    cross_check_flag,
    estimate_from_result,
    estimate_series,
    resolve_source,
    running_at_draws,
    wnv,
)
from llc_bench.health import check_health, step_size_check_summary
from llc_bench.posterior import Posterior
from llc_bench.progress import progress_enabled
from llc_bench.report import attempt_line, print_report
from llc_bench.restart import agreement, run_restart
from llc_bench.rng import sampler_key, stream_key
from llc_bench.rules import NOT_CONVERGED_CODES, run_status, usable_chains
from llc_bench.runner import LiveChains, start_chains
from llc_bench.samplers import SAMPLER_NAMES, get_spec
from llc_bench.samplers.base import STEP_EPSILON
from llc_bench.target import build_target
from llc_bench.types import ChainResult, HealthFlag, LLCEstimate

# Each attempt of run.target_rel_se is logged (INFO) as it ends, for whoever listens: a long run that
# is stopped keeps what it said (scripts/bench_instance.py prints them).
_LOG = logging.getLogger(__name__)

@dataclass(frozen=True)
class SamplerRun:
    """Everything one sampler produced in one experiment."""

    name: str
    result: ChainResult
    estimate: LLCEstimate
    tree: object  # xarray.DataTree from diagnostics.to_datatree
    convergence: dict
    flags: tuple
    summary: dict
    positions: Any = None  # (C, d) numpy: every chain's position where it stopped (a restart can start from it)


def build_posterior(cfg: Config, target) -> Posterior:
    return Posterior.build(target.per_sample_loss, target.x, target.y, target.w_star,
                           beta0=cfg.posterior.beta0, gamma=cfg.posterior.gamma,
                           prior_radius=cfg.posterior.prior_radius)


def chain_devices(num_chains: int):
    """All local devices when there are several and they divide the chains evenly, else None (one device).

    Chains are independent, so sharding the chain axis changes no number (tested on forced CPU devices).
    """
    devices = jax.local_devices()
    return devices if len(devices) > 1 and num_chains % len(devices) == 0 else None


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def run_sampler(cfg: Config, name: str, posterior: Posterior, *, truth: float | None = None,
                progress: bool = False, settings=None, restart: bool = True, step_bias: bool = True) -> SamplerRun:
    """Sample one posterior with one sampler and turn the chains into an estimate with diagnostics.

    step_size = "auto": llc_bench.curvature.build_algorithm (ε at w*, re-measured where the chains
    are after burn-in; what it measured goes into the summary). With run.target_rel_se > 0
    the chains run on (at most run.max_doublings times) until SE(λ̂)/|λ̂| <= target_rel_se and the
    run is not `not_converged` (`_sample_to_target`); each time they draw on from where they stopped,
    so the final attempt is exactly one run of its length and costs no more.
    summary["target_rel_se"] records every attempt.

    With run.restart_scale > 0 (and `restart`), a run flagged still_spreading is restarted from
    farther out (llc_bench.restart); summary["restart_check"] records it (None when not run), its cost
    is not in the summary's grad_evals and seconds.

    With `step_bias` (the SGLD family) the step size's first-order bias of λ̂ is estimated at the end
    (llc_bench.discretization; summary "step_bias" and "llc_debiased", None otherwise): 8 Hessian- or
    covariance-vector products per chain, not in grad_evals; callers that only compare runs skip it.
    """
    spec = get_spec(name)
    settings = settings if settings is not None else cfg.sampler[name]
    algorithm = build_algorithm(spec, posterior, settings)
    run, steps = cfg.run, cfg.schedule[name]
    source = resolve_source(run.estimate_from, name)
    probing = step_bias and run.step_bias_draws and curvature_probe_fn(
        spec, settings, algorithm.position, stream_key(run.seed, "step_bias"))
    probe, probe_key = probing or (None, None)
    chains = start_chains(name, algorithm, posterior, sampler_key(run.seed, name), num_chains=run.num_chains,
                          num_burnin_steps=steps.num_burnin_steps, num_draws=steps.num_draws,
                          num_steps_bw_draws=steps.num_steps_bw_draws, num_projections=run.num_projections,
                          chunk_size=run.chunk_size, progress=progress, devices=chain_devices(run.num_chains),
                          full_draw_fn=probe, draw_data=probe_key)
    restarts = restart and run.restart_scale > 0
    result, chains, estimate, flags, target = _sample_to_target(chains, run, steps.num_steps_bw_draws, source,
                                                                leave_spreading=restarts)
    states = chains.states
    positions = np.asarray(jax.vmap(algorithm.position)(states))  # (C, d): where every chain stopped
    num_draws = result.draw_loss.shape[1]
    check = None
    if resolve_source("auto", name) == "minibatch":  # SG: the per-step and the full-data λ̂ check each other
        other = estimate_from_result(result, "full" if source == "minibatch" else "minibatch")
        check = cross_check(*((estimate, other) if source == "minibatch" else (other, estimate)))
        if cross_check_flag(check) is not None:
            flags.append(cross_check_flag(check))
    # The sampler's tuning as the draws used it: the restart below re-tunes the same algorithm.
    step, tuning_grad_evals = step_size_summary(settings, algorithm.notes), auto_step_grad_evals(algorithm.notes)
    restarted = None
    if restarts and estimate.status != "failed" and any(
            f.code == "still_spreading" for f in flags):
        restarted, flag = run_restart(
            name, algorithm, posterior, positions, estimate, seed=run.seed,
            scale=run.restart_scale,
            num_chains=run.num_chains, num_burnin_steps=result.num_burnin_steps, num_draws=num_draws,
            num_steps_bw_draws=steps.num_steps_bw_draws, num_projections=run.num_projections, source=source,
            chunk_size=run.chunk_size, params=chains.params,
            devices=chain_devices(run.num_chains), progress=progress)
        if flag is not None:
            flags.append(flag)
        elif restarted["agrees"] or restarted["walls_bind"]:
            flags = [f for f in flags if f.code != "still_spreading"]
    tree = to_datatree(result, running_at_draws(estimate, result, source))
    conv = convergence(tree)
    if estimate.status != "failed":
        flags.extend(_diagnostics_missing(conv, num_draws))
    checked = final_checks(spec, posterior, positions, step["step_size"], result.diverged_at, run.seed)
    flags.extend(flag for _, flag in checked.values() if flag is not None)
    bias = None
    if step_bias and estimate.status != "failed":
        bias = step_bias_summary(spec, posterior, settings, chains.params, states,
                                 positions, usable_chains(diverged_at=result.diverged_at),
                                 step["step_size"], stream_key(run.seed, "step_bias"), result=result)
    flags = tuple(flags)
    summary = _summarize(spec, result, estimate, conv, flags, truth, posterior,
                         extra_grad_evals=tuning_grad_evals, source=source)
    summary.update({key: value for key, (value, _) in checked.items()})
    summary["estimate_from"] = source
    summary["cross_check"] = check
    summary["restart_check"] = restarted
    summary.update(step)
    summary["target_rel_se"] = target
    summary["step_bias"] = None if bias is None else bias.record()
    summary["llc_debiased"] = None if bias is None or summary["llc_mean"] is None else summary["llc_mean"] - bias.applied
    return SamplerRun(name, result, estimate, tree, conv, flags, summary, positions=positions)


def _sample_to_target(chains: LiveChains, run, k: int, source: str, leave_spreading: bool = False):
    """(result, LiveChains, estimate, health flags, target record or None) of the chains as they are
    (run.target_rel_se = 0), or run on until SE(λ̂)/|λ̂| <= run.target_rel_se and the run is not
    `not_converged`, at most run.max_doublings times. Each time the chains draw on (LiveChains.extend):
    after a `not_converged` verdict the whole run doubles and its first half becomes burn-in (the draws
    so far were still drifting: more of them would not help), and the sampler's tuning is redone where
    the chains now are (Algorithm.retune: step_size = "auto" re-measures ε, and curvature_sgld its
    preconditioner, as at the end of the first burn-in), because the chains have moved since it was
    measured; otherwise the draws after burn-in double with the tuning unchanged.

    `still_spreading` is settled by the doubling itself: when the λ̂ of the draws after a whole-run
    doubling agrees with the λ̂ of the draws before it (llc_bench.restart.agreement, disjoint stretches
    of the chains, the second twice as far from w*), the spreading has not moved λ̂ and the flag is
    withdrawn; a plateau that the chains are leaving reads higher the second time. The attempt
    records `agrees_with_previous` (None when there is nothing to compare or it cannot tell).

    leave_spreading (the over-dispersed restart will run): `still_spreading` as the only not-converged
    code does not count here; the restart after the loop settles it.
    """
    burnin, attempts, before = chains.result.num_burnin_steps, [], None
    unsettling = set(NOT_CONVERGED_CODES) - ({"still_spreading"} if leave_spreading else set())
    while True:
        result = chains.result.burned_in_to(burnin)
        estimate = estimate_from_result(result, source)
        flags = check_health(result, estimate_from=source)
        if run.target_rel_se <= 0:
            return result, chains, estimate, flags, None
        agrees = None if before is None else agreement(before.mean, before.se, estimate.mean, estimate.se)
        if agrees:
            flags = [f for f in flags if f.code != "still_spreading"]
        rel_se = abs(estimate.se / estimate.mean) if estimate.mean else math.inf
        status = run_status(estimate.status, flags)
        unsettled = {f.code for f in flags} & unsettling
        reached = bool(rel_se <= run.target_rel_se) and not unsettled
        total = result.loss_trace.shape[1]
        attempts.append({"num_draws": result.draw_loss.shape[1], "num_burnin_steps": burnin, "steps": total,
                         "llc_mean": _finite(estimate.mean), "rel_se": _finite(rel_se), "status": status,
                         "grad_evals": float(np.sum(result.grad_evals)), "tuned": result.tuned,
                         "agrees_with_previous": agrees})
        _LOG.info("attempt %d: %s", len(attempts), attempt_line(attempts[-1]))
        if reached or status in ("failed", "diverged") or len(attempts) > run.max_doublings:
            return result, chains, estimate, flags, {
                "target": run.target_rel_se, "reached": reached, "num_draws": attempts[-1]["num_draws"],
                "num_burnin_steps": burnin, "steps": total, "attempts": attempts}
        more = total if unsettled else total - burnin
        if unsettled:
            burnin, before = total, estimate
        chains = chains.extend(chains.num_draws + math.ceil(more / k), retune=bool(unsettled))


def _diagnostics_missing(conv: dict, num_draws: int) -> list:
    """A run too short for ESS / R̂ has no evidence of mixing: say so instead of reporting "ok"."""
    stats = conv["L_n"]
    missing = [name for name, key, needed in (("ESS", "ess_bulk", True),
                                              ("R̂", "rhat", len(conv["chains_used"]) >= 2))
               if needed and not math.isfinite(float(stats[key]))]
    if not missing:
        return []
    return [HealthFlag("too_few_draws",
                       f"{' and '.join(missing)} could not be computed from {num_draws} draw(s) per chain, "
                       "so nothing shows the chains mixed (and the interval has no spread to measure).",
                       "Increase run.num_draws (at least a few dozen draws per chain).")]


def check_keys() -> dict:
    """Every registered sampler's FinalCheck summary keys, as None: all summaries share one schema."""
    return {check.summary_key: None for name in SAMPLER_NAMES for check in get_spec(name).checks}


def final_checks(spec, posterior: Posterior, positions, step_size, diverged_at, seed: int) -> dict:
    """summary key -> (value, HealthFlag or None) of each FinalCheck the sampler declares (spec.checks),
    run at the live chains' final positions (of all chains: positions (C, d)); a key is (None, None)
    when no chain is live."""
    out = {key: (None, None) for key in check_keys()}
    if not spec.checks:
        return out
    positions = np.asarray(positions)[usable_chains(diverged_at=diverged_at)]
    for check in spec.checks:
        if positions.shape[0]:
            out[check.summary_key] = check.run(posterior, positions, step_size, stream_key(seed, "projection"))
    return out


def _summarize(spec, result: ChainResult, est: LLCEstimate, conv: dict, flags, truth, posterior,
               extra_grad_evals: float = 0.0, source: str = "full") -> dict:
    grad_evals = float(np.sum(result.grad_evals)) + extra_grad_evals
    wall = result.wall_s + result.warmup_s
    wnv_time, wnv_grad = wnv(est.se, wall, grad_evals)
    status = run_status(est.status, flags)
    ok = usable_chains(diverged_at=result.diverged_at)
    accept = _finite(np.nanmean(result.accept[ok])) if spec.metropolis and ok.any() else None
    energy = result.energy_change[ok][:, result.num_burnin_steps:] if ok.any() else np.empty((0, 0))
    energy_stats = None
    if energy.size and np.isfinite(energy).any():
        energy_stats = {"mean": _finite(np.nanmean(energy)), "std": _finite(np.nanstd(energy)),
                        "mean_sq_per_dim": _finite(np.nanmean(energy**2) / posterior.dim)}
    ci = (None, None)
    if est.status != "failed":
        # the estimator's own chain exclusion, so the interval uses exactly the chains λ̂ used
        ci = block_bootstrap_ci(estimate_series(result, source), result.loss_at_wstar, result.n_beta,
                                block_len=_step_block_len(result) if source == "minibatch" else None,
                                diverged_at=result.diverged_at)
    rel = None
    if truth is not None and est.status != "failed":
        rel = (est.mean - truth) / truth if truth != 0 else None
    return {
        "llc_mean": _finite(est.mean),
        "llc_se": _finite(est.se),
        "llc_ci95": [_finite(c) if c is not None else None for c in ci],
        "llc_per_chain": [_finite(v) for v in est.per_chain],
        "rel_error": _finite(rel) if rel is not None else None,
        "ess_bulk": _finite(conv["L_n"]["ess_bulk"]),
        "ess_tail": _finite(conv["L_n"]["ess_tail"]),
        "rhat": _finite(conv["L_n"]["rhat"]),
        "mcse_loss": _finite(conv["L_n"]["mcse_mean"]),
        "accept_rate": accept,
        "energy_change": energy_stats,
        "grad_evals": grad_evals,
        "wall_s": wall,
        "compile_s": result.compile_s,
        "wnv_time": _finite(wnv_time),
        "wnv_grad": _finite(wnv_grad),
        "status": status,
        "warnings": [f"{f.code}: {f.message} Remedy: {f.remedy}" for f in flags],
        "chains_used": int(est.num_chains_used),
        "chains_excluded": [int(c) for c in est.excluded],
        "diverged_at": [int(s) for s in result.diverged_at],
        "tuned": result.tuned,
    }


def _step_block_len(result: ChainResult) -> int | None:
    """Bootstrap blocks of the per-step series spanning the steps the draws' blocks span (spacing ×
    ⌈D^(1/3)⌉): the cube-root rule on T per-step values would cut blocks far shorter than the
    autocorrelation of an SG chain (on the default experiment: 11 steps, a 95% interval ≈ 10× narrower than ±2 SE)."""
    steps = np.asarray(result.draw_steps)
    if steps.size < 2:
        return None
    return int(steps[1] - steps[0]) * math.ceil(steps.size ** (1 / 3) - 1e-9)


def step_size_check(cfg: Config, name: str, posterior: Posterior, first: SamplerRun) -> dict | None:
    """Rerun at ε/2: R̂ cannot see a bias that all chains share, a change in λ̂ can."""
    settings = cfg.sampler[name]
    if get_spec(name).step_size != STEP_EPSILON:
        return None  # step size is tuned by the sampler itself
    settings = dataclasses.replace(settings, step_size=first.summary["step_size"])  # "auto" as resolved
    half = dataclasses.replace(settings, step_size=settings.step_size / 2)
    second = run_sampler(cfg, name, posterior, settings=half, restart=False, step_bias=False)
    return step_size_check_summary(first.estimate.mean, second.estimate.mean,
                                   se_eps=first.estimate.se, se_half=second.estimate.se)


def run_experiment(cfg: Config, out_dir: str | Path | None = None, *, progress: bool = True,
                   check_step_size: bool = False, write: bool = True, plots: bool = True,
                   console=None) -> dict:
    """Run every sampler of `cfg`, print the report, write artifacts; returns the summary dict."""
    progress = progress_enabled(progress)
    config_dict = to_dict(cfg)
    rid = artifacts.run_id(config_dict)
    out = None
    if write:
        out = Path(out_dir) if out_dir else Path(cfg.run.out_dir) / rid
        _start_run_dir(out, cfg)
    target = build_target(cfg, progress=progress)
    posterior = build_posterior(cfg, target)
    runs: dict[str, SamplerRun] = {}
    erm_failure = unusable_wstar(target, posterior)
    for name in cfg.run.samplers if erm_failure is None else ():
        runs[name] = run_sampler(cfg, name, posterior, truth=target.truth, progress=progress)
        if check_step_size:
            runs[name].summary["step_size_check"] = step_size_check(cfg, name, posterior, runs[name])
    sampler_summaries = ({name: r.summary for name, r in runs.items()} if erm_failure is None
                         else {name: failed_summary(erm_failure) for name in cfg.run.samplers})

    train = target.train_report
    summary = {
        "run_id": rid,
        "seed": cfg.run.seed,
        "n": posterior.n,
        "n_beta": posterior.n_beta,
        "gamma": posterior.gamma,
        "d": posterior.dim,
        "loss_at_wstar": posterior.loss_at_wstar,
        "truth": target.truth,
        "widths": list(target.widths),
        "teacher_rank": target.teacher_rank,
        "teacher_generator": target.generator,
        "train": dataclasses.asdict(train) if train is not None else None,
        "versions": artifacts.versions(),
        "samplers": sampler_summaries,
    }
    if out is not None:
        _write_artifacts(out, summary, runs, target.truth, plots)
    print_report(summary, out, console=console)
    return summary


def unusable_wstar(target, posterior: Posterior) -> str | None:
    """Why w* cannot anchor a local posterior (ERM diverged: non-finite weights, loss or gradient), or None."""
    train = target.train_report
    problems = []
    if not np.all(np.isfinite(np.asarray(target.w_star))):
        problems.append("w* has non-finite weights")
    if not math.isfinite(posterior.loss_at_wstar):
        problems.append(f"L_n(w*) = {posterior.loss_at_wstar}")
    if train is not None and not math.isfinite(train.grad_norm):
        problems.append(f"‖∇L_n(w*)‖ = {train.grad_norm} (L_n(w*) = {train.final_loss:.4g})")
    if not problems:
        return None
    cause = "ERM diverged" if train is not None else "the teacher's parameters are not a usable w*"
    remedy = " Lower train.learning_rate." if train is not None else ""
    return f"{cause}: {'; '.join(problems)}; no LLC estimate.{remedy}"


def failed_summary(error: str) -> dict:
    """The summary of a sampler that was not run because the problem itself is unusable."""
    return {
        "llc_mean": None, "llc_se": None, "llc_ci95": [None, None], "llc_per_chain": [], "rel_error": None,
        "ess_bulk": None, "ess_tail": None, "rhat": None, "mcse_loss": None, "accept_rate": None,
        "energy_change": None, "grad_evals": 0.0, "wall_s": 0.0, "compile_s": 0.0, "wnv_time": None,
        "wnv_grad": None, "status": "failed", "warnings": [], "error": error, "chains_used": 0,
        "chains_excluded": [], "diverged_at": [], "tuned": {}, **check_keys(),
        "estimate_from": None, "cross_check": None, "step_bias": None, "llc_debiased": None,
    }


def _start_run_dir(out: Path, cfg: Config) -> None:
    """Make `out` describe this run only, before any work: remove an earlier run's artifacts
    (summary.json first: its presence means "finished"), then write this run's config.toml."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    shutil.rmtree(out / "traces.zarr", ignore_errors=True)
    plots = out / "plots"
    if plots.is_dir():
        for png in plots.glob("*.png"):
            png.unlink()
        for hidden in plots.glob(".*.png"):  # a plot cut off before its rename
            hidden.unlink()
        if not any(plots.iterdir()):
            plots.rmdir()
    artifacts.write_text_atomic(out / "config.toml", to_toml(cfg))


def _write_artifacts(out: Path, summary: dict, runs: dict, truth, plots: bool) -> None:
    # deferred: matplotlib, which only runs that write plots need
    from llc_bench.plots import plot_all

    if runs:
        tree = xr.DataTree.from_dict({f"/{name}": r.tree for name, r in runs.items()})
        tree.attrs.update(artifacts.jsonable({k: v for k, v in summary.items()
                                              if k not in ("samplers", "versions", "train")}))
        artifacts.write_datatree_atomic(tree, out / "traces.zarr")
    if plots:
        for r in runs.values():
            plot_all(r.result, out / "plots", truth=truth,
                     llc_running=running_at_draws(r.estimate, r.result, r.summary["estimate_from"]))
    # summary.json last: its presence means the run finished
    artifacts.write_json_atomic(out / "summary.json", summary)
