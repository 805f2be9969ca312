"""Diagnostic figures of one sampling run (loss trace, running λ̂, trace/rank, autocorrelation, acceptance, energy, ESS), saved as PNG."""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib

# Figures are written to files on headless machines (CI, GPU hosts); never open a window.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy.ndimage import uniform_filter1d  # noqa: E402

from llc_bench.diagnostics import (  # noqa: E402
    autocorrelation,
    ess_evolution,
    healthy_chains,
    per_draw_llc,
    to_datatree,
)
from llc_bench.types import ChainResult  # noqa: E402

LOSS_UNITS = "nats / sample"
DPI = 110


def _save(fig: Figure, path: Path, **savefig_kwargs) -> Path:
    """Save to a temp file beside `path`, then rename: a run killed mid-plot leaves no truncated PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, **({"dpi": DPI, "bbox_inches": "tight"} | savefig_kwargs))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path


def _figure(nrows: int = 1, ncols: int = 1, size=(8.0, 4.5)):
    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    return fig, axes


def running_llc(result: ChainResult) -> np.ndarray:
    """Per-chain running WBIC estimate nβ (mean of L_n over draws so far − L*), (C, D)."""
    summand = per_draw_llc(result)
    return np.cumsum(summand, axis=1) / np.arange(1, summand.shape[1] + 1)


def _post_burnin(result: ChainResult, values: np.ndarray) -> np.ndarray:
    """Finite post-burn-in values of a (C, T) per-step array, healthy chains only, flattened."""
    good = healthy_chains(result.draw_loss, result.diverged_at)
    x = np.asarray(values, dtype=float)[good, result.num_burnin_steps :].ravel()
    return x[np.isfinite(x)]


def plot_loss_trace(result: ChainResult, path: Path) -> Path:
    """Per-step loss of every chain, burn-in shaded, L_n(w*) dashed; the guide's primary diagnostic.

    Top: the whole run. Bottom: after burn-in only, so early transients do not flatten the part
    the estimate uses.
    """
    fig, axes = _figure(2, 1, size=(8.0, 7.0))
    steps = np.arange(result.loss_trace.shape[1])
    burnin = result.num_burnin_steps
    for ax, start in ((axes[0, 0], 0), (axes[1, 0], burnin)):
        for c, trace in enumerate(result.loss_trace):
            ax.plot(steps[start:], trace[start:], lw=0.6, alpha=0.8, label=f"chain {c}")
            if result.diverged_at[c] >= start:
                ax.axvline(result.diverged_at[c], color="red", ls=":", lw=1.0)
        ax.axhline(result.loss_at_wstar, color="k", ls="--", lw=1.0, label="L_n(w*)")
        ax.set_xlabel("sampler step")
        ax.set_ylabel(f"per-step loss ({LOSS_UNITS})")
    axes[0, 0].axvspan(0, burnin, color="0.85", zorder=0, label="burn-in")
    axes[0, 0].set_title(f"{result.sampler}: loss trace (red dotted: chain diverged)")
    axes[1, 0].set_title(f"{result.sampler}: after burn-in (steps ≥ {burnin})", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_running_llc(result: ChainResult, path: Path, llc_running: np.ndarray | None = None,
                     truth: float | None = None) -> Path:
    """Running λ̂ per chain and pooled over healthy chains against the draw's sampler step."""
    running = running_llc(result) if llc_running is None else np.asarray(llc_running, dtype=float)
    good = healthy_chains(result.draw_loss, result.diverged_at)
    fig, axes = _figure()
    ax = axes[0, 0]
    for c, series in enumerate(running):
        ax.plot(result.draw_steps, series, lw=0.8, alpha=0.6, label=f"chain {c}")
    if good.size:
        ax.plot(result.draw_steps, running[good].mean(axis=0), color="k", lw=2.0,
                label=f"pooled ({good.size} healthy chains)")
    if truth is not None:
        ax.axhline(truth, color="C3", ls="--", lw=1.5, label=f"truth λ = {truth:g}")
    ax.set_xlabel("sampler step of draw")
    ax.set_ylabel("running λ̂ (dimensionless)")
    ax.set_title(f"{result.sampler}: running LLC estimate nβ (mean L_n − L_n(w*))")
    ax.legend(fontsize=7, ncol=2, loc="best")
    return _save(fig, path)


def _posterior_subtree(result: ChainResult) -> xr.DataTree:
    """Posterior group of healthy chains only: ranks and traces of a NaN chain mean nothing."""
    post = to_datatree(result)["posterior"].to_dataset()
    good = healthy_chains(result.draw_loss, result.diverged_at)
    return xr.DataTree.from_dict({"posterior": post.isel(chain=good)})


