"""The sampling guide's hyperparameter search: sweep ε × nβ × γ, judge each loss trace, recommend a setting, suggest burn-in / thinning / chains, and run the nβ = 0 control."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

# Figures are written to files on headless machines (CI, GPU hosts); never open a window.
matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import tomli_w
from scipy.ndimage import uniform_filter1d

from llc_bench import artifacts
from llc_bench.config import (
    Config,
    ConfigError,
    _suggest,
    build_section,
    load_config,
    parse_override,
    read_toml,
    replace,
    to_dict,
    to_toml,
)
from llc_bench.diagnostics import autocorrelation
from llc_bench.estimator import estimate_from_result, resolve_source
from llc_bench.experiment import build_posterior, run_sampler
from llc_bench.health import REMEDIES, check_health
from llc_bench.progress import Bar, progress_enabled
from llc_bench.rng import sampler_key
from llc_bench.rules import usable_chains
from llc_bench.runner import run_chains
from llc_bench.samplers import SAMPLER_NAMES, get_spec
from llc_bench.samplers.base import STEP_EPSILON
from llc_bench.target import build_target
from llc_bench.types import ChainResult, HealthFlag

DEFAULT_SAMPLER = "rmsprop_sgld"
N_BETA_SCALES = ("absolute", "beta0")

# Health codes that do not disqualify a setting: burnin_too_short only says the trace was still
# rising when the *tune run's* draws began; how fast it levels is what the ranking measures.
NON_FAILURE_CODES = frozenset({"burnin_too_short"})


@dataclass(frozen=True)
class TuneGrid:
    """The grid and the rules that turn its loss traces into a recommendation.

    Axes (the guide's example sweep, "Sampling Parameter Sweep"): step sizes ε, nβ values, γ values.
    n_beta_scale "absolute": `n_betas` are nβ itself (the guide's {1, 10, 100}); "beta0": they are
    multiples β0 of the WBIC value n / log n (nβ = β0 n / log n; β0 = 1 is the config default).
    Chain length, burn-in and thinning of each cell are the config's run section; `num_chains`
    > 0 overrides run.num_chains for the sweep (the guide: sweeps can use fewer chains).

    Rules:
      settle_tolerance  a trace has reached its stable level at the first step after which its
                        smoothed chain-mean stays within this fraction of its rise above L_n(w*)
      tie_fraction      settle steps within this fraction of the run length count as a tie, broken
                        towards larger nβ (the guide's rule of thumb), then faster, then smaller ε
      burnin_tolerance  the same rule, tighter, for the suggested burn-in
      acf_threshold     suggested thinning k = smallest lag with loss autocorrelation below this
      target_rel_se     suggested chain count = chains for SE(λ̂) / |λ̂| at or below this
                        (at the tune run's draws per chain), and never below min_chains
      control_min_rel_diff, control_z
                        the nβ = 0 control "differs qualitatively" when its mean loss rise differs
                        from the recommended cell's by at least this fraction AND this many SEs
    """

    step_sizes: tuple[float | str, ...] = (1e-6, 1e-5, 1e-4)  # "auto" allowed: resolved per cell
    n_betas: tuple[float, ...] = (1.0, 10.0, 100.0)
    n_beta_scale: str = "absolute"
    gammas: tuple[float, ...] = (10.0, 100.0, 1000.0)
    num_chains: int = 0
    settle_tolerance: float = 0.1
    tie_fraction: float = 0.05
    burnin_tolerance: float = 0.05
    acf_threshold: float = 0.1
    target_rel_se: float = 0.05
    min_chains: int = 2
    control_min_rel_diff: float = 0.25
    control_z: float = 3.0

    def __post_init__(self):
        for name in ("step_sizes", "n_betas", "gammas"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"tune.{name}: needs at least one value")
            if name == "step_sizes":
                values = [v for v in values if v != "auto"]
            if any(isinstance(v, str) or not (math.isfinite(v) and v > 0) for v in values):
                raise ValueError(f"tune.{name}: values must be finite and > 0 (got {list(values)})")
        if self.n_beta_scale not in N_BETA_SCALES:
            raise ValueError(f"tune.n_beta_scale: must be one of {', '.join(N_BETA_SCALES)} "
                             f"(got {self.n_beta_scale!r})")
        for name in ("settle_tolerance", "tie_fraction", "burnin_tolerance", "acf_threshold",
                     "target_rel_se", "control_min_rel_diff"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"tune.{name}: must be in (0, 1) (got {getattr(self, name)!r})")
        for name, low in (("num_chains", 0), ("min_chains", 1), ("control_z", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"tune.{name}: must be >= {low} (got {getattr(self, name)!r})")

    def n_beta_value(self, value: float, n: int) -> float:
        return value if self.n_beta_scale == "absolute" else value * n / math.log(n)


def load_grid(raw_tables: Sequence[dict] = (), overrides: Sequence[str] = ()) -> TuneGrid:
    """TuneGrid defaults <- each [tune] table in order <- `tune.KEY=VALUE` overrides. Raises ConfigError."""
    raw: dict = {}
    for table in raw_tables:
        if not isinstance(table, dict):
            raise ConfigError("tune: must be a table of settings")
        raw.update(table)
    for text in overrides:
        key, value = parse_override(text)
        raw[key.removeprefix("tune.")] = value
    return build_section("tune", TuneGrid, raw)


# ---------------------------------------------------------------------------------------------
# One cell of the grid and its verdict
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CellResult:
    """One (ε, nβ, γ) run reduced to what the tuner judges. C chains, T steps (burn-in included).

    step_size is None for samplers that tune their own step (HMC, MCLMC).
    """

    step_size: float | None
    n_beta: float
    gamma: float
    traces: np.ndarray  # (C, T) per-step loss; NaN from a chain's divergence on
    loss_at_wstar: float
    num_burnin_steps: int
    flags: tuple[HealthFlag, ...]
    llc_mean: float
    llc_se: float
    llc_per_chain: np.ndarray  # (C,) NaN for excluded chains
    rise_per_chain: np.ndarray  # (C,) mean estimator loss − L_n(w*), NaN for excluded chains
    wall_s: float = 0.0
    error: str | None = None

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(f.code for f in self.flags)

    @property
    def failures(self) -> tuple[str, ...]:
        """Failure flag codes; a run that raised counts as the failure "error"."""
        if self.error is not None:
            return ("error",)
        return tuple(c for c in self.codes if c not in NON_FAILURE_CODES)

    @property
    def verdict(self) -> str:
        """"ok", "slow" (levels off, but after the tune run's burn-in), or the failure codes."""
        if self.failures:
            return "+".join(self.failures)
        return "slow" if "burnin_too_short" in self.codes else "ok"

    @property
    def healthy(self) -> np.ndarray:
        return usable_chains(self.traces) if self.traces.size else np.zeros(0, bool)

    @property
    def mean_trace(self) -> np.ndarray:
        """(T,) mean per-step loss over chains that stayed finite; all NaN if none did."""
        good = self.traces[self.healthy]
        if good.shape[0] == 0:
            return np.full(self.traces.shape[1] if self.traces.ndim == 2 else 0, np.nan)
        return good.mean(axis=0)

    @property
    def rise(self) -> float:
        finite = self.rise_per_chain[np.isfinite(self.rise_per_chain)]
        return float(finite.mean()) if finite.size else math.nan


def estimator_series(result: ChainResult, source: str) -> np.ndarray:
    """(C, D) the losses λ̂ averages: full-data draws, or the post-burn-in per-step trace."""
    if source == "minibatch":
        return np.asarray(result.loss_trace, float)[:, result.num_burnin_steps:]
    return np.asarray(result.draw_loss, float)


def rise_per_chain(result: ChainResult, source: str = "full") -> np.ndarray:
    """(C,) mean estimator loss − L_n(w*) per chain; NaN for diverged or non-finite chains."""
    x = estimator_series(result, source)
    ok = usable_chains(x, diverged_at=result.diverged_at)
    out = np.full(x.shape[0], np.nan)
    out[ok] = x[ok].mean(axis=1) - result.loss_at_wstar
    return out


def assess(result: ChainResult, step_size: float | None, n_beta: float, gamma: float, *,
           flags: Sequence[HealthFlag] | None = None, source: str = "full",
           wall_s: float = 0.0) -> CellResult:
    """Reduce one run to a CellResult: health flags (check_health unless given), λ̂ and its SE."""
    flags = tuple(check_health(result) if flags is None else flags)
    est = estimate_from_result(result, source)
    return CellResult(
        step_size=step_size, n_beta=float(n_beta), gamma=float(gamma),
        traces=np.asarray(result.loss_trace, float), loss_at_wstar=float(result.loss_at_wstar),
        num_burnin_steps=int(result.num_burnin_steps), flags=flags, llc_mean=float(est.mean),
        llc_se=float(est.se), llc_per_chain=np.asarray(est.per_chain, float),
        rise_per_chain=rise_per_chain(result, source), wall_s=wall_s)


def failed_cell(step_size: float | None, n_beta: float, gamma: float, message: str,
                loss_at_wstar: float = math.nan) -> CellResult:
    """A cell whose run raised: recorded with its message, never recommended."""
    empty = np.empty((0, 0))
    return CellResult(step_size, float(n_beta), float(gamma), empty, loss_at_wstar, 0, (),
                      math.nan, math.nan, np.empty(0), np.empty(0), error=message)


# ---------------------------------------------------------------------------------------------
# Trace rules: when a trace is level, burn-in, thinning, chains
# ---------------------------------------------------------------------------------------------


def smoothing_window(num_steps: int) -> int:
    """Moving-average window for settle detection: 2% of the run, at least 1 step."""
    return max(1, num_steps // 50)


def settle_step(trace: np.ndarray, loss_at_wstar: float, tolerance: float,
                window: int | None = None) -> int | None:
    """First step after which the smoothed trace stays within `tolerance` of its final level.

    trace: (T,) chain-mean loss. Final level = mean of the last quarter. Smoothing: a centred
    moving average over `window` steps (default `smoothing_window(T)`), i.e. the running mean over a
    short window. The band is tolerance × |final − L_n(w*)|, floored at 3 standard deviations of
    the smoothed last quarter around its linear trend, so that noise alone never counts as "not
    level" while a trend still does.
    Returns T if even the last step is outside the band, None if the trace is not finite.
    """
    x = np.asarray(trace, dtype=float)
    num_steps = x.shape[0]
    if num_steps < 4 or not np.all(np.isfinite(x)):
        return None
    smooth = uniform_filter1d(x, size=window or smoothing_window(num_steps), mode="nearest")
    tail = slice(num_steps - max(1, num_steps // 4), None)
    final = float(np.mean(x[tail]))
    # Noise of the smoothed tail around its own linear trend: a trend is not noise.
    tail_steps = np.arange(num_steps)[tail]
    trend = np.polyval(np.polyfit(tail_steps, smooth[tail], 1), tail_steps)
    band = max(tolerance * abs(final - loss_at_wstar), 3.0 * float(np.std(smooth[tail] - trend)))
    outside = np.flatnonzero(np.abs(smooth - final) > band)
    return 0 if outside.size == 0 else int(outside[-1]) + 1


def suggest_burnin(traces: np.ndarray, loss_at_wstar: float, tolerance: float = 0.05) -> int | None:
    """Burn-in = `settle_step` of the mean over finite chains of the (C, T) per-step loss traces.

    Never below the smoothing window: a rise faster than that cannot be resolved, so the window is
    the smallest burn-in the trace can vouch for.
    """
    traces = np.asarray(traces, dtype=float)
    good = traces[usable_chains(traces)]
    if good.shape[0] == 0:
        return None
    step = settle_step(good.mean(axis=0), loss_at_wstar, tolerance)
    return None if step is None else max(step, smoothing_window(good.shape[1]))


def suggest_thinning(traces: np.ndarray, threshold: float = 0.1, max_lag: int | None = None) -> int | None:
    """Smallest lag k >= 1 at which the chain-averaged loss autocorrelation drops below `threshold`.

    traces: (C, N) post-burn-in per-step losses. None when it never does within max_lag (default
    N // 2). The sample autocorrelation of a chain only a few correlation times long is biased
    towards zero, so k from a short tune run is a lower bound; run long enough to see it fall.
    """
    x = np.asarray(traces, dtype=float)
    x = x[usable_chains(x)]
    if x.shape[0] == 0 or x.shape[1] < 4:
        return None
    max_lag = min(max_lag or x.shape[1] // 2, x.shape[1] - 1)
    rho = np.nanmean(autocorrelation(x, max_lag), axis=0)
    below = np.flatnonzero(rho[1:] < threshold)
    return int(below[0]) + 1 if below.size else None


def suggest_num_chains(per_chain: np.ndarray, target_rel_se: float = 0.05, min_chains: int = 2) -> int | None:
    """Chains C with SE = sd(λ̂_c) / √C <= target_rel_se · |λ̂|, at the same draws per chain.

    None with fewer than two finite per-chain estimates or a zero estimate.
    """
    v = np.asarray(per_chain, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2 or np.mean(v) == 0:
        return None
    ratio = float(np.std(v, ddof=1)) / (target_rel_se * abs(float(np.mean(v))))
    return max(min_chains, math.ceil(ratio**2))


# ---------------------------------------------------------------------------------------------
# Recommendation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Recommendation:
    """The chosen cell (None if every cell failed), how fast it levelled, and why."""

    cell: CellResult | None
    settle_step: int | None
    ranking: tuple[tuple[CellResult, int], ...]  # eligible cells with their settle steps, fastest first
    reason: str


def recommend(grid_results: Sequence[CellResult], grid: TuneGrid = TuneGrid()) -> Recommendation:
    """Among cells without a failure flag, the one whose mean loss trace levels off fastest.

    Settle steps within tie_fraction × T of the fastest tie; ties go to the larger nβ, then the
    faster, then the smaller ε, then the smaller γ (less localization bias).
    """
    ranked = []
    for cell in grid_results:
        if cell.failures:
            continue
        step = settle_step(cell.mean_trace, cell.loss_at_wstar, grid.settle_tolerance)
        if step is not None:
            ranked.append((cell, step))
    ranked.sort(key=lambda cs: cs[1])
    if not ranked:
        counts: dict[str, int] = {}
        for cell in grid_results:
            for code in cell.failures:
                counts[code] = counts.get(code, 0) + 1
        common = sorted(counts, key=lambda c: -counts[c])[:3]
        hints = "; ".join(f"{c} ({counts[c]} cells): {REMEDIES.get(c, 'see the error messages').rstrip('.')}"
                          for c in common)
        return Recommendation(None, None, (), f"no cell passed every check. Most common: {hints}")
    num_steps = ranked[0][0].traces.shape[1]
    fastest = ranked[0][1]
    tie = max(1, math.ceil(grid.tie_fraction * num_steps))
    near = [cs for cs in ranked if cs[1] <= fastest + tie]
    cell, step = max(near, key=lambda cs: (cs[0].n_beta, -cs[1], -(cs[0].step_size or 0.0),
                                           -cs[0].gamma))
    reason = (f"levels off by step {step} of {num_steps} (fastest clean cell: step {fastest}; "
              f"{len(near)} cell(s) within {tie} steps, largest nβ preferred); "
              f"{len(ranked)} of {len(grid_results)} cells passed every check")
    return Recommendation(cell, step, tuple(ranked), reason)


@dataclass(frozen=True)
class Suggestions:
    """Sample-collection settings for the recommended cell (the guide's "Choosing Sample Collection Parameters")."""

    num_burnin_steps: int | None
    num_steps_bw_draws: int | None
    num_chains: int | None


def suggest(cell: CellResult, grid: TuneGrid = TuneGrid()) -> Suggestions:
    burnin = suggest_burnin(cell.traces, cell.loss_at_wstar, grid.burnin_tolerance)
    good = cell.traces[cell.healthy]
    start = burnin if burnin is not None and good.shape[1] - burnin >= 20 else cell.num_burnin_steps
    thin = suggest_thinning(good[:, start:], grid.acf_threshold)
    chains = suggest_num_chains(cell.llc_per_chain, grid.target_rel_se, grid.min_chains)
    return Suggestions(burnin, thin, chains)


# ---------------------------------------------------------------------------------------------
# The nβ = 0 control
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlComparison:
    rise: float  # mean loss rise above L_n(w*) at the recommended nβ
    rise_zero: float  # the same at nβ = 0 (prior only)
    rel_diff: float
    z: float
    differs: bool


def compare_control(rise_per_chain: np.ndarray, rise_zero_per_chain: np.ndarray,
                    min_rel_diff: float = 0.25, z_min: float = 3.0) -> ControlComparison:
    """Does sampling with nβ > 0 differ qualitatively from nβ = 0? (the guide's last check)

    Compares the mean loss rise above L_n(w*) — what λ̂ scales — of the two runs. "Differs" needs
    both a relative difference >= min_rel_diff and >= z_min between-chain standard errors.
    """
    a = np.asarray(rise_per_chain, float)
    b = np.asarray(rise_zero_per_chain, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return ControlComparison(math.nan, math.nan, math.nan, math.nan, False)
    ma, mb = float(a.mean()), float(b.mean())
    var = (a.var(ddof=1) / a.size if a.size > 1 else 0.0) + (b.var(ddof=1) / b.size if b.size > 1 else 0.0)
    diff = abs(mb - ma)
    scale = max(abs(ma), abs(mb))
    rel = diff / scale if scale > 0 else 0.0
    z = diff / math.sqrt(var) if var > 0 else (math.inf if diff > 0 else 0.0)
    return ControlComparison(ma, mb, rel, z, rel >= min_rel_diff and z >= z_min)


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
        run = run_sampler(cfg, name, cell_post, settings=_settings_for(cfg, name, step_size))
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
    algorithm = get_spec(name).build(zero, _settings_for(cfg, name, cell.step_size))
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
# Artifacts: CSV, figure, recommendation JSON
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = ("sampler", "step_size", "n_beta", "beta0", "gamma", "llc_mean", "llc_se", "loss_rise",
               "settle_step", "verdict", "flags", "chains_used", "num_chains", "wall_s", "recommended",
               "error")


def _num(x) -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.6g}"


def grid_csv(cells: Sequence[CellResult], rec: Recommendation, sampler: str, n: int,
             grid: TuneGrid = TuneGrid()) -> str:
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
    tables = []
    if config_file is not None:
        raw = read_toml(config_file)
        if "tune" in raw:
            tables.append(raw.pop("tune"))
            with tempfile.TemporaryDirectory() as tmp:  # load_config reads a file: hand it the rest
                rest = Path(tmp) / Path(config_file).name
                rest.write_text(tomli_w.dumps(raw))
                cfg = load_config(preset, rest, cfg_sets)
            return cfg, load_grid(tables, tune_sets)
    cfg = load_config(preset, config_file, cfg_sets)
    return cfg, load_grid(tables, tune_sets)


def _set_line(cfg: Config, name: str, cell: CellResult, n: int, sug: Suggestions | None) -> str:
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
    summary = _summary(name, cfg, grid, n, posterior, cells, rec, sug, control)
    artifacts.write_text_atomic(out / "config.toml", to_toml(cfg))
    artifacts.write_json_atomic(out / "recommendation.json", summary)
    _print_recommendation(name, cfg, grid, n, rec, sug, control, out)
    return 0


def _summary(name, cfg, grid, n, posterior, cells, rec, sug, control) -> dict:
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
                              "settle_step": rec.settle_step, "set": _set_line(cfg, name, c, n, sug)}
    if sug is not None:
        out["suggestions"] = dataclasses.asdict(sug)
    if control is not None:
        out["control"] = dataclasses.asdict(control)
    return json.loads(json.dumps(artifacts.jsonable(out)))


def _print_recommendation(name, cfg, grid, n, rec: Recommendation, sug: Suggestions | None,
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
    print(f"  run it: uv run main.py --sampler {name} {_set_line(cfg, name, c, n, sug)}")
    print(f"wrote {out}/tune_grid.csv, tune_grid.png, recommendation.json")
