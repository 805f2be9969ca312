"""Sweeps: a TOML spec expands to validated cells, each cell one experiment, results appended to one CSV.

Spec layout (see configs/sweep_default.toml)::

    [sweep]
    name = "my_sweep"
    mode = "one_at_a_time"        # "product" | "zip" | "one_at_a_time"
    seeds = [0, 1]                # always multiplied in (run.seed of each cell)
    samplers = ["sgld"]           # optional; default: the base config's run.samplers
    out = "results/sweeps/my_sweep.csv"   # optional; default results/sweeps/<name>.csv
    runner = "pkg.module:function"        # optional hook, see below
    base_preset = "quick"         # optional: start from a preset, [base] is merged over it

    [base]                        # a config in the normal TOML layout ([base.data], [base.model], ...)
    data.n = 1000

    [axes]
    "model.depth" = [1, 2, 3]     # dotted config key -> list of values
    "data.noise" = ["gaussian", "outliers"]
    # A bare name (no dot) bundles several keys into one axis: each value is a table of dotted keys.
    activation = [{ "model.activation" = "tanh", "teacher.activation" = "tanh" }]

Modes: ``product`` is the Cartesian product of the axes; ``zip`` walks equal-length axes in
parallel; ``one_at_a_time`` runs the base and then each axis value alone with every other key at
its base value. Cells whose resolved configs coincide (an axis value
equal to the base value) run once. Every cell is validated before any runs.

Results: one CSV row per (cell, sampler, seed), appended with fsync under an exclusive
``fcntl.flock`` as soon as the cell finishes. A cell that raises writes one ``failed`` row per
sampler with the message, and the sweep goes on. Rerunning the same command resumes: a torn last
line (a write cut by SIGKILL or power loss) is truncated away, cells with all their rows present
are skipped, a cell with only some sampler rows reruns just the missing samplers (each sampler has
its own RNG stream, so the result is the one the full cell would have given), and rows already in
the file are never written twice. ``failed`` rows count as done: delete them (or use a new --out)
to retry those cells. Each row records a ``fingerprint`` of where it was computed (jax/jaxlib,
backend and device kind, CPU, XLA_FLAGS): bit-identity holds only between equal fingerprints, and
``--rerun-stale`` moves rows of another fingerprint to ``<name>.stale.csv`` and reruns their cells.
A CSV from before that column reads with it empty, and gains it at its next write. The CSV belongs to one spec: ``cell_id`` hashes the cell's overrides and
seed, not the base, so after changing the base write to a new CSV.

Parallelism: ``--workers N`` runs cells in N local processes (``ProcessPoolExecutor``, 'spawn'
start method because JAX is not fork-safe); ``--backend ray`` submits each cell as a Ray task
(one GPU per task when the cluster has GPUs) and the driver writes rows as tasks complete
(``ray.wait``). Install Ray with ``uv sync --extra ray``.

Multi-host: start a Ray head on one host (``ray start --head``) and a Ray worker on every other
host (``ray start --address=HEAD:6379``), then run ``main.py sweep --backend ray --address auto``
on the head; only the driver writes the CSV. Without Ray, shard the spec by cells: give each host
its own spec (a slice of the axes) and its own ``out`` CSV, and concatenate the CSVs afterwards
(the header is the same when the axes are). Do not point sweeps on several hosts at one CSV on a
network file system: flock is not reliable there.

The ``runner`` hook: a ``module:function`` taking a Config and returning a summary dict shaped like
``llc_bench.experiment.run_experiment``'s (used by the tests to run fast synthetic cells; the
module must be importable in the worker processes).
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import importlib
import io
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llc_bench.config import (
    PRESET_DIR,
    SEED_LIMIT,
    Config,
    ConfigError,
    _suggest,
    deep_merge,
    from_dict,
    preset_path,
    read_toml,
    set_dotted,
    to_dict,
)

DEFAULT_SPEC = PRESET_DIR / "sweep_default.toml"
MODES = ("product", "zip", "one_at_a_time")
SPEC_KEYS = ("name", "mode", "seeds", "samplers", "out", "runner", "base_preset")
SPEC_SECTIONS = ("sweep", "base", "base_preset", "axes")

METRICS = ("llc_mean", "llc_se", "truth", "rel_error", "ess_bulk", "ess_tail", "rhat", "accept_rate",
           "grad_evals", "wall_s", "compile_s", "wnv_time", "wnv_grad", "n_beta", "gamma", "d",
           "loss_at_wstar", "step_size", "h_max", "num_hvp")
TAIL = ("status", "warnings", "error", "versions", "fingerprint")
STATUSES = ("ok", "warnings", "not_converged", "diverged", "failed")
# Columns newer than some CSVs still being resumed: an older file gets them empty.
ADDED_COLUMNS = ("fingerprint", "step_size", "h_max", "num_hvp")

CellFn = Callable[[Config], dict]


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec: the base config as a raw TOML-layout dict, axes as dotted key -> values."""

    name: str
    mode: str
    seeds: tuple[int, ...]
    samplers: tuple[str, ...] | None
    out: str
    base: dict
    axes: dict[str, list]  # axis name -> values; a value is {dotted key: value} for bundled axes
    runner: str | None = None
    path: str = "<spec>"


