"""The tree sample() returns and its Zarr store: the devinterp-style root dataset, the ArviZ
`posterior` and `sample_stats` groups (llc_bench.diagnostics.to_datatree, as the pipeline's trees),
the output path's checks, and reuse of a store whose options match."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from llc_bench.artifacts import write_datatree_atomic
from llc_bench.curvature import auto_step_grad_evals, step_size_summary
from llc_bench.discretization import PROBE_KEY
from llc_bench.sampling_options import Request, _json_normalize
from llc_bench.types import ChainResult

# The ArviZ groups' draw dimension: the full-data draws (the root's `draw` counts every draw).
ARVIZ_SAMPLE_DIMS = ("chain", "full_draw")
# ArviZ records when it built a group; dropped so that a rerun gives an identical tree.
_VOLATILE_ATTRS = ("created_at",)


def sample_tree(request: Request, result: ChainResult, init_loss, obs_index: dict, notes, step_bias: dict | None = None):
    """The DataTree sample() returns: the root dataset (sample()'s docstring lists it), with the
    ArviZ groups `posterior` and `sample_stats` as children. step_bias: the step_bias option's
    record (attrs["run"]["step_bias"]; None without the option or an estimate)."""
    import xarray as xr  # deferred: loaded in the background while the chains run (sampling._prefetch_imports_once)

    root = _root_dataset(request, result, init_loss, obs_index)
    run_info = _run_info(request, result, notes)
    if request.args.step_bias:
        run_info["step_bias"] = step_bias
    root.attrs = {"options": request.options, "run": _json_normalize(run_info)}
    return xr.DataTree.from_dict({"/": root, **_arviz_groups(request, result)})


def _root_dataset(request: Request, result: ChainResult, init_loss, obs_index: dict):
    import xarray as xr  # deferred: see sample_tree

    a = request.args
    num_chains, num_draws, every = a.num_chains, a.num_draws, request.full_loss_every
    draws = result.draw_outputs
    data_vars = {
        "init_loss": (("chain", "sample_init"), np.broadcast_to(np.asarray(init_loss), (num_chains, request.n))),
        "full_loss": (("chain", "full_draw"), result.draw_loss),
        "metrics_loss": (("chain", "step"), result.loss_trace),
        "distance": (("chain", "full_draw"), result.full_draw_outputs["distance"]),
        **({PROBE_KEY: (("chain", "full_draw"), result.full_draw_outputs[PROBE_KEY])} if a.step_bias else {}),
        "diverged_at": (("chain",), result.diverged_at),
        "full_loss_at_wstar": ((), np.float64(result.loss_at_wstar)),
        "n_beta": ((), np.float64(a.n_beta)),
    }
    if a.sampling_loss:
        data_vars["sampling_loss"] = (("chain", "draw", "batch", "sample")[:draws["sampling_loss"].ndim],
                                      draws["sampling_loss"])
        if a.per_sample_losses:
            data_vars["sampling_index"] = (("chain", "draw", "batch", "sample"), draws["sampling_index"])
    for name in request.obs:
        dims = ("chain", "draw", f"batch_{name}", "sample")[:draws[f"loss_{name}"].ndim]
        data_vars[f"loss_{name}"] = (dims, draws[f"loss_{name}"])
        data_vars[f"index_{name}"] = ((f"batch_{name}", "sample"), obs_index[name])
    if a.save_metrics:
        for field in ("accept", "energy_change", "diverging"):
            data_vars[f"metrics_{field}"] = (("chain", "step"), getattr(result, field))
    draw_steps = a.num_burnin_steps + (np.arange(num_draws) + 1) * a.num_steps_bw_draws - 1
    coords = {"chain": np.arange(num_chains), "draw": np.arange(num_draws), "draw_step": ("draw", draw_steps),
              "full_draw_step": ("full_draw", result.draw_steps),
              "full_draw_index": ("full_draw", np.arange(every - 1, num_draws, every)),
              "step": np.arange(result.loss_trace.shape[1])}
    return xr.Dataset(data_vars, coords=coords)


def _run_info(request: Request, result: ChainResult, notes) -> dict:
    """attrs["run"]: sampler settings, d, timings, work."""
    run_info = {
        "sampler_description": request.spec.description,
        "num_params": int(request.restriction.w_all.size),
        "num_params_free": int(request.restriction.free_index.size),
        "n": request.n,
        "loss_at_wstar": result.loss_at_wstar,
        "grad_evals": float(np.sum(result.grad_evals)),
        "wall_s": result.wall_s, "warmup_s": result.warmup_s, "compile_s": result.compile_s,
        "tuned": result.tuned,
        # ε of the tempered run (σ² lr) and, for lr="auto", what chose it
        **step_size_summary(request.settings, notes),
    }
    run_info["grad_evals"] += auto_step_grad_evals(notes)
    return run_info


def _arviz_groups(request: Request, result: ChainResult) -> dict:
    """{"posterior": ..., "sample_stats": ...}: llc_bench.diagnostics.to_datatree's groups of this run.

    posterior (chain, full_draw): L_n (= full_loss, in float64), llc = nβ (L_n − L_n(w*)) with nβ
    as given to sample() (untempered), theta_proj (chain, full_draw, proj): w − w* on the runner's
    fixed random unit directions. Its `draw` is renamed `full_draw` (the root's `draw` counts every
    draw, and groups inherit the root's dimensions); attrs["sample_dims"] says so to ArviZ.
    sample_stats (chain, step): loss (= metrics_loss), grad_evals, warmup_grad_evals, diverged_at,
    and with save_metrics accept, energy_change, diverging.
    """
    from llc_bench.diagnostics import to_datatree  # deferred: arviz, loaded while the chains run

    view = to_datatree(dataclasses.replace(result, n_beta=float(request.args.n_beta)))
    posterior = view["posterior"].to_dataset().drop_vars(["draw", "draw_step"]).rename_dims(draw="full_draw")
    posterior.attrs["sample_dims"] = list(ARVIZ_SAMPLE_DIMS)
    stats = view["sample_stats"].to_dataset()
    if not request.args.save_metrics:
        stats = stats.drop_vars(["accept", "energy_change", "diverging"])
    groups = {"posterior": posterior, "sample_stats": stats}
    for ds in groups.values():
        for key in _VOLATILE_ATTRS:
            ds.attrs.pop(key, None)
    return groups


def write_and_reopen(tree, path: Path):
    """Write the tree as a Zarr store atomically (temp dir, then rename) and return it read back."""
    import xarray as xr  # deferred: see sample_tree

    write_datatree_atomic(tree, path)
    return xr.open_datatree(path, engine="zarr", consolidated=False)


def _check_output_path(output_path) -> Path | None:
    """Refuse, before any sampling, an output_path that could not take the store."""
    if output_path is None:
        return None
    path = Path(output_path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_path {path} is a file, not a Zarr store; remove it or choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        raise ValueError(f"output_path {path}: its directory cannot be written ({err.strerror or err})") from None
    return path


def _reuse_store(path: Path, options: dict, overwrite: bool):
    """The stored tree if its options equal `options`; None if it is to be (re)written."""
    import xarray as xr  # deferred: loaded in the background while the chains run (sampling._prefetch_imports_once)

    try:
        stored = xr.open_datatree(path, engine="zarr", consolidated=False)
        stored_options = stored.attrs.get("options")
    except Exception as err:  # not a store sample() wrote
        stored, stored_options = None, None
        if not overwrite:
            raise ValueError(f"{path} exists and is not a readable sample() store ({err}); "
                             "pass overwrite=True to replace it") from err
    if stored_options == options:
        return stored
    if overwrite:
        # Replaced only once the new tree is complete (write_datatree_atomic): a failed run keeps the old store.
        if stored is not None:
            stored.close()
        return None
    stored_options = stored_options or {}
    differ = sorted(k for k in set(options) | set(stored_options) if options.get(k) != stored_options.get(k))
    raise ValueError(f"{path} holds a sample() run with different options ({', '.join(differ)}); "
                     "pass overwrite=True to replace it or choose another output_path")

