"""Serving knobs that are not in `cfg.serve`: batching, queues, HTTP limits, resources per replica."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Tuning:
    """Deployment options here are defaults: serve/config.yaml (or `serve deploy`) overrides them per
    deployment without code changes; the HTTP limits and batching knobs travel as `tuning:` args."""
    max_body_bytes: int = 64 * 1024   # larger bodies -> 413 (JSON), checked while the body streams in
    max_header_bytes: int = 16 * 1024  # all request header names + values together -> else 431
    max_header_count: int = 64        # request headers -> else 431
    body_timeout_s: float = 10.0      # the whole body must arrive within this -> else 408
    max_batch_size: int = 8           # LLM requests per @serve.batch call
    batch_wait_s: float = 0.02        # how long the first request of a batch waits for company
    ingress_max_ongoing: int = 64
    ingress_max_queued: int = 128
    model_max_queued: int = 64        # CF and Aligner
    llm_max_ongoing: int = 16         # >= max_batch_size, or batches can never fill
    llm_max_queued: int = 32
    retry_after_s: float = 1.0
    llm_num_cpus: float = 1.0
    llm_num_gpus: float = 0.0         # 1 on a GPU cluster (the LLM then runs in bf16 on cuda)
    # Memory the LLM replica declares to Ray (its scheduler then never packs more replicas on a node than
    # fit). Measured peak of one SmolLM2-135M replica (bf16) ranking 100 candidates: docs/benchmarks.md.
    llm_memory_gib: float = 3.0
    small_num_cpus: float = 0.25      # ingress, CF, aligner: light work per request

    @classmethod
    def from_dict(cls, d: dict | None) -> "Tuning":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d or {}) - names)
        if unknown:
            raise ValueError(f"unknown serving tuning keys {unknown}; known: {sorted(names)}")
        t = cls(**(d or {}))
        t.check()
        return t

    def check(self) -> None:
        if self.llm_max_ongoing < self.max_batch_size:
            raise ValueError(f"llm_max_ongoing ({self.llm_max_ongoing}) must be >= max_batch_size ({self.max_batch_size})")
        for name in ("max_body_bytes", "max_header_bytes", "max_header_count", "body_timeout_s", "llm_memory_gib"):
            if not getattr(self, name) > 0:
                raise ValueError(f"tuning {name} must be > 0, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