@dataclass(frozen=True)
class Cell:
    """One experiment of the sweep: its overrides of the base, its seed, and the validated config."""

    cell_id: str
    seed: int
    overrides: dict[str, Any]  # dotted key -> value (the seed is not included)
    config: Config

    @property
    def samplers(self) -> tuple[str, ...]:
        return self.config.run.samplers


# ---------------------------------------------------------------------------------------------
# Spec parsing and expansion


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"depth": 1}} and {"model.depth": 1} both become {"model.depth": 1}."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _axes_from_toml(raw: dict, where: str) -> dict[str, list]:
    axes: dict[str, list] = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
                continue
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{where} [axes] {dotted}: must be a non-empty list of values")
            if "." not in dotted:  # a bundled axis: each value a table of dotted keys
                if not all(isinstance(v, dict) and v for v in value):
                    raise ConfigError(f"{where} [axes] {dotted}: not a dotted config key, so each value must "
                                      "be a table of dotted keys, e.g. [{ \"model.activation\" = \"tanh\" }]")
                value = [_flatten(v) for v in value]
            axes[dotted] = value

    walk(raw, "")
    if "run.seed" in axes:
        raise ConfigError(f"{where} [axes] run.seed: use [sweep] seeds = [...] instead")
    return axes


def parse_spec(raw: dict, path: str = "<spec>") -> SweepSpec:
    """A SweepSpec from a spec TOML dict; structural errors are one-line ConfigErrors."""
    for key in raw:
        if key not in SPEC_SECTIONS:
            raise ConfigError(f"{path}: unknown section {key!r}{_suggest(key, SPEC_SECTIONS)}; "
                              f"allowed: {', '.join(SPEC_SECTIONS)}")
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: [sweep] must be a table")
    for key in sweep:
        if key not in SPEC_KEYS:
            raise ConfigError(f"{path}: sweep.{key}: unknown key{_suggest(key, SPEC_KEYS)}; "
                              f"allowed: {', '.join(SPEC_KEYS)}")
    name = sweep.get("name", Path(path).stem if path != "<spec>" else "sweep")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{path}: sweep.name: must be a non-empty string without '/' (got {name!r})")
    mode = sweep.get("mode", "product")
    if mode not in MODES:
        raise ConfigError(f"{path}: sweep.mode: unknown value {mode!r}{_suggest(str(mode), MODES)}; "
                          f"allowed: {', '.join(MODES)}")
    seeds = sweep.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < SEED_LIMIT for s in seeds)):
        raise ConfigError(f"{path}: sweep.seeds: must be a non-empty list of integers in [0, 2^32) (got {seeds!r})")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: sweep.seeds: repeated seed in {seeds!r}")
    samplers = sweep.get("samplers")
    if samplers is not None:
        if isinstance(samplers, str):
            samplers = [samplers]
        if not isinstance(samplers, list) or not samplers or not all(isinstance(s, str) for s in samplers):
            raise ConfigError(f"{path}: sweep.samplers: must be a non-empty list of sampler names")
        samplers = tuple(samplers)
    out = sweep.get("out", f"results/sweeps/{name}.csv")
    runner = sweep.get("runner")
    if runner is not None and (not isinstance(runner, str) or ":" not in runner):
        raise ConfigError(f"{path}: sweep.runner: must be 'module:function' (got {runner!r})")

    base: dict = {}
    if "base_preset" in raw and "base_preset" in sweep:
        raise ConfigError(f"{path}: base_preset: given twice (top level and in [sweep])")
    preset = sweep.get("base_preset", raw.get("base_preset"))
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"{path}: base_preset: must be a preset name (got {preset!r})")
        base = read_toml(preset_path(preset, f"{path}: base_preset"), f"{path}: base_preset")
    extra = raw.get("base", {})
    if not isinstance(extra, dict):
        raise ConfigError(f"{path}: [base] must be a table")
    base = deep_merge(base, extra)
    axes_raw = raw.get("axes", {})
    if not isinstance(axes_raw, dict):
        raise ConfigError(f"{path}: [axes] must be a table")
    axes = _axes_from_toml(axes_raw, path)
    return SweepSpec(name=name, mode=mode, seeds=tuple(seeds), samplers=samplers, out=str(out),
                     base=base, axes=axes, runner=runner, path=str(path))


