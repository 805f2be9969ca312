"""Health checks: each synthetic failure fires exactly its flag; MALA acceptance; the ε-halving check."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llc_bench.health import (
    MALA_MIN_ACCEPT,
    NOT_CONVERGED_CODES,
    REMEDIES,
    HealthFlag,
    check_health,
    drift_test,
    mala_acceptance,
    mala_log_accept_ratio,
    run_status,
    spread_exponent,
    step_size_check_summary,
    unsplit_rank_rhat,
)
from llc_bench.runner import ChainResult

L_STAR = 0.5
RISE = 1.0


def synthetic_result(level, *, num_chains=4, num_steps=2000, num_burnin=400, thin=5,
                     noise=0.1, phi=0.8, seed=0, sampler="sgld") -> ChainResult:
    """loss_t = L* + level(c, t) + stationary AR(1) noise of marginal sd `noise`; draws every `thin` steps.

    `level` maps (chain index (C, 1), step index (1, T)) arrays to the noiseless trace.
    """
    rng = np.random.default_rng(seed)
    eps = rng.normal(size=(num_chains, num_steps)) * noise * np.sqrt(1 - phi**2)
    ar = np.empty_like(eps)
    ar[:, 0] = rng.normal(size=num_chains) * noise
    for t in range(1, num_steps):
        ar[:, t] = phi * ar[:, t - 1] + eps[:, t]
    c = np.arange(num_chains)[:, None]
    t = np.arange(num_steps)[None, :]
    trace = L_STAR + np.broadcast_to(level(c, t), (num_chains, num_steps)) + ar
    steps = np.arange(num_burnin, num_steps, thin)
    nan = np.full((num_chains, num_steps), np.nan)
    return ChainResult(
        sampler=sampler, loss_trace=trace, accept=nan, energy_change=nan,
        diverging=np.zeros((num_chains, num_steps), bool), draw_loss=trace[:, steps],
        draw_steps=steps, projections=rng.normal(size=(num_chains, steps.size, 2)),
        diverged_at=-np.ones(num_chains, int), grad_evals=np.full(num_chains, 100.0),
        warmup_grad_evals=np.zeros(num_chains), num_burnin_steps=num_burnin,
        loss_at_wstar=L_STAR, n_beta=10.0, wall_s=1.0, warmup_s=0.0, compile_s=0.0, tuned={},
    )


def clean(c, t):
    return RISE * (1 - np.exp(-t / 50.0))


def with_nan(res: ChainResult, chain: int, step: int) -> ChainResult:
    trace = res.loss_trace.copy()
    trace[chain, step:] = np.nan
    draws = res.draw_loss.copy()
    draws[chain, res.draw_steps >= step] = np.nan
    diverged_at = res.diverged_at.copy()
    diverged_at[chain] = step
    return res.__class__(**{**res.__dict__, "loss_trace": trace, "draw_loss": draws,
                            "diverged_at": diverged_at})


def with_spikes(res: ChainResult, chain: int, steps, height: float) -> ChainResult:
    trace = res.loss_trace.copy()
    trace[chain, steps] += height
    return res.__class__(**{**res.__dict__, "loss_trace": trace, "draw_loss": trace[:, res.draw_steps]})


CASES = {
    "clean": (lambda s: synthetic_result(clean, seed=s), set()),
    "nan": (lambda s: with_nan(synthetic_result(clean, seed=s), chain=1, step=1200), {"nan"}),
    "not_leveling": (lambda s: synthetic_result(lambda c, t: RISE * t / 2000, seed=s), {"not_leveling"}),
    "burnin_too_short": (
        lambda s: synthetic_result(lambda c, t: RISE * (1 - np.exp(-t / 300.0)), num_burnin=50, seed=s),
        {"burnin_too_short"},
    ),
    # spikes land on draw steps too (multiples of 5 after burn-in), 50 noise sds high
    "spikes": (lambda s: with_spikes(synthetic_result(clean, seed=s), 2, [700, 1105, 1650], 5.0), {"spikes"}),
    "below_wstar": (lambda s: synthetic_result(lambda c, t: -0.3 * (1 - np.exp(-t / 50.0)), seed=s),
                    {"below_wstar"}),
    "low_snr": (lambda s: synthetic_result(lambda c, t: 0.05 * (1 - np.exp(-t / 50.0)), seed=s), {"low_snr"}),
    # the level drops by 4% of the rise halfway through the draws (chains sliding to a lower
    # plateau): no rise, so neither not_leveling nor burnin_too_short, but the halves of the draws
    # differ by ≈ 5 standard errors
    "not_converged": (
        lambda s: synthetic_result(lambda c, t: RISE * (1 - np.exp(-t / 50.0)) - 0.04 * RISE * (t >= 1200), seed=s),
        {"not_converged"},
    ),
    "chains_disagree": (
        lambda s: synthetic_result(lambda c, t: (RISE + 0.3 * (c >= 2)) * (1 - np.exp(-t / 50.0)), seed=s),
        {"chains_disagree"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_each_failure_fires_exactly_its_flag(case, seed):
    make, expected = CASES[case]
    flags = check_health(make(seed))
    assert {f.code for f in flags} == expected, [f.message for f in flags]
    for f in flags:
        assert isinstance(f, HealthFlag) and f.remedy == REMEDIES[f.code] and f.message


def test_nan_flag_names_chain_and_step_and_other_checks_ignore_it():
    res = with_nan(synthetic_result(clean), chain=3, step=900)
    (flag,) = check_health(res)
    assert flag.code == "nan" and flag.chains == (3,) and "900" in flag.message
    assert flag.remedy.startswith("First decrease ε")


def test_remedies_follow_the_guide():
    assert REMEDIES["not_leveling"].startswith("Increase ε and/or take more total steps")
    assert REMEDIES["below_wstar"] == "Increase γ and/or decrease nβ."
    assert REMEDIES["spikes"] == REMEDIES["nan"]
    assert "batch size" in REMEDIES["low_snr"]


def test_divergent_transitions_are_reported():
    res = synthetic_result(clean, sampler="hmc")
    diverging = res.diverging.copy()
    diverging[0, [1000, 1500]] = True
    diverging[1, 100] = True  # during burn-in: not counted
    res = res.__class__(**{**res.__dict__, "diverging": diverging})
    (flag,) = check_health(res)
    assert flag.code == "divergences" and flag.chains == (0,) and flag.message.startswith("2 ")


def test_unsplit_rhat_ignores_a_shared_trend_but_sees_a_shift():
    rng = np.random.default_rng(0)
    trend = np.linspace(0, 5, 1000)[None] + rng.normal(size=(4, 1000))
    assert unsplit_rank_rhat(trend) < 1.01
    shifted = rng.normal(size=(4, 1000)) + np.array([0, 0, 1, 1])[:, None]
    assert unsplit_rank_rhat(shifted) > 1.1


# --- MALA acceptance on a standard Gaussian ------------------------------------------------

def gaussian_logdensity_and_grad(w):
    return jax.value_and_grad(lambda v: -0.5 * jnp.sum(v**2))(w)


def test_mala_log_ratio_matches_hand_computation():
    w = jnp.array([0.3, -1.2])
    w_new = jnp.array([0.1, -0.7])
    eps = 0.4
    # log π(w') − log π(w) + log q(w|w') − log q(w'|w), with q(b|a) = N(b; a(1 − ε/2), ε I)
    expected = (-0.5 * np.sum(w_new**2) + 0.5 * np.sum(w**2)
                - np.sum((w - w_new * (1 - eps / 2)) ** 2) / (2 * eps)
                + np.sum((w_new - w * (1 - eps / 2)) ** 2) / (2 * eps))
    got = mala_log_accept_ratio(gaussian_logdensity_and_grad, w, w_new, eps)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_mala_acceptance_near_one_for_tiny_step_and_small_for_huge_step():
    key = jax.random.key(0)
    positions = jax.random.normal(key, (64, 10))  # draws from the target itself
    tiny = mala_acceptance(gaussian_logdensity_and_grad, positions, 1e-4, jax.random.key(1))
    assert tiny.mean_accept > 0.99 and tiny.flag is None
    huge = mala_acceptance(gaussian_logdensity_and_grad, positions, 3.0, jax.random.key(1))
    assert huge.mean_accept < 0.1
    assert huge.flag is not None and huge.flag.code == "mala_low_accept"
    assert huge.mean_accept < MALA_MIN_ACCEPT
    assert huge.accept.shape == (64,)


# --- step-size halving ----------------------------------------------------------------------

def test_step_size_check():
    ok = step_size_check_summary(10.0, 10.5)
    assert ok["rel_change"] == pytest.approx(0.05) and ok["flag"] is False and ok["message"] is None
    biased = step_size_check_summary(20.0, 10.0)
    assert biased["rel_change"] == pytest.approx(-0.5) and biased["flag"] is True
    assert biased["code"] == "step_size_bias" and "smaller ε" in biased["remedy"]
    # a 20% move inside two standard errors of noise is not evidence of bias
    assert step_size_check_summary(10.0, 12.0, se_eps=1.5, se_half=1.5)["flag"] is False
    assert step_size_check_summary(10.0, 12.0, se_eps=0.1, se_half=0.1)["flag"] is True
    broken = step_size_check_summary(10.0, float("nan"))
    assert broken["flag"] is True and broken["rel_change"] is None
    json.dumps(broken)  # goes into summary.json as is


# --- not_converged: the drift test and the run status ------------------------------------------

def ar1(rng, num_chains: int, num_draws: int, phi: float) -> np.ndarray:
    """(C, N) stationary AR(1) with unit marginal variance."""
    eps = rng.normal(size=(num_chains, num_draws)) * np.sqrt(1 - phi**2)
    x = np.empty((num_chains, num_draws))
    x[:, 0] = rng.normal(size=num_chains)
    for t in range(1, num_draws):
        x[:, t] = phi * x[:, t - 1] + eps[:, t]
    return x


@pytest.mark.parametrize("phi", [0.0, 0.9])
def test_drift_test_false_alarm_rate_and_power(phi):
    """At the 5% level (z = 1.96, no materiality floor) the autocorrelation-aware test fires on ≤ 10%
    of 200 stationary AR(1) series; a drift of ≈ 4 SE between the halves is found ≥ 90% of the time."""
    rng = np.random.default_rng(0)
    n = 400
    level = 5.0
    stationary = [drift_test(level + ar1(rng, 4, n, phi), 0.0, z=1.96, min_fraction=0.0) for _ in range(200)]
    assert np.mean([t.significant for t in stationary]) <= 0.10
    # standardized drifts are N(0, 1)-like: the SE is honest, not merely conservative
    z = np.array([t.z for t in stationary])
    assert 0.8 < np.std(z) < 1.25
    # power: the mean moves linearly by `slope`, so the halves differ by slope/2 ≈ 4 SE
    se = np.median([t.se for t in stationary])
    slope = 8 * se
    drifting = [drift_test(level + ar1(rng, 4, n, phi) + slope * np.linspace(0, 1, n), 0.0, z=1.96,
                           min_fraction=0.0) for _ in range(200)]
    assert np.mean([t.significant for t in drifting]) >= 0.9
    # the default verdict (z = 3, 2% of the rise) stays quiet on stationary series
    assert np.mean([drift_test(level + ar1(rng, 4, n, phi), 0.0).significant for _ in range(100)]) <= 0.02


def test_drift_test_is_two_sided_and_reports_the_relative_drift():
    rng = np.random.default_rng(3)
    x = 2.0 + 0.01 * ar1(rng, 4, 400, 0.5) - 0.2 * np.r_[np.zeros(200), np.ones(200)]
    shift = drift_test(x, 1.0)
    assert shift.significant and shift.diff == pytest.approx(-0.2, abs=0.01)
    assert shift.fraction == pytest.approx(-0.2 / 0.9, rel=0.05)  # rise = mean − L* = 0.9
    assert drift_test(x[:, :15], 1.0) is None  # halves shorter than MIN_WINDOW: no verdict


def test_run_status_order():
    flag = {code: HealthFlag(code, "m", "r") for code in ("spikes", *NOT_CONVERGED_CODES)}
    assert run_status("ok", []) == "ok"
    assert run_status("ok", [flag["spikes"]]) == "warnings"
    for code in NOT_CONVERGED_CODES:
        assert run_status("ok", [flag["spikes"], flag[code]]) == "not_converged"
    assert run_status("diverged", [flag["not_converged"]]) == "diverged"
    assert run_status("failed", []) == "failed"
    assert "More steps" in REMEDIES["not_converged"] and "larger ε" in REMEDIES["not_converged"]


# --- calibration on correctly sampled regular models ---------------------------------------------

def exact_quadratic_result(lam: float, n_beta: float, num_chains=4, num_draws=20000, seed=0,
                           minibatch_sd: float = 0.0) -> ChainResult:
    """iid draws of an exact sampler on a quadratic basin: nβ (L_n − L*) ~ Gamma(λ, 1) (½χ²_{2λ}).

    The per-step trace is the same loss plus independent minibatch noise of sd `minibatch_sd`.
    """
    rng = np.random.default_rng(seed)
    draws = L_STAR + rng.gamma(lam, 1.0, size=(num_chains, num_draws)) / n_beta
    trace = draws + minibatch_sd * rng.normal(size=draws.shape)
    nan = np.full(draws.shape, np.nan)
    return ChainResult(
        sampler="exact", loss_trace=trace, accept=nan, energy_change=nan,
        diverging=np.zeros(draws.shape, bool), draw_loss=draws, draw_steps=np.arange(num_draws),
        projections=np.zeros((num_chains, num_draws, 0)), diverged_at=-np.ones(num_chains, int),
        grad_evals=np.ones(num_chains), warmup_grad_evals=np.zeros(num_chains), num_burnin_steps=0,
        loss_at_wstar=L_STAR, n_beta=n_beta, wall_s=1.0, warmup_s=0.0, compile_s=0.0, tuned={},
    )


@pytest.mark.parametrize("lam", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_regular_model_traces_raise_no_flag(lam, seed):
    """A ½χ²-shaped loss tail (one parameter: λ = ½) is no spike, and λ < 1 is no low signal."""
    for estimate_from in ("full", "minibatch"):
        flags = check_health(exact_quadratic_result(lam, 100.0, seed=seed), estimate_from=estimate_from)
        assert flags == [], [f.message for f in flags]


def test_spikes_and_low_snr_still_fire_on_real_failures():
    res = exact_quadratic_result(0.5, 100.0)
    trace = res.loss_trace.copy()
    trace[1, 5000] += 1.0  # 200 × the mean rise: an instability, not a tail draw
    spiky = res.__class__(**{**res.__dict__, "loss_trace": trace})
    assert {f.code for f in check_health(spiky)} == {"spikes"}
    # minibatch noise 5× the mean rise (λ/nβ = 0.005) on the trace λ̂ is estimated from
    noisy = exact_quadratic_result(0.5, 100.0, minibatch_sd=0.025)
    assert {f.code for f in check_health(noisy, estimate_from="minibatch")} == {"low_snr"}
    assert check_health(noisy, estimate_from="full") == []  # λ̂ from the L_n draws is not affected


def test_chains_wandering_apart_are_not_converged():
    """Each chain drifts its own way (a slow random walk of its level): the pooled halves barely move,
    but the chains' halves disagree (split R̂ > 1.1), which is as much a failure to equilibrate."""
    rng = np.random.default_rng(7)
    walk = np.cumsum(rng.normal(size=(4, 2000)), axis=1) * 0.004

    def level(c, t):
        return RISE * (1 - np.exp(-t / 50.0)) + walk[c[:, 0]][:, t[0]] - walk[c[:, 0]][:, 400:].mean(axis=1, keepdims=True)

    res = synthetic_result(level, seed=0)
    flags = {f.code: f for f in check_health(res)}
    assert "not_converged" in flags and "within-chain split R̂" in flags["not_converged"].message
    assert run_status("ok", list(flags.values())) == "not_converged"


