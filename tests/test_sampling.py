"""sample() and its post-processing: weight restrictions, agreement with the experiment pipeline, BIF and susceptibility identities, option validation, Zarr round trip, determinism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import llc_bench
from llc_bench.sampling import compute_bif, compute_llc, compute_susceptibilities, free_mask, sample

# ---------------------------------------------------------------------------------------------
# A linear model y = x W + b with a nested (flax-like) parameter tree.
# ---------------------------------------------------------------------------------------------

IN = 3


def apply_linear(params, x):
    layer = params["params"]["dense"]
    return x @ layer["kernel"] + layer["bias"]


def squared_error(apply_fn, params, x, y):
    return 0.5 * jnp.sum((apply_fn(params, x) - y) ** 2, axis=-1)


def linear_problem(n=128, seed=0):
    kx, kn = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, IN))
    w_true = jnp.array([[1.0], [-2.0], [0.5]])
    y = x @ w_true + 0.3 + jax.random.normal(kn, (n, 1))
    # w* = least squares (with intercept), so the basin is centered on it
    design = np.concatenate([np.asarray(x), np.ones((n, 1))], axis=1)
    coef = np.linalg.lstsq(design, np.asarray(y), rcond=None)[0].astype(np.float32)
    params = {"params": {"dense": {"bias": jnp.asarray(coef[IN]), "kernel": jnp.asarray(coef[:IN])}}}
    return params, x, y


# Probe points for the weight-restriction test: with y = 0 the loss of x = 0 is ½b², of x = e_i
# ½(W_i + b)², so each probe's loss depends on exactly the parameters it names.
# Each of the 4 probes is repeated 16 times to fill one batch of 64 (sorted: probe j at 16j..16j+15).
PROBE_X = jnp.repeat(jnp.concatenate([jnp.zeros((1, IN)), jnp.eye(IN)]), 16, axis=0)
PROBE_Y = jnp.zeros((4 * 16, 1))
KERNEL_MASK = np.array([[True], [False], [True]])  # W_1 frozen, W_0 and W_2 free; bias frozen

# One run serves most tests (compile time dominates). Linear regression with unit Gaussian noise
# is regular: with 2 of its 4 weights free, λ = 2/2 = 1 exactly. Hessian of L_n ≈ E[x xᵀ] ≈ I,
# nβ = 300, γ = 1: an exact sampler's bias ½Σ nβh/(nβh + γ) − 1 is −0.3%; ε nβ h = 0.03 keeps
# SGLD's step bias ~1%; relaxation ≈ 2/(ε nβ h) ≈ 70 steps, so 30 draws × 10 steps of burn-in.
C, D, K = 4, 150, 10
N_BETA = 300.0
BURNIN_DRAWS = 30
# Most tests read every draw's full-data L_n and sampling batches: both asked for explicitly.
COMMON = dict(lr=1e-4, n_beta=N_BETA, localization=1.0, num_chains=C, num_draws=D, num_steps_bw_draws=K,
              batch_size=64, seed=3, progress=False, full_loss_every=1, sampling_loss=True)
MASKS = {"params": {"dense": {"kernel": KERNEL_MASK}}}


def _observables(x, y):
    held_out = (x[:64] + 0.5, y[:64])
    return {"probe": ((PROBE_X, PROBE_Y), 1), "held": (held_out, 1), "held_copy": (held_out, 1)}


@pytest.fixture(scope="module")
def problem():
    return linear_problem(n=2000)


@pytest.fixture(scope="module")
def stored(problem, tmp_path_factory):
    """One restricted run written to Zarr, and its path."""
    params, x, y = problem
    path = tmp_path_factory.mktemp("sample") / "run.zarr"
    tree = sample(apply_linear, params, squared_error, (x, y), observables=_observables(x, y),
                  param_masks=MASKS, save_metrics=True, output_path=path, **COMMON)
    return tree, path


def test_import_llc_bench_is_lazy():
    import subprocess
    import sys

    code = "import sys, llc_bench; assert 'jax' not in sys.modules, 'jax imported'; print(llc_bench.sample.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "llc_bench.sampling"
    assert llc_bench.compute_bif is compute_bif


def test_sample_is_split_into_short_stages_in_short_modules():
    """sample() = validate → build → run → assemble, no function body (docstring aside) of 80 lines or
    more, no module of 600 lines or more."""
    import ast
    from pathlib import Path

    package = Path(llc_bench.__file__).parent
    modules = ["sampling", "sampling_options", "sampling_posterior", "sampling_store", "sampling_estimates",
               "samplers/wrappers"]
    for module in modules:
        text = (package / f"{module}.py").read_text()
        assert text.count("\n") < 600, module
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                body = node.body[1:] if isinstance(node.body[0], ast.Expr) and len(node.body) > 1 else node.body
                length = body[-1].end_lineno - body[0].lineno + 1
                assert length < 80, f"{module}.{node.name}: {length} lines"
    calls = [n.func.id for n in ast.walk(ast.parse((package / "sampling.py").read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    stages = [c for c in calls if c in ("_validate", "_build", "_run", "_assemble")]
    assert stages == ["_validate", "_build", "_run", "_assemble"]


def test_free_mask_paths_nested_dicts_and_groups(problem):
    params, _, _ = problem
    # flattening order: bias (1) then kernel (3)
    np.testing.assert_array_equal(free_mask(params, None), [True] * 4)
    nested = free_mask(params, {"params": {"dense": {"kernel": KERNEL_MASK}}})
    np.testing.assert_array_equal(nested, [False, True, False, True])
    np.testing.assert_array_equal(free_mask(params, {"params/dense/kernel": KERNEL_MASK}), nested)
    np.testing.assert_array_equal(free_mask(params, {"params/dense/bias": None}), [True, False, False, False])
    np.testing.assert_array_equal(free_mask(params, {"params/dense": None}), [True] * 4)


def test_masked_parameters_stay_fixed_and_free_ones_move(stored, problem):
    tree, _ = stored
    params, _, _ = problem
    probe = np.asarray(tree["loss_probe"]).reshape(C, D, IN + 1, 16)[..., 0]  # (chain, draw, probe point)
    b = float(params["params"]["dense"]["bias"][0])
    w = np.asarray(params["params"]["dense"]["kernel"])[:, 0]
    # x = 0 sees only the (frozen) bias; x = e_1 only frozen entries: bit-identical at every draw
    np.testing.assert_allclose(probe[0, 0, 0], 0.5 * b * b, rtol=1e-6)
    assert np.unique(probe[..., 0]).size == 1
    assert np.unique(probe[..., 2]).size == 1
    np.testing.assert_allclose(probe[0, 0, 2], 0.5 * (w[1] + b) ** 2, rtol=1e-6)
    # e_0 and e_2 involve a free kernel entry: they move, differently in each chain
    for i in (1, 3):
        assert np.unique(probe[..., i]).size > 50
        assert np.std(probe[..., i]) > 1e-4
    assert tree.attrs["run"]["num_params_free"] == 2 and tree.attrs["run"]["num_params"] == 4
    assert np.all(np.asarray(tree["distance"]) > 0)


def test_zarr_round_trip_and_same_seed_identical_tree(stored, problem):
    tree, path = stored
    params, x, y = problem
    again = sample(apply_linear, params, squared_error, (x, y), observables=_observables(x, y),
                   param_masks=MASKS, save_metrics=True, **COMMON)
    # the in-memory tree of a second run with the same seed equals the one read back from Zarr
    xr.testing.assert_equal(again.to_dataset(), tree.to_dataset())
    assert again.attrs["options"] == tree.attrs["options"]
    reread = xr.open_datatree(path, engine="zarr", consolidated=False)
    xr.testing.assert_identical(reread.to_dataset(), tree.to_dataset())
    assert tree["sampling_loss"].dims == ("chain", "draw", "batch", "sample")
    assert tree["loss_held"].dims == ("chain", "draw", "batch_held", "sample")
    assert tree["metrics_loss"].shape == (C, D * K)
    np.testing.assert_array_equal(tree["draw_step"], K * np.arange(D) + K - 1)
    # sampling batches are fresh at every draw; observable points are fixed and sorted
    idx = np.asarray(tree["sampling_index"])
    assert not np.array_equal(idx[0, 0], idx[0, 1]) and not np.array_equal(idx[0, 0], idx[1, 0])
    held = np.asarray(tree["index_held"]).reshape(-1)
    assert np.all(np.diff(held) > 0) and held.size == 64


def test_arviz_groups_and_the_pipeline_checks_and_plots_on_a_sample_tree(stored, tmp_path):
    """The tree (read back from Zarr) carries diagnostics.to_datatree's groups; convergence, ArviZ,
    check_health and plot_all run on it and agree with the root variables and compute_llc."""
    import arviz_stats as azs

    from llc_bench.diagnostics import convergence
    from llc_bench.health import check_health
    from llc_bench.plots import plot_all, running_llc
    from llc_bench.sampling import chain_result
    from llc_bench.sampling_store import ARVIZ_SAMPLE_DIMS

    tree, _ = stored
    post, stats = tree["posterior"], tree["sample_stats"]
    full = np.asarray(tree["full_loss"], np.float64)
    assert post["L_n"].dims == ARVIZ_SAMPLE_DIMS and post.attrs["sample_dims"] == list(ARVIZ_SAMPLE_DIMS)
    np.testing.assert_array_equal(post["L_n"], full)
    np.testing.assert_allclose(post["llc"], N_BETA * (full - float(tree["full_loss_at_wstar"])), rtol=1e-12)
    np.testing.assert_array_equal(stats["loss"], np.asarray(tree["metrics_loss"], np.float64))
    np.testing.assert_array_equal(stats["diverged_at"], tree["diverged_at"])
    assert np.all(np.isnan(stats["accept"])) and stats["accept"].dims == ("chain", "step")  # save_metrics, SGLD
    # θ projections: w − w* on unit directions, so |projection| <= ‖w − w*‖ (distance)
    proj, dist = np.asarray(post["theta_proj"]), np.asarray(tree["distance"])
    assert proj.shape == (C, D, 4) and np.all(np.abs(proj) <= dist[..., None] * (1 + 1e-5))
    assert np.all(np.abs(proj).max(axis=-1) > 0.05 * dist)
    conv = convergence(tree)
    assert conv["chains_used"] == [0, 1, 2, 3] and conv["L_n"]["mean"] == pytest.approx(full.mean(), rel=1e-12)
    ess = azs.ess(tree, group="posterior", sample_dims=list(ARVIZ_SAMPLE_DIMS))
    assert float(ess["L_n"]) == pytest.approx(conv["L_n"]["ess_bulk"], rel=1e-9)
    # the pipeline's health checks and figures on the tree's ChainResult
    result = compute_llc(tree, num_burnin_draws=BURNIN_DRAWS)
    run = chain_result(tree, num_burnin_draws=BURNIN_DRAWS)
    assert run.num_burnin_steps == BURNIN_DRAWS * K and run.draw_loss.shape == (C, D - BURNIN_DRAWS)
    assert [f.code for f in check_health(run)] == [f.code for f in result.flags if f.code != "estimates_disagree"]
    np.testing.assert_allclose(running_llc(run)[:, -1], result.per_chain, rtol=1e-9)
    paths = plot_all(run, tmp_path)
    assert sorted(p.name for p in paths) == [f"sgld_{name}.png" for name in
                                             ("autocorr", "ess_evolution", "loss_trace", "running_llc", "trace_rank")]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_store_reused_only_when_options_match(stored, problem, monkeypatch):
    tree, path = stored
    params, x, y = problem
    import llc_bench.sampling

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although the store matched")

    monkeypatch.setattr(llc_bench.sampling, "start_chains", no_sampling)
    kwargs = dict(observables=_observables(x, y), param_masks=MASKS, save_metrics=True, output_path=path)
    reused = sample(apply_linear, params, squared_error, (x, y), **kwargs, **COMMON)
    xr.testing.assert_identical(reused.to_dataset(), tree.to_dataset())
    # devinterp's name for SGLD is the same sampler, hence the same options
    reused = sample(apply_linear, params, squared_error, (x, y), **kwargs, **COMMON, sampling_method="sgmcmc_sgld")
    assert reused.attrs["options"]["sampling_method"] == "sgld"
    with pytest.raises(ValueError, match="different options.*lr"):
        sample(apply_linear, params, squared_error, (x, y), **kwargs, **{**COMMON, "lr": 2e-4})
    shifted = (x, y + 1.0)
    with pytest.raises(ValueError, match="different options.*dataset"):
        sample(apply_linear, params, squared_error, shifted, **kwargs, **COMMON)
    with pytest.raises(AssertionError, match="sampled although"):
        sample(apply_linear, params, squared_error, (x, y), **kwargs, **{**COMMON, "lr": 2e-4}, overwrite=True)


def test_bif_symmetric_for_identical_datasets_diagonal_is_variance(stored):
    tree, _ = stored
    # identical datasets get identical points, hence identical losses
    np.testing.assert_array_equal(tree["index_held"], tree["index_held_copy"])
    np.testing.assert_array_equal(tree["loss_held"], tree["loss_held_copy"])
    bif = compute_bif(tree, "held", "held_copy")
    assert bif.shape == (64, 64)
    np.testing.assert_allclose(bif, bif.T, rtol=1e-12, atol=0)
    np.testing.assert_allclose(bif, compute_bif(tree, "held"))
    # diagonal = per-sample loss variance, per chain (ddof 1), averaged over the chains
    losses = np.asarray(tree["loss_held"], np.float64).reshape(C, D, 64)
    np.testing.assert_allclose(np.diag(bif), np.var(losses, axis=1, ddof=1).mean(axis=0), rtol=1e-10)
    assert np.all(np.diag(bif) > 0)
    corr = compute_bif(tree, "held", normalize="correlation")
    np.testing.assert_allclose(np.diag(corr), 1.0, rtol=1e-10)
    assert np.all(np.abs(corr) <= 1 + 1e-9)
    # burn-in drops draws: the same identity on the later draws
    late = compute_bif(tree, "held", num_burnin_draws=BURNIN_DRAWS)
    np.testing.assert_allclose(np.diag(late), np.var(losses[:, BURNIN_DRAWS:], axis=1, ddof=1).mean(axis=0),
                               rtol=1e-10)
    np.testing.assert_array_equal(bif["index_a"], tree["index_held"].values.reshape(-1))


def test_susceptibility_formula_and_sign(stored):
    tree, _ = stored
    chi = compute_susceptibilities(tree)
    L = np.asarray(tree["full_loss"], np.float64)
    phi = np.asarray(tree["loss_held"], np.float64).reshape(C, D, -1)
    # −nβ · Cov(L_n, φ) with per-chain centering, computed independently
    Lc = L - L.mean(axis=1, keepdims=True)
    phic = phi.mean(axis=2) - phi.mean(axis=(1, 2))[:, None]
    expected = -N_BETA * np.sum(Lc * phic) / (C * (D - 1))
    assert float(chi["held"]) == pytest.approx(expected, rel=1e-10)
    # the observable's χ is the mean of its per-sample χ_i (linearity of the covariance)
    assert float(chi["held_per_sample"].mean()) == pytest.approx(float(chi["held"]), rel=1e-10)
    # an observable that IS the sampling loss: χ = −nβ Var(L_n) < 0
    self_chi = -N_BETA * np.sum(Lc**2) / (C * (D - 1))
    copies = tree["full_loss"].expand_dims({"batch_self": 1, "sample": tree.sizes["sample"]}, axis=(2, 3))
    tree2 = tree.to_dataset().assign(loss_self=copies, index_self=(("batch_self", "sample"), [np.arange(64)]))
    assert float(compute_susceptibilities(tree2)["self"]) == pytest.approx(self_chi, rel=1e-10)
    assert self_chi < 0
    assert np.isfinite(float(chi["held_se"]))


def test_compute_llc_baseline_is_full_data_and_burnin_dropped(stored):
    tree, _ = stored
    full = compute_llc(tree, num_burnin_draws=BURNIN_DRAWS, source="full")
    L = np.asarray(tree["full_loss"], np.float64)[:, BURNIN_DRAWS:]
    # the full-data mean of init_loss, as the draws' full_loss computes a mean (float32, not float64)
    baseline = float(tree["full_loss_at_wstar"])
    assert baseline == pytest.approx(np.asarray(tree["init_loss"], np.float64)[0].mean(), rel=1e-6)
    np.testing.assert_allclose(full.per_chain, N_BETA * (L.mean(axis=1) - baseline), rtol=1e-10)
    assert full.llc_mean == pytest.approx(N_BETA * (L.mean() - baseline), rel=1e-10)
    assert full.loss_at_wstar == pytest.approx(tree.attrs["run"]["loss_at_wstar"], rel=1e-6)
    sampling = compute_llc(tree, source="sampling", num_burnin_draws=BURNIN_DRAWS)
    S = np.asarray(tree["sampling_loss"], np.float64).mean(axis=(2, 3))[:, BURNIN_DRAWS:]
    assert sampling.llc_mean == pytest.approx(N_BETA * (S.mean() - baseline), rel=1e-10)
    # the per-step source: every step's own minibatch loss after the burn-in steps and draws
    per_step = compute_llc(tree, num_burnin_draws=BURNIN_DRAWS, source="minibatch")
    assert per_step.source == "minibatch" and full.source == "full"
    M = np.asarray(tree["metrics_loss"], np.float64)[:, BURNIN_DRAWS * K:]
    np.testing.assert_allclose(per_step.per_chain, N_BETA * (M.mean(axis=1) - baseline), rtol=1e-10)
    assert per_step.cross_check["llc_full"] == pytest.approx(full.llc_mean, rel=1e-12)
    assert per_step.cross_check["llc_per_step"] == pytest.approx(per_step.llc_mean, rel=1e-12)
    with pytest.raises(ValueError, match="num_burnin_draws"):
        compute_llc(tree, num_burnin_draws=D)


def test_restricted_llc_of_a_regular_model_is_half_the_free_dimension(stored):
    """Linear regression with Gaussian noise (σ = 1): λ = d/2 for d free weights; 2 of 4 free -> λ = 1."""
    tree, _ = stored
    est = compute_llc(tree, num_burnin_draws=BURNIN_DRAWS, source="full")
    assert est.status in ("ok", "warnings"), est.flags
    # per-draw nβ(L_n − L*) ≈ ½χ²_2 has sd 1; 480 autocorrelated draws: SE ≈ 0.1
    assert abs(est.llc_mean - 1.0) < 4 * est.llc_se + 0.05, (est.llc_mean, est.llc_se)
    assert est.llc_mean == pytest.approx(1.0, abs=0.3)
    # the per-step estimate: nβ sd(L_m) ≈ 300 · 0.7/√64 ≈ 26 per step, so over 4 × 1,200 steps its SE
    # is ≈ 0.4, several times the full-data draws'; it must agree with the truth within it
    per_step = compute_llc(tree, num_burnin_draws=BURNIN_DRAWS, source="minibatch")
    assert 0.15 < per_step.llc_se < 1.0, per_step.llc_se
    assert abs(per_step.llc_mean - 1.0) < 4 * per_step.llc_se, (per_step.llc_mean, per_step.llc_se)
    # the devinterp-style estimate from fresh minibatches at each draw agrees within its noise
    sampling = compute_llc(tree, source="sampling", num_burnin_draws=BURNIN_DRAWS)
    assert abs(sampling.llc_mean - est.llc_mean) < 4 * sampling.llc_se


# ---------------------------------------------------------------------------------------------
# The experiment pipeline's λ̂, reproduced by sample() + compute_llc
# ---------------------------------------------------------------------------------------------


def test_compute_llc_equals_experiment_pipeline():
    """Same posterior, same chains, same numbers.

    The pipeline samples Posterior.build(target.per_sample_loss, x, y, w*, β0, γ) (nβ = n/log n) on
    the flat vector w with key experiment.sampler_key(seed, "sgld"). sample() gets the same model as
    a pytree (target.apply_fn on target.unravel(w*): ravel_pytree gives back w* in the same order),
    the same per-sample NLL, nβ and γ taken from that Posterior, the sampler's ε and batch size, the
    same step counts and seed (sample() uses the same key derivation), every parameter free, and the
    full-data L_n at every draw as the pipeline's draws. Then the chains are the same, so:
      compute_llc(tree) (full-data draws)          == the pipeline's default (estimate_from="full")
      compute_llc(tree, source="minibatch")        == estimate_from="minibatch"
    both with the full-data baseline L_n(w*), the same cross-check of the two and the same flags.
    """
    from llc_bench.config import from_dict
    from llc_bench.data import per_sample_nll
    from llc_bench.estimator import estimate_from_result
    from llc_bench.experiment import build_posterior, run_sampler
    from llc_bench.target import build_target

    cfg = from_dict({
        "data": {"n": 256, "in_dim": 3, "out_dim": 1, "noise": "gaussian", "noise_scale": 0.5},
        "teacher": {"kind": "mlp", "widths": [3], "activation": "tanh"},
        "model": {"widths": [3], "target_params": "none", "activation": "tanh", "bias": True},
        "train": {"use_teacher": True},  # w* = the teacher: no training to compile
        "posterior": {"gamma": 20.0},
        "run": {"samplers": ["sgld"], "num_chains": 2, "num_burnin_steps": 20, "num_draws": 40,
                "num_steps_bw_draws": 2, "seed": 5},
        "sampler": {"sgld": {"step_size": 2e-4, "batch_size": 32}},
    })
    target = build_target(cfg)
    posterior = build_posterior(cfg, target)
    pipeline = run_sampler(cfg, "sgld", posterior)

    nll = per_sample_nll(cfg.data)

    def loss_fn(apply_fn, params, x, y):
        return nll(apply_fn(params, x), y, x)

    settings, run = cfg.sampler["sgld"], cfg.run
    tree = sample(target.apply_fn, target.unravel(target.w_star), loss_fn, (target.x, target.y),
                  lr=settings.step_size, batch_size=settings.batch_size, n_beta=posterior.n_beta,
                  localization=posterior.gamma, num_chains=run.num_chains, num_draws=run.num_draws,
                  num_burnin_steps=run.num_burnin_steps, num_steps_bw_draws=run.num_steps_bw_draws,
                  seed=run.seed, sampling_method="sgld", save_metrics=True, progress=False, full_loss_every=1)

    assert float(np.mean(tree["init_loss"][0])) == pytest.approx(posterior.loss_at_wstar, rel=1e-6)
    np.testing.assert_allclose(tree["full_loss"], pipeline.result.draw_loss, rtol=1e-5)
    np.testing.assert_allclose(tree["metrics_loss"], pipeline.result.loss_trace, rtol=1e-5)
    ours = compute_llc(tree)
    assert pipeline.summary["estimate_from"] == ours.source == "full"
    assert pipeline.estimate.mean != 0
    assert ours.llc_mean == pytest.approx(pipeline.estimate.mean, rel=1e-4)
    np.testing.assert_allclose(ours.per_chain, pipeline.estimate.per_chain, rtol=1e-4)
    assert ours.llc_se == pytest.approx(pipeline.estimate.se, rel=1e-3)
    for key in ("llc_per_step", "llc_full", "se_full", "z"):
        assert ours.cross_check[key] == pytest.approx(pipeline.summary["cross_check"][key], rel=1e-3)
    minibatch = compute_llc(tree, source="minibatch")
    assert minibatch.llc_mean == pytest.approx(estimate_from_result(pipeline.result, "minibatch").mean, rel=1e-4)
    # the same health checks: a flag in one is a flag in the other
    assert {f.code for f in ours.flags} == {f.code for f in pipeline.flags}


# ---------------------------------------------------------------------------------------------
# devinterp's extras: noise_level, weight_decay, gradient accumulation, init_noise, bounding box
# ---------------------------------------------------------------------------------------------


def _regression_posterior(nb, gamma, wd, accumulation=1):
    from llc_bench.sampling import SamplingPosterior

    kx, ky = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (64, IN))
    y = jax.random.normal(ky, (64, 1))

    def loss(w, x, y):
        return 0.5 * jnp.sum((x @ w[:, None] - y) ** 2, axis=-1)

    w_star = jnp.array([0.2, -0.1, 0.3])
    return SamplingPosterior(loss, x, y, w_star, nb, gamma, 0.0, weight_decay=wd, accumulation_steps=accumulation)


@pytest.mark.parametrize("method", ["sgld", "rmsprop_sgld"])
def test_noise_level_scales_only_the_injected_noise(method):
    """One step with σ = 1 and σ = 2 from the same key: the difference is (2 − 1)·√(εG)·η, and what
    remains is the drift −ε/2 · G (γ(w − w*) + λw + nβ∇L_m), the same for both (G = 1 for SGLD)."""
    from llc_bench.sampling import _sampler_settings

    nb, gamma, wd, eps = 40.0, 5.0, 0.5, 1e-3
    base = _regression_posterior(nb, gamma, wd)
    w = base.w_star + jnp.array([0.05, -0.02, 0.01])
    key = jax.random.key(11)

    def one_step(sigma):
        spec, settings = _sampler_settings(method, lr=eps, batch_size=64, accumulation=1, noise_level=sigma,
                                           kwargs={}, aliased={})
        t = sigma**2  # what sample() does: ε σ², and nβ, γ, λ divided by σ²
        post = _regression_posterior(nb / t, gamma / t, wd / t)
        algorithm = spec.build(post, settings)
        state, params, _ = algorithm.warmup(key, w)
        new_state, _ = algorithm.step(key, state, params, (post.x, post.y))
        return np.asarray(algorithm.position(new_state), np.float64)

    w1, w2 = one_step(1.0), one_step(2.0)
    loss_grad = np.asarray(jax.grad(lambda v: base.batch_loss(v, base.x, base.y))(w), np.float64)
    # first RMSProp step with bias correction: v̂ = g², G = 1/(|g| + a), a = 0.1
    g = 1.0 / (np.abs(loss_grad) + 0.1) if method == "rmsprop_sgld" else np.ones(3)
    scaled_noise = w2 - w1  # √(εG) η
    drift = w1 - np.asarray(w, np.float64) - scaled_noise
    w64, w_star = np.asarray(w, np.float64), np.asarray(base.w_star, np.float64)
    expected = -0.5 * eps * g * (gamma * (w64 - w_star) + wd * w64 + nb * loss_grad)
    np.testing.assert_allclose(drift, expected, rtol=2e-3, atol=1e-7)
    assert np.all(np.abs(scaled_noise) > 1e-6)


def test_gradient_accumulation_gives_the_batch_gradient():
    one = _regression_posterior(10.0, 1.0, 0.2)
    four = _regression_posterior(10.0, 1.0, 0.2, accumulation=4)
    w = one.w_star + 0.1
    for a, b in zip(one.minibatch_loss_and_grads(w, one.x, one.y), four.minibatch_loss_and_grads(w, one.x, one.y),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the weight decay is a Gaussian prior at zero inside the localization term
    expected = 0.5 * 1.0 * jnp.sum((w - one.w_star) ** 2) + 0.5 * 0.2 * jnp.sum(w**2)
    assert float(one.localization(w)) == pytest.approx(float(expected), rel=1e-6)


def test_init_noise_and_bounding_box():
    from llc_bench.sampling import _sampler_settings, _wrap_algorithm

    post = _regression_posterior(10.0, 1.0, 0.0)
    spec, settings = _sampler_settings("rmsprop_sgld", lr=10.0, batch_size=64, accumulation=1, noise_level=1.0,
                                       kwargs={}, aliased={})
    algorithm = _wrap_algorithm(spec.build(post, settings), post, init_noise=0.02, box=0.03)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(4000))
    state, params, _ = jax.vmap(algorithm.warmup, in_axes=(0, None))(keys, post.w_star)
    start = np.asarray(algorithm.position(state)) - np.asarray(post.w_star)
    # N(0, 0.02²) per entry, clipped at 0.03 = 1.5 sd: std ≈ 0.0183 (truncation), mean 0
    assert np.abs(start).max() <= 0.03 + 1e-7
    assert abs(start.mean()) < 5e-4 and 0.017 < start.std() < 0.0195
    # a huge step (ε = 10) stays inside the box, and reaches its faces
    new, _ = jax.vmap(algorithm.step, in_axes=(0, 0, 0, None))(keys, state, params, (post.x, post.y))
    moved = np.asarray(algorithm.position(new)) - np.asarray(post.w_star)
    assert np.abs(moved).max() <= 0.03 + 1e-7
    assert np.mean(np.isclose(np.abs(moved), 0.03)) > 0.5


def test_sample_with_every_extra_option(problem):
    params, x, y = problem
    tree = sample(apply_linear, params, squared_error, (x, y), lr=1e-2, n_beta=100.0, localization=1.0,
                  num_chains=2, num_draws=5, num_burnin_steps=3, batch_size=16, gradient_accumulation_steps=2,
                  sampling_method="rmsprop_sgld", rmsprop_alpha=0.9,
                  sampling_method_kwargs={"bias_correction": False, "adapt": "always"},
                  noise_level=0.5, weight_decay=0.1, bounding_box_size=0.01, init_noise=0.005,
                  param_masks={"params/dense/bias": None}, batches_per_draw=2, seed=1, progress=False,
                  sampling_loss=True)
    options = tree.attrs["options"]
    assert options["sampler_settings"] == {"step_size": 1e-2 * 0.25, "batch_size": 32, "alpha": 0.9, "eps": 0.1,
                                           "bias_correction": False, "adapt": "always", "auto_constant": 0.1}
    # one free parameter (the bias), boxed at ±0.01 around w*
    assert tree.attrs["run"]["num_params_free"] == 1
    distance = np.asarray(tree["distance"])
    assert np.all(distance <= 0.01 + 1e-7) and np.all(distance > 0)
    assert tree["sampling_loss"].shape == (2, 5, 2, 16)
    assert np.all(np.isfinite(tree["sampling_loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("method, kwargs", [("hmc", {"num_warmup": 200}), ("mclmc", {"num_tuning_steps": 300})])
def test_full_batch_samplers_restricted_llc(problem, method, kwargs):
    params, x, y = problem
    tree = sample(apply_linear, params, squared_error, (x, y), param_masks=MASKS, sampling_method=method,
                  sampling_method_kwargs=kwargs, **{**COMMON, "lr": None, "num_draws": 200, "num_steps_bw_draws": 1})
    est = compute_llc(tree, num_burnin_draws=20)
    assert abs(est.llc_mean - 1.0) < 4 * est.llc_se + 0.05, (est.llc_mean, est.llc_se)


# ---------------------------------------------------------------------------------------------
# Invalid options: clear errors before any sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, match", [
    ({"rmsprop_eps": 0.1}, "only valid with sampling_method='rmsprop_sgld'"),
    ({"rmsprop_alpha": 0.9}, "only valid with sampling_method='rmsprop_sgld'"),
    ({"sampling_method": "langevin"}, "unknown sampling_method 'langevin'; allowed"),
    ({"batches_per_draw": 0}, "batches_per_draw must be an integer >= 1"),
    ({"observables": {"held": ((np.zeros((8, IN)), np.zeros((8, 1))), 0)}}, "'held': batches_per_draw must be >= 1"),
    ({"param_masks": {"params/dense/kernel": np.ones((1, 3), bool)}}, r"has shape \(1, 3\), but the parameter has shape \(3, 1\)"),
    ({"param_masks": {"params/dense/weight": None}}, "no parameter at path 'params/dense/weight'"),
    ({"param_masks": {"params/dense/bias": np.zeros(1, bool)}}, "leaves no parameter free"),
    ({"param_masks": {"params/dense/kernel": np.full((3, 1), 0.5)}}, "must be boolean"),
    ({"sampling_method": "rmsprop_sgld", "rmsprop_eps": 0.1, "sampling_method_kwargs": {"eps": 0.2}}, "conflicts"),
    ({"sampling_method": "rmsprop_sgld", "rmsprop_eps": 2.0}, r"must be in \(0, 1\]"),
    ({"sampling_method_kwargs": {"alpha": 0.9}}, r"not options of 'sgld'"),
    ({"sampling_method_kwargs": {"step_size": 0.1}}, "through sample\\(\\)'s 'lr'"),
    ({"sampling_method": "hmc"}, "tunes its own step size"),
    ({"sampling_method": "hmc", "lr": None, "bounding_box_size": 1.0}, "bounding_box_size is only supported"),
    ({"lr": None}, "needs a positive lr"),
    ({"lr": "fast"}, 'lr must be a finite number > 0 or "auto" \\(or None for self-tuning samplers\\), got \'fast\''),
    ({"noise_level": 0.0}, "noise_level must be > 0"),
    ({"n_beta": None}, "n_beta must be > 0"),
    ({"localization": -1.0}, "localization must be >= 0"),
    ({"num_draws": 0}, "num_draws must be an integer >= 1"),
    ({"observables": {"big": (np.zeros((5, IN)), np.zeros((5, 1)))}}, "fewer than batches_per_draw"),
    ({"observables": {"not valid": (np.zeros((64, IN)), np.zeros((64, 1)))}}, "must be a Python identifier"),
    ({"seed": None}, r"seed must be an integer in \[0, 2\^32\), got None"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\^32\), got -1"),
    ({"seed": "abc"}, r"seed must be an integer in \[0, 2\^32\), got 'abc'"),
    ({"seed": 2**32}, r"seed must be an integer in \[0, 2\^32\)"),
    ({"lr": "1e-4"}, r"lr must be a finite number > 0 or \"auto\" \(or None for self-tuning samplers\), got '1e-4'"),
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"batch_size": 2001}, r"batch_size × gradient_accumulation_steps = 2001 must be <= the dataset size n = 2000"),
    ({"batch_size": 1000, "gradient_accumulation_steps": 3}, "must be <= the dataset size n = 2000"),
    ({"step_bias": "yes"}, "step_bias must be True or False, got 'yes'"),
    ({"sampling_method": "hmc", "lr": None, "step_bias": True}, r"step_bias applies to \['sgld', .*not 'hmc'"),
    ({"sampling_method": "rmsprop_sgld", "sampling_method_kwargs": {"adapt": "always"}, "step_bias": True},
     r"step_bias needs a preconditioner fixed while drawing; 'rmsprop_sgld' moves it with "
     r"adapt='always' \(adapt='burnin' keeps it fixed\)$"),
])
def test_invalid_options_raise_clear_errors(problem, overrides, match):
    params, x, y = problem
    kwargs = {**COMMON, **overrides}
    with pytest.raises(ValueError, match=match):
        sample(apply_linear, params, squared_error, (x, y), **kwargs)


def test_loss_fn_must_be_per_sample(problem):
    params, x, y = problem

    def mean_loss(apply_fn, params, x, y):
        return jnp.mean(squared_error(apply_fn, params, x, y))

    with pytest.raises(ValueError, match=r"per-sample losses of shape \(m,\)"):
        sample(apply_linear, params, mean_loss, (x, y), **COMMON)


def test_lr_auto_on_the_tempered_posterior(problem):
    """lr="auto": ε = c/(nβ h_max + γ + nβ² s²_max/m) on the posterior actually sampled (with
    noise_level σ: nβ, γ divided by σ², and ε = σ² lr), recorded in attrs["run"]; λ̂ ≈ d/2."""
    params, x, y = problem
    kwargs = {**COMMON, "lr": "auto", "num_draws": 200}
    tree = sample(apply_linear, params, squared_error, (x, y), **kwargs)
    run = tree.attrs["run"]
    assert run["step_size_auto"] and run["num_hvp"] == 4 * (1 + C) and run["h_max"] > 0  # at w* and per chain
    design = np.concatenate([np.asarray(x), np.ones((x.shape[0], 1))], axis=1)
    h_max = np.linalg.eigvalsh(design.T @ design / x.shape[0])[-1]
    assert run["h_max"] == pytest.approx(h_max, rel=1e-3)
    assert run["step_size_wstar"] == pytest.approx(0.1 / (N_BETA * h_max + 1.0 + run["gradient_noise"]), rel=1e-3)
    assert run["step_size"] <= run["step_size_wstar"]
    assert tree.attrs["options"]["lr"] == "auto"
    result = compute_llc(tree, num_burnin_draws=BURNIN_DRAWS, source="full")
    assert result.llc_mean == pytest.approx(2.0, rel=0.1)  # 4 free parameters: λ = 2
    per_step = compute_llc(tree, num_burnin_draws=BURNIN_DRAWS, source="minibatch")  # noisier (see above)
    assert abs(per_step.llc_mean - 2.0) < 4 * per_step.llc_se, (per_step.llc_mean, per_step.llc_se)
    # σ = 2: the sampled posterior is p^(1/4); "auto" is measured on it, not on p
    tempered = sample(apply_linear, params, squared_error, (x, y), **{**kwargs, "num_draws": 2, "noise_level": 2.0})
    assert tempered.attrs["run"]["curvature"] == pytest.approx((N_BETA * h_max) / 4 + 0.25, rel=1e-3)
    # exact full-data gradients: no minibatch noise, so no noise term
    exact = sample(apply_linear, params, squared_error, (x, y), **{**kwargs, "num_draws": 2, "full_batch": True})
    assert exact.attrs["run"]["gradient_noise"] == 0.0 and exact.attrs["run"]["num_cvp"] == 0
    assert exact.attrs["run"]["step_size_wstar"] == pytest.approx(0.1 / (N_BETA * h_max + 1.0), rel=1e-3)


@pytest.mark.parametrize("name, instead", [("nbeta", "use n_beta"), ("optimizer_kwargs", "use sampling_method_kwargs"),
                                           ("grad_accum_steps", "use gradient_accumulation_steps")])
def test_devinterp_v1_names_are_refused_naming_the_new_spelling(problem, name, instead):
    params, x, y = problem
    with pytest.raises(TypeError, match=f"'{name}' is devinterp v1's name; {instead}"):
        sample(apply_linear, params, squared_error, (x, y), **COMMON, **{name: 1.0})
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_draw' \\(did you mean 'num_draws'\\?\\)"):
        sample(apply_linear, params, squared_error, (x, y), **COMMON, num_draw=3)


def test_unusable_output_path_is_refused_before_sampling(problem, tmp_path, monkeypatch):
    import llc_bench.sampling

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before refusing the output path")

    monkeypatch.setattr(llc_bench.sampling, "start_chains", no_sampling)
    params, x, y = problem
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    for path, match in [(blocker, "is a file, not a Zarr store"), (blocker / "run.zarr", "cannot be written")]:
        with pytest.raises(ValueError, match=match):
            sample(apply_linear, params, squared_error, (x, y), **COMMON, output_path=path, overwrite=True)
    assert blocker.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("num_chains", [1, 3])
def test_a_chain_that_never_moves_reads_exactly_zero(problem, num_chains):
    """lr = 1e-30 leaves every float32 weight where it is: λ̂ must be 0, not nβ × a rounding difference."""
    params, x, y = problem
    tree = sample(apply_linear, params, squared_error, (x, y), **{**COMMON, "lr": 1e-30, "num_chains": num_chains,
                                                                   "num_draws": 3, "num_steps_bw_draws": 1})
    assert np.all(np.asarray(tree["distance"]) == 0)
    est = compute_llc(tree, source="full")
    assert est.llc_mean == 0.0 and np.all(est.per_chain == 0.0)
    # the per-step loss is a minibatch's at w*: zero only on average
    per_step = compute_llc(tree, source="minibatch")
    minibatch_at_wstar = np.asarray(tree["metrics_loss"], np.float64).mean(axis=1)
    np.testing.assert_allclose(per_step.per_chain, N_BETA * (minibatch_at_wstar - est.loss_at_wstar), rtol=1e-10)
    assert np.all(per_step.per_chain != 0.0)


def test_store_swap_keeps_the_old_store_until_the_new_one_is_in(tmp_path, monkeypatch):
    import os

    from llc_bench import artifacts

    path = tmp_path / "run.zarr"
    artifacts.write_datatree_atomic(xr.DataTree(xr.Dataset({"v": ("i", [1, 2])})), path)
    new_tree = xr.DataTree(xr.Dataset({"v": ("i", [3, 4])}))
    real_replace, calls = os.replace, []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old store moved aside, new one about to go in
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="disk full"):
        artifacts.write_datatree_atomic(new_tree, path)
    monkeypatch.setattr(artifacts.os, "replace", real_replace)
    assert list(xr.open_datatree(path, engine="zarr")["v"].values) == [1, 2]
    artifacts.write_datatree_atomic(new_tree, path)
    assert list(xr.open_datatree(path, engine="zarr")["v"].values) == [3, 4]
    assert [p.name for p in tmp_path.iterdir()] == ["run.zarr"]  # nothing left aside


def test_full_batch_steps_use_the_exact_full_data_gradient(problem):
    """With full_batch the loss each step reports (at its starting point) is the full-data L_n there:
    step t_d + 1 starts where draw d was taken, so it must equal full_loss at draw d. Minibatches of
    size n drawn with replacement do not."""
    params, x, y = problem
    common = {**COMMON, "num_draws": 6, "num_steps_bw_draws": 1, "num_chains": 2, "save_metrics": True,
              "batch_size": 2000}
    exact = sample(apply_linear, params, squared_error, (x, y), **common, full_batch=True,
                   gradient_accumulation_steps=4)
    steps = np.asarray(exact["draw_step"])
    full = np.asarray(exact["full_loss"])
    np.testing.assert_allclose(np.asarray(exact["metrics_loss"])[:, steps[:-1] + 1], full[:, :-1], rtol=1e-5)
    assert exact.attrs["options"]["full_batch"] is True
    drawn = sample(apply_linear, params, squared_error, (x, y), **common)
    assert not np.allclose(np.asarray(drawn["metrics_loss"])[:, steps[:-1] + 1],
                           np.asarray(drawn["full_loss"])[:, :-1], rtol=1e-5)
    with pytest.raises(ValueError, match="must divide the dataset size n = 2000"):
        sample(apply_linear, params, squared_error, (x, y), **common, full_batch=True, gradient_accumulation_steps=3)
    with pytest.raises(ValueError, match="'hmc' always uses the full batch"):
        sample(apply_linear, params, squared_error, (x, y), **{**common, "lr": None}, sampling_method="hmc",
               full_batch=True)


def test_means_only_storage_gives_the_same_estimates(problem):
    params, x, y = problem
    kwargs = {**COMMON, "num_draws": 20, "observables": _observables(x, y)}
    full = sample(apply_linear, params, squared_error, (x, y), **kwargs)
    means = sample(apply_linear, params, squared_error, (x, y), **kwargs, per_sample_losses=False)
    assert means["sampling_loss"].dims == ("chain", "draw", "batch") and "sampling_index" not in means
    assert means["loss_held"].dims == ("chain", "draw", "batch_held")
    np.testing.assert_allclose(means["sampling_loss"], np.asarray(full["sampling_loss"]).mean(axis=-1), rtol=1e-6)
    for source in ("full", "sampling", "minibatch"):
        assert compute_llc(means, source=source).llc_mean == pytest.approx(
            compute_llc(full, source=source).llc_mean, rel=1e-6)
    chi_full, chi_means = compute_susceptibilities(full), compute_susceptibilities(means)
    assert float(chi_means["held"]) == pytest.approx(float(chi_full["held"]), rel=1e-5)
    assert "held_per_sample" in chi_full and "held_per_sample" not in chi_means
    with pytest.raises(ValueError, match="compute_bif needs per-sample losses"):
        compute_bif(means, "held")


@pytest.mark.parametrize("localization, spreading", [(1e-4, True), (300.0, False)])
def test_compute_llc_reports_chains_still_spreading_along_flat_directions(localization, spreading):
    """40 parameters the loss never reads are held only by γ: at γ = 1e-4 they diffuse freely for
    the whole run (‖w − w*‖² ∝ steps) while λ̂ already reads its regular part, so compute_llc says
    not_converged (still_spreading); at γ = 300 they equilibrate within a few steps: no such flag."""
    params, x, y = linear_problem()
    params = {**params, "unused": jnp.zeros(40)}

    def apply(p, xb):
        return apply_linear({"params": p["params"]}, xb)

    tree = sample(apply, params, squared_error, (x, y), lr=1e-4, n_beta=N_BETA, localization=localization,
                  num_chains=4, num_draws=60, num_steps_bw_draws=20, num_burnin_steps=200, batch_size=64, seed=1,
                  progress=False, full_loss_every=1)
    result = compute_llc(tree)
    codes = {f.code for f in result.flags}
    assert ("still_spreading" in codes) == spreading, codes
    if spreading:
        assert result.status == "not_converged"


def test_step_bias_takes_the_step_size_bias_off_a_regular_model(problem):
    """sample(step_bias=True): SGLD at c = 0.3 with batches of 32 reads λ̂ several SE above the exact
    posterior's ½ Σ nβh/(nβh + γ) (4 free weights, so about 2); compute_llc's llc_debiased, λ̂ minus
    the recorded first-order bias, is within the Monte Carlo error of it. With noise_level σ = 2 the
    chains sample nβ/4 and the record is in λ̂'s units: σ² × (ε/8)(curvature + noise) of that posterior."""
    params, x, y = problem
    kwargs = {**COMMON, "lr": "auto", "sampling_method_kwargs": {"auto_constant": 0.3}, "batch_size": 32,
              "num_draws": 4000, "num_steps_bw_draws": 4, "num_burnin_steps": 400, "sampling_loss": False,
              "step_bias": True}
    tree = sample(apply_linear, params, squared_error, (x, y), **kwargs)
    design = np.concatenate([np.asarray(x), np.ones((x.shape[0], 1))], axis=1)
    h = np.linalg.eigvalsh(design.T @ design / x.shape[0])
    exact = 0.5 * np.sum(N_BETA * h / (N_BETA * h + 1.0))
    record = tree.attrs["run"]["step_bias"]
    assert record["noise"] > 0 and record["num_probes_draws"] == C * 4000  # a probe at every full-data draw
    assert tree["curvature_probe"].shape == (C, 4000)
    est = compute_llc(tree, source="full")
    assert est.step_bias == record["applied"] == record["value_draws"]
    assert est.llc_mean - exact > 3 * est.llc_se, (est.llc_mean, exact, est.llc_se)
    assert est.llc_debiased == pytest.approx(est.llc_mean - est.step_bias)
    assert abs(est.llc_debiased - exact) < 3.5 * np.hypot(est.llc_se, record["se_draws"]), (est.llc_debiased, exact)
    # off by default: no record, no probes, and λ̂ the same to the last digit (the probes leave the chains alone)
    plain = sample(apply_linear, params, squared_error, (x, y), **{**kwargs, "step_bias": False})
    assert "step_bias" not in plain.attrs["run"] and "curvature_probe" not in plain
    plain_est = compute_llc(plain, source="full")
    assert plain_est.llc_mean == est.llc_mean and plain_est.llc_debiased is None
    tempered = sample(apply_linear, params, squared_error, (x, y), **{**kwargs, "num_draws": 20, "noise_level": 2.0})
    run = tempered.attrs["run"]
    assert run["step_bias"]["value"] == pytest.approx(
        4.0 * run["step_size"] / 8.0 * (run["step_bias"]["curvature"] + run["step_bias"]["noise"]), rel=1e-5)
    assert run["step_bias"]["curvature"] == pytest.approx(N_BETA / 4.0 * h.sum(), rel=0.5)  # Hutchinson, 16 probes
