"""`python -m serve --config configs/ml100k.yaml run_dir=/tmp/r_ml [--variant allmrec]`: serve until Ctrl-C."""
from __future__ import annotations

import argparse
import sys

from allmrec.config import ConfigError, load_config


def check_before_ray(cfg, variant: str | None) -> str | None:
    """One line saying why this config cannot be served (unknown variant, no trained run there), else None."""
    import difflib

    from allmrec.artifacts import LLM_VARIANTS, RunFolder
    if variant is not None and variant not in LLM_VARIANTS:
        close = difflib.get_close_matches(variant, list(LLM_VARIANTS), n=1)
        return (f"--variant {variant!r}: expected one of {'|'.join(LLM_VARIANTS)}"
                + (f" (did you mean {close[0]!r}?)" if close else ""))
    folder = RunFolder(cfg)
    if not (folder.data / "manifest.json").is_file():
        return f"{folder.root} is not a prepared run folder (no data/manifest.json): set run_dir= to a trained run"
    if folder.cf_found() is None:
        return f"{folder.root} has no trained CF model {cfg.cf.model!r}: run `allmrec train-cf` first"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve", description="Serve a trained allmrec run over HTTP.")
    p.add_argument("--config", "-c", default=None, help="YAML config of the run (defaults < file < overrides)")
    p.add_argument("--variant", default=None, help="LLM variant (default: the one cfg.stage2 describes)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. run_dir=/tmp/r_ml serve.port=8080")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"serve: config error: {e}", file=sys.stderr)
        return 2
    problem = check_before_ray(cfg, args.variant)  # fail in a second, not after Ray's start-up
    if problem:
        print(f"serve: {problem}", file=sys.stderr)
        return 2 if problem.startswith("--variant") else 1
    import os

    from allmrec.procs import descendants, end_new_children, sigterm_raises
    from serve.cli import start
    before, local = descendants(), not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    try:
        with sigterm_raises():  # SIGTERM stops the service as Ctrl-C does
            start(cfg, blocking=True, variant=args.variant)
    except (FileNotFoundError, ValueError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # SIGTERM before start() took over Ctrl-C
        return 143
    finally:
        if local:  # the local cluster start() made, and the agents that would outlive ray.shutdown()
            import ray
            end_new_children(before, ray.shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
