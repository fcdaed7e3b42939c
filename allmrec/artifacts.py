"""Loading the trained artifacts of a run folder for inference (evaluation, scoring, serving).

Layout of `<run_dir>`: data/ (prepare), encode/, cf/ (CF model), stage1/ (joint_emb.parquet, aligner +
SBERT export), stage2/ or stage2/<variant>/ (projector.safetensors), tallrec/ (lora.safetensors: the TALLRec
baseline's LoRA adapters). Only safetensors, parquet and JSON are read: nothing is unpickled.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load

from allmrec.config import Config
from allmrec.data.load import Prepared, read_parquet

PROJECTOR = "projector.safetensors"
LORA = "lora.safetensors"  # TALLRec's adapter weights (allmrec.llm.lora)

# evaluation/serving variant -> (stage2 item_tokens, use_user_token)
LLM_VARIANTS = {
    "llm_only": ("none", False),
    "allmrec": ("joint", True),
    "allmrec_sbert": ("sbert", True),
    "mlp_llm": ("mlp", True),
    "allmrec_no_user": ("joint", False),
    "allmrec_random_items": ("random", True),
    "allmrec_no_items": ("none", True),
    # TALLRec: the LLM-Only prompt on the LLM fine-tuned by LoRA (`allmrec tallrec`). Listed after llm_only,
    # which stays the name serving finds for (none, False).
    "tallrec": ("none", False),
}


def run_dir(cfg: Config, *parts: str) -> Path:
    return Path(cfg.run_dir).expanduser().resolve().joinpath(*parts)


def stage2_dir(cfg: Config) -> Path:
    """Where Stage-2 of the configured variant lives (the default A-LLMRec at stage2/)."""
    s2 = cfg.stage2
    if s2.item_tokens == "joint" and s2.use_user_token:
        return run_dir(cfg, "stage2")
    return run_dir(cfg, "stage2", f"{s2.item_tokens}-u{int(s2.use_user_token)}")


def tallrec_dir(cfg: Config) -> Path:
    return run_dir(cfg, "tallrec")


def read_item_table(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(e, q): (n_items + 1, d') arrays indexed by item id, from a joint_emb.parquet (item, e, q)."""
    df = read_parquet(Path(path), sort_by="item")
    e = np.stack(df["e"].to_numpy()).astype(np.float32)
    q = np.stack(df["q"].to_numpy()).astype(np.float32)
    return e, q


