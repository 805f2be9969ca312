"""sample()'s post-processing: λ̂ (compute_llc, with the pipeline's health checks), the Bayesian influence
function (compute_bif), susceptibilities, and the ChainResult view of a tree for llc_bench.health and
llc_bench.plots (chain_result)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from llc_bench.estimator import cross_check, cross_check_flag, estimate_llc, resolve_source
from llc_bench.rules import run_status, usable_chains
from llc_bench.types import ChainResult


def _dataset(tree):
    import xarray as xr  # deferred: loaded in the background while the chains run (_prefetch_imports_once)

    if isinstance(tree, xr.DataTree):
        return tree.to_dataset()
    if isinstance(tree, xr.Dataset):
        return tree
    raise TypeError(f"expected the DataTree returned by sample(), got {type(tree).__name__}")


def _burnin(num_burnin_draws: int, num_draws: int, need: int = 1) -> int:
    if not 0 <= num_burnin_draws <= num_draws - need:
        raise ValueError(f"num_burnin_draws must be in [0, {num_draws - need}] (leaving >= {need} draws), "
                         f"got {num_burnin_draws}")
    return num_burnin_draws


@dataclass(frozen=True)
class LLCResult:
    """λ̂ from a sample() tree: pooled over usable chains, with the experiment pipeline's health checks.

    status: "ok", "warnings" (health flags fired), "not_converged" (a trend flag: the draws are not
    yet stationary), "diverged" (chains excluded), "failed" (none usable).
    cross_check: SG methods, the per-step λ̂ beside the full-data draws' (llc_bench.estimator.
    cross_check; a disagreement is the flag `estimates_disagree`); None otherwise.
    step_bias, llc_debiased: with sample(..., step_bias=True), the step size's estimated first-order
    bias of λ̂ (attrs["run"]["step_bias"]["applied"]) and llc_mean minus it; None otherwise.
    """

    llc_mean: float
    llc_se: float
    per_chain: np.ndarray  # (C,) NaN for excluded chains
    status: str
    flags: tuple  # llc_bench.health.HealthFlag
    estimate: Any  # llc_bench.estimator.LLCEstimate (running estimate, SEs, excluded chains)
    loss_at_wstar: float
    n_beta: float
    source: str
    num_burnin_draws: int
    cross_check: dict | None = None
    step_bias: float | None = None
    llc_debiased: float | None = None


def _resolve_llc_source(ds, source: str) -> str:
    """source="auto": "minibatch" (the per-step loss) for SG methods, "full" for full-batch ones."""
    if source != "auto":
        return source
    return resolve_source("auto", str(ds.attrs.get("options", {}).get("sampling_method", "")))


def _full_draws(ds, burn: int) -> tuple[np.ndarray, np.ndarray]:
    """((C, F') full-data L_n, (F',) their steps) of the full-data draws at or after draw `burn`."""
    keep = np.asarray(ds["full_draw_index"]) >= burn
    return (np.asarray(ds["full_loss"], np.float64)[:, keep], np.asarray(ds["full_draw_step"])[keep])


def _llc_draws(ds, source: str, burn: int) -> tuple[np.ndarray, int]:
    """(C, N) loss series for λ̂ and the number of leading steps of metrics_loss to skip."""
    k = int(ds.attrs.get("options", {}).get("num_steps_bw_draws", 1))
    burn_steps = int(ds.attrs.get("options", {}).get("num_burnin_steps", 0)) + burn * k
    if source == "full":
        return _full_draws(ds, burn)[0], burn_steps
    if source == "sampling":  # batches have equal sizes: the mean of batch means is the mean of all
        if "sampling_loss" not in ds:
            raise ValueError("source='sampling' needs the sampling batches: sample(..., sampling_loss=True)")
        s = np.asarray(ds["sampling_loss"], np.float64)
        return s.reshape(*s.shape[:2], -1).mean(axis=2)[:, burn:], burn_steps
    if source == "minibatch":
        return np.asarray(ds["metrics_loss"], np.float64)[:, burn_steps:], burn_steps
    raise ValueError(f"source must be 'auto', 'full', 'sampling' or 'minibatch', got {source!r}")


def _baseline(ds) -> float:
    """L_n(w*) as the draws' L_n is computed (stores without it: the float64 mean of init_loss)."""
    if "full_loss_at_wstar" in ds:
        return float(ds["full_loss_at_wstar"])
    return float(np.mean(np.asarray(ds["init_loss"], np.float64)[0]))


