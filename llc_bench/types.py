"""Types shared by every layer: a sampling run's result, an LLC estimate, a health flag, a bad-input error.

This module imports no other llc_bench module, so any module can import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import jax
import numpy as np


class ConfigError(ValueError):
    """A bad configuration value: the message is one line naming the key and what is allowed."""


@dataclass(frozen=True)
class ChainResult:
    """What a sampling run keeps (host numpy arrays). Never a (steps x parameters) array.

    C = chains, T = total steps (burn-in included), D = draws, P = projections.
    """

    sampler: str
    loss_trace: np.ndarray  # (C, T) per-step loss reported by the sampler (minibatch or full-data)
    accept: np.ndarray  # (C, T) acceptance probability, NaN where not applicable
    energy_change: np.ndarray  # (C, T) NaN where not applicable
    diverging: np.ndarray  # (C, T) bool, sampler-reported divergent transitions
    draw_loss: np.ndarray  # (C, D) full-data L_n(w) at each draw (NaN after a chain diverged)
    draw_steps: np.ndarray  # (D,) 0-based step index of each draw; all >= num_burnin_steps
    projections: np.ndarray  # (C, D, P) (w - w*) projected on P fixed random unit directions
    diverged_at: np.ndarray  # (C,) int, step at which the chain's loss/position became non-finite; -1 if never
    grad_evals: np.ndarray  # (C,) total work in full-data gradient equivalents, warm-up/tuning included
    warmup_grad_evals: np.ndarray  # (C,) the warm-up/tuning part of grad_evals
    num_burnin_steps: int
    loss_at_wstar: float
    n_beta: float
    wall_s: float  # sampling seconds, compile excluded
    warmup_s: float  # tuning/warm-up seconds, compile excluded
    compile_s: float  # compile seconds (warm-up + sampling functions)
    tuned: dict  # per-sampler tuned parameters summarized for reports (e.g. step_size mean), floats only
    draw_outputs: Any = None  # pytree of (C, D_all, ...) arrays from run_chains' draw_fn (every draw); None without one
    full_draw_outputs: Any = None  # pytree of (C, D, ...) arrays from run_chains' full_draw_fn; None without one
    draw_spread: np.ndarray | None = None  # (C, D) ‖w − w*‖² at each draw_steps (NaN after a chain diverged)

    def burned_in_to(self, step: int) -> ChainResult:
        """The same chains with every step before `step` counted as burn-in: the draws taken earlier are
        dropped, the per-step traces and the work (grad_evals, seconds) are kept whole."""
        if not self.num_burnin_steps <= step <= self.loss_trace.shape[1]:
            raise ValueError(f"step must be in [{self.num_burnin_steps}, {self.loss_trace.shape[1]}], got {step}")
        keep = np.asarray(self.draw_steps) >= step
        num_draws = keep.size

        def cut(tree):
            def leaf(a):
                if np.shape(a)[1] != num_draws:
                    raise ValueError("burned_in_to needs one draw output per draw (full_loss_every = 1)")
                return np.asarray(a)[:, keep]
            return None if tree is None else jax.tree.map(leaf, tree)

        return replace(self, num_burnin_steps=int(step), draw_loss=self.draw_loss[:, keep],
                       draw_steps=np.asarray(self.draw_steps)[keep], projections=self.projections[:, keep],
                       draw_spread=None if self.draw_spread is None else self.draw_spread[:, keep],
                       draw_outputs=cut(self.draw_outputs), full_draw_outputs=cut(self.full_draw_outputs))


# An estimate's status (llc_bench.rules.estimate_status); a run's status adds the health verdicts.
Status = Literal["ok", "diverged", "failed"]


@dataclass(frozen=True)
class LLCEstimate:
    """λ̂ = nβ (E[L_n(w)] - L_n(w*)) pooled over usable chains, with its uncertainty.

    C = chains, D = draws per chain. A chain is usable unless it diverged or has a non-finite draw
    (llc_bench.rules.usable_chains). `se` is `se_between` when at least two chains are usable, else
    `se_batch_means`. status: "ok" (all chains used), "diverged" (some excluded), "failed" (none
    usable: mean and se are NaN, never a number).
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


@dataclass(frozen=True)
class HealthFlag:
    """One failed check: a code, what was seen in plain words, and what to change."""

    code: str
    message: str
    remedy: str
    chains: tuple[int, ...] = ()
