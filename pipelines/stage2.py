"""`allmrec stage2`: align with the frozen LLM (A-LLMRec Stage-2) on Ray Train + DeepSpeed ZeRO-3.

Every worker builds the frozen LLM (partitioned across workers by ZeRO-3: with `HfDeepSpeedConfig`
alive, `from_pretrained` loads straight into partitions), the frozen CF model (for x_u) and the two
trainable projectors, wrapped by the shared DeepSpeed engine. One example per user: the last training
item is the target, its title after the paper's prompt (10 most recent history titles, 20 shuffled
candidates = target + 19 seeded negatives). Only the projectors are exported (safetensors, small);
the DeepSpeed checkpoints (trainable state only) serve resume.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from allmrec.artifacts import PROJECTOR, RunFolder, cf_from_files, files_sha256, user_reps
from allmrec.config import Config, Stage2Config, config_from_dict
from allmrec.data.load import Prepared
from allmrec.io import fingerprint, read_manifest
from pipelines.common import init_ray, make_trainer, up_to_date
from pipelines.fingerprints import model_identity, prompt_digest
from pipelines.next_title import load_frozen_llm, next_title_datasets, next_title_epochs, write_output
from pipelines.workers import collect, collect_sorted, item_titles_from

log = logging.getLogger("allmrec.stage2")


def train_func(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from allmrec.recommender import LLMRecommender, Stage2Module, build_projector
    from pipelines import engine as eng

    from pipelines.common import quiet_worker_logs
    quiet_worker_logs()
    cfg = config_from_dict(config["cfg"])
    s2 = cfg.stage2
    torch.set_num_threads(config["threads"])
    eng.init_distributed(s2.use_gpu)
    device = "cuda" if s2.use_gpu else "cpu"
    conf = eng.deepspeed_config(s2.deepspeed_config, micro_batch=s2.batch_size, zero_stage=s2.zero_stage,
                                bf16=s2.bf16 and s2.use_gpu, overrides=config.get("ds_overrides"))
    llm, tok = load_frozen_llm(cfg, device, conf)
    if s2.compiles():
        from allmrec.llm.loading import compile_layers
        compile_layers(llm)
    cf = cf_from_files(config["cf_files"]).to(device)
    vectors = config["item_vectors"]
    torch.manual_seed(cfg.train_seed())  # identical projector initialisation on every rank
    llm_dim = llm.config.hidden_size
    projector = build_projector(s2.item_tokens, s2.use_user_token, cf.hidden,
                                None if vectors is None else vectors.shape[1], llm_dim)
    module = Stage2Module(llm, projector, choice_weight=s2.choice_weight, candidate_softmax=s2.candidate_softmax)
    engine = eng.build_engine(module, s2.lr, conf)
    counts = eng.local_parameter_counts(engine.module.llm)
    all_counts = [None] * dist.get_world_size()
    dist.all_gather_object(all_counts, counts)

    titles = item_titles_from(collect(ray.train.get_dataset_shard("items")))
    order = s2.order_for(s2.use_user_token)
    rec = LLMRecommender(engine.module.llm, tok, titles, cfg.data.domain, projector=engine.module.projector,
                         item_vectors=vectors, use_user_token=s2.use_user_token, **s2.prompt(),
                         candidate_order=order, cf_items=cf.item_embeddings() if order == "cf" else None)
    # Ray Data's split may hand the two halves to the ranks either way round, and a block's rows may
    # arrive in any order: sort by user and draw every rank's order from the same seed, so a swap of
    # halves only swaps which rank computes which batch (same averaged gradients, reproducible runs).
    train = collect_sorted(ray.train.get_dataset_shard("train"))
    reps = user_reps(cf, list(train["hist"]), train["user"], device) if rec.needs_user_rep else None

    next_title_epochs(engine, rec, train, reps, cfg, name="stage2", epochs=s2.epochs, batch_size=s2.batch_size,
                      export_prefix="projector.", weights_file=PROJECTOR, all_counts=all_counts,
                      fail_at_epoch=config.get("fail_at_epoch"), start_from=config.get("start_from"),
                      track=config.get("tracking"), bucket_window=s2.bucket_window)


def _fingerprinted(cfg: Config) -> dict:
    """The Stage-2 settings a trained projector depends on (not where it ran). Settings added later are
    left out at their default, so projectors trained before they existed stay up to date."""
    late = ("choice_weight", "candidate_softmax", "examples_per_user", "seed", "bucket_window", "heldout_target",
            *Stage2Config.LAYOUT_KEYS)
    # compile: how fast, not what is trained; order_baselines: folded into the order this variant is trained on
    skip = {*late, "compile", "order_baselines"}
    s2 = {k: v for k, v in cfg.to_dict()["stage2"].items() if k not in skip} | {"num_workers": None, "use_gpu": None}
    trained = replace(cfg.stage2, candidate_order=cfg.stage2.order_for(cfg.stage2.use_user_token))
    return s2 | trained.changed(late)


def _continued_checkpoint(cfg: Config, out_dir: Path, fp_with_epochs) -> tuple[str, dict]:
    """The final Ray Train checkpoint of the finished Stage-2 in `out_dir`, to train on from it with more
    epochs, and the manifest's record of it. Only the epoch count may differ: the learning rate is
    constant and each epoch's order is seeded by its number, so 2 epochs + 2 more are 4 epochs."""
    old = read_manifest(out_dir)
    if old is None:
        raise FileNotFoundError(f"--continue: no finished Stage-2 in {out_dir} to continue")
    done = int(old.get("epochs_run", 0))
    if done >= cfg.stage2.epochs:
        raise ValueError(f"--continue: {out_dir} already has {done} epochs; set stage2.epochs above {done}")
    old_fp = fp_with_epochs(done)
    if old.get("fingerprint") != old_fp:
        raise ValueError(f"--continue: the Stage-2 in {out_dir} was trained with other settings or inputs "
                         "than these (only stage2.epochs may change); retrain it instead")
    ckpts = sorted(d for d in (RunFolder(cfg).ray_results / f"stage2-{old_fp}").glob("checkpoint_*") if d.is_dir())
    if not ckpts or len(json.loads((ckpts[-1] / "history.json").read_text())) != done:
        raise FileNotFoundError(f"--continue: the epoch-{done} checkpoint of {out_dir} is gone from ray_results")
    return str(ckpts[-1]), {"fingerprint": old_fp, "epochs": done}


