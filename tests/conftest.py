"""Shared pytest setup: CPU JAX, no progress bars."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("LLC_BENCH_NO_PROGRESS", "1")
