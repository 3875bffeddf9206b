"Benchmarks: the harness (timing, peak memory, analytic FLOPs against torch's FLOP counter, JSON/markdown), the tables, the CLI."
import json, math, os

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minibert_lab import kernels
from minibert_lab.bench import harness
from minibert_lab.bench import approx as bench_approx_mod, attention, models, quality
from minibert_lab.bench.cli import cli_bench

B, L, DIM, H, F = 3, 7, 16, 2, 5   # tiny, odd sizes
V_TINY = 99
F32 = 4


def counted_flops(fn) -> int:
    "FLOPs that torch's own counter sees while `fn` runs (matmuls, linear layers, bmm)."
    with FlopCounterMode(display=False) as fc: fn()
    return fc.get_total_flops()


def test_median_and_iqr():
    t = harness.summarize_times([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median == 3.0 and t.iqr == 2.0 and t.best == 1.0
    with pytest.raises(ValueError, match="times="): harness.summarize_times([])


class VirtualClock:
    "A fake clock: each call of `fn` advances it by `cost` seconds; `log` records calls and clock reads in order."
    def __init__(self, cost): self.now, self.cost, self.log = 0.0, cost, []
    def fn(self): self.now += self.cost; self.log.append("call")
    def clock(self): self.log.append("tick"); return self.now
    @property
    def calls(self): return self.log.count("call")


@pytest.mark.parametrize("framework", [None, "torch", "jax"])
def test_time_fn_warms_up_before_timing(framework):
    "The `warmup` calls come before the first clock read; warm-up is never skipped."
    v = VirtualClock(0.01)
    t = harness.time_fn(v.fn, framework, warmup=3, clock=v.clock)
    assert v.log[:4] == ["call"] * 3 + ["tick"]
    assert v.calls >= 3 + t.calls and t.median == pytest.approx(0.01)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"warmup={bad}"): harness.time_fn(lambda: None, framework, warmup=bad)


@pytest.mark.parametrize("framework", [None, "torch", "jax"])
def test_time_fn_repeats_adapt(framework):
    "A fast function gets blocks of many calls and many calls in all; a slow one is timed call by call; max_time caps."
    fast, slow, slowest = VirtualClock(1e-6), VirtualClock(0.1), VirtualClock(2.0)
    tf = harness.time_fn(fast.fn, framework, min_time=0.05, clock=fast.clock)
    ts = harness.time_fn(slow.fn, framework, min_time=0.05, clock=slow.clock)
    assert tf.number >= 100 and tf.calls * 1e-6 >= 0.05 * 0.99 and tf.calls > 100 * ts.calls, (tf, ts)
    assert ts.number == 1 and ts.measurements == harness.MIN_MEASUREMENTS
    assert harness.time_fn(slow.fn, framework, repeats=7, clock=slow.clock).measurements == 7
    assert harness.time_fn(slowest.fn, framework, max_time=3.0, clock=slowest.clock).measurements == 2


def test_time_fn_pins_torch_threads():
    seen, before = [], torch.get_num_threads()
    harness.time_fn(lambda: seen.append(torch.get_num_threads()), "torch", threads=1, min_time=0.0, max_time=0.01)
    assert set(seen) == {1} and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads=0"): harness.time_fn(lambda: None, "torch", threads=0)


def test_matmul_flops_match_torch_counter():
    a, b = torch.randn(B * L, DIM), torch.randn(DIM, F)
    assert harness.matmul_flops(B * L, DIM, F) == counted_flops(lambda: a @ b)


def test_exact_attention_flops_match_torch_counter():
    "Eager exact attention with projections: the analytic count equals torch's count, forward and forward+backward."
    D = DIM // H
    proj = [torch.nn.Linear(DIM, DIM) for _ in range(4)]
    x = torch.randn(B, L, DIM, requires_grad=True)
    def heads(t): return t.reshape(B, L, H, D).transpose(1, 2)              # [B, H, L, D]
    def fwd():
        q, k, v = (heads(p(x)) for p in proj[:3])
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)      # [B, H, L, L]
        return proj[3]((w @ v).transpose(1, 2).reshape(B, L, DIM))          # [B, L, DIM]
    assert counted_flops(fwd) == harness.attention_flops(B, L, DIM, H)
    # backward: two products per forward product (input and weight gradients; x requires grad), so 3x in all
    assert counted_flops(lambda: fwd().sum().backward()) == harness.attention_flops(B, L, DIM, H, backward=True)


