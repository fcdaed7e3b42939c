"""MLflow tracking: the tiny trained run's metrics read back through MlflowClient (the session fixture's
Ray jobs log to <run_dir>/mlruns by default), evaluate's logging, and the off switch (Ray-free)."""
import os

import pytest

from allmrec.config import load_config
from pipelines.tracking import Tracker, metric_key, progress_line, settings

mlflow = pytest.importorskip("mlflow")


def _client(cfg):
    from mlflow.tracking import MlflowClient
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    s = settings(cfg)
    client = MlflowClient(s["uri"])
    exp = client.get_experiment_by_name(s["experiment"])
    assert exp is not None, f"no experiment {s['experiment']!r} at {s['uri']}"
    return client, exp.experiment_id


def _runs(client, exp_id, job):
    return client.search_runs([exp_id], filter_string=f"tags.job = '{job}'")


def test_trained_run_metrics_read_back(trained_tiny):
    cfg, _ = trained_tiny
    client, exp = _client(cfg)
    cf = _runs(client, exp, "train-cf")[-1]  # the fixture's (the earliest: search_runs lists the newest first)
    assert cf.data.params["cf.epochs"] == "2" and cf.data.params["stage2.epochs"] == "1"
    loss = client.get_metric_history(cf.info.run_id, "loss")
    assert [m.step for m in loss] == [1, 2] and all(m.value > 0 for m in loss)
    assert len(client.get_metric_history(cf.info.run_id, metric_key("valid_ndcg@10"))) >= 1
    assert cf.info.status == "FINISHED"
    # Stage-1 fails at epoch 2 and resumes: the finished attempt logged the epoch it ran
    s1 = [r for r in _runs(client, exp, "stage1") if r.info.status == "FINISHED"]
    assert len(s1) >= 1 and [m.step for m in client.get_metric_history(s1[-1].info.run_id, "total")] == [2]
    # the fixture's Stage-2 (test_stages.py trains more variants in the same run folder later)
    s2 = [r for r in _runs(client, exp, "stage2") if r.data.params["stage2.item_tokens"] == "joint"][-1]
    steps = client.get_metric_history(s2.info.run_id, "step_loss")
    assert len(steps) >= 1 and all(m.value > 0 for m in steps)
    assert [m.step for m in client.get_metric_history(s2.info.run_id, "loss")] == [1]


def test_evaluate_metrics_and_artifacts_logged(tmp_path):
    from pipelines.evaluate import plot_report, track_report
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "tracking.experiment=eval-test"], check_files=False)
    report = {"sasrec": {"overall": {"hit@1": 0.25, "mrr": 0.4, "n": 60}}}
    out = tmp_path / "run" / "report"
    out.mkdir(parents=True)
    plot_report(report, out)
    (out / "report.md").write_text("# r\n")
    (tmp_path / "run" / "stage1").mkdir()
    (tmp_path / "run" / "stage1" / "loss.png").write_bytes((out / "hit1.png").read_bytes())
    track_report(cfg, report, out)
    client, exp = _client(cfg)
    (run,) = _runs(client, exp, "evaluate")
    m = run.data.metrics
    assert m[metric_key("sasrec.overall.hit@1")] == 0.25
    assert m[metric_key("sasrec.overall.hit@1_se")] == pytest.approx((0.25 * 0.75 / 60) ** 0.5)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/hit1.png", "report/report.md"} <= names
    assert [a.path for a in client.list_artifacts(run.info.run_id, "loss_plots/stage1")] == ["loss_plots/stage1/loss.png"]


def test_off_with_one_key(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "tracking.enabled=false"], check_files=False)
    assert settings(cfg) is None
    t = Tracker(settings(cfg), "train-cf", cfg.to_dict())
    t.log_metrics({"loss": 1.0}, step=1)
    t.end()
    assert not t.active and not (tmp_path / "mlruns").exists()
    # rank > 0 never logs
    on = load_config(None, [f"run_dir={tmp_path}"], check_files=False)
    assert not Tracker(settings(on), "x", None, rank=1).active and not (tmp_path / "mlruns").exists()


def test_progress_line():
    line = progress_line("train-cf", {"loss": 0.5, "valid_ndcg@10": 0.25}, 3, 10, [2.0, 4.0, 3.0])
    assert line == "[train-cf] epoch 3/10 loss 0.5000 valid_ndcg@10 0.2500 | 3.0 s/epoch, ~0m21s left"
