"""The one interface every sampler implements: a pure (warmup, step) pair over a flat position, vmapped by the runner."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from llc_bench.posterior import Posterior

# (x_batch (m, in_dim), y_batch (m, out_dim)) for minibatch samplers; None for full-batch ones.
Batch = tuple[jax.Array, jax.Array] | None


# step_size = "auto" (SG samplers): ε = c / (curvature + gradient noise) of −log π, at w* and again
# where the chains are after burn-in (llc_bench.curvature). Along every direction the stationary
# variance is then biased by at most ≈ c/4 to first order (2.5% at c = 0.1): discretization plus
# minibatch noise. Measured (README, "Automatic step size"): λ̂ of λ = d/2 regression +1.6% ± 0.5%
# (c = 0.1) and +3.9% (c = 0.2); two deep linear networks (λ = 10, 30k steps) −0.9% ± 3.0% and
# −1.1% ± 1.4% at c = 0.1. Smaller c mixes more slowly (more steps: see not_converged).
AUTO = "auto"
AUTO_STEP_CONSTANT = 0.1


def is_auto(step_size) -> bool:
    return isinstance(step_size, str) and step_size == AUTO


class StepSizeParams(NamedTuple):
    """The tuned parameters of an SG sampler: its ε (per chain). step_size = "auto" re-measures it
    after burn-in (Algorithm.retune), so the step reads it from here, not from the settings."""

    step_size: jax.Array  # ()


class StepInfo(NamedTuple):
    """Per-step scalars, identical fields for every sampler (NaN where a field does not apply)."""

    # SG samplers: minibatch L_m at the position the step started from (the loss the gradient used,
    # as in the guide's loss traces); full-batch samplers: full-data L_n at the new position.
    loss: jax.Array
    accept: jax.Array  # Metropolis acceptance probability (NaN for unadjusted samplers)
    energy_change: jax.Array  # MCLMC energy change / HMC energy error (NaN where not applicable)
    diverging: jax.Array  # bool: the sampler's own divergence flag (HMC/NUTS); False otherwise
    grad_evals: jax.Array  # work of this step in full-data gradient equivalents (SGLD: m/n)


def minibatch_step_info(loss: jax.Array, batch_size: int, n: int) -> StepInfo:
    """StepInfo of an unadjusted minibatch step: no acceptance or energy, work m/n of a full gradient."""
    nan = jnp.full((), jnp.nan, loss.dtype)
    return StepInfo(loss=loss, accept=nan, energy_change=nan, diverging=jnp.zeros((), bool),
                    grad_evals=jnp.asarray(batch_size / n, loss.dtype))


class Binding(NamedTuple):
    """How to make an Algorithm's functions again on another posterior and hyper of the same shapes.

    The runner passes the posterior and `hyper` to its compiled chunks as arguments and calls
    make(posterior, hyper) inside the trace, so nβ, γ, w*, the data and the hyper values (an SG
    sampler's ε) are inputs of the executable, not constants: one compilation serves them all.
    make  (posterior, hyper) -> Algorithm; only its traced functions (warmup, step, position,
          end_burnin) are used
    hyper pytree of arrays or floats the functions read besides the posterior (an SG sampler's
          StepSizeParams), () if none
    key   hashable, equal for two bindings whose make gives the same code for equal shapes (the
          runner's executable cache); None: never shared between algorithms
    functions  the (warmup, step, position, end_burnin, batch_size) make gave: the binding applies
          only while the Algorithm still has these (a wrapper that replaced one without `wrap`
          leaves an Algorithm the runner runs as it is, posterior closed over)
    """

    make: Callable[[Posterior, Any], Algorithm]
    hyper: Any
    key: Any
    functions: tuple


class Algorithm(NamedTuple):
    """A sampler bound to one posterior and its settings. All functions act on ONE chain.

    warmup(rng_key, position) -> (state, params, warmup_grad_evals)
        Initialization and any tuning (window adaptation, MCLMC tuner). `params` holds what tuning
        found (step size, mass matrix, L, ...) as a pytree of arrays; () if nothing is tuned.
    step(rng_key, state, params, batch) -> (state, StepInfo)
    position(state) -> flat (d,) position
    end_burnin(state) -> state, or None
        Called once on every chain's state after the last burn-in step (e.g. RMSProp-SGLD freezes
        its preconditioner there); None: nothing changes between burn-in and drawing.
    retune(states (C, ...), params (C, ...), alive (C,) bool) -> params, or None
        Called once on the host after end_burnin, before the first draw, with every chain's state:
        step_size = "auto" re-measures the curvature where the chains are (llc_bench.curvature).
    notes: what the sampler measured on the host (step_size = "auto": a curvature.AutoStep), or None.
    binding: how the runner makes warmup/step/position/end_burnin again on a traced posterior
        (`Binding`, set by `bind`); None: they close over their posterior and run as they are.
        retune and notes are host-side and always used as given.
    """

    warmup: Callable[[jax.Array, jax.Array], tuple[Any, Any, jax.Array]]
    step: Callable[[jax.Array, Any, Any, Batch], tuple[Any, StepInfo]]
    position: Callable[[Any], jax.Array]
    batch_size: int | None  # minibatch size m for SG samplers; None = full batch
    end_burnin: Callable[[Any], Any] | None = None
    retune: Callable[[Any, Any, Any], Any] | None = None
    notes: Any = None
    binding: Binding | None = None


def _functions(algorithm: Algorithm) -> tuple:
    return (algorithm.warmup, algorithm.step, algorithm.position, algorithm.end_burnin, algorithm.batch_size)


def bind(make: Callable[[Posterior, Any, Any], Algorithm], posterior: Posterior, settings, hyper=()) -> Algorithm:
    """make(posterior, settings, hyper) with the Binding that lets the runner repeat it on traced inputs.

    make: a module-level function (its identity is part of the cache key); settings: the frozen
    settings dataclass; hyper: a NamedTuple of the numbers make reads instead of the settings
    fields of the same names (StepSizeParams: step_size), or (). The cache key is make and every
    other settings field: settings that differ only in hyper's fields share executables.
    """
    traced = getattr(hyper, "_fields", ())
    static = tuple((f.name, getattr(settings, f.name)) for f in dataclasses.fields(settings) if f.name not in traced)
    algorithm = make(posterior, settings, hyper)
    binding = Binding(lambda p, h: make(p, settings, h), hyper, (make, static), _functions(algorithm))
    return algorithm._replace(binding=binding)


def wrap(algorithm: Algorithm, posterior: Posterior, transform: Callable[[Algorithm, Posterior], Algorithm],
         key=None) -> Algorithm:
    """transform(algorithm, posterior), the binding kept: inside the runner's trace the transform is
    applied to the rebound algorithm with the traced posterior. transform must read the posterior
    only through its argument. key: hashable description of the transform (None: the result's
    executables are never shared)."""
    out = transform(algorithm, posterior)
    inner = current_binding(algorithm)
    if inner is None:
        return out._replace(binding=None)
    binding = Binding(lambda p, h: transform(inner.make(p, h), p), inner.hyper,
                      None if key is None or inner.key is None else (inner.key, key), _functions(out))
    return out._replace(binding=binding)


def current_binding(algorithm: Algorithm) -> Binding | None:
    """The algorithm's Binding if its functions are still the ones it made, else None."""
    binding = algorithm.binding
    if binding is None or binding.functions != _functions(algorithm):
        return None
    return binding


def rebind(algorithm: Algorithm, posterior: Posterior, hyper) -> Algorithm:
    """The algorithm made again on `posterior` and `hyper` (traced, inside the runner), or itself
    when it has no current binding (its functions then ignore both)."""
    binding = current_binding(algorithm)
    return algorithm if binding is None else binding.make(posterior, hyper)


# Step-size conventions a sampler can declare (SamplerSpec.step_size).
# EPSILON: settings.step_size is ε of the Langevin update w ← w − ε/2 ∇U + √ε η (devinterp's `lr`;
# BlackJAX's h = ε/2), a number > 0 or "auto" (llc_bench.curvature); settings also hold batch_size
# and auto_constant. TUNED: the sampler tunes its own step size during warm-up; no setting.
STEP_EPSILON = "epsilon"
STEP_TUNED = "tuned"


class FinalCheck(NamedTuple):
    """A diagnostic run once after the draws, at the live chains' final positions.

    run(posterior, positions (K, d), step_size, rng_key) -> (value, HealthFlag or None); `value`
    (a float or None) goes into the run summary under `summary_key`.
    """

    summary_key: str
    run: Callable[[Posterior, Any, float, jax.Array], tuple[Any, Any]]


class DiagonalPreconditioner(NamedTuple):
    """A sampler whose steps are scaled by a diagonal G it adapts itself (e.g. RMSProp-SGLD):
    step_size = "auto" measures the curvature of G^{1/2} ∇²L_n G^{1/2} (llc_bench.curvature).

    at_wstar(posterior, settings, full_batch) -> ((d,) G, grad_evals): the G a chain sitting at w*
        would hold, and what estimating it cost in full-data gradient equivalents; full_batch:
        every step will use the exact full-data gradient
    of_chains(states (C, ...), settings) -> (C, d) the G each chain's state holds (after burn-in)
    """

    at_wstar: Callable[[Posterior, Any, bool], tuple[Any, float]]
    of_chains: Callable[[Any, Any], Any]


class SamplerSpec(NamedTuple):
    """Registry entry: a settings dataclass (frozen, with defaults, validating itself), a builder,
    and what the sampler is, so that drivers ask the spec instead of checking names.

    build(posterior, settings) -> Algorithm returns `bind(make, posterior, settings, hyper)`: the
    runner then compiles one executable for every posterior of the same shapes and every hyper
    value. An algorithm without a binding still runs, its posterior and settings constants of its
    executables. A STEP_EPSILON sampler's build takes a numeric ε (`numeric_step_size`);
    step_size = "auto" is resolved by the driver, llc_bench.curvature.build_algorithm, from what
    the spec declares below.

    minibatch   True: each step takes a minibatch of settings.batch_size rows (Algorithm.batch_size);
                False: full batch, exact gradients (batch None)
    metropolis  True: each step has an accept/reject test and StepInfo.accept is its acceptance
                probability (summarized as accept_rate); False: accept is NaN
    step_size   STEP_EPSILON or STEP_TUNED (see there)
    checks      FinalChecks run after the draws (e.g. SGLD's MALA acceptance)
    aliases     sample() keyword -> settings field, for devinterp's spellings (rmsprop_eps -> eps)
    diagonal_preconditioner  `DiagonalPreconditioner` of a sampler that adapts a diagonal G, which
                step_size = "auto" then measures under; None: plain ε (G = I)
    build_auto  build_auto(posterior, settings, full_batch) -> Algorithm for a sampler that
                resolves step_size = "auto" itself (its Algorithm.notes the curvature.AutoStep);
                None: the driver's generic rule. full_batch as for diagonal_preconditioner.
    preconditioner_root  for a sampler whose draws are SGLD with a constant preconditioner P
                (w ← w − ε/2 P∇U + √ε P^{1/2} η): settings -> None when they make P move while
                drawing, else a function (params, state) of one chain -> the map v -> P^{1/2} v
                (jnp, traceable); llc_bench.discretization then estimates the step size's bias
                of λ̂. Asking with the settings alone is how a request for that estimate is
                checked before any work. None: no estimate for any settings.
    stiff_basis  params of the chains (C, ...) -> (C, d, k) orthonormal directions per chain that
                the sampler treats as stiff (curvature_sgld: its preconditioned directions). The
                over-dispersed restart (llc_bench.restart) keeps each chain's component in them,
                already in equilibrium, and scales only the rest. None: every direction is scaled.
    restart_scale_cap  the largest scale of that restart for this sampler (run.restart_scale above it
                is cut to it); None: no cap.
    """

    name: str
    settings: type
    build: Callable[[Posterior, Any], Algorithm]
    description: str
    minibatch: bool
    metropolis: bool
    step_size: str
    checks: tuple[FinalCheck, ...] = ()
    aliases: dict[str, str] | None = None
    diagonal_preconditioner: DiagonalPreconditioner | None = None
    build_auto: Callable[[Posterior, Any, bool], Algorithm] | None = None
    preconditioner_root: Callable[[Any], Callable[[Any, Any], Callable] | None] | None = None
    stiff_basis: Callable[[Any], Any] | None = None
    restart_scale_cap: float | None = None

    def constant_root(self, settings) -> Callable[[Any, Any], Callable] | None:
        """preconditioner_root(settings), or None when the sampler or these settings have none."""
        return None if self.preconditioner_root is None else self.preconditioner_root(settings)


def identity_root(settings) -> Callable:
    """SamplerSpec.preconditioner_root of plain SGLD: P = I for every chain."""
    del settings
    return lambda params, state: lambda v: v


def numeric_step_size(settings, name: str) -> float:
    """settings.step_size for a STEP_EPSILON sampler's build; "auto" raises, naming the function that resolves it."""
    if is_auto(settings.step_size):
        raise ValueError(f'{name}: step_size = "auto" is resolved by llc_bench.curvature.build_algorithm(spec, '
                         "posterior, settings); spec.build takes a numeric step size")
    return settings.step_size


# ---------------------------------------------------------------------------------------------
# Settings that validate themselves: each field's allowed values ride in its metadata.


class SettingError(ValueError):
    """A settings value outside what its field allows; str() is "field: message"."""

    def __init__(self, field_name: str, message: str, text: str | None = None):
        super().__init__(text or f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclasses.dataclass(frozen=True)
class Range:
    """Numbers between low and high (None: unbounded), each end open or closed; or_auto also allows "auto"."""

    low: float | None = None
    high: float | None = None
    low_closed: bool = False
    high_closed: bool = False
    or_auto: bool = False
    why: str = ""  # appended to the message after a colon

    def allows(self, value) -> bool:
        if self.or_auto and is_auto(value):
            return True
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        low_ok = self.low is None or (value >= self.low if self.low_closed else value > self.low)
        high_ok = self.high is None or (value <= self.high if self.high_closed else value < self.high)
        return low_ok and high_ok

    def text(self) -> str:
        if self.high is None:
            text = f"{'>=' if self.low_closed else '>'} {self.low:g}"
        elif self.low is None:
            text = f"{'<=' if self.high_closed else '<'} {self.high:g}"
        else:
            text = f"in {'[' if self.low_closed else '('}{self.low:g}, {self.high:g}{']' if self.high_closed else ')'}"
        return text + (' or "auto"' if self.or_auto else "")

    def problem(self, value) -> str | None:
        if self.allows(value):
            return None
        return f"must be {self.text()}{': ' + self.why if self.why else ''} (got {value!r})"


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of a fixed set of strings."""

    choices: tuple[str, ...]

    def problem(self, value) -> str | None:
        if value in self.choices:
            return None
        close = difflib.get_close_matches(str(value), list(self.choices), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown value {value!r}{hint}; allowed: {', '.join(self.choices)}"


POSITIVE = Range(0)
AT_LEAST_ONE = Range(1, low_closed=True)
OPEN_UNIT = Range(0, 1)
FRACTION = Range(0, 1, low_closed=True, high_closed=True)


def setting(default, allowed: Range | OneOf | None = None):
    """A settings field whose allowed values are checked by validate_settings."""
    return dataclasses.field(default=default, metadata={} if allowed is None else {"allowed": allowed})


def validate_settings(settings) -> None:
    """Check every field against its declared allowed values; the first violation is a SettingError."""
    for f in dataclasses.fields(settings):
        allowed = f.metadata.get("allowed")
        value = getattr(settings, f.name)
        if allowed is not None and value is not None:
            problem = allowed.problem(value)
            if problem is not None:
                text = None
                if isinstance(allowed, Range) and allowed.or_auto:
                    text = f"{f.name} must be a finite number {allowed.text()}, got {value!r}"
                raise SettingError(f.name, problem, text)


# ε of the Langevin convention: a finite number > 0 or "auto"; c of "auto" in (0, 4).
STEP_SIZE = Range(0, or_auto=True)
AUTO_CONSTANT = Range(0, 4, why="ε·curvature < 4 is the stability limit")
