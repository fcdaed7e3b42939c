"""The cluster path, checked without a cluster: DeepSpeed configs through DeepSpeed's own parser,
cluster.yaml through Ray's launcher schema and the preparation `ray up` applies, the OPT-6.7B profile
through allmrec's config loader. No process group, no Ray processes, no GPU."""
from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from allmrec.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
DS_DIR = REPO / "configs" / "deepspeed"
DS_STAGES = {"zero0.json": 0, "zero2.json": 2, "zero3.json": 3}
PROFILE = REPO / "configs" / "cluster-opt6.7b.yaml"
CLUSTER = REPO / "cluster.yaml"
GPUS_PER_NODE = 4  # the hardware cluster.yaml describes: 4x A6000 per node


# ----------------------------------------------------------------------------- DeepSpeed

def _ds(raw: dict[str, Any]):
    from deepspeed.runtime.config import DeepSpeedConfig  # validates without any process group
    return DeepSpeedConfig(copy.deepcopy(raw))


def _ds_raw(name: str) -> dict[str, Any]:
    return json.loads((DS_DIR / name).read_text())


def _known_top_level_keys() -> set[str]:
    import deepspeed.runtime.constants as C
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION
    return {v for k, v in vars(C).items() if k.isupper() and isinstance(v, str)} | {ZERO_OPTIMIZATION}


def _walk(obj: Any):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)


@pytest.mark.parametrize("name,stage", DS_STAGES.items())
def test_deepspeed_config_is_valid_and_concrete(name: str, stage: int) -> None:
    raw = _ds_raw(name)
    # DeepSpeed silently ignores unknown top-level keys: a typo would be a setting that never applies.
    assert set(raw) <= _known_top_level_keys(), set(raw) - _known_top_level_keys()
    # The training code overrides batch sizes and bf16; the files hold concrete defaults, never "auto".
    assert "auto" not in [v for v in _walk(raw) if isinstance(v, str)]
    cfg = _ds(raw)
    assert cfg.zero_optimization_stage == stage
    assert isinstance(raw["train_micro_batch_size_per_gpu"], int) and raw["gradient_accumulation_steps"] == 1
    assert cfg.train_batch_size == raw["train_micro_batch_size_per_gpu"]  # world size 1 without a group
    assert cfg.gradient_clipping == 1.0
    assert not cfg.bfloat16_config.enabled and not cfg.float16_config.enabled  # code enables bf16 on GPU
    assert cfg.zero_allow_untested_optimizer  # a client torch AdamW over the trainable parameters
    assert cfg.zero_config.offload_param is None and cfg.zero_config.offload_optimizer is None


def test_zero3_settings() -> None:
    z = _ds(_ds_raw("zero3.json")).zero_config
    assert 0 < z.param_persistence_threshold <= 100_000  # small; the code sets 0 for tiny test models
    assert z.gather_16bit_weights_on_model_save is False  # only the projectors are exported
    assert z.overlap_comm and z.max_live_parameters <= 1_000_000_000


@pytest.mark.parametrize("name", DS_STAGES)
def test_runtime_overrides_validate(name: str) -> None:
    """What the training code does on GPU: its batch sizes, bf16 on; for tiny models no persistence."""
    raw = _ds_raw(name)
    raw.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=3, bf16={"enabled": True})
    if DS_STAGES[name] == 3:
        raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cfg = _ds(raw)
    assert cfg.bfloat16_config.enabled and cfg.train_batch_size == 6
    assert cfg.zero_optimization_stage == DS_STAGES[name]
    if DS_STAGES[name] == 3:
        assert cfg.zero_config.param_persistence_threshold == 0


def test_deepspeed_parser_rejects_bad_configs() -> None:
    """Guards the tests above: the parser really validates (a no-op parser would pass them)."""
    raw = _ds_raw("zero3.json")
    typo = copy.deepcopy(raw)
    typo["zero_optimization"]["stage3_param_persistance_threshold"] = 0
    with pytest.raises(Exception, match="persistance"):
        _ds(typo)
    both = copy.deepcopy(raw)
    both["fp16"] = {"enabled": True}
    both["bf16"] = {"enabled": True}
    with pytest.raises(AssertionError):
        _ds(both)


