"""DLN scoreboard: a seeded suite of deep linear networks, every sampler at one fixed recipe, scored only where the analytic λ is right at the n used.

Protocol (Lau et al., AISTATS 2025, App. E.2; Hitchcock & Hoogland 2025): size classes by
parameter count; an instance draws its depth and widths from its class's ranges until the count
lies in the class's range, then a rank-r teacher from one of the generators (`chained`,
`rand_rank`, `deepest`; llc_bench.models.dln_teacher_layers); x ~ U[-10, 10], noise-free targets,
w* = the teacher, γ = 1, nβ = n / log n.

Truth. Each instance carries Aoyagi's (global) λ and a well-posedness record computed from the
teacher's float64 layers and the data (llc_bench.wellposed): end-to-end singular values, the
effective rank r_eff of the directions visible at this nβ, λ(r_eff), and the lower bound rank(H)/2
of the local λ. A row is scored (column `truth`) only when the instance is well-posed: every
direction visible and every layer of rank r, so that the local λ is Aoyagi's. The other rows keep
`truth` empty and go to a second table that shows the three candidate values side by side.

The recipe (configs/bench_dln.toml) fixes every sampler's settings once: nothing is tuned per
instance beyond what a sampler adapts by itself (HMC window adaptation, the MCLMC tuners). The
suite and the recipe are llc_bench.bench_suite; the summary and figures llc_bench.bench_report.

Two exact evaluation shortcuts keep the CPU run inside its budget; both compute the same L_n:

- The DLN loss multiplies the layer kernels into the end-to-end matrix M(w) first and then
  computes ½‖x M(w) − y‖² (cheaper than pushing n rows through every layer when n > H_in).
- Full-batch samplers (those whose SamplerSpec.minibatch is False) see the data through its sufficient
  statistics: with Σ = XᵀX/n = L Lᵀ and C = XᵀY/n, the H_in rows X_c = √H_in Lᵀ and
  Y_c = √H_in L⁻¹ C give (1/H_in) Σ_i ½‖y_ci − x_ci M‖² = L_n(M) + const for every M, so their
  log-density equals the n-sample one while a gradient costs O(H_in · d) instead of O(n · H_in · H_out).
  Their seconds are therefore seconds of that reduced evaluation (column `data_rows` says which);
  gradient evaluations (full-data equivalents) are the hardware-independent cost.
  SG samplers draw their minibatches from the n real samples.

Finite-n audit (`--audit`): the recipe's audit sampler (full batch) reruns every instance with
`audit_factor` × n samples (through the sufficient statistics, so at the same cost) and flags the
instances whose λ̂ moves by more than `audit_threshold`; finite_n_audit.csv holds the result.
The recipe's [audit.sampler] and [audit.run] tables override the audit sampler's settings there:
at k × n the posterior is narrower along the regular directions than along the singular ones, so
the same trajectory covers less of it and the audit needs a longer run than the scoreboard's.

CSV: one row per (instance, sampler), appended with fsync (under a lock, llc_bench.jobs.store) as
soon as its instance is done; rerunning skips the rows already present (a torn last line is cut
away). Each row records the hash of its sampler's recipe (the shared settings and that sampler's
tables): after a sampler's settings change, its rows are refused until `--rerun-stale` moves them
to dln_scoreboard.stale.csv to be computed again, while the other samplers' rows stay.

Inside an instance, the chains are saved chunk by chunk under checkpoints/ beside the CSV
(llc_bench.checkpoint): a job killed midway, even after hours, resumes at its last saved chunk on
the next `bench` and ends with the row the uninterrupted job would have written. Jobs run in
`job_order`: those with saved chunks first, then the smallest instances. Where each row's chains
stopped is kept under final_chains/ (one .npy per row, `final_chains_path`): a check that starts
them again, such as the over-dispersed restart of scripts/restart_check.py, needs no rerun.

Parallelism (llc_bench.jobs.executor, as for sweeps): each instance is one job, run in this
process, in `--workers N` local processes, or as a Ray task (`--backend ray`); only the driver
writes the CSVs, and the rows do not depend on where they were computed.
"""

from __future__ import annotations

