"""The per-step λ̂ of SG samplers (each step's own minibatch loss): it agrees with the full-data λ̂ within their SEs (λ = d/2, a deep linear network), the diagnostic schedule does not change it, the same seed reproduces it bit for bit."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from llc_bench.estimator import cross_check, estimate_llc
from llc_bench.sampling import compute_llc, default_full_loss_every, sample


def squared_error(apply_fn, params, x, y):
    return 0.5 * jnp.sum((apply_fn(params, x) - y) ** 2, axis=-1)


def affine(params, x):
    return x @ params["kernel"] + params["bias"]


def deep_linear(params, x):
    for name in sorted(params):
        x = x @ params[name]
    return x


def regression_problem(n=2000, dim=3, seed=0):
    """y = x w + b + N(0, 1) and w* its least-squares fit: regular, λ = (dim + 1)/2."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x @ rng.normal(size=(dim, 1)) + 0.3 + rng.normal(size=(n, 1))).astype(np.float32)
    design = np.concatenate([x, np.ones((n, 1), np.float32)], axis=1)
    coef = np.linalg.lstsq(design, y, rcond=None)[0].astype(np.float32)
    params = {"kernel": jnp.asarray(coef[:dim]), "bias": jnp.asarray(coef[dim])}
    return params, jnp.asarray(x), jnp.asarray(y)


def dln_problem(widths=(4, 5, 3), n=2000, seed=1):
    """A deep linear network at its teacher, targets with unit Gaussian noise."""
    rng = np.random.default_rng(seed)
    params = {f"w{i}": jnp.asarray(rng.normal(size=(a, b)) / math.sqrt(a), jnp.float32)
              for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))}
    x = jnp.asarray(rng.normal(size=(n, widths[0])), jnp.float32)
    y = deep_linear(params, x) + jnp.asarray(rng.normal(size=(n, widths[-1])), jnp.float32)
    return params, x, y


# nβ sd(L_m) = 100 · 0.7/√256 ≈ 4.4 per step against a posterior sd of nβ L_n of ≈ √λ: the per-step
# estimate's minibatch noise does not swamp it. ε nβ h ≈ 0.1 (h ≈ 1): SGLD's bias ≈ +2.5%.
RUN = dict(lr=1e-3, n_beta=100.0, localization=1.0, num_chains=4, num_burnin_steps=300, batch_size=256,
           progress=False, seed=11)


@pytest.mark.parametrize("model", ["regression", "dln"])
def test_per_step_estimate_equals_the_full_data_estimate_within_their_ses(model):
    """Every post-burn-in step's L_m against the full-data L_n at every 5th step, on the same chains."""
    if model == "regression":
        params, x, y = regression_problem()
        apply_fn = affine
    else:
        params, x, y = dln_problem()
        apply_fn = deep_linear
    tree = sample(apply_fn, params, squared_error, (x, y), num_draws=600, num_steps_bw_draws=5,
                  full_loss_every=1, **RUN)
    per_step, full = compute_llc(tree, source="minibatch"), compute_llc(tree)
    assert per_step.source == "minibatch" and full.source == "full"
    check = per_step.cross_check
    assert check["llc_full"] == full.llc_mean and check["llc_per_step"] == per_step.llc_mean
    assert abs(per_step.llc_mean - full.llc_mean) < 2 * math.hypot(per_step.llc_se, full.llc_se), check
    assert not check["disagree"] and "estimates_disagree" not in {f.code for f in per_step.flags}
    # both estimates are of something: positive, with SEs well below their values
    assert per_step.llc_se < 0.2 * per_step.llc_mean and full.llc_se < 0.2 * full.llc_mean
    if model == "regression":  # λ = d/2 = 2 (kernel 3 + bias 1), SGLD's bias ≈ +2.5%
        for est in (per_step, full):
            assert abs(est.llc_mean - 2.0) < 4 * est.llc_se + 0.1, (est.source, est.llc_mean, est.llc_se)


def test_diagnostic_schedule_does_not_change_the_per_step_estimate():
    """The full-data schedule (full_loss_every) and the draw spacing change what is evaluated between
    steps, never the steps: the per-step trace and λ̂ stay the same."""
    params, x, y = regression_problem()
    common = {**RUN, "num_burnin_steps": 50}
    runs = {
        "every draw": sample(affine, params, squared_error, (x, y), num_draws=40, num_steps_bw_draws=5,
                             full_loss_every=1, **common),
        "every 8th": sample(affine, params, squared_error, (x, y), num_draws=40, num_steps_bw_draws=5,
                            full_loss_every=8, **common),
        "k = 1, auto": sample(affine, params, squared_error, (x, y), num_draws=200, num_steps_bw_draws=1,
                              **common),
    }
    assert runs["every 8th"].sizes["full_draw"] == 5 and runs["every draw"].sizes["full_draw"] == 40
    np.testing.assert_array_equal(runs["every 8th"]["full_draw_step"], 50 + 5 * np.arange(8, 41, 8) - 1)
    # the draws the two schedules share have the same full-data L_n
    np.testing.assert_allclose(runs["every 8th"]["full_loss"], runs["every draw"]["full_loss"][:, 7::8], rtol=1e-6)
    reference = compute_llc(runs["every draw"], source="minibatch")
    for name, tree in runs.items():
        np.testing.assert_allclose(tree["metrics_loss"], runs["every draw"]["metrics_loss"], rtol=1e-6, err_msg=name)
        assert compute_llc(tree, source="minibatch").llc_mean == pytest.approx(reference.llc_mean, rel=1e-6), name
    # while the full-data estimate, from other draws, differs
    assert compute_llc(runs["every 8th"], source="full").llc_mean != compute_llc(runs["every draw"], source="full").llc_mean


