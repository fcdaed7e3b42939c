"""The run folder: where every artifact of a run lives and how it is loaded (one owner for both).

`RunFolder(cfg)` is the only place that builds an artifact path or names an artifact file; pipelines/,
serve/, bench/ and scripts/ go through it. Layout of `<run_dir>`:

    data/                      prepared dataset (`allmrec prepare`)
    encode/                    SBERT text vectors (`allmrec encode`)
    cf/<model>/                one folder per CF model (`allmrec train-cf cf.model=<model>`): model.safetensors
                               + config.json, item_emb.parquet, user_reps.parquet, metrics, manifest. Several
                               CF models live side by side; the configured `cf.model` is the one later jobs read.
                               (Run folders made before this layout hold one model directly in cf/: it is
                               still read when it is the configured model.)
    stage1/                    export.safetensors (aligner + fine-tuned SBERT layers), joint_emb.parquet
    stage2/ or stage2/<v>/     projector.safetensors (the default A-LLMRec at stage2/, ablations in subfolders)
    tallrec/                   lora.safetensors (the TALLRec baseline's LoRA adapters)
    report/, report-from-<s>/  evaluation; scores/ (offline top-k); genres/; cross/ (cross-domain item tables)
    ray_results/               Ray Train's checkpoints (resume)

Every job folder holds a manifest.json; Stage-1 and Stage-2 record in theirs which CF weights they read
(`cf_weights`: model name and sha256 of model.safetensors), and the loaders here refuse a Stage-1 or
Stage-2 trained on other CF weights than the configured model's. Only safetensors, parquet and JSON are
read: nothing is unpickled.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from safetensors.torch import load as st_load

from allmrec.config import Config
from allmrec.data.load import Prepared, read_parquet
from allmrec.io import read_manifest

if TYPE_CHECKING:
    from allmrec.cf.base import CFModel

# artifact file names (nobody else spells them)
from allmrec.cf.base import CONFIG_FILE as CF_CONFIG  # noqa: E402  config.json (CFModel.save)
from allmrec.cf.base import WEIGHTS_FILE as CF_WEIGHTS  # noqa: E402  model.safetensors
STAGE1_EXPORT = "export.safetensors"  # Stage-1's trainable state: aligner.* and text_encoder.*
JOINT_EMB = "joint_emb.parquet"  # (item, e, q) for every item
PROJECTOR = "projector.safetensors"
LORA = "lora.safetensors"  # TALLRec's adapter weights (allmrec.llm.lora)
RESOLVED_CONFIG = "config.yaml"  # every job folder's resolved config
EXPORT = STAGE1_EXPORT  # older name

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


class MissingArtifact(FileNotFoundError):
    """An artifact a job or loader needs is not in the run folder; the message names the command that
    makes it."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunFolder:
    """One run folder (`cfg.run_dir`, or `root` for another run's models, e.g. cross-domain's source).

    Paths are properties/methods returning `Path`s (nothing is created); loaders raise `MissingArtifact`
    naming the command to run when an artifact is absent. `cfg` decides the configured CF model
    (`cfg.cf.model`) and the Stage-2 variant (`cfg.stage2.item_tokens`, `use_user_token`)."""

    def __init__(self, cfg: Config, root: str | Path | None = None):
        self.cfg = cfg
        self.root = Path(cfg.run_dir if root is None else root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r}, cf.model={self.cf_model!r})"

    # ------------------------------------------------------------------ where (paths, nothing created)
    @property
    def data(self) -> Path:
        """`allmrec prepare`'s output (read it with `prepared()`)."""
        return self.root / "data"

    @property
    def encode(self) -> Path:
        """`allmrec encode`'s output: text_emb.parquet (allmrec.data.schema.TEXT_EMB)."""
        return self.root / "encode"

    @property
    def cf_model(self) -> str:
        """The configured CF model's name (`cfg.cf.model`)."""
        return self.cfg.cf.model

    def cf_dir(self, model: str | None = None) -> Path:
        """The folder `allmrec train-cf cf.model=<model>` writes (default: the configured model):
        cf/<model>/. Read through `cf_found()`, which also finds a pre-layout run's model in cf/."""
        return self.root / "cf" / (model or self.cf_model)

    def cf_found(self, model: str | None = None) -> Path | None:
        """Where the trained CF model `model` (default: the configured one) is, or None: cf/<model>/,
        else cf/ itself when an older run folder saved that model there."""
        m = model or self.cf_model
        own = self.cf_dir(m)
        if (own / CF_WEIGHTS).is_file() and (own / CF_CONFIG).is_file():
            return own
        legacy = self.root / "cf"
        if (legacy / CF_WEIGHTS).is_file() and (legacy / CF_CONFIG).is_file():
            import json
            if json.loads((legacy / CF_CONFIG).read_text()).get("name") == m:
                return legacy
        return None

    def cf_weights_path(self, model: str | None = None) -> Path:
        """model.safetensors of the CF model (MissingArtifact when it is not trained)."""
        return self._cf_required(model) / CF_WEIGHTS

    @property
    def stage1(self) -> Path:
        """`allmrec stage1`'s output folder."""
        return self.root / "stage1"

    @property
    def stage1_export_path(self) -> Path:
        """Stage-1's trainable state (aligner.* and text_encoder.* tensors), safetensors."""
        return self.stage1 / STAGE1_EXPORT

    @property
    def joint_emb_path(self) -> Path:
        """Stage-1's item table (item, e, q)."""
        return self.stage1 / JOINT_EMB

    def stage2(self, variant: str | None = None) -> Path:
        """Where Stage-2 of an LLM variant lives (default: the configured stage2.item_tokens /
        use_user_token): stage2/ for A-LLMRec (joint, user token), stage2/<item_tokens>-u<0|1>/ otherwise."""
        item_tokens, user = self._variant(variant)
        if item_tokens == "joint" and user:
            return self.root / "stage2"
        return self.root / "stage2" / f"{item_tokens}-u{int(user)}"

    def projector_path(self, variant: str | None = None) -> Path:
        return self.stage2(variant) / PROJECTOR

    @property
    def tallrec(self) -> Path:
        """`allmrec tallrec`'s output folder."""
        return self.root / "tallrec"

    @property
    def lora_path(self) -> Path:
        return self.tallrec / LORA

    def report(self, source: Path | None = None) -> Path:
        """`allmrec evaluate`'s output: report/, or report-from-<source run's name>/ (cross-domain)."""
        return self.root / ("report" if source is None else f"report-from-{Path(source).name}")

    @property
    def scores(self) -> Path:
        """`allmrec score`'s output (part-*.parquet per chunk of users)."""
        return self.root / "scores"

    def score_part(self, chunk: int) -> Path:
        return self.scores / f"part-{int(chunk):05d}.parquet"

    @property
    def genres(self) -> Path:
        """`allmrec genres`' output."""
        return self.root / "genres"

    def cross(self, key: str) -> Path:
        """A cross-domain item table's folder (this run's items under another run's Stage-1)."""
        return self.root / "cross" / key

    @property
    def ray_results(self) -> Path:
        """Ray Train's storage (per-epoch checkpoints of every training job, for resume)."""
        return self.root / "ray_results"

    @property
    def serve_config(self) -> Path:
        """The resolved config `allmrec run` hands to the service."""
        return self.root / "serve_config.yaml"

    def model_files(self, variant: str | None = None) -> list[Path]:
        """The trained files an answer of `variant` depends on (those that exist): CF weights, Stage-1
        export, the projector or the LoRA adapters. What a served model version hashes."""
        item_tokens, user = self._variant(variant)
        found = self.cf_found()
        files = [found / CF_WEIGHTS] if found is not None else []
        if item_tokens in ("joint", "sbert", "random"):
            files.append(self.stage1_export_path)
        files.append(self.lora_path if variant == "tallrec" else self.projector_path(variant))
        return [p for p in files if p.is_file()]

    # ------------------------------------------------------------------ manifests
    def manifest(self, directory: Path) -> dict | None:
        """The manifest of a job folder, None when the job has not finished there."""
        return read_manifest(directory)

    def require(self, directory: Path, command: str) -> dict:
        """The manifest of a finished job folder, or MissingArtifact telling to run `command`."""
        m = read_manifest(directory)
        if m is None:
            raise MissingArtifact(f"{directory} holds no finished output: run `{command}` first")
        return m

    def command(self, job: str, *overrides: str) -> str:
        """The command line that makes an artifact of this run (for error messages)."""
        return " ".join(["allmrec", job, "--config <your config>", f"run_dir={self.root}", *overrides])

    # ------------------------------------------------------------------ data
    def prepared(self) -> Prepared:
        """The prepared dataset (MissingArtifact-like FileNotFoundError when not prepared)."""
        return Prepared(self.data)

    # ------------------------------------------------------------------ CF model
    def _cf_required(self, model: str | None = None) -> Path:
        m = model or self.cf_model
        found = self.cf_found(m)
        if found is None:
            raise MissingArtifact(f"no trained CF model {m!r} in {self.root / 'cf'}: run "
                                  f"`{self.command('train-cf', f'cf.model={m}')}` first")
        return found

    def cf_manifest(self, model: str | None = None) -> dict:
        """train-cf's manifest of the CF model (MissingArtifact naming `allmrec train-cf ... cf.model=<m>`);
        for a model saved without one (by hand), {"model", "fingerprint": its weights' checksum}."""
        found = self._cf_required(model)
        return read_manifest(found) or {"model": model or self.cf_model, "fingerprint": self.cf_checksum(model)}

    def cf_checksum(self, model: str | None = None) -> str:
        """sha256 of the CF model's weights file: what Stage-1/Stage-2 manifests record as `cf_weights`."""
        return file_sha256(self.cf_weights_path(model))

    def cf_identity(self, model: str | None = None) -> dict[str, str]:
        """{"model": name, "sha256": weights checksum}: the record of which CF weights a job read."""
        m = model or self.cf_model
        return {"model": m, "sha256": self.cf_checksum(m)}

    def cf_files(self, model: str | None = None) -> dict[str, bytes]:
        """The CF model's files (config.json + model.safetensors) as bytes, to ship to Ray workers on
        other nodes; rebuild there with `cf_from_files`."""
        d = self._cf_required(model)
        return {name: (d / name).read_bytes() for name in (CF_CONFIG, CF_WEIGHTS)}

    def load_cf(self, model: str | None = None, device: str | torch.device = "cpu") -> "CFModel":
        """The trained CF model (default: the configured `cf.model`), in eval mode."""
        from allmrec.cf import load_cf_model
        return load_cf_model(self._cf_required(model), device).eval()

    def check_cf(self, directory: Path, job: str) -> None:
        """Refuse a job folder (stage1, stage2/...) whose manifest records other CF weights than the
        configured model's: its vectors were made for another CF model. Older manifests without the
        record are accepted."""
        rec = (read_manifest(directory) or {}).get("cf_weights")
        if not rec:
            return
        now = self.cf_identity()
        if rec.get("sha256") != now["sha256"]:
            raise ValueError(
                f"{directory} was trained on the CF model {rec.get('model')!r} (weights {str(rec.get('sha256'))[:12]}), "
                f"not on the configured cf.model={now['model']!r} (weights {now['sha256'][:12]}): run "
                "`" + self.command(job, "cf.model=" + now["model"]) + "` again")

    # ------------------------------------------------------------------ Stage-1
    def stage1_export(self) -> bytes:
        """Stage-1's exported trainable state as safetensors bytes (MissingArtifact without Stage-1)."""
        self.require(self.stage1, self.command("stage1", f"cf.model={self.cf_model}"))
        return self.stage1_export_path.read_bytes()

    def stage1_state(self) -> dict[str, torch.Tensor]:
        """Stage-1's exported trainable state (aligner.*, text_encoder.* tensors)."""
        return st_load(self.stage1_export())

    def item_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(e, q): (n_items + 1, d') arrays indexed by item id, from stage1/joint_emb.parquet."""
        if not self.joint_emb_path.exists():
            raise MissingArtifact(f"{self.joint_emb_path} not found: run `{self.command('stage1')}` first")
        return read_item_table(self.joint_emb_path)

    # ------------------------------------------------------------------ Stage-2, TALLRec, the recommender
    def _variant(self, variant: str | None) -> tuple[str, bool]:
        if variant is None:
            return self.cfg.stage2.item_tokens, bool(self.cfg.stage2.use_user_token)
        if variant not in LLM_VARIANTS:
            raise ValueError(f"unknown LLM variant {variant!r}; known: {sorted(LLM_VARIANTS)}")
        return LLM_VARIANTS[variant]

    def item_vectors(self, cf: "CFModel", table: Path | None = None) -> np.ndarray | None:
        """The item vectors F_I reads for `cfg.stage2.item_tokens` (None: no item soft tokens).
        `table`: another joint_emb.parquet than this run's (cross-domain: the target's items, whose e_i
        is their q_i because the CF model has no embedding for them)."""
        from allmrec.recommender import item_vector_table
        v = self.cfg.stage2.item_tokens
        if table is not None and v == "mlp":
            raise ValueError("the mlp variant feeds the CF item table to F_I: undefined for items of another domain")
        e = q = None
        if v in ("joint", "sbert", "random"):
            e, q = read_item_table(table) if table is not None else self.item_table()
        E = cf.item_embeddings().detach().float().cpu().numpy() if v == "mlp" else None
        return item_vector_table(v, e, q, E, seed=self.cfg.seed)

    def load_projector(self, cf_dim: int, item_dim: int | None, llm_dim: int, variant: str | None = None):
        """Stage-2's projectors F_U / F_I of the variant (default: the configured one; None for LLM-Only),
        in eval mode. Refuses a projector trained with another prompt layout or on other CF weights."""
        item_tokens, user = self._variant(variant)
        if item_tokens == "none" and not user:
            return None
        directory = self.stage2(variant)
        if not (directory / PROJECTOR).exists():
            raise MissingArtifact(f"{directory / PROJECTOR} not found: run `" + self.command(
                "stage2", f"stage2.item_tokens={item_tokens}", f"stage2.use_user_token={str(user).lower()}") + "` first")
        self.check_cf(directory, "stage2")
        cfg = copy.deepcopy(self.cfg)
        cfg.stage2.item_tokens, cfg.stage2.use_user_token = item_tokens, user
        return load_projector(directory, cfg, cf_dim, item_dim, llm_dim)

    def load_recommender(self, variant: str = "allmrec", device: str = "cpu", *, source: str | Path | None = None,
                         item_table: Path | None = None):
        """(LLMRecommender, CF model, Prepared) for an evaluation/serving variant of this trained run.

        Cross-domain: `source` is the trained run whose models (CF, Stage-2 projectors, TALLRec adapters)
        are used, while items, titles and domain words come from this run; `item_table` holds those
        items' vectors (`pipelines.evaluate.cross_item_table`)."""
        from allmrec.llm.loading import load_llm, resolve_dtype
        from allmrec.recommender import LLMRecommender

        item_tokens, user = self._variant(variant)
        order = self.cfg.stage2.order_for(user)
        if order == "cf" and item_table is not None:
            raise ValueError("stage2.candidate_order=cf sorts candidates by the source CF model's scores, which "
                             "it has only for its own catalogue: a cross-domain evaluation cannot use it")
        cfg = copy.deepcopy(self.cfg)
        cfg.stage2.item_tokens, cfg.stage2.use_user_token = item_tokens, user
        here = RunFolder(cfg, self.root)
        models = RunFolder(cfg, source) if source is not None else here
        llm, tok = load_llm(cfg.stage2.llm, dtype=resolve_dtype(cfg.stage2.llm_dtype, device), device=device)
        cf = models.load_cf()
        prep = here.prepared()
        projector = vectors = None
        if variant not in ("llm_only", "tallrec"):
            if item_tokens in ("joint", "sbert", "random") and item_table is None:
                models.check_cf(models.stage1, "stage1")
            vectors = (here if item_table is not None else models).item_vectors(cf, table=item_table)
            projector = models.load_projector(cf.hidden, None if vectors is None else vectors.shape[1],
                                              llm.config.hidden_size, variant).to(device)
        if variant == "tallrec":
            from allmrec.llm.lora import load_lora
            if not models.lora_path.exists():
                raise MissingArtifact(f"{models.lora_path} not found: run `{models.command('tallrec')}` first")
            trained = (read_manifest(models.tallrec) or {}).get("candidate_order", "seeded")
            if trained != order:  # adapters trained on one order, scored on another: silently worse
                raise ValueError(f"the TALLRec adapters in {models.tallrec} were trained on the {trained} candidate "
                                 f"order, not the {order} one: set stage2.order_baselines="
                                 f"{str(trained == 'cf').lower()} or retrain `allmrec tallrec`")
            models.check_cf(models.tallrec, "tallrec")  # the CF weights that sorted its candidates
            # not merged: the fp32 adapters stay exact on a bf16 LLM (merging would round them to bf16)
            llm = load_lora(llm, models.lora_path, cfg.tallrec).to(device)
        rec = LLMRecommender(llm, tok, item_titles(prep), cfg.data.domain, projector=projector, item_vectors=vectors,
                             use_user_token=cfg.stage2.use_user_token, **cfg.stage2.prompt(), candidate_order=order,
                             cf_items=cf.item_embeddings() if order == "cf" else None)
        return rec, cf, prep


# ---------------------------------------------------------------------- functions on loaded models
def cf_from_files(files: dict[str, bytes], device: str | torch.device = "cpu") -> "CFModel":
    """A frozen CF model (eval, no grad) from `RunFolder.cf_files()` bytes, e.g. inside a Ray worker."""
    import tempfile

    from allmrec.cf import load_cf_model
    with tempfile.TemporaryDirectory(prefix="allmrec-cf-") as d:  # the weights are copied into the model
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        model = load_cf_model(d, device)
    model.eval()  # frozen: no dropout (the reference code forgets this)
    model.requires_grad_(False)
    return model


def files_sha256(files: dict[str, bytes]) -> str:
    """The `cf_weights` checksum of CF files given as bytes (equal to RunFolder.cf_checksum)."""
    return hashlib.sha256(files[CF_WEIGHTS]).hexdigest()


def user_reps(cf, hists, users, device: str | torch.device = "cpu") -> np.ndarray:
    """x_u of each history (users None: users the CF model never trained on)."""
    from allmrec.cf.data import pad_left
    seqs = torch.from_numpy(pad_left([np.asarray(h) for h in hists], cf.max_len)).to(device)
    u = None if users is None else torch.as_tensor(np.asarray(users, dtype=np.int64), device=device)
    with torch.no_grad():
        return cf.user_representation(seqs, u).float().cpu().numpy()


def cf_top_n(cf, hists: Sequence[Sequence[int]], users, n: int,
             reps: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CF retrieval: (items, scores), each (B, n'), the best catalogue items per user by <x_u, E_i>,
    best first, never padding nor an item of the user's history. n' = min(n, the fewest items any user
    of the batch may still get). `users` None: users the CF model never trained on; `reps`: x_u already
    computed (else from `user_reps`)."""
    x = torch.from_numpy(user_reps(cf, hists, users) if reps is None else np.asarray(reps, dtype=np.float32))
    with torch.no_grad():
        scores = x @ cf.item_embeddings().detach().float().cpu().T  # (B, n_items + 1)
    scores[:, 0] = -torch.inf
    for b, h in enumerate(hists):
        if len(h):
            scores[b, torch.as_tensor(np.asarray(h, dtype=np.int64))] = -torch.inf
    n = min(int(n), int(torch.isfinite(scores).sum(1).min())) if len(hists) else 0
    top = torch.topk(scores, n, dim=1)
    return top.indices.numpy(), top.values.numpy()


def read_item_table(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(e, q): (n_items + 1, d') arrays indexed by item id, from a joint_emb.parquet (item, e, q)."""
    df = read_parquet(Path(path), sort_by="item")
    e = np.stack(df["e"].to_numpy()).astype(np.float32)
    q = np.stack(df["q"].to_numpy()).astype(np.float32)
    return e, q


def item_titles(prep: Prepared) -> list[str]:
    titles = [""] * (prep.n_items + 1)
    for i, t in zip(prep.items["item"], prep.items["title"]):
        titles[int(i)] = t
    return titles


def _check_prompt(directory: Path, cfg: Config) -> None:
    """Refuse to use a projector with a prompt layout it was not trained on (it would run, silently worse).
    A setting missing from an older config.yaml had its default then."""
    import yaml

    from allmrec.config import Stage2Config
    saved = directory / RESOLVED_CONFIG
    if not saved.exists():
        return
    trained = (yaml.safe_load(saved.read_text()) or {}).get("stage2", {})
    for key in Stage2Config.LAYOUT_KEYS:
        was, now = trained.get(key, getattr(Stage2Config, key)), getattr(cfg.stage2, key)
        fix = f"stage2.{key}={was}"
        if key == "candidate_order":  # the order the variant is shown (Stage2Config.order_for's one rule)
            user = cfg.stage2.use_user_token  # the variant's, as in its saved config
            was = Stage2Config(candidate_order=was,
                               order_baselines=trained.get("order_baselines", False)).order_for(user)
            now = cfg.stage2.order_for(user)
            if not user:  # without the user token the switch that decides is order_baselines
                fix = f"stage2.order_baselines={str(was == 'cf').lower()}"
        if was != now:
            raise ValueError(f"the projector in {directory} was trained with stage2.{key}={was}, "
                             f"not {now}: set {fix}")


# ---------------------------------------------------------------------- older entry points (thin wrappers)
def run_dir(cfg: Config, *parts: str) -> Path:
    """The run folder's root (no parts). Deprecated with parts: use RunFolder's named paths."""
    return RunFolder(cfg).root.joinpath(*parts)


def stage2_dir(cfg: Config) -> Path:
    """= RunFolder(cfg).stage2()"""
    return RunFolder(cfg).stage2()


def tallrec_dir(cfg: Config) -> Path:
    """= RunFolder(cfg).tallrec"""
    return RunFolder(cfg).tallrec


def load_joint_embeddings(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(e, q) of a run's items, from <root>/stage1/joint_emb.parquet (= RunFolder.item_table)."""
    return read_item_table(Path(root) / "stage1" / JOINT_EMB)


def variant_vectors(cfg: Config, cf, root: Path, table: Path | None = None) -> np.ndarray | None:
    """= RunFolder(cfg, root).item_vectors(cf, table)"""
    return RunFolder(cfg, root).item_vectors(cf, table)


def load_projector(directory: Path, cfg: Config, cf_dim: int, item_dim: int | None, llm_dim: int):
    """The projector of cfg.stage2's variant saved in `directory` (None for LLM-Only), in eval mode;
    refuses one trained with another prompt layout. In a run folder use RunFolder.load_projector."""
    from allmrec.recommender import build_projector
    proj = build_projector(cfg.stage2.item_tokens, cfg.stage2.use_user_token, cf_dim, item_dim, llm_dim)
    if proj is not None:
        path = Path(directory) / PROJECTOR
        if not path.exists():
            raise MissingArtifact(f"{path} not found: run `allmrec stage2` for this variant first")
        _check_prompt(Path(directory), cfg)
        proj.load_state_dict(st_load(path.read_bytes()))
        proj.eval()
    return proj


def load_recommender(cfg: Config, variant: str = "allmrec", device: str = "cpu", *,
                     source: str | Path | None = None, item_table: Path | None = None):
    """= RunFolder(cfg).load_recommender(variant, device, source=..., item_table=...)"""
    return RunFolder(cfg).load_recommender(variant, device, source=source, item_table=item_table)
