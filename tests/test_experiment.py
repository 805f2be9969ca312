"""The quick preset end to end through the real command line, and atomic artifacts on interruption."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from llc_bench import artifacts, experiment
from llc_bench.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_TOP = {"run_id", "seed", "n", "n_beta", "gamma", "d", "loss_at_wstar", "truth", "versions", "samplers"}
SUMMARY_SAMPLER = {"llc_mean", "llc_se", "llc_per_chain", "rel_error", "ess_bulk", "ess_tail", "rhat",
                   "accept_rate", "grad_evals", "wall_s", "compile_s", "wnv_time", "wnv_grad", "status",
                   "warnings", "step_size", "step_size_auto", "h_max", "num_hvp"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--preset", "quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**__import__("os").environ, "COLUMNS": "200"})
    return proc, out


def test_quick_preset_exit_status_and_table(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("sgld", "rmsprop_sgld", "hmc", "mclmc"):
        assert name in proc.stdout
    assert "Traceback" not in proc.stderr


def test_quick_summary_json_contract(quick_run):
    _, out = quick_run
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_TOP <= set(summary)
    assert set(summary["samplers"]) == {"sgld", "rmsprop_sgld", "hmc", "mclmc"}
    for name, s in summary["samplers"].items():
        assert SUMMARY_SAMPLER <= set(s), name
        assert s["status"] in ("ok", "warnings", "not_converged", "diverged", "failed")
        if s["status"] != "failed":
            assert np.isfinite(s["llc_mean"]) and s["llc_se"] > 0
            assert s["llc_mean"] == pytest.approx(np.mean([v for v in s["llc_per_chain"] if v is not None]))
            assert s["wnv_time"] == pytest.approx(s["llc_se"] ** 2 * s["wall_s"], rel=1e-6)
            assert s["wnv_grad"] == pytest.approx(s["llc_se"] ** 2 * s["grad_evals"], rel=1e-6)
    assert summary["samplers"]["hmc"]["accept_rate"] is not None
    assert summary["samplers"]["sgld"]["accept_rate"] is None
    assert summary["samplers"]["sgld"]["step_size"] == 1e-5 and summary["samplers"]["hmc"]["step_size"] is None
    # run_id is the hash of the resolved config that was written beside it
    cfg = load_config(None, out / "config.toml")
    from llc_bench.config import to_dict

    assert artifacts.run_id(to_dict(cfg)) == summary["run_id"]


def test_quick_pngs_exist_and_zarr_reopens(quick_run):
    _, out = quick_run
    pngs = sorted((out / "plots").glob("*.png"))
    for name in ("sgld", "rmsprop_sgld", "hmc", "mclmc"):
        assert (out / "plots" / f"{name}_loss_trace.png").stat().st_size > 1000
        assert (out / "plots" / f"{name}_running_llc.png").stat().st_size > 1000
    assert (out / "plots" / "hmc_accept_hist.png").exists()
    assert (out / "plots" / "mclmc_energy_hist.png").exists()
    assert all(p.stat().st_size > 1000 for p in pngs)
    summary = json.loads((out / "summary.json").read_text())
    tree = xr.open_datatree(out / "traces.zarr", engine="zarr")
    for name, s in summary["samplers"].items():
        post = tree[name]["posterior"]
        llc = post["llc"].values[:, -1]  # running λ̂ at the last draw = per-chain estimate
        np.testing.assert_allclose(llc, s["llc_per_chain"], rtol=1e-5)
        assert post["L_n"].shape[1] == 100


def test_interrupted_run_leaves_no_summary(tmp_path, monkeypatch):
    cfg = load_config("quick", None, ["run.samplers=sgld", "run.num_draws=20", "run.num_burnin_steps=20"])
    experiment.run_experiment(cfg, out_dir=tmp_path, progress=False)
    assert (tmp_path / "summary.json").exists()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("llc_bench.plots.plot_all", boom)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(cfg, out_dir=tmp_path, progress=False)
    assert not (tmp_path / "summary.json").exists()  # the old one must not vouch for a torn run
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_json_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "summary.json"
    artifacts.write_json_atomic(path, {"ok": 1})

    class Unserializable:
        pass

    with pytest.raises(TypeError):
        artifacts.write_json_atomic(path, {"bad": Unserializable()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


FAST = ["run.samplers=sgld", "run.num_draws=20", "run.num_burnin_steps=20", "sampler.sgld.num_burnin_steps=20"]


def test_out_dir_describes_one_run(tmp_path, monkeypatch):
    """An earlier run's summary, store and plots never survive into a new run's directory."""
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "hmc_loss_trace.png").write_bytes(b"old")
    (tmp_path / "plots" / ".sgld_autocorr.x1.png").write_bytes(b"torn")
    (tmp_path / "traces.zarr").mkdir()
    (tmp_path / "summary.json").write_text('{"samplers": {"hmc": {"status": "ok"}}}')
    (tmp_path / "notes.txt").write_text("mine")
    cfg = load_config("quick", None, FAST)

    def crash(*args, **kwargs):
        raise RuntimeError("crashed mid-run")

    monkeypatch.setattr("llc_bench.experiment.build_target", crash)
    with pytest.raises(RuntimeError, match="crashed mid-run"):
        experiment.run_experiment(cfg, out_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "notes.txt"]
    assert load_config(None, tmp_path / "config.toml") == cfg  # the directory names the run that crashed
    monkeypatch.undo()
    experiment.run_experiment(cfg, out_dir=tmp_path, progress=False)
    assert {p.name.split("_")[0] for p in (tmp_path / "plots").iterdir()} == {"sgld"}
    assert set(json.loads((tmp_path / "summary.json").read_text())["samplers"]) == {"sgld"}


def test_diverged_erm_is_failed_with_its_reason_and_exit_3(tmp_path, capsys):
    from llc_bench import cli

    argv = ["--preset", "quick", "--sampler", "hmc", "--set", "train.learning_rate=1e6", "--out", str(tmp_path),
            "--no-progress"]
    assert cli.main(argv) == cli.EXIT_ALL_FAILED == 3
    captured = capsys.readouterr()
    assert "ERM diverged" in captured.out and "Traceback" not in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: every sampler failed")
    s = json.loads((tmp_path / "summary.json").read_text())["samplers"]["hmc"]
    assert s["status"] == "failed" and s["llc_mean"] is None and s["llc_per_chain"] == []
    assert s["error"].startswith("ERM diverged") and "train.learning_rate" in s["error"]
    assert not (tmp_path / "traces.zarr").exists()


def test_one_draw_is_a_warning_not_ok():
    cfg = load_config("quick", None, [*FAST, "run.num_draws=1"])
    summary = experiment.run_experiment(cfg, progress=False, write=False)
    s = summary["samplers"]["sgld"]
    assert s["status"] == "warnings" and s["ess_bulk"] is None
    assert any(w.startswith("too_few_draws: ESS and R̂ could not be computed from 1 draw") for w in s["warnings"])
