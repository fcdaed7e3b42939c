"""The online A-LLMRec service: three model deployments behind a FastAPI ingress, on Ray Serve.

    HTTP -> Ingress (validation, candidate order, 4xx/503)
              |-> CF       x_u of a known user or of an explicit history; the CF top-N as candidates
              |-> Aligner  q = f_T^enc(SBERT_ft(text)) for NEW items (only when a request has some)
              '-> LLM      LLMRecommender.rank / .generate, dynamic batching with @serve.batch

Each deployment loads its models once per replica and scales on its own (autoscaling_config); the
queues in front of them are bounded (max_queued_requests), so overload gives 503 + Retry-After,
never an unbounded backlog. Catalogue item vectors (e_i or q_i) are read by the LLM deployment
through `allmrec.artifacts.load_recommender`, the loader evaluation uses, so a served ranking is the
offline ranking of the same user and candidates. A new item has no CF embedding, so it gets the
text-side q (the "A-LLMRec (SBERT)" path of the paper): recommendable without retraining.

`build_app(cfg)` returns the Serve application; `app_builder(args)` is the same for `serve run` /
`serve deploy` with serve/config.yaml. serve/ builds on allmrec/ only (never on pipelines/).

No `from __future__ import annotations` here: Serve ships the ingress class by value (cloudpickle),
and FastAPI could then not resolve string annotations such as "RecommendRequest" in the replica.
"""
import asyncio
import copy
import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from allmrec.config import Config, config_from_dict, load_config
from allmrec.recommender import candidate_order  # evaluation's order: a served ranking is the offline one
from serve.schemas import (MAX_NEW_ITEMS, ErrorResponse, Health, ModelInfo, ModelsResponse, RecommendRequest,
                           RecommendResponse)

log = logging.getLogger("ray.serve")
APP_NAME = "allmrec"
NEW_ITEM_TOKENS = ("joint", "sbert", "none")  # variants that can place a text-only item in a prompt


@dataclass
class Tuning:
    """Serving knobs not in `cfg.serve`. Deployment options here are defaults: serve/config.yaml
    (or `serve deploy`) overrides them per deployment without code changes."""
    max_body_bytes: int = 64 * 1024
    max_batch_size: int = 8           # LLM requests per forward pass
    batch_wait_s: float = 0.02        # how long the first request of a batch waits for company
    ingress_max_ongoing: int = 64
    ingress_max_queued: int = 128
    model_max_queued: int = 64        # CF and Aligner
    llm_max_ongoing: int = 16         # >= max_batch_size, or batches can never fill
    llm_max_queued: int = 32
    retry_after_s: float = 1.0
    llm_num_cpus: float = 1.0
    llm_num_gpus: float = 0.0         # 1 on a GPU cluster (the LLM then runs in bf16 on cuda)
    small_num_cpus: float = 0.25      # ingress, CF, aligner: light work per request

    @classmethod
    def from_dict(cls, d: dict | None) -> "Tuning":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d or {}) - names)
        if unknown:
            raise ValueError(f"unknown serving tuning keys {unknown}; known: {sorted(names)}")
        return cls(**(d or {}))


def variant_of(cfg: Config) -> str:
    """The evaluation variant name of cfg.stage2's (item_tokens, use_user_token)."""
    from allmrec.artifacts import LLM_VARIANTS
    key = (cfg.stage2.item_tokens, cfg.stage2.use_user_token)
    for name, v in LLM_VARIANTS.items():
        if v == key:
            return name
    raise ValueError(f"no LLM variant has stage2.item_tokens={key[0]!r} and use_user_token={key[1]}")


def model_version(cfg: Config, variant: str) -> str:
    """<name>-<variant>-<12 hex>: a digest of the LLM name and every trained file the answer depends on."""
    from allmrec.artifacts import LLM_VARIANTS, PROJECTOR, run_dir, stage2_dir
    c = copy.deepcopy(cfg)
    c.stage2.item_tokens, c.stage2.use_user_token = LLM_VARIANTS[variant]
    h = hashlib.sha256(f"{variant}|{cfg.stage2.llm}|{cfg.seed}".encode())
    for p in (run_dir(c, "cf", "model.safetensors"), run_dir(c, "stage1", "export.safetensors"),
              stage2_dir(c) / PROJECTOR):
        if p.is_file():
            h.update(p.read_bytes())
    return f"{cfg.name}-{variant}-{h.hexdigest()[:12]}"


