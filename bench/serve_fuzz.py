"""Benchmark: fuzz the service from its own OpenAPI schema (schemathesis) and count the status codes.

    python -m bench.serve_fuzz                       # 300 POST /v1/recommend cases + the GET endpoints
    python -m bench.serve_fuzz --cases 90 --max-seconds 120

Loopback only, bounded in cases and in seconds. Needs no trained run: the real Serve app
(serve.cli.start, the same deployments as production) runs on the tiny run folder of
tests/serve/tiny_run.py, built in a temporary folder (a Ray prepare job, the packaged MiniLM, a random
2-layer Llama: about a minute). The generated requests come from the running service's /openapi.json
and are sent one at a time; POST /v1/recommend gets three groups of --cases / 3:

  positive      bodies that fit the schema (most still name unknown users or items: 404 / 422)
  negative      bodies that violate it (wrong types, missing or extra fields, broken JSON)
  in_catalogue  positive bodies with their ids mapped into this catalogue and their lists cut to the
                deployment's limits, so that they reach the models (CF, Aligner, LLM)

Every response is checked with schemathesis's not_a_server_error, status_code_conformance,
content_type_conformance, response_schema_conformance and negative_data_rejection. Expected: no 5xx for
any client input, and every answer is one the schema documents.
"""
from __future__ import annotations

import argparse
import os
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


def _run(args, result: dict, tmp: Path) -> None:
    """Build the tiny run in tmp, start the service, fuzz it (rows into result); the caller stops it."""
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    from allmrec.data.load import Prepared
    from serve.cli import start
    from tests.serve.tiny_run import build_run

    t0 = time.perf_counter()
    cfg = build_run(tmp, "serve.host=127.0.0.1", "ray.progress=false")  # loopback only
    result["build_s"] = round(time.perf_counter() - t0, 1)
    prep = Prepared(Path(cfg.run_dir) / "data")
    users = sorted({*map(int, prep.sequences["user"]), *map(int, prep.candidates("cold_users")["user"])})
    s = cfg.serve

    def fix(body):
        return into_catalogue(body, prep.n_items, users, s.max_history, s.max_candidates)

    t0 = time.perf_counter()
    url = start(cfg, blocking=False)  # default Tuning: the queues of a production deployment
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
    result["fuzz_s"] = round(time.perf_counter() - t_fuzz, 1)
    result["healthz_after"] = requests.get(url + "/healthz", timeout=30).status_code


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=300, help="POST /v1/recommend cases, split over the 3 groups")
    ap.add_argument("--get-cases", type=int, default=10, help="cases of each GET endpoint")
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
