"""Full-batch unadjusted MCLMC on the local posterior, tuned per chain by blackjax.mclmc_find_L_and_step_size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import blackjax
import jax
import jax.numpy as jnp
from blackjax.adaptation.mclmc_adaptation import MCLMCAdaptationState, make_adaptation_L
from blackjax.adaptation.mclmc_adaptation import handle_nans as _bj_handle_nans
from blackjax.mcmc import integrators

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import (
    AT_LEAST_ONE,
    FRACTION,
    POSITIVE,
    STEP_TUNED,
    Algorithm,
    SamplerSpec,
    StepInfo,
    bind,
    setting,
    validate_settings,
)

# The isokinetic McLachlan integrator (BlackJAX's MCLMC default) alternates momentum and
# position updates with coefficients (b1, a1, b2, a1, b1); each position update costs one
# value_and_grad, so one integrator step costs 2 gradient evaluations.
INTEGRATOR = integrators.isokinetic_mclachlan
GRADS_PER_INTEGRATOR_STEP = len(integrators.mclachlan_coefficients) // 2


@dataclass(frozen=True)
class MCLMCSettings:
    """MCLMC settings. L, step size and the diagonal preconditioner are tuned, not set.

    num_tuning_steps is the tuner's `num_steps`: its three phases run frac_tune1, frac_tune2
    (plus a third of it again with diagonal preconditioning) and frac_tune3 of it.

    scale_probe (default): tune with `tune_mclmc`, BlackJAX's three phases started at the
    posterior's own scale and with ε capped below the integrator's stability limit (see there).
    False = blackjax.mclmc_find_L_and_step_size as is: ε₀ = ¼√d and L₀ = √d (unit posterior
    scales; ~10⁴ times too large on a sharp local posterior, nβ ≈ 10³, γ = 100) and no cap.
    """

    num_tuning_steps: int = setting(2000, AT_LEAST_ONE)
    diagonal_preconditioning: bool = True
    desired_energy_var: float = setting(5e-4, POSITIVE)  # target Var[energy change] per dimension (sets the step size)
    frac_tune1: float = setting(0.1, FRACTION)  # step size only
    frac_tune2: float = setting(0.1, FRACTION)  # step size + posterior variances (→ L, preconditioner)
    frac_tune3: float = setting(0.1, FRACTION)  # L from the autocorrelation time (skipped if it gives < 2 steps)
    scale_probe: bool = True
    scale_probe_iters: int = setting(20, AT_LEAST_ONE)  # power iterations (one gradient each) per curvature probe
    stability_factor: float = setting(1.0, POSITIVE)  # ε ≤ stability_factor·√(d/λ_max) (instability sets in near 2)

    def __post_init__(self):
        validate_settings(self)


class MCLMCParams(NamedTuple):
    """What the MCLMC tuner found for one chain."""

    L: jax.Array  # () momentum decoherence length
    step_size: jax.Array  # ()
    inverse_mass_matrix: jax.Array  # (d,) diagonal (ones without preconditioning)


def mclmc_tuning_steps(settings: MCLMCSettings) -> int:
    """Integrator steps blackjax.mclmc_find_L_and_step_size actually runs for these settings.

    Mirrors its phase lengths. Computed here rather than taken from the tuner's third return
    value, which counts num_steps2 // 3 re-tuning steps where round(num_steps2 / 3) are run.
    """
    n = settings.num_tuning_steps
    n1, n2, n3 = (round(n * f) for f in (settings.frac_tune1, settings.frac_tune2, settings.frac_tune3))
    retune = round(n2 / 3) if settings.diagonal_preconditioning and n2 > 1 else 0
    return n1 + n2 + retune + (n3 if n3 >= 2 else 0)


def mclmc_probe_grad_evals(settings: MCLMCSettings) -> int:
    """Gradients of `tune_mclmc`'s curvature probes: one probe, two with a preconditioner."""
    if not settings.scale_probe:
        return 0
    n2 = round(settings.num_tuning_steps * settings.frac_tune2)
    probes = 2 if settings.diagonal_preconditioning and n2 > 1 else 1
    return probes * settings.scale_probe_iters