def test_config_defaults_point_to_shipped_deepspeed_files() -> None:
    cfg = Config()
    for sect in (cfg.stage1, cfg.stage2):
        path = REPO / sect.deepspeed_config
        assert path.is_file(), path
        assert json.loads(path.read_text())["zero_optimization"]["stage"] == sect.zero_stage


# ----------------------------------------------------------------------------- cluster.yaml

def _cluster_raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _prepare_and_validate(raw: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does with the file before touching any machine: merge the provider's defaults,
    build node types, check the result against the schema and the launcher's own rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def test_cluster_yaml_matches_ray_schema() -> None:
    import jsonschema
    raw = _cluster_raw()
    jsonschema.validate(raw, _ray_schema())
    bad = copy.deepcopy(raw)
    bad["idle_timeout_minuts"] = 5  # the schema forbids unknown keys: the check has teeth
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _ray_schema())


def test_cluster_yaml_prepares_like_ray_up() -> None:
    raw = _cluster_raw()
    cfg = _prepare_and_validate(raw)
    n_workers = len(raw["provider"]["worker_ips"])
    (node_type,) = cfg["available_node_types"].values()  # on-premise: one detected node type
    assert node_type["min_workers"] == node_type["max_workers"] == cfg["max_workers"] == n_workers


def test_cluster_yaml_on_premise_fields() -> None:
    raw = _cluster_raw()
    prov = raw["provider"]
    assert prov["type"] == "local"
    ips = [prov["head_ip"], *prov["worker_ips"]]
    assert len(prov["worker_ips"]) >= 1 and len(set(ips)) == len(ips)  # multi-node, no IP twice
    assert raw["max_workers"] == len(prov["worker_ips"])
    # Ray's local provider aborts on explicit node types; GPUs are detected by `ray start`.
    assert "available_node_types" not in raw and "head_node_type" not in raw
    assert raw["auth"]["ssh_user"] and raw["auth"]["ssh_private_key"]
    assert raw["upscaling_speed"] > 0 and raw["idle_timeout_minutes"] >= 0
    for remote, local in raw["file_mounts"].items():
        assert remote.startswith("~/allmrec/") and (REPO / local).exists(), (remote, local)
    mounted = {Path(v).name for v in raw["file_mounts"].values()}
    assert {"allmrec", "pipelines", "serve", "configs", "scripts", "pyproject.toml", "constraints.txt"} <= mounted


def test_cluster_commands() -> None:
    raw = _cluster_raw()
    keys = ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for cmd in raw[key]:
            r = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
            assert r.returncode == 0, (key, cmd, r.stderr)
    setup = raw["setup_commands"]
    pin = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    torch_i = next(i for i, c in enumerate(setup) if f"torch=={pin}" in c and "--index-url" in c)
    boot_i = next(i for i, c in enumerate(setup) if "scripts/bootstrap.sh" in c)
    assert torch_i < boot_i  # the CUDA build of the pinned torch goes in before bootstrap pins torch
    head, worker = " ".join(raw["head_start_ray_commands"]), " ".join(raw["worker_start_ray_commands"])
    assert "ray start --head --port=6379" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    for flag in ("--node-manager-port", "--object-manager-port", "--min-worker-port", "--max-worker-port"):
        assert re.findall(flag + r"=(\d+)", head) == re.findall(flag + r"=(\d+)", worker) != []
    # jobs run `allmrec` from the venv, so Ray must be started from it
    assert all("source ~/allmrec/.venv/bin/activate" in c for c in raw["head_start_ray_commands"])


def test_cloud_alternative_validates() -> None:
    """The commented AWS block, uncommented in place of provider/auth/max_workers, is a valid config."""
    lines = CLUSTER.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("# >>> cloud alternative"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("# <<< cloud alternative"))
    body = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines[start + 1:end]]
    first = next(i for i, ln in enumerate(body) if ln.startswith("provider:"))
    alt = yaml.safe_load("\n".join(body[first:]))
    assert set(alt) == {"provider", "auth", "max_workers", "head_node_type", "available_node_types"}
    raw = _cluster_raw()
    raw.update(alt)
    cfg = _prepare_and_validate(raw)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] == GPUS_PER_NODE and gpu["resources"]["CPU"] > 0
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]


# ----------------------------------------------------------------------------- OPT-6.7B profile

