"""Chain runner: all chains vmapped in one jitted lax.scan, run in chunks with a host-side progress bar."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llc_bench.checkpoint import active as active_checkpoints
from llc_bench.compiled import as_arrays as _as_arrays
from llc_bench.compiled import clear_executables  # noqa: F401 - part of the runner's interface
from llc_bench.compiled import compile_once as _compile
from llc_bench.compiled import shared_executables as _shared_executables
from llc_bench.posterior import Posterior
from llc_bench.progress import Bar, progress_enabled
from llc_bench.samplers.base import Algorithm, StepInfo, current_binding, rebind
from llc_bench.types import ChainResult

# --------------------------------------------------------------------------------------------
# Running chains
# --------------------------------------------------------------------------------------------

_AUTO_CHUNKS = 20  # chunk_size=0: about this many host round trips (progress updates) per phase


# draw_fn(position (d,), chain_index (), draw_index (), draw_data) -> pytree of arrays. A full_draw_fn
# with the attribute reads_state = True is called as fn(state, chain_index, draw_index, draw_data,
# params, posterior) instead: one chain's sampler state and tuned parameters, and the posterior.
DrawFn = Callable[[jax.Array, jax.Array, jax.Array, Any], Any]


class _Carry(NamedTuple):
    """Per-chain loop state, leading axis = chains."""

    state: Any  # the sampler's state pytree (C, ...)
    diverged_at: jax.Array  # (C,) int32, -1 while the chain is finite


class _Consts(NamedTuple):
    """Arrays every chunk reads, passed as arguments (not closed over) so they are not baked into the executable."""

    step_keys: jax.Array  # (C,) ChainKeys.step
    batch_keys: jax.Array  # (C,) ChainKeys.batch
    params: Any  # tuned parameters, leading axis = chains
    posterior: Posterior  # the pytree: data, w*, nβ, γ as arrays
    hyper: Any  # the algorithm's Binding.hyper (() without a binding)
    directions: jax.Array  # (d, P) random unit columns
    chain_index: jax.Array  # (C,) int32 0..C-1, for draw_fn
    draw_data: Any  # run_chains' draw_data pytree (None without one)


class ChainKeys(NamedTuple):
    """Independent key streams, all derived from one key by fold_in."""

    warmup: jax.Array  # (C,) one per chain
    step: jax.Array  # (C,) per-chain base of the sampler's noise; step t uses fold_in(step[c], t)
    batch: jax.Array  # (C,) per-chain base of the minibatch indices; step t uses fold_in(batch[c], t)
    projection: jax.Array  # one key for the projection directions shared by all chains


def chain_keys(rng_key: jax.Array, num_chains: int) -> ChainKeys:
    """Chain c's keys depend only on (rng_key, c): adding chains never changes the existing ones."""
    chains_root = jax.random.fold_in(rng_key, 0)
    per_chain = jax.vmap(lambda c: jax.random.fold_in(chains_root, c))(jnp.arange(num_chains))
    stream = [jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(per_chain) for i in range(3)]
    return ChainKeys(*stream, jax.random.fold_in(rng_key, 1))


def random_directions(rng_key: jax.Array, dim: int, num: int, dtype=jnp.float32) -> jax.Array:
    """(dim, num) matrix of independent uniformly random unit columns (shared by all chains)."""
    g = jax.random.normal(rng_key, (dim, num), dtype)
    return g / jnp.linalg.norm(g, axis=0, keepdims=True)


def chunk_plan(total: int, target: int) -> tuple[int, int]:
    """(length, count): `count` chunks of equal `length` covering `total` with the least padding.

    One constant length keeps one compiled shape; the < count padded items at the end are masked.
    """
    if total <= 0:
        return 0, 0
    count = math.ceil(total / max(1, min(target, total)))
    return math.ceil(total / count), count


def summarize_tuned(params: Any) -> dict[str, float]:
    """Mean over chains of every per-chain scalar leaf of the tuned params, keyed by its path ('step_size', 'L')."""
    out: dict[str, float] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf = np.asarray(leaf)
        if leaf.ndim != 1 or not np.issubdtype(leaf.dtype, np.number):
            continue
        out[".".join(key_name(k) for k in path) or "value"] = float(np.mean(leaf))
    return out


def key_name(key) -> str:
    """The readable name of one pytree path entry (dict key, attribute name or sequence index)."""
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def chain_shardings(devices: Sequence[jax.Device], num_chains: int) -> tuple[NamedSharding, NamedSharding]:
    """(chain axis split over `devices`, replicated) on a one-axis mesh named 'chains'."""
    if num_chains % len(devices):
        raise ValueError(f"num_chains={num_chains} is not a multiple of the {len(devices)} devices")
    mesh = Mesh(np.asarray(devices), ("chains",))
    return NamedSharding(mesh, PartitionSpec("chains")), NamedSharding(mesh, PartitionSpec())


