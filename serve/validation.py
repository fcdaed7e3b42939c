"""Request validation and every client-error answer of the HTTP API: short JSON, never an echo of the input.

- `check_request`: what the schema cannot know (catalogue ids, deployment limits) -> ClientError 404/422.
- `install_error_handlers`: FastAPI's own 422 (schema violations) and every HTTPException answered as
  `{"detail": ...}` JSON. The 422 lists where and what, never the offending input: an input can be
  unencodable (NaN, Infinity, 1e400 parse to non-finite floats; "\\ud800" to a lone surrogate), and
  echoing it made the JSON encoder fail and the service answer 500 with a traceback (issue 19).
- `SafeJSONResponse`: ASCII JSON (non-ASCII escaped, lone surrogates included), no NaN: whatever a
  response holds, encoding it cannot fail.
- `HttpLimits`: ASGI middleware in front of the app: header count and size (431), body size while it
  streams in (413, also without Content-Length), and a deadline for the whole body (408).
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from serve.schemas import ErrorResponse, RecommendRequest

MAX_ERRORS = 10       # validation errors listed in one 422
MAX_TEXT = 200        # characters of any string of an error detail
NON_FINITE = "numbers must be finite: NaN, Infinity and literals beyond a double (such as 1e400) are not accepted"


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: ASCII-only (non-ASCII and lone surrogates escaped), NaN refused."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class ClientError(HTTPException):
    """A client mistake found by the service: status + a message naming what is wrong."""


def error(status: int, detail: str, headers: dict | None = None) -> SafeJSONResponse:
    return SafeJSONResponse({"detail": detail}, status_code=status, headers=headers)


def _text(s: Any, n: int = MAX_TEXT) -> str:
    s = str(s).encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate -> "\ud800" as text
    return s if len(s) <= n else s[: n - 3] + "..."


def validation_detail(errors: list[dict]) -> list[dict]:
    """pydantic/FastAPI errors -> [{loc, msg, type}]: no `input`, no `ctx` objects, every string cut short."""
    out = []
    for e in errors[:MAX_ERRORS]:
        inp, msg = e.get("input"), str(e.get("msg", "invalid value"))
        if isinstance(inp, float) and not math.isfinite(inp):
            msg = NON_FINITE
        elif e.get("type") == "json_invalid" and isinstance(e.get("ctx"), dict) and "error" in e["ctx"]:
            msg = f"{msg}: {e['ctx']['error']}"
        loc = [x if isinstance(x, int) else _text(x, 64) for x in e.get("loc", ())]
        out.append({"loc": loc, "msg": _text(msg), "type": _text(e.get("type", "value_error"), 40)})
    if len(errors) > MAX_ERRORS:
        out.append({"loc": [], "msg": f"{len(errors) - MAX_ERRORS} more errors not listed", "type": "too_many_errors"})
    return out


def install_error_handlers(api: FastAPI, log) -> None:
    @api.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        return SafeJSONResponse({"detail": validation_detail(list(exc.errors()))}, status_code=422)

    @api.exception_handler(HTTPException)
    async def _http(_, exc: HTTPException):
        return error(exc.status_code, _text(exc.detail, 1000), getattr(exc, "headers", None))

    @api.exception_handler(Exception)
    async def _internal(_, exc: Exception):  # a bug, never client input: log it, say little
        log.exception("unhandled error in /v1 request", exc_info=exc)
        return error(500, "internal error")


# every client-error status of POST /v1/recommend, for the OpenAPI schema (all JSON ErrorResponse)
def documented_errors(t) -> dict:
    what = {400: "a body that cannot be read as UTF-8 JSON", 404: "unknown user_id",
            408: f"the body did not arrive within {t.body_timeout_s:g} s",
            413: f"request body over {t.max_body_bytes} bytes",
            422: "a body that violates the schema or the deployment's limits (never echoes the input)",
            431: f"more than {t.max_header_count} headers or {t.max_header_bytes} bytes of headers",
            503: "overloaded, or a model replica is unavailable: retry after the Retry-After header's seconds"}
    return {c: {"model": ErrorResponse, "description": d} for c, d in what.items()}


def _ids_preview(ids: list) -> str:
    return ", ".join(map(str, ids[:5])) + (f" (+{len(ids) - 5} more)" if len(ids) > 5 else "")


def check_request(req: RecommendRequest, *, known_users: set, n_users: int, n_items: int, max_history: int,
                  max_candidates: int, variant: str, new_items_supported: bool) -> None:
    """Raise ClientError (404 unknown user, 422 otherwise) for what the schema cannot check."""
    def bad(msg: str, status: int = 422):
        raise ClientError(status_code=status, detail=msg)

    if req.user_id is not None and req.user_id not in known_users:
        bad(f"unknown user_id {req.user_id}: known users have ids in 0..{n_users - 1} "
            "and a recorded history; send `history` for anyone else", 404)
    if req.history is not None:
        if not req.history:
            bad("history is empty: give at least one item id")
        if len(req.history) > max_history:
            bad(f"history has {len(req.history)} items; at most serve.max_history={max_history}")
        wrong = [i for i in req.history if not 1 <= i <= n_items]
        if wrong:
            bad(f"history holds unknown item ids {_ids_preview(wrong)}; item ids are 1..{n_items}")
    new_ids = [n.id for n in req.new_items]
    new = set(new_ids)
    if len(new) != len(new_ids):
        bad("new_items ids must be distinct")
    if req.new_items and not new_items_supported:
        bad(f"the {variant} model cannot rank new items (it needs CF embeddings for every item)")
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
        if total > max_candidates:
            bad(f"{total} candidates; at most serve.max_candidates={max_candidates}")
    elif len(new_ids) > max_candidates:
        bad(f"{len(new_ids)} new items; at most serve.max_candidates={max_candidates} candidates")


# ------------------------------------------------------------------------------------- HTTP limits
class _LimitError(HTTPException):
    """Raised from inside `receive`: FastAPI re-raises HTTPExceptions met while reading the body, so the
    app's handler answers it as JSON (any other exception there would become a 400)."""


