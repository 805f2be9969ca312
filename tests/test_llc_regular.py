"""End-to-end estimator checks against known LLCs: a regular model (λ = d/2) and a deep linear network."""

import dataclasses
import logging
import math

import numpy as np
import pytest

from llc_bench.config import from_dict, replace
from llc_bench.estimator import estimate_llc
from llc_bench.experiment import build_posterior, run_sampler
from llc_bench.report import attempt_line
from llc_bench.samplers.sghmc import SGHMCSettings
from llc_bench.target import build_target
from llc_bench.truth import dln_learning_coefficient


def regular_config(**run):
    """Full-rank linear regression (one linear layer, no bias): λ = d/2 = in_dim·out_dim/2 exactly."""
    return from_dict({
        "data": {"n": 2000, "in_dim": 4, "out_dim": 2, "noise": "gaussian", "noise_scale": 1.0},
        "teacher": {"kind": "dln", "widths": [], "generator": "deepest"},
        "model": {"widths": [], "target_params": "none", "activation": "identity", "bias": False},
        "train": {"steps": 3000, "learning_rate": 0.05, "grad_tol": 1e-5},
        "posterior": {"gamma": 1.0},
        "run": {"samplers": ["sgld", "rmsprop_sgld", "hmc", "mclmc"], "num_chains": 4,
                "num_burnin_steps": 300, "num_draws": 200, "num_steps_bw_draws": 5, **run},
        "sampler": {"hmc": {"num_warmup": 300}, "mclmc": {"num_tuning_steps": 600}},
    })


@pytest.fixture(scope="module")
def regular():
    cfg = regular_config()
    target = build_target(cfg)
    return cfg, target, build_posterior(cfg, target)


@pytest.mark.parametrize("name", ["sgld", "rmsprop_sgld", "hmc", "mclmc"])
def test_regular_model_llc_is_half_dimension(regular, name):
    cfg, target, posterior = regular
    d = posterior.dim
    assert d == 8 and target.truth == pytest.approx(d / 2)
    # Even an exact sampler sees E[λ̂] = ½ Σ nβh/(nβh + γ) for a quadratic basin; with nβ ≈ 263,
    # h ≈ 1 and γ = 1 that is 0.4% below d/2, well inside the 10% the issue asks for.
    run = run_sampler(cfg, name, posterior, truth=target.truth)
    # a correct run of a regular model raises no flag (sgld at ε = 1e-4 mixes slowly: R̂ ≈ 1.05)
    assert run.summary["status"] in (("ok", "warnings") if name == "sgld" else ("ok",)), run.summary["warnings"]
    assert run.estimate.mean == pytest.approx(d / 2, rel=0.10)
    # the reported SE is honest: the truth lies within 4 SE plus the 10% band
    assert abs(run.estimate.mean - d / 2) < 4 * run.estimate.se + 0.1 * d / 2
    if name == "sgld":  # ε nβ h ≈ 0.03: a Metropolis test would accept nearly every proposal
        assert run.summary["mala_accept"] > 0.9


def test_target_rel_se_moves_the_burnin_past_a_drift(regular):
    """SGLD at ε = 1e-5 from w* with no burn-in: the loss relaxes over ~10³ steps, so the first attempts
    are not_converged. Each such verdict doubles the run and makes its first half burn-in, until the draws
    are stationary; λ̂ then matches d/2 within 4 SE, while the same chains averaged from step 0 read low."""
    cfg, target, posterior = regular
    cfg = replace(cfg, **{"run.target_rel_se": 0.1, "run.max_doublings": 6, "run.samplers": ["sgld"],
                          "sampler.sgld.step_size": 1e-5, "sampler.sgld.num_burnin_steps": 0,
                          "sampler.sgld.num_draws": 100})
    run = run_sampler(cfg, "sgld", posterior, truth=target.truth)
    record = run.summary["target_rel_se"]
    attempts = record["attempts"]
    assert attempts[0]["status"] == "not_converged" and record["reached"], attempts
    assert run.summary["status"] != "not_converged"
    for before, after in zip(attempts, attempts[1:], strict=False):
        if before["status"] == "not_converged":  # the run doubles, its first half becomes burn-in
            assert (after["num_burnin_steps"], after["steps"]) == (before["steps"], 2 * before["steps"])
        else:  # the draws after burn-in double
            assert after["num_burnin_steps"] == before["num_burnin_steps"]
            assert after["num_draws"] == 2 * before["num_draws"]
    assert run.result.num_burnin_steps == record["num_burnin_steps"] > 0
    assert run.result.loss_trace.shape[1] == record["steps"]
    assert abs(run.estimate.mean - 4.0) < 4 * run.estimate.se
    whole = estimate_llc(run.result.loss_trace, run.result.loss_at_wstar, run.result.n_beta)
    assert whole.mean < 4.0 - 2 * whole.se  # 3.56 ± 0.15: the relaxation from w* biases the whole run low


