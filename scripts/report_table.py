"""Print one markdown table from several evaluation reports (`report.json` of `allmrec evaluate`).

    .venv/bin/python scripts/report_table.py runs/before/report "5 epochs=runs/before5/report" --models allmrec

Each argument is `[label=]path`, the path a report folder or its report.json. One row per model of each
report (only those named by --models, when given), named "<model> (<label>)" when a label is given;
`--metric gen_hit@1` tabulates the paper's generation-mode Hit@1 instead of the ranking's. The
reports must share data version, seed, scoring mode and user counts, i.e. the same candidate sets,
else the script refuses (--mixed allows it, for cross-domain tables). Hit@1 comes with its binomial
standard error, sqrt(p(1-p)/n), so that a reader sees what a column of 35 users can and cannot say; the
"vs CF" column is the report's paired comparison with its CF model on the same cases (difference ± paired
standard error, reports written since it exists).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from allmrec.metrics import proportion_se

SCENARIOS = ("overall", "warm_items", "cold_items", "cold_users")
SAME = ("data", "seed", "mode", "users_overall", "users_cold")


def load(arg: str) -> tuple[str | None, dict]:
    label, _, path = arg.rpartition("=") if "=" in arg else (None, "", arg)
    p = Path(path)
    p = p / "report.json" if p.is_dir() else p
    if not p.exists():
        raise SystemExit(f"{arg}: no report.json there (run `allmrec evaluate` first)")
    return label or None, json.loads(p.read_text())


def cell(m: dict | None, key: str = "hit@1", se: bool = False) -> str:
    if not m or not m.get("n") or key not in m:
        return ""
    v = m[key]
    if not se:
        return f"{v:.4f}"
    return f"{v:.4f} ± {proportion_se(v, m['n']):.3f}"


def vs_cf(r: dict, name: str) -> str:
    """Overall Hit@1 minus the report's CF model's, ± the paired standard error ("" where not recorded)."""
    p = r.get("paired", {})
    m = p.get("hit@1", {}).get(name, {}).get("overall")
    return "" if not m else f"{m['diff']:+.4f} ± {m['se']:.3f}"


def table(reports: list[tuple[str | None, dict]], models: list[str] | None = None, mixed: bool = False,
          metric: str = "hit@1") -> str:
    if not reports:
        raise ValueError("no reports given")
    first = reports[0][1]["meta"]
    for label, r in reports[1:]:
        diff = [k for k in SAME if r["meta"].get(k) != first.get(k)]
        if diff and not mixed:
            raise ValueError(f"report {label or '?'} differs from the first in {', '.join(diff)}: not the same "
                             f"candidate sets (pass --mixed to tabulate anyway)")
    lines = [f"| model | overall {metric} | warm items | cold items | cold users | NDCG@10 | MRR | vs CF, paired | n (overall/warm/cold/cold users) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in reports:
        for name, by_scenario in r["metrics"].items():
            if models and name not in models:
                continue
            o = by_scenario.get("overall")
            row = [f"{name} ({label})" if label else name, cell(o, metric, se=True),
                   *(cell(by_scenario.get(s), metric, se=True) for s in SCENARIOS[1:]), cell(o, "ndcg@10"), cell(o, "mrr"),
                   vs_cf(r, name) if metric == "hit@1" else "", "/".join(str(by_scenario.get(s, {}).get("n", 0)) for s in SCENARIOS)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", help="[label=]path to a report folder or report.json")
    ap.add_argument("--models", nargs="*", help="only these models (e.g. sasrec allmrec)")
    ap.add_argument("--mixed", action="store_true", help="allow reports on different candidate sets")
    ap.add_argument("--metric", default="hit@1", help="hit@1 (ranking, default) or gen_hit@1 (the paper's generation)")
    a = ap.parse_args(argv)
    try:
        print(table([load(x) for x in a.reports], a.models, a.mixed, a.metric))
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
