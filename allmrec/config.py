"""One typed, validated configuration for every job.

Layering (RecBole-style): dataclass defaults < YAML file(s) (a file may name a `base:` file it
extends) < command-line overrides `section.key=value`. Unknown keys and badly typed values are
errors that name the key, never silently ignored.

Value rules are declared next to each field (`F(default, ge=..., choices=..., registry=..., file=...)`):
ranges, allowed words, names that must be in a registry (CF models, evaluation variants, readers) and
files that must exist. `load_config` checks all of them, plus the rules that tie fields together
(`Config.validate`), and reports every error at once in one `ConfigError`.
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
from typing import Any, Callable

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
_MISSING = dataclasses.MISSING


def F(default: Any = _MISSING, *, factory: Callable[[], Any] | None = None, ge: float | None = None,
      gt: float | None = None, le: float | None = None, lt: float | None = None,
      choices: typing.Iterable[str] | None = None, registry: str | None = None, file: bool = False,
      nonempty: bool = False) -> Any:
    """A dataclass field with its value rules. Numbers: ge/gt/le/lt bounds (every float must also be
    finite); strings: `choices`, `registry` (a name in REGISTRIES, looked up at check time, so plug-ins
    count) or `file` (must exist, relative to the working directory or the project). On a list field the
    rules apply to every element. None passes when the type allows None (it means "unset")."""
    rules = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, registry=registry).items() if v is not None}
    if choices is not None:
        rules["choices"] = tuple(choices)
    if file:
        rules["file"] = True
    if nonempty:
        rules["nonempty"] = True
    meta = {"rules": rules}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _cf_models() -> list[str]:
    from allmrec.cf import CF_MODELS
    return sorted(CF_MODELS)


def _llm_variants() -> list[str]:
    from allmrec.artifacts import LLM_VARIANTS
    return sorted(LLM_VARIANTS)


def _eval_variants() -> list[str]:
    # CF models by name, "cf" (= cf.model), most-popular, and every LLM variant of allmrec.artifacts
    return sorted({*_cf_models(), "cf", "most_popular", *_llm_variants()})


def _formats() -> list[str]:
    from allmrec.data.readers import FORMATS
    return list(FORMATS)


# registry name -> the names it holds now (imported lazily: allmrec.cf imports this module)
REGISTRIES: dict[str, Callable[[], list[str]]] = {
    "cf_model": _cf_models,
    "eval_variant": _eval_variants,
    "llm_variant": _llm_variants,
    "data_format": _formats,
}


def resolve_project_file(path: str) -> Path:
    """A config's file path as the jobs resolve it: as given (absolute or from the working directory),
    else relative to the project (configs/ shipped with it)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / path


@dataclass
class DomainConfig:
    """Words of the paper's prompt for this dataset ('watched'/'movie', 'bought'/'item')."""
    verb: str = F("bought", nonempty=True)
    noun: str = F("item", nonempty=True)
    plural: str = F("items", nonempty=True)


@dataclass
class DataConfig:
    # reader: amazon2018 | amazon2023 | seq_json (amazon-scientific) | seq_txt (amazon-sports) | recbole
    format: str = F("recbole", registry="data_format")
    # file or folder (reader-specific); "packaged:ml-100k" = the ML-100K files shipped in the recbole wheel
    path: str = F("packaged:ml-100k", nonempty=True)
    category: str = ""  # Amazon category name for raw dumps, e.g. "Video_Games"
    rating_threshold: float | None = None  # keep ratings > threshold (paper: > 3) when set
    k_core: int = F(5, ge=1)
    n_negatives: int = F(19, ge=1)
    max_text_chars: int = F(512, ge=1)
    max_title_chars: int = F(120, ge=1)
    warm_fraction: float = F(0.35, gt=0, lt=1)
    cold_fraction: float = F(0.35, gt=0, lt=1)
    # cold users: "auto" (exactly-3-interaction users if any exist, else a seeded holdout),
    # "exact3", "holdout", or "none"
    cold_users: str = F("auto", choices=("auto", "exact3", "holdout", "none"))
    cold_user_fraction: float = F(0.10, ge=0, lt=1)
    fewshot_k: list[int] = F(factory=lambda: [128, 256], ge=1)
    # prepare refuses when more than this share of items has no title from the metadata (1: accept all)
    max_missing_title_fraction: float = F(0.05, ge=0, le=1)
    domain: DomainConfig = field(default_factory=DomainConfig)


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local cluster
    # logical CPUs for a local cluster; oversubscribed on purpose (see docs: actor pools + read tasks)
    num_cpus: int | None = F(None, ge=1)
    object_store_memory_gb: float | None = F(None, gt=0)
    progress: bool = True
    # Ray Data's V2 parquet reader starts a pool of footer-reader actors (up to 32, a process each) for
    # every read_parquet: ~5 s per read of one small file here, against 0.6 s for V1. Our prepared
    # datasets are a few files each, so V1 by default; True for V2 (many-file inputs on a cluster).
    datasource_v2: bool = False


