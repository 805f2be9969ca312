"""DLN scoreboard: a seeded suite of deep linear networks with analytic λ, every sampler at one fixed recipe, one CSV, figures, a summary table.

Protocol (Lau et al., AISTATS 2025, App. E.2; Hitchcock & Hoogland 2025): size classes by
parameter count; an instance draws its depth and widths from its class's ranges until the count
lies in the class's range, then a rank-deficient teacher (`rand_rank` or `deepest`); x ~ U[-10, 10],
noise-free targets, w* = the teacher, γ = 1, nβ = n / log n. Each instance carries Aoyagi's λ.

The recipe (configs/bench_dln.toml) fixes every sampler's settings once: nothing is tuned per
instance beyond what a sampler adapts by itself (HMC window adaptation, the MCLMC tuners).

Two exact evaluation shortcuts keep the CPU run inside its budget; both compute the same L_n:

- The DLN loss multiplies the layer kernels into the end-to-end matrix M(w) first and then
  computes ½‖x M(w) − y‖² (cheaper than pushing n rows through every layer when n > H_in).
- Full-batch samplers (hmc, nuts, mclmc, adjusted_mclmc) see the data through its sufficient
  statistics: with Σ = XᵀX/n = L Lᵀ and C = XᵀY/n, the H_in rows X_c = √H_in Lᵀ and
  Y_c = √H_in L⁻¹ C give (1/H_in) Σ_i ½‖y_ci − x_ci M‖² = L_n(M) + const for every M, so their
  log-density equals the n-sample one while a gradient costs O(H_in · d) instead of O(n · H_in · H_out).
  Their seconds are therefore seconds of that reduced evaluation (column `data_rows` says which);
  gradient evaluations (full-data equivalents) are the hardware-independent cost.
  SG samplers draw their minibatches from the n real samples.

CSV: one row per (instance, sampler), appended with fsync as soon as it is done; rerunning skips
the rows already present (a torn last line is cut away). The file records a hash of the recipe and
refuses to mix recipes.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass
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

DEFAULT_SPEC = PRESET_DIR / "bench_dln.toml"
DEFAULT_OUT = Path("results/benchmarks")
CSV_NAME = "dln_scoreboard.csv"
FULL_BATCH = ("hmc", "nuts", "mclmc", "adjusted_mclmc")

COLUMNS = ("instance", "class", "widths", "rank", "generator", "truth", "sampler", "llc_mean", "llc_se",
           "rel_error", "grad_evals", "wall_s", "wnv_time", "wnv_grad", "status",
           # beyond the scoreboard proper: enough to audit a row without rerunning it
           "d", "n", "n_beta", "compile_s", "chains_used", "data_rows", "warnings", "recipe")

# Targets the scoreboard reports against (issue 6); a report, not a test.
TARGET_MEDIAN, TARGET_P90, TARGET_SPEARMAN = 0.05, 0.15, 0.98


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


# Depth and width ranges of 1K, 10K and 100K are Lau et al.'s (as issue 6 quotes them); the larger
# classes' ranges are chosen so that their count range is reachable with moderate rejection.
SIZE_CLASSES: dict[str, SizeClass] = {
    c.name: c for c in (
        SizeClass("1K", *_half_decade(1e3), 2, 5, 5, 50, 100_000),
        SizeClass("10K", *_half_decade(1e4), 2, 10, 5, 100, 100_000),
        SizeClass("100K", *_half_decade(1e5), 2, 10, 50, 500, 100_000),
        SizeClass("1M", *_half_decade(1e6), 2, 20, 100, 1000, 100_000),
        SizeClass("10M", *_half_decade(1e7), 2, 20, 500, 2000, 100_000),
        SizeClass("100M", *_half_decade(1e8), 2, 20, 1000, 5000, 100_000),
    )
}


@dataclass(frozen=True)
class Instance:
    """One benchmark problem: a DLN architecture, its teacher's rank and generator, and λ."""

    name: str  # e.g. "10K-007"
    size_class: str
    index: int
    widths: tuple[int, ...]  # (H_in, H_1, ..., H_out)
    rank: int
    generator: str
    seed: int  # run.seed of the instance: its data, teacher and chain streams
    d: int
    truth: float
    n: int


