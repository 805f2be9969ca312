"""DLN scoreboard: deterministic suite with analytic λ, exact loss shortcuts, and a two-instance miniature run."""

import copy
import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from llc_bench import bench, bench_report, bench_suite, cli
from llc_bench.checkpoint import saved_progress
from llc_bench.config import ConfigError
from llc_bench.models import count_params
from llc_bench.truth import dln_learning_coefficient

ALL_CLASSES = {name: 4 for name in bench_suite.SIZE_CLASSES}


def test_suite_is_deterministic_and_prefix_stable():
    a = bench_suite.make_suite({"1K": 6, "10K": 6}, suite_seed=0)
    b = bench_suite.make_suite({"1K": 6, "10K": 6}, suite_seed=0)
    assert a == b
    # Instance i depends only on (seed, class, i): asking for more never changes the first ones.
    longer = bench_suite.make_suite({"1K": 9, "10K": 6}, suite_seed=0)
    assert [i for i in longer if i.size_class == "1K"][:6] == a[:6]
    other = bench_suite.make_suite({"1K": 6, "10K": 6}, suite_seed=1)
    assert [i.widths for i in other] != [i.widths for i in a]
    assert len({i.name for i in a}) == len(a)
    assert len({i.seed for i in a}) == len(a)


def test_every_instance_carries_its_truth_and_lies_in_its_class():
    suite = bench_suite.make_suite(ALL_CLASSES, suite_seed=3)
    generators = set()
    for inst in suite:
        c = bench_suite.SIZE_CLASSES[inst.size_class]
        assert inst.aoyagi == dln_learning_coefficient(inst.widths, inst.rank)
        assert inst.d == count_params(inst.widths, bias=False)
        assert c.min_params <= inst.d < c.max_params
        assert c.min_layers <= len(inst.widths) - 1 <= c.max_layers
        assert all(c.min_width <= w <= c.max_width for w in inst.widths)
        assert 1 <= inst.rank <= min(inst.widths)
        assert 0 < inst.aoyagi < inst.d / 2  # rank-deficient DLNs are singular
        generators.add(inst.generator)
    assert generators == {"rand_rank", "deepest"}


def test_size_classes_tile_the_parameter_axis():
    classes = list(bench_suite.SIZE_CLASSES.values())
    for lower, upper in zip(classes[:-1], classes[1:], strict=True):
        assert lower.max_params == upper.min_params
    assert classes[0].min_params <= 1000 < classes[0].max_params


def test_sufficient_statistic_data_reproduce_the_full_loss():
    rng = np.random.default_rng(0)
    x = rng.uniform(-10, 10, (5000, 6))
    m_star = rng.normal(size=(6, 3))
    y = x @ m_star
    x_c, y_c = bench.sufficient_statistic_data(x, y)
    assert x_c.shape == (6, 6) and y_c.shape == (6, 3)
    for _ in range(5):
        m = m_star + rng.normal(size=(6, 3))
        full = np.mean(0.5 * np.sum((y - x @ m) ** 2, 1))
        reduced = np.mean(0.5 * np.sum((y_c.astype(float) - x_c.astype(float) @ m) ** 2, 1))
        assert reduced == pytest.approx(full, rel=1e-5)


def _tiny_raw() -> dict:
    """Two 3-layer instances of ~30 parameters, n = 300, both SG samplers, a few dozen steps."""
    raw = bench_suite.read_toml(bench_suite.DEFAULT_SPEC)
    raw["bench"].update({"classes": ["1K"], "generators": {"chained": 1, "deepest": 1},
                         "samplers": ["sgld", "rmsprop_sgld"], "name": "tiny"})
    raw["class"] = {"1K": {"min_params": 20, "max_params": 60, "min_layers": 3, "max_layers": 3,
                           "min_width": 2, "max_width": 4, "n": 300}}
    raw["base"]["run"] = {**raw["base"].get("run", {}), "num_chains": 2}
    small_run = {"num_burnin_steps": 20, "num_draws": 10, "num_steps_bw_draws": 2}
    raw["run"] = {"sgld": small_run, "rmsprop_sgld": small_run}
    for name in ("sgld", "rmsprop_sgld"):
        raw["sampler"][name]["batch_size"] = 50
    raw.pop("profile", None)
    return raw


@pytest.fixture(scope="module")
def tiny_recipe():
    return bench_suite.parse_recipe(_tiny_raw(), "tiny.toml")


