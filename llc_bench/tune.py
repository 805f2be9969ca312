"""The sampling guide's hyperparameter search: sweep ε × nβ × γ, judge each loss trace, recommend a setting, suggest burn-in / thinning / chains, and run the nβ = 0 control."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llc_bench import artifacts
from llc_bench.config import Config, _suggest, load_config, read_toml, replace, to_dict, to_toml
from llc_bench.curvature import build_algorithm
from llc_bench.estimator import resolve_source
from llc_bench.experiment import build_posterior, run_sampler
from llc_bench.progress import Bar, progress_enabled
from llc_bench.rng import sampler_key
from llc_bench.runner import run_chains
from llc_bench.samplers import SAMPLER_NAMES, get_spec
from llc_bench.samplers.base import STEP_EPSILON
from llc_bench.target import build_target
from llc_bench.tune_report import (
    _fmt_eps,
    grid_csv,
    plot_grid,
    print_recommendation,
    recommendation_json,
)
from llc_bench.tune_rules import (
    CellResult,
    TuneGrid,
    assess,
    compare_control,
    failed_cell,
    load_grid,
    recommend,
    rise_per_chain,
    suggest,
)
from llc_bench.types import ConfigError

DEFAULT_SAMPLER = "rmsprop_sgld"


# ---------------------------------------------------------------------------------------------
# Running the grid
# ---------------------------------------------------------------------------------------------


def _settings_for(cfg: Config, name: str, step_size: float | None):
    settings = cfg.sampler[name]
    return settings if step_size is None else dataclasses.replace(settings, step_size=step_size)


def run_cell(cfg: Config, name: str, posterior, step_size: float | None, n_beta: float,
             gamma: float) -> CellResult:
    """Sample one grid cell (w* and data shared through `posterior`); a raised error becomes a failed cell."""
    cell_post = dataclasses.replace(posterior, n_beta=float(n_beta), gamma=float(gamma))
    start = time.perf_counter()
    try:
        run = run_sampler(cfg, name, cell_post, settings=_settings_for(cfg, name, step_size), restart=False,
                          step_bias=False)
    except Exception as exc:  # noqa: BLE001 - one bad cell must not end the search
        return failed_cell(None if step_size == "auto" else step_size, n_beta, gamma,
                           f"{type(exc).__name__}: {exc}", posterior.loss_at_wstar)
    # "auto" resolves per cell (it depends on nβ and γ): the cell keeps the ε it ran with
    step_size = run.summary.get("step_size", step_size)
    return assess(run.result, step_size, n_beta, gamma, flags=run.flags, source=run.summary["estimate_from"],
                  wall_s=time.perf_counter() - start)


def run_control(cfg: Config, name: str, posterior, cell: CellResult) -> np.ndarray:
    """(C,) per-chain loss rise with the recommended ε and γ but nβ = 0 (the loss gradient switched off)."""
    zero = dataclasses.replace(posterior, n_beta=0.0, gamma=cell.gamma)
    algorithm = build_algorithm(get_spec(name), zero, _settings_for(cfg, name, cell.step_size))
    r = cfg.run
    result = run_chains(name, algorithm, zero, sampler_key(r.seed, name), num_chains=r.num_chains,
                        num_burnin_steps=r.num_burnin_steps, num_draws=r.num_draws,
                        num_steps_bw_draws=r.num_steps_bw_draws, num_projections=0,
                        chunk_size=r.chunk_size, progress=False)
    return rise_per_chain(result, resolve_source(r.estimate_from, name))


def grid_cells(grid: TuneGrid, n: int, tunes_step: bool) -> list[tuple[float | None, float, float]]:
    """(ε, nβ, γ) for every cell, γ outermost (the figure's rows)."""
    steps = grid.step_sizes if tunes_step else (None,)
    return [(eps, grid.n_beta_value(nb, n), g) for g in grid.gammas for nb in grid.n_betas for eps in steps]


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------


def _is_tune_override(text: str) -> bool:
    return text.split("=", 1)[0].strip().startswith("tune.")


def load_tune_config(preset: str | None, config_file: str | None, overrides: Sequence[str],
                     sampler: str | None) -> tuple[Config, TuneGrid]:
    """(Config, TuneGrid) with the run command's layering; a [tune] table and `--set tune.*` feed the grid.

    Grid layering: TuneGrid defaults <- the --config FILE's [tune] table <- --set tune.KEY=VALUE.
    (No tune file in configs/: every TOML there is listed, and loaded by tests, as a run preset.)
    """
    tune_sets = [o for o in overrides if _is_tune_override(o)]
    cfg_sets = [o for o in overrides if not _is_tune_override(o)]
    if sampler is not None:
        cfg_sets.append(f"run.samplers={sampler}")
    tables, layers = [], []
    if config_file is not None:  # read once: its [tune] table feeds the grid, the rest the config
        raw = read_toml(config_file)
        if "tune" in raw:
            tables.append(raw.pop("tune"))
        layers.append(raw)
    cfg = load_config(preset, None, cfg_sets, layers=layers)
    return cfg, load_grid(tables, tune_sets)


def main(args) -> int:
    """`main.py tune`: sweep, judge, recommend, suggest, control; returns the exit status.

    Config as for `main.py` (--preset, --config, --set); the sampler is --sampler (first one) or
    rmsprop_sgld. The grid is TuneGrid's defaults, changed by a [tune] table in the --config file
    or by `--set tune.KEY=VALUE` (e.g. --set 'tune.step_sizes=[1e-5,1e-4]'). Each cell runs the
    config's run section (chains, burn-in, draws, thinning) on one shared w*. Writes tune_grid.csv,
    tune_grid.png, recommendation.json and config.toml atomically to --out or
    <run.out_dir>/tune/<run_id>/.
    """
    samplers = list(getattr(args, "samplers", []) or [])
    name = samplers[0] if samplers else DEFAULT_SAMPLER
    if name not in SAMPLER_NAMES:
        raise ConfigError(f"--sampler: unknown sampler {name!r}{_suggest(name, SAMPLER_NAMES)}; "
                          f"allowed: {', '.join(SAMPLER_NAMES)}")
    cfg, grid = load_tune_config(args.preset, args.config, args.overrides, name)
    if grid.num_chains:
        cfg = replace(cfg, **{"run.num_chains": grid.num_chains})
    rid = artifacts.run_id({"config": to_dict(cfg), "tune": dataclasses.asdict(grid), "sampler": name})
    out = artifacts.check_writable(args.out or Path(cfg.run.out_dir) / "tune" / rid)
    progress = progress_enabled(not args.no_progress)
    if len(samplers) > 1:
        print(f"tune: one sampler at a time; using {name} (ignoring {', '.join(samplers[1:])})")

    tunes_step = get_spec(name).step_size == STEP_EPSILON
    r = cfg.run
    num_steps = r.num_burnin_steps + r.num_draws * r.num_steps_bw_draws
    target = build_target(cfg, progress=progress)  # w* trained once, shared by every cell
    posterior = build_posterior(cfg, target)
    n = posterior.n
    cells_spec = grid_cells(grid, n, tunes_step)
    print(f"tune {name}: {len(cells_spec)} cells (ε {list(grid.step_sizes) if tunes_step else 'tuned by the sampler'}"
          f" × nβ {[round(v, 4) for v in sorted({c[1] for c in cells_spec})]} × γ {list(grid.gammas)}), "
          f"{r.num_chains} chains × {num_steps} steps (burn-in {r.num_burnin_steps}); "
          f"n={n}, d={posterior.dim}, L_n(w*)={posterior.loss_at_wstar:.5g}")

    cells: list[CellResult] = []
    with Bar(f"tune {name}", total=len(cells_spec) + 1, enabled=progress) as bar:
        for eps, nb, g in cells_spec:
            cell = run_cell(cfg, name, posterior, eps, nb, g)
            cells.append(cell)
            bar.advance()
            print(f"  {_fmt_eps(eps):>9}  nβ={nb:<9.4g} γ={g:<7.4g} λ̂={cell.llc_mean:9.4g} ± "
                  f"{cell.llc_se:<8.3g} {cell.verdict}  ({cell.wall_s:.1f} s)")
        rec = recommend(cells, grid)
        sug = suggest(rec.cell, grid) if rec.cell is not None else None
        control = None
        if rec.cell is not None:
            try:
                rise0 = run_control(cfg, name, posterior, rec.cell)
                control = compare_control(rec.cell.rise_per_chain, rise0, grid.control_min_rel_diff,
                                          grid.control_z)
            except Exception as exc:  # noqa: BLE001 - report, keep the grid results
                print(f"nβ = 0 control failed: {type(exc).__name__}: {exc}")
        bar.advance()

    artifacts.write_text_atomic(out / "tune_grid.csv", grid_csv(cells, rec, name, n, grid))
    plot_grid(cells, rec, out / "tune_grid.png",
              title=f"{name}: chain-mean loss traces, raw (faint) and smoothed; rows γ, columns nβ; "
                    "dotted: end of burn-in; ★ recommended")
    summary = recommendation_json(name, cfg, grid, n, posterior, cells, rec, sug, control)
    artifacts.write_text_atomic(out / "config.toml", to_toml(cfg))
    artifacts.write_json_atomic(out / "recommendation.json", summary)
    print_recommendation(name, cfg, grid, n, rec, sug, control, out)
    return 0