def test_same_seed_bit_identical_per_step_estimate():
    params, x, y = regression_problem()
    kwargs = {**RUN, "num_burnin_steps": 20, "num_draws": 30, "num_steps_bw_draws": 2}
    a = sample(affine, params, squared_error, (x, y), **kwargs)
    b = sample(affine, params, squared_error, (x, y), **kwargs)
    np.testing.assert_array_equal(a["metrics_loss"], b["metrics_loss"])
    np.testing.assert_array_equal(a["full_loss"], b["full_loss"])
    ea, eb = compute_llc(a, source="minibatch"), compute_llc(b, source="minibatch")
    assert ea.llc_mean == eb.llc_mean and ea.llc_se == eb.llc_se and ea.cross_check == eb.cross_check
    other = sample(affine, params, squared_error, (x, y), **{**kwargs, "seed": 12})
    assert compute_llc(other, source="minibatch").llc_mean != ea.llc_mean


def test_default_full_data_schedule():
    # SG: about every 4 n/m = 156.25 steps, in draws, a divisor of num_draws when one is within 25%
    assert default_full_loss_every("sgld", 10_000, 256, False, 1, 1500) == 150
    assert default_full_loss_every("sgld", 10_000, 256, False, 10, 150) == 15
    assert default_full_loss_every("sgld", 10_000, 256, False, 1, 1499) == 156  # 1499 is prime
    assert default_full_loss_every("rmsprop_sgld", 10_000, 256, False, 1, 20) == 20  # at most num_draws
    assert default_full_loss_every("sgld", 10_000, 256, True, 1, 100) == 4
    assert default_full_loss_every("hmc", 10_000, 256, False, 1, 100) == 1


def test_cross_check_flags_a_disagreement_beyond_the_combined_se():
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.1, size=(4, 400))
    same = estimate_llc(base, 0.0, 10.0)
    shifted = estimate_llc(base + 0.02, 0.0, 10.0)  # +0.2 in λ̂
    near = cross_check(same, estimate_llc(base + 1e-4, 0.0, 10.0))
    far = cross_check(same, shifted)
    assert near["z"] < 0.1 and not near["disagree"]
    assert far["z"] == pytest.approx(0.2 / math.hypot(same.se, shifted.se), rel=1e-6)
    assert far["disagree"] == (far["z"] > 4.0)
    assert far["disagree"]  # SEs ≈ 0.03: 0.2 is several of them
    assert cross_check(same, estimate_llc(base[:1], 0.0, 10.0)) is not None  # batch-means SE with one chain
    assert cross_check(same, estimate_llc(base[:1, :1], 0.0, 10.0)) is None  # one draw of one chain: no SE


def test_a_rerun_reuses_the_compiled_chunks_unless_a_static_option_changes(monkeypatch):
    """lr, nβ, γ, the seed, w* and the data's values are arguments of the compiled chunks: a run that
    changes only those reuses them and gets the numbers a fresh compilation gives; a new batch size
    (a shape) compiles again."""
    import llc_bench.runner
    import llc_bench.sampling

    compiled = []
    real = llc_bench.runner._compile

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        compiled.append(out[0])
        return out

    monkeypatch.setattr(llc_bench.runner, "_compile", recording)
    params, x, y = regression_problem(seed=3)
    kwargs = {**RUN, "num_burnin_steps": 10, "num_draws": 20, "num_steps_bw_draws": 2}
    first = sample(affine, params, squared_error, (x, y), **kwargs)
    n_first = len(compiled)  # warm-up, burn-in chunk, draw chunk, L_n(w*)
    second = sample(affine, params, squared_error, (x, y), **kwargs)
    assert n_first == 4 and compiled[n_first:] == compiled[:n_first]  # the same objects: not lowered again
    np.testing.assert_array_equal(first["metrics_loss"], second["metrics_loss"])

    params2, x2, y2 = regression_problem(seed=4)  # other data and w*, same shapes
    traced = {**kwargs, "lr": 2e-3, "n_beta": 30.0, "localization": 5.0, "seed": 12}
    other = sample(affine, params2, squared_error, (x2, y2), **traced)
    assert compiled[2 * n_first:] == compiled[:n_first]
    assert not np.array_equal(other["metrics_loss"], first["metrics_loss"])
    llc_bench.sampling._EXECUTABLES.clear()
    fresh = sample(affine, params2, squared_error, (x2, y2), **traced)
    assert all(new is not old for new, old in zip(compiled[3 * n_first:], compiled[:n_first], strict=True))
    for name in ("metrics_loss", "full_loss", "init_loss"):
        np.testing.assert_array_equal(other[name], fresh[name])
    assert float(other["full_loss_at_wstar"]) == float(fresh["full_loss_at_wstar"])

    n_before = len(compiled)
    sample(affine, params2, squared_error, (x2, y2), **{**traced, "batch_size": 128})
    assert len(compiled) == n_before + n_first
    assert all(new is not old for new, old in zip(compiled[n_before:], compiled[:n_first], strict=True))
