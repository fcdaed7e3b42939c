"""What every benchmark shares: a peak-memory sampler, a machine description, tables and JSON results.

Memory: `PeakRSS` samples, every 0.2 s in a background thread, the summed resident set size of a root
process (by default this one), all of its descendants (a local Ray cluster's GCS, raylet and every
worker are started under the driver, so they are descendants) and any other live process whose command
line starts with `ray::` or whose parent is a raylet we already count (workers that Ray re-parents).
RSS double-counts pages shared between processes (Ray's object store in /dev/shm, shared libraries),
so the sum is an upper bound; the proportional set size (PSS, shared pages split between their users)
is sampled too and reported beside it.
"""
from __future__ import annotations

import json
import os
import platform
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

OUT_DIR = Path(__file__).resolve().parent / "out"
GiB = float(1 << 30)


class PeakRSS:
    """Context manager: peak summed RSS / PSS (bytes) of a process tree while the block runs.

    `root` is a pid (default: this process); `set_root(pid)` switches to a child started inside
    the block (the sampler then counts that child's tree only, not this process).
    """

    def __init__(self, root: int | None = None, interval: float = 0.2, include_ray: bool = True):
        self.root = root or os.getpid()
        self.interval = interval
        self.include_ray = include_ray
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pss_ok = True

    def set_root(self, pid: int) -> None:
        self.root = pid

    def _procs(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root)
            procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.NoSuchProcess:
            return []
        if self.include_ray:
            raylets = {pid for pid, p in procs.items() if _safe(lambda: p.name(), "") == "raylet"}
            for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
                if p.pid in procs:
                    continue
                cmd = p.info.get("cmdline") or []
                if p.info.get("ppid") in raylets or (cmd and cmd[0].startswith("ray::") and self._ours(p)):
                    procs[p.pid] = p
        return list(procs.values())

    def _ours(self, p: psutil.Process) -> bool:
        """A `ray::` process belongs to our cluster when one of its ancestors is our root (other jobs
        on a shared machine may run their own Ray clusters; their workers must not be counted)."""
        try:
            return any(a.pid == self.root for a in p.parents())
        except psutil.Error:
            return False

    def sample(self) -> None:
        rss = pss = 0
        procs = self._procs()
        for p in procs:
            try:
                if self._pss_ok:
                    m = p.memory_full_info()
                    rss += m.rss
                    pss += getattr(m, "pss", m.rss)
                else:
                    rss += p.memory_info().rss
            except psutil.AccessDenied:
                self._pss_ok = False
            except psutil.Error:
                pass
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict[str, Any]:
        return {"peak_rss_gib": round(self.peak_rss / GiB, 3),
                "peak_pss_gib": round(self.peak_pss / GiB, 3) if self._pss_ok else None,
                "peak_processes": self.peak_procs, "rss_samples": self.samples}


def _safe(fn, default):
    try:
        return fn()
    except psutil.Error:
        return default


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, load average and library versions of this machine, now."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    info: dict[str, Any] = {
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
        "ram_available_gib": round(psutil.virtual_memory().available / GiB, 1),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    for mod in ("torch", "ray", "pandas", "pyarrow", "sentence_transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001  (a version string is best effort)
            pass
    return info


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain markdown table (pastes straight into docs/benchmarks.md)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_results(name: str, result: dict[str, Any]) -> Path:
    """bench/out/<name>.json (the latest run, what the docs tables are copied from) and a dated copy
    bench/out/runs/<name>-<UTC time>.json (runs on a shared machine differ with its load: keep them all)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2, default=str)
    path = OUT_DIR / f"{name}.json"
    path.write_text(text)
    (OUT_DIR / "runs").mkdir(exist_ok=True)
    (OUT_DIR / "runs" / f"{name}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(text)
    return path


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def prepared_scientific(run_dir: Path, *overrides: str):
    """Config of a fresh run folder holding the prepared amazon-scientific set (Ray prepare, not timed).

    Returns (cfg, seconds the preparation took)."""
    from allmrec.config import load_config
    from pipelines.prepare import prepare

    src = SHARED_DATA / "amazon-scientific"
    if not (src / "Scientific.inter.json").is_file():
        raise FileNotFoundError(f"{src} not found: the shared amazon-scientific data is needed")
    cfg = load_config(None, [f"run_dir={run_dir}", "data.format=seq_json", f"data.path={src}", "ray.progress=false",
                             *overrides])
    t0 = time.perf_counter()
    prepare(cfg)
    return cfg, time.perf_counter() - t0
