"""Benchmark: the HTTP service under load vs the same requests scored offline, and an overload burst.

    python -m bench.serve_load --config configs/ml100k.yaml run_dir=/tmp/r_ml
    python -m bench.serve_load --config configs/ml100k.yaml run_dir=/tmp/r_ml --requests 8 --levels 1,4

Needs a trained run folder (data, cf, stage1, stage2) and the packaged models. Everything is on
loopback; every phase is bounded in requests and seconds.

1. Start the service (serve.cli.start) with the LLM batching up to --batch requests.
2. For each concurrency level c: --requests requests (test users, their evaluation candidates: target
   + negatives, k=10), sent by c concurrent clients; p50/p99 latency, throughput, and whether every
   served ranking equals the offline one.
3. Offline, in this process, after the service is down: the same requests through LLMRecommender.rank
   one by one and in batches of --batch (one batch when --requests <= --batch); overhead ratio =
   served wall time / offline time of the same requests.
4. Overload: a burst of --burst simultaneous requests against queues of --batch ongoing + --batch
   queued at the LLM: counts of 200 and 503 (with Retry-After), then /healthz and one more request.
   The burst's requests carry serve.max_candidates candidates (the most a request may ask to rank:
   the largest memory per request), unless --burst-candidates says otherwise.
5. Replica death (--kill-replica): --kill-burst requests in flight, then SIGKILL of the LLM replica's
   process while they are being served; every status (200, 503 + Retry-After expected, never 500), the
   replica's PID before and after, and the seconds until a request is answered 200 again.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import time

import numpy as np

from bench.common import PeakRSS, loadavg, machine, table, write_results


def _requests(cfg, n: int) -> list[dict]:
    from allmrec.artifacts import run_dir
    from allmrec.data.load import Prepared
    test = Prepared(run_dir(cfg, "data")).candidates("test")
    rows = test.iloc[np.random.default_rng(cfg.seed).permutation(len(test))[:n]]
    return [{"user_id": int(u), "candidates": [int(t), *map(int, negs)], "k": 10}
            for u, t, negs in zip(rows["user"], rows["target"], rows["negatives"])]


def _offline(cfg, reqs: list[dict], batch: int) -> dict:
    """The same requests through LLMRecommender.rank in this process: one by one, and in batches of
    `batch` (one batch when len(reqs) <= batch). Top-k items per request and the seconds of each."""
    from allmrec.artifacts import load_recommender, run_dir, user_reps
    from allmrec.data.load import Prepared
    from allmrec.recommender import Example, candidate_order

    t0 = time.perf_counter()
    rec, cf, _ = load_recommender(cfg)
    seqs = Prepared(run_dir(cfg, "data")).sequences.set_index("user")["seq"]
    out = {"load_s": time.perf_counter() - t0}
    exs = []
    for r in reqs:
        hist = np.asarray(seqs[r["user_id"]], dtype=np.int64)
        rep = user_reps(cf, [hist], [r["user_id"]])[0]
        exs.append(Example(rep, hist.tolist(), candidate_order(r["candidates"], cfg.seed, user=r["user_id"])))
    for name, size in (("single", 1), ("batched", batch)):
        t0 = time.perf_counter()
        tops = []
        for i in range(0, len(exs), size):
            part = exs[i:i + size]
            for ex, s, r in zip(part, rec.rank(part, length_norm=cfg.eval.length_norm), reqs[i:i + size]):
                s = s[: len(ex.candidates)]
                tops.append([ex.candidates[j] for j in np.argsort(-s, kind="stable")[: r["k"]]])
        out[name] = {"seconds": time.perf_counter() - t0, "tops": tops, "loadavg": loadavg()}
    return out


async def _load(url: str, reqs: list[dict], conc: int, max_s: float) -> dict:
    import httpx
    lat, codes, tops = [], [], [None] * len(reqs)
    queue = list(range(len(reqs)))
    t_end = time.perf_counter() + max_s

    async def client(ac):
        while queue and time.perf_counter() < t_end:
            i = queue.pop(0)
            t = time.perf_counter()
            r = await ac.post("/v1/recommend", json=reqs[i])
            lat.append(time.perf_counter() - t)
            codes.append(r.status_code)
            if r.status_code == 200:
                tops[i] = [x["item"] for x in r.json()["items"]]

    async with httpx.AsyncClient(base_url=url, timeout=max_s + 600) as ac:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(ac) for _ in range(conc)])
        wall = time.perf_counter() - t0
    return {"latencies": lat, "codes": codes, "tops": tops, "wall": wall, "loadavg": loadavg()[0]}


def _max_candidates_body(cfg, body: dict, n: int) -> dict:
    """`body` with its candidates extended to `n` (the user's evaluation candidates first, then seeded
    items the user never interacted with, as a client asking to rank a large pool would send)."""
    from allmrec.artifacts import RunFolder
    prep = RunFolder(cfg).prepared()
    seen = set(map(int, prep.sequences.set_index("user")["seq"][body["user_id"]]))
    have = list(body["candidates"])
    pool = [i for i in np.random.default_rng([cfg.seed, 7]).permutation(np.arange(1, prep.n_items + 1))
            if int(i) not in seen and int(i) not in have]
    return {**body, "candidates": (have + [int(i) for i in pool])[:n]}


def _content_types(rs: list) -> dict:
    """{status: {content type: count}} of the responses."""
    out: dict = {}
    for r in rs:
        ct = r.headers.get("content-type", "").split(";")[0] or "none"
        out.setdefault(str(r.status_code), {}).setdefault(ct, 0)
        out[str(r.status_code)][ct] += 1
    return out


def _llm_replica_pids() -> list[int]:
    """PIDs of the LLM deployment's replica processes (Ray names them ray::ServeReplica:<app>:LLM)."""
    out = subprocess.run(["pgrep", "-f", r"ServeReplica:.*:LLM"], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _kill_replica(url: str, body: dict, n: int, wait_s: float) -> dict:
    """n requests in flight, SIGKILL of the LLM replica once they are being served, every status; then
    how long until a request is answered 200 again (Serve restarts the replica)."""
    import httpx

    async def run() -> tuple[list, dict]:
        async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=n)) as ac:
            tasks = [asyncio.create_task(ac.post("/v1/recommend", json=body)) for _ in range(n)]
            await asyncio.sleep(wait_s)  # the first requests reach the LLM and are being ranked
            before = _llm_replica_pids()
            for pid in before:
                os.kill(pid, signal.SIGKILL)
            killed_at = time.perf_counter()
            rs = await asyncio.gather(*tasks, return_exceptions=True)
            return rs, {"pids_killed": before, "killed_at": killed_at}

    rs, info = asyncio.run(run())
    codes = [str(r.status_code) if not isinstance(r, Exception) else type(r).__name__ for r in rs]
    out = {"n": n, "pids_killed": info["pids_killed"], "codes": {k: codes.count(k) for k in sorted(set(codes))},
           "retry_after_on_all_503": all(r.headers.get("retry-after") for r in rs
                                         if not isinstance(r, Exception) and r.status_code == 503),
           "content_types": _content_types([r for r in rs if not isinstance(r, Exception)])}
    t = time.perf_counter()
    status = None
    while time.perf_counter() - t < 300:  # Serve's controller replaces the dead replica
        status = httpx.post(url + "/v1/recommend", json=body, timeout=600).status_code
        if status == 200:
            break
        time.sleep(2)
    out.update(recovered_status=status, recovered_after_s=round(time.perf_counter() - info["killed_at"], 1),
               pids_after=_llm_replica_pids())
    return out


