"""Run artifacts written atomically: a temp file or directory first, then one rename."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from llc_bench.types import ConfigError

PACKAGES = ("llc_bench", "jax", "jaxlib", "blackjax", "optax", "flax", "arviz-stats", "xarray", "zarr", "numpy")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


@functools.cache
def fingerprint() -> str:
    """Where numbers are computed: jax/jaxlib versions, backend and device kind, CPU, XLA_FLAGS.

    Same seed, same numbers holds between runs with equal fingerprints; another XLA build or another
    CPU may fuse and vectorize reductions differently and change the last bits.
    """
    import jax  # deferred: nothing else here (atomic writes, hashes, check_writable) needs JAX

    try:
        jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        jaxlib_version = "missing"
    parts = [f"jax {jax.__version__}", f"jaxlib {jaxlib_version}",
             f"{jax.default_backend()} {jax.devices()[0].device_kind}", f"{platform.machine()} {_cpu_model()}"]
    if os.environ.get("XLA_FLAGS"):
        parts.append(f"XLA_FLAGS={os.environ['XLA_FLAGS']}")
    return "; ".join(parts)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def canonical_hash(obj: Any) -> str:
    """12 hex of the SHA-256 of `obj` as canonical JSON (sorted keys, no spaces, str() for the rest):
    equal content, equal hash, whatever the key order."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def run_id(config_dict: dict) -> str:
    """A short hash of the normalized config (which includes the seed): same config, same run directory."""
    return canonical_hash(config_dict)


def check_writable(path: str | Path, what: str = "--out") -> Path:
    """Create the directory if needed and prove it is writable, before any work is done."""
    if not str(path).strip():
        raise ConfigError(f"{what}: empty path; give a directory")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what} {path}: is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: not writable ({exc.strerror or exc})") from None
    return p


def jsonable(obj: Any) -> Any:
    """numpy scalars/arrays to Python; NaN and inf to None (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over `path`: all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(jsonable(obj), indent=2) + "\n")


def write_datatree_atomic(tree, path: Path) -> Path:
    """Write an xarray DataTree as a Zarr store into a temp directory, then rename it into place."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")) / "store.zarr"
    try:
        with warnings.catch_warnings():
            # zarr 3 warns that consolidated metadata is not in its spec yet; xarray readers still
            # expect it (and warn without it), so write it.
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            tree.to_zarr(tmp, mode="w", consolidated=True)
        swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return path


def swap_in(new: Path, path: Path) -> None:
    """Move `new` to `path`, replacing what is there with no moment at which `path` is missing.

    A directory cannot be renamed over a non-empty one, so the old one is renamed aside first, the
    new one renamed in, and only then is the old one deleted (put back if the second rename fails).
    """
    path = Path(path)
    if not path.exists():
        os.replace(new, path)
        return
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old.")) / path.name
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(aside, path)
        raise
    finally:
        shutil.rmtree(aside.parent, ignore_errors=True)
