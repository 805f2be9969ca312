"""The two rules every stage applies alike: which chains count, and what a run's status is."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from llc_bench.types import HealthFlag, Status

# Every status a run can end with, best first.
STATUSES = ("ok", "warnings", "not_converged", "diverged", "failed")
# Flags that say the draws are not yet from the stationary law: a run with one is `not_converged`.
NOT_CONVERGED_CODES = ("not_leveling", "burnin_too_short", "not_converged", "still_spreading", "restart_disagrees")


def usable_chains(*series, diverged_at=None) -> np.ndarray:
    """(C,) bool: chain c counts iff it never diverged (diverged_at[c] < 0, when given) and every
    value of each (C, ...) series is finite in row c. Only these chains enter any estimate or statistic."""
    if not series and diverged_at is None:
        raise ValueError("usable_chains: give at least one series or diverged_at")
    num_chains = np.shape(series[0])[0] if series else np.shape(diverged_at)[0]
    usable = np.ones(num_chains, dtype=bool)
    for s in series:
        s = np.asarray(s)
        if s.shape[:1] != usable.shape:
            raise ValueError(f"every series must have {num_chains} chains first, got shape {s.shape}")
        usable &= np.all(np.isfinite(s), axis=tuple(range(1, s.ndim)))
    if diverged_at is not None:
        diverged_at = np.asarray(diverged_at)
        if diverged_at.shape != usable.shape:
            raise ValueError(f"diverged_at must have shape {usable.shape}, got {diverged_at.shape}")
        usable &= diverged_at < 0
    return usable


def estimate_status(usable) -> Status:
    """failed (no usable chain), diverged (some chains excluded) or ok (all used)."""
    usable = np.asarray(usable, dtype=bool)
    if not usable.any():
        return "failed"
    return "ok" if usable.all() else "diverged"


def run_status(estimate_status: str, flags: Iterable[HealthFlag]) -> str:
    """failed (no usable chain) > diverged (chains excluded) > not_converged > warnings > ok."""
    if estimate_status in ("failed", "diverged"):
        return estimate_status
    codes = {f.code for f in flags}
    if codes & set(NOT_CONVERGED_CODES):
        return "not_converged"
    return "warnings" if codes else "ok"
