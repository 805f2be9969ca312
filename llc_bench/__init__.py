"""llc_bench: Local Learning Coefficient estimation benchmark."""

import importlib

# The devinterp-style API, imported on first use so that `import llc_bench` stays cheap (no JAX).
_LAZY = {
    "sample": "llc_bench.sampling",
    "compute_llc": "llc_bench.sampling",
    "compute_bif": "llc_bench.sampling",
    "compute_susceptibilities": "llc_bench.sampling",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llc_bench' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
