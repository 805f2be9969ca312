"""Where a `curvature_sgld` step's time goes on a scoreboard instance: the gradient against applying P.

    uv run python scripts/bench_curvature_step.py 10K-chained-006 [--ranks 0 256 1024] [--chains 4]
        [--steps 200] [--repeats 3] [--out results/bench/curvature_step.json]

curvature_sgld's step is w ← w − ε/2 P∇U + √ε P^{1/2} η with P = I + V diag(s − 1) Vᵀ, V of shape
(d, k) and one V per chain (each chain's P is rebuilt where it is after burn-in). For the instance's
own posterior (the `sg_curvature_target` recipe: n, batch size, d), this times `--steps` steps of
the sampler's step function, all chains vmapped in one jitted lax.scan, with a random orthonormal V
of each `--ranks` k (k = 0: P = I, the gradient and the noise alone). The cost depends on d, k and
the chains, not on which directions V holds. Best of `--repeats`, compilation excluded. Prints ms
per step (all chains) and its ratio to k = 0, the bytes of V read per step, and the 1-minute load;
writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llc_bench.bench import build_posteriors  # noqa: E402
from llc_bench.bench_suite import instance_config, load_recipe, make_suite  # noqa: E402
from llc_bench.samplers.curvature_sgld import CurvatureParams, CurvatureSGLDSettings, make  # noqa: E402
from llc_bench.target import build_target  # noqa: E402
from llc_bench.types import ConfigError  # noqa: E402

SAMPLER = "curvature_sgld"


def _arguments(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("instance", help="scoreboard instance, e.g. 10K-chained-006")
    p.add_argument("--profile", default="sg_curvature_target", help="recipe profile (default sg_curvature_target)")
    p.add_argument("--ranks", type=int, nargs="+", default=[0, 256, 1024], help="k, directions in V")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/bench/curvature_step.json")
    return p.parse_args(argv)


def _posterior(args):
    """(posterior, batch size) of the instance under the recipe, or ConfigError naming the bad
    argument (k above d is known once the posterior is built), before any timing."""
    for name in ("chains", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if any(k < 0 for k in args.ranks):
        raise ConfigError(f"--ranks: each must be >= 0, got {args.ranks}")
    recipe = load_recipe(None, profile=args.profile)
    suite = {inst.name: inst for inst in make_suite(recipe.classes, recipe.suite_seed, recipe.generators,
                                                    recipe.size_classes)}
    if args.instance not in suite:
        raise ConfigError(f"instance {args.instance!r}: not in this recipe's suite (e.g. {next(iter(suite))})")
    cfg = instance_config(recipe, suite[args.instance], SAMPLER)
    posterior = build_posteriors(cfg, build_target(cfg), "data")[0]  # the SG samplers' (the n rows)
    d = posterior.w_star.shape[0]
    if max(args.ranks) > d:
        raise ConfigError(f"--ranks: each must be <= d = {d} of {args.instance}, got {args.ranks}")
    return posterior, cfg.sampler[SAMPLER].batch_size


def _steps_function(posterior, batch_size: int, k: int, chains: int, steps: int):
    """(jitted fn(key, positions, params) -> positions, params): `steps` vmapped steps under a random
    orthonormal V of k columns."""
    d, dtype = posterior.w_star.shape[0], posterior.w_star.dtype
    vectors = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (d, k), dtype))[0] if k else jnp.zeros((d, 0), dtype)
    scales = jnp.full((k,), 0.5, dtype)
    step_size = 1e-8  # the timing does not depend on it
    algorithm = make(posterior, CurvatureSGLDSettings(step_size=step_size, batch_size=batch_size),
                     CurvatureParams(step_size, vectors, scales))
    params = CurvatureParams(jnp.full((chains,), step_size, dtype), jnp.broadcast_to(vectors, (chains, d, k)),
                             jnp.broadcast_to(scales, (chains, k)))
    step = jax.vmap(algorithm.step, in_axes=(0, 0, 0, None))

    def run(key, positions, params):
        def body(state, key):
            batch_key, step_key = jax.random.split(key)
            rows = jax.random.randint(batch_key, (batch_size,), 0, posterior.n)
            return step(jax.random.split(step_key, chains), state, params, (posterior.x[rows], posterior.y[rows]))[0], None

        return jax.lax.scan(body, positions, jax.random.split(key, steps))[0]

    return jax.jit(run), params


def main(argv=None) -> int:
    args = _arguments(argv)
    try:
        posterior, batch_size = _posterior(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    d = int(posterior.w_star.shape[0])
    positions = jnp.broadcast_to(posterior.w_star, (args.chains, d))
    rows = []
    for k in args.ranks:
        fn, params = _steps_function(posterior, batch_size, k, args.chains, args.steps)
        jax.block_until_ready(fn(jax.random.key(0), positions, params))  # compile + warm
        best = float("inf")
        for r in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(jax.random.key(r + 1), positions, params))
            best = min(best, (time.perf_counter() - start) / args.steps)
        rows.append({"instance": args.instance, "d": d, "k": k, "chains": args.chains, "batch_size": batch_size,
                     "ms_per_step": best * 1e3, "v_bytes_read_per_step": 2 * args.chains * d * k * positions.itemsize})
    base = next((r["ms_per_step"] for r in rows if r["k"] == 0), None)
    load = round(os.getloadavg()[0], 2)
    print(f"{args.instance}: d = {d}, {args.chains} chains, batch {batch_size}, best of {args.repeats} x "
          f"{args.steps} steps; load {load} ({os.cpu_count()} CPUs, {jax.default_backend()})")
    for r in rows:
        r.update(ratio_to_k0=None if base is None else r["ms_per_step"] / base, loadavg_1min=load,
                 backend=jax.default_backend(), machine=platform.machine())
        ratio = "" if base is None else f"  {r['ratio_to_k0']:6.1f}x k=0"
        print(f"  k = {r['k']:5d}: {r['ms_per_step']:8.2f} ms/step{ratio}  "
              f"(V read: {r['v_bytes_read_per_step'] / 1e6:.0f} MB/step)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
