"""Loss-trace health checks (the sampling guide's rules and remedies), a MALA-style acceptance diagnostic for SGLD, and the ε-halving check."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import arviz_stats as azs
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata

from llc_bench.rules import NOT_CONVERGED_CODES, usable_chains
from llc_bench.rules import run_status as run_status  # re-exported (the rule lives in rules)
from llc_bench.types import ChainResult, HealthFlag

# ---------------------------------------------------------------------------------------------
# Thresholds. All are heuristics chosen so that a stationary trace of a few hundred effective
# draws fires nothing, while each textbook failure fires its own flag.
# ---------------------------------------------------------------------------------------------

# not_leveling / burnin_too_short: a rise between two windows counts only if it is both
# statistically real (TREND_Z Monte Carlo standard errors, autocorrelation-aware via ArviZ's
# MCSE) and material (TREND_MIN_FRACTION of the rise above L_n(w*)).
TREND_Z = 4.0
TREND_MIN_FRACTION = 0.05
# burnin_too_short compares the first EARLY_FRACTION of the post-burn-in series with its last half.
EARLY_FRACTION = 0.1
# A window shorter than this gives no usable MCSE; the check is skipped (never fired).
MIN_WINDOW = 8
# not_converged: the mean of the second half of the draws differs from the first half's by more
# than DRIFT_Z standard errors (two-sided; the same autocorrelation-aware test as the trend flags)
# and by more than DRIFT_MIN_FRACTION of the rise above L_n(w*), i.e. of λ̂.
DRIFT_Z = 3.0
DRIFT_MIN_FRACTION = 0.02
# not_converged also fires when the rank-normalized split R̂ of that series, every chain centered on
# its own mean, exceeds this: chains drifting in different directions cancel in the pooled halves
# but not here. 1.1 is the classic "not converged" cut (Gelman et al.); a stationary series with a
# few hundred effective draws sits ≲ 1.02.
SPLIT_RHAT_MAX = 1.1
# still_spreading: how ‖w − w*‖² grows over the draws. Chains start at w*; free diffusion (no
# curvature felt) makes the spread grow ∝ steps, equilibrium keeps it flat. The exponent
# g = log(spread₂ / spread₁) / log(t₂ / t₁) between the halves of the draws (t = mean step of a
# half, counted from the first sampling step) is ≈ 1 for free diffusion and ≈ 0 at equilibrium.
# SG chains on singular models first equilibrate the curved (quadratic) directions and then sit on
# a long plateau near rank(H)/2 while the flat directions still diffuse freely (measured on deep
# linear networks: λ̂ flat at 28 for 85,000 steps, truth 86, spread ∝ steps, g ≈ 0.95, every other
# check quiet). HMC on the same posterior, exploring its flat valleys after its warm-up, has
# g ≈ 0.1–0.3 with a correct λ̂. g must also exceed SPREAD_Z standard errors (across chains).
# Not specific on its own: on a DLN scoreboard with automatic-ε SGLD it caught 40 of the 46 rows off
# by more than 10%, but fired on 78 of 90 rows, since chains also diffuse along valleys of equal
# loss. llc_bench.restart tells the two apart and withdraws it when λ̂ does not move (or when no
# start 2× out holds: the higher-order terms already bind).
SPREAD_EXPONENT_MAX = 0.5
SPREAD_Z = 3.0
# spikes: a point above median + SPIKE_K · log10(N) robust standard deviations (1.4826 · MAD), N
# the chain's series length (at least 10). The log grows like the largest of N draws from an
# exponential tail: a correctly sampled quadratic basin with one dominant direction has a
# ½χ²₁-shaped loss, whose largest of N points sits 31, 38, 45, 52 robust SDs above the median at
# N = 1e3 … 1e6 (1% quantile of the maximum); SPIKE_K = 10 stays above that, and a Gaussian-like
# trace never comes near it. Only upward jumps count.
SPIKE_K = 10.0
MAD_TO_SD = 1.4826
# below_wstar: a chain's mean loss is below L_n(w*) by more than BELOW_WSTAR_Z of its MCSE.
BELOW_WSTAR_Z = 4.0
# low_snr: the guide wants the average rise above L_n(w*) to exceed the trace's noise, i.e.
# signal / noise >= LOW_SNR_MIN. The posterior's own spread is not noise: for an exact sampler
# nβ(L_n − L*) ~ Gamma(λ, 1) on a quadratic basin (½χ²_{2λ}; the normal-crossing form gives the
# same), so Var(L_n) = λ/nβ² = rise/nβ and SNR = √λ, below 1 whenever λ < 1. The noise judged is
# therefore the within-chain SD in excess of that: √max(0, Var − rise/nβ), e.g. minibatch noise.
# It is judged on the series λ̂ is computed from.
LOW_SNR_MIN = 1.0
# chains_disagree: rank-normalized R̂ WITHOUT chain splitting, so a common trend (not_leveling)
# does not masquerade as disagreement. 1.05 is the classic looser cut (Vehtari et al. use 1.01).
RHAT_DISAGREE = 1.05
# divergences: any sampler-reported divergent transition after burn-in (HMC/NUTS) is reported.
MAX_DIVERGENT_FRACTION = 0.0
# mala: mean MALA acceptance below this suggests the SGLD step is too coarse for the local
# curvature. A heuristic (optimal MALA acceptance is ~0.57 in high dimension), not a theorem.
MALA_MIN_ACCEPT = 0.5
# step_size_check: relative change of λ̂ when ε is halved above this means discretization bias.
STEP_SIZE_MAX_REL_CHANGE = 0.10
STEP_SIZE_Z = 2.0

# Remedies, in the spirit of the Timaeus sampling guide's table where it has one.
REMEDIES = {
    "nan": "First decrease ε; also consider if nβ and/or γ are too large.",
    "not_leveling": "Increase ε and/or take more total steps; if that fails, increase γ.",
    "not_converged": "More steps; a larger ε if it is stable (the chains have not equilibrated: "
                     "λ̂ still drifts).",
    "still_spreading": (
        "Many more steps (the spread grows only ∝ ε·steps), or larger steps along the flat directions "
        "(sampler curvature_sgld). Until they equilibrate λ̂ may sit near the quadratic value rank(H)/2, "
        "far below λ; chains spreading along a valley of equal loss read λ correctly. The over-dispersed "
        "restart (run.restart_scale > 0, on by default) tells the two apart and withdraws this flag "
        "when λ̂ does not move, or when the chains cannot even start 2× out (the higher-order terms "
        "already bind there)."
    ),
    "restart_disagrees": (
        "The directions flat at w* have not equilibrated and λ̂ is likely too low (near rank(H)/2 on a "
        "singular model): many more steps, or a sampler with larger steps along them (curvature_sgld). "
        "The restart's λ̂ is no estimate of λ either: its chains may still be coming down from above."
    ),
    "burnin_too_short": "Increase num_burnin_steps until the trace is flat before the first draw.",
    "spikes": "First decrease ε; also consider if nβ and/or γ are too large.",
    "below_wstar": "Increase γ and/or decrease nβ.",
    "low_snr": "Increase nβ, possibly while decreasing γ and ε; or increase the batch size.",
    "chains_disagree": (
        "Run longer / check burn-in; chains leveling at different values usually mean they have "
        "not converged or explore different basins (then increase γ)."
    ),
    "divergences": "Decrease the step size (raise the adaptation's target acceptance rate).",
    "mala_low_accept": "Decrease ε (the acceptance threshold is a heuristic).",
    "step_size_bias": (
        "Discretization bias: the estimate moved when ε was halved; use a smaller ε."
    ),
}


def make_flag(code: str, message: str, chains=()) -> HealthFlag:
    return HealthFlag(code, message, REMEDIES[code], tuple(int(c) for c in chains))


@dataclass(frozen=True)
class HealthThresholds:
    """The module constants, overridable per call."""

    trend_z: float = TREND_Z
    trend_min_fraction: float = TREND_MIN_FRACTION
    drift_z: float = DRIFT_Z
    drift_min_fraction: float = DRIFT_MIN_FRACTION
    split_rhat_max: float = SPLIT_RHAT_MAX
    early_fraction: float = EARLY_FRACTION
    min_window: int = MIN_WINDOW
    spike_k: float = SPIKE_K
    below_wstar_z: float = BELOW_WSTAR_Z
    low_snr_min: float = LOW_SNR_MIN
    rhat_disagree: float = RHAT_DISAGREE
    spread_exponent_max: float = SPREAD_EXPONENT_MAX
    spread_z: float = SPREAD_Z
    max_divergent_fraction: float = MAX_DIVERGENT_FRACTION


# ---------------------------------------------------------------------------------------------
# Statistics on (C, N) series of healthy chains
# ---------------------------------------------------------------------------------------------


def _mcse_mean(x: np.ndarray) -> float:
    """Autocorrelation-aware MCSE of the pooled mean of (C, N); 0 for a constant window."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        se = float(azs.mcse(x, method="mean", chain_axis=0, draw_axis=1))
    return 0.0 if not np.isfinite(se) else se


