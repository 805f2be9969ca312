"""Throughput of the SG samplers' vmapped chain step against a bare jitted value_and_grad (the hardware limit).

For a ~10k-parameter ReLU MLP (input 32, two hidden layers, bias) on batches of 256: µs per
chain-step of `sgld` and `rmsprop_sgld` run by llc_bench.runner (all chains vmapped in one jitted
lax.scan; compile excluded, the runner's own wall clock), against µs per call of
jax.jit(jax.value_and_grad(L_m)) for one parameter vector on one batch of the same loss: the work a
chain-step cannot avoid. Also recorded: a vmapped bare gradient over the same number of chains
(per chain), which is what batching alone gives.

    uv run python scripts/bench_throughput.py [--chains 4 16 64] [--out results/bench/throughput.json]

Prints a table and writes JSON rows {sampler, chains, us_per_chain_step, us_bare_grad, ratio, ...}.
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

from llc_bench.config import from_dict  # noqa: E402
from llc_bench.curvature import build_algorithm  # noqa: E402
from llc_bench.experiment import build_posterior  # noqa: E402
from llc_bench.models import hidden_widths_for_target  # noqa: E402
from llc_bench.rng import sampler_key  # noqa: E402
from llc_bench.runner import run_chains  # noqa: E402
from llc_bench.samplers import get_spec  # noqa: E402
from llc_bench.target import build_target  # noqa: E402

IN_DIM, OUT_DIM, TARGET_PARAMS, DEPTH = 32, 1, 10_000, 2


def build(batch_size: int, n: int):
    hidden = list(hidden_widths_for_target(IN_DIM, OUT_DIM, TARGET_PARAMS, DEPTH, True))
    cfg = from_dict({
        "data": {"n": n, "in_dim": IN_DIM, "out_dim": OUT_DIM},
        "teacher": {"kind": "mlp", "widths": hidden, "activation": "relu", "bias": True},
        "model": {"widths": hidden, "target_params": "none", "activation": "relu", "bias": True},
        "train": {"use_teacher": True},  # w* = the teacher: no training needed for a timing
        "run": {"samplers": ["sgld", "rmsprop_sgld"]},
        "sampler": {"sgld": {"batch_size": batch_size, "step_size": 1e-6},
                    "rmsprop_sgld": {"batch_size": batch_size, "step_size": 1e-6}},
    })
    target = build_target(cfg)
    return cfg, target, build_posterior(cfg, target)


def time_calls(fn, *args, calls: int, repeats: int) -> float:
    """Best over `repeats` of the mean seconds per call over `calls` back-to-back calls."""
    jax.block_until_ready(fn(*args))  # compile + warm
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def bare_grad_us(posterior, batch_size: int, chains: int, repeats: int) -> tuple[float, float]:
    """(µs per value_and_grad call for one parameter vector, µs per chain of a vmapped call over `chains`)."""
    key = jax.random.key(0)
    idx = jax.random.randint(key, (chains, batch_size), 0, posterior.n)
    xb, yb = posterior.x[idx], posterior.y[idx]  # (C, m, ...)
    w = posterior.w_star + 1e-3 * jax.random.normal(key, (chains, posterior.dim))
    single = jax.jit(jax.value_and_grad(posterior.batch_loss))
    one = time_calls(single, w[0], xb[0], yb[0], calls=200, repeats=repeats)
    batched = jax.jit(jax.vmap(jax.value_and_grad(posterior.batch_loss)))
    many = time_calls(batched, w, xb, yb, calls=max(10, 400 // chains), repeats=repeats)
    return 1e6 * one, 1e6 * many / chains


def breakdown_us(posterior, batch_size: int, chains: int, steps: int, repeats: int) -> dict[str, float]:
    """µs per chain-step of stripped-down vmapped scans, to see where the runner's time goes.

    grad:   value_and_grad on a fixed batch + a tiny SGD update (so the loop cannot be hoisted)
    gather: + per-step fold_in, randint indices and the minibatch gather (the runner's batch stream)
    noise:  + a fold_in and d standard normals per step (SGLD's injected noise; threefry on CPU)
    """
    x, y, n, d = posterior.x, posterior.y, posterior.n, posterior.dim
    vg = jax.value_and_grad(posterior.batch_loss)
    base = jax.random.key(0)
    keys = jax.vmap(lambda c: jax.random.fold_in(base, c))(jnp.arange(chains))
    idx = jax.random.randint(base, (chains, batch_size), 0, n)
    xb0, yb0 = x[idx], y[idx]
    w0 = jnp.broadcast_to(posterior.w_star, (chains, d)) + 0.0

    def variant(level):
        def one(key, w, t, xb, yb):
            if level >= 1:
                i = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, n)
                xb, yb = x[i], y[i]
            loss, g = vg(w, xb, yb)
            w = w - 1e-9 * g
            if level >= 2:
                w = w + 1e-6 * jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), t), w.shape)
            return w, loss

        @jax.jit
        def run(w):
            def body(w, t):
                return jax.vmap(one, in_axes=(0, 0, None, 0, 0))(keys, w, t, xb0, yb0)
            return jax.lax.scan(body, w, jnp.arange(steps))

        return run

    out = {}
    for level, name in enumerate(("grad", "gather", "noise")):
        out[f"us_scan_{name}"] = round(1e6 * time_calls(variant(level), w0, calls=1, repeats=repeats)
                                       / (steps * chains), 2)
    return out


def chain_step_us(cfg, posterior, name: str, chains: int, steps: int, repeats: int) -> float:
    """µs per chain-step of the runner's jitted scan (its wall_s: compile and host copies excluded)."""
    algorithm = build_algorithm(get_spec(name), posterior, cfg.sampler[name])
    best = float("inf")
    for _ in range(repeats):
        # One burn-in chunk of `steps` steps and a single 1-step draw block: the draw's full-data
        # loss (n rows, once) is a negligible part of wall_s.
        result = run_chains(name, algorithm, posterior, sampler_key(0, name), num_chains=chains,
                            num_burnin_steps=steps, num_draws=1, num_steps_bw_draws=1,
                            num_projections=1, chunk_size=steps, progress=False)
        if (result.diverged_at >= 0).any():
            raise RuntimeError(f"{name}: a chain diverged during the timing run")
        best = min(best, result.wall_s / ((steps + 1) * chains))
    return 1e6 * best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chains", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--samplers", nargs="+", default=["sgld", "rmsprop_sgld"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n", type=int, default=8192, help="training samples (minibatches are drawn from them)")
    p.add_argument("--chain-steps", type=int, default=16_000, help="steps x chains per timing run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/bench/throughput.json")
    args = p.parse_args(argv)

    cfg, target, posterior = build(args.batch_size, args.n)
    device = jax.devices()[0]
    print(f"MLP widths {target.widths}, d = {posterior.dim}, batch {args.batch_size}, n = {args.n}; "
          f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPUs visible, jax {jax.__version__}")
    rows = []
    for chains in args.chains:
        bare, bare_vmapped = bare_grad_us(posterior, args.batch_size, chains, args.repeats)
        steps = max(50, args.chain_steps // chains)
        parts = breakdown_us(posterior, args.batch_size, chains, steps, args.repeats)
        for name in args.samplers:
            us = chain_step_us(cfg, posterior, name, chains, steps, args.repeats)
            rows.append({"sampler": name, "chains": chains, "us_per_chain_step": round(us, 2),
                         "us_bare_grad": round(bare, 2), "ratio": round(us / bare, 3),
                         "us_bare_grad_vmapped": round(bare_vmapped, 2),
                         "ratio_vs_vmapped": round(us / bare_vmapped, 3), **parts, "steps": steps})
    header = f"{'sampler':14s} {'chains':>6s} {'µs/chain-step':>14s} {'µs bare grad':>13s} {'ratio':>6s} " \
             f"{'µs vmapped grad':>16s} {'ratio':>6s}"
    print(header + f" {'scan: grad':>10s} {'+gather':>8s} {'+noise':>7s}")
    for r in rows:
        print(f"{r['sampler']:14s} {r['chains']:6d} {r['us_per_chain_step']:14.1f} {r['us_bare_grad']:13.1f} "
              f"{r['ratio']:6.2f} {r['us_bare_grad_vmapped']:16.1f} {r['ratio_vs_vmapped']:6.2f} "
              f"{r['us_scan_grad']:10.1f} {r['us_scan_gather']:8.1f} {r['us_scan_noise']:7.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"loadavg_1min": round(os.getloadavg()[0], 2), "d": int(posterior.dim), "widths": list(target.widths), "batch_size": args.batch_size,
            "n": args.n, "platform": device.platform, "device_kind": device.device_kind,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    # A list of records, one per (sampler, chains); each carries the machine it was measured on.
    out.write_text(json.dumps([{**r, **meta} for r in rows], indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
