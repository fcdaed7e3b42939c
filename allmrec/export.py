"""A trained A-LLMRec outside its run folder: `allmrec export RUN_DIR OUT` and `ALLMRec.from_pretrained(OUT)`.

The exported folder is Hugging-Face-style (a `config.json` naming the model, safetensors weights, a
README.md model card) and, at the same time, the inference subset of a run folder, laid out as
`allmrec.artifacts.RunFolder` reads it, so one set of loaders serves both and `allmrec serve` can serve it
(`allmrec serve --config OUT/config.yaml run_dir=OUT`):

    config.json                  model_type "allmrec": variant, LLM, CF model, sizes, prompt, files, metrics
    config.yaml                  the run's resolved allmrec config (run_dir = OUT)
    README.md                    model card: what was trained, on what, with which settings; measured metrics
    cf/<model>/                  the CF model: config.json + model.safetensors (+ its train-cf manifest)
    stage1/                      export.safetensors (aligner f_I/f_T enc/dec + fine-tuned SBERT layers),
                                 joint_emb.parquet (the item table: e_i, q_i per item)
    stage2/[<variant>/]          projector.safetensors (F_U, F_I) + the config it was trained with
    data/                        items (ids, raw ids, titles, texts), users, sequences, cold users
    tallrec/                     TALLRec's LoRA in PEFT's layout: adapter_config.json + adapter_model.safetensors
                                 (`peft.PeftModel.from_pretrained(llm, OUT/tallrec)` loads it)

The LLM is not copied: config.json names it (`packaged:...`, a hub name or a path), as a PEFT adapter
names its base model. Only safetensors, parquet and JSON/YAML are written and read.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from allmrec.artifacts import (CF_CONFIG, CF_WEIGHTS, JOINT_EMB, LLM_VARIANTS, PROJECTOR, RESOLVED_CONFIG,
                               STAGE1_EXPORT, RunFolder, cf_top_n, user_reps)
from allmrec.config import Config, load_config
from allmrec.data import schema
from allmrec.io import MANIFEST, atomic_dir, read_manifest

MODEL_TYPE = "allmrec"
FORMAT_VERSION = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel's state dict puts before the base model's names
DATA_FILES = (schema.ITEMS, schema.USERS, schema.SEQUENCES, schema.COLD_USERS)


# ------------------------------------------------------------------------------------------ LoRA <-> PEFT
def lora_to_peft(state: dict) -> dict:
    """allmrec.llm.lora names ("model.layers.0.self_attn.q_proj.lora_A.default.weight") -> the names in
    PEFT's adapter_model.safetensors ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")."""
    from allmrec.llm.lora import ADAPTER
    return {PEFT_PREFIX + k.replace(f".{ADAPTER}.", "."): v for k, v in state.items()}


def peft_to_lora(state: dict) -> dict:
    """The inverse of `lora_to_peft`."""
    from allmrec.llm.lora import ADAPTER
    out = {}
    for k, v in state.items():
        if not k.startswith(PEFT_PREFIX):
            raise ValueError(f"not a PEFT LoRA weight name: {k!r}")
        k = k[len(PEFT_PREFIX):]
        for part in ("lora_A", "lora_B"):
            k = k.replace(f".{part}.weight", f".{part}.{ADAPTER}.weight")
        out[k] = v
    return out


