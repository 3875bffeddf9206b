"Integration tests of `minibert_lab.torch.models`: every family with a sample of attention kinds, masks, packing, heads."
import pytest
import torch
import torch.nn.functional as F

from minibert_lab.config import ModelConfig
from minibert_lab.kernels import ATTENTION_TYPES, is_exact
from minibert_lab.config import CE_CHUNK_ROWS, IGNORE_INDEX
from minibert_lab.torch.models import (MaskedLMOutput, MiniBERT, MiniBERTForMaskedLM,
                                       chunked_cross_entropy)

FAMILIES = ("minibert", "bert", "modernbert", "neobert")
B, L, V = 3, 7, 99


def tiny(family="minibert", kind="standard", **kw):
    "A tiny config of `family` with attention `kind` (ModernBERT local windows only for exact kinds)."
    over = dict(vocab_size=V, dim=32, heads=4, ffn_dim=48, depth=2, max_len=16, dropout=0.0,
                attention=dict(kind=kind))
    if family == "modernbert": over.update(global_every=2, local_window=2) if is_exact(kind) else over.update(global_every=1)
    over.update(kw)
    return ModelConfig.preset(f"{family}-tiny", **over)


def mlm_params(model):
    "Parameters the masked-LM loss depends on (the [CLS] pooler is not used by it)."
    return [p for n, p in model.named_parameters() if not n.startswith("bert.pooler.")]


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, L), generator=g)
    labels = torch.where(torch.rand(B, L, generator=g) < 0.4, ids, torch.full_like(ids, IGNORE_INDEX))
    labels[0, 0] = ids[0, 0]
    return ids, labels


# every kind appears once, with the families taking turns
KIND_FAMILY = [(k, FAMILIES[i % len(FAMILIES)]) for i, k in enumerate(ATTENTION_TYPES)]


@pytest.mark.parametrize("kind,family", KIND_FAMILY)
def test_family_kind_forward_backward(kind, family):
    torch.manual_seed(0)
    model = MiniBERTForMaskedLM(tiny(family, kind)).train()
    ids, labels = batch()
    mask = torch.ones(B, L, dtype=torch.long); mask[1, 5:] = 0
    out = model(ids, attention_mask=mask, labels=labels)
    assert isinstance(out, MaskedLMOutput)
    assert torch.isfinite(out.loss) and out.logits.shape == (int((labels != IGNORE_INDEX).sum()), V)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("bert.pooler.")}  # MLM skips the pooler
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert model.bert.embeddings.tok.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["standard", "performer"])
def test_padding_invariance(family, kind):
    torch.manual_seed(0)
    model = MiniBERTForMaskedLM(tiny(family, kind)).eval()
    ids, _ = batch()
    pads = 3
    padded = torch.cat([ids, torch.zeros(B, pads, dtype=ids.dtype)], 1)
    mask = torch.cat([torch.ones(B, L), torch.zeros(B, pads)], 1).long()
    with torch.no_grad():
        ref = model(ids).logits
        got = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(got[:, :L], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["minibert", "neobert"])
def test_packed_documents_equal_separate(family):
    "Two documents packed in one row (segment_ids, positions restarting) give the logits of each alone."
    torch.manual_seed(0)
    model = MiniBERTForMaskedLM(tiny(family)).eval()
    ids, _ = batch()
    a, b = ids[:1, :3], ids[1:2, :4]
    packed = torch.cat([a, b], 1)                                          # [1, 7]
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2]])
    with torch.no_grad():
        got = model(packed, segment_ids=seg).logits
        torch.testing.assert_close(got[:, :3], model(a).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[:, 3:], model(b).logits, atol=1e-5, rtol=1e-5)


