"""Diagnose a trained Stage-2: does the LLM *choose* the CF model's candidate, or only *copy* titles?

    .venv/bin/python scripts/stage2_probe.py --config configs/ml100k.yaml run_dir=runs/a-full --users 100

On evaluation's seeded test users (same candidates, same shuffled order), for each LLM variant:
- hit@1 of the target under three candidate scorings: length-normalized log-likelihood (evaluation's
  default), raw sum, and the first title token alone (the only token where the 20 candidates compete;
  later tokens mostly copy the chosen title);
- the target's negative log-likelihood split into the first token and the rest (nats per token). A
  model that copies perfectly but chooses uniformly pays log(#distinct first tokens) on the first token
  and ~0 on the rest; only a first-token NLL below that shows the CF signal getting through.
With `--ablate user` (another user's representation) or `--ablate items` (the candidates' soft tokens
shuffled among the candidates), it shows which CF input the choice reads: an input the model ignores
costs nothing when destroyed. Put config overrides before `--variants`.
Which signal the choice follows: how often the variant's top candidate (length-normalized) is also the
most popular candidate (training counts) or the CF model's top candidate, and the mean per-user
Spearman correlation of its candidate scores with log popularity and with the CF scores.
With `--split train`: the same on Stage-2's own training examples (seeded trained users, the prompt,
candidates and order Stage-2 trained on): a Hit@1 far above the test users' is memorization.
Prints a markdown table; no files written.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allmrec.artifacts import RunFolder, load_recommender, user_reps  # noqa: E402
from allmrec.cf.trainer import popularity_scores, score_candidates  # noqa: E402
from allmrec.config import load_config  # noqa: E402
from allmrec.data.load import Prepared  # noqa: E402
from allmrec.llm.ranking import rank_candidates  # noqa: E402
from allmrec.recommender import Example, candidate_order  # noqa: E402


def hit1(scores: np.ndarray, pos: np.ndarray) -> float:
    """Hit@1 with ties counted against the target (as evaluation does)."""
    tgt = scores[np.arange(len(pos)), pos]
    return float(np.mean((scores >= tgt[:, None]).sum(1) == 1))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the rank correlation between a[r] and b[r] (ties broken by position)."""
    ra, rb = a.argsort(1).argsort(1).astype(float), b.argsort(1).argsort(1).astype(float)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return float(np.mean((ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))))


def follows(scores: np.ndarray, pop: np.ndarray, cf_scores: np.ndarray) -> dict:
    """How a scorer's choice relates to popularity and to the CF model (all arrays (users, candidates))."""
    top, r = scores.argmax(1), np.arange(len(scores))
    return {"agree_pop": float(np.mean(pop[r, top] == pop.max(1))), "agree_cf": float(np.mean(top == cf_scores.argmax(1))),
            "rho_pop": spearman(scores, pop), "rho_cf": spearman(scores, cf_scores)}


def ablate(b: dict, how: str, reps_of_others: list | None, n_hist: list[int]) -> dict:
    """Destroy one source of CF signal, keeping the text: `user` swaps in another user's representation,
    `items` permutes the candidates' soft tokens among the candidates of a prompt (titles stay)."""
    if how == "user" and "user_reps" in b:
        b["user_reps"] = torch.as_tensor(np.stack(reps_of_others), dtype=b["user_reps"].dtype)
    if how == "items" and "item_embs" in b:
        g = torch.Generator().manual_seed(0)
        for r, h in enumerate(n_hist):
            n_c = int(b["n_item_slots"][r]) - h
            b["item_embs"][r, h:h + n_c] = b["item_embs"][r, h:h + n_c][torch.randperm(n_c, generator=g)]
    return b