@dataclass
class EncodeConfig:
    model: str = F("packaged:all-MiniLM-L6-v2", nonempty=True)  # or any sentence-transformers name/path
    batch_size: int = F(64, ge=1)
    num_actors: int = F(2, ge=1)
    use_gpu: bool = False
    max_seq_length: int = F(128, ge=1)


@dataclass
class CFConfig:
    model: str = F("sasrec", registry="cf_model")  # sasrec | gru4rec | nextitnet | ncf | morec (allmrec.cf)
    hidden: int = F(50, ge=1)
    max_len: int = F(50, ge=2)
    num_blocks: int = F(2, ge=1)
    num_heads: int = F(1, ge=1)
    dropout: float = F(0.5, ge=0, lt=1)  # as the reference A-LLMRec SASRec; beats 0.2 on Scientific (docs/results.md)
    lr: float = F(1e-3, gt=0)
    weight_decay: float = F(0.0, ge=0)
    batch_size: int = F(128, ge=1)
    epochs: int = F(200, ge=1)
    patience: int = F(10, ge=1)  # epochs without valid NDCG@10 improvement
    eval_every: int = F(1, ge=1)
    # report to Ray Train with a resumable checkpoint every N epochs (and at early stopping and the last epoch):
    # Ray Train v2 takes one report per worker at its controller's 2-s poll, which made every 0.6-s SASRec epoch
    # on ML-100K last 2 s; a failed attempt redoes at most N - 1 epochs (seeded: the same ones)
    checkpoint_every: int = F(10, ge=1)
    num_workers: int = F(1, ge=1)
    use_gpu: bool = False
    max_failures: int = F(2, ge=-1)  # -1: retry forever (Ray Train's FailureConfig)


@dataclass
class Stage1Config:
    # L = matching + alpha * item_recon + beta * text_recon + rec. Ablations (paper Table 5): a weight of 0
    # or a use_* switch off leaves that term out of L (still logged); sbert_trainable_layers=0 = frozen SBERT
    alpha: float = F(0.5, ge=0)  # item reconstruction weight (0: w/o item reconstruction)
    beta: float = F(0.5, ge=0)  # text reconstruction weight (0: w/o text reconstruction)
    latent: int = F(128, ge=1)  # d'
    lr: float = F(1e-4, gt=0)
    batch_size: int = F(32, ge=1)
    epochs: int = F(10, ge=1)
    all_items: bool = False  # "all items" variant: every position of the sequence
    sbert_trainable_layers: int = F(-1, ge=-1)  # -1: fine-tune all of SBERT; 0: frozen; N: top N layers
    use_matching: bool = True  # False: w/o the matching loss
    use_recon: bool = True  # False: w/o both reconstructions
    use_rec: bool = True  # False: w/o the recommendation loss
    max_users: int | None = F(None, ge=1)  # seeded subset of users (CPU runs)
    num_workers: int = F(1, ge=1)
    use_gpu: bool = False
    zero_stage: int = F(0, ge=0, le=3)
    deepspeed_config: str = F("configs/deepspeed/zero0.json", file=True)
    # the item table (e, q of every item) computed by rank 0 after the last epoch from its cached lower SBERT
    # layers (one process; not under ZeRO-3); false: a Ray Data actor pool after training (huge catalogs)
    table_on_worker: bool = True


ITEM_TOKEN_POSITIONS = ("after", "before")  # an item's soft token after its title (the paper) or before it
# the user sentence first (the paper), after the history, or the user's soft token alone as the last prompt token
USER_TOKEN_POSITIONS = ("start", "after_history", "answer")
# the order of the candidates in the prompt: seeded at random (the paper) or best CF score first
CANDIDATE_ORDERS = ("seeded", "cf")


