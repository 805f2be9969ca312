"""ArviZ view of a ChainResult: DataTree conversion, R̂/ESS/MCSE on healthy chains, autocorrelation, ESS evolution."""

from __future__ import annotations

import warnings

import arviz_base as azb
import arviz_stats as azs
import numpy as np
import xarray as xr

from llc_bench.rules import usable_chains
from llc_bench.types import ChainResult

# arviz's tail ESS needs its quantiles spelled out on the array interface; these are its defaults.
TAIL_PROBS = (0.05, 0.95)
# Fewer draws per chain than this and arviz returns NaN for ESS/R̂ anyway; we skip the call.
MIN_DRAWS = 4


def per_draw_llc(result: ChainResult) -> np.ndarray:
    """nβ (L_n(w_draw) − L_n(w*)) per draw, (C, D): the WBIC estimator's summand."""
    return result.n_beta * (np.asarray(result.draw_loss, dtype=float) - result.loss_at_wstar)


def to_datatree(result: ChainResult, llc_running: np.ndarray | None = None) -> xr.DataTree:
    """DataTree with `posterior` (chain, draw) and `sample_stats` (chain, step) groups.

    posterior: L_n (full-data loss per draw), llc (the running λ̂ if given, else the per-draw
    summand nβ (L_n − L*)), theta_proj (chain, draw, proj); the non-index coordinate
    `draw_step` holds the sampler step of each draw.
    sample_stats: per-step loss / accept / energy_change / diverging over ALL steps (burn-in
    included, hence `step` rather than ArviZ's `draw`), and per-chain grad_evals, warmup_grad_evals,
    diverged_at.
    """
    draw_loss = np.asarray(result.draw_loss, dtype=float)
    llc = per_draw_llc(result) if llc_running is None else np.asarray(llc_running, dtype=float)
    if llc.shape != draw_loss.shape:
        raise ValueError(f"llc_running shape {llc.shape} != draw_loss shape {draw_loss.shape}")
    attrs = {
        "sampler": result.sampler,
        "n_beta": float(result.n_beta),
        "loss_at_wstar": float(result.loss_at_wstar),
        "num_burnin_steps": int(result.num_burnin_steps),
    }
    with warnings.catch_warnings():
        # Short runs legitimately have more chains than draws; arviz's dimension-naming hint is noise.
        warnings.filterwarnings("ignore", message="Found chain dimension to be longer")
        tree = azb.from_dict(
            {
                "posterior": {
                    "L_n": draw_loss,
                    "llc": llc,
                    "theta_proj": np.asarray(result.projections, dtype=float),
                }
            },
            dims={"theta_proj": ["proj"]},
            attrs={"/": attrs},
        )
    # `draw` stays 0..D−1 (arviz slices lags and ranks by label); the sampler step rides along.
    posterior = tree["posterior"].to_dataset()
    tree["posterior"] = xr.DataTree(
        posterior.assign_coords(draw_step=("draw", np.asarray(result.draw_steps, dtype=int)))
    )
    # Per-step and per-chain arrays have no `draw` axis, so only `chain` is a sample dim here.
    sample_stats = azb.dict_to_dataset(
        {
            "loss": np.asarray(result.loss_trace, dtype=float),
            "accept": np.asarray(result.accept, dtype=float),
            "energy_change": np.asarray(result.energy_change, dtype=float),
            "diverging": np.asarray(result.diverging, dtype=bool),
            "grad_evals": np.asarray(result.grad_evals, dtype=float),
            "warmup_grad_evals": np.asarray(result.warmup_grad_evals, dtype=float),
            "diverged_at": np.asarray(result.diverged_at, dtype=int),
        },
        sample_dims=["chain"],
        dims={
            "loss": ["step"],
            "accept": ["step"],
            "energy_change": ["step"],
            "diverging": ["step"],
            "grad_evals": [],
            "warmup_grad_evals": [],
            "diverged_at": [],
        },
    )
    tree["sample_stats"] = xr.DataTree(sample_stats)
    return tree


def healthy_chains(draw_loss: np.ndarray, diverged_at: np.ndarray | None = None) -> np.ndarray:
    """Indices of the usable chains (llc_bench.rules.usable_chains): they alone enter any statistic."""
    return np.flatnonzero(usable_chains(np.asarray(draw_loss, dtype=float), diverged_at=diverged_at))


