"""The hyperparameter search: verdicts and the recommendation on a hand-built grid, burn-in / thinning /
chain suggestions on traces with known answers, the nβ = 0 comparison, grid layering, artifacts, and
(slow) one tiny real tune end to end."""

import csv
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from llc_bench import tune, tune_report, tune_rules
from llc_bench.config import ConfigError
from llc_bench.runner import ChainResult

L_STAR = 1.0
T = 400
BURNIN = 100
K = 5


def make_result(traces: np.ndarray, burnin: int = BURNIN, k: int = K, n_beta: float = 10.0) -> ChainResult:
    """A ChainResult around hand-made (C, T) per-step losses; draws are the trace every k steps after burn-in."""
    traces = np.asarray(traces, float)
    c, t = traces.shape
    draw_steps = np.arange(burnin + k - 1, t, k)
    bad = ~np.isfinite(traces)
    diverged_at = np.where(bad.any(axis=1), np.argmax(bad, axis=1), -1)
    nan = np.full((c, t), np.nan)
    return ChainResult(
        sampler="synthetic", loss_trace=traces, accept=nan, energy_change=nan,
        diverging=np.zeros((c, t), bool), draw_loss=traces[:, draw_steps], draw_steps=draw_steps,
        projections=np.zeros((c, draw_steps.size, 0)), diverged_at=diverged_at,
        grad_evals=np.ones(c), warmup_grad_evals=np.zeros(c), num_burnin_steps=burnin,
        loss_at_wstar=L_STAR, n_beta=n_beta, wall_s=0.0, warmup_s=0.0, compile_s=0.0, tuned={})


def rise_trace(rng, tau: float, amplitude: float = 1.0, chains: int = 4, noise: float = 0.02) -> np.ndarray:
    """L* + A (1 − exp(−t/τ)) + white noise: levels off after a few τ."""
    t = np.arange(T)
    return L_STAR + amplitude * (1 - np.exp(-t / tau)) + noise * rng.standard_normal((chains, T))


def cell(traces, step_size, n_beta, gamma=100.0):
    return tune_rules.assess(make_result(traces, n_beta=n_beta), step_size, n_beta, gamma)


@pytest.fixture(scope="module")
def synthetic_grid():
    rng = np.random.default_rng(0)
    t = np.arange(T)
    fast = rise_trace(rng, tau=8)
    slow = rise_trace(rng, tau=60)  # levels, but late (~180 steps)
    rising = L_STAR + t / T + 0.02 * rng.standard_normal((4, T))  # never levels off
    spiky = rise_trace(rng, tau=8)
    spiky[1, [150, 260, 330]] += 5.0
    diverging = rise_trace(rng, tau=8)
    diverging[2, 200:] = np.nan
    cells = {
        "fast": cell(fast, 1e-5, 10.0),
        "slow": cell(slow, 1e-6, 100.0),
        "rising": cell(rising, 1e-6, 100.0, gamma=10.0),
        "spiky": cell(spiky, 1e-4, 100.0),
        "diverging": cell(diverging, 1e-4, 100.0, gamma=1000.0),
    }
    return cells


def test_verdicts_name_each_failure(synthetic_grid):
    g = synthetic_grid
    assert g["fast"].verdict == "ok" and not g["fast"].failures
    assert not g["slow"].failures  # slow is eligible: ranking, not a flag, penalizes it
    assert "not_leveling" in g["rising"].failures
    assert "spikes" in g["spiky"].failures
    assert "nan" in g["diverging"].failures
    assert np.isfinite(g["fast"].llc_mean) and g["fast"].llc_mean == pytest.approx(10.0, rel=0.05)


def test_recommend_picks_fast_and_clean_over_larger_nbeta(synthetic_grid):
    rec = tune_rules.recommend(list(synthetic_grid.values()))
    assert rec.cell is synthetic_grid["fast"]
    assert [c for c, _ in rec.ranking] == [synthetic_grid["fast"], synthetic_grid["slow"]]
    assert rec.settle_step < 60 < rec.ranking[1][1]


def test_ties_go_to_larger_nbeta_then_smaller_step():
    rng = np.random.default_rng(1)
    same = rise_trace(rng, tau=8)
    small_nb = cell(same, 1e-5, 10.0)
    large_nb = cell(same + 0.0, 1e-5, 100.0)
    assert tune_rules.recommend([small_nb, large_nb]).cell is large_nb
    assert tune_rules.recommend([large_nb, small_nb]).cell is large_nb
    big_eps = cell(same, 1e-4, 100.0)
    assert tune_rules.recommend([big_eps, large_nb]).cell is large_nb


def test_no_clean_cell_gives_no_recommendation_with_remedy(synthetic_grid):
    g = synthetic_grid
    rec = tune_rules.recommend([g["rising"], g["spiky"], g["diverging"],
                          tune_rules.failed_cell(1e-3, 1.0, 10.0, "RuntimeError: boom")])
    assert rec.cell is None and rec.ranking == ()
    assert "decrease ε" in rec.reason  # the spikes / nan remedy from the guide's table