class HttpLimits:
    """ASGI middleware: header count/size -> 431, Content-Length or streamed body over max_body_bytes ->
    413, the whole body not received within body_timeout_s of the request's start -> 408. JSON always."""

    def __init__(self, app, *, max_body_bytes: int, max_header_bytes: int, max_header_count: int,
                 body_timeout_s: float):
        self.app = app
        self.max_body, self.max_header_bytes = max_body_bytes, max_header_bytes
        self.max_header_count, self.timeout = max_header_count, body_timeout_s

    async def _answer(self, send, status: int, detail: str) -> None:
        body = SafeJSONResponse({"detail": detail}).body
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        if len(headers) > self.max_header_count:
            return await self._answer(send, 431, f"{len(headers)} request headers; at most {self.max_header_count}")
        size = sum(len(k) + len(v) for k, v in headers)
        if size > self.max_header_bytes:
            return await self._answer(send, 431, f"{size} bytes of request headers; at most {self.max_header_bytes}")
        lengths = [v for k, v in headers if k.lower() == b"content-length"]
        if lengths:
            try:
                declared = int(lengths[0])
                if declared < 0 or len(set(lengths)) > 1:
                    raise ValueError
            except ValueError:
                return await self._answer(send, 400, "invalid Content-Length header")
            if declared > self.max_body:
                return await self._answer(send, 413, f"request body of {declared} bytes; at most {self.max_body}")
        deadline = time.monotonic() + self.timeout
        state = {"received": 0, "done": False, "started": False}

        async def limited_receive():
            if state["done"]:
                return await receive()
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                msg = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                raise _LimitError(408, f"the request body did not arrive within {self.timeout:g} s") from None
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                if state["received"] > self.max_body:
                    raise _LimitError(413, f"request body over {self.max_body} bytes")
                state["done"] = not msg.get("more_body", False)
            else:
                state["done"] = True
            return msg

        async def tracked_send(msg):
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _LimitError as e:  # raised where no handler saw it (e.g. a body read outside FastAPI's parsing)
            if state["started"]:
                raise
            await self._answer(send, e.status_code, str(e.detail))