@pytest.mark.parametrize("name", ["sgld", "rmsprop_sgld"])
def test_regular_model_auto_step_size(regular, name):
    """step_size = "auto": ε from h_max = largest eigenvalue of xᵀx/n (the Hessian of L_n), λ̂ within
    4% of d/2 (the first-order bias bound c/4 = 2.5%, plus Monte Carlo error), status ok."""
    cfg, target, posterior = regular
    settings = dataclasses.replace(cfg.sampler[name], step_size="auto")
    run = run_sampler(cfg, name, posterior, truth=target.truth, settings=settings)
    s = run.summary
    # d = 8: the dense Hessian, at w* and at each of the 4 chains after burn-in
    assert s["step_size_auto"] and s["num_hvp"] == 5 * posterior.dim
    if name == "sgld":
        x = np.asarray(target.x, np.float64)
        h_max = np.linalg.eigvalsh(x.T @ x / posterior.n)[-1]  # σ = 1: ∇²L_n = xᵀx/n
        assert s["h_max"] == pytest.approx(h_max, rel=1e-3)
        assert s["step_size_wstar"] == pytest.approx(
            s["step_size_constant"] / (posterior.n_beta * h_max + posterior.gamma + s["gradient_noise"]), rel=1e-3)
        # a quadratic basin: the curvature where the chains are is the same (the noise varies a little)
        assert s["h_max_burnin"] == pytest.approx(h_max, rel=1e-3)
        assert s["step_size"] == pytest.approx(s["step_size_wstar"], rel=0.1) and s["step_size"] <= s["step_size_wstar"]
    assert s["status"] == "ok", s["warnings"]
    assert run.estimate.mean == pytest.approx(4.0, rel=0.04)
    assert abs(run.estimate.mean - 4.0) < 4 * run.estimate.se + 0.025 * 4.0
    assert s["grad_evals"] > float(np.sum(run.result.grad_evals))  # the HVPs are counted as work


