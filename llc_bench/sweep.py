"""Sweeps: every cell of a spec (llc_bench.sweep_spec) one experiment, results appended to one CSV.

Results: one CSV row per (cell, sampler, seed), appended with fsync under an exclusive
``fcntl.flock`` as soon as the cell finishes. A cell that raises writes one ``failed`` row per
sampler with the message, and the sweep goes on. Rerunning the same command resumes: a torn last
line (a write cut by SIGKILL or power loss) is truncated away, cells with all their rows present
are skipped, a cell with only some sampler rows reruns just the missing samplers (each sampler has
its own RNG stream, so the result is the one the full cell would have given), and rows already in
the file are never written twice. ``failed`` rows count as done: delete them (or use a new --out)
to retry those cells. Inside a cell, the chains are saved chunk by chunk under
``<name>.checkpoints/`` beside the CSV (llc_bench.checkpoint): a cell killed midway resumes at its
last saved chunk on the rerun and writes the rows the uninterrupted cell would have (on Ray, when
the rerun's task can read the folder the killed one wrote). Each row records a ``fingerprint`` of
where it was computed (jax/jaxlib, backend and device kind, CPU, XLA_FLAGS): bit-identity holds only between equal fingerprints, and
``--rerun-stale`` moves rows of another fingerprint to ``<name>.stale.csv`` and reruns their cells.
A CSV from before that column reads with it empty, and gains it at its next write. The CSV belongs
to one spec (llc_bench.sweep_spec). The file handling is llc_bench.jobs.store's, shared with the
benchmark.

Parallelism (llc_bench.jobs.executor, shared with the benchmark): ``--workers N`` runs cells in N
local processes (``ProcessPoolExecutor``, 'spawn' start method because JAX is not fork-safe);
``--backend ray`` submits each cell as a Ray task (one GPU per task when the cluster has GPUs) and
the driver writes rows as tasks complete (``ray.wait``). Install Ray with ``uv sync --extra ray``.

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

import dataclasses
import importlib
import io
import json
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rich.console import Console

from llc_bench import artifacts
from llc_bench.checkpoint import checkpoints
from llc_bench.config import Config, to_dict
from llc_bench.jobs.executor import check_options, run_jobs
from llc_bench.jobs.store import ResultsStore
from llc_bench.progress import Bar, progress_enabled
from llc_bench.rules import STATUSES
from llc_bench.sweep_spec import (
    ADDED_COLUMNS,
    METRICS,
    Cell,
    SweepSpec,
    axis_columns,
    columns,
    expand,
    format_overrides,
    load_spec,
)
from llc_bench.types import ConfigError

CellFn = Callable[[Config], dict]



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
    # deferred: the experiment stack (JAX models, arviz, xarray) loads only where a real cell runs,
    # never in a driver or worker that runs a runner hook
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
        versions = artifacts.versions()
    return json.dumps(versions, sort_keys=True, separators=(",", ":"))


def rows_for(cell: Cell, config_columns: Iterable[str], summary: dict | None,
             error: str | None = None, fingerprint: str | None = None) -> list[dict]:
    """The CSV rows of one finished cell: one per sampler; all 'failed' with `error` when summary is None.

    fingerprint: where the rows were computed (default: this process, artifacts.fingerprint()).
    """
    resolved = to_dict(cell.config)
    base = {"cell_id": cell.cell_id, "seed": cell.seed}
    base.update({col: _cell_text(_lookup(resolved, col)) for col in config_columns})
    versions = _versions_json(summary.get("versions") if summary else None)
    where = artifacts.fingerprint() if fingerprint is None else fingerprint
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


def run_cell(cell: Cell, config_columns: list[str], runner: str | None = None,
             checkpoint_dir: str | Path | None = None) -> list[dict]:
    """Run one cell and return its rows; any exception becomes 'failed' rows, never a crash.

    checkpoint_dir: the cell's chains are saved there chunk by chunk (llc_bench.checkpoint) in a
    folder named by cell and seed, so a cell killed midway resumes where it stopped, with the same
    rows; the folder is removed once the rows are made."""
    folder = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{cell.cell_id}-seed{cell.seed}"
    with checkpoints(folder, clear_when_done=True):
        try:
            summary = resolve_runner(runner)(cell.config)
        except Exception as exc:  # noqa: BLE001 - a failing cell is a result, the sweep goes on
            return rows_for(cell, config_columns, None, f"{type(exc).__name__}: {exc}")
        return rows_for(cell, config_columns, summary)


def checkpoint_root(csv_path: str | Path) -> Path:
    """Where a sweep saves the chains of its unfinished cells: <csv name>.checkpoints/ beside the CSV."""
    return Path(csv_path).with_suffix(".checkpoints")


# ---------------------------------------------------------------------------------------------
# The results CSV


class ResultsCSV(ResultsStore):
    """One sweep's CSV (llc_bench.jobs.store): rows keyed by (cell_id, sampler)."""

    def __init__(self, path: str | Path, header: list[str]):
        super().__init__(path, header, key=("cell_id", "sampler"), added_columns=ADDED_COLUMNS,
                         foreign="written by another spec?")

    def remove_stale(self, fingerprint: str) -> list[dict]:
        """Move the rows computed under another fingerprint to <name>.stale.csv, and return them."""
        return self.move_aside(lambda r: r.get("fingerprint") != fingerprint)


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
# Driver


def run_sweep(spec: SweepSpec, out: str | Path | None = None, *, workers: int = 1,
              backend: str = "local", address: str | None = None, progress: bool = False,
              rerun_stale: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run the cells of `spec` not yet in the CSV; returns the CSV path.

    rerun_stale: rows whose fingerprint differs from this process's (another machine, jax/jaxlib,
    backend or XLA_FLAGS) are moved to <name>.stale.csv and their cells run again; otherwise any
    row counts as done, wherever it was computed.
    """
    cells = expand(spec)
    path = Path(out or spec.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    resolve_runner(spec.runner)  # an unimportable hook fails now, not once per cell
    cols = axis_columns(spec)
    csv_file = ResultsCSV(path, columns(spec))
    if rerun_stale:
        stale = csv_file.remove_stale(artifacts.fingerprint())
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

        def crashed(job: tuple, exc: Exception) -> list[dict]:
            return rows_for(job[0], cols, None, f"ray task failed: {type(exc).__name__}: {exc}", fingerprint="")

        jobs = [(cell, cols, spec.runner, checkpoint_root(path)) for cell in todo]
        run_jobs(run_cell, jobs, lambda job, rows: done_fn(job[0], rows),
                 workers=workers, backend=backend, address=address, crashed=crashed)
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
    check_options(args.workers, args.backend, args.address)
    out = Path(args.out or spec.out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; give the path of a CSV file")
    if args.dry_run:
        dry_run(spec, out)
        return 0
    artifacts.check_writable(out.parent, "--out")
    try:
        path = run_sweep(spec, out, workers=args.workers, backend=args.backend, address=args.address,
                         progress=not args.no_progress, rerun_stale=args.rerun_stale)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(path, ResultsCSV(path, columns(spec)).read())
    return 0
