"""Grid tests of `minibert_lab.kernels`: every kind against the float64 oracle in numpy, torch and JAX, gradients,
padding/packing invariance, causality, extreme scales and bf16."""
import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp

from minibert_lab import kernels as K

KINDS = K.ATTENTION_TYPES
LINEAR_KINDS = tuple(k for k in KINDS if not K.is_exact(k))
MASKINGS = ("plain", "masked", "packed")
FRAMEWORKS = ("numpy64", "torch32", "jax32")
GRAD_RTOL = 2e-3        # float32 JAX gradient vs float64 finite differences, per unit of conditioning
FD_STEP = 1e-6          # central finite-difference step (float64)
SCALES = (1e-3, 1.0, 1e2)           # default sweep of input scales
SCALES_SLOW = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2)


def _inputs(B=3, H=2, L=7, D=8, seed=0, scale=1.0):
    return K.random_inputs(B=B, H=H, L=L, D=D, seed=seed, scale=scale)


def _masks(masking, am, sg, pos):
    if masking == "plain": return {}
    if masking == "masked": return dict(attention_mask=am)
    return dict(segment_ids=sg, position_ids=pos)


def _convert(fw, a, is_float=True):
    if fw == "numpy64": return a
    if fw == "torch32": return torch.tensor(a, dtype=torch.float32) if is_float else torch.as_tensor(a)
    return jnp.asarray(a, jnp.float32) if is_float else jnp.asarray(a)


def _forms(kind):
    "The forms to test: feature kinds both (forced), exact kinds their one."
    return ("quadratic",) if K.is_exact(kind) else ("linear", "quadratic")


def _lin(kind):
    "Force the linear form on feature kinds (the tests written for it keep testing it)."
    return {} if K.is_exact(kind) else dict(form="linear")


def _setup(kind, seed=1, H=2, D=8):
    p = K.small_params(kind)
    return p, K.init_state(kind, H, D, seed=seed, **p)


def _grid():
    "numpy float64 and torch float32 everywhere; JAX float32 on packed inputs by default, everywhere when slow."
    for fw in FRAMEWORKS:
        for masking in MASKINGS:
            slow = fw == "jax32" and masking != "packed"
            yield pytest.param(fw, masking, marks=[pytest.mark.slow] if slow else [], id=f"{fw}-{masking}")


