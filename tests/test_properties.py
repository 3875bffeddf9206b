"""Property-based tests (hypothesis) of the attention kernels, every registered kind, numpy float64, torch and JAX.

Random shapes, masks (fully padded rows included), packed-document layouts, positions, scales and causality; the
properties: finite outputs, padding invariance, no attention across documents, no attention to the future, and
torch == JAX. A fixed seed (`derandomize=True`) and a small example budget in `make test`; `SLOW_EXAMPLES` under
`@pytest.mark.slow`."""
import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, given, settings, strategies as st

from minibert_lab import kernels as K

KINDS = K.ATTENTION_TYPES
EXAMPLES, SLOW_EXAMPLES = 4, 40     # per kind and property: default suite / slow suite
INVARIANCE_ATOL = 1e-9              # float64: a change that should not move an output moves it by at most this
SCALES = (1e-3, 1e-1, 1.0, 10.0, 1e2)
# Where float32 cannot hold the features the float64 oracle uses: FAVOR+ products exp(ωᵀq − max)·exp(ωᵀk − max) underflow
# to 0 once q·k/√D spans hundreds, and elu+1 of a key below −87 is 0 (a row whose keys are all that negative has no
# weight left); the float32 comparison of those kinds stops at the largest scale where their features are representable
FP32_MAX_SCALE = {"performer": 1.0, "linear": 10.0}


def _max_len(kind, n):
    "At most `n` tokens, and no more than the kind's position range (cosformer's with its small parameters)."
    spec = K.get_kind(kind)
    return n if spec.max_position is None else min(n, spec.max_position(K.resolve_params(kind, K.small_params(kind))))


def _settings(n):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def cases(draw, max_len=9, max_scale=None):
    "q, k, v float64 [B, H, L, D], segment_ids (contiguous increasing documents, trailing pads; rows may be all pad)."
    B, H, L = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, max_len))
    D = draw(st.sampled_from((2, 4, 8)))
    scale = draw(st.sampled_from([s for s in SCALES if max_scale is None or s <= max_scale]))
    seg = np.zeros((B, L), np.int64)
    for b in range(B):
        real = draw(st.integers(0, L))                                # tokens before the trailing pads
        cuts = sorted(draw(st.sets(st.integers(1, max(real - 1, 1)), max_size=2))) if real > 1 else []
        bounds = [0] + [c for c in cuts if c < real] + [real]
        for d, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])): seg[b, a:e] = d + 1
    pos = np.zeros((B, L), np.int64)
    for b in range(B):
        for d in np.unique(seg[b][seg[b] > 0]): pos[b, seg[b] == d] = np.arange((seg[b] == d).sum())
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    q, k, v = (scale * rng.standard_normal((B, H, L, D)) for _ in range(3))
    return dict(q=q, k=k, v=v, seg=seg, pos=pos, causal=draw(st.booleans()), seed=draw(st.integers(0, 3)))


def _core(kind, c, q=None, k=None, v=None, seg=None, pos=None, **kw):
    p = K.small_params(kind)
    H, D = c["q"].shape[1], c["q"].shape[3]
    state = K.init_state(kind, H, D, seed=c["seed"], **p)
    q, k, v = (c[n] if a is None else a for n, a in (("q", q), ("k", k), ("v", v)))
    seg, pos = c["seg"] if seg is None else seg, c["pos"] if pos is None else pos
    return K.attention_core(kind, q, k, v, state, params=p, segment_ids=seg, position_ids=pos, causal=c["causal"],
                            chunk_size=3, **kw)[0]


def _check_finite_and_local(kind, c):
    out = _core(kind, c)
    assert np.isfinite(out).all()
    real = c["seg"] > 0
    assert np.all(out.transpose(0, 2, 1, 3)[~real] == 0)                   # pad queries give exact zeros
    rng = np.random.default_rng(1)
    B, H, L, D = c["q"].shape
    # padding: append 2 pads with wild content
    pad = lambda a: np.concatenate([a, 50 * rng.standard_normal((B, H, 2, D))], axis=2)
    widen = lambda a: np.concatenate([a, np.zeros((B, 2), a.dtype)], axis=1)
    out2 = _core(kind, c, pad(c["q"]), pad(c["k"]), pad(c["v"]), widen(c["seg"]), widen(c["pos"]))
    np.testing.assert_allclose(out2[:, :, :L], out, atol=INVARIANCE_ATOL * max(1, np.abs(out).max()), rtol=1e-7)
    # documents: perturbing every other document of a row leaves this one's outputs unchanged
    for b in range(B):
        for d in np.unique(c["seg"][b][c["seg"][b] > 0]):
            other = (c["seg"][b] != d)
            q2, k2, v2 = (a.copy() for a in (c["q"], c["k"], c["v"]))
            for a in (q2, k2, v2): a[b, :, other] += 30 * rng.standard_normal(a[b, :, other].shape)
            out3 = _core(kind, c, q2, k2, v2)
            mine = c["seg"][b] == d
            np.testing.assert_allclose(out3[b, :, mine], out[b, :, mine], atol=INVARIANCE_ATOL * max(1, np.abs(out).max()), rtol=1e-7)
    # the future: with causal attention, perturbing positions > t leaves positions <= t unchanged
    if c["causal"] and L > 1:
        t = L // 2
        q2, k2, v2 = (a.copy() for a in (c["q"], c["k"], c["v"]))
        for a in (q2, k2, v2): a[:, :, t + 1:] += 30 * rng.standard_normal(a[:, :, t + 1:].shape)
        np.testing.assert_allclose(_core(kind, c, q2, k2, v2)[:, :, :t + 1], out[:, :, :t + 1],
                                   atol=INVARIANCE_ATOL * max(1, np.abs(out).max()), rtol=1e-7)


