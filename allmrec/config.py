"""One typed, validated configuration for every job.

Layering (RecBole-style): dataclass defaults < YAML file(s) (a file may name a `base:` file it
extends) < command-line overrides `section.key=value`. Unknown keys and badly typed values are
errors that name the key, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DomainConfig:
    """Words of the paper's prompt for this dataset ('watched'/'movie', 'bought'/'item')."""
    verb: str = "bought"
    noun: str = "item"
    plural: str = "items"


@dataclass
class DataConfig:
    # reader: amazon2018 | amazon2023 | seq_json (amazon-scientific) | seq_txt (amazon-sports) | recbole
    format: str = "recbole"
    # file or folder (reader-specific); "packaged:ml-100k" = the ML-100K files shipped in the recbole wheel
    path: str = "packaged:ml-100k"
    category: str = ""  # Amazon category name for raw dumps, e.g. "Video_Games"
    rating_threshold: float | None = None  # keep ratings > threshold (paper: > 3) when set
    k_core: int = 5
    n_negatives: int = 19
    max_text_chars: int = 512
    max_title_chars: int = 120
    warm_fraction: float = 0.35
    cold_fraction: float = 0.35
    # cold users: "auto" (exactly-3-interaction users if any exist, else a seeded holdout),
    # "exact3", "holdout", or "none"
    cold_users: str = "auto"
    cold_user_fraction: float = 0.10
    fewshot_k: list[int] = field(default_factory=lambda: [128, 256])
    domain: DomainConfig = field(default_factory=DomainConfig)


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local cluster
    # logical CPUs for a local cluster; oversubscribed on purpose (see docs: actor pools + read tasks)
    num_cpus: int | None = None
    object_store_memory_gb: float | None = None
    progress: bool = True
    # Ray Data's V2 parquet reader starts a pool of footer-reader actors (up to 32, a process each) for
    # every read_parquet: ~5 s per read of one small file here, against 0.6 s for V1. Our prepared
    # datasets are a few files each, so V1 by default; True for V2 (many-file inputs on a cluster).
    datasource_v2: bool = False


@dataclass
class EncodeConfig:
    model: str = "packaged:all-MiniLM-L6-v2"  # or any sentence-transformers name/path
    batch_size: int = 64
    num_actors: int = 2
    use_gpu: bool = False
    max_seq_length: int = 128


@dataclass
class CFConfig:
    model: str = "sasrec"  # sasrec | gru4rec | nextitnet | ncf | morec
    hidden: int = 50
    max_len: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.5  # as the reference A-LLMRec SASRec; beats 0.2 on Scientific (docs/results.md)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = 200
    patience: int = 10  # epochs without valid NDCG@10 improvement
    eval_every: int = 1
    num_workers: int = 1
    use_gpu: bool = False
    max_failures: int = 2


@dataclass
class Stage1Config:
    # L = matching + alpha * item_recon + beta * text_recon + rec. Ablations (paper Table 5): a weight of 0
    # or a use_* switch off leaves that term out of L (still logged); sbert_trainable_layers=0 = frozen SBERT
    alpha: float = 0.5  # item reconstruction weight (0: w/o item reconstruction)
    beta: float = 0.5  # text reconstruction weight (0: w/o text reconstruction)
    latent: int = 128  # d'
    lr: float = 1e-4
    batch_size: int = 32
    epochs: int = 10
    all_items: bool = False  # "all items" variant: every position of the sequence
    sbert_trainable_layers: int = -1  # -1: fine-tune all of SBERT; 0: frozen; N: top N layers
    use_matching: bool = True  # False: w/o the matching loss
    use_recon: bool = True  # False: w/o both reconstructions
    use_rec: bool = True  # False: w/o the recommendation loss
    max_users: int | None = None  # seeded subset of users (CPU runs)
    num_workers: int = 1
    use_gpu: bool = False
    zero_stage: int = 0
    deepspeed_config: str = "configs/deepspeed/zero0.json"


ITEM_TOKEN_POSITIONS = ("after", "before")  # an item's soft token after its title (the paper) or before it
# the user sentence first (the paper), after the history, or the user's soft token alone as the last prompt token
USER_TOKEN_POSITIONS = ("start", "after_history", "answer")


