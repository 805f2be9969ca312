"""Sampler registry: name -> module exposing SPEC (a SamplerSpec). Adding a sampler = one module + one line here."""

from __future__ import annotations

import importlib

from llc_bench.samplers.base import Algorithm, Batch, SamplerSpec, StepInfo

_MODULES = {
    "sgld": "llc_bench.samplers.sgld",
    "rmsprop_sgld": "llc_bench.samplers.rmsprop_sgld",
    "sghmc": "llc_bench.samplers.sghmc",
    "sgnht": "llc_bench.samplers.sgnht",
    "hmc": "llc_bench.samplers.hmc",
    "nuts": "llc_bench.samplers.nuts",
    "mclmc": "llc_bench.samplers.mclmc",
    "adjusted_mclmc": "llc_bench.samplers.adjusted_mclmc",
    "curvature_sgld": "llc_bench.samplers.curvature_sgld",
}

SAMPLER_NAMES = tuple(_MODULES)


def get_spec(name: str) -> SamplerSpec:
    """The registry entry for `name` (imports its module on first use)."""
    if name not in _MODULES:
        raise KeyError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLER_NAMES)}")
    return importlib.import_module(_MODULES[name]).SPEC


__all__ = ["Algorithm", "Batch", "SamplerSpec", "StepInfo", "SAMPLER_NAMES", "get_spec"]