def plan(cfg: Config, ds_overrides: dict | None = None):
    """(fingerprint of a run with N epochs: N -> str, the CF files read, their `cf_weights` record).
    The fingerprint covers the data, the CF weights, Stage-1 (for the variants that read its table), the
    seed, the Stage-2 settings, the LLM's identity and the prompt template's text."""
    rf = RunFolder(cfg)
    s2 = cfg.stage2
    m = rf.require(rf.data, "allmrec prepare")
    mcf = rf.cf_manifest()  # MissingArtifact naming `allmrec train-cf ... cf.model=<m>`
    cf_files = rf.cf_files()
    cf_weights = {"model": cfg.cf.model, "sha256": files_sha256(cf_files)}
    needs_s1 = s2.item_tokens in ("joint", "sbert", "random")
    ms1 = {"fingerprint": None}
    if needs_s1:
        ms1 = rf.require(rf.stage1, rf.command("stage1", f"cf.model={cfg.cf.model}"))
        rf.check_cf(rf.stage1, "stage1")  # Stage-1's table was made for these CF weights
    llm = model_identity(s2.llm, "llm")
    prompt = prompt_digest(cfg)

    def fp_with_epochs(epochs: int) -> str:
        return fingerprint({"data": m["fingerprint"], "cf": mcf["fingerprint"], "cf_weights": cf_weights["sha256"],
                            "stage1": ms1["fingerprint"], "seed": cfg.seed,
                            "stage2": _fingerprinted(cfg) | {"epochs": epochs}, "llm": llm, "prompt": prompt,
                            "ds": ds_overrides, "item_vectors": "standardized-v2",  # bump when F_I's inputs change
                            **({"fewshot": cfg.fewshot} if cfg.fewshot else {})})
    return fp_with_epochs, cf_files, cf_weights


def stage2(cfg: Config, force: bool = False, fail_at_epoch: int | None = None,
           ds_overrides: dict | None = None, extend: bool = False) -> Path:
    """Train Stage-2 (skipped when up to date). `extend`: go on from the finished run's last epoch to
    `stage2.epochs`, with its optimizer state, instead of training again from scratch."""
    s2 = cfg.stage2
    rf = RunFolder(cfg)
    out_dir = rf.stage2()
    fp_with_epochs, cf_files, cf_weights = plan(cfg, ds_overrides)
    fp = fp_with_epochs(s2.epochs)
    if up_to_date("stage2", out_dir, fp, force):
        return out_dir
    resume, continued = _continued_checkpoint(cfg, out_dir, fp_with_epochs) if extend else (None, None)
    if s2.item_tokens == "none" and not s2.use_user_token:
        raise ValueError("nothing to train: LLM-Only (no user token, no item tokens) has no projector")
    ray = init_ray(cfg)
    from allmrec.llm.loading import resolve_llm_source
    resolve_llm_source(s2.llm)  # convert/cache the packaged model once, before the workers start
    t0 = time.perf_counter()
    prep = Prepared(rf.data)
    vectors = rf.item_vectors(cf_from_files(cf_files))
    train_ds, items_ds = next_title_datasets(ray, cfg, prep, rf.data, s2.max_users)
    trainer = make_trainer(
        cfg, f"stage2-{fp}", train_func,
        {"cfg": cfg.to_dict(), "cf_files": cf_files, "item_vectors": vectors, "fail_at_epoch": fail_at_epoch,
         "ds_overrides": ds_overrides, "start_from": resume},
        {"train": train_ds, "items": items_ds},
        num_workers=s2.num_workers, use_gpu=s2.use_gpu, max_failures=cfg.cf.max_failures, force=force)
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    write_output(result, out_dir, PROJECTOR, cfg, train_s, "Stage-2 loss (next-title cross-entropy)", {
        "fingerprint": fp, "job": "stage2", "cf_weights": cf_weights, **({"continued_from": continued} if continued else {}),
        "variant": {"item_tokens": s2.item_tokens, "use_user_token": s2.use_user_token},
        "llm": s2.llm, "zero_stage": s2.zero_stage, "workers": s2.num_workers})
    return out_dir


def summary(out_dir: Path) -> str:
    m = read_manifest(out_dir) or {}
    f = m.get("final") or {}
    n, done = m.get("epochs_run"), m.get("continued_from", {}).get("epochs")
    epochs = f"{n} epoch{'' if n == 1 else 's'}"
    if done:
        here = f"epoch {n}" if done + 1 == n else f"epochs {done + 1}-{n}"
        epochs += f" ({here} here, on top of a {done}-epoch run)"
    return (f"stage2 -> {out_dir}: {epochs} in {m.get('train_seconds')} s, final loss "
            f"{f.get('loss', float('nan')):.4f}, {f.get('users_per_s')} users/s; ZeRO-{m.get('zero_stage')} "
            f"LLM parameters per rank {f.get('llm_params_local_per_rank')} of {f.get('llm_params_full')}")