def test_settle_step_of_exponential_rise():
    t = np.arange(1000)
    tau = 40.0
    x = L_STAR + 2.0 * (1 - np.exp(-t / tau))  # noiseless: settles at τ ln(1/tol)
    step = tune_rules.settle_step(x, L_STAR, 0.1, window=1)
    assert abs(step - tau * math.log(10)) <= 2
    # A ramp: the final level is the last quarter's mean, so it "settles" only near the end.
    assert tune_rules.settle_step(L_STAR + t / 1000, L_STAR, 0.1) > 750
    assert tune_rules.settle_step(np.full(100, np.nan), L_STAR, 0.1) is None


def ar1(rng, phi: float, chains: int, steps: int, sd: float = 1.0) -> np.ndarray:
    """Stationary AR(1): ρ_k = φ^k."""
    x = np.empty((chains, steps))
    x[:, 0] = rng.standard_normal(chains) * sd
    innov = rng.standard_normal((chains, steps)) * sd * math.sqrt(1 - phi**2)
    for s in range(1, steps):
        x[:, s] = phi * x[:, s - 1] + innov[:, s]
    return x


@pytest.mark.parametrize("phi", [0.5, 0.9, 0.97])
def test_thinning_matches_ar1_autocorrelation(phi):
    rng = np.random.default_rng(2)
    truth = math.ceil(math.log(0.1) / math.log(phi))  # smallest k with φ^k < 0.1
    k = tune_rules.suggest_thinning(ar1(rng, phi, chains=8, steps=6000), threshold=0.1)
    assert abs(k - truth) <= max(1, 0.2 * truth), (k, truth)


def test_thinning_none_without_an_answer():
    rng = np.random.default_rng(3)
    x = ar1(rng, 0.9, chains=4, steps=2000)
    assert tune_rules.suggest_thinning(x, max_lag=10) is None  # 0.9^10 = 0.35: not reached
    assert tune_rules.suggest_thinning(np.full((2, 100), np.nan)) is None
    assert tune_rules.suggest_thinning(x[:, :3]) is None


def test_burnin_on_rise_with_ar1_noise():
    rng = np.random.default_rng(4)
    tau, steps = 50.0, 1500
    t = np.arange(steps)
    traces = L_STAR + 1.0 * (1 - np.exp(-t / tau)) + ar1(rng, 0.8, chains=4, steps=steps, sd=0.05)
    burnin = tune_rules.suggest_burnin(traces, L_STAR, tolerance=0.05)
    assert 0.8 * tau * math.log(20) <= burnin <= 1.25 * tau * math.log(20)
    traces[0, 700:] = np.nan  # a diverged chain is left out, not averaged
    assert tune_rules.suggest_burnin(traces, L_STAR, 0.05) == pytest.approx(burnin, abs=0.15 * burnin)


def test_num_chains_from_between_chain_spread():
    per_chain = np.array([8.0, 12.0, 8.0, 12.0])  # mean 10, sd 2.309
    sd = np.std(per_chain, ddof=1)
    expected = math.ceil((sd / (0.05 * 10.0)) ** 2)
    assert tune_rules.suggest_num_chains(per_chain, 0.05) == expected == 22
    assert tune_rules.suggest_num_chains(np.array([10.0, 10.0, 10.0])) == 2  # never below min_chains
    assert tune_rules.suggest_num_chains(np.array([10.0, np.nan])) is None


def test_suggest_on_recommended_cell(synthetic_grid):
    sug = tune_rules.suggest(synthetic_grid["fast"])
    assert sug.num_burnin_steps is not None and sug.num_burnin_steps < 60
    assert sug.num_steps_bw_draws == 1  # white noise after levelling
    assert sug.num_chains is not None and sug.num_chains >= 2


def test_control_comparison():
    rng = np.random.default_rng(5)
    with_grad = 0.05 + 0.002 * rng.standard_normal(4)
    prior_only = 0.30 + 0.01 * rng.standard_normal(4)
    c = tune_rules.compare_control(with_grad, prior_only)
    assert c.differs and c.rel_diff > 0.8 and c.z > 3
    same = tune_rules.compare_control(with_grad, with_grad[::-1] + 0.001)
    assert not same.differs
    noisy = tune_rules.compare_control(np.array([0.1, 0.5]), np.array([0.2, 0.7]))  # 40% apart, 1 SE
    assert not noisy.differs
    assert not tune_rules.compare_control(np.array([np.nan]), prior_only).differs


def test_grid_layering_and_validation(tmp_path):
    grid = tune_rules.load_grid([{"step_sizes": [1e-3], "gammas": [5.0]}],
                          ["tune.gammas=[1,2]", "tune.n_beta_scale=beta0"])
    assert grid.step_sizes == (1e-3,) and grid.gammas == (1.0, 2.0) and grid.n_beta_scale == "beta0"
    assert grid.n_beta_value(1.0, 1000) == pytest.approx(1000 / math.log(1000))
    with pytest.raises(ConfigError, match="step_sizes"):
        tune_rules.load_grid([], ["tune.step_sizes=[0]"])
    with pytest.raises(ConfigError, match="did you mean 'gammas'"):
        tune_rules.load_grid([], ["tune.gamas=[1]"])

    spec = tmp_path / "t.toml"
    spec.write_text('[data]\nn = 321\n[tune]\nn_betas = [3.0]\ngammas = [7.0]\n')
    cfg, grid = tune.load_tune_config(None, str(spec), ["tune.gammas=[8]", "data.in_dim=3"], "sgld")
    assert cfg.data.n == 321 and cfg.data.in_dim == 3 and cfg.run.samplers == ("sgld",)
    assert grid.n_betas == (3.0,) and grid.gammas == (8.0,)


