"""Attention modules (torch and JAX): float64 oracle, cross-framework parity, padding, causality, state, dropout,
fast paths, compilation, mixed precision and input validation, for every kind in `kernels.ATTENTION_TYPES`."""
import functools, io

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from minibert_lab import kernels
from minibert_lab.torch import attention as ta
from minibert_lab.jax import attention as ja

KINDS = tuple(kernels.ATTENTION_TYPES)
B, L, DIM, HEADS = 3, 7, 32, 2     # tiny sizes: batch 3, odd length, head size 16
SEED = 3                           # random-feature seed of the modules under test
RTOL = kernels.ORACLE_RTOL_FP32    # float32 vs the float64 oracle (relative norm error), per unit of conditioning
PARITY_RTOL = RTOL                 # torch vs JAX, both float32, per unit of conditioning
BF16_RTOL = 5e-2                   # bf16 module vs the same module in float32, per unit of conditioning
VARIANTS = ("plain", "masked", "packed")


def rel_err(a, b): return kernels.relative_error(np.asarray(a, np.float64), np.asarray(b, np.float64))


def inputs(variant):
    "numpy x and keyword inputs of a variant: plain, masked (right padding, one row fully padded) or packed."
    x = np.random.default_rng(0).standard_normal((B, L, DIM)).astype(np.float32)
    if variant == "plain": return x, {}
    if variant == "masked":
        return x, dict(attention_mask=np.array([[1] * 7, [1] * 5 + [0] * 2, [0] * 7], np.int64))
    seg = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 2, 2, 2, 0, 0], [1, 2, 3, 3, 3, 3, 0]], np.int64)
    pos = np.array([[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 0, 0], [0, 0, 0, 1, 2, 3, 0]], np.int64)
    return x, dict(segment_ids=seg, attention_mask=(seg > 0).astype(np.int64), position_ids=pos)


def to_torch(kw): return {k: torch.from_numpy(v) for k, v in kw.items()}
def to_jax(kw): return {k: jnp.asarray(v) for k, v in kw.items()}


def torch_module(kind, **params):
    torch.manual_seed(0)
    return ta.build_attention(kind, DIM, HEADS, seed=SEED, **params).eval()


def jax_from_torch(tm, **params):
    "A JAX module with the torch module's weights and buffers (kernel = weight.T)."
    s = tm.spec
    kw = dict(s.params, rope=s.rope, rope_theta=s.rope_theta, dropout=s.dropout, seed=s.seed, chunk_size=s.chunk_size,
              bias=s.bias, window=s.window, max_len=s.max_len)
    jm = ja.build_attention(s.kind, s.dim, s.heads, rngs=nnx.Rngs(params=1, dropout=2), **{**kw, **params})
    assert jm.spec == s
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        tl, jl = getattr(tm, name), getattr(jm, name)
        jl.kernel[...] = jnp.asarray(tl.weight.detach().numpy().T)
        if tl.bias is not None: jl.bias[...] = jnp.asarray(tl.bias.detach().numpy())
    for name in tm.state_names: getattr(jm, name)[...] = jnp.asarray(getattr(tm, name).numpy())
    jm.eval()
    return jm


@functools.cache
def pair(kind):
    "(torch module, JAX module with the same weights), built once per kind."
    tm = torch_module(kind)
    return tm, jax_from_torch(tm)