def load_joint_embeddings(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(e, q) of a run's items, from <root>/stage1/joint_emb.parquet."""
    return read_item_table(Path(root) / "stage1" / "joint_emb.parquet")


def variant_vectors(cfg: Config, cf, root: Path, table: Path | None = None) -> np.ndarray | None:
    """The item vectors F_I reads for `cfg.stage2.item_tokens` (None: no item soft tokens).

    `table`: another joint_emb.parquet than the run's own (cross-domain: the target's items, whose e_i is
    their q_i because the CF model has no embedding for them)."""
    from allmrec.recommender import item_vector_table
    v = cfg.stage2.item_tokens
    if table is not None and v == "mlp":
        raise ValueError("the mlp variant feeds the CF item table to F_I: undefined for items of another domain")
    e = q = None
    if v in ("joint", "sbert", "random"):
        e, q = read_item_table(table) if table is not None else load_joint_embeddings(root)
    E = cf.item_embeddings().detach().float().cpu().numpy() if v == "mlp" else None
    return item_vector_table(v, e, q, E, seed=cfg.seed)


def user_reps(cf, hists, users, device: str | torch.device = "cpu") -> np.ndarray:
    """x_u of each history (users None: users the CF model never trained on)."""
    from allmrec.cf.data import pad_left
    seqs = torch.from_numpy(pad_left([np.asarray(h) for h in hists], cf.max_len)).to(device)
    u = None if users is None else torch.as_tensor(np.asarray(users, dtype=np.int64), device=device)
    with torch.no_grad():
        return cf.user_representation(seqs, u).float().cpu().numpy()


def load_projector(directory: Path, cfg: Config, cf_dim: int, item_dim: int | None, llm_dim: int):
    from allmrec.recommender import build_projector
    proj = build_projector(cfg.stage2.item_tokens, cfg.stage2.use_user_token, cf_dim, item_dim, llm_dim)
    if proj is not None:
        path = Path(directory) / PROJECTOR
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `allmrec stage2` for this variant first")
        _check_prompt(Path(directory), cfg)
        proj.load_state_dict(st_load(path.read_bytes()))
        proj.eval()
    return proj


def _check_prompt(directory: Path, cfg: Config) -> None:
    """Refuse to use a projector with a prompt layout it was not trained on (it would run, silently worse).
    A setting missing from an older config.yaml had its default then."""
    import yaml

    from allmrec.config import Stage2Config
    saved = directory / "config.yaml"
    if not saved.exists():
        return
    trained = (yaml.safe_load(saved.read_text()) or {}).get("stage2", {})
    for key in Stage2Config.LAYOUT_KEYS:
        was, now = trained.get(key, getattr(Stage2Config, key)), getattr(cfg.stage2, key)
        if was != now:
            raise ValueError(f"the projector in {directory} was trained with stage2.{key}={was}, "
                             f"not {now}: set stage2.{key}={was}")


def item_titles(prep: Prepared) -> list[str]:
    titles = [""] * (prep.n_items + 1)
    for i, t in zip(prep.items["item"], prep.items["title"]):
        titles[int(i)] = t
    return titles


def load_recommender(cfg: Config, variant: str = "allmrec", device: str = "cpu", *,
                     source: str | Path | None = None, item_table: Path | None = None):
    """(LLMRecommender, CF model, Prepared) for an evaluation/serving variant of a trained run.

    Cross-domain: `source` is the trained run whose models (CF, Stage-2 projectors, TALLRec adapters) are
    used, while items, titles and domain words come from `cfg`'s run; `item_table` holds those items'
    vectors (`pipelines.evaluate.cross_item_table`)."""
    import copy

    from allmrec.cf import load_cf_model
    from allmrec.llm.loading import load_llm, resolve_dtype
    from allmrec.recommender import LLMRecommender

    if variant not in LLM_VARIANTS:
        raise ValueError(f"unknown LLM variant {variant!r}; known: {sorted(LLM_VARIANTS)}")
    cfg = copy.deepcopy(cfg)
    cfg.stage2.item_tokens, cfg.stage2.use_user_token = LLM_VARIANTS[variant]
    models = copy.deepcopy(cfg)
    if source is not None:
        models.run_dir = str(source)
    llm, tok = load_llm(cfg.stage2.llm, dtype=resolve_dtype(cfg.stage2.llm_dtype, device), device=device)
    cf = load_cf_model(run_dir(models, "cf")).eval()
    prep = Prepared(run_dir(cfg, "data"))
    projector = vectors = None
    if variant not in ("llm_only", "tallrec"):
        vectors = variant_vectors(cfg, cf, run_dir(models), table=item_table)
        projector = load_projector(stage2_dir(models), models, cf.hidden, None if vectors is None else vectors.shape[1],
                                   llm.config.hidden_size).to(device)
    if variant == "tallrec":
        from allmrec.llm.lora import load_lora
        path = tallrec_dir(models) / LORA
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `allmrec tallrec` first")
        # not merged: the fp32 adapters stay exact on a bf16 LLM (merging would round them to bf16)
        llm = load_lora(llm, path, models.tallrec).to(device)
    rec = LLMRecommender(llm, tok, item_titles(prep), cfg.data.domain, projector=projector, item_vectors=vectors,
                         use_user_token=cfg.stage2.use_user_token, **cfg.stage2.prompt())
    return rec, cf, prep