@dataclass
class Stage2Config:
    llm: str = "packaged:SmolLM2-135M-Instruct"  # or any HF causal LM name/path
    lr: float = 1e-4
    batch_size: int = 4
    epochs: int = 5
    history_len: int = 10
    max_title_tokens: int = 16
    use_user_token: bool = True
    item_tokens: str = "joint"  # joint | sbert | random | none | mlp (MLP-LLM: raw CF embeddings)
    # weight of the first target token in the loss (where the candidates compete; later tokens mostly copy
    # the chosen title): 1.0 = the paper's plain mean over tokens (docs/results.md, "choice vs copy")
    choice_weight: float = 1.0
    # wrap the prompt in the tokenizer's chat template (user turn = the question, the assistant turn starts
    # "The recommendation is"); false = the paper's plain prompt (docs/results.md, "chat prompt")
    chat_prompt: bool = False
    # where an item's soft token goes: after its title (the paper's "[title][emb]") or before it. Causal
    # attention lets a title's tokens read an embedding only when it comes first (docs/results.md)
    item_token_position: str = "after"
    # where the user's soft token goes: at the very start (the paper's "[user] is a user representation.
    # This user has watched ...") or after the history sentence, just before the question (position 0 is
    # the attention sink of a model that gets no BOS token), or "answer": alone, as the last prompt token
    # ("... The recommendation is[user] <title>"). With "[emb]title" candidates the answer then continues
    # the way a candidate's title continues its [emb]: an induction head of the frozen LLM can copy the
    # title whose [emb] matches [user] (docs/results.md, "The user token at the answer")
    user_token_position: str = "start"
    max_users: int | None = None
    num_workers: int = 1
    use_gpu: bool = False
    zero_stage: int = 3
    deepspeed_config: str = "configs/deepspeed/zero3.json"
    bf16: bool = False  # DeepSpeed bf16 mixed precision of the trained parts (GPU only)
    # dtype of the frozen LLM's weights in Stage-2, evaluation, scoring and serving: auto = bf16 on GPU
    # and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32; or float32 | bfloat16 | float16
    llm_dtype: str = "auto"

    # the settings that shape the prompt text: what a trained projector or adapter is tied to
    # the layout options added after the paper's prompt: checked when a projector is loaded
    LAYOUT_KEYS = ("chat_prompt", "item_token_position", "user_token_position")
    PROMPT_KEYS = ("history_len", "max_title_tokens", *LAYOUT_KEYS)

    def prompt(self) -> dict:
        """LLMRecommender's prompt keyword arguments."""
        return {k: getattr(self, k) for k in self.PROMPT_KEYS}


@dataclass
class TallrecConfig:
    """The TALLRec baseline: the LLM-Only prompt, the LLM fine-tuned by LoRA on Stage-2's loss and examples.
    The LLM, its dtype, the prompt (history_len, max_title_tokens) and DeepSpeed bf16 come from `stage2`."""
    lr: float = 1e-4
    batch_size: int = 4
    epochs: int | None = None  # None: stage2.epochs (the same training budget as A-LLMRec)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)  # empty: the architecture's default (q_proj, v_proj)
    max_users: int | None = None  # None: stage2.max_users (the same seeded users as A-LLMRec's Stage-2)
    num_workers: int = 1
    use_gpu: bool = False
    zero_stage: int = 3
    deepspeed_config: str = "configs/deepspeed/zero3.json"


@dataclass
class EvalConfig:
    variants: list[str] = field(default_factory=lambda: ["sasrec", "llm_only", "allmrec"])
    mode: str = "rank"  # rank | generate | both
    length_norm: bool = True
    max_users: int | None = None
    max_new_tokens: int = 32
    batch_size: int = 8
    num_actors: int = 1
    use_gpu: bool = False
    # cross-domain scenario: a trained run folder (another dataset) whose models score this run's data.
    # This run needs only `prepare`; its items get q_i from the source's fine-tuned SBERT and f_T^enc.
    source_run: str | None = None


@dataclass
class ScoreConfig:
    top_k: int = 10
    pool: str = "cf_topn"  # all | cf_topn
    pool_size: int = 20
    max_users: int | None = None  # the first N users only (CPU demos); None: every user
    batch_size: int = 8  # users per LLM re-ranking forward
    num_actors: int = 1


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_history: int = 200
    max_candidates: int = 100
    min_replicas: int = 1
    max_replicas: int = 2


