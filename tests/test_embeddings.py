"Sentence embeddings against sentence-transformers (encode, folders, losses, gradient cache), torch vs JAX, CLI errors."
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minibert_lab.config import ModelConfig
from minibert_lab.data import load_tokenizer
from minibert_lab.embeddings import (SentenceEncoder, cached_backward, cos_sim, cosine_similarity_loss, embed_tokens, encode,
                                     jax_cached_value_and_grad, load_sentence_encoder, no_duplicate_batches, pad_token_lists,
                                     ranking_loss, retrieval_ranks)
from minibert_lab.hf import hf_name_map
from minibert_lab.torch.models import MiniBERT

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # sentence-transformers reads local folders only
st = pytest.importorskip("sentence_transformers")
from sentence_transformers.sentence_transformer import losses as st_losses

TEXTS = ["to be or not to be", "a horse", "my kingdom for a horse, a horse, my kingdom", "exit, pursued by a bear",
         "the rest is silence", "what light through yonder window breaks"]


def tiny_bert(tok, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("bert-tiny", dim=36, heads=3, depth=2, ffn_dim=52, max_len=40, vocab_size=len(tok),
                             pad_token_id=tok.pad_token_id, dropout=dropout, pooler=False)
    return MiniBERT(cfg).eval()


@pytest.fixture(scope="module")
def tok(): return load_tokenizer()


@pytest.fixture(scope="module")
def st_folder(tok, tmp_path_factory):
    "A tiny random BERT saved as a sentence-transformers folder (mean pooling, normalised)."
    path = tmp_path_factory.mktemp("st") / "tiny"
    SentenceEncoder(tiny_bert(tok), tok, "mean", True, 24).save(path)
    return path


@pytest.mark.parametrize("pooling", ["mean", pytest.param("cls", marks=pytest.mark.slow), pytest.param("max", marks=pytest.mark.slow)])
def test_st_loads_our_folder_and_encodes_the_same(tok, tmp_path, pooling):
    enc = SentenceEncoder(tiny_bert(tok, seed=1), tok, pooling, pooling != "max", 24)
    enc.save(tmp_path / "m")
    ref = st.SentenceTransformer(str(tmp_path / "m"), device="cpu").encode(TEXTS, batch_size=4, convert_to_numpy=True)
    got = enc.encode(TEXTS, batch_size=4)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    back = load_sentence_encoder(tmp_path / "m")                    # our reader of the folder: same pooling, normalisation, length
    assert (back.pooling, back.normalize, back.max_length) == (pooling, pooling != "max", 24)
    np.testing.assert_allclose(back.encode(TEXTS), got, atol=1e-6)


@pytest.mark.slow
def test_encode_order_batching_and_jax(tok, st_folder):
    enc = load_sentence_encoder(st_folder)
    one_by_one = np.concatenate([enc.encode([t]) for t in TEXTS])
    np.testing.assert_allclose(enc.encode(TEXTS, batch_size=3), one_by_one, atol=1e-5)   # length batching restores the order
    jenc = load_sentence_encoder(st_folder, framework="jax")
    np.testing.assert_allclose(jenc.encode(TEXTS, batch_size=4), one_by_one, atol=1e-5)  # JAX: same embeddings
    np.testing.assert_allclose(np.linalg.norm(one_by_one, axis=1), 1, atol=1e-6)


def test_encode_errors(tok, st_folder):
    enc = load_sentence_encoder(st_folder)
    for bad, match in [([], "texts is empty"), (["a", ""], r"texts\[1\] is ''"), ("abc", "single string"), ([3], r"texts\[0\] is 3")]:
        with pytest.raises(ValueError, match=match): enc.encode(bad)
    with pytest.raises(ValueError, match="pooling='sum'"): encode(enc.model, tok, ["a"], pooling="sum")
    with pytest.raises(ValueError, match="max_length=99 exceeds"): encode(enc.model, tok, ["a"], max_length=99)


def _emb(seed, B=5, D=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=dtype)


@pytest.mark.parametrize("symmetric,hard", [(False, 0), (False, 2), (True, 0)])   # the symmetric loss takes pairs only
def test_ranking_loss_matches_st(st_folder, symmetric, hard):
    model = st.SentenceTransformer(str(st_folder), device="cpu")
    L = st_losses.MultipleNegativesSymmetricRankingLoss if symmetric else st_losses.MultipleNegativesRankingLoss
    ours_in = [_emb(i).requires_grad_(True) for i in range(2 + hard)]
    theirs_in = [e.detach().clone().requires_grad_(True) for e in ours_in]
    for scale in (20.0, 7.5):
        ref = L(model, scale=scale).compute_loss_from_embeddings(theirs_in, None)
        got = ranking_loss(ours_in[0], ours_in[1], ours_in[2:], scale=scale, symmetric=symmetric)
        assert abs(float(got.detach()) - float(ref.detach())) < 1e-6
        ref.backward(); got.backward()
        for a, b in zip(ours_in, theirs_in): torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)
        for e in ours_in + theirs_in: e.grad = None


