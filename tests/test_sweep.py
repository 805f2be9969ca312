"""Sweeps: spec expansion, the CSV schema, failing cells, resume after a real SIGKILL, worker pools."""

import contextlib
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llc_bench import cli, sweep, sweep_spec
from llc_bench.checkpoint import Interrupted, checkpoints, saved_progress
from llc_bench.config import ConfigError, to_dict

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
RUNNER = f"{__name__}:fake_cell"
SLEEP_ENV = "LLC_BENCH_FAKE_CELL_SLEEP"
LOG_ENV = "LLC_BENCH_FAKE_CELL_LOG"

# A small valid base (no presets, so the tests do not depend on preset contents).
BASE = {
    "data": {"n": 300, "in_dim": 3},
    "teacher": {"widths": [4]},
    "model": {"widths": [4], "target_params": "none"},
    "run": {"samplers": ["sgld", "rmsprop_sgld"]},
}


def fake_cell(cfg):
    """A synthetic cell: a deterministic λ̂ from the config, a failure for tanh, optional sleep and call log."""
    time.sleep(float(os.environ.get(SLEEP_ENV, "0")))
    if log := os.environ.get(LOG_ENV):
        with open(log, "a") as fh:
            fh.write(json.dumps({"seed": cfg.run.seed, "samplers": list(cfg.run.samplers)}) + "\n")
    if cfg.model.activation == "tanh":
        raise RuntimeError("synthetic failure\non two lines")
    resolved = to_dict(cfg)
    del resolved["run"]["samplers"], resolved["sampler"]
    samplers = {}
    for name in cfg.run.samplers:  # like the real pipeline: a sampler's result ignores the others
        digest = hashlib.sha256(json.dumps([name, resolved], sort_keys=True, default=str).encode()).digest()
        samplers[name] = {
            "llc_mean": 10.0 + digest[0] / 10, "llc_se": 0.5, "rel_error": None, "ess_bulk": 100.0,
            "ess_tail": 90.0, "rhat": 1.01, "accept_rate": None, "grad_evals": 123.0, "wall_s": 0.1,
            "compile_s": 1.0, "wnv_time": 0.025, "wnv_grad": 30.75,
            "status": {"outliers": "diverged", "none": "failed"}.get(cfg.data.noise, "ok"),
            "warnings": ["SPIKES: a spike. Remedy: smaller step"] if name == "sgld" else [],
        }
        eps = getattr(cfg.sampler.get(name), "step_size", None)
        auto = eps == "auto"  # what run_sampler records for an automatic ε
        samplers[name].update(step_size=2.5e-4 if auto else eps, h_max=3.0 if auto else None,
                              num_hvp=17 if auto else None)
    return {"truth": None, "n_beta": 37.7, "gamma": 100.0, "d": 21, "loss_at_wstar": 0.004,
            "versions": {"jax": "x.y"}, "samplers": samplers}


def make_spec(axes, mode="product", seeds=(0,), runner=RUNNER, samplers=None, **sweep_keys):
    raw = {"sweep": {"name": "t", "mode": mode, "seeds": list(seeds), "runner": runner, **sweep_keys},
           "base": json.loads(json.dumps(BASE)), "axes": axes}
    if samplers is not None:
        raw["sweep"]["samplers"] = samplers
    return sweep_spec.parse_spec(raw, "spec.toml")


def read_csv(path):
    text = Path(path).read_text()
    assert text.endswith("\n")
    return list(csv.DictReader(io.StringIO(text)))


def run_quiet(spec, out, **kw):
    return sweep.run_sweep(spec, out, log=lambda _: None, **kw)


# ---------------------------------------------------------------------------------------------
# Expansion


def test_product_expands_every_combination_times_seeds():
    spec = make_spec({"model.activation": ["relu", "gelu"], "data.noise": ["gaussian", "none", "outliers"]},
                     seeds=(0, 7))
    cells = sweep.expand(spec)
    assert len(cells) == 2 * 3 * 2
    got = {(c.config.model.activation, c.config.data.noise, c.config.run.seed) for c in cells}
    assert got == {(a, n, s) for a in ("relu", "gelu") for n in ("gaussian", "none", "outliers") for s in (0, 7)}
    assert all(c.overrides == {"model.activation": c.config.model.activation, "data.noise": c.config.data.noise}
               for c in cells)
    assert len({c.cell_id for c in cells}) == len(cells)
    # ids are stable: same spec, same ids; they do not depend on the order of the axes
    again = make_spec({"data.noise": ["gaussian", "none", "outliers"], "model.activation": ["relu", "gelu"]},
                      seeds=(7, 0))
    assert {c.cell_id for c in sweep.expand(again)} == {c.cell_id for c in cells}


