"""The service's own Prometheus metrics (beside Ray Serve's: docs/cluster.md, "Metrics").

Registered through `ray.serve.metrics`, so each sample also carries the deployment, replica and application
tags; Ray's metrics agent on every node exports them with its `ray_` prefix (counters as `..._total`):

    allmrec_recommend_requests   {variant, mode}     requests that passed validation, per served variant
    allmrec_client_errors        {status, reason}    every 4xx the ingress answers (validation, limits, ...)
    allmrec_new_items            {variant, text}     new (text-only) items in requests: title | title+description

The metric objects are created on first use in each replica (not at import: Serve builds the app in
other processes too).
"""
from __future__ import annotations

import functools
from http import HTTPStatus


@functools.lru_cache(maxsize=None)
def _counter(name: str, description: str, tag_keys: tuple[str, ...]):
    from ray.serve.metrics import Counter
    return Counter(name, description=description, tag_keys=tag_keys)


def requests():
    return _counter("allmrec_recommend_requests", "Recommendation requests that passed validation.",
                    ("variant", "mode"))


def client_errors():
    return _counter("allmrec_client_errors", "4xx responses of the ingress, by status and reason.",
                    ("status", "reason"))


def new_items():
    return _counter("allmrec_new_items", "New (text-only) items in recommendation requests.", ("variant", "text"))


def count_request(variant: str, mode: str, new: list) -> None:
    """One validated request of `variant` in `mode` with the new items `new` (objects with a description)."""
    requests().inc(1, tags={"variant": variant, "mode": mode})
    for item in new:
        text = "title+description" if (getattr(item, "description", None) or "").strip() else "title"
        new_items().inc(1, tags={"variant": variant, "text": text})


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "unknown"


class ClientErrorMetrics:
    """ASGI middleware (outermost): counts every 4xx response by status and reason, whoever answered it
    (FastAPI's validation, the routes, HttpLimits)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and 400 <= int(message["status"]) < 500:
                status = int(message["status"])
                client_errors().inc(1, tags={"status": str(status), "reason": reason(status)})
            await send(message)

        return await self.app(scope, receive, counting_send)