def window_rise(early: np.ndarray, late: np.ndarray) -> tuple[float, float]:
    """(mean(late) − mean(early), its standard error) for two (C, n) windows."""
    diff = float(np.mean(late) - np.mean(early))
    return diff, float(np.hypot(_mcse_mean(early), _mcse_mean(late)))


@dataclass(frozen=True)
class Shift:
    """A move between two windows of a (C, N) series and whether it counts as real."""

    diff: float  # mean(late) − mean(early)
    se: float  # its autocorrelation-aware standard error
    rise: float  # mean of the whole series − L_n(w*): the scale the move is judged against
    significant: bool

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.diff / self.se
        return float(np.copysign(np.inf, self.diff)) if self.diff else 0.0

    @property
    def fraction(self) -> float:
        return self.diff / abs(self.rise) if self.rise else float(np.inf)


def window_shift(early: np.ndarray, late: np.ndarray, rise: float, z: float, min_fraction: float,
                 two_sided: bool = False) -> Shift:
    """The trend test shared by not_leveling, burnin_too_short and not_converged.

    A move counts only if it beats the noise (|diff| > z · SE; one-sided: diff > z · SE) AND is a
    real fraction of the rise above L_n(w*) (|diff| > min_fraction · |rise|).
    """
    diff, se = window_rise(early, late)
    size = abs(diff) if two_sided else diff
    return Shift(diff, se, rise, bool(size > z * se and size > min_fraction * abs(rise)))


