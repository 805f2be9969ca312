"""The rules of the hyperparameter search (llc_bench.tune): the grid, each cell's verdict, when a loss
trace is level, the suggested burn-in / thinning / chains, the recommendation and the nβ = 0 control."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter1d

from llc_bench.config import build_section, parse_override
from llc_bench.diagnostics import autocorrelation
from llc_bench.estimator import estimate_from_result
from llc_bench.health import REMEDIES, check_health
from llc_bench.rules import usable_chains
from llc_bench.types import ChainResult, ConfigError, HealthFlag

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