def test_zip_walks_axes_in_parallel_and_refuses_unequal_lengths():
    spec = make_spec({"data.n": [300, 400], "model.widths": [[2], [6, 6]]}, mode="zip")
    cells = sweep.expand(spec)
    assert [(c.config.data.n, c.config.model.widths) for c in cells] == [(300, (2,)), (400, (6, 6))]
    bad = make_spec({"data.n": [300, 400], "model.widths": [[2], [6], [8]]}, mode="zip")
    with pytest.raises(ConfigError, match=r"zip.*data\.n has 2, model\.widths has 3"):
        sweep.expand(bad)


def test_one_at_a_time_varies_each_axis_alone_around_the_base():
    axes = {"data.noise": ["gaussian", "none", "outliers"],  # "gaussian" is the base value: not run twice
            "act": [{"model.activation": "gelu", "teacher.activation": "gelu"}]}
    cells = sweep.expand(make_spec(axes, mode="one_at_a_time", seeds=(0, 1)))
    keys = [(c.overrides, c.seed) for c in cells]
    assert keys == [({}, 0), ({}, 1),
                    ({"data.noise": "none"}, 0), ({"data.noise": "none"}, 1),
                    ({"data.noise": "outliers"}, 0), ({"data.noise": "outliers"}, 1),
                    ({"model.activation": "gelu", "teacher.activation": "gelu"}, 0),
                    ({"model.activation": "gelu", "teacher.activation": "gelu"}, 1)]
    bundled = cells[-1].config
    assert (bundled.model.activation, bundled.teacher.activation, bundled.data.noise) == ("gelu", "gelu", "gaussian")
    assert sweep.axis_columns(make_spec(axes, mode="one_at_a_time")) == [
        "data.noise", "model.activation", "teacher.activation"]


def test_spec_samplers_override_the_base_and_dotted_tables_are_flattened():
    raw = {"sweep": {"mode": "product", "samplers": ["sgld"]}, "base": BASE,
           "axes": {"model": {"activation": ["relu", "gelu"]}}}
    spec = sweep_spec.parse_spec(raw, "x/my_grid.toml")
    assert spec.name == "my_grid" and spec.out == "results/sweeps/my_grid.csv"
    assert list(spec.axes) == ["model.activation"]
    assert all(c.config.run.samplers == ("sgld",) for c in sweep.expand(spec))


@pytest.mark.parametrize("axes, mode, message", [
    ({"model.dept": [1, 2]}, "product", r"axis model\.dept = 1: model\.dept: unknown key \(did you mean 'depth'\?\)"),
    ({"data.noise": ["gaussian", "gausian"]}, "product", r"axis data\.noise = gausian: data\.noise: unknown value 'gausian'"),
    ({"model.widths": [[4], [0]]}, "one_at_a_time", r"axis model\.widths = \[0\]: model\.widths"),
    ({"act": ["tanh"]}, "product", r"\[axes\] act: not a dotted config key"),
    ({"data.n": []}, "product", r"\[axes\] data\.n: must be a non-empty list"),
    ({"run.seed": [1, 2]}, "product", r"run\.seed: use \[sweep\] seeds"),
    # each value alone is fine, the combination is not: the error names the cell
    ({"data.n": [260, 1000], "train.batch_size": [0, 280]}, "product",
     r"cell data\.n=260 train\.batch_size=280: train\.batch_size: must be <= data\.n"),
])
def test_bad_axes_are_one_line_config_errors_naming_them(axes, mode, message):
    with pytest.raises(ConfigError, match=message) as info:
        sweep.expand(make_spec(axes, mode=mode))
    assert "\n" not in str(info.value)


