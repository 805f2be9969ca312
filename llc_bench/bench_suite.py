"""The DLN scoreboard's suite and recipe: size classes, seeded instances, and the recipe that fixes every sampler's settings.

Size classes by parameter count (Lau et al., AISTATS 2025, App. E.2); an instance draws its depth
and widths from its class's ranges until the count lies in the class's range, then a rank-r teacher
from one of the generators (`chained`, `rand_rank`, `deepest`; llc_bench.models.dln_teacher_layers).
The recipe (configs/bench_dln.toml) fixes every sampler's settings once: nothing is tuned per
instance beyond what a sampler adapts by itself (HMC window adaptation, the MCLMC tuners).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llc_bench.artifacts import canonical_hash
from llc_bench.config import (
    PRESET_DIR,
    Config,
    _suggest,
    deep_merge,
    from_dict,
    read_toml,
    set_dotted,
)
from llc_bench.samplers import SAMPLER_NAMES, get_spec
from llc_bench.samplers.base import AT_LEAST_ONE, OPEN_UNIT, POSITIVE, Range
from llc_bench.truth import dln_learning_coefficient, dln_num_parameters
from llc_bench.types import ConfigError
from llc_bench.wellposed import DEFAULT_MARGIN

DEFAULT_SPEC = PRESET_DIR / "bench_dln.toml"
DEFAULT_OUT = Path("results/benchmarks")
DLN_GENERATORS = ("chained", "rand_rank", "deepest")


def full_batch(sampler: str) -> bool:
    """The sampler takes exact full-data gradients (its spec says so): it gets the reduced posterior.
    A name outside the registry (a row label of another table) counts as an SG sampler."""
    return sampler in SAMPLER_NAMES and not get_spec(sampler).minibatch


def full_batch_samplers() -> tuple[str, ...]:
    return tuple(name for name in SAMPLER_NAMES if full_batch(name))


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
        return canonical_hash(material)

    def fingerprints(self) -> dict[str, str]:
        return {name: self.fingerprint(name) for name in self.samplers}

    def audit_fingerprint(self) -> str:
        return canonical_hash([self.fingerprint(self.audit_sampler), self.audit_factor, self.audit])

    def audit_recipe(self) -> Recipe:
        """This recipe with the [audit] overrides merged into the audit sampler's settings."""
        name = self.audit_sampler
        sampler, run = dict(self.sampler), dict(self.run)
        sampler[name] = deep_merge(sampler.get(name, {}), self.audit.get("sampler", {}))
        run[name] = deep_merge(run.get(name, {}), self.audit.get("run", {}))
        return dataclasses.replace(self, sampler=sampler, run=run, audit={})


def _want(path: str, key: str, value: Any, kind: type | tuple, what: str) -> Any:
    """`value` if it is of `kind` (bool never counts as a number), else a one-line ConfigError."""
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{path}: {key}: must be {what} (got {value!r})")
    return value


def _names(path: str, key: str, value: Any, known, what: str) -> tuple[str, ...]:
    """A non-empty list of known names."""
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


INTEGER, NUMBER = "an integer", "a number"
NON_NEGATIVE, AT_LEAST_TWO = Range(0, low_closed=True), Range(2, low_closed=True)


def _bounded(where: str, value: Any, kind: str, allowed: Range) -> Any:
    """`value` if it is `kind` (INTEGER, or any finite NUMBER; never a bool) and `allowed` (the Range
    sampler settings check their fields with) admits it, else one-line ConfigError
    "<where>: must be <kind> <range> (got value)"."""
    right_type = isinstance(value, int) if kind == INTEGER else isinstance(value, int | float)
    if isinstance(value, bool) or not right_type or not allowed.allows(value):
        raise ConfigError(f"{where}: must be {kind} {allowed.text()} (got {value!r})")
    return value


def _count(path: str, key: str, value: Any) -> int:
    return _bounded(f"{path}: {key}", value, INTEGER, NON_NEGATIVE)