def test_linear_attention_flops_match_torch_counter():
    "Eager linear attention with a projected feature map (D -> F) and all products as matmuls."
    D = DIM // H
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    w = torch.randn(D, F)
    def fwd():
        fq, fk = torch.exp(q @ w), torch.exp(k @ w)                         # [B, H, L, F]
        kv = fk.transpose(-1, -2) @ v                                       # [B, H, F, D]
        z = fk.transpose(-1, -2) @ torch.ones(B, H, L, 1)                   # [B, H, F, 1]
        return (fq @ kv) / (fq @ z)                                         # [B, H, L, D]
    # the registry's FLOP model of a kind with an F-column projected map (performer's shape: F features, W = F)
    assert counted_flops(fwd) == harness.attention_flops(B, L, DIM, H, "performer", projections=False, num_features=F)


def test_torch_peak_memory_of_known_allocations():
    x = torch.randn(64, 64)
    def fn():
        a = x @ x; b = x @ x; c = x @ x          # three 16 KiB buffers alive together
        return a, b, c
    assert abs(harness.torch_peak_memory(fn) - 3 * 64 * 64 * F32) <= 64
    assert harness.torch_peak_memory(lambda: None) == 0


def test_jax_peak_memory_of_known_program():
    import jax, jax.numpy as jnp
    n = 32
    c = jax.jit(lambda a: jnp.tanh(a @ a) @ a).lower(jnp.ones((n, n))).compile()
    assert harness.jax_peak_memory(c) == 2 * n * n * F32       # one temporary, one output


def test_sweep_result_round_trip_and_markdown(tmp_path):
    res = harness.run_sweep(harness.Sweep("m", {"n": (8, 16)}, harness._measure_matmul, min_time=0.01),
                          peaks={"torch": 1e9})
    assert [r["n"] for r in res.rows] == [8, 16]
    assert all(r["median_s"] > 0 and r["memory_method"] == "torch-profiler" for r in res.rows)
    assert res.rows[1]["gflop"] == pytest.approx(2 * 16 ** 3 / 1e9)
    assert res.rows[1]["peak_fraction"] == pytest.approx(res.rows[1]["gflop_s"] * 1e9 / 1e9)
    back = harness.SweepResult.from_json(res.to_json(tmp_path / "m.json"))
    assert back.rows == json.loads((tmp_path / "m.json").read_text())["rows"]
    assert {"cpu", "cores", "versions", "date", "python", "load_before", "load_after", "warnings"} <= set(back.meta)
    assert all(r["measurements"] >= harness.MIN_MEASUREMENTS for r in res.rows)
    md = res.to_markdown(["n", "median_s"])
    assert md.splitlines()[0] == "| n | median_s |" and len(md.splitlines()) == 4


def tiny_sweep(**kw):
    return harness.Sweep("tiny", {"n": (1, 2)}, lambda n, device: harness.Case(run=lambda: None), min_time=0.001, **kw)


def test_sweep_records_pinned_threads():
    before = torch.get_num_threads()
    res = harness.run_sweep(tiny_sweep(), peaks={}, threads=1)
    assert res.meta["torch_threads"] == 1 and torch.get_num_threads() == before
    assert res.meta["xla_cpu_threads"] >= 1 and "xla_flags" in res.meta
    assert harness.run_sweep(tiny_sweep(), peaks={}).meta["torch_threads"] == before