import io
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from llc_bench import artifacts
from llc_bench.bench_report import (
    ADDED_COLUMNS,
    AUDIT_COLUMNS,
    AUDIT_CSV_NAME,
    COLUMNS,
    CSV_NAME,
    read_scoreboard,
    write_report,
)
from llc_bench.bench_suite import (
    Instance,
    Recipe,
    full_batch,
    instance_config,
    load_recipe,
    make_suite,
)
from llc_bench.checkpoint import checkpoints, saved_progress
from llc_bench.config import Config
from llc_bench.experiment import run_sampler
from llc_bench.jobs.executor import check_options, run_jobs
from llc_bench.jobs.store import ResultsStore
from llc_bench.models import kernels
from llc_bench.posterior import Posterior
from llc_bench.progress import progress_enabled
from llc_bench.restart import restart_outcome
from llc_bench.target import build_target, dln_teacher_layers64
from llc_bench.truth import dln_num_parameters
from llc_bench.types import ConfigError
from llc_bench.wellposed import DEFAULT_MARGIN, WellPosedness, assess

CHECKPOINTS = "checkpoints"  # folder beside the CSV for the chains of unfinished jobs
FINAL_CHAINS = "final_chains"  # folder beside the CSV for where each row's chains stopped

# ---------------------------------------------------------------------------------------------
# Posteriors


def dln_per_sample_loss(unravel, widths: tuple[int, ...]):
    """½‖x M(w) − y‖² per row with M(w) = W_1 ⋯ W_L formed first (noise-free DLN NLL, σ = 1).

    Forming M(w) costs about H_in · d multiply-adds; it replaces m · d when pushing m rows through
    the layers, so it is used when that is cheaper (decided at trace time from the static shapes).
    """
    d = dln_num_parameters(widths)
    first = widths[0] * widths[1]

    def per_sample_loss(w, x, y):
        ws = kernels(unravel(w))
        m = x.shape[0]
        if widths[0] * (d - first) + m * widths[0] * widths[-1] < m * d:
            product = ws[0]
            for k in ws[1:]:
                product = product @ k
            pred = x @ product
        else:
            pred = x
            for k in ws:
                pred = pred @ k
        return 0.5 * ((y - pred) ** 2).sum(-1)

    return per_sample_loss


def sufficient_statistic_data(x, y) -> tuple[np.ndarray, np.ndarray]:
    """(X_c, Y_c) with H_in rows: mean_i ½‖y_ci − x_ci M‖² = mean over the n samples + a constant, for every M.

    Σ = XᵀX/n = L Lᵀ (Cholesky), C = XᵀY/n; X_c = √k Lᵀ, Y_c = √k L⁻¹ C with k = H_in rows, so
    X_cᵀX_c/k = Σ and X_cᵀY_c/k = C: the quadratic and linear terms in M agree exactly.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, k = x.shape
    chol = np.linalg.cholesky(x.T @ x / n)
    cross = x.T @ y / n
    x_c = math.sqrt(k) * chol.T
    y_c = math.sqrt(k) * np.linalg.solve(chol, cross)
    return x_c.astype(np.float32), y_c.astype(np.float32)


def build_posteriors(cfg: Config, target, full_batch_data: str = "sufficient_statistic"):
    """(posterior on the n samples, posterior for full-batch samplers): same nβ, γ and w*."""
    p = cfg.posterior
    loss = dln_per_sample_loss(target.unravel, target.widths)
    data_post = Posterior.build(loss, target.x, target.y, target.w_star, beta0=p.beta0, gamma=p.gamma,
                                prior_radius=p.prior_radius)
    if full_batch_data == "data":
        return data_post, data_post
    if cfg.data.noise != "none":
        raise ConfigError("bench.full_batch_data = 'sufficient_statistic' needs data.noise = 'none' "
                          "(the NLL must be ½‖r‖²)")
    x_c, y_c = sufficient_statistic_data(target.x, target.y)
    x_c, y_c = jnp.asarray(x_c), jnp.asarray(y_c)
    loss0 = float(jnp.mean(loss(target.w_star, x_c, y_c)))
    reduced = Posterior(loss, x_c, y_c, target.w_star, data_post.n_beta, data_post.gamma, loss0)
    return data_post, reduced


# ---------------------------------------------------------------------------------------------
# Running the suite


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def well_posedness(cfg: Config, target, n_beta: float, margin: float = DEFAULT_MARGIN) -> WellPosedness:
    """The record of a DLN target: its teacher's float64 layers, Σ_x = XᵀX/n of its own data."""
    x = np.asarray(target.x, np.float64)
    return assess(dln_teacher_layers64(cfg), n_beta, x.T @ x / x.shape[0], margin)