def test_cosine_loss_matches_st(st_folder):
    model = st.SentenceTransformer(str(st_folder), device="cpu")
    u, v, y = _emb(0), _emb(1), torch.rand(5, dtype=torch.float64)
    ref = st_losses.CosineSimilarityLoss(model).compute_loss_from_embeddings([u, v], y)
    assert abs(float(cosine_similarity_loss(u, v, y)) - float(ref)) < 1e-6


@pytest.mark.slow
def test_losses_jax_equal_torch():
    import jax.numpy as jnp
    a, p, n = _emb(0, dtype=torch.float32), _emb(1, dtype=torch.float32), _emb(2, dtype=torch.float32)
    for sym in (False, True):
        t = ranking_loss(a, p, None if sym else [n], scale=13.0, symmetric=sym)
        j = ranking_loss(jnp.asarray(a.numpy()), jnp.asarray(p.numpy()), None if sym else [jnp.asarray(n.numpy())], scale=13.0, symmetric=sym)
        assert abs(float(t) - float(j)) < 1e-5
    y = torch.rand(5)
    assert abs(float(cosine_similarity_loss(a, p, y)) - float(cosine_similarity_loss(jnp.asarray(a.numpy()), jnp.asarray(p.numpy()), jnp.asarray(y.numpy())))) < 1e-6


def test_loss_errors():
    with pytest.raises(ValueError, match="batch size 1 has no in-batch negatives"): ranking_loss(_emb(0, B=1), _emb(1, B=1))
    with pytest.raises(ValueError, match=r"anchors have shape \(5, 7\) and positives \(4, 7\)"): ranking_loss(_emb(0), _emb(1, B=4))
    with pytest.raises(ValueError, match="labels have shape"): cosine_similarity_loss(_emb(0), _emb(1), torch.zeros(3))
    ranking_loss(_emb(0, B=1), _emb(1, B=1), [_emb(2, B=1)])       # one anchor with a hard negative is fine


def _batch(tok, n=6):
    return pad_token_lists([tok(t)["input_ids"] for t in (TEXTS * 2)[:n]], tok.pad_token_id)


