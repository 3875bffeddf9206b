"""The `minibert-lab` command end to end: every model folder kind opens through one resolver, bad inputs exit 2
with a message naming the input, Ctrl-C exits 130, and the lab report explains itself."""
import json, re
from pathlib import Path

import pytest

from minibert_lab.cli import main

# tiny runs: the lab's 512-piece tokenizer (cached after the first test), short rows, one evaluation batch
TINY = ["--steps", "2", "--seq-len", "32", "--batch-size", "8", "--data.vocab_size", "512", "--train.eval_batches", "1",
        "--no-progress"]


def run_cli(capsys, *argv):
    "Exit code, stdout and stderr of `minibert-lab ARGV`, in process."
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "torch-run"
    with pytest.warns(UserWarning, match="MIN_VALIDATION_MASKED"):   # one batch of 8 short rows is too small a validation set
        assert main(["pretrain", *TINY, "--out", str(out)]) == 0
    return out


def test_run_folder_is_self_contained(torch_run):
    assert (torch_run / "config.json").is_file() and (torch_run / "metrics.jsonl").is_file()
    assert (torch_run / "tokenizer" / "tokenizer.json").is_file()
    assert list((torch_run / "checkpoints").glob("step_*/COMPLETE"))


def _viz(capsys, tmp_path, folder, *extra):
    code, out, err = run_cli(capsys, "viz", "attention", "--checkpoint", folder, "--out", tmp_path / "a.html", *extra)
    assert code == 0, err
    assert (tmp_path / "a.html").is_file()
    return out


def test_viz_run_and_checkpoint_folders(torch_run, tmp_path, capsys):
    out = _viz(capsys, tmp_path, torch_run)
    assert "model: run:" in out and "step_00000002" in out and "holds none" not in out
    ckpt = next((torch_run / "checkpoints").glob("step_*"))
    out = _viz(capsys, tmp_path, ckpt, "--framework", "jax")
    assert "model: checkpoint:" in out and "as jax" in out and "holds none" not in out


def test_viz_pretrained_and_huggingface_folders(torch_run, tmp_path, capsys):
    from minibert_lab.config import ModelConfig
    from minibert_lab.convert import save_pretrained
    from minibert_lab.data import load_tokenizer
    from minibert_lab.hf import to_hf
    from minibert_lab.torch.models import MiniBERTForMaskedLM
    tok = load_tokenizer(torch_run / "tokenizer")
    m = MiniBERTForMaskedLM(ModelConfig.preset("bert-tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id))
    save_pretrained(m, tmp_path / "ours")
    code, out, err = run_cli(capsys, "viz", "attention", "--checkpoint", tmp_path / "ours", "--out", tmp_path / "a.html")
    assert "model: pretrained:" in out and "holds none" in out     # no tokenizer in the folder: the default, said so
    assert code == 2 and "8192 pieces, more than the model's vocab_size=512" in err and "--tokenizer" in err, err
    out = _viz(capsys, tmp_path, tmp_path / "ours", "--tokenizer", torch_run / "tokenizer")
    assert "model: pretrained:" in out and "holds none" not in out
    to_hf(m, tmp_path / "hf"); tok.save_pretrained(str(tmp_path / "hf"))
    out = _viz(capsys, tmp_path, tmp_path / "hf")
    assert "model: huggingface:" in out and "holds none" not in out


@pytest.mark.slow
def test_viz_jax_run(tmp_path, capsys):
    out = tmp_path / "jax-run"
    with pytest.warns(UserWarning, match="MIN_VALIDATION_MASKED"):
        assert main(["pretrain", *TINY, "--framework", "jax", "--out", str(out)]) == 0
    text = _viz(capsys, tmp_path, out)
    assert "model: run:" in text and "jax run" not in text and "(jax," in text


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "nothing", "is not a folder"),
    (lambda d: d, "has no config.json"),
    (lambda d: (d / "checkpoints").mkdir() or d, r"no intact checkpoint: expected .*step_\*/COMPLETE"),
    (lambda d: [(d / "config.json").write_text("")] and d, "config.json' is not valid JSON"),
    (lambda d: [(d / "config.json").write_text('{"data": {}, "model": {}, "train": {}}')] and d, "no checkpoints/ folder"),
])
def test_viz_bad_model_folders(tmp_path, capsys, make, expected):
    code, _, err = run_cli(capsys, "viz", "attention", "--checkpoint", make(tmp_path), "--out", tmp_path / "a.html")
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(expected, err), err


def test_bad_config_files(tmp_path, capsys):
    code, _, err = run_cli(capsys, "pretrain", "--config", tmp_path / "missing.json", "--out", tmp_path / "r")
    assert code == 2 and "missing.json' does not exist" in err and "experiment config" in err, err
    (tmp_path / "corrupt.json").write_bytes(b"\x00\x01garbage")
    code, _, err = run_cli(capsys, "pretrain", "--config", tmp_path / "corrupt.json", "--out", tmp_path / "r")
    assert code == 2 and "corrupt.json' is not valid JSON" in err, err
    (tmp_path / "hf.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    code, _, err = run_cli(capsys, "config", "--config", tmp_path / "hf.json")
    assert code == 2 and "hf.json' looks like a Hugging Face model config" in err, err
    assert not (tmp_path / "r").exists()


def test_bad_data_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "pretrain", "--data-files", tmp_path / "mine.txt", "--out", tmp_path / "r")
    assert code == 2 and "mine.txt' does not exist" in err, err


