"""Item text helpers: cleaning, the SBERT input, prompt titles and title normalisation."""
from __future__ import annotations

import pytest

from allmrec.data.text import clean_text, item_text, normalize_title, prompt_title


def test_clean_text_html_and_whitespace():
    assert clean_text("Tools &amp; Home<br />Improvement\n\t  x&nbsp;y ") == "Tools & Home Improvement x y"
    assert clean_text("<p><b>Bold</b> claim</p><!-- hidden\n comment -->end") == "Bold claim end"
    # a "<" that does not open a tag is text, as are escaped tags' brackets after unescaping
    assert clean_text("humidity <95% and size < 5 mm > 3 mm") == "humidity <95% and size < 5 mm > 3 mm"
    assert clean_text("It&rsquo;s &quot;great&quot;") == "It\u2019s \"great\""
    assert clean_text(None) == "" and clean_text(float("nan")) == "" and clean_text("   ") == ""


def test_clean_text_cap_on_word_boundary():
    s = "alpha beta gamma delta"
    assert clean_text(s, 100) == s
    assert clean_text(s, len(s)) == s
    assert clean_text(s, 12) == "alpha beta"  # cut inside "gamma": back to the space
    assert clean_text(s, 11) == "alpha beta"  # cut right at a space
    assert clean_text("abcdefghij klm", 6) == "abcdef"  # no space in the first half: hard cut
    assert clean_text("one, two three", 6) == "one"  # no dangling comma
    assert clean_text(s, 0) == ""
    for n in range(0, 30):
        assert len(clean_text(s, n)) <= n
    with pytest.raises(ValueError, match="max_chars"):
        clean_text(s, -1)


def test_item_text():
    assert item_text("Toy Story", "A toy &amp; a spaceman.", None) == "Title: Toy Story, Description: A toy & a spaceman."
    assert item_text("Toy Story (1995)", "", 512) == "Title: Toy Story (1995)"
    assert item_text("Toy Story", None, 512) == "Title: Toy Story"
    assert item_text("", "Only a description", 512) == "Description: Only a description"
    assert item_text("", "", 512) == ""
    long_desc = " ".join(["word"] * 200)
    out = item_text("Title here", long_desc, 60)
    assert out.startswith("Title: Title here, Description: word") and len(out) <= 60
    assert not out.endswith(" ") and out.endswith("word")
    # the title alone is over budget: no description, title capped
    assert item_text("a very long title indeed", "desc", 12) == "Title: a"
    assert item_text("Short", "desc", 20) == "Title: Short"  # ", Description: " does not fit


def test_prompt_title():
    assert prompt_title("  Toy   Story ", "1", 120) == "Toy Story"
    assert prompt_title("", "B000N8OIE8", 120) == "Item B000N8OIE8"
    assert prompt_title(None, 42, 120) == "Item 42"
    assert prompt_title("<br/>", "7", 120) == "Item 7"
    assert prompt_title("Extremely long product title words", "1", 16) == "Extremely long"


@pytest.mark.parametrize("generated, candidate", [
    ('"Toy Story (1995)"', "Toy Story (1995)"),
    ("toy story (1995).", "Toy Story (1995)"),
    ("\u201cToy  Story\u201d", "Toy Story"),
    ("  'Airplane!'  ", "Airplane!"),
    ("\uff34\uff4f\uff59 Story", "Toy Story"),  # full-width letters (NFKC)
    ("STRASSE", "Stra\u00dfe"),  # casefold
    ("SUPCO SPP6 Relay Kit", "SUPCO SPP6 Relay Kit."),
])
def test_normalize_title_matches(generated, candidate):
    assert normalize_title(generated) == normalize_title(candidate)


def test_normalize_title_keeps_distinctions():
    assert normalize_title("Toy Story (1995)") == "toy story (1995)"
    assert normalize_title("Notepad++") == "notepad++"
    assert normalize_title("C#") == "c#"
    assert normalize_title("Toy Story 2") != normalize_title("Toy Story")
    assert normalize_title("Batman & Robin") != normalize_title("Batman Robin")
    assert normalize_title('"..."') == "" and normalize_title(None) == ""
