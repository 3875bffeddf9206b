"Figures' data (shapes, labels, finite values), torch/JAX attention parity through the viz path, and `minibert-lab viz`."
import json, math

import numpy as np
import pytest
import torch

from minibert_lab import viz
from minibert_lab.cli import main
from minibert_lab.config import ModelConfig
from minibert_lab.train import read_metrics

B, L, V = 3, 7, 99


def tiny_cfg(kind="standard"):
    return ModelConfig.preset("tiny", vocab_size=V, dim=32, attention=kind)


def test_training_curves_from_run_folders(tmp_path):
    runs = {}
    for r in range(2):
        d = tmp_path / f"run{r}"; d.mkdir()
        recs = [dict(step=s, loss=5.0 - s / 10 - r) for s in range(1, 11)] + [dict(step=10, val_loss=4.0 - r)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in recs) + "\n")
        runs[d.name] = d
    runs = {name: read_metrics(d) for name, d in runs.items()}                       # viz draws records; train reads them
    fig = viz.training_curves(runs)
    assert [t.name for t in fig.data] == ["run0", "run0", "run1", "run1"]           # loss, val_loss per run
    assert list(fig.data[0].y) == pytest.approx([5.0 - s / 10 for s in range(1, 11)])
    assert list(fig.data[3].y) == [3.0]
    with pytest.raises(ValueError, match="metrics"): viz.training_curves(runs, metrics=[])
    with pytest.raises(ValueError, match="read_metrics"): viz.training_curves({"run0": tmp_path / "run0"})


def test_write_html_inlines_plotly_once(tmp_path):
    figs = [viz.training_curves({"a": [dict(step=1, loss=1.0)]}) for _ in range(3)]
    html = viz.write_html(figs, tmp_path / "f.html").read_text()
    assert html.count("Plotly.newPlot(") == 3
    notebook = viz.show(figs[0])._repr_mimebundle_()["text/html"]
    assert "Plotly.newPlot(" in notebook and len(notebook) * 50 < len(html)        # no plotly.js in notebook outputs


def test_head_summaries_oracle():
    eye, uni = np.eye(L), np.full((L, L), 1 / L)
    s = viz.head_summaries([np.stack([eye, uni])[None]])
    assert s["entropy"][0] == pytest.approx([0.0, math.log(L)])
    assert s["distance"][0] == pytest.approx([0.0, np.abs(np.arange(L)[:, None] - np.arange(L)).mean()])


@pytest.mark.parametrize("kind", ["standard", "yat", "performer", "slay"])
def test_attention_maps_torch_and_jax_agree(kind):
    "The same weights give the same attention maps in both frameworks (exact and implied weights)."
    from minibert_lab.convert import torch_to_jax
    torch.manual_seed(0)
    from minibert_lab.torch.models import MiniBERTForMaskedLM
    tm = MiniBERTForMaskedLM(tiny_cfg(kind)).eval()
    ids = np.random.default_rng(0).integers(5, V, L)
    a_t = viz.model_attentions(tm, ids)
    a_j = viz.model_attentions(torch_to_jax(tm), ids)
    assert a_t.shape == (2, 4, L, L) and np.isfinite(a_t).all()
    np.testing.assert_allclose(a_t.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(a_t, a_j, atol=2e-4)
    fig = viz.attention_map(a_t, [f"t{i}" for i in range(L)])
    assert len(fig.data) == 2 * 4 and fig.data[0].z.shape == (L, L)
    assert fig.data[0].x[0] == "0:t0" and len(fig.layout.updatemenus[0].buttons) == 8


def test_kernel_shapes_are_finite_and_exact_curves_right():
    d = viz.kernel_shapes(kinds=["slay", "slay-anchor"], n=11, draws=3, head_dim=16)
    x = d["x"]
    assert x[0] == -1.0 and x[-1] == pytest.approx(viz.MAX_COSINE)
    assert d["exact"]["softmax"] == pytest.approx(np.exp(x))
    for e in d["estimates"].values():
        assert e["mean"].shape == (11,) and np.isfinite(e["mean"]).all() and (e["std"] >= 0).all()
    assert len(viz.kernel_shapes_figure(d).data) == 3 + 2 * 2


def test_cli_viz_curves_and_kernels(tmp_path, capsys):
    d = tmp_path / "run"; d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps(dict(step=1, loss=2.0)) + "\n")
    assert main(["viz", "curves", str(d), "--out", str(tmp_path / "c.html")]) == 0
    assert main(["viz", "kernels", "--draws", "2", "--out", str(tmp_path / "k.html")]) == 0
    for f in ("c.html", "k.html"):
        assert (tmp_path / f).read_text().count("Plotly.newPlot(") == 1
    assert main(["viz", "curves", str(tmp_path / "missing")]) == 2                    # ValueError -> exit 2


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cli_viz_attention_of_a_checkpoint(tmp_path, framework):
    from minibert_lab.convert import save_pretrained
    from minibert_lab.data import load_tokenizer
    from minibert_lab.torch.models import MiniBERTForMaskedLM
    tok = load_tokenizer()
    torch.manual_seed(0)
    save_pretrained(MiniBERTForMaskedLM(ModelConfig.preset("tiny", vocab_size=len(tok), attention="slay")), tmp_path / "ckpt")
    out = tmp_path / "a.html"
    assert main(["viz", "attention", "--checkpoint", str(tmp_path / "ckpt"), "--framework", framework,
                 "--text", "to be or not to be", "--out", str(out)]) == 0
    html = out.read_text()
    assert html.count("Plotly.newPlot(") == 2 and "head 3" in html and "Attention (slay)" in html


