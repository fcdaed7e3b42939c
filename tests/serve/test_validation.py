"""The ingress without Ray: malformed bodies, HTTP limits and lost replicas through FastAPI's TestClient.

`RecommendService` runs with fake model handles (the `.method.remote(...)` awaitables of Serve handles), so
every case family of issue 19 is answered by the real app (routes, validation, error handlers, HttpLimits)
in milliseconds. The same app behind Ray Serve: tests/serve/test_serve.py.
"""
from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
from fastapi.testclient import TestClient

from allmrec.config import load_config
from serve.routes import RecommendService, build_api
from serve.tuning import Tuning
from serve.validation import NON_FINITE, HttpLimits

N_ITEMS = 40


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        async def call():
            return self.fn(*args, **kwargs)
        return call()


class _Handle:
    def __init__(self, **methods):
        for name, fn in methods.items():
            setattr(self, name, _Method(fn))


def _llm(req):
    return {"items": [(c, f"title {c}", -1.0 - 0.1 * j) for j, c in enumerate(req["candidates"][: req["k"]])]}


def _service(llm=_llm, **tuning) -> RecommendService:
    cfg = load_config(None, ["serve.max_history=30", "serve.max_candidates=12", "score.pool_size=6"])
    cf = _Handle(represent=lambda user, hist, n: {"history": hist or [1, 2], "user_rep": np.zeros(4, np.float32),
                                                  "candidates": list(range(3, 3 + n))})
    aligner = _Handle(embed=lambda items: np.zeros((len(items), 4), np.float32))
    return RecommendService(
        cfg, "allmrec", Tuning.from_dict({"body_timeout_s": 2.0, **tuning}), cf, aligner, _Handle(recommend=llm),
        catalog={"n_items": N_ITEMS, "n_users": 80, "cf_model": "sasrec", "known_users": list(range(80))},
        llm_info={"model_version": "t-allmrec-0", "llm": "tiny", "item_tokens": "joint", "use_user_token": True,
                  "has_item_vectors": True},
        aligner_info={"sbert": "x", "dim": 4, "self_check_max_abs_err": 0.0})


@pytest.fixture(scope="module")
def client():
    with TestClient(build_api(_service()), raise_server_exceptions=False) as c:
        yield c


def _strict_json(r) -> dict:
    """The body as strict JSON: ASCII, no NaN/Infinity constants."""
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name} in {r.text[:200]}")
    r.content.decode("ascii")
    return json.loads(r.content, parse_constant=refuse)


def _post(client, raw: str | bytes, **kw):
    return client.post("/v1/recommend", content=raw if isinstance(raw, bytes) else raw.encode("utf-8"),
                       headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw)


def test_a_valid_request_is_answered(client):
    r = _post(client, '{"history": [1, 2], "candidates": [5, 6, 7], "k": 2}')
    assert r.status_code == 200, r.text
    items = [x["item"] for x in _strict_json(r)["items"]]
    assert len(items) == 2 and set(items) <= {5, 6, 7}


NON_FINITE_BODIES = [
    '{"user_id": 7, "k": NaN}', '{"user_id": 7, "k": Infinity}', '{"user_id": 7, "k": -Infinity}',
    '{"user_id": 7, "k": 1e400}', '{"user_id": NaN}', '{"user_id": -1e400}', '{"history": [1, NaN, 3]}',
    '{"history": [1], "candidates": [2, Infinity]}', '{"history": [1], "new_items": [{"id": "a", "title": NaN}]}',
    '{"history": [1], "new_items": [{"id": 1e999, "title": "x"}]}', '[NaN]', 'NaN', '1e400',
]


@pytest.mark.parametrize("raw", NON_FINITE_BODIES)
def test_non_finite_numbers_get_a_short_json_422(client, raw, caplog):
    with caplog.at_level(logging.INFO):
        r = _post(client, raw)
    assert r.status_code == 422, (raw, r.status_code, r.text)
    body = _strict_json(r)
    assert all("input" not in e and "ctx" not in e for e in body["detail"]), body
    if raw.startswith("{"):  # a number where the schema wants an int or a string
        assert any(e["msg"] == NON_FINITE for e in body["detail"]), body
    assert len(r.content) < 2000 and not [x for x in caplog.records if x.levelno >= logging.ERROR]


SURROGATE_BODIES = [
    '{"history": [1], "new_items": [{"id": "a", "title": "lamp \\ud800"}]}',
    '{"history": [1], "new_items": [{"id": "a", "title": "x", "description": "\\udfff\\ud800 end"}]}',
    '{"history": [1], "new_items": [{"id": "\\ud83d", "title": "x"}]}',
    '{"history": [1], "mode": "\\udc00"}',
    '{"history": [1], "\\ud800": 1}',
    '{"history": [1], "candidates": ["\\udbff"]}',
    '{"\\ud800\\ud800\\ud800": [' + "1," * 50 + '1]}',
]


