"""Sweep specs: a TOML spec expands to validated cells (one experiment each), and the columns of their CSV.

Spec layout (see configs/sweep_default.toml)::

    [sweep]
    name = "my_sweep"
    mode = "one_at_a_time"        # "product" | "zip" | "one_at_a_time"
    seeds = [0, 1]                # always multiplied in (run.seed of each cell)
    samplers = ["sgld"]           # optional; default: the base config's run.samplers
    out = "results/sweeps/my_sweep.csv"   # optional; default results/sweeps/<name>.csv
    runner = "pkg.module:function"        # optional hook (llc_bench.sweep)
    base_preset = "quick"         # optional: start from a preset, [base] is merged over it

    [base]                        # a config in the normal TOML layout ([base.data], [base.model], ...)
    data.n = 1000

    [axes]
    "model.depth" = [1, 2, 3]     # dotted config key -> list of values
    "data.noise" = ["gaussian", "outliers"]
    # A bare name (no dot) bundles several keys into one axis: each value is a table of dotted keys.
    activation = [{ "model.activation" = "tanh", "teacher.activation" = "tanh" }]

Modes: ``product`` is the Cartesian product of the axes; ``zip`` walks equal-length axes in
parallel; ``one_at_a_time`` runs the base and then each axis value alone with every other key at
its base value. Cells whose resolved configs coincide (an axis value
equal to the base value) run once. Every cell is validated before any runs.

The CSV belongs to one spec: ``cell_id`` hashes the cell's overrides and seed, not the base, so
after changing the base write to a new CSV.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llc_bench.artifacts import canonical_hash
from llc_bench.config import (
    PRESET_DIR,
    SEED_LIMIT,
    Config,
    _suggest,
    deep_merge,
    from_dict,
    preset_path,
    read_toml,
    set_dotted,
    to_dict,
)
from llc_bench.types import ConfigError

DEFAULT_SPEC = PRESET_DIR / "sweep_default.toml"
MODES = ("product", "zip", "one_at_a_time")
SPEC_KEYS = ("name", "mode", "seeds", "samplers", "out", "runner", "base_preset")
SPEC_SECTIONS = ("sweep", "base", "base_preset", "axes")

METRICS = ("llc_mean", "llc_se", "truth", "rel_error", "ess_bulk", "ess_tail", "rhat", "accept_rate",
           "grad_evals", "wall_s", "compile_s", "wnv_time", "wnv_grad", "n_beta", "gamma", "d",
           "loss_at_wstar", "step_size", "h_max", "num_hvp", "llc_debiased")
TAIL = ("status", "warnings", "error", "versions", "fingerprint")
# Columns newer than some CSVs still being resumed: an older file gets them empty.
ADDED_COLUMNS = ("fingerprint", "step_size", "h_max", "num_hvp", "llc_debiased")


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec: the base config as a raw TOML-layout dict, axes as dotted key -> values."""

    name: str
    mode: str
    seeds: tuple[int, ...]
    samplers: tuple[str, ...] | None
    out: str
    base: dict
    axes: dict[str, list]  # axis name -> values; a value is {dotted key: value} for bundled axes
    runner: str | None = None
    path: str = "<spec>"


@dataclass(frozen=True)
class Cell:
    """One experiment of the sweep: its overrides of the base, its seed, and the validated config."""

    cell_id: str
    seed: int
    overrides: dict[str, Any]  # dotted key -> value (the seed is not included)
    config: Config

    @property
    def samplers(self) -> tuple[str, ...]:
        return self.config.run.samplers