def _check_frameworks(kind, c):
    "torch float32 and JAX float32 (jitted) agree with each other and with float64, within the oracle tolerance."
    ref = _core(kind, c)
    cond = K.weights_condition(K.reference_attention(kind, c["q"], c["k"], c["v"],
                                                    K.init_state(kind, c["q"].shape[1], c["q"].shape[3], seed=c["seed"],
                                                                 **K.small_params(kind)),
                                                    params=K.small_params(kind), segment_ids=c["seg"],
                                                    position_ids=c["pos"], causal=c["causal"])[1])
    t = lambda a: torch.tensor(a, dtype=torch.float32)
    ot = _core(kind, c, t(c["q"]), t(c["k"]), t(c["v"]), torch.as_tensor(c["seg"]), torch.as_tensor(c["pos"]))
    p = K.small_params(kind)
    st = {n: jnp.asarray(a) for n, a in K.init_state(kind, c["q"].shape[1], c["q"].shape[3], seed=c["seed"], **p).items()}
    f = jax.jit(lambda q, k, v, seg, pos: K.attention_core(kind, q, k, v, st, params=p, segment_ids=seg, position_ids=pos,
                                                           causal=c["causal"], chunk_size=3)[0])
    oj = f(*(jnp.asarray(c[n], jnp.float32) for n in ("q", "k", "v")), jnp.asarray(c["seg"]), jnp.asarray(c["pos"]))
    for o in (ot, oj): assert np.isfinite(K.to_numpy64(o)).all()
    tol = K.ORACLE_RTOL_FP32 * cond * 10       # float32 at scales up to 1e2: ten times the oracle's unit tolerance
    assert K.relative_error(ot, ref) < tol and K.relative_error(oj, ref) < tol and K.relative_error(oj, ot) < tol


@pytest.mark.parametrize("kind", KINDS)
def test_finite_padding_documents_future(kind):
    given(cases())(_settings(EXAMPLES)(lambda c: _check_finite_and_local(kind, c)))()


@pytest.mark.parametrize("kind", KINDS)
def test_torch_equals_jax(kind):
    given(cases(max_len=_max_len(kind, 7), max_scale=FP32_MAX_SCALE.get(kind)))(_settings(1)(lambda c: _check_frameworks(kind, c)))()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_finite_padding_documents_future_many(kind):
    given(cases(max_len=_max_len(kind, 33)))(_settings(SLOW_EXAMPLES)(lambda c: _check_finite_and_local(kind, c)))()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_torch_equals_jax_many(kind):
    given(cases(max_len=_max_len(kind, 17), max_scale=FP32_MAX_SCALE.get(kind)))(
        _settings(SLOW_EXAMPLES // 4)(lambda c: _check_frameworks(kind, c)))()


@given(st.lists(st.integers(-2, 4), min_size=1, max_size=8), st.lists(st.integers(-1, 2), min_size=1, max_size=8))
@_settings(60)
def test_validate_masks_is_a_value_error_or_nothing(seg, am):
    "Any integer masks: `validate_masks` returns or raises ValueError; what it accepts, the kernels handle."
    L = min(len(seg), len(am))
    seg, am = np.array([seg[:L]]), np.array([am[:L]])
    for kw in (dict(segment_ids=seg), dict(attention_mask=am), dict(segment_ids=seg, attention_mask=am)):
        try: K.validate_masks(**kw)
        except ValueError: continue
        (q, k, v), _, _, _ = K.random_inputs(B=1, H=1, L=L, D=4)
        out, _ = K.attention_core("linear", q, k, v, causal=True, chunk_size=2, **kw)
        ref, _ = K.reference_attention("linear", q, k, v, causal=True, **kw)
        np.testing.assert_allclose(out, ref, atol=1e-9)