def _threads(cfg: Config, n: float) -> None:
    torch.set_num_threads(cfg.torch_threads or max(1, int(n)))


# ------------------------------------------------------------------------------------------ CF
@serve.deployment(name="CF", max_ongoing_requests=32)
class CFDeployment:
    """The CF model and the prepared users: x_u and the CF top-N candidates."""

    def __init__(self, cfg_dict: dict, threads: float = 1):
        from allmrec.artifacts import run_dir
        from allmrec.cf import load_cf_model
        from allmrec.data.load import Prepared

        cfg = config_from_dict(cfg_dict)
        _threads(cfg, threads)
        self.cf = load_cf_model(run_dir(cfg, "cf")).eval()
        prep = Prepared(run_dir(cfg, "data"))
        self.n_items, self.n_users = prep.n_items, prep.n_users
        # regular users: the whole sequence (train + valid + test) is what precedes "now"
        seqs = prep.sequences
        self.regular = {int(u): np.asarray(s, dtype=np.int64) for u, s in zip(seqs["user"], seqs["seq"])}
        cold = prep.candidates("cold_users")
        self.cold = {int(u): np.asarray(h, dtype=np.int64) for u, h in zip(cold["user"], cold["history"])}
        with torch.no_grad():
            self.E = self.cf.item_embeddings().detach().float()

    def catalog(self) -> dict:
        return {"n_items": self.n_items, "n_users": self.n_users, "cf_model": self.cf.name,
                "n_regular": len(self.regular), "known_users": sorted(self.regular) + sorted(self.cold)}

    def represent(self, user_id: int | None, history: list[int] | None, n_candidates: int) -> dict:
        """{history, user_rep (d,), candidates: CF top-n items not in the history, best first}."""
        from allmrec.artifacts import user_reps
        if user_id is not None:
            if user_id in self.regular:
                hist, users = self.regular[user_id], [user_id]
            elif user_id in self.cold:
                hist, users = self.cold[user_id], None  # the CF model never trained on cold users
            else:
                raise ValueError(f"unknown user_id {user_id}")
        else:
            hist, users = np.asarray(history, dtype=np.int64), None
        x = user_reps(self.cf, [hist], users)[0]
        cands: list[int] = []
        if n_candidates > 0:
            with torch.no_grad():
                s = self.E @ torch.from_numpy(x)
            s[0] = float("-inf")
            s[torch.from_numpy(hist)] = float("-inf")
            n = min(n_candidates, int(torch.isfinite(s).sum()))
            cands = torch.topk(s, n).indices.tolist()
        return {"history": hist.tolist(), "user_rep": x, "candidates": cands}


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
                         f"(residual {err:.2e}): serve/app.py cannot place new items; update fit_item_map")
    return scale.astype(np.float32), shift.astype(np.float32)


