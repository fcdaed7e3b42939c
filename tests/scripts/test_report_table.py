"""scripts/report_table.py: one table from several evaluation reports, refusing mismatched candidate sets."""
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("report_table", Path(__file__).parents[2] / "scripts" / "report_table.py")
report_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report_table)


def _report(tmp_path: Path, name: str, hit1: float, users: int = 100, data: str = "d1") -> Path:
    m = {"hit@1": hit1, "ndcg@10": 0.5, "mrr": 0.4, "n": users}
    r = {"meta": {"data": data, "seed": 42, "mode": "rank", "users_overall": users, "users_cold": 10},
         "metrics": {"sasrec": {"overall": m, "cold_items": {**m, "n": 0}}, "allmrec": {"overall": {**m, "hit@1": 0.1}}}}
    d = tmp_path / name
    d.mkdir()
    (d / "report.json").write_text(json.dumps(r))
    return d


def test_rows_labels_and_standard_error(tmp_path):
    a, b = _report(tmp_path, "a", 0.36), _report(tmp_path, "b", 0.4)
    out = report_table.table([report_table.load(str(a)), report_table.load(f"5 ep={b}")], models=["sasrec"])
    rows = out.splitlines()[2:]
    assert len(rows) == 2 and "allmrec" not in out
    assert rows[0].startswith("| sasrec | 0.3600 ± 0.048 |")  # sqrt(.36 * .64 / 100) = .048
    assert rows[1].startswith("| sasrec (5 ep) | 0.4000 ± 0.049 |")
    assert "| 100/0/0/0 |" in rows[0]  # an empty scenario is blank, not 0.0


def test_refuses_different_candidate_sets(tmp_path):
    a, b = _report(tmp_path, "a", 0.3), _report(tmp_path, "b", 0.3, users=60)
    with pytest.raises(ValueError, match="users_overall"):
        report_table.table([report_table.load(str(a)), report_table.load(str(b))])
    assert "0.3000" in report_table.table([report_table.load(str(a)), report_table.load(str(b))], mixed=True)


def test_missing_report_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no report.json"):
        report_table.load(str(tmp_path / "nope"))


def test_generation_metric_column(tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    r = {"meta": {"data": "d", "seed": 1, "mode": "generate", "users_overall": 4, "users_cold": 0},
         "metrics": {"allmrec": {"overall": {"n": 4, "gen_hit@1": 0.25, "gen_no_candidate": 0.5}}}}
    (d / "report.json").write_text(json.dumps(r))
    out = report_table.table([report_table.load(str(d))], metric="gen_hit@1")
    assert "overall gen_hit@1" in out and "| allmrec | 0.2500 ± 0.217 |" in out  # sqrt(.25*.75/4) = .2165


def test_paired_column_from_the_report(tmp_path):
    d = _report(tmp_path, "p", 0.3)
    r = json.loads((d / "report.json").read_text())
    r["paired"] = {"base": "sasrec", "hit@1": {"allmrec": {"overall": {"diff": -0.2, "se": 0.031, "wins": 3,
                                                                         "losses": 23, "n": 100}}}}
    (d / "report.json").write_text(json.dumps(r))
    rows = report_table.table([report_table.load(str(d))]).splitlines()[2:]
    assert "| -0.2000 ± 0.031 |" in rows[1] and rows[1].startswith("| allmrec |")
    assert "| 0.5000 | 0.4000 |  |" in rows[0]  # the CF model itself (and older reports): blank