# --- still_spreading: ‖w − w*‖² growing like free diffusion ----------------------------------------

def spread_series(rng, kind: str, num_chains=4, dim=400, burnin=1000, num_draws=200, thin=10, phi=0.99):
    """(spread (C, D), steps (D,)): ‖w − w*‖² of `dim` coordinates that are either a stationary AR(1)
    of unit variance started in equilibrium ("stationary") or a random walk from w* ("diffusing")."""
    steps = np.arange(burnin, burnin + num_draws * thin, thin)
    total = steps[-1] + 1
    noise = rng.normal(size=(num_chains, total, dim))
    if kind == "diffusing":
        w = np.cumsum(noise, axis=1) * 0.01
    else:
        w = np.empty_like(noise)
        w[:, 0] = noise[:, 0]
        for t in range(1, total):
            w[:, t] = phi * w[:, t - 1] + np.sqrt(1 - phi**2) * noise[:, t]
    return np.sum(w[:, steps] ** 2, axis=2), steps


def test_spread_exponent_reads_diffusion_and_equilibrium():
    """g ≈ 1 for a random walk from w* (spread ∝ steps), ≈ 0 for a stationary chain; the default
    verdict (g > 0.5 and 3 SE) fires on every diffusing series and on no stationary one."""
    rng = np.random.default_rng(0)
    g_walk, g_eq = [], []
    for _ in range(20):
        g, se = spread_exponent(*spread_series(rng, "diffusing"))
        g_walk.append(g)
        assert g > 0.5 and g > 3 * se
        g, se = spread_exponent(*spread_series(rng, "stationary"))
        g_eq.append(g)
        assert not (g > 0.5 and g > 3 * se)
    assert np.mean(g_walk) == pytest.approx(1.0, abs=0.15)
    assert abs(np.mean(g_eq)) < 0.1
    spread, steps = spread_series(rng, "stationary", num_draws=15)
    assert spread_exponent(spread, steps) is None  # halves shorter than MIN_WINDOW: no verdict


