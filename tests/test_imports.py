"Layering: every import inside `minibert_lab` (top level, in functions, relative) points down the LAYERS table, and none forms a cycle."
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "minibert_lab"

# module (or package) name -> rank; a module may import only modules of rank <= its own, and no cycles.
# A key also covers its submodules (`minibert_lab.kernels` covers `minibert_lab.kernels.core`); the longest key wins.
LAYERS = {
    "minibert_lab": 0,                    # the package __init__ (version only)
    "minibert_lab._modidx": 0,            # nbdev's symbol index (data only)
    "minibert_lab.kernels": 0,            # the math, framework-neutral
    "minibert_lab.kernels.blockwise": 0,  # exact kinds tile by tile (fills core's EXACT_MEMORY_PATHS; core never imports it)
    "minibert_lab.config": 1,
    "minibert_lab.generation": 1,        # logits processors, token selection, beam bookkeeping (array API only)
    "minibert_lab.causal": 1,             # causal-LM helpers: next-token labels, prompt checks, the generate driver (array API)
    "minibert_lab.heads": 1,              # head kinds, losses (array API), metrics: config, numpy, sklearn, scipy only
    "minibert_lab.adapters": 1,           # adapter configs/presets, target names, quantization schemes (config only)
    "minibert_lab.attention_spec": 2,
    "minibert_lab.viz": 2,                # plots only: it may use kernels and config, never models, data or train
    "minibert_lab.torch": 3,              # package __init__
    "minibert_lab.jax": 3,                # package __init__
    "minibert_lab.torch.triton_linear": 3,  # fused Triton sums of linear attention (kernels only; registered in kernels.core)
    "minibert_lab.jax.pallas_linear": 3,    # fused Pallas sums of linear attention
    "minibert_lab.torch.attention": 3,
    "minibert_lab.jax.attention": 3,
    "minibert_lab.torch.models": 4,
    "minibert_lab.jax.models": 4,
    "minibert_lab.torch.causal": 4,       # causal LMs on the encoder blocks
    "minibert_lab.jax.causal": 4,
    "minibert_lab.torch.heads": 4,        # task heads on the encoders
    "minibert_lab.jax.heads": 4,
    "minibert_lab.torch.adapters": 4,     # peft adapters and torchao quantization on the torch models
    "minibert_lab.jax.adapters": 4,       # nnx.LoRA adapters, group-wise quantized linears, torch <-> JAX adapter conversion
    "minibert_lab.convert": 5,
    "minibert_lab.hf": 6,
    "minibert_lab.data": 7,
    "minibert_lab.pairs": 7,             # packaged text pairs (dialogue, Lee similarity): data and tasks only
    "minibert_lab.tasks": 7,             # packaged labelled tasks: may use config and data, never models or train
    "minibert_lab.train": 8,              # the loop library
    "minibert_lab.torch.train": 9,        # its backends
    "minibert_lab.jax.train": 9,
    "minibert_lab.pretrain": 10,          # the application: backend factory, pretrain, lab, MFU
    "minibert_lab.embeddings": 10,        # sentence embeddings: encode, sentence-transformers folders, contrastive losses and training
    "minibert_lab.finetune": 10,          # the fine-tuning application: task backends, finetune, evaluate, predict
    "minibert_lab.quantize": 10,          # quantize a trained model; finetune with adapters / a quantized base
    "minibert_lab.bench.harness": 8,     # measurement library: timing, memory, FLOP models, the matmul peak (used by the application)
    "minibert_lab.bench": 11,
    "minibert_lab.cli": 12,               # wires the commands; nothing imports it
}
# package __init__ keys that stand for themselves only (a new module under them must get its own entry)
EXACT = {"minibert_lab", "minibert_lab.torch", "minibert_lab.jax"}


def rank_of(module: str, layers=LAYERS) -> int | None:
    "Rank of `module` by the longest matching key of `layers` (None: not in the table)."
    best = None
    for key in layers:
        if module == key or (key not in EXACT and module.startswith(key + ".")):
            if best is None or len(key) > len(best): best = key
    return None if best is None else layers[best]


def module_name(path: Path, root: Path = ROOT) -> str:
    "Dotted module name of a file under the package (`minibert_lab/torch/__init__.py` -> `minibert_lab.torch`)."
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__": parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    "Internal modules imported anywhere in `source` (functions included), relative imports resolved, with line numbers."
    out = []
    base = module.split(".") if is_package else module.split(".")[:-1]   # the package a relative import starts from
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name == PKG or a.name.startswith(PKG + ".")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - (node.level - 1)]
                target = ".".join(pkg + ([node.module] if node.module else []))
            else: target = node.module or ""
            if not (target == PKG or target.startswith(PKG + ".")): continue   # third party
            for a in node.names:                    # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                out.append((sub if sub in known or any(k == sub for k in LAYERS) else target, node.lineno))
    return out