def test_debiased_llc_removes_the_step_size_bias(regular):
    """SGLD at c = 0.3 with batches of 32 reads λ̂ several SE above the exact posterior's value
    ½ Σ nβh/(nβh + γ); the summary's first-order estimate of the step size's bias takes it back to
    within the Monte Carlo error (the O(ε²) rest is ~0.3% here), and the bench row carries both."""
    from llc_bench.bench import result_row
    from llc_bench.bench_suite import Instance

    cfg, target, posterior = regular
    cfg = replace(cfg, **{"sampler.sgld.num_draws": 4000, "sampler.sgld.num_burnin_steps": 1000})
    settings = dataclasses.replace(cfg.sampler["sgld"], step_size="auto", auto_constant=0.3, batch_size=32)
    run = run_sampler(cfg, "sgld", posterior, truth=target.truth, settings=settings)
    s, se = run.summary, run.estimate.se
    x = np.asarray(target.x, np.float64)
    h = np.repeat(np.linalg.eigvalsh(x.T @ x / posterior.n), 2)  # ∇²L_n = I_2 ⊗ xᵀx/n (two outputs)
    exact = 0.5 * np.sum(posterior.n_beta * h / (posterior.n_beta * h + posterior.gamma))
    bias = s["step_bias"]
    assert bias["noise"] > 0 and bias["num_products"] == 2 * 4 * 4  # 4 chains, 4 probes, two traces
    assert run.estimate.mean - exact > 4 * se, (run.estimate.mean, exact, se)
    assert s["llc_debiased"] == pytest.approx(run.estimate.mean - bias["value"])
    assert abs(s["llc_debiased"] - exact) < 3.5 * math.hypot(se, bias["se"]), (s["llc_debiased"], exact, se, bias)
    from rich.console import Console

    from llc_bench.report import print_report

    console = Console(record=True, width=300)
    print_report({"n": posterior.n, "d": posterior.dim, "n_beta": posterior.n_beta, "gamma": posterior.gamma,
                  "loss_at_wstar": posterior.loss_at_wstar, "truth": 4.0, "samplers": {"sgld": s}}, None, console)
    assert f"λ̂ − it = {s['llc_debiased']:.4g}" in console.export_text()
    inst = Instance("regular", "test", 0, (4, 2), 2, "deepest", 0, posterior.dim, 4.0, posterior.n)
    # skipped on request (tune's grid does), and the estimate never touches the chains
    plain = run_sampler(cfg, "sgld", posterior, truth=target.truth, settings=settings, step_bias=False)
    assert plain.summary["step_bias"] is None and plain.summary["llc_debiased"] is None
    assert plain.estimate.mean == run.estimate.mean
    row = result_row(inst, "sgld", s, n_beta=posterior.n_beta, data_rows=posterior.n, recipe_hash="x")
    assert float(row["llc_debiased"]) == pytest.approx(s["llc_debiased"], rel=1e-5)
    assert float(row["step_bias"]) == pytest.approx(bias["applied"], rel=1e-5) and bias["applied"] == bias["value"]


def test_step_bias_draws_with_a_frozen_rmsprop_preconditioner(regular):
    """run.step_bias_draws under RMSProp-SGLD's frozen G (read from each chain's state inside the
    draws): on a Gaussian posterior tr(PH) does not depend on w, so the covariance term is ~0 and both
    estimates agree; with adapt="always" there is no estimate at all."""
    cfg, target, posterior = regular
    cfg = replace(cfg, **{"run.step_bias_draws": True})
    settings = dataclasses.replace(cfg.sampler["rmsprop_sgld"], step_size="auto", auto_constant=0.2)
    bias = run_sampler(cfg, "rmsprop_sgld", posterior, settings=settings).summary["step_bias"]
    assert bias["num_probes_draws"] == cfg.run.num_chains * cfg.schedule["rmsprop_sgld"].num_draws
    assert abs(bias["covariance"]) < 0.02 * bias["value_draws"]
    assert abs(bias["value_draws"] - bias["value"]) < 3.5 * math.hypot(bias["se"], bias["se_draws"])
    assert bias["applied"] == bias["value_draws"]  # what llc_debiased subtracts when the draws had probes
    always = dataclasses.replace(settings, adapt="always")
    assert run_sampler(cfg, "rmsprop_sgld", posterior, settings=always).summary["step_bias"] is None


@pytest.mark.parametrize("name", ["sgld", "hmc"])
def test_one_parameter_regression_reads_ok(name):
    """λ = ½ (d = 1): a ½χ²₁-shaped loss and a mean rise below its own spread, yet nothing to flag."""
    cfg = regular_config(samplers=[name])
    cfg = replace(cfg, **{"data.in_dim": 1, "data.out_dim": 1, "sampler.sgld.step_size": "auto"})
    target = build_target(cfg)
    run = run_sampler(cfg, name, build_posterior(cfg, target), truth=target.truth)
    assert run.summary["status"] == "ok", run.summary["warnings"]
    assert abs(run.estimate.mean - 0.5) < 4 * run.estimate.se + 0.025


def test_same_seed_same_estimate(regular):
    cfg, _, posterior = regular
    a = run_sampler(cfg, "sgld", posterior).estimate
    b = run_sampler(cfg, "sgld", posterior).estimate
    assert a.mean == b.mean
    np.testing.assert_array_equal(a.per_chain, b.per_chain)
    assert len(set(np.round(a.per_chain, 6))) == len(a.per_chain)  # chains got different noise