@dataclass
class Stage2Config:
    llm: str = F("packaged:SmolLM2-135M-Instruct", nonempty=True)  # or any HF causal LM name/path
    lr: float = F(1e-4, gt=0)
    batch_size: int = F(4, ge=1)
    epochs: int = F(5, ge=1)
    history_len: int = F(10, ge=0)
    max_title_tokens: int = F(16, ge=1)
    use_user_token: bool = True
    # joint | sbert | random | none | mlp (MLP-LLM: raw CF embeddings)
    item_tokens: str = F("joint", choices=("joint", "sbert", "random", "none", "mlp"))
    # weight of the first target token in the loss (where the candidates compete; later tokens mostly copy
    # the chosen title): 1.0 = the paper's plain mean over tokens (docs/results.md, "choice vs copy")
    choice_weight: float = F(1.0, gt=0)
    # weight of an added loss term: the target's cross-entropy among the candidates only (the answer's first
    # token, logits restricted to the candidates' first tokens). 0 = the paper's next-title loss alone; a
    # departure that trains the choice Hit@1 measures (docs/results.md, "The candidate softmax")
    candidate_softmax: float = F(0.0, ge=0)
    # wrap the prompt in the tokenizer's chat template (user turn = the question, the assistant turn starts
    # "The recommendation is"); false = the paper's plain prompt (docs/results.md, "chat prompt")
    chat_prompt: bool = False
    # where an item's soft token goes: after its title (the paper's "[title][emb]") or before it. Causal
    # attention lets a title's tokens read an embedding only when it comes first (docs/results.md)
    item_token_position: str = F("after", choices=ITEM_TOKEN_POSITIONS)
    # where the user's soft token goes: at the very start (the paper's "[user] is a user representation.
    # This user has watched ...") or after the history sentence, just before the question (position 0 is
    # the attention sink of a model that gets no BOS token), or "answer": alone, as the last prompt token
    # ("... The recommendation is[user] <title>"). With "[emb]title" candidates the answer then continues
    # the way a candidate's title continues its [emb]: an induction head of the frozen LLM can copy the
    # title whose [emb] matches [user] (docs/results.md, "The user token at the answer")
    user_token_position: str = F("start", choices=USER_TOKEN_POSITIONS)
    # the candidates' order in the prompt: "seeded" = a seeded shuffle per user (the paper: the LLM must find
    # the target anywhere in the list); "cf" = by the CF model's score <x_u, E_i>, best first (a departure:
    # the LLM re-ranks the CF model's ranking, which it sees as the list's order; ties and items the CF
    # model does not know keep the seeded order, after the known ones). Needs the user token (x_u); the
    # LLM-Only and TALLRec baselines, which see no CF input, keep the seeded order (docs/results.md,
    # "Candidates in the CF model's order") unless `order_baselines`
    candidate_order: str = F("seeded", choices=CANDIDATE_ORDERS)
    # with candidate_order=cf, list the candidates of the variants without the user token (LLM-Only, TALLRec,
    # allmrec_no_user) in the CF order too: x_u sorts their list but is never fed to the LLM. An ablation (the
    # order alone, without the soft tokens); the baselines then see the CF model's ranking, so they are no
    # longer CF-free
    order_baselines: bool = False
    max_users: int | None = F(None, ge=1)
    num_workers: int = F(1, ge=1)
    use_gpu: bool = False
    zero_stage: int = F(3, ge=0, le=3)
    deepspeed_config: str = F("configs/deepspeed/zero3.json", file=True)
    bf16: bool = False  # DeepSpeed bf16 mixed precision of the trained parts (GPU only)
    # dtype of the frozen LLM's weights in Stage-2, evaluation, scoring and serving: auto = bf16 on GPU
    # and on CPUs with native bf16 (AMX / AVX512-BF16), else fp32; or float32 | bfloat16 | float16
    llm_dtype: str = F("auto", choices=("auto", "float32", "bfloat16", "float16"))
    # training examples per user and epoch: 1 = the paper's (history -> the last training item); k > 1 adds
    # up to k - 1 earlier (history -> next item) examples of the same sequence, a seeded choice fixed for the
    # run (a departure from the paper: docs/guide.md). An epoch then takes up to k times the steps
    examples_per_user: int = F(1, ge=1)
    # the first example's target: false = the paper's last training item; true = the validation item (history:
    # the whole training part), a target the CF model never trained on. On its own training targets SASRec's
    # first candidate is right far more often than at test time (ML-100K: 59-62% against 44%), so what Stage-2
    # learns about trusting or overruling the CF model is fitted to a better CF model than the one it meets;
    # the validation item is as unseen as the test item (a departure: docs/results.md). Earlier examples
    # (examples_per_user > 1) then may include the last training item
    heldout_target: bool = False
    # torch.compile the frozen LLM's decoder blocks in training (allmrec.llm.loading.compile_layers; ~1.6x
    # per step on CPU, docs/benchmarks.md). auto = unless ZeRO-3 partitions the weights (its hooks and
    # compiled graphs do not mix); always (an error with zero_stage 3); never
    compile: str = F("auto", choices=("auto", "always", "never"))
    # the training seed of Stage-2 and TALLRec (initial weights, training negatives, batch order); None: the
    # run's `seed`. Another value trains another seed of the same cell on the same data, splits, candidates
    # and evaluation (the run's `seed` draws those), which is how a cell's seed-to-seed spread is measured
    seed: int | None = F(None, ge=0)
    # length bucketing: 0 = the paper's shuffled batches; W > 0 = each epoch's shuffled order cut into windows
    # of W batches, each window sorted by prompt length into batches, the batches shuffled (less padding per
    # step, a departure in which examples share a batch: docs/guide.md, measured in docs/benchmarks.md)
    bucket_window: int = F(0, ge=0)

    def compiles(self) -> bool:
        """Whether Stage-2 compiles the LLM's decoder blocks."""
        return self.compile == "always" or (self.compile == "auto" and self.zero_stage < 3)

    # the settings that shape the prompt text: what a trained projector or adapter is tied to
    # the layout options added after the paper's prompt: checked when a projector is loaded
    LAYOUT_KEYS = ("chat_prompt", "item_token_position", "user_token_position", "candidate_order")
    # what the prompt builder takes (candidate_order is LLMRecommender's own argument: it needs the CF model)
    PROMPT_KEYS = ("history_len", "max_title_tokens", "chat_prompt", "item_token_position", "user_token_position")

    def order_for(self, use_user_token: bool) -> str:
        """The candidate order a variant is shown: `candidate_order` with the user token; without one the
        seeded order (LLM-Only and TALLRec see no CF input), or the CF order too with `order_baselines`."""
        return self.candidate_order if use_user_token or self.order_baselines else "seeded"

    def changed(self, keys) -> dict:
        """Those of `keys` set away from their defaults: settings added after artifacts were trained enter
        fingerprints only when set, so artifacts trained before they existed stay up to date."""
        return {k: getattr(self, k) for k in keys if getattr(self, k) != getattr(Stage2Config, k)}

    def prompt(self) -> dict:
        """LLMRecommender's prompt keyword arguments."""
        return {k: getattr(self, k) for k in self.PROMPT_KEYS}


