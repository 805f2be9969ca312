"""Resumable sampling: a run killed after any saved chunk and rerun returns the uninterrupted result bit for bit."""

from __future__ import annotations

import dataclasses
import json
import pickle

import jax
import numpy as np
import pytest
from test_llc_regular import regular_config
from test_runner import RUN, _data_posterior, exploding_walk, langevin_toy

from llc_bench.checkpoint import Interrupted, checkpoints, fingerprint, saved_progress
from llc_bench.config import replace
from llc_bench.experiment import build_posterior, run_sampler
from llc_bench.runner import start_chains
from llc_bench.target import build_target

FIELDS = ("loss_trace", "accept", "energy_change", "draw_loss", "draw_steps", "projections", "draw_spread",
          "grad_evals", "diverged_at", "draw_outputs")


def _assert_same(a, b):
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def _run(alg, post, key, opts):
    """Burn-in (10 steps: 3 chunks of 4), 7 draws (one block of k = 3 steps per chunk: 7 chunks),
    extended to 12 draws (5 chunks) and then to 20 with a retune (8 chunks): 4 phases, 23 chunks."""
    return start_chains("toy", alg, post, key, **opts).extend(12).extend(20, retune=True)


@pytest.fixture(scope="module")
def toy():
    post = _data_posterior(n=64)
    alg = langevin_toy(post, 1e-4, batch_size=8)._replace(retune=lambda states, params, alive: params)
    opts = {**RUN, "num_chains": 4, "draw_fn": lambda w, chain, draw, data: w[0] + draw}
    key = jax.random.key(5)
    return post, alg, key, opts, _run(alg, post, key, opts)


@pytest.mark.parametrize("stop_after", [1, 3, 6, 10, 12, 22])
def test_a_resumed_run_equals_the_uninterrupted_one(toy, tmp_path, stop_after):
    """Killed after chunk 1 of burn-in, the end of burn-in, mid-draws, the end of the first draws, the
    last chunk but one: the rerun reuses every saved chunk and computes only the rest."""
    post, alg, key, opts, whole = toy
    with pytest.raises(Interrupted), checkpoints(tmp_path, stop_after=stop_after):
        _run(alg, post, key, opts)
    with checkpoints(tmp_path) as store:
        resumed = _run(alg, post, key, opts)
    _assert_same(resumed.result, whole.result)
    jax.tree.map(np.testing.assert_array_equal, resumed.states, whole.states)
    assert store.saved_chunks == 23 - stop_after  # only the chunks not saved before were run
    assert store.events[0].startswith(f"phase 0: {min(stop_after, 3)}/3 chunks reused")
    assert resumed.result.wall_s > 0


def test_another_start_drops_the_saved_phases(toy, tmp_path):
    """Checkpoints of another key (or config, or code) are never reused: the rerun deletes them and
    computes its own run, equal to a fresh one."""
    post, alg, key, opts, _ = toy
    with pytest.raises(Interrupted), checkpoints(tmp_path, stop_after=8):
        _run(alg, post, key, opts)
    other = jax.random.key(6)
    with checkpoints(tmp_path) as store:
        resumed = _run(alg, post, other, opts)
    _assert_same(resumed.result, _run(alg, post, other, opts).result)
    assert store.saved_chunks == 23
    assert "belong to another start" in store.events[0] and store.reused == []
    # a run whose every chunk is saved replays entirely, computing nothing
    with checkpoints(tmp_path) as store:
        replayed = _run(alg, post, other, opts)
    _assert_same(replayed.result, resumed.result)
    assert store.saved_chunks == 0 and store.events == store.reused == [
        "phase 0: 3/3 chunks reused", "phase 1: 7/7 chunks reused", "phase 2: 5/5 chunks reused",
        "phase 3: 8/8 chunks reused"]


def test_a_kill_between_the_saves_of_one_chunk_resumes_from_the_chunk_before(toy, tmp_path):
    """Killed after chunk 6 was saved, and while chunk 7's files were being written (its outputs and
    carry on disk, the record not yet updated): the rerun goes on from chunk 6's carry, whatever the
    half-written files hold."""
    post, alg, key, opts, whole = toy
    with pytest.raises(Interrupted), checkpoints(tmp_path, stop_after=6):
        _run(alg, post, key, opts)
    (tmp_path / "phase-0001-chunk-0003.pkl").write_bytes(b"torn")
    carry = pickle.loads((tmp_path / "phase-0001-carry-0002.pkl").read_bytes())
    (tmp_path / "phase-0001-carry-0003.pkl").write_bytes(pickle.dumps([np.full_like(a, 7) for a in carry]))
    with checkpoints(tmp_path) as store:
        resumed = _run(alg, post, key, opts)
    _assert_same(resumed.result, whole.result)
    assert store.events[1] == "phase 1: 3/7 chunks reused"
    assert sorted(p.name for p in tmp_path.glob("phase-0001-carry-*")) == ["phase-0001-carry-0006.pkl"]


