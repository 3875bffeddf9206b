"Generation oracles: `minibert_lab.generation` processors, greedy and beam search against `transformers` (torch and JAX)."
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers import (MinPLogitsWarper, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from minibert_lab.generation import (LogitsProcessors, MinP, NoRepeatNGram, RepetitionPenalty, SamplingConfig, Temperature,
                                     TopK, TopP, beam_init, beam_result, beam_search, beam_step, finish_step, generate_tokens, greedy, log_softmax,
                                     make_rng, sample, select_tokens)

B, T, V = 3, 11, 99
TINY_LLAMA = dict(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)


def random_inputs(seed=0):
    "ids [B, T] with repeats, scores [B, V] float32 with ties and -inf entries."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 12, (B, T), generator=g)             # a small id range: repeated tokens and n-grams
    ids[1, 6:9] = ids[1, 1:4]                                   # a repeated trigram
    scores = torch.randn(B, V, generator=g) * 3
    scores[:, 20:30] = scores[:, 40:50]                         # ties
    scores[0, 60:62] = scores[0, 0]                             # a three-way tie
    scores[:, [5, 77]] = -math.inf
    scores[2, 3] = -math.inf
    return ids, scores


CASES = [
    (Temperature(0.7), TemperatureLogitsWarper(0.7)),
    (Temperature(1.9), TemperatureLogitsWarper(1.9)),
    (TopK(1), TopKLogitsWarper(1)),
    (TopK(7), TopKLogitsWarper(7)),
    (TopK(45), TopKLogitsWarper(45)),                        # the k-th value sits in a tie
    (TopK(3, min_tokens_to_keep=5), TopKLogitsWarper(3, min_tokens_to_keep=5)),
    (TopP(0.1), TopPLogitsWarper(0.1)),
    (TopP(0.5), TopPLogitsWarper(0.5)),
    (TopP(0.9), TopPLogitsWarper(0.9)),
    (TopP(0.3, min_tokens_to_keep=4), TopPLogitsWarper(0.3, min_tokens_to_keep=4)),
    (TopP(1.0), TopPLogitsWarper(1.0)),
    (MinP(0.05), MinPLogitsWarper(0.05)),
    (MinP(0.3), MinPLogitsWarper(0.3)),
    (MinP(0.0), MinPLogitsWarper(0.0)),
    (RepetitionPenalty(1.3), RepetitionPenaltyLogitsProcessor(1.3)),
    (RepetitionPenalty(0.6), RepetitionPenaltyLogitsProcessor(0.6)),
    (NoRepeatNGram(1), NoRepeatNGramLogitsProcessor(1)),
    (NoRepeatNGram(2), NoRepeatNGramLogitsProcessor(2)),
    (NoRepeatNGram(3), NoRepeatNGramLogitsProcessor(3)),
    (NoRepeatNGram(12), NoRepeatNGramLogitsProcessor(12)),   # longer than T: nothing banned
]


def assert_same(ours, theirs):
    ours, theirs = np.asarray(ours, dtype=np.float64), theirs.double().numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))   # the masked set, exactly
    keep = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[keep], theirs[keep], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ours,theirs", CASES, ids=[repr(o) for o, _ in CASES])
def test_processor_matches_transformers(ours, theirs):
    jitted = jax.jit(lambda i, s: ours(i, s))                                # one compilation, both seeds
    for seed in (0, 1):
        ids, scores = random_inputs(seed)
        expected = theirs(ids.clone(), scores.clone())
        assert_same(ours(ids, scores), expected)                              # torch
        assert_same(jitted(jnp.asarray(ids.numpy()), jnp.asarray(scores.numpy())), expected)   # JAX under jit


def test_composition_matches_transformers_order():
    ids, scores = random_inputs(3)
    cfg = SamplingConfig(do_sample=True, temperature=0.8, top_k=30, top_p=0.85, min_p=0.02, repetition_penalty=1.2,
                         no_repeat_ngram_size=2)
    hf = transformers.LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), NoRepeatNGramLogitsProcessor(2),
                                           TemperatureLogitsWarper(0.8), TopKLogitsWarper(30), TopPLogitsWarper(0.85),
                                           MinPLogitsWarper(0.02)])
    procs = LogitsProcessors.from_config(cfg)
    expected = hf(ids.clone(), scores.clone())
    assert_same(procs(ids, scores), expected)
    assert_same(jax.jit(procs)(jnp.asarray(ids.numpy()), jnp.asarray(scores.numpy())), expected)


def test_greedy_ties_and_frameworks():
    s = np.array([[1.0, 3.0, 3.0, -np.inf], [-np.inf, 0.5, 0.5, 0.5]], dtype=np.float32)
    assert greedy(torch.from_numpy(s)).tolist() == [1, 1]
    assert np.asarray(jax.jit(greedy)(jnp.asarray(s))).tolist() == [1, 1]