def load_spec(path: str | Path | None = None) -> SweepSpec:
    """Read and parse a spec file (default configs/sweep_default.toml)."""
    path = Path(path) if path is not None else DEFAULT_SPEC
    return parse_spec(read_toml(path, "--spec"), str(path))


def _combos(spec: SweepSpec) -> list[dict[str, Any]]:
    """Override dicts (dotted key -> value), in run order, before seeds are multiplied in."""

    def as_overrides(axis: str, value: Any) -> dict[str, Any]:
        return dict(value) if "." not in axis else {axis: value}

    axes = list(spec.axes.items())
    if not axes:
        return [{}]
    if spec.mode == "one_at_a_time":
        return [{}] + [as_overrides(a, v) for a, values in axes for v in values]
    if spec.mode == "zip":
        lengths = {a: len(v) for a, v in axes}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{a} has {n}" for a, n in lengths.items())
            raise ConfigError(f"{spec.path}: mode \"zip\" needs axes of equal length ({listed})")
        rows = zip(*(values for _, values in axes), strict=True)
    else:
        rows = itertools.product(*(values for _, values in axes))
    out = []
    for row in rows:
        combo: dict[str, Any] = {}
        for (axis, _), value in zip(axes, row, strict=True):
            for key, v in as_overrides(axis, value).items():
                if key in combo and combo[key] != v:
                    raise ConfigError(f"{spec.path}: axes set {key} twice with different values "
                                      f"({combo[key]!r} and {v!r})")
                combo[key] = v
        out.append(combo)
    return out


