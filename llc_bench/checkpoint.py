"""Resumable sampling: every chunk of every sampling phase saved as it finishes, replayed on a rerun.

A long run (a scoreboard instance that takes hours on a CPU, with its draws doubled several times)
can be killed at any moment and resumed later, losing at most one chunk (chunk_size; by default
about 1/20 of a phase):

    with checkpoints("results/.../checkpoints/run-name"):
        run = run_sampler(cfg, name, posterior)

Inside the `with`, the runner calls `Checkpoints.phase` at the start of each phase it runs in
chunks (burn-in, the first draws, each LiveChains.extend, in the order the run takes them). A phase
whose chunks are on disk is not run again: its saved outputs, final carry and seconds are returned.
A phase that was cut short goes on from its last saved chunk. Everything between phases (warm-up,
the end of burn-in, a retune, the estimates and the decisions taken on them) is recomputed, and
is the same as the first time because it is deterministic given the same inputs. So a resumed run
returns what the uninterrupted run would have, bit for bit, including the wall-clock seconds of
the saved chunks (the time it cost then, not the time to read it back).

Each phase's files record a fingerprint of what it started from: the chains' state and every
array its chunks read (keys, tuned parameters, data). On a rerun whose phase starts elsewhere
(another seed, config or code, or a computation that was not bitwise reproducible) the saved
phase and all after it are deleted and run afresh: a checkpoint never feeds a run it does not
belong to. `Checkpoints.events` says what was reused and what was dropped (`Checkpoints.reused`: the reuses alone).

Files: <dir>/phase-NNNN.json (fingerprint, shape of the phase, chunks done, seconds) with
phase-NNNN-chunk-MMMM.pkl (chunk MMMM's host outputs) and phase-NNNN-carry-MMMM.pkl (the state after
the last chunk saved, MMMM; the record is written after it, and the one before it removed after
that, so a kill between any two writes leaves a record and the carry it names). Remove the directory
once the run's result is stored (`Checkpoints.clear`, or `clear_when_done`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import jax
import numpy as np

_ACTIVE: ContextVar[Checkpoints | None] = ContextVar("llc_bench_checkpoints", default=None)


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_host(tree: Any) -> list:
    """The leaves of a pytree as numpy arrays (typed PRNG keys as their key data)."""
    return [np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf) for leaf in jax.tree.leaves(tree)]


def fingerprint(*trees: Any) -> str:
    """sha256 of the path, dtype, shape and bytes of every leaf of the trees (not of the treedef's
    text, which names static fields such as functions by their address in this process)."""
    digest = hashlib.sha256()
    for tree in trees:
        paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
        for path, leaf in zip(paths, _to_host(tree), strict=True):
            digest.update(f"{path}:{leaf.dtype}{leaf.shape}".encode())
            digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def _restore(like: Any, leaves: list) -> Any:
    """Saved leaves in the structure, key types and placement of `like` (the carry the phase starts with)."""
    live = jax.tree.leaves(like)
    if len(live) != len(leaves):
        raise ValueError("saved carry does not match the run's")
    out = []
    for leaf, saved in zip(live, leaves, strict=True):
        value = jax.random.wrap_key_data(saved, impl=jax.random.key_impl(leaf)) if _is_key(leaf) else saved
        out.append(jax.device_put(value, leaf.sharding) if isinstance(leaf, jax.Array) else value)
    return jax.tree.unflatten(jax.tree.structure(like), out)


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Phase:
    """One phase of chunks: what was saved of it (`done` chunks, their outputs, `carry` after
    them, `seconds`) and `save` for each chunk that finishes."""

    def __init__(self, store: Checkpoints, index: int, meta: dict, like: Any):
        self._store, self._index, self._meta, self._like = store, index, meta, like
        self.done, self.outputs, self.seconds, self.carry = 0, [], 0.0, None

    def _path(self, suffix: str) -> Path:
        return phase_file(self._store.path, self._index, suffix)

    def load(self) -> bool:
        """Read the saved chunks when they belong to this phase; False (nothing kept) otherwise."""
        try:
            saved = json.loads(self._path(".json").read_text())
            if {k: saved.get(k) for k in self._meta} != self._meta or saved["done"] < 1:
                return False
            outputs = [pickle.loads(self._path(f"-chunk-{c:04d}.pkl").read_bytes()) for c in range(saved["done"])]
            carry = _restore(self._like, pickle.loads(self._path(f"-carry-{saved['done'] - 1:04d}.pkl").read_bytes()))
        except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError, TypeError, AttributeError, ImportError):
            return False
        self.done, self.outputs, self.seconds, self.carry = saved["done"], outputs, float(saved["seconds"]), carry
        return True

    def save(self, chunk: int, carry: Any, outputs: Any, seconds: float) -> None:
        """Chunk `chunk` finished with `carry` and host `outputs`, taking `seconds`."""
        self.seconds += seconds
        _write(self._path(f"-chunk-{chunk:04d}.pkl"), pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL))
        _write(self._path(f"-carry-{chunk:04d}.pkl"), pickle.dumps(_to_host(carry), protocol=pickle.HIGHEST_PROTOCOL))
        # The record is written last, and the carry before it is removed only after it: a run killed
        # anywhere in between resumes from the chunk the record names, with that chunk's carry.
        _write(self._path(".json"), json.dumps({**self._meta, "done": chunk + 1, "seconds": self.seconds}).encode())
        self._path(f"-carry-{chunk - 1:04d}.pkl").unlink(missing_ok=True)
        self._store.saved_chunks += 1
        if self._store.stop_after is not None and self._store.saved_chunks >= self._store.stop_after:
            raise Interrupted(f"stopped after {self._store.saved_chunks} saved chunks")


class Interrupted(BaseException):
    """Raised by Checkpoints(stop_after=N) once N chunks are saved: a run killed at that point (a
    BaseException, as KeyboardInterrupt is, so that no `except Exception` turns it into a result)."""


class Checkpoints:
    """The checkpoint directory of one run (see the module docstring). stop_after: raise
    Interrupted once that many chunks have been saved (to test resuming)."""

    def __init__(self, path: str | Path, stop_after: int | None = None):
        self.path = Path(path)
        self.stop_after = stop_after
        self.saved_chunks = 0
        self.events: list[str] = []  # what was reused and what was dropped, in order
        self.reused: list[str] = []  # the reuses alone ("phase i: k/n chunks reused")
        self._next = 0
        self._dropped = False

    def phase(self, carry: Any, consts: Any, shape: dict) -> Phase:
        """The next phase of the run, which starts from `carry`, reads `consts` and has `shape`
        (its chunk count and lengths): loaded from disk when saved for exactly this start."""
        index, self._next = self._next, self._next + 1
        self.path.mkdir(parents=True, exist_ok=True)
        phase = Phase(self, index, {**shape, "from": fingerprint(carry, consts)}, carry)
        if not self._dropped and phase.load():
            self.reused.append(f"phase {index}: {phase.done}/{shape['count']} chunks reused")
            self.events.append(self.reused[-1])
            return phase
        if not self._dropped and (self.path / f"phase-{index:04d}.json").exists():
            self.events.append(f"phase {index}: saved chunks belong to another start; dropped with all later phases")
        if not self._dropped:
            self._drop_from(index)
        return phase

    def _drop_from(self, index: int) -> None:
        """Delete phase `index` and later: from here on this run writes its own."""
        self._dropped = True
        for file in self.path.glob("phase-*"):
            if int(file.name[6:10]) >= index:
                file.unlink()

    def clear(self) -> None:
        """Remove the directory (the run's result is stored elsewhere)."""
        shutil.rmtree(self.path, ignore_errors=True)


def phase_file(path: str | Path, index: int, suffix: str = ".json") -> Path:
    """A file of phase `index` in a checkpoint folder: its record (".json"), "-chunk-MMMM.pkl", "-carry-MMMM.pkl"."""
    return Path(path) / f"phase-{index:04d}{suffix}"


def saved_records(path: str | Path) -> list[tuple[int, dict]]:
    """(index, record) of every readable phase record in a checkpoint folder, in order."""
    out = []
    for file in sorted(Path(path).glob("phase-[0-9][0-9][0-9][0-9].json")):
        try:
            out.append((int(file.stem[6:10]), json.loads(file.read_text())))
        except (OSError, ValueError):
            continue
    return out


def saved_outputs(path: str | Path, index: int, done: int) -> list:
    """The host outputs of chunks 0 … done − 1 of phase `index`, as the runner saved them."""
    return [pickle.loads(phase_file(path, index, f"-chunk-{c:04d}.pkl").read_bytes()) for c in range(done)]


def saved_progress(path: str | Path) -> str | None:
    """What a checkpoint folder holds, in words ("2 phase(s), 11 chunk(s), 735 s of sampling"); None when
    it holds nothing. Whether it will be reused is only known when the run reaches each phase."""
    phases = [record for _, record in saved_records(path)]
    if not phases:
        return None
    chunks = sum(int(p.get("done", 0)) for p in phases)
    seconds = sum(float(p.get("seconds", 0.0)) for p in phases)
    return f"{len(phases)} phase(s), {chunks} chunk(s), {seconds:.0f} s of sampling"


@contextlib.contextmanager
def checkpoints(path: str | Path | None, stop_after: int | None = None,
                clear_when_done: bool = False) -> Iterator[Checkpoints | None]:
    """Save and resume the chunks of every phase the runner runs inside the `with` (module docstring).

    path None: nothing is saved (the block runs as it would outside any `with`; yields None).
    clear_when_done: remove the folder when the block ends without an exception, i.e. once the
    caller has made the result from the run; a run cut short (Interrupted, KeyboardInterrupt, any
    exception that leaves the block) keeps it to resume from."""
    store = None if path is None else Checkpoints(path, stop_after)
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)
    if store is not None and clear_when_done:
        store.clear()


def active() -> Checkpoints | None:
    """The Checkpoints of the innermost `with checkpoints(...)`, None outside one."""
    return _ACTIVE.get()