def mclmc_warmup_grad_evals(settings: MCLMCSettings) -> int:
    """1 (initial value_and_grad) + the curvature probes' gradients + 2 gradients per tuning step."""
    return 1 + mclmc_probe_grad_evals(settings) + GRADS_PER_INTEGRATOR_STEP * mclmc_tuning_steps(settings)


def centered_logdensity(posterior: Posterior):
    """log π(w* + δ) as a function of the offset δ = w − w*.

    The samplers run in δ: the tuners estimate variances as E[x²] − E[x]² from running float32
    averages, which in w (entries O(1), posterior standard deviations 10⁻³–10⁻¹) cancels to
    noise and comes out negative for many coordinates; √(negative) in the preconditioned
    integrator then makes every step NaN. In δ the entries are O(posterior scale).
    """
    w_star = posterior.w_star

    def logdensity(delta):
        return posterior.logdensity(w_star + delta)

    return logdensity


def curvature_probe(logdensity_fn, position, logdensity_grad, rng_key, num_iters: int,
                    floor: float) -> jax.Array:
    """Largest |eigenvalue| of the Hessian of −log π at `position`: power iteration on finite differences.

    H v ≈ −(∇log π(x + h v) − ∇log π(x)) / h with h = 0.01/√λ (λ the running estimate, starting
    at `floor`), so the probe moves ≈ 1% of the stiffest posterior scale and needs no second-order
    autodiff. Returns max_k ‖H v_k‖ (a lower bound on |λ|_max that the iteration drives up to it),
    at least `floor`. Costs num_iters gradients; `logdensity_grad` is ∇log π(position), given.
    """
    grad_fn = jax.grad(logdensity_fn)
    v0 = jax.random.normal(rng_key, position.shape, position.dtype)
    floor = jnp.asarray(floor, position.dtype)

    def body(carry, _):
        v, lam = carry
        v = v / jnp.linalg.norm(v)
        h = 0.01 / jnp.sqrt(lam)
        hv = -(grad_fn(position + h * v) - logdensity_grad) / h
        norm = jnp.linalg.norm(hv)
        ok = jnp.isfinite(norm) & (norm > 0)
        return (jnp.where(ok, hv, v), jnp.where(ok, jnp.maximum(lam, norm), lam)), None

    (_, lam), _ = jax.lax.scan(body, (v0, floor), None, length=num_iters)
    return lam


def initial_params(dim: int, gamma: float | jax.Array, max_curvature: jax.Array, step_factor: float = 0.25):
    """Tuner start scaled to the posterior, in place of BlackJAX's unit-scale ε₀ = ¼√d, L₀ = √d.

    MCLMC's velocity has unit norm, so a coordinate of scale σ moves ~ε/√d per step: the unit-
    scale default ε₀ = ¼√d becomes ¼√d σ_min with σ_min = 1/√λ_max, the stiffest scale (stable
    for the integrator; the tuner's ε⁶ energy-variance model then moves it in a few steps).
    L₀ = √(Σ σᵢ²) ≤ √(d/γ): the localizer bounds every variance by 1/γ when the loss Hessian is
    PSD (√d/√λ_max when γ = 0). Returns (L₀, ε₀).
    """
    sigma_min = 1.0 / jnp.sqrt(max_curvature)
    # γ may be traced: a select, not a Python branch (1/√0 = inf on the side not taken)
    sigma_max = jnp.where(gamma > 0, 1.0 / jnp.sqrt(gamma), sigma_min)
    step_size = step_factor * jnp.sqrt(dim) * sigma_min
    return jnp.sqrt(dim) * jnp.maximum(sigma_max, sigma_min), step_size