def test_bad_sweep_section_is_refused():
    with pytest.raises(ConfigError, match=r"sweep\.mode: unknown value 'grid'"):
        make_spec({}, mode="grid")
    with pytest.raises(ConfigError, match=r"sweep\.seed: unknown key \(did you mean 'seeds'\?\)"):
        make_spec({}, seed=3)
    with pytest.raises(ConfigError, match=r"sweep\.seeds"):
        make_spec({}, seeds=(-1,))
    with pytest.raises(ConfigError, match=r"sweep\.seeds: must be a non-empty list of integers in \[0, 2\^32\)"):
        make_spec({}, seeds=(2**32,))
    with pytest.raises(ConfigError, match=r"^x/s\.toml: base_preset: unknown preset 'quik' \(did you mean 'quick'\?\)"):
        sweep_spec.parse_spec({"sweep": {"base_preset": "quik"}}, "x/s.toml")
    with pytest.raises(ConfigError, match=r"base_preset: 'sweep_default' is a sweep spec, not a run preset"):
        sweep_spec.parse_spec({"sweep": {"base_preset": "sweep_default"}}, "x/s.toml")


def test_cli_bad_spec_exits_2_before_running_anything(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text('[sweep]\nmode = "product"\n[axes]\n"data.distribution" = ["gaussian", "gausian"]\n')
    out = tmp_path / "r.csv"
    assert cli.main(["sweep", "--spec", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "data.distribution = gausian" in err and "\n" not in err
    assert not out.exists()
    assert cli.main(["sweep", "--spec", str(tmp_path / "missing.toml")]) == 2
    assert "--spec" in capsys.readouterr().err


def test_default_spec_covers_the_seed_factors_and_is_valid(capsys):
    spec = sweep.load_spec()
    assert spec.out == "results/sweeps/llc_sweep_results.csv"
    cells = sweep.expand(spec)
    varied = {k for c in cells for k in c.overrides}
    assert {"model.widths", "model.activation", "data.distribution", "data.noise"} <= varied
    depths = {len(c.config.model.widths) for c in cells}
    widths = {c.config.model.widths[0] for c in cells}
    assert len(depths) >= 3 and len(widths) >= 3
    assert cli.main(["sweep", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{len(cells)} cells" in out and all(c.cell_id in out for c in cells)


# ---------------------------------------------------------------------------------------------
# The CSV


def test_csv_rows_schema_values_and_a_failing_cell(tmp_path):
    spec = make_spec({"model.activation": ["relu", "tanh", "gelu"], "data.noise": ["gaussian", "outliers", "none"]},
                     seeds=(0, 1))
    out = tmp_path / "r.csv"
    run_quiet(spec, out)
    rows = read_csv(out)
    header = next(csv.reader(out.open()))
    assert header == ["cell_id", "seed", "sampler", "model.activation", "data.noise", *sweep.METRICS,
                      "status", "warnings", "error", "versions", "fingerprint"]
    assert len(rows) == 3 * 3 * 2 * 2  # cells x seeds x samplers
    assert len({(r["cell_id"], r["sampler"]) for r in rows}) == len(rows)
    for r in rows:
        if r["model.activation"] == "tanh":  # the failing cell: recorded, and the sweep went on
            assert r["status"] == "failed" and r["llc_mean"] == "" and r["d"] == ""
            assert r["error"] == "RuntimeError: synthetic failure on two lines"
        elif r["data.noise"] == "none":  # the estimator gave up: the error column says why
            assert r["status"] == "failed" and r["d"] == "21"
            assert r["error"] == ("SPIKES: a spike. Remedy: smaller step" if r["sampler"] == "sgld"
                                  else "the estimator reported failure")
        else:
            assert r["status"] == ("diverged" if r["data.noise"] == "outliers" else "ok")
            assert r["error"] == "" and float(r["llc_mean"]) >= 10 and float(r["llc_se"]) == 0.5
            assert float(r["grad_evals"]) == 123 and r["d"] == "21" and r["truth"] == ""
            assert r["warnings"] == ("SPIKES" if r["sampler"] == "sgld" else "")
        assert r["seed"] in ("0", "1")
        assert isinstance(json.loads(r["versions"]), dict)
    # the failed rows still say which versions were installed
    assert "jax" in json.loads(next(r for r in rows if r["status"] == "failed")["versions"])


def test_config_columns_hold_resolved_values_even_for_the_base_cell(tmp_path):
    spec = make_spec({"data.noise": ["none"], "w": [{"model.widths": [2, 2], "teacher.widths": [2, 2]}]},
                     mode="one_at_a_time", samplers=["sgld"])
    out = tmp_path / "r.csv"
    run_quiet(spec, out)
    rows = read_csv(out)
    assert [(r["data.noise"], r["model.widths"], r["teacher.widths"]) for r in rows] == [
        ("gaussian", "[4]", "[4]"), ("none", "[4]", "[4]"), ("gaussian", "[2,2]", "[2,2]")]


def test_summary_medians_and_status_counts():
    rows = [{"sampler": "sgld", "status": s, "llc_mean": v, "rel_error": e}
            for s, v, e in (("ok", "1", "0.1"), ("warnings", "3", "-0.3"), ("ok", "2", ""),
                            ("failed", "", ""), ("diverged", "1e9", ""))]
    (s,) = sweep.summarize(rows)
    assert s["median_llc"] == 2 and s["median_abs_rel_error"] == pytest.approx(0.2)
    assert s["status"] == {"ok": 2, "warnings": 1, "failed": 1, "diverged": 1}


# ---------------------------------------------------------------------------------------------
# Resume


def test_resume_truncates_a_torn_line_and_runs_only_missing_cells(tmp_path, monkeypatch):
    spec = make_spec({"data.n": [300, 350, 400]}, seeds=(0, 1))
    out = tmp_path / "r.csv"
    run_quiet(spec, out)
    full = out.read_text()
    lines = full.splitlines(keepends=True)
    # keep the header, two complete cells, one sampler row of a third cell, and a torn line
    out.write_text("".join(lines[:6]) + lines[6][:17])
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv(LOG_ENV, str(log))
    run_quiet(spec, out)
    assert sorted(out.read_text().splitlines()) == sorted(full.splitlines())  # same rows, none twice
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(calls) == 6 - 2  # the two complete cells were skipped
    assert calls[0]["samplers"] == ["rmsprop_sgld"]  # the partial cell reruns only its missing sampler
    assert all(c["samplers"] == ["sgld", "rmsprop_sgld"] for c in calls[1:])
    log.unlink()
    run_quiet(spec, out)  # nothing left to do
    assert not log.exists()


def test_rows_record_their_fingerprint_and_rerun_stale_redoes_only_foreign_rows(tmp_path, monkeypatch):
    from llc_bench.artifacts import fingerprint

    here = fingerprint()
    assert "jax " in here and "jaxlib " in here and "cpu" in here.lower()
    spec = make_spec({"data.n": [300, 350]})
    out = tmp_path / "r.csv"
    run_quiet(spec, out)
    rows = read_csv(out)
    assert {r["fingerprint"] for r in rows} == {here}
    # a CSV from before the column: resumed, its rows get an empty (unknown) fingerprint
    legacy = [{k: v for k, v in r.items() if k != "fingerprint"} for r in rows]
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(legacy[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(legacy)
    text = out.read_text().splitlines()
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv(LOG_ENV, str(log))
    legacy_bytes = out.read_bytes()
    sweep.dry_run(spec, out, log=lambda _: None)
    run_quiet(spec, out)  # resume treats every row as done, and reading writes nothing
    assert not log.exists() and out.read_bytes() == legacy_bytes
    assert [r["fingerprint"] for r in sweep.ResultsCSV(out, sweep.columns(spec)).read()] == [""] * len(legacy)
    sweep.ResultsCSV(out, sweep.columns(spec)).append([])  # a write migrates the file
    assert next(csv.reader(out.open()))[-1] == "fingerprint" and len(read_csv(out)) == len(legacy)
    # one row now claims another machine
    rows = sweep.ResultsCSV(out, sweep.columns(spec)).read()
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows([{**r, "fingerprint": here if r["data.n"] == "300" else "jax 0.0; other machine"}
                          for r in rows])
    run_quiet(spec, out, rerun_stale=True)
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(calls) == 1 and calls[0]["samplers"] == ["sgld", "rmsprop_sgld"]
    rows = read_csv(out)
    assert len(rows) == len(text) - 1 and {r["fingerprint"] for r in rows} == {here}
    assert [r["data.n"] for r in read_csv(tmp_path / "r.stale.csv")] == ["350", "350"]


def test_append_never_duplicates_and_refuses_a_foreign_csv(tmp_path):
    f = sweep.ResultsCSV(tmp_path / "r.csv", ["cell_id", "sampler", "x"])
    assert f.append([{"cell_id": "a", "sampler": "s", "x": 1}]) == 1
    assert f.append([{"cell_id": "a", "sampler": "s", "x": 2}, {"cell_id": "b", "sampler": "s", "x": 3}]) == 1
    assert f.read() == [{"cell_id": "a", "sampler": "s", "x": "1"}, {"cell_id": "b", "sampler": "s", "x": "3"}]
    with pytest.raises(ConfigError, match="other columns"):
        sweep.ResultsCSV(tmp_path / "r.csv", ["cell_id", "sampler", "y"]).read()


def _sweep_cmd(spec_path, out, *extra):
    return [sys.executable, str(ROOT / "main.py"), "sweep", "--spec", str(spec_path), "--out", str(out),
            "--no-progress", *extra]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu", LLC_BENCH_NO_PROGRESS="1")
    env.update(extra)
    return env


def _spec_file(tmp_path, n_values, workers_note=""):
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
[sweep]
name = "killed"
mode = "product"
seeds = [0, 1]
samplers = ["sgld", "rmsprop_sgld"]
runner = "test_sweep:fake_cell"
[base]
data.n = 300
data.in_dim = 3
teacher.widths = [4]
model.widths = [4]
model.target_params = "none"
[axes]
"data.n" = {n_values}
""")
    return spec


def test_resume_after_sigkill_runs_every_cell_exactly_once(tmp_path):
    """Kill -9 a two-worker sweep mid-run, rerun it in one process: every row once, as a clean run gives."""
    n_values = [300, 310, 320, 330, 340, 350, 360, 370]
    spec, out = _spec_file(tmp_path, n_values), tmp_path / "r.csv"
    total_rows = len(n_values) * 2 * 2
    proc = subprocess.Popen(_sweep_cmd(spec, out, "--workers", "2"), cwd=ROOT, env=_env(**{SLEEP_ENV: "0.4"}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 1 + 2 * 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = read_csv(out) if out.read_text().endswith("\n") else None
    assert done_before is None or len(done_before) < total_rows  # it really was killed mid-sweep

    res = subprocess.run(_sweep_cmd(spec, out), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = read_csv(out)
    assert len(rows) == total_rows
    keys = [(r["cell_id"], r["sampler"]) for r in rows]
    assert len(set(keys)) == total_rows
    assert {(r["data.n"], r["seed"]) for r in rows} == {(str(n), str(s)) for n in n_values for s in (0, 1)}
    assert all(r["status"] == "ok" for r in rows)
    assert "results: " in res.stdout and "median λ̂" in res.stdout
    # the rows equal those of an uninterrupted in-process run (the pool and the resume change nothing)
    ref = tmp_path / "ref.csv"
    run_quiet(sweep.load_spec(spec), ref)

    def strip(rs):
        return sorted(tuple(v for k, v in r.items() if k != "wall_s") for r in rs)

    assert strip(rows) == strip(read_csv(ref))


def test_dry_run_marks_done_cells_and_runs_nothing(tmp_path, capsys):
    spec = _spec_file(tmp_path, [300, 310])
    out = tmp_path / "r.csv"
    assert cli.main(["sweep", "--spec", str(spec), "--out", str(out), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "4 cells" in listing and listing.count("data.n=") == 4 and not out.exists()


# ---------------------------------------------------------------------------------------------
# Real runs


TINY = {
    "data": {"n": 256, "in_dim": 2},
    "teacher": {"widths": [2]},
    "model": {"widths": [2], "target_params": "none"},
    "train": {"steps": 100, "learning_rate": 0.01},
    "run": {"num_chains": 2, "num_burnin_steps": 20, "num_draws": 20, "num_steps_bw_draws": 1},
}


@pytest.mark.slow
def test_real_experiment_cell_end_to_end(tmp_path):
    """The default cell function (run_experiment) through the sweep; ~15-45 s of JAX compilation."""
    raw = {"sweep": {"name": "tiny", "samplers": ["sgld"], "seeds": [0]}, "base": TINY,
           "axes": {"data.noise": ["gaussian", "student_t"]}}
    spec = sweep_spec.parse_spec(raw, "tiny.toml")
    out = tmp_path / "tiny.csv"
    run_quiet(spec, out)
    rows = read_csv(out)
    assert [(r["sampler"], r["data.noise"]) for r in rows] == [("sgld", "gaussian"), ("sgld", "student_t")]
    for r in rows:
        assert r["status"] in ("ok", "warnings"), r["error"]
        assert float(r["llc_mean"]) == pytest.approx(float(r["llc_mean"]))  # a number
        assert float(r["grad_evals"]) > 0 and float(r["d"]) == 2 * 2 + 2 + 2 * 1 + 1
        assert json.loads(r["versions"])["jax"] != "missing"


@pytest.mark.slow
def test_ray_backend_on_a_local_instance(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # as run_sweep does; read when ray is imported
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])  # Ray workers must import the fake runner
    ray = pytest.importorskip("ray")
    spec = make_spec({"data.n": [300, 350], "model.activation": ["relu", "tanh"]})
    out, ref = tmp_path / "ray.csv", tmp_path / "ref.csv"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run_quiet(spec, out, backend="ray")
    finally:
        ray.shutdown()
    run_quiet(spec, ref)
    rows = read_csv(out)
    assert len(rows) == 4 * 2
    assert {(r["cell_id"], r["sampler"], r["llc_mean"], r["status"]) for r in rows} == {
        (r["cell_id"], r["sampler"], r["llc_mean"], r["status"]) for r in read_csv(ref)}


def test_auto_step_size_axis_and_its_csv_columns(tmp_path):
    """An axis value "auto": the config column says auto, the metric columns the ε used, h_max, HVPs."""
    spec = make_spec({"sampler.sgld.step_size": ["auto", 1e-5]}, samplers=["sgld"])
    out = tmp_path / "auto.csv"
    run_quiet(spec, out)
    rows = {r["sampler.sgld.step_size"]: r for r in read_csv(out)}
    assert set(rows) == {"auto", "1e-05"}
    assert float(rows["auto"]["step_size"]) == 2.5e-4 and rows["auto"]["h_max"] == "3.0"
    assert rows["auto"]["num_hvp"] == "17" and rows["1e-05"]["num_hvp"] == ""
    assert float(rows["1e-05"]["step_size"]) == 1e-5
    with pytest.raises(ConfigError, match='sampler.sgld.step_size: must be a number > 0 or "auto"'):
        sweep.expand(make_spec({"sampler.sgld.step_size": ["fast"]}, samplers=["sgld"]))


def test_a_killed_cell_resumes_from_its_checkpoints(tmp_path, monkeypatch):
    """A real cell killed after 3 saved chunks (of 8: burn-in and draws in chunks of 5 steps): the
    rerun reuses them and writes the rows a clean sweep writes, seconds aside; nothing is left in
    <name>.checkpoints/."""
    base = {**TINY, "run": {**TINY["run"], "chunk_size": 5}}
    raw = {"sweep": {"name": "tiny", "samplers": ["sgld"], "seeds": [0]}, "base": base,
           "axes": {"data.noise": ["gaussian"]}}
    spec = sweep_spec.parse_spec(raw, "tiny.toml")
    out, ref = tmp_path / "tiny.csv", tmp_path / "ref.csv"
    run_quiet(spec, ref)
    saved = []

    def killed_after_3(folder, **options):
        saved.append(Path(folder))
        return checkpoints(folder, stop_after=3, **options)

    with monkeypatch.context() as patch:
        patch.setattr(sweep, "checkpoints", killed_after_3)
        with pytest.raises(Interrupted):
            run_quiet(spec, out)
    (folder,) = saved
    assert folder.parent == sweep.checkpoint_root(out) and saved_progress(folder).startswith("1 phase(s), 3 chunk(s)")
    assert not out.exists() or read_csv(out) == []
    stores = []

    @contextlib.contextmanager
    def watched(folder, **options):
        with checkpoints(folder, **options) as store:
            stores.append(store)
            yield store

    with monkeypatch.context() as patch:
        patch.setattr(sweep, "checkpoints", watched)
        run_quiet(spec, out)
    assert stores[0].events[0] == "phase 0: 3/4 chunks reused" and stores[0].saved_chunks == 5
    timing = ("wall_s", "compile_s", "wnv_time")

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert strip(read_csv(out)) == strip(read_csv(ref))
    assert not any(sweep.checkpoint_root(out).iterdir())
