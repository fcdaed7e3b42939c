"""`allmrec evaluate`: the paper's protocol for every model in one harness, as Ray Data batch inference.

Every model scores the same seeded candidate sets written by `prepare` (test target + 19 negatives,
shown to the LLM in a seeded shuffled order). Scenarios: overall, cold / warm test items, cold users.
LLM variants run in a pool of actors that load their models once (`eval.num_actors`, GPU actors on a
cluster); CF baselines are scored directly. Outputs in `<run>/report/`: per-user results (parquet),
report.json, report.md and PNG bar charts.

Cross-domain (`eval.source_run`): another run's trained models score this run's data (report-from-<source>/).

Modes: `rank` scores each candidate title by the LLM's likelihood after the prompt (prompt computed once,
its KV cache reused for all candidates: Hit@K/NDCG@K/MRR); `generate` is the paper's protocol — greedy
decoding after "The recommendation is", a hit when the generation equals the target's title after
normalization (outputs that name no candidate are counted).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from allmrec.artifacts import JOINT_EMB, LLM_VARIANTS, RESOLVED_CONFIG, RunFolder, user_reps
from allmrec.cf.trainer import evaluate_candidates, popularity_scores
from allmrec.config import Config, config_from_dict, load_config
from allmrec.data.load import Prepared
from allmrec.io import atomic_dir, fingerprint, is_complete, read_manifest
from allmrec.metrics import paired_difference, proportion_se, ranks_from_scores, summarize
from pipelines.common import actor_pool, clear_leftovers, init_ray, up_to_date
from pipelines.fingerprints import CF_VARIANTS, variant_inputs  # CF_VARIANTS: every registered CF model, "cf", most_popular

log = logging.getLogger("allmrec.evaluate")


def seeded_subset(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """At most `n` rows of `df`, a seeded choice in the original order (the users evaluate scores)."""
    if n is None or n >= len(df):
        return df
    idx = np.sort(np.random.default_rng(seed).choice(len(df), n, replace=False))
    return df.iloc[idx].reset_index(drop=True)


def eval_rows(cfg: Config, prep: Prepared) -> pd.DataFrame:
    """All (scenario, user) rows to score; cold/warm item scenarios are read off 'overall' by target group."""
    test = seeded_subset(prep.candidates("test"), cfg.eval.max_users, cfg.seed)
    parts = [test.assign(scenario="overall")]
    n_cold = cfg.eval.max_users if cfg.eval.max_cold_users is None else cfg.eval.max_cold_users
    cold = seeded_subset(prep.candidates("cold_users"), n_cold, cfg.seed)
    if n_cold != 0 and len(cold):
        parts.append(cold.assign(scenario="cold_users"))
    rows = pd.concat(parts, ignore_index=True)
    rows["group"] = prep.items.set_index("item")["group"].reindex(rows["target"]).to_numpy()
    return rows[["scenario", "user", "history", "target", "negatives", "group"]]


class LLMScorer:
    """Ray Data actor: one LLM variant, loaded once; scores a batch of evaluation rows.

    Cross-domain (`item_table` set): the models come from `cfg.eval.source_run`, whose CF model knows none of
    these items, so every user is given the CF model's representation of an empty history."""

    def __init__(self, cfg_dict: dict, variant: str, threads: int, use_gpu: bool, item_table: str | None = None):
        torch.set_num_threads(threads)
        self.cfg, self.variant = config_from_dict(cfg_dict), variant
        self.cross = item_table is not None
        self.rec, self.cf, _ = RunFolder(self.cfg).load_recommender(
            variant, device="cuda" if use_gpu else "cpu",
            source=self.cfg.eval.source_run if self.cross else None, item_table=item_table and Path(item_table))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from allmrec.recommender import Example, candidate_order

        cfg = self.cfg
        known = (batch["scenario"] != "cold_users").to_numpy()
        hists = [np.asarray(h) for h in batch["history"]]
        reps = None
        if self.rec.use_user_token and self.cross:
            reps = user_reps(self.cf, [np.zeros(0, dtype=np.int64)] * len(batch), None)
        elif self.rec.needs_user_rep:
            reps = np.zeros((len(batch), self.cf.hidden), dtype=np.float32)
            for mask, users in ((known, batch["user"].to_numpy()), (~known, None)):
                if mask.any():
                    reps[mask] = user_reps(self.cf, [h for h, m in zip(hists, mask) if m],
                                           None if users is None else users[mask])
        exs, cands = [], []
        for j, (u, t, negs) in enumerate(zip(batch["user"], batch["target"], batch["negatives"])):
            c = candidate_order([int(t), *map(int, negs)], cfg.seed, user=u)  # same order for every model
            cands.append(c)
            exs.append(Example(None if reps is None else reps[j], hists[j], c, int(t)))
        out = batch[["scenario", "user", "target", "group"]].copy()
        out["variant"] = self.variant
        t0 = time.perf_counter()
        if cfg.eval.mode in ("rank", "both"):
            scores = self.rec.rank(exs, length_norm=cfg.eval.length_norm)
            pos = [c.index(int(t)) for c, t in zip(cands, batch["target"])]
            # put the positive in column 0 for the shared rank function (ties count against it)
            ordered = np.stack([np.r_[s[p], np.delete(s, p)] for s, p in zip(scores, pos)])
            out["rank"] = ranks_from_scores(ordered)
        out["rank_s"] = (time.perf_counter() - t0) / len(batch)
        if cfg.eval.mode in ("generate", "both"):
            t0 = time.perf_counter()
            gens = self.rec.generate(exs, max_new_tokens=cfg.eval.max_new_tokens)
            out["generated"] = [g for g, _ in gens]
            out["gen_hit"] = [m is not None and c[m] == int(t) for (g, m), c, t in zip(gens, cands, batch["target"])]
            out["gen_named"] = [m is not None for _, m in gens]
            out["generate_s"] = (time.perf_counter() - t0) / len(batch)
        return out


