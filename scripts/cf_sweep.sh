#!/usr/bin/env bash
# Reproduce docs/results.md's CF table: every registered CF model through the Ray Train job
# (`allmrec train-cf`) on ML-100K and amazon-scientific, one run folder per (dataset, model).
# Usage: bash scripts/cf_sweep.sh [datasets...] (default: ml100k scientific); then
#        .venv/bin/python scripts/cf_table.py runs/sweep-*   prints the markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
datasets=("${@:-ml100k scientific}")
for ds in ${datasets[@]}; do
  base="runs/sweep-$ds-data"
  $PY -m pipelines.cli prepare --config "configs/$ds.yaml" "run_dir=$base"
  for model in sasrec gru4rec nextitnet ncf; do  # each into its run folder's cf/<model>/
    dir="runs/sweep-$ds-$model"
    mkdir -p "$dir"
    ln -sfn "$(realpath "$base/data")" "$dir/data"   # one prepared copy, read by all four models
    echo "=== $ds $model $(date -u +%FT%TZ) load $(cut -d' ' -f1 /proc/loadavg)"
    $PY -m pipelines.cli train-cf --config "configs/$ds.yaml" "cf.model=$model" "run_dir=$dir"
  done
done