def safe_variances(variances: jax.Array, floor: jax.Array) -> jax.Array:
    """The tuner's diagonal M⁻¹ with every entry finite and at least `floor` (> 0).

    A streaming E[x²] − E[x]² estimate can still be ≤ 0 for a coordinate the chain barely moved
    in; √ of it would be NaN in the integrator. All non-finite → ones (no preconditioning).
    """
    ok = jnp.isfinite(variances)
    v = jnp.where(ok, jnp.maximum(variances, floor), floor)
    return jnp.where(jnp.all(~ok), jnp.ones_like(v), v)


class _StepSizeAdaptation(NamedTuple):
    time: jax.Array  # decayed sum of weights
    x_average: jax.Array  # decayed weighted sum of ξ/ε⁶
    step_size_max: jax.Array  # lowered by 0.8 after every NaN step (BlackJAX's rule)


# Over 80 lines with its docstring; the body follows BlackJAX's three tuning phases in order (73 lines).
def tune_mclmc(kernel, logdensity_fn, state, rng_key, settings: MCLMCSettings, gamma: float | jax.Array):
    """BlackJAX's MCLMC tuning phases, started at the posterior's scale and kept stable.

    Same phases, lengths and step-size rule as blackjax.mclmc_find_L_and_step_size (num_steps =
    settings.num_tuning_steps): (1) n₁ steps adapting ε by the ε⁶ energy-variance model toward
    Var[ΔE]/d = desired_energy_var; (2) n₂ more, accumulating step-weighted E[x], E[x²]; with
    preconditioning M⁻¹ = those variances, L = √d, and round(n₂/3) steps re-adapting ε; else
    L = √(Σ variances); (3) n₃ steps at fixed ε, L = 0.4 ε τ̄ (BlackJAX's make_adaptation_L).

    Two changes, both for sharp local posteriors (nβ L_n scaled by 1/σ², γ = 100), where the
    unit-scale start ε₀ = ¼√d is 10⁴ times too large and the tuner never recovers:
    - Start: λ_max = largest curvature of −log π (`curvature_probe`), ε₀ = ¼√(d/λ_max),
      L₀ = √(d/γ) (`initial_params`).
    - Cap: ε ≤ stability_factor·√(d/λ), λ the largest curvature in the coordinates the
      integrator moves in (raw in phases 1–2, preconditioned M^½ H M^½ from phase 2's
      re-adaptation on, probed again). Measured on a 10k-parameter ReLU MLP (n = 2000): the
      energy error per dimension is ~1e-7 up to ε√(λ/d) ≈ 1.2, then the integrator goes
      unstable between 1.8 and 2.4 (ΔE²/d jumps to 0.1–10). The target Var[ΔE]/d = 5e-4 lies in
      that cliff, so the ε⁶ rule, which down-weights the huge ΔE of the unstable steps, parks ε
      at or beyond the edge: loss spikes and λ̂ 5–10% high. The cap keeps a ≈2× margin.

    Returns (state, MCLMCParams).
    """
    dim = state.position.shape[0]
    dtype = state.position.dtype
    n = settings.num_tuning_steps
    n1, n2, n3 = (round(n * f) for f in (settings.frac_tune1, settings.frac_tune2, settings.frac_tune3))
    precondition = settings.diagonal_preconditioning and n2 > 1
    n2b = round(n2 / 3) if precondition else 0
    probe_key, probe2_key, run_key, run2_key, l_key = jax.random.split(rng_key, 5)
    iters, factor = settings.scale_probe_iters, settings.stability_factor
    floor = jnp.maximum(gamma, 1e-8)
    decay = (150 - 1.0) / (150 + 1.0)  # BlackJAX's num_effective_samples = 150
    trust = 1.5

    lam = curvature_probe(logdensity_fn, state.position, state.logdensity_grad, probe_key, iters, floor)
    L0, eps0 = initial_params(dim, gamma, lam)
    cap = factor * jnp.sqrt(dim / lam)
    ones = jnp.ones((dim,), dtype)

    def adapt(state, L, step_size, imm, cap, keys, mask):
        """Steps with ε adapted after each; step-weighted mean and mean square of x where mask."""

        def one(carry, xs):
            state, step_size, ad, (total, avg) = carry
            key, m = xs
            key, nan_key = jax.random.split(key)
            new, info = kernel(key, state, logdensity_fn, imm, L, step_size)
            ok, state, step_size_max, energy_change = _bj_handle_nans(
                state, new, step_size, ad.step_size_max, info.energy_change, info.nonans, nan_key)
            xi = jnp.square(energy_change) / (dim * settings.desired_energy_var) + 1e-8
            weight = jnp.exp(-0.5 * jnp.square(jnp.log(xi) / (6.0 * trust)))
            # ε in units of the cap: ε⁶ of a raw ε ~ 1e-7 would underflow float32
            x_average = decay * ad.x_average + weight * xi / (step_size / cap) ** 6
            time = decay * ad.time + weight
            predicted = jnp.where(time > 0, cap * (x_average / time) ** (-1.0 / 6.0), step_size)
            new_step = jnp.minimum(jnp.minimum(predicted, step_size_max), cap)
            w = m * ok * new_step
            x = state.position
            avg = (avg * total + w * jnp.stack([x, x * x])) / jnp.maximum(total + w, 1e-30)
            return (state, new_step, _StepSizeAdaptation(time, x_average, step_size_max),
                    (total + w, avg)), None

        ad = _StepSizeAdaptation(jnp.zeros((), dtype), jnp.zeros((), dtype), jnp.asarray(jnp.inf, dtype))
        stats = (jnp.zeros((), dtype), jnp.zeros((2, dim), dtype))
        (state, step_size, _, (_, avg)), _ = jax.lax.scan(one, (state, step_size, ad, stats), (keys, mask))
        return state, step_size, avg

    keys = jax.random.split(run_key, n1 + n2)
    mask = jnp.concatenate([jnp.zeros(n1, dtype), jnp.ones(n2, dtype)])
    state, step_size, avg = adapt(state, L0, jnp.minimum(eps0, cap), ones, cap, keys, mask)
    L, imm = L0, ones
    if n2 > 1:
        variances = avg[1] - avg[0] ** 2  # of δ = w − w*: entries O(posterior scale), no cancellation
        if precondition:
            imm = safe_variances(variances, 1e-4 / lam)
            L = jnp.sqrt(jnp.asarray(dim, dtype))
            scale = jnp.sqrt(imm)

            def scaled_logdensity(z):
                return logdensity_fn(state.position + scale * z)

            lam_pre = curvature_probe(scaled_logdensity, jnp.zeros_like(state.position),
                                      scale * state.logdensity_grad, probe2_key, iters, 1e-8)
            cap = factor * jnp.sqrt(dim / lam_pre)
            # ε was in raw units; restart the adaptation from the cap (BlackJAX restarts from ε)
            state, step_size, _ = adapt(state, L, cap, imm, cap, jax.random.split(run2_key, n2b),
                                        jnp.zeros(n2b, dtype))
        else:
            L = jnp.sqrt(jnp.sum(jnp.maximum(variances, 0.0)))
    params = MCLMCAdaptationState(L, step_size, imm)
    if n3 >= 2:
        state, params = make_adaptation_L(kernel, logdensity_fn, frac=settings.frac_tune3,
                                          l_factor=0.4)(state, params, n, l_key)
    return state, MCLMCParams(jnp.asarray(params.L, dtype), jnp.asarray(params.step_size, dtype),
                              jnp.asarray(params.inverse_mass_matrix, dtype))