def test_sampling_is_seeded_and_respects_masks():
    _, scores = random_inputs(0)
    procs = LogitsProcessors((TopK(5),))
    warped = procs(None, scores)
    draw = lambda seed: torch.stack([sample(warped, g) for g in [make_rng(warped, seed)] for _ in range(20)], 1)
    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(warped.gather(1, a)).all()                        # never a masked token
    jw = jnp.asarray(warped.numpy())
    js = jax.jit(sample)
    ja, jb, jc = js(jw, make_rng(jw, 1)), js(jw, make_rng(jw, 1)), js(jw, jax.random.key(5))
    assert np.array_equal(ja, jb)
    assert np.isfinite(np.take_along_axis(np.asarray(jw), np.asarray(ja)[:, None], 1)).all()
    cfg = SamplingConfig(do_sample=True, top_k=5, seed=3)
    assert select_tokens(None, scores, cfg, key=make_rng(scores, 3)).tolist() == select_tokens(None, scores, cfg, key=make_rng(scores, 3)).tolist()
    with pytest.raises(ValueError, match="like=.*torch tensor or a JAX array"): make_rng(np.zeros(3))


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    with torch.no_grad():                     # larger weights than the 0.02 init: well-separated logits, varied tokens
        for n, p in model.named_parameters():
            if "norm" not in n: p.normal_(0, 0.5)
    return model


def llama_logits(model):
    @torch.no_grad()
    def fn(ids):
        return model(input_ids=ids).logits[:, -1, :].float()
    return fn


def prompts(seed, b=2, t=5):
    return torch.randint(3, TINY_LLAMA["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed,eos,extra", [(0, 44, {}), (1, 16, dict(repetition_penalty=1.5, no_repeat_ngram_size=2))])
def test_greedy_matches_transformers_generate(tiny_llama, seed, eos, extra):
    "Rows stop at different steps (eos 44 / 16 are frequent tokens of this model) and then emit the pad token."
    ids = prompts(seed)
    expected = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                   eos_token_id=eos, pad_token_id=0, **extra)
    cfg = SamplingConfig(max_new_tokens=8, eos_token_ids=(eos,), pad_token_id=0, **extra)
    columns = []
    got = generate_tokens(llama_logits(tiny_llama), ids, cfg, streamer=columns.append)
    assert got.tolist() == expected.tolist()
    assert torch.stack(columns, 1).tolist() == got[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("length_penalty,early_stopping,seed,eos",
                         [(1.0, False, 0, 44), (0.0, False, 1, 2), (2.0, True, 2, (44, 35)), (-1.0, "never", 3, 55)])
def test_beam_search_matches_transformers_generate(tiny_llama, length_penalty, early_stopping, seed, eos):
    "Token-identical sequences and equal scores for the 3 returned beams; eos ids the model emits, so beams finish early."
    ids = prompts(seed)
    eos = (eos,) if isinstance(eos, int) else eos
    expected = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), num_beams=3, do_sample=False,
                                   length_penalty=length_penalty, early_stopping=early_stopping, max_new_tokens=6,
                                   eos_token_id=list(eos), pad_token_id=eos[0], num_return_sequences=3,
                                   output_scores=True, return_dict_in_generate=True)
    cfg = SamplingConfig(num_beams=3, max_new_tokens=6, eos_token_ids=eos, length_penalty=length_penalty,
                         early_stopping=early_stopping)
    got, scores = beam_search(llama_logits(tiny_llama), ids, cfg, num_return_sequences=3)
    assert got.tolist() == expected.sequences.tolist()
    torch.testing.assert_close(scores, expected.sequences_scores, rtol=1e-5, atol=1e-5)


def test_beam_search_runs_in_jax_under_jit(tiny_llama):
    "The same bookkeeping on JAX arrays, `beam_step` jitted (logits from the torch model, converted), gives the same sequences."
    ids = prompts(0)
    cfg = SamplingConfig(num_beams=3, max_new_tokens=6, eos_token_ids=(44,))
    fn = llama_logits(tiny_llama)
    want, want_scores = beam_search(fn, ids, cfg, num_return_sequences=2)
    step = jax.jit(beam_step, static_argnums=(3, 4))            # cur_len traced: one compilation
    (b, t), n = ids.shape, cfg.num_beams
    state = beam_init(jnp.asarray(ids.numpy()), cfg)
    for cur_len in range(t, t + cfg.max_new_tokens):
        flat = jnp.reshape(state.running_sequences[:, :, :cur_len], (b * n, cur_len))
        logits = jnp.asarray(fn(torch.from_numpy(np.array(flat))).numpy())
        state = step(state, log_softmax(jnp, logits), cur_len, t, cfg)
        if bool(state.done): break
    got, scores = beam_result(state, t, 2)
    assert np.asarray(got).tolist() == want.tolist()
    np.testing.assert_allclose(np.asarray(scores), want_scores.numpy(), rtol=1e-5)


def test_greedy_generation_runs_in_jax(tiny_llama):
    "`generate_tokens` on JAX arrays (stop handling included) equals the torch run; select + finish jit as one step."
    ids = prompts(1)
    cfg = SamplingConfig(max_new_tokens=8, eos_token_ids=(44,), pad_token_id=0, repetition_penalty=1.5)
    fn = llama_logits(tiny_llama)
    want = generate_tokens(fn, ids, cfg)
    jfn = lambda j: jnp.asarray(fn(torch.from_numpy(np.array(j))).numpy())
    got = generate_tokens(jfn, jnp.asarray(ids.numpy()), cfg)
    assert np.asarray(got).tolist() == want.tolist()
    assert (want[:, ids.shape[1]:] == 0).any()                              # a row did finish and then padded
    step = jax.jit(lambda i, logits, unf: finish_step(select_tokens(i, logits, cfg), unf, cfg))
    jids = jnp.asarray(ids.numpy())
    tokens, unfinished = step(jids, jfn(jids), jnp.ones((2,), dtype=bool))
    assert np.asarray(tokens).tolist() == want[:, ids.shape[1]].tolist()
