"""LLC point estimate, standard errors, running estimate and block-bootstrap interval from per-draw losses."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from llc_bench.rules import estimate_status, usable_chains
from llc_bench.samplers import SAMPLER_NAMES, get_spec
from llc_bench.types import ChainResult, HealthFlag, LLCEstimate


def _validate(draw_loss, loss_at_wstar: float, n_beta: float) -> np.ndarray:
    draw_loss = np.asarray(draw_loss, dtype=np.float64)
    if draw_loss.ndim != 2 or draw_loss.shape[1] < 1:
        raise ValueError(f"draw_loss must have shape (chains, draws >= 1), got {draw_loss.shape}")
    if not math.isfinite(loss_at_wstar):
        raise ValueError(f"loss_at_wstar must be finite, got {loss_at_wstar}")
    if not (math.isfinite(n_beta) and n_beta > 0):
        raise ValueError(f"n_beta must be positive and finite, got {n_beta}")
    return draw_loss


def batch_means_variance(chain: np.ndarray) -> float:
    """Variance of one chain's mean from B = ⌊√D⌋ non-overlapping batches of b = ⌊D/B⌋ draws.

    Var(x̄) ≈ s²_B / B, s²_B = sample variance (ddof 1) of the batch means. The first D - B b draws
    are dropped from the variance estimate only (a remainder at the start is the least stationary part).
    NaN when B < 2.
    """
    num_draws = chain.shape[0]
    num_batches = math.isqrt(num_draws)
    if num_batches < 2:
        return math.nan
    batch_len = num_draws // num_batches
    tail = chain[num_draws - num_batches * batch_len :]
    batch_means = tail.reshape(num_batches, batch_len).mean(axis=1)
    return float(np.var(batch_means, ddof=1) / num_batches)


def estimate_llc(draw_loss, loss_at_wstar: float, n_beta: float, diverged_at=None) -> LLCEstimate:
    """λ̂ = nβ (mean over usable chains and draws of L_n(w) - L_n(w*)) (Lau et al., Def. of LLC estimator).

    per chain      λ̂_c = nβ (x̄_c - L*)
    pooled         λ̂ = mean_c λ̂_c over the C_u usable chains (equal D, so = the pooled draw mean)
    between-chain  SE = std(λ̂_c, ddof=1) / √C_u   (NaN when C_u < 2)
    batch means    SE = nβ √(Σ_c Var(x̄_c)) / C_u  (`batch_means_variance` per chain)
    running        λ̂_{c,t} = nβ ((1/t) Σ_{s<=t} x_{c,s} - L*)  (Hitchcock & Hoogland, Def. 3.1)
    """
    draw_loss = _validate(draw_loss, loss_at_wstar, n_beta)
    num_chains, num_draws = draw_loss.shape
    usable = usable_chains(draw_loss, diverged_at=diverged_at)
    excluded = tuple(int(c) for c in np.flatnonzero(~usable))
    # Divergent chains overflow in cumsum by design (inf/NaN rows); that is what the plot should show.
    with np.errstate(over="ignore", invalid="ignore"):
        running = n_beta * (
            np.cumsum(draw_loss, axis=1) / np.arange(1, num_draws + 1) - loss_at_wstar
        )
    per_chain = np.where(usable, running[:, -1], np.nan)
    num_used = int(usable.sum())

    if num_used == 0:
        return LLCEstimate(
            mean=math.nan,
            se=math.nan,
            se_between=math.nan,
            se_batch_means=math.nan,
            per_chain=per_chain,
            running=running,
            num_chains_used=0,
            excluded=excluded,
            status=estimate_status(usable),
        )

    used = per_chain[usable]
    mean = float(used.mean())
    se_between = float(used.std(ddof=1) / math.sqrt(num_used)) if num_used >= 2 else math.nan
    chain_vars = [batch_means_variance(draw_loss[c]) for c in np.flatnonzero(usable)]
    se_batch_means = float(n_beta * math.sqrt(sum(chain_vars)) / num_used)
    return LLCEstimate(
        mean=mean,
        se=se_between if num_used >= 2 else se_batch_means,
        se_between=se_between,
        se_batch_means=se_batch_means,
        per_chain=per_chain,
        running=running,
        num_chains_used=num_used,
        excluded=excluded,
        status=estimate_status(usable),
    )


def resolve_source(source: str, sampler: str) -> Literal["full", "minibatch"]:
    """estimate_from "auto": the per-step loss ("minibatch") for SG samplers, the full-data draws otherwise.

    An SG step already computes L_m(w_t) on an independent minibatch drawn with replacement, so
    E[L_m(w_t) | w_t] = L_n(w_t): averaging it over every post-burn-in step estimates E[L_n] at no
    cost, from T draws instead of T/k. Full-batch samplers report L_n itself and keep their draws.
    """
    if source == "auto":  # a minibatch sampler's StepInfo.loss is L_m of the step's own fresh batch
        return "minibatch" if sampler in SAMPLER_NAMES and get_spec(sampler).minibatch else "full"
    if source not in ("full", "minibatch"):
        raise ValueError(f"source must be 'auto', 'full' or 'minibatch', got {source!r}")
    return source


def estimate_series(result: ChainResult, source: Literal["full", "minibatch"] = "full") -> np.ndarray:
    """The (C, N) loss series λ̂ is estimated from: the draws' L_n, or the per-step loss after burn-in."""
    if source == "full":
        return result.draw_loss
    if source == "minibatch":
        return result.loss_trace[:, result.num_burnin_steps :]
    raise ValueError(f"source must be 'full' or 'minibatch', got {source!r}")


