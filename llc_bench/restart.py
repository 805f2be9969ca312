"""The over-dispersed restart: does λ̂ change when the chains start farther out along the directions they were spreading in?

Chains start at w*. On a singular model an SG chain first equilibrates the curved directions of
∇²L_n(w*) and then spreads slowly along the flat ones. Two different situations look the same from
inside one run:

* the flat directions are *level valleys* (the loss does not change along them, as along the
  rescaling orbits of a deep linear network): λ̂ is already right, the spreading does not matter;
* they are flat only to second order (quartic or higher): λ̂ sits near rank(H)/2, far below λ,
  until the chains have spread far enough to feel the higher-order terms. On deep linear networks
  that plateau lasts 10⁵ steps and more, and every per-run statistic (R̂, drift, trend) is quiet.

Gelman and Rubin's remedy for chains that all started in one place is to start them over-dispersed.
The restart does so along exactly the directions in question: each chain c is started again at
w* + s·(w_c − w*), w_c its final position and s = run.restart_scale (10 by default: 100× the
spread), and burned in and drawn as long as the original (so the check costs a second run). In a
level valley the restarted chains come back to the same λ̂; on a plateau they start where the
higher-order terms bind and read a higher one. The missing directions of a depth-L network rise
only at order 2L, so deeper networks need a larger s. Measured with automatic-ε SGLD on deep linear
networks: a seven-layer plateau (λ = 263, reading 64.1) read 65.3 from s = 3 and 101 from s = 5;
three deep 10K-parameter instances with λ ≈ 1.2–1.3 · rank(H)/2 read the same λ̂ from s = 5, two of
them checked at s = 10 moved (126.7 → 453, 176.7 → 590), while instances with λ = rank(H)/2 (level
valleys) agreed at s = 10 (280.6 / 285.3, 346.0 / 347.0, 69.5 / 68.2).

The verdict (restart_verdict): the two λ̂ differ by more than RESTART_Z combined standard errors
AND by more than RESTART_MIN_FRACTION of λ̂: flag `restart_disagrees` (not converged). They agree
when the difference plus RESTART_EQUIV_Z combined standard errors is within RESTART_MIN_FRACTION of
λ̂: the spreading is along directions λ̂ does not depend on, and the run's `still_spreading` flag is
withdrawn (llc_bench.experiment.run_sampler). Anything in between (a restart too noisy to tell: its
chains start far out and may still be coming down) and a restart with no usable chain decide
nothing: `still_spreading` stands.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.curvature import auto_step_grad_evals
from llc_bench.estimator import estimate_from_result
from llc_bench.health import make_flag
from llc_bench.posterior import Posterior
from llc_bench.rng import sampler_key
from llc_bench.runner import run_chains_with_state
from llc_bench.samplers.base import Algorithm
from llc_bench.types import HealthFlag, LLCEstimate

# The restart's burn-in, as a fraction of the run's. The scaling multiplies the energy of the curved
# directions by s²; they relax at the rates at which they rose from w*, but from s² times their
# equilibrium value, so they need at least the original burn-in (measured on a 10K-parameter deep
# linear network with λ = rank(H)/2: after 0.2 of it the restart's draws still fell from 326 to 279,
# against 280 from w*).
RESTART_BURNIN_FRACTION = 1.0
# Thresholds of the two-sample comparison (each λ̂ with its own autocorrelation-aware SE). Disagree:
# the difference exceeds RESTART_Z combined SEs and RESTART_MIN_FRACTION of λ̂. Agree (an equivalence
# test, so that a restart too noisy to tell withdraws nothing): the difference plus RESTART_EQUIV_Z
# combined SEs stays within RESTART_MIN_FRACTION of λ̂. Neither: inconclusive.
RESTART_Z = 4.0
RESTART_EQUIV_Z = 2.0
RESTART_MIN_FRACTION = 0.05


def restart_positions(w_star: jax.Array, positions: jax.Array, scale: float) -> jax.Array:
    """(C, d) starts w* + scale · (w_c − w*)."""
    w_star = jnp.asarray(w_star)
    return w_star + scale * (jnp.asarray(positions) - w_star)


def agreement(llc: float, se: float, other: float, other_se: float, z: float = RESTART_Z,
              min_fraction: float = RESTART_MIN_FRACTION, equiv_z: float = RESTART_EQUIV_Z) -> bool | None:
    """Do two λ̂ (each with its own SE) agree? False when they differ by more than z combined SEs and
    by more than min_fraction of |llc|; True when the difference plus equiv_z combined SEs is within
    min_fraction of |llc| (an equivalence test: a comparison too noisy to tell shows nothing); else,
    and when a value is not finite, None."""
    if not all(math.isfinite(float(v)) for v in (llc, se, other, other_se)):
        return None
    diff, combined = float(other) - float(llc), float(np.hypot(se, other_se))
    tolerance = min_fraction * abs(float(llc))
    if abs(diff) > z * combined and abs(diff) > tolerance:
        return False
    if abs(diff) + equiv_z * combined <= tolerance:
        return True
    return None


def restart_verdict(llc: float, se: float, llc_restart: float, se_restart: float, scale: float,
                    z: float = RESTART_Z, min_fraction: float = RESTART_MIN_FRACTION,
                    equiv_z: float = RESTART_EQUIV_Z) -> tuple[dict[str, Any], HealthFlag | None]:
    """(JSON-ready record, `restart_disagrees` flag or None) of λ̂ against the restart's λ̂.

    agrees (`agreement`): False is flagged; True withdraws still_spreading (the caller's part); None
    (too noisy to tell, or a non-finite side) flags nothing and withdraws nothing."""
    finite = all(math.isfinite(float(v)) for v in (llc, se, llc_restart, se_restart))
    diff = float(llc_restart) - float(llc) if finite else math.nan
    combined = float(np.hypot(se, se_restart)) if finite else math.nan
    agrees = agreement(llc, se, llc_restart, se_restart, z, min_fraction, equiv_z)
    record = {"scale": float(scale), "llc": float(llc), "llc_restart": float(llc_restart) if finite else None,
              "se_restart": float(se_restart) if finite else None, "diff": diff if finite else None,
              "z": diff / combined if finite and combined > 0 else None, "agrees": agrees}
    flag = None
    if agrees is False:
        flag = make_flag(
            "restart_disagrees",
            f"chains restarted at {scale:g}× their distance from w* read λ̂ = {llc_restart:.4g} ± {se_restart:.2g} "
            f"against {llc:.4g} ± {se:.2g} ({diff / combined:+.1f} standard errors): λ̂ still depends on how "
            "far the chains have spread along the directions that are flat at w*.",
        )
    return record, flag


def run_restart(name: str, algorithm: Algorithm, posterior: Posterior, states, estimate: LLCEstimate, *,
                seed: int, scale: float, num_chains: int, num_burnin_steps: int, num_draws: int,
                num_steps_bw_draws: int, num_projections: int, source: str, chunk_size: int = 0,
                devices=None, progress: bool = False) -> tuple[dict[str, Any], HealthFlag | None]:
    """Restart every chain from w* + scale · (its final position − w*) (keys of the "restart" stream)
    and compare the λ̂ (restart_verdict). The record adds the restart's cost: grad_evals (its
    retune's included), seconds. The algorithm's tuning notes (AutoStep) take the restart's retune:
    read what the draws used before calling this."""
    start, tuning = time.perf_counter(), auto_step_grad_evals(algorithm.notes)
    positions = jax.vmap(algorithm.position)(states)
    result, _ = run_chains_with_state(
        name, algorithm, posterior, sampler_key(seed, name, "restart"), num_chains=num_chains,
        num_burnin_steps=max(1, round(RESTART_BURNIN_FRACTION * num_burnin_steps)), num_draws=num_draws,
        num_steps_bw_draws=num_steps_bw_draws, num_projections=num_projections, chunk_size=chunk_size,
        progress=progress, devices=devices,
        initial_positions=restart_positions(posterior.w_star, positions, scale))
    again = estimate_from_result(result, source)
    record, flag = restart_verdict(estimate.mean, estimate.se, again.mean, again.se, scale)
    # the chains' gradients plus the retune after the restart's burn-in (step_size = "auto")
    record.update(grad_evals=float(np.sum(result.grad_evals)) + auto_step_grad_evals(algorithm.notes) - tuning,
                  seconds=time.perf_counter() - start,
                  num_burnin_steps=result.num_burnin_steps, chains_used=int(again.num_chains_used))
    return record, flag

