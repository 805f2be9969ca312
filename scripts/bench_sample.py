"""Time `sample()` end to end against the runner's bare SG scan and a bare value_and_grad, on one DLN, in one run.

The model: a deep linear network with widths 32-72-72-32 (d = 9,792, no biases) at its teacher w*,
n = 10,000 inputs x ~ N(0, I), y = teacher(x) + N(0, I), per-sample loss ½‖f(x) − y‖², batch 256,
nβ = n / log n, γ = 100, ε = 1e-5, 2,000 steps per chain of which 500 burn-in.

Timed in interleaved rounds (the load of a shared machine drifts), best of --repeats rounds after an
untimed one (compile and imports excluded; the persistent compilation cache is on):

- sample() with one draw per step (num_draws = 1,500) and one per 10 steps (150), for each chain
  count: the whole call, tree included, with the default schedules (per-step loss every step,
  full-data L_n about every 4 n/m steps), and compute_llc on its result (also recorded: the
  per-step λ̂ beside the full-data one);
- the runner's bare SG scan: run_chains with every step in one burn-in chunk and a single draw
  (llc_bench.runner's own wall clock, compile excluded);
- a bare jax.jit(jax.value_and_grad(L_m)) on one batch of 256 for one parameter vector
  (scripts/bench_throughput.py's timing loop);
- the per-step Gaussian noise drawn in several ways (`noise_variants`).

    uv run python scripts/bench_sample.py [--chains 4 16] [--repeats 2] [--out results/speed/bench_sample.json]

Prints a table with the three target ratios and writes JSON (one record per chain count plus the
machine). Targets: sample() at one draw per step <= 1.15 x at one draw per 10 steps; sample() per
chain-step <= 1.2 x the bare SG scan; SGLD chain-step of the bare scan <= 1.3 x the bare
value_and_grad.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_throughput import time_calls  # noqa: E402

from llc_bench.jaxcache import enable_compilation_cache  # noqa: E402
from llc_bench.sampling import (  # noqa: E402
    Restriction,
    SamplingPosterior,
    _sampler_settings,
    compute_llc,
    sample,
)

WIDTHS = (32, 72, 72, 32)
N, BATCH, GAMMA, LR, STEPS, BURNIN = 10_000, 256, 100.0, 1e-5, 2_000, 500


def apply_fn(params, x):
    for name in sorted(params):
        x = x @ params[name]
    return x


def loss_fn(apply_fn, params, x, y):
    return 0.5 * jnp.sum((apply_fn(params, x) - y) ** 2, axis=-1)


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = {f"w{i}": jnp.asarray(rng.normal(size=(a, b)) / math.sqrt(a), jnp.float32)
              for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:], strict=True))}
    x = jnp.asarray(rng.normal(size=(N, WIDTHS[0])), jnp.float32)
    y = apply_fn(params, x) + jnp.asarray(rng.normal(size=(N, WIDTHS[-1])), jnp.float32)
    return params, x, y


def sample_call(params, x, y, chains: int, k: int):
    """One timed sample() + compute_llc call: (seconds, tree, LLCResult)."""
    start = time.perf_counter()
    tree = sample(apply_fn, params, loss_fn, (x, y), lr=LR, n_beta=N / math.log(N), localization=GAMMA,
                  num_chains=chains, num_draws=(STEPS - BURNIN) // k, num_steps_bw_draws=k,
                  num_burnin_steps=BURNIN, batch_size=BATCH, seed=0, progress=False)
    llc = compute_llc(tree)
    return time.perf_counter() - start, tree, llc


def sample_record(seconds: float, chains: int, tree, llc) -> dict:
    per_step = compute_llc(tree, source="minibatch")
    return {"s": seconds, "us_per_chain_step": 1e6 * seconds / (chains * STEPS),
            "full_loss_every": tree.attrs["options"]["full_loss_every"],
            "num_full_draws": int(tree.sizes["full_draw"]), "llc_full": llc.llc_mean, "se_full": llc.llc_se,
            "status": llc.status, "llc_per_step": per_step.llc_mean, "se_per_step": per_step.llc_se,
            "se_per_step_batch_means": per_step.estimate.se_batch_means, "status_per_step": per_step.status}


def scan_call(posterior, algorithm, chains: int) -> float:
    """Seconds of the runner's SG scan alone: STEPS − 1 burn-in steps in one chunk and one draw
    (the runner's own wall clock: compile and host copies excluded)."""
    from llc_bench.rng import sampler_key
    from llc_bench.runner import run_chains

    result = run_chains("sgld", algorithm, posterior, sampler_key(0, "sgld"), num_chains=chains,
                        num_burnin_steps=STEPS - 1, num_draws=1, num_steps_bw_draws=1, num_projections=1,
                        chunk_size=STEPS, progress=False)
    return result.wall_s


def compare(params, x, y, chains: int, repeats: int) -> dict:
    """The bare scan and sample() at k = 1 and 10, interleaved in rounds (the load drifts): best of each."""
    posterior, algorithm = build_sgld(params, x, y)
    best = {"scan": math.inf, 1: math.inf, 10: math.inf}
    last = {}
    for round_ in range(repeats + 1):  # round 0 compiles and warms up, untimed
        seconds = scan_call(posterior, algorithm, chains)
        if round_:
            best["scan"] = min(best["scan"], seconds)
        for k in (1, 10):
            seconds, tree, llc = sample_call(params, x, y, chains, k)
            last[k] = (tree, llc)
            if round_:
                best[k] = min(best[k], seconds)
    every_step = sample_record(best[1], chains, *last[1])
    every_10 = sample_record(best[10], chains, *last[10])
    scan_us = 1e6 * best["scan"] / (chains * STEPS)
    return {"chains": chains, "us_bare_scan": scan_us, "sample_k1": every_step, "sample_k10": every_10,
            "ratio_k1_over_k10": every_step["s"] / every_10["s"],
            "ratio_sample_k1_over_scan": every_step["us_per_chain_step"] / scan_us,
            "ratio_sample_k10_over_scan": every_10["us_per_chain_step"] / scan_us}


def build_sgld(params, x, y):
    restriction = Restriction.build(params, None)

    def per_sample_loss(w, xb, yb):
        return loss_fn(apply_fn, restriction.params(w), xb, yb)

    loss_at_wstar = float(jnp.mean(per_sample_loss(restriction.w_star, x, y)))
    posterior = SamplingPosterior(per_sample_loss, x, y, restriction.w_star, N / math.log(N), GAMMA, loss_at_wstar)
    spec, settings = _sampler_settings("sgld", lr=LR, batch_size=BATCH, accumulation=1, noise_level=1.0, kwargs={},
                                       aliased={})
    return posterior, spec.build(posterior, settings)


def bare_grad(params, x, y, repeats: int) -> float:
    """µs per call of jax.jit(jax.value_and_grad(L_m)) for one parameter vector on one batch."""
    posterior, _ = build_sgld(params, x, y)
    idx = jax.random.randint(jax.random.key(0), (BATCH,), 0, N)
    w = posterior.w_star + 1e-3 * jax.random.normal(jax.random.key(1), (posterior.dim,))
    grad = jax.jit(jax.value_and_grad(posterior.batch_loss))
    return 1e6 * time_calls(grad, w, x[idx], y[idx], calls=300, repeats=repeats + 1)


def noise_variants(params, x, y, chains: int, repeats: int, steps: int = 400) -> dict[str, float]:
    """µs per chain-step of a vmapped scan of value_and_grad + minibatch gather + an SGD-like update,
    with the step's d standard normals drawn in different ways (all with the same law):

    no noise                 the floor: what the noise costs is the difference to it
    threefry                 jax.random.normal with the default key (what the samplers do)
    threefry, not partitionable   the same generator with jax_threefry_partitionable off (at trace time
                             only): another bit layout, so another stream
    rbg, unsafe_rbg          XLA's RngBitGenerator key implementations
    threefry, 10 steps at once    one normal call per 10 steps, consumed step by step
    """
    posterior, _ = build_sgld(params, x, y)
    d = posterior.dim
    value_and_grad = jax.value_and_grad(posterior.batch_loss)
    w0 = jnp.broadcast_to(posterior.w_star, (chains, d)) + 0.0

    def build(impl="threefry2x32", chunk=1, noise=True, partitionable=None):
        base = jax.random.key(0, impl=impl)
        keys = jax.vmap(lambda c: jax.random.fold_in(base, c))(jnp.arange(chains))

        def step(key, w, t, z):
            idx = jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, 2), t), (BATCH,), 0, N)
            loss, g = value_and_grad(w, x[idx], y[idx])
            if noise and z is None:
                z = jax.random.normal(jax.random.fold_in(key, t), w.shape)
            return (w - 1e-9 * g + (1e-6 * z if noise else 0.0)), loss

        def run(w):
            if chunk == 1:
                return jax.lax.scan(lambda w, t: jax.vmap(step, in_axes=(0, 0, None, None))(keys, w, t, None),
                                    w, jnp.arange(steps))

            def outer(w, j):
                zz = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, j), (chunk, d)))(keys)
                return jax.lax.scan(lambda w, iz: jax.vmap(step, in_axes=(0, 0, None, 0))(keys, w, j * chunk + iz[0],
                                                                                           iz[1]),
                                    w, (jnp.arange(chunk), jnp.swapaxes(zz, 0, 1)))

            return jax.lax.scan(outer, w, jnp.arange(steps // chunk))

        if partitionable is None:
            return jax.jit(run).lower(w0).compile()
        with jax.threefry_partitionable(partitionable):
            return jax.jit(run).lower(w0).compile()

    variants = {"no noise": build(noise=False), "threefry": build(),
                "threefry, not partitionable": build(partitionable=False), "rbg": build("rbg"),
                "unsafe_rbg": build("unsafe_rbg"), "threefry, 10 steps at once": build(chunk=10)}
    best = dict.fromkeys(variants, math.inf)
    for fn in variants.values():
        jax.block_until_ready(fn(w0))
    for _ in range(repeats + 1):  # interleaved: the load drifts
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(w0))
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1e6 * seconds / (steps * chains) for name, seconds in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chains", type=int, nargs="+", default=[4, 16])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--noise-chains", type=int, default=4, help="chains for the noise variants (0: skip them)")
    p.add_argument("--out", default="results/speed/bench_sample.json")
    args = p.parse_args(argv)

    enable_compilation_cache()
    params, x, y = problem()
    device = jax.devices()[0]
    load_before = os.getloadavg()[0]
    print(f"DLN {WIDTHS}, n = {N}, batch {BATCH}, {STEPS} steps ({BURNIN} burn-in); {device.platform}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}, load {load_before:.2f}")
    grad_us = bare_grad(params, x, y, args.repeats)
    rows = []
    for chains in args.chains:
        r = compare(params, x, y, chains, args.repeats)
        r.update(us_bare_grad=grad_us, ratio_scan_over_grad=r["us_bare_scan"] / grad_us)
        rows.append(r)
        k1, k10 = r["sample_k1"], r["sample_k10"]
        print(f"{chains:3d} chains: sample() k=1 {k1['s']:.2f} s, k=10 {k10['s']:.2f} s "
              f"(ratio {r['ratio_k1_over_k10']:.3f}, target <= 1.15); per chain-step k=1 "
              f"{k1['us_per_chain_step']:.0f} µs, k=10 {k10['us_per_chain_step']:.0f} µs, bare scan "
              f"{r['us_bare_scan']:.0f} µs (ratios {r['ratio_sample_k1_over_scan']:.3f}, "
              f"{r['ratio_sample_k10_over_scan']:.3f}; target <= 1.2); bare value_and_grad {grad_us:.0f} µs "
              f"(scan/grad {r['ratio_scan_over_grad']:.3f}, target <= 1.3)", flush=True)
        print(f"           λ̂ per step {k1['llc_per_step']:.1f} ± {k1['se_per_step']:.1f}; "
              f"full-data ({k1['num_full_draws']} draws/chain) {k1['llc_full']:.1f} ± {k1['se_full']:.1f}",
              flush=True)
    noise = noise_variants(params, x, y, args.noise_chains, args.repeats) if args.noise_chains else {}
    for name, us in noise.items():
        print(f"noise variant {name:32s} {us:7.1f} µs per chain-step ({args.noise_chains} chains)")
    meta = {"load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2),
            "widths": list(WIDTHS), "d": int(sum(a * b for a, b in zip(WIDTHS[:-1], WIDTHS[1:], strict=True))),
            "n": N, "batch_size": BATCH, "steps": STEPS, "burnin": BURNIN, "lr": LR, "gamma": GAMMA,
            "n_beta": N / math.log(N), "platform": device.platform, "device_kind": device.device_kind,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
            "repeats": args.repeats}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "noise_us_per_chain_step": noise}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
