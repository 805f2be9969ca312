"""DLN scoreboard: a seeded suite of deep linear networks, every sampler at one fixed recipe, scored only where the analytic λ is right at the n used.

Protocol (Lau et al., AISTATS 2025, App. E.2; Hitchcock & Hoogland 2025): size classes by
parameter count; an instance draws its depth and widths from its class's ranges until the count
lies in the class's range, then a rank-r teacher from one of the generators (`chained`,
`rand_rank`, `deepest`; llc_bench.models.dln_teacher_layers); x ~ U[-10, 10], noise-free targets,
w* = the teacher, γ = 1, nβ = n / log n.

Truth. Each instance carries Aoyagi's (global) λ and a well-posedness record computed from the
teacher's float64 layers and the data (llc_bench.wellposed): end-to-end singular values, the
effective rank r_eff of the directions visible at this nβ, λ(r_eff), and the lower bound rank(H)/2
of the local λ. A row is scored (column `truth`) only when the instance is well-posed: every
direction visible and every layer of rank r, so that the local λ is Aoyagi's. The other rows keep
`truth` empty and go to a second table that shows the three candidate values side by side.

The recipe (configs/bench_dln.toml) fixes every sampler's settings once: nothing is tuned per
instance beyond what a sampler adapts by itself (HMC window adaptation, the MCLMC tuners).

Two exact evaluation shortcuts keep the CPU run inside its budget; both compute the same L_n:

- The DLN loss multiplies the layer kernels into the end-to-end matrix M(w) first and then
  computes ½‖x M(w) − y‖² (cheaper than pushing n rows through every layer when n > H_in).
- Full-batch samplers (those whose SamplerSpec.minibatch is False) see the data through its sufficient
  statistics: with Σ = XᵀX/n = L Lᵀ and C = XᵀY/n, the H_in rows X_c = √H_in Lᵀ and
  Y_c = √H_in L⁻¹ C give (1/H_in) Σ_i ½‖y_ci − x_ci M‖² = L_n(M) + const for every M, so their
  log-density equals the n-sample one while a gradient costs O(H_in · d) instead of O(n · H_in · H_out).
  Their seconds are therefore seconds of that reduced evaluation (column `data_rows` says which);
  gradient evaluations (full-data equivalents) are the hardware-independent cost.
  SG samplers draw their minibatches from the n real samples.

Finite-n audit (`--audit`): the recipe's audit sampler (full batch) reruns every instance with
`audit_factor` × n samples (through the sufficient statistics, so at the same cost) and flags the
instances whose λ̂ moves by more than `audit_threshold`; finite_n_audit.csv holds the result.
The recipe's [audit.sampler] and [audit.run] tables override the audit sampler's settings there:
at k × n the posterior is narrower along the regular directions than along the singular ones, so
the same trajectory covers less of it and the audit needs a longer run than the scoreboard's.

CSV: one row per (instance, sampler), appended with fsync as soon as it is done; rerunning skips
the rows already present (a torn last line is cut away). Each row records the hash of its
sampler's recipe (the shared settings and that sampler's tables): after a sampler's settings
change, its rows are refused until `--rerun-stale` moves them to dln_scoreboard.stale.csv to be
computed again, while the other samplers' rows stay.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llc_bench.config import (
    PRESET_DIR,
    Config,
    ConfigError,
    deep_merge,
    from_dict,
    read_toml,
    set_dotted,
)
from llc_bench.truth import dln_learning_coefficient, dln_num_parameters
from llc_bench.wellposed import DEFAULT_MARGIN, WellPosedness

DEFAULT_SPEC = PRESET_DIR / "bench_dln.toml"
DEFAULT_OUT = Path("results/benchmarks")
CSV_NAME = "dln_scoreboard.csv"


def full_batch(sampler: str) -> bool:
    """The sampler takes exact full-data gradients (its spec says so): it gets the reduced posterior.
    A name outside the registry (a row label of another table) counts as an SG sampler."""
    from llc_bench.samplers import SAMPLER_NAMES, get_spec

    return sampler in SAMPLER_NAMES and not get_spec(sampler).minibatch


def full_batch_samplers() -> tuple[str, ...]:
    from llc_bench.samplers import SAMPLER_NAMES

    return tuple(name for name in SAMPLER_NAMES if full_batch(name))


AUDIT_CSV_NAME = "finite_n_audit.csv"
DLN_GENERATORS = ("chained", "rand_rank", "deepest")

COLUMNS = ("instance", "class", "widths", "rank", "generator", "truth", "sampler", "llc_mean", "llc_se",
           "rel_error", "grad_evals", "wall_s", "wnv_time", "wnv_grad", "status",
           # the well-posedness record (llc_bench.wellposed): truth = aoyagi only when well_posed
           "well_posed", "aoyagi", "lambda_r_eff", "local_lower", "r_eff", "sv_min", "sv_max",
           "layer_ranks", "posedness",
           # beyond the scoreboard proper: enough to audit a row without rerunning it
           "d", "n", "n_beta", "compile_s", "chains_used", "data_rows", "warnings", "recipe")
AUDIT_COLUMNS = ("instance", "class", "sampler", "well_posed", "aoyagi", "n", "llc_n", "llc_se_n",
                 "n_audit", "llc_audit", "llc_se_audit", "shift", "flagged", "status_audit", "recipe")

# Targets the scoreboard reports against (a report, not a test), on well-posed rows: (median
# |rel err|, 90th percentile, Spearman). Exact-gradient samplers are held to the tighter ones.
TARGETS = {"full_batch": (0.03, 0.08, 0.99), "sg": (0.05, 0.15, 0.98)}
TARGET_MEDIAN = TARGETS["sg"][0]


def targets_for(sampler: str) -> tuple[float, float, float]:
    return TARGETS["full_batch" if full_batch(sampler) else "sg"]


# ---------------------------------------------------------------------------------------------
# Size classes and the suite


@dataclass(frozen=True)
class SizeClass:
    """Parameter-count range [min_params, max_params) and the ranges depth and widths are drawn from.

    layers = number of weight matrices L (widths has L + 1 entries, input and output included).
    """

    name: str
    min_params: int
    max_params: int
    min_layers: int
    max_layers: int
    min_width: int
    max_width: int
    n: int  # training samples


def _half_decade(nominal: float) -> tuple[int, int]:
    """[nominal / √10, nominal · √10): the classes tile the parameter axis without gaps or overlap."""
    return math.ceil(nominal / math.sqrt(10)), math.ceil(nominal * math.sqrt(10))


# Depth ranges, width ranges and n of 1K, 10K, 100K and 1M are those Lau et al. (AISTATS 2025,
# App. E.2) give for their DLN classes: 1K widths 5-50 and 2-5 layers, 10K 5-100 and 2-10, 100K
# 50-500 and 2-10, 1M 100-1000 and 2-20; n = 1e5 for 1K and 10K, 1e6 from 100K up. The 10M and
# 100M width ranges are ours, chosen so that their count range is reachable with moderate
# rejection (Lau et al. state the parameter counts, not the ranges, for those classes).
SIZE_CLASSES: dict[str, SizeClass] = {
    c.name: c for c in (
        SizeClass("1K", *_half_decade(1e3), 2, 5, 5, 50, 100_000),
        SizeClass("10K", *_half_decade(1e4), 2, 10, 5, 100, 100_000),
        SizeClass("100K", *_half_decade(1e5), 2, 10, 50, 500, 1_000_000),
        SizeClass("1M", *_half_decade(1e6), 2, 20, 100, 1000, 1_000_000),
        SizeClass("10M", *_half_decade(1e7), 2, 20, 500, 2000, 1_000_000),
        SizeClass("100M", *_half_decade(1e8), 2, 20, 1000, 5000, 1_000_000),
    )
}


@dataclass(frozen=True)
class Instance:
    """One benchmark problem: a DLN architecture, its teacher's rank and generator, and Aoyagi's λ.

    `aoyagi` is the global learning coefficient of the architecture at rank r; whether it is the
    right answer for this teacher at this n is decided when the teacher is built (llc_bench.wellposed).
    """

    name: str  # e.g. "10K-007" (generators drawn per instance) or "10K-chained-007"
    size_class: str
    index: int
    widths: tuple[int, ...]  # (H_in, H_1, ..., H_out)
    rank: int
    generator: str
    seed: int  # run.seed of the instance: its data, teacher and chain streams
    d: int
    aoyagi: float
    n: int


def _class_rng(suite_seed: int, class_name: str, index: int, generator: str | None = None
               ) -> np.random.Generator:
    # One generator per (suite seed, class, [generator,] index): adding instances never changes
    # earlier ones.
    key = [suite_seed, zlib.crc32(class_name.encode())]
    if generator is not None:
        key.append(zlib.crc32(generator.encode()))
    return np.random.default_rng(key + [index])


def lau_rank(rng: np.random.Generator, widths: tuple[int, ...]) -> int:
    """The end-to-end rank Lau et al.'s rand_rank teacher ends up with: each layer, with
    probability ½, is cut to a rank uniform in {1, …, min(H_l, H_{l+1})}; generic factors of ranks
    k_l multiply to rank min_l k_l."""
    ranks = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        full = min(a, b)
        ranks.append(int(rng.integers(1, full + 1)) if rng.random() < 0.5 else full)
    return min(ranks)


def make_instance(size_class: SizeClass, index: int, suite_seed: int = 0,
                  generators: tuple[str, ...] = ("rand_rank", "deepest"), max_tries: int = 100_000,
                  generator: str | None = None) -> Instance:
    """Draw depth and widths uniformly from the class's ranges until d lies in its count range,
    then the rank (distributed as Lau et al.'s rand_rank) and the generator: `generator` when
    given (the instance is then named and seeded by it too), else uniform over `generators`."""
    rng = _class_rng(suite_seed, size_class.name, index, generator)
    c = size_class
    for _ in range(max_tries):
        layers = int(rng.integers(c.min_layers, c.max_layers + 1))
        widths = tuple(int(w) for w in rng.integers(c.min_width, c.max_width + 1, size=layers + 1))
        d = dln_num_parameters(widths)
        if c.min_params <= d < c.max_params:
            break
    else:
        raise ConfigError(f"class {c.name}: no architecture with {c.min_params} <= d < {c.max_params} "
                          f"from widths {c.min_width}-{c.max_width} and {c.min_layers}-{c.max_layers} "
                          f"layers in {max_tries} draws")
    rank = lau_rank(rng, widths)
    if generator is None:
        generator = generators[int(rng.integers(len(generators)))]
        name, seed_text = f"{c.name}-{index:03d}", f"{suite_seed}/{c.name}/{index}"
    else:
        name = f"{c.name}-{generator}-{index:03d}"
        seed_text = f"{suite_seed}/{name}"
    seed = zlib.crc32(seed_text.encode()) & 0x7FFFFFFF
    return Instance(name=name, size_class=c.name, index=index, widths=widths, rank=rank,
                    generator=generator, seed=seed, d=d, aoyagi=dln_learning_coefficient(widths, rank),
                    n=c.n)


def make_suite(classes: dict[str, int], suite_seed: int = 0,
               generators: tuple[str, ...] | dict[str, int] = ("rand_rank", "deepest"),
               size_classes: dict[str, SizeClass] | None = None) -> list[Instance]:
    """The instances, fixed by (suite_seed, class, index) and the generator setting.

    `generators` a tuple: `classes` maps class name -> number of instances, each drawing its
    generator uniformly from the tuple. A dict generator -> count: every class in `classes` gets
    `count` instances of each generator (the class counts are then not used).
    """
    size_classes = size_classes or SIZE_CLASSES
    if isinstance(generators, dict):
        return [make_instance(size_classes[name], i, suite_seed, generator=g)
                for name in classes for g, count in generators.items() for i in range(count)]
    return [make_instance(size_classes[name], i, suite_seed, tuple(generators))
            for name, count in classes.items() for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The recipe


RECIPE_KEYS = ("name", "suite_seed", "classes", "instances", "samplers", "generators", "full_batch_data",
               "out", "visibility_margin", "audit_sampler", "audit_factor", "audit_threshold")
RECIPE_SECTIONS = ("bench", "base", "sampler", "run", "class", "profile", "audit")
AUDIT_KEYS = ("sampler", "run")


@dataclass(frozen=True)
class Recipe:
    """A parsed bench_dln.toml: which instances, which samplers, and each sampler's fixed settings.

    base: config in the normal TOML layout shared by every run; run[sampler]: that sampler's
    run-section overrides (burn-in, draws, ...); sampler[sampler]: its settings table.
    generators: a tuple (each instance draws one uniformly; `classes` gives the counts) or a dict
    generator -> instances per class.
    """

    name: str
    suite_seed: int
    classes: dict[str, int]
    samplers: tuple[str, ...]
    generators: tuple[str, ...] | dict[str, int]
    full_batch_data: str  # "sufficient_statistic" | "data"
    out: str
    base: dict
    run: dict[str, dict]
    sampler: dict[str, dict]
    size_classes: dict[str, SizeClass]
    path: str = "<recipe>"
    visibility_margin: float = DEFAULT_MARGIN
    audit_sampler: str = "hmc"
    audit_factor: int = 10
    audit_threshold: float = 0.05
    audit: dict = field(default_factory=dict)  # {"sampler": {...}, "run": {...}} over the audit sampler's

    def fingerprint(self, sampler: str | None = None) -> str:
        """12 hex of everything that changes a row's numbers (not which instances or where).

        With `sampler`: of what changes that sampler's rows only (the shared settings and its own
        tables), so retuning one sampler leaves the others' rows valid.
        """
        material = {"base": self.base, "suite_seed": self.suite_seed, "generators": self.generators,
                    "classes": {k: vars(v) for k, v in sorted(self.size_classes.items())},
                    "visibility_margin": self.visibility_margin}
        if sampler is None:
            material.update(run=self.run, sampler=self.sampler, full_batch_data=self.full_batch_data)
        else:
            material.update(name=sampler, run=self.run.get(sampler, {}), sampler=self.sampler.get(sampler, {}))
            if full_batch(sampler):
                material["full_batch_data"] = self.full_batch_data
        return _hash(material)

    def fingerprints(self) -> dict[str, str]:
        return {name: self.fingerprint(name) for name in self.samplers}

    def audit_fingerprint(self) -> str:
        return _hash([self.fingerprint(self.audit_sampler), self.audit_factor, self.audit])

    def audit_recipe(self) -> Recipe:
        """This recipe with the [audit] overrides merged into the audit sampler's settings."""
        name = self.audit_sampler
        sampler, run = dict(self.sampler), dict(self.run)
        sampler[name] = deep_merge(sampler.get(name, {}), self.audit.get("sampler", {}))
        run[name] = deep_merge(run.get(name, {}), self.audit.get("run", {}))
        return dataclasses.replace(self, sampler=sampler, run=run, audit={})


