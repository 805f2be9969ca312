"""Shared pytest setup: CPU JAX, no progress bars, the persistent compilation cache (compile time dominates)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("LLC_BENCH_NO_PROGRESS", "1")

from llc_bench.jaxcache import enable_compilation_cache  # noqa: E402

enable_compilation_cache()