def test_busy_machine_warns(monkeypatch, capsys):
    "A load average above BUSY_LOAD_PER_CORE x cores: one stderr line and `busy` / `warnings` in the result."
    cores = os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (harness.BUSY_LOAD_PER_CORE * cores + 1, 0.0, 0.0))
    res = harness.run_sweep(tiny_sweep(), peaks={})
    err = [l for l in capsys.readouterr().err.splitlines() if "busy" in l]
    assert len(err) == 1 and "load average" in err[0], err
    assert res.meta["busy"] and res.meta["load_before"][0] > cores and any("busy" in w for w in res.meta["warnings"])
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    res = harness.run_sweep(tiny_sweep(), peaks={})
    assert not res.meta["busy"] and "busy" not in capsys.readouterr().err


def test_noisy_measurement_flagged(monkeypatch, capsys):
    "IQR/median above MAX_REL_IQR: the row says `noisy`, the result has a warning, stderr one line."
    spread = harness.summarize_times([1.0, 1.0, 2.0, 3.0, 3.0])
    assert spread.rel_iqr > harness.MAX_REL_IQR
    monkeypatch.setattr(harness, "time_fn", lambda *a, **k: spread)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))     # a quiet machine: only the spread warns
    res = harness.run_sweep(tiny_sweep(), peaks={})
    assert [r["noisy"] for r in res.rows] == [True, True] and res.rows[0]["measurements"] == 5
    (w,) = res.meta["warnings"]
    assert "2 of 2" in w and "IQR/median" in w
    assert len([l for l in capsys.readouterr().err.splitlines() if "IQR/median" in l]) == 1


def test_torch_peak_memory_is_quiet(capfd):
    "The profiler's `USDT: ... profiler_start/stop` lines (fd 2) are swallowed; other fd-2 output is kept."
    x = torch.randn(64, 64)
    assert harness.torch_peak_memory(lambda: x @ x) > 0
    harness.run_sweep(harness.Sweep("m", {"n": (8,)}, harness._measure_matmul, min_time=0.001), peaks={})
    with harness.quiet_fd2(): os.write(2, b"USDT: swallowed\nkept line\n")
    err = capfd.readouterr().err
    assert "USDT" not in err and "kept line" in err


def test_default_out_is_git_ignored():
    "`minibert-lab bench` (and `make bench`) write to an ignored folder unless --out says otherwise."
    import subprocess
    from pathlib import Path
    from minibert_lab.bench.cli import DEFAULT_BENCH_OUT, bench_parser
    root = Path(__file__).parents[1]
    assert bench_parser().parse_args(["matmul"]).out == DEFAULT_BENCH_OUT
    assert "BENCH_OUT ?= " + DEFAULT_BENCH_OUT in (root / "Makefile").read_text()
    r = subprocess.run(["git", "check-ignore", "-q", f"{DEFAULT_BENCH_OUT}/attention-cpu.json"], cwd=root)
    assert r.returncode == 0, f"{DEFAULT_BENCH_OUT} is not git-ignored"
    r = subprocess.run(["git", "check-ignore", "-q", "nbs/bench_results/attention-cpu.json"], cwd=root)
    assert r.returncode == 1


def test_crossover_lengths():
    rows = [dict(kind="standard", exact=True, framework="torch", causal=False, length=n, median_s=t)
            for n, t in ((64, 1.0), (128, 4.0), (256, 16.0))]
    rows += [dict(kind="linear", exact=False, framework="torch", causal=False, length=n, median_s=t)
             for n, t in ((64, 3.0), (128, 3.5), (256, 4.0))]
    (c,) = attention.crossover_lengths(rows)
    assert c["crossover_length"] == 128 and c["speedup_at_longest"] == pytest.approx(4.0)
    rows[3]["median_s"] = 0.5      # also faster at 64: the crossover moves down to 64
    (c,) = attention.crossover_lengths(rows)
    assert c["crossover_length"] == 64
    rows[4]["median_s"] = 5.0      # faster at 64 (noise) but slower at 128: only 256 onwards counts
    (c,) = attention.crossover_lengths(rows)
    assert c["crossover_length"] == 256


