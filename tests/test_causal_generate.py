"Generation loops: JAX greedy/sampling as one jitted `lax.while_loop` equals the eager (streaming) path; beam search through the cache equals the full-recompute beam search, in torch and JAX."
import numpy as np
import pytest
import torch

from minibert_lab.generation import SamplingConfig, beam_search
from test_causal import jax_pair, prompts, torch_model


def full_forward_beams(forward, ids, am, cfg, R):
    "The reference: `generation.beam_search` recomputing the full causal forward of every beam (mask extended by 1s)."
    B, T = ids.shape
    def logits_fn(seq):  # the prompts [B, T], then the beams [B*N, T']
        mask0 = np.repeat(np.asarray(am), seq.shape[0] // B, axis=0)
        m = np.concatenate([mask0, np.ones((seq.shape[0], seq.shape[1] - T), mask0.dtype)], 1)
        return forward(seq, m)[:, -1]
    return beam_search(logits_fn, ids, cfg, num_return_sequences=R)[0]


@pytest.mark.parametrize("kind", ["standard", "performer"])
def test_torch_beam_search_through_cache_equals_full_recompute(kind):
    m = torch_model(kind)
    ids, am = prompts(6)
    cfg = SamplingConfig(num_beams=3, max_new_tokens=6, eos_token_ids=(7, 11), pad_token_id=0, length_penalty=0.7,
                         repetition_penalty=1.2)
    with torch.no_grad():
        got = m.generate(ids, am, cfg, num_return_sequences=2)
        want = full_forward_beams(lambda s, mk: m(s, torch.as_tensor(mk)).logits, ids, am, cfg, 2)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_jax_generate_is_one_jitted_loop_equal_to_eager():
    _, j = jax_pair("standard")
    ids, am = (a.numpy() for a in prompts(6))
    kw = dict(max_new_tokens=8, do_sample=True, top_k=20, temperature=1.5, seed=4, no_repeat_ngram_size=2,
              repetition_penalty=1.3, pad_token_id=0)
    eager = lambda **k: np.asarray(j.generate(ids, am, streamer=lambda col: None, **kw, **k))   # the Python loop (streaming path)
    eos = int(eager()[0, 6 + 1])                                                  # row 0 stops after 2 tokens
    got = np.asarray(j.generate(ids, am, eos_token_ids=(eos,), **kw))            # one compiled while_loop
    np.testing.assert_array_equal(got, eager(eos_token_ids=(eos,)))
    assert got.shape[1] <= 6 + 8 and got[0, 6 + 1] == eos and (got[0, 6 + 2:] == 0).all()   # a finished row emits the pad


@pytest.mark.slow
def test_jax_beam_search_through_cache_equals_full_recompute():
    import jax.numpy as jnp
    from minibert_lab.jax.causal import _forward_jit
    _, j = jax_pair("linear")
    ids, am = (a.numpy() for a in prompts(6))
    cfg = SamplingConfig(num_beams=3, max_new_tokens=5, eos_token_ids=(7,), pad_token_id=0, early_stopping=True)
    got = np.asarray(j.generate(ids, am, cfg, num_return_sequences=3))
    want = full_forward_beams(lambda s, mk: _forward_jit(j, jnp.asarray(s, jnp.int32), jnp.asarray(mk, jnp.int32)),
                              jnp.asarray(ids, jnp.int32), am, cfg, 3)
    np.testing.assert_array_equal(got, np.asarray(want))


def test_lab_sample_of_a_causal_run_only():
    from types import SimpleNamespace
    from minibert_lab.pretrain import LAB_SAMPLE_PROMPT, LAB_SAMPLE_TOKENS, lab_sample
    ids, am = prompts(12)
    data = SimpleNamespace(validation=[{"input_ids": ids.numpy(), "attention_mask": am.numpy()}],
                           tokenizer=SimpleNamespace(decode=lambda t: " ".join(map(str, t))))
    prompt, cont = lab_sample(SimpleNamespace(model=torch_model("standard")), data, "torch").split(" ‖ ")
    assert prompt.split() == [str(int(t)) for t in ids[0, :LAB_SAMPLE_PROMPT]] and len(cont.split()) == LAB_SAMPLE_TOKENS
    from minibert_lab.torch.models import MiniBERTForMaskedLM
    from minibert_lab.config import ModelConfig
    encoder = MiniBERTForMaskedLM(ModelConfig.preset("tiny", vocab_size=99, max_len=64))
    assert lab_sample(SimpleNamespace(model=encoder), data, "torch") is None


def test_bench_decode_costs_and_targets():
    from minibert_lab.bench.decode import FLOOR, QUICK_MODEL, TARGET_CONTEXT, decode_costs, decode_model, decode_targets
    from minibert_lab.bench.harness import SweepResult
    tiny = dict(QUICK_MODEL, dim=16, ffn_dim=16, depth=1)
    flat = decode_costs({k: decode_model(k, 64, tiny) for k in ("standard", "linear")}, (16, 32), steps=2)
    assert [(r["kind"], r["context"]) for r in flat] == [("standard", 16), ("standard", 32), ("linear", 16), ("linear", 32)]
    rows = {k: [r for r in flat if r["kind"] == k] for k in ("standard", "linear")}
    assert rows["standard"][1]["cache_mib"] == 2 * rows["standard"][0]["cache_mib"]      # the KV cache holds every token
    assert rows["linear"][1]["cache_mib"] == rows["linear"][0]["cache_mib"]              # the state does not grow
    res = SweepResult("decode", [dict(kind="standard", context=TARGET_CONTEXT, step_ms=4.0),
                                 dict(kind="slay", context=TARGET_CONTEXT, step_ms=1.0)],
                      dict(generate=dict(speedup=0.9)))
    assert decode_targets(res) == dict(slay_ratio=0.25, slay_met=True, speedup=0.9, speed_met=False)
    noisy = SweepResult("decode", [], dict(generate=dict(speedup=0.97, ratio_low=0.93, ratio_high=1.02)))
    assert decode_targets(noisy)["speed_met"]            # slower by the medians, but not beyond the run's noise
    noisy.meta["generate"]["ratio_high"] = 0.99
    assert not decode_targets(noisy)["speed_met"]        # slower beyond it
    res.rows.append(dict(kind=FLOOR, context=TARGET_CONTEXT, step_ms=0.5))  # the step with attention skipped
    assert decode_targets(res) == dict(slay_ratio=0.25, slay_met=True, speedup=0.9, speed_met=False,
                                       floor_ratio=0.125, attention_ratio=0.5 / 3.5)
    from minibert_lab import kernels
    original = kernels.decode_attention
    flat = decode_costs({"standard": decode_model("standard", 64, tiny)}, (16,), steps=2, floor=True)
    assert [(r["kind"], r["cache_mib"] == 0) for r in flat] == [("standard", False), (FLOOR, True)]
    assert kernels.decode_attention is original  # the stand-in is gone after the timing
