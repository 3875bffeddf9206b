"Fine-tuning through the CLI: a user's csv fine-tunes, evaluates and predicts; bad input is one clear error (exit 2)."
import json

import numpy as np
import pytest

from minibert_lab.cli import main

POS = ["a good film", "great fun", "lovely acting", "a fine story", "good and warm", "a great cast"]
NEG = ["a bad film", "dull and long", "awful acting", "a poor story", "bad and cold", "a weak cast"]


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    train = write_csv(d / "train.csv", [(t, "pos") for t in POS] + [(t, "neg") for t in NEG])
    val = write_csv(d / "val.csv", [(POS[0], "pos"), (NEG[0], "neg"), (POS[1], "pos")])
    return d, train, val


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    d, train, val = files
    out = tmp_path_factory.mktemp("runs") / "run"
    rc = main(["finetune", "--init", "tiny", "--train", str(train), "--validation", str(val), "--out", str(out),
               "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--max-len", "16", "--no-progress"])
    assert rc == 0
    return out


def test_csv_finetunes_evaluates_and_predicts(run, files, capsys):
    d, train, val = files
    spec = json.loads((run / "finetune.json").read_text())
    assert spec["label_names"] == ["neg", "pos"] and spec["head"]["kind"] == "multiclass"
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(val), "--bootstrap", "30"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 3 and set(res["metrics"]) >= {"accuracy", "macro_f1"}
    acc = res["metrics"]["accuracy"]
    assert acc["low"] <= acc["value"] <= acc["high"] and 0 <= acc["value"] <= 1
    assert main(["predict", str(run), "--text", "a good film", "--text", "awful"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["text"] for l in lines] == ["a good film", "awful"]
    assert all(l["label"] in ("neg", "pos") and abs(sum(l["probabilities"].values()) - 1) < 1e-6 for l in lines)


def error_of(argv, capsys):
    capsys.readouterr()
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_column(files, tmp_path, capsys):
    d, train, val = files
    err = error_of(["finetune", "--init", "tiny", "--train", str(train), "--validation", str(val), "--out", str(tmp_path / "r"),
                    "--text-column", "sentence", "--steps", "1"], capsys)
    assert "no column(s) ['sentence']" in err and "columns ['text', 'label']" in err


def test_unseen_labels_at_evaluation(run, tmp_path, capsys):
    bad = write_csv(tmp_path / "eval.csv", [("a good film", "pos"), ("so so", "meh")])
    err = error_of(["evaluate", str(run), "--data", str(bad)], capsys)
    assert "['meh'] not seen in training" in err


def test_regression_head_with_string_labels(files, tmp_path, capsys):
    d, train, val = files
    err = error_of(["finetune", "--init", "tiny", "--train", str(train), "--validation", str(val), "--out", str(tmp_path / "r"),
                    "--head", "regression", "--steps", "1"], capsys)
    assert "'label' is 'pos' (str)" in err and "finite number" in err


def test_empty_split(files, tmp_path, capsys):
    d, train, val = files
    empty = tmp_path / "empty.csv"; empty.write_text("text,label\n")
    err = error_of(["finetune", "--init", "tiny", "--train", str(train), "--validation", str(empty), "--out", str(tmp_path / "r"),
                    "--steps", "1"], capsys)
    assert "empty.csv" in err and "no examples" in err


def test_checkpoint_without_a_head(tmp_path, capsys):
    from minibert_lab.config import ModelConfig
    from minibert_lab.convert import save_pretrained
    from minibert_lab.torch.models import MiniBERTForMaskedLM
    save_pretrained(MiniBERTForMaskedLM(ModelConfig.preset("tiny", vocab_size=99)), tmp_path / "mlm")
    for cmd in (["evaluate", str(tmp_path / "mlm"), "--task", "trec-6"], ["predict", str(tmp_path / "mlm"), "--text", "hi"]):
        assert "checkpoint without a task head" in error_of(cmd, capsys)


def test_bad_options_are_refused_before_work(files, tmp_path, capsys):
    d, train, val = files
    base = ["finetune", "--init", "tiny", "--train", str(train), "--validation", str(val), "--out", str(tmp_path / "r")]
    assert "decay=1.5" in error_of(base + ["--llrd", "1.5"], capsys)
    assert "pooling='first'" in error_of(base + ["--pooling", "first"], capsys)
    assert "task='imdb'" in error_of(["finetune", "--init", "tiny", "--task", "imdb", "--out", str(tmp_path / "r")], capsys)
    assert "neither a preset nor a folder" in error_of(base + ["--init", "nowhere"], capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(files, tmp_path):
    "4 steps in one go == 2 steps, then --resume to 4 (same losses, same evaluation)."
    from minibert_lab.finetune import finetune
    from minibert_lab.train import read_metrics
    d, train, val = files
    kw = dict(train=str(train), validation=str(val), batch_size=4, lr=1e-3, max_len=16, evals_per_epoch=1, progress=False)
    a = finetune("tiny", tmp_path / "a", steps=4, **kw)
    finetune("tiny", tmp_path / "b", steps=2, **kw)
    b = finetune("tiny", tmp_path / "b", steps=4, resume=True, **kw)
    la = [r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    assert la == lb and a.final_eval["val_loss"] == b.final_eval["val_loss"]


@pytest.mark.slow
def test_jax_finetune_with_llrd_matches_its_torch_view(files, tmp_path, capsys):
    "A JAX run with layer-wise LR decay trains, and its checkpoint gives the same logits loaded in JAX and as torch."
    from minibert_lab.finetune import load_run
    d, train, val = files
    out = tmp_path / "j"
    assert main(["finetune", "--init", "tiny", "--train", str(train), "--validation", str(val), "--out", str(out),
                 "--framework", "jax", "--llrd", "0.7", "--steps", "3", "--batch-size", "4", "--lr", "1e-3",
                 "--max-len", "16", "--no-progress"]) == 0
    texts = ["a good film", "awful acting and a weak cast"]
    zj, zt = load_run(out).logits(texts), load_run(out, "torch").logits(texts)
    np.testing.assert_allclose(zj, zt, atol=1e-5)


@pytest.mark.slow
def test_layer_wise_decay_scales_each_update(tmp_path):
    "With llrd ξ and plain SGD-like first steps, a layer's AdamW update shrinks by its multiplier (torch groups)."
    from minibert_lab.config import ExperimentConfig
    from minibert_lab.finetune import build_task_model, make_task_backend
    from minibert_lab.heads import HeadConfig
    from minibert_lab.train import layer_lr_scale
    m, tok, _ = build_task_model("tiny", HeadConfig("multiclass", 3))
    cfg = ExperimentConfig(model=m.cfg).override({"train.warmup_steps": 0, "train.lr": 1e-3, "train.weight_decay": 0.0})
    be = make_task_backend(cfg, m, llrd=0.5)
    rates = {n: g["lr"] for g in be.opt.param_groups for n, p in m.named_parameters() if any(p is q for q in g["params"])}
    for n, r in rates.items(): assert r == pytest.approx(layer_lr_scale(n, m.cfg.depth, 0.5) * 1e-3), n