def test_dln_loss_and_reduced_posterior_match_the_target(tiny_recipe):
    import jax
    import jax.numpy as jnp

    from llc_bench.target import build_target

    inst = bench_suite.make_suite(tiny_recipe.classes, 0, size_classes=tiny_recipe.size_classes)[0]
    cfg = bench_suite.instance_config(tiny_recipe, inst, "sgld")
    target = build_target(cfg)
    assert target.truth == inst.aoyagi and target.teacher_rank == inst.rank
    data_post, reduced = bench.build_posteriors(cfg, target)
    w = target.w_star + 0.05 * jax.random.normal(jax.random.key(1), target.w_star.shape)
    expected = jnp.mean(target.per_sample_loss(w, target.x, target.y))
    assert float(data_post.full_loss(w)) == pytest.approx(float(expected), rel=1e-4)
    assert float(reduced.full_loss(w) - reduced.loss_at_wstar) == pytest.approx(
        float(expected - data_post.loss_at_wstar), rel=1e-3)
    assert reduced.n_beta == data_post.n_beta == pytest.approx(300 / np.log(300))
    assert reduced.n == inst.widths[0]


def test_jobs_run_resumed_first_then_smallest_d_first(tiny_recipe):
    # deepest before chained in the suite, but chained has fewer parameters
    suite = bench_suite.make_suite(tiny_recipe.classes, 0, {"deepest": 1, "chained": 1}, tiny_recipe.size_classes)
    assert [i.d for i in suite] == [28, 26]
    todo = [(inst, ["sgld"]) for inst in suite]
    assert [i.name for i, _ in bench.job_order(todo, set())] == ["1K-chained-000", "1K-deepest-000"]
    assert [i.name for i, _ in bench.job_order(todo[::-1], {"1K-deepest-000"})] == ["1K-deepest-000",
                                                                                   "1K-chained-000"]


