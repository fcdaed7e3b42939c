"""Tiny offline tokenizers and random LLMs (OPT and Llama architectures) for the LLM-side tests.

Two tokenizer styles, trained here on a few sentences:
- "opt":   byte-level BPE that prepends </s> as BOS (like facebook/opt-*), pad "<pad>";
- "llama": metaspace BPE that prepends <s> (like Llama), no pad token (eos is used for padding).
The OPT model's vocabulary is padded beyond the tokenizer (as OPT-6.7B's is), so its placeholder ids
fall inside the embedding matrix; the Llama model's is not, so they fall outside it.
"""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from allmrec.llm.loading import prepare_tokenizer

TITLES = ["The Matrix (1999)", "Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Pulp Fiction (1994)",
          "Fargo (1996)", "Alien (1979)", "Jaws (1975)", "Brazil (1985)", "Amelie (2001)"]
CORPUS = [
    "is a user representation. This user has watched bought in the past. Recommend a an movie item "
    "for this user to watch buy next from the following set of movie item titles, The recommendation "
    "is the next not any movies items yet kit kits assembled.",
    *TITLES, ", ".join(TITLES), "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 ().,:'\"!?-",
]


def _opt_tokenizer() -> PreTrainedTokenizerFast:
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", t.token_to_id("</s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    return prepare_tokenizer(tok)


def _llama_tokenizer() -> PreTrainedTokenizerFast:
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return prepare_tokenizer(tok)


def tiny_model(style: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    # init std 0.2 (not 0.02): a 32-wide random model is otherwise nearly uniform and input-blind
    torch.manual_seed(seed)
    if style == "opt":
        cfg = OPTConfig(vocab_size=vocab + 8, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                        pad_token_id=1, bos_token_id=2, eos_token_id=2, dropout=0.0, init_std=0.2)
        model = OPTForCausalLM(cfg)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=2, pad_token_id=None, initializer_range=0.2)
        model = LlamaForCausalLM(cfg)
    return model.float().requires_grad_(False).eval()


@pytest.fixture(scope="session")
def tokenizers_by_style() -> dict[str, tuple[PreTrainedTokenizerFast, int]]:
    """style -> (tokenizer, its size before any placeholder token is added)."""
    out = {}
    for style, make in (("opt", _opt_tokenizer), ("llama", _llama_tokenizer)):
        tok = make()
        out[style] = (tok, len(tok))
    return out


@pytest.fixture(scope="session")
def make_tiny():
    """Factory: make_tiny(style, vocab, seed=0) -> a fresh frozen tiny model."""
    return tiny_model


@pytest.fixture(params=["opt", "llama"])
def tiny(request, tokenizers_by_style):
    """(style, frozen tiny model, tokenizer) for both architectures."""
    tok, base_vocab = tokenizers_by_style[request.param]
    return request.param, tiny_model(request.param, base_vocab), tok


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and the test machine's 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads the real packaged LLM (converts it once per machine, ~35 s)")
