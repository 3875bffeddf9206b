"Training: smoke runs of both frameworks, resume after SIGKILL, checkpoint integrity, accumulation, schedule parity."
import json, math, os, signal, subprocess, sys, time, warnings
from pathlib import Path
import numpy as np
import pytest
from minibert_lab.cli import main
from minibert_lab.config import ExperimentConfig
from minibert_lab import train as T
from minibert_lab import pretrain as P

ROOT = Path(__file__).resolve().parents[1]
# a very small model and data pipeline: every test here runs in seconds on 2 CPU cores
SMALL = ["--model.dim", "32", "--model.heads", "2", "--model.ffn_dim", "64", "--model.depth", "1",
         "--data.vocab_size", "512", "--train.warmup_steps", "2", "--train.eval_batches", "2"]
SMALL_OVERRIDES = {"model.dim": 32, "model.heads": 2, "model.ffn_dim": 64, "model.depth": 1, "data.vocab_size": 512,
                   "data.seq_len": 32, "data.batch_size": 4, "train.warmup_steps": 2, "train.eval_batches": 2,
                   "model.dropout": 0.0}


def small_cfg(framework="torch", **over):
    return ExperimentConfig.preset("tiny").override({**SMALL_OVERRIDES, "train.framework": framework, **over})


@pytest.fixture(scope="module")
def data_and_cfg():
    cfg = small_cfg()
    data, cfg = P.prepare_data(cfg)
    batches = [b for b, _ in zip(data.train, range(4))]
    return data, cfg, batches


def losses(out):
    return [(r["step"], r["loss"]) for r in T.read_metrics(out) if "loss" in r]


def pretrain_args(out, framework="torch", steps=3, extra=()):
    return ["pretrain", "--framework", framework, "--preset", "tiny", "--steps", str(steps), "--batch-size", "4",
            "--seq-len", "32", "--eval-every", "2", "--save-every", "2", "--seed", "1", "--out", str(out),
            "--no-progress", *SMALL, *extra]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_pretrain_smoke(tmp_path, framework, capsys):
    "One-step and few-step runs: metrics lines, an intact checkpoint, config.json."
    assert main(pretrain_args(tmp_path / "one", framework, steps=1)) == 0
    recs = T.read_metrics(tmp_path / "one")
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(recs[0])
    assert {"step", "val_loss", "val_ppl", "val_acc"} <= set(recs[-1])
    assert main(pretrain_args(tmp_path / "few", framework, steps=4, extra=["--log-every", "1"])) == 0
    recs = T.read_metrics(tmp_path / "few")
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4]
    assert all(math.isfinite(r["loss"]) for r in recs if "loss" in r)
    ev = [r for r in recs if "val_loss" in r][-1]
    assert ev["val_ppl"] == pytest.approx(math.exp(ev["val_loss"])) and 0 <= ev["val_acc"] <= 1
    ck = T.latest_checkpoint(tmp_path / "few")
    assert ck.name == "step_00000004" and T.verify_checkpoint(ck) is None
    assert ExperimentConfig.from_json(tmp_path / "few" / "config.json").train.framework == framework
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 4 and out["stopped"] == "steps"


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_loss_decreases_on_fixed_batch(data_and_cfg, framework):
    "Repeated steps on one batch drive its loss down."
    _, cfg, batches = data_and_cfg
    cfg = cfg.override({"train.framework": framework, "train.lr": 3e-3, "train.warmup_steps": 0, "train.steps": 30})
    be = P.make_backend(cfg)
    ls = [be.train_step([batches[0]])["loss"] for _ in range(30)]
    assert ls[-1] < 0.7 * ls[0], ls


def _torch_grads(be):
    return {n: p.grad.detach().clone().numpy() for n, p in be.model.named_parameters() if p.grad is not None}


def _concat(bs):
    return {k: np.concatenate([np.asarray(b[k]) for b in bs]) for k in bs[0]}


