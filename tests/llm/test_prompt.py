"""The shared prompt: token layout, exact title truncation, labels, soft-token splicing."""
from __future__ import annotations

import pytest
import torch

from allmrec.config import DomainConfig
from allmrec.llm.prompt import (IGNORE, ITEM_TOKEN, PromptBuilder, collate, embed_with_soft_tokens,
                                splice_soft_tokens)

MOVIES = DomainConfig("watched", "movie", "movies")
HIST = ["The Matrix (1999)", "Toy Story (1995)", "Fargo (1996)"]
CANDS = ["Heat (1995)", "Casino (1995)", "Pulp Fiction (1994)", "Alien (1979)"]


def _text(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("style,bos", [("opt", "</s>"), ("llama", "<s>")])
def test_bos_added_once_like_the_tokenizer_does(tokenizers_by_style, style, bos):
    tok, _ = tokenizers_by_style[style]
    pb = PromptBuilder(tok, MOVIES, max_title_tokens=8)
    bos_id = tok.convert_tokens_to_ids(bos)
    assert pb.prefix_ids == [bos_id]
    enc = pb.build(HIST, CANDS, "Heat (1995)")
    assert enc.input_ids[0] == bos_id and enc.input_ids.count(bos_id) == (1 if style == "llama" else 2)
    # opt: </s> is both BOS and EOS -> once at the start, once closing the target


def test_prompt_text_and_slots(tokenizers_by_style):
    tok, _ = tokenizers_by_style["opt"]
    pb = PromptBuilder(tok, MOVIES, max_title_tokens=16)
    enc = pb.build(HIST, CANDS, "Heat (1995)")
    ph = pb.placeholders
    assert enc.input_ids.count(ph.user_id) == 1 and enc.input_ids.count(ph.item_id) == len(HIST) + len(CANDS)
    assert enc.n_item_slots == 7 and enc.n_history == 3 and enc.n_candidates == 4
    text = tok.decode(enc.input_ids, skip_special_tokens=False)
    assert ("<|user_emb|> is a user representation. This user has watched The Matrix (1999)<|item_emb|>, "
            "Toy Story (1995)<|item_emb|>, Fargo (1996)<|item_emb|> in the past. Recommend a movie for this "
            "user to watch next from the following set of movie titles, Heat (1995)<|item_emb|>, "
            "Casino (1995)<|item_emb|>, Pulp Fiction (1994)<|item_emb|>, Alien (1979)<|item_emb|>. "
            "The recommendation is Heat (1995)</s>") in text


def test_domain_words_and_unknown_verbs_keep_every_sentence(tokenizers_by_style):
    tok, _ = tokenizers_by_style["opt"]
    txt = _text(tok, PromptBuilder(tok, DomainConfig(), 16).build(HIST, CANDS).input_ids)
    assert "This user has bought" in txt and "Recommend an item for this user to buy next" in txt
    assert "set of item titles" in txt
    odd = PromptBuilder(tok, DomainConfig("assembled", "kit", "kits"), 16)
    txt = _text(tok, odd.build(HIST, CANDS).input_ids)
    assert "This user has assembled" in txt and "in the past." in txt
    assert "Recommend the next kit for this user from the following set of kit titles" in txt
    assert "This user has not assembled any kits yet." in _text(tok, odd.build([], CANDS).input_ids)
    with pytest.raises(ValueError, match="verb, noun and plural"):
        PromptBuilder(tok, DomainConfig("", "movie", "movies"), 16)


@pytest.mark.parametrize("style", ["opt", "llama"])
def test_titles_truncated_exactly_and_labels_cover_target_only(tokenizers_by_style, style):
    tok, _ = tokenizers_by_style[style]
    long_title = "Amelie " * 20 + "(2001)"
    pb = PromptBuilder(tok, MOVIES, max_title_tokens=5)
    full = tok(" " + " ".join(long_title.split()), add_special_tokens=False).input_ids
    assert len(full) > 5 and pb.title_ids(long_title) == full[:5]
    assert len(pb.title_ids("Jaws")) < 5
    enc = pb.build([long_title], [long_title, "Jaws"], long_title)
    ids, item = enc.input_ids, pb.placeholders.item_id
    slots = [i for i, t in enumerate(ids) if t == item]
    assert ids[slots[0] - 5: slots[0]] == full[:5]  # history title: 5 tokens then its soft token
    assert ids[slots[1] - 5: slots[1]] == full[:5]
    tgt = pb.target_ids(long_title)
    assert tgt == full[:5] + [tok.eos_token_id]
    n = len(tgt)
    assert ids[-n:] == tgt and enc.labels[-n:] == tgt  # first answer token is labelled, eos too
    assert all(lab == IGNORE for lab in enc.labels[:-n])
    assert len(enc.labels) == len(ids)
    assert pb.build([long_title], ["Jaws"]).labels == [IGNORE] * len(pb.build([long_title], ["Jaws"]).input_ids)


def test_chat_prompt_wraps_the_question_in_the_template(tokenizers_by_style):
    from tests.llm.conftest import _llama_tokenizer
    tok = _llama_tokenizer()  # a fresh one: the chat template and its tokens are ours to add
    with pytest.raises(ValueError, match="chat template"):
        PromptBuilder(tok, MOVIES, 16, chat=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    plain, chat = PromptBuilder(tok, MOVIES, 16), PromptBuilder(tok, MOVIES, 16, chat=True)
    p, c = plain.build(HIST, CANDS, "Heat (1995)"), chat.build(HIST, CANDS, "Heat (1995)")
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    head, tail = ids("<|im_start|>user\n"), ids("<|im_end|>\n<|im_start|>assistant\n")
    ask, tgt = ids(" The recommendation is"), chat.target_ids("Heat (1995)")
    body = p.input_ids[len(plain.prefix_ids): -len(ask) - len(tgt)]  # the question, from the user token on
    assert body[0] == chat.placeholders.user_id
    assert c.input_ids == head + body + tail + ids("The recommendation is") + tgt  # the paper's words, in turns
    assert c.labels[-len(tgt):] == tgt and set(c.labels[:-len(tgt)]) == {IGNORE}
    assert (c.n_item_slots, c.n_candidates) == (p.n_item_slots, p.n_candidates)
    q = chat.build_question(HIST, "Which genres?").input_ids
    assert q[:len(head)] == head and q[-len(tail):] == tail


def test_item_tokens_before_titles(tokenizers_by_style):
    tok, _ = tokenizers_by_style["opt"]
    after, before = PromptBuilder(tok, MOVIES, 16), PromptBuilder(tok, MOVIES, 16, item_position="before")
    a, b = after.build(HIST, CANDS, "Heat (1995)"), before.build(HIST, CANDS, "Heat (1995)")
    text = tok.decode(b.input_ids, skip_special_tokens=False)
    assert "This user has watched<|item_emb|> The Matrix (1999),<|item_emb|> Toy Story (1995)" in text
    assert "titles,<|item_emb|> Heat (1995),<|item_emb|> Casino (1995)" in text
    # the same tokens, moved: every title now follows its slot, so its tokens can attend to the embedding
    assert sorted(a.input_ids) == sorted(b.input_ids) and a.labels[-6:] == b.labels[-6:]
    item = before.placeholders.item_id
    for k, t in enumerate(HIST + CANDS):
        at = [i for i, x in enumerate(b.input_ids) if x == item][k]
        assert b.input_ids[at + 1: at + 1 + len(before.title_ids(t))] == before.title_ids(t)
    with pytest.raises(ValueError, match="item_position"):
        PromptBuilder(tok, MOVIES, 16, item_position="middle")


def test_user_token_after_history(tokenizers_by_style):
    tok, _ = tokenizers_by_style["opt"]
    start, late = PromptBuilder(tok, MOVIES, 16), PromptBuilder(tok, MOVIES, 16, user_position="after_history")
    a, b = start.build(HIST, CANDS, "Heat (1995)"), late.build(HIST, CANDS, "Heat (1995)")
    text = tok.decode(b.input_ids, skip_special_tokens=False)
    assert text.startswith("</s>This user has watched The Matrix (1999)<|item_emb|>")
    assert ("Fargo (1996)<|item_emb|> in the past. <|user_emb|> is a user representation. Recommend a movie"
            in text)
    # the user slot is no longer right after the prefix; item slots and target are unchanged in order
    user = late.placeholders.user_id
    assert a.input_ids.index(user) == len(start.prefix_ids) < b.input_ids.index(user)
    assert a.n_item_slots == b.n_item_slots and a.labels[-6:] == b.labels[-6:]
    q = tok.decode(late.build_question(HIST, "Which genres?").input_ids, skip_special_tokens=False)
    assert q.endswith("in the past. <|user_emb|> is a user representation. Which genres?")
    empty = tok.decode(late.build([], CANDS).input_ids, skip_special_tokens=False)
    assert "This user has not watched any movies yet. <|user_emb|> is a user representation." in empty
    no_user = PromptBuilder(tok, MOVIES, 16, use_user_token=False, user_position="after_history")
    assert user not in no_user.build(HIST, CANDS).input_ids
    with pytest.raises(ValueError, match="user_position"):
        PromptBuilder(tok, MOVIES, 16, user_position="end")


def test_user_token_at_the_answer(tokenizers_by_style):
    tok, _ = tokenizers_by_style["llama"]
    pb = PromptBuilder(tok, MOVIES, 16, item_position="before", user_position="answer")
    e = pb.build(HIST, CANDS, "Heat (1995)")
    user, item = pb.placeholders.user_id, pb.placeholders.item_id
    n_prompt = e.labels.index(next(x for x in e.labels if x != -100))
    # exactly one user slot, the last prompt token; the answer follows it the way a candidate's title
    # follows that candidate's item slot
    assert e.input_ids.count(user) == 1 and e.input_ids[n_prompt - 1] == user
    tgt = pb.target_ids("Heat (1995)")
    assert e.input_ids[n_prompt:] == tgt
    heat = [i for i, x in enumerate(e.input_ids) if x == item][len(HIST) + CANDS.index("Heat (1995)")]
    assert e.input_ids[heat + 1: heat + len(tgt)] == tgt[:-1]
    text = tok.decode(e.input_ids[:n_prompt], skip_special_tokens=False)
    assert "is a user representation" not in text and text.endswith("The recommendation is<|user_emb|>")
    q = pb.build_question(HIST, "Which genres?").input_ids
    assert q.count(user) == 1 and q[-1] == user
    no_user = PromptBuilder(tok, MOVIES, 16, use_user_token=False, user_position="answer")
    assert user not in no_user.build(HIST, CANDS).input_ids


def test_collate_left_pads_and_right_aligns_targets(tokenizers_by_style):
    tok, _ = tokenizers_by_style["llama"]  # pad == eos here: the mask must not come from the ids
    pb = PromptBuilder(tok, MOVIES, 16)
    a, b = pb.build(HIST, CANDS, "Heat (1995)"), pb.build(HIST[:1], CANDS[:2], "Pulp Fiction (1994)")
    batch = pb.collate([a, b])
    T = len(a.input_ids)
    assert batch["input_ids"].shape == (2, T) and len(b.input_ids) < T
    pad = T - len(b.input_ids)
    assert batch["attention_mask"][1].tolist() == [0] * pad + [1] * len(b.input_ids)
    assert batch["input_ids"][1, pad:].tolist() == b.input_ids
    assert batch["labels"][1, :pad].eq(IGNORE).all() and batch["labels"][1, pad:].tolist() == b.labels
    assert batch["n_item_slots"].tolist() == [7, 3]
    assert batch["input_ids"][:, -1].tolist() == [tok.eos_token_id] * 2
    with pytest.raises(ValueError):
        collate([], 0)


def test_splice_puts_soft_tokens_exactly_at_placeholders(tiny):
    style, llm, tok = tiny
    pb = PromptBuilder(tok, MOVIES, 8)
    batch = pb.collate([pb.build(HIST, CANDS, "Heat (1995)"), pb.build(HIST[:2], CANDS[:3])])
    ids, ph = batch["input_ids"], pb.placeholders
    H = llm.config.hidden_size
    g = torch.Generator().manual_seed(0)
    user = torch.randn(2, H, generator=g)
    items = torch.randn(2, 7, H, generator=g)
    emb = embed_with_soft_tokens(llm, ids, ph, user, items)
    table = llm.get_input_embeddings().weight
    for b in range(2):
        k = 0
        for t, i in enumerate(ids[b].tolist()):
            if i == ph.user_id:
                assert torch.equal(emb[b, t], user[b])
            elif i == ph.item_id:
                assert torch.equal(emb[b, t], items[b, k])
                k += 1
            else:
                assert torch.equal(emb[b, t], table[i])
        assert k == int(batch["n_item_slots"][b])
    if style == "llama":  # placeholder ids lie outside this model's embedding matrix: never looked up
        assert ph.item_id >= table.shape[0] and ph.user_id >= table.shape[0]


def test_variants_without_user_or_item_tokens(tiny):
    _, llm, tok = tiny
    no_user = PromptBuilder(tok, MOVIES, 8, use_user_token=False)
    enc = no_user.build(HIST, CANDS)
    assert no_user.placeholders.user_id not in enc.input_ids
    txt = _text(tok, enc.input_ids)
    assert "user representation" not in txt and "This user has watched" in txt
    llm_only = PromptBuilder(tok, MOVIES, 8, use_user_token=False, item_tokens=False)
    enc = llm_only.build(HIST, CANDS, "Heat (1995)")
    assert enc.n_item_slots == 0 and llm_only.placeholders.item_id not in enc.input_ids
    assert _text(tok, enc.input_ids).endswith("The recommendation is Heat (1995)")
    ids = llm_only.collate([enc])["input_ids"]
    assert torch.equal(embed_with_soft_tokens(llm, ids, llm_only.placeholders), llm.get_input_embeddings()(ids))


def test_splice_rejects_mismatched_inputs(tiny):
    _, llm, tok = tiny
    pb = PromptBuilder(tok, MOVIES, 8)
    ids = pb.collate([pb.build(HIST, CANDS)])["input_ids"]
    H = llm.config.hidden_size
    emb = torch.zeros(1, ids.shape[1], H)
    ph = pb.placeholders
    with pytest.raises(ValueError, match="no user soft token"):
        splice_soft_tokens(emb, ids, None, torch.zeros(1, 7, H), ph)
    with pytest.raises(ValueError, match="no item soft tokens"):
        splice_soft_tokens(emb, ids, torch.zeros(1, H), None, ph)
    with pytest.raises(ValueError, match="only 6 slots"):
        splice_soft_tokens(emb, ids, torch.zeros(1, H), torch.zeros(1, 6, H), ph)
    with pytest.raises(ValueError, match="user_soft must be"):
        splice_soft_tokens(emb, ids, torch.zeros(1, H + 1), torch.zeros(1, 7, H), ph)
    # extra (padding) item slots are fine: a row may have fewer placeholders than slots
    out = splice_soft_tokens(emb, ids, torch.ones(1, H), torch.ones(1, 9, H), ph)
    assert out[0, ids[0] == ph.item_id].eq(1).all()
    with pytest.raises(ValueError, match="at least one candidate"):
        pb.build(HIST, [])


def test_placeholder_text_inside_a_title_makes_no_slot(tokenizers_by_style):
    tok, _ = tokenizers_by_style["opt"]
    pb = PromptBuilder(tok, MOVIES, 16)
    enc = pb.build([f"Evil {ITEM_TOKEN} Title"], ["Heat (1995)"])
    assert enc.input_ids.count(pb.placeholders.item_id) == 2 == enc.n_item_slots