def _record_fields(wp: WellPosedness | None) -> dict[str, Any]:
    if wp is None:
        return {}
    return {"well_posed": "yes" if wp.well_posed else "no", "truth": wp.truth, "aoyagi": wp.aoyagi,
            "lambda_r_eff": wp.lambda_r_eff, "local_lower": wp.local_lower, "r_eff": wp.r_eff,
            "sv_min": wp.sv_min, "sv_max": wp.sv_max, "layer_ranks": "-".join(map(str, wp.layer_ranks)),
            "posedness": wp.reason or "well-posed"}


def result_row(inst: Instance, sampler: str, summary: dict, *, n_beta: float, data_rows: int,
               recipe_hash: str, record: WellPosedness | None = None) -> dict[str, str]:
    """One CSV row from run_sampler's summary dict (rel_error is against `truth`, empty when unknown)."""
    codes = sorted({w.split(":", 1)[0] for w in summary.get("warnings", [])})
    restart = summary.get("restart_check") or {}
    row = {
        "instance": inst.name, "class": inst.size_class, "widths": "-".join(map(str, inst.widths)),
        "rank": inst.rank, "generator": inst.generator, "truth": None, "sampler": sampler,
        "llc_mean": summary.get("llc_mean"), "llc_se": summary.get("llc_se"),
        "rel_error": summary.get("rel_error"), "grad_evals": summary.get("grad_evals"),
        "wall_s": summary.get("wall_s"), "wnv_time": summary.get("wnv_time"),
        "wnv_grad": summary.get("wnv_grad"), "status": summary.get("status", "failed"),
        "aoyagi": inst.aoyagi, **_record_fields(record),
        "d": inst.d, "n": inst.n, "n_beta": n_beta, "compile_s": summary.get("compile_s"),
        "chains_used": summary.get("chains_used"), "data_rows": data_rows,
        "warnings": ";".join(codes), "recipe": recipe_hash,
        "restart_llc": restart.get("llc_restart"), "restart_se": restart.get("se_restart"),
        "restart_outcome": restart_outcome(summary.get("restart_check")), "restart_scale": restart.get("scale"),
        "step_bias": (summary.get("step_bias") or {}).get("applied"), "llc_debiased": summary.get("llc_debiased"),
    }
    return {k: _fmt(row.get(k)) for k in COLUMNS}


def failed_row(inst: Instance, sampler: str, message: str, recipe_hash: str,
               record: WellPosedness | None = None) -> dict[str, str]:
    row = result_row(inst, sampler, {"status": "failed"}, n_beta=math.nan, data_rows=0, recipe_hash=recipe_hash,
                     record=record)
    row["warnings"] = "error: " + " ".join(message.split())[:300]
    return row

class Scoreboard:
    """A scoreboard CSV (llc_bench.jobs.store; rows keyed by instance and sampler). Each row records
    the hash of the recipe of its sampler (`hashes`); rows of a sampler whose recipe changed since are
    stale: refused, or with `rerun_stale` moved to <name>.stale.csv so that they are computed again."""

    def __init__(self, path: Path, hashes: dict[str, str], columns: tuple[str, ...] = COLUMNS,
                 rerun_stale: bool = False, log=print):
        self.store = ResultsStore(path, columns, key=("instance", "sampler"),
                                  added_columns=ADDED_COLUMNS if columns == COLUMNS else (),
                                  foreign="written by another version of the benchmark?")
        self.path = self.store.path
        self.hashes = hashes

        def is_stale(r: dict) -> bool:
            return r["sampler"] in hashes and r["recipe"] != hashes[r["sampler"]]

        stale = [r for r in self.store.read() if is_stale(r)]
        if stale and not rerun_stale:
            names = ", ".join(dict.fromkeys(r["sampler"] for r in stale))
            raise ConfigError(f"{self.path}: holds {len(stale)} rows of another recipe for {names}; pass "
                              "--rerun-stale to compute them again (the old rows move to "
                              f"{self.store.stale_path.name}), or use another --out")
        if stale:
            self.store.move_aside(is_stale)
            log(f"--rerun-stale: {len(stale)} rows of another recipe moved to {self.store.stale_path}")
        self.done = {self.store.row_key(r) for r in self.store.read()}

    def append(self, rows: list[dict[str, str]]) -> None:
        self.store.append(rows)
        self.done.update(self.store.row_key(r) for r in rows)