def test_cells_csv_and_figure(synthetic_grid, tmp_path):
    cells = list(synthetic_grid.values())
    rec = tune_rules.recommend(cells)
    text = tune_report.grid_csv(cells, rec, "synthetic", n=1000)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(cells) and tuple(rows[0]) == tune_report.CSV_COLUMNS
    assert [r["recommended"] for r in rows].count("True") == 1
    fast = next(r for r in rows if r["recommended"] == "True")
    assert fast["verdict"] == "ok" and float(fast["n_beta"]) == 10.0
    assert next(r for r in rows if r["verdict"].startswith("nan"))["chains_used"] == "3"
    png = tune_report.plot_grid(cells, rec, tmp_path / "grid.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


@pytest.mark.slow
def test_tiny_real_tune_end_to_end(tmp_path, capsys):
    """2 × 2 × 1 grid on a 13-parameter MLP: artifacts, a recommendation, suggestions and the control."""
    sets = ["data.n=200", "data.in_dim=2", "teacher.widths=[3]", "model.widths=[3]",
            "model.target_params=none", "train.steps=1500", "train.learning_rate=0.02",
            "run.num_chains=3", "run.num_burnin_steps=100", "run.num_draws=60", "run.num_steps_bw_draws=5",
            "sampler.rmsprop_sgld.batch_size=200",
            "tune.step_sizes=[1e-4,1e-3]", "tune.n_betas=[30,300]", "tune.gammas=[100]"]
    args = SimpleNamespace(preset=None, config=None, overrides=sets, samplers=[], no_progress=True,
                           out=str(tmp_path))
    assert tune.main(args) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "tune_grid.csv").open()))
    assert len(rows) == 4 and {float(r["n_beta"]) for r in rows} == {30.0, 300.0}
    assert (tmp_path / "tune_grid.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "recommendation.json").read_text())
    assert summary["num_cells"] == 4
    assert summary["recommended"] is not None, out
    assert summary["control"] is not None and summary["control"]["differs"], out
    assert "Recommended:" in out and "nβ = 0 control" in out


def test_grid_cells_order_and_self_tuning_samplers():
    grid = tune_rules.TuneGrid(step_sizes=(1e-5, 1e-4), n_betas=(1.0, 2.0), gammas=(10.0, 100.0, 1000.0),
                         n_beta_scale="beta0")
    cells = tune.grid_cells(grid, n=100, tunes_step=True)
    assert len(cells) == 12 and cells[0] == (1e-5, pytest.approx(100 / math.log(100)), 10.0)
    assert [g for _, _, g in cells] == sorted(g for _, _, g in cells)  # γ outermost: figure rows
    auto = tune.grid_cells(grid, n=100, tunes_step=False)  # HMC / MCLMC tune ε themselves
    assert len(auto) == 6 and {e for e, _, _ in auto} == {None}


def test_unknown_sampler_is_a_config_error(tmp_path):
    args = SimpleNamespace(preset=None, config=None, overrides=[], samplers=["sgdl"], no_progress=True,
                           out=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown sampler"):
        tune.main(args)


def test_grid_accepts_auto_step_size_and_cells_keep_the_resolved_value():
    grid = tune_rules.load_grid([], ["tune.step_sizes=[auto,1e-4]"])
    assert grid.step_sizes == ("auto", 1e-4)
    with pytest.raises(ConfigError, match='tune.step_sizes: must be a number > 0 or "auto"'):
        tune_rules.load_grid([], ["tune.step_sizes=[fast]"])
    from llc_bench.config import load_config
    from llc_bench.experiment import build_posterior
    from llc_bench.target import build_target

    cfg = load_config(None, None, ["data.n=200", "data.in_dim=2", "teacher.widths=[3]", "model.widths=[3]",
                                   "model.target_params=none", "train.steps=300", "run.samplers=sgld",
                                   "run.num_chains=2", "run.num_burnin_steps=20", "run.num_draws=20",
                                   "run.num_steps_bw_draws=2", "sampler.sgld.batch_size=50"])
    posterior = build_posterior(cfg, build_target(cfg))
    cells = {nb: tune.run_cell(cfg, "sgld", posterior, "auto", nb, 10.0) for nb in (5.0, 50.0)}
    eps = {nb: c.step_size for nb, c in cells.items()}
    assert all(isinstance(e, float) and e > 0 for e in eps.values())
    assert eps[50.0] < eps[5.0]  # ε = c / (nβ h_max + γ + …) shrinks as nβ grows
    assert "ε=auto" == tune_report._fmt_eps("auto")