@pytest.mark.slow
@pytest.mark.parametrize("learn_scale", [False, True])
def test_gradient_cache_equals_uncached(tok, learn_scale):
    b = _batch(tok, 6)
    grads = []
    for mbs in (None, 2, 4):
        model = tiny_bert(tok, seed=3).train()                     # dropout 0: train mode is deterministic
        log_s = torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float32), requires_grad=learn_scale)
        loss_fn = lambda e: ranking_loss(e[:3], e[3:], scale=log_s.exp(), symmetric=True)
        embed = lambda r: embed_tokens(model, b["input_ids"][r], b["attention_mask"][r], "mean", True)
        if mbs is None: loss = loss_fn(embed(np.arange(6))); loss.backward()
        else: loss = cached_backward(embed, 6, loss_fn, mbs)
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                      None if log_s.grad is None else float(log_s.grad)))
    for l, g, s in grads[1:]:
        assert abs(l - grads[0][0]) < 1e-6 and s == pytest.approx(grads[0][2], abs=1e-6)
        for n in g: torch.testing.assert_close(g[n], grads[0][1][n], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_gradient_cache_matches_st_cached_loss(tok, st_folder):
    "Our cached gradients on our model equal sentence-transformers' CachedMultipleNegativesRankingLoss gradients on its copy."
    model = st.SentenceTransformer(str(st_folder), device="cpu")
    ours = load_sentence_encoder(st_folder).model.train()
    a, p = TEXTS[:3], TEXTS[3:]
    feats = [model.tokenize(x) for x in (a, p)]
    loss = st_losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=2)
    model.train(); ref = loss(feats, None); ref.backward()
    b = pad_token_lists([tok(t)["input_ids"] for t in a + p], tok.pad_token_id)
    got = cached_backward(lambda r: embed_tokens(ours, b["input_ids"][r], b["attention_mask"][r], "mean", True), 6,
                          lambda e: ranking_loss(e[:3], e[3:], scale=20.0), 2)
    assert abs(float(got) - float(ref)) < 1e-6
    hf = dict(model[0].auto_model.named_parameters())
    for o, h in hf_name_map(ours).items():
        if hf[h].grad is None: continue
        torch.testing.assert_close(dict(ours.named_parameters())[o].grad, hf[h].grad, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_jax_gradient_cache_equals_uncached():
    import jax, jax.numpy as jnp
    X = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)))
    params = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((5, 4))), "b": jnp.ones(4)}
    embed = lambda prm, r: jnp.tanh(X[r] @ prm["w"] + prm["b"])
    loss_fn = lambda e: ranking_loss(e[:3], e[3:], scale=9.0, symmetric=True)
    ref_l, ref_g = jax.value_and_grad(lambda prm: loss_fn(embed(prm, np.arange(6))))(params)
    l, g = jax_cached_value_and_grad(embed, params, 6, loss_fn, 2)
    assert abs(float(l) - float(ref_l)) < 1e-6
    for k in params: np.testing.assert_allclose(np.asarray(g[k]), np.asarray(ref_g[k]), atol=1e-6)


def test_no_duplicate_batches():
    pairs = [("yes.", "no."), ("what?", "yes."), ("hi", "hello"), ("a", "b"), ("what?", "c"), ("d", "e"), ("f", "g"), ("h", "h")]
    batches = no_duplicate_batches(pairs, 3, seed=1, drop_last=False)
    used = [i for b in batches for i in b]
    assert len(used) == len(set(used)) and 7 not in used           # every row at most once; a row repeating a text never fits
    for b in batches:
        texts = [t for i in b for t in pairs[i]]
        assert len(texts) == len(set(texts))
    assert no_duplicate_batches(pairs, 3, seed=1) == [b for b in batches if len(b) == 3]
    with pytest.raises(ValueError, match="batch_size=1"): no_duplicate_batches(pairs, 1)


def test_retrieval_ranks():
    q = np.eye(4)[[0, 1, 2, 3]] + 0.1
    c = np.eye(4)[[0, 2, 1, 3]]
    np.testing.assert_array_equal(retrieval_ranks(q, c), [1, 4, 4, 1])   # ties count against the query: 4 equal scores
    assert np.allclose(cos_sim(q, q).diagonal(), 1)


def cli(*args):
    from minibert_lab.cli import main
    return main(list(args))


def test_cli_embed_and_errors(st_folder, capsys, tmp_path):
    assert cli("embed", str(st_folder), "--text", "a horse", "--text", "a bear") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dim"] == 36 and out["normalize"] and len(out["embeddings"]) == 2 and abs(out["cosine"][0][0] - 1) < 1e-5
    assert cli("embed", str(st_folder), "--text", "  ") == 2 and "blank" in capsys.readouterr().err
    (tmp_path / "p.tsv").write_text("a\tb\nc\n")
    assert cli("embed-train", str(st_folder), "--out", str(tmp_path / "r"), "--pairs", str(tmp_path / "p.tsv")) == 2
    assert "line 2 has 1" in capsys.readouterr().err
    (tmp_path / "q.tsv").write_text("a\tb\nc\td\n")
    assert cli("embed-train", str(st_folder), "--out", str(tmp_path / "r"), "--pairs", str(tmp_path / "q.tsv"), "--batch-size", "1") == 2
    assert "batch_size=1 leaves no in-batch negatives" in capsys.readouterr().err