def build_instance(recipe: Recipe, inst: Instance, sampler: str, n: int | None = None, cfg: Config | None = None):
    """(config, target, posterior on the n samples, posterior for full-batch samplers, record);
    `cfg`: the instance_config of (inst, sampler, n) when the caller already has it."""
    cfg = cfg if cfg is not None else instance_config(recipe, inst, sampler, n)
    target = build_target(cfg)
    if target.truth is None or abs(target.truth - inst.aoyagi) > 1e-9 * max(1.0, inst.aoyagi):
        raise RuntimeError(f"target truth {target.truth} differs from the instance's {inst.aoyagi}")
    data_post, reduced_post = build_posteriors(cfg, target, recipe.full_batch_data)
    record = well_posedness(cfg, target, data_post.n_beta, recipe.visibility_margin)
    return cfg, target, data_post, reduced_post, record


def checkpoint_folder(root: str | Path, inst: Instance, sampler: str, recipe: Recipe) -> Path:
    """Where the chains of (inst, sampler) under `recipe` are saved while they run."""
    return Path(root) / f"{inst.name}-{sampler}-{recipe.fingerprint(sampler)}"


def final_chains_path(root: str | Path, inst: Instance, sampler: str, recipe: Recipe) -> Path:
    """Where a row's final chain positions are kept: a (chains, d) .npy named like its checkpoint folder."""
    return Path(root) / f"{checkpoint_folder(root, inst, sampler, recipe).name}.npy"


def instance_rows(recipe: Recipe, inst: Instance, samplers: list[str], progress: bool = False,
                  checkpoint_dir: str | Path | None = None,
                  chains_dir: str | Path | None = None) -> tuple[list[dict[str, str]], list[str]]:
    """(CSV rows, log lines) of `samplers` on one instance, its target built once. Never raises: a
    failure is a `failed` row. One job of the executor (in this process, a worker or a Ray task).

    checkpoint_dir: each sampler's chains are saved there chunk by chunk as they run
    (llc_bench.checkpoint), in a folder named by instance, sampler and recipe fingerprint, so a job
    killed midway resumes where it stopped, with the same result; the folder is removed once its row
    is made. chains_dir: each row's chains, where they stopped, are kept there (final_chains_path),
    written before the row, so that a check that restarts them (scripts/restart_check.py --chains)
    needs no rerun."""
    try:
        cfgs = {name: instance_config(recipe, inst, name) for name in samplers}
        _, _, data_post, reduced_post, record = build_instance(recipe, inst, samplers[0], cfg=cfgs[samplers[0]])
    except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the benchmark
        return ([failed_row(inst, name, f"{type(exc).__name__}: {exc}", recipe.fingerprint(name)) for name in samplers],
                [f"  {inst.name} {name}: FAILED building the instance: {exc}" for name in samplers])
    rows, lines = [], [
        f"  {inst.name}: σ(M*) in [{record.sv_min:.3g}, {record.sv_max:.3g}], r_eff {record.r_eff}/{record.rank}, "
        f"rank(H)/2 = {record.local_lower:g}, λ = {record.aoyagi:g}: "
        + ("well-posed" if record.well_posed else record.reason)]
    for name in samplers:
        post = reduced_post if full_batch(name) else data_post
        start = time.perf_counter()
        folder = None if checkpoint_dir is None else checkpoint_folder(checkpoint_dir, inst, name, recipe)
        with checkpoints(folder, clear_when_done=True) as store:
            try:
                run = run_sampler(cfgs[name], name, post, truth=record.truth, progress=progress)
                row = result_row(inst, name, run.summary, n_beta=post.n_beta, data_rows=post.n,
                                 recipe_hash=recipe.fingerprint(name), record=record)
                if chains_dir is not None:
                    Path(chains_dir).mkdir(parents=True, exist_ok=True)
                    buffer = io.BytesIO()
                    np.save(buffer, np.asarray(run.positions))
                    artifacts.write_bytes_atomic(final_chains_path(chains_dir, inst, name, recipe), buffer.getvalue())
            except Exception as exc:  # noqa: BLE001
                row = failed_row(inst, name, f"{type(exc).__name__}: {exc}", recipe.fingerprint(name), record)
        if store is not None:
            lines.extend(f"  {inst.name} {name}: resumed, {event}" for event in store.reused)
        rows.append(row)
        rel = row["rel_error"]
        rel_text = f"{float(rel):+.1%}" if rel else "n/a"
        lines.append(f"  {inst.name:8s} {name:15s} λ̂={row['llc_mean'] or 'n/a':>9s} λ={inst.aoyagi:8.1f} "
                     f"rel={rel_text:>7s} {row['status']:8s} {time.perf_counter() - start:6.1f}s {row['warnings']}")
    return rows, lines