def compute_llc(tree, num_burnin_draws: int = 0, source: str = "full") -> LLCResult:
    """λ̂ = nβ ( mean over usable chains and post-burn-in draws of L(w) − L_n(w*) ).

    L_n(w*) = full_loss_at_wstar: the FULL-data loss at w* (the mean of init_loss, computed the way the
    draws' full_loss is, so a chain that never moves gives exactly 0), never a minibatch average. Draws
    before `num_burnin_draws` are dropped (on top of the sampler's num_burnin_steps; for the per-step
    source, the steps up to that draw). L(w):
      source="full"      (default) full-data L_n(w) at the full-data draws (full_loss)
      source="minibatch" the sampler's own per-step loss at every post-burn-in step (metrics_loss;
                         SG methods: L_m of each step's independent minibatch, unbiased for L_n at
                         that step's position; free, noisier) = the pipeline's estimate_from="minibatch"
      source="auto"      "minibatch" for SG methods, "full" for full-batch ones
      source="sampling"  mean of the k fresh random batches at each draw (sampling_loss, needs
                         sample(..., sampling_loss=True); unbiased, noisier: devinterp's estimate)
    Per-chain values, SEs and exclusion of diverged / non-finite chains follow
    llc_bench.estimator.estimate_llc; health flags follow llc_bench.health.check_health on the
    same post-burn-in series and the full-data draws (chain_result(tree, num_burnin_draws, source)). For SG methods the per-step and the
    full-data λ̂ check each other (LLCResult.cross_check; flag `estimates_disagree`), as in the
    pipeline.
    """
    # deferred: arviz-stats and scipy.stats, loaded in the background while the chains run
    from llc_bench.health import check_health

    ds = _dataset(tree)
    source = _resolve_llc_source(ds, source)
    burn = _burnin(num_burnin_draws, ds.sizes["draw"])
    draws, burn_steps = _llc_draws(ds, source, burn)
    loss_at_wstar = _baseline(ds)
    n_beta = float(ds["n_beta"])
    diverged_at = np.asarray(ds["diverged_at"], np.int64)
    estimate = estimate_llc(draws, loss_at_wstar, n_beta, diverged_at)
    full = _full_draws(ds, burn)[0]
    check = None
    if _resolve_llc_source(ds, "auto") == "minibatch" and full.shape[1] >= 1:  # SG: the two check each other
        per_step = estimate if source == "minibatch" else estimate_llc(
            _llc_draws(ds, "minibatch", burn)[0], loss_at_wstar, n_beta, diverged_at)
        full_est = estimate if source == "full" else estimate_llc(full, loss_at_wstar, n_beta, diverged_at)
        check = cross_check(per_step, full_est)

    health_input = _chain_result(tree, ds, source, burn, draws, burn_steps)
    flags = check_health(health_input, estimate_from="minibatch" if source == "minibatch" else "full")
    if cross_check_flag(check) is not None:
        flags.append(cross_check_flag(check))
    status = run_status(estimate.status, flags)
    bias = (ds.attrs.get("run", {}).get("step_bias") or {}).get("applied")
    debiased = None if bias is None or estimate.mean is None or not np.isfinite(estimate.mean) else estimate.mean - bias
    return LLCResult(estimate.mean, estimate.se, estimate.per_chain, status, tuple(flags), estimate,
                     loss_at_wstar, n_beta, source, burn, check, bias, debiased)


def chain_result(tree, num_burnin_draws: int = 0, source: str = "full") -> ChainResult:
    """The pipeline's ChainResult of a sample() tree: what compute_llc checks the health of, and what
    llc_bench.health.check_health and the llc_bench.plots figures take.

    sampler = the sampling method; loss_trace = metrics_loss (every step, burn-in included);
    num_burnin_steps = the sampler's burn-in + num_burnin_draws · num_steps_bw_draws; draw_loss /
    draw_steps = the post-burn-in draws λ̂ is estimated from (source "full": full_loss at the
    full-data draws; "sampling": each draw's mean sampling-batch loss; "minibatch": the full-data
    draws); loss_at_wstar = full_loss_at_wstar; n_beta as given to sample(); draw_spread =
    distance² at the full-data draws; accept / energy_change / diverging = the metrics_* variables
    (NaN / False without save_metrics); projections and grad_evals from the tree's ArviZ groups
    (none / zeros when the tree has no groups); timings 0.
    """
    ds = _dataset(tree)
    source = _resolve_llc_source(ds, source)
    burn = _burnin(num_burnin_draws, ds.sizes["draw"])
    draws, burn_steps = _llc_draws(ds, source, burn)
    return _chain_result(tree, ds, source, burn, draws, burn_steps)


