"""JAX's persistent compilation cache: compile time dominates small runs on CPU, and reruns hit the cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Point JAX at an on-disk compilation cache (LLC_BENCH_JAX_CACHE, default ~/.cache/llc_bench/jax).

    LLC_BENCH_JAX_CACHE=off disables it. Results are unaffected: the cache stores compiled executables
    keyed by the program, never numbers.
    """
    setting = path or os.environ.get("LLC_BENCH_JAX_CACHE") or Path.home() / ".cache" / "llc_bench" / "jax"
    if str(setting).lower() in ("off", "0", "none", ""):
        return None
    cache = Path(setting)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home is no reason to fail a run
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache
