"""Run independent jobs in this process, in a local process pool or as Ray tasks.

The driver alone sees the results: `done(job, result)` is called in the driver as each job
completes (in submission order inline, in completion order otherwise), so only the driver writes
the results CSV. A job is a tuple of arguments for `fn`, a module-level function (workers import
it by name) that reports its own failures in its result rather than raising.

Local pool: ``ProcessPoolExecutor`` with the 'spawn' start method (JAX is not fork-safe); its
workers die with the driver (Linux), so a killed run leaves no orphan still computing, and queued
jobs are cancelled on Ctrl-C or an error. Ray: each job is a task (one GPU per task when the cluster
has GPUs); install Ray with ``uv sync --extra ray``. Multi-host: ``ray start --head`` on one host,
``ray start --address=HEAD:6379`` on the others, then run with ``--backend ray --address auto`` on
the head.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from llc_bench.jaxcache import enable_compilation_cache
from llc_bench.types import ConfigError

BACKENDS = ("local", "ray")

Job = tuple
DoneFn = Callable[[Job, Any], None]


def check_options(workers: int, backend: str, address: str | None) -> None:
    """The command line's --workers / --backend / --address, checked before any work."""
    if workers < 1:
        raise ConfigError(f"--workers: must be >= 1 (got {workers})")
    if backend not in BACKENDS:
        raise ConfigError(f"--backend: must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if address and backend != "ray":
        raise ConfigError("--address: only with --backend ray")


def run_jobs(fn: Callable, jobs: Sequence[Job], done: DoneFn, *, workers: int = 1, backend: str = "local",
             address: str | None = None, crashed: Callable[[Job, Exception], Any] | None = None) -> None:
    """fn(*job) for every job, each result handed to done(job, result) in the driver.

    backend "local": in this process when workers == 1, else in a pool of `workers` processes.
    backend "ray": Ray tasks on the cluster at `address` (None: a local Ray instance); a task that
    dies (not a job that reports a failure) gets the result crashed(job, exc), or raises without it.
    A pool worker that dies raises RuntimeError: rerun the same command to resume.
    """
    check_options(workers, backend, address)
    if backend == "ray":
        _run_ray(fn, jobs, done, address, crashed)
    elif workers > 1:
        _run_pool(fn, jobs, done, workers)
    else:
        for job in jobs:
            done(job, fn(*job))


def worker_init() -> None:
    """Pool workers die with the driver (Linux), so a killed run leaves no orphan still computing, and
    share the persistent compilation cache the command line turns on (executables only, never numbers)."""
    os.environ.setdefault("LLC_BENCH_NO_PROGRESS", "1")
    enable_compilation_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
        if os.getppid() == 1:  # the driver died before prctl took effect
            os._exit(1)


def _run_pool(fn: Callable, jobs: Sequence[Job], done: DoneFn, workers: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init)
    try:
        futures = {pool.submit(fn, *job): job for job in jobs}
        for future in as_completed(futures):
            done(futures[future], future.result())
    except BrokenProcessPool as exc:
        raise RuntimeError(f"a worker process died ({exc}); rerun the same command to resume") from None
    finally:
        # On Ctrl-C or an error, do not wait for queued jobs; running ones die with the driver.
        pool.shutdown(wait=False, cancel_futures=True)


def _run_ray(fn: Callable, jobs: Sequence[Job], done: DoneFn, address: str | None,
             crashed: Callable[[Job, Exception], Any] | None) -> None:
    # Ray's `uv run` hook would start each worker with a bare `uv run` (no `ray` extra) in a copy of
    # the working directory; workers must use this environment (or, on a cluster, the one `ray start` ran in).
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray  # deferred: an optional dependency (uv sync --extra ray), slow to import
    except ImportError:
        raise ConfigError("--backend ray: Ray is not installed (uv sync --extra ray)") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(fn)
    refs = {task.remote(*job): job for job in jobs}
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        job = refs[ready[0]]
        try:
            result = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - a worker crash (not a job's own failure)
            if crashed is None:
                raise
            result = crashed(job, exc)
        done(job, result)