def _step_chains(algorithm: Algorithm, consts: _Consts, carry: _Carry, t: jax.Array, t_end: int):
    """Advance all chains by global step t (0-based); steps t >= t_end are padding and change nothing.

    A chain whose new loss or position is non-finite records t in diverged_at and keeps its last
    finite state from then on; its reported loss/accept/energy are NaN from that step.
    """
    minibatch = algorithm.batch_size is not None
    x, y = consts.posterior.x, consts.posterior.y
    n = x.shape[0]

    def one_chain(step_key, batch_key, state, params, diverged_at):
        # Keys by fold_in on the global step index: results do not depend on how steps are chunked.
        # (One fold_in per stream and step: each threefry call site costs compile time on CPU.)
        step_key = jax.random.fold_in(step_key, t)
        batch = None
        if minibatch:
            batch_key = jax.random.fold_in(batch_key, t)
            # With replacement: independent uniform indices, so each step's batch gradient is an
            # unbiased estimate of the full-data gradient and chains never share batches.
            idx = jax.random.randint(batch_key, (algorithm.batch_size,), 0, n)
            batch = (x[idx], y[idx])
        new_state, info = algorithm.step(step_key, state, params, batch)
        finite = jnp.isfinite(info.loss) & jnp.all(jnp.isfinite(algorithm.position(new_state)))
        was_alive = diverged_at < 0
        live = t < t_end
        keep = was_alive & finite & live
        diverged_at = jnp.where(was_alive & ~finite & live, t, diverged_at).astype(jnp.int32)
        state = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_state, state)
        dead = diverged_at >= 0
        out = StepInfo(
            loss=jnp.where(dead, jnp.nan, info.loss),
            accept=jnp.where(dead, jnp.nan, info.accept),
            energy_change=jnp.where(dead, jnp.nan, info.energy_change),
            diverging=jnp.asarray(info.diverging, bool) & was_alive,
            # Work is counted for every executed step: a frozen chain still computes in lockstep.
            grad_evals=jnp.asarray(info.grad_evals, jnp.float32),
        )
        return state, diverged_at, out

    state, diverged_at, info = jax.vmap(one_chain)(
        consts.step_keys, consts.batch_keys, carry.state, consts.params, carry.diverged_at)
    return _Carry(state, diverged_at), info


def _draw(algorithm: Algorithm, posterior: Posterior, consts: _Consts, carry: _Carry,
          draw_fn: DrawFn | None = None, draw_index: jax.Array | None = None, full: jax.Array | bool = True,
          full_draw_fn: DrawFn | None = None):
    """Full-data L_n, projections (w − w*) @ P, ‖w − w*‖² and full_draw_fn's outputs, and draw_fn's outputs, of every chain.

    Floating outputs are NaN for diverged chains (integer outputs are left as computed). `full`
    (a traced bool, the same for every chain) skips the full-data part where it is False: it comes
    back NaN (zeros for integers) and costs nothing (lax.cond, not a select).
    """
    positions = jax.vmap(algorithm.position)(carry.state)
    dead = carry.diverged_at >= 0

    def per_chain(fn, positions):
        if getattr(fn, "reads_state", False):  # fn(state, chain, draw, draw_data, params, posterior)
            out = jax.vmap(fn, in_axes=(0, 0, None, None, 0, None))(
                carry.state, consts.chain_index, draw_index, consts.draw_data, consts.params, posterior)
        else:
            out = jax.vmap(fn, in_axes=(0, 0, None, None))(positions, consts.chain_index, draw_index, consts.draw_data)
        return jax.tree.map(lambda a: _nan_where(dead, a), out)

    def full_data(positions):
        loss = full_data_loss(posterior, positions, posterior.x, posterior.y)
        offset = positions - posterior.w_star
        proj = offset @ consts.directions
        spread = jnp.sum(offset**2, axis=1)
        extra = None if full_draw_fn is None else per_chain(full_draw_fn, positions)
        return (jnp.where(dead, jnp.nan, loss), jnp.where(dead[:, None], jnp.nan, proj),
                jnp.where(dead, jnp.nan, spread), extra)

    if full is True:
        loss, proj, spread, full_extra = full_data(positions)
    else:
        def skipped(positions):
            return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.inexact) else 0,
                                                   s.dtype), jax.eval_shape(full_data, positions))

        loss, proj, spread, full_extra = jax.lax.cond(full, full_data, skipped, positions)
    extra = None if draw_fn is None else per_chain(draw_fn, positions)
    return loss, proj, spread, extra, full_extra


