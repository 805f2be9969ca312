"""Run one scoreboard instance with one sampler, under a benchmark recipe plus --set overrides.

    uv run python scripts/bench_instance.py 10K-chained-018 --profile sg_curvature \
        --sampler curvature_sgld --set run.target_rel_se=0.02 --set run.max_doublings=3

Prints, with run.target_rel_se, every attempt as it ends (steps, burn-in, draws, ε, λ̂, relative SE,
status); then λ̂ ± SE against the instance's λ, the status and flags and the seconds taken; and, for
the SGLD family, the step size's estimated bias and the λ̂ corrected for it. --json FILE also writes
the sampler's summary there. The run is the scoreboard's (the same posterior, and the
over-dispersed restart where the recipe sets run.restart_scale). Nothing is added to the
scoreboard's CSVs: a row there is always the recipe's own, and this is for trying a change on the
instances it matters for.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from llc_bench.bench_suite import full_batch, instance_config, load_recipe, make_suite
from llc_bench.config import parse_override, replace
from llc_bench.samplers import SAMPLER_NAMES
from llc_bench.types import ConfigError


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("instance", help="instance name, e.g. 10K-chained-018")
    parser.add_argument("--spec", help="benchmark recipe TOML (default configs/bench_dln.toml)")
    parser.add_argument("--profile", help="merge [profile.<name>] of the recipe over it")
    parser.add_argument("--sampler", required=True, help=f"one of {', '.join(SAMPLER_NAMES)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting of the instance's config, e.g. run.target_rel_se=0.02")
    parser.add_argument("--json", metavar="FILE", help="also write the sampler's summary as JSON here")
    return parser.parse_args(argv)


def _config(args):
    """(recipe, instance, config), or ConfigError naming what is wrong, before any work."""
    if args.sampler not in SAMPLER_NAMES:
        raise ConfigError(f"--sampler {args.sampler!r}: must be one of {', '.join(SAMPLER_NAMES)}")
    recipe = load_recipe(args.spec, profile=args.profile)
    suite = {inst.name: inst for inst in make_suite(recipe.classes, recipe.suite_seed, recipe.generators,
                                                    recipe.size_classes)}
    if args.instance not in suite:
        raise ConfigError(f"instance {args.instance!r}: not in this recipe's suite (classes "
                          f"{', '.join(recipe.classes)}; e.g. {next(iter(suite))})")
    cfg = instance_config(recipe, suite[args.instance], args.sampler)
    return recipe, suite[args.instance], replace(cfg, **dict(parse_override(text) for text in args.overrides))


def _print_attempts_as_they_end() -> None:
    """Each attempt of run.target_rel_se on stdout as soon as it ends (the pipeline logs them), so
    that a long run stopped before its end still leaves what it measured."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("  %(message)s"))
    log = logging.getLogger("llc_bench.experiment")
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv=None) -> int:
    args = _arguments(argv)
    try:
        recipe, inst, cfg = _config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from llc_bench.bench import build_instance
    from llc_bench.experiment import run_sampler

    _print_attempts_as_they_end()
    _, _, data_posterior, reduced_posterior, record = build_instance(recipe, inst, args.sampler, cfg=cfg)
    posterior = reduced_posterior if full_batch(args.sampler) else data_posterior  # as the scoreboard does
    start = time.perf_counter()
    run = run_sampler(cfg, args.sampler, posterior, truth=record.truth)
    s = run.summary
    print(f"{inst.name} {args.sampler}: λ̂ = {run.estimate.mean:.2f} ± {run.estimate.se:.2f} against λ = "
          f"{record.truth} ({s['status']}; flags: {', '.join(f.code for f in run.flags) or 'none'}; "
          f"{time.perf_counter() - start:.0f} s)")
    if s.get("step_bias"):
        b = s["step_bias"]
        print(f"  step-size bias {b['value']:.3f} ± {b['se']:.3f} (ε/8 · (curvature {b['curvature']:.4g} + noise "
              f"{b['noise']:.4g}), {b['num_products']} products)"
              + ("" if b.get("value_draws") is None else
                 f"; with the covariance term from {b['num_probes_draws']} probes at the draws "
                 f"{b['value_draws']:.3f} ± {b['se_draws']:.3f}") + f": λ̂ debiased = {s['llc_debiased']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(s, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