@serve.deployment(name="Aligner", max_ongoing_requests=8)
class AlignerDeployment:
    """Stage-1 text side for new items: the fine-tuned SBERT (base model + the exported layers, rebuilt
    as stage1's JointEmbedder does) -> f_T^enc -> q, then the same preprocessing the catalogue's vectors
    get before F_I (`fit_item_map`), so a new item's vector is in the table the LLM deployment reads.
    At start it re-embeds a few catalogue texts and checks them against q_i of stage1/joint_emb.parquet:
    a wrong rebuild would put new items in another space."""

    CHECK_ITEMS = 8
    CHECK_TOL = 1e-3

    def __init__(self, cfg_dict: dict, item_tokens: str, threads: float = 1):
        from safetensors.torch import load as st_load

        from allmrec.align.sbert import TextEncoder, load_sbert
        from allmrec.align.stage1 import Stage1Aligner, Stage1Model
        from allmrec.artifacts import load_joint_embeddings, run_dir
        from allmrec.data.load import Prepared
        from allmrec.recommender import item_vector_table

        if item_tokens not in ("joint", "sbert"):
            raise ValueError(f"the Aligner serves item_tokens joint|sbert, not {item_tokens!r}")
        cfg = config_from_dict(cfg_dict)
        _threads(cfg, threads)
        export = st_load(run_dir(cfg, "stage1", "export.safetensors").read_bytes())
        if "aligner.text_enc.0.weight" not in export or "aligner.item_enc.0.weight" not in export:
            raise ValueError("stage1/export.safetensors holds no aligner weights: run `allmrec stage1` again")
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

        e, q = load_joint_embeddings(run_dir(cfg))
        # a new item's q stands in for e_i (joint) or is q_i itself (sbert): the map of that column
        self.scale, self.shift = fit_item_map(e if item_tokens == "joint" else q,
                                              item_vector_table(item_tokens, e, q, None, seed=cfg.seed))
        items = Prepared(run_dir(cfg, "data")).items
        ids = items["item"].to_numpy()[: self.CHECK_ITEMS]
        texts = [str(t) for t in items["text"].to_numpy()[: self.CHECK_ITEMS]]
        self.check_err = float(np.abs(self._encode(texts) - q[ids]).max()) if len(ids) else 0.0
        if self.check_err > self.CHECK_TOL:
            raise ValueError(f"the rebuilt SBERT + f_T^enc differs from stage1/joint_emb.parquet by "
                             f"{self.check_err:.2e} (> {self.CHECK_TOL}): is encode.model the one stage1 used?")

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> np.ndarray:
        """Raw q = f_T^enc(SBERT_ft(text)), as in stage1/joint_emb.parquet."""
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
    """LLMRecommender with dynamic batching: concurrent requests share one forward pass.

    A request: {user_rep, history, candidates (catalogue ids and new-item ids in prompt order),
    new_items {id: (title, item vector from the Aligner, or None)}, mode, k}. New items get temporary ids past the
    catalogue for the length of one batch (titles and vectors appended, then removed)."""

    def __init__(self, cfg_dict: dict, variant: str, max_batch_size: int = 8, batch_wait_s: float = 0.02,
                 threads: float = 1, use_gpu: bool = False):
        from allmrec.artifacts import load_recommender

        cfg = config_from_dict(cfg_dict)
        _threads(cfg, threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.rec, cf, _ = load_recommender(cfg, variant, device=device)
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
                "item_tokens": _variant_tokens(self.variant)[0], "use_user_token": self.rec.use_user_token,
                "has_item_vectors": self.rec.item_vectors is not None}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def recommend(self, requests: list[dict]) -> list[dict]:
        # the forward pass runs in a thread, so the event loop keeps collecting the next batch
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
                                             float(s[t])) for t in top]}
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


def _variant_tokens(variant: str) -> tuple[str, bool]:
    from allmrec.artifacts import LLM_VARIANTS
    return LLM_VARIANTS[variant]


# ------------------------------------------------------------------------------------------ Ingress
def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _ids_preview(ids: list) -> str:
    return ", ".join(map(str, ids[:5])) + (f" (+{len(ids) - 5} more)" if len(ids) > 5 else "")


