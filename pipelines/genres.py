"""`allmrec genres`: favourite-genre generation (paper section 5.4.4), scored.

For a seeded subset of test users (the same users `evaluate` scores for the same count), each LLM
variant is asked, after the recommender's own user and history prompt, which genres the user likes
(`allmrec.llm.genres`). The answer is parsed into the dataset's genres and compared with the user's
most frequent training genres. A fixed answer, the catalogue's most watched genres, is scored too: on
a set where almost everyone's top genres include Drama and Comedy it is the bar to clear.

Everything here describes the training part of each sequence (seq[:-2]): the prompt shows its last
`stage2.history_len` items, x_u is computed from it, and the top genres are counted over all of it.
One process, no Ray: a few hundred short generations. Output: <run>/genres/ with results.parquet,
report.json, report.md.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from allmrec.artifacts import LLM_VARIANTS, RESOLVED_CONFIG, RunFolder, user_reps
from allmrec.config import Config
from allmrec.data.load import Prepared
from allmrec.io import atomic_dir, fingerprint
from allmrec.llm.genres import (genre_counts, genre_question, genre_vocab, item_genres, parse_genres,
                                score_user, summarize_scores, top_genres)
from pipelines.common import up_to_date
from pipelines.fingerprints import variant_inputs

log = logging.getLogger("allmrec.genres")

DEFAULT_VARIANTS = ("allmrec", "llm_only")
BASELINE = "most_popular"  # the catalogue's top genres for everyone (no LLM)
N_EXAMPLES = 5


def genre_users(prep: Prepared, max_users: int | None, seed: int) -> np.ndarray:
    """Test users, a seeded subset of `max_users` (the rows `evaluate` draws for eval.max_users)."""
    users = prep.candidates("test")["user"].to_numpy()
    if max_users is not None and max_users < len(users):
        users = users[np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))]
    return users.astype(np.int64)


def _ask_variant(cfg: Config, variant: str, users: np.ndarray, hists: list[np.ndarray], question: str,
                 max_new_tokens: int, batch_size: int, device: str) -> tuple[list[str], str]:
    """The variant's answers, and the LLM's weight dtype."""
    from allmrec.recommender import Example

    rec, cf, _ = RunFolder(cfg).load_recommender(variant, device=device)
    texts: list[str] = []
    with tqdm(total=len(users), desc=f"genres {variant}", unit="user") as bar:
        for s in range(0, len(users), batch_size):
            h, u = hists[s:s + batch_size], users[s:s + batch_size]
            # x_u on the CPU, where load_recommender keeps the CF model; batch() moves it to the LLM's device
            reps = user_reps(cf, h, u) if rec.use_user_token else [None] * len(h)
            exs = [Example(r, hh, []) for r, hh in zip(reps, h)]
            texts += rec.ask(exs, question, max_new_tokens=max_new_tokens)
            bar.update(len(h))
    return texts, str(next(rec.llm.parameters()).dtype).removeprefix("torch.")


def genres(cfg: Config, variants: Sequence[str] = DEFAULT_VARIANTS, max_users: int | None = 100,
           max_new_tokens: int = 24, top_k: int = 3, batch_size: int | None = None, force: bool = False) -> Path:
    """Ask each LLM variant for the users' favourite genres and score the answers; skipped when the data,
    the models the variants read and the settings are unchanged (`force` redoes)."""
    variants = list(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in LLM_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"genres: unknown or no LLM variants {unknown or variants}; known: {sorted(LLM_VARIANTS)}")
    if max_new_tokens < 1 or top_k < 1:
        raise ValueError(f"genres: max_new_tokens and top_k must be >= 1, got {max_new_tokens}, {top_k}")
    rf = RunFolder(cfg)
    data_manifest = rf.require(rf.data, "allmrec prepare")
    prep = rf.prepared()
    vocab = genre_vocab(prep.items)  # ValueError for a dataset without categories
    genres_of = item_genres(prep.items)
    question = genre_question(cfg.data.domain)

    users = genre_users(prep, max_users, cfg.seed)
    seqs = prep.sequences.set_index("user")["seq"]
    hists = [np.asarray(seqs.loc[u][:-2], dtype=np.int64) for u in users]
    tops = [top_genres(genre_counts(h, genres_of), top_k) for h in hists]
    all_train = (i for s in prep.sequences["seq"] for i in s[:-2])
    popular = top_genres(genre_counts(all_train, genres_of), top_k)[:top_k]

    device = "cuda" if cfg.eval.use_gpu else "cpu"
    bs = batch_size or cfg.eval.batch_size
    out_dir = rf.genres
    inputs = {v: variant_inputs(cfg, v) for v in variants}
    fp = fingerprint({"data": data_manifest["fingerprint"], "seed": cfg.seed, "variants": variants,
                      "users": users.tolist(), "top_k": top_k, "max_new_tokens": max_new_tokens, "question": question,
                      "batch_size": bs, "inputs": inputs})
    if up_to_date("genres", out_dir, fp, force):
        return out_dir
    answers, seconds, dtype = {}, {}, ""
    for v in variants:
        t0 = time.perf_counter()
        answers[v], dtype = _ask_variant(cfg, v, users, hists, question, max_new_tokens, bs, device)
        seconds[v] = round(time.perf_counter() - t0, 1)
        log.info("genres: %s answered for %d users in %.1f s", v, len(users), seconds[v])
    answers[BASELINE] = [", ".join(popular)] * len(users)

    rows = []
    for v, texts in answers.items():
        for u, text, top in zip(users, texts, tops):
            named = parse_genres(text, vocab)
            rows.append({"user": int(u), "variant": v, "generated": text, "genres": named, "top_genres": top,
                         **score_user(named, top, top_k)})
    res = pd.DataFrame(rows)
    metrics = {v: summarize_scores(g) for v, g in res.groupby("variant", sort=False)}
    meta = {"seed": cfg.seed, "data": data_manifest.get("fingerprint"), "variants": variants, "users": len(users),
            "top_k": top_k, "max_new_tokens": max_new_tokens, "question": question, "llm": cfg.stage2.llm,
            "history_len": cfg.stage2.history_len, "popular_genres": popular, "vocab": vocab, "device": device,
            "llm_dtype": dtype,
            "seconds": seconds, "fingerprint": fp}
    with atomic_dir(out_dir) as tmp:
        res.to_parquet(tmp / "results.parquet")
        (tmp / "report.json").write_text(json.dumps({"meta": meta, "metrics": metrics}, indent=2))
        (tmp / "report.md").write_text(render_markdown(metrics, meta, res, cfg))
        cfg.dump(tmp / RESOLVED_CONFIG)
        (tmp / "manifest.json").write_text(json.dumps(meta | {"job": "genres", "inputs": inputs}, indent=2))
    return out_dir


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"  # NaN: nobody named a genre


def render_markdown(metrics: dict, meta: dict, res: pd.DataFrame, cfg: Config) -> str:
    k = meta["top_k"]
    lines = [f"# Favourite-genre generation: {cfg.name}", "",
             f"{meta['users']} seeded test users (seed {meta['seed']}), LLM `{meta['llm']}` ({meta['llm_dtype']}, {meta['device']}), greedy, at most "
             f"{meta['max_new_tokens']} new tokens. Prompt: the recommender's user + last {meta['history_len']} "
             f"training titles (with soft tokens where the variant has them), then \"{meta['question']}\".", "",
             f"Top genres: the user's {k} most frequent genres in the training history (genres as frequent as the "
             f"{_ordinal(k)} one included). precision = share of the named genres that are top genres, precision@{k} = the "
             f"same over the first {k} named (both over the users naming >= 1 genre); top1 hit = the first named genre is a top genre (all users; none named = miss); "
             f"`{BASELINE}` = everyone answered with the catalogue's most watched genres "
             f"({', '.join(meta['popular_genres'])}), no LLM.", "",
             f"| variant | precision | precision@{k} | top1 hit | names no genre | genres named (mean) | "
             "users naming a genre | n |", "|---|---|---|---|---|---|---|---|"]
    for v, m in metrics.items():
        lines.append(f"| {v} | {_fmt(m['precision'])} | {_fmt(m['precision@k'])} | {_fmt(m['top1_hit'])} | "
                     f"{_fmt(m['no_genre'])} | "
                     f"{m['n_genres']:.2f} | {m['n_named']} | {m['n']} |")
    lines += ["", f"Seconds per variant: {meta['seconds']}", "", "## Examples", ""]
    first = res["user"].drop_duplicates().head(N_EXAMPLES).tolist()
    for v in meta["variants"]:
        lines += [f"### {v}", "", "| user | top genres | generated | parsed |", "|---|---|---|---|"]
        part = res[(res["variant"] == v) & res["user"].isin(first)]
        for r in part.itertuples():
            gen = str(r.generated).replace("|", "\\|") or "(empty)"
            lines.append(f"| {r.user} | {', '.join(r.top_genres)} | {gen} | {', '.join(r.genres) or '-'} |")
        lines.append("")
    return "\n".join(lines)


def summary(out_dir: Path) -> str:
    return (out_dir / "report.md").read_text() + f"\nreport: {out_dir / 'report.md'}"