def _hash(material: Any) -> str:
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _want(path: str, key: str, value: Any, kind: type | tuple, what: str) -> Any:
    """`value` if it is of `kind` (bool never counts as a number), else a one-line ConfigError."""
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{path}: {key}: must be {what} (got {value!r})")
    return value


def _names(path: str, key: str, value: Any, known, what: str) -> tuple[str, ...]:
    """A non-empty list of known names."""
    from llc_bench.config import _suggest

    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: {key}: must be a non-empty list of {what} (got {value!r}); "
                          f"allowed: {', '.join(known)}")
    one = what[:-2] if what.endswith("sses") else what[:-1]  # "size classes" -> "size class"
    for v in value:
        if v not in known:
            raise ConfigError(f"{path}: {key}: unknown {one} {v!r}{_suggest(v, known)}; "
                              f"allowed: {', '.join(known)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{path}: {key}: lists a name twice ({value!r})")
    return tuple(value)


def _count(path: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: {key}: must be an integer >= 0 (got {value!r})")
    return value


def _size_class(path: str, name: str, base: SizeClass, table: Any) -> SizeClass:
    _want(path, f"class.{name}", table, dict, "a table of class fields")
    fields = vars(base).copy()
    allowed = [k for k in fields if k != "name"]
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{path}: class.{name}.{key}: unknown key; allowed: {', '.join(allowed)}")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{path}: class.{name}.{key}: must be an integer > 0 (got {value!r})")
        fields[key] = value
    for lo, hi in (("min_params", "max_params"), ("min_layers", "max_layers"), ("min_width", "max_width")):
        if fields[lo] > fields[hi] or (lo == "min_params" and fields[lo] == fields[hi]):
            raise ConfigError(f"{path}: class.{name}: {lo} = {fields[lo]} must be below {hi} = {fields[hi]}")
    if fields["n"] < 2:
        raise ConfigError(f"{path}: class.{name}.n: must be >= 2 (got {fields['n']})")
    return SizeClass(**fields)


