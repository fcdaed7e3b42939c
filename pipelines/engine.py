"""The DeepSpeed training engine both A-LLMRec stages share inside Ray Train workers.

One engine set-up (config file + runtime overrides, a client AdamW over the trainable parameters only),
one checkpoint/resume path (every rank writes its ZeRO shards with `exclude_frozen_parameters=True`, so a
checkpoint never holds the frozen LLM or SBERT layers, then all ranks report the folder to Ray Train,
which merges them), one way to export the trained weights (gathered under ZeRO-3, written by rank 0).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

CKPT_TAG = "engine"


def deepspeed_config(path: str, *, micro_batch: int, zero_stage: int, bf16: bool,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and apply what the allmrec config decides at run time."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = Path(__file__).resolve().parents[1] / path  # configs/ shipped with the project
    if not p.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} not found")
    conf = json.loads(p.read_text())
    conf["train_micro_batch_size_per_gpu"] = micro_batch
    conf.setdefault("gradient_accumulation_steps", 1)
    conf.pop("train_batch_size", None)  # derived: micro batch x accumulation x world size
    conf.setdefault("zero_optimization", {})["stage"] = zero_stage
    conf["bf16"] = {"enabled": bool(bf16)}
    conf["zero_allow_untested_optimizer"] = True
    conf.setdefault("steps_per_print", 1 << 30)  # our own progress lines, not DeepSpeed's
    conf.setdefault("wall_clock_breakdown", False)
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(conf.get(k), dict):
            conf[k].update(v)
        else:
            conf[k] = v
    return conf


def zero_init_config(conf: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The config to build a frozen model under ZeRO-3's `zero.Init` (`HfDeepSpeedConfig`) in `dtype`.

    `zero.Init` takes its parameter dtype from the config's fp16/bf16 switches, which we keep off on CPU
    (they would also put the trained projectors in half precision): with them off it re-created every
    weight in fp32, so the Ray job ran the LLM in fp32 while `stage2.llm_dtype=auto` asked for bf16 (2.2x
    the step time on this CPU, docs/benchmarks.md). Only model construction sees this copy; the engine
    keeps `conf`, so the trainable parameters stay fp32.
    """
    out = json.loads(json.dumps(conf))
    out["bf16"] = {"enabled": dtype == torch.bfloat16}
    out["fp16"] = {"enabled": dtype == torch.float16}
    return out


def init_distributed(use_gpu: bool) -> None:
    """Ray Train already created the process group (gloo on CPU, NCCL on GPU); DeepSpeed adopts it."""
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist

    from pipelines.common import extensions_dir
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    if not use_gpu and dist.is_initialized() and dist.get_world_size() == 1:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at start-up (a minute on 2 cores
        # in each fresh install); a single rank talks to nobody, so it is marked unusable (DeepSpeed keeps
        # this dict for edits) and nothing is compiled
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", verbose=False)


def build_engine(module: nn.Module, lr: float, conf: dict[str, Any]):
    """Wrap `module` (frozen parts already `requires_grad_(False)`) in a DeepSpeed engine.

    The optimizer is a plain torch AdamW over the trainable parameters only, so DeepSpeed compiles no
    fused Adam op and the frozen model carries no optimizer state.
    """
    import deepspeed
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the module has no trainable parameters")
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    engine, opt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=conf)
    return engine


def save_and_report(engine, metrics: dict[str, Any], client_state: dict[str, Any]) -> None:
    """Checkpoint the trainable state of every rank and report it (with `metrics`) to Ray Train."""
    import ray.train
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state=client_state, exclude_frozen_parameters=True)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(engine, start_from: str | None = None) -> dict[str, Any] | None:
    """Load the latest reported checkpoint into `engine` (else the checkpoint folder `start_from` of an
    earlier run, if given); returns its client state, or None."""
    import ray.train
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and start_from:
        ckpt = ray.train.Checkpoint.from_directory(start_from)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        # strict=False: the checkpoint holds the trainable parameters only (frozen ones excluded)
        _, client_state = engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=False)
    return client_state


def trainable_state(engine, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Full (gathered) copies of the trainable parameters whose names start with `prefixes` (frozen
    ones are left out: they are rebuilt from the base model when loading).

    Under ZeRO-3 every rank holds only a slice of each parameter; `GatheredParameters` rebuilds them.
    Called on every rank (the gather is collective); the caller writes the result on rank 0.
    """
    import deepspeed
    module = engine.module
    named = [(n, p) for n, p in module.named_parameters() if n.startswith(prefixes) and p.requires_grad]
    out: dict[str, torch.Tensor] = {}
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        for n, p in named:
            out[n] = p.detach().to("cpu", torch.float32).clone()
    return out


def local_parameter_counts(module: nn.Module) -> dict[str, int]:
    """Elements of the frozen and trainable parameters held by THIS rank (ZeRO-3 partitions show here)."""
    full = local = 0
    for p in module.parameters():
        n_full = getattr(p, "ds_numel", p.numel())
        full += n_full
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return {"full": int(full), "local": int(local)}
