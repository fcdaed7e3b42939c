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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from allmrec.config import Config, Stage2Config, config_from_dict
from allmrec.data import schema
from allmrec.data.load import Prepared
from allmrec.io import atomic_dir, fingerprint, is_complete, read_manifest
from pipelines.common import init_ray, make_trainer, run_path, training_users
from allmrec.artifacts import PROJECTOR, stage2_dir, user_reps, variant_vectors
from pipelines.rows import next_title_examples
from pipelines.stage1 import _bundle, _by_user, _collect, _plot_losses, load_cf_bundle

log = logging.getLogger("allmrec.stage2")


def load_frozen_llm(cfg: Config, device: str, ds_conf: dict | None = None):
    """The frozen LLM; under ZeRO-3 `HfDeepSpeedConfig` makes from_pretrained load partitioned."""
    from allmrec.llm.loading import load_llm, resolve_dtype
    keep = None
    if ds_conf is not None and ds_conf.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig
        keep = HfDeepSpeedConfig(ds_conf)  # must stay alive while the model is built
    llm, tok = load_llm(cfg.stage2.llm, dtype=resolve_dtype(cfg.stage2.llm_dtype, device), device=device)
    del keep
    return llm, tok


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
    cf = load_cf_bundle(config["cf_files"]).to(device)
    vectors = config["item_vectors"]
    torch.manual_seed(cfg.seed)  # identical projector initialisation on every rank
    llm_dim = llm.config.hidden_size
    projector = build_projector(s2.item_tokens, s2.use_user_token, cf.hidden,
                                None if vectors is None else vectors.shape[1], llm_dim)
    module = Stage2Module(llm, projector, choice_weight=s2.choice_weight)
    engine = eng.build_engine(module, s2.lr, conf)
    counts = eng.local_parameter_counts(engine.module.llm)
    all_counts = [None] * dist.get_world_size()
    dist.all_gather_object(all_counts, counts)

    titles = item_titles_from(_collect(ray.train.get_dataset_shard("items")))
    rec = LLMRecommender(engine.module.llm, tok, titles, cfg.data.domain, projector=engine.module.projector,
                         item_vectors=vectors, use_user_token=s2.use_user_token, **s2.prompt())
    # Ray Data's split may hand the two halves to the ranks either way round, and a block's rows may
    # arrive in any order: sort by user and draw every rank's order from the same seed, so a swap of
    # halves only swaps which rank computes which batch (same averaged gradients, reproducible runs).
    train = _by_user(_collect(ray.train.get_dataset_shard("train")))
    reps = user_reps(cf, list(train["hist"]), train["user"], device) if s2.use_user_token else None

    next_title_epochs(engine, rec, train, reps, cfg, name="stage2", epochs=s2.epochs, batch_size=s2.batch_size,
                      export_prefix="projector.", weights_file=PROJECTOR, all_counts=all_counts,
                      fail_at_epoch=config.get("fail_at_epoch"), start_from=config.get("start_from"))


