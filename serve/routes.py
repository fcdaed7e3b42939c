"""The HTTP routes: `RecommendService` (what the ingress does with a request, no Ray needed: tests drive it
with fake handles through FastAPI's TestClient), `build_api` (the FastAPI app with its limits and error
handlers) and `Ingress`, the Serve deployment that runs them against the model deployments.

No `from __future__ import annotations` here: FastAPI must resolve the route annotations (e.g.
RecommendRequest) to classes in the replica.
"""
import logging

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from allmrec.config import Config, config_from_dict
from allmrec.recommender import candidate_order  # evaluation's order: a served ranking is the offline one
from serve import metrics
from serve.deployments import variant_tokens
from serve.schemas import MAX_NEW_ITEMS, Health, ModelInfo, ModelsResponse, RecommendRequest, RecommendResponse
from serve.tuning import Tuning
from serve.validation import (HttpLimits, SafeJSONResponse, check_request, documented_errors, error,
                              install_error_handlers)

log = logging.getLogger("ray.serve")
NEW_ITEM_TOKENS = ("joint", "sbert", "none")  # variants that can place a text-only item in a prompt
# A downstream replica that died or became unreachable while answering (SIGKILL, OOM kill, node loss):
# the request is not retried (the model may be what killed it); the client gets 503 + Retry-After.
REPLICA_LOST = (RayActorError, ActorUnavailableError)


class RecommendService:
    """Validation (4xx for every client mistake), the candidate set and order, the calls to the CF,
    Aligner and LLM deployments (`cf`, `aligner`, `llm`: Serve handles, or anything with the same
    `.method.remote(...)` awaitables), and 503 + Retry-After when a deployment is overloaded or lost."""

    def __init__(self, cfg: Config, variant: str, tuning: Tuning, cf, aligner, llm, catalog: dict, llm_info: dict,
                 aligner_info: dict | None):
        self.cfg, self.variant, self.tuning = cfg, variant, tuning
        self.cf, self.aligner, self.llm = cf, aligner, llm
        self.catalog, self.llm_info, self.aligner_info = catalog, llm_info, aligner_info
        self.known_users = set(catalog["known_users"])

    @property
    def new_items_supported(self) -> bool:
        return variant_tokens(self.variant)[0] in NEW_ITEM_TOKENS and (
            self.aligner is not None or not self.llm_info["has_item_vectors"])

    def retry_headers(self) -> dict:
        return {"Retry-After": str(max(1, int(np.ceil(self.tuning.retry_after_s))))}

    async def recommend(self, req: RecommendRequest):
        s = self.cfg.serve
        check_request(req, known_users=self.known_users, n_users=self.catalog["n_users"],
                      n_items=self.catalog["n_items"], max_history=s.max_history, max_candidates=s.max_candidates,
                      variant=self.variant, new_items_supported=self.new_items_supported)
        new = {n.id: n for n in req.new_items}
        metrics.count_request(self.variant, req.mode, list(new.values()))  # Prometheus (serve/metrics.py)
        pool = 0 if req.candidates is not None else max(0, min(self.cfg.score.pool_size, s.max_candidates - len(new)))
        try:
            cf_out = await self.cf.represent.remote(req.user_id, req.history, pool)
            cands = list(req.candidates) if req.candidates is not None else cf_out["candidates"]
            cands += [i for i in new if i not in cands]
            if not cands:
                return error(422, "no candidates: the catalogue has no item outside this history")
            cands = candidate_order(cands, self.cfg.seed, user=req.user_id, history=cf_out["history"])
            vecs = [None] * len(new)
            if new and self.llm_info["has_item_vectors"]:
                vecs = list(await self.aligner.embed.remote([(n.title, n.description) for n in new.values()]))
            out = await self.llm.recommend.remote({
                "user_rep": cf_out["user_rep"], "history": cf_out["history"], "candidates": cands,
                "new_items": {nid: (n.title, v) for (nid, n), v in zip(new.items(), vecs)},
                "mode": req.mode, "k": req.k})
        except BackPressureError:
            return error(503, "overloaded: too many requests in flight, retry later", self.retry_headers())
        except DeploymentUnavailableError:
            return error(503, "a model deployment is unavailable, retry later", self.retry_headers())
        except REPLICA_LOST:
            log.warning("a model replica was lost while answering a request: 503 + Retry-After")
            return error(503, "a model replica was lost while answering, retry later", self.retry_headers())
        if "error" in out:
            return error(out["status"], out["error"])
        return RecommendResponse(items=[{"item": i, "title": t, "score": sc} for i, t, sc in out["items"]],
                                 model_version=self.llm_info["model_version"], mode=req.mode,
                                 n_candidates=len(cands), generated=out.get("generated"))

    def models(self) -> ModelsResponse:
        s, t = self.cfg.serve, self.tuning
        info = ModelInfo(
            model_version=self.llm_info["model_version"], variant=self.variant, llm=self.llm_info["llm"],
            cf_model=self.catalog["cf_model"], item_tokens=self.llm_info["item_tokens"],
            use_user_token=self.llm_info["use_user_token"], n_items=self.catalog["n_items"],
            n_users=self.catalog["n_users"], new_items=self.new_items_supported, modes=["rank", "generate"],
            limits={"max_history": s.max_history, "max_candidates": s.max_candidates, "max_new_items": MAX_NEW_ITEMS,
                    "cf_pool_size": self.cfg.score.pool_size, "max_body_bytes": t.max_body_bytes,
                    "max_header_bytes": t.max_header_bytes, "max_header_count": t.max_header_count},
            aligner=self.aligner_info)
        return ModelsResponse(models=[info])


def build_api(service: RecommendService) -> FastAPI:
    """The FastAPI app of one ingress replica: routes, JSON errors that never echo the input, HTTP limits."""
    t = service.tuning
    api = FastAPI(title="allmrec", version="1", default_response_class=SafeJSONResponse,
                  description="A-LLMRec recommendations: a CF model's user representation and aligned item "
                              "embeddings as soft tokens of a frozen LLM that ranks candidate items.")

    @api.post("/v1/recommend", response_model=RecommendResponse, responses=documented_errors(t))
    async def recommend(req: RecommendRequest):
        """Top-k items for a known user (`user_id`) or an anonymous `history`."""
        return await service.recommend(req)

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models():
        return service.models()

    @api.get("/healthz", response_model=Health)
    async def healthz():
        return Health(status="ok", model_version=service.llm_info["model_version"])

    install_error_handlers(api, log)
    api.add_middleware(HttpLimits, max_body_bytes=t.max_body_bytes, max_header_bytes=t.max_header_bytes,
                       max_header_count=t.max_header_count, body_timeout_s=t.body_timeout_s)
    api.add_middleware(metrics.ClientErrorMetrics)  # added last = outermost: sees every 4xx, HttpLimits' too
    return api


@serve.deployment(name="Ingress", max_ongoing_requests=64)
@serve.ingress()
class Ingress(RecommendService):
    """The ingress replica: fetches the catalogue and model facts once, then serves `build_api`."""

    async def __init__(self, cfg_dict: dict, variant: str, tuning: dict, cf: DeploymentHandle,
                       aligner: DeploymentHandle | None, llm: DeploymentHandle):
        catalog = await cf.catalog.remote()
        llm_info = await llm.info.remote()
        aligner_info = await aligner.info.remote() if aligner is not None else None
        RecommendService.__init__(self, config_from_dict(cfg_dict), variant, Tuning.from_dict(tuning), cf, aligner,
                                  llm, catalog, llm_info, aligner_info)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)