def test_huge_step_size_is_flagged_not_averaged(regular):
    cfg, _, posterior = regular
    settings = cfg.sampler["sgld"].__class__(step_size=10.0, batch_size=64)
    run = run_sampler(cfg, "sgld", posterior, settings=settings)
    assert run.summary["status"] == "failed"
    assert run.summary["mala_accept"] is None  # no finite chain left to test from
    assert run.summary["llc_mean"] is None
    assert all(s >= 0 for s in run.summary["diverged_at"])


def _dln_config(name: str, run: dict, sampler: dict):
    """A rank-2 `deepest` DLN 6-5-4-4 at its teacher, noise-free, n = 10,000, 4 chains of `name`."""
    return from_dict({
        "data": {"n": 10000, "in_dim": 6, "out_dim": 4, "distribution": "uniform", "box_half_width": 1.0,
                 "noise": "none"},
        "teacher": {"kind": "dln", "widths": [5, 4], "rank": 2, "generator": "deepest"},
        "model": {"widths": [5, 4], "target_params": "none", "activation": "identity", "bias": False},
        "train": {"use_teacher": True},
        "posterior": {"gamma": 1.0},
        "run": {"samplers": [name], "num_chains": 4, **run},
        "sampler": sampler,
    })


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgld", "rmsprop_sgld", "hmc", "mclmc"])
def test_dln_llc_matches_aoyagi(name):
    """A rank-deficient deep linear network at its teacher (Lau et al. protocol) against Aoyagi's λ."""
    cfg = _dln_config(
        name, {"num_burnin_steps": 2000, "num_draws": 400, "num_steps_bw_draws": 10},
        # RMSProp's largest per-parameter step is ε/a = 10ε near a noise-free w* (tiny gradients):
        # measured λ̂ = 24 at ε = 2e-4 (too coarse) and 8.2 at ε = 2e-6 (burn-in too short).
        {"sgld": {"step_size": 2e-5}, "rmsprop_sgld": {"step_size": 5e-6}})
    target = build_target(cfg)
    assert target.truth == pytest.approx(dln_learning_coefficient([6, 5, 4, 4], 2))
    run = run_sampler(cfg, name, build_posterior(cfg, target), truth=target.truth)
    assert run.estimate.mean == pytest.approx(target.truth, rel=0.15)


def test_target_rel_se_doubles_the_draws_until_reached(regular, caplog):
    """run.target_rel_se: draws 25 → 50 → … until SE/λ̂ <= 3% (and no drift); each attempt extends the
    last, and is logged as it ends."""
    cfg, target, posterior = regular
    cfg = replace(cfg, **{"run.target_rel_se": 0.03, "run.max_doublings": 4, "sampler.hmc.num_draws": 25,
                          "run.samplers": ["hmc"], "sampler.hmc.num_warmup": 100})
    with caplog.at_level(logging.INFO, logger="llc_bench.experiment"):
        run = run_sampler(cfg, "hmc", posterior, truth=target.truth)
    record = run.summary["target_rel_se"]
    logged = [r.getMessage() for r in caplog.records if r.name == "llc_bench.experiment"]
    assert logged == [f"attempt {i + 1}: {attempt_line(a)}" for i, a in enumerate(record["attempts"])]
    assert f"λ̂ {record['attempts'][0]['llc_mean']:.4g}" in logged[0]
    draws = [a["num_draws"] for a in record["attempts"]]
    assert draws == [25 * 2**i for i in range(len(draws))] and len(draws) >= 2
    assert record["reached"] and record["num_draws"] == draws[-1] == run.result.draw_loss.shape[1]
    assert record["attempts"][-1]["rel_se"] <= 0.03 < record["attempts"][-2]["rel_se"]
    # converged attempts draw on under the warm-up's tuning (only a not_converged one retunes)
    assert {a["tuned"]["step_size"] for a in record["attempts"]} == {run.result.tuned["step_size"]}
    sched = cfg.schedule["hmc"]
    assert record["steps"] == sched.num_burnin_steps + draws[-1] * sched.num_steps_bw_draws
    # each doubling draws on from the last: the attempts' work grows, the final one is the run's
    work = [a["grad_evals"] for a in record["attempts"]]
    assert np.all(np.diff(work) > 0) and work[-1] == pytest.approx(float(np.sum(run.result.grad_evals)))
    # the same keys: the shorter attempt's chains are the start of the final one's
    short = run_sampler(replace(cfg, **{"run.target_rel_se": 0.0}), "hmc", posterior)
    np.testing.assert_array_equal(short.result.draw_loss, run.result.draw_loss[:, :25])
    assert short.summary["target_rel_se"] is None
    # The final SE is up to 3% of λ̂ (≈ 0.1): a 5% band rejects about one realization in ten (six
    # other run.seed values gave 3.77-4.12), so the band is the 10% of the test above, and 4 SE.
    assert run.estimate.mean == pytest.approx(4.0, rel=0.10)
    assert abs(run.estimate.mean - 4.0) < 4 * run.estimate.se


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgld", "rmsprop_sgld"])
def test_dln_llc_auto_step_size(name):
    """The rank-deficient DLN above, noise-free at its teacher, with step_size = "auto" (no gradient
    noise at w*, so ε = c/(nβ h_max + γ); rmsprop: G = 1/a there) and 30k steps: within 10% of Aoyagi."""
    cfg = _dln_config(name, {"num_burnin_steps": 10000, "num_draws": 1000, "num_steps_bw_draws": 20},
                      {name: {"step_size": "auto", "batch_size": 256}})
    target = build_target(cfg)
    run = run_sampler(cfg, name, build_posterior(cfg, target), truth=target.truth)
    assert run.summary["gradient_noise"] == 0.0 and run.summary["h_max"] > 0
    assert run.summary["status"] != "failed"
    assert run.estimate.mean == pytest.approx(target.truth, rel=0.10)