def test_exact_kinds_skip_over_budget():
    assert attention.exact_score_bytes(1, 4, 1024) == 3 * 4 * 1024 * 1024 * F32


def test_cli_bench_matmul(tmp_path, capsys):
    assert cli_bench(["matmul", "--quick", "--quiet", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert "| n |" in capsys.readouterr().out
    meta = json.loads((tmp_path / "matmul-cpu.json").read_text())["meta"]   # timed tables: NAME-DEVICE, as committed
    assert meta["sweep"] == "matmul" and meta["torch_threads"] == 1


def test_cli_bench_rejects_unknown_name_and_device():
    for argv in (["nope"], ["matmul", "--device", "tpu"], ["matmul", "--threads", "0"]):
        with pytest.raises(SystemExit) as e: cli_bench(argv)
        assert e.value.code == 2


def test_cli_bench_rejects_unknown_kind_before_any_work(capsys, monkeypatch):
    "`--kind bogus` exits 2 naming the argument, the value and the registered kinds; nothing is run."
    from minibert_lab.bench import harness as h
    monkeypatch.setattr(h, "run_sweep", lambda *a, **k: pytest.fail("a sweep ran"))
    monkeypatch.setattr(h, "matmul_peak", lambda *a, **k: pytest.fail("the peak probe ran"))
    with pytest.raises(SystemExit) as e: cli_bench(["attention", "--kind", "bogus", "--quiet"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--kind" in err and "'bogus'" in err
    assert all(k in err for k in kernels.KERNELS)        # the allowed kinds, from the registry


TOY_KINDS = """
import dataclasses
from minibert_lab import kernels
kernels.register_kind(dataclasses.replace(kernels.get_kind("linear"), name="toy-linear"))
"""


@pytest.fixture
def toy_kind_file(tmp_path):
    path = tmp_path / "toy_kinds.py"
    path.write_text(TOY_KINDS)
    yield path
    if "toy-linear" in kernels.KERNELS: kernels.unregister_kind("toy-linear")  # leave the registry as other tests expect it


def test_cli_bench_import_registers_a_user_kind(toy_kind_file, tmp_path, capsys):
    "Without `--import` the user's kind is unknown; with it, `--kind toy-linear` runs the attention table."
    with pytest.raises(SystemExit) as e: cli_bench(["attention", "--kind", "toy-linear", "--quiet"])
    assert e.value.code == 2 and "'toy-linear'" in capsys.readouterr().err
    out = tmp_path / "out"
    assert cli_bench(["attention", "--import", str(toy_kind_file), "--kind", "toy-linear", "--framework", "torch",
                      "--quick", "--quiet", "--out", str(out)]) == 0
    rows = json.loads((out / "attention-cpu.json").read_text())["rows"]
    assert rows and {r["kind"] for r in rows} == {"toy-linear"}
    # every point of the sweep was built from the registry and timed, with FLOPs from the kind's entry
    assert all("median_s" in r and r["gflop_s"] > 0 for r in rows), rows


def test_cli_bench_import_errors_name_the_argument(capsys):
    for spec in ("no_such_module_xyz", "/no/such/file.py"):
        with pytest.raises(SystemExit) as e: cli_bench(["matmul", "--import", spec])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--import" in err and spec in err


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_attention_case_runs_and_measures(framework):
    c = attention.attention_case("slay", 16, framework, True, dim=16, heads=2)
    c.run()
    L, D = 16, 8
    F, M = kernels.FEATURES_PER_HEAD_DIM * D, kernels.slay_num_features(D, kernels.kind_params("slay"))  # default budget
    assert c.memory() > 0 and c.info["features"] == F == 2 * 16 * M
    # analytic FLOPs include the SLAY feature-map projections: R*M PRF columns + P anchors per role
    W = 2 * M + 16   # W: R*M PRF columns + P anchors per role
    assert c.flops == 3 * (4 * 2 * L * 16 * 16 + 2 * (2 * 2 * L * D * W + 2 * 2 * F * L * D + 2 * 2 * L * F))


def test_models_sweep_tiny_interleaved():
    import dataclasses
    sw = dataclasses.replace(models.MODELS_SWEEP, repeats=2, warmup=1)
    res = harness.run_sweep(sw, peaks={"torch": 1e10}, interleave=True, dim=16, depth=1, heads=2, ffn_dim=32,
                          vocab_size=V_TINY, max_len=16, batch=B, length=8)
    t = models.models_table(res)
    assert [r["model"] for r in t] == list(models.MODEL_NAMES) and t[0]["speedup"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in t)
    md, figs = models.models_report(res)
    assert "minibert-bert" in md and len(figs) == 1


def test_hf_config_matches_minibert_bert_parameter_count():
    from transformers import BertForMaskedLM
    from minibert_lab.torch.models import MiniBERTForMaskedLM
    cfg = models.model_bench_config("minibert-bert", dim=16, heads=2, ffn_dim=32, vocab_size=V_TINY, max_len=16, depth=1)
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(MiniBERTForMaskedLM(cfg)) == n(BertForMaskedLM(models.hf_bert_config(cfg)))


def test_mlm_batch_masks_the_fraction():
    b = models.mlm_batch(4, 50, 99, seed=1)
    assert (b["labels"] != -100).sum() == round(0.15 * 200)
    assert ((b["labels"] == b["input_ids"]) | (b["labels"] == -100)).all()


def test_approx_errors_shrink_and_reject_exact_kinds():
    res = bench_approx_mod.bench_approx(quick=True, kinds=("performer",), heads=1, length=8, head_dim=8)
    e = [r["rel_error"] for r in res.rows]
    assert len(e) == 2 and e[1] < e[0] and all(np.isfinite(e))
    # each row is the reference kernels.approximation_error at the row's total feature budget, one call per draw
    r = res.rows[1]
    per_draw = [kernels.approximation_error("performer", r["features"], heads=1, length=8, head_dim=8, seeds=(s,))
                for s in range(r["draws"])]
    assert r["rel_error"] == pytest.approx(np.mean(per_draw)) and r["rel_error_std"] == pytest.approx(np.std(per_draw))
    with pytest.raises(ValueError, match="no target kernel"): kernels.approximation_error("standard", 64)
    bad = bench_approx_mod.bench_approx(quick=True, kinds=("standard",), heads=1, length=8, head_dim=8).rows   # recorded, not raised
    assert bad and all(r.get("error", "").startswith("ValueError: kind='standard'") for r in bad)


def test_approx_is_the_kernels_table():
    "One table: the benchmark's budgets are kernels.APPROX_BUDGETS and its means are kernels.approximation_table."
    kw = dict(heads=1, length=8, head_dim=8, seeds=(0, 1))
    res = bench_approx_mod.bench_approx(kinds=("rff", "slay-anchor"), **kw)
    ref = kernels.approximation_table(kinds=["rff", "slay-anchor"], **kw)
    assert [r["features"] for r in res.rows] == list(kernels.APPROX_BUDGETS) * 2
    for r in res.rows:
        assert r["rel_error"] == pytest.approx(ref.loc[r["kind"], r["budget"]], rel=1e-12)
        assert r["features"] == kernels.feature_dim(r["kind"], 8, **kernels.budget_params(r["kind"], r["budget"]))


def test_render_committed_results():
    "The committed result files render to markdown and figures."
    from pathlib import Path
    root = Path(__file__).parents[1] / "nbs" / "bench_results"
    for name, files in (("attention", ["attention-cpu", "attention-cuda"]), ("models", ["models-cpu", "models-cuda"]),
                        ("approx", ["approx"]), ("quality", ["quality"]), ("quality-mlm", ["quality-mlm"]),
                        ("quality-transplant", ["quality-transplant"]), ("quality-distill", ["quality-distill"])):
        for f in files:
            md, figs = harness.render_benchmark(name, harness.SweepResult.from_json(root / f"{f}.json"))
            assert md.startswith(f"## `{name}`") and "Machine:" in md and figs


def test_quality_quick_end_to_end(tmp_path, monkeypatch, capsys):
    "`bench quality --quick` on a tiny budget (2 lines, 3 steps, 3 seeds): JSON with machine, versions, budget, seeds; a table and a verdict."
    for name, value in (("SYNTH_WORKERS", 1), ("SYNTH_STEPS_QUICK", 3), ("SYNTH_LRS_QUICK", (1e-2, 3e-3)),
                        ("SYNTH_EVAL_ROWS_QUICK", 4), ("SYNTH_BATCH_QUICK", 4)):
        monkeypatch.setattr(quality, name, value)
    assert cli_bench(["quality", "--quick", "--kind", quality.UNIFORM, "--quiet", "--out", str(tmp_path), "--threads", "1"]) == 0
    res = harness.SweepResult.from_json(tmp_path / "quality.json")
    m = res.meta
    assert m["quick"] and m["versions"]["torch"] and m["cpu"] and m["budget"]["seeds"] == [0, 1, 2]
    assert m["budget"]["steps"] == 3 and m["budget"]["lrs"] == [1e-2, 3e-3] and m["budget"]["batch"] == 4
    assert m["budget"]["shift"] is True and "previous token" in m["description"]
    assert [e["label"] for e in m["entries"]] == [quality.BASELINE, quality.UNIFORM]
    assert len(res.rows) == 2 * (2 + 2)                                  # 2 learning rates on seed 0, then 2 more seeds
    t = {r["label"]: r for r in m["table"]}
    assert set(t) == {quality.BASELINE, quality.UNIFORM} and all(r["seeds"] == 3 for r in t.values())
    assert all(0 <= r["score_low"] <= r["score"] <= r["score_high"] <= 1 or r["score_low"] < 0 for r in t.values())
    assert all(r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in t.values())
    assert "p_t" in t[quality.UNIFORM] and "p_t" not in t[quality.BASELINE]
    assert m["sensitivity"]["all cells"]["verdict"] in ("sensitive", "insensitive")
    assert "| rank | label |" in capsys.readouterr().out


def test_quality_bad_arguments_are_refused_by_name():
    for kw, match in ((dict(kinds=("bogus",)), "bogus"), (dict(seeds=(0, 0)), "seeds="), (dict(lrs=(2.0,)), "lrs="),
                      (dict(steps=0), "steps=0"), (dict(workers=0), "workers=0")):
        with pytest.raises(ValueError, match=match): quality.bench_quality(quick=True, **(dict(workers=1) | kw))


def test_quality_uniform_control_matches_its_oracle_and_weights_keys_equally():
    import torch
    import test_kernels as k_tests
    for fw, masking in [p.values for p in k_tests._grid() if not p.marks][:4]:
        for causal in (False, True): k_tests.test_matches_oracle(quality.UNIFORM, causal, masking, fw)
    from minibert_lab.torch.attention import build_attention
    attn = build_attention(quality.UNIFORM, 8, 2)
    x, mask = torch.randn(3, 7, 8), torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    _, w = attn(x, attention_mask=mask, output_attentions=True)                         # [B, H, L, L]
    want = (mask[:, None, None, :] / mask.sum(1)[:, None, None, None]).expand_as(w)
    torch.testing.assert_close(w * mask[:, None, :, None], want * mask[:, None, :, None])

def test_cli_bench_upstream_option_is_checked(capsys):
    "--upstream goes only to the benchmark that takes it, and that benchmark refuses to run without it."
    from minibert_lab.bench.cli import cli_bench
    with pytest.raises(SystemExit): cli_bench(["attention", "--upstream", "main.py"])
    assert "takes no upstream; allowed with attention-profile, attention-upstream" in capsys.readouterr().err
    with pytest.raises(ValueError, match="upstream=None"): cli_bench(["attention-upstream", "--quick"])
    with pytest.raises(ValueError, match="upstream=None"): cli_bench(["attention-profile", "--quick"])
    with pytest.raises(ValueError, match="no such file"): cli_bench(["attention-upstream", "--quick", "--upstream", "missing/main.py"])
