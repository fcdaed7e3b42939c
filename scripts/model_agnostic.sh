#!/usr/bin/env bash
# The paper's model-agnostic table (Table 5): A-LLMRec on each registered CF backbone, ML-100K, at the main
# job's budget (configs/ml100k-smollm2.yaml: Stage-1 5 epochs, Stage-2 every training user x 1 epoch, evaluation on
# 200 seeded test users + the 75 cold users). One run folder per backbone; the prepared data and SBERT
# vectors are shared (linked from the first folder). MoRec reads the SBERT vectors (encode) first.
# Usage: bash scripts/model_agnostic.sh [models...] (default: sasrec gru4rec nextitnet ncf morec); then
#        .venv/bin/python scripts/report_table.py runs/agnostic-*/report   prints the Hit@1 rows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
models=("${@:-sasrec gru4rec nextitnet ncf morec}")
base="runs/agnostic-data"
$PY -m pipelines.cli prepare --config configs/ml100k-smollm2.yaml "run_dir=$base"
$PY -m pipelines.cli encode --config configs/ml100k-smollm2.yaml "run_dir=$base"
for model in ${models[@]}; do
  dir="runs/agnostic-$model"
  mkdir -p "$dir"
  for part in data encode; do ln -sfn "$(realpath "$base/$part")" "$dir/$part"; done
  for job in train-cf stage1 stage2 evaluate; do
    echo "=== $model $job $(date -u +%FT%TZ) load $(cut -d' ' -f1 /proc/loadavg)"
    $PY -m pipelines.cli $job --config configs/ml100k-smollm2.yaml "cf.model=$model" "run_dir=$dir" \
        "eval.variants=[cf,most_popular,allmrec]"
  done
done
echo "=== done $(date -u +%FT%TZ)"
