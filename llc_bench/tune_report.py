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

import matplotlib

# Figures are written to files on headless machines (CI, GPU hosts); never open a window.
matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from scipy.ndimage import uniform_filter1d

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
    gammas = sorted({c.gamma for c in cells})
    n_betas = sorted({c.n_beta for c in cells})
    steps = sorted({c.step_size for c in cells}, key=lambda e: -1.0 if e is None else e)
    colors = {eps: plt.cm.tab10(i % 10) for i, eps in enumerate(steps)}
    fig, axes = plt.subplots(len(gammas), len(n_betas), figsize=(4.2 * len(n_betas), 3.0 * len(gammas)),
                             squeeze=False, sharex=True)
    for i, g in enumerate(gammas):
        for j, nb in enumerate(n_betas):
            ax = axes[i, j]
            here = [c for c in cells if c.gamma == g and c.n_beta == nb]
            shown = []
            labels = []
            for c in sorted(here, key=lambda c: -1.0 if c.step_size is None else c.step_size):
                labels.append((_fmt_eps(c.step_size) + ": " + c.verdict, colors[c.step_size]))
                if c.error is not None or c.traces.size == 0:
                    continue
                y = c.mean_trace - c.loss_at_wstar
                if not np.any(np.isfinite(y)):  # every chain diverged: show the first chain until it did
                    y = c.traces[0] - c.loss_at_wstar
                steps_axis = np.arange(y.shape[0])
                ax.plot(steps_axis, y, lw=0.5, alpha=0.35, color=colors[c.step_size])
                smooth = uniform_filter1d(y, size=smoothing_window(y.shape[0]), mode="nearest")
                ax.plot(steps_axis, smooth, lw=1.2, color=colors[c.step_size], label=_fmt_eps(c.step_size))
                if not ({"nan", "spikes"} & set(c.codes)):
                    shown.append(y[np.isfinite(y)])
                if c.num_burnin_steps:
                    ax.axvline(c.num_burnin_steps, color="0.6", ls=":", lw=0.8)
            if not shown:  # every trace spiked or diverged: still clip the worst excursions
                shown = [c.mean_trace[np.isfinite(c.mean_trace)] - c.loss_at_wstar for c in here
                         if c.error is None and c.traces.size]
            if shown and sum(v.size for v in shown):  # robust limits: one exploding trace must not flatten the others
                allv = np.concatenate(shown)
                lo, hi = min(0.0, float(np.percentile(allv, 0.5))), float(np.percentile(allv, 99.5))
                if hi > lo:
                    pad = 0.08 * (hi - lo)
                    ax.set_ylim(lo - pad, hi + pad)
            ax.axhline(0.0, color="k", lw=0.6, ls="--")
            for k, (text, color) in enumerate(labels):
                ax.text(0.98, 0.04 + 0.1 * k, text, transform=ax.transAxes, ha="right", va="bottom",
                        fontsize=7, color=color, bbox={"fc": "white", "ec": "none", "alpha": 0.7, "pad": 1})
            ax.set_title(f"nβ = {nb:.4g}, γ = {g:.4g}", fontsize=9)
            if rec.cell is not None and rec.cell.gamma == g and rec.cell.n_beta == nb:
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:green")
                    spine.set_linewidth(2.5)
                ax.set_title(f"nβ = {nb:.4g}, γ = {g:.4g}  ★ {_fmt_eps(rec.cell.step_size)}", fontsize=9,
                             color="tab:green")
            if i == len(gammas) - 1:
                ax.set_xlabel("sampler step")
            if j == 0:
                ax.set_ylabel("mean loss − L_n(w*)")
    handles, names = axes[0, 0].get_legend_handles_labels()
    if handles:
        axes[0, 0].legend(handles, names, loc="upper left", fontsize=7, framealpha=0.7)
    fig.suptitle(title or "loss traces (chain mean); dotted: end of burn-in", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return artifacts.write_bytes_atomic(Path(path), buf.getvalue())


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