@dataclass
class Config:
    name: str = "ml100k"
    run_dir: str = "runs/ml100k"
    seed: int = 42
    torch_threads: int | None = None
    # few-shot scenario: train-cf, stage1 and stage2 learn only from the K seeded users prepare wrote to
    # data/fewshot.parquet (K one of data.fewshot_k); evaluation is unchanged. Use its own run_dir.
    fewshot: int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    cf: CFConfig = field(default_factory=CFConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    tallrec: TallrecConfig = field(default_factory=TallrecConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def validate(self) -> "Config":
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        d = self.data
        check(d.format in {"amazon2018", "amazon2023", "seq_json", "seq_txt", "recbole"},
              f"data.format={d.format!r}: expected amazon2018|amazon2023|seq_json|seq_txt|recbole")
        check(d.k_core >= 1, "data.k_core must be >= 1")
        check(d.n_negatives >= 1, "data.n_negatives must be >= 1")
        check(0 < d.warm_fraction < 1 and 0 < d.cold_fraction < 1
              and d.warm_fraction + d.cold_fraction <= 1, "data.warm_fraction + cold_fraction must be in (0, 1]")
        check(d.cold_users in {"auto", "exact3", "holdout", "none"},
              "data.cold_users must be auto|exact3|holdout|none")
        check(0 <= d.cold_user_fraction < 1, "data.cold_user_fraction must be in [0, 1)")
        check(all(k > 0 for k in d.fewshot_k), "data.fewshot_k must be positive")
        check(self.cf.hidden > 0 and self.cf.max_len > 1, "cf.hidden > 0 and cf.max_len > 1")
        check(0 <= self.cf.dropout < 1, "cf.dropout must be in [0, 1)")
        check(self.fewshot is None or self.fewshot in self.data.fewshot_k,
              f"fewshot must be one of data.fewshot_k {self.data.fewshot_k} (prepare writes those subsets)")
        check(self.stage2.llm_dtype in {"auto", "float32", "bfloat16", "float16"},
              "stage2.llm_dtype must be auto|float32|bfloat16|float16")
        check(self.stage2.item_tokens in {"joint", "sbert", "random", "none", "mlp"},
              "stage2.item_tokens must be joint|sbert|random|none|mlp")
        check(self.stage2.item_token_position in ITEM_TOKEN_POSITIONS,
              f"stage2.item_token_position must be {'|'.join(ITEM_TOKEN_POSITIONS)}")
        check(self.stage2.user_token_position in USER_TOKEN_POSITIONS,
              f"stage2.user_token_position must be {'|'.join(USER_TOKEN_POSITIONS)}")
        check(self.stage2.choice_weight > 0 and math.isfinite(self.stage2.choice_weight),
              "stage2.choice_weight must be finite and > 0")
        check(self.eval.mode in {"rank", "generate", "both"}, "eval.mode must be rank|generate|both")
        check(self.score.pool in {"all", "cf_topn"}, "score.pool must be all|cf_topn")
        for sect in ("cf", "stage1", "stage2"):
            check(getattr(self, sect).num_workers >= 1, f"{sect}.num_workers must be >= 1")
        s1 = self.stage1
        check(s1.alpha >= 0 and s1.beta >= 0 and math.isfinite(s1.alpha) and math.isfinite(s1.beta),
              "stage1.alpha and stage1.beta must be finite and >= 0")
        check(s1.use_matching or s1.use_rec or (s1.use_recon and s1.alpha + s1.beta > 0),
              "stage1: every loss term is off (use_matching, use_rec, use_recon with alpha/beta): nothing to train")
        check(s1.latent >= 1 and s1.batch_size >= 1 and s1.epochs >= 1 and s1.lr > 0,
              "stage1.latent, batch_size, epochs must be >= 1 and stage1.lr > 0")
        check(s1.sbert_trainable_layers >= -1, "stage1.sbert_trainable_layers must be -1 (all), 0 (frozen) or N >= 1")
        check(self.stage1.zero_stage in {0, 1, 2, 3} and self.stage2.zero_stage in {0, 1, 2, 3},
              "zero_stage must be 0..3")
        t = self.tallrec
        check(t.lr > 0 and t.batch_size >= 1 and (t.epochs is None or t.epochs >= 1),
              "tallrec: lr > 0, batch_size >= 1 and epochs >= 1 (or null = stage2.epochs)")
        check(t.lora_r >= 1 and t.lora_alpha > 0 and 0 <= t.lora_dropout < 1,
              "tallrec: lora_r >= 1, lora_alpha > 0 and lora_dropout in [0, 1)")
        check(all(m.strip() for m in t.target_modules), "tallrec.target_modules: names must be non-empty")
        check(t.max_users is None or t.max_users >= 1, "tallrec.max_users must be >= 1 (or null = stage2.max_users)")
        check(t.num_workers >= 1, "tallrec.num_workers must be >= 1")
        check(t.zero_stage in {0, 1, 2, 3}, "tallrec.zero_stage must be 0..3")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of some sections (what a step depends on), for skip-if-unchanged."""
        import hashlib
        d = self.to_dict()
        sub = {s: d[s] for s in sections} if sections else d
        return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the declared field type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot read {value!r} as {tp}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
            return value.lower() in {"true", "1", "yes", "on"}
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _merge(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping, got {v!r}")
            _merge(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _read_yaml(path: Path, seen: set[Path]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config 'base:' cycle at {path}")
    seen.add(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml((path.parent / base), seen)
    return _deep_update(merged, data)


def _deep_update(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        _merge(cfg, _read_yaml(Path(path), set()))
    for ov in overrides or []:
        keys, value = parse_override(ov)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested)
    return cfg.validate()


def config_from_dict(d: dict[str, Any]) -> Config:
    cfg = Config()
    _merge(cfg, d)
    return cfg.validate()
