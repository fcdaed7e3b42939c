"""Can the frozen LLM pick a candidate by matching the token that ends the prompt? (No training.)

    .venv/bin/python scripts/induction_probe.py --data runs/a-full/data --prompts 40

The question behind `stage2.user_token_position=answer`: if the prompt lists candidates as "<m_k> title_k"
(a marker token before each title, as "[emb]title" puts each item's soft token before its title) and
ends with "The recommendation is<m_t>", does the frozen LLM continue with title_t's first token? Real
single-token words stand in for the soft tokens. If it does, copying the title after the marker that
matches the last token is a circuit the LLM already has (an induction head), and Stage-2 only has to
make the user's soft token resemble the chosen candidate's. Prints Hit@1 (first title token among the
20 candidates) with and without the marker at the end; chance is 1/20.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allmrec.llm.loading import load_llm, resolve_dtype  # noqa: E402

WORDS = [" red", " blue", " green", " black", " white", " gold", " silver", " pink", " brown", " gray",
         " one", " two", " three", " four", " five", " six", " seven", " eight", " nine", " ten",
         " cat", " dog", " bird", " fish", " tree", " sun", " moon", " star", " car", " book"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a prepared data folder (its items.parquet gives the titles)")
    ap.add_argument("--llm", default="packaged:SmolLM2-135M-Instruct")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--max-title-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    llm, tok = load_llm(a.llm, dtype=resolve_dtype("auto", "cpu"))
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    titles = [t for t in pd.read_parquet(Path(a.data) / "items.parquet")["title"].tolist() if t]
    markers = [ids for ids in map(enc, WORDS) if len(ids) == 1][: a.candidates]
    if len(markers) < a.candidates:
        raise SystemExit(f"only {len(markers)} single-token marker words for this tokenizer")
    rng, hits = random.Random(a.seed), {"marker at the end": 0, "no marker": 0}
    for _ in range(a.prompts):
        cands, target = rng.sample(titles, a.candidates), rng.randrange(a.candidates)
        ids, firsts = enc("This user has watched some movies. Recommend a movie from the following set of "
                          "movie titles,"), []
        for k, t in enumerate(cands):
            title = enc(" " + t)[: a.max_title_tokens]
            ids += (enc(",") if k else []) + markers[k] + title
            firsts.append(title[0])
        ids += enc(". The recommendation is")
        for mode in hits:
            p = ids + (markers[target] if mode == "marker at the end" else [])
            with torch.no_grad():
                logits = llm(input_ids=torch.tensor([p])).logits[0, -1].float()
            hits[mode] += int(max(range(a.candidates), key=lambda k: logits[firsts[k]].item()) == target)
    out = {k: v / a.prompts for k, v in hits.items()}
    print(f"{a.llm}, {a.prompts} prompts of {a.candidates} candidates (chance {1 / a.candidates:.3f}): "
          + ", ".join(f"Hit@1 {k} {v:.3f}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