@pytest.mark.parametrize("raw", SURROGATE_BODIES)
def test_lone_surrogates_get_a_short_json_422(client, raw, caplog):
    with caplog.at_level(logging.INFO):
        r = _post(client, raw)
    assert r.status_code == 422, (raw, r.status_code, r.text)
    body = _strict_json(r)  # ASCII: a surrogate can only appear escaped, as text
    assert all("input" not in e for e in body["detail"])
    assert not [x for x in caplog.records if x.levelno >= logging.ERROR]
    # a valid non-ASCII title is still served (escaped ASCII JSON, decoded back exactly)
    ok = _post(client, json.dumps({"history": [1], "candidates": ["n"], "new_items": [{"id": "n", "title": "été 大 😀"}]}))
    assert ok.status_code == 200 and ok.json()["items"][0]["title"] == "title n"


def test_other_malformed_bodies(client):
    cases = [(b"{not json", 422), (b"\xbfH", 400), (b"", 422), (b"[" * 5000 + b"]" * 5000, 400),
             (b'{"user_id": ' + b"9" * 5000 + b"}", 400), (b'{"user_id": ' + b"9" * 4000 + b"}", 404),
             (b'{"history": [1], "k": 10.0}', 422), (b'{"history": [1], "k": true}', 422), (b"null", 422)]
    for raw, status in cases:
        r = _post(client, raw)
        assert r.status_code == status, (raw[:40], r.status_code, r.text[:300])
        assert _strict_json(r)["detail"]


def test_header_limits_are_json_431(client):
    big = _post(client, '{"history": [1]}', headers={"x-big": "a" * 20_000})
    many = _post(client, '{"history": [1]}', headers={f"x-h{i}": "1" for i in range(100)})
    for r in (big, many):
        assert r.status_code == 431 and r.headers["content-type"] == "application/json", r.text
        assert _strict_json(r)["detail"]
    assert _post(client, '{"history": [1]}', headers={f"x-h{i}": "1" for i in range(20)}).status_code == 200


def test_body_limit_is_json_413_with_or_without_content_length(client):
    over = b'{"history": [' + b"1, " * 40_000 + b"1]}"
    by_length = _post(client, over)

    def chunks():  # no Content-Length: chunked transfer, the limit counts the bytes as they come
        for i in range(0, len(over), 4096):
            yield over[i:i + 4096]
    chunked = client.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    for r in (by_length, chunked):
        assert r.status_code == 413 and r.headers["content-type"] == "application/json", r.text[:200]
        assert "65536" in _strict_json(r)["detail"]
    bad_length = _post(client, b'{"history": [1]}', headers={"content-length": "abc"})
    assert bad_length.status_code == 400


def test_every_client_error_status_is_documented_as_json(client):
    documented = client.get("/openapi.json").json()["paths"]["/v1/recommend"]["post"]["responses"]
    for status in ("400", "404", "408", "413", "422", "431", "503"):
        assert list(documented[status]["content"]) == ["application/json"], status
    assert client.get("/v1/recommend").status_code == 405 and client.get("/nothing").status_code == 404
    assert _strict_json(client.get("/nothing"))["detail"]


def test_a_body_that_never_completes_gets_408():
    """A body shorter than its Content-Length: the whole body must arrive within body_timeout_s."""
    sent = []

    async def app(scope, receive, send):  # reads the body as FastAPI does
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b'{"hist', "more_body": True}
        await asyncio.sleep(60)

    out = []

    async def send(msg):
        out.append(msg)

    mw = HttpLimits(app, max_body_bytes=1000, max_header_bytes=1000, max_header_count=10, body_timeout_s=0.3)
    scope = {"type": "http", "headers": [(b"content-length", b"100")]}
    asyncio.run(asyncio.wait_for(mw(scope, receive, send), 5))
    assert out[0]["status"] == 408 and b"0.3 s" in out[1]["body"]


@pytest.mark.parametrize("lost", ["died", "unavailable", "backpressure", "no_replica"])
def test_a_lost_or_full_downstream_replica_is_503_with_retry_after(lost, caplog):
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    exc = {"died": ActorDiedError(), "unavailable": ActorUnavailableError("killed", None),
           "backpressure": BackPressureError(num_queued_requests=9, max_queued_requests=8),
           "no_replica": DeploymentUnavailableError(DeploymentID(name="LLM", app_name="allmrec"))}[lost]

    def llm(req):
        raise exc
    with TestClient(build_api(_service(llm=llm)), raise_server_exceptions=False) as c, caplog.at_level(logging.INFO):
        r = _post(c, '{"history": [1], "candidates": [2, 3]}')
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert _strict_json(r)["detail"] and not [x for x in caplog.records if x.levelno >= logging.ERROR]
