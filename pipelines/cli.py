"""The `allmrec` command: one sub-command per job, all driven by one config.

  allmrec prepare --config configs/scientific.yaml data.k_core=5
  allmrec run --config configs/ml100k.yaml
  allmrec genres --config configs/ml100k.yaml run_dir=runs/a-full allmrec llm_only --max-users 60
"""
from __future__ import annotations

import argparse
import sys
import time

from allmrec.config import ConfigError, load_config
from pipelines.common import setup_logging

JOBS = ["prepare", "encode", "train-cf", "stage1", "stage2", "tallrec", "evaluate", "genres", "score", "serve", "run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="allmrec", description="A-LLMRec on Ray: batch jobs and serving.")
    sub = p.add_subparsers(dest="job", required=True)
    for job in JOBS:
        s = sub.add_parser(job, help=f"run the {job} job")
        s.add_argument("--config", "-c", default=None, help="YAML config (defaults < file < overrides)")
        s.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
        s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. cf.epochs=20")
        if job == "score":
            s.add_argument("--top-k", type=int, default=None)
        if job == "genres":  # positional words without "=" are LLM variants: allmrec genres -c C allmrec llm_only
            s.add_argument("--max-users", type=int, default=100, help="seeded subset of test users (0: all)")
            s.add_argument("--max-new-tokens", type=int, default=24)
        if job == "stage2":
            s.add_argument("--continue", dest="extend", action="store_true",
                           help="train the finished Stage-2 on to stage2.epochs from its last epoch")
        if job == "run":
            s.add_argument("--no-serve", action="store_true", help="do not start the service at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    try:
        overrides = list(args.overrides)
        if args.job == "genres":
            variants = [o for o in overrides if "=" not in o]
            overrides = [o for o in overrides if "=" in o]
        if getattr(args, "top_k", None) is not None:
            overrides.append(f"score.top_k={args.top_k}")
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"allmrec: config error: {e}", file=sys.stderr)
        return 2
    if cfg.torch_threads:
        import torch
        torch.set_num_threads(cfg.torch_threads)
    t0 = time.perf_counter()
    try:
        if args.job == "prepare":
            from pipelines import prepare
            print(prepare.summary(prepare.prepare(cfg, force=args.force)))
        elif args.job == "encode":
            from pipelines import encode
            print(encode.summary(encode.encode(cfg, force=args.force)))
        elif args.job == "serve":
            # the service is its own package (pipelines/ never imports serve/): hand over the process
            import os
            cmd = [sys.executable, "-m", "serve"] + (["--config", args.config] if args.config else []) + overrides
            os.execv(sys.executable, cmd)
        elif args.job == "run":
            from pipelines import run
            run.run(cfg, force=args.force, serve=not args.no_serve)
        elif args.job == "stage1":
            from pipelines import stage1
            print(stage1.summary(stage1.stage1(cfg, force=args.force)))
        elif args.job == "stage2":
            from pipelines import stage2
            print(stage2.summary(stage2.stage2(cfg, force=args.force, extend=args.extend)))
        elif args.job == "tallrec":
            from pipelines import tallrec
            print(tallrec.summary(tallrec.tallrec(cfg, force=args.force)))
        elif args.job == "evaluate":
            from pipelines import evaluate
            print(evaluate.summary(evaluate.evaluate(cfg, force=args.force)))
        elif args.job == "genres":
            from pipelines import genres
            print(genres.summary(genres.genres(cfg, variants or genres.DEFAULT_VARIANTS,
                                               max_users=args.max_users or None,
                                               max_new_tokens=args.max_new_tokens)))
        elif args.job == "score":
            from pipelines import score
            print(score.summary(score.score(cfg, force=args.force)))
        elif args.job == "train-cf":
            from pipelines import train_cf
            print(train_cf.summary(train_cf.train_cf(cfg, force=args.force)))
        else:
            print(f"allmrec: the {args.job} job is not available in this version", file=sys.stderr)
            return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"allmrec {args.job}: error: {e}", file=sys.stderr)
        return 1
    print(f"[{args.job}] done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
