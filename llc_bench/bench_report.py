"""The DLN scoreboard's CSVs read back, its summary table against the targets, and its figures."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llc_bench.artifacts import write_text_atomic
from llc_bench.bench_suite import Recipe, full_batch, make_suite
from llc_bench.wellposed import DEFAULT_MARGIN

CSV_NAME = "dln_scoreboard.csv"
AUDIT_CSV_NAME = "finite_n_audit.csv"

COLUMNS = ("instance", "class", "widths", "rank", "generator", "truth", "sampler", "llc_mean", "llc_se",
           "rel_error", "grad_evals", "wall_s", "wnv_time", "wnv_grad", "status",
           # the well-posedness record (llc_bench.wellposed): truth = aoyagi only when well_posed
           "well_posed", "aoyagi", "lambda_r_eff", "local_lower", "r_eff", "sv_min", "sv_max",
           "layer_ranks", "posedness",
           # beyond the scoreboard proper: enough to audit a row without rerunning it
           "d", "n", "n_beta", "compile_s", "chains_used", "data_rows", "warnings", "recipe",
           # the over-dispersed restart (llc_bench.restart), where the recipe asks for it and it ran
           "restart_llc", "restart_se",
           # ... what it decided (llc_bench.restart.restart_outcome) and the scale it restarted from
           "restart_outcome", "restart_scale",
           # the step size's estimated first-order bias of λ̂ (llc_bench.discretization), SGLD family only
           "step_bias", "llc_debiased")
# columns newer than some committed CSVs: those read with them empty
ADDED_COLUMNS = ("restart_llc", "restart_se", "step_bias", "llc_debiased", "restart_outcome", "restart_scale")
AUDIT_COLUMNS = ("instance", "class", "sampler", "well_posed", "aoyagi", "n", "llc_n", "llc_se_n",
                 "n_audit", "llc_audit", "llc_se_audit", "shift", "flagged", "status_audit", "recipe")

# Targets the scoreboard reports against (a report, not a test), on well-posed rows: (median
# |rel err|, 90th percentile, Spearman). Exact-gradient samplers are held to the tighter ones.
TARGETS = {"full_batch": (0.03, 0.08, 0.99), "sg": (0.05, 0.15, 0.98)}
TARGET_MEDIAN = TARGETS["sg"][0]


def targets_for(sampler: str) -> tuple[float, float, float]:
    return TARGETS["full_batch" if full_batch(sampler) else "sg"]


def write_report(recipe: Recipe, out: Path, figures: bool = True, log=print) -> str:
    """summary.md (and the figures) from the CSVs in `out`, restricted to the recipe's suite."""
    suite = make_suite(recipe.classes, recipe.suite_seed, recipe.generators, recipe.size_classes)
    names = {inst.name for inst in suite}
    rows = [r for r in read_scoreboard(out / CSV_NAME) if r["instance"] in names and r["sampler"] in recipe.samplers]
    audit_path = out / AUDIT_CSV_NAME
    audit_rows = [r for r in read_audit(audit_path) if r["instance"] in names] if audit_path.exists() else []
    text = summary_markdown(rows, recipe, audit_rows=audit_rows)
    write_text_atomic(out / "summary.md", text)
    log(text)
    if figures:
        write_figures(rows, out)
    return text


AUDIT_NUMERIC = {"aoyagi", "n", "llc_n", "llc_se_n", "n_audit", "llc_audit", "llc_se_audit", "shift"}


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    return _read_csv(path, AUDIT_NUMERIC)


# ---------------------------------------------------------------------------------------------
# Summary table and figures


SCOREBOARD_NUMERIC = {"truth", "llc_mean", "llc_se", "rel_error", "grad_evals", "wall_s", "wnv_time",
                      "wnv_grad", "rank", "d", "n", "n_beta", "compile_s", "chains_used", "data_rows", "aoyagi",
                      "lambda_r_eff", "local_lower", "r_eff", "sv_min", "sv_max", "restart_llc", "restart_se",
                      "restart_scale", "step_bias", "llc_debiased"}


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
        if partial(e) and not math.isfinite(e["spearman"]):
            return "partial run, too few rows to rank"
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
    lines += _restart_lines(scored)
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
    if not table:
        return []
    if not table[0]["bad"] and not table[0]["flagged"]:
        return ["", f"Do the health checks find the bad rows? None of the {len(rows)} scored rows is off by more "
                    f"than {BAD_ERROR:.0%}, and none is flagged."]
    lines = ["", f"Do the health checks find the bad rows? Over the {len(rows)} scored rows, {table[0]['bad']} are off "
             f"by more than {BAD_ERROR:.0%}. Recall = bad rows a flag caught / bad rows; precision = bad rows "
             "among the rows it flagged.", "",
             "| flag | rows flagged | bad rows caught | recall | precision |", "|---|---|---|---|---|"]
    for e in table:
        lines.append(f"| {e['flag']} | {e['flagged']} | {e['caught']} | {_pct(e['recall'])} | {_pct(e['precision'])} |")
    return lines


def _restart_outcome(row: dict[str, Any]) -> str | None:
    """The row's restart_outcome; for CSVs older than that column, read from restart_llc and the flags."""
    if row.get("restart_outcome"):
        return row["restart_outcome"]
    if not math.isfinite(row.get("restart_llc", math.nan)):
        return None
    codes = row["warnings"].split(";")
    return "disagrees" if "restart_disagrees" in codes else "inconclusive" if "still_spreading" in codes else "agrees"


def _restart_lines(rows: list[dict[str, Any]]) -> list[str]:
    """How the over-dispersed restart (run.restart_scale) decided, where the recipe asked for it."""
    outcomes = [(r, _restart_outcome(r)) for r in rows]
    restarted = [r for r, outcome in outcomes if outcome]
    if not restarted:
        return []

    def group(*names: str) -> list[dict[str, Any]]:
        return [r for r, outcome in outcomes if outcome in names]

    def counted(rows_: list[dict[str, Any]]) -> str:
        bad = sum(abs(r["rel_error"]) > BAD_ERROR for r in rows_ if math.isfinite(r["rel_error"]))
        return f"{len(rows_)} ({bad} of them off by more than {BAD_ERROR:.0%})" if rows_ else "0"

    walls = group("walls_bind")
    withdrawn = (f"It was shown not to move on {counted(group('agrees'))}"
                 + (f", and on {counted(walls)} no start 2× out or farther held while the chains' own positions did "
                    "(the higher-order terms already bind, `walls_bind`)" if walls else "")
                 + ": `still_spreading` was withdrawn. ")
    return ["", f"The restart: {len(restarted)} scored rows were still spreading from w* and were restarted farther "
            "out along their own displacement. "
            f"λ̂ moved on {counted(group('disagrees'))}: `restart_disagrees`. " + withdrawn
            + f"On {counted(group('inconclusive', 'no_start'))} the restart was too noisy to tell or could not start, "
            "and `still_spreading` stands. "
            "The restart's own λ̂ (`restart_llc`) is a signal, not an estimate: its chains may still be coming "
            "down from above."]


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
    from llc_bench.plots import (
        plot_scoreboard,  # deferred: plots imports xarray and the ArviZ stack
    )

    return plot_scoreboard(rows, out_dir, scored=is_scored, band=TARGET_MEDIAN)