def reference(tm, x, attention_mask=None, position_ids=None, segment_ids=None, causal=False):
    """float64 oracle of torch module `tm` on numpy `x` (its projections, buffers, `reference_attention`) and the
    conditioning of its weights (signed-feature kinds amplify rounding by up to max_i sum_j |w_ij|)."""
    s, f = tm.spec, (lambda t: t.detach().double().numpy())
    b, l, dim = x.shape
    if position_ids is None:
        position_ids = ta.default_position_ids(b, l, None if segment_ids is None else torch.from_numpy(segment_ids)).numpy()
    proj = lambda lin: x.astype(np.float64) @ f(lin.weight).T + (f(lin.bias) if lin.bias is not None else 0)  # [B, L, dim]
    heads = lambda a: a.reshape(b, l, s.heads, s.head_dim).transpose(0, 2, 1, 3)  # [B, L, dim] -> [B, H, L, D]
    q, k, v = (heads(proj(lin)) for lin in (tm.q_proj, tm.k_proj, tm.v_proj))
    if s.rope:
        cos, sin = kernels.rope_cos_sin(position_ids, s.head_dim, s.rope_theta, xp=np)
        q, k = kernels.apply_rope(q, cos, sin), kernels.apply_rope(k, cos, sin)
    state = {n: f(getattr(tm, n)) for n in tm.state_names}
    out, w = kernels.reference_attention(s.kind, q, k, v, state, params=s.params, attention_mask=attention_mask,
                                         segment_ids=segment_ids, position_ids=position_ids, causal=causal,
                                         window=s.window)
    out = np.asarray(out).transpose(0, 2, 1, 3).reshape(b, l, dim)  # [B, H, L, D] -> [B, L, H, D] -> [B, L, dim]
    y = out @ f(tm.o_proj.weight).T + (f(tm.o_proj.bias) if tm.o_proj.bias is not None else 0)
    return y, kernels.weights_condition(w)


@functools.cache
def cond(kind):
    "Largest weight conditioning of `kind`'s test module over the test inputs (1 for non-negative weights)."
    tm, _ = pair(kind)
    return max(reference(tm, x, causal=c, **kw)[1] for c in (False, True) for x, kw in map(inputs, VARIANTS))


# ---------------------------------------------------------------- oracle and parity

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_and_jax(kind, causal, variant):
    tm, jm = pair(kind)
    x, kw = inputs(variant)
    ref, c = reference(tm, x, causal=causal, **kw)
    with torch.no_grad(): yt = tm(torch.from_numpy(x), causal=causal, **to_torch(kw)).numpy()
    assert rel_err(yt, ref) < RTOL * c, ("torch", rel_err(yt, ref), c)
    yj = np.asarray(jm(jnp.asarray(x), causal=causal, **to_jax(kw)))
    assert rel_err(yj, ref) < RTOL * c, ("jax", rel_err(yj, ref), c)
    assert rel_err(yj, yt) < PARITY_RTOL * c, ("parity", rel_err(yj, yt), c)


def _check_variant_module(tm, cases):
    "torch module `tm` and its JAX copy match the oracle and each other on `(causal, variant)` cases."
    jm = jax_from_torch(tm)
    for causal, variant in cases:
        x, kw = inputs(variant)
        ref, c = reference(tm, x, causal=causal, **kw)
        with torch.no_grad(): yt = tm(torch.from_numpy(x), causal=causal, **to_torch(kw)).numpy()
        yj = np.asarray(jm(jnp.asarray(x), causal=causal, **to_jax(kw)))
        assert rel_err(yt, ref) < RTOL * c and rel_err(yj, ref) < RTOL * c and rel_err(yj, yt) < PARITY_RTOL * c, \
            (causal, variant, rel_err(yt, ref), rel_err(yj, ref), c)
        if tm.spec.softmax_fast_path:
            with torch.no_grad():
                tm.fast_path = False; core = tm(torch.from_numpy(x), causal=causal, **to_torch(kw)).numpy()
                tm.fast_path = True
            assert rel_err(yt, core) < RTOL


@pytest.mark.parametrize("kind", KINDS)
def test_rope_option_without_bias(kind):
    "RoPE is an option of every kind (positions restart per packed document); projections without biases."
    torch.manual_seed(0)
    tm = ta.build_attention(kind, DIM, HEADS, seed=SEED, rope=True, bias=False).eval()
    assert tm.spec.rope and tm.q_proj.bias is None
    _check_variant_module(tm, [(False, "packed"), (True, "masked")])


@pytest.mark.parametrize("kind", [k for k in KINDS if kernels.is_exact(k)])
def test_sliding_window(kind):
    "Exact kinds take a sliding window (local layers of ModernBERT-style models)."
    torch.manual_seed(0)
    tm = ta.build_attention(kind, DIM, HEADS, seed=SEED, window=2).eval()
    _check_variant_module(tm, [(False, "plain"), (False, "packed"), (True, "masked")])
    x, _ = inputs("plain")  # position 0 does not see position 3 or later
    x2 = x.copy(); x2[:, 3:] += 1.0
    with torch.no_grad(): a, b = (tm(torch.from_numpy(z)).numpy() for z in (x, x2))
    assert rel_err(b[:, 0], a[:, 0]) < RTOL


