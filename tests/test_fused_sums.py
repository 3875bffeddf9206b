"""The fused sums of linear attention (Triton for torch, Pallas for JAX) against the plain path `linear_sums` and
float64 in their interpreters on CPU (the notebooks check each mode once; the full grid with gradients is slow), the
dispatch inside `attention_core`, and on a CUDA GPU (marked cuda; `tools/gpu_check.sh` runs them)."""
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp

from minibert_lab import kernels as K
from minibert_lab.kernels.chunks import SUM_MODES, chunked_sums_numpy, plain_linear_sums
from minibert_lab.torch import triton_linear as TL
from minibert_lab.jax import pallas_linear as PL

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32 kernels vs float64 sums, relative to the largest entry


def _case(L, packed, B=3, H=2, F=5, E=6, seed=0):
    "Non-negative features, values and (packed) contiguous documents with pads at the end of row 0, float64 numpy."
    rng = np.random.default_rng(seed)
    fq, fk = rng.random((2, B, H, L, F))
    v = rng.standard_normal((B, H, L, E))
    if not packed: return fq, fk, v, None
    seg = np.ones((B, L), np.int64)
    seg[0, L // 3:] = 2; seg[0, L - 2:] = 0
    seg[2, L // 2:] = 2; seg[2, L - L // 4:] = 3
    return fq, fk * (seg != 0)[:, None, :, None], v, seg


def _ref(fq, fk, v, seg, mode):
    "float64 sums of `mode`, from the plain path (anti-causal: causal on the reversed sequence)."
    if mode != "anticausal": return K.linear_sums(fq, fk, v, seg, mode == "causal", 16)
    fl = lambda a, ax=2: None if a is None else np.flip(a, ax)
    return fl(K.linear_sums(fl(fq), fl(fk), fl(v), fl(seg, 1), True, 16))


def _rel(a, b): return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _grads_ref(fq, fk, v, seg, mode, w):
    "float64 gradients of `(sums · w).sum()` through the plain path (torch autograd)."
    x = [torch.tensor(a, requires_grad=True) for a in (fq, fk, v)]
    fl = lambda a, ax=2: None if a is None else torch.flip(a, (ax,))
    s = None if seg is None else torch.as_tensor(seg)
    out = (fl(K.linear_sums(*(fl(a) for a in x), fl(s, 1), True, 16)) if mode == "anticausal"
           else K.linear_sums(*x, s, mode == "causal", 16))
    (out * torch.as_tensor(w, dtype=torch.float64)).sum().backward()
    return [a.grad.numpy() for a in x]


needs_interpreter = pytest.mark.skipif(not TL.HAS_TRITON or not TL.interpreting(),
                                       reason="needs the `triton` package (a dev dependency on Linux x86-64 only: no wheel "
                                              "elsewhere) in interpreter mode (on a CUDA machine the GPU tests run instead)")


def _triton(fq, fk, v, seg, mode, grads):
    x = [torch.tensor(a, dtype=torch.float32, requires_grad=grads) for a in (fq, fk, v)]
    out = TL.triton_linear_sums(*x, None if seg is None else torch.as_tensor(seg), mode, 16)
    if not grads: return out.detach().numpy(), None
    (out * torch.linspace(-1, 1, v.shape[-1])).sum().backward()
    return out.detach().numpy(), [a.grad.numpy() for a in x]


def _pallas(fq, fk, v, seg, mode, grads):
    x = [jnp.asarray(a, jnp.float32) for a in (fq, fk, v)]
    f = lambda *a: PL.pallas_linear_sums(*a, seg, mode, 16, interpret=True)
    out = f(*x)
    if not grads: return np.asarray(out), None
    w = jnp.linspace(-1, 1, v.shape[-1])
    return np.asarray(out), [np.asarray(g) for g in jax.grad(lambda *a: (f(*a) * w).sum(), argnums=(0, 1, 2))(*x)]


FUSED = {"triton": pytest.param(_triton, marks=needs_interpreter, id="triton"), "pallas": pytest.param(_pallas, id="pallas")}


def _check(fused, L, mode, packed, grads, F=5, E=6):
    fq, fk, v, seg = _case(L, packed, F=F, E=E)
    out, g = fused(fq, fk, v, seg, mode, grads)
    ref = _ref(fq, fk, v, seg, mode)
    assert _rel(out, ref) < TOL
    assert _rel(chunked_sums_numpy(fq, fk, v, seg, mode, 16), ref) < 1e-12  # the kernels' numpy twin
    if grads:
        for a, b in zip(g, _grads_ref(fq, fk, v, seg, mode, np.linspace(-1, 1, v.shape[-1]))): assert _rel(a, b) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("fused", FUSED.values())
@pytest.mark.parametrize("L", (7, 37))
@pytest.mark.parametrize("mode", SUM_MODES)
@pytest.mark.parametrize("packed", (False, True))
def test_fused_sums_grid(fused, L, mode, packed):
    _check(fused, L, mode, packed, grads=True)


@pytest.mark.slow
@pytest.mark.parametrize("fused", FUSED.values())
def test_fused_sums_wide(fused):
    "Features and values wider than one block (F = 40, E = 70: several F and E blocks in both kernels)."
    _check(fused, 37, "bidirectional", True, grads=False, F=40, E=70)


@pytest.mark.slow
@pytest.mark.skipif(not TL.HAS_TRITON, reason="needs the `triton` package (a dev dependency on Linux x86-64 only: no wheel elsewhere)")
def test_triton_compiles_for_hopper_without_gpu():
    "The kernels compile to PTX for sm_90 (H100/H200) on a machine without a GPU (catches GPU-only compile errors)."
    code = """
import triton  # compiled, not interpreted: this process never sets TRITON_INTERPRET
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from minibert_lab.torch import triton_linear as TL
TL.triton, TL.tl = triton, triton.language
target = GPUTarget("cuda", 90, 32)
ints = dict(L="i32", F="i32", E="i32", N="i32", H="i32")
states = dict(fk="*fp32", v="*fp32", tail="*fp32", keep="*fp32", h="*fp32", **ints,
              C="constexpr", BF="constexpr", BE="constexpr", REVERSE="constexpr", PREC="constexpr")
outputs = dict(fq="*bf16", fk="*bf16", v="*bf16", seg="*i32", see_f="*fp32", see_r="*fp32", hf="*fp32", hr="*fp32",
               out="*bf16", **ints, C="constexpr", BF="constexpr", BE="constexpr", MODE="constexpr", PREC="constexpr")
for rev in (False, True):
    k = triton.compile(ASTSource(triton.jit(TL._states_kernel), states,
                                 constexprs=dict(C=64, BF=32, BE=32, REVERSE=rev, PREC="ieee")), target=target)
    assert ".entry" in k.asm["ptx"]
for mode in TL.MODE_CODE.values():
    k = triton.compile(ASTSource(triton.jit(TL._output_kernel), outputs,
                                 constexprs=dict(C=64, BF=64, BE=64, MODE=mode, PREC="ieee")), target=target)
    assert ".entry" in k.asm["ptx"]
print("compiled")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + sys.path)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", SUM_MODES)
def test_pallas_lowers_for_cuda_without_gpu(mode):
    "Forward and gradient lower through Pallas' Triton backend for CUDA on a machine without a GPU (jax.export)."
    from jax import export
    B, H, L, F, E = 2, 4, 1000, 160, 65
    sds = ([jax.ShapeDtypeStruct((B, H, L, F), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((B, H, L, E), jnp.float32),
           jax.ShapeDtypeStruct((B, L), jnp.int32)])
    f = lambda a, b, c, s: (PL.pallas_linear_sums(a, b, c, s, mode, 64, interpret=False) * c).sum()
    ok = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for fn in (f, jax.grad(f, argnums=(0, 1, 2))):
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=ok)(*sds)
        assert "xla.gpu.triton" in exp.mlir_module()


def test_attention_core_dispatch_jax(monkeypatch):
    "On a (pretended) GPU, `attention_core` of a feature-map kind routes causal/packed sums through the Pallas entry."
    calls = []
    real = PL.pallas_linear_sums
    def spy(*a, interpret=None, **kw):
        calls.append(a[4])
        return real(*a, interpret=True, **kw)
    monkeypatch.setattr(PL.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(PL, "fused_ready", lambda: True)
    monkeypatch.setattr(PL, "pallas_linear_sums", spy)
    (q, k, v), am, sg, pos = K.random_inputs(B=3, H=2, L=7, D=8, seed=0)
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    fused, _ = K.attention_core("linear", q, k, v, causal=True, segment_ids=jnp.asarray(sg), form="linear")
    assert calls == ["causal"]
    K.attention_core("linear", q, k, v, form="linear")  # unpacked bidirectional: two matmuls, the plain path
    p = K.small_params("performer"); st = K.init_state("performer", 2, 8, seed=0, **p)
    K.attention_core("performer", q, k, v, st, params=p, causal=True, form="linear")  # key log-scales: the plain path
    assert calls == ["causal"]
    with plain_linear_sums(): plain, _ = K.attention_core("linear", q, k, v, causal=True, segment_ids=jnp.asarray(sg), form="linear")
    assert _rel(fused, np.asarray(plain, np.float64)) < TOL


def test_dispatch_declines_on_cpu():
    "On CPU tensors and arrays both entries return None, so `linear_sums` is the plain path."
    fq, fk, v, seg = _case(7, True)
    t = [torch.tensor(a, dtype=torch.float32) for a in (fq, fk, v)]
    assert TL.fused_sums(*t, torch.as_tensor(seg), True, 64, None) is None
    if jax.default_backend() != "gpu":
        assert PL.fused_sums(*(jnp.asarray(a, jnp.float32) for a in (fq, fk, v)), jnp.asarray(seg), True, 64, None) is None
    assert {TL.fused_sums, PL.fused_sums} <= set(K.FAST_LINEAR_SUMS)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("kind", ("linear", "cosformer", "slay"))
def test_cuda_attention_core_uses_triton(kind, monkeypatch):
    "On CUDA, `attention_core` of feature-map kinds takes the Triton sums (causal, packed) and matches the plain path."
    calls = []
    real = TL.triton_linear_sums
    monkeypatch.setattr(TL, "triton_linear_sums", lambda *a, **kw: calls.append(a[4]) or real(*a, **kw))
    dev = torch.device("cuda")
    (q, k, v), am, sg, pos = K.random_inputs(B=3, H=2, L=300, D=16, seed=0)
    p = K.small_params(kind); st = {n: torch.tensor(a, device=dev) for n, a in K.init_state(kind, 2, 16, seed=0, **p).items()}
    x = [torch.tensor(a, dtype=torch.float32, device=dev) for a in (q, k, v)]
    s = torch.as_tensor(sg, device=dev)
    for causal in (True, False):
        out, _ = K.attention_core(kind, *x, st, params=p, causal=causal, segment_ids=s, form="linear")
        with plain_linear_sums(): ref, _ = K.attention_core(kind, *x, st, params=p, causal=causal, segment_ids=s, form="linear")
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert calls == ["causal", "bidirectional"]


@pytest.mark.cuda
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a JAX GPU backend")
def test_gpu_attention_core_uses_pallas():
    "On a JAX GPU backend, the jitted causal packed `attention_core` of `linear` uses the Pallas sums and matches."
    (q, k, v), am, sg, pos = K.random_inputs(B=3, H=2, L=300, D=16, seed=0)
    x = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    f = jax.jit(lambda *a: K.attention_core("linear", *a, causal=True, segment_ids=jnp.asarray(sg), form="linear")[0])
    out = f(*x)
    assert PL.fused_ready()
    with plain_linear_sums(): ref = jax.jit(lambda *a: K.attention_core("linear", *a, causal=True, segment_ids=jnp.asarray(sg), form="linear")[0])(*x)
    assert float(jnp.abs(out - ref).max()) <= 1e-4 * float(jnp.abs(ref).max())


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode", SUM_MODES)
def test_cuda_triton_modes_long(mode):
    "Compiled Triton kernels on CUDA at many chunks and SLAY-wide features, float32 to 1e-5 and bf16 finite, with gradients."
    fq, fk, v, seg = _case(2000, True, B=2, H=4, F=160, E=65)
    ref = _ref(fq, fk, v, seg, mode)
    dev = torch.device("cuda")
    x = [torch.tensor(a, dtype=torch.float32, device=dev, requires_grad=True) for a in (fq, fk, v)]
    out = TL.triton_linear_sums(*x, torch.as_tensor(seg, device=dev), mode, 64)
    assert _rel(out.detach().cpu().numpy(), ref) < TOL
    w = np.linspace(-1, 1, v.shape[-1])
    (out * torch.as_tensor(w, dtype=torch.float32, device=dev)).sum().backward()
    for a, b in zip(x, _grads_ref(fq, fk, v, seg, mode, w)): assert _rel(a.grad.cpu().numpy(), b) < TOL
    bf = TL.triton_linear_sums(*(a.detach().bfloat16() for a in x), torch.as_tensor(seg, device=dev), mode, 64)
    assert torch.isfinite(bf).all() and _rel(bf.float().cpu().numpy(), ref) < 3e-2


@pytest.mark.cuda
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a JAX GPU backend")
@pytest.mark.parametrize("mode", SUM_MODES)
def test_gpu_pallas_modes_long(mode):
    "Compiled Pallas kernels on the GPU at many chunks and SLAY-wide features, float32 to 1e-5, with gradients."
    fq, fk, v, seg = _case(2000, True, B=2, H=4, F=160, E=65)
    ref = _ref(fq, fk, v, seg, mode)
    x = [jnp.asarray(a, jnp.float32) for a in (fq, fk, v)]
    f = lambda *a: PL.pallas_linear_sums(*a, seg, mode, 64, interpret=False)
    assert _rel(f(*x), ref) < TOL
    w = np.linspace(-1, 1, v.shape[-1])
    g = jax.grad(lambda *a: (f(*a) * jnp.asarray(w, jnp.float32)).sum(), argnums=(0, 1, 2))(*x)
    for a, b in zip(g, _grads_ref(fq, fk, v, seg, mode, w)): assert _rel(a, b) < TOL
