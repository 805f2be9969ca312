"""Plots: plot_all writes the non-empty PNGs that apply to each sampler kind; the running λ̂ is right."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_health import clean, synthetic_result, with_nan  # noqa: E402

from llc_bench import plots  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _small(sampler="sgld", **kw):
    return synthetic_result(clean, num_chains=3, num_steps=600, num_burnin=100, thin=5,
                            sampler=sampler, **kw)


def _with(res, **fields):
    return res.__class__(**{**res.__dict__, **fields})


def _assert_pngs(paths):
    for p in paths:
        assert p.exists() and p.stat().st_size > 5_000, p
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_plot_all_sgld_skips_accept_and_energy(tmp_path):
    paths = plots.plot_all(_small(), tmp_path, truth=10.0)
    names = sorted(p.name for p in paths)
    assert names == sorted(f"sgld_{k}.png" for k in
                           ["loss_trace", "running_llc", "trace_rank", "ess_evolution", "autocorr"])
    _assert_pngs(paths)


def test_plot_all_adjusted_sampler_with_a_diverged_chain_gets_every_figure(tmp_path):
    res = with_nan(_small("hmc"), chain=1, step=300)
    rng = np.random.default_rng(0)
    res = _with(res, accept=rng.uniform(size=res.loss_trace.shape),
                energy_change=rng.normal(size=res.loss_trace.shape))
    paths = plots.plot_all(res, tmp_path)
    assert {p.name for p in paths} == {f"hmc_{k}.png" for k in [
        "loss_trace", "running_llc", "trace_rank", "ess_evolution", "autocorr", "accept_hist",
        "energy_hist"]}
    _assert_pngs(paths)


def test_trace_rank_falls_back_to_matplotlib(tmp_path, monkeypatch):
    import arviz_plots

    def broken(*args, **kwargs):
        raise RuntimeError("simulated arviz_plots failure")

    monkeypatch.setattr(arviz_plots, "plot_trace", broken)
    with pytest.warns(UserWarning, match="fallback"):
        path = plots.plot_trace_rank(_small(), tmp_path / "tr.png")
    _assert_pngs([path])


def test_running_llc_is_cumulative_mean_of_wbic_summand():
    res = _small()
    running = plots.running_llc(res)
    summand = res.n_beta * (res.draw_loss - res.loss_at_wstar)
    np.testing.assert_allclose(running[:, -1], summand.mean(axis=1))
    np.testing.assert_allclose(running[:, 0], summand[:, 0])