async def _burst(url: str, body: dict, n: int) -> list:
    import httpx
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=n)) as ac:
        return await asyncio.gather(*[ac.post("/v1/recommend", json=body) for _ in range(n)])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", "-c", required=True)
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    ap.add_argument("--levels", default="1,2,4,8", help="concurrent clients, comma-separated")
    ap.add_argument("--batch", type=int, default=8, help="LLM max batch size (served and offline)")
    ap.add_argument("--burst", type=int, default=24, help="simultaneous requests of the overload run (0: skip)")
    ap.add_argument("--burst-candidates", type=int, default=None,
                    help="candidates per burst request (default: serve.max_candidates, the most allowed)")
    ap.add_argument("--kill-replica", action="store_true", help="then SIGKILL the LLM replica under load")
    ap.add_argument("--kill-burst", type=int, default=12, help="requests in flight when the replica is killed")
    ap.add_argument("--max-seconds", type=float, default=300, help="per level: no new request after this")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the LLM, served (replica CPUs) and offline alike (1: see docs)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import torch

    from allmrec.config import load_config
    from serve.cli import start, stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(args.config, [*args.overrides, "serve.host=127.0.0.1", f"serve.port={port}",
                                    "serve.min_replicas=1", "serve.max_replicas=1"])
    for part in ("data", "cf", "stage1", "stage2"):
        if not os.path.isdir(os.path.join(cfg.run_dir, part)):
            raise SystemExit(f"{cfg.run_dir}/{part} not found: this benchmark needs a trained run folder")
    levels = [int(x) for x in args.levels.split(",")]
    tuning = {"max_batch_size": args.batch, "llm_max_ongoing": args.batch, "llm_max_queued": args.batch,
              "llm_num_cpus": float(args.threads), "ingress_max_ongoing": 4 * args.batch,
              "ingress_max_queued": 4 * args.batch}
    reqs = _requests(cfg, args.requests)
    result: dict = {"machine": machine(), "requests": len(reqs), "levels": levels, "batch": args.batch,
                    "threads": args.threads,
                    "tuning": tuning, "run_dir": cfg.run_dir, "llm": cfg.stage2.llm, "rows": []}

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        url = start(cfg, blocking=False, tuning=tuning)
        result["startup_s"] = round(time.perf_counter() - t0, 1)
        try:
            runs = {}
            for c in levels:
                runs[c] = asyncio.run(_load(url, reqs, c, args.max_seconds))
                print(f"c={c}: {len(runs[c]['codes'])} requests in {runs[c]['wall']:.1f} s", flush=True)
            burst = kill = None
            if args.burst:
                t = time.perf_counter()
                n_cand = args.burst_candidates or cfg.serve.max_candidates
                body = _max_candidates_body(cfg, reqs[0], n_cand)
                pids_before = _llm_replica_pids()
                rs = asyncio.run(_burst(url, body, args.burst))
                import httpx
                after = httpx.post(url + "/v1/recommend", json=reqs[0], timeout=600).status_code
                codes = [r.status_code for r in rs]
                queue_limit = tuning["llm_max_ongoing"] + tuning["llm_max_queued"]
                burst = {"n": args.burst, "candidates": len(body["candidates"]), "llm_queue_limit": queue_limit,
                         "x_queue_limit": round(args.burst / queue_limit, 2), "seconds": round(time.perf_counter() - t, 1),
                         "content_types": _content_types(rs),
                         # no replica died under the burst (Ray's memory monitor kills by PID)
                         "llm_replica_pids_same": bool(pids_before) and _llm_replica_pids() == pids_before,
                         "codes": {str(k): codes.count(k) for k in sorted(set(codes))},
                         "retry_after_on_all_503": all(r.headers.get("retry-after") for r in rs
                                                       if r.status_code == 503),
                         "healthz_after": httpx.get(url + "/healthz", timeout=30).status_code, "request_after": after,
                         "loadavg": loadavg()}
                print(f"burst: {burst}", flush=True)
            if args.kill_replica:
                kill = _kill_replica(url, reqs[0], args.kill_burst, wait_s=3.0)
                kill["loadavg"] = loadavg()
                print(f"replica kill: {kill}", flush=True)
        finally:
            stop()
        # offline after the service is down: the two never compete for the cores
        torch.set_num_threads(args.threads)
        off = _offline(cfg, reqs, args.batch)
    result.update(mem.result())
    result["offline"] = {k: {"seconds": round(v["seconds"], 2), "per_request_s": round(v["seconds"] / len(reqs), 3),
                             "loadavg": v["loadavg"]} for k, v in off.items() if k != "load_s"}
    tops = off["batched"]["tops"]
    for c, r in runs.items():
        lat = np.asarray(r["latencies"])
        done = [i for i, t in enumerate(r["tops"]) if t is not None]
        frac = len(lat) / len(reqs)  # a level cut short by --max-seconds is compared on its share
        row = {"clients": c, "requests": len(lat), "ok": r["codes"].count(200),
               "p50_s": float(np.percentile(lat, 50)) if len(lat) else None,
               "p99_s": float(np.percentile(lat, 99)) if len(lat) else None,
               "req_per_s": len(lat) / r["wall"] if r["wall"] else None,
               "same_ranking_as_offline": f"{sum(r['tops'][i] == tops[i] for i in done)}/{len(done)}",
               # served wall time of these requests / offline time of the same requests
               "overhead_vs_batch": r["wall"] / (off["batched"]["seconds"] * frac) if len(lat) else None,
               "overhead_vs_single": r["wall"] / (off["single"]["seconds"] * frac) if len(lat) else None,
               "loadavg_1m": r["loadavg"]}
        result["rows"].append(row)
        result.setdefault("served_tops", {})[c] = r["tops"]
    result["offline_tops"] = {k: off[k]["tops"] for k in ("single", "batched")}
    result["burst"] = burst
    result["replica_kill"] = kill
    result["loadavg_end"] = loadavg()
    cols = ["clients", "requests", "ok", "p50_s", "p99_s", "req_per_s", "same_ranking_as_offline", "overhead_vs_batch",
            "overhead_vs_single", "loadavg_1m"]
    print(table(result["rows"], cols))
    print(f"offline: {result['offline']}; startup {result['startup_s']} s; burst {burst}; replica kill {kill}; "
          f"peak RSS {result['peak_rss_gib']} GiB")
    print("results:", write_results("serve_load", result))
    return result


if __name__ == "__main__":
    main()
