"""The three model deployments of the service (CF, Aligner, LLM), the model version, and the numerics
that place a new item (given by text) in the space of the catalogue's item vectors.

Every artifact is found and loaded through `allmrec.artifacts.RunFolder` (the loaders evaluation and
`allmrec score` use): a served ranking is the offline ranking of the same user and candidates.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import logging

import numpy as np
import torch
from ray import serve

from allmrec.config import Config, config_from_dict

log = logging.getLogger("ray.serve")


def variant_tokens(variant: str) -> tuple[str, bool]:
    from allmrec.artifacts import LLM_VARIANTS
    return LLM_VARIANTS[variant]


def variant_of(cfg: Config) -> str:
    """The evaluation variant name of cfg.stage2's (item_tokens, use_user_token)."""
    from allmrec.artifacts import LLM_VARIANTS
    key = (cfg.stage2.item_tokens, cfg.stage2.use_user_token)
    for name, v in LLM_VARIANTS.items():
        if v == key:
            return name
    raise ValueError(f"no LLM variant has stage2.item_tokens={key[0]!r} and use_user_token={key[1]}")


def model_version(cfg: Config, variant: str) -> str:
    """<name>-<variant>-<12 hex>: a digest of the LLM name, the seed and every trained file the answer
    depends on (`RunFolder.model_files`)."""
    from allmrec.artifacts import RunFolder
    c = copy.deepcopy(cfg)
    c.stage2.item_tokens, c.stage2.use_user_token = variant_tokens(variant)
    h = hashlib.sha256(f"{variant}|{cfg.stage2.llm}|{cfg.seed}".encode())
    for p in RunFolder(c).model_files(variant):
        h.update(p.read_bytes())
    return f"{cfg.name}-{variant}-{h.hexdigest()[:12]}"


def _threads(cfg: Config, n: float) -> None:
    torch.set_num_threads(cfg.torch_threads or max(1, int(n)))


# ------------------------------------------------------------------------------------------ CF
@serve.deployment(name="CF", max_ongoing_requests=32)
class CFDeployment:
    """The CF model and the prepared users: x_u and the CF top-N candidates."""

    def __init__(self, cfg_dict: dict, threads: float = 1):
        from allmrec.artifacts import RunFolder

        cfg = config_from_dict(cfg_dict)
        _threads(cfg, threads)
        run = RunFolder(cfg)
        self.cf = run.load_cf()
        prep = run.prepared()
        self.n_items, self.n_users = prep.n_items, prep.n_users
        # regular users: the whole sequence (train + valid + test) is what precedes "now"
        seqs = prep.sequences
        self.regular = {int(u): np.asarray(s, dtype=np.int64) for u, s in zip(seqs["user"], seqs["seq"])}
        cold = prep.candidates("cold_users")
        self.cold = {int(u): np.asarray(h, dtype=np.int64) for u, h in zip(cold["user"], cold["history"])}

    def catalog(self) -> dict:
        return {"n_items": self.n_items, "n_users": self.n_users, "cf_model": self.cf.name,
                "n_regular": len(self.regular), "known_users": sorted(self.regular) + sorted(self.cold)}

    def represent(self, user_id: int | None, history: list[int] | None, n_candidates: int) -> dict:
        """{history, user_rep (d,), candidates: CF top-n items not in the history, best first}. One user
        per call, as `allmrec score` computes them: x_u does not depend on other requests."""
        from allmrec.artifacts import cf_top_n, user_reps
        if user_id is not None:
            if user_id in self.regular:
                hist, users = self.regular[user_id], [user_id]
            elif user_id in self.cold:
                hist, users = self.cold[user_id], None  # the CF model never trained on cold users
            else:
                raise ValueError(f"unknown user_id {user_id}")
        else:
            hist, users = np.asarray(history, dtype=np.int64), None
        x = user_reps(self.cf, [hist], users)
        cands = cf_top_n(self.cf, [hist], users, n_candidates, reps=x)[0][0].tolist() if n_candidates > 0 else []
        return {"history": hist.tolist(), "user_rep": x[0], "candidates": cands}