def drift_test(x: np.ndarray, loss_at_wstar: float, z: float = DRIFT_Z,
               min_fraction: float = DRIFT_MIN_FRACTION) -> Shift | None:
    """Two-sided test that the second half of the (C, N) draws has the same mean as the first half.

    SEs from ArviZ's MCSE of each half (pooled over chains). λ̂ = nβ (mean − L*), so
    `fraction` is the relative drift of λ̂ between the halves. None if a half is shorter than
    MIN_WINDOW points.
    """
    half = x.shape[1] // 2
    if half < MIN_WINDOW:
        return None
    rise = float(np.mean(x) - loss_at_wstar)
    return window_shift(x[:, :half], x[:, x.shape[1] - half:], rise, z, min_fraction, two_sided=True)


def spread_exponent(spread: np.ndarray, steps: np.ndarray) -> tuple[float, float] | None:
    """(g, its standard error) for (C, D) draws of ‖w − w*‖² taken at 0-based `steps`.

    Per chain, g_c = log(mean spread of the second half / of the first) / log(t₂ / t₁), t the
    halves' mean step + 1: 1 for free diffusion from w*, 0 at equilibrium. g is the mean over chains,
    its SE their standard deviation / √C (a trending series has no honest autocorrelation-based
    MCSE; independent chains do). None with fewer than 2 chains, halves shorter than MIN_WINDOW
    draws, or a zero spread.
    """
    half = spread.shape[1] // 2
    if half < MIN_WINDOW or spread.shape[0] < 2:
        return None
    t1, t2 = np.mean(steps[:half]) + 1.0, np.mean(steps[len(steps) - half:]) + 1.0
    m1, m2 = np.mean(spread[:, :half], axis=1), np.mean(spread[:, spread.shape[1] - half:], axis=1)
    if not (np.all(m1 > 0) and np.all(m2 > 0) and t2 > t1):
        return None
    g = np.log(m2 / m1) / np.log(t2 / t1)
    return float(np.mean(g)), float(np.std(g, ddof=1) / np.sqrt(g.size))


