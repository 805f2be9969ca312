"""Chain runner: all chains vmapped in one jitted lax.scan, run in chunks with a host-side progress bar."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