def test_cluster_profile_loads_with_paper_hyperparameters() -> None:
    raw = yaml.safe_load(PROFILE.read_text())
    assert "base" not in raw  # a dataset profile may become its base later
    assert "data" not in raw and "beta" not in raw["stage1"]  # dataset-specific: left to the dataset profile
    cfg = load_config(PROFILE)
    assert cfg.ray.address == "auto" and cfg.ray.num_cpus is None  # attach; ray.init refuses num_cpus then
    s1, s2 = cfg.stage1, cfg.stage2
    assert (s1.lr, s1.batch_size, s1.epochs, s1.alpha, s1.latent) == (1e-4, 32, 10, 0.5, 128)
    assert (s2.lr, s2.batch_size, s2.epochs) == (1e-4, 4, 5)
    assert cfg.cf.hidden == 50 and cfg.data.n_negatives == 19
    assert s2.llm == "facebook/opt-6.7b"
    assert s2.use_gpu and s2.bf16 and s2.zero_stage == 3 and s2.num_workers >= 4
    assert s1.use_gpu and cfg.cf.use_gpu and cfg.encode.use_gpu and cfg.eval.use_gpu
    tr = cfg.tallrec  # the baseline trains on the same GPUs, its adapters partitioned like Stage-2's LLM
    assert tr.use_gpu and tr.zero_stage == 3 and tr.num_workers == s2.num_workers and not tr.compiles(s2)
    assert s1.max_users is None and s2.max_users is None and cfg.eval.max_users is None
    for sect in (s1, s2, tr):
        assert _ds_raw(Path(sect.deepspeed_config).name)["zero_optimization"]["stage"] == sect.zero_stage
        assert (REPO / sect.deepspeed_config).is_file()
    assert 1 <= cfg.serve.min_replicas <= cfg.serve.max_replicas


def test_cluster_profile_fits_the_cluster() -> None:
    cfg = load_config(PROFILE)
    prov = yaml.safe_load(CLUSTER.read_text())["provider"]
    total_gpus = GPUS_PER_NODE * (1 + len(prov["worker_ips"]))
    demands = {"stage1": cfg.stage1.num_workers, "stage2": cfg.stage2.num_workers, "cf": cfg.cf.num_workers,
               "tallrec": cfg.tallrec.num_workers,
               "encode": cfg.encode.num_actors, "eval": cfg.eval.num_actors,
               "serve": cfg.serve.max_replicas}
    assert all(1 <= n <= total_gpus for n in demands.values()), demands
    assert cfg.stage2.num_workers <= GPUS_PER_NODE  # ZeRO-3 traffic stays inside one node


def test_documented_overrides_apply() -> None:
    cfg = load_config(PROFILE, ["encode.num_actors=8", "serve.max_replicas=8", "stage2.zero_stage=0",
                                "stage2.deepspeed_config=configs/deepspeed/zero0.json", "stage1.beta=0.2"])
    assert (cfg.encode.num_actors, cfg.serve.max_replicas, cfg.stage2.zero_stage, cfg.stage1.beta) == (8, 8, 0, 0.2)


def test_memory_doc_uses_opt_6_7b_architecture() -> None:
    """docs/cluster.md derives its memory figures from OPT-6.7B's architecture; recount the parameters
    (biased linear layers, two LayerNorms per layer, tied input/output embedding, 2 offset positions).
    The same total comes out of transformers' OPTForCausalLM built on the meta device (not done here: the
    import alone takes seconds)."""
    h, ffn, layers, vocab, positions = 4096, 16384, 32, 50272, 2048 + 2
    layer = 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * 2 * h
    total = vocab * h + positions * h + layers * layer + 2 * h
    doc = (REPO / "docs" / "cluster.md").read_text()
    assert (layer, total) == (201_379_840, 6_658_473_984)
    assert f"{total:,}" in doc and f"{layer:,}" in doc
    s, b, a = 850, 4, 32  # the doc's activation rows, in GB
    assert f"{layers * s * b * h * (34 + 5 * a * s / h) / 1e9:.1f} GB" in doc  # upper bound: 30.0 GB
    assert f"{layers * 20 * s * b * h / 1e9:.1f} GB" in doc  # frozen LLM, SDPA: 8.9 GB
    assert "estimate" in doc and "Measured per-token figures" in doc