def _suite_and_todo(recipe: Recipe, board: Scoreboard, samplers) -> tuple[list[Instance], list]:
    suite = make_suite(recipe.classes, recipe.suite_seed, recipe.generators, recipe.size_classes)
    todo = [(inst, [s for s in samplers if (inst.name, s) not in board.done]) for inst in suite]
    return suite, [(inst, names) for inst, names in todo if names]


def _run_logged(fn: Callable, jobs: list[tuple], board: Scoreboard, describe: Callable[[Instance], str],
                log, **execution) -> None:
    """Run the jobs (instance second in each) through the executor; the driver appends each job's rows
    to `board` as it completes and logs its lines."""
    start, count = time.perf_counter(), 0

    def done(job: tuple, result: tuple[list[dict], list[str]]) -> None:
        nonlocal count
        rows, lines = result
        board.append(rows)
        count += 1
        log(f"[{count}/{len(jobs)}] {describe(job[1])}  ({time.perf_counter() - start:.0f}s elapsed)")
        for line in lines:
            log(line)

    run_jobs(fn, jobs, done, **execution)


def job_order(todo: list[tuple[Instance, list[str]]], resuming: set[str]) -> list[tuple[Instance, list[str]]]:
    """The order bench runs its jobs in: instances with saved chunks first (work already paid for
    becomes a row soonest), then the smallest d first, so that a bench stopped partway has written
    the many quick rows rather than sat in one instance that takes hours."""
    return sorted(todo, key=lambda job: (job[0].name not in resuming, job[0].d))


def run_bench(recipe: Recipe, out_dir: str | Path, progress: bool = False, log=print, figures: bool = True,
              audit: bool = False, rerun_stale: bool = False, workers: int = 1, backend: str = "local",
              address: str | None = None) -> Path:
    """Run every (instance, sampler) row not yet in the CSV (and, with `audit`, every audit row),
    then write the summary and figures. workers / backend / address: see llc_bench.jobs.executor."""
    check_options(workers, backend, address)
    execution = {"workers": workers, "backend": backend, "address": address}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    board = Scoreboard(out / CSV_NAME, recipe.fingerprints(), rerun_stale=rerun_stale, log=log)
    suite, todo = _suite_and_todo(recipe, board, recipe.samplers)
    total_rows = len(suite) * len(recipe.samplers)
    log(f"bench {recipe.name}: {len(suite)} instances x {len(recipe.samplers)} samplers = {total_rows} rows "
        f"({total_rows - sum(len(n) for _, n in todo)} already in {board.path}); recipe {recipe.fingerprint()}"
        + (f"; {workers} workers" if backend == "local" and workers > 1 else "") + ("; on Ray" if backend == "ray" else ""))
    start = time.perf_counter()

    def describe(inst: Instance) -> str:
        return (f"{inst.name} widths {'-'.join(map(str, inst.widths))} rank {inst.rank} {inst.generator} "
                f"d={inst.d} λ={inst.aoyagi:g}")

    resuming = set()
    for inst, names in todo:
        for name in names:
            saved = saved_progress(checkpoint_folder(out / CHECKPOINTS, inst, name, recipe))
            if saved is not None:
                resuming.add(inst.name)
                log(f"  {inst.name} {name}: resumes from its checkpoints ({saved})")
    todo = job_order(todo, resuming)
    jobs = [(recipe, inst, names, progress, out / CHECKPOINTS, out / FINAL_CHAINS) for inst, names in todo]
    _run_logged(instance_rows, jobs, board, describe, log, **execution)
    log(f"sampling done in {time.perf_counter() - start:.0f}s")
    if audit:
        run_audit(recipe, out, progress=progress, log=log, rerun_stale=rerun_stale, **execution)
    write_report(recipe, out, figures=figures, log=log)
    return board.path


# ---------------------------------------------------------------------------------------------
# Finite-n audit