@pytest.mark.parametrize("kind", KINDS)
def test_output_attentions(kind):
    "Weights come back [B, H, L, L] in both frameworks, agree, and vanish on padded keys."
    tm, jm = pair(kind)
    x, kw = inputs("masked")
    with torch.no_grad(): yt, wt = tm(torch.from_numpy(x), output_attentions=True, **to_torch(kw))
    yj, wj = jm(jnp.asarray(x), output_attentions=True, **to_jax(kw))
    assert wt.shape == (B, HEADS, L, L) and wj.shape == (B, HEADS, L, L)
    assert rel_err(wj, wt.numpy()) < PARITY_RTOL * cond(kind)
    pad = kw["attention_mask"] == 0  # [B, L]
    assert np.all(wt.numpy()[np.broadcast_to(pad[:, None, None, :], wt.shape)] == 0)
    with torch.no_grad(): assert rel_err(yt.numpy(), tm(torch.from_numpy(x), **to_torch(kw)).numpy()) < RTOL * cond(kind)


@pytest.mark.parametrize("kind", ["standard", "rotary"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fast_path_equals_core(kind, variant, causal):
    tm, jm = pair(kind)
    x, kw = inputs(variant)
    with torch.no_grad():
        tm.fast_path = True; fast = tm(torch.from_numpy(x), causal=causal, **to_torch(kw)).numpy()
        tm.fast_path = False; core = tm(torch.from_numpy(x), causal=causal, **to_torch(kw)).numpy()
        tm.fast_path = True
    assert rel_err(fast, core) < RTOL
    outs = {}
    for fp in ja.FAST_PATHS + (None,):
        jm.fast_path = fp
        outs[fp] = np.asarray(jm(jnp.asarray(x), causal=causal, **to_jax(kw)))
    jm.fast_path = ja.EXACT_FAST_PATH
    for fp, y in outs.items(): assert rel_err(y, core) < PARITY_RTOL, fp


def _finite_gradients(kind, frameworks):
    "A fully padded sequence (no NaN from empty softmax rows) and real ones: finite outputs and gradients."
    tm, jm = pair(kind)
    x, kw = inputs("masked")  # row 2 has no real token
    if "torch" in frameworks:
        for causal in (False, True):
            xt = torch.from_numpy(x).requires_grad_()
            yt = tm(xt, causal=causal, **to_torch(kw))
            yt.square().sum().backward()
            assert torch.isfinite(yt).all() and torch.isfinite(xt.grad).all() and xt.grad[:2].abs().sum() > 0
    if "jax" in frameworks:
        gj = jax.grad(lambda x: jm(x, **to_jax(kw)).sum())(jnp.asarray(x))
        assert np.isfinite(np.asarray(gj)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_finite_gradients(kind):
    "Every kind in torch; JAX for `standard` (its fast path; eager JAX autodiff compiles each op, so the sweep is slow)."
    _finite_gradients(kind, ("torch", "jax") if kind == "standard" else ("torch",))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_finite_gradients_jax_every_kind(kind):
    _finite_gradients(kind, ("jax",))


# ---------------------------------------------------------------- padding and causality

def _padded_copy(x, am, extra):
    "x and mask with `extra` more pad positions and new random content at every pad position."
    x2 = np.concatenate([x, np.zeros((B, extra, DIM), np.float32)], 1)
    am2 = np.concatenate([am, np.zeros((B, extra), np.int64)], 1)
    x2[am2 == 0] = 10 * np.random.default_rng(1).standard_normal((int((am2 == 0).sum()), DIM))
    return x2, am2


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", KINDS)
def test_padding_invariance(kind, causal):
    """Appending 0 or 3 pads with new random content leaves every real position unchanged, in torch and in JAX (a kind
    whose constants followed the current length, as cosformer's position range once did, fails here)."""
    tm, jm = pair(kind)
    x, kw = inputs("masked")
    am = kw["attention_mask"]
    real = am.astype(bool)
    with torch.no_grad():
        a = tm(torch.from_numpy(x), attention_mask=torch.from_numpy(am), causal=causal).numpy()
    aj = np.asarray(jm(jnp.asarray(x), attention_mask=jnp.asarray(am), causal=causal))
    for extra in (0, 3):
        x2, am2 = _padded_copy(x, am, extra)
        with torch.no_grad():
            b = tm(torch.from_numpy(x2), attention_mask=torch.from_numpy(am2), causal=causal).numpy()[:, :L]
        assert rel_err(b[real], a[real]) < RTOL * cond(kind), ("torch", extra)
        bj = np.asarray(jm(jnp.asarray(x2), attention_mask=jnp.asarray(am2), causal=causal))[:, :L]
        assert rel_err(bj[real], aj[real]) < RTOL * cond(kind), ("jax", extra)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_no_future(kind):
    "With causal=True, perturbing positions > t leaves outputs at positions <= t unchanged."
    tm, jm = pair(kind)
    x, _ = inputs("plain")
    t = 3
    x2 = x.copy(); x2[:, t + 1:] += 5 * np.random.default_rng(2).standard_normal(x2[:, t + 1:].shape)
    with torch.no_grad():
        a, b = (tm(torch.from_numpy(z), causal=True).numpy() for z in (x, x2))
    assert rel_err(b[:, :t + 1], a[:, :t + 1]) < RTOL * cond(kind) and rel_err(b[:, t + 1:], a[:, t + 1:]) > RTOL
    a, b = (np.asarray(jm(jnp.asarray(z), causal=True)) for z in (x, x2))
    assert rel_err(b[:, :t + 1], a[:, :t + 1]) < RTOL * cond(kind)


def test_packed_documents_are_independent():
    "A packed row equals its documents run separately (positions restart per document)."
    for kind in ("standard", "rotary", "performer", "cosformer"):
        tm, jm = pair(kind)
        x, kw = inputs("packed")
        with torch.no_grad():
            y = tm(torch.from_numpy(x), segment_ids=torch.from_numpy(kw["segment_ids"])).numpy()  # default positions
            y0 = tm(torch.from_numpy(x[:1, :3])).numpy()
            y1 = tm(torch.from_numpy(x[:1, 3:])).numpy()
        assert rel_err(y[:1, :3], y0) < RTOL * cond(kind) and rel_err(y[:1, 3:], y1) < RTOL * cond(kind), kind
        yj = np.asarray(jm(jnp.asarray(x), segment_ids=jnp.asarray(kw["segment_ids"])))
        assert rel_err(yj, y) < PARITY_RTOL * cond(kind), kind


# ---------------------------------------------------------------- state, dropout

@pytest.mark.parametrize("kind", KINDS)
def test_state_roundtrip(kind):
    "Random features are non-trainable persistent buffers / RandomState variables, same names, and reload exactly."
    tm, jm = pair(kind)
    names = set(tm.state_names)
    assert names == set(kernels.init_state(kind, HEADS, DIM // HEADS, SEED, **tm.spec.params))
    assert names <= set(tm.state_dict()) and not names & set(dict(tm.named_parameters()))
    assert set(nnx.state(jm, ja.RandomState).keys()) == names
    assert not names & set(nnx.state(jm, nnx.Param).keys())
    x, kw = inputs("masked")
    buf = io.BytesIO(); torch.save(tm.state_dict(), buf); buf.seek(0)
    other = ta.build_attention(kind, DIM, HEADS, seed=SEED + 1).eval()
    other.load_state_dict(torch.load(buf))
    for n in names: assert torch.equal(getattr(other, n), getattr(tm, n))
    with torch.no_grad():
        assert np.array_equal(other(torch.from_numpy(x), **to_torch(kw)).numpy(), tm(torch.from_numpy(x), **to_torch(kw)).numpy())
    keep = nnx.Any(nnx.Param, ja.RandomState)
    saved = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(jm, keep))}  # what a checkpoint holds
    assert {path[-1] for path in saved} >= names
    jo = ja.build_attention(kind, DIM, HEADS, seed=SEED + 1, rngs=nnx.Rngs(7))
    st = nnx.state(jo, keep)
    for path, v in nnx.to_flat_state(st): v[...] = jnp.asarray(saved[path])
    nnx.update(jo, st)
    jo.eval()
    assert np.array_equal(np.asarray(jo(jnp.asarray(x), **to_jax(kw))), np.asarray(jm(jnp.asarray(x), **to_jax(kw))))


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_train_eval(kind):
    "Attention dropout changes outputs in training, and is off in eval, in both frameworks."
    x, kw = inputs("masked")
    tm = ta.build_attention(kind, DIM, HEADS, seed=SEED, dropout=0.5)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        tm.train(); assert not torch.equal(tm(xt, **to_torch(kw)), tm(xt, **to_torch(kw)))
        tm.eval(); assert torch.equal(tm(xt, **to_torch(kw)), tm(xt, **to_torch(kw)))
    jm = ja.build_attention(kind, DIM, HEADS, seed=SEED, dropout=0.5, rngs=nnx.Rngs(params=0, dropout=1))
    xj = jnp.asarray(x)
    jm.train(); assert not np.array_equal(jm(xj, **to_jax(kw)), jm(xj, **to_jax(kw)))
    jm.eval(); assert np.array_equal(jm(xj, **to_jax(kw)), jm(xj, **to_jax(kw)))


# ---------------------------------------------------------------- compilation, precision

def _compile_check(kind, backend):
    """torch.compile and nnx.jit reproduce the eager module. Exact kinds compile to one graph; feature-map kinds
    currently break the graph inside `kernels.attention_core` (numpy calls per step), so no `fullgraph` for them."""
    torch._dynamo.reset()
    tm, jm = pair(kind)
    x, kw = inputs("packed")
    xt = torch.from_numpy(x)
    with torch.no_grad():
        eager = tm(xt, **to_torch(kw)).numpy()
        compiled = torch.compile(tm, backend=backend, dynamic=False, fullgraph=kernels.is_exact(kind))(xt, **to_torch(kw)).numpy()
    assert rel_err(compiled, eager) < RTOL * cond(kind)
    f = nnx.jit(lambda m, x, kw: m(x, **kw))
    assert rel_err(f(jm, jnp.asarray(x), to_jax(kw)), eager) < PARITY_RTOL * cond(kind)


@pytest.mark.parametrize("kind", ["standard", "performer"])
def test_compile_one_kind(kind):
    """Default suite: the SDPA fast path and one feature-map kind, graph capture without code generation (inductor's
    C++ build takes 10-50 s per kind on 2 cores: the slow sweep)."""
    _compile_check(kind, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_compile_every_kind(kind):
    _compile_check(kind, "inductor")


@pytest.mark.parametrize("kind", KINDS)
def test_bf16(kind):
    "bf16 inputs run, return bf16 and stay close to the float32 result."
    tm = torch_module(kind)
    x, kw = inputs("masked")
    with torch.no_grad():
        y32 = tm(torch.from_numpy(x), **to_torch(kw)).numpy()
        y16 = tm.to(torch.bfloat16)(torch.from_numpy(x).bfloat16(), **to_torch(kw))
    assert y16.dtype == torch.bfloat16 and rel_err(y16.float().numpy(), y32) < BF16_RTOL * cond(kind)
    jm = jax_from_torch(torch_module(kind))
    yj = jm(jnp.asarray(x, jnp.bfloat16), **to_jax(kw))
    assert yj.dtype == jnp.bfloat16 and rel_err(np.asarray(yj, np.float32), y32) < BF16_RTOL * cond(kind)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("build", [
    lambda kind, **kw: ta.build_attention(kind, DIM, HEADS, **kw),
    lambda kind, **kw: ja.build_attention(kind, DIM, HEADS, rngs=nnx.Rngs(0), **kw)], ids=["torch", "jax"])
def test_bad_arguments(build):
    def raises(fn, *frags):
        with pytest.raises(ValueError) as ei: fn()
        for fr in frags: assert fr in str(ei.value), (fr, str(ei.value))
    raises(lambda: build("nope"), "kind='nope'", "performer")
    raises(lambda: build("standard", colour=1), "colour", "rope")
    raises(lambda: build("standard", num_features=8), "num_features", "allowed")
    raises(lambda: build("rff", bandwidth=-1.0), "bandwidth=-1.0")
    raises(lambda: build("performer", feature_map="tanh"), "feature_map='tanh'", "favor+")
    raises(lambda: build("slay", window=2), "window=2", "exact")
    raises(lambda: build("standard", dropout=2.0), "dropout=2.0")
    raises(lambda: build("standard", chunk_size=0), "chunk_size=0")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bad_inputs(framework):
    x, kw = inputs("packed")
    if framework == "torch": m, conv = torch_module("standard", max_len=L), (lambda a: torch.from_numpy(np.ascontiguousarray(a)))
    else: m, conv = ja.build_attention("standard", DIM, HEADS, max_len=L, rngs=nnx.Rngs(0)), jnp.asarray
    def raises(fn, *frags):
        with pytest.raises(ValueError) as ei: fn()
        for fr in frags: assert fr in str(ei.value), (fr, str(ei.value))
    X = conv(x)
    raises(lambda: m(conv(x[0])), "x has shape (7, 32)", "[B, L, dim=32]")
    raises(lambda: m(conv(x[..., :16])), "x has shape (3, 7, 16)")
    raises(lambda: m(conv(x[:0])), "x has shape (0, 7, 32)")
    raises(lambda: m(conv(np.concatenate([x, x], 1))), "L=14", "max_len=7")
    raises(lambda: m(conv(kw["segment_ids"][..., None].repeat(DIM, -1))), "x has dtype")
    raises(lambda: m(X, attention_mask=conv(kw["attention_mask"][:, :5])), "attention_mask has shape (3, 5)", "(3, 7)")
    raises(lambda: m(X, attention_mask=conv(kw["attention_mask"].astype(np.float32))), "attention_mask has dtype")
    raises(lambda: m(X, segment_ids=conv(kw["segment_ids"][:2])), "segment_ids has shape (2, 7)")
    raises(lambda: m(X, position_ids=conv(kw["position_ids"].astype(np.float32))), "position_ids has dtype")
    raises(lambda: m(X, causal="yes"), "causal='yes'")


# ---------------------------------------------------------------- faults: bad values, masked garbage

@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bad_values_are_refused_by_name(framework):
    "Mask, position and segment values the kernels cannot honour are refused, naming the argument and the entry."
    x, kw = inputs("packed")
    seg, am, pos = kw["segment_ids"], kw["attention_mask"], kw["position_ids"]
    if framework == "torch":
        conv = lambda a: torch.from_numpy(np.ascontiguousarray(a))
        build = lambda kind, **p: ta.build_attention(kind, DIM, HEADS, **p)
    else:
        conv = jnp.asarray
        build = lambda kind, **p: ja.build_attention(kind, DIM, HEADS, rngs=nnx.Rngs(0), **p)
    m, X = build("standard"), conv(x)
    def raises(fn, *frags):
        with pytest.raises(ValueError) as ei: fn()
        for fr in frags: assert fr in str(ei.value), (fr, str(ei.value))
    with_value = lambda a, idx, v: (lambda b: (b.__setitem__(idx, v), b)[1])(a.copy())
    raises(lambda: m(X, attention_mask=conv(with_value(am, (0, 1), 2))), "attention_mask[0, 1]=2", "0 = padding")
    raises(lambda: m(X, attention_mask=conv(with_value(am, (0, 1), -1))), "attention_mask[0, 1]=-1")
    raises(lambda: m(X, position_ids=conv(with_value(pos, (1, 2), -3))), "position_ids[1, 2]=-3", ">= 0")
    raises(lambda: m(X, segment_ids=conv(with_value(seg, (0, 0), -1))), "segment_ids[0, 0]=-1")
    reappear = np.array([[1, 1, 2, 2, 1, 1, 0]] * B)
    raises(lambda: m(X, segment_ids=conv(reappear)), "segment_ids[0]", "document 1 at position 4 reappears")
    raises(lambda: m(X, segment_ids=conv(seg), attention_mask=conv(np.ones_like(am))), "disagree", "segment_ids[1, 5]=0")
    raises(lambda: m(X, causal=1), "causal=1 is invalid", "True or False")
    cos = build("cosformer", cos_max_len=8)
    raises(lambda: cos(X, position_ids=conv(with_value(pos, (2, 3), 8))), "position_ids[2, 3]=8", "< 8")
    raises(lambda: cos(conv(np.concatenate([x, x], 1))), "L=14", "position range", "<= 8")
    if framework == "torch":
        for dt in (torch.float64, torch.bfloat16, torch.float16):
            raises(lambda: m(torch.from_numpy(x).to(dt)), f"x has dtype {dt}", "weights are torch.float32")
    # the same values pass once fixed, and the models refuse them too
    m(X, segment_ids=conv(seg), attention_mask=conv(am), position_ids=conv(pos))


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_at_masked_positions_never_reaches_real_tokens(kind):
    "NaN or Inf in the hidden states of padded positions leaves every real position's output unchanged and finite."
    tm, jm = pair(kind)
    x, kw = inputs("masked")
    am = kw["attention_mask"]
    real = am.astype(bool)
    with torch.no_grad(): ref = tm(torch.from_numpy(x), attention_mask=torch.from_numpy(am)).numpy()
    refj = np.asarray(jm(jnp.asarray(x), attention_mask=jnp.asarray(am)))
    for bad in (np.nan, np.inf):
        x2 = x.copy(); x2[am == 0] = bad
        for causal in (False, True):
            with torch.no_grad(): yt = tm(torch.from_numpy(x2), attention_mask=torch.from_numpy(am), causal=causal).numpy()
            yj = np.asarray(jm(jnp.asarray(x2), attention_mask=jnp.asarray(am), causal=causal))
            assert np.isfinite(yt).all() and np.isfinite(yj).all(), (bad, causal)
            if not causal:
                assert rel_err(yt[real], ref[real]) < RTOL * cond(kind) and rel_err(yj[real], refj[real]) < RTOL * cond(kind)


def test_jax_long_inputs_take_the_blockwise_core_with_equal_outputs():
    "From BLOCKWISE_MIN_LENGTH on, the JAX softmax module leaves XLA's fused L×L path for the blockwise core: same output."
    import jax, jax.numpy as jnp
    from flax import nnx
    from minibert_lab import kernels
    from minibert_lab.jax.attention import build_attention
    import unittest.mock as mock
    m = build_attention("standard", 16, 2, rngs=nnx.Rngs(0), max_len=kernels.BLOCKWISE_MIN_LENGTH)
    x = jax.random.normal(jax.random.key(1), (1, kernels.BLOCKWISE_MIN_LENGTH, 16), jnp.float32)
    calls, real = [], kernels.EXACT_MEMORY_PATHS["blockwise"]
    with mock.patch.dict(kernels.EXACT_MEMORY_PATHS, blockwise=lambda *a, **k: calls.append(1) or real(*a, **k)):
        long = np.asarray(m(x))                   # the blockwise core
    assert calls, "a long input did not reach the blockwise core"
    assert m.fast_path is not None
    with mock.patch.object(kernels, "BLOCKWISE_MIN_LENGTH", 10**9): dense = np.asarray(m(x))   # the fused path, same length
    np.testing.assert_allclose(long, dense, rtol=1e-4, atol=1e-5)


def test_no_grad_forward_after_a_fused_optimizer_step_uses_the_new_weights():
    "Evaluation between training steps sees the current q/k/v weights: a fused AdamW step does not bump `_version`, so the reused concatenation must not outlive a training forward."
    import torch
    from minibert_lab.torch.attention import build_attention
    torch.manual_seed(0)
    attn, x = build_attention("standard", 16, 2), torch.randn(3, 7, 16)
    opt = torch.optim.AdamW(attn.parameters(), lr=0.1, fused=True)
    for _ in range(3):
        with torch.no_grad(): attn(x)                                   # evaluation: fills the reuse cache
        opt.zero_grad(); attn(x)[0].pow(2).sum().backward(); opt.step()  # weights change in place, `_version` unchanged
    with torch.no_grad(): got = attn(x)[0]
    fresh = build_attention("standard", 16, 2); fresh.load_state_dict(attn.state_dict())
    with torch.no_grad(): want = fresh(x)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", kernels.ATTENTION_TYPES)
def test_training_after_an_inference_mode_forward(kind):
    "A model first used under `torch.inference_mode` (as `embeddings.encode` does) still trains: no constant cached inside inference mode reaches autograd."
    from minibert_lab.torch.attention import build_attention
    kernels.core._CONSTANTS.clear()                                       # constants are cached process-wide: start empty
    torch.manual_seed(0)
    attn, x = build_attention(kind, 16, 2), torch.randn(3, 7, 16)
    with torch.inference_mode(): attn(x)
    out = attn(x.requires_grad_())[0]
    out.pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
