"""torch <-> JAX parity of the models through `minibert_lab.convert`, and checkpoints in both directions."""
import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from flax import nnx

from minibert_lab.config import ModelConfig
from minibert_lab.convert import (jax_to_torch, load_pretrained, nnx_state_numpy, nnx_state_to_torch, save_pretrained,
                                  torch_state_to_nnx, torch_to_jax)
from minibert_lab.kernels import is_exact
from minibert_lab.jax import models as jm
from minibert_lab.torch import models as tm

FAMILIES = ("minibert", "bert", "modernbert", "neobert")
KINDS = ("standard", "rotary", "performer", "yat", "slay", "slay-nystrom", "cosformer")
PARITY_ATOL = 1e-5      # fp32 logits, torch vs JAX
B, L, VOCAB = 3, 7, 99

# every family with softmax, every sampled kind on MiniBERT, and one other kind per family
CASES = sorted({(f, "standard") for f in FAMILIES} | {("minibert", k) for k in KINDS}
               | {("bert", "performer"), ("modernbert", "yat"), ("neobert", "slay"), ("bert", "cosformer"),
                  ("neobert", "slay-nystrom")})

@pytest.fixture(autouse=True)
def op_by_op(monkeypatch):
    "Run JAX forwards op by op: the primitives' compilations are shared by every config of the grid below."
    monkeypatch.setattr(jm, "EAGER_JIT", False)

def tiny_cfg(family: str, kind: str, **kw) -> ModelConfig:
    over = dict(vocab_size=VOCAB, dim=32, heads=2, ffn_dim=64, max_len=16, depth=2, dropout=0.0, attention=kind)
    if family == "modernbert": over.update(local_window=2, global_every=2 if is_exact(kind) else 1)
    return ModelConfig.preset(f"{family}-tiny", **{**over, **kw})

def batch(seed=0, pad=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (B, L))
    mask = np.ones((B, L), np.int64)
    if pad: mask[1, 5:] = 0; mask[2, 3:] = 0; ids[mask == 0] = 0
    labels = np.where(rng.random((B, L)) < 0.4, ids, -100); labels[0, 0] = ids[0, 0]; labels[mask == 0] = -100
    return ids, mask, labels

def torch_model(cfg, seed=0):
    torch.manual_seed(seed)
    return tm.MiniBERTForMaskedLM(cfg).eval()

@pytest.mark.parametrize("family,kind", CASES)
def test_logits_parity_and_back(family, kind):
    cfg = tiny_cfg(family, kind)
    t = torch_model(cfg)
    j = torch_to_jax(t)
    ids, mask, labels = batch()
    with torch.no_grad():
        to = t(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True,
               output_attentions=True)
        tl = t(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels))
    jo = j(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    jl = j(ids, attention_mask=mask, labels=labels)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(jo.logits)[real], to.logits.numpy()[real], atol=PARITY_ATOL, rtol=0)
    for hj, ht in zip(jo.hidden_states, to.hidden_states):
        np.testing.assert_allclose(np.asarray(hj)[real], ht.numpy()[real], atol=PARITY_ATOL, rtol=0)
    for wj, wt in zip(jo.attentions, to.attentions):                         # [B, H, L, L], real query rows
        np.testing.assert_allclose(np.asarray(wj).transpose(0, 2, 1, 3)[real], wt.numpy().transpose(0, 2, 1, 3)[real],
                                   atol=PARITY_ATOL, rtol=0)
    np.testing.assert_allclose(float(jl.loss), float(tl.loss), atol=PARITY_ATOL)
    np.testing.assert_allclose(np.asarray(jl.logits), tl.logits.numpy(), atol=PARITY_ATOL, rtol=0)
    assert int(jl.num_predictions) == int(tl.num_predictions)
    # random-feature buffers carried under the same names; and back to torch exactly
    sd = t.state_dict()
    js = nnx_state_numpy(j)
    assert set(js) == set(sd)
    for k in dict(t.named_buffers()): np.testing.assert_array_equal(js[k], sd[k].numpy())
    t2 = jax_to_torch(j)
    assert not t2.training
    for k, v in t2.state_dict().items(): torch.testing.assert_close(v, sd[k], rtol=0, atol=0)

@pytest.mark.parametrize("family,kind", [("minibert", "standard"), ("bert", "performer"), ("modernbert", "rotary")])
def test_gradient_parity(family, kind):
    cfg = tiny_cfg(family, kind)
    t = torch_model(cfg, seed=1)
    j = torch_to_jax(t)
    ids, mask, labels = batch(seed=1)
    t(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), labels=torch.from_numpy(labels)).loss.backward()
    grads = nnx.jit(nnx.grad(lambda m, ids, mask, labels: m(ids, attention_mask=mask, labels=labels,
                                                            num_predictions=B * L).loss))(
        j, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels))
    nnx.update(j, grads)                             # the model now holds its gradients, read in torch names
    g = nnx_state_numpy(j)
    for name, p in t.named_parameters():        # torch leaves unused parameters (the pooler) without a grad
        want = np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.numpy()
        np.testing.assert_allclose(g[name], want, atol=2e-6, rtol=1e-3, err_msg=name)

