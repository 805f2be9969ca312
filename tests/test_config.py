"""Configuration: every bad input is refused before any work, in one line with exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from llc_bench import cli
from llc_bench.config import Config, ConfigError, from_dict, load_config, replace, to_dict, to_toml

ROOT = Path(__file__).resolve().parent.parent

BAD_INPUTS = [
    (["--set", "model.widths=[16,0]"], "model.widths"),
    (["--set", "model.widths=[-3]"], "model.widths"),
    (["--set", "teacher.widths=[8,-1]"], "teacher.widths"),
    (["--set", "model.activation=relux"], "model.activation: unknown value 'relux' (did you mean 'relu'?)"),
    (["--set", "data.distribution=gausian"], "data.distribution: unknown value 'gausian' (did you mean 'gaussian'?)"),
    (["--set", "data.noise=student"], "data.noise: unknown value 'student'"),
    (["--sampler", "sgldd"], "run.samplers: unknown sampler 'sgldd' (did you mean 'sgld'?)"),
    (["--set", "teacher.kind=dln", "--set", "teacher.widths=[4,4]", "--set", "teacher.rank=9"],
     "teacher.rank: must be <= the smallest teacher width"),
    (["--set", "sampler.sgld.batch_size=20000"], "sampler.sgld.batch_size: must be <= data.n"),
    (["--set", "train.batch_size=20000"], "train.batch_size: must be <= data.n"),
    (["--set", "sampler.sgld.step_size=-1e-4"], "sampler.sgld.step_size: must be > 0"),
    (["--set", "sampler.sgld.step_size=nan"], "sampler.sgld.step_size: must be a finite number"),
    (["--set", "sampler.rmsprop_sgld.step_size=inf"], "sampler.rmsprop_sgld.step_size: must be a finite number"),
    (["--set", "posterior.beta0=-1"], "posterior.beta0: must be > 0"),
    (["--set", "posterior.gamma=-5"], "posterior.gamma: must be >= 0"),
    (["--set", "sampler.rmsprop_sgld.eps=2"], "sampler.rmsprop_sgld.eps: must be in (0, 1]"),
    (["--set", "sampler.sgld.step_size=fast"], 'sampler.sgld.step_size: must be a number > 0 or "auto" (got \'fast\')'),
    (["--set", "sampler.rmsprop_sgld.step_size=-1"], 'sampler.rmsprop_sgld.step_size: must be > 0 or "auto"'),
    (["--set", "sampler.rmsprop_sgld.adapt=sometimes"],
     "sampler.rmsprop_sgld.adapt: unknown value 'sometimes'; allowed: burnin, always"),
    (["--set", "sampler.sgld.auto_constant=5"], "sampler.sgld.auto_constant: must be in (0, 4)"),
    (["--set", "data.nn=5"], "data.nn: unknown key (did you mean 'n'?)"),
    (["--set", "sampler.sgld.stepsize=1e-4"], "sampler.sgld.stepsize: unknown key (did you mean 'step_size'?)"),
    (["--set", "datta.n=5"], "datta: unknown section (did you mean 'data'?)"),
    (["--set", "data.n=abc"], "data.n: must be an integer"),
    (["--set", "data.n=0"], "data.n: must be > 0"),
    (["--set", "run.num_chains=2.5"], "run.num_chains: must be an integer"),
    (["--preset", "nosuch"], "--preset: unknown preset 'nosuch'"),
    (["--config", "/nonexistent/x.toml"], "--config /nonexistent/x.toml: file not found"),
    (["--set", "posterior.prior_radius=2"], "posterior.gamma: set exactly one"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--set", "data.n=1", "--set", "sampler.sgld.batch_size=1", "--set", "sampler.rmsprop_sgld.batch_size=1"],
     "data.n: must be >= 2"),
    (["--set", "model.widths=none", "--set", "model.target_params=1"], "model.target_params: cannot size"),
    (["--set", "run.seed=99999999999999999999"], "run.seed: must be an integer in [0, 2^32"),
    (["--set", "run.seed=4294967296"], "run.seed: must be an integer in [0, 2^32"),
    (["--set", "model.widths=[8,"], "model.widths: unbalanced brackets in '[8,'"),
    (["--set", "model.widths=((8,16"], "model.widths: unbalanced brackets"),
    (["--set", "model.widths=[8,,16]"], "model.widths: empty item"),
    (["--set", "model.widths=[8,(16)]"], "model.widths: malformed list"),
    (["--set", "run.samplers=[hmc"], "run.samplers: unbalanced brackets"),
    (["--preset", ""], "--preset: unknown preset ''"),
    (["--preset", "../pyproject"], "--preset: unknown preset '../pyproject'"),
    (["--preset", "sweep_default"], "'sweep_default' is a sweep spec, not a run preset"),
    (["--config", ""], "--config: empty file name"),
    (["--preset", "dln", "--set", "teacher.widths=[8]", "--set", "model.widths=[5,4]"],
     "model.widths: [5, 4] contradicts the teacher's [8]"),
    (["--preset", "dln", "--set", "model.bias=true"], "model.bias: True contradicts the teacher's False"),
    (["tune", "--set", "tune.step_sizes=[-1]"], "error: tune.step_sizes: values must be"),
    (["tune", "--set", "tune.min_chains=0"], "tune.min_chains: must be >= 1 (got 0)"),
    (["tune", "--sampler", "sgldd"], "--sampler: unknown sampler 'sgldd' (did you mean 'sgld'?)"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(argv, expected, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err
    assert "Traceback" not in err


def test_real_command_line_bad_input_and_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv, expected in [
        (["--set", "model.activation=relux"], "model.activation: unknown value"),
        (["--out", str(blocker / "sub")], "--out"),
        (["--config", str(tmp_path / "missing.toml")], "file not found"),
    ]:
        proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *argv], capture_output=True,
                              text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""


def test_invalid_toml_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nn = 3")
    assert cli.main(["--config", str(bad)]) == 2
    assert "invalid TOML" in capsys.readouterr().err


def test_layering_defaults_preset_file_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[data]\nn = 777\nin_dim = 5\n[sampler.sgld]\nstep_size = 3e-5\n")
    cfg = load_config("quick", f, ["data.in_dim=7", "run.samplers=sgld,hmc"])
    assert cfg.data.n == 777 and cfg.data.in_dim == 7
    assert cfg.run.samplers == ("sgld", "hmc")
    assert cfg.sampler["sgld"].step_size == 3e-5
    assert set(cfg.sampler) >= {"sgld", "hmc"}


def test_an_in_memory_layer_is_a_file_without_the_file(tmp_path):
    """A dict layer gives the Config the same content in a --config file gives, sits between the
    file and the overrides, is not changed, and a bad value in it is the file's one-line ConfigError."""
    layer = {"data": {"n": 777, "in_dim": 5}, "sampler": {"sgld": {"step_size": "auto", "num_draws": 30}}}
    f = tmp_path / "c.toml"
    f.write_text(tomli_w.dumps(layer))
    sets = ["data.in_dim=7", "run.samplers=sgld,hmc"]
    from_file = load_config("quick", f, sets)
    assert load_config("quick", None, sets, layers=[layer]) == from_file
    assert from_file.data.in_dim == 7 and from_file.sampler["sgld"].step_size == "auto"
    assert layer == {"data": {"n": 777, "in_dim": 5}, "sampler": {"sgld": {"step_size": "auto", "num_draws": 30}}}
    # after the file, in order: the last layer wins
    later = load_config("quick", f, (), layers=[{"data": {"n": 900}}, {"data": {"n": 901}}])
    assert later.data.n == 901 and later.data.in_dim == 5
    for bad in ({"data": {"n": "many"}}, {"sampler": {"sgld": {"step_size": -1.0}}}, {"dta": {"n": 5}},
                {"data": 5}):
        f.write_text(tomli_w.dumps(bad))
        with pytest.raises(ConfigError) as from_file_error:
            load_config("quick", f)
        with pytest.raises(ConfigError) as from_layer_error:
            load_config("quick", layers=[bad])
        assert str(from_layer_error.value) == str(from_file_error.value)
        assert "\n" not in str(from_layer_error.value)


