"Hugging Face interop: `minibert_lab.hf.from_hf` / `to_hf` against `transformers` BERT models (nothing downloaded from a hub)."
import json
from pathlib import Path

import pytest
import torch
import transformers

from minibert_lab.data import minilm_folder as data_minilm_folder
from minibert_lab.hf import HF_ENCODER_NAMES, config_from_hf, config_to_hf, from_hf, hf_name_map, to_hf
from minibert_lab.torch.models import MiniBERT, MiniBERTForMaskedLM

TINY_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=64)


def hf_bert(cls=transformers.BertForMaskedLM, seed=0, **kw):
    torch.manual_seed(seed)
    model = cls(transformers.BertConfig(**{**TINY_BERT, **kw})).eval()
    with torch.no_grad():                      # non-zero values where HF initialises zeros/ones, so the tests see them
        for n, p in model.named_parameters():
            if n.endswith("bias") or "LayerNorm" in n: p.normal_(0, 0.1).add_(1.0 if n.endswith("LayerNorm.weight") else 0.0)
    return model


def padded_batch(seed=0, B=3, L=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_BERT["vocab_size"], (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long); mask[1, 5:] = 0; mask[2, 2:] = 0
    return ids, mask, torch.randint(0, 2, (B, L), generator=g)


def assert_real_close(a, b, mask, tol=1e-5):
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=tol, rtol=tol)


def test_from_hf_masked_lm_parity(tmp_path):
    hf = hf_bert()
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert isinstance(ours, MiniBERTForMaskedLM) and not ours.training and ours.bert.pooler is None
    ids, mask, tt = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        got = ours(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        plain_ref, plain = hf(input_ids=ids).logits, ours(ids).logits      # no mask, default token types
    assert_real_close(got.logits, ref.logits, mask)
    torch.testing.assert_close(plain, plain_ref, atol=1e-5, rtol=1e-5)
    assert len(got.hidden_states) == len(ref.hidden_states)
    for a, b in zip(got.hidden_states, ref.hidden_states): assert_real_close(a, b, mask)


def test_from_hf_bert_model_encoder(tmp_path):
    hf = hf_bert(transformers.BertModel)
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert isinstance(ours, MiniBERT) and ours.pooler is not None
    ids, mask, tt = padded_batch(1)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        got = ours(ids, attention_mask=mask, token_type_ids=tt)
    assert_real_close(got.last_hidden_state, ref.last_hidden_state, mask)
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_to_hf_round_trip(tmp_path, tied):
    hf = hf_bert(tie_word_embeddings=tied, hidden_act="gelu_new")
    hf.save_pretrained(tmp_path / "in")
    ours = from_hf(tmp_path / "in")
    assert (ours.head.decoder is None) == tied and ours.cfg.activation == "gelu_tanh"
    to_hf(ours, tmp_path / "out")
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out", trust_remote_code=False).eval()
    ids, mask, tt = padded_batch(2)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        assert_real_close(back(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits, ref, mask)
        assert_real_close(ours(ids, attention_mask=mask, token_type_ids=tt).logits, ref, mask)
    again = from_hf(tmp_path / "out")                                      # and ours -> HF -> ours is exact
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()): torch.testing.assert_close(a, b, msg=n)


def test_to_hf_encoder_round_trip(tmp_path):
    hf = hf_bert(transformers.BertModel, seed=3)
    hf.save_pretrained(tmp_path / "in")
    to_hf(from_hf(tmp_path / "in"), tmp_path / "out")
    back = transformers.AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=False).eval()
    ids, mask, tt = padded_batch(3)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        got = back(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    assert_real_close(got.last_hidden_state, ref.last_hidden_state, mask)
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_name_table_covers_every_parameter():
    from minibert_lab.config import ModelConfig
    for cfg in (ModelConfig.preset("bert-tiny", vocab_size=99), ModelConfig.preset("bert-tiny", vocab_size=99, tie_embeddings=False)):
        for model in (MiniBERT(cfg), MiniBERTForMaskedLM(cfg)):
            names = hf_name_map(model)
            assert set(names) == set(dict(model.named_parameters()))
            assert len(set(names.values())) == len(names)
    assert len(HF_ENCODER_NAMES) == len({h for h, _ in HF_ENCODER_NAMES}) == len({o for _, o in HF_ENCODER_NAMES})


def test_config_round_trip_and_errors(tmp_path):
    hf_cfg = transformers.BertConfig(**TINY_BERT).to_dict()
    cfg = config_from_hf(hf_cfg)
    assert (cfg.family, cfg.dim, cfg.depth, cfg.heads, cfg.ffn_dim, cfg.max_len, cfg.norm_eps) == ("bert", 32, 2, 4, 37, 64, 1e-12)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    with pytest.raises(ValueError, match="model_type"): config_from_hf({**hf_cfg, "model_type": "roberta"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        config_from_hf({**hf_cfg, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="hidden_act"): config_from_hf({**hf_cfg, "hidden_act": "swish"})
    with pytest.raises(ValueError, match="BERT-shaped"): config_to_hf(cfg.replace(prenorm=True))
    with pytest.raises(ValueError, match="framework"): from_hf(tmp_path, framework="tf")
    with pytest.raises(ValueError, match="config.json"): from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config.json.*lacks \['vocab_size'"): from_hf(tmp_path)   # before the weights
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ValueError, match="safetensors"): from_hf(tmp_path)


def test_from_hf_jax(tmp_path):
    convert = pytest.importorskip("minibert_lab.convert")
    if not hasattr(convert, "torch_to_jax"): pytest.skip("minibert_lab.convert.torch_to_jax is not there yet")
    import numpy as np
    hf = hf_bert()
    hf.save_pretrained(tmp_path)
    jm = from_hf(tmp_path, framework="jax")
    ids, mask, tt = padded_batch()
    with torch.no_grad(): ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits.numpy()
    import jax.numpy as jnp
    got = np.asarray(jm(jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(mask.numpy()),
                        token_type_ids=jnp.asarray(tt.numpy())).logits)
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=1e-4)
    to_hf(jm, tmp_path / "out")                                             # JAX model -> HF folder (via jax_to_torch)
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out", trust_remote_code=False).eval()
    with torch.no_grad(): again = back(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits.numpy()
    np.testing.assert_allclose(again[real], ref[real], atol=1e-5, rtol=1e-5)


def minilm_folder() -> Path:
    "The all-MiniLM-L6-v2 folder (`minibert_lab.data.minilm_folder`); the test is skipped when the package index cannot be reached."
    try: return data_minilm_folder()
    except FileNotFoundError as e: pytest.skip(str(e))


@pytest.mark.slow
def test_all_minilm_l6_v2_hidden_states():
    folder = minilm_folder()
    ours = from_hf(folder)
    hf = transformers.BertModel.from_pretrained(folder, trust_remote_code=False).eval()
    assert isinstance(ours, MiniBERT) and ours.cfg.dim == hf.config.hidden_size
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    enc = tok(["The quick brown fox jumps over the lazy dog.", "Attention is all you need, mostly."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf(**enc, output_hidden_states=True)
        got = ours(enc["input_ids"], attention_mask=enc["attention_mask"], token_type_ids=enc["token_type_ids"],
                   output_hidden_states=True)
    for a, b in zip(got.hidden_states, ref.hidden_states): assert_real_close(a, b, enc["attention_mask"])
    assert_real_close(got.last_hidden_state, ref.last_hidden_state, enc["attention_mask"])
