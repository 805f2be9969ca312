"""Command line: `main.py` runs one experiment; `main.py sweep|tune|bench` run the bigger jobs."""

from __future__ import annotations

import argparse
import sys

from llc_bench.artifacts import check_writable
from llc_bench.config import load_config, preset_names
from llc_bench.jaxcache import enable_compilation_cache
from llc_bench.jobs.executor import BACKENDS
from llc_bench.types import ConfigError

COMMANDS = ("run", "sweep", "tune", "bench")
# Exit statuses: 0 done, 2 bad input (nothing run), 3 ran but no sampler produced an estimate, 130 interrupted.
EXIT_BAD_INPUT = 2
EXIT_ALL_FAILED = 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line with exit status 2."""

    def error(self, message: str):  # noqa: D401
        raise ConfigError(f"{self.prog}: {message}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default",
                        help=f"named preset from configs/ ({', '.join(preset_names())}; default: default)")
    parser.add_argument("--config", metavar="FILE", help="TOML config file (sections data, teacher, model, "
                        "train, posterior, run, sampler.<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting by dotted key, e.g. --set data.n=5000 (repeatable)")
    parser.add_argument("--sampler", dest="samplers", action="append", default=[], metavar="NAME",
                        help="run only this sampler (repeatable); overrides run.samplers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(command: str) -> argparse.ArgumentParser:
    prog = "main.py" if command == "run" else f"main.py {command}"
    if command == "run":
        p = _Parser(prog=prog, description=(
            "Estimate the LLC of one trained network with several samplers and score it. Prints a table "
            "per sampler and writes results/<run_id>/ (config.toml, summary.json, traces.zarr, PNGs). "
            "Other commands: main.py sweep | tune | bench (each has --help)."))
        _common(p)
        p.add_argument("--out", metavar="DIR", help="output directory (default results/<run_id>)")
        p.add_argument("--check-step-size", action="store_true",
                       help="rerun each sampler at half its step size and report the change in the LLC estimate")
        return p
    if command == "sweep":
        p = _Parser(prog=prog, description="Run a grid of experiments to one CSV, resumable and parallel.")
        p.add_argument("--spec", metavar="FILE", help="sweep spec TOML (default configs/sweep_default.toml)")
        p.add_argument("--out", metavar="CSV", help="CSV path (default from the spec)")
        _execution(p, "cells")
        p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
        p.add_argument("--rerun-stale", action="store_true",
                       help="redo rows computed under another fingerprint (machine, jax/jaxlib, backend, "
                            "XLA_FLAGS); they move to <out>.stale.csv. Without it every row counts as done")
        p.add_argument("--no-progress", action="store_true")
        return p
    if command == "tune":
        p = _Parser(prog=prog, description="The sampling guide's hyperparameter search (step size x n_beta x gamma).")
        _common(p)
        p.add_argument("--out", metavar="DIR", help="output directory (default results/tune/<run_id>)")
        return p
    p = _Parser(prog=prog, description="Deep-linear-network scoreboard: every sampler against analytic truth.")
    p.add_argument("--spec", metavar="FILE", help="benchmark recipe TOML (default configs/bench_dln.toml)")
    p.add_argument("--out", metavar="DIR", help="output directory (default results/benchmarks)")
    p.add_argument("--instances", type=int, help="instances per size class (overrides the recipe)")
    p.add_argument("--profile", help="merge [profile.<name>] of the recipe over it (e.g. full, for a GPU)")
    p.add_argument("--rerun-stale", action="store_true",
                   help="rows computed with an earlier recipe of their sampler are moved to *.stale.csv and "
                        "run again (otherwise the run refuses to mix recipes)")
    p.add_argument("--audit", action="store_true",
                   help="finite-n audit: rerun the recipe's audit sampler at audit_factor x n, flag moves "
                        "above audit_threshold (writes finite_n_audit.csv)")
    p.add_argument("--summary-only", action="store_true", help="rewrite summary.md and the figures from the CSVs")
    _execution(p, "instances")
    p.add_argument("--no-progress", action="store_true")
    return p


def _execution(parser: argparse.ArgumentParser, jobs: str) -> None:
    """Where sweep and bench run their jobs (llc_bench.jobs.executor): here, local processes or Ray."""
    parser.add_argument("--workers", type=int, default=1, help=f"run {jobs} in this many local worker processes")
    parser.add_argument("--backend", choices=BACKENDS, default="local",
                        help=f"local (this machine) or ray (each of the {jobs} a Ray task)")
    parser.add_argument("--address", help="Ray cluster address (with --backend ray), e.g. auto")


def _run(args) -> int:
    overrides = list(args.overrides)
    if args.samplers:
        overrides.append("run.samplers=" + ",".join(args.samplers))
    cfg = load_config(args.preset, args.config, overrides)
    if args.out is not None:
        check_writable(args.out)
    else:
        check_writable(cfg.run.out_dir, "run.out_dir")
    from llc_bench.experiment import run_experiment  # deferred: see main

    summary = run_experiment(cfg, out_dir=args.out, progress=not args.no_progress,
                             check_step_size=args.check_step_size)
    if all(s["status"] == "failed" for s in summary["samplers"].values()):
        print("error: every sampler failed; no LLC estimate (see the status column)", file=sys.stderr)
        return EXIT_ALL_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    try:
        args = build_parser(command).parse_args(argv)
        enable_compilation_cache()
        if command == "run":
            return _run(args)
        # Each command's module is imported only when that command runs: between them they load
        # arviz, xarray, optax and matplotlib, which a bad argument or another command need not wait for.
        if command == "sweep":
            from llc_bench.sweep import main as command_main
        elif command == "tune":
            from llc_bench.tune import main as command_main
        else:
            from llc_bench.bench import main as command_main
        return command_main(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