def parse_recipe(raw: dict, path: str = "<recipe>", profile: str | None = None,
                 instances: int | None = None) -> Recipe:
    """A Recipe from the TOML dict; `profile` merges [profile.<name>] over the rest first.

    Every key is checked here, before any work: a bad one is a one-line ConfigError naming it.
    """
    from llc_bench.config import _suggest
    from llc_bench.samplers import SAMPLER_NAMES

    raw = copy.deepcopy(raw)
    profiles = _want(path, "profile", raw.pop("profile", {}), dict, "a table of profiles")
    for name, table in profiles.items():
        _want(path, f"profile.{name}", table, dict, "a table (the recipe keys it overrides)")
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(f"{path}: unknown profile {profile!r}{_suggest(profile, profiles)}; "
                              f"defined: {', '.join(profiles) or 'none'}")
        raw = deep_merge(raw, profiles[profile])
    for key, value in raw.items():
        if key not in RECIPE_SECTIONS:
            raise ConfigError(f"{path}: unknown section {key!r}{_suggest(key, RECIPE_SECTIONS)}; "
                              f"allowed: {', '.join(RECIPE_SECTIONS)}")
        _want(path, key, value, dict, "a table")
    bench = raw.get("bench", {})
    for key in bench:
        if key not in RECIPE_KEYS:
            raise ConfigError(f"{path}: bench.{key}: unknown key{_suggest(key, RECIPE_KEYS)}; "
                              f"allowed: {', '.join(RECIPE_KEYS)}")
    size_classes = dict(SIZE_CLASSES)
    for name, table in raw.get("class", {}).items():
        if name not in size_classes:
            raise ConfigError(f"{path}: class.{name}: unknown size class{_suggest(name, size_classes)}; "
                              f"known: {', '.join(size_classes)}")
        size_classes[name] = _size_class(path, name, size_classes[name], table)
    class_names = _names(path, "bench.classes", bench.get("classes", ["1K", "10K"]), list(size_classes),
                         "size classes")
    if instances is not None and (isinstance(instances, bool) or not isinstance(instances, int) or instances < 1):
        raise ConfigError(f"--instances: must be an integer >= 1 (got {instances!r})")
    generators = bench.get("generators", ["rand_rank", "deepest"])
    if isinstance(generators, dict):
        if "instances" in bench:
            raise ConfigError(f"{path}: bench.instances: give the counts either here or in the "
                              "bench.generators table, not both")
        for g, count in generators.items():
            _names(path, "bench.generators", [g], DLN_GENERATORS, "generators")
            _count(path, f"bench.generators.{g}", count)
        if instances is not None:
            generators = {g: instances for g in generators}
        if not generators:
            raise ConfigError(f"{path}: bench.generators: an empty table; allowed: {', '.join(DLN_GENERATORS)}")
        classes = {name: sum(generators.values()) for name in class_names}
    else:
        generators = _names(path, "bench.generators", generators, DLN_GENERATORS, "generators")
        count = instances if instances is not None else bench.get("instances", 20)
        if isinstance(count, dict):
            missing = [c for c in class_names if c not in count]
            if missing:
                raise ConfigError(f"{path}: bench.instances: no count for class {', '.join(missing)} "
                                  f"(the table must cover bench.classes = {list(class_names)})")
            classes = {name: _count(path, f"bench.instances.{name}", count[name]) for name in class_names}
        else:
            classes = {name: _count(path, "bench.instances", count) for name in class_names}
    if not any(classes.values()):
        raise ConfigError(f"{path}: the suite is empty: every instance count is 0 (bench.instances / "
                          "bench.generators)")
    full_batch_data = bench.get("full_batch_data", "sufficient_statistic")
    if full_batch_data not in ("sufficient_statistic", "data"):
        raise ConfigError(f"{path}: bench.full_batch_data: 'sufficient_statistic' or 'data' (got {full_batch_data!r})")
    samplers = _names(path, "bench.samplers", bench.get("samplers", ["sgld", "rmsprop_sgld"]), SAMPLER_NAMES,
                      "samplers")
    audit_sampler = bench.get("audit_sampler", "hmc")
    _names(path, "bench.audit_sampler", [audit_sampler], full_batch_samplers(), "full-batch samplers")
    margin = _want(path, "bench.visibility_margin", bench.get("visibility_margin", DEFAULT_MARGIN),
                   (int, float), "a number > 0")
    factor = _want(path, "bench.audit_factor", bench.get("audit_factor", 10), int, "an integer >= 2")
    threshold = _want(path, "bench.audit_threshold", bench.get("audit_threshold", 0.05), (int, float),
                      "a number in (0, 1)")
    if not margin > 0:
        raise ConfigError(f"{path}: bench.visibility_margin: must be > 0 (got {margin!r})")
    if factor < 2:
        raise ConfigError(f"{path}: bench.audit_factor: must be an integer >= 2 (got {factor!r})")
    if not 0 < threshold < 1:
        raise ConfigError(f"{path}: bench.audit_threshold: must be in (0, 1) (got {threshold!r})")
    suite_seed = _want(path, "bench.suite_seed", bench.get("suite_seed", 0), int, "an integer >= 0")
    if suite_seed < 0:
        raise ConfigError(f"{path}: bench.suite_seed: must be an integer >= 0 (got {suite_seed!r})")
    name = _want(path, "bench.name", bench.get("name", Path(path).stem), str, "a string")
    out = _want(path, "bench.out", bench.get("out", str(DEFAULT_OUT)), str, "a path")
    for section in ("run", "sampler"):
        for key, table in raw.get(section, {}).items():
            _want(path, f"{section}.{key}", table, dict, "a table")
    audit = raw.get("audit", {})
    for key, table in audit.items():
        if key not in AUDIT_KEYS:
            raise ConfigError(f"{path}: audit.{key}: unknown key{_suggest(key, AUDIT_KEYS)}; "
                              f"allowed: {', '.join(AUDIT_KEYS)} (tables over the audit sampler's settings)")
        _want(path, f"audit.{key}", table, dict, "a table")
    recipe = Recipe(
        name=name, suite_seed=suite_seed, classes=classes, samplers=samplers, generators=generators,
        full_batch_data=full_batch_data, out=out, base=raw.get("base", {}), run=raw.get("run", {}),
        sampler=raw.get("sampler", {}), size_classes=size_classes, path=str(path),
        visibility_margin=float(margin), audit_sampler=audit_sampler, audit_factor=factor,
        audit_threshold=float(threshold), audit=audit)
    # Validate every sampler's config once, at the edge, on a stand-in architecture.
    gens = list(generators)
    probe = Instance("probe", "probe", 0, (3, 2, 3), 1, gens[0], 0, 12, 1.0, 1000)
    for sampler in samplers:
        instance_config(recipe, probe, sampler)
    instance_config(recipe.audit_recipe(), probe, audit_sampler)
    return recipe


