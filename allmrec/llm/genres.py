"""Favourite-genre generation (paper section 5.4.4), made measurable.

The frozen LLM gets the recommender's own prompt up to the history (user soft token, the last titles
each followed by its item soft token), then a question about the user's favourite genres instead of the
candidate list. The greedy answer is parsed into genres of the dataset's vocabulary (the item
categories) and compared with the genres the user's training history holds most often.

Per user: `precision` = share of the named genres that are among the user's top genres (undefined when
no genre is named), `precision@k` = the same over the first k named genres, `top1_hit` = the first named genre is a top genre (a miss when none is named),
`no_genre` = the answer names no genre of the vocabulary. Top genres are the `k` most frequent in the
training history; genres tied with the k-th count are included (a tie is not broken arbitrarily).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

CATEGORY_SEP = "|"
# Category labels that name no genre (ML-100K has "unknown" for one item).
NOT_GENRES = frozenset({"unknown", "none", "n/a", "other", ""})
# Other ways to say a genre (keys are lower-case genre names); plurals are handled by the pattern.
ALIASES: dict[str, tuple[str, ...]] = {
    "sci-fi": ("science fiction",),
    "film-noir": ("noir",),
    "animation": ("animated",),
    "romance": ("romantic",),
}


def genre_question(domain) -> str:
    """The question asked after the history, e.g. "Which movie genres does this user like the most?
    The genres are" (domain: a DomainConfig-like object with `noun`)."""
    noun = str(getattr(domain, "noun", "") or "").strip()
    if not noun:
        raise ValueError(f"domain needs a non-empty noun, got {domain!r}")
    return f"Which {noun} genres does this user like the most? The genres are"


def split_categories(value: object) -> list[str]:
    """"Animation | Children's | Comedy" -> ["Animation", "Children's", "Comedy"] (labels that name no
    genre dropped, order kept, no duplicates)."""
    if not isinstance(value, str):
        return []
    out: list[str] = []
    for part in value.split(CATEGORY_SEP):
        g = " ".join(part.split())
        if g.lower() not in NOT_GENRES and g not in out:
            out.append(g)
    return out


def genre_vocab(items: pd.DataFrame) -> list[str]:
    """The genres of a prepared item table (column `categories`), most frequent first (then by name)."""
    if "categories" not in items.columns:
        raise ValueError("the prepared items have no 'categories' column: this dataset has no genres")
    counts = Counter(g for v in items["categories"] for g in split_categories(v))
    if not counts:
        raise ValueError("the prepared items name no categories: this dataset has no genres to ask about")
    return sorted(counts, key=lambda g: (-counts[g], g))


def item_genres(items: pd.DataFrame) -> dict[int, list[str]]:
    """item id -> its genres."""
    if "categories" not in items.columns:
        raise ValueError("the prepared items have no 'categories' column: this dataset has no genres")
    return {int(i): split_categories(c) for i, c in zip(items["item"], items["categories"])}


def genre_counts(history: Iterable[int], genres_of: dict[int, list[str]]) -> Counter:
    """How many items of `history` carry each genre (an item counts once for each of its genres)."""
    return Counter(g for i in history for g in genres_of.get(int(i), []))


def top_genres(counts: Counter, k: int = 3) -> list[str]:
    """The k most frequent genres, plus any tied with the k-th count; by count, then name."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranked = sorted((g for g, c in counts.items() if c > 0), key=lambda g: (-counts[g], g))
    if len(ranked) <= k:
        return ranked
    cut = counts[ranked[k - 1]]
    return [g for g in ranked if counts[g] >= cut]


def _genre_pattern(genre: str) -> str:
    """Regex for one genre name: case folded by the caller, '-' or ' ' optional between words ("sci fi",
    "scifi"), "'s" optional ("children"), an English plural on the last word ("comedies", "dramas")."""
    g = genre.lower().replace("\u2019", "'")
    possessive = g.endswith("'s")
    if possessive:
        g = g[:-2]
    parts = []
    for ch in g:
        if ch in "- ":
            parts.append(r"[\s\-]?")
        elif ch == "'":
            parts.append("'?")
        else:
            parts.append(re.escape(ch))
    body = "".join(parts)
    if possessive:
        return body + "(?:'?s)?"
    if g.endswith("y") and len(g) > 1 and g[-2] not in "aeiou":
        return body[:-1] + "(?:y|ies)"
    return body + "(?:e?s)?"


def _compile(vocab: Sequence[str]) -> list[tuple[str, re.Pattern]]:
    out = []
    for g in vocab:
        names = [g, *ALIASES.get(g.lower(), ())]
        alt = "|".join(_genre_pattern(n) for n in names)
        out.append((g, re.compile(rf"(?<![a-z0-9])(?:{alt})(?![a-z0-9])")))
    return out


def parse_genres(text: str, vocab: Sequence[str]) -> list[str]:
    """Genres of `vocab` named in `text`, in order of first mention, each once.

    Case-insensitive, whole words only ("war" is not in "warm", "drama" is in "drama,"). Where two
    genre names overlap, the one starting first (then the longer one) wins."""
    if not isinstance(text, str) or not text:
        return []
    t = text.lower().replace("\u2019", "'")
    spans = []
    for g, pat in _compile(vocab):
        spans += [(m.start(), -(m.end() - m.start()), m.end(), g) for m in pat.finditer(t)]
    out: list[str] = []
    taken_until = -1
    for start, _, end, g in sorted(spans):
        if start < taken_until:
            continue  # inside a longer/earlier genre mention
        taken_until = end
        if g not in out:
            out.append(g)
    return out


def score_user(named: Sequence[str], top: Sequence[str], k: int = 3) -> dict[str, float]:
    """precision and precision@k over the first k named (NaN without a named genre), top1_hit, no_genre,
    n_genres for one answer. precision@k does not punish an answer for running on into a long list."""
    top_set = set(top)
    n = len(named)
    return {
        "precision": sum(g in top_set for g in named) / n if n else float("nan"),
        "precision@k": sum(g in top_set for g in named[:k]) / min(n, k) if n else float("nan"),
        "top1_hit": float(n > 0 and named[0] in top_set),
        "no_genre": float(n == 0),
        "n_genres": float(n),
    }


def summarize_scores(rows: pd.DataFrame) -> dict[str, float]:
    """Mean metrics over users: precision over users who named a genre, the rest over all users."""
    if not len(rows):
        raise ValueError("no rows to summarize")
    prec = rows["precision"].to_numpy(dtype=float)
    named = ~np.isnan(prec)
    return {
        "precision": float(prec[named].mean()) if named.any() else float("nan"),
        "precision@k": float(rows["precision@k"].to_numpy(dtype=float)[named].mean()) if named.any() else float("nan"),
        "top1_hit": float(rows["top1_hit"].mean()),
        "no_genre": float(rows["no_genre"].mean()),
        "n_genres": float(rows["n_genres"].mean()),
        "n": int(len(rows)),
        "n_named": int(named.sum()),
    }