def test_round_trip_through_toml(tmp_path):
    cfg = load_config("quick", None, ["posterior.gamma=none", "posterior.prior_radius=3.0"])
    f = tmp_path / "resolved.toml"
    f.write_text(to_toml(cfg))
    again = load_config(None, f)
    assert to_dict(again) == to_dict(cfg)
    assert again.posterior.gamma is None and again.posterior.prior_radius == 3.0


def test_frozen_and_replace():
    cfg = from_dict({})
    assert isinstance(cfg, Config)
    with pytest.raises(AttributeError):
        cfg.data.n = 5  # type: ignore[misc]
    cfg2 = replace(cfg, **{"sampler.sgld.step_size": 1e-6, "data.n": 500})
    assert cfg2.sampler["sgld"].step_size == 1e-6 and cfg2.data.n == 500
    with pytest.raises(ConfigError, match="sampler.sgld.step_size"):
        replace(cfg, **{"sampler.sgld.step_size": 0.0})


def test_every_preset_loads():
    from llc_bench.config import preset_names

    names = preset_names()
    assert {"default", "quick", "dln"} <= set(names)
    for name in names:
        load_config(name)


def test_per_sampler_schedule_overrides_run_steps(tmp_path):
    cfg = load_config("quick", None, ["sampler.hmc.num_draws=37", "sampler.hmc.num_steps_bw_draws=1"])
    assert cfg.schedule["hmc"].num_draws == 37 and cfg.schedule["hmc"].num_steps_bw_draws == 1
    assert cfg.schedule["hmc"].num_burnin_steps == cfg.run.num_burnin_steps
    assert cfg.schedule["sgld"].num_draws == cfg.run.num_draws
    f = tmp_path / "r.toml"
    f.write_text(to_toml(cfg))
    assert load_config(None, f).schedule == cfg.schedule
    # re-fed through the CLI's layering (default preset underneath), the resolved file wins entirely
    assert to_dict(load_config("default", f)) == to_dict(cfg)
    assert cli.main(["--set", "sampler.hmc.num_draws=0"]) == 2


