"""The printed report: one table row per sampler, then health warnings in plain words with their remedies."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def _num(x, fmt: str = ".3g") -> str:
    return "—" if x is None else format(x, fmt)


def _spread(per_chain) -> str:
    vals = [v for v in per_chain if v is not None]
    if not vals:
        return "—"
    return f"{min(vals):.3g}…{max(vals):.3g}"


def agreement_note(attempt: dict) -> str:
    """How an attempt of run.target_rel_se read against the draws before its last whole-run doubling."""
    return {True: ", λ̂ as before the doubling", False: ", λ̂ moved since the doubling"}.get(
        attempt.get("agrees_with_previous"), "")


def attempt_line(attempt: dict) -> str:
    """One attempt of run.target_rel_se in words: its steps, burn-in, draws, ε, λ̂, relative SE and status."""
    a = attempt
    return (f"{a['steps']} steps, burn-in {a['num_burnin_steps']}, {a['num_draws']} draws"
            + (f" at ε {a['tuned']['step_size']:.3g}" if "step_size" in a.get("tuned", {}) else "")
            + f": λ̂ {_num(a['llc_mean'], '.4g')}, {_num(a['rel_se'], '.1%')} {a['status']}" + agreement_note(a))


def _accept_or_energy(name: str, s: dict) -> str:
    if s.get("accept_rate") is not None:
        return f"acc {s['accept_rate']:.2f}"
    e = s.get("energy_change")
    if e:
        return f"ΔE² {e['mean_sq_per_dim']:.2g}/dim"
    return "—"


def _step_size(s: dict) -> str:
    eps = s.get("step_size")
    if eps is None:
        return "—"
    return f"{eps:.3g}" + (" auto" if s.get("step_size_auto") else "")


def print_report(summary: dict, out_dir: Path | None, console: Console | None = None) -> None:
    console = console or Console(width=200)
    truth = summary.get("truth")
    title = (f"LLC estimates  (n={summary['n']}, d={summary['d']}, nβ={summary['n_beta']:.4g}, "
             f"γ={summary['gamma']:.4g}, L_n(w*)={summary['loss_at_wstar']:.4g}"
             + (f", truth λ={truth:.4g}" if truth is not None else ", truth unknown") + ")")
    table = Table(title=title, title_justify="left")
    for col in ("sampler", "λ̂ ± SE", "chains", "rel err", "ESS bulk/tail", "R̂", "acc / energy", "ε",
                "grad evals", "sample s", "compile s", "WNV·s", "WNV·grad", "status"):
        table.add_column(col, justify="left" if col in ("sampler", "status") else "right")
    for name, s in summary["samplers"].items():
        llc = "—" if s["llc_mean"] is None else f"{s['llc_mean']:.4g} ± {_num(s['llc_se'])}"
        rel = "—" if s["rel_error"] is None else f"{100 * s['rel_error']:+.1f}%"
        style = {"ok": "green", "warnings": "yellow", "not_converged": "magenta"}.get(s["status"], "red")
        table.add_row(name, llc, _spread(s["llc_per_chain"]), rel,
                      f"{_num(s['ess_bulk'], '.0f')}/{_num(s['ess_tail'], '.0f')}", _num(s["rhat"], ".3f"),
                      _accept_or_energy(name, s), _step_size(s), _num(s["grad_evals"], ".3g"), _num(s["wall_s"], ".2f"),
                      _num(s["compile_s"], ".2f"), _num(s["wnv_time"]), _num(s["wnv_grad"]),
                      f"[{style}]{s['status']}[/{style}]")
    train = summary.get("train")
    if train:
        state = ("converged" if train["converged"]
                 else "NOT converged (‖∇L_n(w*)‖ above train.grad_tol: λ̂ may be biased)")
        console.print(f"ERM: {state}; {train['steps']} steps, L_n(w*) = {train['final_loss']:.4g}, "
                      f"‖∇L_n(w*)‖ = {train['grad_norm']:.3g}", highlight=False)
    console.print(table)
    for name, s in summary["samplers"].items():
        if s["chains_excluded"]:
            console.print(f"[red]{name}: chains {s['chains_excluded']} diverged (loss or position became "
                          f"NaN/inf at steps {[s['diverged_at'][c] for c in s['chains_excluded']]}) and are "
                          f"excluded from the estimate.[/red]")
        if s.get("error"):
            console.print(f"[red]{name}: {s['error']}[/red]")
        elif s["status"] == "failed":
            console.print(f"[red]{name}: every chain diverged; no estimate. Decrease the step size.[/red]")
        for w in s["warnings"]:
            console.print(f"[yellow]{name}: {w}[/yellow]")
        if s.get("step_size_auto"):
            burn = s.get("curvature_burnin")
            console.print(f"{name}: step size auto: ε = {s['step_size_constant']:g} / ({s['curvature']:.4g} + "
                          f"{s['gradient_noise']:.4g}) = {s['step_size_wstar']:.3g} at w* (curvature nβ·h_max + "
                          f"γ·max G and gradient noise nβ²·s²_max/m; h_max = {s['h_max']:.4g})"
                          + (f"; after burn-in the chains saw up to {burn:.4g}, so the draws used ε = "
                             f"{s['step_size']:.3g}" if burn is not None else "")
                          + f" ({s['num_hvp']} Hessian-vector and {s['num_cvp']} covariance products)",
                          highlight=False)
        target = s.get("target_rel_se")
        if target:
            trail = ", ".join(attempt_line(a) for a in target["attempts"])
            console.print(f"{name}: target relative SE {target['target']:.1%} "
                          f"{'reached' if target['reached'] else 'NOT reached'} after {target['steps']} steps per "
                          f"chain ({trail})", highlight=False)
        if s.get("mala_accept") is not None:
            console.print(f"{name}: MALA-style acceptance of a full-gradient proposal at this ε: "
                          f"{s['mala_accept']:.2f} (below 0.5 suggests a smaller ε)")
        bias = s.get("step_bias")
        if bias:
            if bias["value_draws"] is None:
                what = (f"estimated where the chains ended: {bias['value']:.3g} ± {bias['se']:.2g} (exact on a "
                        "Gaussian, too large along directions flatter than quadratic)")
            else:
                what = (f"with the covariance term from the draws: {bias['value_draws']:.3g} ± {bias['se_draws']:.2g} "
                        f"(the Gaussian term alone {bias['value']:.3g})")
            console.print(f"{name}: the step size's first-order bias of λ̂, {what}; λ̂ − it = {s['llc_debiased']:.4g}",
                          highlight=False)
        restart = s.get("restart_check")
        if restart and restart.get("llc_restart") is not None:
            verdict = {True: "agrees: the chains spread along directions λ̂ does not depend on",
                       False: "DISAGREES: the flat directions have not equilibrated",
                       None: "inconclusive: too noisy to tell; still_spreading stands"}[restart["agrees"]]
            console.print(f"{name}: restart at {restart['scale']:g}× the distance from w*: λ̂ = "
                          f"{restart['llc_restart']:.4g} ± {restart['se_restart']:.2g} ({verdict})", highlight=False)
        elif restart and restart.get("walls_bind"):
            tried = ", ".join(f"{v:.3g}×" for v in restart["scales_tried"])
            console.print(f"{name}: restart: no start held ({tried} the distance from w*, every chain lost) while "
                          "the chains' own positions do: the higher-order terms already bind, still_spreading "
                          "withdrawn", highlight=False)
        elif restart and restart.get("scales_tried"):
            tried = ", ".join(f"{v:.3g}×" for v in restart["scales_tried"])
            console.print(f"{name}: restart at {tried} the distance from w* gave no usable chain; still_spreading "
                          "stands", highlight=False)
        elif restart:
            console.print(f"{name}: restart: no chain ended at a finite position to restart from; still_spreading "
                          "stands", highlight=False)
        check = s.get("step_size_check")
        if check:
            console.print(f"{name}: step-size check: λ̂ at ε/2 changed by {100 * check['rel_change']:+.1f}%"
                          + (" — discretization bias, use a smaller step size" if check["flag"] else ""))
    if out_dir is not None:
        console.print(f"artifacts: {out_dir}/ (summary.json, config.toml, traces.zarr, plots/)")
