"""Set a profile's scoreboard rows beside a reference sampler's rows on the same instances.

    uv run python scripts/against_reference.py --profile sg_curvature_target
    uv run python scripts/against_reference.py --profile sg_curvature_target --csv against_hmc.csv

The error of a row against λ mixes two things: the sampler's error and the truth's (an instance
whose local λ at this n is not the formula's, though the well-posedness rule calls it well-posed).
A reference sampler run on the same posterior (by default HMC from the default recipe's scoreboard,
and its 10 × n audit where there is one) separates them: where the sampler agrees with the reference
but both are off λ, the sampler is not what is wrong. Prints, per row, λ̂ ± SE, the reference's,
their relative difference and its z-score (difference over the two SEs combined), then per class
the median and largest |relative difference|, the rows more than 3 SE apart, and the difference
against the share of λ that is quadratic (rank(H)/2 ÷ λ: a step size's bias falls on those
directions), and where rows carry `llc_debiased` (λ̂ minus the step size's estimated bias) its
difference from the reference too. Only instances with
the same name in both suites (the same suite seed) are compared.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from llc_bench.bench_report import CSV_NAME
from llc_bench.bench_suite import load_recipe
from llc_bench.types import ConfigError

AUDIT_NAME = "finite_n_audit.csv"


def _rows(path: Path, sampler: str | None) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    with path.open(newline="") as fh:
        return {r["instance"]: r for r in csv.DictReader(fh) if sampler is None or r["sampler"] == sampler}


def compare(profile: str | None, reference_profile: str | None, reference_sampler: str) -> list[dict]:
    """One dict per row of `profile` that the reference has (both with a finite λ̂)."""
    recipe, reference = load_recipe(profile=profile), load_recipe(profile=reference_profile)
    if recipe.suite_seed != reference.suite_seed:
        raise ConfigError(f"--profile {profile} uses suite seed {recipe.suite_seed} and the reference "
                          f"{reference.suite_seed}: their instances differ")
    ref = _rows(Path(reference.out) / CSV_NAME, reference_sampler)
    audit = _rows(Path(reference.out) / AUDIT_NAME, reference_sampler)
    out = []
    for name, row in sorted(_rows(Path(recipe.out) / CSV_NAME, None).items()):
        other = ref.get(name)
        if other is None or not row["llc_mean"] or not other["llc_mean"]:
            continue
        mean, se = float(row["llc_mean"]), float(row["llc_se"] or "nan")
        ref_mean, ref_se = float(other["llc_mean"]), float(other["llc_se"] or "nan")
        out.append({
            "instance": name, "class": row["class"], "well_posed": row["well_posed"], "aoyagi": row["aoyagi"],
            "sampler": row["sampler"], "llc_mean": mean, "llc_se": se, "status": row["status"],
            "reference": reference_sampler, "ref_mean": ref_mean, "ref_se": ref_se, "ref_status": other["status"],
            "ref_audit": audit[name]["llc_audit"] if name in audit else "",
            "rel_diff": mean / ref_mean - 1, "z": (mean - ref_mean) / math.hypot(se, ref_se),
            "debiased_diff": float(row["llc_debiased"]) / ref_mean - 1 if row.get("llc_debiased") else None,
            "rel_error": row["rel_error"],
            "quadratic_share": min(1.0, float(row["local_lower"]) / float(row["aoyagi"])),
        })
    return out


def _print(rows: list[dict]) -> None:
    print(f"{'instance':18s} {'λ':>7s} {'λ̂':>15s} {'reference':>15s} {'10×n':>7s} {'diff':>6s} {'z':>5s}  status")
    for r in rows:
        audit = f"{float(r['ref_audit']):7.1f}" if r["ref_audit"] else " " * 7
        print(f"{r['instance']:18s} {float(r['aoyagi']):7.1f} {r['llc_mean']:8.1f} ± {r['llc_se']:4.1f} "
              f"{r['ref_mean']:8.1f} ± {r['ref_se']:4.1f} {audit} {r['rel_diff']:+6.1%} {r['z']:+5.1f}  {r['status']}"
              + ("" if r["debiased_diff"] is None else f"  (debiased {r['debiased_diff']:+.1%})")
              + ("" if r["well_posed"] == "yes" else "  (not well-posed)"))
    for cls in sorted({r["class"] for r in rows}):
        diffs = np.array([abs(r["rel_diff"]) for r in rows if r["class"] == cls])
        apart = [r["instance"] for r in rows if r["class"] == cls and abs(r["z"]) > 3]
        print(f"{cls}: {diffs.size} rows; |λ̂ / reference − 1| median {np.median(diffs):.1%}, "
              f"largest {diffs.max():.1%}; more than 3 SE apart: {', '.join(apart) or 'none'}")
        debiased = np.array([abs(r["debiased_diff"]) for r in rows if r["class"] == cls and r["debiased_diff"] is not None])
        if debiased.size:
            print(f"  {debiased.size} rows carry llc_debiased (λ̂ minus the step size's estimated bias): |llc_debiased / "
                  f"reference − 1| median {np.median(debiased):.1%}, largest {debiased.max():.1%}")
        share = np.array([r["quadratic_share"] for r in rows if r["class"] == cls])
        signed = np.array([r["rel_diff"] for r in rows if r["class"] == cls])
        if share.size >= 3:
            rho, p = spearmanr(share, signed)
            whole, under = signed[share >= 0.99], signed[share < 0.5]
            print(f"  by the quadratic share of λ (rank(H)/2 ÷ λ): λ̂ / reference − 1 has median "
                  f"{_median(whole)} on the {whole.size} rows whose λ is all quadratic and {_median(under)} on the "
                  f"{under.size} under half; Spearman {rho:.2f} (p = {p:.2g})")


def _median(values: np.ndarray) -> str:
    return f"{np.median(values):+.1%}" if values.size else "n/a"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", help="the profile whose rows are compared (default: the recipe itself)")
    parser.add_argument("--reference-profile", help="the profile of the reference rows (default: the recipe itself)")
    parser.add_argument("--reference-sampler", default="hmc", help="the reference rows' sampler (default hmc)")
    parser.add_argument("--csv", metavar="FILE", help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        rows = compare(args.profile, args.reference_profile, args.reference_sampler)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no instance of --profile {args.profile} has a {args.reference_sampler} row in the reference",
              file=sys.stderr)
        return 2
    _print(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