def _class_rng(suite_seed: int, class_name: str, index: int) -> np.random.Generator:
    # One generator per (suite seed, class, index): adding instances never changes earlier ones.
    return np.random.default_rng([suite_seed, zlib.crc32(class_name.encode()), index])


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
                  generators: tuple[str, ...] = ("rand_rank", "deepest"), max_tries: int = 100_000) -> Instance:
    """Draw depth and widths uniformly from the class's ranges until d lies in its count range,
    then the rank (distributed as Lau et al.'s rand_rank) and the generator (uniform over `generators`)."""
    rng = _class_rng(suite_seed, size_class.name, index)
    c = size_class
    for _ in range(max_tries):
        layers = int(rng.integers(c.min_layers, c.max_layers + 1))
        widths = tuple(int(w) for w in rng.integers(c.min_width, c.max_width + 1, size=layers + 1))
        d = dln_num_parameters(widths)
        if c.min_params <= d < c.max_params:
            break
    else:
        raise ValueError(f"class {c.name}: no architecture with {c.min_params} <= d < {c.max_params} "
                         f"in {max_tries} draws")
    rank = lau_rank(rng, widths)
    generator = generators[int(rng.integers(len(generators)))]
    seed = zlib.crc32(f"{suite_seed}/{c.name}/{index}".encode()) & 0x7FFFFFFF
    return Instance(name=f"{c.name}-{index:03d}", size_class=c.name, index=index, widths=widths,
                    rank=rank, generator=generator, seed=seed, d=d,
                    truth=dln_learning_coefficient(widths, rank), n=c.n)