def _spread_flag(spread: np.ndarray, steps: np.ndarray, th: HealthThresholds) -> list[HealthFlag]:
    out = spread_exponent(spread, steps)
    if out is None:
        return []
    g, se = out
    if g > th.spread_exponent_max and g > th.spread_z * se:
        return [make_flag(
            "still_spreading",
            f"‖w − w*‖² still grows like free diffusion (∝ steps^{g:.2f} ± {se:.2f} between the halves of "
            "the draws): directions with little curvature at w* have not equilibrated.",
        )]
    return []


def unsplit_rank_rhat(x: np.ndarray) -> float:
    """Gelman–Rubin R̂ on rank-normalized (C, N) values, chains not split.

    Ranks make it robust to spikes; not splitting makes it blind to a trend shared by all chains,
    so it measures only whether chains sit at different levels.
    """
    if x.shape[0] < 2 or x.shape[1] < 2:
        return float("nan")
    z = ndtri((rankdata(x, axis=None).reshape(x.shape) - 0.375) / (x.size + 0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(azs.rhat(z, method="identity", chain_axis=0, draw_axis=1))


def _spike_counts(x: np.ndarray, k: float) -> np.ndarray:
    """Per chain, how many points exceed median + k · log10(max(N, 10)) · 1.4826 · MAD."""
    med = np.median(x, axis=1, keepdims=True)
    scale = MAD_TO_SD * np.median(np.abs(x - med), axis=1, keepdims=True)
    # A constant trace has MAD 0; any real jump off it is still a spike.
    scale = np.maximum(scale, 1e-12 * np.maximum(1.0, np.abs(med)))
    return np.sum(x > med + k * np.log10(max(x.shape[1], 10)) * scale, axis=1)


def _trend_flags(name: str, x: np.ndarray, loss_at_wstar: float, th: HealthThresholds) -> list[HealthFlag]:
    """not_leveling (last quarter vs the quarter before) and, if that is quiet, burnin_too_short."""
    n = x.shape[1]
    quarter = n // 4
    if quarter < th.min_window:
        return []
    late_half = x[:, n - 2 * quarter :]
    rise = float(np.mean(late_half) - loss_at_wstar)
    q3, q4 = x[:, n - 2 * quarter : n - quarter], x[:, n - quarter :]
    shift = window_shift(q3, q4, rise, th.trend_z, th.trend_min_fraction)
    if shift.significant:
        return [make_flag(
            "not_leveling",
            f"{name}: the last quarter's mean is {shift.diff:.3g} above the quarter before "
            f"({shift.z:.1f} standard errors, {shift.fraction:.0%} "
            f"of the rise above L_n(w*)); the trace is still climbing.",
        )]
    early = x[:, : max(th.min_window, int(th.early_fraction * n))]
    shift = window_shift(early, late_half, rise, th.trend_z, th.trend_min_fraction)
    if shift.significant:
        return [make_flag(
            "burnin_too_short",
            f"{name}: the first {early.shape[1]} points after burn-in average {shift.diff:.3g} below the "
            f"last half ({shift.z:.1f} standard errors); the chains were "
            "still rising when draws began.",
        )]
    return []


def within_chain_split_rhat(x: np.ndarray) -> float:
    """ArviZ's rank-normalized split R̂ of a (C, N) series with every chain centered on its own mean.

    Centering removes differences between the chains' levels (chains_disagree's business), so what
    is left compares each chain's first half with its second: a chain still drifting. NaN when too short.
    """
    if x.shape[1] < 4:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(azs.rhat(x - x.mean(axis=1, keepdims=True), chain_axis=0, draw_axis=1))


def _drift_flag(name: str, x: np.ndarray, loss_at_wstar: float, th: HealthThresholds) -> list[HealthFlag]:
    """not_converged: the pooled halves differ (drift_test), or the chains' own halves do (split R̂)."""
    shift = drift_test(x, loss_at_wstar, th.drift_z, th.drift_min_fraction)
    if shift is not None and shift.significant:
        return [make_flag(
            "not_converged",
            f"{name}: the second half of the draws averages {shift.diff:+.3g} relative to the first "
            f"({shift.z:+.1f} standard errors; λ̂ moves by {shift.fraction:+.1%} between the halves).",
        )]
    rhat = within_chain_split_rhat(x)
    if rhat > th.split_rhat_max:
        return [make_flag(
            "not_converged",
            f"{name}: within-chain split R̂ = {rhat:.3f} > {th.split_rhat_max:g}: each chain's halves "
            "disagree (the chains still wander, even if their pooled halves agree).",
        )]
    return []


def _series_flags(name: str, x: np.ndarray, chains: np.ndarray, loss_at_wstar: float, n_beta: float,
                  th: HealthThresholds, *, estimated: bool) -> list[HealthFlag]:
    """Every check on one (C, N) series; drift and low_snr only on the series λ̂ is estimated from."""
    flags = _trend_flags(name, x, loss_at_wstar, th)
    if estimated and not flags:  # a trend flag already says the chains have not equilibrated
        flags += _drift_flag(name, x, loss_at_wstar, th)

    spikes = _spike_counts(x, th.spike_k)
    if spikes.any():
        bad = chains[spikes > 0]
        flags.append(make_flag(
            "spikes",
            f"{name}: {int(spikes.sum())} point(s) jump more than {th.spike_k:g}·log10(N) robust standard "
            f"deviations above the chain's median (chains {bad.tolist()}).",
            bad,
        ))

    means = np.mean(x, axis=1)
    ses = np.array([_mcse_mean(x[c : c + 1]) for c in range(x.shape[0])])
    below = means < loss_at_wstar - th.below_wstar_z * ses
    if below.any():
        bad = chains[below]
        flags.append(make_flag(
            "below_wstar",
            f"{name}: chains {bad.tolist()} average {np.min(means[below]) - loss_at_wstar:.3g} "
            f"relative to L_n(w*) = {loss_at_wstar:.6g}, below it by more than "
            f"{th.below_wstar_z:g} standard errors; the sampler found lower loss than w*.",
            bad,
        ))
    elif estimated:
        rise = float(np.mean(x) - loss_at_wstar)
        variance = float(np.mean(np.var(x, axis=1, ddof=1)))
        noise = float(np.sqrt(max(variance - max(rise, 0.0) / n_beta, 0.0)))
        if rise < th.low_snr_min * noise:
            flags.append(make_flag(
                "low_snr",
                f"{name}: the average rise above L_n(w*) ({rise:.3g}) is smaller than "
                f"{th.low_snr_min:g}× the within-chain noise ({noise:.3g}, the standard deviation "
                "beyond the posterior's own spread).",
            ))

    rhat = unsplit_rank_rhat(x)
    if rhat > th.rhat_disagree:
        flags.append(make_flag(
            "chains_disagree",
            f"{name}: chain means {np.array2string(means, precision=4)} differ beyond their "
            f"noise (unsplit rank R̂ = {rhat:.3f} > {th.rhat_disagree:g}).",
        ))
    return flags


def _first_bad_step(trace_c: np.ndarray, diverged_at_c: int) -> int:
    """The runner's divergence step, else the first non-finite loss, else −1 (only draws were bad)."""
    if diverged_at_c >= 0:
        return diverged_at_c
    nonfinite = ~np.isfinite(trace_c)
    return int(np.argmax(nonfinite)) if nonfinite.any() else -1


def check_health(result: ChainResult, thresholds: HealthThresholds = HealthThresholds(),
                 estimate_from: str = "full") -> list[HealthFlag]:
    """Every failed check, one flag per code, in the guide's order.

    Checks run on the post-burn-in per-step loss trace and on the full-data L_n draws; a flag
    fires if either series shows the failure (its message names the series). The drift test
    (not_converged) and low_snr are judged on the series λ̂ is estimated from: the L_n draws
    (estimate_from="full"; the trace when there are no draws) or the per-step trace
    ("minibatch"). Chains that went non-finite raise `nan` and are excluded from every other check.
    """
    th = thresholds
    trace = np.asarray(result.loss_trace, dtype=float)
    draws = np.asarray(result.draw_loss, dtype=float)
    diverged_at = np.asarray(result.diverged_at)
    bad = ~usable_chains(trace, draws, diverged_at=diverged_at)
    flags: list[HealthFlag] = []
    if bad.any():
        where = {int(c): _first_bad_step(trace[c], int(diverged_at[c])) for c in np.flatnonzero(bad)}
        flags.append(make_flag(
            "nan",
            f"{int(bad.sum())} of {len(bad)} chains went non-finite (chain: first bad step "
            f"{where}); they are excluded "
            "from every estimate, never averaged.",
            np.flatnonzero(bad),
        ))
    good = np.flatnonzero(~bad)
    if good.size == 0:
        return flags

    series = []
    post = trace[good, result.num_burnin_steps :]
    has_draws = draws.shape[1] >= 2
    if post.shape[1] >= 2:
        series.append(("loss trace after burn-in", post, estimate_from == "minibatch" or not has_draws))
    if has_draws:
        series.append(("L_n draws", draws[good], estimate_from != "minibatch" or post.shape[1] < 2))
    seen = {f.code for f in flags}
    for name, x, estimated in series:
        for f in _series_flags(name, x, good, result.loss_at_wstar, result.n_beta, th, estimated=estimated):
            # a trend flag on the other series already says the chains have not equilibrated
            if f.code not in seen and not (f.code == "not_converged" and seen & set(NOT_CONVERGED_CODES)):
                seen.add(f.code)
                flags.append(f)

    if result.draw_spread is not None and not seen & set(NOT_CONVERGED_CODES):
        flags += _spread_flag(np.asarray(result.draw_spread, float)[good], np.asarray(result.draw_steps), th)

    diverging = np.asarray(result.diverging, dtype=bool)[good, result.num_burnin_steps :]
    if diverging.size and diverging.mean() > th.max_divergent_fraction:
        chains = good[diverging.any(axis=1)]
        flags.append(make_flag(
            "divergences",
            f"{int(diverging.sum())} divergent transitions after burn-in "
            f"({diverging.mean():.2%} of steps; chains {chains.tolist()}).",
            chains,
        ))
    return flags


# ---------------------------------------------------------------------------------------------
# MALA-style acceptance diagnostic for SGLD: no accept step is taken, the
# Metropolis–Hastings ratio of the SGLD proposal only measures how coarse ε is.
# ---------------------------------------------------------------------------------------------

LogDensityAndGrad = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def mala_log_accept_ratio(logdensity_and_grad: LogDensityAndGrad, w, w_new, step_size) -> jax.Array:
    """log [π(w') q(w | w') / (π(w) q(w' | w))] for the SGLD proposal q(·|w) = N(w + ε/2 ∇log π(w), ε I).

    Uses the full-data log-density and gradient at both points. `step_size` is ε in the seed
    convention (scalar, or per-parameter ε·G for a frozen diagonal preconditioner G).
    The acceptance probability is exp(min(0, ratio)).
    """
    logp, grad = logdensity_and_grad(w)
    logp_new, grad_new = logdensity_and_grad(w_new)
    forward = w_new - w - 0.5 * step_size * grad
    backward = w - w_new - 0.5 * step_size * grad_new
    log_q_forward = -jnp.sum(forward**2 / (2.0 * step_size))
    log_q_backward = -jnp.sum(backward**2 / (2.0 * step_size))
    return logp_new - logp + log_q_backward - log_q_forward


@dataclass(frozen=True)
class MalaCheck:
    mean_accept: float
    accept: np.ndarray  # (K,) acceptance probability of one SGLD proposal from each saved position
    flag: HealthFlag | None


def mala_acceptance(logdensity_and_grad: LogDensityAndGrad, positions, step_size, rng_key,
                    min_accept: float = MALA_MIN_ACCEPT) -> MalaCheck:
    """Mean MALA acceptance of one full-gradient SGLD proposal from each of K saved (K, d) positions."""
    positions = jnp.asarray(positions)
    noise = jax.random.normal(rng_key, positions.shape, dtype=positions.dtype)

    def one(w, eta):
        _, grad = logdensity_and_grad(w)
        w_new = w + 0.5 * step_size * grad + jnp.sqrt(step_size) * eta
        return mala_log_accept_ratio(logdensity_and_grad, w, w_new, step_size)

    log_ratio = np.asarray(jax.vmap(one)(positions, noise), dtype=float)
    # A non-finite ratio means the proposal blew up: count it as a rejection.
    accept = np.where(np.isfinite(log_ratio), np.exp(np.minimum(0.0, np.nan_to_num(log_ratio))), 0.0)
    mean = float(np.mean(accept))
    flag = None
    if mean < min_accept:
        flag = make_flag(
            "mala_low_accept",
            f"mean MALA acceptance of the SGLD proposal is {mean:.2f} < {min_accept:g} "
            "(heuristic threshold): the step is coarse for the local curvature.",
        )
    return MalaCheck(mean, accept, flag)


# ---------------------------------------------------------------------------------------------
# ε-halving check: chains that share a step-size bias agree with each other (R̂ ≈ 1), so only
# rerunning at ε/2 exposes it.
# ---------------------------------------------------------------------------------------------


def step_size_check_summary(llc_eps: float, llc_half: float, *, se_eps: float | None = None,
                            se_half: float | None = None,
                            max_rel_change: float = STEP_SIZE_MAX_REL_CHANGE) -> dict:
    """Compare λ̂ at ε and at ε/2; flag discretization bias when it moved by more than `max_rel_change`.

    Returns a JSON-ready dict: llc_eps, llc_half, rel_change = (λ̂(ε/2) − λ̂(ε)) / |λ̂(ε)| (signed),
    flag (bool), and code / message / remedy of the flag (None when not flagged). With standard
    errors given, the move must also exceed STEP_SIZE_Z combined standard errors, so Monte Carlo
    noise alone does not fire it. A non-finite estimate on either side is flagged.
    """
    llc_eps, llc_half = float(llc_eps), float(llc_half)
    change = llc_half - llc_eps
    if not (np.isfinite(llc_eps) and np.isfinite(llc_half)):
        rel = float("nan")
    elif llc_eps != 0:
        rel = change / abs(llc_eps)
    else:
        rel = 0.0 if change == 0 else float(np.copysign(np.inf, change))
    noisy = False
    if se_eps is not None and se_half is not None:
        noisy = abs(change) <= STEP_SIZE_Z * float(np.hypot(se_eps, se_half))
    flagged = (not np.isfinite(rel) or abs(rel) > max_rel_change) and not noisy
    flag = None
    if flagged:
        flag = make_flag(
            "step_size_bias",
            f"λ̂ = {llc_eps:.4g} at ε and {llc_half:.4g} at ε/2: a {rel:+.1%} change "
            f"(more than {max_rel_change:.0%}).",
        )
    return {
        "llc_eps": llc_eps,
        "llc_half": llc_half,
        "rel_change": rel if np.isfinite(rel) else None,
        "flag": flagged,
        "code": flag.code if flag else None,
        "message": flag.message if flag else None,
        "remedy": flag.remedy if flag else None,
    }