def test_grad_accumulation_equals_big_batch_torch(data_and_cfg):
    "k micro-batches give the loss and gradients of one k-times larger batch."
    from minibert_lab.torch.train import TorchBackend
    _, cfg, batches = data_and_cfg
    be = TorchBackend(cfg)
    loss_acc, n_acc = be.backward(batches[:2]); g_acc = _torch_grads(be); be.opt.zero_grad()
    loss_big, n_big = be.backward([_concat(batches[:2])]); g_big = _torch_grads(be)
    assert n_acc == n_big
    np.testing.assert_allclose(float(loss_acc), float(loss_big), rtol=1e-6)
    assert g_acc.keys() == g_big.keys()
    for k in g_acc: np.testing.assert_allclose(g_acc[k], g_big[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_grad_accumulation_equals_big_batch_jax(data_and_cfg):
    import jax
    from minibert_lab.jax.train import JaxBackend
    _, cfg, batches = data_and_cfg
    be = JaxBackend(cfg.override({"train.framework": "jax"}))
    loss_acc, g_acc = be.grads(batches[:2])
    loss_big, g_big = be.grads([_concat(batches[:2])])
    np.testing.assert_allclose(float(loss_acc), float(loss_big), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_big)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)


def test_schedule_torch_equals_jax(data_and_cfg):
    "Both backends step through the same learning rates (LambdaLR in numpy vs optax in jax.numpy)."
    _, cfg, batches = data_and_cfg
    cfg = cfg.override({"train.warmup_steps": 3, "train.steps": 8, "train.min_lr_ratio": 0.2})
    lrs = {}
    for fw in ("torch", "jax"):
        be = P.make_backend(cfg.override({"train.framework": fw}))
        lrs[fw] = [be.train_step([batches[s % len(batches)]])["lr"] for s in range(10)]
    np.testing.assert_allclose(lrs["torch"], lrs["jax"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(lrs["torch"], [float(T.make_schedule(cfg.train)(s)) for s in range(10)], rtol=1e-12)
    assert lrs["torch"][0] == 0 and lrs["torch"][3] == pytest.approx(cfg.train.lr)


def _run_killed_then_resumed(tmp_path, framework, steps):
    "Run `pretrain` in a subprocess, SIGKILL it once a checkpoint exists, resume; return (resumed, reference) dirs."
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-c", "import sys; from minibert_lab.cli import main; sys.exit(main())"]
    args = lambda out, extra=(): pretrain_args(out, framework, steps, ["--log-every", "1", "--save-every", "5",
                                                                       "--eval-every", "10", *extra])
    killed = tmp_path / "killed"
    p = subprocess.Popen([*cmd, *args(killed)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not T.list_checkpoints(killed):
        time.sleep(0.01)
    assert p.poll() is None, f"the run ended before it could be killed: {p.stderr.read().decode()[-2000:]}"
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    last_logged = max(s for s, _ in losses(killed))
    assert last_logged < steps
    r = subprocess.run([*cmd, *args(killed, ["--resume"])], env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = tmp_path / "ref"                      # the uninterrupted reference runs in this process
    assert main(args(ref)) == 0
    return killed, ref


def test_resume_after_sigkill_is_bit_identical_torch(tmp_path):
    "A run SIGKILLed after a checkpoint and resumed logs the same losses, step for step, as an uninterrupted run."
    killed, ref = _run_killed_then_resumed(tmp_path, "torch", steps=40)
    a, b = losses(killed), losses(ref)
    assert [s for s, _ in a] == list(range(1, 41))
    assert a == b
    va = [(r["step"], r["val_loss"]) for r in T.read_metrics(killed) if "val_loss" in r]
    assert va == [(r["step"], r["val_loss"]) for r in T.read_metrics(ref) if "val_loss" in r]


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical_jax(tmp_path):
    killed, ref = _run_killed_then_resumed(tmp_path, "jax", steps=60)
    a, b = losses(killed), losses(ref)
    assert [s for s, _ in a] == list(range(1, 61))
    assert a == b


def test_truncated_checkpoint_is_skipped(tmp_path, data_and_cfg):
    "Resume skips a truncated newest checkpoint (with a warning) and continues from the previous one."
    data, cfg, _ = data_and_cfg
    cfg = cfg.override({"train.steps": 4, "train.save_every": 2, "train.eval_every": 100, "train.log_every": 1})
    T.fit(P.make_backend(cfg), cfg, data.train, data.validation, tmp_path, progress=False)
    ref = losses(tmp_path)
    w = T.checkpoint_path(tmp_path, 4) / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    data2, _ = P.prepare_data(cfg)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step_00000004"):
        res = T.fit(P.make_backend(cfg), cfg, data2.train, data2.validation, tmp_path, resume=True, progress=False)
    assert res.step == 4 and losses(tmp_path) == ref


def test_resume_with_changed_config_is_an_error(tmp_path, capsys):
    assert main(pretrain_args(tmp_path, steps=2)) == 0
    assert main(pretrain_args(tmp_path, steps=2, extra=["--resume", "--lr", "0.5"])) == 2
    err = capsys.readouterr().err
    assert "config differs" in err and "train.lr: saved 0.001, given 0.5" in err
    assert main(pretrain_args(tmp_path, steps=2)) == 2          # fresh run into a used folder
    assert "already holds checkpoints" in capsys.readouterr().err


def test_nan_loss_stops_or_restores(tmp_path, data_and_cfg):
    "A diverging run stops naming the step; with on_nan='restore' it reloads the last checkpoint first."
    data, cfg, _ = data_and_cfg
    bad = cfg.override({"train.lr": 1e30, "train.warmup_steps": 0, "train.grad_clip": None, "train.steps": 20,
                        "train.save_every": 1, "train.eval_every": 100})
    with pytest.raises(T.NonFiniteLossError, match=r"at step \d+"):
        T.fit(P.make_backend(bad), bad, data.train, data.validation, tmp_path / "stop", progress=False)
    bad = bad.override({"train.on_nan": "restore"})
    with pytest.warns(UserWarning, match="restoring step_"), pytest.raises(T.NonFiniteLossError):
        T.fit(P.make_backend(bad), bad, data.train, data.validation, tmp_path / "restore", progress=False)


def test_early_stopping(tmp_path, data_and_cfg):
    "A learning rate below float32 resolution leaves the validation loss unchanged: patience ends the run."
    data, cfg, _ = data_and_cfg
    c = cfg.override({"train.steps": 40, "train.eval_every": 2, "train.patience": 1, "train.lr": 1e-12,
                      "train.warmup_steps": 0})
    res = T.fit(P.make_backend(c), c, data.train, data.validation, tmp_path, progress=False)
    assert res.stopped == "early_stopping" and res.step < 40
    assert T.latest_checkpoint(tmp_path).name == f"step_{res.step:08d}"


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bf16_and_gradient_checkpointing(data_and_cfg, framework):
    "bf16 mixed precision stays close to fp32; gradient checkpointing gives the same loss as storing activations."
    _, cfg, batches = data_and_cfg
    cfg = cfg.override({"train.framework": framework})
    ref = P.make_backend(cfg).train_step([batches[0]])
    bf16 = P.make_backend(cfg.override({"train.precision": "bf16"})).train_step([batches[0]])
    remat = P.make_backend(cfg.override({"model.gradient_checkpointing": True})).train_step([batches[0]])
    assert math.isfinite(bf16["loss"]) and bf16["loss"] == pytest.approx(ref["loss"], rel=2e-2)
    assert remat["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert remat["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_torch_compile_matches_eager(data_and_cfg):
    _, cfg, batches = data_and_cfg
    eager = P.make_backend(cfg)
    compiled = P.make_backend(cfg.override({"train.compile": True}))
    for b in batches[:2]:
        a, c = eager.train_step([b]), compiled.train_step([b])
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-4)


def test_lab_cli_small(tmp_path, capsys):
    "`minibert-lab lab` end to end at toy size: both runs, the table with the unigram reference, report.html."
    args = ["lab", "--out", str(tmp_path), "--steps", "4", "--no-progress", "--model.dim", "32", "--model.heads", "2",
            "--model.ffn_dim", "64", "--model.depth", "1", "--data.seq_len", "32", "--data.batch_size", "4",
            "--train.eval_every", "2", "--train.eval_batches", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "torch-standard" in out and "torch-slay" in out and "unigram entropy" in out
    html = (tmp_path / "report.html").read_text()
    assert html.count("Plotly.newPlot") == 2 and "<table" in html
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["attention"] for r in res["rows"]] == ["standard", "slay"] and res["unigram_entropy"] > 0
    assert T.verify_checkpoint(T.latest_checkpoint(tmp_path / "torch-slay")) is None


# ---- non-finite states, divergence, token ids, resume of a finished run, Ctrl-C plumbing (issues 16, 17) ----

def _checkpoint_states_finite(out, cfg):
    "Every checkpoint of a run, loaded into a fresh backend, holds only finite parameters and optimizer state."
    be = P.make_backend(cfg)
    for ck in T.list_checkpoints(out):
        be.load(ck)
        assert be.nonfinite_state() == [], ck


def test_torch_overflowing_update_is_never_checkpointed(tmp_path, data_and_cfg):
    "lr 1e39: the loss of step 2 is finite, its update is not; with save_every 1 and on_nan restore nothing bad is sealed or restored."
    data, cfg, _ = data_and_cfg
    bad = cfg.override({"train.lr": 1e39, "train.save_every": 1, "train.on_nan": "restore", "train.steps": 6,
                        "train.eval_every": 100})
    with pytest.warns(UserWarning, match="non-finite parameters or optimizer state .*restoring step_00000001"), \
         pytest.raises(T.NonFiniteLossError, match="non-finite parameters or optimizer state"):
        T.fit(P.make_backend(bad), bad, data.train, data.validation, tmp_path, progress=False)
    assert [p.name for p in T.list_checkpoints(tmp_path)] == ["step_00000001"]     # warmup: step 1 has lr 0
    _checkpoint_states_finite(tmp_path, bad)


class _Repeat:
    "A loader that yields the same batch forever (one shape, one prediction bound: one JAX compilation)."
    def __init__(self, batch): self.batch, self.i = batch, 0
    def __iter__(self):
        while True:
            self.i += 1; yield self.batch
    def state_dict(self): return {"i": self.i}
    def load_state_dict(self, d): self.i = d["i"]


def test_jax_overflowing_update_is_never_checkpointed(tmp_path, data_and_cfg):
    "JAX, lr 1e39 (inf in float32): the loss of step 1 is finite, its update makes the state NaN; the backend names the arrays, nothing is sealed."
    data, cfg, batches = data_and_cfg
    bad = cfg.override({"train.framework": "jax", "train.lr": 1e39, "train.grad_clip": None, "train.steps": 4,
                        "train.save_every": 1, "train.eval_every": 100})
    be = P.make_backend(bad)
    with pytest.raises(T.NonFiniteLossError, match=r"non-finite parameters or optimizer state in \d+ arrays \(params\.bert\..* at step 1"):
        T.fit(be, bad, _Repeat(batches[0]), data.validation, tmp_path, progress=False)
    assert [r["loss"] for r in T.read_metrics(tmp_path) if "loss" in r][0] < 10    # the loss itself was finite
    assert all(n.startswith("params.") for n in be.nonfinite_state())        # the moments stayed finite
    assert T.list_checkpoints(tmp_path) == []
    import jax, jax.numpy as jnp
    be.opt_state = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, be.opt_state)
    assert any(n.startswith("optimizer.") for n in be.nonfinite_state())


def test_torch_finite_divergence_is_an_error(tmp_path, data_and_cfg):
    "lr 1e3 with the default clipping: the loss explodes to ~1e7 but stays finite; the run stops with DivergenceError."
    data, cfg, _ = data_and_cfg
    bad = cfg.override({"train.lr": 1e3, "train.steps": 30, "train.eval_every": 100, "train.save_every": 100})
    with pytest.raises(T.DivergenceError, match="diverged"):
        T.fit(P.make_backend(bad), bad, data.train, data.validation, tmp_path, progress=False)


def test_jax_backend_checks_token_ids(data_and_cfg):
    "Like the torch model, the JAX backend refuses out-of-range ids with a ValueError (not a NaN loss or a wrap-around)."
    _, cfg, batches = data_and_cfg
    be = P.make_backend(cfg.override({"train.framework": "jax"}))
    V = cfg.model.vocab_size
    for key, value in (("input_ids", V), ("input_ids", -1), ("labels", V)):
        b = {k: np.array(v, copy=True) for k, v in batches[0].items()}
        b[key][0, 1] = value
        for call in (lambda: be.train_step([b]), lambda: be.eval_batch(b), lambda: be.train_step([batches[1], b])):
            with pytest.raises(ValueError, match=rf"{key} has values outside \[0, {V}\)"): call()
    assert be.step == 0                                   # nothing was applied


def test_cli_resume_of_finished_run_and_extension(tmp_path, capsys):
    "Resuming a finished run prints finite numbers (no NaN); a larger --steps extends it; all checkpoint files share one mode."
    import stat
    assert main(pretrain_args(tmp_path, steps=2)) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(pretrain_args(tmp_path, steps=2, extra=["--resume"])) == 0
    again = capsys.readouterr().out.strip().splitlines()[-1]
    assert "NaN" not in again and json.loads(again)["val_loss"] == json.loads(first)["val_loss"], (first, again)
    with pytest.warns(UserWarning, match="train.steps changed from 2 to 4"):
        assert main(pretrain_args(tmp_path, steps=4, extra=["--resume"])) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    assert [r["step"] for r in T.read_metrics(tmp_path) if "val_loss" in r] == [2, 4]
    ck = T.latest_checkpoint(tmp_path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ck.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_torch_thread_count_is_recorded(tmp_path, data_and_cfg):
    import torch
    from minibert_lab.torch.train import TorchBackend, RUNTIME_FILE
    _, cfg, _ = data_and_cfg
    be = TorchBackend(cfg); be.save(tmp_path)
    assert json.loads((tmp_path / RUNTIME_FILE).read_text())["num_threads"] == torch.get_num_threads()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(n + 1)
        with pytest.warns(UserWarning, match=rf"written with {n} torch threads, this process uses {n + 1}"):
            TorchBackend(cfg).load(tmp_path)
    finally:
        torch.set_num_threads(n)
    with warnings.catch_warnings():
        warnings.simplefilter("error"); TorchBackend(cfg).load(tmp_path)


def test_ddp_without_torchrun_warns(data_and_cfg, monkeypatch):
    from minibert_lab.torch.train import TorchBackend
    _, cfg, _ = data_and_cfg
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match="train.distributed='ddp' .*torchrun --nproc_per_node"):
        be = TorchBackend(cfg.override({"train.distributed": "ddp"}))
    assert be.world == 1


def test_device_setting(tmp_path, data_and_cfg):
    "`train.device`: checked by the config; CUDA without a CUDA device is a clear error before any work; batches go where the model is; a resume may change it."
    import torch
    _, cfg, batches = data_and_cfg
    with pytest.raises(ValueError, match="TrainConfig.device='tpu' is invalid; allowed: 'cpu', 'cuda'"): cfg.override({"train.device": "tpu"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device='cuda' but torch sees no CUDA device"):
            P.make_backend(cfg.override({"train.device": "cuda"}))
    be = P.make_backend(cfg)
    assert be.device.type == "cpu" and all(t.device == be.device for t in be.tensors(batches[0]).values())
    assert "train.device" in T.RESUMABLE_FIELDS
    T.prepare_run(tmp_path, cfg.override({"train.device": "cuda"}))          # a run started on a GPU ...
    with pytest.warns(UserWarning, match="train.device changed from 'cuda' to 'cpu'"):
        T.prepare_run(tmp_path, cfg, resume=True)                              # ... resumed on the CPU
    assert ExperimentConfig.from_json(tmp_path / T.CONFIG_FILE).train.device == "cpu"


@pytest.mark.cuda
def test_cuda_training_matches_cpu(data_and_cfg):
    "The same steps on the GPU and on the CPU give the same losses (TF32 off)."
    import torch
    if not torch.cuda.is_available(): pytest.skip("no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
    _, cfg, batches = data_and_cfg
    cpu, gpu = P.make_backend(cfg), P.make_backend(cfg.override({"train.device": "cuda"}))
    assert next(gpu.model.parameters()).is_cuda
    for b in batches[:3]:
        assert gpu.train_step([b])["loss"] == pytest.approx(cpu.train_step([b])["loss"], rel=1e-4)
    assert gpu.eval_batch(batches[0])[0] == pytest.approx(cpu.eval_batch(batches[0])[0], rel=1e-4)
    np.testing.assert_allclose(gpu.attention_maps(batches[0]), cpu.attention_maps(batches[0]), rtol=1e-4, atol=1e-5)