def test_kind_style_colour_per_kind_dash_per_family():
    "Every registered kind (a kind registered now too) has its own colour; dashes are equal exactly within a family."
    import dataclasses
    from minibert_lab import kernels
    base = kernels.get_kind("standard")
    kernels.register_kind(dataclasses.replace(base, name="viz-toy", family="viz-toy-family"), overwrite=True)
    try:
        kinds = list(kernels.KERNELS)
        assert len(kinds) >= 15 and len(viz.COLORS) >= len(kinds)
        style = {k: viz.kind_style(k) for k in kinds}
        assert len({s["color"] for s in style.values()}) == len(kinds)
        fam = {k: kernels.get_kind(k).family for k in kinds}
        families = list(dict.fromkeys(fam.values()))    # other tests in this process may have registered kinds too
        distinct = set(families[:len(viz.DASHES)])        # the first len(DASHES) families get a dash each
        for a in kinds:
            for b in kinds:
                if fam[a] == fam[b]: assert style[a]["dash"] == style[b]["dash"], (a, b)
                elif fam[a] in distinct and fam[b] in distinct: assert style[a]["dash"] != style[b]["dash"], (a, b)
        if "viz-toy-family" in distinct:
            assert style["viz-toy"]["dash"] not in {style[k]["dash"] for k in kinds if k != "viz-toy"}
    finally:
        kernels.unregister_kind("viz-toy")
    with pytest.raises(ValueError, match="no-such-kind"): viz.kind_style("no-such-kind")
    d = viz.kernel_shapes(kinds=["slay", "slay-anchor"], n=5, draws=1, head_dim=8)
    lines = [t for t in viz.kernel_shapes_figure(d).data if t.name.endswith("(mean of draws)")]
    assert [t.line.color for t in lines] == [viz.kind_style(k)["color"] for k in ("slay", "slay-anchor")]


def test_attention_map_colour_scale_fixed_unless_stretched():
    "Near-uniform weights are drawn on [0, 1] (they look uniform); stretch=True spans each map's own min..max."
    rng = np.random.default_rng(0)
    a = 1 / L + rng.uniform(-0.005, 0.005, (2, 4, L, L))                           # [layers, H, L, L], ~1/L
    fig = viz.attention_map(a, [f"t{i}" for i in range(L)])
    assert {(t.zmin, t.zmax) for t in fig.data} == {(0.0, 1.0)}
    fig = viz.attention_map(a, [f"t{i}" for i in range(L)], stretch=True)
    assert [(t.zmin, t.zmax) for t in fig.data] == [(a[l, h].min(), a[l, h].max()) for l in range(2) for h in range(4)]
