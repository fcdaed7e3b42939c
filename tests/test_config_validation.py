"""The configuration fails fast: declared value rules, registry names, files, every error at once."""
from __future__ import annotations

from pathlib import Path

import pytest

from allmrec.config import Config, ConfigError, config_from_dict, field_rules, load_config

REPO = Path(__file__).resolve().parents[1]

# the values issue 21 found accepted, each with a word its error must contain
BAD = {
    "eval.variants=[sasrec,allmrc]": "eval.variants[1]='allmrc'",
    "cf.model=sasrc": "cf.model='sasrc'",
    "cf.epochs=0": "cf.epochs=0",
    "cf.lr=-1": "cf.lr=-1.0",
    "score.top_k=0": "score.top_k=0",
    "encode.num_actors=0": "encode.num_actors=0",
    "eval.max_users=-5": "eval.max_users=-5",
    "serve.port=99999": "serve.port=99999",
    "stage1.deepspeed_config=nope.json": "stage1.deepspeed_config='nope.json'",
}


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as ei:
        load_config(None, [*BAD, "cf.epoch=3", "cf.hidden=abc"])
    errs = ei.value.errors
    assert len(errs) == len(BAD) + 2, errs
    for want in [*BAD.values(), "unknown config key 'cf.epoch' (did you mean cf.epochs?)", "cf.hidden: expected an integer"]:
        assert sum(want in e for e in errs) == 1, (want, errs)
    assert str(ei.value).startswith(f"{len(BAD) + 2} errors:")


def test_each_bad_value_alone_fails_and_suggests():
    for ov, want in BAD.items():
        with pytest.raises(ConfigError) as ei:
            load_config(None, [ov])
        assert ei.value.errors == [e for e in ei.value.errors if want in e] and len(ei.value.errors) == 1, ov
    with pytest.raises(ConfigError, match="did you mean 'sasrec'"):
        load_config(None, ["cf.model=sasrc"])
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, ["stage2.choice_weight=.inf"])


def test_shipped_configs_and_good_values_load():
    for f in sorted((REPO / "configs").glob("*.yaml")):
        load_config(f)
    cfg = load_config(None, ["cf.model=gru4rec", "eval.variants=[cf,most_popular,tallrec,mlp_llm]", "serve.port=1",
                             "eval.max_users=null", "stage2.deepspeed_config=configs/deepspeed/zero0.json"])
    assert cfg.cf.model == "gru4rec" and cfg.eval.max_users is None and cfg.serve.port == 1


def test_registry_names_are_read_at_check_time(monkeypatch):
    """A plugged-in CF model (one line in CF_MODELS) is accepted by cf.model and eval.variants."""
    from allmrec import cf as cf_pkg
    with pytest.raises(ConfigError):
        load_config(None, ["cf.model=mycf"])
    monkeypatch.setitem(cf_pkg.CF_MODELS, "mycf", cf_pkg.SASRec)
    cfg = load_config(None, ["cf.model=mycf", "eval.variants=[mycf]"])
    assert cfg.cf.model == "mycf"


def test_yaml_file_errors_and_cross_field_rules_together(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("cf: {epochs: 0, modle: sasrec}\nserve: {min_replicas: 3, max_replicas: 2}\nfewshot: 7\n")
    with pytest.raises(ConfigError) as ei:
        load_config(f, ["score.pool=some"])
    text = "\n".join(ei.value.errors)
    for want in ("cf.epochs=0", "unknown config key 'cf.modle'", "serve.min_replicas must be <=",
                 "fewshot must be one of", "score.pool='some'"):
        assert want in text, text
    with pytest.raises(ConfigError, match="candidate_order=cf .* set stage2.use_user_token=true"):
        load_config(None, ["stage2.candidate_order=cf", "stage2.use_user_token=false"])
    assert load_config(None, ["stage2.candidate_order=cf"]).stage2.candidate_order == "cf"
    # the baselines in the CF order: an ablation switch that needs the CF order, and lets a variant without
    # the user token be trained on it
    s2 = load_config(None, ["stage2.candidate_order=cf", "stage2.order_baselines=true",
                            "stage2.use_user_token=false"]).stage2
    assert s2.order_for(False) == s2.order_for(True) == "cf"
    assert load_config(None, ["stage2.candidate_order=cf"]).stage2.order_for(False) == "seeded"
    with pytest.raises(ConfigError, match="order_baselines=true .* needs stage2.candidate_order=cf"):
        load_config(None, ["stage2.order_baselines=true"])
    with pytest.raises(ConfigError, match="stage2.candidate_order='score'"):
        load_config(None, ["stage2.candidate_order=score"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, ["eval.variants=[a"])


def test_files_are_checked_where_the_config_is_loaded_only():
    d = Config().to_dict()
    d["stage2"]["deepspeed_config"] = "elsewhere/zero3.json"  # a worker's dict: the driver checked it
    assert config_from_dict(d).stage2.deepspeed_config == "elsewhere/zero3.json"
    d["cf"]["epochs"] = 0
    with pytest.raises(ConfigError, match="cf.epochs=0"):
        config_from_dict(d)


def test_rules_are_declared_next_to_the_fields():
    rules = field_rules()
    assert rules["cf.epochs"] == {"ge": 1} and rules["serve.port"] == {"ge": 1, "le": 65535}
    assert rules["cf.model"] == {"registry": "cf_model"} and rules["eval.variants"] == {"registry": "eval_variant"}
    assert rules["stage1.deepspeed_config"] == {"file": True}
    assert "stage2.user_token_position" in rules and "data.domain.verb" in rules


def test_project_files_resolve_from_any_working_directory(tmp_path, monkeypatch):
    from allmrec.config import resolve_project_file
    monkeypatch.chdir(tmp_path)
    assert resolve_project_file("configs/ml100k.yaml") == REPO / "configs" / "ml100k.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "ml100k.yaml").write_text("name: mine\n")
    assert resolve_project_file("configs/ml100k.yaml").resolve() == tmp_path / "configs" / "ml100k.yaml"
    assert load_config(None, ["stage1.deepspeed_config=configs/deepspeed/zero0.json"])  # found in the project