def build(posterior: Posterior, settings: MCLMCSettings) -> Algorithm:
    """Unadjusted microcanonical Langevin Monte Carlo (Robnik et al.), no Metropolis step.

    Each step: one isokinetic McLachlan step of size ε with unit-speed momentum u (velocity
    scaled by the diagonal M⁻¹), then partial momentum refresh u ← (c u + √(1−c²) z)/‖·‖,
    c = exp(−ε/L). The chain runs in δ = w − w* (`centered_logdensity`); positions reported are
    w. Tuning per chain (`tune_mclmc`; BlackJAX's tuner unchanged when scale_probe=False): ε so
    that Var[ΔE]/d ≈ desired_energy_var but below the integrator's stability limit, M⁻¹ =
    posterior variances, L from the autocorrelation time. The stationary law is biased by O(ε);
    the energy-variance target (or, on stiff posteriors, the stability cap) controls it. Work: 2 gradients per step; warm-up
    mclmc_warmup_grad_evals(settings). `diverging` flags steps BlackJAX rejected for NaNs.
    """
    return bind(make, posterior, settings)


def make(posterior: Posterior, settings: MCLMCSettings, hyper=()) -> Algorithm:
    """`build`'s algorithm on `posterior` (concrete, or traced inside the runner); nothing in hyper."""
    del hyper
    kernel = blackjax.mclmc.build_kernel(integrator=INTEGRATOR,
                                         desired_energy_var=settings.desired_energy_var)
    warmup_grad_evals = mclmc_warmup_grad_evals(settings)
    logdensity = centered_logdensity(posterior)
    w_star = jnp.asarray(posterior.w_star)
    dim, gamma = posterior.dim, posterior.gamma

    def warmup(rng_key, position):
        init_key, tune_key = jax.random.split(rng_key)
        state = blackjax.mclmc.init(position - w_star, logdensity, init_key)
        if settings.scale_probe:
            state, params = tune_mclmc(kernel, logdensity, state, tune_key, settings, gamma)
            return state, params, jnp.float32(warmup_grad_evals)
        state, tuned, _ = blackjax.mclmc_find_L_and_step_size(
            mclmc_kernel=kernel,
            num_steps=settings.num_tuning_steps,
            state=state,
            rng_key=tune_key,
            logdensity_fn=logdensity,
            frac_tune1=settings.frac_tune1,
            frac_tune2=settings.frac_tune2,
            frac_tune3=settings.frac_tune3,
            desired_energy_var=settings.desired_energy_var,
            diagonal_preconditioning=settings.diagonal_preconditioning,
        )
        # without preconditioning the tuner leaves its initial ones(d) in place
        imm = jnp.broadcast_to(jnp.asarray(tuned.inverse_mass_matrix), (dim,))
        params = MCLMCParams(jnp.asarray(tuned.L), jnp.asarray(tuned.step_size), imm)
        return state, params, jnp.float32(warmup_grad_evals)

    def step(rng_key, state, params: MCLMCParams, batch):
        del batch  # full batch
        new_state, info = kernel(rng_key, state, logdensity, params.inverse_mass_matrix,
                                 params.L, params.step_size)
        position = new_state.position + w_star
        return new_state, StepInfo(
            loss=posterior.loss_from_logdensity(position, new_state.logdensity),
            accept=jnp.full((), jnp.nan, new_state.logdensity.dtype),
            energy_change=info.energy_change,
            diverging=jnp.logical_not(info.nonans),
            grad_evals=jnp.float32(GRADS_PER_INTEGRATOR_STEP),
        )

    return Algorithm(warmup=warmup, step=step, position=lambda state: state.position + w_star,
                     batch_size=None)


SPEC = SamplerSpec(
    name="mclmc",
    settings=MCLMCSettings,
    build=build,
    description="Full-batch unadjusted MCLMC (isokinetic McLachlan), tuned L, step size and diagonal preconditioner",
    minibatch=False,
    metropolis=False,
    step_size=STEP_TUNED,
)