def _nan_where(dead: jax.Array, a: jax.Array) -> jax.Array:
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        return a
    return jnp.where(dead.reshape(dead.shape + (1,) * (a.ndim - 1)), jnp.nan, a)


def _burnin_chunk_fn(algorithm: Algorithm, length: int, num_burnin_steps: int):
    """carry, first step -> carry, StepInfo (length, C): `length` plain steps."""

    def chunk(carry: _Carry, t0: jax.Array, consts: _Consts):
        algorithm_here = rebind(algorithm, consts.posterior, consts.hyper)

        def body(carry, i):
            return _step_chains(algorithm_here, consts, carry, t0 + i, num_burnin_steps)

        return jax.lax.scan(body, carry, jnp.arange(length, dtype=jnp.int32))

    return chunk


def _draw_chunk_fn(algorithm: Algorithm, blocks: int, k: int, num_burnin_steps: int, total_steps: int,
                   draw_fn: DrawFn | None = None, full_loss_every: int = 1, full_draw_fn: DrawFn | None = None):
    """carry, first block -> carry, (StepInfo (blocks, k, C), draw loss (blocks, C), projections (blocks, C, P),
    ‖w − w*‖² (blocks, C), draw_fn outputs (blocks, C, ...) or None, full_draw_fn outputs (blocks, C, ...) or None).

    A block is k steps followed by one draw; blocks past the last draw are padding (masked steps).
    The full-data part of draw d is evaluated only when (d + 1) % full_loss_every == 0 (NaN elsewhere).
    """

    def chunk(carry: _Carry, block0: jax.Array, consts: _Consts):
        algorithm_here = rebind(algorithm, consts.posterior, consts.hyper)

        def block(carry, j):
            t_start = num_burnin_steps + (block0 + j) * k

            def body(carry, i):
                return _step_chains(algorithm_here, consts, carry, t_start + i, total_steps)

            carry, infos = jax.lax.scan(body, carry, jnp.arange(k, dtype=jnp.int32))
            d = block0 + j
            full = True if full_loss_every == 1 else (d + 1) % full_loss_every == 0
            return carry, (infos, *_draw(algorithm_here, consts.posterior, consts, carry, draw_fn, d, full,
                                         full_draw_fn))

        return jax.lax.scan(block, carry, jnp.arange(blocks, dtype=jnp.int32))

    return chunk


def _warmup_fn(algorithm: Algorithm):
    def warmup(posterior: Posterior, hyper, rng_keys: jax.Array, positions: jax.Array):
        return jax.vmap(rebind(algorithm, posterior, hyper).warmup)(rng_keys, positions)

    return warmup


def _end_burnin_fn(algorithm: Algorithm):
    def end_burnin(posterior: Posterior, hyper, states):
        return jax.vmap(rebind(algorithm, posterior, hyper).end_burnin)(states)

    return end_burnin