def estimate_from_result(
    result: ChainResult, source: Literal["full", "minibatch"] = "full"
) -> LLCEstimate:
    """`estimate_llc` on a ChainResult.

    source="full": the full-data L_n(w) recorded at each draw (result.draw_loss).
    source="minibatch": the sampler's per-step loss after burn-in, loss_trace[:, num_burnin_steps:]
    (SG samplers: the minibatch L_m at each step's start position, an unbiased, noisier proxy of
    L_n(w) at every step; full-batch samplers: L_n at each step's end position).
    """
    return estimate_llc(estimate_series(result, source), result.loss_at_wstar, result.n_beta, result.diverged_at)


def running_at_draws(estimate: LLCEstimate, result: ChainResult, source: str) -> np.ndarray:
    """(C, D) running λ̂ at the draws (the per-step running estimate read at each draw's step)."""
    if source == "full":
        return estimate.running
    return estimate.running[:, np.asarray(result.draw_steps) - result.num_burnin_steps]


# The per-step and full-data estimates come from the same chains (positively correlated, so the
# combined SE overstates the difference's), but their SEs come from few chains: with 4 chains a
# ratio to between-chain SEs is t-distributed with 3 degrees of freedom, |t_3| > 4 on 2.8% of
# correct runs (> 2 on 14%).
CROSS_CHECK_Z = 4.0


def cross_check(per_step: LLCEstimate, full: LLCEstimate, z_max: float = CROSS_CHECK_Z) -> dict | None:
    """The per-step and full-data λ̂ side by side: z = |difference| / sqrt(SE_step² + SE_full²).

    Returns None when either estimate has no number or no finite SE (e.g. one full-data draw per
    chain); `disagree` is z > z_max. A disagreement means L_m is not an unbiased estimate of L_n
    at the chains' positions (a loss that is not a mean of per-sample terms, batches that are not
    independent of the position) or the two schedules saw different parts of a drifting trace.
    """
    values = (per_step.mean, per_step.se, full.mean, full.se)
    if not all(math.isfinite(v) for v in values):
        return None
    combined = math.hypot(per_step.se, full.se)
    diff = per_step.mean - full.mean
    z = abs(diff) / combined if combined > 0 else (0.0 if diff == 0 else math.inf)
    return {"llc_per_step": per_step.mean, "se_per_step": per_step.se, "llc_full": full.mean,
            "se_full": full.se, "difference": diff, "z": z, "z_max": z_max, "disagree": bool(z > z_max)}


def cross_check_flag(check: dict | None):
    """A HealthFlag when the cross-check disagrees, else None."""
    if check is None or not check["disagree"]:
        return None
    return HealthFlag(
        "estimates_disagree",
        f"The per-step λ̂ {check['llc_per_step']:.4g} ± {check['se_per_step']:.2g} and the full-data λ̂ "
        f"{check['llc_full']:.4g} ± {check['se_full']:.2g} differ by {check['z']:.1f} combined SEs "
        f"(alarm above {check['z_max']:g}).",
        "Check that the loss is a mean of per-sample terms (L_m unbiased for L_n) and that the chains "
        "have equilibrated (longer burn-in); or estimate from the full-data draws (estimate_from = \"full\").",
    )


def block_bootstrap_ci(
    draw_loss,
    loss_at_wstar: float,
    n_beta: float,
    block_len: int | None = None,
    num_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    diverged_at=None,
) -> tuple[float, float]:
    """Percentile interval for the pooled λ̂ from a moving-block bootstrap within each usable chain.

    Each replicate rebuilds every usable chain from k = ⌈D/b⌉ blocks x_{s..s+b-1}, s ~ U{0..D-b},
    truncated to D draws (Künsch 1989); λ̂* = nβ (mean_c x̄*_c - L*). Default b = ⌈D^(1/3)⌉, capped
    at D. Returns (NaN, NaN) when no chain is usable.
    """
    draw_loss = _validate(draw_loss, loss_at_wstar, n_beta)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if num_boot < 1:
        raise ValueError(f"num_boot must be >= 1, got {num_boot}")
    chains = draw_loss[usable_chains(draw_loss, diverged_at=diverged_at)]
    num_used, num_draws = chains.shape
    if num_used == 0:
        return math.nan, math.nan
    if block_len is None:
        # The cube root is the MSE-optimal order for variance estimation (Hall, Horowitz & Jing 1995).
        block_len = math.ceil(num_draws ** (1 / 3) - 1e-9)
    if block_len < 1:
        raise ValueError(f"block_len must be >= 1, got {block_len}")
    block_len = min(block_len, num_draws)
    num_blocks = -(-num_draws // block_len)
    last_len = num_draws - (num_blocks - 1) * block_len

    # Block sums from prefix sums: sum(x[s:s+m]) = cs[s+m] - cs[s].
    prefix = np.concatenate([np.zeros((num_used, 1)), np.cumsum(chains, axis=1)], axis=1)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, num_draws - block_len + 1, size=(num_boot, num_used, num_blocks))
    rows = np.arange(num_used)[None, :, None]
    lengths = np.full(num_blocks, block_len)
    lengths[-1] = last_len
    sums = prefix[rows, starts + lengths] - prefix[rows, starts]
    boot_chain_means = sums.sum(axis=2) / num_draws  # (num_boot, C_u)
    boot = n_beta * (boot_chain_means.mean(axis=1) - loss_at_wstar)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return float(lo), float(hi)


def wnv(se: float, wall_s: float, grad_evals: float) -> tuple[float, float]:
    """Work-normalized variance: (SE² · wall seconds, SE² · full-data gradient evaluations).

    Lower is better; comparable across samplers with different costs per draw. Pass the total work
    of the run (all chains, warm-up included) and wall time without compilation.
    """
    variance = float(se) ** 2
    return variance * float(wall_s), variance * float(grad_evals)