@serve.deployment(name="Ingress", max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    """HTTP: validation (4xx for every client mistake), candidate set and order, the three calls."""

    async def __init__(self, cfg_dict: dict, variant: str, tuning: dict, cf: DeploymentHandle,
                       aligner: DeploymentHandle | None, llm: DeploymentHandle):
        self.cfg = config_from_dict(cfg_dict)
        self.variant, self.tuning = variant, Tuning.from_dict(tuning)
        self.cf, self.aligner, self.llm = cf, aligner, llm
        # the catalogue and model facts every request is validated against, fetched once
        self.catalog = await cf.catalog.remote()
        self.known_users = set(self.catalog["known_users"])
        self.llm_info = await llm.info.remote()
        self.aligner_info = await aligner.info.remote() if aligner is not None else None

    # -- validation -------------------------------------------------------------------------------
    def _validate(self, req: RecommendRequest) -> None:
        s, n_items = self.cfg.serve, self.catalog["n_items"]

        def bad(msg: str, status: int = 422):
            raise HTTPException(status_code=status, detail=msg)

        if req.user_id is not None and req.user_id not in self.known_users:
            bad(f"unknown user_id {req.user_id}: known users have ids in 0..{self.catalog['n_users'] - 1} "
                "and a recorded history; send `history` for anyone else", 404)
        if req.history is not None:
            if not req.history:
                bad("history is empty: give at least one item id")
            if len(req.history) > s.max_history:
                bad(f"history has {len(req.history)} items; at most serve.max_history={s.max_history}")
            wrong = [i for i in req.history if not 1 <= i <= n_items]
            if wrong:
                bad(f"history holds unknown item ids {_ids_preview(wrong)}; item ids are 1..{n_items}")
        new_ids = [n.id for n in req.new_items]
        new = set(new_ids)
        if len(new) != len(new_ids):
            bad("new_items ids must be distinct")
        if req.new_items and not self.new_items_supported:
            bad(f"the {self.variant} model cannot rank new items (it needs CF embeddings for every item)")
        if req.candidates is not None:
            if not req.candidates and not req.new_items:
                bad("candidates is empty: give at least one item (or omit it for the CF top-N)")
            if len(set(map(repr, req.candidates))) != len(req.candidates):
                bad("candidates must be distinct")
            wrong = [c for c in req.candidates if isinstance(c, int) and not 1 <= c <= n_items]
            if wrong:
                bad(f"candidates hold unknown item ids {_ids_preview(wrong)}; item ids are 1..{n_items}")
            unknown_new = [c for c in req.candidates if isinstance(c, str) and c not in new]
            if unknown_new:
                bad(f"candidates name new items {_ids_preview(unknown_new)} that are not in new_items")
            total = len(set(map(repr, req.candidates)) | {repr(i) for i in new_ids})
            if total > s.max_candidates:
                bad(f"{total} candidates; at most serve.max_candidates={s.max_candidates}")
        elif len(new_ids) > s.max_candidates:
            bad(f"{len(new_ids)} new items; at most serve.max_candidates={s.max_candidates} candidates")

    @property
    def new_items_supported(self) -> bool:
        return _variant_tokens(self.variant)[0] in NEW_ITEM_TOKENS and (
            self.aligner is not None or not self.llm_info["has_item_vectors"])

    # -- the request --------------------------------------------------------------------------------
    async def recommend(self, req: RecommendRequest):
        self._validate(req)
        new = {n.id: n for n in req.new_items}
        pool = 0 if req.candidates is not None else max(0, min(self.cfg.score.pool_size,
                                                                 self.cfg.serve.max_candidates - len(new)))
        retry = {"Retry-After": str(max(1, int(np.ceil(self.tuning.retry_after_s))))}
        try:
            cf_out = await self.cf.represent.remote(req.user_id, req.history, pool)
            cands = list(req.candidates) if req.candidates is not None else cf_out["candidates"]
            cands += [i for i in new if i not in cands]
            if not cands:
                return _error(422, "no candidates: the catalogue has no item outside this history")
            cands = candidate_order(cands, self.cfg.seed, user=req.user_id, history=cf_out["history"])
            vecs = [None] * len(new)
            if new and self.llm_info["has_item_vectors"]:
                vecs = list(await self.aligner.embed.remote([(n.title, n.description) for n in new.values()]))
            out = await self.llm.recommend.remote({
                "user_rep": cf_out["user_rep"], "history": cf_out["history"], "candidates": cands,
                "new_items": {nid: (n.title, v) for (nid, n), v in zip(new.items(), vecs)},
                "mode": req.mode, "k": req.k})
        except BackPressureError:
            return _error(503, "overloaded: too many requests in flight, retry later", retry)
        except DeploymentUnavailableError:
            return _error(503, "a model deployment is unavailable, retry later", retry)
        if "error" in out:
            return _error(out["status"], out["error"])
        return RecommendResponse(items=[{"item": i, "title": t, "score": sc} for i, t, sc in out["items"]],
                                 model_version=self.llm_info["model_version"], mode=req.mode,
                                 n_candidates=len(cands), generated=out.get("generated"))

    def models(self) -> ModelsResponse:
        s = self.cfg.serve
        info = ModelInfo(
            model_version=self.llm_info["model_version"], variant=self.variant, llm=self.llm_info["llm"],
            cf_model=self.catalog["cf_model"], item_tokens=self.llm_info["item_tokens"],
            use_user_token=self.llm_info["use_user_token"], n_items=self.catalog["n_items"],
            n_users=self.catalog["n_users"], new_items=self.new_items_supported, modes=["rank", "generate"],
            limits={"max_history": s.max_history, "max_candidates": s.max_candidates, "max_new_items": MAX_NEW_ITEMS,
                    "cf_pool_size": self.cfg.score.pool_size, "max_body_bytes": self.tuning.max_body_bytes},
            aligner=self.aligner_info)
        return ModelsResponse(models=[info])

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = FastAPI(title="allmrec", version="1", max_body_size=self.tuning.max_body_bytes,
                      description="A-LLMRec recommendations: a CF model's user representation and aligned "
                                  "item embeddings as soft tokens of a frozen LLM that ranks candidate items.")
        # every status a client mistake here gets, as it is on the wire (bench/serve_fuzz.py checks this):
        # 400 = a body that is not UTF-8 (FastAPI); 413 = Starlette's body limit, which answers in plain text
        errors: dict = {c: {"model": ErrorResponse} for c in (400, 404, 422, 503)}
        errors[413] = {"description": f"request body over {self.tuning.max_body_bytes} bytes",
                       "content": {"text/plain": {"schema": {"type": "string"}}}}

        @api.post("/v1/recommend", response_model=RecommendResponse, responses=errors)
        async def recommend(req: RecommendRequest):
            """Top-k items for a known user (`user_id`) or an anonymous `history`."""
            return await self.recommend(req)

        @api.get("/v1/models", response_model=ModelsResponse)
        async def models():
            return self.models()

        @api.get("/healthz", response_model=Health)
        async def healthz():
            return Health(status="ok", model_version=self.llm_info["model_version"])

        @api.exception_handler(Exception)
        async def internal(_, exc: Exception):  # a bug, never client input: log it, say little
            log.exception("unhandled error in /v1 request", exc_info=exc)
            return _error(500, "internal error")

        return api


# ------------------------------------------------------------------------------------------ assembly
def build_app(cfg: Config, variant: str | None = None, tuning: Tuning | dict | None = None):
    """The Serve application for a trained run folder (cfg.run_dir): CF, Aligner (when the variant
    embeds items), LLM and the ingress, with autoscaling between cfg.serve.min/max_replicas."""
    variant = variant or variant_of(cfg)
    item_tokens, _ = _variant_tokens(variant)
    t = tuning if isinstance(tuning, Tuning) else Tuning.from_dict(tuning)
    if t.llm_max_ongoing < t.max_batch_size:
        raise ValueError(f"llm_max_ongoing ({t.llm_max_ongoing}) must be >= max_batch_size ({t.max_batch_size})")
    s = cfg.serve
    if not 0 < s.min_replicas <= s.max_replicas:
        raise ValueError(f"need 0 < serve.min_replicas <= serve.max_replicas, got {s.min_replicas}, {s.max_replicas}")
    cfg_dict = cfg.to_dict()

    def scale(target: float) -> dict:
        return {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas, "target_ongoing_requests": target}

    bp = BackpressureConfig(status_code=503, retry_after_s=t.retry_after_s)
    small = {"num_cpus": t.small_num_cpus}
    cf = CFDeployment.options(ray_actor_options=small, autoscaling_config=scale(8),
                              max_queued_requests=t.model_max_queued, backpressure_config=bp).bind(cfg_dict, 1)
    aligner = None
    if item_tokens in ("joint", "sbert"):
        aligner = AlignerDeployment.options(ray_actor_options=small, autoscaling_config=scale(2),
                                            max_queued_requests=t.model_max_queued,
                                            backpressure_config=bp).bind(cfg_dict, item_tokens, 1)
    llm = LLMDeployment.options(
        ray_actor_options={"num_cpus": t.llm_num_cpus, "num_gpus": t.llm_num_gpus},
        autoscaling_config=scale(t.max_batch_size), max_ongoing_requests=t.llm_max_ongoing,
        max_queued_requests=t.llm_max_queued, backpressure_config=bp,
    ).bind(cfg_dict, variant, t.max_batch_size, t.batch_wait_s, max(1.0, t.llm_num_cpus), t.llm_num_gpus > 0)
    return Ingress.options(
        ray_actor_options=small, autoscaling_config=scale(t.ingress_max_ongoing // 2),
        max_ongoing_requests=t.ingress_max_ongoing, max_queued_requests=t.ingress_max_queued, backpressure_config=bp,
    ).bind(cfg_dict, variant, dataclasses.asdict(t), cf, aligner, llm)


def app_builder(args: dict[str, Any]):
    """For `serve run serve/config.yaml` / `serve deploy`: args {config, overrides, variant, tuning}."""
    known = {"config", "overrides", "variant", "tuning"}
    if set(args) - known:
        raise ValueError(f"unknown application args {sorted(set(args) - known)}; known: {sorted(known)}")
    path = args.get("config")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(Path(os.path.expanduser(path)) if path else None, list(overrides))
    return build_app(cfg, args.get("variant"), args.get("tuning"))