def _chain_result(tree, ds, source: str, burn: int, draws: np.ndarray, burn_steps: int) -> ChainResult:
    num_chains = ds.sizes["chain"]
    full, full_steps = _full_draws(ds, burn)
    keep = np.asarray(ds["full_draw_index"]) >= burn
    groups = getattr(tree, "children", {})

    def per_step(name, fill, dtype=float):
        return np.asarray(ds[name], dtype) if name in ds else np.full(ds["metrics_loss"].shape, fill, dtype)

    def per_chain(name):
        stats = groups.get("sample_stats")
        return np.asarray(stats[name], float) if stats is not None and name in stats else np.zeros(num_chains)

    draw_loss = draws if source in ("full", "sampling") else full
    projections = np.zeros((num_chains, draw_loss.shape[1], 0))
    if source != "sampling" and "posterior" in groups and "theta_proj" in groups["posterior"]:
        projections = np.asarray(groups["posterior"]["theta_proj"], np.float64)[:, keep]
    return ChainResult(
        sampler=str(ds.attrs.get("options", {}).get("sampling_method", "")),
        loss_trace=np.asarray(ds["metrics_loss"], np.float64),
        accept=per_step("metrics_accept", np.nan),
        energy_change=per_step("metrics_energy_change", np.nan),
        diverging=per_step("metrics_diverging", False, bool),
        draw_loss=draw_loss,
        draw_steps=np.asarray(ds["draw_step"])[burn:] if source == "sampling" else full_steps,
        projections=projections,
        diverged_at=np.asarray(ds["diverged_at"], np.int64),
        grad_evals=per_chain("grad_evals"), warmup_grad_evals=per_chain("warmup_grad_evals"),
        num_burnin_steps=burn_steps,
        loss_at_wstar=_baseline(ds), n_beta=float(ds["n_beta"]), wall_s=0.0, warmup_s=0.0, compile_s=0.0, tuned={},
        draw_spread=None if source == "sampling" or "distance" not in ds else
        np.asarray(ds["distance"], np.float64)[:, keep] ** 2,
    )


def _usable(ds, *series: np.ndarray) -> np.ndarray:
    return usable_chains(*series, diverged_at=np.asarray(ds["diverged_at"]))


