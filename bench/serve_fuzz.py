"""Benchmark: fuzz the service from its own OpenAPI schema (schemathesis) and count the status codes.

    python -m bench.serve_fuzz                       # 300 schema cases + the GET endpoints + 700 malformed
    python -m bench.serve_fuzz --cases 90 --max-seconds 120

Loopback only, bounded in cases and in seconds. Needs no trained run: the real Serve app
(serve.cli.start, the same deployments as production) runs on the tiny run folder of
bench/fixtures.py (`build_run`), built in a temporary folder (a Ray prepare job, the packaged MiniLM, a random
2-layer Llama: about a minute). The generated requests come from the running service's /openapi.json
and are sent one at a time; POST /v1/recommend gets three groups of --cases / 3:

  positive      bodies that fit the schema (most still name unknown users or items: 404 / 422)
  negative      bodies that violate it (wrong types, missing or extra fields, broken JSON)
  in_catalogue  positive bodies with their ids mapped into this catalogue and their lists cut to the
                deployment's limits, so that they reach the models (CF, Aligner, LLM)

Every response is checked with schemathesis's not_a_server_error, status_code_conformance,
content_type_conformance, response_schema_conformance and negative_data_rejection. Expected: no 5xx for
any client input, and every answer is one the schema documents.

Then --malformed raw requests that a schema-driven generator never writes (issue 19), from a seeded
generator, each family with the status it must get (always short ASCII JSON with a `detail`):

  non_finite    NaN / Infinity / -Infinity / 1e400-like literals in any number slot of a valid body -> 422
  surrogate     lone surrogate escapes (\\ud800..\\udfff) in any string slot or key of a valid body -> 422
  big_headers   one header of 17 KB .. 1 MB, or 65 .. 2,000 headers                            -> 431
  short_body    a body shorter than its Content-Length (raw socket): -> 408 after body_timeout_s;
                a body cut short with a matching Content-Length (truncated JSON)               -> 422
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import PeakRSS, loadavg, machine, table, write_results

EXAMPLES_KEPT = 3  # per group and kind of finding, in the JSON
# What counts as rejecting a schema-violating body: schemathesis's default list, plus 413 (a body over
# the size limit is refused before it is parsed, as it should be).
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]


def into_catalogue(body, items: int, users: list[int], max_history: int, max_candidates: int):
    """A schema-valid body made valid for this deployment too: exactly one of user_id / history, ids
    of known users and items, distinct candidates that name only given new items, lists within the
    limits. Schema-valid bodies almost never get this far by chance, so without it the model path
    (where a 5xx would come from) is barely fuzzed."""
    if not isinstance(body, dict):
        return body
    b = dict(body)  # JSON Schema integers include 3.0: such numbers become ints here (StrictInt says 422)
    if "k" in b:
        b["k"] = int(b["k"])
    h = zlib.crc32(repr(body).encode())  # a known user for half of the bodies, an anonymous history for the rest
    if h % 2:
        b["user_id"] = users[int(b.get("user_id") or 0) % len(users)]
        b.pop("history", None)
    else:
        hist = b.get("history") or [h >> s for s in (1, 9, 17)]
        b["history"] = [1 + int(abs(i)) % items for i in hist][:max_history]
        b.pop("user_id", None)
    new = list({n["id"]: n for n in b.get("new_items") or []}.values())[:max_candidates]
    b["new_items"] = new
    if b.get("candidates") is not None:
        ids = {n["id"] for n in new}
        cands = [c if isinstance(c, str) else 1 + int(abs(c)) % items for c in b["candidates"]]
        cands = [c for c in dict.fromkeys(cands) if isinstance(c, int) or c in ids]
        b["candidates"] = cands[:max(0, max_candidates - len(ids))] or ([] if new else [1])
    return b


def fuzz(schema, url: str, path: str, method: str, mode, n: int, seed: int, deadline: float, fix=None) -> dict:
    """Send up to n generated cases of one operation; status codes, check failures, latencies."""
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                                   response_schema_conformance, status_code_conformance)

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    op = schema[path][method]
    codes, failures, kinds, lat = Counter(), Counter(), Counter(), []
    examples: dict[str, list] = {}
    out = {"sent": 0, "not_sent_time": 0}
    session = requests.Session()

    def keep(kind: str, case, resp) -> None:
        examples.setdefault(kind, [])
        if len(examples[kind]) < EXAMPLES_KEPT:
            examples[kind].append({"body": repr(case.body)[:600], "status": resp.status_code, "response": resp.text[:300]})

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(op.as_strategy(generation_mode=mode))
    def run(case):
        if time.perf_counter() > deadline:
            out["not_sent_time"] += 1
            return
        if fix is not None:
            case.body = fix(case.body)
        t = time.perf_counter()
        resp = case.call(base_url=url, session=session, timeout=120)
        lat.append(time.perf_counter() - t)
        out["sent"] += 1
        codes[resp.status_code] += 1
        if resp.status_code == 200 and isinstance(case.body, dict):  # which model paths the answered cases took
            kinds.update(k for k, on in (("user_id", case.body.get("user_id") is not None),
                                         ("history", case.body.get("history") is not None),
                                         ("candidates_given", case.body.get("candidates") is not None),
                                         ("new_items", bool(case.body.get("new_items"))),
                                         ("generate", case.body.get("mode") == "generate")) if on)
        if resp.status_code >= 500:
            keep("5xx", case, resp)
        try:
            case.validate_response(resp, checks=checks)
        except FailureGroup as g:
            for f in g.exceptions:
                failures[f.title] += 1
                keep(f.title, case, resp)

    try:
        run()
    except Unsatisfiable:  # e.g. no negative case exists for an operation without parameters
        out["unsatisfiable"] = True
    session.close()
    out.update(codes={str(k): v for k, v in sorted(codes.items())}, check_failures=dict(failures), examples=examples,
               answered_kinds=dict(kinds),
               p50_s=float(np.median(lat)) if lat else None, max_s=float(max(lat)) if lat else None)
    return out


BODY_TIMEOUT_S = 1.0  # the fuzzed service's Tuning.body_timeout_s (short: every short_body case waits for it)


def _valid_body(rng: random.Random, users: list[int], items: int) -> dict:
    b: dict = {"k": rng.randint(1, 5), "candidates": rng.sample(range(1, items + 1), 4) + ["n1"],
               "new_items": [{"id": "n1", "title": "solar lamp", "description": "a camping lamp"}]}
    if rng.random() < 0.5:
        b["user_id"] = rng.choice(users)
    else:
        b["history"] = rng.sample(range(1, items + 1), rng.randint(1, 5))
    return b


def malformed_case(rng: random.Random, family: str, users: list[int], items: int) -> dict:
    """One raw request: {family, body (bytes), headers, expect (set of statuses), short (bytes missing)}."""
    b = _valid_body(rng, users, items)
    headers = {"content-type": "application/json"}
    if family == "non_finite":
        lit = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e309", "-2.5e999"])
        slots = ["k", "cand", "title", "id"] + (["user_id"] if "user_id" in b else ["hist"])
        slot, mark = rng.choice(slots), "\u0000MARK\u0000"
        if slot in ("k", "user_id"):
            b[slot] = mark
        elif slot == "cand":
            b["candidates"][rng.randrange(4)] = mark
        elif slot == "hist":
            b["history"][rng.randrange(len(b["history"]))] = mark
        else:
            b["new_items"][0][slot] = mark
        raw = json.dumps(b).replace(json.dumps(mark), lit)
        return {"family": family, "body": raw.encode(), "headers": headers, "expect": {422}}
    if family == "surrogate":
        esc = "\\u%04x" % rng.randint(0xD800, 0xDFFF)
        slot, mark = rng.choice(["title", "description", "id", "mode", "key", "cand"]), "@@MARK@@"
        if slot == "key":
            b[mark] = 1
        elif slot == "cand":
            b["candidates"][rng.randrange(4)] = mark
        elif slot == "mode":
            b["mode"] = mark
        else:
            b["new_items"][0][slot] = "x" + mark + "y"
        raw = json.dumps(b).replace(mark, esc * rng.randint(1, 3))
        return {"family": family, "body": raw.encode(), "headers": headers, "expect": {422}}
    if family == "big_headers":
        if rng.random() < 0.5:
            headers["x-big"] = "a" * rng.randint(17_000, 1_000_000)
        else:
            headers.update({f"x-h{i}": str(i) for i in range(rng.randint(65, 2000))})
        return {"family": family, "body": json.dumps(b).encode(), "headers": headers, "expect": {431}}
    raw = json.dumps(b).encode()
    cut = rng.randint(1, len(raw) - 1)
    if rng.random() < 0.5:  # the client stops sending: the Content-Length promises more than comes
        return {"family": family, "body": raw[:cut], "headers": headers, "expect": {408}, "short": len(raw) - cut}
    return {"family": family, "body": raw[:cut], "headers": headers, "expect": {422, 400}}


def _send_short(url: str, case: dict) -> tuple[int, str, bytes]:
    """POST with a Content-Length `short` bytes beyond the body actually sent; read the answer."""
    from urllib.parse import urlparse
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=BODY_TIMEOUT_S + 60) as sock:
        head = (f"POST /v1/recommend HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(case['body']) + case['short']}\r\n\r\n").encode()
        sock.sendall(head + case["body"])
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            top, _, rest = data.partition(b"\r\n\r\n")
            n = [int(x.split(b":")[1]) for x in top.split(b"\r\n") if x.lower().startswith(b"content-length:")]
            if n and len(rest) >= n[0]:
                break
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.split(b"\r\n")
    ctype = next((x.split(b":", 1)[1].strip().decode() for x in lines if x.lower().startswith(b"content-type:")), "")
    return int(lines[0].split()[1]), ctype, body


def fuzz_malformed(url: str, n: int, seed: int, users: list[int], items: int, deadline: float) -> list[dict]:
    """n raw malformed requests (families in turn): one result row per family."""
    import requests
    rng = random.Random(seed)
    families = ["non_finite", "surrogate", "big_headers", "short_body"]
    stats = {f: {"sent": 0, "codes": Counter(), "bad": Counter(), "lat": [], "examples": []} for f in families}
    session = requests.Session()
    for i in range(n):
        if time.perf_counter() > deadline:
            break
        fam = families[i % len(families)]
        case = malformed_case(rng, fam, users, items)
        t = time.perf_counter()
        if "short" in case:
            status, ctype, body = _send_short(url, case)
        else:
            r = session.post(url + "/v1/recommend", data=case["body"], headers=case["headers"], timeout=120)
            status, ctype, body = r.status_code, r.headers.get("content-type", ""), r.content
        st = stats[fam]
        st["lat"].append(time.perf_counter() - t)
        st["sent"] += 1
        st["codes"][status] += 1
        problems = []
        if status >= 500:
            problems.append("5xx")
        if status not in case["expect"]:
            problems.append("unexpected status")
        try:
            ok_json = ctype.startswith("application/json") and body.isascii() and bool(json.loads(body)["detail"])
        except (ValueError, KeyError, TypeError):
            ok_json = False
        if not ok_json:
            problems.append("not short ASCII JSON with a detail")
        elif len(body) > 4000:
            problems.append("long error body")
        for p in problems:
            st["bad"][p] += 1
        if problems and len(st["examples"]) < EXAMPLES_KEPT:
            st["examples"].append({"body": repr(case["body"][:300]), "headers": len(case["headers"]), "status": status,
                                   "response": repr(body[:300]), "problems": problems})
    session.close()
    rows = []
    for fam, st in stats.items():
        codes = {str(k): v for k, v in sorted(st["codes"].items())}
        rows.append({"operation": "POST /v1/recommend", "group": f"malformed:{fam}", "sent": st["sent"],
                     "status_codes": codes, "codes": " ".join(f"{c}:{v}" for c, v in codes.items()) or "-",
                     **{f"n_{k}xx": sum(v for c, v in codes.items() if c[0] == k) for k in "2345"},
                     "check_failures": dict(st["bad"]), "n_check_failures": sum(st["bad"].values()),
                     "examples": st["examples"], "p50_s": float(np.median(st["lat"])) if st["lat"] else None,
                     "max_s": float(max(st["lat"])) if st["lat"] else None, "loadavg_1m": loadavg()[0]})
        print(f"malformed [{fam}]: {st['sent']} sent, codes {codes}, problems {dict(st['bad']) or 'none'}", flush=True)
    return rows


def _run(args, result: dict, tmp: Path) -> None:
    """Build the tiny run in tmp, start the service, fuzz it (rows into result); the caller stops it."""
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    from allmrec.data.load import Prepared
    from serve.cli import start
    from bench.fixtures import build_run

    t0 = time.perf_counter()
    cfg = build_run(tmp, "serve.host=127.0.0.1", "ray.progress=false")  # loopback only
    result["build_s"] = round(time.perf_counter() - t0, 1)
    prep = Prepared(Path(cfg.run_dir) / "data")
    users = sorted({*map(int, prep.sequences["user"]), *map(int, prep.candidates("cold_users")["user"])})
    s = cfg.serve

    def fix(body):
        return into_catalogue(body, prep.n_items, users, s.max_history, s.max_candidates)

    t0 = time.perf_counter()
    # default Tuning (the queues of a production deployment) but a short body deadline: short_body waits for it
    url = start(cfg, blocking=False, tuning={"body_timeout_s": BODY_TIMEOUT_S})
    result["startup_s"] = round(time.perf_counter() - t0, 1)
    config = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {
        "expected-statuses": REJECTIONS}}})  # explicit: no schemathesis.toml is discovered either
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
    result["operations"] = [f"{r.ok().method.upper()} {r.ok().path}" for r in schema.get_all_operations()]
    third = args.cases // 3
    plan = [("/v1/recommend", "POST", "positive", GenerationMode.POSITIVE, third, None),
            ("/v1/recommend", "POST", "negative", GenerationMode.NEGATIVE, third, None),
            ("/v1/recommend", "POST", "in_catalogue", GenerationMode.POSITIVE, args.cases - 2 * third, fix),
            ("/v1/models", "GET", "positive", GenerationMode.POSITIVE, args.get_cases, None),
            ("/healthz", "GET", "positive", GenerationMode.POSITIVE, args.get_cases, None)]
    deadline = time.perf_counter() + args.max_seconds
    t_fuzz = time.perf_counter()
    for path, method, group, mode, n, f in plan:
        t = time.perf_counter()
        r = fuzz(schema, url, path, method, mode, n, args.seed, deadline, f)
        row = {**r, "status_codes": r["codes"], "operation": f"{method} {path}", "group": group,
               **{f"n_{k}xx": sum(v for c, v in r["codes"].items() if c[0] == k) for k in "2345"},
               "codes": " ".join(f"{c}:{v}" for c, v in r["codes"].items()) or "-",
               "n_check_failures": sum(r["check_failures"].values()), "p50_s": r["p50_s"], "max_s": r["max_s"],
               "seconds": round(time.perf_counter() - t, 1), "loadavg_1m": loadavg()[0]}
        result["rows"].append(row)
        print(f"{method} {path} [{group}]: {r['sent']} sent, codes {r['codes']}, "
              f"check failures {r['check_failures'] or 'none'}; the 200s had {r['answered_kinds']}", flush=True)
    if args.malformed:
        t = time.perf_counter()
        for row in fuzz_malformed(url, args.malformed, args.seed, users, prep.n_items, deadline):
            row["seconds"] = round(time.perf_counter() - t, 1)
            result["rows"].append(row)
    result["fuzz_s"] = round(time.perf_counter() - t_fuzz, 1)
    result["healthz_after"] = requests.get(url + "/healthz", timeout=30).status_code


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=300, help="POST /v1/recommend cases, split over the 3 groups")
    ap.add_argument("--get-cases", type=int, default=10, help="cases of each GET endpoint")
    ap.add_argument("--malformed", type=int, default=700,
                    help="raw malformed requests (non-finite numbers, lone surrogates, big headers, short bodies)")
    ap.add_argument("--max-seconds", type=float, default=900, help="no new request after this (fuzzing only)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (the same cases on the same schema)")
    ap.add_argument("--replica-logs", action="store_true",
                    help="print the replicas' logs (one access line per request) here too")
    args = ap.parse_args(argv)

    import ray
    import schemathesis
    from hypothesis import __version__ as hypothesis_version

    from serve.cli import stop

    result: dict = {"machine": machine(), "schemathesis": schemathesis.__version__, "hypothesis": hypothesis_version,
                    "seed": args.seed, "cases": args.cases, "get_cases": args.get_cases, "rows": []}
    if not ray.is_initialized():  # a local cluster of our own (as pipelines' init_ray); replica logs stay in its folder
        ray.init(num_cpus=2 * (os.cpu_count() or 1), include_dashboard=False, log_to_driver=args.replica_logs)
    try:
        with tempfile.TemporaryDirectory(prefix="serve_fuzz_") as tmp, PeakRSS() as mem:
            try:
                _run(args, result, Path(tmp))
            finally:
                stop()  # before the run folder goes away
    finally:
        ray.shutdown()
    result.update(mem.result())
    rows = result["rows"]
    result["total"] = {"sent": sum(r["sent"] for r in rows), "n_5xx": sum(r["n_5xx"] for r in rows),
                       "check_failures": sum(r["n_check_failures"] for r in rows)}
    result["loadavg_end"] = loadavg()
    print(table(rows, ["operation", "group", "sent", "n_2xx", "n_4xx", "n_5xx", "codes", "n_check_failures", "p50_s",
                       "max_s", "seconds", "loadavg_1m"]))
    print(f"total {result['total']}; build {result['build_s']} s, startup {result['startup_s']} s, "
          f"fuzz {result['fuzz_s']} s; healthz after: {result['healthz_after']}; peak RSS {result['peak_rss_gib']} GiB")
    print("results:", write_results("serve_fuzz", result))
    return result


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    main()
