"""Fused linear-attention sums (Triton, Pallas) against the plain path `linear_sums`: forward + backward time.

    python tools/bench_fused.py --out runs/gpu_check            # on a GPU (tools/gpu_check.sh runs it)
    python tools/bench_fused.py --quick --out /tmp/fused        # CPU plumbing check: interpreters, tiny sizes

For each framework, mode (causal, packed causal, packed bidirectional), length L and feature width F, times
`grad((sums * w).sum())` of both paths (same inputs, interleaved, median of --reps after warm-up) and writes
fused.json and fused.md (ratio = plain time / fused time; > 1: the kernels are faster). The documents of packed rows
are 512 tokens long. On CPU (--quick) the kernels run in their interpreters and the ratios mean nothing.
"""
import argparse, json, os, platform, statistics, sys, time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = (("causal", False), ("causal", True), ("bidirectional", True))  # (mode, packed)
DOC = 512  # tokens per packed document


def inputs(B, H, L, F, E, packed, seed=0):
    "Non-negative features, values and (packed) document ids, float32 numpy."
    rng = np.random.default_rng(seed)
    fq, fk = (rng.random((B, H, L, F), dtype=np.float32) / F for _ in range(2))
    v = rng.standard_normal((B, H, L, E), dtype=np.float32)
    seg = (np.arange(L)[None, :] // DOC + 1).repeat(B, 0) if packed else None  # [B, L]
    return fq, fk, v, seg


def timed(fn, reps):
    "Median seconds of `fn()` (which synchronises) over `reps` runs."
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def torch_pair(B, H, L, F, E, mode, packed, C, interp):
    import torch
    from minibert_lab.kernels.core import linear_sums
    from minibert_lab.kernels.chunks import plain_linear_sums
    from minibert_lab.torch.triton_linear import triton_linear_sums
    dev = "cpu" if interp else "cuda"
    fq, fk, v, seg = inputs(B, H, L, F, E, packed)
    x = [torch.tensor(a, device=dev, requires_grad=True) for a in (fq, fk, v)]
    s = None if seg is None else torch.as_tensor(seg, device=dev)
    w = torch.linspace(-1, 1, E, device=dev)
    sync = (lambda: torch.cuda.synchronize()) if dev == "cuda" else (lambda: None)
    def plain():
        with plain_linear_sums(): (linear_sums(*x, s, mode == "causal", C) * w).sum().backward()
        sync()
    def fused():
        (triton_linear_sums(*x, s, mode, C) * w).sum().backward()
        sync()
    return plain, fused


def jax_pair(B, H, L, F, E, mode, packed, C, interp):
    import jax, jax.numpy as jnp
    from minibert_lab.kernels.core import linear_sums
    from minibert_lab.kernels.chunks import plain_linear_sums
    from minibert_lab.jax.pallas_linear import pallas_linear_sums
    fq, fk, v, seg = inputs(B, H, L, F, E, packed)
    x = [jnp.asarray(a) for a in (fq, fk, v)]
    s = None if seg is None else jnp.asarray(seg, jnp.int32)
    w = jnp.linspace(-1, 1, E)
    def plain_loss(*a):
        with plain_linear_sums(): return (linear_sums(*a, s, mode == "causal", C) * w).sum()
    fused_loss = lambda *a: (pallas_linear_sums(*a, s, mode, C, interpret=interp) * w).sum()
    gp, gf = (jax.jit(jax.grad(f, argnums=(0, 1, 2))) for f in (plain_loss, fused_loss))
    return (lambda: jax.block_until_ready(gp(*x))), (lambda: jax.block_until_ready(gf(*x)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "runs/gpu_check"))
    p.add_argument("--quick", action="store_true", help="CPU interpreters, tiny sizes (plumbing only)")
    p.add_argument("--framework", action="append", choices=("torch", "jax"), default=None)
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--features", default="64,256", help="feature widths F (linear: head size; SLAY: hundreds)")
    p.add_argument("--batch", type=int, default=2); p.add_argument("--heads", type=int, default=4)
    p.add_argument("--values", type=int, default=65, help="E = head size + 1 (the normaliser column)")
    p.add_argument("--chunk", type=int, default=64); p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    if a.quick: a.lengths, a.features, a.batch, a.heads, a.values, a.chunk, a.reps = "100", "8", 1, 2, 5, 16, 1
    interp = a.quick
    if interp: os.environ.setdefault("TRITON_INTERPRET", "1")
    meta = dict(machine=platform.node(), quick=a.quick, load=os.getloadavg(), argv=sys.argv[1:])
    try:
        import torch
        if torch.cuda.is_available(): meta["gpu"] = torch.cuda.get_device_name()
    except Exception: pass
    rows = []
    for F in map(int, a.features.split(",")):  # frameworks innermost: a run cut short still has both
        for L in map(int, a.lengths.split(",")):
            for mode, packed in CASES:
                for fw in a.framework or ("torch", "jax"):
                    make = torch_pair if fw == "torch" else jax_pair
                    row = dict(framework=fw, mode=mode, packed=packed, L=L, F=F, B=a.batch, H=a.heads, E=a.values)
                    try:
                        plain, fused = make(a.batch, a.heads, L, F, a.values, mode, packed, a.chunk, interp)
                        plain(); fused(); plain(); fused()  # compile and warm up
                        tp, tf = [], []
                        for _ in range(a.reps):  # interleaved
                            tp.append(timed(plain, 1)); tf.append(timed(fused, 1))
                        row.update(plain_ms=1e3 * statistics.median(tp), fused_ms=1e3 * statistics.median(tf))
                        row["ratio"] = row["plain_ms"] / row["fused_ms"]
                    except Exception as e:  # out of memory at the longest lengths, a lowering error: recorded
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write(Path(a.out), meta, rows)
    print(write(Path(a.out), meta, rows))


def write(out: Path, meta: dict, rows: list) -> str:
    "fused.json and the markdown table fused.md (rewritten after every row, so a run cut short keeps what it measured)."
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = ["| framework | mode | packed | L | F | plain ms | fused ms | plain / fused |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = (f"{r['plain_ms']:.2f} | {r['fused_ms']:.2f} | {r['ratio']:.2f}×" if "ratio" in r
               else f"– | – | {r['error'][:60]}")
        lines.append(f"| {r['framework']} | {r['mode']} | {r['packed']} | {r['L']} | {r['F']} | {res} |")
    (out / "fused.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