# ------------------------------------------------------------------------------------------ Aligner
def fit_item_map(raw: np.ndarray, table: np.ndarray, atol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per dimension with table[1:] == raw[1:] * scale + shift, fitted by least squares
    and verified exactly: the preprocessing `item_vector_table` applies to catalogue vectors (today a
    standardization over the catalogue), reproduced for new items without copying its formula. Raises
    if that preprocessing is not a per-dimension affine map."""
    x, y = raw[1:].astype(np.float64), table[1:].astype(np.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    var = (xc * xc).mean(0)
    scale = np.where(var > 0, (xc * yc).mean(0) / np.where(var > 0, var, 1), 0.0)
    shift = y.mean(0) - scale * x.mean(0)
    err = float(np.abs(x * scale + shift - y).max()) if len(x) else 0.0
    if err > atol * max(1.0, float(np.abs(y).max())):
        raise ValueError(f"the item vectors F_I reads are not a per-dimension affine map of the stage-1 vectors "
                         f"(residual {err:.2e}): serve cannot place new items; update fit_item_map")
    return scale.astype(np.float32), shift.astype(np.float32)


@serve.deployment(name="Aligner", max_ongoing_requests=8)
class AlignerDeployment:
    """Stage-1 text side for new items: the fine-tuned SBERT (base model + the exported layers, rebuilt
    as stage1's JointEmbedder does) -> f_T^enc -> q, then the same preprocessing the catalogue's vectors
    get before F_I (`fit_item_map`), so a new item's vector is in the table the LLM deployment reads.
    At start it re-embeds a few catalogue texts and checks them against q_i of Stage-1's item table:
    a wrong rebuild would put new items in another space."""

    CHECK_ITEMS = 8
    CHECK_TOL = 1e-3

    def __init__(self, cfg_dict: dict, item_tokens: str, threads: float = 1):
        from allmrec.align.sbert import TextEncoder, load_sbert
        from allmrec.align.stage1 import Stage1Aligner, Stage1Model
        from allmrec.artifacts import RunFolder
        from allmrec.recommender import item_vector_table

        if item_tokens not in ("joint", "sbert"):
            raise ValueError(f"the Aligner serves item_tokens joint|sbert, not {item_tokens!r}")
        cfg = config_from_dict(cfg_dict)
        _threads(cfg, threads)
        run = RunFolder(cfg)
        export = run.stage1_state()
        if "aligner.text_enc.0.weight" not in export or "aligner.item_enc.0.weight" not in export:
            raise ValueError(f"{run.stage1_export_path} holds no aligner weights: run `allmrec stage1` again")
        latent, cf_dim = export["aligner.item_enc.0.weight"].shape
        # trainable_layers=-1: one plain forward through SBERT (inference needs no lower-layer cache)
        te = TextEncoder(load_sbert(cfg.encode.model), trainable_layers=-1)
        self.model = Stage1Model(Stage1Aligner(int(cf_dim), te.dim, int(latent)), te)
        missing, unexpected = self.model.load_state_dict(export, strict=False)
        if unexpected or any(k.startswith("aligner.") for k in missing):
            raise ValueError(f"stage1 export does not fit {cfg.encode.model}: unexpected {unexpected[:5]}, "
                             f"missing {[k for k in missing if k.startswith('aligner.')][:5]}")
        self.model.eval()
        self.max_len = min(cfg.encode.max_seq_length, te.model_max_len)
        self.max_text_chars, self.sbert = cfg.data.max_text_chars, cfg.encode.model

        e, q = run.item_table()
        # a new item's q stands in for e_i (joint) or is q_i itself (sbert): the map of that column
        self.scale, self.shift = fit_item_map(e if item_tokens == "joint" else q,
                                              item_vector_table(item_tokens, e, q, None, seed=cfg.seed))
        items = run.prepared().items
        ids = items["item"].to_numpy()[: self.CHECK_ITEMS]
        texts = [str(t) for t in items["text"].to_numpy()[: self.CHECK_ITEMS]]
        self.check_err = float(np.abs(self._encode(texts) - q[ids]).max()) if len(ids) else 0.0
        if self.check_err > self.CHECK_TOL:
            raise ValueError(f"the rebuilt SBERT + f_T^enc differs from Stage-1's item table by "
                             f"{self.check_err:.2e} (> {self.CHECK_TOL}): is encode.model the one stage1 used?")

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> np.ndarray:
        """Raw q = f_T^enc(SBERT_ft(text)), as in Stage-1's item table."""
        from allmrec.align.stage1 import text_joint_embeddings
        te = self.model.text_encoder
        enc = te.tokenizer(texts, truncation=True, max_length=self.max_len, padding=True, return_tensors="pt")
        Q = te.forward_tokens(enc["input_ids"], enc["attention_mask"])
        return text_joint_embeddings(self.model.aligner, Q).float().cpu().numpy()

    def info(self) -> dict:
        return {"sbert": self.sbert, "dim": int(self.model.aligner.latent), "self_check_max_abs_err": self.check_err}

    def embed(self, items: list[tuple[str, str]]) -> np.ndarray:
        """(n, d') vectors of (title, description) pairs ("Title: t, Description: d" -> q), in the space
        of the LLM deployment's item-vector table."""
        from allmrec.data.text import clean_text, item_text
        if not items:
            return np.zeros((0, self.model.aligner.latent), dtype=np.float32)
        texts = [item_text(t, clean_text(d), self.max_text_chars) for t, d in items]
        return (self._encode(texts) * self.scale + self.shift).astype(np.float32)


# ------------------------------------------------------------------------------------------ LLM
@serve.deployment(name="LLM", max_ongoing_requests=16)
class LLMDeployment:
    """LLMRecommender with dynamic batching: concurrent requests are collected into one call.

    LLMRecommender.rank runs each request alone inside the call (batch-invariant: a request's scores do
    not depend on its company) and its candidates share the prompt's KV cache, so a batch's memory is
    one request's, whatever the batch size and candidate count. A request: {user_rep, history, candidates
    (catalogue ids and new-item ids in prompt order), new_items {id: (title, item vector from the
    Aligner, or None)}, mode, k}. New items get temporary ids past the catalogue for the length of one
    batch (titles and vectors appended, then removed)."""

    def __init__(self, cfg_dict: dict, variant: str, max_batch_size: int = 8, batch_wait_s: float = 0.02,
                 threads: float = 1, use_gpu: bool = False):
        from allmrec.artifacts import RunFolder

        cfg = config_from_dict(cfg_dict)
        _threads(cfg, threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.rec, cf, _ = RunFolder(cfg).load_recommender(variant, device=device)
        self.cfg, self.variant = cfg, variant
        self.version = model_version(cfg, variant)
        self.recommend.set_max_batch_size(max_batch_size)
        self.recommend.set_batch_wait_timeout_s(batch_wait_s)
        # one throw-away forward pass: the first user should not pay for lazy initialisation
        n = len(self.rec.titles) - 1
        self._score([{"user_rep": np.zeros(cf.hidden, dtype=np.float32), "history": [1], "new_items": {},
                      "candidates": list(range(1, min(n, 2) + 1)), "mode": "rank", "k": 1}])

    def info(self) -> dict:
        c = self.cfg
        return {"model_version": self.version, "variant": self.variant, "llm": c.stage2.llm,
                "item_tokens": variant_tokens(self.variant)[0], "use_user_token": self.rec.use_user_token,
                "has_item_vectors": self.rec.item_vectors is not None}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def recommend(self, requests: list[dict]) -> list[dict]:
        # the forward passes run in a thread, so the event loop keeps collecting the next batch
        return await asyncio.to_thread(self._run_batch, requests)

    def _run_batch(self, requests: list[dict]) -> list[dict]:
        try:
            return self._score(requests)
        except Exception as e:  # noqa: BLE001  (one bad request must not fail the others of its batch)
            if len(requests) > 1:
                return [self._run_batch([r])[0] for r in requests]
            if isinstance(e, ValueError):  # input the model cannot take (e.g. a title with no tokens)
                return [{"error": str(e), "status": 422}]
            log.exception("LLM request failed")
            return [{"error": "the model failed on this request", "status": 500}]

    def _score(self, requests: list[dict]) -> list[dict]:
        from allmrec.data.text import prompt_title
        from allmrec.recommender import Example

        rec = self.rec
        titles0, vecs0 = rec.titles, rec.item_vectors
        extra_titles, extra_vecs, examples = [], [], []
        for r in requests:
            local = {}
            for nid, (title, vec) in r["new_items"].items():
                if vecs0 is not None and vec is None:
                    raise ValueError(f"new item {nid!r} has no vector but the {self.variant} prompt needs one")
                local[nid] = len(titles0) + len(extra_titles)
                extra_titles.append(prompt_title(title, nid, self.cfg.data.max_title_chars))
                extra_vecs.append(vec)
            cands = [local[c] if isinstance(c, str) else int(c) for c in r["candidates"]]
            examples.append(Example(r["user_rep"], r["history"], cands))
        try:
            if extra_titles:
                rec.titles = titles0 + extra_titles
                if vecs0 is not None:
                    new = torch.as_tensor(np.stack(extra_vecs), dtype=vecs0.dtype)
                    rec.item_vectors = torch.cat([vecs0, new])
            out: list[dict] = [{} for _ in requests]
            for mode in ("rank", "generate"):
                idx = [j for j, r in enumerate(requests) if r["mode"] == mode]
                if not idx:
                    continue
                exs = [examples[j] for j in idx]
                if mode == "rank":
                    scores = rec.rank(exs, length_norm=self.cfg.eval.length_norm)
                    for row, j in enumerate(idx):
                        s = scores[row, : len(exs[row].candidates)]
                        top = np.argsort(-s, kind="stable")[: requests[j]["k"]]
                        out[j] = {"items": [(requests[j]["candidates"][t], rec.titles[exs[row].candidates[t]],
                                             float(s[t]) if np.isfinite(s[t]) else None) for t in top]}
                else:
                    gens = rec.generate(exs, max_new_tokens=self.cfg.eval.max_new_tokens)
                    for (text, m), j, ex in zip(gens, idx, exs):
                        hit = [] if m is None else [(requests[j]["candidates"][m], rec.titles[ex.candidates[m]], None)]
                        out[j] = {"items": hit, "generated": text}
            return out
        finally:  # temporary ids must not outlive the batch (titles, vectors, cached target ids)
            rec.titles, rec.item_vectors = titles0, vecs0
            for i in range(len(titles0), len(titles0) + len(extra_titles)):
                rec._target_ids.pop(i, None)