def import_graph(files: dict[str, tuple[str, bool]]) -> dict[str, list[tuple[str, int]]]:
    "module -> its internal imports, for `files` = {module: (source, is_package)}."
    known = set(files)
    return {m: imported_modules(src, m, pkg, known) for m, (src, pkg) in files.items()}


def violations(files: dict[str, tuple[str, bool]], layers=LAYERS) -> list[str]:
    "Modules missing from `layers`, upward imports, and import cycles, as readable lines."
    graph, errs = import_graph(files), []
    for m in sorted(graph):
        if rank_of(m, layers) is None:
            errs.append(f"{m} is not in LAYERS; add it to LAYERS in tests/test_imports.py with its rank"); continue
        for target, line in graph[m]:
            r = rank_of(target, layers)
            if r is None: errs.append(f"{m}:{line} imports {target}, which is not in LAYERS; add it to LAYERS")
            elif r > rank_of(m, layers):
                errs.append(f"{m}:{line} imports {target} (rank {r}) from rank {rank_of(m, layers)}: an upward import")
    # cycles (same-rank imports are allowed only without them), by depth-first search
    edges = {m: sorted({t for t, _ in imps if t in graph and t != m}) for m, imps in graph.items()}
    state, stack = {}, []
    def visit(m):
        state[m] = 1; stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1: errs.append("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state: visit(t)
        state[m] = 2; stack.pop()
    for m in sorted(edges):
        if m not in state: visit(m)
    return errs


def package_files(root: Path = ROOT) -> dict[str, tuple[str, bool]]:
    return {module_name(p, root): (p.read_text(), p.name == "__init__.py") for p in sorted((root / PKG).rglob("*.py"))}


def test_imports_point_down_the_layers():
    files = package_files()
    assert {"minibert_lab.train", "minibert_lab.pretrain", "minibert_lab.cli"} <= set(files)
    errs = violations(files)
    assert not errs, "\n".join(errs)


def test_checker_catches_upward_imports_cycles_and_unlisted_modules():
    "Synthetic sources: each kind of violation is reported (function-level and relative imports included)."
    ok = {"minibert_lab.config": ("import json\nfrom .kernels import ATTENTION_TYPES\n", False),
          "minibert_lab.kernels": ("import numpy as np\n", False)}
    assert violations(ok) == []
    up = {**ok, "minibert_lab.train": ("def f():\n    from .pretrain import make_backend\n", False),
          "minibert_lab.pretrain": ("from minibert_lab.train import fit\n", False)}
    errs = violations(up)
    assert any("minibert_lab.train:2 imports minibert_lab.pretrain" in e and "upward" in e for e in errs), errs
    assert any(e.startswith("import cycle") for e in errs), errs
    rel = {"minibert_lab.torch.models": ("from ..train import decays\nfrom . import attention\n", False),
           "minibert_lab.torch.attention": ("from .. import kernels\n", False), **ok}
    errs = violations(rel)
    assert errs == [f"minibert_lab.torch.models:1 imports minibert_lab.train (rank 8) from rank 4: an upward import"], errs
    same = {"minibert_lab.data": ("from minibert_lab import viz\n", False), "minibert_lab.viz": ("from . import data\n", False)}
    assert any(e.startswith("import cycle") for e in violations(same))           # same rank, but a cycle
    new = violations({"minibert_lab.torch.extra": ("import torch\n", False)})
    assert new and "add it to LAYERS" in new[0]
    assert rank_of("minibert_lab.kernels.core") == 0 and rank_of("minibert_lab.bench.attention") == 11
    assert rank_of("minibert_lab.torch.extra") is None


def test_resolves_relative_and_function_level_imports():
    src = "from . import attention\nfrom ..config import ModelConfig\ndef f():\n    import minibert_lab.data\n    from minibert_lab.jax import models\n"
    got = [t for t, _ in imported_modules(src, "minibert_lab.torch.models", False,
                                          {"minibert_lab.torch.attention", "minibert_lab.jax.models"})]
    assert got == ["minibert_lab.torch.attention", "minibert_lab.config", "minibert_lab.data", "minibert_lab.jax.models"]
