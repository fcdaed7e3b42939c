"""`python -m serve --config configs/ml100k.yaml run_dir=/tmp/r_ml [--variant allmrec]`: serve until Ctrl-C."""
from __future__ import annotations

import argparse
import sys

from allmrec.config import ConfigError, load_config


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
    from serve.cli import start
    try:
        start(cfg, blocking=True, variant=args.variant)
    except (FileNotFoundError, ValueError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
