"""The `allmrec` command: one sub-command per job, all driven by one config.

  allmrec prepare --config configs/scientific.yaml data.k_core=5
  allmrec run --config configs/ml100k.yaml
  allmrec stage2 --config configs/ml100k.yaml --force run_dir=runs/x     (overrides anywhere on the line)
  allmrec genres --config configs/ml100k.yaml run_dir=runs/a-full allmrec llm_only --max-users 60
  allmrec config --config configs/ml100k.yaml cf.epochs=5                (the resolved YAML; exit 2 on error)
  allmrec export runs/ml100k exported/ml100k                             (a Hugging-Face-style folder)

Exit codes: 0 done, 1 the job failed (one line on stderr), 2 bad command line or config (all errors at once).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from allmrec.config import ConfigError, load_config
from allmrec.procs import Terminated, descendants, end_new_children, sigterm_raises

# job -> (one-line help, what it reads and writes: the job's --help)
JOBS: dict[str, tuple[str, str]] = {
    "prepare": ("parse, filter and split the raw data (Ray Data)",
                "Reads data.path in data.format (amazon2018 | amazon2023 | seq_json | seq_txt | recbole), dedupes, "
                "applies the iterative k-core (data.k_core), maps ids, splits leave-one-out, draws data.n_negatives "
                "seeded negatives per user, labels cold/warm items and cold users, writes few-shot subsets. "
                "Writes RUN_DIR/data/ (parquet + manifest.json)."),
    "encode": ("SBERT embeddings of every item's text (Ray Data actor pool)",
               "Reads RUN_DIR/data/ (run `allmrec prepare` first). Encodes 'Title: t, Description: d' of every item "
               "with encode.model on encode.num_actors actors. Writes RUN_DIR/encode/."),
    "train-cf": ("pre-train the CF model (Ray Train, DDP)",
                 "Reads RUN_DIR/data/. Trains cf.model (sasrec | gru4rec | nextitnet | ncf | morec, or a plugged-in "
                 "model) for cf.epochs with early stopping on validation NDCG@10 (cf.patience) over cf.num_workers "
                 "workers; resumes from its last checkpoint after a worker failure. Writes RUN_DIR/cf/<cf.model>/."),
    "stage1": ("Stage-1: align CF item embeddings with SBERT text embeddings (Ray Train + DeepSpeed)",
               "Reads RUN_DIR/data/ and RUN_DIR/cf/<cf.model>/ (run train-cf first). Trains the aligner (stage1.*) and "
               "fine-tunes SBERT. Writes RUN_DIR/stage1/ (aligner + SBERT export, joint_emb.parquet, loss.png)."),
    "stage2": ("Stage-2: project user/item vectors into the frozen LLM's tokens (Ray Train + DeepSpeed ZeRO-3)",
               "Reads RUN_DIR/data/, cf/ and stage1/. Trains the projectors for stage2.item_tokens / "
               "stage2.use_user_token with the frozen stage2.llm. Writes RUN_DIR/stage2/ (projector.safetensors). "
               "--continue trains a finished Stage-2 on to stage2.epochs."),
    "tallrec": ("the TALLRec baseline: LoRA on the LLM, same examples as Stage-2 (Ray Train + DeepSpeed)",
                "Reads RUN_DIR/data/. Trains LoRA adapters (tallrec.*) on the LLM-Only prompt. "
                "Writes RUN_DIR/tallrec/ (lora.safetensors)."),
    "evaluate": ("Hit@1 and friends for every model in eval.variants (Ray Data actor pool)",
                 "Reads the trained parts the variants need. Scores 1 + data.n_negatives candidates per test user "
                 "(overall, cold/warm items, cold users) in eval.mode (rank | generate | both). Writes RUN_DIR/report/ "
                 "(report.md, metrics.json, PNGs); eval.source_run=OTHER_RUN for cross-domain."),
    "genres": ("favourite-genre generation (paper 5.4.4)",
               "Words without '=' name the LLM variants to ask (default: allmrec llm_only). Writes RUN_DIR/genres/."),
    "score": ("top-k for every user: CF retrieval + A-LLMRec re-ranking (Ray Data), resumable",
              "Reads the trained run. Writes RUN_DIR/scores/ (parquet per chunk). --top-k overrides score.top_k."),
    "serve": ("serve POST /v1/recommend over HTTP (Ray Serve) until Ctrl-C",
              "Serves the trained run RUN_DIR (or an exported folder: run_dir=EXPORTED) on serve.host:serve.port. "
              "The config is checked before Ray starts. Same as `python -m serve`."),
    "run": ("the main job: every step in order, each skipped when up to date, then one live request",
            "prepare -> encode -> train-cf -> stage1 -> stage2 -> evaluate -> score, then the service answers one "
            "request (--no-serve to skip). The report lands in RUN_DIR/report/."),
    "config": ("print the resolved config as YAML (defaults < file < overrides); exit 2 on any error",
               "Loads and checks the config exactly as every job does, without starting anything."),
    "export": ("export a trained run as a Hugging-Face-style folder (config.json, safetensors, model card)",
               "allmrec export RUN_DIR OUT: the CF model, aligner and projectors as safetensors, the item table, "
               "TALLRec's LoRA in PEFT's layout (when trained) and a README.md model card with the run's measured "
               "metrics. Load it with `from allmrec import ALLMRec; ALLMRec.from_pretrained(OUT)`."),
}
# jobs that write into the run folder (checked before Ray starts)
WRITERS = {"prepare", "encode", "train-cf", "stage1", "stage2", "tallrec", "evaluate", "genres", "score", "run"}
MIN_FREE_GB = float(os.environ.get("ALLMREC_MIN_FREE_GB", "1"))  # free space a job needs to start


def _version() -> str:
    import allmrec
    return allmrec.__version__


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="allmrec", description="A-LLMRec on Ray: batch jobs and serving. "
                                "`allmrec JOB --help` says what a job reads and writes.",
                                epilog="Every job takes --config FILE and section.key=value overrides, anywhere "
                                "on the line (defaults < file < overrides; docs/guide.md lists the keys).")
    p.add_argument("--version", action="version", version=f"allmrec {_version()}")
    sub = p.add_subparsers(dest="job", required=True, metavar="JOB")
    for job, (short, long) in JOBS.items():
        s = sub.add_parser(job, help=short, description=f"{short}. {long}")
        if job == "export":
            s.add_argument("run", metavar="RUN_DIR", help="a trained run folder (prepare, train-cf, stage1, stage2)")
            s.add_argument("out", metavar="OUT", help="the folder to write (must not exist, unless --force)")
            s.add_argument("--variant", default="allmrec", help="the LLM variant to export (default: allmrec)")
        s.add_argument("--config", "-c", default=None, metavar="FILE",
                       help="YAML config (defaults < file < overrides)" if job != "export" else
                       "YAML config (default: the run's own config.yaml)")
        s.add_argument("--force", action="store_true",
                       help="rebuild even if the output is up to date" if job != "export" else "replace OUT")
        if job != "export":
            s.add_argument("overrides", nargs="*", metavar="section.key=value",
                           help="overrides, e.g. cf.epochs=20 run_dir=runs/x")
        if job == "score":
            s.add_argument("--top-k", type=int, default=None, help="= score.top_k")
        if job == "genres":  # positional words without "=" are LLM variants: allmrec genres -c C allmrec llm_only
            s.add_argument("--max-users", type=int, default=100, help="seeded subset of test users (0: all)")
            s.add_argument("--max-new-tokens", type=int, default=24)
        if job == "stage2":
            s.add_argument("--continue", dest="extend", action="store_true",
                           help="train the finished Stage-2 on to stage2.epochs from its last epoch")
        if job == "serve":
            s.add_argument("--variant", default=None, help="LLM variant to serve (default: the one stage2.* describes)")
        if job == "run":
            s.add_argument("--no-serve", action="store_true", help="do not start the service at the end")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """argparse, plus `section.key=value` overrides accepted anywhere (argparse fills a `nargs="*"`
    positional only once, so words after an option come back as unknown: they are overrides too)."""
    p = _parser()
    args, extra = p.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or args.job == "export"]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.job != "export":
        args.overrides = list(args.overrides) + extra
        for word in args.overrides:
            if "=" not in word and (word.endswith((".yaml", ".yml")) or Path(word).is_file()):
                hint = "" if args.config is None else f" (--config {args.config} is already given)"
                p.error(f"{word!r} looks like a config file: pass it as --config {word}{hint}")
        bare = [w for w in args.overrides if "=" not in w]
        if bare and args.job != "genres":
            p.error(f"{' '.join(bare)}: overrides look like section.key=value (e.g. cf.epochs=20)")
    return args


def check_writable(folder: Path, min_free_gb: float = MIN_FREE_GB) -> str | None:
    """None when `folder` (created if missing) takes a file and has `min_free_gb` free, else one line
    saying why not: checked before Ray starts, so a read-only or full disk fails in a second."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".allmrec-write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        return f"{folder} is not writable ({e.strerror or e})"
    free = shutil.disk_usage(folder).free / (1 << 30)
    if free < min_free_gb:
        return f"{folder} has {free:.2f} GiB free, less than the {min_free_gb:g} GiB a job needs (ALLMREC_MIN_FREE_GB)"
    return None


