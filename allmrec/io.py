"""Artifact I/O shared by every job: atomic output folders, manifests, input hashing.

A job writes into `<dest>.tmp-<random>/` and renames it to `<dest>` only when everything is written, so
a job that dies leaves no half-written artifact; a rerun with the same inputs and config reuses the
finished output (manifest fingerprint) unless forced.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def file_digest(path: str | Path, full_limit: int = 1 << 30) -> dict[str, Any]:
    """Size and sha256 of a file. Files above `full_limit` bytes hash the first and last 64 MiB plus the
    size (documented as `sha256_partial`) so multi-GB dumps do not cost minutes to fingerprint."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with p.open("rb") as f:
        if size <= full_limit:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return {"path": str(p), "size": size, "sha256": h.hexdigest()}
        h.update(f.read(64 << 20))
        f.seek(size - (64 << 20))
        h.update(f.read(64 << 20))
        h.update(str(size).encode())
        return {"path": str(p), "size": size, "sha256_partial": h.hexdigest()}


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    p = Path(directory) / MANIFEST
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(directory: str | Path, fp: str) -> bool:
    """True when `directory` holds a finished artifact made from the same inputs/config fingerprint."""
    m = read_manifest(directory)
    return m is not None and m.get("fingerprint") == fp


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `dest`; on success it replaces `dest` in one rename.

    On any exception the temporary folder is removed and `dest` (if it existed) is left untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f"{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Timer:
    """Collects named wall-clock phases for manifests: `with timer("k_core"): ...`."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - t0, 3)