@pytest.mark.parametrize("fw,masking", list(_grid()))
@pytest.mark.parametrize("causal", (False, True), ids=("bidir", "causal"))
@pytest.mark.parametrize("kind", KINDS)
def test_matches_oracle(kind, causal, masking, fw):
    (q, k, v), am, sg, pos = _inputs()
    p, st = _setup(kind)
    m = _masks(masking, am, sg, pos)
    ref, wref = K.reference_attention(kind, q, k, v, st, params=p, causal=causal, **m)
    out, w = K.attention_core(kind, *(_convert(fw, a) for a in (q, k, v)), {n: _convert(fw, a) for n, a in st.items()},
                              params=p, causal=causal, chunk_size=3, output_attentions=True, **_lin(kind),
                              **{n: _convert(fw, a, False) for n, a in m.items()})
    tol = (K.ORACLE_RTOL_FP64 if fw == "numpy64" else K.ORACLE_RTOL_FP32) * K.weights_condition(wref)
    assert K.relative_error(out, ref) < tol
    assert K.relative_error(w, wref) < tol
    assert tuple(out.shape) == (3, 2, 7, 8) and tuple(w.shape) == (3, 2, 7, 7)


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_chunk_size_does_not_matter(kind):
    (q, k, v), am, sg, pos = _inputs(L=11)
    p, st = _setup(kind)
    outs = [K.attention_core(kind, q, k, v, st, params=p, causal=True, segment_ids=sg, position_ids=pos,
                             chunk_size=c, form="linear")[0] for c in (1, 4, 11, 64)]
    for o in outs[1:]: np.testing.assert_allclose(o, outs[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_gradcheck_float64(kind):
    (q, k, v), am, sg, pos = _inputs(B=2, H=1, L=5, D=4, seed=3)
    p, st = _setup(kind, H=1, D=4)
    stt = {n: torch.tensor(a, dtype=torch.float64) for n, a in st.items()}
    qt, kt, vt = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    sgt, amt, post = torch.as_tensor(sg), torch.as_tensor(am), torch.as_tensor(pos)

    def f(q, k, v):
        a, _ = K.attention_core(kind, q, k, v, stt, params=p, causal=True, segment_ids=sgt, position_ids=post, chunk_size=2,
                                **_lin(kind))
        b, _ = K.attention_core(kind, q, k, v, stt, params=p, attention_mask=amt, **_lin(kind))
        return a, b
    assert torch.autograd.gradcheck(f, (qt, kt, vt), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("kind", KINDS)
def test_jax_grad_vs_finite_differences(kind):
    (q, k, v), am, sg, pos = _inputs(B=2, H=1, L=5, D=4, seed=4)
    p, st = _setup(kind, H=1, D=4)
    R = np.random.default_rng(9).standard_normal((2, 1, 5, 4))
    kw = dict(params=p, causal=True, segment_ids=sg, position_ids=pos)

    def loss_jax(q, k, v):
        out, _ = K.attention_core(kind, q, k, v, {n: jnp.asarray(a) for n, a in st.items()}, chunk_size=2, **_lin(kind),
                                  **{**kw, "segment_ids": jnp.asarray(sg), "position_ids": jnp.asarray(pos)})
        return jnp.sum(out * R)

    def loss_ref(q, k, v): return float((K.reference_attention(kind, q, k, v, st, **kw)[0] * R).sum())

    grads = jax.jit(jax.grad(loss_jax, argnums=(0, 1, 2)))(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    args = [q.copy(), k.copy(), v.copy()]
    cond = K.weights_condition(K.reference_attention(kind, q, k, v, st, **kw)[1])
    for a, g in zip(args, grads):
        fd = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + FD_STEP; hi = loss_ref(*args)
            a[idx] = old - FD_STEP; lo = loss_ref(*args)
            a[idx] = old
            fd[idx] = (hi - lo) / (2 * FD_STEP)
        assert K.relative_error(np.asarray(g), fd) < GRAD_RTOL * cond, kind


@pytest.mark.parametrize("kind", KINDS)
def test_padding_invariance(kind):
    "Outputs at real tokens do not depend on pad content or pad length."
    rng = np.random.default_rng(5)
    (q, k, v), _, _, _ = _inputs(B=1, L=5)
    p, st = _setup(kind)
    for causal, form in ((c, f) for c in (False, True) for f in _forms(kind)):
        base, _ = K.attention_core(kind, q, k, v, st, params=p, causal=causal, form=form)
        for extra in (1, 4):
            pad = lambda a: np.concatenate([a, 50 * rng.standard_normal(a.shape[:2] + (extra, a.shape[3]))], axis=2)
            am = np.concatenate([np.ones((1, 5), int), np.zeros((1, extra), int)], axis=1)
            out, _ = K.attention_core(kind, pad(q), pad(k), pad(v), st, params=p, attention_mask=am, causal=causal,
                                      chunk_size=2, form=form)
            np.testing.assert_allclose(out[:, :, :5], base, rtol=1e-9, atol=1e-9)
            np.testing.assert_array_equal(out[:, :, 5:], 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_packing_equals_separate_documents(kind):
    "Two packed documents give the outputs of each document alone."
    (q, k, v), _, _, _ = _inputs(B=1, L=7)
    p, st = _setup(kind)
    sg = np.array([[1, 1, 1, 2, 2, 2, 0]])
    pos = np.array([[0, 1, 2, 0, 1, 2, 0]])
    for causal, form in ((c, f) for c in (False, True) for f in _forms(kind)):
        out, _ = K.attention_core(kind, q, k, v, st, params=p, segment_ids=sg, position_ids=pos, causal=causal,
                                  chunk_size=2, form=form)
        for a, b in ((0, 3), (3, 6)):
            sep, _ = K.attention_core(kind, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], st, params=p, causal=causal,
                                      **_lin(kind))
            np.testing.assert_allclose(out[:, :, a:b], sep, rtol=1e-8, atol=1e-8)
        np.testing.assert_array_equal(out[:, :, 6], 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_no_future(kind):
    "Perturbing tokens after t leaves outputs at positions <= t bit-identical."
    (q, k, v), am, sg, pos = _inputs(B=3, L=9, seed=6)
    p, st = _setup(kind)
    t = 4
    q2, k2, v2 = (a.copy() for a in (q, k, v))
    for a in (q2, k2, v2): a[:, :, t + 1:] += 30 * np.random.default_rng(7).standard_normal(a[:, :, t + 1:].shape)
    for form in _forms(kind):
        kw = dict(params=p, causal=True, segment_ids=sg, position_ids=pos, chunk_size=3, form=form)
        base, _ = K.attention_core(kind, q, k, v, st, **kw)
        out, _ = K.attention_core(kind, q2, k2, v2, st, **kw)
        np.testing.assert_array_equal(out[:, :, :t + 1], base[:, :, :t + 1])


def _check_finite(kind, scales):
    for dtype in (torch.float32, torch.bfloat16):
        for scale in scales:
            (q, k, v), am, sg, pos = _inputs(scale=scale, seed=8)
            p, st = _setup(kind)
            qt, kt, vt = (torch.tensor(a, dtype=dtype, requires_grad=True) for a in (q, k, v))
            stt = {n: torch.tensor(a, dtype=dtype) for n, a in st.items()}
            for causal in (False, True):
                out, _ = K.attention_core(kind, qt, kt, vt, stt, params=p, causal=causal, chunk_size=3,
                                          segment_ids=torch.as_tensor(sg), position_ids=torch.as_tensor(pos))
                assert out.dtype == dtype
                assert torch.isfinite(out).all(), (dtype, scale, causal)
                out.float().square().mean().backward()
                for g in (qt.grad, kt.grad, vt.grad): assert torch.isfinite(g).all(), (dtype, scale, causal)


@pytest.mark.parametrize("kind", KINDS)
def test_finite_at_scales_and_bf16(kind): _check_finite(kind, SCALES)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_finite_at_scales_and_bf16_sweep(kind): _check_finite(kind, SCALES_SLOW)


@pytest.mark.parametrize("kind", ("standard", "yat-spherical", "performer", "cosformer", "slay", "slay-tensor"))
def test_jax_jit(kind):
    (q, k, v), am, sg, pos = _inputs()
    p, st = _setup(kind)
    f = jax.jit(lambda q, k, v, s, sg, pos: K.attention_core(kind, q, k, v, s, params=p, causal=True, segment_ids=sg,
                                                             position_ids=pos, chunk_size=3)[0])
    out = f(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), {n: jnp.asarray(a) for n, a in st.items()},
            jnp.asarray(sg), jnp.asarray(pos))
    ref, w = K.reference_attention(kind, q, k, v, st, params=p, causal=True, segment_ids=sg, position_ids=pos)
    assert K.relative_error(out, ref) < K.ORACLE_RTOL_FP32 * K.weights_condition(w)


def test_nystrom_whitening_stored_matches_recomputed():
    st = K.init_state("slay-nystrom", 2, 8, seed=2)
    np.testing.assert_allclose(st["landmark_whitening"], K.nystrom_whitening(st["landmarks"], 1e-3), rtol=1e-3, atol=1e-3)


def test_window_and_errors():
    (q, k, v), am, sg, pos = _inputs()
    out, w = K.attention_core("standard", q, k, v, window=1, output_attentions=True)
    assert np.all(w[..., 0, 2:] == 0) and np.all(w[..., 3, :2] == 0)
    ref, _ = K.reference_attention("standard", q, k, v, window=1)
    np.testing.assert_allclose(out, ref, rtol=1e-10)
    with pytest.raises(ValueError, match="window"): K.attention_core("linear", q, k, v, window=2)
    with pytest.raises(ValueError, match="attention_mask"): K.attention_core("standard", q, k, v, attention_mask=am[:, :3])
    with pytest.raises(ValueError, match="state is missing"): K.attention_core("performer", q, k, v, {})
    with pytest.raises(ValueError, match="unknown attention kind"): K.attention_core("flash", q, k, v)
    with pytest.raises(ValueError, match="q has shape"): K.attention_core("standard", q[0], k, v)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_oracle_and_bf16_finite(kind):
    dev = torch.device("cuda")
    (q, k, v), am, sg, pos = _inputs()
    p, st = _setup(kind)
    for causal in (False, True):
        for m in ({}, dict(attention_mask=am), dict(segment_ids=sg, position_ids=pos)):
            ref, w = K.reference_attention(kind, q, k, v, st, params=p, causal=causal, **m)
            mt = {n: torch.as_tensor(a, device=dev) for n, a in m.items()}
            for dt in (torch.float32, torch.bfloat16):
                x = [torch.tensor(a, dtype=dt, device=dev, requires_grad=True) for a in (q, k, v)]
                out, _ = K.attention_core(kind, *x, {n: torch.tensor(a, dtype=dt, device=dev) for n, a in st.items()},
                                          params=p, causal=causal, chunk_size=3, **mt)
                assert out.device.type == "cuda" and out.dtype == dt
                if dt == torch.float32: assert K.relative_error(out, ref) < K.ORACLE_RTOL_FP32 * K.weights_condition(w)
                out.float().square().sum().backward()
                assert torch.isfinite(out).all() and all(torch.isfinite(a.grad).all() for a in x)


@pytest.mark.parametrize("fw", ("torch32", "jax32"))
def test_yat_spherical_pole_is_finite_or_refused(fw):
    "q = k puts cosines at 1: float32 stays finite for an ε it can add to 2, and refuses a smaller one by name."
    (q, _, v), _, _, _ = _inputs()
    for causal in (False, True):
        out, w = K.attention_core("yat-spherical", _convert(fw, q), _convert(fw, q), _convert(fw, v),
                                  params=dict(epsilon=1e-6, normalize="kernel"), causal=causal, output_attentions=True)
        assert np.isfinite(K.to_numpy64(out)).all() and np.isfinite(K.to_numpy64(w)).all()
    with pytest.raises(ValueError, match=r"epsilon'\]=1e-08 is invalid for kind 'yat-spherical'.*rounds to 2"):
        K.attention_core("yat-spherical", _convert(fw, q), _convert(fw, q), _convert(fw, v), params=dict(epsilon=1e-8))


@pytest.mark.parametrize("kind", KINDS)
def test_default_params_pad_invariance(kind):
    "With the registry defaults (cosformer's one position range, never the current length), 0 vs 3 pads agree."
    (q, k, v), _, _, _ = _inputs(B=1, L=5)
    p = K.kind_params(kind)
    st = K.init_state(kind, 2, 8, seed=1, **p)
    rng = np.random.default_rng(8)
    pad = lambda a: np.concatenate([a, 20 * rng.standard_normal(a.shape[:2] + (3, a.shape[3]))], axis=2)
    am = np.array([[1] * 5 + [0] * 3])
    for causal in (False, True):
        base, _ = K.attention_core(kind, q, k, v, st, params=p, causal=causal)
        out, _ = K.attention_core(kind, pad(q), pad(k), pad(v), st, params=p, attention_mask=am, causal=causal)
        np.testing.assert_allclose(out[:, :, :5], base, rtol=1e-9, atol=1e-9)


def _form_grid():
    "numpy float64 and torch float32 for every feature kind; JAX float32 for a factored kind and a key-scaled one."
    for kind in LINEAR_KINDS:
        for fw in FRAMEWORKS:
            if fw != "jax32" or kind in ("slay", "performer"): yield pytest.param(kind, fw, id=f"{kind}-{fw}")


@pytest.mark.parametrize("kind,fw", list(_form_grid()))
def test_quadratic_form_matches_oracle_and_linear(kind, fw):
    "The factored quadratic form (φ(Q)φ(K)ᵀ masked, then [v; 1]) gives the oracle's outputs and weights, and the linear form's."
    (q, k, v), am, sg, pos = _inputs()
    p, st = _setup(kind)
    for causal in (False, True):
        for masking in (MASKINGS if fw != "jax32" else ("packed",)):
            m = _masks(masking, am, sg, pos)
            ref, wref = K.reference_attention(kind, q, k, v, st, params=p, causal=causal, **m)
            args = [_convert(fw, a) for a in (q, k, v)] + [{n: _convert(fw, a) for n, a in st.items()}]
            kw = dict(params=p, causal=causal, chunk_size=3, output_attentions=True,
                      **{n: _convert(fw, a, False) for n, a in m.items()})
            out, w = K.attention_core(kind, *args, form="quadratic", **kw)
            tol = (K.ORACLE_RTOL_FP64 if fw == "numpy64" else K.ORACLE_RTOL_FP32) * K.weights_condition(wref)
            assert K.relative_error(out, ref) < tol and K.relative_error(w, wref) < tol, (causal, masking)
            if fw != "jax32":  # (JAX's linear form meets the oracle in test_matches_oracle)
                lin, _ = K.attention_core(kind, *args, form="linear", **kw)
                assert K.relative_error(out, lin) < tol, (causal, masking)


@pytest.mark.parametrize("kind", ("performer", "slay", "slay-tensor", "cosformer"))
def test_forms_have_the_same_gradients(kind):
    "Gradients of the two forms agree in torch float64: bidirectional and causal, padded and packed."
    (q, k, v), am, sg, pos = _inputs(B=2, H=2, L=6, D=8, seed=3)
    p, st = _setup(kind)
    R = torch.tensor(np.random.default_rng(2).standard_normal((2, 2, 6, 8)))
    for causal in (False, True):
        for m in (dict(attention_mask=am), dict(segment_ids=sg, position_ids=pos)):
            grads = []
            for form in ("linear", "quadratic"):
                x = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
                out, _ = K.attention_core(kind, *x, {n: torch.tensor(a, dtype=torch.float64) for n, a in st.items()},
                                          params=p, causal=causal, chunk_size=4, form=form,
                                          **{n: torch.as_tensor(a) for n, a in m.items()})
                (out * R).sum().backward()
                grads.append([a.grad for a in x])
            for a, b in zip(*grads): torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_forms_have_the_same_gradients_jax():
    "JAX float32 under jit: SLAY's gradients through both forms agree (causal, packed)."
    (q, k, v), am, sg, pos = _inputs(B=2, H=2, L=6, D=8, seed=3)
    p, st = _setup("slay")
    R = np.random.default_rng(2).standard_normal((2, 2, 6, 8))
    stj, sj = {n: jnp.asarray(a) for n, a in st.items()}, jnp.asarray(sg)

    def loss(form):
        return lambda q, k, v: jnp.sum(K.attention_core("slay", q, k, v, stj, params=p, causal=True, segment_ids=sj,
                                                        chunk_size=4, form=form)[0] * R)
    xj = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    g_lin, g_quad = (jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(*xj) for f in ("linear", "quadratic"))
    for a, b in zip(g_lin, g_quad): assert K.relative_error(b, a) < 1e-4


def test_form_choice_and_errors():
    "`form` is validated by name; the cost model takes SLAY's factored quadratic form at short lengths, linear at long ones."
    (q, k, v), am, sg, pos = _inputs()
    with pytest.raises(ValueError, match=r"form='fast' is invalid; allowed: 'auto', 'linear', 'quadratic'"):
        K.attention_core("slay", q, k, v, K.init_state("slay", 2, 8), form="fast")
    with pytest.raises(ValueError, match=r"form='linear' is invalid for kind 'standard'"):
        K.attention_core("standard", q, k, v, form="linear")
    F, W = K.feature_dim("slay", 16, **K.budget_params("slay", "paper")), 2 * 32 + 16  # F = R·P·M, quadratic width R·M + P
    assert F == 1024 and K.feature_dim("slay", 16) == K.FEATURES_PER_HEAD_DIM * 16
    for segments in (False, True):
        assert K.choose_form(128, F, 16, width=W, segments=segments) == "quadratic"
        assert K.choose_form(1 << 14, F, 16, width=W, segments=segments) == "linear"
    assert K.choose_form(128, 64, 16, scaled=True) == "linear"  # performer, unpacked: Σφ(k)vᵀ is cheap
    c = K.form_costs(128, F, 16, width=W, segments=True)
    assert c["quadratic"] < c["linear"] / 3


def test_fused_slay_features_match_per_node_blocks():
    "The fused feature map (one projection u·ω, one outer product) equals poly ⊗ (√w_r prf_r over nodes r), in float64; JAX's too."
    (q, _, _), _, _, _ = _inputs()
    p = dict(K.small_params("slay"), num_quad_nodes=3)
    st = K.init_state("slay", 2, 8, seed=1, **p)
    u = q / np.sqrt((q * q).sum(-1, keepdims=True) + K.UNIT_NORM_EPS)
    s, w = K.laguerre_nodes(3, p["epsilon"])
    proj = np.einsum("bhld,hdm->bhlm", u, st["anchors"].astype(np.float64))
    poly = proj ** 2 / np.sqrt(proj.shape[-1])
    blocks = []
    for s_r, w_r in zip(s, w):
        e = np.clip(np.sqrt(2 * s_r) * np.einsum("bhld,hdm->bhlm", u, st["omega"].astype(np.float64)) - s_r, -30, 30)
        prf = np.exp(e) / np.sqrt(st["omega"].shape[-1])
        blocks.append(np.sqrt(w_r) * prf)  # [B, H, L, M]
    want = (poly[..., :, None, None] * np.stack(blocks, -2)[..., None, :, :]).reshape(*poly.shape[:3], -1)  # P·R·M
    ctx = K.FeatureContext(np, "query", None, None, False, 7)
    st64 = {n: a.astype(np.float64) for n, a in st.items()}
    np.testing.assert_allclose(K.get_kind("slay").features(q, st64, p, ctx), want, rtol=1e-12, atol=1e-15)
    import jax, jax.numpy as jnp
    with jax.enable_x64(True):  # the JAX map builds the product with einsum (a dot_general): same layout, same numbers
        got = K.get_kind("slay").features(jnp.asarray(q), {n: jnp.asarray(a) for n, a in st64.items()}, p,
                                          K.FeatureContext(jnp, "query", None, None, False, 7))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-15)
