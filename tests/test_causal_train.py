"Causal-LM pre-training through the existing loops (`--data.objective clm`), exact resume, and `minibert-lab generate`."
import json
import math

import numpy as np
import pytest

from minibert_lab import pretrain as P
from minibert_lab import train as T
from minibert_lab.cli import main
from minibert_lab.config import IGNORE_INDEX, ExperimentConfig

SMALL = {"model.dim": 32, "model.heads": 2, "model.kv_heads": 1, "model.ffn_dim": 64, "model.depth": 1,
         "data.vocab_size": 512, "data.seq_len": 32, "data.batch_size": 4, "train.warmup_steps": 2,
         "train.eval_batches": 2, "model.dropout": 0.0, "data.objective": "clm"}


def clm_cfg(framework="torch", **over):
    return ExperimentConfig.preset("gpt-tiny").override({**SMALL, "train.framework": framework, **over})


def losses(out):
    return [(r["step"], r["loss"]) for r in T.read_metrics(out) if "loss" in r]


def test_clm_batches_predict_the_next_token():
    data, _ = P.prepare_data(clm_cfg())
    b = next(iter(data.train))
    ids, y, seg = b["input_ids"], b["labels"], b["segment_ids"]
    nxt = np.concatenate([ids[:, 1:], np.full_like(ids[:, :1], -1)], 1)
    same = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros_like(seg[:, :1], bool)], 1) & (seg > 0)
    np.testing.assert_array_equal(y, np.where(same, nxt, IGNORE_INDEX))
    assert (y != IGNORE_INDEX).mean() > 0.8  # almost every token has a target


def test_clm_resume_is_exact_and_generate(tmp_path, capsys):
    cfg = clm_cfg(**{"train.steps": 4, "train.save_every": 2, "train.eval_every": 100, "train.log_every": 1})
    data, cfg = P.prepare_data(cfg)
    out = tmp_path / "run"
    T.fit(P.make_backend(cfg), cfg, data.train, data.validation, out, progress=False)
    ref = losses(out)
    assert len(ref) == 4 and all(math.isfinite(l) for _, l in ref) and ref[-1][1] < ref[0][1] + 1.0
    w = T.checkpoint_path(out, 4) / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # the newest checkpoint is broken: resume from step 2
    data2, _ = P.prepare_data(cfg)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        res = T.fit(P.make_backend(cfg), cfg, data2.train, data2.validation, out, resume=True, progress=False)
    assert res.step == 4 and losses(out) == ref
    data.tokenizer.save_pretrained(str(out / "tokenizer"))
    r = P.resolve_model_path(out)
    assert type(r.model).__name__ == "MiniGPTForCausalLM"
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "To be", "--prompt", "What light through yonder window",
                 "--max-new-tokens", "5", "--json"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["To be", "What light through yonder window"]
    assert all(len(r["tokens"]) <= 5 for r in rows)
    assert main(["generate", str(out), "--prompt", "To be", "--do-sample", "--top-p", "1.5"]) == 2
    assert "top_p=1.5" in capsys.readouterr().err


def test_generate_refuses_an_encoder(tmp_path, capsys):
    from minibert_lab.torch.models import MiniBERTForMaskedLM
    cfg = ExperimentConfig.preset("tiny").override({"model.dim": 32, "model.heads": 2, "model.depth": 1, "model.vocab_size": 99})
    MiniBERTForMaskedLM(cfg.model).save_pretrained(tmp_path / "enc")
    assert main(["generate", str(tmp_path / "enc"), "--prompt", "hi"]) == 2
    assert "an encoder without a next-token head" in capsys.readouterr().err


@pytest.mark.slow
def test_clm_jax_backend_steps():
    cfg = clm_cfg("jax")
    data, cfg = P.prepare_data(cfg)
    be = P.make_backend(cfg)
    batches = [b for b, _ in zip(data.train, range(2))]
    l1 = be.train_step([batches[0]])["loss"]
    l2 = be.train_step([batches[1]])["loss"]
    assert math.isfinite(l1) and math.isfinite(l2)
    tb = P.make_backend(cfg.override({"train.framework": "torch"}))
    ev_t, ev_j = tb.eval_batch(batches[0]), be.eval_batch(batches[0])
    assert ev_t[1] == ev_j[1]  # same number of predicted tokens