@pytest.mark.slow
def test_sghmc_regular_model_llc_carries_the_predicted_noise_bias(regular):
    """SGHMC at friction a = 0.1 with step_size = "auto": minibatch noise inflates each direction's
    variance by ε nβ² s_u²/(4 a m) to first order (sghmc.build), 1/a times SGLD's. For this
    regression s_u² ≈ h_u (the per-sample gradient covariance at w* is σ² xᵀx/n, σ = 1), so
    E[λ̂] ≈ ½ Σ_u r_u (1 + ε κ_u/(4(2 − a)) + ε nβ² h_u/(4 a m)), r_u = nβh_u/(nβh_u + γ): +11% here."""
    cfg, target, posterior = regular
    settings = dataclasses.replace(SGHMCSettings(), step_size="auto")
    run = run_sampler(replace(cfg, **{"run.samplers": ["sghmc"]}), "sghmc", posterior, settings=settings)
    eps, nb, m, a = run.summary["step_size"], posterior.n_beta, settings.batch_size, settings.alpha
    x = np.asarray(target.x, np.float64)
    h = np.linalg.eigvalsh(x.T @ x / posterior.n)
    h = np.repeat(h, posterior.dim // h.size)  # one linear layer: the Hessian is xᵀx/n ⊗ I_out
    kappa = nb * h + posterior.gamma
    predicted = 0.5 * np.sum(nb * h / kappa * (1 + eps * kappa / (4 * (2 - a)) + eps * nb**2 * h / (4 * a * m)))
    assert predicted > 1.08 * posterior.dim / 2  # the bias is large enough to be seen
    assert abs(run.estimate.mean - predicted) < 4 * run.estimate.se + 0.02 * predicted, (run.estimate.mean, predicted)


@pytest.mark.slow
def test_sgnht_regular_model_llc_is_half_dimension(regular):
    """SGNHT's thermostat absorbs the minibatch noise that biases SGHMC: λ̂ = d/2 within the c/4
    discretization bound, given the burn-in (≈ A/η steps) its friction needs to settle."""
    cfg, target, posterior = regular
    cfg = replace(cfg, **{"run.samplers": ["sgnht"], "sampler.sgnht.step_size": "auto",
                          "sampler.sgnht.num_burnin_steps": 4000, "sampler.sgnht.num_draws": 400})
    run = run_sampler(cfg, "sgnht", posterior)
    assert run.summary["status"] in ("ok", "warnings"), run.summary["warnings"]
    assert abs(run.estimate.mean - 4.0) < 4 * run.estimate.se + 0.03 * 4.0, (run.estimate.mean, run.estimate.se)