LLM_JOBS = {"run", "stage2", "tallrec", "genres", "score", "serve"}  # and evaluate with an LLM variant


def preflight(cfg, job: str) -> str | None:
    """The run folder, Ray's temporary folder when this job starts a local cluster, and a packaged LLM's
    packages when this job will load it (the main job would otherwise fail minutes in, at Stage-2)."""
    from allmrec.artifacts import LLM_VARIANTS
    if job in LLM_JOBS or (job == "evaluate" and set(cfg.eval.variants) & set(LLM_VARIANTS)):
        from allmrec.llm.loading import check_llm_available
        try:
            check_llm_available(cfg.stage2.llm)
        except (FileNotFoundError, ValueError) as e:
            return f"stage2.llm={cfg.stage2.llm} is not available: {e}"
    folders = [Path(cfg.run_dir).expanduser().resolve()] if job in WRITERS else []
    if job in WRITERS | {"serve"} and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        import tempfile
        folders.append(Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()))
    for f in folders:
        problem = check_writable(f)
        if problem:
            return problem
    return None


def _ray_shutdown() -> None:
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job == "export":
        return _export(args)
    from pipelines.common import setup_logging
    setup_logging()
    try:
        overrides = list(args.overrides)
        variants: list[str] = []
        if args.job == "genres":
            variants = [o for o in overrides if "=" not in o]
            overrides = [o for o in overrides if "=" in o]
        if getattr(args, "top_k", None) is not None:
            overrides.append(f"score.top_k={args.top_k}")
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"allmrec: config error: {e}", file=sys.stderr)
        return 2
    if args.job == "config":
        sys.stdout.write(cfg.to_yaml())
        return 0
    problem = preflight(cfg, args.job)
    if problem:
        print(f"allmrec {args.job}: {problem}", file=sys.stderr)
        return 1
    if args.job == "serve":
        # the service is its own package (pipelines/ never imports serve/): hand over the process
        cmd = [sys.executable, "-m", "serve"] + (["--config", args.config] if args.config else []) + overrides
        if args.variant:
            cmd += ["--variant", args.variant]
        os.execv(sys.executable, cmd)
    if cfg.torch_threads:
        import torch
        torch.set_num_threads(cfg.torch_threads)
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    local = not ray_was_up and not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    before = descendants()
    t0 = time.perf_counter()
    try:
        with sigterm_raises():
            print(_run_job(args, cfg, variants))
    except (FileNotFoundError, ValueError) as e:
        print(f"allmrec {args.job}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"allmrec {args.job}: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; "
              "stopping Ray", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if local:  # the cluster this job started, and whatever of it would outlive ray.shutdown()
            left = end_new_children(before, _ray_shutdown)
            if left:
                print(f"allmrec {args.job}: ended {len(left)} process(es) Ray left behind", file=sys.stderr)
    print(f"[{args.job}] done in {time.perf_counter() - t0:.1f} s")
    return 0


def _run_job(args: argparse.Namespace, cfg, variants: list[str]) -> str:
    job, force = args.job, args.force
    if job == "prepare":
        from pipelines import prepare
        return prepare.summary(prepare.prepare(cfg, force=force))
    if job == "encode":
        from pipelines import encode
        return encode.summary(encode.encode(cfg, force=force))
    if job == "run":
        from pipelines import run
        run.run(cfg, force=force, serve=not args.no_serve)
        return ""
    if job == "stage1":
        from pipelines import stage1
        return stage1.summary(stage1.stage1(cfg, force=force))
    if job == "stage2":
        from pipelines import stage2
        return stage2.summary(stage2.stage2(cfg, force=force, extend=args.extend))
    if job == "tallrec":
        from pipelines import tallrec
        return tallrec.summary(tallrec.tallrec(cfg, force=force))
    if job == "evaluate":
        from pipelines import evaluate
        return evaluate.summary(evaluate.evaluate(cfg, force=force))
    if job == "genres":
        from pipelines import genres
        return genres.summary(genres.genres(cfg, variants or genres.DEFAULT_VARIANTS,
                                            max_users=args.max_users or None, max_new_tokens=args.max_new_tokens,
                                            force=force))
    if job == "score":
        from pipelines import score
        return score.summary(score.score(cfg, force=force))
    if job == "train-cf":
        from pipelines import train_cf
        return train_cf.summary(train_cf.train_cf(cfg, force=force))
    raise ValueError(f"the {job} job is not available in this version")


def _export(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser().resolve()
    problem = check_writable(out.parent)
    if problem:
        print(f"allmrec export: {problem}", file=sys.stderr)
        return 1
    try:
        from allmrec.export import export_run
        t0 = time.perf_counter()
        path = export_run(args.run, out, config=args.config, variant=args.variant, force=args.force)
    except ConfigError as e:
        print(f"allmrec export: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"allmrec export: error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.run} -> {path} in {time.perf_counter() - t0:.1f} s "
          f"(load it: from allmrec import ALLMRec; ALLMRec.from_pretrained({str(path)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
