#!/usr/bin/env bash
# Regenerate the DLN scoreboard: results/benchmarks/{dln_scoreboard.csv, summary.md, *.png}.
#
#   scripts/run_dln_benchmark.sh            # CPU default recipe (configs/bench_dln.toml)
#   scripts/run_dln_benchmark.sh full       # every sampler, 1K-100K, n-sample full-batch gradients (GPU)
#   scripts/run_dln_benchmark.sh large      # SG samplers on the 1M-100M classes (GPU)
#
# Resumable: rerunning skips rows already in the CSV. Extra arguments go to `main.py bench`
# (e.g. --instances 5, --out DIR, --workers 4, --summary-only).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=()
if [[ $# -gt 0 && "$1" != -* ]]; then
  profile=(--profile "$1")
  shift
fi
exec python3 -m uv run main.py bench --no-progress "${profile[@]}" "$@"