@dataclass
class TallrecConfig:
    """The TALLRec baseline: the LLM-Only prompt, the LLM fine-tuned by LoRA on Stage-2's loss and examples.
    The LLM, its dtype, the prompt (history_len, max_title_tokens) and DeepSpeed bf16 come from `stage2`."""
    lr: float = F(1e-4, gt=0)
    batch_size: int = F(4, ge=1)
    epochs: int | None = F(None, ge=1)  # None: stage2.epochs (the same training budget as A-LLMRec)
    lora_r: int = F(8, ge=1)
    lora_alpha: float = F(16.0, gt=0)
    lora_dropout: float = F(0.05, ge=0, lt=1)
    # empty: the architecture's default (q_proj, v_proj)
    target_modules: list[str] = F(factory=list, nonempty=True)
    max_users: int | None = F(None, ge=1)  # None: stage2.max_users (the same seeded users as A-LLMRec's Stage-2)
    num_workers: int = F(1, ge=1)
    use_gpu: bool = False
    # ZeRO-0 on one worker: the fastest on a CPU (as the main job's Stage-2); zero_stage=3 + zero3.json
    # partitions the LLM and its adapters over the workers (then nothing is compiled)
    zero_stage: int = F(0, ge=0, le=3)
    deepspeed_config: str = F("configs/deepspeed/zero0.json", file=True)

    def compiles(self, stage2: "Stage2Config") -> bool:
        """Whether TALLRec compiles the LLM's decoder blocks, adapters inside: as `stage2.compile` says,
        never under ZeRO-3 (partitioned weights' hooks and compiled graphs do not mix)."""
        return stage2.compile != "never" and self.zero_stage < 3