def _size_class(path: str, name: str, base: SizeClass, table: Any) -> SizeClass:
    _want(path, f"class.{name}", table, dict, "a table of class fields")
    fields = vars(base).copy()
    allowed = [k for k in fields if k != "name"]
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{path}: class.{name}.{key}: unknown key; allowed: {', '.join(allowed)}")
        # n >= 2: a sample variance needs two points
        fields[key] = _bounded(f"{path}: class.{name}.{key}", value, INTEGER, AT_LEAST_TWO if key == "n" else POSITIVE)
    for lo, hi in (("min_params", "max_params"), ("min_layers", "max_layers"), ("min_width", "max_width")):
        if fields[lo] > fields[hi] or (lo == "min_params" and fields[lo] == fields[hi]):
            raise ConfigError(f"{path}: class.{name}: {lo} = {fields[lo]} must be below {hi} = {fields[hi]}")
    return SizeClass(**fields)


def _suite_counts(path: str, bench: dict, class_names: tuple[str, ...], instances: int | None
                  ) -> tuple[tuple[str, ...] | dict[str, int], dict[str, int]]:
    """(generators, instances per class) from bench.generators / bench.instances and --instances."""
    if instances is not None:
        _bounded("--instances", instances, INTEGER, AT_LEAST_ONE)
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
    return generators, classes


def _profile_table(path: str, profiles: dict, name: str, chain: tuple[str, ...]) -> dict:
    """[profile.<name>] with the profile it `extends` (recursively) merged under it."""
    if name not in profiles:
        where = f"profile.{chain[-1]}.extends" if chain else "profile"
        raise ConfigError(f"{path}: {where}: unknown profile {name!r}{_suggest(name, profiles)}; "
                          f"defined: {', '.join(profiles) or 'none'}")
    if name in chain:
        raise ConfigError(f"{path}: profile.{chain[-1]}.extends: profiles extend each other in a cycle "
                          f"({' -> '.join((*chain, name))})")
    table = dict(profiles[name])
    base = table.pop("extends", None)
    if base is None:
        return table
    _want(path, f"profile.{name}.extends", base, str, "the name of another profile")
    return deep_merge(_profile_table(path, profiles, base, (*chain, name)), table)


def parse_recipe(raw: dict, path: str = "<recipe>", profile: str | None = None,
                 instances: int | None = None) -> Recipe:
    """A Recipe from the TOML dict; `profile` merges [profile.<name>] over the rest first, and under it
    the profile its `extends` key names, if any (and so on up).

    Every key is checked here, before any work: a bad one is a one-line ConfigError naming it.
    """
    raw = copy.deepcopy(raw)
    profiles = _want(path, "profile", raw.pop("profile", {}), dict, "a table of profiles")
    for name, table in profiles.items():
        _want(path, f"profile.{name}", table, dict, "a table (the recipe keys it overrides)")
    if profile is not None:
        raw = deep_merge(raw, _profile_table(path, profiles, profile, ()))
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
    generators, classes = _suite_counts(path, bench, class_names, instances)
    full_batch_data = bench.get("full_batch_data", "sufficient_statistic")
    if full_batch_data not in ("sufficient_statistic", "data"):
        raise ConfigError(f"{path}: bench.full_batch_data: 'sufficient_statistic' or 'data' (got {full_batch_data!r})")
    samplers = _names(path, "bench.samplers", bench.get("samplers", ["sgld", "rmsprop_sgld"]), SAMPLER_NAMES,
                      "samplers")
    audit_sampler = bench.get("audit_sampler", "hmc")
    _names(path, "bench.audit_sampler", [audit_sampler], full_batch_samplers(), "full-batch samplers")
    margin = _bounded(f"{path}: bench.visibility_margin", bench.get("visibility_margin", DEFAULT_MARGIN),
                      NUMBER, POSITIVE)
    factor = _bounded(f"{path}: bench.audit_factor", bench.get("audit_factor", 10), INTEGER, AT_LEAST_TWO)
    threshold = _bounded(f"{path}: bench.audit_threshold", bench.get("audit_threshold", 0.05), NUMBER, OPEN_UNIT)
    suite_seed = _bounded(f"{path}: bench.suite_seed", bench.get("suite_seed", 0), INTEGER, NON_NEGATIVE)
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
    overrides; `n` replaces the instance's number of samples (the finite-n audit). run.restart_scale
    is 0 (no restart) unless the recipe sets it."""
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
    # The over-dispersed restart only where the recipe asks for it: its hash then covers it, and the
    # rows of recipes written before it existed keep meaning what they meant.
    raw["run"].setdefault("restart_scale", 0.0)
    if sampler in recipe.sampler:
        raw.setdefault("sampler", {})[sampler] = recipe.sampler[sampler]
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{recipe.path}: sampler {sampler}: {exc}") from None
