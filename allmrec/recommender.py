"""A-LLMRec composed: CF user representation + item vectors -> projectors -> soft-token prompt -> LLM.

One implementation used by Stage-2 training, evaluation and serving. An `Example` names a user's
history, the candidate items (in `candidate_order`) and, for training, the target; `LLMRecommender` turns a
list of examples into one left-padded batch and either computes the Stage-2 loss, ranks the candidates
by the LLM's likelihood of their titles, or generates a title (the paper's protocol).

Variants (config `stage2.item_tokens`, `stage2.use_user_token`):
  joint  - e_i = f_I^enc(E_i) from Stage-1                   (A-LLMRec)
  sbert  - q_i = f_T^enc(SBERT(text_i)) for every item      (A-LLMRec (SBERT))
  random - fixed random vectors in place of e_i              (ablation)
  mlp    - the CF embeddings E_i themselves, no Stage-1      (MLP-LLM)
  none   - no item soft tokens; with no user token and no projector: LLM-Only
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from allmrec.config import CANDIDATE_ORDERS
from allmrec.data.sampling import STREAM_CANDIDATE_ORDER
from allmrec.llm.prompt import PromptBuilder
from allmrec.llm.ranking import generate_titles, match_candidate, rank_candidates
from allmrec.llm.stage2 import Stage2Projector, soft_prompt_embeds, stage2_loss

ITEM_TOKEN_VARIANTS = ("joint", "sbert", "random", "none", "mlp")


@dataclass
class Example:
    user_rep: np.ndarray | None          # x_u (d,) from the CF model; None without a user token or the CF order
    history: Sequence[int]               # item ids, oldest first (the prompt shows the last history_len)
    candidates: Sequence[int]            # item ids in prompt order
    target: int | None = None            # item id (training / evaluation)


def candidate_order(candidates: Sequence[int | str], seed: int, user: int | None = None,
                    history: Sequence[int] | None = None) -> list[int | str]:
    """The seeded order in which candidates are shown to the LLM (evaluation and serving alike).

    The LLM is trained on shuffled candidates (the paper), so that a candidate's place in the list says
    nothing about it; a model trained with `stage2.candidate_order=cf` re-sorts them by CF score inside
    `LLMRecommender`, from this same order (its ties keep it). A known `user` gets default_rng([seed, user,
    9]): for [target, *negatives] exactly the order every model is evaluated on, and the order the service
    shows that user. Without a user, an anonymous `history` seeds the order (default_rng([seed, 9,
    *history])): same request, same answer.
    Candidates are item ids or new-item ids (str); numpy integers come back as int.
    """
    c = [int(x) if isinstance(x, np.integer) else x for x in candidates]
    if user is not None:
        key = [int(seed), int(user), STREAM_CANDIDATE_ORDER]
    elif history is not None:
        key = [int(seed), STREAM_CANDIDATE_ORDER, *map(int, history)]
    else:
        raise ValueError("candidate_order needs a user id or an anonymous history to seed the order")
    if min(key) < 0:
        raise ValueError(f"candidate_order: seed, user and history ids must be >= 0, got key {key}")
    np.random.default_rng(key).shuffle(c)
    return c


def standardize_items(v: np.ndarray) -> np.ndarray:
    """Per-dimension standardization over the catalogue (rows 1..n; row 0 = padding stays 0).

    Why: Stage-1's sigmoid encoder puts every e_i near 0.5 with item-to-item spread ~0.01 (measured on
    ML-100K), so F_I's output was ~99.9% the same vector for every item: the item soft tokens carried
    almost no item identity. Standardizing keeps all the information (an affine map fixed by the
    catalogue) and lets F_I see the differences between items from its first step.
    """
    v = np.asarray(v, dtype=np.float32)
    mu, sd = v[1:].mean(0, keepdims=True), v[1:].std(0, keepdims=True)
    out = (v - mu) / (sd + 1e-6)
    out[0] = 0.0
    return out.astype(np.float32)


def item_vector_table(variant: str, e: np.ndarray | None, q: np.ndarray | None, E: np.ndarray | None,
                      seed: int = 0) -> np.ndarray | None:
    """(n_items + 1, dim) vectors fed to F_I for the variant, indexed by item id; None for 'none'."""
    if variant == "joint":
        return standardize_items(e)
    if variant == "sbert":
        return standardize_items(q)
    if variant == "mlp":
        return standardize_items(E)
    if variant == "random":
        rng = np.random.default_rng(seed)
        return standardize_items(rng.random(e.shape, dtype=np.float32))
    if variant == "none":
        return None
    raise ValueError(f"unknown item token variant {variant!r}; expected one of {ITEM_TOKEN_VARIANTS}")


class Stage2Module(nn.Module):
    """The frozen LLM and the trainable projectors as one module (what DeepSpeed wraps)."""

    def __init__(self, llm: nn.Module, projector: Stage2Projector | None, choice_weight: float = 1.0,
                 candidate_softmax: float = 0.0):
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.choice_weight = choice_weight
        self.candidate_softmax = candidate_softmax

    def forward(self, batch: dict[str, torch.Tensor], placeholders) -> torch.Tensor:
        return stage2_loss(self.llm, self.projector, batch, batch.get("user_reps"), batch.get("item_embs"),
                           placeholders, choice_weight=self.choice_weight,
                           candidate_softmax=self.candidate_softmax, cand_first=batch.get("cand_first"))


class LLMRecommender:
    def __init__(self, llm: nn.Module, tokenizer, titles: Sequence[str], domain, *, projector: Stage2Projector | None,
                 item_vectors: np.ndarray | None, use_user_token: bool, history_len: int = 10,
                 max_title_tokens: int = 16, chat_prompt: bool = False, item_token_position: str = "after",
                 user_token_position: str = "start", candidate_order: str = "seeded",
                 cf_items: np.ndarray | torch.Tensor | None = None):
        if projector is None and (item_vectors is not None or use_user_token):
            raise ValueError("soft tokens need a projector (LLM-Only uses neither user nor item tokens)")
        if candidate_order not in CANDIDATE_ORDERS:
            raise ValueError(f"candidate_order must be one of {CANDIDATE_ORDERS}, got {candidate_order!r}")
        if candidate_order == "cf" and cf_items is None:
            # x_u comes with each example (Example.user_rep), fed to the LLM only with use_user_token
            raise ValueError("candidate_order='cf' needs the CF model's item embeddings (cf_items = cf.item_embeddings())")
        self.candidate_order = candidate_order
        # the CF model's E (n_items + 1, d): score(x_u, i) = <x_u, E_i> for every registered CF model
        self.cf_items = None if cf_items is None else torch.as_tensor(cf_items).detach().float().cpu().numpy()
        self.llm, self.tokenizer, self.projector = llm, tokenizer, projector
        self.titles = list(titles)  # index = item id; 0 = padding
        self.item_vectors = None if item_vectors is None else torch.tensor(np.asarray(item_vectors), dtype=torch.float32)
        self.use_user_token = use_user_token
        self.history_len = history_len
        self.prompts = PromptBuilder(tokenizer, domain, max_title_tokens, use_user_token=use_user_token,
                                     item_tokens=item_vectors is not None, chat=chat_prompt,
                                     item_position=item_token_position, user_position=user_token_position)
        self._target_ids: dict[int, list[int]] = {}

    @property
    def needs_user_rep(self) -> bool:
        """Whether examples must carry x_u: fed to the LLM (the user token) and/or sorting the list (CF order)."""
        return self.use_user_token or self.candidate_order == "cf"

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def target_ids(self, item: int) -> list[int]:
        if item not in self._target_ids:
            self._target_ids[item] = self.prompts.target_ids(self.titles[item])
        return self._target_ids[item]

    def prompt_order(self, ex: Example) -> np.ndarray:
        """Indices into `ex.candidates` in the order the prompt shows them. "seeded": as given (callers pass
        `candidate_order`'s shuffle). "cf": by <x_u, E_i>, best first; a stable sort, so ties keep the given
        order, and items past the CF model's table (the service's new items) come last, in the given order."""
        n = len(ex.candidates)
        if self.candidate_order == "seeded":
            return np.arange(n)
        if ex.user_rep is None:
            raise ValueError("candidate_order='cf' needs each example's user representation")
        ids = np.asarray(ex.candidates, dtype=np.int64)
        known = ids < len(self.cf_items)
        s = np.full(n, -np.inf, dtype=np.float64)
        s[known] = self.cf_items[ids[known]].astype(np.float64) @ np.asarray(ex.user_rep, dtype=np.float64)
        return np.argsort(-s, kind="stable")

    def shown(self, ex: Example, order: np.ndarray | None = None) -> Example:
        """`ex` with its candidates in prompt order (`order`, else `prompt_order(ex)`; the same example when
        the order is "seeded")."""
        if self.candidate_order == "seeded":
            return ex
        order = self.prompt_order(ex) if order is None else order
        return Example(ex.user_rep, ex.history, [ex.candidates[i] for i in order], ex.target)

    def batch(self, examples: Sequence[Example], with_target: bool,
              question: str | None = None, cand_first: bool = False) -> dict[str, torch.Tensor]:
        """Token ids, mask, labels and the CF vectors (user reps, item vectors in placeholder order).
        `question`: the user and history part of the prompt, then this question instead of the
        candidates (which, like the target, are then not shown)."""
        return self._encode([self.shown(ex) for ex in examples], with_target, question, cand_first)

    def _encode(self, examples: Sequence[Example], with_target: bool, question: str | None = None,
                cand_first: bool = False) -> dict[str, torch.Tensor]:
        """`batch` for examples whose candidates are already in prompt order."""
        if question is not None and with_target:
            raise ValueError("a question prompt has no target: call batch(..., with_target=False)")
        encs, slots = [], []
        for ex in examples:
            hist = list(ex.history)[-self.history_len:] if self.history_len else []
            if question is not None:
                encs.append(self.prompts.build_question([self.titles[i] for i in hist], question))
                slots.append(hist)
                continue
            tgt = self.titles[ex.target] if with_target else None
            encs.append(self.prompts.build([self.titles[i] for i in hist], [self.titles[i] for i in ex.candidates],
                                           tgt))
            slots.append([*hist, *ex.candidates])
        out = self.prompts.collate(encs)
        if cand_first:  # the candidates' first answer tokens (Stage-2's candidate_softmax), -1 = none
            C = max(len(ex.candidates) for ex in examples)
            out["cand_first"] = torch.tensor([[self.target_ids(i)[0] for i in ex.candidates] + [-1] * (C - len(ex.candidates))
                                              for ex in examples], dtype=torch.long)
        dev = self.device
        out = {k: v.to(dev) for k, v in out.items()}
        if self.use_user_token:
            reps = np.stack([np.asarray(ex.user_rep, dtype=np.float32) for ex in examples])
            out["user_reps"] = torch.from_numpy(reps).to(dev)
        if self.item_vectors is not None:
            S = max(len(s) for s in slots)
            idx = torch.zeros(len(slots), S, dtype=torch.long)
            for b, s in enumerate(slots):
                idx[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            out["item_embs"] = self.item_vectors[idx].to(dev)
        return out

    def embeds(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return soft_prompt_embeds(self.llm, self.projector, batch["input_ids"], self.prompts.placeholders,
                                  batch.get("user_reps"), batch.get("item_embs"))

    def loss(self, examples: Sequence[Example]) -> torch.Tensor:
        b = self.batch(examples, with_target=True)
        return stage2_loss(self.llm, self.projector, b, b.get("user_reps"), b.get("item_embs"),
                           self.prompts.placeholders)

    @torch.no_grad()
    def rank(self, examples: Sequence[Example], length_norm: bool = True) -> np.ndarray:
        """(B, C) log-likelihood scores of each example's candidates (higher is better), -inf past an
        example's own candidates. Batch-invariant: each example is embedded and run alone (projector,
        prompt and candidates), so its scores do not depend on the other examples of the call."""
        if not examples:
            raise ValueError("rank needs at least one example")
        out = np.full((len(examples), max(len(ex.candidates) for ex in examples)), -np.inf, dtype=np.float32)
        for r, ex in enumerate(examples):
            order = self.prompt_order(ex)
            ex = self.shown(ex, order)
            b = self._encode([ex], with_target=False)
            cands = [self.target_ids(i) for i in ex.candidates]
            s = rank_candidates(self.llm, self.embeds(b), b["attention_mask"], cands, length_norm=length_norm)
            out[r, order] = s.float().cpu().numpy()  # back to the caller's candidate order
        return out

    @torch.no_grad()
    def generate(self, examples: Sequence[Example], max_new_tokens: int = 32) -> list[tuple[str, int | None]]:
        """(generated text, index of the candidate it names exactly or None) per example. Each example is
        decoded alone (as `rank`): greedy choices do not depend on the rest of the batch."""
        out = []
        for ex in examples:
            order = self.prompt_order(ex)
            ex = self.shown(ex, order)
            b = self._encode([ex], with_target=False)
            (text,) = generate_titles(self.llm, self.embeds(b), b["attention_mask"], self.tokenizer, max_new_tokens)
            shown = [self.prompts.shown_title(self.titles[i]) for i in ex.candidates]
            m = match_candidate(text, shown)
            out.append((text, None if m is None else int(order[m])))  # the index in the caller's order
        return out

    @torch.no_grad()
    def ask(self, examples: Sequence[Example], question: str, max_new_tokens: int = 32) -> list[str]:
        """The LLM's greedy answer to `question` asked after each example's user and history (the same
        soft tokens as recommending; candidates and target unused), e.g. which genres the user likes."""
        b = self.batch(examples, with_target=False, question=question)
        return generate_titles(self.llm, self.embeds(b), b["attention_mask"], self.tokenizer, max_new_tokens)


def build_projector(variant: str, use_user_token: bool, user_dim: int, item_dim: int | None,
                    llm_dim: int) -> Stage2Projector | None:
    if variant == "none" and not use_user_token:
        return None
    return Stage2Projector(user_dim if use_user_token else None, None if variant == "none" else item_dim, llm_dim)
