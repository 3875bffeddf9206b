"""Packed batches give the same encoder outputs per document as unpacked ones (no attention across segments,
positions restarting per document), for a softmax and a linear attention kind, in torch and in JAX."""
import numpy as np
import pytest

from minibert_lab.config import ModelConfig
from minibert_lab.data import CACHE_ENV, MLMCollator, encode_texts, load_corpus, load_tokenizer

KINDS = ("standard", "linear")  # one exact softmax kind, one linear-time feature-map kind
ROW_LEN = 24                     # packed row length (several short documents per row)
ATOL = 1e-4                      # float32 agreement between the packed and the unpacked forward


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    mp = pytest.MonkeyPatch(); mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("mbl_cache")))
    tok = load_tokenizer(vocab_size=300)
    mp.undo()
    texts = ["Who's there?", "Nay, answer me: stand, and unfold yourself.", "Long live the king!",
             "Bernardo?", "He.", "You come most carefully upon your hour.", "Not a mouse stirring."]
    docs = encode_texts(tok, texts)
    coll = MLMCollator(tok, pack=True, max_len=ROW_LEN, seed=0)
    packed = coll.collate_rows(coll.rows(docs))
    assert (packed["segment_ids"].max(1) >= 2).sum() >= 2      # rows really hold several documents
    ids, seg = packed["input_ids"], packed["segment_ids"]
    pieces = [(r, s, ids[r][seg[r] == s]) for r in range(len(ids)) for s in range(1, int(seg[r].max()) + 1)]
    L = max(len(p) for _, _, p in pieces)
    unpacked = np.full((len(pieces), L), tok.pad_token_id, np.int64); mask = np.zeros_like(unpacked)
    for i, (_, _, p) in enumerate(pieces): unpacked[i, :len(p)], mask[i, :len(p)] = p, 1
    return len(tok), tok.pad_token_id, packed, pieces, unpacked, mask


def _cfg(kind, vocab, pad):
    return ModelConfig(vocab_size=vocab, dim=32, depth=2, heads=2, ffn_dim=64, max_len=ROW_LEN, dropout=0.0,
                       attention=kind, pad_token_id=pad)


def _compare(h_packed, h_unpacked, packed, pieces, mask):
    for i, (r, s, _) in enumerate(pieces):
        a = h_packed[r][packed["segment_ids"][r] == s]
        b = h_unpacked[i][mask[i] > 0]
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-4, err_msg=f"row {r} segment {s}")


@pytest.mark.parametrize("kind", KINDS)
def test_packed_equals_unpacked_torch(batches, kind):
    torch = pytest.importorskip("torch")
    from minibert_lab.torch.models import MiniBERT
    vocab, pad, packed, pieces, unpacked, mask = batches
    torch.manual_seed(0)
    m = MiniBERT(_cfg(kind, vocab, pad)).eval()
    t = lambda a: torch.from_numpy(np.asarray(a))
    with torch.no_grad():
        hp = m(t(packed["input_ids"]), attention_mask=t(packed["attention_mask"]), segment_ids=t(packed["segment_ids"]),
               position_ids=t(packed["position_ids"])).last_hidden_state.numpy()
        hu = m(t(unpacked), attention_mask=t(mask)).last_hidden_state.numpy()
    _compare(hp, hu, packed, pieces, mask)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_equals_unpacked_jax(batches, kind):
    pytest.importorskip("jax")
    from flax import nnx
    import jax.numpy as jnp
    from minibert_lab.jax.models import MiniBERT
    vocab, pad, packed, pieces, unpacked, mask = batches
    m = MiniBERT(_cfg(kind, vocab, pad), rngs=nnx.Rngs(params=0, dropout=1))
    m.eval()
    j = lambda a: jnp.asarray(np.asarray(a, np.int32))
    hp = np.asarray(m(j(packed["input_ids"]), attention_mask=j(packed["attention_mask"]), segment_ids=j(packed["segment_ids"]),
                      position_ids=j(packed["position_ids"])).last_hidden_state)
    hu = np.asarray(m(j(unpacked), attention_mask=j(mask)).last_hidden_state)
    _compare(hp, hu, packed, pieces, mask)