def test_two_instance_miniature_writes_the_scoreboard(tiny_recipe, tmp_path):
    logged = []
    path = bench.run_bench(tiny_recipe, tmp_path, log=logged.append)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == bench.COLUMNS
    assert len(rows) == 4
    assert {(r["instance"], r["sampler"]) for r in rows} == {
        (f"1K-{g}-000", s) for g in ("chained", "deepest") for s in ("sgld", "rmsprop_sgld")}
    for r in rows:
        assert r["status"] in ("ok", "warnings", "diverged", "not_converged"), r
        assert float(r["llc_mean"]) > 0 and float(r["aoyagi"]) > 0
        # truth is Aoyagi's λ exactly when the record says well-posed, and rel_error follows it
        assert (r["truth"] != "") == (r["well_posed"] == "yes"), r
        if r["truth"]:
            assert float(r["truth"]) == float(r["aoyagi"])
            assert float(r["rel_error"]) == pytest.approx(float(r["llc_mean"]) / float(r["truth"]) - 1, rel=1e-4)
        else:
            assert r["rel_error"] == "" and r["posedness"] != "well-posed"
        assert float(r["local_lower"]) <= float(r["aoyagi"]) + 1e-9 or r["well_posed"] == "no"
        assert float(r["grad_evals"]) > 0 and float(r["wall_s"]) > 0
    for name in ("llc_vs_truth.png", "rel_error.png", "wnv.png", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    scored = {r["instance"] for r in rows if r["well_posed"] == "yes"}
    assert "1K-chained-000" in scored  # chained teachers are well-posed by construction
    assert f"| sgld | 1K | {len(scored)} |" in summary and f"| rmsprop_sgld | 1K | {len(scored)} |" in summary

    # Resumable: a rerun finds every row done and adds none; a torn last line is cut away.
    with open(path, "a") as fh:
        fh.write("1K-deepest-000,1K,torn")
    before = path.read_text()
    bench.run_bench(tiny_recipe, tmp_path, log=logged.append, figures=False)
    assert path.read_text() == before[: before.rfind("\n") + 1]
    assert any("(4 already in" in m for m in logged)

    # A changed sgld recipe makes the sgld rows stale: refused, or moved aside and recomputed with
    # --rerun-stale while the rmsprop_sgld rows stay as they were.
    other = dataclasses.replace(tiny_recipe, sampler={
        **tiny_recipe.sampler, "sgld": {**tiny_recipe.sampler["sgld"], "step_size": 1e-6}})
    assert other.fingerprint("rmsprop_sgld") == tiny_recipe.fingerprint("rmsprop_sgld")
    assert other.fingerprint("sgld") != tiny_recipe.fingerprint("sgld")
    with pytest.raises(ConfigError, match="2 rows of another recipe for sgld; pass --rerun-stale"):
        bench.run_bench(other, tmp_path, log=logged.append)
    old_rows = {(r["instance"], r["sampler"]): r for r in csv.DictReader(path.open())}
    bench.run_bench(other, tmp_path, log=logged.append, figures=False, rerun_stale=True)
    stale = list(csv.DictReader((tmp_path / "dln_scoreboard.stale.csv").open()))
    assert sorted(r["sampler"] for r in stale) == ["sgld", "sgld"]
    new_rows = {(r["instance"], r["sampler"]): r for r in csv.DictReader(path.open())}
    assert new_rows.keys() == old_rows.keys()
    for key, row in new_rows.items():
        if key[1] == "rmsprop_sgld":
            assert row == old_rows[key]
        else:
            assert row["recipe"] == other.fingerprint("sgld") != old_rows[key]["recipe"]


TIMING = ("wall_s", "wnv_time", "compile_s")  # seconds differ between any two runs


KILLED_JOB = """
import sys
from llc_bench import bench, bench_suite, checkpoint
recipe = bench_suite.load_recipe(sys.argv[1])
inst = bench_suite.make_suite(recipe.classes, recipe.suite_seed, recipe.generators, recipe.size_classes)[-1]
bench.checkpoints = lambda path, **kw: checkpoint.checkpoints(path, stop_after=3, **kw)
try:
    bench.instance_rows(recipe, inst, ["sgld"], checkpoint_dir=sys.argv[2])
except checkpoint.Interrupted:
    sys.exit(3)
"""


def test_a_killed_instance_resumes_from_its_checkpoints(tiny_recipe, tmp_path):
    """The last instance's job killed after 3 saved chunks in another process: the next `bench` says
    it resumes, runs it first, reuses them, writes the row an uninterrupted job writes (seconds aside)
    and keeps the same final chains, and removes the folder."""
    inst = bench_suite.make_suite(tiny_recipe.classes, tiny_recipe.suite_seed, tiny_recipe.generators,
                                  tiny_recipe.size_classes)[-1]
    expected, _ = bench.instance_rows(tiny_recipe, inst, ["sgld"], chains_dir=tmp_path / "alone")
    spec, out = tmp_path / "tiny.toml", tmp_path / "out"
    spec.write_text(tomli_w.dumps(_tiny_raw()))
    root = out / bench.CHECKPOINTS
    killed = subprocess.run([sys.executable, "-c", KILLED_JOB, str(spec), str(root)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == 3, killed.stderr
    (folder,) = root.iterdir()
    assert folder == bench.checkpoint_folder(root, inst, "sgld", tiny_recipe)
    assert saved_progress(folder).startswith("1 phase(s), 3 chunk(s), ")
    logged = []
    path = bench.run_bench(tiny_recipe, out, log=logged.append, figures=False)
    assert any(f"{inst.name} sgld: resumes from its checkpoints (1 phase(s), 3 chunk(s)" in m for m in logged)
    assert any(f"{inst.name} sgld: resumed, phase 0: 3/" in m for m in logged)
    assert [m for m in logged if m.startswith("[")][0].startswith(f"[1/2] {inst.name} ")
    (row,) = [r for r in csv.DictReader(path.open()) if (r["instance"], r["sampler"]) == (inst.name, "sgld")]
    assert {k: v for k, v in row.items() if k not in TIMING} == {
        k: v for k, v in expected[0].items() if k not in TIMING}
    assert not any(root.iterdir()) and saved_progress(folder) is None
    # the chains where they stopped are kept beside the row, as the uninterrupted job leaves them
    kept = np.load(bench.final_chains_path(out / bench.FINAL_CHAINS, inst, "sgld", tiny_recipe))
    alone = np.load(bench.final_chains_path(tmp_path / "alone", inst, "sgld", tiny_recipe))
    assert kept.shape == (2, inst.d) and np.all(np.isfinite(kept))  # the tiny recipe's 2 chains
    np.testing.assert_array_equal(kept, alone)


def test_two_workers_write_the_rows_of_one_process(tiny_recipe, tmp_path, capsys):
    """`main.py bench --workers 2` runs the instances in two spawned processes through the sweep's
    executor: the same rows as one process gives, seconds aside."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(tomli_w.dumps(_tiny_raw()))
    one, two = tmp_path / "one", tmp_path / "two"
    bench.run_bench(tiny_recipe, one, figures=False, log=lambda _: None)
    assert cli.main(["bench", "--spec", str(spec), "--out", str(two), "--workers", "2", "--no-progress"]) == 0
    assert "2 workers" in capsys.readouterr().out

    def rows(out):
        with open(out / bench.CSV_NAME, newline="") as fh:
            return {(r["instance"], r["sampler"]): {k: v for k, v in r.items() if k not in TIMING}
                    for r in csv.DictReader(fh)}

    serial, parallel = rows(one), rows(two)
    assert len(serial) == 4 and parallel == serial
    assert all(float(r["llc_mean"]) > 0 for r in serial.values())


def test_shipped_recipe_and_profiles_validate():
    recipe = bench_suite.load_recipe()
    assert recipe.generators == {"chained": 20, "rand_rank": 3, "deepest": 3}
    assert recipe.classes == {"1K": 26, "10K": 26}
    assert set(recipe.samplers) >= {"sgld", "rmsprop_sgld"}
    raw = bench_suite.read_toml(bench_suite.DEFAULT_SPEC)
    for profile in raw.get("profile", {}):
        bench_suite.load_recipe(profile=profile)
    with pytest.raises(ConfigError, match="unknown profile"):
        bench_suite.load_recipe(profile="nope")
    three = bench_suite.load_recipe(instances=3)
    assert three.generators == {"chained": 3, "rand_rank": 3, "deepest": 3}
    assert three.classes == {"1K": 9, "10K": 9}
    # the held-out profile runs sg_curvature_target's recipe on other instances: the same sampler
    # settings and run tables, a different suite seed and so a different recipe fingerprint
    target, held_out = (bench_suite.load_recipe(profile=p) for p in ("sg_curvature_target",
                                                                      "sg_curvature_target_seed1"))
    assert held_out.sampler == target.sampler and held_out.run == target.run and held_out.base == target.base
    assert (held_out.suite_seed, target.suite_seed) == (1, 0) and held_out.fingerprint() != target.fingerprint()


def test_profiles_extend_each_other_and_keep_the_committed_rows_current():
    """[profile.X] extends = "Y" merges Y under X; unknown bases and cycles are one-line errors. The
    committed scoreboard rows were made by the recipe each profile resolves to today (their hashes
    match), so a recipe edit that changes them cannot go unnoticed."""
    raw = bench_suite.read_toml(bench_suite.DEFAULT_SPEC)
    assert raw["profile"]["sg_curvature_target_seed1"]["extends"] == "sg_curvature_target"
    root, checked = Path(__file__).resolve().parents[1], 0
    for name in (None, *raw["profile"]):
        recipe = bench_suite.load_recipe(profile=name)
        csv_path = root / recipe.out / bench_report.CSV_NAME
        if csv_path.exists():
            hashes = {(r["sampler"], r["recipe"]) for r in csv.DictReader(csv_path.open())}
            assert hashes <= set(recipe.fingerprints().items()), (name, hashes)
            checked += 1
    assert checked >= 4
    bad = copy.deepcopy(_tiny_raw())
    bad["profile"] = {"a": {"extends": "b"}, "b": {"extends": "a"}, "c": {"extends": "nope"}, "d": {"extends": 3}}
    for profile, message in (("a", r"profile.b.extends: profiles extend each other in a cycle \(a -> b -> a\)"),
                             ("c", "profile.c.extends: unknown profile 'nope'"),
                             ("d", "profile.d.extends: must be the name of another profile")):
        with pytest.raises(ConfigError, match=message):
            bench_suite.parse_recipe(bad, "x.toml", profile)
    good = copy.deepcopy(_tiny_raw())
    good["profile"] = {"base": {"bench": {"suite_seed": 4, "name": "b"}}, "child": {"extends": "base", "bench": {"name": "c"}}}
    child = bench_suite.parse_recipe(good, "x.toml", "child")
    assert (child.suite_seed, child.name) == (4, "c")


def _row(sampler, inst, truth, factor, well_posed=True, status="ok", warnings="", **extra):
    return {"sampler": sampler, "class": "1K", "truth": truth if well_posed else float("nan"),
            "aoyagi": truth, "llc_mean": truth * factor, "rel_error": factor - 1 if well_posed else float("nan"),
            "grad_evals": 10.0, "wall_s": 1.0, "status": status, "instance": inst, "widths": "2-2", "rank": 1.0,
            "generator": "chained", "warnings": warnings, "well_posed": "yes" if well_posed else "no",
            "lambda_r_eff": truth / 2, "local_lower": truth / 4, "r_eff": 0.0, "sv_min": 1e-4, "sv_max": 1.0,
            "posedness": "" if well_posed else "invisible directions (r_eff 0 < r 1)", **extra}


def test_summary_statistics():
    rows = []
    for i, truth in enumerate([10.0, 20.0, 30.0, 40.0]):
        for s, factor in (("good", 1.01), ("bad", 2.0 if i % 2 else 0.5)):
            rows.append(_row(s, f"1K-{i:03d}", truth, factor))
    table = {e["sampler"]: e for e in bench_report.summarize(rows)}
    assert table["good"]["median_abs_rel"] == pytest.approx(0.01)
    assert table["good"]["spearman"] == pytest.approx(1.0)
    assert bench_report.meets_targets(table["good"]) and not bench_report.meets_targets(table["bad"])
    text = bench_report.summary_markdown(rows)
    assert "1K: met by good." in text and "bad 1K-" in text


def test_a_partial_class_gets_no_verdict():
    """Rows of the first 4 of a class's 26 instances: the table says so and no target is called met."""
    recipe = bench_suite.load_recipe("configs/bench_dln.toml", profile="sg_curvature")
    rows = [_row("curvature_sgld", f"1K-{i:03d}", t, 1.01) for i, t in enumerate([10.0, 20.0, 30.0, 40.0])]
    text = bench_report.summary_markdown(rows, recipe)
    assert "| partial run, met so far |" in text
    assert "- 1K: partial run (curvature_sgld 4 of 26 instances so far): no verdict." in text
    assert "met by" not in text
    two = bench_report.summary_markdown(rows[:2], recipe)  # Spearman of 2 rows: none; nothing missed either
    assert "| partial run, too few rows to rank |" in two and "missed so far" not in two
    complete = bench_report.summary_markdown(rows)  # without a recipe nothing is known to be missing
    assert "1K: met by curvature_sgld." in complete


def test_unscored_rows_never_enter_the_headline():
    rows = [_row("hmc", f"1K-{i:03d}", t, 1.01) for i, t in enumerate([10.0, 20.0, 30.0])]
    # A not-well-posed instance read at λ(r_eff) = λ/2 would be a -50% error against Aoyagi's λ.
    rows.append(_row("hmc", "1K-bad", 50.0, 0.5, well_posed=False))
    text = bench_report.summary_markdown(rows)
    assert "Well-posed instances (scored): 3 of 4." in text
    assert "| hmc | 1K | 3 | 0 | 0 | 1.0% | 1.0% | 1.000 |" in text and "1K: met by hmc." in text
    unscored = text[text.index("Not scored"):]
    assert "| 1K-bad | chained | 2-2 | 1 | 0 | 0.0001 | 50 | 25 | 12.5 | 25 | invisible directions" in unscored
    # median signed error of the unscored row against Aoyagi's λ, λ(r_eff) and rank(H)/2
    assert "| hmc | 1 | -50.0% | 0.0% | 100.0% |" in unscored


BAD_RECIPES = [
    ('[bench]\nclasses = []\n', "bench.classes: must be a non-empty list"),
    ('[bench]\nclasses = ["1K", "2K"]\n', "bench.classes: unknown size class '2K'"),
    ('[bench]\nclasses = "1K"\n', "bench.classes: must be a non-empty list"),
    ('[bench]\ninstances = { "1K" = 2 }\nclasses = ["1K", "10K"]\n', "no count for class 10K"),
    ('[bench]\ninstances = -1\n', "bench.instances: must be an integer >= 0"),
    ('[bench]\ngenerators = { chained = 2 }\ninstances = 3\n', "bench.instances: give the counts either"),
    ('[bench]\ngenerators = { chaind = 2 }\n', "unknown generator 'chaind'"),
    ('[bench]\nvisibility_margin = "big"\n', "bench.visibility_margin: must be a number > 0"),
    ('[bench]\naudit_sampler = "sgld"\n', "bench.audit_sampler: unknown full-batch sampler 'sgld'"),
    ('[bench]\naudit_factor = 1\n', "bench.audit_factor: must be an integer >= 2"),
    ('[bench]\naudit_threshold = 5\n', "bench.audit_threshold: must be a number in (0, 1) (got 5)"),
    ('[class.1K]\nmin_params = 900\nmax_params = 800\n', "class.1K: min_params = 900 must be below"),
    ('[class.1K]\nn = true\n', "class.1K.n: must be an integer >= 2 (got True)"),
    ('[class.1K]\nn = 1\n', "class.1K.n: must be an integer >= 2 (got 1)"),
    ('[bench]\nvisibility_margin = -0.5\n', "bench.visibility_margin: must be a number > 0 (got -0.5)"),
    ('[bench]\naudit_factor = 2.5\n', "bench.audit_factor: must be an integer >= 2 (got 2.5)"),
    ('[bench]\nsuite_seed = -1\n', "bench.suite_seed: must be an integer >= 0 (got -1)"),
    ('profile = 3\n', "profile: must be a table"),
    ('[profile]\nfast = 3\n', "profile.fast: must be a table"),
    ('[bench]\nsuite_seed = "abc"\n', "bench.suite_seed: must be an integer >= 0"),
    ('[class.1K]\nmin_layers = "two"\n', "class.1K.min_layers: must be an integer > 0"),
    ('[bench]\ninstances = 0\n', "the suite is empty"),
    ('[audit]\nsamplr = {}\n', "audit.samplr: unknown key"),
    ('[base.teacher]\nsv_band = [-1.0, 2.0]\n', "teacher.sv_band"),
    ('[base.teacher]\nsv_band = [2.0, 1.0]\n', "teacher.sv_band"),
    ('[sampler]\nhmc = 3\n', "sampler.hmc: must be a table"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_RECIPES, ids=[e for _, e in BAD_RECIPES])
def test_bad_recipe_is_one_line_exit_2_before_any_work(text, expected, tmp_path, capsys):
    from llc_bench import cli

    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    assert cli.main(["bench", "--spec", str(spec), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert expected in err, err
    assert not out.exists()
    for bad in ("-2", "0"):
        assert cli.main(["bench", "--instances", bad, "--out", str(out)]) == 2
        assert "--instances: must be an integer >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_finite_n_audit_reruns_at_k_times_n_and_flags_moves(tiny_recipe, tmp_path):
    small = {"num_burnin_steps": 10, "num_draws": 40, "num_steps_bw_draws": 1}
    recipe = dataclasses.replace(
        tiny_recipe, samplers=("hmc",), generators={"chained": 1}, classes={"1K": 1},
        sampler={**tiny_recipe.sampler, "hmc": {"num_warmup": 60, "num_integration_steps": 8}},
        run={**tiny_recipe.run, "hmc": small}, audit={"run": {"num_draws": 60}})
    logged = []
    bench.run_bench(recipe, tmp_path, log=logged.append, figures=False, audit=True)
    (ref,) = bench_report.read_scoreboard(tmp_path / bench.CSV_NAME)
    (row,) = bench_report.read_audit(tmp_path / bench.AUDIT_CSV_NAME)
    assert (row["instance"], row["n"], row["n_audit"]) == ("1K-chained-000", 300, 3000)
    assert row["llc_n"] == pytest.approx(ref["llc_mean"], rel=1e-5) and row["llc_audit"] > 0
    assert row["shift"] == pytest.approx(row["llc_audit"] / row["llc_n"] - 1, rel=1e-4)
    assert row["flagged"] == ("yes" if abs(row["shift"]) > recipe.audit_threshold else "no")
    assert row["recipe"] == recipe.audit_fingerprint() != dataclasses.replace(recipe, audit={}).audit_fingerprint()
    assert "Finite-n audit (hmc rerun at 10 × n" in (tmp_path / "summary.md").read_text()
    # Resumable: a second audit finds the row done.
    bench.run_audit(recipe, tmp_path, log=logged.append)
    assert len(bench_report.read_audit(tmp_path / bench.AUDIT_CSV_NAME)) == 1


def test_flag_validity_counts_recall_and_precision():
    rows = [_row("sgld", "1K-000", 10.0, 0.5, status="ok"),  # bad, missed
            _row("sgld", "1K-001", 10.0, 0.5, status="warnings", warnings="spikes"),  # bad, caught
            _row("sgld", "1K-002", 10.0, 1.01, status="warnings", warnings="spikes;low_snr"),  # false alarm
            _row("sgld", "1K-003", 10.0, 1.2, status="not_converged", warnings="not_converged"),  # bad, caught
            _row("sgld", "1K-004", 10.0, 1.05, status="ok")]
    table = {e["flag"]: e for e in bench_report.flag_validity(rows)}
    assert (table["any flag"]["bad"], table["any flag"]["flagged"], table["any flag"]["caught"]) == (3, 3, 2)
    assert table["any flag"]["recall"] == pytest.approx(2 / 3) and table["any flag"]["precision"] == pytest.approx(2 / 3)
    assert (table["spikes"]["recall"], table["spikes"]["precision"]) == (pytest.approx(1 / 3), 0.5)
    assert table["low_snr"]["caught"] == 0 and table["not_converged"]["precision"] == 1.0
    text = bench_report.summary_markdown(rows)
    assert "| any flag | 3 | 2 | 66.7% | 66.7% |" in text
    clean = [_row("sgld", "1K-004", 10.0, 1.05, status="ok"), _row("sgld", "1K-005", 10.0, 0.93, status="ok")]
    assert "None of the 2 scored rows is off by more than 10%, and none is flagged." in bench_report.summary_markdown(clean)
    assert "None of the" not in text


def test_summary_counts_what_the_restart_decided():
    """Rows restarted are counted by outcome, with how many of each were off by > 10%: from the
    restart_outcome column, or (CSVs older than it) from restart_llc and the row's flags."""
    nan = float("nan")
    rows = [_row("sgld", "1K-000", 10.0, 0.3, status="not_converged", warnings="restart_disagrees;still_spreading",
                 restart_llc=40.0),  # plateau caught (an old row: no restart_outcome)
            _row("sgld", "1K-001", 10.0, 1.08, status="not_converged", warnings="restart_disagrees;still_spreading",
                 restart_llc=12.0, restart_outcome="disagrees"),  # moved, within 10%
            _row("sgld", "1K-002", 10.0, 1.01, status="ok", restart_llc=10.1),  # level valley: withdrawn
            _row("sgld", "1K-003", 10.0, 0.5, status="ok", restart_llc=5.1, restart_outcome="agrees"),  # agreed, wrong
            _row("sgld", "1K-005", 10.0, 0.4, status="not_converged", warnings="still_spreading",
                 restart_llc=60.0),  # too noisy to tell
            _row("sgld", "1K-006", 10.0, 0.85, status="ok", restart_llc=nan, restart_outcome="walls_bind"),
            _row("sgld", "1K-007", 10.0, 0.7, status="not_converged", warnings="still_spreading", restart_llc=nan,
                 restart_outcome="no_start"),
            _row("sgld", "1K-004", 10.0, 1.0, status="ok", restart_llc=nan, restart_outcome="")]  # not restarted
    text = bench_report.summary_markdown(rows)
    assert ("7 scored rows were still spreading" in text
            and "λ̂ moved on 2 (1 of them off by more than 10%): `restart_disagrees`" in text
            and "It was shown not to move on 2 (1 of them off by more than 10%), and on 1 (1 of them" in text
            and "(the higher-order terms already bind, `walls_bind`): `still_spreading` was withdrawn." in text
            and "On 2 (2 of them off by more than 10%) the restart was too noisy to tell or could not start" in text)
    assert "The restart:" not in bench_report.summary_markdown(rows[-1:])
    assert "walls_bind" not in bench_report.summary_markdown(rows[:5])


@pytest.mark.parametrize(("record", "outcome", "scale"), [
    (None, "", ""),
    ({"scale": 2.0, "llc_restart": 12.0, "se_restart": 0.1, "agrees": False}, "disagrees", "2"),
    ({"scale": 3.0, "llc_restart": 10.0, "se_restart": 0.1, "agrees": True}, "agrees", "3"),
    ({"scale": 2.0, "llc_restart": 10.0, "se_restart": 3.0, "agrees": None}, "inconclusive", "2"),
    ({"scale": None, "llc_restart": None, "agrees": None, "walls_bind": True}, "walls_bind", ""),
    ({"scale": None, "llc_restart": None, "agrees": None, "walls_bind": False}, "no_start", ""),
])
def test_scoreboard_row_records_the_restart_outcome_and_scale(record, outcome, scale):
    inst = bench_suite.make_suite({"1K": 1}, suite_seed=0)[0]
    row = bench.result_row(inst, "sgld", {"llc_mean": 9.0, "llc_se": 0.1, "status": "ok", "restart_check": record},
                           n_beta=10.0, data_rows=10, recipe_hash="x")
    assert (row["restart_outcome"], row["restart_scale"]) == (outcome, scale)
    assert row["restart_llc"] == ("" if record is None or record["llc_restart"] is None else f"{record['llc_restart']:.6g}")


def _load_script(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize(("args", "expected"), [
    (["1K-chained-999", "--sampler", "hmc"], "instance '1K-chained-999': not in this recipe's suite"),
    (["1K-chained-000", "--sampler", "fast"], "--sampler 'fast': must be one of"),
    (["1K-chained-000", "--sampler", "hmc", "--set", "run.target_rel_se=-1"], "run.target_rel_se: must be >= 0"),
    (["1K-chained-000", "--sampler", "hmc", "--profile", "nope"], "nope"),
])
def test_bench_instance_script_refuses_bad_input(args, expected, tmp_path, capsys):
    script = _load_script("bench_instance")
    out = tmp_path / "s.json"
    assert script.main([*args, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["1K-chained-999", "--pre", "10", "2"], "instance '1K-chained-999': not in this recipe's suite"),
    (["1K-chained-000", "--pre", "10", "2", "--scales", "2", "0"], "--scales must be > 0"),
    (["1K-chained-000", "--pre", "10", "0"], "DRAWS at least 1"),
    (["1K-chained-000", "--carry", "no/such/carry.pkl"], "--carry 'no/such/carry.pkl': no such file"),
    (["1K-chained-000", "--chains", "no/such/chains.npy"], "--chains 'no/such/chains.npy': no such .npy file"),
    (["1K-chained-000", "--chains", "WRONG_D"], "positions of shape (4, 7), not (chains, "),
])
def test_restart_check_script_refuses_bad_input(args, expected, capsys, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))  # it imports bench_instance
    script = _load_script("restart_check")
    if "WRONG_D" in args:
        np.save(tmp_path / "wrong.npy", np.zeros((4, 7), np.float32))
        args = [str(tmp_path / "wrong.npy") if a == "WRONG_D" else a for a in args]
    assert script.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


def test_curvature_step_script_times_each_rank(tmp_path, capsys):
    """scripts/bench_curvature_step.py on a 1K instance: one row per k with the instance's d, the
    bytes of V a step reads (two passes over every chain's d × k float32 matrix) and k = 0 as the
    unit of the ratios; bad arguments are refused in one line, before any work."""
    script = _load_script("bench_curvature_step")
    out = tmp_path / "step.json"
    assert script.main(["1K-chained-000", "--ranks", "0", "16", "--chains", "2", "--steps", "3",
                        "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["k"] for r in rows] == [0, 16]
    d = rows[0]["d"]
    assert 300 <= d <= 3200  # the 1K class: [1000/√10, 1000·√10)
    assert [r["v_bytes_read_per_step"] for r in rows] == [0, 2 * 2 * d * 16 * 4]
    assert rows[0]["ratio_to_k0"] == 1.0 and rows[1]["ratio_to_k0"] == rows[1]["ms_per_step"] / rows[0]["ms_per_step"]
    assert rows[0]["batch_size"] == 500  # the recipe's
    capsys.readouterr()
    for bad, expected in [(["--chains", "0"], "--chains: must be >= 1, got 0"),
                          (["--ranks", "-1"], "--ranks: each must be >= 0"),
                          (["--ranks", "0", "100000"], f"--ranks: each must be <= d = {d} of 1K-chained-000"),
                          (["--profile", "nope"], "nope")]:
        assert script.main(["1K-chained-000", *bad, "--out", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "bad.json").exists()


def test_against_reference_script_pairs_the_committed_rows(tmp_path, capsys, monkeypatch):
    """scripts/against_reference.py: each sg_curvature_target row beside the default recipe's HMC row
    of the same instance, with the relative difference and z-score recomputed here from the CSVs; a
    profile of another suite seed is refused in one line."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    script = _load_script("against_reference")
    out = tmp_path / "pairs.csv"
    assert script.main(["--profile", "sg_curvature_target", "--csv", str(out)]) == 0
    pairs = list(csv.DictReader(out.open()))
    hmc = {r["instance"]: r for r in csv.DictReader((root / "results/benchmarks" / bench_report.CSV_NAME).open())
           if r["sampler"] == "hmc"}
    assert len(pairs) >= 26
    for pair in pairs:
        ref = hmc[pair["instance"]]
        mean, ref_mean = float(pair["llc_mean"]), float(ref["llc_mean"])
        assert float(pair["ref_mean"]) == ref_mean
        assert float(pair["rel_diff"]) == pytest.approx(mean / ref_mean - 1, rel=1e-9)
        assert float(pair["z"]) == pytest.approx(
            (mean - ref_mean) / np.hypot(float(pair["llc_se"]), float(ref["llc_se"])), rel=1e-9)
    rows = {r["instance"]: r for r in csv.DictReader((root / "results/benchmarks/sg_curvature_target" /
                                                      bench_report.CSV_NAME).open())}
    for pair in pairs:
        row = rows[pair["instance"]]
        assert float(pair["quadratic_share"]) == pytest.approx(
            min(1.0, float(row["local_lower"]) / float(row["aoyagi"])), rel=1e-9)
        if row.get("llc_debiased"):  # rows run since the step-bias estimate exists
            assert float(pair["debiased_diff"]) == pytest.approx(
                float(row["llc_debiased"]) / float(pair["ref_mean"]) - 1, rel=1e-9)
        else:
            assert pair["debiased_diff"] == ""
    printed = capsys.readouterr().out
    assert "1K: 26 rows" in printed and "rows whose λ is all quadratic" in printed
    assert script.main(["--profile", "sg_curvature_target_seed1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "suite seed 1" in err


def test_bench_progress_script_reads_a_jobs_checkpoints(tiny_recipe, tmp_path, capsys, monkeypatch):
    """scripts/bench_progress.py on a job's saved chunks: the λ̂ of its draws is the run's own full-data
    estimate, in windows of --window draws; bad arguments are one line, exit 2, before any work."""
    from llc_bench import checkpoint
    from llc_bench.estimator import estimate_from_result
    from llc_bench.experiment import run_sampler

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))  # it imports bench_instance
    script = _load_script("bench_progress")
    spec, out = tmp_path / "tiny.toml", tmp_path / "out"
    spec.write_text(tomli_w.dumps(_tiny_raw()))
    inst = bench_suite.make_suite(tiny_recipe.classes, tiny_recipe.suite_seed, tiny_recipe.generators,
                                  tiny_recipe.size_classes)[0]
    args = [inst.name, "--spec", str(spec), "--sampler", "sgld", "--out", str(out), "--window", "4"]
    assert script.main(args) == 0 and "nothing saved" in capsys.readouterr().out
    cfg = bench_suite.instance_config(tiny_recipe, inst, "sgld")
    _, _, post, _, _ = bench.build_instance(tiny_recipe, inst, "sgld", cfg=cfg)
    with checkpoint.checkpoints(bench.checkpoint_folder(out / bench.CHECKPOINTS, inst, "sgld", tiny_recipe)):
        run = run_sampler(cfg, "sgld", post, restart=False, step_bias=False)
    full = estimate_from_result(run.result, "full")
    assert script.main(args) == 0
    text = capsys.readouterr().out
    (line,) = [t for t in text.splitlines() if " draws: λ̂ = " in t]
    draws = run.result.draw_loss.shape[1]
    assert f", {draws} draws: " in line
    assert float(line.split("λ̂ = ")[1].split()[0]) == pytest.approx(full.mean, abs=0.006)
    (windows,) = [t for t in text.splitlines() if "λ̂ by 4 draws" in t]
    assert len(windows.split(":")[1].split(",")) == -(-draws // 4)
    for bad, expected in ((["--window", "0"], "--window must be at least 1"),
                          (["--sampler", "hmc"], "not in"), ([], "name one")):
        given = [inst.name, "--spec", str(spec), "--out", str(out)] + bad
        assert script.main(given) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