@dataclass
class EvalConfig:
    variants: list[str] = F(factory=lambda: ["cf", "llm_only", "allmrec"], registry="eval_variant")  # cf: cf.model, by its name
    mode: str = F("rank", choices=("rank", "generate", "both"))
    length_norm: bool = True
    max_users: int | None = F(None, ge=1)
    # cold users scored (seeded subset); None: as many as max_users; 0: none (the scenario left out)
    max_cold_users: int | None = F(None, ge=0)
    max_new_tokens: int = F(32, ge=1)
    batch_size: int = F(8, ge=1)
    num_actors: int = F(1, ge=1)
    use_gpu: bool = False
    # cross-domain scenario: a trained run folder (another dataset) whose models score this run's data.
    # This run needs only `prepare`; its items get q_i from the source's fine-tuned SBERT and f_T^enc.
    source_run: str | None = None


@dataclass
class ScoreConfig:
    top_k: int = F(10, ge=1)
    pool: str = F("cf_topn", choices=("all", "cf_topn"))
    pool_size: int = F(20, ge=1)
    max_users: int | None = F(None, ge=1)  # the first N users only (CPU demos); None: every user
    batch_size: int = F(8, ge=1)  # users per LLM re-ranking forward
    num_actors: int = F(1, ge=1)


@dataclass
class ServeConfig:
    host: str = F("127.0.0.1", nonempty=True)
    port: int = F(8000, ge=1, le=65535)
    max_history: int = F(200, ge=1)
    max_candidates: int = F(100, ge=1)
    min_replicas: int = F(1, ge=0)
    max_replicas: int = F(2, ge=1)


@dataclass
class TrackingConfig:
    # MLflow experiment tracking of the training jobs and evaluate (pipelines/tracking.py)
    enabled: bool = True
    uri: str | None = None  # None: a local file store, <run_dir>/mlruns; or any MLflow tracking URI
    experiment: str | None = None  # None: the config's `name`


