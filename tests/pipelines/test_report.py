"""The evaluation report's text and plots from a small fake report.json (no Ray, no model)."""
import json
import math

import pytest

from allmrec.config import Config
from pipelines.evaluate import hit1_se, loss_plot_links, paired_vs, plot_cf_curve, plot_report, render_markdown
from pipelines.workers import plot_losses

REPORT = {"sasrec": {"overall": {"hit@1": 0.25, "hit@3": 0.5, "mrr": 0.4, "n": 60},
                     "cold_users": {"hit@1": 0.1, "n": 40}},
          "allmrec": {"overall": {"hit@1": 0.3, "n": 60, "gen_hit@1": 0.2, "gen_no_candidate": 0.1}}}
META = {"mode": "rank", "users_overall": 60, "users_cold": 40, "seconds": {"sasrec": 1.0, "allmrec": 2.0}}


def test_hit1_standard_error():
    assert hit1_se({"hit@1": 0.25, "n": 60}) == pytest.approx(math.sqrt(0.25 * 0.75 / 60))
    assert hit1_se({"hit@1": 0.0, "n": 10}) == 0.0
    assert hit1_se({"n": 10}) is None


def test_report_text_has_errors_settings_and_plots(tmp_path):
    cfg = Config()
    cfg.stage2.max_users, cfg.stage2.epochs, cfg.stage2.examples_per_user = 60, 3, 2
    cfg.stage2.user_token_position = "answer"
    plots = {"Hit@1": "hit1.png", "CF curve": "cf_valid.png", "Training loss: stage1": "../stage1/loss.png"}
    md = render_markdown(REPORT, META, cfg, plots)
    # every Hit@1 of the scenario table carries its standard error
    assert f"0.2500 ± {math.sqrt(0.25 * 0.75 / 60):.4f}" in md
    assert f"0.1000 ± {math.sqrt(0.1 * 0.9 / 40):.4f}" in md
    assert f"0.3000 ± {math.sqrt(0.3 * 0.7 / 60):.4f}" in md
    row = next(line for line in md.splitlines() if line.startswith("| allmrec |") and "± " not in line)
    assert f"| {math.sqrt(0.3 * 0.7 / 60):.4f} |" in row  # the SE column of the all-metrics table
    # the settings block
    assert "## Settings" in md
    assert f"`{cfg.stage2.llm}`" in md and f"`{cfg.encode.model}`" in md and f"`{cfg.cf.model}`" in md
    assert "users 60, 3 epochs, examples_per_user 2" in md
    assert "user_token_position=answer" in md
    # plots shown and linked with the given relative paths
    for path in plots.values():
        assert f"]({path})" in md


def test_plots_written(tmp_path):
    plot_report(REPORT, tmp_path)
    assert (tmp_path / "hit1.png").stat().st_size > 1000
    hist = [{"epoch": e, "loss": 1.0 / e} | ({"valid_ndcg@10": 0.1 * e, "valid_hit@1": 0.05 * e} if e % 2 == 0 else {})
            for e in range(1, 7)]
    assert plot_cf_curve(hist, tmp_path / "cf.png", "cf")
    assert (tmp_path / "cf.png").stat().st_size > 1000
    assert not plot_cf_curve([], tmp_path / "none.png", "cf") and not (tmp_path / "none.png").exists()


def test_stage1_loss_plot_is_log_scale(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.figure
    scales = []
    orig = matplotlib.figure.Figure.savefig

    def spy(self, *a, **k):
        scales.append(self.axes[0].get_yscale())
        return orig(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    hist = [{"epoch": e, "total": 2.0 / e, "matching": 1.0 / e, "item_recon": 1e-3 / e, "text_recon": 2e-3 / e,
             "rec": 1.0, "step_losses": [2.0 / e, 1.9 / e]} for e in (1, 2)]
    plot_losses(hist, tmp_path / "loss.png", "Stage-1 losses")
    plot_losses([{"epoch": 1, "loss": 0.0}], tmp_path / "zero.png", "zero")  # a zero loss stays linear
    assert scales == ["log", "linear"]


def test_loss_plot_links(tmp_path):
    for d in ("stage1", "stage2/joint-u1", "tallrec"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "loss.png").write_bytes(b"png")
    links = loss_plot_links(tmp_path, tmp_path / "report")
    assert sorted(links.values()) == ["../stage1/loss.png", "../stage2/joint-u1/loss.png", "../tallrec/loss.png"]
    json.dumps(links)


def test_paired_against_the_cf_model():
    import pandas as pd
    # 4 test cases (one cold item) + 2 cold users; rank 0 = a hit
    cases = [("overall", 1, 10, "warm"), ("overall", 2, 11, "warm"), ("overall", 3, 12, "cold"),
             ("overall", 4, 13, "warm"), ("cold_users", 5, 14, "warm"), ("cold_users", 6, 15, "warm")]
    ranks = {"sasrec": [0, 0, 3, 2, 0, 1], "allmrec": [0, 4, 0, 0, 1, 1]}
    res = pd.DataFrame([dict(zip(("scenario", "user", "target", "group"), c), variant=v, rank=ranks[v][i])
                        for v in ranks for i, c in enumerate(cases)])
    p = paired_vs(res.sample(frac=1, random_state=0), "sasrec")  # rows matched by case, not by order
    assert set(p) == {"allmrec"}
    o, ci, cu = p["allmrec"]["overall"], p["allmrec"]["cold_items"], p["allmrec"]["cold_users"]
    assert (o["diff"], o["wins"], o["losses"], o["n"]) == (pytest.approx(0.25), 2, 1, 4)
    assert (ci["diff"], ci["n"], cu["diff"], cu["losses"]) == (1.0, 1, -0.5, 1)
    assert paired_vs(res, "gru4rec") == {}  # the CF model was not scored: nothing to pair with
    md = render_markdown(REPORT, META, Config(), {}, p)
    assert "## Against the CF model (sasrec), paired" in md
    assert f"| allmrec | +0.2500 ± {o['se']:.4f} (2/1) | +1.0000 ± 0.0000 (1/0) | -0.5000 ± 0.5000 (0/1) |" in md