def next_title_epochs(engine, rec, train: dict, reps, cfg: Config, *, name: str, epochs: int, batch_size: int,
                      export_prefix: str, weights_file: str, all_counts: list, fail_at_epoch: int | None,
                      st_metadata: dict | None = None, extra_metrics: dict | None = None,
                      start_from: str | None = None) -> None:
    """The epoch loop shared by Stage-2 and TALLRec: resume, seeded batches of next-title examples, one
    DeepSpeed step each, and per epoch a Ray Train report with a checkpoint holding the trainable weights
    (the module's parameters under `export_prefix`, saved as `weights_file`) and the loss history.
    `start_from`: an earlier run's checkpoint folder to go on from (`allmrec stage2 --continue`)."""
    import ray.train
    import torch.distributed as dist

    from allmrec.recommender import Example
    from pipelines import engine as eng

    rank, n_rows = dist.get_rank(), len(train["user"])
    state = eng.restore(engine, start_from) or {}
    start, history = state.get("epoch", 0) + 1, state.get("history", [])
    if rank == 0 and state:
        print(f"[{name}] going on after epoch {start - 1} of a checkpoint", flush=True)
    for epoch in range(start, epochs + 1):
        # test hook: fail once, after this attempt has reported a checkpoint of its own to resume from
        if fail_at_epoch == epoch and epoch > start and rank == 0:
            raise RuntimeError(f"injected failure at epoch {epoch} (test hook)")
        t0 = time.perf_counter()
        # ZeRO-3 needs the same number of steps on every rank: Ray Data's split gives equal-sized shards
        order = np.random.default_rng([cfg.seed, epoch, 0]).permutation(n_rows)
        total, n_steps, step_losses = 0.0, 0, []
        engine.train()  # LoRA dropout on (TALLRec); the frozen LLM has no dropout in use
        for i in range(0, n_rows, batch_size):
            exs = [Example(None if reps is None else reps[j], train["hist"][j], train["cands"][j],
                           int(train["target"][j])) for j in order[i:i + batch_size]]
            loss = engine(rec.batch(exs, with_target=True), rec.prompts.placeholders)
            engine.backward(loss)
            engine.step()
            step_losses.append(float(loss.detach()))
            total += step_losses[-1]
            n_steps += 1
            if rank == 0 and n_steps % 10 == 0:
                print(f"[{name}] epoch {epoch} step {n_steps}/{-(-n_rows // batch_size)} "
                      f"loss {total / n_steps:.4f} ({(time.perf_counter() - t0) / n_steps:.2f} s/step)", flush=True)
        dt = time.perf_counter() - t0
        agg = torch.tensor([total, float(n_steps)], dtype=torch.float64)
        dist.all_reduce(agg)  # the mean loss over every rank's steps, the same on all ranks
        rec_m = {"epoch": epoch, "loss": float(agg[0] / max(agg[1], 1.0)), "seconds": round(dt, 2),
                 "steps": n_steps, "s_per_step": round(dt / max(n_steps, 1), 3),
                 "users_per_s": round(n_rows * dist.get_world_size() / max(dt, 1e-9), 3), **(extra_metrics or {}),
                 "llm_params_full": all_counts[0]["full"],
                 "llm_params_local_per_rank": [c["local"] for c in all_counts]}
        history.append({**rec_m, "step_losses": [round(v, 4) for v in step_losses]})  # for the loss curve
        export = eng.trainable_state(engine, (export_prefix,))  # collective under ZeRO-3: every rank calls it
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=eng.CKPT_TAG, client_state={"epoch": epoch, "history": history},
                                   exclude_frozen_parameters=True)
            if rank == 0:
                clean = {k[len(export_prefix):]: v.contiguous() for k, v in export.items()}
                (Path(tmp) / weights_file).write_bytes(st_save(clean, metadata=st_metadata))
                (Path(tmp) / "history.json").write_text(json.dumps(history))
            ray.train.report(rec_m, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _fingerprinted(cfg: Config) -> dict:
    """The Stage-2 settings a trained projector depends on (not where it ran). Settings added later are
    left out at their default, so projectors trained before they existed stay up to date."""
    s2 = cfg.to_dict()["stage2"] | {"num_workers": None, "use_gpu": None}
    for key in ("choice_weight", *Stage2Config.LAYOUT_KEYS):
        if s2[key] == getattr(Stage2Config, key):
            del s2[key]
    return s2


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
    ckpts = sorted(d for d in run_path(cfg, "ray_results", f"stage2-{old_fp}").glob("checkpoint_*") if d.is_dir())
    if not ckpts or len(json.loads((ckpts[-1] / "history.json").read_text())) != done:
        raise FileNotFoundError(f"--continue: the epoch-{done} checkpoint of {out_dir} is gone from ray_results")
    return str(ckpts[-1]), {"fingerprint": old_fp, "epochs": done}


def stage2(cfg: Config, force: bool = False, fail_at_epoch: int | None = None,
           ds_overrides: dict | None = None, extend: bool = False) -> Path:
    """Train Stage-2 (skipped when up to date). `extend`: go on from the finished run's last epoch to
    `stage2.epochs`, with its optimizer state, instead of training again from scratch."""
    s2 = cfg.stage2
    data_dir, cf_dir = run_path(cfg, "data"), run_path(cfg, "cf")
    m, mcf = read_manifest(data_dir), read_manifest(cf_dir)
    needs_s1 = s2.item_tokens in ("joint", "sbert", "random")
    ms1 = read_manifest(run_path(cfg, "stage1")) if needs_s1 else {"fingerprint": None}
    if m is None or mcf is None or ms1 is None:
        raise FileNotFoundError("stage2 needs prepare, train-cf" + (" and stage1" if needs_s1 else "") + " outputs")
    out_dir = stage2_dir(cfg)

    def fp_with_epochs(epochs: int) -> str:
        return fingerprint({"data": m["fingerprint"], "cf": mcf["fingerprint"], "stage1": ms1["fingerprint"],
                            "seed": cfg.seed, "stage2": _fingerprinted(cfg) | {"epochs": epochs},
                            "ds": ds_overrides, "item_vectors": "standardized-v2",  # bump when F_I's inputs change
                            **({"fewshot": cfg.fewshot} if cfg.fewshot else {})})
    fp = fp_with_epochs(s2.epochs)
    if not force and is_complete(out_dir, fp):
        log.info("stage2: %s is up to date; use --force to retrain", out_dir)
        return out_dir
    resume, continued = _continued_checkpoint(cfg, out_dir, fp_with_epochs) if extend else (None, None)
    if s2.item_tokens == "none" and not s2.use_user_token:
        raise ValueError("nothing to train: LLM-Only (no user token, no item tokens) has no projector")
    ray = init_ray(cfg)
    from allmrec.llm.loading import resolve_llm_source
    resolve_llm_source(s2.llm)  # convert/cache the packaged model once, before the workers start
    t0 = time.perf_counter()
    prep = Prepared(data_dir)
    cf_files = _bundle(cf_dir)
    vectors = variant_vectors(cfg, load_cf_bundle(cf_files), run_path(cfg))
    train_ds, items_ds = next_title_datasets(ray, cfg, prep, data_dir, s2.max_users)
    trainer = make_trainer(
        cfg, f"stage2-{fp}", train_func,
        {"cfg": cfg.to_dict(), "cf_files": cf_files, "item_vectors": vectors, "fail_at_epoch": fail_at_epoch,
         "ds_overrides": ds_overrides, "start_from": resume},
        {"train": train_ds, "items": items_ds},
        num_workers=s2.num_workers, use_gpu=s2.use_gpu, max_failures=cfg.cf.max_failures, force=force)
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    write_output(result, out_dir, PROJECTOR, cfg, train_s, "Stage-2 loss (next-title cross-entropy)", {
        "fingerprint": fp, "job": "stage2", **({"continued_from": continued} if continued else {}),
        "variant": {"item_tokens": s2.item_tokens, "use_user_token": s2.use_user_token},
        "llm": s2.llm, "zero_stage": s2.zero_stage, "workers": s2.num_workers})
    return out_dir


def next_title_datasets(ray, cfg: Config, prep: Prepared, data_dir: Path, max_users: int | None):
    """(train, items) Ray datasets of the next-title jobs (Stage-2 and TALLRec): one example per training
    user (the seeded subset when `max_users` or `cfg.fewshot` is set) and the item titles."""
    seq_ds = ray.data.read_parquet(str(data_dir / schema.SEQUENCES))
    keep = training_users(cfg, prep, max_users)
    if keep is not None:
        seq_ds = seq_ds.filter(lambda r: r["user"] in keep)
    train_ds = seq_ds.map_batches(next_title_examples, batch_format="pyarrow", fn_kwargs={
        "n_items": prep.n_items, "n_negatives": cfg.data.n_negatives, "seed": cfg.seed})
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
        cfg.dump(tmp / "config.yaml")
        (tmp / schema.MANIFEST).write_text(json.dumps({**manifest, "epochs_run": len(history),
                                                       "train_seconds": round(train_s, 1), "final": final}, indent=2))
        _plot_losses(history, tmp / "loss.png", plot_title)


def item_titles_from(items: dict[str, np.ndarray]) -> list[str]:
    """Titles indexed by item id (row 0 = padding) from a collected items shard."""
    titles = [""] * (int(items["item"].max()) + 1)
    for i, t in zip(items["item"], items["title"]):
        titles[int(i)] = str(t)
    return titles


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
