"""Experiment tracking with MLflow, and the training jobs' per-epoch progress lines.

By default every job logs to a local MLflow file store inside the run folder (`<run_dir>/mlruns`: nothing
to start; `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <run_dir>/mlruns` shows it).
`tracking.uri` names any other tracking URI (a server, sqlite:///...), `tracking.experiment` the
experiment (default: the config's `name`), `tracking.enabled=false` turns it off. MLflow is imported
lazily, only when tracking is on and only on rank 0: other ranks and a disabled config pay nothing.

One MLflow run per job attempt (a Ray Train restart after a worker failure starts a new one, tagged with
the same job), holding the resolved config as params, per-epoch metrics (and the per-step losses the job
already records, logged in one batch at the end of each epoch), and, for `evaluate`, the evaluation
metrics and the report's files and the run folder's loss plots as artifacts.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)
_BAD = re.compile(r"[^\w\-. /:]")


def settings(cfg) -> dict | None:
    """What a Ray Train worker needs to log (resolved on the driver: a worker's cwd is not the driver's);
    None when tracking is off."""
    t = cfg.tracking
    if not t.enabled:
        return None
    uri = t.uri or (Path(cfg.run_dir).expanduser().resolve() / "mlruns").as_uri()
    return {"uri": uri, "experiment": t.experiment or cfg.name}


def metric_key(k: str) -> str:
    """An MLflow-legal metric name: valid_hit@1 -> valid_hit_at_1."""
    return _BAD.sub("_", k.replace("@", "_at_"))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, key + ".")
        else:
            out[key] = v
    return out


class Tracker:
    """Logs one job to MLflow from rank 0; every method is a no-op elsewhere, when off, or after an MLflow
    error (logged once: tracking never fails a training job)."""

    def __init__(self, track: dict | None, job: str, cfg_dict: dict | None = None, rank: int = 0,
                 tags: dict | None = None):
        self.job, self.client, self.run_id = job, None, None
        self._t0, self._epoch_s = time.perf_counter(), []
        if track is None or rank != 0:
            return
        try:
            if track["uri"].startswith("file:"):  # MLflow 3 asks for this opt-in to keep a plain file store
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            from mlflow.tracking import MlflowClient
            self.client = MlflowClient(track["uri"])
            exp = self.client.get_experiment_by_name(track["experiment"])
            exp_id = exp.experiment_id if exp else self.client.create_experiment(track["experiment"])
            run = self.client.create_run(exp_id, run_name=job, tags={"job": job, **(tags or {})})
            self.run_id = run.info.run_id
            if cfg_dict is not None:
                self.log_params(flatten(cfg_dict))
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _fail(self, e: Exception) -> None:
        log.warning("mlflow tracking of %s is off: %s", self.job, e)
        self.client = self.run_id = None

    def log_params(self, params: dict) -> None:
        if not self.active:
            return
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        try:
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """The finite numbers of `metrics` (others skipped), at `step`."""
        if not self.active:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self._batch(items)

    def log_series(self, key: str, values: list[float], first_step: int) -> None:
        """Per-step values (e.g. an epoch's step losses) in one batch, at steps first_step, first_step + 1, ..."""
        if not self.active or not values:
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self._batch([Metric(metric_key(key), float(v), now, first_step + i) for i, v in enumerate(values)])

    def _batch(self, items: list) -> None:
        try:
            for i in range(0, len(items), 1000):
                self.client.log_batch(self.run_id, metrics=items[i:i + 1000])
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        if not self.active:
            return
        try:
            for p in paths:
                if Path(p).is_file():
                    self.client.log_artifact(self.run_id, str(p), artifact_path)
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def epoch(self, rec: dict, epoch: int, epochs: int, step_losses: list[float] | None = None,
              first_step: int = 0) -> None:
        """The end of an epoch: one progress line (rank 0 only: call it there) and its metrics."""
        # the job's own epoch time when it records one (the wall time since the last call also counts set-up)
        own = rec.get("epoch_s", rec.get("seconds"))
        self._epoch_s.append(float(own) if isinstance(own, (int, float)) else time.perf_counter() - self._t0)
        self._t0 = time.perf_counter()
        print(progress_line(self.job, rec, epoch, epochs, self._epoch_s), flush=True)
        self.log_metrics({k: v for k, v in rec.items() if k not in ("epoch", "finished_at")}, step=epoch)
        if step_losses:
            self.log_series("step_loss", step_losses, first_step)

    def end(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as e:  # noqa: BLE001
            self._fail(e)
        self.run_id = None


def progress_line(job: str, rec: dict, epoch: int, epochs: int, epoch_seconds: list[float]) -> str:
    """`[job] epoch 3/10 loss 0.4213 valid_ndcg@10 0.3120 | 12.3 s/epoch, ~1m26s left` (the time left from
    the mean of this attempt's epochs; early stopping may end sooner)."""
    parts = [f"[{job}] epoch {epoch}/{epochs}"]
    for k in ("loss", "total"):
        if isinstance(rec.get(k), (int, float)):
            parts.append(f"{k} {rec[k]:.4f}")
    for k in ("valid_ndcg@10", "valid_hit@1"):
        if isinstance(rec.get(k), (int, float)):
            parts.append(f"{k} {rec[k]:.4f}")
    per = sum(epoch_seconds) / max(len(epoch_seconds), 1)
    left = per * max(epochs - epoch, 0)
    parts.append(f"| {per:.1f} s/epoch, ~{int(left // 60)}m{int(left % 60):02d}s left")
    return " ".join(parts)