def cell_id(overrides: dict[str, Any], seed: int) -> str:
    """Stable 12-hex id of a cell: a hash of its overrides and seed (independent of order and run)."""
    canonical = json.dumps({"overrides": overrides, "seed": seed}, sort_keys=True,
                           separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _format_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def format_overrides(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={_format_value(v)}" for k, v in overrides.items()) or "(base)"


def _build(spec: SweepSpec, overrides: dict[str, Any], seed: int) -> Config:
    raw = json.loads(json.dumps(spec.base))  # deep copy of plain TOML data
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    set_dotted(raw, "run.seed", seed)
    if spec.samplers is not None:
        set_dotted(raw, "run.samplers", list(spec.samplers))
    return from_dict(raw)  # also checks that a student sized by target_params is buildable


def expand(spec: SweepSpec) -> list[Cell]:
    """All cells of the sweep, each validated; a bad axis key or value raises one ConfigError naming it."""
    # Each axis value alone first: the error then names the axis value that is at fault.
    for axis, values in spec.axes.items():
        for value in values:
            overrides = dict(value) if "." not in axis else {axis: value}
            try:
                _build(spec, overrides, spec.seeds[0])
            except ConfigError as exc:
                raise ConfigError(f"{spec.path}: axis {axis} = {_format_value(value)}: {exc}") from None
    cells, seen = [], set()
    for overrides in _combos(spec):
        for seed in spec.seeds:
            try:
                cfg = _build(spec, overrides, seed)
            except ConfigError as exc:
                raise ConfigError(f"{spec.path}: cell {format_overrides(overrides)}: {exc}") from None
            resolved = json.dumps(to_dict(cfg), sort_keys=True, default=str)
            if resolved in seen:  # e.g. a one_at_a_time value equal to the base value
                continue
            seen.add(resolved)
            cells.append(Cell(cell_id(overrides, seed), seed, overrides, cfg))
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == len(ids), "cell ids collide"
    return cells


def axis_columns(spec: SweepSpec) -> list[str]:
    """The dotted config keys the axes touch, in spec order: the CSV's config columns."""
    cols: dict[str, None] = {}
    for axis, values in spec.axes.items():
        if "." in axis:
            cols[axis] = None
        else:
            for value in values:
                cols.update(dict.fromkeys(value))
    return list(cols)


def columns(spec: SweepSpec) -> list[str]:
    return ["cell_id", "seed", "sampler", *axis_columns(spec), *METRICS, *TAIL]


# ---------------------------------------------------------------------------------------------
# Running one cell (in the driver, a worker process or a Ray task)


def resolve_runner(path: str | None) -> CellFn:
    """The cell function: run_experiment without artifacts, plots or printed report, or a 'module:function' hook."""
    if path is None:
        return run_experiment_quietly
    module, _, name = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"sweep.runner: cannot import {path!r} ({exc})") from None
    return fn


def run_experiment_quietly(cfg: Config) -> dict:
    from rich.console import Console

    from llc_bench.experiment import run_experiment

    return run_experiment(cfg, progress=False, write=False, plots=False,
                          console=Console(file=io.StringIO()))


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return ""
        node = node[part]
    return node


def _cell_text(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, separators=(",", ":"))
    return value


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _versions_json(versions: dict | None) -> str:
    if versions is None:
        from llc_bench.artifacts import versions as current

        versions = current()
    return json.dumps(versions, sort_keys=True, separators=(",", ":"))


def rows_for(cell: Cell, config_columns: Iterable[str], summary: dict | None,
             error: str | None = None, fingerprint: str | None = None) -> list[dict]:
    """The CSV rows of one finished cell: one per sampler; all 'failed' with `error` when summary is None.

    fingerprint: where the rows were computed (default: this process, artifacts.fingerprint()).
    """
    from llc_bench.artifacts import fingerprint as here

    resolved = to_dict(cell.config)
    base = {"cell_id": cell.cell_id, "seed": cell.seed}
    base.update({col: _cell_text(_lookup(resolved, col)) for col in config_columns})
    versions = _versions_json(summary.get("versions") if summary else None)
    where = here() if fingerprint is None else fingerprint
    rows = []
    for name in cell.samplers:
        row = {**base, "sampler": name, **dict.fromkeys(METRICS, ""), "warnings": "", "versions": versions,
               "fingerprint": where}
        s = (summary or {}).get("samplers", {}).get(name)
        if summary is None or s is None:
            row.update(status="failed", error=_one_line(error or f"no result for sampler {name!r}"))
            if summary is not None:
                row.update({k: _cell_text(summary.get(k)) for k in ("truth", "n_beta", "gamma", "d",
                                                                    "loss_at_wstar")})
        else:
            row.update({k: _cell_text(summary.get(k)) for k in ("truth", "n_beta", "gamma", "d",
                                                                "loss_at_wstar")})
            row.update({k: _cell_text(s.get(k)) for k in METRICS if k in s})
            status = s.get("status", "ok")
            row["status"] = status if status in STATUSES else "warnings"
            warnings = list(s.get("warnings", ()))
            row["warnings"] = _one_line(";".join(w.split(":", 1)[0] for w in warnings))
            # a run the estimator gave up on (e.g. every chain NaN) says why in `error` too
            row["error"] = (_one_line(s.get("error") or " | ".join(warnings) or "the estimator reported failure")
                            if row["status"] == "failed" else "")
        rows.append(row)
    return rows


def run_cell(cell: Cell, config_columns: list[str], runner: str | None = None) -> list[dict]:
    """Run one cell and return its rows; any exception becomes 'failed' rows, never a crash."""
    try:
        fn = resolve_runner(runner)
        summary = fn(cell.config)
    except Exception as exc:  # noqa: BLE001 - a failing cell is a result, the sweep goes on
        return rows_for(cell, config_columns, None, f"{type(exc).__name__}: {exc}")
    return rows_for(cell, config_columns, summary)


# ---------------------------------------------------------------------------------------------
# The results CSV: append-only, locked, fsynced, resumable


class ResultsCSV:
    """One sweep's CSV. Every access holds an exclusive flock; writes are appended, flushed and fsynced."""

    def __init__(self, path: str | Path, header: list[str]):
        self.path = Path(path)
        self.header = list(header)

    def _open_locked(self):
        fh = open(self.path, "a+b")  # noqa: SIM115 - closed by the caller
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        return fh

    def _repair_and_read(self, fh, migrate: bool = False) -> list[dict]:
        """Drop a torn last line (no trailing newline), check the header, return the rows.

        A CSV from before the fingerprint column reads with it empty (computed somewhere unknown);
        with migrate=True (before a write) the file itself gains the column.
        """
        fh.seek(0)
        data = fh.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            os.ftruncate(fh.fileno(), keep)
            data = data[:keep]
        if not data:
            return []
        try:
            reader = csv.DictReader(io.StringIO(data.decode()))
            fieldnames = reader.fieldnames
        except (UnicodeDecodeError, csv.Error):
            raise ConfigError(f"--out {self.path}: not a sweep results CSV; use a new --out") from None
        if fieldnames != self.header:
            missing = [c for c in self.header if c not in fieldnames]
            if set(fieldnames) <= set(self.header) and set(missing) <= set(ADDED_COLUMNS):
                rows = [{**r, **dict.fromkeys(missing, "")} for r in reader]
                if migrate:
                    self._rewrite(fh, rows)
                return rows
            raise ConfigError(f"--out {self.path}: existing CSV has other columns (written by another "
                              "spec?); use a new --out")
        return list(reader)

    def _rewrite(self, fh, rows: list[dict]) -> None:
        """Replace the whole file's content by `rows` (under the held lock), fsynced."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        data = buf.getvalue().encode()
        fh.seek(0)
        fh.truncate()
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())

    def remove_stale(self, fingerprint: str) -> list[dict]:
        """Take the rows computed under another fingerprint out of the CSV, and return them.

        They are appended to <name>.stale.csv first, so the old numbers are kept for comparison.
        """
        if not self.path.exists():
            return []
        with self._open_locked() as fh:
            rows = self._repair_and_read(fh, migrate=True)
            stale = [r for r in rows if r.get("fingerprint") != fingerprint]
            if stale:
                aside = ResultsCSV(self.path.with_suffix(".stale.csv"), self.header)
                with aside._open_locked() as out:
                    aside._repair_and_read(out)
                    buf = io.StringIO()
                    writer = csv.DictWriter(buf, fieldnames=self.header, lineterminator="\n")
                    if out.tell() == 0:
                        writer.writeheader()
                    writer.writerows(stale)
                    out.write(buf.getvalue().encode())
                    out.flush()
                    os.fsync(out.fileno())
                self._rewrite(fh, [r for r in rows if r.get("fingerprint") == fingerprint])
            return stale

    def read(self) -> list[dict]:
        """All complete rows (repairing a torn last line), or [] when the file does not exist."""
        if not self.path.exists():
            return []
        with self._open_locked() as fh:
            return self._repair_and_read(fh)

    def append(self, rows: list[dict]) -> int:
        """Append rows not already in the file (by cell_id, sampler); returns how many were written."""
        with self._open_locked() as fh:
            existing = {(r["cell_id"], r["sampler"]) for r in self._repair_and_read(fh, migrate=True)}
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.header, lineterminator="\n")
            if fh.tell() == 0:
                writer.writeheader()
            new = [r for r in rows if (str(r["cell_id"]), r["sampler"]) not in existing]
            writer.writerows(new)
            fh.write(buf.getvalue().encode())
            fh.flush()
            os.fsync(fh.fileno())
            return len(new)


def pending(cells: list[Cell], rows: list[dict]) -> list[Cell]:
    """Cells with missing sampler rows; a partly written cell keeps only its missing samplers."""
    done: dict[str, set[str]] = {}
    for r in rows:
        done.setdefault(r["cell_id"], set()).add(r["sampler"])
    out = []
    for cell in cells:
        missing = tuple(s for s in cell.samplers if s not in done.get(cell.cell_id, ()))
        if not missing:
            continue
        if missing != cell.samplers:
            run = dataclasses.replace(cell.config.run, samplers=missing)
            cell = dataclasses.replace(cell, config=dataclasses.replace(cell.config, run=run))
        out.append(cell)
    return out


# ---------------------------------------------------------------------------------------------
# Backends: in-process, a local process pool, Ray


def _worker_init() -> None:
    """Pool workers die with the driver (Linux), so a killed sweep leaves no orphan still computing."""
    os.environ.setdefault("LLC_BENCH_NO_PROGRESS", "1")
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
        if os.getppid() == 1:  # the driver died before prctl took effect
            os._exit(1)


def _run_inline(cells, cols, runner, done_fn):
    for cell in cells:
        done_fn(cell, run_cell(cell, cols, runner))


def _run_pool(cells, cols, runner, done_fn, workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
    try:
        futures = {pool.submit(run_cell, cell, cols, runner): cell for cell in cells}
        for future in as_completed(futures):
            done_fn(futures[future], future.result())
    except BrokenProcessPool as exc:
        raise RuntimeError(f"a worker process died ({exc}); rerun the same command to resume") from None
    finally:
        # On Ctrl-C or an error, do not wait for queued cells; running ones die with the driver.
        pool.shutdown(wait=False, cancel_futures=True)


def _run_ray(cells, cols, runner, done_fn, address: str | None):
    # Ray's `uv run` hook would start each worker with a bare `uv run` (no `ray` extra) in a copy of
    # the working directory; workers must use this environment (or, on a cluster, the one `ray start` ran in).
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray: Ray is not installed (uv sync --extra ray)") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(run_cell)
    refs = {task.remote(cell, cols, runner): cell for cell in cells}
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        ref = ready[0]
        cell = refs[ref]
        try:
            rows = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a worker crash (not a cell exception) is a failed cell
            rows = rows_for(cell, cols, None, f"ray task failed: {type(exc).__name__}: {exc}", fingerprint="")
        done_fn(cell, rows)


# ---------------------------------------------------------------------------------------------
# Driver


def run_sweep(spec: SweepSpec, out: str | Path | None = None, *, workers: int = 1,
              backend: str = "local", address: str | None = None, progress: bool = False,
              rerun_stale: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run the cells of `spec` not yet in the CSV; returns the CSV path.

    rerun_stale: rows whose fingerprint differs from this process's (another machine, jax/jaxlib,
    backend or XLA_FLAGS) are moved to <name>.stale.csv and their cells run again; otherwise any
    row counts as done, wherever it was computed.
    """
    from llc_bench.progress import Bar, progress_enabled

    cells = expand(spec)
    path = Path(out or spec.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    resolve_runner(spec.runner)  # an unimportable hook fails now, not once per cell
    cols = axis_columns(spec)
    csv_file = ResultsCSV(path, columns(spec))
    if rerun_stale:
        from llc_bench.artifacts import fingerprint

        stale = csv_file.remove_stale(fingerprint())
        if stale:
            log(f"--rerun-stale: {len(stale)} row(s) computed elsewhere moved to {path.with_suffix('.stale.csv')}")
    todo = pending(cells, csv_file.read())
    skipped = len(cells) - len(todo)
    log(f"sweep {spec.name}: {len(cells)} cells ({spec.mode}, {len(spec.seeds)} seed(s)), "
        f"{skipped} already in {path}, {len(todo)} to run"
        + (f" on {workers} workers" if backend == "local" and workers > 1 else "")
        + (" on Ray" if backend == "ray" else ""))
    if not todo:
        return path
    bar_on = progress_enabled(progress)
    t0 = time.perf_counter()
    with Bar(f"sweep {spec.name}", total=len(todo), enabled=bar_on) as bar:
        count = 0

        def done_fn(cell: Cell, rows: list[dict]) -> None:
            nonlocal count
            csv_file.append(rows)
            count += 1
            bar.advance()
            res = ", ".join(f"{r['sampler']} {r['status']}"
                            + (f" λ̂={float(r['llc_mean']):.4g}" if r["llc_mean"] != "" else "")
                            for r in rows)
            log(f"[{count}/{len(todo)}] {cell.cell_id} seed={cell.seed} "
                f"{format_overrides(cell.overrides)}: {res}  ({time.perf_counter() - t0:.0f}s)")

        if backend == "ray":
            _run_ray(todo, cols, spec.runner, done_fn, address)
        elif workers > 1:
            _run_pool(todo, cols, spec.runner, done_fn, workers)
        else:
            _run_inline(todo, cols, spec.runner, done_fn)
    return path


def summarize(rows: list[dict]) -> list[dict]:
    """Per sampler: rows, median λ̂ and median |relative error| over ok/warnings rows, count by status."""
    by_sampler: dict[str, list[dict]] = {}
    for r in rows:
        by_sampler.setdefault(r["sampler"], []).append(r)
    out = []
    for name, rs in by_sampler.items():
        usable = [r for r in rs if r["status"] in ("ok", "warnings") and r["llc_mean"] != ""]
        llc = [float(r["llc_mean"]) for r in usable]
        rel = [abs(float(r["rel_error"])) for r in usable if r["rel_error"] != ""]
        out.append({"sampler": name, "rows": len(rs),
                    "median_llc": statistics.median(llc) if llc else None,
                    "median_abs_rel_error": statistics.median(rel) if rel else None,
                    "status": dict(Counter(r["status"] for r in rs))})
    return out


def print_summary(path: Path, rows: list[dict], log: Callable[[str], None] = print) -> None:
    log(f"results: {path} ({len(rows)} rows)")
    for s in summarize(rows):
        med = "—" if s["median_llc"] is None else f"{s['median_llc']:.4g}"
        rel = "" if s["median_abs_rel_error"] is None else f", median |rel err| {100 * s['median_abs_rel_error']:.1f}%"
        counts = ", ".join(f"{k} {v}" for k, v in sorted(s["status"].items()))
        log(f"  {s['sampler']:<15} median λ̂ {med}{rel}  ({counts})")


def dry_run(spec: SweepSpec, out: str | Path | None = None, log: Callable[[str], None] = print) -> None:
    cells = expand(spec)
    path = Path(out or spec.out)
    left = {c.cell_id for c in pending(cells, ResultsCSV(path, columns(spec)).read())} if path.exists() else None
    samplers = list(dict.fromkeys(s for c in cells for s in c.samplers))
    log(f"sweep {spec.name}: {len(cells)} cells ({spec.mode}; seeds {list(spec.seeds)}; "
        f"samplers {', '.join(samplers)}) -> {path}")
    for c in cells:
        state = "" if left is None else ("todo  " if c.cell_id in left else "done  ")
        log(f"{c.cell_id}  seed={c.seed}  {state}{format_overrides(c.overrides)}")


def main(args) -> int:
    """`main.py sweep`: see the module docstring. Returns the exit status."""
    spec = load_spec(args.spec)
    if args.workers < 1:
        raise ConfigError(f"--workers: must be >= 1 (got {args.workers})")
    if args.address and args.backend != "ray":
        raise ConfigError("--address: only with --backend ray")
    out = Path(args.out or spec.out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; give the path of a CSV file")
    if args.dry_run:
        dry_run(spec, out)
        return 0
    from llc_bench.cli import check_writable

    check_writable(out.parent, "--out")
    try:
        path = run_sweep(spec, out, workers=args.workers, backend=args.backend, address=args.address,
                         progress=not args.no_progress, rerun_stale=args.rerun_stale)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(path, ResultsCSV(path, columns(spec)).read())
    return 0