# ---------------------------------------------------------------------------------------------
# Spec parsing and expansion


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"depth": 1}} and {"model.depth": 1} both become {"model.depth": 1}."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _axes_from_toml(raw: dict, where: str) -> dict[str, list]:
    axes: dict[str, list] = {}

    def walk(tree: dict, prefix: str) -> None:
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
                continue
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{where} [axes] {dotted}: must be a non-empty list of values")
            if "." not in dotted:  # a bundled axis: each value a table of dotted keys
                if not all(isinstance(v, dict) and v for v in value):
                    raise ConfigError(f"{where} [axes] {dotted}: not a dotted config key, so each value must "
                                      "be a table of dotted keys, e.g. [{ \"model.activation\" = \"tanh\" }]")
                value = [_flatten(v) for v in value]
            axes[dotted] = value

    walk(raw, "")
    if "run.seed" in axes:
        raise ConfigError(f"{where} [axes] run.seed: use [sweep] seeds = [...] instead")
    return axes


def parse_spec(raw: dict, path: str = "<spec>") -> SweepSpec:
    """A SweepSpec from a spec TOML dict; structural errors are one-line ConfigErrors."""
    for key in raw:
        if key not in SPEC_SECTIONS:
            raise ConfigError(f"{path}: unknown section {key!r}{_suggest(key, SPEC_SECTIONS)}; "
                              f"allowed: {', '.join(SPEC_SECTIONS)}")
    sweep = raw.get("sweep", {})
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: [sweep] must be a table")
    for key in sweep:
        if key not in SPEC_KEYS:
            raise ConfigError(f"{path}: sweep.{key}: unknown key{_suggest(key, SPEC_KEYS)}; "
                              f"allowed: {', '.join(SPEC_KEYS)}")
    name = sweep.get("name", Path(path).stem if path != "<spec>" else "sweep")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{path}: sweep.name: must be a non-empty string without '/' (got {name!r})")
    mode = sweep.get("mode", "product")
    if mode not in MODES:
        raise ConfigError(f"{path}: sweep.mode: unknown value {mode!r}{_suggest(str(mode), MODES)}; "
                          f"allowed: {', '.join(MODES)}")
    seeds = sweep.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < SEED_LIMIT for s in seeds)):
        raise ConfigError(f"{path}: sweep.seeds: must be a non-empty list of integers in [0, 2^32) (got {seeds!r})")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: sweep.seeds: repeated seed in {seeds!r}")
    samplers = sweep.get("samplers")
    if samplers is not None:
        if isinstance(samplers, str):
            samplers = [samplers]
        if not isinstance(samplers, list) or not samplers or not all(isinstance(s, str) for s in samplers):
            raise ConfigError(f"{path}: sweep.samplers: must be a non-empty list of sampler names")
        samplers = tuple(samplers)
    out = sweep.get("out", f"results/sweeps/{name}.csv")
    runner = sweep.get("runner")
    if runner is not None and (not isinstance(runner, str) or ":" not in runner):
        raise ConfigError(f"{path}: sweep.runner: must be 'module:function' (got {runner!r})")

    base: dict = {}
    if "base_preset" in raw and "base_preset" in sweep:
        raise ConfigError(f"{path}: base_preset: given twice (top level and in [sweep])")
    preset = sweep.get("base_preset", raw.get("base_preset"))
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"{path}: base_preset: must be a preset name (got {preset!r})")
        base = read_toml(preset_path(preset, f"{path}: base_preset"), f"{path}: base_preset")
    extra = raw.get("base", {})
    if not isinstance(extra, dict):
        raise ConfigError(f"{path}: [base] must be a table")
    base = deep_merge(base, extra)
    axes_raw = raw.get("axes", {})
    if not isinstance(axes_raw, dict):
        raise ConfigError(f"{path}: [axes] must be a table")
    axes = _axes_from_toml(axes_raw, path)
    return SweepSpec(name=name, mode=mode, seeds=tuple(seeds), samplers=samplers, out=str(out),
                     base=base, axes=axes, runner=runner, path=str(path))


def load_spec(path: str | Path | None = None) -> SweepSpec:
    """Read and parse a spec file (default configs/sweep_default.toml)."""
    path = Path(path) if path is not None else DEFAULT_SPEC
    return parse_spec(read_toml(path, "--spec"), str(path))