def test_diverged_chains_resume_frozen(tmp_path):
    """A chain that diverged before the interruption stays frozen with its divergence step after it."""
    post = _data_posterior(n=64)
    alg = exploding_walk(12, "position")
    opts = {**RUN, "num_chains": 4}
    key = jax.random.key(5)
    whole = start_chains("toy", alg, post, key, **opts).extend(14)
    with pytest.raises(Interrupted), checkpoints(tmp_path, stop_after=5):
        start_chains("toy", alg, post, key, **opts).extend(14)
    with checkpoints(tmp_path):
        resumed = start_chains("toy", alg, post, key, **opts).extend(14)
    _assert_same(resumed.result, whole.result)
    assert (whole.result.diverged_at == 12).any()


def test_without_a_folder_nothing_is_saved_and_a_finished_block_clears_its_folder(toy, tmp_path):
    """checkpoints(None) saves nothing (and hides an outer folder); clear_when_done removes the folder
    after a block that ends normally, and keeps it after one that is cut short."""
    post, alg, key, opts, whole = toy
    with checkpoints(tmp_path / "outer") as outer, checkpoints(None) as inner:
        _assert_same(_run(alg, post, key, opts).result, whole.result)
    assert inner is None and outer.saved_chunks == 0 and not (tmp_path / "outer").exists()
    with pytest.raises(Interrupted), checkpoints(tmp_path / "run", stop_after=4, clear_when_done=True):
        _run(alg, post, key, opts)
    assert saved_progress(tmp_path / "run").startswith("2 phase(s), 4 chunk(s)")
    with checkpoints(tmp_path / "run", clear_when_done=True) as store:
        _assert_same(_run(alg, post, key, opts).result, whole.result)
    assert store.saved_chunks == 19 and not (tmp_path / "run").exists()


def test_fingerprint_sees_every_bit():
    a = {"w": np.zeros(3, np.float32), "k": jax.random.key(0)}
    assert fingerprint(a) == fingerprint({"w": np.zeros(3, np.float32), "k": jax.random.key(0)})
    assert fingerprint(a) != fingerprint({"w": np.array([0, 0, -0.0], np.float32), "k": jax.random.key(0)})
    assert fingerprint(a) != fingerprint({"w": np.zeros(3, np.float32), "k": jax.random.key(1)})
    assert fingerprint(a) != fingerprint({"w": np.zeros(3, np.float64), "k": jax.random.key(0)})


def test_run_sampler_to_a_target_resumes_exactly(tmp_path):
    """The whole of run_sampler with step_size = "auto" and run.target_rel_se (doublings, each after
    a not_converged verdict with ε re-measured where the chains are): killed midway and rerun, the
    summary is the uninterrupted one (but for timings), every attempt included."""
    cfg = regular_config()
    target = build_target(cfg)
    posterior = build_posterior(cfg, target)
    cfg = replace(cfg, **{"run.target_rel_se": 0.1, "run.max_doublings": 4, "run.samplers": ["sgld"],
                          "sampler.sgld.step_size": "auto", "sampler.sgld.num_burnin_steps": 0,
                          "sampler.sgld.num_draws": 60, "run.chunk_size": 100})
    whole = run_sampler(cfg, "sgld", posterior, truth=target.truth)
    with checkpoints(tmp_path / "count") as store:
        run_sampler(cfg, "sgld", posterior, truth=target.truth)
    chunks = store.saved_chunks
    assert len(whole.summary["target_rel_se"]["attempts"]) >= 2 and chunks >= 4
    with pytest.raises(Interrupted), checkpoints(tmp_path / "run", stop_after=chunks // 2 + 1):
        run_sampler(cfg, "sgld", posterior, truth=target.truth)
    with checkpoints(tmp_path / "run") as store:
        resumed = run_sampler(cfg, "sgld", posterior, truth=target.truth)
    assert store.saved_chunks == chunks - (chunks // 2 + 1)
    _assert_same(resumed.result, whole.result)
    timing = {"wall_s", "compile_s", "wnv_time", "step_size_auto_s"}  # seconds, and work per second

    def untimed(summary):
        return json.dumps({k: v for k, v in summary.items() if k not in timing}, sort_keys=True, default=str)
    assert untimed(resumed.summary) == untimed(whole.summary)
    np.testing.assert_equal(dataclasses.asdict(resumed.estimate), dataclasses.asdict(whole.estimate))