def test_train_mode_and_encoder_only(tmp_path):
    cfg = tiny_cfg("bert", "standard")
    torch.manual_seed(0)
    t = tm.MiniBERT(cfg).train()
    j = torch_to_jax(t)
    assert isinstance(j, jm.MiniBERT) and not j.embeddings.dropout.deterministic
    t.eval(); j.eval()
    ids, mask, _ = batch()
    with torch.no_grad(): to = t(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    jo = j(ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(jo.pooler_output), to.pooler_output.numpy(), atol=PARITY_ATOL, rtol=0)
    p = save_pretrained(j, tmp_path / "enc")
    t2 = load_pretrained(p, framework="torch")
    assert isinstance(t2, tm.MiniBERT)
    with torch.no_grad():
        np.testing.assert_allclose(t2(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy(),
                                   to.last_hidden_state.numpy(), atol=PARITY_ATOL, rtol=0)

@pytest.mark.parametrize("family,kind", [("neobert", "slay"), ("bert", "standard")])
def test_checkpoint_round_trips(tmp_path, family, kind):
    cfg = tiny_cfg(family, kind, tie_embeddings=family != "bert")
    t = torch_model(cfg, seed=2)
    ids, mask, _ = batch(seed=2)
    with torch.no_grad(): ref = t(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask.astype(bool)
    # torch -> disk -> JAX -> disk -> torch
    j = load_pretrained(save_pretrained(t, tmp_path / "a"), framework="jax")
    np.testing.assert_allclose(np.asarray(j(ids, attention_mask=mask).logits)[real], ref[real], atol=PARITY_ATOL, rtol=0)
    t2 = load_pretrained(save_pretrained(j, tmp_path / "b"), framework="torch")
    for k, v in t2.state_dict().items(): torch.testing.assert_close(v, t.state_dict()[k], rtol=0, atol=0)
    # state-level functions agree with the model-level ones
    st = torch_state_to_nnx(t.state_dict(), cfg)
    back = nnx_state_to_torch(st, cfg)
    for k, v in back.items(): torch.testing.assert_close(v, t.state_dict()[k], rtol=0, atol=0)
    # a checkpoint's config is the model's
    assert j.cfg == cfg and t2.cfg == cfg

def test_packed_rows_match_separate_rows():
    cfg = tiny_cfg("minibert", "standard")
    j = torch_to_jax(torch_model(cfg))
    rng = np.random.default_rng(3)
    a, b = rng.integers(1, VOCAB, 4), rng.integers(1, VOCAB, 3)
    ids = np.zeros((B, L), np.int64)
    ids[0] = np.concatenate([a, b]); ids[1, :4] = a; ids[2, :3] = b    # row 0 packs the documents of rows 1, 2
    seg = np.array([[1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    out = np.asarray(j(ids, segment_ids=seg).logits)                          # positions restart per document
    np.testing.assert_allclose(out[0, :4], out[1, :4], atol=PARITY_ATOL, rtol=0)
    np.testing.assert_allclose(out[0, 4:], out[2, :3], atol=PARITY_ATOL, rtol=0)


def test_model_methods_save_and_load_across_frameworks(tmp_path):
    "`model.save_pretrained` / `Model.from_pretrained` in both frameworks share one format; convert's functions are aliases."
    import jax.numpy as jnp
    from minibert_lab.jax.models import MiniBERTForMaskedLM as JaxMLM
    from minibert_lab.torch.models import MiniBERTForMaskedLM as TorchMLM
    cfg = tiny_cfg("minibert", "performer")
    t = torch_model(cfg)
    ids = batch()[0]
    with torch.no_grad(): ref = t(torch.from_numpy(ids)).logits.numpy()
    j = JaxMLM.from_pretrained(t.save_pretrained(tmp_path / "t"))
    np.testing.assert_allclose(np.asarray(j(jnp.asarray(ids)).logits), ref, atol=1e-5)
    t2 = TorchMLM.from_pretrained(j.save_pretrained(tmp_path / "j"))
    with torch.no_grad(): np.testing.assert_allclose(t2(torch.from_numpy(ids)).logits.numpy(), ref, atol=1e-5)
    assert type(load_pretrained(tmp_path / "j", "jax")) is JaxMLM and not t2.training