def test_auto_step_size_through_toml_set_and_round_trip(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[sampler.sgld]\nstep_size = "auto"\nauto_constant = 0.2\n')
    cfg = load_config("quick", f, ["sampler.rmsprop_sgld.step_size=auto", "sampler.rmsprop_sgld.adapt=always"])
    assert cfg.sampler["sgld"].step_size == "auto" and cfg.sampler["sgld"].auto_constant == 0.2
    assert cfg.sampler["rmsprop_sgld"].step_size == "auto" and cfg.sampler["rmsprop_sgld"].adapt == "always"
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(to_toml(cfg))
    assert to_dict(load_config(None, resolved)) == to_dict(cfg)
    assert replace(cfg, **{"sampler.sgld.step_size": 1e-5}).sampler["sgld"].step_size == 1e-5
    assert load_config("quick").sampler["rmsprop_sgld"].adapt == "burnin"


def test_bad_paths_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x")
    Path("b.toml").write_bytes(b"\xff\xfe[data]\n")
    Path("results").mkdir()
    for argv, expected in [
        (["--sampler", "hmc", "--set", "run.out_dir=afile"], "run.out_dir afile: is a file"),
        (["--sampler", "hmc", "--set", "run.out_dir=afile/sub"], "run.out_dir afile/sub: not writable"),
        (["--preset", "quick", "--config", "b.toml"], "--config b.toml: not UTF-8"),
        (["tune", "--config", "b.toml"], "--config b.toml: not UTF-8"),
        (["sweep", "--spec", "b.toml"], "--spec b.toml: not UTF-8"),
        (["sweep", "--out", "results", "--dry-run"], "--out results: is a directory"),
        (["sweep", "--out", "results"], "--out results: is a directory"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "b.toml", "results"]
    assert Path("afile").read_text() == "x" and not any(Path("results").iterdir())


def test_use_teacher_student_defaults_to_the_teacher():
    cfg = load_config("dln", None, ["data.in_dim=6", "teacher.widths=[8]"])
    assert (cfg.model.widths, cfg.model.activation, cfg.model.bias) == ((8,), "identity", False)
    assert from_dict(to_dict(cfg)) == cfg  # the resolved student round-trips as explicit keys
    mlp = load_config("quick", None, ["train.use_teacher=true", "teacher.widths=[3]", "teacher.activation=tanh",
                                      "model.widths=none"])
    assert (mlp.model.widths, mlp.model.activation, mlp.model.bias) == ((3,), "tanh", True)


def test_strict_lists_still_accept_the_usual_spellings():
    for text, widths in [("[8, 16]", (8, 16)), ("(8,16)", (8, 16)), ("8,16", (8, 16)), ("[]", ())]:
        assert load_config("quick", None, [f"model.widths={text}"]).model.widths == widths
    assert load_config("quick", None, ["run.samplers=[hmc, sgld]"]).run.samplers == ("hmc", "sgld")


def test_seed_keys_are_distinct_across_the_allowed_range():
    import jax

    from llc_bench.rng import stream_key

    top = load_config("quick", None, [f"run.seed={2**32 - 1}"]).run.seed
    keys = {tuple(jax.random.key_data(stream_key(s, "data")).tolist()) for s in (0, 1, top)}
    assert len(keys) == 3
