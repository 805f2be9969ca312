"""What a running (or stopped) scoreboard job has drawn so far, read from its checkpoints.

    uv run python scripts/bench_progress.py 10K-chained-000 --profile sg_curvature_target
    uv run python scripts/bench_progress.py 1K-chained-003 --profile sg_curvature_target --window 10

A scoreboard row that takes hours says nothing until it lands. Its chains are saved chunk by chunk
(llc_bench.checkpoint) under checkpoints/ beside the CSV; this reads them. Per saved phase: chunks
done of all, steps, seconds of sampling; for each phase that draws, over its draws so far: λ̂ =
nβ · (mean full-data L_n − L_n(w*)), the full-data estimate of llc_bench.estimator, per chain and
over windows of --window draws, and the chains' mean ‖w − w*‖² per window. λ̂ still moving across
the windows while the spread grows is what the run's drift test will judge at the end of the phase.
The instance is built (for L_n(w*) and nβ); nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from bench_instance import _config

from llc_bench.types import ConfigError

DRAW_OUTPUTS = 6  # a draw phase's chunk: (step infos, full-data L_n, projections, ‖w − w*‖², draw_fn, full_draw_fn)


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("instance", help="instance name, e.g. 10K-chained-000")
    parser.add_argument("--profile", default=None, help="recipe profile (e.g. sg_curvature_target)")
    parser.add_argument("--spec", default=None, help="recipe TOML (default: the shipped one)")
    parser.add_argument("--sampler", default=None, help="whose job (default: the recipe's only sampler)")
    parser.add_argument("--out", default=None, help="the scoreboard's folder (default: the recipe's bench.out)")
    parser.add_argument("--window", type=int, default=20, help="draws per window (default 20)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _arguments(argv)
    if args.window < 1:
        print("error: --window must be at least 1", file=sys.stderr)
        return 2
    try:
        from llc_bench.bench_suite import load_recipe
        samplers = load_recipe(args.spec, profile=args.profile).samplers
        sampler = args.sampler or (samplers[0] if len(samplers) == 1 else None)
        if sampler is None:
            raise ConfigError(f"--sampler: the recipe runs {', '.join(samplers)}; name one")
        if sampler not in samplers:
            raise ConfigError(f"--sampler {sampler!r}: not in this recipe's samplers ({', '.join(samplers)})")
        recipe, inst, cfg = _config(argparse.Namespace(instance=args.instance, spec=args.spec, profile=args.profile,
                                                       sampler=sampler, overrides=[]))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from llc_bench.bench import CHECKPOINTS, build_instance, checkpoint_folder
    from llc_bench.checkpoint import saved_outputs, saved_records

    folder = checkpoint_folder(Path(args.out or recipe.out) / CHECKPOINTS, inst, sampler, recipe)
    phases = saved_records(folder)
    if not phases:
        print(f"{inst.name} {sampler}: nothing saved in {folder} (not started, or its row has landed)")
        return 0
    import jax.numpy as jnp

    from llc_bench.bench_suite import full_batch
    from llc_bench.runner import full_data_loss

    _, _, data_post, reduced_post, _ = build_instance(recipe, inst, sampler, cfg=cfg)
    post = reduced_post if full_batch(sampler) else data_post
    base = float(full_data_loss(post, jnp.asarray(post.w_star)[None], post.x, post.y)[0])
    print(f"{inst.name} {sampler} (d = {inst.d}, λ = {inst.aoyagi:g}): {folder}")
    for index, record in phases:
        chunks = saved_outputs(folder, index, record["done"])
        head = (f"  phase {index}: {record['done']}/{record['count']} chunks, {record['steps']} steps, "
                f"{record['seconds']:.0f} s of sampling")
        if not chunks or len(chunks[0]) != DRAW_OUTPUTS:
            print(head + " (burn-in)")
            continue
        loss = np.concatenate([c[1] for c in chunks])  # (draws, chains)
        spread = np.concatenate([c[3] for c in chunks])
        draws = min(loss.shape[0], record["steps"] // record["steps_per_item"])  # the last chunk may be padded
        per_chain = post.n_beta * (np.nanmean(loss[:draws], axis=0) - base)
        windows = [post.n_beta * (np.nanmean(loss[i:min(i + args.window, draws)]) - base)
                   for i in range(0, draws, args.window)]
        spreads = [float(np.nanmean(spread[i:min(i + args.window, draws)])) for i in range(0, draws, args.window)]
        print(head + f", {draws} draws: λ̂ = {np.nanmean(per_chain):.2f} (per chain "
              f"{', '.join(f'{v:.1f}' for v in per_chain)})")
        print(f"    λ̂ by {args.window} draws: {', '.join(f'{v:.1f}' for v in windows)}")
        print(f"    ‖w − w*‖² by {args.window} draws: {', '.join(f'{v:.4g}' for v in spreads)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