def load_recipe(path: str | Path | None = None, profile: str | None = None,
                instances: int | None = None) -> Recipe:
    path = Path(path) if path is not None else DEFAULT_SPEC
    try:
        raw = read_toml(path)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--config", "--spec", 1)) from None
    return parse_recipe(raw, str(path), profile, instances)


def instance_config(recipe: Recipe, inst: Instance, sampler: str, n: int | None = None) -> Config:
    """The validated Config of one (instance, sampler) run: base <- architecture <- sampler's run
    overrides; `n` replaces the instance's number of samples (the finite-n audit)."""
    raw = copy.deepcopy(recipe.base)
    hidden = list(inst.widths[1:-1])
    for key, value in {
        "data.n": inst.n if n is None else n, "data.in_dim": inst.widths[0], "data.out_dim": inst.widths[-1],
        "data.distribution": "uniform", "teacher.kind": "dln", "teacher.widths": hidden,
        "teacher.rank": inst.rank, "teacher.generator": inst.generator, "model.widths": hidden,
        "model.target_params": "none", "model.activation": "identity", "model.bias": False,
        "train.use_teacher": True, "run.seed": inst.seed, "run.samplers": [sampler],
    }.items():
        set_dotted(raw, key, value)
    raw["run"] = deep_merge(raw.get("run", {}), recipe.run.get(sampler, {}))
    if sampler in recipe.sampler:
        raw.setdefault("sampler", {})[sampler] = recipe.sampler[sampler]
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{recipe.path}: sampler {sampler}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Posteriors


def dln_per_sample_loss(unravel, widths: tuple[int, ...]):
    """½‖x M(w) − y‖² per row with M(w) = W_1 ⋯ W_L formed first (noise-free DLN NLL, σ = 1).

    Forming M(w) costs about H_in · d multiply-adds; it replaces m · d when pushing m rows through
    the layers, so it is used when that is cheaper (decided at trace time from the static shapes).
    """
    from llc_bench.models import kernels

    d = dln_num_parameters(widths)
    first = widths[0] * widths[1]

    def per_sample_loss(w, x, y):
        ws = kernels(unravel(w))
        m = x.shape[0]
        if widths[0] * (d - first) + m * widths[0] * widths[-1] < m * d:
            product = ws[0]
            for k in ws[1:]:
                product = product @ k
            pred = x @ product
        else:
            pred = x
            for k in ws:
                pred = pred @ k
        return 0.5 * ((y - pred) ** 2).sum(-1)

    return per_sample_loss


def sufficient_statistic_data(x, y) -> tuple[np.ndarray, np.ndarray]:
    """(X_c, Y_c) with H_in rows: mean_i ½‖y_ci − x_ci M‖² = mean over the n samples + a constant, for every M.

    Σ = XᵀX/n = L Lᵀ (Cholesky), C = XᵀY/n; X_c = √k Lᵀ, Y_c = √k L⁻¹ C with k = H_in rows, so
    X_cᵀX_c/k = Σ and X_cᵀY_c/k = C: the quadratic and linear terms in M agree exactly.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, k = x.shape
    chol = np.linalg.cholesky(x.T @ x / n)
    cross = x.T @ y / n
    x_c = math.sqrt(k) * chol.T
    y_c = math.sqrt(k) * np.linalg.solve(chol, cross)
    return x_c.astype(np.float32), y_c.astype(np.float32)


def build_posteriors(cfg: Config, target, full_batch_data: str = "sufficient_statistic"):
    """(posterior on the n samples, posterior for full-batch samplers): same nβ, γ and w*."""
    import jax.numpy as jnp

    from llc_bench.posterior import Posterior

    p = cfg.posterior
    loss = dln_per_sample_loss(target.unravel, target.widths)
    data_post = Posterior.build(loss, target.x, target.y, target.w_star, beta0=p.beta0, gamma=p.gamma,
                                prior_radius=p.prior_radius)
    if full_batch_data == "data":
        return data_post, data_post
    if cfg.data.noise != "none":
        raise ConfigError("bench.full_batch_data = 'sufficient_statistic' needs data.noise = 'none' "
                          "(the NLL must be ½‖r‖²)")
    x_c, y_c = sufficient_statistic_data(target.x, target.y)
    x_c, y_c = jnp.asarray(x_c), jnp.asarray(y_c)
    loss0 = float(jnp.mean(loss(target.w_star, x_c, y_c)))
    reduced = Posterior(loss, x_c, y_c, target.w_star, data_post.n_beta, data_post.gamma, loss0)
    return data_post, reduced


# ---------------------------------------------------------------------------------------------
# Running the suite


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def well_posedness(cfg: Config, target, n_beta: float, margin: float = DEFAULT_MARGIN) -> WellPosedness:
    """The record of a DLN target: its teacher's float64 layers, Σ_x = XᵀX/n of its own data."""
    from llc_bench.target import dln_teacher_layers64
    from llc_bench.wellposed import assess

    x = np.asarray(target.x, np.float64)
    return assess(dln_teacher_layers64(cfg), n_beta, x.T @ x / x.shape[0], margin)


def _record_fields(wp: WellPosedness | None) -> dict[str, Any]:
    if wp is None:
        return {}
    return {"well_posed": "yes" if wp.well_posed else "no", "truth": wp.truth, "aoyagi": wp.aoyagi,
            "lambda_r_eff": wp.lambda_r_eff, "local_lower": wp.local_lower, "r_eff": wp.r_eff,
            "sv_min": wp.sv_min, "sv_max": wp.sv_max, "layer_ranks": "-".join(map(str, wp.layer_ranks)),
            "posedness": wp.reason or "well-posed"}


def result_row(inst: Instance, sampler: str, summary: dict, *, n_beta: float, data_rows: int,
               recipe_hash: str, record: WellPosedness | None = None) -> dict[str, str]:
    """One CSV row from run_sampler's summary dict (rel_error is against `truth`, empty when unknown)."""
    codes = sorted({w.split(":", 1)[0] for w in summary.get("warnings", [])})
    row = {
        "instance": inst.name, "class": inst.size_class, "widths": "-".join(map(str, inst.widths)),
        "rank": inst.rank, "generator": inst.generator, "truth": None, "sampler": sampler,
        "llc_mean": summary.get("llc_mean"), "llc_se": summary.get("llc_se"),
        "rel_error": summary.get("rel_error"), "grad_evals": summary.get("grad_evals"),
        "wall_s": summary.get("wall_s"), "wnv_time": summary.get("wnv_time"),
        "wnv_grad": summary.get("wnv_grad"), "status": summary.get("status", "failed"),
        "aoyagi": inst.aoyagi, **_record_fields(record),
        "d": inst.d, "n": inst.n, "n_beta": n_beta, "compile_s": summary.get("compile_s"),
        "chains_used": summary.get("chains_used"), "data_rows": data_rows,
        "warnings": ";".join(codes), "recipe": recipe_hash,
    }
    return {k: _fmt(row.get(k)) for k in COLUMNS}