def audit_rows(recipe: Recipe, inst: Instance, ref: dict[str, Any],
               progress: bool = False) -> tuple[list[dict[str, str]], list[str]]:
    """([the audit row], [its log line]) of one instance: the audit sampler rerun at audit_factor × n,
    against `ref`, its scoreboard row at n. Never raises. One job of the executor."""
    name = recipe.audit_sampler
    start = time.perf_counter()
    row = {"instance": inst.name, "class": inst.size_class, "sampler": name, "well_posed": ref["well_posed"],
           "aoyagi": inst.aoyagi, "n": inst.n, "llc_n": ref["llc_mean"], "llc_se_n": ref["llc_se"],
           "n_audit": inst.n * recipe.audit_factor, "recipe": recipe.audit_fingerprint()}
    try:
        cfg, _, _, reduced_post, _ = build_instance(recipe.audit_recipe(), inst, name, inst.n * recipe.audit_factor)
        summary = run_sampler(cfg, name, reduced_post, progress=progress).summary
        llc, status = summary.get("llc_mean"), summary.get("status", "failed")
        row.update(llc_audit=llc, llc_se_audit=summary.get("llc_se"), status_audit=status)
    except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the audit
        llc, status = None, "failed"
        row.update(status_audit=f"failed: {' '.join(str(exc).split())[:200]}")
    ok = llc is not None and math.isfinite(ref["llc_mean"]) and ref["llc_mean"] != 0
    shift = llc / ref["llc_mean"] - 1 if ok else None
    row.update(shift=shift, flagged="yes" if shift is None or abs(shift) > recipe.audit_threshold else "no")
    line = (f"  audit {inst.name:16s} λ̂(n)={ref['llc_mean']:.4g} λ̂({recipe.audit_factor}n)="
            f"{'n/a' if llc is None else f'{llc:.4g}'} shift={'n/a' if shift is None else f'{shift:+.1%}'} "
            f"{status} {time.perf_counter() - start:.1f}s")
    return [{k: _fmt(row.get(k)) for k in AUDIT_COLUMNS}], [line]


def run_audit(recipe: Recipe, out: Path, progress: bool = False, log=print, rerun_stale: bool = False,
              workers: int = 1, backend: str = "local", address: str | None = None) -> Path:
    """Rerun the audit sampler at audit_factor × n on every instance whose row at n exists; one
    row each in finite_n_audit.csv (resumable), flagged when |λ̂(kn)/λ̂(n) − 1| > audit_threshold."""
    name = recipe.audit_sampler
    base = {r["instance"]: r for r in read_scoreboard(out / CSV_NAME) if r["sampler"] == name}
    board = Scoreboard(out / AUDIT_CSV_NAME, {name: recipe.audit_fingerprint()}, AUDIT_COLUMNS,
                       rerun_stale=rerun_stale, log=log)
    suite, todo = _suite_and_todo(recipe, board, [name])
    todo = [inst for inst, _ in todo if inst.name in base]
    log(f"finite-n audit: {name} at {recipe.audit_factor} x n on {len(todo)} instances "
        f"({len(suite) - len(todo)} done or without a row at n)")
    jobs = [(recipe, inst, base[inst.name], progress) for inst in todo]
    _run_logged(audit_rows, jobs, board, lambda inst: f"audit {inst.name}", log,
                workers=workers, backend=backend, address=address)
    return board.path


# ---------------------------------------------------------------------------------------------
# Entry point


def main(args) -> int:
    """`main.py bench [--spec FILE] [--profile NAME] [--out DIR] [--instances N] [--audit]
    [--rerun-stale] [--summary-only] [--workers N] [--backend local|ray] [--address ADDR] [--no-progress]`."""
    check_options(args.workers, args.backend, args.address)
    recipe = load_recipe(args.spec, args.profile, args.instances)
    if args.summary_only:
        out = Path(args.out or recipe.out)
        if not (out / CSV_NAME).is_file():
            raise ConfigError(f"--summary-only: no {CSV_NAME} in {out}")
        write_report(recipe, out)
        return 0
    out = artifacts.check_writable(args.out or recipe.out)
    try:
        run_bench(recipe, out, progress=progress_enabled(not args.no_progress), audit=args.audit,
                  rerun_stale=args.rerun_stale, workers=args.workers, backend=args.backend, address=args.address)
    except RuntimeError as exc:  # a worker process died: the finished rows are kept, a rerun resumes
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
