"""Full-batch NUTS on the local posterior, tuned per chain by BlackJAX's Stan-style window adaptation."""

from __future__ import annotations

from dataclasses import dataclass

import blackjax

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import (
    AT_LEAST_ONE,
    OPEN_UNIT,
    STEP_TUNED,
    Algorithm,
    SamplerSpec,
    bind,
    setting,
    validate_settings,
)
from llc_bench.samplers.hmc import (
    HMCParams,
    hmc_step_info,
    window_warmup,
)


@dataclass(frozen=True)
class NUTSSettings:
    """NUTS settings. Step size and diagonal inverse mass matrix are tuned, not set."""

    num_warmup: int = setting(500, AT_LEAST_ONE)  # window-adaptation steps (each costs that step's trajectory length)
    target_accept: float = setting(0.8, OPEN_UNIT)  # dual-averaging target for the trajectory-averaged acceptance
    max_num_doublings: int = setting(8, AT_LEAST_ONE)  # caps a trajectory at 2^8 − 1 = 255 leapfrog steps

    def __post_init__(self):
        validate_settings(self)


def build(posterior: Posterior, settings: NUTSSettings) -> Algorithm:
    """NUTS: iterative multinomial No-U-Turn sampler with velocity-Verlet steps of size ε.

    Each draw doubles a trajectory in random directions until it U-turns, diverges or reaches
    2^max_num_doublings − 1 leapfrog steps, then samples a state along it. ε and the diagonal
    M⁻¹ are tuned per chain by Stan's window adaptation (the same doublings cap applies during
    warm-up). Work: each draw's num_integration_steps gradients; warm-up 1 + Σ of those.
    `accept` is NUTS' trajectory-averaged acceptance statistic; `energy_change` is H(selected
    state) − H(start).
    """
    return bind(make, posterior, settings)


def make(posterior: Posterior, settings: NUTSSettings, hyper=()) -> Algorithm:
    """`build`'s algorithm on `posterior` (concrete, or traced inside the runner); nothing in hyper."""
    del hyper
    kernel = blackjax.nuts.build_kernel()
    doublings = settings.max_num_doublings

    def step(rng_key, state, params: HMCParams, batch):
        del batch  # full batch
        new_state, info = kernel(rng_key, state, posterior.logdensity, params.step_size,
                                 params.inverse_mass_matrix, max_num_doublings=doublings)
        return new_state, hmc_step_info(posterior, state, new_state, info, params, info.num_integration_steps)

    warmup = window_warmup(posterior, blackjax.nuts, settings.num_warmup, settings.target_accept,
                           max_num_doublings=doublings)
    return Algorithm(warmup=warmup, step=step, position=lambda state: state.position, batch_size=None)


SPEC = SamplerSpec(
    name="nuts",
    settings=NUTSSettings,
    build=build,
    description="Full-batch NUTS (multinomial, velocity Verlet), window-adapted step size and diagonal mass",
    minibatch=False,
    metropolis=True,
    step_size=STEP_TUNED,
)