def _stack(chunks: list[StepInfo], length: int) -> StepInfo:
    """One phase's per-chunk (L, C) arrays joined into (length, C), the padded tail dropped."""
    return StepInfo(*(np.concatenate([getattr(c, f) for c in chunks])[:length] for f in StepInfo._fields))


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def full_data_loss(posterior: Posterior, positions: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """(C,) L_n of each chain's position, one chain after another.

    Not vmapped: a batched forward pass over all n points of C chains at once ran 3.4× slower on
    CPU (16 chains, d = 9,792, n = 10,000: 108 ms against 32 ms) than C single-chain passes.
    """
    return jax.lax.map(lambda w: posterior.batch_loss(w, x, y), positions)


def baseline_loss(posterior: Posterior, num_chains: int) -> float:
    """L_n(w*) computed the way draws compute L_n (`full_data_loss` of num_chains copies, in the data's precision).

    λ̂ subtracts this from the draws' L_n: evaluated by another path (eager, or in float64) it differs
    in the last bits, and nβ times that difference is what a chain that never moves would report.
    """
    return _baseline(_as_arrays(posterior), num_chains, None)[0]


def _baseline_fn(posterior: Posterior, w: jax.Array) -> jax.Array:
    return full_data_loss(posterior, w, posterior.x, posterior.y)


def _baseline(posterior: Posterior, num_chains: int, executables: dict | None) -> tuple[float, float]:
    """(baseline_loss, compile seconds), the compiled function kept in `executables`."""
    w = jnp.broadcast_to(posterior.w_star, (num_chains, posterior.dim))
    fn, seconds = _compile(_baseline_fn, posterior, w, executables=executables, name="baseline")
    return float(fn(posterior, w)[0]), seconds


def run_chains(name: str, algorithm: Algorithm, posterior: Posterior, rng_key: jax.Array, *,
               num_chains: int, num_burnin_steps: int, num_draws: int, num_steps_bw_draws: int,
               num_projections: int = 4, chunk_size: int = 0, progress: bool = True,
               devices: Sequence[jax.Device] | None = None, draw_fn: DrawFn | None = None,
               draw_data: Any = None, full_loss_every: int = 1, full_draw_fn: DrawFn | None = None,
               executables: dict | None = None) -> ChainResult:
    """Warm up and run `num_chains` vmapped chains from w*; see `start_chains`."""
    return run_chains_with_state(
        name, algorithm, posterior, rng_key, num_chains=num_chains, num_burnin_steps=num_burnin_steps,
        num_draws=num_draws, num_steps_bw_draws=num_steps_bw_draws, num_projections=num_projections,
        chunk_size=chunk_size, progress=progress, devices=devices, draw_fn=draw_fn, draw_data=draw_data,
        full_loss_every=full_loss_every, full_draw_fn=full_draw_fn, executables=executables)[0]


# Over 80 lines with its docstring, which documents the schedule, the draw functions and sharding.
def start_chains(name: str, algorithm: Algorithm, posterior: Posterior, rng_key: jax.Array, *,
                 num_chains: int, num_burnin_steps: int, num_draws: int, num_steps_bw_draws: int,
                 num_projections: int = 4, chunk_size: int = 0, progress: bool = True,
                 devices: Sequence[jax.Device] | None = None, draw_fn: DrawFn | None = None,
                 draw_data: Any = None, full_loss_every: int = 1, full_draw_fn: DrawFn | None = None,
                 executables: dict | None = None, initial_positions: jax.Array | None = None) -> LiveChains:
    """LiveChains (its ChainResult, the final sampler states, and `extend` to draw more): warm up,
    burn in, then draw every k steps.

    initial_positions: (C, d) where each chain's warm-up starts (default: every chain at w*); ‖w − w*‖²
    and L_n(w*) are still measured from w*.

    T = num_burnin_steps + num_draws * k steps (k = num_steps_bw_draws); draw d is taken after
    0-based step num_burnin_steps + (d + 1) k − 1, where the full-data L_n and the projections are
    evaluated with ‖w − w*‖² (ChainResult.draw_spread), at every full_loss_every-th draw (see below). Those forward passes over the full data are NOT counted in
    grad_evals (which is warm-up work plus the sum of StepInfo.grad_evals over all T steps,
    including the steps a frozen diverged chain still computes in lockstep with the others).

    Minibatch samplers (algorithm.batch_size = m) get, per chain and step, m indices drawn
    uniformly with replacement from the n samples; full-batch samplers get batch=None.

    Algorithm.end_burnin, when given, is applied to every chain's state between the last burn-in
    step and the first drawing step (with no burn-in: before the first step); then
    Algorithm.retune, when given, may replace the tuned params (host-side, not in wall_s).
    ChainResult.tuned summarizes the params the draws used.

    Divergence: a chain whose new loss or position is non-finite records that step in
    diverged_at and is frozen at its last finite state; its losses, draws and projections are NaN
    from then on, so estimators exclude it (a warm-up ending non-finite counts as step 0).

    Keys: see `chain_keys`; step t of chain c uses fold_in(keys.step[c], t) for the sampler and
    fold_in(keys.batch[c], t) for its minibatch indices. The projection directions come from one
    key and are shared by all chains.

    Execution: two executables compiled once each (burn-in chunk: a scan of plain steps; draw
    chunk: a scan over blocks of k steps + one draw), called from a host loop so the progress bar
    advances between chunks. chunk_size is steps per chunk (0 = about 1/20 of each phase); the
    last chunk is padded with masked no-op steps rather than compiled at a second shape.
    wall_s and warmup_s exclude compile time, reported as compile_s.

    devices: shard the chain axis over these devices (num_chains must be a multiple of their
    number); the posterior, hyper and directions are replicated. None = JAX's default device. Results equal
    the unsharded run's: chains never interact.

    draw_fn(position (d,), chain_index () int32, draw_index () int32, draw_data) -> pytree of
    arrays: optional extra per-chain evaluation at every draw (e.g. per-sample losses on fixed
    data), vmapped over chains inside the draw chunk. draw_data is passed to the compiled chunk
    as an argument (replicated across devices), not baked into it as a constant. Its outputs come
    back stacked as ChainResult.draw_outputs with leading axes (C, D); floating leaves are NaN for
    a chain from the draw after it diverged.

    full_loss_every: the full-data L_n and the projections are evaluated only at every
    full_loss_every-th draw (draws d with (d + 1) % full_loss_every == 0; draw_fn still runs at
    every draw), so draw_loss, draw_steps and projections hold ⌊num_draws / full_loss_every⌋
    draws. Nothing else changes: the chains, the per-step loss trace and draw_fn's outputs are
    the same for every value. full_draw_fn (the signature of draw_fn) is evaluated with them, its
    outputs stacked as ChainResult.full_draw_outputs (C, ⌊num_draws / full_loss_every⌋, ...).
    Without draw_fn, a draw that is not a full-data draw adds no work.

    Traced inputs: the posterior (a pytree: data, w*, nβ, γ, L_n(w*)) and the algorithm's
    Binding.hyper (an SG sampler's ε) are arguments of every compiled function, which makes the
    algorithm again from them inside its trace (`samplers.base.rebind`). An algorithm without a
    current binding (hand-built, or wrapped without `samplers.base.wrap`) runs as given: its
    functions close over their posterior, which is then a constant of its executables.

    executables: a dict the compiled functions are stored in and, when present, taken from,
    skipping their tracing and lowering; each under its name, static lengths and the types of its
    arguments (`_compile`). The caller answers for everything else its code depends on: the
    algorithm's code (settings other than hyper), per_sample_loss and the draw functions (sample()
    keys its dicts by its static options). None: the runner's own dict for this algorithm's
    Binding.key, posterior structure and draw functions (`_shared_executables`), or no reuse
    when the algorithm has no keyed binding. Either way two runs that differ only in traced
    values (nβ, γ, w*, data of the same shapes, ε) share one compilation.
    """
    if num_chains < 1 or num_draws < 1 or num_steps_bw_draws < 1 or num_burnin_steps < 0:
        raise ValueError("need num_chains, num_draws, num_steps_bw_draws >= 1 and num_burnin_steps >= 0")
    if not 1 <= full_loss_every <= num_draws:
        raise ValueError(f"full_loss_every must be in [1, num_draws = {num_draws}], got {full_loss_every}")

    plan = _plan(num_burnin_steps, num_draws, num_steps_bw_draws, full_loss_every, chunk_size, draw_fn is None)
    total_steps, k = plan.total_steps, plan.k
    if executables is None:
        executables = _shared_executables(algorithm, posterior, draw_fn, full_draw_fn, devices)
    binding = current_binding(algorithm)
    hyper = () if binding is None else _as_arrays(binding.hyper)
    n_beta = float(posterior.n_beta)  # as given, not rounded to the data's precision
    posterior = _as_arrays(posterior)

    keys = chain_keys(rng_key, num_chains)
    w_star = posterior.w_star
    if initial_positions is None:
        positions0 = jnp.broadcast_to(w_star, (num_chains, w_star.shape[0]))
    else:
        positions0 = jnp.asarray(initial_positions, w_star.dtype)
        if positions0.shape != (num_chains, w_star.shape[0]):
            raise ValueError(f"initial_positions must have shape {(num_chains, w_star.shape[0])}, got {positions0.shape}")
    directions = random_directions(keys.projection, w_star.shape[0], num_projections, w_star.dtype)
    chain_index = jnp.arange(num_chains, dtype=jnp.int32)
    per_chain = None
    if devices is not None:
        # The compiled chunks inherit these placements, so chains stay on their devices throughout.
        per_chain, replicated = chain_shardings(devices, num_chains)
        *per_chain_keys, positions0, chain_index = jax.device_put(
            (keys.warmup, keys.step, keys.batch, positions0, chain_index), per_chain)
        keys = ChainKeys(*per_chain_keys, keys.projection)
        posterior, hyper, directions, draw_data = jax.device_put((posterior, hyper, directions, draw_data), replicated)

    with Bar(f"{name}: warm-up", total_steps, progress_enabled(progress)) as bar:
        warmup, compile_s = _compile(_warmup_fn(algorithm), posterior, hyper, keys.warmup, positions0,
                                     executables=executables, name="warmup")
        (state, params, warmup_work), warmup_s = _timed(warmup, posterior, hyper, keys.warmup, positions0)
        bar.describe(f"{name}: sampling")

        consts = _Consts(keys.step, keys.batch, params, posterior, hyper, directions, chain_index, draw_data)
        # A warm-up that already left the finite region counts as diverged at step 0.
        finite0 = jnp.all(jnp.isfinite(jax.vmap(algorithm.position)(state)), axis=1)
        carry = _Carry(state, jnp.where(finite0, -1, 0).astype(jnp.int32))

        burn_trace, wall_s = None, 0.0
        if plan.burn_count:
            burn, seconds = _compile(_burnin_chunk_fn(algorithm, plan.burn_len, num_burnin_steps), carry, jnp.int32(0),
                                     consts, executables=executables, name=("burnin", plan.burn_len, num_burnin_steps))
            compile_s += seconds
            carry, burn_infos, wall_s = _run_chunks(burn, carry, consts, plan.burn_count, plan.burn_len, 1,
                                                    num_burnin_steps, bar)
            burn_trace = _stack(burn_infos, num_burnin_steps)

        if algorithm.end_burnin is not None:
            # e.g. RMSProp-SGLD freezes its preconditioner: the draws see a constant sampler
            end_burnin, seconds = _compile(_end_burnin_fn(algorithm), posterior, hyper, carry.state,
                                           executables=executables, name="end_burnin")
            compile_s += seconds
            carry = carry._replace(state=end_burnin(posterior, hyper, carry.state))
        consts = _retuned(algorithm, carry, consts, per_chain)

        baseline, _ = _baseline(posterior, num_chains, executables)
        fixed = _Fixed(name, algorithm, consts, executables, num_chains, num_burnin_steps, num_steps_bw_draws,
                       chunk_size, full_loss_every, draw_fn, full_draw_fn, progress, burn_trace,
                       np.asarray(warmup_work, np.float64).reshape(num_chains), baseline, n_beta,
                       summarize_tuned(consts.params), per_chain)
        carry, phase, seconds, compiled_s = _draw_phase(fixed, carry, first_block=0, num_blocks=plan.num_blocks,
                                                        blocks=plan.blocks, count=plan.draw_count, k=k,
                                                        every=plan.every, total_steps=total_steps, bar=bar)
    return LiveChains(fixed, carry, (phase,), num_draws, plan.kept, k,
                      {"wall_s": wall_s + seconds, "warmup_s": warmup_s, "compile_s": compile_s + compiled_s})


def run_chains_with_state(name: str, algorithm: Algorithm, posterior: Posterior, rng_key: jax.Array,
                          **options) -> tuple[ChainResult, Any]:
    """(ChainResult, final sampler states (C, ...)) of `start_chains` (the same arguments)."""
    live = start_chains(name, algorithm, posterior, rng_key, **options)
    return live.result, live.states


class _Fixed(NamedTuple):
    """What every draw phase of one set of chains shares (start_chains sets it; LiveChains.extend reuses it)."""

    name: str
    algorithm: Algorithm
    consts: _Consts
    executables: dict
    num_chains: int
    num_burnin_steps: int
    num_steps_bw_draws: int
    chunk_size: int
    full_loss_every: int
    draw_fn: DrawFn | None
    full_draw_fn: DrawFn | None
    progress: bool
    burn_trace: StepInfo | None  # (num_burnin_steps, C) per array, None without burn-in
    warmup_work: np.ndarray  # (C,)
    baseline: float  # L_n(w*) as the draws compute it
    n_beta: float
    tuned: dict  # summarize_tuned of the params the last draws used
    per_chain: NamedSharding | None  # the chain axis' sharding (None: unsharded)


class _Phase(NamedTuple):
    """One draw phase's host outputs, padding dropped: StepInfo (steps, C), then (blocks, C, ...) per block."""

    trace: StepInfo
    loss: np.ndarray
    projections: np.ndarray
    spread: np.ndarray
    extras: Any
    full_extras: Any


class LiveChains:
    """Chains stopped after their last draw, ready to draw more.

    result: the ChainResult so far; states: the sampler states (C, ...). extend(num_draws) runs the
    chains on from where they stopped, with the keys of the steps that follow, to num_draws draws in
    all. The extended result equals that of one run of num_draws draws (the same keys, step for
    step), and costs only the new steps: doubling the draws of a run this way costs one run, not two.
    extend(num_draws, retune=True) first applies Algorithm.retune (when the algorithm has one) where
    the chains now are, as start_chains does after burn-in: the new draws use the new params (for
    step_size = "auto", ε and any preconditioner re-measured there), and the run is no longer one
    run of that length: its earlier draws belong to the old params and are for burn-in only.
    """

    def __init__(self, fixed: _Fixed, carry: _Carry, phases: tuple[_Phase, ...], num_draws: int, kept: np.ndarray,
                 k: int, timings: dict):
        self._fixed, self._carry, self._phases, self._timings = fixed, carry, phases, timings
        self.num_draws = num_draws
        self.states = carry.state
        self.result = _assemble(fixed, phases, carry, num_draws, kept, k, timings)

    @property
    def params(self):
        """The tuned parameters the last draws used (leading axis = chains)."""
        return self._fixed.consts.params

    def extend(self, num_draws: int, retune: bool = False) -> LiveChains:
        fixed = self._fixed
        if fixed.full_loss_every != 1:
            raise ValueError("extend needs full_loss_every = 1 (a draw of every block)")
        if num_draws <= self.num_draws:
            raise ValueError(f"extend needs more than the {self.num_draws} draws already taken, got {num_draws}")
        k = fixed.num_steps_bw_draws
        total_steps = fixed.num_burnin_steps + num_draws * k
        new_blocks = num_draws - self.num_draws
        target = fixed.chunk_size if fixed.chunk_size > 0 else max(1, math.ceil(new_blocks * k / _AUTO_CHUNKS))
        blocks, count = chunk_plan(new_blocks, max(1, target // k))
        if retune:
            consts = _retuned(fixed.algorithm, self._carry, fixed.consts, fixed.per_chain)
            fixed = fixed._replace(consts=consts, tuned=summarize_tuned(consts.params))
        with Bar(f"{fixed.name}: more draws", new_blocks * k, progress_enabled(fixed.progress)) as bar:
            carry, phase, seconds, compile_s = _draw_phase(
                fixed, self._carry, first_block=self.num_draws, num_blocks=new_blocks, blocks=blocks, count=count,
                k=k, every=1, total_steps=total_steps, bar=bar)
        timings = dict(self._timings, wall_s=self._timings["wall_s"] + seconds,
                       compile_s=self._timings["compile_s"] + compile_s)
        return LiveChains(fixed, carry, self._phases + (phase,), num_draws, np.arange(num_draws), k, timings)


def _retuned(algorithm: Algorithm, carry: _Carry, consts: _Consts, per_chain) -> _Consts:
    """consts with the params Algorithm.retune gives at the chains' current states (host-side, e.g.
    step_size = "auto" re-measured where the chains are, on its own clock); as they were without one."""
    if algorithm.retune is None:
        return consts
    params = algorithm.retune(carry.state, consts.params, np.asarray(carry.diverged_at) < 0)
    if per_chain is not None:
        params = jax.device_put(params, per_chain)
    return consts._replace(params=params)


def _draw_phase(fixed: _Fixed, carry: _Carry, *, first_block: int, num_blocks: int, blocks: int, count: int, k: int,
                every: int, total_steps: int, bar: Bar) -> tuple[_Carry, _Phase, float, float]:
    """Draw blocks first_block .. first_block + num_blocks − 1 in `count` chunks of `blocks`:
    (carry, the phase's outputs, seconds, compile seconds)."""
    draw_fn, full_draw_fn = fixed.draw_fn, fixed.full_draw_fn
    draw, compile_s = _compile(
        _draw_chunk_fn(fixed.algorithm, blocks, k, fixed.num_burnin_steps, total_steps, draw_fn, every, full_draw_fn),
        carry, jnp.int32(0), fixed.consts, executables=fixed.executables,
        name=("draw", blocks, k, fixed.num_burnin_steps, total_steps, every, draw_fn is None, full_draw_fn is None))
    steps = total_steps - fixed.num_burnin_steps - first_block * k
    carry, outputs, seconds = _run_chunks(draw, carry, fixed.consts, count, blocks, k, steps, bar, start=first_block)
    infos, loss, proj, spread, extras, full_extras = zip(*outputs, strict=True)

    def cut(*chunks):
        return np.concatenate(chunks)[:num_blocks]

    trace = _stack([jax.tree.map(lambda a: a.reshape(blocks * k, fixed.num_chains), info) for info in infos], steps)
    phase = _Phase(trace, cut(*loss), cut(*proj), cut(*spread),
                   None if draw_fn is None else jax.tree.map(cut, *extras),
                   None if full_draw_fn is None else jax.tree.map(cut, *full_extras))
    return carry, phase, seconds, compile_s


def _run_chunks(fn, carry: _Carry, consts: _Consts, count: int, length: int, steps_per_item: int, steps: int,
                bar: Bar, start: int = 0) -> tuple[_Carry, list, float]:
    """Call chunk `fn` `count` times (chunk c starts at item start + c · length; an item is steps_per_item
    steps of the phase's `steps`): (carry, host copies of each chunk's outputs, seconds).

    Inside `with llc_bench.checkpoint.checkpoints(dir)` each chunk is saved as it finishes, and the
    chunks saved by an earlier run that started this phase from the same carry and consts are
    returned instead of being run again (their seconds are those they took then)."""
    outputs, wall_s, first = [], 0.0, 0
    store = active_checkpoints()
    saving = None if store is None else store.phase(carry, consts, {
        "count": count, "length": length, "steps_per_item": steps_per_item, "steps": steps, "start": start})
    if saving is not None and saving.done:
        first, outputs, wall_s, carry = saving.done, list(saving.outputs), saving.seconds, saving.carry
        bar.advance(min(steps, first * length * steps_per_item))
    for c in range(first, count):
        (carry, out), seconds = _timed(fn, carry, jnp.int32(start + c * length), consts)
        wall_s += seconds
        outputs.append(jax.tree.map(np.asarray, out))
        if saving is not None:
            saving.save(c, carry, outputs[-1], seconds)
        bar.advance(min(length * steps_per_item, steps - c * length * steps_per_item))
    return carry, outputs, wall_s


class _Plan(NamedTuple):
    """How start_chains cuts its steps: chunks of burn-in steps, then chunks of draw blocks."""

    total_steps: int
    k: int  # steps per draw block
    every: int  # full-data draw every `every` blocks
    kept: np.ndarray  # the blocks whose draw is returned
    burn_len: int
    burn_count: int
    num_blocks: int  # draw blocks in all (the last may be partly padding)
    blocks: int  # draw blocks per chunk
    draw_count: int


def _plan(num_burnin_steps: int, num_draws: int, num_steps_bw_draws: int, full_loss_every: int, chunk_size: int,
          no_draw_fn: bool) -> _Plan:
    total_steps = num_burnin_steps + num_draws * num_steps_bw_draws
    # The draw loop runs blocks of k steps, each followed by a draw; `every` = full_loss_every of
    # those blocks. Without draw_fn nothing happens between full-data draws, so a block becomes
    # the k · full_loss_every steps up to one (no branch in the loop; a last, partial block is
    # padded with masked steps and its draw dropped). kept: the blocks whose draw is returned.
    if no_draw_fn and full_loss_every > 1:
        k, every = num_steps_bw_draws * full_loss_every, 1
        num_blocks = -(-num_draws // full_loss_every)
        kept = np.arange(num_draws // full_loss_every)
    else:
        k, every, num_blocks = num_steps_bw_draws, full_loss_every, num_draws
        kept = np.arange(full_loss_every - 1, num_draws, full_loss_every)
    target = chunk_size if chunk_size > 0 else max(1, math.ceil(total_steps / _AUTO_CHUNKS))
    burn_len, burn_count = chunk_plan(num_burnin_steps, target)
    blocks, draw_count = chunk_plan(num_blocks, max(1, target // k))
    return _Plan(total_steps, k, every, kept, burn_len, burn_count, num_blocks, blocks, draw_count)


def _assemble(fixed: _Fixed, phases: tuple[_Phase, ...], carry: _Carry, num_draws: int, kept: np.ndarray, k: int,
              timings: dict) -> ChainResult:
    """Host side: join burn-in and the draw phases, keep the returned draws, put chains first."""
    parts = ([fixed.burn_trace] if fixed.burn_trace is not None else []) + [p.trace for p in phases]
    trace = StepInfo(*(np.concatenate(arrays).T for arrays in zip(*parts, strict=True)))

    def joined(field: str):
        return np.concatenate([getattr(p, field) for p in phases])

    def joined_tree(field: str, index):
        return jax.tree.map(lambda *a: np.swapaxes(np.concatenate(a)[index], 0, 1), *[getattr(p, field) for p in phases])

    return ChainResult(
        sampler=fixed.name,
        loss_trace=trace.loss,
        accept=trace.accept,
        energy_change=trace.energy_change,
        diverging=trace.diverging.astype(bool),
        draw_loss=joined("loss")[kept].T,
        draw_steps=fixed.num_burnin_steps + (kept + 1) * k - 1,
        projections=joined("projections")[kept].transpose(1, 0, 2),
        diverged_at=np.asarray(carry.diverged_at, np.int64),
        grad_evals=fixed.warmup_work + trace.grad_evals.astype(np.float64).sum(axis=1),
        warmup_grad_evals=fixed.warmup_work,
        num_burnin_steps=fixed.num_burnin_steps,
        loss_at_wstar=fixed.baseline,
        n_beta=fixed.n_beta,
        tuned=fixed.tuned,
        draw_outputs=None if fixed.draw_fn is None else joined_tree("extras", slice(num_draws)),
        full_draw_outputs=None if fixed.full_draw_fn is None else joined_tree("full_extras", kept),
        draw_spread=joined("spread")[kept].T,
        **timings,
    )
