"""Favourite-genre generation: vocabulary, top genres, parsing, metrics, and the history-only prompt."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from allmrec.config import DomainConfig
from allmrec.llm.genres import (genre_counts, genre_question, genre_vocab, item_genres, parse_genres,
                                score_user, split_categories, summarize_scores, top_genres)
from allmrec.llm.prompt import IGNORE, PromptBuilder
from allmrec.llm.stage2 import Stage2Projector
from allmrec.recommender import Example, LLMRecommender

ML_VOCAB = ["Drama", "Comedy", "Action", "Thriller", "Romance", "Adventure", "Children's", "Sci-Fi", "Crime",
            "Horror", "War", "Mystery", "Musical", "Animation", "Documentary", "Western", "Fantasy", "Film-Noir"]
MOVIES = DomainConfig("watched", "movie", "movies")
ITEMS = pd.DataFrame({"item": [1, 2, 3, 4, 5],
                      "title": ["Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Alien (1979)", "Jaws (1975)"],
                      "categories": ["Animation | Children's | Comedy", "Action | Crime | Thriller",
                                     "Crime | Drama | Thriller", "Horror | Sci-Fi", "unknown"]})


def test_vocab_and_item_genres_from_categories():
    assert split_categories(" Drama |  Film-Noir | Drama | unknown") == ["Drama", "Film-Noir"]
    assert split_categories(None) == []
    assert genre_vocab(ITEMS) == ["Crime", "Thriller", "Action", "Animation", "Children's", "Comedy", "Drama",
                                  "Horror", "Sci-Fi"]  # by count, then name; "unknown" is no genre
    g = item_genres(ITEMS)
    assert g[1] == ["Animation", "Children's", "Comedy"] and g[5] == []


def test_a_dataset_without_categories_is_refused():
    with pytest.raises(ValueError, match="no 'categories'"):
        genre_vocab(ITEMS.drop(columns="categories"))
    with pytest.raises(ValueError, match="no categories"):
        genre_vocab(ITEMS.assign(categories=["", "", "unknown", "", ""]))


def test_top_genres_from_a_history_with_ties():
    g = item_genres(ITEMS)
    c = genre_counts([2, 3, 3, 4, 5], g)  # Crime 3, Thriller 3, Drama 2, Action 1, Horror 1, Sci-Fi 1
    assert c == Counter({"Crime": 3, "Thriller": 3, "Drama": 2, "Action": 1, "Horror": 1, "Sci-Fi": 1})
    assert top_genres(c, 1) == ["Crime", "Thriller"]  # tied with the 1st count: both
    assert top_genres(c, 3) == ["Crime", "Thriller", "Drama"]
    assert top_genres(c, 4) == ["Crime", "Thriller", "Drama", "Action", "Horror", "Sci-Fi"]
    assert top_genres(genre_counts([1], g), 5) == ["Animation", "Children's", "Comedy"]
    assert top_genres(Counter(), 3) == []
    with pytest.raises(ValueError):
        top_genres(c, 0)


@pytest.mark.parametrize("text,expected", [
    ("Drama, Comedy and Action.", ["Drama", "Comedy", "Action"]),
    ("comedy, DRAMA, comedy again", ["Comedy", "Drama"]),                      # case, first mention, once
    ("sci-fi, Sci Fi, scifi and science fiction", ["Sci-Fi"]),
    ("Children's movies and film noir", ["Children's", "Film-Noir"]),
    ("childrens and Film-Noir", ["Children's", "Film-Noir"]),
    ("children\u2019s films", ["Children's"]),                                 # typographic apostrophe
    ("romantic comedies, thrillers and documentaries", ["Romance", "Comedy", "Thriller", "Documentary"]),
    ("mysteries, westerns, musicals", ["Mystery", "Western", "Musical"]),
    ("a warm, dramatic, actionable horrorshow", []),                            # whole words only
    ("The genres are Heat (1995)", []),
    ("", []),
])
def test_parse_genres(text, expected):
    assert parse_genres(text, ML_VOCAB) == expected


def test_parse_prefers_the_longer_overlapping_genre():
    assert parse_genres("I like science fiction and fiction", ["Fiction", "Sci-Fi"]) == ["Sci-Fi", "Fiction"]


def test_score_user_and_summary():
    top = ["Drama", "Comedy", "Action"]
    a = score_user(["Drama", "Horror", "Comedy", "War"], top)
    assert a == {"precision": 0.5, "precision@k": 2 / 3, "top1_hit": 1.0, "no_genre": 0.0, "n_genres": 4.0}
    b = score_user(["Horror", "Drama"], top, k=3)
    assert b["precision"] == 0.5 and b["precision@k"] == 0.5 and b["top1_hit"] == 0.0
    assert score_user(["Horror", "Drama"], top, k=1)["precision@k"] == 0.0
    c = score_user([], top)
    assert math.isnan(c["precision"]) and math.isnan(c["precision@k"]) and c["top1_hit"] == 0.0
    assert c["no_genre"] == 1.0
    s = summarize_scores(pd.DataFrame([a, b, c]))
    assert s["precision"] == 0.5 and s["precision@k"] == pytest.approx((2 / 3 + 0.5) / 2)  # users naming a genre
    assert s["top1_hit"] == pytest.approx(1 / 3) and s["no_genre"] == pytest.approx(1 / 3)
    assert s["n"] == 3 and s["n_named"] == 2 and s["n_genres"] == 2.0


def test_genre_question_uses_the_domain_noun():
    assert genre_question(MOVIES) == "Which movie genres does this user like the most? The genres are"
    with pytest.raises(ValueError):
        genre_question(DomainConfig("watched", "", "movies"))


def test_question_prompt_shares_the_recommenders_history_part(tokenizers_by_style):
    tok, _ = tokenizers_by_style["opt"]
    pb = PromptBuilder(tok, MOVIES, max_title_tokens=16)
    hist = ["The Matrix (1999)", "Toy Story (1995)"]
    q = pb.build_question(hist, "Which movie genres does this user like the most? The genres are")
    full = pb.build(hist, ["Heat (1995)"])
    ph = pb.placeholders
    assert q.input_ids.count(ph.user_id) == 1 and q.input_ids.count(ph.item_id) == 2
    assert q.n_item_slots == 2 and q.n_candidates == 0 and set(q.labels) == {IGNORE}
    text = tok.decode(q.input_ids, skip_special_tokens=False)
    assert text.endswith("Toy Story (1995)<|item_emb|> in the past. Which movie genres does this user like the "
                         "most? The genres are")
    # identical ids up to the end of the history sentence
    cut = len(pb._user_and_history(hist))
    assert q.input_ids[:cut] == full.input_ids[:cut]
    no_items = PromptBuilder(tok, MOVIES, max_title_tokens=16, use_user_token=False, item_tokens=False)
    plain = no_items.build_question(hist, "Which genres?")
    assert ph.user_id not in plain.input_ids and ph.item_id not in plain.input_ids and plain.n_item_slots == 0
    with pytest.raises(ValueError):
        pb.build_question(hist, "  ")


@pytest.mark.parametrize("soft", [True, False])
def test_recommender_ask_generates_from_the_history_prompt(tokenizers_by_style, make_tiny, soft):
    tok, base = tokenizers_by_style["llama"]
    llm = make_tiny("llama", base)
    titles = ["", "The Matrix (1999)", "Toy Story (1995)", "Heat (1995)", "Fargo (1996)"]
    torch.manual_seed(0)
    proj = Stage2Projector(6, 5, 32).eval() if soft else None
    vecs = np.random.default_rng(0).normal(size=(5, 5)).astype(np.float32) if soft else None
    rec = LLMRecommender(llm, tok, titles, MOVIES, projector=proj, item_vectors=vecs, use_user_token=soft,
                         history_len=3)
    rep = np.ones(6, dtype=np.float32) if soft else None
    exs = [Example(rep, [1, 2, 3, 4], []), Example(rep, [2], [])]
    b = rec.batch(exs, with_target=False, question="Which genres?")
    assert int((b["input_ids"] == rec.prompts.placeholders.item_id).sum()) == (4 if soft else 0)  # last 3 + 1
    if soft:
        assert b["item_embs"].shape == (2, 3, 5)
    out = rec.ask(exs, "Which genres?", max_new_tokens=4)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    one = rec.ask(exs[:1], "Which genres?", max_new_tokens=4)
    assert one[0] == out[0]  # left padding does not change a row's greedy answer
    with pytest.raises(ValueError, match="no target"):
        rec.batch(exs, with_target=True, question="Which genres?")
