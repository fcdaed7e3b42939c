"""The online A-LLMRec service: three model deployments behind a FastAPI ingress, on Ray Serve.

    HTTP -> Ingress (HTTP limits, validation, candidate order, 4xx/503)        serve/routes.py, validation.py
              |-> CF       x_u of a known user or of an explicit history; the CF top-N as candidates
              |-> Aligner  q = f_T^enc(SBERT_ft(text)) for NEW items (only when a request has some)
              '-> LLM      LLMRecommender.rank / .generate, dynamic batching with @serve.batch
                                                                                     serve/deployments.py
Each deployment loads its models once per replica (through allmrec.artifacts.RunFolder, the loaders
evaluation uses) and scales on its own (autoscaling_config); the queues in front of them are bounded
(max_queued_requests), so overload gives 503 + Retry-After, never an unbounded backlog. The LLM replica
declares its memory to Ray (Tuning.llm_memory_gib). A new item has no CF embedding, so it gets the
text-side q (the "A-LLMRec (SBERT)" path of the paper): recommendable without retraining.

`build_app(cfg)` returns the Serve application; `app_builder(args)` is the same for `serve run` /
`serve deploy` with serve/config.yaml. serve/ builds on allmrec/ only (never on pipelines/).
"""
from __future__ import annotations

import os
from typing import Any

from ray.serve.config import BackpressureConfig

from allmrec.config import Config, load_config, resolve_project_file
from serve.deployments import (AlignerDeployment, CFDeployment, LLMDeployment, fit_item_map,  # noqa: F401
                               model_version, variant_of, variant_tokens)
from serve.routes import Ingress
from serve.tuning import Tuning

APP_NAME = "allmrec"
GiB = 1 << 30


def build_app(cfg: Config, variant: str | None = None, tuning: Tuning | dict | None = None):
    """The Serve application for a trained run folder (cfg.run_dir): CF, Aligner (when the variant
    embeds items), LLM and the ingress, with autoscaling between cfg.serve.min/max_replicas."""
    variant = variant or variant_of(cfg)
    item_tokens, _ = variant_tokens(variant)
    t = tuning if isinstance(tuning, Tuning) else Tuning.from_dict(tuning)
    t.check()
    s = cfg.serve
    if not 0 < s.min_replicas <= s.max_replicas:
        raise ValueError(f"need 0 < serve.min_replicas <= serve.max_replicas, got {s.min_replicas}, {s.max_replicas}")
    cfg_dict = cfg.to_dict()

    def scale(target: float) -> dict:
        return {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas, "target_ongoing_requests": target}

    bp = BackpressureConfig(status_code=503, retry_after_s=t.retry_after_s)
    small = {"num_cpus": t.small_num_cpus}
    cf = CFDeployment.options(ray_actor_options=small, autoscaling_config=scale(8),
                              max_queued_requests=t.model_max_queued, backpressure_config=bp).bind(cfg_dict, 1)
    aligner = None
    if item_tokens in ("joint", "sbert"):
        aligner = AlignerDeployment.options(ray_actor_options=small, autoscaling_config=scale(2),
                                            max_queued_requests=t.model_max_queued,
                                            backpressure_config=bp).bind(cfg_dict, item_tokens, 1)
    llm = LLMDeployment.options(
        ray_actor_options={"num_cpus": t.llm_num_cpus, "num_gpus": t.llm_num_gpus,
                           "memory": int(t.llm_memory_gib * GiB)},
        autoscaling_config=scale(t.max_batch_size), max_ongoing_requests=t.llm_max_ongoing,
        max_queued_requests=t.llm_max_queued, backpressure_config=bp,
    ).bind(cfg_dict, variant, t.max_batch_size, t.batch_wait_s, max(1.0, t.llm_num_cpus), t.llm_num_gpus > 0)
    return Ingress.options(
        ray_actor_options=small, autoscaling_config=scale(t.ingress_max_ongoing // 2),
        max_ongoing_requests=t.ingress_max_ongoing, max_queued_requests=t.ingress_max_queued, backpressure_config=bp,
    ).bind(cfg_dict, variant, t.as_dict(), cf, aligner, llm)


def app_builder(args: dict[str, Any]):
    """For `serve run serve/config.yaml` / `serve deploy`: args {config, overrides, variant, tuning}."""
    known = {"config", "overrides", "variant", "tuning"}
    if set(args) - known:
        raise ValueError(f"unknown application args {sorted(set(args) - known)}; known: {sorted(known)}")
    path = args.get("config")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    # `config` from the working directory, else from the project: the same serve/config.yaml works from any cwd
    cfg = load_config(resolve_project_file(os.path.expanduser(path)) if path else None, list(overrides))
    return build_app(cfg, args.get("variant"), args.get("tuning"))


__all__ = ["APP_NAME", "Tuning", "build_app", "app_builder", "fit_item_map", "model_version"]
