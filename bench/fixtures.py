"""Small synthetic inputs shared by the benchmarks and the tests: a Markov-structured interaction file, a
tiny random Llama with its own tokenizer, and a tiny but complete run folder for the service.

`build_run(root, *overrides)` writes, small and untrained but real in every format: prepared data (the Ray
prepare job on the synthetic Markov set), a SASRec saved with CFModel.save, Stage-1 joint_emb.parquet +
export.safetensors (aligner keys, frozen MiniLM), a Stage-2 projector, and a tiny random Llama with its own
tokenizer saved with save_pretrained (stage2.llm is a local path). Needs only the packaged MiniLM. Used by
`python -m bench.serve_fuzz` and tests/serve; the tests import from here (bench/ never imports tests/).
"""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch

from allmrec.config import load_config


def write_markov_seq_txt(folder: Path, n_users: int = 120, n_items: int = 60, seed: int = 0) -> Path:
    """user_sequence.txt + item texts: each item is mostly followed by one of two successors."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, n_items, size=(n_items, 2))
    lines = []
    for u in range(n_users):
        x = int(rng.integers(n_items))
        seq = [x]
        while len(seq) < int(rng.integers(6, 12)):
            x = int(succ[x, rng.integers(2)]) if rng.random() < 0.85 else int(rng.integers(n_items))
            if x not in seq:
                seq.append(x)
        lines.append(f"u{u:04d} " + " ".join(f"i{i:03d}" for i in seq))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "user_sequence.txt").write_text("\n".join(lines) + "\n")
    words = ["red", "blue", "lamp", "glove", "bottle", "rope", "tent", "ball", "shoe", "cap"]
    (folder / "item_generative_indexing_phase_0.txt").write_text(
        "".join(f"i{i:03d} {words[i % 10]} {words[(i // 10) % 10]} model {i}\n" for i in range(n_items)))
    return folder


def save_tiny_llama(folder: Path, extra_corpus: list[str] | tuple = (), vocab_size: int = 200) -> Path:
    """A tiny random Llama + a BPE tokenizer trained on the prompt and item words (+ `extra_corpus`, e.g.
    item titles), saved like any HF model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = ["is a user representation. This user has bought in the past. Recommend an item for this user "
              "to buy next from the following set of item titles, The recommendation is not any items yet",
              "red blue lamp glove bottle rope tent ball shoe cap model 0123456789 ().,:'!?-", *extra_corpus]
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"]))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_llm(folder: Path, titles: list[str]) -> None:
    """The pipeline tests' 2-layer random Llama, its tokenizer also trained on these item titles."""
    save_tiny_llama(
        folder, ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ \"", *titles], vocab_size=300)


def build_run(root: Path, *overrides: str, n_users: int = 80, n_items: int = 40):
    """A complete (untrained) run folder; returns its Config. With a `stage2.llm=...` override (e.g. the
    packaged SmolLM2, for bench/serve_load.py's overload and replica-kill phases) that LLM is used, with an
    untrained projector of its width, instead of the tiny random Llama."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from allmrec.align.sbert import TextEncoder, load_sbert
    from allmrec.align.stage1 import Stage1Aligner, joint_embeddings, text_joint_embeddings
    from allmrec.artifacts import RunFolder
    from allmrec.cf import build_cf_model
    from allmrec.io import write_json_atomic
    from allmrec.recommender import build_projector
    from pipelines.prepare import prepare

    data = write_markov_seq_txt(root / "raw", n_users=n_users, n_items=n_items)
    cfg = load_config(None, [
        f"run_dir={root / 'run'}", f"data.path={data}", "data.format=seq_txt", "data.k_core=2", "data.n_negatives=7",
        "data.fewshot_k=[16]", "cf.hidden=16", "cf.max_len=12", "stage1.latent=16", "stage1.sbert_trainable_layers=0",
        f"stage2.llm={root / 'llm'}", "stage2.history_len=5", "serve.max_history=30", "serve.max_candidates=12",
        "score.pool_size=6", "serve.min_replicas=1", "serve.max_replicas=1", f"serve.port={_free_port()}",
        "torch_threads=1", *overrides])
    prepare(cfg)
    run = RunFolder(cfg)
    prep = run.prepared()
    torch.manual_seed(cfg.seed)
    cf = build_cf_model("sasrec", prep.n_items, prep.n_train_users, {"hidden": 16, "max_len": 12}).eval()
    cf.save(run.cf_dir("sasrec"))
    write_json_atomic(run.cf_dir("sasrec") / "manifest.json", {"job": "train-cf", "model": "sasrec", "fingerprint": "tiny"})

    # Stage-1: frozen MiniLM + an untrained aligner; q computed as stage1's JointEmbedder does
    te = TextEncoder(load_sbert(cfg.encode.model), trainable_layers=0)
    aligner = Stage1Aligner(16, te.dim, 16).eval()
    texts = [""] * (prep.n_items + 1)
    for i, t in zip(prep.items["item"], prep.items["text"]):
        texts[int(i)] = str(t)
    te.pretokenize(texts, cfg.encode.max_seq_length)
    with torch.no_grad():
        e = joint_embeddings(aligner, cf.item_embeddings()).numpy()
        q = text_joint_embeddings(aligner, torch.from_numpy(te.encode_all())).numpy()
    run.stage1.mkdir()
    save_file({f"aligner.{k}": v.contiguous() for k, v in aligner.state_dict().items()}, str(run.stage1_export_path))
    pq.write_table(pa.table({"item": np.arange(prep.n_items + 1, dtype=np.int64), "e": list(e), "q": list(q)}),
                   run.joint_emb_path)
    write_json_atomic(run.stage1 / "manifest.json", {"job": "stage1", "fingerprint": "tiny",
                                                     "cf_weights": run.cf_identity()})

    if cfg.stage2.llm == str(root / "llm"):
        _tiny_llm(root / "llm", [str(t) for t in prep.items["title"]])
        llm_dim = 32
    else:
        from transformers import AutoConfig

        from allmrec.llm.loading import resolve_llm_source
        source, kw = resolve_llm_source(cfg.stage2.llm)
        llm_dim = AutoConfig.from_pretrained(source, **kw).hidden_size
    torch.manual_seed(1)
    proj = build_projector("joint", True, 16, 16, llm_dim)
    run.stage2().mkdir()
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(run.projector_path()))
    write_json_atomic(run.stage2() / "manifest.json", {"job": "stage2", "fingerprint": "tiny",
                                                       "cf_weights": run.cf_identity()})
    return cfg
