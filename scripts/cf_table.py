"""Print docs/results.md's CF table from the run folders `scripts/cf_sweep.sh` wrote.

    .venv/bin/python scripts/cf_table.py runs/sweep-*-{sasrec,gru4rec,nextitnet,ncf}
"""
from __future__ import annotations

import sys
from pathlib import Path

from allmrec.artifacts import MissingArtifact, RunFolder
from allmrec.config import load_config


def row(run: Path) -> str | None:
    model = run.name.rsplit("-", 1)[1]
    try:
        m = RunFolder(load_config(None, [f"run_dir={run}", f"cf.model={model}"])).cf_manifest()
    except (MissingArtifact, ValueError):  # not trained (yet), or not a CF model's name
        return None
    t = m["test"]
    ds = run.name.removeprefix("sweep-").rsplit("-", 1)[0]
    f = lambda k, key="hit@1": f"{t[k][key]:.4f}" if k in t else ""  # noqa: E731
    cmd = f"`allmrec train-cf --config configs/{ds}.yaml cf.model={m['model']}`"
    return (f"| {ds} | {m['model']} | {cmd} | {m['epochs_run']} | {m['train_seconds']:.0f} | **{f('model')}** | "
            f"{f('model', 'hit@5')} | {f('model', 'ndcg@10')} | {f('model_warm_items')} | {f('model_cold_items')} | "
            f"{f('model_cold_users')} | {f('most_popular')} |")


def main(paths: list[str]) -> None:
    print("| data | model | command | epochs | train s | test Hit@1 | Hit@5 | NDCG@10 | warm items | cold items "
          "| cold users | most popular |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        r = row(Path(p))
        if r:
            print(r)


if __name__ == "__main__":
    main(sys.argv[1:])