def _combos(spec: SweepSpec) -> list[dict[str, Any]]:
    """Override dicts (dotted key -> value), in run order, before seeds are multiplied in."""

    def as_overrides(axis: str, value: Any) -> dict[str, Any]:
        return dict(value) if "." not in axis else {axis: value}

    axes = list(spec.axes.items())
    if not axes:
        return [{}]
    if spec.mode == "one_at_a_time":
        return [{}] + [as_overrides(a, v) for a, values in axes for v in values]
    if spec.mode == "zip":
        lengths = {a: len(v) for a, v in axes}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{a} has {n}" for a, n in lengths.items())
            raise ConfigError(f"{spec.path}: mode \"zip\" needs axes of equal length ({listed})")
        rows = zip(*(values for _, values in axes), strict=True)
    else:
        rows = itertools.product(*(values for _, values in axes))
    out = []
    for row in rows:
        combo: dict[str, Any] = {}
        for (axis, _), value in zip(axes, row, strict=True):
            for key, v in as_overrides(axis, value).items():
                if key in combo and combo[key] != v:
                    raise ConfigError(f"{spec.path}: axes set {key} twice with different values "
                                      f"({combo[key]!r} and {v!r})")
                combo[key] = v
        out.append(combo)
    return out


def cell_id(overrides: dict[str, Any], seed: int) -> str:
    """Stable 12-hex id of a cell: a hash of its overrides and seed (independent of order and run)."""
    return canonical_hash({"overrides": overrides, "seed": seed})


def _format_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def format_overrides(overrides: dict[str, Any]) -> str:
    return " ".join(f"{k}={_format_value(v)}" for k, v in overrides.items()) or "(base)"


def _build(spec: SweepSpec, overrides: dict[str, Any], seed: int) -> Config:
    raw = json.loads(json.dumps(spec.base))  # deep copy of plain TOML data
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    set_dotted(raw, "run.seed", seed)
    if spec.samplers is not None:
        set_dotted(raw, "run.samplers", list(spec.samplers))
    return from_dict(raw)  # also checks that a student sized by target_params is buildable


def expand(spec: SweepSpec) -> list[Cell]:
    """All cells of the sweep, each validated; a bad axis key or value raises one ConfigError naming it."""
    # Each axis value alone first: the error then names the axis value that is at fault.
    for axis, values in spec.axes.items():
        for value in values:
            overrides = dict(value) if "." not in axis else {axis: value}
            try:
                _build(spec, overrides, spec.seeds[0])
            except ConfigError as exc:
                raise ConfigError(f"{spec.path}: axis {axis} = {_format_value(value)}: {exc}") from None
    cells, seen = [], set()
    for overrides in _combos(spec):
        for seed in spec.seeds:
            try:
                cfg = _build(spec, overrides, seed)
            except ConfigError as exc:
                raise ConfigError(f"{spec.path}: cell {format_overrides(overrides)}: {exc}") from None
            resolved = json.dumps(to_dict(cfg), sort_keys=True, default=str)
            if resolved in seen:  # e.g. a one_at_a_time value equal to the base value
                continue
            seen.add(resolved)
            cells.append(Cell(cell_id(overrides, seed), seed, overrides, cfg))
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == len(ids), "cell ids collide"
    return cells


def axis_columns(spec: SweepSpec) -> list[str]:
    """The dotted config keys the axes touch, in spec order: the CSV's config columns."""
    cols: dict[str, None] = {}
    for axis, values in spec.axes.items():
        if "." in axis:
            cols[axis] = None
        else:
            for value in values:
                cols.update(dict.fromkeys(value))
    return list(cols)


def columns(spec: SweepSpec) -> list[str]:
    return ["cell_id", "seed", "sampler", *axis_columns(spec), *METRICS, *TAIL]
