"""What the hyperparameter search (llc_bench.tune) writes and prints: the grid CSV, the grid figure,
recommendation.json and the recommendation in words."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from llc_bench import artifacts
from llc_bench.config import Config
from llc_bench.tune_rules import (
    CellResult,
    ControlComparison,
    Recommendation,
    Suggestions,
    TuneGrid,
    settle_step,
    smoothing_window,
)

# ---------------------------------------------------------------------------------------------
# Artifacts: CSV, figure, recommendation JSON
# ---------------------------------------------------------------------------------------------

DEFAULT_GRID = TuneGrid()
CSV_COLUMNS = ("sampler", "step_size", "n_beta", "beta0", "gamma", "llc_mean", "llc_se", "loss_rise",
               "settle_step", "verdict", "flags", "chains_used", "num_chains", "wall_s", "recommended",
               "error")


def _num(x) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.6g}"


def grid_csv(cells: Sequence[CellResult], rec: Recommendation, sampler: str, n: int,
             grid: TuneGrid = DEFAULT_GRID) -> str:
    """The grid as CSV text: one row per (ε, nβ, γ)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for c in cells:
        settle = settle_step(c.mean_trace, c.loss_at_wstar, grid.settle_tolerance) if c.error is None else None
        writer.writerow({
            "sampler": sampler, "step_size": _num(c.step_size), "n_beta": _num(c.n_beta),
            "beta0": _num(c.n_beta * math.log(n) / n), "gamma": _num(c.gamma),
            "llc_mean": _num(c.llc_mean), "llc_se": _num(c.llc_se), "loss_rise": _num(c.rise),
            "settle_step": "" if settle is None else settle, "verdict": c.verdict,
            "flags": ";".join(c.codes), "chains_used": int(c.healthy.sum()),
            "num_chains": int(c.traces.shape[0]), "wall_s": f"{c.wall_s:.2f}",
            "recommended": c is rec.cell, "error": (c.error or "").replace("\n", " ")[:300],
        })
    return buf.getvalue()


def _fmt_eps(eps: float | str | None) -> str:
    if isinstance(eps, str):  # a grid value "auto", before it is resolved
        return f"ε={eps}"
    return "ε auto" if eps is None else f"ε={eps:.0e}"


def plot_grid(cells: Sequence[CellResult], rec: Recommendation, path: Path, title: str = "") -> Path:
    """The guide's grid figure: rows γ, columns nβ, one mean loss trace (minus L_n(w*)) per ε, verdicts printed."""
    from llc_bench.plots import plot_tune_grid  # deferred: plots imports xarray and the ArviZ stack

    return plot_tune_grid(cells, rec.cell, path, title, smoothing=smoothing_window, step_label=_fmt_eps)


def set_line(cfg: Config, name: str, cell: CellResult, n: int, sug: Suggestions | None) -> str:
    parts = []
    if cell.step_size is not None:
        parts.append(f"sampler.{name}.step_size={cell.step_size:.3g}")
    parts.append(f"posterior.beta0={cell.n_beta * math.log(n) / n:.6g}")
    parts.append(f"posterior.gamma={cell.gamma:.6g}")
    if cfg.posterior.prior_radius is not None:
        parts.append("posterior.prior_radius=none")
    if sug is not None:
        if sug.num_burnin_steps is not None:
            parts.append(f"run.num_burnin_steps={sug.num_burnin_steps}")
        if sug.num_steps_bw_draws is not None:
            parts.append(f"run.num_steps_bw_draws={sug.num_steps_bw_draws}")
        if sug.num_chains is not None:
            parts.append(f"run.num_chains={sug.num_chains}")
    return " ".join(f"--set {p}" for p in parts)


def recommendation_json(name, cfg, grid, n, posterior, cells, rec, sug, control) -> dict:
    out = {
        "sampler": name, "n": n, "d": posterior.dim, "loss_at_wstar": posterior.loss_at_wstar,
        "grid": dataclasses.asdict(grid), "num_cells": len(cells),
        "verdicts": {v: sum(c.verdict == v for c in cells) for v in sorted({c.verdict for c in cells})},
        "reason": rec.reason, "recommended": None, "suggestions": None, "control": None,
        "versions": artifacts.versions(),
    }
    if rec.cell is not None:
        c = rec.cell
        out["recommended"] = {"step_size": c.step_size, "n_beta": c.n_beta, "beta0": c.n_beta * math.log(n) / n,
                              "gamma": c.gamma, "llc_mean": c.llc_mean, "llc_se": c.llc_se,
                              "settle_step": rec.settle_step, "set": set_line(cfg, name, c, n, sug)}
    if sug is not None:
        out["suggestions"] = dataclasses.asdict(sug)
    if control is not None:
        out["control"] = dataclasses.asdict(control)
    return json.loads(json.dumps(artifacts.jsonable(out)))


def print_recommendation(name, cfg, grid, n, rec: Recommendation, sug: Suggestions | None,
                          control: ControlComparison | None, out: Path) -> None:
    if rec.cell is None:
        print(f"\nNo recommendation: {rec.reason}")
        print(f"wrote {out}/tune_grid.csv, tune_grid.png, recommendation.json")
        return
    c = rec.cell
    print(f"\nRecommended: {_fmt_eps(c.step_size)}, nβ = {c.n_beta:.4g} (β0 = {c.n_beta * math.log(n) / n:.4g}), "
          f"γ = {c.gamma:.4g}: λ̂ = {c.llc_mean:.4g} ± {c.llc_se:.2g}; {rec.reason}.")
    if sug is not None:
        b, k, ch = sug.num_burnin_steps, sug.num_steps_bw_draws, sug.num_chains
        print(f"  burn-in: {b if b is not None else '?'} steps (smoothed loss trace level from there)"
              + (" — late in this run: rerun tune with more draws to confirm the level"
                 if b is not None and b > c.traces.shape[1] // 2 else ""))
        print(f"  thinning: every {k} steps (loss autocorrelation < threshold)" if k is not None
              else "  thinning: autocorrelation did not fall below the threshold: run longer")
        print(f"  chains: {ch} for a relative SE of {grid.target_rel_se:.0%} at {cfg.run.num_draws} draws per chain "
              "(from the between-chain spread)" if ch is not None else "  chains: too few usable chains to say")
    if control is not None:
        lam0 = c.n_beta * control.rise_zero
        verdict = ("differs qualitatively: the loss gradient shapes the samples" if control.differs else
                   "does NOT differ qualitatively: nβ is too low for the loss to matter; increase nβ")
        print(f"  nβ = 0 control at the same ε and γ: loss rise {control.rise_zero:.4g} vs {control.rise:.4g} "
              f"(nβ·rise {lam0:.4g} vs λ̂ {c.llc_mean:.4g}; {control.rel_diff:.0%} apart, "
              f"{control.z:.1f} SE) — {verdict}.")
    print(f"  run it: uv run main.py --sampler {name} {set_line(cfg, name, c, n, sug)}")
    print(f"wrote {out}/tune_grid.csv, tune_grid.png, recommendation.json")