def _cf_results(cfg: Config, prep: Prepared, rows: pd.DataFrame, variant: str) -> pd.DataFrame:
    cands = np.array([[t, *n] for t, n in zip(rows["target"], rows["negatives"])], dtype=np.int64)
    if variant == "most_popular":
        ranks = ranks_from_scores(popularity_scores([s[:-2] for s in prep.sequences["seq"]], prep.n_items)[cands])
    else:
        model = RunFolder(cfg).load_cf(None if variant == "cf" else variant)
        known = (rows["scenario"] != "cold_users").to_numpy()
        ranks = np.empty(len(rows), dtype=np.int64)
        hists = [np.asarray(h) for h in rows["history"]]
        for mask, users in ((known, rows["user"].to_numpy()), (~known, None)):
            if mask.any():
                ranks[mask] = evaluate_candidates(model, [h for h, m in zip(hists, mask) if m],
                                                  None if users is None else users[mask], cands[mask])
    out = rows[["scenario", "user", "target", "group"]].copy()
    out["variant"] = variant
    out["rank"] = ranks
    return out


def source_run(cfg: Config) -> Path | None:
    """The trained run of the cross-domain scenario (None: the usual in-domain evaluation)."""
    if cfg.eval.source_run is None:
        return None
    models = RunFolder(cfg, cfg.eval.source_run)
    src = models.root
    missing = [name for name, ok in (("cf", models.cf_found() is not None),
                                     ("stage1", read_manifest(models.stage1) is not None)) if not ok]
    if missing:
        raise FileNotFoundError(f"eval.source_run={src}: no trained {' and '.join(missing)} there "
                                f"(cf.model={cfg.cf.model}; run the main job on the source dataset first)")
    if src == RunFolder(cfg).root:
        raise ValueError("eval.source_run is this run itself: cross-domain needs another run's models")
    return src


def cross_item_table(cfg: Config, src: Path) -> Path:
    """This run's items embedded by the source run's Stage-1 (fine-tuned SBERT -> f_T^enc), cached in
    <run>/cross/<source>-<fingerprint>/joint_emb.parquet. e_i = q_i: the CF model has no embedding for them."""
    from pipelines.joint import item_table
    rf = RunFolder(cfg)
    models = RunFolder(load_config(RunFolder(cfg, src).stage1 / RESOLVED_CONFIG, [f"run_dir={src}"]))
    fp = fingerprint({"source": read_manifest(models.stage1)["fingerprint"],
                      "data": read_manifest(rf.data)["fingerprint"]})
    out = rf.cross(f"{src.name}-{fp}")
    clear_leftovers(out)
    if not is_complete(out, fp):
        init_ray(cfg)
        with atomic_dir(out) as tmp:
            item_table(models.cfg, models.cf_files(), models.stage1_export(),
                       rf.prepared(), text_only=True).write_parquet(str(tmp / JOINT_EMB))
            (tmp / "manifest.json").write_text(json.dumps({"fingerprint": fp, "job": "cross_item_table",
                                                           "source": str(src)}, indent=2))
    return out / JOINT_EMB