def test_sparse_head_equals_dense_and_chunked():
    torch.manual_seed(0)
    model = MiniBERTForMaskedLM(tiny("bert")).eval()
    ids, labels = batch()
    dense = model(ids).logits                                              # [B, L, V]
    ref = F.cross_entropy(dense.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss_sum, ref * (labels != IGNORE_INDEX).sum(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.logits, dense[labels != IGNORE_INDEX])
    grads_plain = torch.autograd.grad(out.loss, mlm_params(model))
    model.ce_chunk_size = 2                                                 # several chunks, recomputed in backward
    chunked = model(ids, labels=labels, return_logits=False)
    assert chunked.logits is None
    torch.testing.assert_close(chunked.loss, out.loss, atol=1e-6, rtol=1e-6)
    for g1, g2 in zip(grads_plain, torch.autograd.grad(chunked.loss, mlm_params(model))):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_chunked_cross_entropy_function():
    torch.manual_seed(0)
    h, w = torch.randn(11, 5, dtype=torch.float64), torch.randn(13, 5, dtype=torch.float64)
    y = torch.randint(0, 13, (11,)); y[3] = IGNORE_INDEX
    ref = F.cross_entropy(h @ w.T, y, ignore_index=IGNORE_INDEX, reduction="sum")
    for c in (1, 4, CE_CHUNK_ROWS):
        torch.testing.assert_close(chunked_cross_entropy(h, y, lambda t: t @ w.T, c), ref)
    with pytest.raises(ValueError, match="chunk_size"): chunked_cross_entropy(h, y, lambda t: t @ w.T, 0)


def test_empty_prediction_batch():
    torch.manual_seed(0)
    model = MiniBERTForMaskedLM(tiny())
    ids, _ = batch()
    out = model(ids, labels=torch.full_like(ids, IGNORE_INDEX))
    assert out.loss.item() == 0.0 and int(out.num_predictions) == 0 and out.logits.shape == (0, V)
    out.loss.backward()                                                     # a gradient path exists
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_num_predictions_bound():
    torch.manual_seed(0)
    model = MiniBERTForMaskedLM(tiny()).eval()
    ids, labels = batch()
    n = int((labels != IGNORE_INDEX).sum())
    ref = model(ids, labels=labels)
    for bound in (n, n + 5, B * L + 4):
        out = model(ids, labels=labels, num_predictions=bound)
        assert out.logits.shape == (bound, V) and int(out.num_predictions) == n
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(out.logits[:n], ref.logits)


@pytest.mark.parametrize("family", ["minibert", "bert"])
def test_gradient_checkpointing_same_grads(family):
    "Checkpointed blocks give the same loss and gradients, dropout included (RNG state is preserved)."
    ids, labels = batch()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = MiniBERTForMaskedLM(tiny(family, dropout=0.1, gradient_checkpointing=ckpt)).train()
        torch.manual_seed(1)
        loss = model(ids, labels=labels).loss
        grads.append([loss] + list(torch.autograd.grad(loss, mlm_params(model))))
    for a, b in zip(*grads): torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_outputs_attentions_hidden_states_pooler():
    torch.manual_seed(0)
    cfg = tiny("bert")
    enc = MiniBERT(cfg).eval()
    ids, _ = batch()
    mask = torch.ones(B, L, dtype=torch.long); mask[2, 4:] = 0
    out = enc(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert out.last_hidden_state.shape == (B, L, cfg.dim) and out.pooler_output.shape == (B, cfg.dim)
    assert len(out.hidden_states) == cfg.depth + 1 and len(out.attentions) == cfg.depth
    w = out.attentions[0]
    assert w.shape == (B, cfg.heads, L, L)
    torch.testing.assert_close(w[2, :, :4].sum(-1), torch.ones(cfg.heads, 4))
    assert w[2, :, :, 4:].abs().max() == 0                                 # no weight on pads
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)  # BERT: no final norm
    plain = enc(ids, attention_mask=mask)
    torch.testing.assert_close(plain.last_hidden_state, out.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_modernbert_alternates_global_and_local():
    cfg = ModelConfig.preset("modernbert-tiny", vocab_size=V)
    model = MiniBERTForMaskedLM(cfg)
    windows = [layer.attn.spec.window for layer in model.bert.layers]
    assert windows == [None if cfg.is_global(i) else cfg.local_window for i in range(cfg.depth)]
    assert model.head.decoder is None and all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError, match="global_every"):
        MiniBERTForMaskedLM(ModelConfig.preset("modernbert-tiny", vocab_size=V, attention="performer"))


def test_untied_decoder_and_init():
    cfg = tiny(tie_embeddings=False, init_std=0.05)
    model = MiniBERTForMaskedLM(cfg)
    assert model.head.decoder.weight.shape == (V, cfg.dim) and model.head.decoder.bias is None
    w = model.bert.layers[0].ffn.up.weight
    assert w.abs().max() <= 2 * cfg.init_std + 1e-7 and abs(w.std().item() - cfg.init_std) < 0.3 * cfg.init_std
    assert model.bert.embeddings.tok.weight[cfg.pad_token_id].abs().max() == 0


BAD = [
    (dict(input_ids=torch.tensor([[1, V]])), "input_ids"),
    (dict(input_ids=torch.tensor([[-1, 2]])), "input_ids"),
    (dict(input_ids=torch.ones(1, 17, dtype=torch.long)), "max_len"),
    (dict(input_ids=torch.ones(0, 3, dtype=torch.long)), "empty"),
    (dict(input_ids=torch.ones(2, 3)), "dtype"),
    (dict(input_ids=[[1, 2]]), "input_ids"),
    (dict(input_ids=torch.ones(3, dtype=torch.long)), "2 dimensions"),
    (dict(attention_mask=torch.ones(B, L - 1)), "attention_mask"),
    (dict(attention_mask=torch.full((B, L), 2)), "attention_mask"),
    (dict(labels=torch.ones(B, L - 1, dtype=torch.long)), "labels"),
    (dict(labels=torch.full((B, L), V)), "labels"),
    (dict(labels=torch.ones(B, L)), "labels"),
    (dict(token_type_ids=torch.zeros(B, L, dtype=torch.long)), "token_type_ids"),
    (dict(position_ids=torch.full((B, L), 16)), "position_ids"),
    (dict(segment_ids=torch.full((B, L), -1)), "segment_ids"),
    (dict(num_predictions=3), "num_predictions"),
]


@pytest.mark.parametrize("kw,pattern", BAD)
def test_bad_inputs_raise(kw, pattern):
    model = MiniBERTForMaskedLM(tiny())
    ids, labels = batch()
    kw = dict(kw); ids = kw.pop("input_ids", ids)
    if kw.get("num_predictions") is not None: kw["labels"] = labels
    with pytest.raises(ValueError, match=pattern): model(ids, **kw)


def test_bad_token_type_range_and_cfg():
    model = MiniBERT(tiny("bert"))
    ids, _ = batch()
    with pytest.raises(ValueError, match="token_type_ids"): model(ids, token_type_ids=torch.full((B, L), 2))
    with pytest.raises(ValueError, match="cfg"): MiniBERT({"dim": 32})


@pytest.mark.cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_cpu(family):
    "The same weights on a GPU give the CPU's loss and gradients (TF32 off)."
    if not torch.cuda.is_available(): pytest.skip("no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cpu = MiniBERTForMaskedLM(tiny(family)).train()
    gpu = MiniBERTForMaskedLM(tiny(family)).train().cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids, labels = batch()
    mask = torch.ones(B, L, dtype=torch.long); mask[1, 4:] = 0
    lc = cpu(ids, attention_mask=mask, labels=labels).loss
    lg = gpu(ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda()).loss
    torch.testing.assert_close(lg.cpu(), lc, atol=1e-4, rtol=1e-4)
    for a, b in zip(torch.autograd.grad(lc, mlm_params(cpu)), torch.autograd.grad(lg, mlm_params(gpu))):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-3)


def test_torch_compile_traces():
    "Under `torch.compile` (eager backend: dynamo tracing only) validation is skipped and results are unchanged."
    torch.manual_seed(0)
    model = MiniBERTForMaskedLM(tiny()).eval()
    ids, labels = batch()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, labels=labels).loss, model(ids, labels=labels).loss)
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_close_to_fp32(family):
    "Mixed precision (CPU bf16 autocast) runs forward and backward and stays near the float32 loss."
    torch.manual_seed(0)
    model = MiniBERTForMaskedLM(tiny(family)).train()
    ids, labels = batch()
    ref = model(ids, labels=labels).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    assert all(torch.isfinite(p.grad).all() for p in mlm_params(model))
