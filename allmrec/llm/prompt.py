"""The A-LLMRec prompt, built once for training, evaluation and serving.

    [user] is a user representation. This user has watched <t_1>[item], ..., <t_n>[item] in the past.
    Recommend a movie for this user to watch next from the following set of movie titles,
    <c_1>[item], ..., <c_20>[item]. The recommendation is  ->  " <target title><eos>"

(Layout options, off by default: each [item] before its title; the user sentence after the history, or
the user's soft token alone right after "The recommendation is".)

The prompt is built from token ids, not from one string: each text segment and each title is
tokenized on its own and the ids are concatenated. That makes title truncation exact (every title is
" " + title cut to `max_title_tokens` tokens, the very ids the target and the ranking use) and marks
every soft-token slot with a placeholder id. The placeholders are special tokens added to the
tokenizer, but the LLM's embedding matrix is never resized: before the embedding lookup they become
a valid id, and `splice_soft_tokens` then overwrites exactly those positions with the projected
CF vectors. Batches are left-padded so that all answers end at the same right edge.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from allmrec.config import ITEM_TOKEN_POSITIONS, USER_TOKEN_POSITIONS

USER_TOKEN = "<|user_emb|>"
ITEM_TOKEN = "<|item_emb|>"
IGNORE = -100  # label of positions without loss (torch cross_entropy's ignore_index)

# Past participle (DomainConfig.verb) -> present tense for "... for this user to <verb> next".
_PRESENT = {
    "watched": "watch", "bought": "buy", "purchased": "purchase", "played": "play", "read": "read",
    "listened to": "listen to", "rated": "rate", "reviewed": "review", "used": "use", "viewed": "view",
    "visited": "visit", "liked": "like", "ordered": "order", "tried": "try", "seen": "see",
    "clicked": "click", "chosen": "choose", "picked": "pick", "selected": "select", "owned": "own",
}


@dataclass(frozen=True)
class Placeholders:
    """Ids of the soft-token slots, and the valid id looked up in their place (then overwritten)."""
    user_id: int
    item_id: int
    fill_id: int


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE over the prompt; target title ids + eos after it (empty target: all IGNORE)
    n_item_slots: int  # item placeholders, in order: history items, then candidates
    n_history: int
    n_candidates: int


def clean_title(title: str) -> str:
    """One line, single spaces: a newline inside a title would end a generation early."""
    return " ".join(str(title).split())


class PromptBuilder:
    """Builds token ids of the paper's prompt for one tokenizer and one domain (verb/noun words).

    Adds the two placeholder tokens to `tokenizer` (idempotent). Domain words come from a
    DomainConfig-like object with `verb` (past participle), `noun`, `plural` and, optionally,
    `verb_present`; an unknown verb never drops a sentence, it switches to a verb-free wording.
    """

    def __init__(self, tokenizer: Any, domain: Any, max_title_tokens: int, use_user_token: bool = True,
                 item_tokens: bool = True, chat: bool = False, item_position: str = "after",
                 user_position: str = "start") -> None:
        if max_title_tokens < 1:
            raise ValueError(f"max_title_tokens must be >= 1, got {max_title_tokens}")
        verb, noun, plural = (str(getattr(domain, k, "") or "").strip() for k in ("verb", "noun", "plural"))
        if not (verb and noun and plural):
            raise ValueError(f"domain needs non-empty verb, noun and plural, got {domain!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token: targets must end with one")
        self.tok = tokenizer
        if item_position not in ITEM_TOKEN_POSITIONS:
            raise ValueError(f"item_position must be one of {ITEM_TOKEN_POSITIONS}, got {item_position!r}")
        if user_position not in USER_TOKEN_POSITIONS:
            raise ValueError(f"user_position must be one of {USER_TOKEN_POSITIONS}, got {user_position!r}")
        self.max_title_tokens = max_title_tokens
        self.item_position = item_position
        self.user_position = user_position
        self.use_user_token = use_user_token
        self.item_tokens = item_tokens
        self.eos_id: int = tokenizer.eos_token_id

        tokenizer.add_special_tokens({"extra_special_tokens": [USER_TOKEN, ITEM_TOKEN]},
                                     replace_extra_special_tokens=False)
        uid, iid = tokenizer.convert_tokens_to_ids([USER_TOKEN, ITEM_TOKEN])
        fill = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.placeholders = Placeholders(user_id=uid, item_id=iid, fill_id=fill)
        # user_position="answer": no user sentence; the user's soft token alone ends every prompt
        at_answer = use_user_token and user_position == "answer"
        self._user_tail: list[int] = [uid] if at_answer else []
        self._user_sentence = use_user_token and not at_answer

        # Leading special ids the tokenizer adds by default (OPT: </s>, Llama: <s>, SmolLM2: none).
        # We add exactly those once, at the start, and nothing the tokenizer would not add itself.
        with_sp = tokenizer("x").input_ids
        without = tokenizer("x", add_special_tokens=False).input_ids
        self.prefix_ids: list[int] = next(
            (with_sp[:i] for i in range(len(with_sp) - len(without) + 1)
             if with_sp[i:i + len(without)] == without), [])
        # chat=True: the question is the user turn of the tokenizer's chat template and the answer starts
        # the assistant turn ("The recommendation is ..."). An instruction-tuned LLM then answers from
        # the list instead of continuing free text, and the user soft token is no longer position 0 (the
        # attention sink of Llama-family models when no BOS is added).
        self.chat = chat
        self._chat_close: list[int] = []
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("prompt chat=True needs a tokenizer with a chat template; this one has none")
            mark = "\x00ALLMREC\x00"
            text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                                 add_generation_prompt=True)
            if text.count(mark) != 1:
                raise ValueError("the chat template does not show the user message verbatim")
            head, tail = text.split(mark)
            self.prefix_ids = tokenizer(head, add_special_tokens=False).input_ids
            self._chat_close = tokenizer(tail, add_special_tokens=False).input_ids

        present = getattr(domain, "verb_present", None) or _PRESENT.get(verb.lower())
        article = "an" if noun[0].lower() in "aeiou" else "a"
        self._history_intro = f"This user has {verb}"
        self._history_outro = " in the past."
        self._empty_history = f"This user has not {verb} any {plural} yet."
        self._ask = (f" Recommend {article} {noun} for this user to {present} next" if present
                     else f" Recommend the next {noun} for this user")
        self._ask += f" from the following set of {noun} titles,"
        self._cache: dict[str, list[int]] = {}

    # -- token pieces ---------------------------------------------------------------------------
    def _text(self, s: str) -> list[int]:
        if s not in self._cache:
            self._cache[s] = self._strip_placeholders(self.tok(s, add_special_tokens=False).input_ids)
        return self._cache[s]

    def _strip_placeholders(self, ids: list[int]) -> list[int]:
        # A title that literally contains "<|item_emb|>" must not create a soft-token slot.
        p = self.placeholders
        return [i for i in ids if i != p.user_id and i != p.item_id]

    def title_ids(self, title: str) -> list[int]:
        """" " + title, cut to exactly `max_title_tokens` tokens (the same ids everywhere)."""
        key = "\0title:" + str(title)  # titles recur across users: tokenize each once
        if key not in self._cache:
            ids = self.tok(" " + clean_title(title), add_special_tokens=False).input_ids
            self._cache[key] = self._strip_placeholders(ids)[: self.max_title_tokens]
        return list(self._cache[key])

    def shown_title(self, title: str) -> str:
        """The title as the LLM sees (and learns to generate) it, for matching a generation."""
        return self.tok.decode(self.title_ids(title), skip_special_tokens=True).strip()

    def target_ids(self, title: str) -> list[int]:
        """What the LLM is trained to emit after the prompt, and what ranking scores."""
        ids = self.title_ids(title)
        if not ids:
            raise ValueError(f"empty target title {title!r}")
        return ids + [self.eos_id]

    def _titles(self, titles: Sequence[str]) -> list[int]:
        ids: list[int] = []
        for k, t in enumerate(titles):
            if k:
                ids += self._text(",")
            slot = [self.placeholders.item_id] if self.item_tokens else []
            ids += (slot + self.title_ids(t)) if self.item_position == "before" else (self.title_ids(t) + slot)
        return ids

    # -- prompts --------------------------------------------------------------------------------
    def _user_and_history(self, history_titles: Sequence[str]) -> list[int]:
        """Prefix, user sentence and history sentence: the part every prompt starts with. The user
        sentence comes first (the paper) or after the history (user_position="after_history"); with
        user_position="answer" there is none (the user's soft token ends the prompt: `_user_tail`)."""
        user = ([self.placeholders.user_id] + self._text(" is a user representation.")) if self._user_sentence else []
        first = self.user_position == "start"
        sep = " " if (first and user) else ""
        if len(history_titles):
            history = self._text(sep + self._history_intro) + self._titles(history_titles)
            history += self._text(self._history_outro)
        else:
            history = self._text(sep + self._empty_history)
        if first:
            return list(self.prefix_ids) + user + history
        return list(self.prefix_ids) + history + (self._text(" ") + user if user else [])

    def build(self, history_titles: Sequence[str], candidate_titles: Sequence[str],
              target_title: str | None = None) -> Encoded:
        if isinstance(history_titles, str) or isinstance(candidate_titles, str):
            raise ValueError("history_titles and candidate_titles must be sequences of titles, not a string")
        if len(candidate_titles) == 0:
            raise ValueError("a prompt needs at least one candidate title")
        ids = self._user_and_history(history_titles)
        ids += self._text(self._ask) + self._titles(candidate_titles) + self._text(".")
        ids += self._chat_close + self._text(("" if self.chat else " ") + "The recommendation is") + self._user_tail
        labels = [IGNORE] * len(ids)
        if target_title is not None:
            tgt = self.target_ids(target_title)
            ids += tgt
            labels += tgt
        n_slots = (len(history_titles) + len(candidate_titles)) if self.item_tokens else 0
        return Encoded(ids, labels, n_slots, len(history_titles), len(candidate_titles))

    def build_question(self, history_titles: Sequence[str], question: str) -> Encoded:
        """The same user and history part, then another question instead of the candidates (e.g.
        "Which movie genres does this user like the most? The genres are"); nothing to learn (no target)."""
        if isinstance(history_titles, str):
            raise ValueError("history_titles must be a sequence of titles, not a string")
        question = " ".join(str(question).split())
        if not question:
            raise ValueError("build_question needs a non-empty question")
        ids = self._user_and_history(history_titles) + self._text(" " + question) + self._chat_close
        ids += self._user_tail
        n_slots = len(history_titles) if self.item_tokens else 0
        return Encoded(ids, [IGNORE] * len(ids), n_slots, len(history_titles), 0)

    def collate(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return collate(batch, self.placeholders.fill_id)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad a list of Encoded into LongTensors: input_ids, attention_mask, labels, n_item_slots.
    The mask comes from the lengths, never from comparing ids with pad (pad may equal eos)."""
    if not batch:
        raise ValueError("collate needs at least one example")
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for b, e in enumerate(batch):
        n = len(e.input_ids)
        if len(e.labels) != n:
            raise ValueError(f"example {b}: {len(e.labels)} labels for {n} input ids")
        ids[b, T - n:] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[b, T - n:] = torch.tensor(e.labels, dtype=torch.long)
        mask[b, T - n:] = 1
    slots = torch.tensor([e.n_item_slots for e in batch], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "n_item_slots": slots}


# -- soft tokens ----------------------------------------------------------------------------------
def splice_soft_tokens(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, user_soft: torch.Tensor | None,
                       item_soft: torch.Tensor | None, placeholders: Placeholders) -> torch.Tensor:
    """Write soft tokens at the placeholder positions of `input_ids` (out of place, differentiable).

    user_soft (B, H): one per row, at that row's user placeholder (exactly one needed per row).
    item_soft (B, S, H): the k-th item placeholder of row b (left to right) gets item_soft[b, k];
    a row may have fewer than S placeholders (the tail of item_soft is padding), never more.
    """
    B, T, H = inputs_embeds.shape
    if input_ids.shape != (B, T):
        raise ValueError(f"input_ids {tuple(input_ids.shape)} does not match inputs_embeds {(B, T, H)}")
    out = inputs_embeds
    is_user = input_ids == placeholders.user_id
    is_item = input_ids == placeholders.item_id
    if user_soft is None:
        if is_user.any():
            raise ValueError("the prompt has a user placeholder but no user soft token was given")
    else:
        if user_soft.shape != (B, H):
            raise ValueError(f"user_soft must be {(B, H)}, got {tuple(user_soft.shape)}")
        if not bool((is_user.sum(1) == 1).all()):
            raise ValueError("each prompt needs exactly one user placeholder when user_soft is given")
        b, t = is_user.nonzero(as_tuple=True)
        out = out.index_put((b, t), user_soft[b].to(out.dtype))
    if item_soft is None:
        if is_item.any():
            raise ValueError("the prompt has item placeholders but no item soft tokens were given")
    else:
        if item_soft.dim() != 3 or item_soft.shape[0] != B or item_soft.shape[2] != H:
            raise ValueError(f"item_soft must be (B={B}, slots, H={H}), got {tuple(item_soft.shape)}")
        counts = is_item.sum(1)
        if int(counts.max()) > item_soft.shape[1]:
            raise ValueError(f"a prompt has {int(counts.max())} item placeholders but item_soft has "
                             f"only {item_soft.shape[1]} slots")
        rank = is_item.long().cumsum(1) - 1  # k-th placeholder of its row
        b, t = is_item.nonzero(as_tuple=True)
        out = out.index_put((b, t), item_soft[b, rank[b, t]].to(out.dtype))
    return out


def input_embedding_scale(module: torch.nn.Module) -> float | None:
    """The factor an input-embedding module multiplies its rows by (Gemma: sqrt(hidden), 25.3 for
    Gemma3-270M), at the module's weight dtype as its forward uses it; None when it does not scale."""
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return None
    weight = getattr(module, "weight", None)
    if isinstance(scale, torch.Tensor) and isinstance(weight, torch.Tensor) and weight.is_floating_point():
        scale = scale.to(weight.dtype)
    scale = float(scale)
    return None if scale == 1.0 else scale


def embed_with_soft_tokens(llm: torch.nn.Module, input_ids: torch.Tensor, placeholders: Placeholders,
                           user_soft: torch.Tensor | None = None,
                           item_soft: torch.Tensor | None = None) -> torch.Tensor:
    """LLM token embeddings of `input_ids` with soft tokens spliced in at the placeholders.
    The embedding module is called (not its weight indexed) so that DeepSpeed ZeRO-3 can gather it.

    Soft tokens live where embedding-table rows live: an embedding module that scales its rows
    (Gemma multiplies by sqrt(hidden)) scales the soft tokens too, so the LLM receives every input on
    the level it was trained on, and a soft token equal to a word's row acts exactly as that word."""
    p = placeholders
    safe = input_ids.masked_fill((input_ids == p.user_id) | (input_ids == p.item_id), p.fill_id)
    module = llm.get_input_embeddings()
    emb = module(safe)
    scale = input_embedding_scale(module)
    if scale is not None:
        user_soft = None if user_soft is None else user_soft * scale
        item_soft = None if item_soft is None else item_soft * scale
    return splice_soft_tokens(emb, input_ids, user_soft, item_soft, p)


# -- running the LLM on embeddings ----------------------------------------------------------------
def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (Llama would otherwise count pads as positions)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def supports_logits_to_keep(llm: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(llm.forward).parameters


def lm_forward(llm: torch.nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *,
               position_ids: torch.Tensor | None = None, past_key_values: Any = None,
               use_cache: bool = False, logits_to_keep: int = 0) -> tuple[torch.Tensor, Any]:
    """(logits of the last `logits_to_keep` positions (0: all), cache). `attention_mask` covers the
    cached positions plus the new ones; position ids default to the mask's running count."""
    n_new = inputs_embeds.shape[1]
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)[:, -n_new:]
    kw = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
              past_key_values=past_key_values, use_cache=use_cache)
    if supports_logits_to_keep(llm):
        out = llm(logits_to_keep=logits_to_keep, **kw)
        return out.logits, out.past_key_values
    # Architectures without logits_to_keep: run the backbone, project only the kept positions.
    backbone = getattr(llm, llm.base_model_prefix)
    out = backbone(**kw)
    h = out.last_hidden_state
    if logits_to_keep:
        h = h[:, -logits_to_keep:]
    return llm.get_output_embeddings()(h), out.past_key_values