@dataclass
class Config:
    name: str = F("ml100k", nonempty=True)
    run_dir: str = F("runs/ml100k", nonempty=True)
    seed: int = F(42, ge=0)
    torch_threads: int | None = F(None, ge=1)
    # few-shot scenario: train-cf, stage1 and stage2 learn only from the K seeded users prepare wrote to
    # data/fewshot.parquet (K one of data.fewshot_k); evaluation is unchanged. Use its own run_dir.
    fewshot: int | None = F(None, ge=1)
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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def train_seed(self) -> int:
        """The seed of Stage-2's and TALLRec's training draws: `stage2.seed`, else the run's `seed`."""
        return self.seed if self.stage2.seed is None else self.stage2.seed

    def problems(self, check_files: bool = True) -> list[str]:
        """Every rule this config breaks: the declared per-field rules, then the rules between fields."""
        errors = _field_problems(self, "", check_files)
        d, s1 = self.data, self.stage1

        def check(cond: bool, msg: str) -> None:
            if not cond:
                errors.append(msg)

        check(d.warm_fraction + d.cold_fraction <= 1, "data.warm_fraction + data.cold_fraction must be <= 1")
        check(self.fewshot is None or self.fewshot in d.fewshot_k,
              f"fewshot must be one of data.fewshot_k {d.fewshot_k} (prepare writes those subsets)")
        check(s1.use_matching or s1.use_rec or (s1.use_recon and s1.alpha + s1.beta > 0),
              "stage1: every loss term is off (use_matching, use_rec, use_recon with alpha/beta): nothing to train")
        check(self.serve.min_replicas <= self.serve.max_replicas, "serve.min_replicas must be <= serve.max_replicas")
        check(len(self.eval.variants) > 0, "eval.variants must name at least one variant")
        check(self.stage2.candidate_order == "seeded" or self.stage2.use_user_token or self.stage2.order_baselines,
              "stage2.candidate_order=cf orders the candidates by the CF model's <x_u, E_i>, which needs the user "
              "representation: set stage2.use_user_token=true (or stage2.order_baselines=true to sort a variant "
              "without the user token by it)")
        check(not self.stage2.order_baselines or self.stage2.candidate_order == "cf",
              "stage2.order_baselines=true shows the baselines the CF order: it needs stage2.candidate_order=cf")
        check(not (self.stage2.compile == "always" and self.stage2.zero_stage == 3),
              "stage2.compile=always cannot be used with stage2.zero_stage=3 (partitioned weights); use auto or never")
        return errors

    def validate(self, check_files: bool = True) -> "Config":
        """Raise one ConfigError listing every problem (`problems`); `check_files`: also require the files
        named by the config to exist here (off where a config travels to workers as a dict)."""
        errors = self.problems(check_files)
        if errors:
            raise ConfigError(errors)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of some sections (what a step depends on), for skip-if-unchanged."""
        import hashlib
        d = self.to_dict()
        sub = {s: d[s] for s in sections} if sections else d
        return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """One or more configuration errors; `errors` lists them all, `str()` shows them one per line."""

    def __init__(self, errors: str | list[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            msg = self.errors[0]
        else:
            msg = f"{len(self.errors)} errors:\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(msg)


def _rule_problems(key: str, value: Any, rules: dict[str, Any], check_files: bool) -> list[str]:
    if value is None:
        return []
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key}={value}: must be a finite number"]
    out = []
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for name, op, word in (("ge", float.__ge__, ">="), ("gt", float.__gt__, ">"),
                               ("le", float.__le__, "<="), ("lt", float.__lt__, "<")):
            if name in rules and not op(float(value), float(rules[name])):
                out.append(f"{key}={value}: must be {word} {rules[name]}")
    if isinstance(value, str):
        if rules.get("nonempty") and not value.strip():
            out.append(f"{key}: must not be empty")
        allowed = rules.get("choices")
        if "registry" in rules:
            allowed = REGISTRIES[rules["registry"]]()
        if allowed is not None and value not in allowed:
            close = difflib.get_close_matches(value, list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"{key}={value!r}: expected one of {'|'.join(allowed)}{hint}")
        if check_files and rules.get("file") and not resolve_project_file(value).is_file():
            out.append(f"{key}={value!r}: file not found (relative paths: from the working directory, "
                       f"else from the project {REPO_ROOT})")
    return out


def _field_problems(obj: Any, prefix: str, check_files: bool) -> list[str]:
    errors: list[str] = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            errors += _field_problems(value, key + ".", check_files)
            continue
        rules = f.metadata.get("rules", {})
        if isinstance(value, list):
            for i, v in enumerate(value):
                errors += _rule_problems(f"{key}[{i}]", v, rules, check_files)
        else:
            errors += _rule_problems(key, value, rules, check_files)
    return errors


def field_rules(cls: type = None) -> dict[str, dict[str, Any]]:
    """{'section.key': rules} of every field with declared rules (for docs and tests)."""
    out: dict[str, dict[str, Any]] = {}

    def walk(c: type, prefix: str) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif f.metadata.get("rules"):
                out[f"{prefix}{f.name}"] = dict(f.metadata["rules"])

    walk(cls or Config, "")
    return out


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


def _merge(obj: Any, data: dict[str, Any], prefix: str = "", errors: list[str] | None = None) -> None:
    """Set `data` onto the dataclass `obj`. Problems (unknown keys, values of the wrong type) are appended
    to `errors` when given (the rest still merges), else the first one is raised."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in data.items():
        key = f"{prefix}{k}"
        try:
            if k not in names:
                close = difflib.get_close_matches(str(k), names, n=1)
                hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
            cur = getattr(obj, k)
            if dataclasses.is_dataclass(cur):
                if not isinstance(v, dict):
                    raise ConfigError(f"{key}: expected a mapping, got {v!r}")
                _merge(cur, v, key + ".", errors)
            else:
                setattr(obj, k, _coerce(v, hints[k], key))
        except ConfigError as e:
            if errors is None:
                raise
            errors.extend(e.errors)


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = True) -> Config:
    """defaults < YAML file < overrides, validated. Every problem (unreadable file, unknown key, bad type,
    broken rule) is collected and raised together in one ConfigError."""
    cfg = Config()
    errors: list[str] = []
    if path is not None:
        try:
            _merge(cfg, _read_yaml(Path(path), set()), errors=errors)
        except (ConfigError, yaml.YAMLError) as e:
            errors.extend(e.errors if isinstance(e, ConfigError) else [f"{path}: not valid YAML: {e}"])
    for ov in overrides or []:
        try:
            keys, value = parse_override(ov)
        except (ConfigError, yaml.YAMLError) as e:
            errors.extend(e.errors if isinstance(e, ConfigError) else [f"override {ov!r}: not valid YAML: {e}"])
            continue
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, errors=errors)
    errors += cfg.problems(check_files)
    if errors:
        raise ConfigError(errors)
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """A config shipped as a dict (to Ray workers, replicas): already checked where it was loaded, so its
    files are not required to exist here."""
    cfg = Config()
    _merge(cfg, d)
    return cfg.validate(check_files=False)