@pytest.mark.slow
def test_embed_train_fit_resume(tok, st_folder, tmp_path, capsys):
    "A few contrastive steps through train.fit: the loss falls, the run resumes, the result is a sentence-transformers folder."
    from minibert_lab.embeddings import embed_train, pair_texts
    pairs = pair_texts([f"question {i} about {w}" for i, w in enumerate("horse bear crown dagger ghost witch".split())],
                       [f"{w} answer {i}" for i, w in enumerate("horse bear crown dagger ghost witch".split())])
    with pytest.raises(ValueError, match="anchors has 2 texts and positives 1"): pair_texts(["a", "b"], ["c"])
    res, enc = embed_train(st_folder, tmp_path / "run", pairs, steps=6, batch_size=3, lr=3e-3, warmup_steps=0, max_length=16,
                           eval_every=3, save_every=3, progress=False, mini_batch_size=2, learn_scale=True)
    assert res.step == 6 and (tmp_path / "run" / "model" / "modules.json").is_file()
    val = [r["val_loss"] for r in res.history if "val_loss" in r]      # steps 3 and 6
    assert len(val) == 2 and val[1] < val[0]
    ref = st.SentenceTransformer(str(tmp_path / "run" / "model"), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(enc.encode(TEXTS), ref, atol=1e-5)
    res2, _ = embed_train(st_folder, tmp_path / "run", pairs, steps=8, batch_size=3, lr=3e-3, warmup_steps=0, max_length=16,
                          eval_every=3, save_every=3, progress=False, mini_batch_size=2, learn_scale=True, resume=True)
    assert res2.step == 8 and res2.history[0]["step"] > 6


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_all_minilm_l6_v2_encode_matches_st(framework):
    "The real all-MiniLM-L6-v2 folder: our encode (torch and JAX) equals sentence-transformers' encode within 1e-5."
    from test_hf import minilm_folder
    from minibert_lab.pairs import lee_pairs, reply_retrieval_set
    folder = minilm_folder()
    texts = [s for s, _ in reply_retrieval_set(40)] + lee_pairs()[0][:4]      # short lines and long (truncated) documents
    ref = st.SentenceTransformer(str(folder), device="cpu").encode(texts, batch_size=16, convert_to_numpy=True)
    enc = load_sentence_encoder(folder, framework)
    assert (enc.pooling, enc.normalize, enc.max_length) == ("mean", True, 256)
    np.testing.assert_allclose(enc.encode(texts, batch_size=16), ref, atol=1e-5, rtol=0)


def test_embed_train_lab_shaped_encoder_round_trip(tok, tmp_path):
    "A lab encoder no sentence-transformers architecture holds (RMSNorm, RoPE): embed-train saves it in the lab's format, and both frameworks load it back."
    from minibert_lab.embeddings import SENTENCE_CONFIG_FILE, embed_train, pair_texts
    from minibert_lab.hf import is_bert_shaped
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", dim=32, heads=2, depth=1, ffn_dim=48, max_len=40, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    assert not is_bert_shaped(cfg) and is_bert_shaped(tiny_bert(tok).cfg)
    start = tmp_path / "lab"
    MiniBERT(cfg).save_pretrained(start); tok.save_pretrained(str(start))
    words = "horse bear crown dagger ghost witch".split()
    pairs = pair_texts([f"question {i} about {w}" for i, w in enumerate(words)], [f"{w} answer {i}" for i, w in enumerate(words)])
    res, enc = embed_train(start, tmp_path / "run", pairs, steps=2, batch_size=3, lr=1e-3, warmup_steps=0, max_length=16,
                           eval_every=2, save_every=2, progress=False, pooling="mean", normalize=True)
    model_dir = tmp_path / "run" / "model"
    assert res.step == 2 and (model_dir / SENTENCE_CONFIG_FILE).is_file() and not (model_dir / "modules.json").exists()
    for framework in ("torch", "jax"):
        back = load_sentence_encoder(tmp_path / "run", framework)
        assert (back.pooling, back.normalize, back.max_length) == (enc.pooling, enc.normalize, enc.max_length)
        np.testing.assert_allclose(back.encode(TEXTS), enc.encode(TEXTS), atol=1e-5, rtol=0)
