"""`allmrec tallrec`: the TALLRec baseline (Bao et al. 2023) on Ray Train + DeepSpeed, in A-LLMRec's harness.

TALLRec = the LLM-Only prompt (no soft tokens, no CF model) with the LLM itself fine-tuned by LoRA on
Stage-2's next-title loss and Stage-2's training examples (`pipelines.rows.next_title_examples`, the same
seeded users, `stage2.examples_per_user`, negatives and candidate shuffles; with `stage2.order_baselines`
the CF model sorts the candidates). Everything else is Stage-2's machinery: the LLM loaded into ZeRO-3
partitions, the shared DeepSpeed engine (`Stage2Module` with no projector: `stage2_loss` on the LLM-Only
prompt), checkpoints of the trainable state only, resume after a worker failure.

With LoRA the trainable weights live *inside* the partitioned LLM, so under ZeRO-3 each rank holds only
a slice of each adapter: the export gathers them (`engine.trainable_state`) before rank 0 writes
`<run_dir>/tallrec/lora.safetensors` (adapters only; the base LLM comes back from `stage2.llm`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from allmrec.artifacts import LORA, RunFolder, cf_from_files, files_sha256, user_reps
from allmrec.config import Config, config_from_dict
from allmrec.data.load import Prepared
from allmrec.io import fingerprint, read_manifest
from pipelines.common import init_ray, make_trainer, up_to_date
from pipelines.fingerprints import model_identity, prompt_digest
from pipelines.next_title import load_frozen_llm, next_title_datasets, next_title_epochs, write_output
from pipelines.workers import collect, collect_sorted, item_titles_from

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
    from allmrec.recommender import LLMRecommender, Stage2Module
    from pipelines import engine as eng
    from pipelines.common import quiet_worker_logs

    quiet_worker_logs()
    cfg = config_from_dict(config["cfg"])
    t, s2 = cfg.tallrec, cfg.stage2
    epochs, _ = budget(cfg)
    torch.set_num_threads(config["threads"])
    eng.init_distributed(t.use_gpu)
    device = "cuda" if t.use_gpu else "cpu"
    conf = eng.deepspeed_config(t.deepspeed_config, micro_batch=t.batch_size, zero_stage=t.zero_stage,
                                bf16=s2.bf16 and t.use_gpu, overrides=config.get("ds_overrides"))
    llm, tok = load_frozen_llm(cfg, device, conf)
    torch.manual_seed(cfg.train_seed())  # identical adapter initialisation on every rank
    # The adapters are created outside zero.Init; deepspeed.initialize partitions them with the rest.
    llm = add_lora(llm, t.lora_r, t.lora_alpha, t.lora_dropout, t.target_modules or None)
    if t.compiles(s2):  # after the adapters exist: they are traced into each block's graph
        from allmrec.llm.loading import compile_layers
        compile_layers(llm)
    n_lora = sum(p.numel() for p in llm.parameters() if p.requires_grad)
    engine = eng.build_engine(Stage2Module(llm, None), t.lr, conf)
    counts = eng.local_parameter_counts(engine.module.llm)
    all_counts = [None] * dist.get_world_size()
    dist.all_gather_object(all_counts, counts)

    titles = item_titles_from(collect(ray.train.get_dataset_shard("items")))
    # The LLM-Only prompt: no projector, no item vectors, no user token. With stage2.order_baselines the CF
    # model sorts the candidates (x_u orders the list, the LLM never sees it).
    order = s2.order_for(False)
    cf = cf_from_files(config["cf_files"]) if order == "cf" else None
    rec = LLMRecommender(engine.module.llm, tok, titles, cfg.data.domain, projector=None, item_vectors=None,
                         use_user_token=False, **s2.prompt(), candidate_order=order,
                         cf_items=None if cf is None else cf.item_embeddings())
    # sorted by user, every rank's order from one seed: as Stage-2, so both see the same batches
    train = collect_sorted(ray.train.get_dataset_shard("train"))
    reps = user_reps(cf, list(train["hist"]), train["user"]) if rec.needs_user_rep else None
    next_title_epochs(engine, rec, train, reps, cfg, name="tallrec", epochs=epochs, batch_size=t.batch_size,
                      export_prefix="llm.", weights_file=LORA, all_counts=all_counts,
                      fail_at_epoch=config.get("fail_at_epoch"), st_metadata={"format": "allmrec-lora"},
                      extra_metrics={"lora_params": int(n_lora)}, track=config.get("tracking"))


def tallrec(cfg: Config, force: bool = False, fail_at_epoch: int | None = None,
            ds_overrides: dict | None = None) -> Path:
    t, s2 = cfg.tallrec, cfg.stage2
    rf = RunFolder(cfg)
    data_dir = rf.data
    m = rf.require(data_dir, "allmrec prepare")
    epochs, max_users = budget(cfg)
    out_dir = rf.tallrec
    order = s2.order_for(False)
    # the CF order (stage2.order_baselines): the adapters depend on the CF weights that sort the candidates
    cf_files = rf.cf_files() if order == "cf" else None
    # What the adapters depend on: the data, the seed, TALLRec's settings, and the LLM + prompt from stage2.
    fp = fingerprint({"data": m["fingerprint"], "seed": cfg.train_seed(), "epochs": epochs, "max_users": max_users,
                      "tallrec": cfg.to_dict()["tallrec"] | {"num_workers": None, "use_gpu": None},
                      "llm": {k: getattr(s2, k) for k in ("llm", "llm_dtype", "bf16", "history_len", "max_title_tokens")},
                      "domain": cfg.to_dict()["data"]["domain"], "ds": ds_overrides,
                      "llm_identity": model_identity(s2.llm, "llm"),
                      "prompt": prompt_digest(cfg, "none", False),  # the LLM-Only prompt's text
                      **({"chat_prompt": True} if s2.chat_prompt else {}),
                      **({"candidate_order": order, "cf_weights": files_sha256(cf_files)} if cf_files else {}),
                      **s2.changed(("examples_per_user", "heldout_target")),  # Stage-2's examples, when set
                      **({"fewshot": cfg.fewshot} if cfg.fewshot else {})})
    if up_to_date("tallrec", out_dir, fp, force):
        return out_dir
    ray = init_ray(cfg)
    from allmrec.llm.loading import resolve_llm_source
    resolve_llm_source(s2.llm)  # convert/cache the packaged model once, before the workers start
    t0 = time.perf_counter()
    prep = Prepared(data_dir)
    # the same seeded users and examples as Stage-2 with the same max_users (examples_per_user, heldout_target)
    train_ds, items_ds = next_title_datasets(ray, cfg, prep, data_dir, max_users)
    trainer = make_trainer(
        cfg, f"tallrec-{fp}", train_func,
        {"cfg": cfg.to_dict(), "fail_at_epoch": fail_at_epoch, "ds_overrides": ds_overrides, "cf_files": cf_files},
        {"train": train_ds, "items": items_ds},
        num_workers=t.num_workers, use_gpu=t.use_gpu, max_failures=cfg.cf.max_failures, force=force)
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    write_output(result, out_dir, LORA, cfg, train_s, "TALLRec loss (LoRA, next-title cross-entropy)", {
        "fingerprint": fp, "job": "tallrec", "llm": s2.llm, "zero_stage": t.zero_stage, "workers": t.num_workers,
        "lora": {"r": t.lora_r, "alpha": t.lora_alpha, "dropout": t.lora_dropout,
                 "target_modules": t.target_modules or "auto"},
        "epochs": epochs, "max_users": max_users, "examples_per_user": s2.examples_per_user,
        "heldout_target": s2.heldout_target, "candidate_order": order,
        **({"cf_weights": {"model": cfg.cf.model, "sha256": files_sha256(cf_files)}} if cf_files else {})})
    return out_dir


def summary(out_dir: Path) -> str:
    m = read_manifest(out_dir) or {}
    f = m.get("final") or {}
    return (f"tallrec -> {out_dir}: {m.get('epochs_run')} epochs in {m.get('train_seconds')} s, final loss "
            f"{f.get('loss', float('nan')):.4f}, {f.get('users_per_s')} users/s, {f.get('s_per_step')} s/step; "
            f"{f.get('lora_params')} LoRA parameters trained; ZeRO-{m.get('zero_stage')} LLM parameters per "
            f"rank {f.get('llm_params_local_per_rank')} of {f.get('llm_params_full')}")
