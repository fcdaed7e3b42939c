#!/usr/bin/env bash
# The few-shot scenario of docs/results.md: SASRec, Stage-1 and Stage-2 (A-LLMRec and A-LLMRec (SBERT))
# trained on only K seeded users of ML-100K, evaluated on the usual test users (paper Table 5).
# Usage: bash scripts/fewshot.sh [K...] (default: 128 256); reuses runs/a-full/{data,encode} when present.
# LLM-Only is left out: the frozen LLM does not depend on K (its row is the full-data evaluation's).
# Stage-2 uses the budget of the full-data run in docs/results.md (lr 5e-4, 2 epochs, 1 worker, bf16).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
ks=("${@:-128 256}")
EVAL_USERS=${EVAL_USERS:-100}
for k in ${ks[@]}; do
  dir="runs/fewshot-$k"
  mkdir -p "$dir"
  for part in data encode; do   # the prepared data and the SBERT vectors do not depend on K
    [ -e "runs/a-full/$part" ] && [ ! -e "$dir/$part" ] && ln -sfn "$(realpath runs/a-full/$part)" "$dir/$part"
  done
  common=(--config configs/ml100k-smollm2.yaml "run_dir=$dir" "fewshot=$k" stage2.lr=5e-4 stage2.epochs=2
          stage2.max_users=null stage2.num_workers=1 stage2.zero_stage=0
          stage2.deepspeed_config=configs/deepspeed/zero0.json)
  echo "=== few-shot K=$k $(date -u +%FT%TZ)"
  $PY -m pipelines.cli prepare "${common[@]}"
  $PY -m pipelines.cli encode "${common[@]}"
  $PY -m pipelines.cli train-cf "${common[@]}"
  $PY -m pipelines.cli stage1 "${common[@]}"
  $PY -m pipelines.cli stage2 "${common[@]}"
  $PY -m pipelines.cli stage2 "${common[@]}" stage2.item_tokens=sbert
  $PY -m pipelines.cli evaluate "${common[@]}" "eval.max_users=$EVAL_USERS" \
      "eval.variants=[sasrec,most_popular,allmrec,allmrec_sbert]"
  echo "=== few-shot K=$k done $(date -u +%FT%TZ)"
done
