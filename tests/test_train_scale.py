"Scale-out: JAX data x model mesh on 8 simulated CPU devices; torch DDP and FSDP2 under torchrun (gloo)."
import json, os, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = ["--model.dim", "32", "--model.heads", "4", "--model.ffn_dim", "64", "--model.depth", "1",
         "--data.vocab_size", "512", "--train.warmup_steps", "0", "--train.eval_batches", "2", "--model.dropout", "0.0",
         "--train.lr", "0.003"]

MESH_SCRIPT = textwrap.dedent("""
    import json, jax, numpy as np
    from minibert_lab.config import ExperimentConfig
    from minibert_lab import pretrain as P
    from minibert_lab.jax.train import JaxBackend, make_mesh
    assert jax.device_count() == 8, jax.devices()
    cfg = ExperimentConfig.preset("tiny").override({"model.dim": 32, "model.heads": 4, "model.ffn_dim": 64,
        "model.depth": 1, "data.vocab_size": 512, "data.seq_len": 32, "data.batch_size": 8, "model.dropout": 0.0,
        "train.framework": "jax", "train.warmup_steps": 0, "train.lr": 3e-3, "train.mesh_model": 2})
    data, cfg = P.prepare_data(cfg)
    batches = [b for b, _ in zip(data.train, range(3))]
    out = {}
    for name, mesh in (("mesh", make_mesh(2)), ("single", make_mesh(1, devices=jax.devices()[:1]))):
        be = JaxBackend(cfg, mesh=mesh)
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(be.params)})
        out[name] = {"shape": dict(mesh.shape), "specs": specs,
                     "losses": [be.train_step([b])["loss"] for b in batches],
                     "val": be.eval_batch(data.validation[0])[0]}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_jax_mesh_on_8_simulated_devices():
    "A 4 (data) x 2 (model) mesh: weights sharded on `model`, batch on `data`; same losses as one device."
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert res["mesh"]["shape"] == {"data": 4, "model": 2}
    assert any("model" in s for s in res["mesh"]["specs"]), res["mesh"]["specs"]
    np.testing.assert_allclose(res["mesh"]["losses"], res["single"]["losses"], rtol=2e-4)
    np.testing.assert_allclose(res["mesh"]["val"], res["single"]["val"], rtol=2e-4)


def _losses(out):
    return [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _pretrain(out, extra=()):
    return ["pretrain", "--framework", "torch", "--steps", "3", "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "3", "--save-every", "3", "--log-every", "1", "--seed", "0", "--out", str(out),
            "--no-progress", *SMALL, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes(tmp_path, mode):
    "DDP / FSDP2 on 2 CPU processes (gloo) reproduce the single-process losses; rank 0 writes a loadable checkpoint."
    from minibert_lab.cli import main
    from minibert_lab import train as T
    assert main(_pretrain(tmp_path / "single")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", "--no-python", str(BIN / "minibert-lab"),
           *_pretrain(tmp_path / mode, ["--train.distributed", mode])]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    np.testing.assert_allclose(_losses(tmp_path / mode), _losses(tmp_path / "single"), rtol=1e-4)
    ck = T.latest_checkpoint(tmp_path / mode)
    assert ck is not None and T.verify_checkpoint(ck) is None
    from minibert_lab.torch.train import TorchBackend
    cfg = T.ExperimentConfig.from_json(tmp_path / mode / "config.json").override({"train.distributed": "none"})
    be = TorchBackend(cfg); be.load(ck)                      # a distributed checkpoint loads in one process