def _stats(x: np.ndarray) -> dict:
    """R̂ (rank), bulk/tail ESS and MCSE of the mean of (C, D[, P]) draws; NaN where undefined."""
    out = {"mean": np.nan, "rhat": np.nan, "ess_bulk": np.nan, "ess_tail": np.nan, "mcse_mean": np.nan}
    if x.ndim == 3:
        per = [_stats(x[..., p]) for p in range(x.shape[-1])]
        return {k: np.array([s[k] for s in per]) for k in out}
    if x.shape[0] == 0 or x.shape[1] < MIN_DRAWS:
        return out
    kw = {"chain_axis": 0, "draw_axis": 1}
    with warnings.catch_warnings():
        # constant data makes arviz divide 0/0; the NaN it returns is the honest answer
        warnings.simplefilter("ignore", RuntimeWarning)
        out["mean"] = float(np.mean(x))
        out["ess_bulk"] = float(azs.ess(x, method="bulk", **kw))
        out["ess_tail"] = float(azs.ess(x, method="tail", prob=TAIL_PROBS, **kw))
        out["mcse_mean"] = float(azs.mcse(x, method="mean", **kw))
        if x.shape[0] >= 2:
            out["rhat"] = float(azs.rhat(x, method="rank", **kw))
    return out


def convergence(tree: xr.DataTree) -> dict:
    """R̂ (rank-normalized split), ESS bulk/tail and MCSE of the mean for L_n and each projection.

    Only chains that never diverged (finite draws, diverged_at < 0) are used: a NaN chain must be
    reported, not averaged. Returns {"chains_used", "chains_excluded", "L_n": {...},
    "theta_proj": {... arrays over proj}}; R̂ is NaN with fewer than two healthy chains.
    """
    post = tree["posterior"]
    draw_loss = post["L_n"].values
    diverged_at = None
    if "sample_stats" in tree.children and "diverged_at" in tree["sample_stats"].data_vars:
        diverged_at = tree["sample_stats"]["diverged_at"].values
    good = healthy_chains(draw_loss, diverged_at)
    proj = post["theta_proj"].values[good]
    proj_ok = np.all(np.isfinite(proj), axis=(1, 2))
    return {
        "chains_used": [int(c) for c in good],
        "chains_excluded": [int(c) for c in np.setdiff1d(np.arange(draw_loss.shape[0]), good)],
        "L_n": _stats(draw_loss[good]),
        "theta_proj": _stats(proj[proj_ok]),
    }


def autocorrelation(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Per-chain autocorrelation ρ_k for k = 0..max_lag of (C, D) draws; NaN rows for non-finite chains."""
    x = np.asarray(x, dtype=float)
    max_lag = int(min(max_lag, x.shape[1] - 1))
    out = np.full((x.shape[0], max_lag + 1), np.nan)
    ok = usable_chains(x)
    if not ok.any():
        return out
    try:
        from arviz_stats.base import (
            array_stats,  # not in every arviz-stats release: the FFT fallback below
        )

        rho = array_stats.autocorr(x[ok], axis=-1)
    except (ImportError, AttributeError):
        rho = _autocorr_fft(x[ok])
    out[ok] = rho[:, : max_lag + 1]
    return out


def _autocorr_fft(x: np.ndarray) -> np.ndarray:
    """Fallback FFT autocorrelation (biased estimator, as arviz) along the last axis."""
    n = x.shape[-1]
    xc = x - x.mean(axis=-1, keepdims=True)
    f = np.fft.rfft(xc, n=2 * n, axis=-1)
    acov = np.fft.irfft(f * np.conj(f), n=2 * n, axis=-1)[..., :n] / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return acov / acov[..., :1]


def ess_evolution(draw_loss: np.ndarray, num_points: int = 10) -> np.ndarray:
    """(num_points, 2) rows of (draws per chain so far, bulk ESS of L_n over healthy chains).

    ESS should grow roughly linearly in the draws; a plateau means the chains stopped exploring.
    """
    draw_loss = np.asarray(draw_loss, dtype=float)
    x = draw_loss[healthy_chains(draw_loss)]
    num_draws = draw_loss.shape[1]
    if num_draws < MIN_DRAWS:
        return np.empty((0, 2))
    sizes = np.unique(np.linspace(MIN_DRAWS, num_draws, num_points).round().astype(int))
    rows = []
    for k in sizes:
        ess = _stats(x[:, :k])["ess_bulk"] if x.shape[0] else np.nan
        rows.append((float(k), ess))
    return np.array(rows)
