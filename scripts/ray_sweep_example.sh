#!/usr/bin/env bash
# Run a sweep on a Ray cluster: one Ray head, one Ray worker per other host, one driver writing the CSV.
#
#   head host:     scripts/ray_sweep_example.sh head [SPEC]
#   other hosts:   scripts/ray_sweep_example.sh worker HEAD_IP
#
# Every host needs the same checkout and `uv sync --extra ray`. Each cell is one Ray task (one GPU
# per task when the cluster has GPUs); only the driver on the head writes results, so rerunning the
# head command after an interruption resumes where the CSV left off.
set -euo pipefail
cd "$(dirname "$0")/.."
role=${1:?usage: $0 head [SPEC] | worker HEAD_IP}
case "$role" in
  head)
    spec=${2:-configs/sweep_default.toml}
    uv run --extra ray ray start --head --port=6379
    uv run --extra ray main.py sweep --spec "$spec" --backend ray --address auto
    ;;
  worker)
    uv run --extra ray ray start --address="${2:?HEAD_IP}:6379" --block
    ;;
  *)
    echo "usage: $0 head [SPEC] | worker HEAD_IP" >&2; exit 2 ;;
esac
