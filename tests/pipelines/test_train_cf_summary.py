"""train-cf's summary of a resumed run: the whole run's epochs and time, and this attempt's (Ray-free)."""
from __future__ import annotations

import json

from pipelines.train_cf import run_and_attempt, summary

TEST = {"model": {"hit@1": 0.25, "hit@5": 0.5, "ndcg@10": 0.4, "n": 100}}


def _history(epochs: range, finished_at: float, epoch_s: float = 28.6) -> list[dict]:
    return [{"epoch": e, "loss": 1.0 / e, "train_s": epoch_s - 1, "epoch_s": epoch_s, "finished_at": finished_at + e}
            for e in epochs]


def _write(tmp_path, history: list[dict], started_at: float, train_s: float):
    (tmp_path / "manifest.json").write_text(json.dumps({"model": "sasrec"}))
    (tmp_path / "metrics.json").write_text(json.dumps({"history": history, "test": TEST, "train_seconds": train_s,
                                                       **run_and_attempt(history, started_at, train_s)}))
    return summary(tmp_path).splitlines()[0]


def test_resumed_run_reports_the_whole_run_and_this_attempt(tmp_path):
    # epochs 1-25 by a first attempt (killed), 26-50 by this one (started at t=5000)
    history = _history(range(1, 26), 1000.0) + _history(range(26, 51), 5000.0)
    line = _write(tmp_path, history, 5000.0, 715.5)
    assert line.startswith("trained sasrec: 50 epochs, 1,430.0 s of epochs over the whole run; this attempt "
                           "trained epochs 26-50 in 715.5 s -> ")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["attempt"] == {"first_epoch": 26, "last_epoch": 50, "epochs": 25, "seconds": 715.5}
    assert m["run"] == {"epochs": 50, "epoch_seconds": 1430.0}


def test_a_run_in_one_attempt_reads_as_before(tmp_path):
    # automatic restarts inside one command are the same attempt: every epoch finished after it started
    line = _write(tmp_path, _history(range(1, 4), 100.0), 100.0, 90.2)
    assert line.startswith("trained sasrec in 90.2 s (3 epochs) -> ")
    # a resume that found the training finished (the run died after its last epoch)
    line = _write(tmp_path, _history(range(1, 4), 100.0), 500.0, 12.0)
    assert "3 epochs, 85.8 s of epochs over the whole run; this attempt trained no epoch" in line
    # metrics of a run from before epoch_s / finished_at were recorded: read as one attempt
    old = [{"epoch": e, "loss": 1.0} for e in range(1, 4)]
    assert _write(tmp_path, old, 100.0, 7.0).startswith("trained sasrec in 7.0 s (3 epochs)")
