"Adapters and quantization through the CLI and the bench merger (the library is tested in nbs/27*_adapters*.ipynb)."
import json

import pytest
import torch

from minibert_lab.cli import main
from minibert_lab.config import ModelConfig
from minibert_lab.convert import save_pretrained
from minibert_lab.torch.models import MiniBERTForMaskedLM


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("q") / "tiny"
    save_pretrained(MiniBERTForMaskedLM(ModelConfig(vocab_size=99, dim=64, depth=1, heads=4, ffn_dim=96, max_len=16)).eval(), d)
    return d


@pytest.mark.slow
def test_cli_quantize_writes_a_loadable_model(tiny_folder, tmp_path, capsys):
    from minibert_lab.quantize import load_quantized
    out = tmp_path / "q8"
    assert main(["quantize", str(tiny_folder), "--to", "int8", "--out", str(out)]) == 0
    rep = json.loads((out / "quantization.json").read_text())
    assert rep["scheme"] == "int8" and rep["quantized"]["disk_bytes"] < rep["float"]["disk_bytes"]
    assert "int8:" in capsys.readouterr().out
    assert load_quantized(out).cfg.dim == 64


@pytest.mark.parametrize("args, message", [
    (["--to", "int3"], "quantization 'int3' is unknown; allowed: int8, int8-dynamic, int4"),
    (["--to", "int4-packed"], "cannot run on cpu here"),
])
def test_cli_quantize_errors(tiny_folder, capsys, args, message):
    if "int4-packed" in args and torch.cuda.is_available(): pytest.skip("a CUDA machine may run int4-packed")
    assert main(["quantize", str(tiny_folder), *args, "--out", str(tiny_folder / "x")]) == 2
    assert message in capsys.readouterr().err


def test_bench_merge_refuses_other_settings(tmp_path):
    from minibert_lab.bench.adapters import merge_results
    base = dict(task="trec-6", settings=dict(epochs=2, threads=1, rows={"full": {}}), rows={"full": dict(accuracy=0.9)})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(base))
    b.write_text(json.dumps(base | dict(settings=dict(epochs=3, threads=1, rows={"lora-r8-qv": {}}), rows={"lora-r8-qv": {}})))
    with pytest.raises(ValueError, match="equal settings"): merge_results([a, b])
    b.write_text(json.dumps(base | dict(settings=dict(epochs=2, threads=2, rows={"lora-r8-qv": {}}), rows={"lora-r8-qv": dict(accuracy=0.8)})))
    assert list(merge_results([b, a])["rows"]) == ["full", "lora-r8-qv"]
    with pytest.raises(ValueError, match="appear twice"): merge_results([a, a])


def test_bench_adapters_select_lr():
    from minibert_lab.bench.adapters import select_lr
    assert select_lr({1e-3: 0.90, 2e-3: 0.92, 5e-3: 0.91}) == 2e-3   # the best validation accuracy
    assert select_lr({5e-3: 0.92, 1e-3: 0.92}) == 1e-3                # a tie goes to the smaller rate
    with pytest.raises(ValueError, match="sweep is empty"): select_lr({})
