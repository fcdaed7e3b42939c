"""A tiny prepared dataset (synthetic, Markov-structured so models can learn it) shared by pipeline tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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


# train-cf settings shared by tests/pipelines/test_train_cf.py and test_train_cf_agnostic.py (collected after
# it): the same run folder ("run") and fingerprints, so the second finds these CF models trained, side by side
CF_SASREC = ("cf.epochs=3", "cf.num_workers=2", "cf.patience=50", "cf.lr=0.01", "cf.checkpoint_every=1")
CF_GRU4REC = ("cf.epochs=3", "cf.num_workers=1", "cf.patience=50", "cf.max_failures=1", "cf.model=gru4rec",
              "cf.checkpoint_every=1")  # the resume test needs epoch 1's checkpoint


@pytest.fixture(scope="session")
def tiny_cfg_factory(ray_session, tmp_path_factory):
    """Returns make(*overrides) -> Config whose run folder already holds prepared data."""
    from pipelines.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    data = write_markov_seq_txt(root / "raw")
    base = [f"data.path={data}", "data.format=seq_txt", "data.k_core=2", "data.fewshot_k=[16]",
            "cf.hidden=16", "cf.max_len=12", "cf.batch_size=32"]
    prepared = {}

    def make(*overrides: str, run: str = "run"):
        cfg = load_config(None, [*base, f"run_dir={root / run}", *overrides])
        if run not in prepared:
            prepare(cfg)
            prepared[run] = True
        return cfg

    return make


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


@pytest.fixture(scope="session")
def trained_tiny(tiny_cfg_factory, tmp_path_factory):
    """A tiny run with CF, Stage-1 (frozen SBERT: fast) and Stage-2 (tiny Llama, 2 workers ZeRO-3) done.
    Stage-1's rank 0 fails at epoch 2 and its job resumes from the epoch-1 checkpoint (fault tolerance
    tested here: a separate job would cost another worker-group start-up)."""
    from pipelines.stage1 import stage1
    from pipelines.stage2 import stage2
    from pipelines.train_cf import train_cf

    llm = save_tiny_llama(tmp_path_factory.mktemp("llm"))
    cfg = tiny_cfg_factory("cf.epochs=2", "stage1.epochs=2", "stage1.sbert_trainable_layers=0",
                           "stage1.batch_size=16", f"stage2.llm={llm}", "stage2.epochs=1", "stage2.num_workers=2",
                           "stage2.max_users=24", "stage2.batch_size=4", "encode.max_seq_length=32", "cf.max_failures=1",
                           run="trained")
    train_cf(cfg)
    stage1(cfg, fail_at_epoch=2)
    s2 = stage2(cfg, ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    return cfg, s2
