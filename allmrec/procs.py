"""Ending what a job started: SIGTERM as an exception, and the processes a local Ray cluster leaves behind.

`ray.shutdown()` stops the raylet and the GCS of a cluster the process started, but some of Ray's helper
processes (DashboardAgent, RuntimeEnvAgent) ignore SIGTERM and can outlive it (issue 19). The entry points
(pipelines/cli.py, serve/__main__.py) note their descendants before a job and, at the end, call
`end_new_children`: their shutdown function (e.g. `ray.shutdown`: this module never imports Ray), then
SIGTERM and, after a grace period, SIGKILL to every descendant that was not there before. Nothing
outside the calling process's own tree is touched.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that `finally` blocks run (and clusters are shut down)."""


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (main thread only; elsewhere a no-op). Libraries may
    install their own handler meanwhile (ray.init does: sys.exit), which also unwinds through `finally`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def reclaim_sigterm() -> None:
    """Put Python's SIGTERM handler back in charge after a library installed a C-level one behind Python's
    back: Ray's core worker installs absl's failure-signal handler, which on SIGTERM dumps a stack and
    aborts the driver (no `finally`, no ray.shutdown). Call it right after ray.init (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        handler = signal.getsignal(signal.SIGTERM)
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


def descendants() -> set[int]:
    """Pids of every live descendant of this process."""
    import psutil
    try:
        return {c.pid for c in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def end_new_children(before: set[int], shutdown: Callable[[], None] | None = None,
                     grace_s: float = 10.0) -> list[int]:
    """Call `shutdown`, then end the descendants not in `before`: wait up to 3 s for them to go, SIGTERM
    the rest, SIGKILL those still alive after `grace_s`. A second SIGTERM meanwhile is ignored, so the
    clean-up is not cut short. Returns the pids that had to be signalled."""
    import psutil

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN) if in_main else None
    try:
        try:
            started = [c for c in psutil.Process().children(recursive=True) if c.pid not in before]
        except psutil.Error:
            started = []
        if shutdown is not None:
            shutdown()
        _, alive = psutil.wait_procs(started, timeout=3)
        signalled = [p.pid for p in alive]
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        return signalled
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