def make_suite(classes: dict[str, int], suite_seed: int = 0,
               generators: tuple[str, ...] = ("rand_rank", "deepest"),
               size_classes: dict[str, SizeClass] | None = None) -> list[Instance]:
    """`classes` maps class name -> number of instances; instances are fixed by (suite_seed, class, index)."""
    size_classes = size_classes or SIZE_CLASSES
    return [make_instance(size_classes[name], i, suite_seed, generators)
            for name, count in classes.items() for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The recipe


RECIPE_KEYS = ("name", "suite_seed", "classes", "instances", "samplers", "generators", "full_batch_data",
               "out")
RECIPE_SECTIONS = ("bench", "base", "sampler", "run", "class", "profile")


@dataclass(frozen=True)
class Recipe:
    """A parsed bench_dln.toml: which instances, which samplers, and each sampler's fixed settings.

    base: config in the normal TOML layout shared by every run; run[sampler]: that sampler's
    run-section overrides (burn-in, draws, ...); sampler[sampler]: its settings table.
    """

    name: str
    suite_seed: int
    classes: dict[str, int]
    samplers: tuple[str, ...]
    generators: tuple[str, ...]
    full_batch_data: str  # "sufficient_statistic" | "data"
    out: str
    base: dict
    run: dict[str, dict]
    sampler: dict[str, dict]
    size_classes: dict[str, SizeClass]
    path: str = "<recipe>"

    def fingerprint(self) -> str:
        """12 hex of everything that changes a row's numbers (not which instances or where)."""
        material = {"base": self.base, "run": self.run, "sampler": self.sampler,
                    "suite_seed": self.suite_seed, "generators": self.generators,
                    "full_batch_data": self.full_batch_data,
                    "classes": {k: vars(v) for k, v in sorted(self.size_classes.items())}}
        canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def parse_recipe(raw: dict, path: str = "<recipe>", profile: str | None = None,
                 instances: int | None = None) -> Recipe:
    """A Recipe from the TOML dict; `profile` merges [profile.<name>] over the rest first."""
    raw = copy.deepcopy(raw)
    profiles = raw.pop("profile", {})
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(f"{path}: unknown profile {profile!r}; defined: {', '.join(profiles) or 'none'}")
        raw = deep_merge(raw, profiles[profile])
    for key in raw:
        if key not in RECIPE_SECTIONS:
            raise ConfigError(f"{path}: unknown section {key!r}; allowed: {', '.join(RECIPE_SECTIONS)}")
    bench = raw.get("bench", {})
    for key in bench:
        if key not in RECIPE_KEYS:
            raise ConfigError(f"{path}: bench.{key}: unknown key; allowed: {', '.join(RECIPE_KEYS)}")
    size_classes = dict(SIZE_CLASSES)
    for name, table in raw.get("class", {}).items():
        if name not in size_classes:
            raise ConfigError(f"{path}: class.{name}: unknown size class; known: {', '.join(size_classes)}")
        fields = vars(size_classes[name]).copy()
        for key, value in table.items():
            if key not in fields or key == "name":
                raise ConfigError(f"{path}: class.{name}.{key}: unknown key")
            fields[key] = int(value)
        size_classes[name] = SizeClass(**fields)
    classes = bench.get("classes", ["1K", "10K"])
    count = instances if instances is not None else bench.get("instances", 20)
    if isinstance(count, int):
        classes = {name: count for name in classes}
    elif isinstance(count, dict):
        classes = {name: int(count[name]) for name in classes}
    else:
        raise ConfigError(f"{path}: bench.instances: an integer or a table class -> integer")
    for name in classes:
        if name not in size_classes:
            raise ConfigError(f"{path}: bench.classes: unknown class {name!r}; known: {', '.join(size_classes)}")
    if any(v < 0 for v in classes.values()):
        raise ConfigError(f"{path}: bench.instances: must be >= 0")
    full_batch_data = bench.get("full_batch_data", "sufficient_statistic")
    if full_batch_data not in ("sufficient_statistic", "data"):
        raise ConfigError(f"{path}: bench.full_batch_data: 'sufficient_statistic' or 'data'")
    samplers = tuple(bench.get("samplers", ["sgld", "rmsprop_sgld"]))
    recipe = Recipe(
        name=str(bench.get("name", Path(path).stem)), suite_seed=int(bench.get("suite_seed", 0)),
        classes=classes, samplers=samplers, generators=tuple(bench.get("generators", ["rand_rank", "deepest"])),
        full_batch_data=full_batch_data, out=str(bench.get("out", DEFAULT_OUT)), base=raw.get("base", {}),
        run=raw.get("run", {}), sampler=raw.get("sampler", {}), size_classes=size_classes, path=str(path))
    for g in recipe.generators:
        if g not in ("rand_rank", "deepest"):
            raise ConfigError(f"{path}: bench.generators: unknown generator {g!r}; allowed: rand_rank, deepest")
    # Validate every sampler's config once, at the edge, on a stand-in architecture.
    probe = Instance("probe", "probe", 0, (3, 2, 3), 1, recipe.generators[0], 0, 12, 1.0, 1000)
    for name in samplers:
        instance_config(recipe, probe, name)
    return recipe


def load_recipe(path: str | Path | None = None, profile: str | None = None,
                instances: int | None = None) -> Recipe:
    path = Path(path) if path is not None else DEFAULT_SPEC
    try:
        raw = read_toml(path)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--config", "--spec", 1)) from None
    return parse_recipe(raw, str(path), profile, instances)


def instance_config(recipe: Recipe, inst: Instance, sampler: str) -> Config:
    """The validated Config of one (instance, sampler) run: base <- architecture <- sampler's run overrides."""
    raw = copy.deepcopy(recipe.base)
    hidden = list(inst.widths[1:-1])
    for key, value in {
        "data.n": inst.n, "data.in_dim": inst.widths[0], "data.out_dim": inst.widths[-1],
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


def result_row(inst: Instance, sampler: str, summary: dict, *, n_beta: float, data_rows: int,
               recipe_hash: str) -> dict[str, str]:
    """One CSV row from run_sampler's summary dict."""
    codes = sorted({w.split(":", 1)[0] for w in summary.get("warnings", [])})
    row = {
        "instance": inst.name, "class": inst.size_class, "widths": "-".join(map(str, inst.widths)),
        "rank": inst.rank, "generator": inst.generator, "truth": inst.truth, "sampler": sampler,
        "llc_mean": summary.get("llc_mean"), "llc_se": summary.get("llc_se"),
        "rel_error": summary.get("rel_error"), "grad_evals": summary.get("grad_evals"),
        "wall_s": summary.get("wall_s"), "wnv_time": summary.get("wnv_time"),
        "wnv_grad": summary.get("wnv_grad"), "status": summary.get("status", "failed"),
        "d": inst.d, "n": inst.n, "n_beta": n_beta, "compile_s": summary.get("compile_s"),
        "chains_used": summary.get("chains_used"), "data_rows": data_rows,
        "warnings": ";".join(codes), "recipe": recipe_hash,
    }
    return {k: _fmt(v) for k, v in row.items()}


def failed_row(inst: Instance, sampler: str, message: str, recipe_hash: str) -> dict[str, str]:
    row = result_row(inst, sampler, {"status": "failed"}, n_beta=math.nan, data_rows=0, recipe_hash=recipe_hash)
    row["warnings"] = "error: " + " ".join(message.split())[:300]
    return row


class Scoreboard:
    """The CSV: resumable, one fsync'd row at a time, one recipe per file."""

    def __init__(self, path: Path, recipe_hash: str):
        self.path = Path(path)
        self.recipe_hash = recipe_hash
        self.done: set[tuple[str, str]] = set()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a write cut short: drop the torn line
            data = data[: data.rfind(b"\n") + 1]
            with self.path.open("r+b") as fh:
                fh.truncate(len(data))
        rows = list(csv.DictReader(io.StringIO(data.decode())))
        if data and tuple(csv.reader(io.StringIO(data.decode().split("\n", 1)[0])).__next__()) != COLUMNS:
            raise ConfigError(f"{self.path}: written by a different version of the benchmark (columns "
                              "differ); use another --out or delete the file")
        other = {r["recipe"] for r in rows} - {self.recipe_hash}
        if other:
            raise ConfigError(f"{self.path}: holds rows of another recipe ({', '.join(sorted(other))}; this "
                              f"one is {self.recipe_hash}); use another --out or delete the file")
        self.done = {(r["instance"], r["sampler"]) for r in rows}

    def append(self, row: dict[str, str]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow(row)
        with self.path.open("a") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        self.done.add((row["instance"], row["sampler"]))


def run_instance(recipe: Recipe, inst: Instance, samplers: list[str], board: Scoreboard,
                 progress: bool = False, log=print) -> None:
    """Build the instance's target once and run each of `samplers` on it, one CSV row each."""
    from llc_bench.experiment import run_sampler
    from llc_bench.target import build_target

    recipe_hash = board.recipe_hash
    try:
        cfgs = {name: instance_config(recipe, inst, name) for name in samplers}
        target = build_target(next(iter(cfgs.values())))
        if target.truth is None or abs(target.truth - inst.truth) > 1e-9 * max(1.0, inst.truth):
            raise RuntimeError(f"target truth {target.truth} differs from the instance's {inst.truth}")
        data_post, reduced_post = build_posteriors(next(iter(cfgs.values())), target, recipe.full_batch_data)
    except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the benchmark
        for name in samplers:
            board.append(failed_row(inst, name, f"{type(exc).__name__}: {exc}", recipe_hash))
            log(f"  {inst.name} {name}: FAILED building the instance: {exc}")
        return
    for name in samplers:
        post = reduced_post if name in FULL_BATCH else data_post
        start = time.perf_counter()
        try:
            run = run_sampler(cfgs[name], name, post, truth=inst.truth, progress=progress)
            row = result_row(inst, name, run.summary, n_beta=post.n_beta, data_rows=post.n,
                             recipe_hash=recipe_hash)
        except Exception as exc:  # noqa: BLE001
            row = failed_row(inst, name, f"{type(exc).__name__}: {exc}", recipe_hash)
        board.append(row)
        rel = row["rel_error"]
        rel_text = f"{float(rel):+.1%}" if rel else "n/a"
        log(f"  {inst.name:8s} {name:15s} λ̂={row['llc_mean'] or 'n/a':>9s} truth={inst.truth:8.1f} "
            f"rel={rel_text:>7s} {row['status']:8s} {time.perf_counter() - start:6.1f}s "
            f"{row['warnings']}")


def run_bench(recipe: Recipe, out_dir: str | Path, progress: bool = False, log=print,
              figures: bool = True) -> Path:
    """Run every (instance, sampler) row not yet in the CSV, then write the summary and figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    board = Scoreboard(out / CSV_NAME, recipe.fingerprint())
    suite = make_suite(recipe.classes, recipe.suite_seed, recipe.generators, recipe.size_classes)
    todo = [(inst, [s for s in recipe.samplers if (inst.name, s) not in board.done]) for inst in suite]
    todo = [(inst, names) for inst, names in todo if names]
    total_rows = len(suite) * len(recipe.samplers)
    log(f"bench {recipe.name}: {len(suite)} instances x {len(recipe.samplers)} samplers = {total_rows} rows "
        f"({total_rows - sum(len(n) for _, n in todo)} already in {board.path}); recipe {board.recipe_hash}")
    start = time.perf_counter()
    for k, (inst, names) in enumerate(todo):
        log(f"[{k + 1}/{len(todo)}] {inst.name} widths {'-'.join(map(str, inst.widths))} rank {inst.rank} "
            f"{inst.generator} d={inst.d} λ={inst.truth:g}  ({time.perf_counter() - start:.0f}s elapsed)")
        run_instance(recipe, inst, names, board, progress=progress, log=log)
    log(f"sampling done in {time.perf_counter() - start:.0f}s")
    rows = read_scoreboard(board.path)
    names = {inst.name for inst in suite}
    rows = [r for r in rows if r["instance"] in names and r["sampler"] in recipe.samplers]
    text = summary_markdown(rows, recipe)
    (out / "summary.md").write_text(text)
    log(text)
    if figures:
        write_figures(rows, out)
    return board.path


# ---------------------------------------------------------------------------------------------
# Summary table and figures


def read_scoreboard(path: str | Path) -> list[dict[str, Any]]:
    """CSV rows with numeric columns as floats (NaN where empty)."""
    numeric = {"truth", "llc_mean", "llc_se", "rel_error", "grad_evals", "wall_s", "wnv_time", "wnv_grad",
               "rank", "d", "n", "n_beta", "compile_s", "chains_used", "data_rows"}
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
                "flagged": sum(r["status"] in ("warnings", "diverged") for r in sub),
                "median_abs_rel": float(np.median(abs_err)) if good else math.nan,
                "p90_abs_rel": float(np.quantile(abs_err, 0.9)) if good else math.nan,
                "spearman": spearman([r["llc_mean"] for r in good], [r["truth"] for r in good]),
                "median_grad_evals": float(np.median([r["grad_evals"] for r in good])) if good else math.nan,
                "median_wall_s": float(np.median([r["wall_s"] for r in good])) if good else math.nan,
            })
    return out


def meets_targets(entry: dict[str, Any]) -> bool:
    return (entry["failed"] == 0 and entry["median_abs_rel"] <= TARGET_MEDIAN
            and entry["p90_abs_rel"] <= TARGET_P90 and entry["spearman"] >= TARGET_SPEARMAN)


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:.1f}%"


def summary_markdown(rows: list[dict[str, Any]], recipe: Recipe | None = None, worst: int = 3) -> str:
    """The summary table (markdown), the verdict against the targets, and the worst instances of each miss."""
    table = summarize(rows)
    lines = []
    if recipe is not None:
        lines.append(f"DLN scoreboard `{recipe.name}` (recipe {recipe.fingerprint()}): "
                     + ", ".join(f"{n} x {c}" for c, n in recipe.classes.items()) + " instances.\n")
    lines += [
        "| sampler | class | inst. | failed | flagged | median \\|rel err\\| | p90 \\|rel err\\| | Spearman | "
        "median grad evals | median seconds | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        rho = "n/a" if not math.isfinite(e["spearman"]) else f"{e['spearman']:.3f}"
        lines.append(
            f"| {e['sampler']} | {e['class']} | {e['instances']} | {e['failed']} | {e['flagged']} | "
            f"{_pct(e['median_abs_rel'])} | {_pct(e['p90_abs_rel'])} | {rho} | {e['median_grad_evals']:.4g} | "
            f"{e['median_wall_s']:.3g} | {'met' if meets_targets(e) else 'missed'} |")
    lines.append("")
    lines.append(f"Targets (issue 6, for the best sampler on each class): median |rel err| <= "
                 f"{TARGET_MEDIAN:.0%}, p90 <= {TARGET_P90:.0%}, Spearman >= {TARGET_SPEARMAN}. `flagged` = "
                 "rows whose health checks raised warnings or lost chains; seconds exclude compilation.")
    for c in dict.fromkeys(e["class"] for e in table):
        best = [e for e in table if e["class"] == c and meets_targets(e)]
        lines.append(f"- {c}: " + (f"met by {', '.join(e['sampler'] for e in best)}." if best else
                                   "no sampler meets all three targets."))
    lines += ["", "By teacher generator (Aoyagi's λ is the global coefficient; at a rand_rank teacher, whose",
              "layers can have larger rank than the product, the local λ may be larger: DESIGN.md):", "",
              "| sampler | generator | rows | median rel err (signed) | median \\|rel err\\| |", "|---|---|---|---|---|"]
    for s in dict.fromkeys(r["sampler"] for r in rows):
        for g in sorted({r["generator"] for r in rows}):
            errs = np.array([r["rel_error"] for r in rows if r["sampler"] == s and r["generator"] == g
                             and math.isfinite(r["rel_error"])])
            if errs.size:
                lines.append(f"| {s} | {g} | {errs.size} | {_pct(float(np.median(errs)))} | "
                             f"{_pct(float(np.median(np.abs(errs))))} |")
    missed = [e for e in table if not meets_targets(e)]
    if missed:
        lines += ["", "Worst instances of each sampler/class that missed (health-check verdicts):", ""]
        for e in missed:
            sub = [r for r in rows if r["sampler"] == e["sampler"] and r["class"] == e["class"]]
            sub.sort(key=lambda r: -abs(r["rel_error"]) if math.isfinite(r["rel_error"]) else -math.inf)
            for r in sub[:worst]:
                rel = _pct(r["rel_error"]) if math.isfinite(r["rel_error"]) else "n/a"
                lines.append(f"- {e['sampler']} {r['instance']} (widths {r['widths']}, rank {int(r['rank'])}, "
                             f"{r['generator']}): λ̂ = {r['llc_mean']:.4g} vs λ = {r['truth']:.4g} ({rel}), "
                             f"status {r['status']}" + (f", {r['warnings']}" if r["warnings"] else ""))
    return "\n".join(lines) + "\n"


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
        ax.scatter(r["truth"], r["llc_mean"], color=colors[r["sampler"]], marker=markers.get(r["class"], "o"),
                   s=22, alpha=0.75, edgecolors="none")
    values = [r["truth"] for r in rows] + [r["llc_mean"] for r in good]
    lo, hi = (min(values) / 1.5, max(values) * 1.5) if values else (1, 10)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="true λ (Aoyagi)",
           ylabel="estimated λ̂", title="DLN scoreboard: estimated vs true LLC")
    handles = [plt.Line2D([], [], color=colors[s], marker="o", ls="", label=s) for s in samplers]
    handles += [plt.Line2D([], [], color="gray", marker=markers[c], ls="", label=f"class {c}") for c in classes]
    ax.legend(handles=handles + [plt.Line2D([], [], color="k", ls="--", label="y = x")], fontsize=8)
    paths.append(_savefig(fig, out / "llc_vs_truth.png"))

    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(samplers) * max(1, len(classes))), 4.5))
    data, labels, cols = [], [], []
    for s in samplers:
        for c in classes:
            vals = [r["rel_error"] for r in rows if r["sampler"] == s and r["class"] == c
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
    ax.set(ylabel="relative error (λ̂ − λ)/λ  (symlog)", title="Relative error per sampler and class")
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

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Entry point


def main(args) -> int:
    """`main.py bench [--spec FILE] [--out DIR] [--instances N] [--no-progress]` (and --profile from
    `python -m llc_bench.bench`)."""
    from llc_bench.cli import check_writable
    from llc_bench.progress import progress_enabled

    recipe = load_recipe(getattr(args, "spec", None), getattr(args, "profile", None),
                         getattr(args, "instances", None))
    out = check_writable(getattr(args, "out", None) or recipe.out)
    run_bench(recipe, out, progress=progress_enabled(not getattr(args, "no_progress", False)))
    return 0


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m llc_bench.bench", description=__doc__.split("\n")[0])
    p.add_argument("--spec", metavar="FILE", help="benchmark recipe TOML (default configs/bench_dln.toml)")
    p.add_argument("--profile", help="merge [profile.<name>] of the recipe over it (e.g. gpu)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: the recipe's bench.out)")
    p.add_argument("--instances", type=int, help="instances per size class (overrides the recipe)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-only", action="store_true", help="rewrite summary.md and figures from the CSV")
    return p


if __name__ == "__main__":
    _args = _parser().parse_args()
    try:
        if _args.summary_only:
            _recipe = load_recipe(_args.spec, _args.profile, _args.instances)
            _out = Path(_args.out or _recipe.out)
            _rows = read_scoreboard(_out / CSV_NAME)
            (_out / "summary.md").write_text(summary_markdown(_rows, _recipe))
            write_figures(_rows, _out)
            print((_out / "summary.md").read_text())
            sys.exit(0)
        sys.exit(main(_args))
    except ConfigError as _exc:
        print(f"error: {_exc}", file=sys.stderr)
        sys.exit(2)