def _pooled_cov(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(C, N, I), (C, N, J) -> (I, J): Σ_c Σ_t (a − ā_c)(b − b̄_c) / (C (N − 1)), each chain centered on its own mean."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return np.einsum("cti,ctj->ij", a, b) / (a.shape[0] * (a.shape[1] - 1))


def _per_sample(ds) -> bool:
    return bool(ds.attrs.get("options", {}).get("per_sample_losses", True))


def _obs_losses(ds, name: str, burn) -> np.ndarray:
    """(C, N, I) per-sample losses, or (C, N, k) batch means when the tree stores only means, of the
    draws from `burn` on (an int) or of the draws listed in `burn` (an index array)."""
    var = f"loss_{name}"
    if var not in ds:
        have = [v[5:] for v in ds.data_vars if v.startswith("loss_")]
        raise ValueError(f"no observable {name!r} in this tree; observables: {have}")
    x = np.asarray(ds[var], np.float64)
    x = x[:, burn:] if isinstance(burn, int) else x[:, burn]
    return x.reshape(x.shape[0], x.shape[1], -1)


def compute_bif(tree, obs_a: str, obs_b: str | None = None, *, num_burnin_draws: int = 0,
                normalize: str = "covariance"):
    """Bayesian influence function: posterior covariance between per-sample losses of two observables.

        BIF[i, j] = Cov_β( ℓ_i(w), ℓ_j(w) ),   i over obs_a's points, j over obs_b's (obs_b = obs_a if None)

    pooled over usable chains and post-burn-in draws, each chain centered on its own means
    (Σ_c Σ_t (ℓ_i − ℓ̄_ic)(ℓ_j − ℓ̄_jc) / (C (D − 1))); normalize="correlation" divides by the
    pooled standard deviations. Interpretation: raising training point i's weight in the tempered
    likelihood exp(−β Σ_k ℓ_k), β = nβ/n, by ε changes E_β[ℓ_j] by −β · BIF[i, j] · ε to first
    order; devinterp reports the covariance (or correlation) itself, as here.

    Returns an xarray.DataArray (sample_a, sample_b) with coords index_a / index_b (the points'
    indices in each observable's dataset); NaN if no chain is usable.
    """
    import xarray as xr  # deferred: loaded in the background while the chains run (_prefetch_imports_once)

    if normalize not in ("covariance", "correlation"):
        raise ValueError(f"normalize must be 'covariance' or 'correlation', got {normalize!r}")
    obs_b = obs_a if obs_b is None else obs_b
    ds = _dataset(tree)
    if not _per_sample(ds):
        raise ValueError("compute_bif needs per-sample losses; this tree has batch means only "
                         "(sample(..., per_sample_losses=True))")
    burn = _burnin(num_burnin_draws, ds.sizes["draw"], need=2)
    a, b = _obs_losses(ds, obs_a, burn), _obs_losses(ds, obs_b, burn)
    ok = _usable(ds, a, b)
    if ok.any():
        cov = _pooled_cov(a[ok], b[ok])
        if normalize == "correlation":
            sd_a = np.sqrt(np.diag(_pooled_cov(a[ok], a[ok])))
            sd_b = np.sqrt(np.diag(_pooled_cov(b[ok], b[ok])))
            with np.errstate(divide="ignore", invalid="ignore"):
                cov = cov / np.outer(sd_a, sd_b)
    else:
        cov = np.full((a.shape[2], b.shape[2]), np.nan)
    return xr.DataArray(
        cov, dims=("sample_a", "sample_b"),
        coords={"index_a": ("sample_a", np.asarray(ds[f"index_{obs_a}"]).reshape(-1)),
                "index_b": ("sample_b", np.asarray(ds[f"index_{obs_b}"]).reshape(-1))},
        attrs={"obs_a": obs_a, "obs_b": obs_b, "normalize": normalize, "num_chains_used": int(ok.sum()),
               "num_draws_used": int(a.shape[1])},
        name="bif",
    )


def compute_susceptibilities(tree, *, num_burnin_draws: int = 0, source: str = "full"):
    """Susceptibility of each observable: its linear response to the weight of the sampling data.

        χ_obs = −nβ · Cov_β( L(w), φ_obs(w) ) = nβ · ∂E_β[φ_obs] / ∂(nβ)

    φ_obs = mean loss on the observable's fixed points, L = the sampling dataset's loss
    (source="full": full-data L_n, at the draws that have it: every one with sample(...,
    full_loss_every=1), else every full_loss_every-th; "sampling": the mean of that draw's fresh
    random batches (sample(..., sampling_loss=True)), an unbiased but noisier proxy: batch noise is
    independent of w, so the covariance is unchanged in expectation). The identity follows from ∂/∂(nβ) E[φ] = −Cov(φ, L_n) for
    p ∝ exp(−nβ L_n − …). Sign: χ < 0 means the observable's expected loss falls when the
    sampling data are weighted more (a relative increase of nβ); χ > 0 means it rises.

    Covariances are pooled over usable chains and post-burn-in draws, each chain centered on its
    own means. Returns an xarray.Dataset with, per observable: `<obs>` (χ), `<obs>_se` (between-
    chain standard error of χ; NaN with one usable chain) and `<obs>_per_sample`
    (batch_<obs>, sample): χ_i = −nβ Cov(L, ℓ_i) for each of its points (only when the tree holds
    per-sample losses; with per_sample_losses=False χ comes from the batch means, which average to φ).
    """
    import xarray as xr  # deferred: loaded in the background while the chains run (_prefetch_imports_once)

    ds = _dataset(tree)
    burn = _burnin(num_burnin_draws, ds.sizes["draw"], need=2)
    if source not in ("full", "sampling"):
        raise ValueError(f"source must be 'full' or 'sampling', got {source!r}")
    loss, _ = _llc_draws(ds, source, burn)
    rows = burn
    if source == "full":  # the draws with a full-data L_n
        index = np.asarray(ds["full_draw_index"])
        rows = index[index >= burn]
        if rows.size < 2:
            raise ValueError(f"source='full' has {rows.size} full-data draw(s) after burn-in, fewer than 2; "
                             "sample(..., full_loss_every=1) evaluates L_n at every draw")
    n_beta = float(ds["n_beta"])
    names = [v[5:] for v in ds.data_vars if v.startswith("loss_")]
    out = {}
    for name in names:
        per_sample = _obs_losses(ds, name, rows)  # (C, N, I)
        ok = _usable(ds, loss, per_sample)
        shape = ds[f"index_{name}"].shape
        dims = ds[f"index_{name}"].dims
        if not ok.any():
            out[name] = ((), np.nan)
            out[f"{name}_se"] = ((), np.nan)
            if _per_sample(ds):
                out[f"{name}_per_sample"] = (dims, np.full(shape, np.nan))
            continue
        L = loss[ok][:, :, None]
        phi = per_sample[ok].mean(axis=2, keepdims=True)
        chi = -n_beta * float(_pooled_cov(L, phi)[0, 0])
        per_chain = [-n_beta * float(_pooled_cov(L[c : c + 1], phi[c : c + 1])[0, 0]) for c in range(L.shape[0])]
        se = float(np.std(per_chain, ddof=1) / math.sqrt(len(per_chain))) if len(per_chain) > 1 else math.nan
        out[name] = ((), chi)
        out[f"{name}_se"] = ((), se)
        if _per_sample(ds):
            out[f"{name}_per_sample"] = (dims, (-n_beta * _pooled_cov(L, per_sample[ok])[0]).reshape(shape))
    return xr.Dataset(out, attrs={"n_beta": n_beta, "source": source, "num_burnin_draws": burn})
