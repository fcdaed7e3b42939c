"""Benchmark: `pipelines.prepare.prepare` (Ray Data) at Movies-and-TV scale vs a plain pandas baseline.

    python -m bench.prepare            # ~3.4M interactions
    python -m bench.prepare --quick    # ~300k interactions

The data set is real Amazon Sports (35,598 users / 18,357 items / 296,337 interactions) scaled up:
copy c of every user is a new user `u<c>_<id>`; copies are put in groups of `--group-size` and every
group gets its own copy of the catalogue (item `<asin>-g<group>`, with the same text), so users of one
group share items (the co-occurrence structure of the real set is kept) and the catalogue grows with
the data (3.4M: 13 copies in groups of 4, 4 x 18,357 = 73k items; Movies-and-TV has ~60k). The source is
already a 5-core, so exact copies would pass the k-core untouched; each copy therefore drops every
interaction with probability `--thin` (0.1, seeded), which leaves users below 5 interactions (and some
with exactly 3: the cold-user rule) and items below 5, so the k-core and cold-user steps do real work.
The last copy is cut so the total lands on the target.

Each implementation runs in its own child process, one after the other; the peak memory of that
child's whole process tree (Ray's GCS, raylet and workers included) is sampled from this process, so
neither run's leftovers count against the other.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import PeakRSS, loadavg, machine, table, write_results

REPO = Path(__file__).resolve().parents[1]
SPORTS = REPO.parent / "shared" / "data" / "amazon-sports"
INTER, ITEMS = "user_sequence.txt", "item_generative_indexing_phase_0.txt"
TARGET_S, TARGET_GIB = 300.0, 6.0


# ---------------------------------------------------------------- the scaled data set

def build_scaled(src: Path, dest: Path, target: int, group_size: int = 4, thin: float = 0.1,
                 seed: int = 0) -> dict:
    """Write `dest/user_sequence.txt` + item texts with `target` interactions (see module doc)."""
    if not 0 <= thin < 1:
        raise ValueError(f"thin must be in [0, 1), got {thin}")
    if group_size < 1 or target < 1:
        raise ValueError(f"group_size and target must be >= 1, got {group_size} and {target}")
    rng = np.random.default_rng(seed)
    if not (src / INTER).is_file():
        raise FileNotFoundError(f"{src / INTER} not found: the shared amazon-sports data is needed")
    lines = [ln.split() for ln in (src / INTER).read_text().splitlines() if ln.strip()]
    per_copy = sum(len(p) - 1 for p in lines)
    dest.mkdir(parents=True, exist_ok=True)
    n_rows = n_users = copy = 0
    with open(dest / INTER, "w") as f:
        while n_rows < target:
            g = copy // group_size
            out = []
            for parts in lines:
                if n_rows >= target:
                    break
                keep = [a for a, r in zip(parts[1:], rng.random(len(parts) - 1)) if r >= thin]
                keep = keep[: target - n_rows]
                if not keep:
                    continue
                out.append(f"u{copy}_{parts[0]} " + " ".join(f"{a}-g{g}" for a in keep))
                n_rows += len(keep)
                n_users += 1
            f.write("\n".join(out) + "\n")
            copy += 1
    n_groups = (copy - 1) // group_size + 1
    item_lines = [ln.split(None, 1) for ln in (src / ITEMS).read_text().splitlines() if ln.strip()]
    with open(dest / ITEMS, "w") as f:
        for g in range(n_groups):
            f.write("".join(f"{p[0]}-g{g} {p[1] if len(p) > 1 else ''}\n" for p in item_lines))
    return {"source": str(src), "source_interactions": per_copy, "copies": copy, "group_size": group_size,
            "thin": thin, "seed": seed,
            "item_groups": n_groups, "users": n_users, "interactions": n_rows,
            "catalogue_items": n_groups * len(item_lines),
            "bytes": (dest / INTER).stat().st_size + (dest / ITEMS).stat().st_size}


# ---------------------------------------------------------------- the pandas baseline

def pandas_prepare(data: Path, out: Path, k: int = 5, n_negatives: int = 19, seed: int = 42,
                   cold_user_fraction: float = 0.10, warm_fraction: float = 0.35, cold_fraction: float = 0.35,
                   max_title_chars: int = 120, max_text_chars: int = 512, fewshot_k=(128, 256)) -> dict:
    """The same steps as `pipelines.prepare` (cold_users=auto), in one process with pandas/numpy.

    Per-user randomness uses the same seeded generators (allmrec.data.sampling), so the candidates
    come out identical and can be compared row by row.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from allmrec.data import text
    from allmrec.data.sampling import (STREAM_COLD_TEST, STREAM_FEWSHOT, STREAM_HOLDOUT, STREAM_TEST,
                                       STREAM_VALID, sample_negatives, stable_hash, user_rng, user_uniform)
    from allmrec.data.sequences import popularity_groups

    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 3)
        t = now

    # parse: one row per (user, item, position); a line without items is a malformed row
    lines = pd.Series((data / INTER).read_text().splitlines(), dtype=object)
    tok = lines.str.split()
    tok = tok[tok.str.len() > 0]
    n_bad = int((tok.str.len() < 2).sum())
    tok = tok[tok.str.len() >= 2]
    df = pd.DataFrame({"user": tok.str[0], "item": tok.str[1:]}).explode("item", ignore_index=True)
    df["ts"] = df.groupby("user", sort=False).cumcount().astype(np.float64)
    n_rows = len(df) + n_bad
    del lines, tok
    lap("parse")

    # dedupe (user, item, ts) and order each user's items chronologically (ties by item id)
    before = len(df)
    df = df.drop_duplicates(["user", "item", "ts"]).sort_values(["user", "ts", "item"], ignore_index=True)
    n_dup = before - len(df)
    lens = df.groupby("user", sort=False)["item"].transform("size")
    exact3 = df[lens == 3]
    rule = "exact3" if len(exact3) else "holdout"
    df = df[lens != 3]
    lap("sequences")

    # iterative k-core: drop items with < k interactions and users with < max(k, 3), to a fixed point
    min_len = max(k, 3)
    df = df[df.groupby("user", sort=False)["item"].transform("size") >= min_len]
    iterations = 0
    while True:
        counts = df["item"].value_counts()
        bad = counts.index[counts < k]
        if len(bad) == 0:
            break
        iterations += 1
        df = df[~df["item"].isin(bad)]
        df = df[df.groupby("user", sort=False)["item"].transform("size") >= min_len]
    item_vocab = sorted(counts.index.tolist())
    n_items = len(item_vocab)
    k_core_inter = len(df)
    lap("k_core")

    # id maps, cold users, leave-one-out split with seeded negatives
    reg_users = sorted(df["user"].unique().tolist())
    cold_list: list[str] = []
    if rule == "holdout":
        cold_set = {u for u in reg_users if user_uniform(seed, u, STREAM_HOLDOUT) < cold_user_fraction}
        cold_list = sorted(cold_set)
        reg_users = [u for u in reg_users if u not in cold_set]
    else:
        known = exact3["item"].isin(set(item_vocab))
        ok = known.groupby(exact3["user"]).all()
        cold_list = sorted(ok.index[ok].tolist())
        cold_set = set(cold_list)
    user_vocab = reg_users + cold_list
    uid = {u: i for i, u in enumerate(user_vocab)}
    src = pd.concat([df, exact3[exact3["user"].isin(cold_set)]]) if rule == "exact3" else df
    codes = pd.Categorical(src["item"], categories=item_vocab).codes.astype(np.int32) + 1
    users = src["user"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    seqs = np.split(codes, starts[1:])
    seq_users = users[starts]
    reg_rows: dict[str, list] = {c: [] for c in ("user", "seq", "vt", "vneg", "tt", "tneg")}
    cold_rows: dict[str, list] = {c: [] for c in ("user", "history", "target", "negatives")}
    for u, s in zip(seq_users, seqs):
        if u in cold_set:
            neg = sample_negatives(user_rng(seed, u, STREAM_COLD_TEST), n_items, s, n_negatives)
            cold_rows["user"].append(uid[u])
            cold_rows["history"].append(s[:2])
            cold_rows["target"].append(int(s[2]))
            cold_rows["negatives"].append(neg)
        else:
            tneg = sample_negatives(user_rng(seed, u, STREAM_TEST), n_items, s, n_negatives)
            vneg = sample_negatives(user_rng(seed, u, STREAM_VALID), n_items, s, n_negatives)
            for c, v in zip(("user", "seq", "vt", "vneg", "tt", "tneg"),
                            (uid[u], s, int(s[-2]), vneg, int(s[-1]), tneg)):
                reg_rows[c].append(v)
    train = np.concatenate([s[:-2] for s in reg_rows["seq"]])
    train_counts = np.bincount(train, minlength=n_items + 1)[1:]
    lap("ids_and_candidates")

    # item table: text of kept items, warm/cold popularity groups
    meta: dict[str, str] = {}
    for line in (data / ITEMS).read_text().splitlines():
        p = line.split(None, 1)
        if p:
            meta.setdefault(p[0], text.clean_text(p[1]) if len(p) > 1 else "")
    titles = [text.prompt_title(text.clean_text(meta.get(r, ""), max_title_chars), r, max_title_chars)
              for r in item_vocab]
    texts = [text.item_text(ti, "", max_text_chars) for ti in titles]
    groups = popularity_groups(train_counts, warm_fraction, cold_fraction)
    lap("items")

    out.mkdir(parents=True, exist_ok=True)
    li = pa.list_(pa.int32())
    pq.write_table(pa.table({"user": pa.array(reg_rows["user"], pa.int32()), "seq": pa.array(reg_rows["seq"], li)}),
                   out / "sequences.parquet")
    for name, tgt, neg, cut in (("candidates_valid", "vt", "vneg", 2), ("candidates_test", "tt", "tneg", 1)):
        pq.write_table(pa.table({"user": pa.array(reg_rows["user"], pa.int32()),
                                 "target": pa.array(reg_rows[tgt], pa.int32()),
                                 "negatives": pa.array(reg_rows[neg], li),
                                 "history": pa.array([s[:-cut] for s in reg_rows["seq"]], li)}),
                       out / f"{name}.parquet")
    pq.write_table(pa.table({"user": pa.array(cold_rows["user"], pa.int32()),
                             "target": pa.array(cold_rows["target"], pa.int32()),
                             "negatives": pa.array(cold_rows["negatives"], li),
                             "history": pa.array(cold_rows["history"], li)}), out / "cold_users.parquet")
    pq.write_table(pa.table({"item": pa.array(np.arange(1, n_items + 1, dtype=np.int32)), "raw_id": item_vocab,
                             "title": titles, "text": texts, "n_train": pa.array(train_counts.astype(np.int32)),
                             "group": groups.tolist()}), out / "items.parquet")
    pq.write_table(pa.table({"user": pa.array(np.arange(len(user_vocab), dtype=np.int32)), "raw_id": user_vocab,
                             "cold_user": [u in cold_set for u in user_vocab]}), out / "users.parquet")
    order = sorted(range(len(reg_users)), key=lambda i: stable_hash(f"{seed}:{STREAM_FEWSHOT}:{reg_users[i]}"))
    fs = [(kk, i) for kk in sorted(fewshot_k) for i in sorted(order[:kk])]
    pq.write_table(pa.table({"k": pa.array([a for a, _ in fs], pa.int32()), "user": pa.array([b for _, b in fs],
                                                                                              pa.int32())}),
                   out / "fewshot.parquet")
    lap("write")
    return {"rows_read": n_rows, "duplicates_removed": n_dup, "k_core_iterations": iterations,
            "k_core_users": len(reg_users) + (len(cold_list) if rule == "holdout" else 0),
            "k_core_interactions": k_core_inter, "users": len(reg_users), "items": n_items,
            "interactions": int(train.size) + 2 * len(reg_users), "cold_users": len(cold_list),
            "cold_user_rule": rule, "warm_items": int((groups == "warm").sum()),
            "cold_items": int((groups == "cold").sum()), "timings_s": timings}


# ---------------------------------------------------------------- child processes

def _child(impl: str, data: Path, run: Path, result: Path) -> None:
    """Runs in the measured child process: one implementation, timings and counts to `result`."""
    t0 = time.perf_counter()
    if impl == "ray":
        from allmrec.config import load_config
        from pipelines.common import init_ray, setup_logging
        from pipelines.prepare import prepare
        setup_logging()
        cfg = load_config(None, [f"run_dir={run}", "data.format=seq_txt", f"data.path={data}", "data.k_core=5",
                                 "ray.progress=false"])
        t_init = time.perf_counter()
        init_ray(cfg)
        startup = time.perf_counter() - t_init
        out = prepare(cfg, force=True)
        wall = time.perf_counter() - t_init
        m = json.loads((out / "manifest.json").read_text())
        res = {"counts": m["counts"], "timings_s": m["timings_s"], "startup_s": round(startup, 2),
               "wall_s": round(wall, 2), "out": str(out)}
    else:
        t1 = time.perf_counter()
        counts = pandas_prepare(data, run / "data")
        res = {"counts": counts, "timings_s": counts.pop("timings_s"), "startup_s": 0.0,
               "wall_s": round(time.perf_counter() - t1, 2), "out": str(run / "data")}
    res["process_s"] = round(time.perf_counter() - t0, 2)
    result.write_text(json.dumps(res))


def _measure(impl: str, data: Path, run: Path, work: Path, timeout: float) -> dict:
    res_path, log_path = work / f"{impl}.json", work / f"{impl}.log"
    cmd = [sys.executable, "-m", "bench.prepare", "--child", impl, "--data", str(data), "--run", str(run),
           "--result", str(res_path)]
    load0 = loadavg()
    with open(log_path, "w") as log, PeakRSS() as mem:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        mem.set_root(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_tree(proc)
            rc = None
        elapsed = time.perf_counter() - t0
    tail = log_path.read_text()[-3000:]
    if rc != 0 or not res_path.exists():
        why = f"timed out after {timeout:.0f} s" if rc is None else f"exit code {rc}"
        print(f"[{impl}] {why}; log tail:\n{tail}", file=sys.stderr)
        return {"impl": impl, "error": why, "elapsed_s": round(elapsed, 1), **mem.result(), "log_tail": tail}
    res = json.loads(res_path.read_text())
    return {"impl": impl, **res, **mem.result(), "loadavg_before": load0, "loadavg_after": loadavg()}


def _stop_tree(proc: subprocess.Popen) -> None:
    """Stop the child we started and every process under it (Ray's), by pid."""
    import psutil
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _same_candidates(ray_out: Path, pd_out: Path) -> bool:
    """Ray and pandas drew the same test candidates for the same users (ids and negatives)."""
    from allmrec.data.load import read_parquet
    a = read_parquet(ray_out / "candidates_test.parquet", "user")
    b = read_parquet(pd_out / "candidates_test.parquet", "user")
    return (len(a) == len(b) and np.array_equal(a["user"].to_numpy(), b["user"].to_numpy())
            and np.array_equal(a["target"].to_numpy(), b["target"].to_numpy())
            and all(np.array_equal(x, y) for x, y in zip(a["negatives"], b["negatives"])))


def _phase_rows(ray_t: dict, pd_t: dict) -> list[dict]:
    order = ["hash_inputs", "parse", "sequences", "k_core", "ids_and_candidates", "items", "write"]
    rows = [{"phase": ph, "ray": ray_t.get(ph), "pandas": pd_t.get(ph)} for ph in order]
    timed = sum(v for k, v in ray_t.items() if k not in ("total", "hash_inputs"))
    rows.append({"phase": "untimed (Ray: total - phases)", "ray": round(ray_t["total"] - timed, 3), "pandas": None})
    rows.append({"phase": "total", "ray": ray_t["total"], "pandas": round(sum(pd_t.values()), 3)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="~300k interactions instead of ~3.4M")
    ap.add_argument("--target", type=int, default=None, help="interactions to build (overrides --quick)")
    ap.add_argument("--group-size", type=int, default=4, help="user copies sharing one catalogue copy")
    ap.add_argument("--thin", type=float, default=0.1, help="probability each copied interaction is dropped")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per implementation")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--child", choices=["ray", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(a.child, a.data, a.run, a.result)
        return {}

    target = a.target or (300_000 if a.quick else 3_400_000)
    timeout = a.timeout or (300.0 if a.quick else 1200.0)
    mach = machine()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        t0 = time.perf_counter()
        info = build_scaled(SPORTS, work / "raw", target, a.group_size, a.thin)
        info["build_s"] = round(time.perf_counter() - t0, 1)
        print(f"data: Amazon Sports x {info['copies']} copies (last one cut) as fresh users u<copy>_<id>, "
              f"{a.thin:.0%} of each copy's interactions dropped (seeded), items "
              f"remapped per group of {a.group_size} copies ({info['item_groups']} groups, "
              f"{info['catalogue_items']:,} catalogue items): {info['users']:,} users, "
              f"{info['interactions']:,} interactions in {work / 'raw'}")
        print(f"machine: {mach['cpu_model']}, {mach['logical_cores']} cores, {mach['ram_gib']} GiB; "
              f"load average {mach['loadavg_1_5_15']}")
        runs = {impl: _measure(impl, work / "raw", work / f"run-{impl}", work, timeout) for impl in ("ray", "pandas")}
        rows = []
        for impl, r in runs.items():
            if "error" in r:
                rows.append({"impl": impl, "wall_s": None, "note": r["error"]})
                continue
            rows.append({"impl": "ours: Ray Data prepare" if impl == "ray" else "baseline: pandas, 1 process",
                         "wall_s": r["wall_s"], "startup_s": r["startup_s"],
                         "rows_per_s": round(r["counts"]["rows_read"] / r["wall_s"]),
                         "peak_rss_gib": r["peak_rss_gib"], "peak_pss_gib": r["peak_pss_gib"],
                         "procs": r["peak_processes"]})
        ok = all("error" not in r for r in runs.values())
        check_keys = ["rows_read", "k_core_iterations", "k_core_users", "items", "k_core_interactions", "users",
                      "cold_users", "cold_user_rule", "interactions", "warm_items", "cold_items"]
        same = ok and all(runs["ray"]["counts"][k] == runs["pandas"]["counts"][k] for k in check_keys)
        same_cands = ok and _same_candidates(Path(runs["ray"]["out"]), Path(runs["pandas"]["out"]))
        result = {"benchmark": "prepare", "quick": a.quick, "machine": mach, "data": info, "runs": runs,
                  "counts_match": same, "test_candidates_match": same_cands, "loadavg_end": loadavg()}
        if ok:
            r, p = runs["ray"], runs["pandas"]
            result["ratios"] = {"wall_ray_over_pandas": round(r["wall_s"] / p["wall_s"], 2),
                                "rows_per_s_ray_over_pandas": round(p["wall_s"] / r["wall_s"], 2),
                                "peak_rss_ray_over_pandas": round(r["peak_rss_gib"] / p["peak_rss_gib"], 2)}
            result["target"] = {"wall_s_max": TARGET_S, "peak_gib_max": TARGET_GIB,
                                "wall_met": r["wall_s"] <= TARGET_S, "memory_met": r["peak_rss_gib"] <= TARGET_GIB}
        print()
        print(table(rows, ["impl", "wall_s", "startup_s", "rows_per_s", "peak_rss_gib", "peak_pss_gib", "procs"]))
        if ok:
            print("\nphases (s; Ray's from its manifest timings_s, which has no entry for the exact-3 split "
                  "and the final write: they are the 'untimed' row):")
            print(table(_phase_rows(runs["ray"]["timings_s"], runs["pandas"]["timings_s"]), ["phase", "ray", "pandas"]))
            result["phases"] = _phase_rows(runs["ray"]["timings_s"], runs["pandas"]["timings_s"])
            print(f"\ncounts after {runs['ray']['counts']['k_core']}-core: "
                  + ", ".join(f"{k} {runs['ray']['counts'][k]:,}" if isinstance(runs['ray']['counts'][k], int)
                              else f"{k} {runs['ray']['counts'][k]}" for k in check_keys[1:]))
            print(f"same counts (Ray vs pandas): {same}; same test candidates: {same_cands}")
            print(f"ratios: {result['ratios']}")
            t = result["target"]
            print(f"target (ours <= {TARGET_S:.0f} s and <= {TARGET_GIB} GiB summed RSS): wall "
                  f"{'met' if t['wall_met'] else 'NOT met'}, memory {'met' if t['memory_met'] else 'NOT met'}")
        print(f"load average at the end: {result['loadavg_end']}")
        name = f"prepare_{target}" if a.target else "prepare_quick" if a.quick else "prepare"
        path = write_results(name, result)
        print(f"wrote {path}")
        return result
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