def _pc_figure(pc):
    fig = pc.get_viz("figure")
    return fig.item() if isinstance(fig, xr.DataArray) else fig


def _rasterize(fig: Figure) -> np.ndarray:
    """(H, W, 4) uint8 pixels of a rendered figure; the figure is closed."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba()).copy()
    plt.close(fig)
    return pixels


def _side_by_side(images: list[np.ndarray]) -> np.ndarray:
    height = max(im.shape[0] for im in images)
    padded = [np.pad(im, ((0, height - im.shape[0]), (0, 0), (0, 0)), constant_values=255) for im in images]
    return np.concatenate(padded, axis=1)


def plot_trace_rank(result: ChainResult, path: Path) -> Path:
    """ArviZ trace and rank plots of L_n and the θ projections (matplotlib fallback if arviz_plots fails).

    The two arviz_plots figures are rendered separately and placed side by side: combine_plots
    misplaces the rank plot's annotations in arviz_plots 1.3.
    """
    tree = _posterior_subtree(result)
    rows = 1 + tree["posterior"].sizes["proj"]
    title = f"{result.sampler}: trace (left, x = draw index) and rank ECDF (right) of L_n and θ projections"
    try:
        import arviz_plots as azp  # deferred: slow to import; a failure here falls back to matplotlib

        layout = {"figsize": (6.0, 2.4 * rows), "layout": "constrained", "dpi": DPI}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trace = _pc_figure(azp.plot_trace(tree, var_names=["L_n", "theta_proj"], backend="matplotlib",
                                              col_wrap=1, figure_kwargs=layout))
            trace_px = _rasterize(trace)
            rank = _pc_figure(azp.plot_rank(tree, var_names=["L_n", "theta_proj"], backend="matplotlib",
                                            col_wrap=1, figure_kwargs=layout))
            rank_px = _rasterize(rank)
        pixels = _side_by_side([trace_px, rank_px])
        fig = plt.figure(figsize=(pixels.shape[1] / DPI, pixels.shape[0] / DPI + 0.4), dpi=DPI)
        ax = fig.add_axes((0.0, 0.0, 1.0, pixels.shape[0] / (pixels.shape[0] + 0.4 * DPI)))
        ax.imshow(pixels, interpolation="none")
        ax.set_axis_off()
        fig.suptitle(title, fontsize=9)
        return _save(fig, path, bbox_inches=None)
    except Exception as err:  # noqa: BLE001 - any arviz_plots failure falls back to matplotlib
        warnings.warn(f"arviz_plots trace/rank failed ({err!r}); using matplotlib fallback", stacklevel=2)
        plt.close("all")
        return _trace_rank_fallback(tree, title, path)


def _trace_rank_fallback(tree: xr.DataTree, title: str, path: Path) -> Path:
    post = tree["posterior"]
    series = [("L_n", post["L_n"].values)]
    series += [(f"theta_proj[{p}]", post["theta_proj"].values[..., p]) for p in range(post.sizes["proj"])]
    fig, axes = _figure(len(series), 2, size=(10.0, 2.0 * len(series) + 1))
    for row, (name, x) in enumerate(series):
        ranks = np.argsort(np.argsort(x, axis=None)).reshape(x.shape) if x.size else x
        bins = np.linspace(0, max(x.size, 1), 21)
        for c in range(x.shape[0]):
            axes[row, 0].plot(x[c], lw=0.6)
            axes[row, 1].hist(ranks[c], bins=bins, histtype="step")
        axes[row, 0].set_ylabel(name)
        axes[row, 1].set_ylabel("count")
    axes[-1, 0].set_xlabel("draw index")
    axes[-1, 1].set_xlabel("pooled rank")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_autocorr(result: ChainResult, path: Path, max_lag: int = 100) -> Path:
    """Autocorrelation of the post-burn-in per-step loss (lag in steps: picks thinning) and of L_n draws."""
    good = healthy_chains(result.draw_loss, result.diverged_at)
    trace = np.asarray(result.loss_trace, dtype=float)[good, result.num_burnin_steps :]
    fig, axes = _figure(1, 2, size=(10.0, 4.0))
    panels = [
        (axes[0, 0], trace, "lag (sampler steps)", "per-step loss after burn-in"),
        (axes[0, 1], np.asarray(result.draw_loss, dtype=float)[good], "lag (draws)", "L_n at draws"),
    ]
    for ax, x, xlabel, name in panels:
        if x.shape[0] and x.shape[1] >= 2:
            rho = autocorrelation(x, max_lag)
            for c, r in zip(good, rho, strict=True):
                ax.plot(np.arange(r.size), r, lw=0.8, label=f"chain {c}")
            ax.axhline(0.0, color="k", lw=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("autocorrelation ρ (dimensionless)")
        ax.set_title(f"{result.sampler}: {name}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def plot_accept_hist(result: ChainResult, path: Path) -> Path:
    """Histogram of post-burn-in Metropolis acceptance probabilities (HMC, NUTS, adjusted MCLMC)."""
    x = _post_burnin(result, result.accept)
    fig, axes = _figure(size=(6.0, 4.0))
    ax = axes[0, 0]
    ax.hist(x, bins=np.linspace(0, 1, 41), color="C0")
    if x.size:
        ax.axvline(np.mean(x), color="k", ls="--", label=f"mean {np.mean(x):.3f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("acceptance probability (per step)")
    ax.set_ylabel("number of steps")
    ax.set_title(f"{result.sampler}: acceptance after burn-in")
    return _save(fig, path)


def plot_energy_hist(result: ChainResult, path: Path) -> Path:
    """Histogram of post-burn-in energy changes (MCLMC tuning aims at a fixed Var[ΔE] per dimension)."""
    x = _post_burnin(result, result.energy_change)
    fig, axes = _figure(size=(6.0, 4.0))
    ax = axes[0, 0]
    ax.hist(x, bins=60, color="C1")
    if x.size:
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_title(f"{result.sampler}: energy change after burn-in (Var ΔE = {np.var(x):.3g} nats²)")
    else:
        ax.set_title(f"{result.sampler}: energy change after burn-in (none recorded)")
    ax.set_xlabel("energy change ΔE per step (nats)")
    ax.set_ylabel("number of steps")
    return _save(fig, path)


def plot_ess_evolution(result: ChainResult, path: Path, num_points: int = 20) -> Path:
    """Bulk ESS of L_n against draws so far; should grow linearly, the iid line is the ceiling."""
    evo = ess_evolution(result.draw_loss, num_points)
    num_good = healthy_chains(result.draw_loss, result.diverged_at).size
    fig, axes = _figure(size=(6.0, 4.0))
    ax = axes[0, 0]
    if evo.size:
        ax.plot(evo[:, 0], evo[:, 1], "o-", label="bulk ESS of L_n")
        ax.plot(evo[:, 0], num_good * evo[:, 0], "k--", lw=0.8, label="iid draws (chains × draws)")
        ax.legend(fontsize=8)
    ax.set_xlabel("draws per chain")
    ax.set_ylabel("effective sample size (draws)")
    ax.set_title(f"{result.sampler}: ESS evolution ({num_good} healthy chains)")
    return _save(fig, path)


def _has_finite(values: np.ndarray) -> bool:
    return bool(np.any(np.isfinite(np.asarray(values, dtype=float))))


def plot_all(result: ChainResult, out_dir: Path, truth: float | None = None,
             llc_running: np.ndarray | None = None) -> list[Path]:
    """Every figure that applies to this sampler, as `<out_dir>/<sampler>_<figure>.png`."""
    out_dir = Path(out_dir)
    stem = result.sampler
    paths = [
        plot_loss_trace(result, out_dir / f"{stem}_loss_trace.png"),
        plot_running_llc(result, out_dir / f"{stem}_running_llc.png", llc_running, truth),
    ]
    has_draws = result.draw_loss.shape[1] >= 4 and healthy_chains(result.draw_loss, result.diverged_at).size
    if has_draws:
        paths.append(plot_trace_rank(result, out_dir / f"{stem}_trace_rank.png"))
        paths.append(plot_ess_evolution(result, out_dir / f"{stem}_ess_evolution.png"))
    paths.append(plot_autocorr(result, out_dir / f"{stem}_autocorr.png"))
    # Unadjusted samplers record NaN acceptance / energy; their histograms would be empty.
    if _has_finite(result.accept):
        paths.append(plot_accept_hist(result, out_dir / f"{stem}_accept_hist.png"))
    if _has_finite(result.energy_change):
        paths.append(plot_energy_hist(result, out_dir / f"{stem}_energy_hist.png"))
    return paths


def plot_scoreboard(rows: list[dict], out_dir: str | Path, scored: Callable[[dict], bool], band: float) -> list[Path]:
    """The DLN scoreboard's figures from its rows: llc_vs_truth.png (log-log, y = x), rel_error.png (per
    sampler and class, rows where `scored(row)`; the ±`band` target shaded) and wnv.png (per sampler)."""
    out = Path(out_dir)
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(samplers)}
    markers = dict(zip(classes, "os^Dvx", strict=False))
    good = [r for r in rows if math.isfinite(r["llc_mean"]) and r["llc_mean"] > 0]
    paths = []

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for r in good:
        filled = scored(r)
        ax.scatter(r["aoyagi"], r["llc_mean"], marker=markers.get(r["class"], "o"), s=22,
                   color=colors[r["sampler"]] if filled else "none", edgecolors=None if filled else colors[r["sampler"]],
                   alpha=0.75 if filled else 0.5, linewidths=0 if filled else 0.8)
    values = [r["aoyagi"] for r in rows if math.isfinite(r["aoyagi"])] + [r["llc_mean"] for r in good]
    lo, hi = (min(values) / 1.5, max(values) * 1.5) if values else (1, 10)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="λ (Aoyagi)",
           ylabel="estimated λ̂", title="DLN scoreboard: estimated vs analytic LLC")
    handles = [plt.Line2D([], [], color=colors[s], marker="o", ls="", label=s) for s in samplers]
    handles += [plt.Line2D([], [], color="gray", marker=markers[c], ls="", label=f"class {c}") for c in classes]
    handles += [plt.Line2D([], [], color="gray", marker="o", ls="", label="well-posed (scored)"),
                plt.Line2D([], [], color="gray", marker="o", mfc="none", ls="", label="not well-posed")]
    ax.legend(handles=handles + [plt.Line2D([], [], color="k", ls="--", label="y = x")], fontsize=8)
    paths.append(_save(fig, out / "llc_vs_truth.png"))

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(samplers) * max(1, len(classes))), 4.5))
    data, labels, cols = [], [], []
    for s in samplers:
        for c in classes:
            vals = [r["rel_error"] for r in rows if r["sampler"] == s and r["class"] == c and scored(r)
                    and math.isfinite(r["rel_error"])]
            data.append(vals or [math.nan])
            labels.append(f"{s}\n{c}")
            cols.append(colors[s])
    positions = np.arange(len(data))
    bp = ax.boxplot([d for d in data], positions=positions, widths=0.6, showfliers=False, patch_artist=True)
    for patch, col in zip(bp["boxes"], cols, strict=True):
        patch.set(facecolor=col, alpha=0.35)
    jitter = np.random.default_rng(0)
    for p, vals, col in zip(positions, data, cols, strict=True):
        ax.scatter(p + jitter.uniform(-0.15, 0.15, len(vals)), vals, color=col, s=10, zorder=3)
    ax.axhspan(-band, band, color="green", alpha=0.1, label=f"±{band:.0%}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set(ylabel="relative error (λ̂ − λ)/λ  (symlog)", title="Relative error per sampler and class (well-posed)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "rel_error.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "wnv_grad", "WNV = SE² × gradient evaluations"),
                           (axes[1], "wnv_time", "WNV = SE² × seconds")):
        vals = [[r[key] for r in rows if r["sampler"] == s and math.isfinite(r[key]) and r[key] > 0]
                or [math.nan] for s in samplers]
        bp = ax.boxplot(vals, positions=np.arange(len(samplers)), showfliers=True, patch_artist=True)
        for patch, s in zip(bp["boxes"], samplers, strict=True):
            patch.set(facecolor=colors[s], alpha=0.4)
        ax.set_xticks(np.arange(len(samplers)), samplers, fontsize=8, rotation=20)
        ax.set(yscale="log", title=label, ylabel="lower is better")
    fig.suptitle("Work-normalized variance per sampler (all classes)")
    paths.append(_save(fig, out / "wnv.png"))
    return paths


def plot_tune_grid(cells, recommended, path: Path, title: str, smoothing: Callable[[int], int],
                   step_label: Callable) -> Path:
    """The tuning grid: rows γ, columns nβ, one chain-mean loss trace (minus L_n(w*)) per ε with its
    verdict printed; the recommended cell framed. `cells` carry gamma, n_beta, step_size, traces,
    mean_trace, loss_at_wstar, num_burnin_steps, codes, verdict and error; `smoothing(length)` is the
    width of the moving average drawn over each trace."""
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
                labels.append((step_label(c.step_size) + ": " + c.verdict, colors[c.step_size]))
                if c.error is not None or c.traces.size == 0:
                    continue
                y = c.mean_trace - c.loss_at_wstar
                if not np.any(np.isfinite(y)):  # every chain diverged: show the first chain until it did
                    y = c.traces[0] - c.loss_at_wstar
                steps_axis = np.arange(y.shape[0])
                ax.plot(steps_axis, y, lw=0.5, alpha=0.35, color=colors[c.step_size])
                smooth = uniform_filter1d(y, size=smoothing(y.shape[0]), mode="nearest")
                ax.plot(steps_axis, smooth, lw=1.2, color=colors[c.step_size], label=step_label(c.step_size))
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
            if recommended is not None and recommended.gamma == g and recommended.n_beta == nb:
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:green")
                    spine.set_linewidth(2.5)
                ax.set_title(f"nβ = {nb:.4g}, γ = {g:.4g}  ★ {step_label(recommended.step_size)}", fontsize=9,
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
    return _save(fig, path, dpi=100, bbox_inches=None)
