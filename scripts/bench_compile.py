"""Compile seconds per cell of a tune-like grid: does a cell that changes only ε, nβ or γ compile again?

The quick preset's target (a ReLU MLP, d = 49, n = 1000), trained once; then, as `main.py tune`
runs its grid, each cell is a full `run_sampler` on the posterior with that cell's nβ and γ and
the sampler's settings with that cell's ε: 3 ε × 3 nβ × 3 γ for sgld, 3 nβ × 3 γ for hmc (it tunes
its own ε). Per cell: the runner's compile seconds (warm-up, burn-in and draw executables), the
cell's wall seconds, and the compile seconds relative to the first cell's. Everything in a cell
that differs from the first is a traced value, so every later cell should reuse the first one's
executables (target: compile ≤ 10% of the first cell's).

    uv run python scripts/bench_compile.py [--samplers sgld hmc] [--out results/speed/bench_compile.json]

JAX's persistent compilation cache is left off, so the first cell compiles cold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llc_bench.config import load_config  # noqa: E402
from llc_bench.experiment import build_posterior, run_sampler  # noqa: E402
from llc_bench.samplers import get_spec  # noqa: E402
from llc_bench.samplers.base import STEP_EPSILON  # noqa: E402
from llc_bench.target import build_target  # noqa: E402
from llc_bench.tune import TuneGrid  # noqa: E402

STEP_SIZES = (3e-6, 1e-5, 2e-5)  # around the quick preset's sgld ε = 1e-5 (stable below 3e-5)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_grid(cfg, target, name: str, step_sizes, n_betas, gammas) -> list[dict]:
    """One run_sampler per cell, γ outermost as in tune.grid_cells; the rows in running order."""
    posterior = build_posterior(cfg, target)
    tunes_step = get_spec(name).step_size == STEP_EPSILON
    rows = []
    for g in gammas:
        for nb in n_betas:
            for eps in step_sizes if tunes_step else (None,):
                settings = cfg.sampler[name]
                if eps is not None:
                    settings = dataclasses.replace(settings, step_size=eps)
                cell_post = dataclasses.replace(posterior, n_beta=float(nb), gamma=float(g))
                start = time.perf_counter()
                run = run_sampler(cfg, name, cell_post, settings=settings)
                wall = time.perf_counter() - start
                rows.append({"sampler": name, "step_size": eps, "n_beta": nb, "gamma": g,
                             "compile_s": run.result.compile_s, "sampling_s": run.result.wall_s,
                             "cell_wall_s": wall, "llc_mean": run.summary.get("llc_mean")})
                first = rows[0]["compile_s"]
                rows[-1]["compile_ratio"] = rows[-1]["compile_s"] / first if first > 0 else None
                print(f"{name:5s} ε={'tuned' if eps is None else f'{eps:.0e}':>6s} nβ={nb:<6g} γ={g:<6g} "
                      f"compile {rows[-1]['compile_s']:6.3f} s  ratio {rows[-1]['compile_ratio']:.3f}  "
                      f"cell {wall:5.2f} s", flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    later = [r["compile_ratio"] for r in rows[1:]]
    return {"cells": len(rows), "first_compile_s": rows[0]["compile_s"],
            "later_compile_s_total": sum(r["compile_s"] for r in rows[1:]),
            "later_compile_ratio_max": max(later) if later else None,
            "later_compile_ratio_median": sorted(later)[len(later) // 2] if later else None,
            "all_later_within_10pct": all(x <= 0.1 for x in later),
            "grid_wall_s": sum(r["cell_wall_s"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samplers", nargs="+", default=["sgld", "hmc"])
    parser.add_argument("--out", type=Path, default=Path("results/speed/bench_compile.json"))
    args = parser.parse_args()
    os.environ.setdefault("LLC_BENCH_JAX_CACHE", "off")
    cfg = load_config("quick", None, [])
    grid = TuneGrid()
    load_before = uptime()
    target = build_target(cfg)
    out = {"preset": "quick", "step_sizes": list(STEP_SIZES), "n_betas": list(grid.n_betas),
           "gammas": list(grid.gammas), "machine": platform.platform(), "cpus": os.cpu_count(),
           "uptime_before": load_before, "samplers": {}}
    for name in args.samplers:
        rows = run_grid(cfg, target, name, STEP_SIZES, grid.n_betas, grid.gammas)
        out["samplers"][name] = {"summary": summarize(rows), "cells": rows}
        print(json.dumps({name: out["samplers"][name]["summary"]}, indent=1))
    out["uptime_after"] = uptime()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"load: {load_before} -> {out['uptime_after']}; wrote {args.out}")


if __name__ == "__main__":
    main()
