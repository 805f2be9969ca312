"""Compiled executables kept for reuse: each under what its code depends on, the values it reads traced.

A run's functions take the posterior and the sampler's hyper (samplers.base.Binding) as arguments,
so an executable depends only on the sampler's code (its Binding.key), the posterior's static part,
the shapes and dtypes of the arguments and the schedule's lengths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llc_bench.posterior import Posterior
from llc_bench.samplers.base import Algorithm, current_binding


def as_arrays(tree):
    """Every leaf a JAX array; a Python or NumPy scalar becomes a weakly typed one, as it would be
    as a constant, so arithmetic with it keeps the data's precision."""
    def leaf(a):
        if isinstance(a, jax.Array):
            return a
        if np.ndim(a) == 0 and isinstance(a, int | float | np.number) and not isinstance(a, bool | np.bool_):
            return jnp.asarray(a.item() if isinstance(a, np.number) else a)
        return jnp.asarray(a)

    return jax.tree.map(leaf, tree)


def _signature(args) -> tuple:
    """What an executable is specialized to besides its code: the arguments' pytree structure and
    every leaf's type (shape, dtype, weak type) and placement."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((jax.typeof(leaf), getattr(leaf, "sharding", None)) for leaf in leaves)


def compile_once(fn, *args, executables: dict | None = None, name=""):
    """(compiled executable, seconds): lowered and compiled once; calling it can never retrace.

    With `executables` (see runner.run_chains_with_state), an executable stored under `name` (hashable:
    the function and its static lengths) for arguments of the same `_signature` is reused.
    """
    start = time.perf_counter()
    key = None if executables is None else (name, _signature(args))
    if key is not None and key in executables:
        return executables[key], time.perf_counter() - start
    compiled = jax.jit(fn).lower(*args).compile()
    if key is not None:
        executables[key] = compiled
    return compiled, time.perf_counter() - start


# Executables of the last few runs whose algorithm has a keyed Binding (every registered sampler's
# build), by everything their code depends on; the values they were compiled with are arguments.
_SHARED: dict = {}
_SHARED_KEPT = 8


def shared_executables(algorithm: Algorithm, posterior: Posterior, draw_fn, full_draw_fn,
                        devices: Sequence[jax.Device] | None) -> dict | None:
    """The executables dict of runs with this code (None: the algorithm's code is not keyed).

    The key holds the binding's key (make + static settings), the posterior's static part
    (per_sample_loss, by identity), the draw functions (by identity) and the JAX set-up; shapes,
    dtypes and the schedule are part of each executable's own name (`compile_once`)."""
    binding = current_binding(algorithm)
    if binding is None or binding.key is None:
        return None
    setup = (jax.config.jax_enable_x64, jax.config.jax_threefry_partitionable, str(jax.config.jax_default_prng_impl))
    key = (binding.key, jax.tree.structure(posterior), draw_fn, full_draw_fn,
           None if devices is None else tuple(devices), setup)
    try:
        entry = _SHARED.pop(key, None)
    except TypeError:  # an unhashable static setting: no sharing
        return None
    entry = {} if entry is None else entry
    _SHARED[key] = entry  # most recent last
    while len(_SHARED) > _SHARED_KEPT:
        del _SHARED[next(iter(_SHARED))]
    return entry


def clear_executables() -> None:
    """Forget every shared executable (the next run of each algorithm compiles again)."""
    _SHARED.clear()
