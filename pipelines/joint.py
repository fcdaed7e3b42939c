"""Stage-1's model and its item table, shared by `allmrec stage1` (training, then the table) and
`allmrec evaluate`'s cross-domain scenario (another dataset's items under a trained Stage-1).

The table is a Ray Data job whose actors load the models once: for every item, the joint embedding
e_i = f_I^enc(E_i) and the text-side q_i = f_T^enc(SBERT_ft(text_i))."""
from __future__ import annotations

import os

import numpy as np
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
