"""Stage-1's model and its item table, shared by `allmrec stage1` (training, then the table) and
`allmrec evaluate`'s cross-domain scenario (another dataset's items under a trained Stage-1).

For every item, the joint embedding e_i = f_I^enc(E_i) and the text-side q_i = f_T^enc(SBERT_ft(text_i)):
computed by Stage-1's rank 0 at the end of training (`item_arrays`, from the SBERT lower layers it cached for
training), or by a Ray Data job whose actors load the models once (`item_table`: cross-domain items, ZeRO-3
runs, `stage1.table_on_worker=false`)."""
from __future__ import annotations

import os

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load

from allmrec.artifacts import cf_from_files
from allmrec.config import Config, config_from_dict
from allmrec.data.load import Prepared
from pipelines.common import actor_pool


def build_stage1_model(cfg: Config, cf_dim: int, device: str = "cpu"):
    from allmrec.align.sbert import TextEncoder, load_sbert
    from allmrec.align.stage1 import Stage1Model
    te = TextEncoder(load_sbert(cfg.encode.model, device=device), trainable_layers=cfg.stage1.sbert_trainable_layers)
    return Stage1Model.from_config(cfg.stage1, cf_dim, te)


class JointEmbedder:
    """Ray Data actor: every item's e_i (from the CF table) and q_i (fine-tuned SBERT -> f_T^enc).

    `text_only`: the items are not the CF model's (cross-domain), so e_i is q_i, the paper's rule for items
    the CF model lacks."""

    def __init__(self, cfg_dict: dict, bundle_ref: list, threads: int, text_only: bool = False):
        """`bundle_ref`: [(cf_files, export, texts)], or [a Ray object reference to it] (how `item_table`
        ships the big inputs once through the object store)."""
        from allmrec.align.stage1 import joint_embeddings, text_joint_embeddings
        torch.set_num_threads(threads)
        bundle = bundle_ref[0]
        if not isinstance(bundle, tuple):
            import ray
            bundle = ray.get(bundle)
        cf_files, export, texts = bundle
        cfg = config_from_dict(cfg_dict)
        cf = cf_from_files(cf_files)
        self.model = build_stage1_model(cfg, cf.hidden)
        self.model.load_state_dict(st_load(export), strict=False)
        self.model.eval()
        self.model.text_encoder.pretokenize(texts, cfg.encode.max_seq_length)
        self.e = None
        if not text_only:
            with torch.no_grad():
                self.e = joint_embeddings(self.model.aligner, cf.item_embeddings()).numpy()
        self.text_joint = text_joint_embeddings

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        ids = torch.from_numpy(batch["item"].astype(np.int64))
        Q = self.model.text_encoder.encode_items(ids)
        q = self.text_joint(self.model.aligner, Q).numpy().astype(np.float32)
        e = q if self.e is None else self.e[ids.numpy()].astype(np.float32)
        return {"item": batch["item"], "e": list(e), "q": list(q)}


def item_table(cfg: Config, cf_files: dict[str, bytes], export: bytes, prep: Prepared, text_only: bool = False):
    """Ray Data job (actors load the models once): (item, e, q) for every item of `prep`, with the Stage-1
    model `export` trained in `cfg`'s run on top of the CF model `cf_files`."""
    import ray

    items = prep.items
    texts = [""] * (int(items["item"].max()) + 1)
    for i, t in zip(items["item"], items["text"]):
        texts[int(i)] = t
    ds = ray.data.from_items([{"item": int(i)} for i in range(0, len(texts))])
    return ds.repartition(max(2, len(texts) // 512)).map_batches(
        JointEmbedder, batch_size=64, batch_format="numpy", compute=actor_pool(1),
        # the big inputs travel once through the object store (wrapped so Ray does not inline them)
        fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "bundle_ref": [ray.put((cf_files, export, texts))],
                               "threads": cfg.torch_threads or os.cpu_count() or 1, "text_only": text_only},
        num_cpus=1)


@torch.no_grad()
def item_arrays(model, E: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(e, q), float32 (n, d') for every pretokenized item of a trained Stage-1 `model` (row = item id),
    E the CF item table. In one process: the frozen lower SBERT layers come from the model's cache."""
    from allmrec.align.stage1 import joint_embeddings, text_joint_embeddings
    was = model.training
    model.eval()
    try:
        Q = torch.from_numpy(model.text_encoder.encode_all())
        n = Q.shape[0]
        if E.shape[0] < n:
            raise ValueError(f"the CF model has {E.shape[0]} item rows, the item texts {n}")
        dtype = next(model.aligner.parameters()).dtype
        dev = next(model.aligner.parameters()).device
        e = joint_embeddings(model.aligner, E[:n].to(dev, dtype)).float().cpu().numpy()
        q = text_joint_embeddings(model.aligner, Q.to(dev, dtype)).float().cpu().numpy()
    finally:
        model.train(was)
    return e, q


def write_item_table(e: np.ndarray, q: np.ndarray, directory: Path) -> None:
    """The (item, e, q) parquet folder `item_table` writes, from in-memory arrays (row = item id)."""
    if e.shape != q.shape or e.ndim != 2:
        raise ValueError(f"e and q must be equal (n, d) arrays, got {e.shape} and {q.shape}")
    def col(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, np.float32).ravel()), a.shape[1])
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table({"item": pa.array(np.arange(len(e), dtype=np.int64)), "e": col(e), "q": col(q)})
    pq.write_table(table, str(directory / "part-0.parquet"))