def save_peft_adapter(state: dict, out: Path, *, r: int, alpha: float, base_model: str) -> None:
    """TALLRec's adapters as a PEFT LoRA adapter folder (adapter_config.json from peft's own LoraConfig)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from allmrec.llm.lora import lora_targets_from_state
    out.mkdir(parents=True, exist_ok=True)
    conf = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=lora_targets_from_state(state), base_model_name_or_path=base_model)
    conf.save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in lora_to_peft(state).items()}, str(out / PEFT_WEIGHTS),
              metadata={"format": "pt"})


def load_peft_adapter(llm, folder: Path):
    """Put a PEFT LoRA adapter folder on `llm` the way allmrec.llm.lora.load_lora does (fp32, not merged)."""
    from safetensors.torch import load_file

    from allmrec.llm.lora import load_lora
    conf = json.loads((folder / PEFT_CONFIG).read_text())
    state = peft_to_lora(load_file(str(folder / PEFT_WEIGHTS)))
    targets = conf.get("target_modules") or []
    cfg = SimpleNamespace(lora_r=int(conf["r"]), lora_alpha=float(conf["lora_alpha"]),
                          target_modules=sorted(targets) if isinstance(targets, (list, set)) else [targets])
    return load_lora(llm, state, cfg)


# ------------------------------------------------------------------------------------------ export
def _run_config(run: Path, variant: str, config: str | Path | None) -> Config:
    """The config the run was trained with: `config` if given, else the newest resolved config.yaml the
    variant's jobs saved (stage2 of the variant, then stage1, then the CF model's)."""
    if config is not None:
        return load_config(config, [f"run_dir={run}"], check_files=False)
    item_tokens, user = LLM_VARIANTS[variant]
    probe = RunFolder(Config(), run)
    candidates = [probe.tallrec if variant == "tallrec" else
                  run / "stage2" / ("" if (item_tokens, user) == ("joint", True) else f"{item_tokens}-u{int(user)}"),
                  probe.stage1, run / "cf", *sorted((run / "cf").glob("*/"))]
    for d in candidates:
        if (d / RESOLVED_CONFIG).is_file():
            return load_config(d / RESOLVED_CONFIG, [f"run_dir={run}"], check_files=False)
    raise FileNotFoundError(f"{run} holds no resolved config.yaml of a trained job: is it a trained run folder? "
                            "(or pass --config)")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def export_run(run: str | Path, out: str | Path, *, config: str | Path | None = None, variant: str = "allmrec",
               force: bool = False) -> Path:
    """Write the exported folder of `variant` of the trained run `run` to `out` (atomically: a temporary
    folder renamed at the end). Raises FileExistsError when `out` exists and not `force`."""
    run, out = Path(run).expanduser().resolve(), Path(out).expanduser().resolve()
    if variant not in LLM_VARIANTS:
        raise ValueError(f"unknown LLM variant {variant!r}; known: {sorted(LLM_VARIANTS)}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: choose another folder or pass --force to replace it")
    if out == run or run in out.parents:
        raise ValueError(f"export into a folder outside the run folder, not {out}")
    cfg = _run_config(run, variant, config)
    item_tokens, user = LLM_VARIANTS[variant]
    cfg.stage2.item_tokens, cfg.stage2.use_user_token = item_tokens, user
    src = RunFolder(cfg, run)
    prep = src.prepared()
    cf_dir = src._cf_required()
    needs_stage1 = item_tokens in ("joint", "sbert", "random")
    with atomic_dir(out) as tmp:
        dst = RunFolder(cfg, tmp)
        for name in DATA_FILES:
            if (src.data / name).exists():
                _copy(src.data / name, dst.data / name)
        _copy(src.data / MANIFEST, dst.data / MANIFEST)
        # the CF model at cf/<model>/ with its manifest, where RunFolder finds it
        for name in (CF_CONFIG, CF_WEIGHTS, MANIFEST):
            _copy(cf_dir / name, dst.cf_dir() / name)
        m = read_manifest(dst.cf_dir()) or {}
        if m.get("model") != cfg.cf.model:  # a pre-layout run's cf/ manifest may not name it
            (dst.cf_dir() / MANIFEST).write_text(json.dumps({**m, "model": cfg.cf.model}, indent=2))
        if needs_stage1 or src.stage1_export_path.is_file():  # the service's Aligner embeds new items with it
            src.require(src.stage1, src.command("stage1"))
            for name in (STAGE1_EXPORT, JOINT_EMB, MANIFEST):
                _copy(src.stage1 / name, dst.stage1 / name)
        if variant not in ("llm_only", "tallrec"):
            s2 = src.stage2(variant)
            if not (s2 / PROJECTOR).is_file():
                raise FileNotFoundError(f"{s2 / PROJECTOR} not found: this run has no trained {variant} to export")
            for name in (PROJECTOR, RESOLVED_CONFIG, MANIFEST, "metrics.json"):
                if (s2 / name).exists():
                    _copy(s2 / name, dst.stage2(variant) / name)
        if variant == "tallrec" or src.lora_path.is_file():
            if not src.lora_path.is_file():
                raise FileNotFoundError(f"{src.lora_path} not found: run `{src.command('tallrec')}` first")
            from safetensors.torch import load_file
            t = cfg.tallrec
            if (src.tallrec / RESOLVED_CONFIG).is_file():
                t = load_config(src.tallrec / RESOLVED_CONFIG, check_files=False).tallrec
            state = load_file(str(src.lora_path))
            r = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
            save_peft_adapter(state, dst.tallrec, r=r.pop() if len(r) == 1 else t.lora_r, alpha=t.lora_alpha,
                              base_model=cfg.stage2.llm)
        cfg.run_dir = str(out)
        cfg.dump(tmp / RESOLVED_CONFIG)
        meta = _model_config(cfg, src, prep, variant, tmp)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(model_card(meta, cfg))
    return out


def _metrics(src: RunFolder, variant: str) -> dict[str, Any]:
    """What the run measured, read from its files (nothing computed here)."""
    out: dict[str, Any] = {}
    rep = src.report() / "report.json"
    if rep.is_file():
        r = json.loads(rep.read_text())
        out["evaluation"] = {"users": r.get("meta", {}).get("users_overall"), "mode": r.get("meta", {}).get("mode"),
                             "overall": {v: {k: x for k, x in (sc.get("overall") or {}).items()
                                             if isinstance(x, (int, float))}
                                         for v, sc in r.get("metrics", {}).items()}}
    cfm = read_manifest(src._cf_required()) or {}
    if cfm.get("test"):
        out["cf_test"] = cfm["test"]
    d = src.tallrec if variant == "tallrec" else (None if variant == "llm_only" else src.stage2(variant))
    m = read_manifest(d) if d is not None else None
    if m:
        out["training"] = {k: m[k] for k in ("epochs_run", "train_seconds", "workers", "zero_stage") if k in m}
        metrics = d / "metrics.json"
        if metrics.is_file():
            hist = json.loads(metrics.read_text()).get("history") or []
            if hist and isinstance(hist[-1], dict):
                out["training"]["last_epoch"] = {k: v for k, v in hist[-1].items() if isinstance(v, (int, float))}
    return out


def _model_config(cfg: Config, src: RunFolder, prep, variant: str, root: Path) -> dict[str, Any]:
    import allmrec
    from safetensors import safe_open

    item_tokens, user = LLM_VARIANTS[variant]
    files = sorted({str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} | {"config.json", "README.md"})
    proj = RunFolder(cfg, root).projector_path(variant)
    dims: dict[str, Any] = {}
    if proj.is_file():
        with safe_open(str(proj), "pt") as f:
            dims = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    cf_meta = json.loads((RunFolder(cfg, root).cf_dir() / CF_CONFIG).read_text())
    return {
        "model_type": MODEL_TYPE, "architectures": ["ALLMRec"], "format_version": FORMAT_VERSION,
        "allmrec_version": allmrec.__version__, "variant": variant, "item_tokens": item_tokens,
        "use_user_token": user, "llm": cfg.stage2.llm, "llm_dtype": cfg.stage2.llm_dtype,
        "cf_model": cf_meta["name"], "cf_config": cf_meta["cfg"], "n_items": prep.n_items, "n_users": prep.n_users,
        "prompt": {**cfg.stage2.prompt(), "candidate_order": cfg.stage2.order_for(user)},
        "domain": {"verb": cfg.data.domain.verb, "noun": cfg.data.domain.noun, "plural": cfg.data.domain.plural},
        "seed": cfg.seed, "dataset": {"name": cfg.name, "format": cfg.data.format, "path": cfg.data.path},
        "projector_shapes": dims, "exported_from": str(src.root), "files": files,
        "metrics": _metrics(src, variant),
    }


def model_card(meta: dict[str, Any], cfg: Config) -> str:
    """README.md of an exported folder: the run's settings and the metrics it measured."""
    llm = meta["llm"]
    base = f"base_model: {llm}\n" if not llm.startswith(("packaged:", "/", ".")) else ""
    lines = ["---", "library_name: allmrec", "pipeline_tag: text-generation", "tags: [recommendation, a-llmrec, "
             "collaborative-filtering]", base.rstrip("\n"), "---", "",
             f"# A-LLMRec ({meta['variant']}) trained on {meta['dataset']['name']}", "",
             "A-LLMRec (Kim et al., KDD 2024): a frozen CF model and a frozen LLM joined by a trained alignment "
             "network; the LLM ranks candidate items with the CF model's user and item vectors as soft tokens.",
             "", "```python", "from allmrec import ALLMRec", "m = ALLMRec.from_pretrained(\"<this folder>\")",
             "m.recommend(user_id=7, k=10)            # a known user (internal id, see data/users.parquet)",
             "m.recommend(history=[12, 40, 3], k=10)  # anyone: item ids, oldest first", "```", "",
             "Serve it: `allmrec serve --config <this folder>/config.yaml run_dir=<this folder>`.", "",
             "## Settings", "", "| setting | value |", "|---|---|"]
    s1, s2 = cfg.stage1, cfg.stage2
    rows = [("variant", f"{meta['variant']} (item tokens: {meta['item_tokens']}, user token: {meta['use_user_token']})"),
            ("LLM (frozen, not included)", f"`{llm}` ({s2.llm_dtype})"),
            ("CF model (frozen)", f"{meta['cf_model']} {json.dumps(meta['cf_config'])}"),
            ("dataset", f"{meta['dataset']['name']}: {meta['n_items']} items, {meta['n_users']} users "
                        f"({meta['dataset']['format']}, k-core {cfg.data.k_core})"),
            ("Stage-1", f"d'={s1.latent}, alpha={s1.alpha}, beta={s1.beta}, {s1.epochs} epochs, lr {s1.lr}, "
                        f"SBERT `{cfg.encode.model}` trainable layers {s1.sbert_trainable_layers}"),
            ("Stage-2", f"{s2.epochs} epochs, lr {s2.lr}, batch {s2.batch_size}, max_users {s2.max_users}"),
            ("prompt", ", ".join(f"{k}={v}" for k, v in meta["prompt"].items())),
            ("seed", str(meta["seed"]))]
    lines += [f"| {k} | {v} |" for k, v in rows]
    m = meta["metrics"]
    lines += ["", "## Measured metrics", ""]
    ev = m.get("evaluation")
    if ev:
        lines += [f"`allmrec evaluate` on {ev.get('users')} seeded test users, mode {ev.get('mode')}, one positive "
                  "and the prepared negatives per user (overall scenario):", "",
                  "| model | hit@1 | hit@5 | ndcg@10 | n |", "|---|---|---|---|---|"]
        for v, r in ev["overall"].items():
            f = lambda k: f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "-"))  # noqa: E731
            lines.append(f"| {v} | {f('hit@1')} | {f('hit@5')} | {f('ndcg@10')} | {f('n')} |")
    else:
        lines.append("This run was not evaluated (`allmrec evaluate`): no quality figures to report.")
    if m.get("training"):
        lines += ["", f"Training ({meta['variant']}): " + ", ".join(f"{k} {v}" for k, v in m["training"].items())]
    if m.get("cf_test"):
        lines += ["", "CF model on the test split (train-cf): `" + json.dumps(m["cf_test"])[:600] + "`"]
    lines += ["", f"Exported by allmrec {meta['allmrec_version']} from `{meta['exported_from']}`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the model
class ALLMRec:
    """A trained A-LLMRec loaded from an exported folder (or a run folder) for recommendation in Python.

    `recommend` does what the service does: the CF model's top `pool` items not in the history, shown to
    the LLM in the seeded candidate order, ranked by the LLM's likelihood of each title."""

    def __init__(self, path: Path, cfg: Config, variant: str, rec, cf, prep, meta: dict[str, Any]):
        self.path, self.cfg, self.variant = path, cfg, variant
        self.recommender, self.cf, self.prepared, self.config = rec, cf, prep, meta
        seqs = prep.sequences
        self._regular = {int(u): np.asarray(s, dtype=np.int64) for u, s in zip(seqs["user"], seqs["seq"])}
        self._cold: dict[int, np.ndarray] = {}
        if (prep.dir / schema.COLD_USERS).exists():
            cold = prep.candidates("cold_users")
            self._cold = {int(u): np.asarray(h, dtype=np.int64) for u, h in zip(cold["user"], cold["history"])}

    @classmethod
    def from_pretrained(cls, path: str | Path, variant: str | None = None, device: str = "cpu") -> "ALLMRec":
        """Load an `allmrec export` folder (or a trained run folder: its own config.yaml files are used)."""
        path = Path(path).expanduser().resolve()
        meta_file = path / "config.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            if meta.get("model_type") != MODEL_TYPE:
                raise ValueError(f"{meta_file} is not an allmrec export (model_type {meta.get('model_type')!r})")
            if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                raise ValueError(f"{path} was exported by a newer allmrec (format {meta['format_version']})")
            cfg = load_config(path / RESOLVED_CONFIG, [f"run_dir={path}"], check_files=False)
        elif path.is_dir():
            meta = {}
            cfg = _run_config(path, variant or "allmrec", None)
        else:
            raise FileNotFoundError(f"{path} is neither an exported allmrec folder nor a run folder")
        variant = variant or meta.get("variant", "allmrec")
        folder = RunFolder(cfg, path)
        if variant == "tallrec":
            rec, cf, prep = folder.load_recommender("llm_only", device)
            peft_dir = folder.tallrec
            if (peft_dir / PEFT_CONFIG).is_file():
                rec.llm = load_peft_adapter(rec.llm, peft_dir).to(device)
            else:  # a run folder: allmrec's own adapter file
                from allmrec.llm.lora import load_lora
                rec.llm = load_lora(rec.llm, folder.lora_path, cfg.tallrec).to(device)
        else:
            rec, cf, prep = folder.load_recommender(variant, device)
        return cls(path, cfg, variant, rec, cf, prep, meta)

    def __repr__(self) -> str:
        return (f"ALLMRec({str(self.path)!r}, variant={self.variant!r}, llm={self.cfg.stage2.llm!r}, "
                f"cf={self.cf.name!r}, items={self.prepared.n_items})")

    def _history(self, user_id: int | None, history: Sequence[int] | None) -> tuple[np.ndarray, list | None]:
        if (user_id is None) == (history is None):
            raise ValueError("give exactly one of user_id (a known user) or history (item ids, oldest first)")
        if user_id is not None:
            u = int(user_id)
            if u in self._regular:
                return self._regular[u], [u]
            if u in self._cold:
                return self._cold[u], None  # the CF model never trained on cold users
            raise ValueError(f"unknown user_id {user_id}")
        hist = np.asarray(list(history), dtype=np.int64)
        n = self.prepared.n_items
        if len(hist) == 0 or hist.min() < 1 or hist.max() > n:
            raise ValueError(f"history must be a non-empty list of item ids in 1..{n}")
        return hist, None

    def score(self, candidates: Sequence[int], user_id: int | None = None,
              history: Sequence[int] | None = None) -> np.ndarray:
        """The LLM's score of each candidate item (in the order given; higher is better)."""
        from allmrec.recommender import Example, candidate_order
        hist, users = self._history(user_id, history)
        cands = [int(c) for c in candidates]
        shown = candidate_order(cands, self.cfg.seed, user=user_id, history=hist.tolist())
        rep = user_reps(self.cf, [hist], users)[0] if self.recommender.use_user_token else None
        s = self.recommender.rank([Example(rep, hist.tolist(), shown)], length_norm=self.cfg.eval.length_norm)[0]
        by_item = dict(zip(shown, s[: len(shown)].tolist()))
        return np.array([by_item[c] for c in cands], dtype=np.float32)

    def recommend(self, user_id: int | None = None, history: Sequence[int] | None = None, k: int = 10,
                  candidates: Sequence[int] | None = None, pool: int | None = None) -> list[dict[str, Any]]:
        """Top-k items for a known user (`user_id`) or an anonymous `history` (item ids, oldest first):
        [{"item", "raw_id", "title", "score"}], best first. `candidates`: rank these instead of the CF
        model's top `pool` (default score.pool_size) items outside the history."""
        if k < 1:
            raise ValueError("k must be >= 1")
        hist, users = self._history(user_id, history)
        if candidates is None:
            n = pool or self.cfg.score.pool_size
            rep = user_reps(self.cf, [hist], users)
            top, _ = cf_top_n(self.cf, [hist], users, n, reps=rep)
            candidates = top[0].tolist()
        if not candidates:
            return []
        s = self.score(candidates, user_id=user_id, history=None if user_id is not None else hist.tolist())
        order = np.argsort(-s, kind="stable")[:k]
        items = self.prepared.items
        raw = dict(zip(items["item"].astype(int), items["raw_id"]))
        titles = self.recommender.titles
        return [{"item": int(candidates[i]), "raw_id": str(raw.get(int(candidates[i]), "")),
                 "title": titles[int(candidates[i])], "score": float(s[i])} for i in order]