def probe(cfg, variant: str, rows, batch: int = 4, how: str = "none") -> dict:
    rec, cf, prep = load_recommender(cfg, variant)
    all_reps = (user_reps(cf, [np.asarray(h) for h in rows["history"]], rows["user"].to_numpy())
                if rec.use_user_token else [None] * len(rows))
    out = {"norm": [], "sum": [], "first": [], "pos": [], "nll_first": [], "nll_rest": [], "floor": [], "cands": []}
    for s in range(0, len(rows), batch):
        part = rows.iloc[s:s + batch]
        hists = [np.asarray(h) for h in part["history"]]
        reps = all_reps[s:s + batch]
        exs, cands = [], []
        for j, (u, t, negs) in enumerate(zip(part["user"], part["target"], part["negatives"])):
            c = (list(map(int, part["cands"].iloc[j])) if "cands" in part  # as Stage-2 trained on it
                 else candidate_order([int(t), *map(int, negs)], cfg.seed, user=u))
            cands.append(c)
            exs.append(Example(reps[j], hists[j], c, int(t)))
        b = rec.batch(exs, with_target=False)
        others = [all_reps[(s + j + 1) % len(rows)] for j in range(len(part))]  # the next user's
        n_hist = [min(len(h), rec.history_len) if rec.history_len else 0 for h in hists]
        b = ablate(b, how, others, n_hist)
        with torch.no_grad():
            emb = rec.embeds(b)
            ids = [[rec.target_ids(i) for i in c] for c in cands]
            raw = rank_candidates(rec.llm, emb, b["attention_mask"], ids, length_norm=False).float().numpy()
            first = rank_candidates(rec.llm, emb, b["attention_mask"], [[x[:1] for x in c] for c in ids],
                                    length_norm=False).float().numpy()
        lens = np.array([[len(x) for x in c] for c in ids], dtype=np.float64)
        pos = np.array([c.index(int(t)) for c, t in zip(cands, part["target"])])
        r = np.arange(len(pos))
        out["norm"].append(raw / lens)
        out["sum"].append(raw)
        out["first"].append(first)
        out["pos"].append(pos)
        out["cands"] += cands
        out["nll_first"] += list(-first[r, pos])
        out["nll_rest"] += list(-(raw[r, pos] - first[r, pos]) / np.maximum(lens[r, pos] - 1, 1))
        out["floor"] += [math.log(len({x[0] for x in c})) for c in ids]
    pos = np.concatenate(out["pos"])
    norm, cands = np.concatenate(out["norm"]), np.array(out["cands"], dtype=np.int64)
    pop = np.log1p(popularity_scores([q[:-2] for q in prep.sequences["seq"]], prep.n_items)[cands])
    cf_scores = score_candidates(cf, [np.asarray(h) for h in rows["history"]], rows["user"].to_numpy(), cands)
    return {**follows(norm, pop, cf_scores), "variant": variant, "n": len(pos),
            "cf": {**follows(cf_scores, pop, cf_scores), "hit1": hit1(cf_scores, pos)},  # the reference itself
            "hit1_norm": hit1(norm, pos), "hit1_sum": hit1(np.concatenate(out["sum"]), pos),
            "hit1_first": hit1(np.concatenate(out["first"]), pos),
            "nll_first": float(np.mean(out["nll_first"])), "floor_first": float(np.mean(out["floor"])),
            "nll_rest": float(np.mean(out["nll_rest"]))}


def train_rows(cfg, prep: Prepared, n: int):
    """`n` seeded users of Stage-2's training set, each as Stage-2 saw it (history, target, candidates)."""
    import pandas as pd
    import pyarrow.parquet as pq
    from pipelines.common import training_users
    from pipelines.rows import next_title_examples
    from allmrec.data import schema
    seqs = pq.read_table(RunFolder(cfg).data / schema.SEQUENCES)
    keep = training_users(cfg, prep, cfg.stage2.max_users)
    if keep is not None:
        seqs = seqs.filter(np.isin(seqs["user"].to_numpy(), sorted(keep)))
    ex = next_title_examples(seqs, prep.n_items, cfg.data.n_negatives, cfg.seed)
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(ex["user"]), min(n, len(ex["user"])), replace=False))
    return pd.DataFrame({"user": ex["user"][pick], "history": list(ex["hist"][pick]), "target": ex["target"][pick],
                         "negatives": [c[c != t] for c, t in zip(ex["cands"][pick], ex["target"][pick])],
                         "cands": list(ex["cands"][pick])})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/ml100k.yaml")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--variants", nargs="+", default=["llm_only", "allmrec"])
    ap.add_argument("--ablate", choices=["none", "user", "items"], default="none",
                    help="user: another user's representation; items: candidates' soft tokens permuted")
    ap.add_argument("--split", choices=["test", "train"], default="test",
                    help="train: Stage-2's own training examples (memorization check)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(a.config, [*a.overrides, f"eval.max_users={a.users}"])
    from pipelines.evaluate import eval_rows  # the same seeded users and candidates as `allmrec evaluate`
    prep = RunFolder(cfg).prepared()
    if a.split == "train":
        rows = train_rows(cfg, prep, a.users)
    else:
        rows = eval_rows(cfg, prep)
        rows = rows[rows.scenario == "overall"].reset_index(drop=True)
    print(f"run {cfg.run_dir}, {len(rows)} seeded {a.split} users, ablation {a.ablate}, chance hit@1 = 0.05\n")
    print("| variant | hit@1 norm | hit@1 sum | hit@1 first token | NLL first token | log(#distinct first tokens) "
          "| NLL per later token | n |\n|---|---|---|---|---|---|---|---|")
    results = []
    for v in a.variants:
        r = probe(cfg, v, rows, how=a.ablate)
        print(f"| {v} | {r['hit1_norm']:.4f} | {r['hit1_sum']:.4f} | {r['hit1_first']:.4f} | {r['nll_first']:.3f} "
              f"| {r['floor_first']:.3f} | {r['nll_rest']:.3f} | {r['n']} |", flush=True)
        results.append(r)
    print("\n| variant | top-1 = most popular's | top-1 = CF model's | Spearman with log popularity "
          "| Spearman with CF scores |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['agree_pop']:.2f} | {r['agree_cf']:.2f} | {r['rho_pop']:.3f} | {r['rho_cf']:.3f} |")
    if results:
        cf = results[0]["cf"]
        print(f"\n(the CF model on these users: hit@1 {cf['hit1']:.4f}; its top-1 is the most popular candidate "
              f"for {cf['agree_pop']:.2f} of them; its Spearman with log popularity is {cf['rho_pop']:.3f})")


if __name__ == "__main__":
    main()