def test_still_spreading_makes_a_quiet_run_not_converged():
    """Loss draws of an exact sampler (no loss flag) with a spread that still grows ∝ steps."""
    res = exact_quadratic_result(4.0, 100.0, num_draws=2000)
    steps = 1000 + 10 * np.arange(2000)
    rng = np.random.default_rng(1)
    growing = (steps + 1)[None, :] * (1 + 0.05 * rng.normal(size=(4, 2000)))
    spreading = res.__class__(**{**res.__dict__, "draw_steps": steps, "draw_spread": growing})
    flags = check_health(spreading)
    assert [f.code for f in flags] == ["still_spreading"]
    assert run_status("ok", flags) == "not_converged"
    steady = res.__class__(**{**res.__dict__, "draw_steps": steps,
                              "draw_spread": 5.0 * (1 + 0.05 * rng.normal(size=(4, 2000)))})
    assert check_health(steady) == []


def flat_direction_posterior(gamma: float, num_flat: int = 100):
    """L = ½ h ‖w₁..₄‖² for every sample; the other `num_flat` coordinates are absent from the loss
    and held only by the localizer γ."""
    from llc_bench.posterior import Posterior

    def per_sample_loss(w, x, y):
        return jnp.full((x.shape[0],), 0.5 * 4.0 * jnp.sum(w[:4] ** 2))

    zeros = jnp.zeros((200, 1))
    return Posterior.build(per_sample_loss, zeros, zeros, jnp.zeros(4 + num_flat), gamma=gamma)


@pytest.mark.parametrize("gamma, spreading", [(1e-3, True), (30.0, False)])
def test_sgld_with_an_unconfined_direction_is_still_spreading(gamma, spreading):
    """SGLD at ε = 0.1/(nβ h): the curved directions equilibrate within ~100 steps. With γ = 1e-3
    the flat ones need ~1/(εγ) ≈ 4·10⁴ steps, so after 4,000 they still diffuse (λ̂ already reads
    2, every loss check is quiet): still_spreading. With γ = 30 they equilibrate in ~1 step: ok."""
    from llc_bench.runner import run_chains
    from llc_bench.samplers.sgld import SGLDSettings, build

    post = flat_direction_posterior(gamma)
    eps = 0.1 / (post.n_beta * 4.0)
    algorithm = build(post, SGLDSettings(step_size=eps, batch_size=10))
    res = run_chains("sgld", algorithm, post, jax.random.PRNGKey(0), num_chains=8, num_burnin_steps=500,
                     num_draws=350, num_steps_bw_draws=10, progress=False)
    codes = {f.code for f in check_health(res)}
    assert codes == ({"still_spreading"} if spreading else set()), codes
