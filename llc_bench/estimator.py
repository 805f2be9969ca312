"""LLC point estimate, standard errors, running estimate and block-bootstrap interval from per-draw losses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from llc_bench.runner import ChainResult

Status = Literal["ok", "diverged", "failed"]


@dataclass(frozen=True)
class LLCEstimate:
    """λ̂ = nβ (E[L_n(w)] - L_n(w*)) pooled over usable chains, with its uncertainty.

    C = chains, D = draws per chain. A chain is usable unless it diverged or has a non-finite draw.
    `se` is `se_between` when at least two chains are usable, else `se_batch_means`.
    status: "ok" (all chains used), "diverged" (some excluded), "failed" (none usable: mean and
    se are NaN, never a number).
    """

    mean: float
    se: float
    se_between: float
    se_batch_means: float
    per_chain: np.ndarray  # (C,) λ̂_c; NaN for excluded chains
    running: np.ndarray  # (C, D) λ̂_{c,t} = nβ (mean of draws 1..t - L*), all chains
    num_chains_used: int
    excluded: tuple[int, ...]
    status: Status


def _validate(draw_loss, loss_at_wstar: float, n_beta: float) -> np.ndarray:
    draw_loss = np.asarray(draw_loss, dtype=np.float64)
    if draw_loss.ndim != 2 or draw_loss.shape[1] < 1:
        raise ValueError(f"draw_loss must have shape (chains, draws >= 1), got {draw_loss.shape}")
    if not math.isfinite(loss_at_wstar):
        raise ValueError(f"loss_at_wstar must be finite, got {loss_at_wstar}")
    if not (math.isfinite(n_beta) and n_beta > 0):
        raise ValueError(f"n_beta must be positive and finite, got {n_beta}")
    return draw_loss


def usable_chains(draw_loss: np.ndarray, diverged_at=None) -> np.ndarray:
    """(C,) bool: chain c is usable iff diverged_at[c] < 0 and all its draws are finite."""
    usable = np.all(np.isfinite(draw_loss), axis=1)
    if diverged_at is not None:
        diverged_at = np.asarray(diverged_at)
        if diverged_at.shape != usable.shape:
            raise ValueError(f"diverged_at must have shape {usable.shape}, got {diverged_at.shape}")
        usable &= diverged_at < 0
    return usable


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
    usable = usable_chains(draw_loss, diverged_at)
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
            status="failed",
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
        status="ok" if not excluded else "diverged",
    )


def estimate_from_result(
    result: ChainResult, source: Literal["full", "minibatch"] = "full"
) -> LLCEstimate:
    """`estimate_llc` on a ChainResult.

    source="full": the full-data L_n(w) recorded at each draw (result.draw_loss).
    source="minibatch": the sampler's per-step loss after burn-in, loss_trace[:, num_burnin_steps:]
    (free, but a minibatch loss is a noisy, for SGLD slightly lagged, proxy of L_n(w)).
    """
    if source == "full":
        draw_loss = result.draw_loss
    elif source == "minibatch":
        draw_loss = result.loss_trace[:, result.num_burnin_steps :]
    else:
        raise ValueError(f"source must be 'full' or 'minibatch', got {source!r}")
    return estimate_llc(draw_loss, result.loss_at_wstar, result.n_beta, result.diverged_at)


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
    chains = draw_loss[usable_chains(draw_loss, diverged_at)]
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
