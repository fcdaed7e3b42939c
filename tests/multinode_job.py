"""Multi-node check, run as a subprocess by tests/test_multinode.py.

Starts a local Ray cluster of three nodes (`ray.cluster_utils.Cluster`): a head with 1 CPU and no
"slot", and two worker nodes with 2 CPUs and {"slot": 1} each. Every piece of work below asks for one
"slot", so two of them can only run on two different worker nodes. Then:

1. Ray Data SBERT encode: `map_batches(SbertActor subclass, ActorPoolStrategy(size=2))`, each output
   row tagged with the node id of the actor that encoded it;
2. one Stage-2 ZeRO-3 step on a Ray Train `TorchTrainer` (2 gloo workers, one per node) built from our
   code: `init_distributed`, `deepspeed_config`, `load_frozen_llm`, `Stage2Module` + `Stage2Projector`,
   `build_engine`, a batch from `LLMRecommender.batch`.

Usage: `python tests/multinode_job.py WORKDIR [RAY_TMPDIR]`; prints one line `RESULT {json}` on success.
It runs in its own process because `ray.init` works once per process and the pytest session may
already hold a Ray instance.

All "nodes" share this machine's file system, so the tiny Llama folder written here is read by both
Train workers from the same path; on a real cluster it must sit on shared storage (or be downloaded per
node), exactly like `stage2.llm` in a cluster config.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A private Ray temp dir: `Cluster` writes <tmp>/ray/ray_current_cluster, and a plain `ray.init()`
# anywhere else on the machine (other test sessions) would connect to this cluster if that file sat in
# the shared /tmp/ray. Kept short: Ray puts unix sockets under it (path length limit ~107 bytes).
RAY_TMP = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="rmn", dir="/tmp")
os.environ["RAY_TMPDIR"] = RAY_TMP
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "allmrec" / "torch_extensions"))

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from pipelines.encode import SbertActor  # noqa: E402

SLOT = "slot"  # custom resource: one per worker node, none on the head
N_TEXTS = 32
LLM_DIM_IN = 8  # size of the fake CF user reps / item vectors fed to the projectors


class NodeTaggedSbert(SbertActor):
    """SbertActor plus the id of the node that ran it (a column per row)."""

    def __call__(self, batch: dict) -> dict:
        out = super().__call__(batch)
        out["node"] = np.array([ray.get_runtime_context().get_node_id()] * len(out["item"]))
        return out


def encode_across_nodes() -> dict:
    words = ["red", "blue", "lamp", "glove", "bottle", "rope", "tent", "ball"]
    items = [{"item": i, "text": f"{words[i % 8]} {words[(i // 8) % 8]} model {i}"} for i in range(N_TEXTS)]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # start no task before BOTH actors are up, or the first one ready could encode everything alone
    ctx.wait_for_min_actors_s = 300
    ds = ray.data.from_items(items, override_num_blocks=8)
    ds = ds.map_batches(NodeTaggedSbert, batch_size=4, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=2, max_tasks_in_flight_per_actor=1),
                        fn_constructor_kwargs={"model": "packaged:all-MiniLM-L6-v2", "max_seq_length": 32,
                                               "use_gpu": False, "threads": 1},
                        num_cpus=0.5, resources={SLOT: 1})
    rows = ds.take_all()
    nodes: dict[str, int] = {}
    for r in rows:
        nodes[str(r["node"])] = nodes.get(str(r["node"]), 0) + 1
    embs = np.stack([np.asarray(r["emb"]) for r in rows])
    return {"rows": len(rows), "items": sorted(int(r["item"]) for r in rows), "dim": int(embs.shape[1]),
            "finite": bool(np.isfinite(embs).all()), "rows_per_node": nodes}


def stage2_step(config: dict) -> None:
    """Ray Train worker: one ZeRO-3 forward/backward/step of Stage-2 on a tiny random Llama."""
    import deepspeed
    import torch
    import torch.distributed as dist
    import ray.train

    from allmrec.config import Config
    from allmrec.llm.stage2 import Stage2Projector
    from allmrec.recommender import Example, LLMRecommender, Stage2Module
    from pipelines import engine as eng
    from pipelines.next_title import load_frozen_llm

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    eng.init_distributed(False)
    conf = eng.deepspeed_config("configs/deepspeed/zero3.json", micro_batch=2, zero_stage=3, bf16=False,
                                overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    cfg = Config()
    cfg.stage2.llm = config["llm"]
    llm, tok = load_frozen_llm(cfg, "cpu", conf)  # HfDeepSpeedConfig: loads straight into partitions
    torch.manual_seed(0)  # identical projector initialisation on every rank
    projector = Stage2Projector(LLM_DIM_IN, LLM_DIM_IN, llm.config.hidden_size)
    engine = eng.build_engine(Stage2Module(llm, projector), 1e-2, conf)
    counts = eng.local_parameter_counts(engine.module.llm)

    def gathered(module: torch.nn.Module) -> list[torch.Tensor]:
        ps = list(module.parameters())
        with deepspeed.zero.GatheredParameters(ps, modifier_rank=None):  # collective: every rank calls it
            return [p.detach().clone() for p in ps]

    llm_before, proj_before = gathered(engine.module.llm), gathered(engine.module.projector)

    words = ["red", "blue", "lamp", "glove", "bottle", "rope", "tent", "ball", "shoe", "cap"]
    titles = [""] + [f"{words[i % 10]} {words[(i // 10) % 10]} model {i}" for i in range(1, 21)]
    rng = np.random.default_rng([0, rank])  # each rank trains on its own examples
    vectors = rng.random((len(titles), LLM_DIM_IN), dtype=np.float32)
    rec = LLMRecommender(engine.module.llm, tok, titles, cfg.data.domain, projector=engine.module.projector,
                         item_vectors=vectors, use_user_token=True, history_len=5, max_title_tokens=8)
    exs = []
    for _ in range(2):
        seq = rng.permutation(np.arange(1, len(titles)))
        cands = [int(seq[5]), *map(int, seq[6:10])]
        rng.shuffle(cands)
        exs.append(Example(rng.random(LLM_DIM_IN, dtype=np.float32), seq[:5].tolist(), cands, int(seq[5])))
    engine.train()
    loss = engine(rec.batch(exs, with_target=True), rec.prompts.placeholders)
    engine.backward(loss)
    engine.step()

    llm_after, proj_after = gathered(engine.module.llm), gathered(engine.module.projector)
    mine = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "loss": float(loss.detach()),
            "llm_full": counts["full"], "llm_local": counts["local"],
            "llm_requires_grad": any(p.requires_grad for p in engine.module.llm.parameters()),
            "llm_max_change": max(float((a - b).abs().max()) for a, b in zip(llm_after, llm_before)),
            "projector_max_change": max(float((a - b).abs().max()) for a, b in zip(proj_after, proj_before))}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    # Train V2 keeps only what comes with a checkpoint: rank 0 hands the gathered results back in one
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            (Path(tmp) / "ranks.json").write_text(json.dumps(ranks))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"loss": mine["loss"]}, checkpoint=ckpt)


def train_across_nodes(workdir: Path) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from bench.fixtures import save_tiny_llama  # the tiny random Llama the pipeline tests use

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    llm = save_tiny_llama(workdir / "tiny_llama")
    trainer = TorchTrainer(
        stage2_step, train_loop_config={"llm": str(llm)},
        # one slot per worker node and STRICT_SPREAD: the two ranks cannot share a node
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1, SLOT: 1},
                                     placement_strategy="STRICT_SPREAD"),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="multinode-stage2", storage_path=str(workdir / "ray_results")))
    result = trainer.fit()
    if result.error is not None or result.checkpoint is None:
        raise RuntimeError(f"stage2 step failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        return json.loads((Path(d) / "ranks.json").read_text())


def main(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker_nodes = [cluster.add_node(num_cpus=2, resources={SLOT: 1}) for _ in range(2)]
        ray.init(address=cluster.address)
        t_up = time.perf_counter()
        worker_ids = sorted(n.node_id for n in worker_nodes)
        head_id = cluster.head_node.node_id
        enc = encode_across_nodes()
        t_enc = time.perf_counter()
        ranks = train_across_nodes(workdir)
        t_train = time.perf_counter()
        print("RESULT " + json.dumps({
            "head_node": head_id, "worker_nodes": worker_ids,
            "alive_nodes": len([n for n in ray.nodes() if n["Alive"]]),
            "encode": enc, "train": ranks,
            "seconds": {"cluster_up": round(t_up - t0, 1), "encode": round(t_enc - t_up, 1),
                        "train": round(t_train - t_enc, 1)}}), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(RAY_TMP, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python tests/multinode_job.py WORKDIR [RAY_TMPDIR]")
    main(Path(sys.argv[1]))
