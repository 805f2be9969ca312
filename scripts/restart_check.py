"""Restart a scoreboard instance's curvature_sgld chains from farther out and print what λ̂ reads.

    uv run python scripts/restart_check.py 1K-chained-013 --pre 1000 20 --scales 2 3 --burnin 3000 --draws 20
    uv run python scripts/restart_check.py 10K-chained-016 --carry CHECKPOINT_DIR/phase-0001-carry-0012.pkl \
        --scales 2 3 --burnin 5000 --draws 20
    uv run python scripts/restart_check.py 10K-chained-000 \
        --chains results/benchmarks/sg_curvature_target/final_chains/10K-chained-000-curvature_sgld-HASH.npy

The chains are either run from w* first (--pre BURNIN DRAWS, with the recipe's settings), taken
from a saved checkpoint of a scoreboard run (--carry: the carry file of a phase, whose first entry is
every chain's position), or from where a scoreboard row's chains stopped (--chains: the row's .npy
under final_chains/). Each is then restarted at w* + V Vᵀ δ + s (δ − V Vᵀ δ) for each scale s,
δ = w − w*, V the preconditioner's directions at w* (with --full: w* + s δ), and run --burnin steps
and --draws draws --k steps apart. Printed per run: λ̂ ± SE, λ̂ over five windows of its draws (a
restart still coming down, or still rising, shows there), ‖w − w*‖² per chain at the end, and the
step at which each chain diverged (−1: never); before the restarts, the share of ‖δ‖² outside V and
nβ (L_n − L_n(w*)) at each chain's start for a range of s. This is the measurement behind the
restart's scale cap for curvature_sgld (llc_bench.restart); nothing is written.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_instance import _config

from llc_bench.types import ConfigError

SAMPLER = "curvature_sgld"


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("instance", help="instance name, e.g. 1K-chained-013")
    parser.add_argument("--profile", default="sg_curvature_target", help="recipe profile (default sg_curvature_target)")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--carry", help="a checkpoint's phase-NNNN-carry-MMMM.pkl: the chains to restart")
    start.add_argument("--chains", help="a scoreboard row's final_chains/*.npy: the chains to restart")
    start.add_argument("--pre", type=int, nargs=2, metavar=("BURNIN", "DRAWS"),
                       help="run the chains from w* first, this many burn-in steps and draws")
    parser.add_argument("--scales", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--burnin", type=int, default=5000, help="burn-in steps of each restart")
    parser.add_argument("--draws", type=int, default=20, help="draws of each run")
    parser.add_argument("--k", type=int, default=300, help="steps between draws")
    parser.add_argument("--full", action="store_true", help="scale every direction, V's included")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _arguments(argv)
    if any(s <= 0 for s in args.scales) or min(args.burnin, args.draws, args.k) < 1:
        print("error: --scales must be > 0 and --burnin, --draws, --k at least 1", file=sys.stderr)
        return 2
    if args.carry and not os.path.isfile(args.carry):
        print(f"error: --carry {args.carry!r}: no such file (a checkpoint's phase-NNNN-carry-MMMM.pkl)", file=sys.stderr)
        return 2
    if args.chains and not (args.chains.endswith(".npy") and os.path.isfile(args.chains)):
        print(f"error: --chains {args.chains!r}: no such .npy file (a row's final_chains/*.npy)", file=sys.stderr)
        return 2
    if args.pre and (args.pre[0] < 0 or args.pre[1] < 1):
        print("error: --pre BURNIN DRAWS: BURNIN must be >= 0 and DRAWS at least 1", file=sys.stderr)
        return 2
    try:
        recipe, inst, cfg = _config(argparse.Namespace(instance=args.instance, spec=None, profile=args.profile,
                                                       sampler=SAMPLER, overrides=[]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.chains:
        try:
            saved = np.load(args.chains)
        except (OSError, ValueError) as exc:
            print(f"error: --chains {args.chains!r}: not a saved array ({exc})", file=sys.stderr)
            return 2
        if saved.ndim != 2 or saved.shape[1] != inst.d:
            print(f"error: --chains {args.chains!r}: positions of shape {saved.shape}, not (chains, {inst.d}) as "
                  f"{inst.name} needs", file=sys.stderr)
            return 2
    from llc_bench.bench import build_instance
    from llc_bench.curvature import build_algorithm
    from llc_bench.estimator import estimate_from_result
    from llc_bench.restart import restart_positions
    from llc_bench.rng import sampler_key
    from llc_bench.runner import full_data_loss, run_chains_with_state
    from llc_bench.samplers import get_spec

    _, _, post, _, record = build_instance(recipe, inst, SAMPLER, cfg=cfg)
    tic = time.perf_counter()
    algorithm = build_algorithm(get_spec(SAMPLER), post, cfg.sampler[SAMPLER])
    vectors = np.asarray(algorithm.binding.hyper.vectors)
    w_star = np.asarray(post.w_star)
    print(f"{inst.name}: d = {post.dim}, λ = {record.truth}, V {vectors.shape[1]} directions, "
          f"ε = {float(algorithm.binding.hyper.step_size):.3g} ({time.perf_counter() - tic:.0f} s)", flush=True)

    def run(starts, burnin, draws, label, seed):
        tic = time.perf_counter()
        result, states = run_chains_with_state(
            SAMPLER, algorithm, post, sampler_key(seed, SAMPLER, "restart"), num_chains=4, num_burnin_steps=burnin,
            num_draws=draws, num_steps_bw_draws=args.k, num_projections=0,
            initial_positions=None if starts is None else jnp.asarray(starts))
        est = estimate_from_result(result, "minibatch")
        loss = np.asarray(result.draw_loss)
        shift = est.mean / post.n_beta - np.nanmean(loss)  # windows on λ̂'s scale
        width = max(1, loss.shape[1] // 5)
        windows = [post.n_beta * (np.nanmean(loss[:, i:i + width]) + shift) for i in range(0, loss.shape[1], width)]
        positions = np.asarray(jax.vmap(algorithm.position)(states))
        print(f"  {label}: λ̂ = {est.mean:.2f} ± {est.se:.2f}; windows {np.round(windows, 1)}; "
              f"‖w − w*‖² {np.round(np.sum((positions - w_star) ** 2, axis=1), 3)}; "
              f"diverged at {np.asarray(result.diverged_at)} ({time.perf_counter() - tic:.0f} s)", flush=True)
        return positions

    if args.carry:
        with open(args.carry, "rb") as fh:
            positions = np.asarray(pickle.load(fh)[0])
    elif args.chains:
        positions = saved
    else:
        positions = run(None, args.pre[0], args.pre[1], f"from w* ({args.pre[0]} + {args.pre[1]} draws)", 1)
    offset = positions - w_star
    stiff = np.broadcast_to(vectors, (positions.shape[0],) + vectors.shape)
    kept = np.asarray(restart_positions(post.w_star, positions, 0.0, stiff)) - w_star  # the part in V, kept at any s
    print(f"  share of ‖w − w*‖² outside V: {np.round(np.sum((offset - kept) ** 2, 1) / np.sum(offset ** 2, 1), 4)}")
    base = float(full_data_loss(post, jnp.asarray(w_star)[None], post.x, post.y)[0])
    for s in (1.0, 1.5, 2.0, 3.0, 5.0, 10.0):
        starts = restart_positions(post.w_star, positions, s, None if args.full else stiff)
        rise = post.n_beta * (np.asarray(full_data_loss(post, starts, post.x, post.y)) - base)
        print(f"  start at s = {s:g}: nβ (L_n − L_n(w*)) per chain {np.round(rise, 1)}", flush=True)
    for s in args.scales:
        starts = restart_positions(post.w_star, positions, s, None if args.full else stiff)
        run(starts, args.burnin, args.draws, f"restart s = {s:g}{' (every direction)' if args.full else ''}",
            int(100 + 10 * s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
