"Llama-style checkpoints in and out: a tiny random LlamaForCausalLM (odd sizes, GQA) gives the same logits, greedy and beam-search tokens (beam search through our cache) through from_hf, in torch and JAX."
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from minibert_lab.hf import from_hf, llama_config_from_hf, to_hf  # noqa: E402


def tiny_llama(tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=36, intermediate_size=44, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.2,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, :3] = 0; ids[1, :3] = 0  # left padding
    am[2, :1] = 0; ids[2, :1] = 0
    return ids, am


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    hf = tiny_llama()
    d = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(d)
    return hf, d


def test_config_and_errors():
    cfg = llama_config_from_hf(tiny_llama().config.to_dict())
    assert (cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.attention.rope_theta, cfg.bias) == (6, 2, 6, 500.0, False)
    d = tiny_llama().config.to_dict()
    with pytest.raises(ValueError, match="hidden_act='gelu'"): llama_config_from_hf({**d, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope type 'linear'"):
        llama_config_from_hf({**d, "rope_parameters": {"rope_type": "linear", "rope_theta": 1.0, "factor": 2.0}})


def test_logits_match_transformers(hf_pair, tmp_path):
    hf, d = hf_pair
    ours = from_hf(d)
    ids, am = prompts()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am).logits
        got = ours(ids, am).logits
    keep = am.bool()
    assert float((got - ref).abs()[keep].max()) < 1e-4 * max(1.0, float(ref.abs().max()))
    # to_hf: transformers loads our folder and gives the same logits
    back = transformers.AutoModelForCausalLM.from_pretrained(to_hf(ours, tmp_path / "out")).eval()
    with torch.no_grad(): np.testing.assert_allclose(back(input_ids=ids, attention_mask=am).logits[keep], ref[keep], atol=1e-5)


def test_greedy_and_beam_match_transformers(hf_pair):
    hf, d = hf_pair
    ours = from_hf(d)
    ids, am = prompts()
    kw = dict(max_new_tokens=7, pad_token_id=0, eos_token_id=2)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=am, do_sample=False, **kw)
        got = ours.generate(ids, am, max_new_tokens=7, eos_token_ids=(2,), pad_token_id=0)
        np.testing.assert_array_equal(got.numpy(), ref.numpy())
        bk = dict(num_beams=3, length_penalty=0.7, early_stopping=True)
        ref_b = hf.generate(input_ids=ids, attention_mask=am, do_sample=False, num_return_sequences=2, **bk, **kw)
        got_b = ours.generate(ids, am, max_new_tokens=7, eos_token_ids=(2,), pad_token_id=0, num_return_sequences=2, **bk)
        np.testing.assert_array_equal(got_b.numpy(), ref_b.numpy()[:, :got_b.shape[1]])


@pytest.mark.slow
def test_jax_from_hf_logits(hf_pair):
    import jax.numpy as jnp
    from minibert_lab.jax.causal import _forward_jit
    hf, d = hf_pair
    j = from_hf(d, framework="jax")
    ids, am = prompts()
    with torch.no_grad(): ref = hf(input_ids=ids, attention_mask=am).logits.numpy()
    got = np.asarray(_forward_jit(j, jnp.asarray(ids.numpy(), jnp.int32), jnp.asarray(am.numpy(), jnp.int32)))
    keep = am.numpy().astype(bool)
    assert np.abs(got - ref)[keep].max() < 1e-4 * max(1.0, np.abs(ref).max())
    gj = np.asarray(j.generate(ids.numpy(), am.numpy(), max_new_tokens=5, eos_token_ids=(2,), pad_token_id=0))
    with torch.no_grad():
        ref_g = hf.generate(input_ids=ids, attention_mask=am, do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=2)
    np.testing.assert_array_equal(gj, ref_g.numpy())
    bk = dict(num_beams=3, length_penalty=0.7, early_stopping=True, max_new_tokens=5, pad_token_id=0)
    bj = np.asarray(j.generate(ids.numpy(), am.numpy(), eos_token_ids=(2,), num_return_sequences=2, **bk))   # through the cache
    with torch.no_grad():
        ref_b = hf.generate(input_ids=ids, attention_mask=am, do_sample=False, num_return_sequences=2, eos_token_id=2, **bk)
    np.testing.assert_array_equal(bj, ref_b.numpy()[:, :bj.shape[1]])
