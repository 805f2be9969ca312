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

How far out. s must reach the higher-order terms, yet a start too far out is one where the
sampler's ε is no longer stable: the chains of curvature_sgld, whose ε is about kappa times plain
SGLD's, spread ~10× farther in the same steps, and restarted at s = 10 every chain diverged within two
steps (1K instances of the scoreboard; the same at s = 5 on one of them). So the restart first probes
its starts: PROBE_STEPS steps from w* + s·(w_c − w*) for s = run.restart_scale, then s/√2, s/2, …
(not below RESTART_MIN_SCALE); it runs from the largest s at which no chain diverged (the record's
`scale`, with every s tried in `scales_tried`). A sampler with a stiff subspace (SamplerSpec.stiff_basis:
curvature_sgld's preconditioned directions) keeps each chain's component in it, which is already in
equilibrium, and scales only the rest.
Measured with curvature_sgld (restarts of 3,000–5,000 burn-in steps and 20–40 draws 300 steps apart,
scripts/restart_check.py): chains held 1,000 + 6,000 steps on
a six-layer plateau (λ̂ = 31.8, λ = 70.5) read 70.0 from s = 2 and 71.9 from s = 3; after 5,000 + 12,000
steps on instances whose λ is all quadratic they read within 0.8% of λ̂ from s = 2 and 3 (274.0 /
272.9, 274.1; 107.1 / 106.5, 106.8; 347.6 / 346.0, 345.0); and the nine-layer 10K instance whose scoreboard
row reads 911.9 on the plateau rank(H)/2 = 907.5 (λ = 1009.5, HMC 968.7), restarted from its chains
after 50,000 steps, read 947.2 ± 2.4 from s = 2, still rising.

The verdict (restart_verdict): the two λ̂ differ by more than RESTART_Z combined standard errors
AND by more than RESTART_MIN_SHIFT of λ̂ (the drift test's materiality): flag `restart_disagrees`
(not converged). Otherwise they agree when the difference plus RESTART_EQUIV_Z combined standard
errors is within RESTART_MIN_FRACTION of λ̂: the spreading is along directions λ̂ does not depend on,
and the run's `still_spreading` flag is withdrawn (llc_bench.experiment.run_sampler). Anything in
between (a restart too noisy to tell: its chains start far out and may still be coming down) and a
restart with no usable chain decide nothing: `still_spreading` stands. When no scale down to
RESTART_MIN_SCALE can start, every chain being lost from the smallest while the chains' own positions
hold, the loss already rises steeply within a factor RESTART_MIN_SCALE of where the chains have spread
(`walls_bind`): they have reached the higher-order terms, which a plateau has not, and
`still_spreading` is withdrawn. Any other failure to start decides nothing.
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.curvature import auto_step_grad_evals
from llc_bench.estimator import estimate_from_result
from llc_bench.health import make_flag
from llc_bench.posterior import Posterior
from llc_bench.rng import sampler_key
from llc_bench.runner import run_chains_with_state
from llc_bench.samplers import get_spec
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
# A shift of λ̂ this large (and RESTART_Z SEs) is a disagreement even where it is inside
# RESTART_MIN_FRACTION: the deep plateau above moved 3.9% within the restart's first draws, while the
# restarts of λ = rank(H)/2 instances moved at most 0.8% (with up to 6.6 SEs).
RESTART_MIN_SHIFT = 0.02
# The probe of each candidate scale: this many burn-in steps (at most the run's burn-in) from its
# starts; every measured divergence came within the first few. Candidates step down by SCALE_STEP (the
# spread halves). Below RESTART_MIN_SCALE a plateau may move less than RESTART_MIN_SHIFT (the deep
# plateau above moved 3.9% from s = 2) and the equivalence test could then withdraw still_spreading
# on it: the restart is not run there.
PROBE_STEPS = 500
SCALE_STEP = math.sqrt(2.0)
RESTART_MIN_SCALE = 2.0


def restart_outcome(record: dict[str, Any] | None) -> str | None:
    """One word for a run_restart record (None: no restart ran): `disagrees`, `agrees` or
    `inconclusive` (restart_verdict) when the restart gave a λ̂; `walls_bind` when no scale could start
    and the chains' own positions held (stable_scale); `no_start` when no scale could start otherwise
    or the restarted chains were all lost."""
    if record is None:
        return None
    if record.get("llc_restart") is not None:
        return {True: "agrees", False: "disagrees", None: "inconclusive"}[record["agrees"]]
    return "walls_bind" if record.get("walls_bind") else "no_start"


def restart_positions(w_star: jax.Array, positions: jax.Array, scale: float, stiff: jax.Array | None = None) -> jax.Array:
    """(C, d) starts w* + scale · (w_c − w*); with stiff (C, d, k) orthonormal columns per chain, the
    component of w_c − w* in them is kept as it is and only the rest is scaled."""
    w_star = jnp.asarray(w_star)
    offset = jnp.asarray(positions) - w_star
    if stiff is None:
        return w_star + scale * offset
    kept = jnp.einsum("cdk,ck->cd", stiff, jnp.einsum("cdk,cd->ck", stiff, offset))
    return w_star + kept + scale * (offset - kept)


def capped_scale(spec, requested: float) -> float:
    """run.restart_scale for this sampler: cut to its SamplerSpec.restart_scale_cap, if it has one."""
    return requested if spec.restart_scale_cap is None else min(requested, spec.restart_scale_cap)


def candidate_scales(scale: float) -> list[float]:
    """scale, scale/√2, scale/2, … down to RESTART_MIN_SCALE (just scale when it is below that)."""
    out = [float(scale)]
    while scale / SCALE_STEP ** len(out) >= RESTART_MIN_SCALE * (1 - 1e-9):  # 4/√2/√2 must count as 2
        out.append(scale / SCALE_STEP ** len(out))
    return out


def agreement(llc: float, se: float, other: float, other_se: float, z: float = RESTART_Z,
              min_fraction: float = RESTART_MIN_FRACTION, equiv_z: float = RESTART_EQUIV_Z,
              min_shift: float | None = None) -> bool | None:
    """Do two λ̂ (each with its own SE) agree? False when they differ by more than z combined SEs and
    by more than min_shift (None: min_fraction) of |llc|; else True when the difference plus equiv_z
    combined SEs is within min_fraction of |llc| (an equivalence test: a comparison too noisy to tell
    shows nothing); else, and when a value is not finite, None."""
    if not all(math.isfinite(float(v)) for v in (llc, se, other, other_se)):
        return None
    diff, combined = float(other) - float(llc), float(np.hypot(se, other_se))
    tolerance = min_fraction * abs(float(llc))
    shift = tolerance if min_shift is None else min_shift * abs(float(llc))
    if abs(diff) > z * combined and abs(diff) > shift:
        return False
    if abs(diff) + equiv_z * combined <= tolerance:
        return True
    return None


def restart_verdict(llc: float, se: float, llc_restart: float, se_restart: float, scale: float,
                    z: float = RESTART_Z, min_fraction: float = RESTART_MIN_FRACTION,
                    equiv_z: float = RESTART_EQUIV_Z,
                    min_shift: float = RESTART_MIN_SHIFT) -> tuple[dict[str, Any], HealthFlag | None]:
    """(JSON-ready record, `restart_disagrees` flag or None) of λ̂ against the restart's λ̂.

    agrees (`agreement`): False is flagged; True withdraws still_spreading (the caller's part); None
    (too noisy to tell, or a non-finite side) flags nothing and withdraws nothing."""
    finite = all(math.isfinite(float(v)) for v in (llc, se, llc_restart, se_restart))
    diff = float(llc_restart) - float(llc) if finite else math.nan
    combined = float(np.hypot(se, se_restart)) if finite else math.nan
    agrees = agreement(llc, se, llc_restart, se_restart, z, min_fraction, equiv_z, min_shift)
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


class ScaleProbe(NamedTuple):
    """What stable_scale found: the scale to restart from (None: none holds), every scale probed, the
    probes' gradient evaluations, and walls_bind: no candidate holds, every chain was lost from the
    smallest, and none from the chains' own positions (the control, s = 1)."""

    scale: float | None
    tried: list
    grad_evals: float
    walls_bind: bool


def stable_scale(name: str, algorithm: Algorithm, posterior: Posterior, positions: jax.Array, *, seed: int,
                 scale: float, num_chains: int, num_burnin_steps: int, stiff: jax.Array | None = None,
                 devices=None) -> ScaleProbe:
    """The largest of candidate_scales(scale) from whose starts no chain diverges within the probe's
    min(PROBE_STEPS, num_burnin_steps) steps (ScaleProbe). Chains whose start is not finite (lost in
    the run) are left out of the judgement; no such chain at all: nothing holds.

    When no candidate holds and the smallest lost every chain, the chains' own positions are probed
    too: if they hold, the loss rises so steeply within RESTART_MIN_SCALE× the chains' spread that
    the sampler cannot start there (walls_bind). That is the opposite of the plateau the restart
    looks for, where the chains have not reached the higher-order terms and starts 2–3× out hold
    (measured with curvature_sgld on deep linear networks: chains equilibrated at λ̂ = 68.4, λ = 70.5,
    lost every chain from 2.1× and 3× within three steps, one of four from 1.5×, none from 1×; the
    same instance's plateau, and a nine-layer 10K plateau, held from 2× and 3×)."""
    finite = np.all(np.isfinite(np.asarray(positions)), axis=1)
    tried: list[float] = []
    spent = 0.0
    if not finite.any():
        return ScaleProbe(None, tried, spent, False)
    probe = algorithm._replace(retune=None)  # the probe is burn-in only: nothing to retune after it

    def lost(s: float) -> float:
        nonlocal spent
        result, _ = run_chains_with_state(
            name, probe, posterior, sampler_key(seed, name, "restart_probe"), num_chains=num_chains,
            num_burnin_steps=max(1, min(PROBE_STEPS, num_burnin_steps)), num_draws=1, num_steps_bw_draws=1,
            num_projections=0, devices=devices,
            initial_positions=restart_positions(posterior.w_star, positions, s, stiff))
        spent += float(np.sum(result.grad_evals))
        return float(np.mean(np.asarray(result.diverged_at)[finite] >= 0))

    fraction = 0.0
    for s in candidate_scales(scale):
        tried.append(s)
        fraction = lost(s)
        if fraction == 0.0:
            return ScaleProbe(s, tried, spent, False)
    walls_bind = fraction == 1.0 and lost(1.0) == 0.0
    return ScaleProbe(None, tried, spent, walls_bind)


def run_restart(name: str, algorithm: Algorithm, posterior: Posterior, positions, estimate: LLCEstimate, *,
                seed: int, scale: float, num_chains: int, num_burnin_steps: int, num_draws: int,
                num_steps_bw_draws: int, num_projections: int, source: str, chunk_size: int = 0,
                params: Any = None, devices=None,
                progress: bool = False) -> tuple[dict[str, Any], HealthFlag | None]:
    """Restart every chain from w* + s · (its final position − w*) (positions (C, d); keys of the "restart" stream), s
    the largest scale up to `scale` (run.restart_scale, cut to the sampler's cap: capped_scale) its
    starts are stable at (stable_scale), and compare the λ̂ (restart_verdict). For a sampler with a
    stiff basis, its directions from the chains' `params` keep their component (restart_positions). The record
    adds the scales probed, walls_bind (stable_scale) and the restart's cost: grad_evals (its probes
    and retune included), seconds. With no stable scale nothing is run and the record's `agrees` is
    None and its `scale` None; the caller withdraws still_spreading when walls_bind is true. The algorithm's
    tuning notes (AutoStep) take the restart's retune: read what the draws used before calling this."""
    start, tuning = time.perf_counter(), auto_step_grad_evals(algorithm.notes)
    spec = get_spec(name)
    scale = capped_scale(spec, scale)
    stiff = None if spec.stiff_basis is None else spec.stiff_basis(params)
    probed = stable_scale(name, algorithm, posterior, positions, seed=seed, scale=scale, num_chains=num_chains,
                          num_burnin_steps=num_burnin_steps, stiff=stiff, devices=devices)
    chosen, tried, probe_evals = probed.scale, probed.tried, probed.grad_evals
    if chosen is None:
        record, flag = restart_verdict(estimate.mean, estimate.se, math.nan, math.nan, scale)
        record.update(scale=None, scales_tried=tried, walls_bind=probed.walls_bind, grad_evals=probe_evals,
                      seconds=time.perf_counter() - start, num_burnin_steps=0, chains_used=0)
        return record, flag
    result, _ = run_chains_with_state(
        name, algorithm, posterior, sampler_key(seed, name, "restart"), num_chains=num_chains,
        num_burnin_steps=max(1, round(RESTART_BURNIN_FRACTION * num_burnin_steps)), num_draws=num_draws,
        num_steps_bw_draws=num_steps_bw_draws, num_projections=num_projections, chunk_size=chunk_size,
        progress=progress, devices=devices,
        initial_positions=restart_positions(posterior.w_star, positions, chosen, stiff))
    again = estimate_from_result(result, source)
    record, flag = restart_verdict(estimate.mean, estimate.se, again.mean, again.se, chosen)
    # the chains' gradients, the probes', and the retune after the restart's burn-in (step_size = "auto")
    record.update(scales_tried=tried, walls_bind=False,
                  grad_evals=float(np.sum(result.grad_evals)) + probe_evals + auto_step_grad_evals(algorithm.notes) - tuning,
                  seconds=time.perf_counter() - start,
                  num_burnin_steps=result.num_burnin_steps, chains_used=int(again.num_chains_used))
    return record, flag

