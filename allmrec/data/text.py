"""Item text: cleaning raw titles/descriptions, the paper's SBERT input, prompt titles, title matching.

Raw Amazon text carries HTML tags and entities ("Tools &amp; Home", "<br />"), runs of whitespace
and very long descriptions; everything that reaches SBERT or an LLM prompt goes through `clean_text`.
"""
from __future__ import annotations

import html
import re
import unicodedata

# A tag starts with a letter (or "/" + letter, or "!" for comments/doctype), so "size < 5 mm" and
# "<95%" survive while "<br />", "</p>" and "<!-- x -->" are removed.
_TAG = re.compile(r"<!--.*?-->|<\s*/?\s*[A-Za-z!][^<>]*>", re.S)

# Stripped from both ends of a title before exact matching: sentence punctuation and quotes that
# an LLM tends to add or drop around a title. Brackets, '#', '+' are kept ("C++", "Toy Story (1995)").
_END_PUNCT = ".,;:!?\"'`*_~-\u2013\u2014\u2026\u201c\u201d\u2018\u2019\u00ab\u00bb\u201e\u201a\u2039\u203a"


def clean_text(s: object, max_chars: int | None = None) -> str:
    """Unescape HTML, drop tags, collapse whitespace, trim; cap at `max_chars` on a word boundary.

    Non-strings (None, NaN from a dataframe) give "". The cap is a hard limit: the result is never
    longer than `max_chars`; it cuts at the last space when that keeps at least half the budget.
    """
    if not isinstance(s, str) or not s:
        return ""
    if "&" in s:
        s = html.unescape(s)
    if "<" in s:
        s = _TAG.sub(" ", s)
    s = " ".join(s.split())  # split() with no argument also handles \xa0, \u2009, tabs, newlines
    return _cap(s, max_chars)


def _cap(s: str, max_chars: int | None) -> str:
    if max_chars is None or len(s) <= max_chars:
        return s
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    cut = s[:max_chars]
    if s[max_chars] != " ":  # the cut falls inside a word: back off to the previous space
        space = cut.rfind(" ")
        if space >= max_chars // 2:
            cut = cut[:space]
    return cut.rstrip(" ,;:-")


def item_text(title: object, description: object, max_chars: int | None = None) -> str:
    """The paper's SBERT input "Title: t, Description: d", at most `max_chars` long.

    The description is what gets shortened when the budget is tight; a missing part is left out
    ("Title: t" without description, "" when both are empty).
    """
    t = clean_text(title)
    d = clean_text(description)
    head = f"Title: {t}" if t else ""
    if not d:
        return _cap(head, max_chars)
    if not head:
        return _cap(f"Description: {d}", max_chars)
    sep = ", Description: "
    if max_chars is not None:
        budget = max_chars - len(head) - len(sep)
        if budget < 1:  # not even one description character fits
            return _cap(head, max_chars)
        d = _cap(d, budget)
        if not d:
            return head
    return head + sep + d


def prompt_title(title: object, raw_id: object, max_chars: int | None = None) -> str:
    """The title an LLM prompt shows for an item: the cleaned title, or "Item <raw_id>" when empty."""
    t = clean_text(title, max_chars)
    return t if t else _cap(f"Item {raw_id}", max_chars)


def normalize_title(s: object) -> str:
    """Canonical form for exact-match scoring of a generated title against candidate titles.

    NFKC (full-width letters, ligatures), casefold, collapse whitespace, then strip quotes and
    sentence punctuation at both ends: '"Toy Story (1995)".' -> 'toy story (1995)'.
    """
    if not isinstance(s, str):
        return ""
    s = unicodedata.normalize("NFKC", s).casefold()
    s = " ".join(s.split())
    return s.strip(_END_PUNCT + " ")