def test_pretrain_help_documents_own_data(capsys):
    with pytest.raises(SystemExit): main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "--data-files" in out and "--validation-file" in out and "data.validation_files" in out


def test_lab_checks_kinds_before_any_work(tmp_path, capsys):
    code, _, err = run_cli(capsys, "lab", "--kinds", "standard,bogus", "--out", tmp_path / "lab", "--no-progress")
    assert code == 2 and "'bogus' is invalid" in err, err
    assert not (tmp_path / "lab").exists()        # nothing trained, nothing written


def test_lab_refuses_to_delete_an_earlier_run(tmp_path, capsys):
    (tmp_path / "lab").mkdir(); (tmp_path / "lab" / "report.html").write_text("earlier")
    code, _, err = run_cli(capsys, "lab", "--out", tmp_path / "lab", "--steps", "1", "--no-progress")
    assert code == 2 and "already holds a lab run" in err and "--overwrite" in err, err
    assert (tmp_path / "lab" / "report.html").read_text() == "earlier"


def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    import minibert_lab.pretrain as app
    def interrupted(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(app, "pretrain", interrupted)
    code, _, err = run_cli(capsys, "pretrain", "--out", tmp_path / "r", "--steps", "1")
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err and "--resume" in err, err
    code, _, err = run_cli(capsys, "lab", "--out", tmp_path / "lab", "--steps", "1", "--no-progress")
    assert code == 130 and err.count("\n") == 1 and "interrupted" in err, err


def test_validation_file(tmp_path):
    from minibert_lab.config import ExperimentConfig
    from minibert_lab.data import load_corpus
    from minibert_lab.pretrain import prepare_data
    texts = load_corpus("shakespeare", "validation")["text"][:3]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = ExperimentConfig.preset("tiny").override({"data.vocab_size": 512, "data.seq_len": 32, "data.batch_size": 8,
                                                    "data.validation_files": str(tmp_path / "val.jsonl")})
    data, _ = prepare_data(cfg)
    assert data.stats["validation_documents"] == 3
    n_tokens = sum(int(b["attention_mask"].sum()) for b in data.validation)
    assert 0 < n_tokens < 3 * 1000          # only those three documents


def test_lab_report_explains_itself(tmp_path, capsys):
    out = tmp_path / "lab"
    code, text, err = run_cli(capsys, "lab", "--out", out, "--steps", "2", "--no-progress", "--data.batch_size", "4",
                              "--data.seq_len", "32", "--train.eval_every", "1", "--train.eval_batches", "1")
    assert code == 0, err
    assert "val_loss_spread" in text and "report:" in text
    html = (out / "report.html").read_text()
    for s in ("<style>", "<h2>Setup</h2>", "layers, dim", "512 pieces", "2 steps",
              "train.seed=", "<h2>Columns</h2>", "time_to_target_s", "whole training time", "How noisy",
              "bench_quality.html", "standard vs slay"):
        assert s in html, s
    assert html.count("plotly.js v") <= 1 and html.count("Plotly.newPlot") == 2
    assert html.count('"coloraxis":"coloraxis"') == 2 and '"cmin":0.0' in html   # both kinds' maps, one colour scale
    assert (out / "torch-standard" / "tokenizer").is_dir()


def test_pretrain_says_the_tokenizer_sets_the_vocabulary(capsys):
    "--model.vocab_size is replaced by the tokenizer's size: the command says so (then stops on the missing data file)."
    from minibert_lab.pretrain import cli_pretrain
    with pytest.raises(ValueError, match="does not exist"):
        cli_pretrain(["--out", "/nonexistent/never-written", "--data-files", "/no/such.txt", "--model.vocab_size", "300"])
    assert "model.vocab_size is replaced" in capsys.readouterr().err


@pytest.mark.slow
def test_causal_lab_prints_a_sample(tmp_path, capsys):
    out = tmp_path / "lab"
    code, text, err = run_cli(capsys, "lab", "--out", out, "--kinds", "standard", "--steps", "2", "--no-progress",
                              "--data.objective", "clm", "--data.batch_size", "4", "--data.seq_len", "32",
                              "--train.eval_every", "1", "--train.eval_batches", "1")
    assert code == 0, err
    line = next(l for l in text.splitlines() if l.startswith("sample of torch-standard"))
    prompt, continuation = line.split(": ", 1)[1].split(" ‖ ")
    assert prompt.strip() and continuation.strip()
    assert "sample" in json.loads((out / "results.json").read_text())["rows"][0]
