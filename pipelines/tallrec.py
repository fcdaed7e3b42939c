"""`allmrec tallrec`: the TALLRec baseline (Bao et al. 2023) on Ray Train + DeepSpeed, in A-LLMRec's harness.

TALLRec = the LLM-Only prompt (no soft tokens, no CF model) with the LLM itself fine-tuned by LoRA on
Stage-2's next-title loss and Stage-2's training examples (`pipelines.stage2._train_examples`, the same
seeded users, negatives and candidate shuffles). Everything else is Stage-2's machinery: the LLM loaded
into ZeRO-3 partitions, the shared DeepSpeed engine (`Stage2Module` with no projector: `stage2_loss` on
the LLM-Only prompt), checkpoints of the trainable state only, resume after a worker failure.

With LoRA the trainable weights live *inside* the partitioned LLM, so under ZeRO-3 each rank holds only
a slice of each adapter: the export gathers them (`engine.trainable_state`) before rank 0 writes
`<run_dir>/tallrec/lora.safetensors` (adapters only; the base LLM comes back from `stage2.llm`).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from allmrec.artifacts import LORA, tallrec_dir
from allmrec.config import Config, config_from_dict
from allmrec.data.load import Prepared
from allmrec.io import fingerprint, is_complete, read_manifest
from pipelines.common import init_ray, make_trainer, run_path
from pipelines.stage1 import _by_user, _collect
from pipelines.stage2 import item_titles_from, load_frozen_llm, next_title_datasets, write_output

log = logging.getLogger("allmrec.tallrec")


def budget(cfg: Config) -> tuple[int, int | None]:
    """(epochs, max_users): TALLRec's own, or Stage-2's when unset (the same training budget and users)."""
    t, s2 = cfg.tallrec, cfg.stage2
    return (t.epochs if t.epochs is not None else s2.epochs,
            t.max_users if t.max_users is not None else s2.max_users)


def train_func(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from allmrec.llm.lora import add_lora
    from allmrec.recommender import Example, LLMRecommender, Stage2Module
    from pipelines import engine as eng
    from pipelines.common import quiet_worker_logs

    quiet_worker_logs()
    cfg = config_from_dict(config["cfg"])
    t, s2 = cfg.tallrec, cfg.stage2
    epochs, _ = budget(cfg)
    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    eng.init_distributed(t.use_gpu)
    device = "cuda" if t.use_gpu else "cpu"
    conf = eng.deepspeed_config(t.deepspeed_config, micro_batch=t.batch_size, zero_stage=t.zero_stage,
                                bf16=s2.bf16 and t.use_gpu, overrides=config.get("ds_overrides"))
    llm, tok = load_frozen_llm(cfg, device, conf)
    torch.manual_seed(cfg.seed)  # identical adapter initialisation on every rank
    # The adapters are created outside zero.Init; deepspeed.initialize partitions them with the rest.
    llm = add_lora(llm, t.lora_r, t.lora_alpha, t.lora_dropout, t.target_modules or None)
    n_lora = sum(p.numel() for p in llm.parameters() if p.requires_grad)
    engine = eng.build_engine(Stage2Module(llm, None), t.lr, conf)
    counts = eng.local_parameter_counts(engine.module.llm)
    all_counts = [None] * dist.get_world_size()
    dist.all_gather_object(all_counts, counts)

    titles = item_titles_from(_collect(ray.train.get_dataset_shard("items")))
    # The LLM-Only prompt: no projector, no item vectors, no user token.
    rec = LLMRecommender(engine.module.llm, tok, titles, cfg.data.domain, projector=None, item_vectors=None,
                         use_user_token=False, history_len=s2.history_len, max_title_tokens=s2.max_title_tokens)
    # sorted by user, every rank's order from one seed: as Stage-2, so both see the same batches
    train = _by_user(_collect(ray.train.get_dataset_shard("train")))
    n_rows = len(train["user"])

    state = eng.restore(engine) or {}
    start, history = state.get("epoch", 0) + 1, state.get("history", [])
    for epoch in range(start, epochs + 1):
        if config.get("fail_at_epoch") == epoch and not state and rank == 0:
            raise RuntimeError(f"injected failure at epoch {epoch} (test hook)")
        t0 = time.perf_counter()
        order = np.random.default_rng([cfg.seed, epoch, 0]).permutation(n_rows)
        total, n_steps, step_losses = 0.0, 0, []
        engine.train()  # LoRA dropout on
        for i in range(0, n_rows, t.batch_size):
            exs = [Example(None, train["hist"][j], train["cands"][j], int(train["target"][j]))
                   for j in order[i:i + t.batch_size]]
            loss = engine(rec.batch(exs, with_target=True), rec.prompts.placeholders)
            engine.backward(loss)
            engine.step()
            step_losses.append(float(loss.detach()))
            total += step_losses[-1]
            n_steps += 1
            if rank == 0 and n_steps % 10 == 0:
                print(f"[tallrec] epoch {epoch} step {n_steps}/{-(-n_rows // t.batch_size)} "
                      f"loss {total / n_steps:.4f} ({(time.perf_counter() - t0) / n_steps:.2f} s/step)", flush=True)
        dt = time.perf_counter() - t0
        agg = torch.tensor([total, float(n_steps)], dtype=torch.float64)
        dist.all_reduce(agg)  # the mean loss over every rank's steps, the same on all ranks
        rec_m = {"epoch": epoch, "loss": float(agg[0] / max(agg[1], 1.0)), "seconds": round(dt, 2),
                 "steps": n_steps, "s_per_step": round(dt / max(n_steps, 1), 3),
                 "users_per_s": round(n_rows * dist.get_world_size() / max(dt, 1e-9), 3),
                 "lora_params": int(n_lora), "llm_params_full": all_counts[0]["full"],
                 "llm_params_local_per_rank": [c["local"] for c in all_counts]}
        history.append({**rec_m, "step_losses": [round(v, 4) for v in step_losses]})  # for the loss curve
        export = eng.trainable_state(engine, ("llm.",))  # collective under ZeRO-3: every rank calls it
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=eng.CKPT_TAG, client_state={"epoch": epoch, "history": history},
                                   exclude_frozen_parameters=True)
            if rank == 0:
                clean = {k[len("llm."):]: v.contiguous() for k, v in export.items()}
                (Path(tmp) / LORA).write_bytes(st_save(clean, metadata={"format": "allmrec-lora"}))
                (Path(tmp) / "history.json").write_text(json.dumps(history))
            ray.train.report(rec_m, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def tallrec(cfg: Config, force: bool = False, fail_at_epoch: int | None = None,
            ds_overrides: dict | None = None) -> Path:
    t, s2 = cfg.tallrec, cfg.stage2
    data_dir = run_path(cfg, "data")
    m = read_manifest(data_dir)
    if m is None:
        raise FileNotFoundError(f"tallrec needs the prepare outputs in {data_dir} (run `allmrec prepare`)")
    epochs, max_users = budget(cfg)
    out_dir = tallrec_dir(cfg)
    # What the adapters depend on: the data, the seed, TALLRec's settings, and the LLM + prompt from stage2.
    fp = fingerprint({"data": m["fingerprint"], "seed": cfg.seed, "epochs": epochs, "max_users": max_users,
                      "tallrec": cfg.to_dict()["tallrec"] | {"num_workers": None, "use_gpu": None},
                      "llm": {k: getattr(s2, k) for k in ("llm", "llm_dtype", "bf16", "history_len", "max_title_tokens")},
                      "domain": cfg.to_dict()["data"]["domain"], "ds": ds_overrides,
                      **({"fewshot": cfg.fewshot} if cfg.fewshot else {})})
    if not force and is_complete(out_dir, fp):
        log.info("tallrec: %s is up to date; use --force to retrain", out_dir)
        return out_dir
    ray = init_ray(cfg)
    from allmrec.llm.loading import resolve_llm_source
    resolve_llm_source(s2.llm)  # convert/cache the packaged model once, before the workers start
    t0 = time.perf_counter()
    prep = Prepared(data_dir)
    # the same seeded users and examples as Stage-2 with the same max_users
    train_ds, items_ds = next_title_datasets(ray, cfg, prep, data_dir, max_users)
    trainer = make_trainer(
        cfg, f"tallrec-{fp}", train_func,
        {"cfg": cfg.to_dict(), "fail_at_epoch": fail_at_epoch, "ds_overrides": ds_overrides},
        {"train": train_ds, "items": items_ds},
        num_workers=t.num_workers, use_gpu=t.use_gpu, max_failures=cfg.cf.max_failures, force=force)
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    write_output(result, out_dir, LORA, cfg, train_s, "TALLRec loss (LoRA, next-title cross-entropy)", {
        "fingerprint": fp, "job": "tallrec", "llm": s2.llm, "zero_stage": t.zero_stage, "workers": t.num_workers,
        "lora": {"r": t.lora_r, "alpha": t.lora_alpha, "dropout": t.lora_dropout,
                 "target_modules": t.target_modules or "auto"},
        "epochs": epochs, "max_users": max_users})
    return out_dir


def summary(out_dir: Path) -> str:
    m = read_manifest(out_dir) or {}
    f = m.get("final") or {}
    return (f"tallrec -> {out_dir}: {m.get('epochs_run')} epochs in {m.get('train_seconds')} s, final loss "
            f"{f.get('loss', float('nan')):.4f}, {f.get('users_per_s')} users/s, {f.get('s_per_step')} s/step; "
            f"{f.get('lora_params')} LoRA parameters trained; ZeRO-{m.get('zero_stage')} LLM parameters per "
            f"rank {f.get('llm_params_local_per_rank')} of {f.get('llm_params_full')}")