def variants_of(cfg: Config) -> list[str]:
    """`eval.variants` with "cf" named as the configured CF model (cf.model), duplicates dropped."""
    return list(dict.fromkeys(cfg.cf.model if v == "cf" else v for v in cfg.eval.variants))


def plan(cfg: Config) -> tuple[Path, str, dict]:
    """(output folder, fingerprint, inputs per variant) of an evaluation of `cfg`."""
    rf = RunFolder(cfg)
    m = rf.require(rf.data, "allmrec prepare")
    src = source_run(cfg)
    e = cfg.to_dict()["eval"] | {"num_actors": None, "use_gpu": None}
    if e.pop("max_cold_users") is not None:  # (left out when unset: earlier reports stay up to date)
        e["max_cold_users"] = cfg.eval.max_cold_users
    inputs = {v: variant_inputs(cfg, v, src) for v in variants_of(cfg)}
    src_fp = None if src is None else read_manifest(RunFolder(cfg, src).stage1)["fingerprint"]
    fp = fingerprint({"data": m["fingerprint"], "seed": cfg.seed, "eval": e, "n_negatives": cfg.data.n_negatives,
                      "source": src_fp, "variants": inputs})
    return rf.report(src), fp, inputs


def evaluate(cfg: Config, force: bool = False) -> Path:
    """Score every `eval.variants` model (skipped when the data, the models it reads and the settings are
    unchanged; `force` redoes)."""
    for variant in variants_of(cfg):  # a cross-domain mistake is named before anything is loaded
        if cfg.eval.source_run is not None and variant in CF_VARIANTS - {"most_popular"}:
            raise ValueError(f"cross-domain evaluation: {variant!r} cannot score another domain's items (a CF "
                             "model's item ids do not transfer); use most_popular and the LLM variants")
    out_dir, fp, inputs = plan(cfg)
    if up_to_date("evaluate", out_dir, fp, force):
        return out_dir
    rf = RunFolder(cfg)
    prep = rf.prepared()
    rows = eval_rows(cfg, prep)
    src = source_run(cfg)
    table = None if src is None else str(cross_item_table(cfg, src))
    ray = init_ray(cfg)
    cores = os.cpu_count() or 1
    e = cfg.eval
    results, timings = [], {}
    for variant in variants_of(cfg):
        t0 = time.perf_counter()
        if variant in CF_VARIANTS:
            results.append(_cf_results(cfg, prep, rows, variant))
        elif variant in LLM_VARIANTS:
            n_act = max(1, e.num_actors)
            ds = ray.data.from_pandas(rows).repartition(max(n_act * 2, len(rows) // (4 * e.batch_size) + 1))
            ds = ds.map_batches(LLMScorer, batch_size=e.batch_size, batch_format="pandas",
                                compute=actor_pool(n_act),
                                fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "variant": variant,
                                                       "threads": max(1, cores // n_act), "use_gpu": e.use_gpu,
                                                       "item_table": table},
                                num_gpus=1 if e.use_gpu else 0, num_cpus=0 if e.use_gpu else 1)
            results.append(ds.to_pandas())
        else:
            raise ValueError(f"unknown evaluation variant {variant!r}; known: "
                             f"{sorted(CF_VARIANTS | set(LLM_VARIANTS))}")
        timings[variant] = round(time.perf_counter() - t0, 1)
        log.info("evaluate: %s scored %d rows in %.1f s", variant, len(rows), timings[variant])
    res = pd.concat(results, ignore_index=True)
    report = summarize_results(res)
    paired = paired_vs(res, cfg.cf.model)
    with atomic_dir(out_dir) as tmp:
        res.to_parquet(tmp / "results.parquet")
        meta = {"seed": cfg.seed, "data": read_manifest(rf.data)["fingerprint"],
                "source_run": None if src is None else str(src),
                "mode": e.mode, "variants": variants_of(cfg), "users_overall": int((rows.scenario == "overall").sum()),
                "users_cold": int((rows.scenario == "cold_users").sum()), "seconds": timings,
                "fingerprint": fp}
        (tmp / "report.json").write_text(json.dumps({"meta": meta, "metrics": report,
                                                     "paired": {"base": cfg.cf.model, "hit@1": paired}}, indent=2))
        plots = {"Hit@1 per scenario (bars: ± 1 standard error)": "hit1.png"}
        cf_dir = rf.cf_found()
        if cf_dir is not None and (cf_dir / "metrics.json").exists() and plot_cf_curve(
                json.loads((cf_dir / "metrics.json").read_text()).get("history", []), tmp / "cf_valid.png",
                f"train-cf ({cfg.cf.model}): validation curve"):
            plots[f"CF model ({cfg.cf.model}) validation curve"] = "cf_valid.png"
        plots |= loss_plot_links(rf.root, out_dir)
        (tmp / "report.md").write_text(render_markdown(report, meta, cfg, plots, paired))
        plot_report(report, tmp)
        cfg.dump(tmp / RESOLVED_CONFIG)
        (tmp / "manifest.json").write_text(json.dumps(meta | {"job": "evaluate", "inputs": inputs}, indent=2))
    track_report(cfg, report, out_dir)
    return out_dir


def track_report(cfg: Config, report: dict, out_dir: Path) -> None:
    """MLflow (when `tracking.enabled`): the metrics as `<variant>.<scenario>.<metric>` plus each Hit@1's
    standard error, the report's files and the run folder's loss plots as artifacts."""
    from pipelines.tracking import Tracker, flatten, settings
    tracker = Tracker(settings(cfg), "evaluate", cfg.to_dict())
    if not tracker.active:
        return
    metrics = flatten(report)
    metrics |= {f"{v}.{s}.hit@1_se": hit1_se(m) for v, r in report.items() for s, m in r.items()
                if hit1_se(m) is not None}
    tracker.log_metrics(metrics)
    tracker.log_artifacts(sorted(p for p in out_dir.iterdir() if p.suffix in (".md", ".json", ".png", ".yaml")),
                          "report")
    root = RunFolder(cfg).root
    for p in sorted(root.glob("*/loss.png")) + sorted(root.glob("*/*/loss.png")):
        tracker.log_artifacts([p], "loss_plots/" + p.relative_to(root).parent.as_posix())
    tracker.end()


def scenario_masks(rows: pd.DataFrame) -> dict[str, pd.Series]:
    """The report's scenarios as row masks: every test user (overall), split by the target's group (warm /
    cold items), and the cold users."""
    overall = rows.scenario == "overall"
    return {"overall": overall, "warm_items": overall & (rows.group == "warm"),
            "cold_items": overall & (rows.group == "cold"), "cold_users": rows.scenario == "cold_users"}


def summarize_results(res: pd.DataFrame) -> dict:
    """metrics[variant][scenario] = {hit@1, ..., n} (+ generation hit@1 and the no-candidate rate)."""
    out: dict = {}
    scen = scenario_masks(res)
    for v, g in res.groupby("variant", sort=False):
        out[v] = {}
        for name, mask in scen.items():
            part = g[mask.loc[g.index]]
            if not len(part):
                continue
            m = summarize(part["rank"].to_numpy()) if "rank" in part and part["rank"].notna().all() else {"n": len(part)}
            if "gen_hit" in part and part["gen_hit"].notna().all():
                m["gen_hit@1"] = float(part["gen_hit"].mean())
                m["gen_no_candidate"] = float(1 - part["gen_named"].mean())
            out[v][name] = m
    return out


def paired_vs(res: pd.DataFrame, base: str) -> dict:
    """paired[variant][scenario] = Hit@1 of the variant minus the `base` model's on the same test cases, with
    the paired standard error (allmrec.metrics.paired_difference); {} when `base` was not scored."""
    if "rank" not in res or base not in set(res.variant):
        return {}
    ranks = res.pivot(index=["scenario", "user", "target", "group"], columns="variant", values="rank")
    masks = {k: m.to_numpy() for k, m in scenario_masks(ranks.index.to_frame(index=False)).items()
             if k != "warm_items" and m.any()}
    base_hit = ranks[base].to_numpy() == 0
    return {v: {k: paired_difference(ranks[v].to_numpy()[m] == 0, base_hit[m]) for k, m in masks.items()}
            for v in res.variant.unique() if v != base and ranks[v].notna().all()}


def hit1_se(m: dict) -> float | None:
    """Standard error of a scenario's Hit@1, a proportion over its n users: sqrt(p (1 - p) / n)."""
    p, n = m.get("hit@1"), m.get("n")
    return None if p is None or not n else proportion_se(p, n)


def _hit1_cell(m: dict | None) -> str:
    if not m or "hit@1" not in m:
        return "-"
    se = hit1_se(m)
    return f"{m['hit@1']:.4f} ± {se:.4f}" if se is not None else f"{m['hit@1']:.4f}"


def settings_block(cfg: Config) -> list[str]:
    """The settings a reader needs to judge the numbers: the models and Stage-2's training budget."""
    s2 = cfg.stage2
    layout = ", ".join(f"{k}={getattr(s2, k)}" for k in s2.LAYOUT_KEYS)
    return ["## Settings", "",
            f"- LLM (frozen): `{s2.llm}` (weights dtype `{s2.llm_dtype}`)",
            f"- SBERT: `{cfg.encode.model}`",
            f"- CF model: `{cfg.cf.model}` (hidden {cfg.cf.hidden}, "
            f"up to {cfg.cf.epochs} epochs, patience {cfg.cf.patience})",
            f"- Stage-1: {cfg.stage1.epochs} epochs, users "
            f"{'all' if cfg.stage1.max_users is None else cfg.stage1.max_users}",
            f"- Stage-2 budget: users {'all' if s2.max_users is None else s2.max_users}, {s2.epochs} epochs, "
            f"examples_per_user {s2.examples_per_user}"
            f"{' from the validation item (heldout_target)' if s2.heldout_target else ''}, "
            f"batch {s2.batch_size}, lr {s2.lr:g}, item tokens "
            f"`{s2.item_tokens}`",
            f"- Prompt layout: {layout}, history_len={s2.history_len}, max_title_tokens={s2.max_title_tokens}, "
            f"use_user_token={s2.use_user_token}",
            *(["- The CF order for LLM-Only and TALLRec too (stage2.order_baselines: they see the CF model's "
               "ranking)"] if s2.order_baselines else []),
            *([f"- Few-shot: {cfg.fewshot} training users"] if cfg.fewshot else []),
            ""]


def render_markdown(report: dict, meta: dict, cfg: Config, plots: dict[str, str] | None = None,
                    paired: dict | None = None) -> str:
    """report.md; `plots`: caption -> path relative to the report folder (PNGs are shown, the rest linked);
    `paired`: paired_vs against the CF model."""
    scen = ["overall", "warm_items", "cold_items", "cold_users"]
    lines = [f"# Evaluation report: {cfg.name}", "",
             f"Protocol: 1 positive + {cfg.data.n_negatives} seeded negatives per user (seed {cfg.seed}), "
             f"mode `{meta['mode']}`, {meta['users_overall']} test users, {meta['users_cold']} cold users. "
             "Ranking = LLM log-likelihood of each candidate title; gen = the paper's greedy generation with "
             "exact title match.", "",
             *([f"Cross-domain: the models were trained in `{meta['source_run']}`; this dataset's items enter as "
                "q_i (source SBERT -> f_T^enc), every user as the source CF model's empty-history "
                "representation.", ""] if meta.get("source_run") else []),
             *settings_block(cfg),
             "## Hit@1", "",
             "Hit@1 ± its standard error sqrt(p(1-p)/n) over the scenario's n users; two models whose "
             "difference is within about two standard errors are not told apart by this test set.", "",
             "| model | " + " | ".join(scen) + " |", "|---|" + "---|" * len(scen)]
    for v, r in report.items():
        lines.append(f"| {v} | " + " | ".join(_hit1_cell(r.get(s)) for s in scen) + " |")
    lines += ["", "## All metrics (overall)", "", "| model | hit@1 | hit@1 SE | hit@3 | hit@5 | hit@10 | ndcg@5 | ndcg@10 | mrr | gen hit@1 | gen names no candidate | n |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in report.items():
        o = r.get("overall", {})
        f = lambda k: f"{o[k]:.4f}" if k in o else "-"  # noqa: E731
        se = hit1_se(o)
        lines.append(f"| {v} | {f('hit@1')} | {'-' if se is None else f'{se:.4f}'} | "
                     + " | ".join(f(k) for k in ("hit@3", "hit@5", "hit@10", "ndcg@5", "ndcg@10",
                                                 "mrr", "gen_hit@1", "gen_no_candidate")) + f" | {o.get('n', '-')} |")
    if paired:
        pscen = ["overall", "cold_items", "cold_users"]
        lines += ["", f"## Against the CF model ({cfg.cf.model}), paired", "",
                  f"Hit@1 minus {cfg.cf.model}'s on the same test cases ± the paired standard error "
                  "sd(difference)/sqrt(n); (w/l): cases only this model / only the CF model ranks first. A "
                  "difference beyond about two paired standard errors is one this test set tells apart.", "",
                  "| model | " + " | ".join(pscen) + " |", "|---|" + "---|" * len(pscen)]
        for v, r in paired.items():
            lines.append(f"| {v} | " + " | ".join(
                "-" if s not in r else f"{r[s]['diff']:+.4f} ± {r[s]['se']:.4f} ({r[s]['wins']}/{r[s]['losses']})"
                for s in pscen) + " |")
    lines += ["", f"Seconds per variant: {meta['seconds']}", ""]
    plots = plots if plots is not None else {"Hit@1 per scenario (bars: ± 1 standard error)": "hit1.png"}
    if plots:
        lines += ["## Plots", ""]
        for caption, path in plots.items():
            lines += [f"### {caption}", "", f"![{caption}]({path})" if path.endswith(".png") else f"[{path}]({path})", ""]
    return "\n".join(lines)


def loss_plot_links(root: Path, report_dir: Path) -> dict[str, str]:
    """The training jobs' loss plots in a run folder, as links relative to the report folder."""
    out = {}
    for p in sorted(root.glob("*/loss.png")) + sorted(root.glob("*/*/loss.png")):
        rel = p.relative_to(root).parent.as_posix()
        out[f"Training loss: {rel}"] = os.path.relpath(p, report_dir)
    return out


def plot_cf_curve(history: list[dict], path: Path, title: str) -> bool:
    """train-cf's curve: the training loss per epoch and the validation metrics where they were measured
    (every cf.eval_every epochs). False (nothing written) without a history."""
    if not history:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h.get("loss", np.nan) for h in history], color="tab:gray", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    for k, c in (("valid_ndcg@10", "tab:blue"), ("valid_hit@1", "tab:red"), ("valid_hit@10", "tab:green")):
        pts = [(h["epoch"], h[k]) for h in history if k in h]
        if pts:
            x, y = zip(*pts)
            ax2.plot(x, y, marker="o", ms=3, color=c, label=k)
    ax2.set_ylabel("validation metric")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_report(report: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scen = [s for s in ("overall", "warm_items", "cold_items", "cold_users") if any(s in r for r in report.values())]
    variants = list(report)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(scen), 3.8))
    w = 0.8 / max(len(variants), 1)
    for k, v in enumerate(variants):
        ms = [report[v].get(s, {}) for s in scen]
        vals = [m.get("hit@1", np.nan) for m in ms]
        errs = [np.nan if hit1_se(m) is None else hit1_se(m) for m in ms]
        ax.bar(np.arange(len(scen)) + k * w - 0.4 + w / 2, vals, w, yerr=errs, capsize=3, label=v)
    ax.set_xticks(np.arange(len(scen)))
    ax.set_xticklabels(scen)
    ax.set_ylabel("Hit@1 (1 + 19 candidates)")
    ax.axhline(0.05, color="grey", lw=0.8, ls=":")  # random guessing
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("Hit@1 per scenario and model (± 1 standard error)")
    fig.tight_layout()
    fig.savefig(out / "hit1.png", dpi=110)
    plt.close(fig)


def summary(out_dir: Path) -> str:
    return (out_dir / "report.md").read_text() + f"\nreport: {out_dir / 'report.md'}"
