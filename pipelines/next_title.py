"""The next-title training both LLM jobs share (Stage-2's projectors, TALLRec's LoRA adapters): the frozen
LLM loaded into ZeRO-3 partitions, the epoch loop inside Ray Train workers (resume, seeded batches, one
DeepSpeed step each, a checkpoint per epoch), the datasets of next-title examples, and the export of the
trained weights into the job's output folder."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from allmrec.config import Config
from allmrec.data import schema
from allmrec.data.load import Prepared
from allmrec.artifacts import RESOLVED_CONFIG
from allmrec.io import atomic_dir
from pipelines.common import training_users
from pipelines.rows import epoch_batches, next_title_examples
from pipelines.tracking import Tracker
from pipelines.workers import plot_losses


def load_frozen_llm(cfg: Config, device: str, ds_conf: dict | None = None):
    """The frozen LLM; under ZeRO-3 `HfDeepSpeedConfig` makes from_pretrained load partitioned."""
    from allmrec.llm.loading import load_llm, resolve_dtype
    from pipelines.engine import zero_init_config
    keep, dtype = None, resolve_dtype(cfg.stage2.llm_dtype, device)
    if ds_conf is not None and ds_conf.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig
        keep = HfDeepSpeedConfig(zero_init_config(ds_conf, dtype))  # alive while the model is built; keeps dtype
    llm, tok = load_llm(cfg.stage2.llm, dtype=dtype, device=device)
    del keep
    return llm, tok


def next_title_epochs(engine, rec, train: dict, reps, cfg: Config, *, name: str, epochs: int, batch_size: int,
                      export_prefix: str, weights_file: str, all_counts: list, fail_at_epoch: int | None,
                      st_metadata: dict | None = None, extra_metrics: dict | None = None,
                      start_from: str | None = None, track: dict | None = None, bucket_window: int = 0) -> None:
    """The epoch loop shared by Stage-2 and TALLRec: resume, seeded batches of next-title examples, one
    DeepSpeed step each, and per epoch a Ray Train report with a checkpoint holding the trainable weights
    (the module's parameters under `export_prefix`, saved as `weights_file`) and the loss history.
    `start_from`: an earlier run's checkpoint folder to go on from (`allmrec stage2 --continue`).
    `bucket_window` > 0: batches of similar prompt lengths (`pipelines.rows.epoch_batches`)."""
    import ray.train
    import torch.distributed as dist

    from allmrec.recommender import Example
    from pipelines import engine as eng

    rank, n_rows = dist.get_rank(), len(train["user"])

    def example(j: int) -> Example:
        return Example(None if reps is None else reps[j], train["hist"][j], train["cands"][j], int(train["target"][j]))

    lengths = None
    if bucket_window:  # each row's prompt length in tokens (the tokenizer only: no model call)
        lengths = np.array([int(rec.batch([example(j)], with_target=True)["attention_mask"].sum()) for j in range(n_rows)])
    cand_first = getattr(engine.module, "candidate_softmax", 0) > 0  # the loss's term needs the candidates' first tokens
    tracker = Tracker(track, name, cfg.to_dict(), rank)  # MLflow (`track`: tracking.settings): rank 0 only
    state = eng.restore(engine, start_from) or {}
    start, history = state.get("epoch", 0) + 1, state.get("history", [])
    if rank == 0 and state:
        print(f"[{name}] going on after epoch {start - 1} of a checkpoint", flush=True)
    for epoch in range(start, epochs + 1):
        # test hook: fail once, after this attempt has reported a checkpoint of its own to resume from
        if fail_at_epoch == epoch and epoch > start and rank == 0:
            raise RuntimeError(f"injected failure at epoch {epoch} (test hook)")
        t0, c0 = time.perf_counter(), time.process_time()
        # ZeRO-3 needs the same number of steps on every rank: Ray Data's split gives equal-sized shards
        order = np.random.default_rng([cfg.train_seed(), epoch, 0]).permutation(n_rows)
        batches = epoch_batches(order, batch_size, lengths, bucket_window,
                                np.random.default_rng([cfg.train_seed(), epoch, 1]))
        total, n_steps, step_losses, pad, cells = 0.0, 0, [], 0, 0
        engine.train()  # LoRA dropout on (TALLRec); the frozen LLM has no dropout in use
        for idx in batches:
            b = rec.batch([example(j) for j in idx], with_target=True, cand_first=cand_first)
            pad, cells = pad + int((b["attention_mask"] == 0).sum()), cells + b["attention_mask"].numel()
            loss = engine(b, rec.prompts.placeholders)
            engine.backward(loss)
            engine.step()
            step_losses.append(float(loss.detach()))
            total += step_losses[-1]
            n_steps += 1
            if rank == 0 and n_steps % 10 == 0:
                print(f"[{name}] epoch {epoch} step {n_steps}/{len(batches)} "
                      f"loss {total / n_steps:.4f} ({(time.perf_counter() - t0) / n_steps:.2f} s/step)", flush=True)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        agg = torch.tensor([total, float(n_steps), cpu], dtype=torch.float64)
        dist.all_reduce(agg)  # the mean loss over every rank's steps, the same on all ranks
        rec_m = {"epoch": epoch, "loss": float(agg[0] / max(agg[1], 1.0)), "seconds": round(dt, 2),
                 "steps": n_steps, "s_per_step": round(dt / max(n_steps, 1), 3),
                 "padding": round(pad / max(cells, 1), 4),  # this rank's share of left-padded positions in its batches
                 "users_per_s": round(n_rows * dist.get_world_size() / max(dt, 1e-9), 3), **(extra_metrics or {}),
                 # CPU seconds of the epoch loop, all ranks' processes together (robust to a loaded machine)
                 "cpu_s": round(float(agg[2]), 2), "users_per_cpu_s": round(n_rows * dist.get_world_size() / max(float(agg[2]), 1e-9), 4),
                 "llm_params_full": all_counts[0]["full"],
                 "llm_params_local_per_rank": [c["local"] for c in all_counts]}
        history.append({**rec_m, "step_losses": [round(v, 4) for v in step_losses]})  # for the loss curve
        if rank == 0:  # rank 0's per-step losses, steps numbered across epochs
            tracker.epoch(rec_m, epoch, epochs, step_losses, first_step=(epoch - 1) * n_steps)
        export = eng.trainable_state(engine, (export_prefix,))  # collective under ZeRO-3: every rank calls it
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=eng.CKPT_TAG, client_state={"epoch": epoch, "history": history},
                                   exclude_frozen_parameters=True)
            if rank == 0:
                clean = {k[len(export_prefix):]: v.contiguous() for k, v in export.items()}
                (Path(tmp) / weights_file).write_bytes(st_save(clean, metadata=st_metadata))
                (Path(tmp) / "history.json").write_text(json.dumps(history))
            ray.train.report(rec_m, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    tracker.end()


def next_title_datasets(ray, cfg: Config, prep: Prepared, data_dir: Path, max_users: int | None):
    """(train, items) Ray datasets of the next-title jobs (Stage-2 and TALLRec): `stage2.examples_per_user`
    examples per training user, from the validation item back with `stage2.heldout_target`
    (`pipelines.rows.next_title_examples`; the seeded subset of users when `max_users` or `cfg.fewshot` is
    set) and the item titles."""
    seq_ds = ray.data.read_parquet(str(data_dir / schema.SEQUENCES))
    keep = training_users(cfg, prep, max_users)
    if keep is not None:
        seq_ds = seq_ds.filter(lambda r: r["user"] in keep)
    train_ds = seq_ds.map_batches(next_title_examples, batch_format="pyarrow", fn_kwargs={
        "n_items": prep.n_items, "n_negatives": cfg.data.n_negatives, "seed": cfg.train_seed(),
        "examples_per_user": cfg.stage2.examples_per_user, "heldout_target": cfg.stage2.heldout_target})
    return train_ds, ray.data.read_parquet(str(data_dir / schema.ITEMS), columns=["item", "title"])


def write_output(result, out_dir: Path, artifact: str, cfg: Config, train_s: float, plot_title: str,
                 manifest: dict) -> None:
    """Copy the trained weights file and the history out of the final Ray Train checkpoint into
    `out_dir`, atomically, with metrics.json, config.yaml, the manifest and the loss curve."""
    if result.checkpoint is None:
        raise RuntimeError(f"{manifest['job']} finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        weights = (Path(d) / artifact).read_bytes()
        history = json.loads((Path(d) / "history.json").read_text())
    final = {k: v for k, v in history[-1].items() if k != "step_losses"} if history else None
    with atomic_dir(out_dir) as tmp:
        (tmp / artifact).write_bytes(weights)
        (tmp / "metrics.json").write_text(json.dumps({"history": history, "train_seconds": round(train_s, 1)},
                                                    indent=2))
        cfg.dump(tmp / RESOLVED_CONFIG)
        (tmp / schema.MANIFEST).write_text(json.dumps({**manifest, "epochs_run": len(history),
                                                       "train_seconds": round(train_s, 1), "final": final}, indent=2))
        plot_losses(history, tmp / "loss.png", plot_title)