def failed_row(inst: Instance, sampler: str, message: str, recipe_hash: str,
               record: WellPosedness | None = None) -> dict[str, str]:
    row = result_row(inst, sampler, {"status": "failed"}, n_beta=math.nan, data_rows=0, recipe_hash=recipe_hash,
                     record=record)
    row["warnings"] = "error: " + " ".join(message.split())[:300]
    return row


class Scoreboard:
    """The CSV: resumable, one fsync'd row at a time. Each row records the hash of the recipe of its
    sampler (`hashes`); rows of a sampler whose recipe changed since are stale: refused, or with
    `rerun_stale` moved to <name>.stale.csv so that they are computed again."""

    def __init__(self, path: Path, hashes: dict[str, str], columns: tuple[str, ...] = COLUMNS,
                 rerun_stale: bool = False, log=print):
        self.path = Path(path)
        self.hashes = hashes
        self.columns = columns
        self.done: set[tuple[str, str]] = set()
        if self.path.exists():
            self._load(rerun_stale, log)

    def _load(self, rerun_stale: bool, log) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a write cut short: drop the torn line
            data = data[: data.rfind(b"\n") + 1]
            with self.path.open("r+b") as fh:
                fh.truncate(len(data))
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        if data and tuple(csv.reader(io.StringIO(data.decode().split("\n", 1)[0])).__next__()) != self.columns:
            raise ConfigError(f"{self.path}: written by a different version of the benchmark (columns "
                              "differ); use another --out or delete the file")
        stale = [r for r in rows if r["sampler"] in self.hashes and r["recipe"] != self.hashes[r["sampler"]]]
        if stale and not rerun_stale:
            names = ", ".join(dict.fromkeys(r["sampler"] for r in stale))
            raise ConfigError(f"{self.path}: holds {len(stale)} rows of another recipe for {names}; pass "
                              "--rerun-stale to compute them again (the old rows move to "
                              f"{self.path.stem}.stale.csv), or use another --out")
        if stale:
            aside = self.path.with_name(self.path.stem + ".stale.csv")
            with aside.open("a", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=self.columns, lineterminator="\n")
                if fh.tell() == 0:
                    writer.writeheader()
                writer.writerows(stale)
            keep = [r for r in rows if r not in stale]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(keep)
            _atomic_write_text(self.path, buf.getvalue())
            log(f"--rerun-stale: {len(stale)} rows of another recipe moved to {aside}")
            rows = keep
        self.done = {(r["instance"], r["sampler"]) for r in rows}

    def append(self, row: dict[str, str]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow(row)
        with self.path.open("a") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        self.done.add((row["instance"], row["sampler"]))


def _build_instance(recipe: Recipe, inst: Instance, sampler: str, n: int | None = None, cfg: Config | None = None):
    """(config, target, posterior on the n samples, posterior for full-batch samplers, record);
    `cfg`: the instance_config of (inst, sampler, n) when the caller already has it."""
    from llc_bench.target import build_target

    cfg = cfg if cfg is not None else instance_config(recipe, inst, sampler, n)
    target = build_target(cfg)
    if target.truth is None or abs(target.truth - inst.aoyagi) > 1e-9 * max(1.0, inst.aoyagi):
        raise RuntimeError(f"target truth {target.truth} differs from the instance's {inst.aoyagi}")
    data_post, reduced_post = build_posteriors(cfg, target, recipe.full_batch_data)
    record = well_posedness(cfg, target, data_post.n_beta, recipe.visibility_margin)
    return cfg, target, data_post, reduced_post, record


def run_instance(recipe: Recipe, inst: Instance, samplers: list[str], board: Scoreboard,
                 progress: bool = False, log=print) -> None:
    """Build the instance's target once and run each of `samplers` on it, one CSV row each."""
    from llc_bench.experiment import run_sampler

    try:
        cfgs = {name: instance_config(recipe, inst, name) for name in samplers}
        _, _, data_post, reduced_post, record = _build_instance(recipe, inst, samplers[0], cfg=cfgs[samplers[0]])
    except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the benchmark
        for name in samplers:
            board.append(failed_row(inst, name, f"{type(exc).__name__}: {exc}", board.hashes[name]))
            log(f"  {inst.name} {name}: FAILED building the instance: {exc}")
        return
    log(f"  {inst.name}: σ(M*) in [{record.sv_min:.3g}, {record.sv_max:.3g}], r_eff {record.r_eff}/{record.rank}, "
        f"rank(H)/2 = {record.local_lower:g}, λ = {record.aoyagi:g}: "
        + ("well-posed" if record.well_posed else record.reason))
    for name in samplers:
        post = reduced_post if full_batch(name) else data_post
        start = time.perf_counter()
        try:
            run = run_sampler(cfgs[name], name, post, truth=record.truth, progress=progress)
            row = result_row(inst, name, run.summary, n_beta=post.n_beta, data_rows=post.n,
                             recipe_hash=board.hashes[name], record=record)
        except Exception as exc:  # noqa: BLE001
            row = failed_row(inst, name, f"{type(exc).__name__}: {exc}", board.hashes[name], record)
        board.append(row)
        rel = row["rel_error"]
        rel_text = f"{float(rel):+.1%}" if rel else "n/a"
        log(f"  {inst.name:8s} {name:15s} λ̂={row['llc_mean'] or 'n/a':>9s} λ={inst.aoyagi:8.1f} "
            f"rel={rel_text:>7s} {row['status']:8s} {time.perf_counter() - start:6.1f}s "
            f"{row['warnings']}")


def _suite_and_todo(recipe: Recipe, board: Scoreboard, samplers) -> tuple[list[Instance], list]:
    suite = make_suite(recipe.classes, recipe.suite_seed, recipe.generators, recipe.size_classes)
    todo = [(inst, [s for s in samplers if (inst.name, s) not in board.done]) for inst in suite]
    return suite, [(inst, names) for inst, names in todo if names]


def run_bench(recipe: Recipe, out_dir: str | Path, progress: bool = False, log=print,
              figures: bool = True, audit: bool = False, rerun_stale: bool = False) -> Path:
    """Run every (instance, sampler) row not yet in the CSV (and, with `audit`, every audit row),
    then write the summary and figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    board = Scoreboard(out / CSV_NAME, recipe.fingerprints(), rerun_stale=rerun_stale, log=log)
    suite, todo = _suite_and_todo(recipe, board, recipe.samplers)
    total_rows = len(suite) * len(recipe.samplers)
    log(f"bench {recipe.name}: {len(suite)} instances x {len(recipe.samplers)} samplers = {total_rows} rows "
        f"({total_rows - sum(len(n) for _, n in todo)} already in {board.path}); recipe {recipe.fingerprint()}")
    start = time.perf_counter()
    for k, (inst, names) in enumerate(todo):
        log(f"[{k + 1}/{len(todo)}] {inst.name} widths {'-'.join(map(str, inst.widths))} rank {inst.rank} "
            f"{inst.generator} d={inst.d} λ={inst.aoyagi:g}  ({time.perf_counter() - start:.0f}s elapsed)")
        run_instance(recipe, inst, names, board, progress=progress, log=log)
    log(f"sampling done in {time.perf_counter() - start:.0f}s")
    if audit:
        run_audit(recipe, out, progress=progress, log=log, rerun_stale=rerun_stale)
    write_report(recipe, out, figures=figures, log=log)
    return board.path


def write_report(recipe: Recipe, out: Path, figures: bool = True, log=print) -> str:
    """summary.md (and the figures) from the CSVs in `out`, restricted to the recipe's suite."""
    suite = make_suite(recipe.classes, recipe.suite_seed, recipe.generators, recipe.size_classes)
    names = {inst.name for inst in suite}
    rows = [r for r in read_scoreboard(out / CSV_NAME) if r["instance"] in names and r["sampler"] in recipe.samplers]
    audit_path = out / AUDIT_CSV_NAME
    audit_rows = [r for r in read_audit(audit_path) if r["instance"] in names] if audit_path.exists() else []
    text = summary_markdown(rows, recipe, audit_rows=audit_rows)
    _atomic_write_text(out / "summary.md", text)
    log(text)
    if figures:
        write_figures(rows, out)
    return text


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Finite-n audit


def run_audit(recipe: Recipe, out: Path, progress: bool = False, log=print, rerun_stale: bool = False) -> Path:
    """Rerun the audit sampler at audit_factor × n on every instance whose row at n exists; one
    row each in finite_n_audit.csv (resumable), flagged when |λ̂(kn)/λ̂(n) − 1| > audit_threshold."""
    from llc_bench.experiment import run_sampler

    name = recipe.audit_sampler
    base = {r["instance"]: r for r in read_scoreboard(out / CSV_NAME) if r["sampler"] == name}
    board = Scoreboard(out / AUDIT_CSV_NAME, {name: recipe.audit_fingerprint()}, AUDIT_COLUMNS,
                       rerun_stale=rerun_stale, log=log)
    suite, todo = _suite_and_todo(recipe, board, [name])
    todo = [inst for inst, _ in todo if inst.name in base]
    log(f"finite-n audit: {name} at {recipe.audit_factor} x n on {len(todo)} instances "
        f"({len(suite) - len(todo)} done or without a row at n)")
    for inst in todo:
        start = time.perf_counter()
        ref = base[inst.name]
        row = {"instance": inst.name, "class": inst.size_class, "sampler": name, "well_posed": ref["well_posed"],
               "aoyagi": inst.aoyagi, "n": inst.n, "llc_n": ref["llc_mean"], "llc_se_n": ref["llc_se"],
               "n_audit": inst.n * recipe.audit_factor, "recipe": board.hashes[name]}
        try:
            cfg, _, _, reduced_post, _ = _build_instance(recipe.audit_recipe(), inst, name,
                                                         inst.n * recipe.audit_factor)
            summary = run_sampler(cfg, name, reduced_post, progress=progress).summary
            llc, status = summary.get("llc_mean"), summary.get("status", "failed")
            row.update(llc_audit=llc, llc_se_audit=summary.get("llc_se"), status_audit=status)
        except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the audit
            llc, status = None, "failed"
            row.update(status_audit=f"failed: {' '.join(str(exc).split())[:200]}")
        ok = llc is not None and math.isfinite(ref["llc_mean"]) and ref["llc_mean"] != 0
        shift = llc / ref["llc_mean"] - 1 if ok else None
        row.update(shift=shift, flagged="yes" if shift is None or abs(shift) > recipe.audit_threshold else "no")
        board.append({k: _fmt(row.get(k)) for k in AUDIT_COLUMNS})
        log(f"  audit {inst.name:16s} λ̂(n)={ref['llc_mean']:.4g} λ̂({recipe.audit_factor}n)="
            f"{'n/a' if llc is None else f'{llc:.4g}'} shift={'n/a' if shift is None else f'{shift:+.1%}'} "
            f"{status} {time.perf_counter() - start:.1f}s")
    return board.path


AUDIT_NUMERIC = {"aoyagi", "n", "llc_n", "llc_se_n", "n_audit", "llc_audit", "llc_se_audit", "shift"}


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    return _read_csv(path, AUDIT_NUMERIC)


# ---------------------------------------------------------------------------------------------
# Summary table and figures


SCOREBOARD_NUMERIC = {"truth", "llc_mean", "llc_se", "rel_error", "grad_evals", "wall_s", "wnv_time",
                      "wnv_grad", "rank", "d", "n", "n_beta", "compile_s", "chains_used", "data_rows", "aoyagi",
                      "lambda_r_eff", "local_lower", "r_eff", "sv_min", "sv_max"}


def read_scoreboard(path: str | Path) -> list[dict[str, Any]]:
    return _read_csv(path, SCOREBOARD_NUMERIC)


def _read_csv(path: str | Path, numeric: set[str]) -> list[dict[str, Any]]:
    """CSV rows with the `numeric` columns as floats (NaN where empty)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for key in numeric:
            r[key] = float(r[key]) if r.get(key) not in (None, "") else math.nan
    return rows


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 pairs."""
    import pandas as pd

    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 3:
        return math.nan
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (sampler, class): counts, median and 90th-percentile |relative error|, Spearman(λ̂, λ), medians of cost.

    Error statistics use the rows with a number; failed rows count in `failed` and make the
    sampler miss its targets (a failed instance is not a small error).
    """
    out = []
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    for s in samplers:
        for c in classes:
            sub = [r for r in rows if r["sampler"] == s and r["class"] == c]
            if not sub:
                continue
            good = [r for r in sub if math.isfinite(r["llc_mean"]) and math.isfinite(r["rel_error"])]
            abs_err = np.abs([r["rel_error"] for r in good])
            out.append({
                "sampler": s, "class": c, "instances": len(sub), "failed": len(sub) - len(good),
                "flagged": sum(r["status"] in ("warnings", "not_converged", "diverged") for r in sub),
                "median_abs_rel": float(np.median(abs_err)) if good else math.nan,
                "p90_abs_rel": float(np.quantile(abs_err, 0.9)) if good else math.nan,
                "spearman": spearman([r["llc_mean"] for r in good], [r["truth"] for r in good]),
                "median_grad_evals": float(np.median([r["grad_evals"] for r in good])) if good else math.nan,
                "median_wall_s": float(np.median([r["wall_s"] for r in good])) if good else math.nan,
            })
    return out


def meets_targets(entry: dict[str, Any]) -> bool:
    median, p90, rho = targets_for(entry["sampler"])
    return (entry["failed"] == 0 and entry["median_abs_rel"] <= median
            and entry["p90_abs_rel"] <= p90 and entry["spearman"] >= rho)


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}%"


def is_scored(row: dict[str, Any]) -> bool:
    """A row enters the headline score only when its instance is well-posed (a truth is known)."""
    return row.get("well_posed") == "yes" and math.isfinite(row["truth"])


RULE_TEXT = (
    "Which rows are scored. Aoyagi's λ is the learning coefficient of the whole set of true parameters. "
    "It is the answer a sampler should read at a given teacher and n only if (1) every direction of the "
    "teacher's end-to-end map is *visible*: dropping direction i costs ½·nβ·σ_i²·u_iᵀΣ_x u_i, at least "
    "{margin:g}× the free energy (λ(i) − λ(i−1))·log nβ gained by dropping it (else the posterior sits at "
    "the lower rank r_eff and reads about λ(r_eff)); and (2) the local λ at the teacher is the global one: "
    "every layer has rank exactly r (a layer of larger rank puts the teacher on a less singular stratum, "
    "whose local λ is at least max(λ, rank(H)/2) and not known in closed form). Rows of instances meeting "
    "both are *well-posed*: the CSV's `truth` is Aoyagi's λ and they make the headline table. The rest "
    "have an empty `truth` and are listed apart with the three candidate values.")


def summary_markdown(rows: list[dict[str, Any]], recipe: Recipe | None = None, worst: int = 3,
                     audit_rows: list[dict[str, Any]] | None = None) -> str:
    """The headline table over well-posed rows, the verdict against the targets, the worst rows of
    each miss, the unscored instances side by side with their candidate values, and the audit."""
    scored = [r for r in rows if is_scored(r)]
    others = [r for r in rows if not is_scored(r)]
    table = summarize(scored)
    margin = recipe.visibility_margin if recipe is not None else DEFAULT_MARGIN
    lines = []
    if recipe is not None:
        gens = (", ".join(f"{n} {g}" for g, n in recipe.generators.items()) + " per class"
                if isinstance(recipe.generators, dict) else "generators " + ", ".join(recipe.generators))
        lines.append(f"DLN scoreboard `{recipe.name}` (recipe {recipe.fingerprint()}): "
                     + ", ".join(f"{n} x {c}" for c, n in recipe.classes.items()) + f" instances ({gens}).\n")
    instances = {r["instance"]: r for r in rows}
    well = sum(r.get("well_posed") == "yes" for r in instances.values())
    lines += [f"Well-posed instances (scored): {well} of {len(instances)}.", "", RULE_TEXT.format(margin=margin), "",
              "| sampler | class | inst. | failed | flagged | median \\|rel err\\| | p90 \\|rel err\\| | Spearman | "
              "median grad evals | median seconds | targets |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    # a class whose run is not complete gets no verdict: its first instances need not be typical
    expected = dict(recipe.classes) if recipe is not None else {}
    done = {(r["sampler"], r["class"]) for r in rows}
    run_count = {key: len({r["instance"] for r in rows if (r["sampler"], r["class"]) == key}) for key in done}

    def partial(e) -> bool:
        return run_count.get((e["sampler"], e["class"]), 0) < expected.get(e["class"], 0)

    def verdict(e) -> str:
        word = "met" if meets_targets(e) else "missed"
        return f"partial run, {word} so far" if partial(e) else word

    for e in table:
        rho = "n/a" if not math.isfinite(e["spearman"]) else f"{e['spearman']:.3f}"
        lines.append(
            f"| {e['sampler']} | {e['class']} | {e['instances']} | {e['failed']} | {e['flagged']} | "
            f"{_pct(e['median_abs_rel'])} | {_pct(e['p90_abs_rel'])} | {rho} | {e['median_grad_evals']:.4g} | "
            f"{e['median_wall_s']:.3g} | {verdict(e)} |")
    lines.append("")
    (fm, fp, fr), (sm, sp, sr) = TARGETS["full_batch"], TARGETS["sg"]
    lines.append(f"Targets (well-posed rows only): full-batch samplers median |rel err| <= {fm:.0%}, p90 <= "
                 f"{fp:.0%}, Spearman >= {fr}; SG samplers {sm:.0%}, {sp:.0%}, {sr}. `flagged` = rows whose "
                 "health checks raised warnings, found them not converged or lost chains; seconds exclude compilation.")
    for c in dict.fromkeys(e["class"] for e in table):
        incomplete = [e for e in table if e["class"] == c and partial(e)]
        if incomplete:
            counts = ", ".join(f"{e['sampler']} {run_count[(e['sampler'], c)]}" for e in incomplete)
            lines.append(f"- {c}: partial run ({counts} of {expected[c]} instances so far): no verdict.")
            continue
        best = [e for e in table if e["class"] == c and meets_targets(e)]
        lines.append(f"- {c}: " + (f"met by {', '.join(e['sampler'] for e in best)}." if best else
                                   "no sampler meets all three targets."))
    missed = [e for e in table if not meets_targets(e)]
    if missed:
        lines += ["", "Worst well-posed rows of each sampler/class that missed, with the health-check verdicts. A λ̂ near "
                  "rank(H)/2 below λ is the quadratic plateau: only the regular directions have equilibrated.", ""]
        for e in missed:
            sub = [r for r in scored if r["sampler"] == e["sampler"] and r["class"] == e["class"]]
            sub.sort(key=lambda r: -abs(r["rel_error"]) if math.isfinite(r["rel_error"]) else -math.inf)
            for r in sub[:worst]:
                rel = _pct(r["rel_error"]) if math.isfinite(r["rel_error"]) else "n/a"
                lines.append(f"- {e['sampler']} {r['instance']} (widths {r['widths']}, rank {int(r['rank'])}, "
                             f"{r['generator']}): λ̂ = {r['llc_mean']:.4g} vs λ = {r['truth']:.4g} ({rel}; "
                             f"rank(H)/2 = {_num(r['local_lower'], 'g')}), "
                             f"status {r['status']}" + (f", {r['warnings']}" if r["warnings"] else ""))
    lines += _flag_validity(scored)
    lines += _unscored_table(others)
    lines += _audit_lines(audit_rows or [], recipe)
    return "\n".join(lines) + "\n"


BAD_ERROR = 0.10  # a scored row is "bad" when |rel err| exceeds this


def flag_validity(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How well each health flag, and "any flag" (status not ok), finds the scored rows with
    |rel err| > BAD_ERROR: recall = bad rows flagged / bad rows, precision = bad rows flagged / rows flagged."""
    rows = [r for r in rows if math.isfinite(r["rel_error"])]
    bad = [abs(r["rel_error"]) > BAD_ERROR for r in rows]
    codes = sorted({c for r in rows for c in r["warnings"].split(";") if c and not c.startswith("error")})
    tests = [("any flag", [r["status"] != "ok" for r in rows])]
    tests += [(c, [c in r["warnings"].split(";") for r in rows]) for c in codes]
    out = []
    for name, hits in tests:
        caught = sum(h and b for h, b in zip(hits, bad, strict=True))
        out.append({"flag": name, "flagged": sum(hits), "bad": sum(bad), "caught": caught,
                    "recall": caught / sum(bad) if any(bad) else math.nan,
                    "precision": caught / sum(hits) if any(hits) else math.nan})
    return out


def _flag_validity(rows: list[dict[str, Any]]) -> list[str]:
    table = flag_validity(rows)
    if not table or not table[0]["bad"] and not table[0]["flagged"]:
        return []
    lines = ["", f"Do the health checks find the bad rows? Over the {len(rows)} scored rows, {table[0]['bad']} are off "
             f"by more than {BAD_ERROR:.0%}. Recall = bad rows a flag caught / bad rows; precision = bad rows "
             "among the rows it flagged.", "",
             "| flag | rows flagged | bad rows caught | recall | precision |", "|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['flag']} | {e['flagged']} | {e['caught']} | {_pct(e['recall'])} | {_pct(e['precision'])} |")
    return lines


def _unscored_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    lines = ["", "Not scored (not well-posed): λ̂ beside Aoyagi's λ, λ(r_eff) and the local lower bound "
             "rank(H)/2.", "",
             "| instance | generator | widths | r | r_eff | σ_min(M*) | λ (Aoyagi) | λ(r_eff) | rank(H)/2 | "
             + " | ".join(f"{s} λ̂" for s in samplers) + " | why |",
             "|---" * (9 + len(samplers) + 1) + "|"]
    by_instance: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_instance.setdefault(r["instance"], {})[r["sampler"]] = r
    for inst, per in by_instance.items():
        r = next(iter(per.values()))
        ests = [f"{per[s]['llc_mean']:.4g}" if s in per and math.isfinite(per[s]["llc_mean"]) else "n/a"
                for s in samplers]
        lines.append(f"| {inst} | {r['generator']} | {r['widths']} | {int(r['rank'])} | {_num(r['r_eff'], 'd')} | "
                     f"{_num(r['sv_min'], '.2g')} | {_num(r['aoyagi'], 'g')} | {_num(r['lambda_r_eff'], 'g')} | "
                     f"{_num(r['local_lower'], 'g')} | " + " | ".join(ests) + f" | {r.get('posedness') or 'n/a'} |")
    lines += ["", "Median signed error of the unscored rows against each candidate value:", "",
              "| sampler | rows | vs λ (Aoyagi) | vs λ(r_eff) | vs rank(H)/2 |", "|---|---|---|---|---|"]
    for s in samplers:
        sub = [r for r in rows if r["sampler"] == s and math.isfinite(r["llc_mean"])]
        cells = []
        for key in ("aoyagi", "lambda_r_eff", "local_lower"):
            errs = [r["llc_mean"] / r[key] - 1 for r in sub if math.isfinite(r[key]) and r[key] > 0]
            cells.append(_pct(float(np.median(errs))) if errs else "n/a")
        lines.append(f"| {s} | {len(sub)} | " + " | ".join(cells) + " |")
    return lines


def _audit_lines(audit_rows: list[dict[str, Any]], recipe: Recipe | None) -> list[str]:
    if not audit_rows:
        return []
    factor = recipe.audit_factor if recipe is not None else int(audit_rows[0]["n_audit"] / audit_rows[0]["n"])
    threshold = recipe.audit_threshold if recipe is not None else 0.05
    flagged = [r for r in audit_rows if r["flagged"] == "yes"]
    headline = [r for r in flagged if r["well_posed"] == "yes"]
    lines = ["", f"Finite-n audit ({audit_rows[0]['sampler']} rerun at {factor} × n; flagged when λ̂ moves by more "
             f"than {threshold:.0%}): {len(audit_rows)} instances audited, {len(flagged)} flagged "
             f"(well-posed among them: {len(headline)})."]
    if flagged:
        lines += ["", "| instance | well-posed | λ (Aoyagi) | λ̂ at n | λ̂ at audit n | shift |", "|---|---|---|---|---|---|"]
        for r in flagged:
            shift = _pct(r["shift"]) if math.isfinite(r["shift"]) else "n/a"
            lines.append(f"| {r['instance']} | {r['well_posed']} | {r['aoyagi']:g} | {_num(r['llc_n'], '.4g')} | "
                         f"{_num(r['llc_audit'], '.4g')} | {shift} |")
    return lines


def _num(x: float, spec: str) -> str:
    if not math.isfinite(x):
        return "n/a"
    return format(int(x), spec) if spec == "d" else format(x, spec)


def write_figures(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """llc_vs_truth.png (log-log, y = x), rel_error.png (per sampler), wnv.png (per sampler)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(samplers)}
    markers = dict(zip(classes, "os^Dvx", strict=False))
    good = [r for r in rows if math.isfinite(r["llc_mean"]) and r["llc_mean"] > 0]
    paths = []

    fig, ax = plt.subplots(figsize=(6.5, 6))
    for r in good:
        scored = is_scored(r)
        ax.scatter(r["aoyagi"], r["llc_mean"], marker=markers.get(r["class"], "o"), s=22,
                   color=colors[r["sampler"]] if scored else "none", edgecolors=None if scored else colors[r["sampler"]],
                   alpha=0.75 if scored else 0.5, linewidths=0 if scored else 0.8)
    values = [r["aoyagi"] for r in rows if math.isfinite(r["aoyagi"])] + [r["llc_mean"] for r in good]
    lo, hi = (min(values) / 1.5, max(values) * 1.5) if values else (1, 10)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="λ (Aoyagi)",
           ylabel="estimated λ̂", title="DLN scoreboard: estimated vs analytic LLC")
    handles = [plt.Line2D([], [], color=colors[s], marker="o", ls="", label=s) for s in samplers]
    handles += [plt.Line2D([], [], color="gray", marker=markers[c], ls="", label=f"class {c}") for c in classes]
    handles += [plt.Line2D([], [], color="gray", marker="o", ls="", label="well-posed (scored)"),
                plt.Line2D([], [], color="gray", marker="o", mfc="none", ls="", label="not well-posed")]
    ax.legend(handles=handles + [plt.Line2D([], [], color="k", ls="--", label="y = x")], fontsize=8)
    paths.append(_savefig(fig, out / "llc_vs_truth.png"))

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(samplers) * max(1, len(classes))), 4.5))
    data, labels, cols = [], [], []
    for s in samplers:
        for c in classes:
            vals = [r["rel_error"] for r in rows if r["sampler"] == s and r["class"] == c and is_scored(r)
                    and math.isfinite(r["rel_error"])]
            data.append(vals or [math.nan])
            labels.append(f"{s}\n{c}")
            cols.append(colors[s])
    positions = np.arange(len(data))
    bp = ax.boxplot([d for d in data], positions=positions, widths=0.6, showfliers=False, patch_artist=True)
    for patch, col in zip(bp["boxes"], cols, strict=True):
        patch.set(facecolor=col, alpha=0.35)
    jitter = np.random.default_rng(0)
    for p, vals, col in zip(positions, data, cols, strict=True):
        ax.scatter(p + jitter.uniform(-0.15, 0.15, len(vals)), vals, color=col, s=10, zorder=3)
    ax.axhspan(-TARGET_MEDIAN, TARGET_MEDIAN, color="green", alpha=0.1, label=f"±{TARGET_MEDIAN:.0%}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xticks(positions, labels, fontsize=8)
    ax.set(ylabel="relative error (λ̂ − λ)/λ  (symlog)", title="Relative error per sampler and class (well-posed)")
    ax.legend(fontsize=8)
    paths.append(_savefig(fig, out / "rel_error.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "wnv_grad", "WNV = SE² × gradient evaluations"),
                           (axes[1], "wnv_time", "WNV = SE² × seconds")):
        vals = [[r[key] for r in rows if r["sampler"] == s and math.isfinite(r[key]) and r[key] > 0]
                or [math.nan] for s in samplers]
        bp = ax.boxplot(vals, positions=np.arange(len(samplers)), showfliers=True, patch_artist=True)
        for patch, s in zip(bp["boxes"], samplers, strict=True):
            patch.set(facecolor=colors[s], alpha=0.4)
        ax.set_xticks(np.arange(len(samplers)), samplers, fontsize=8, rotation=20)
        ax.set(yscale="log", title=label, ylabel="lower is better")
    fig.suptitle("Work-normalized variance per sampler (all classes)")
    paths.append(_savefig(fig, out / "wnv.png"))
    return paths


def _savefig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)  # a reader never sees a half-written figure
    return path


# ---------------------------------------------------------------------------------------------
# Entry point


def main(args) -> int:
    """`main.py bench [--spec FILE] [--profile NAME] [--out DIR] [--instances N] [--audit]
    [--rerun-stale] [--summary-only] [--no-progress]`."""
    from llc_bench.cli import check_writable
    from llc_bench.progress import progress_enabled

    recipe = load_recipe(getattr(args, "spec", None), getattr(args, "profile", None),
                         getattr(args, "instances", None))
    if getattr(args, "summary_only", False):
        out = Path(getattr(args, "out", None) or recipe.out)
        if not (out / CSV_NAME).is_file():
            raise ConfigError(f"--summary-only: no {CSV_NAME} in {out}")
        write_report(recipe, out)
        return 0
    out = check_writable(getattr(args, "out", None) or recipe.out)
    run_bench(recipe, out, progress=progress_enabled(not getattr(args, "no_progress", False)),
              audit=getattr(args, "audit", False), rerun_stale=getattr(args, "rerun_stale", False))
    return 0


if __name__ == "__main__":
    from llc_bench.cli import main as _cli_main

    sys.exit(_cli_main(["bench", *sys.argv[1:]]))
