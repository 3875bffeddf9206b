"Task heads: every loss against its reference (torch F.*, optax, coral-pytorch, a float64 formula), torch == JAX heads, pooling that ignores pads, sklearn metrics, calibration, errors."
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from minibert_lab.config import IGNORE_INDEX, ModelConfig
from minibert_lab.heads import (HEAD_KINDS, HeadConfig, bootstrap_ci, expected_calibration_error, fit_temperature, pool,
                                scores, task_loss, task_metrics, tune_thresholds)
from minibert_lab.jax.models import _nnx_layout, nnx_state_numpy
import minibert_lab.torch.heads as th
import minibert_lab.jax.heads as jh

B, L, C, D = 3, 7, 5, 6      # tiny odd sizes
MASK = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
TOL = 1e-6


def _num_labels(kind):
    "num_labels of the test heads: one regression target, two binary classes, else C."
    return {"regression": 1, "binary": 2}.get(kind, C)


def _close(a, b, tol=TOL):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


def _data(kind, rng, n=B):
    "float64 logits and labels for `kind` (C classes / labels / targets)."
    if kind == "binary": return rng.normal(size=n) * 2, rng.integers(0, 2, n)
    if kind == "multiclass": return rng.normal(size=(n, C)) * 2, rng.integers(0, C, n)
    if kind == "multilabel": return rng.normal(size=(n, C)) * 2, rng.integers(0, 2, (n, C))
    if kind == "regression": return rng.normal(size=n) * 2, rng.normal(size=n) * 2
    if kind == "ordinal": return rng.normal(size=(n, C - 1)) * 2, rng.integers(0, C, n)
    y = rng.integers(0, C, (n, L))
    y[MASK == 0] = rng.integers(0, C, int((MASK == 0).sum()))    # labels at pads exist but must be skipped
    y[0, 3] = IGNORE_INDEX
    return rng.normal(size=(n, L, C)) * 2, y


def _torch_ref(kind, z, y, **opt):
    z, yt = torch.tensor(z), torch.tensor(y)
    if kind in ("binary", "multilabel"): return F.binary_cross_entropy_with_logits(z, yt.double())
    if kind == "multiclass": return F.cross_entropy(z, yt, label_smoothing=opt.get("label_smoothing", 0.0))
    if kind == "regression":
        fn = {"mse": F.mse_loss, "mae": F.l1_loss, "huber": lambda a, b: F.huber_loss(a, b, delta=opt["huber_delta"])}
        return fn[opt["regression_loss"]](z, yt)
    if kind == "ordinal":
        from coral_pytorch.dataset import levels_from_labelbatch
        from coral_pytorch.losses import coral_loss
        return coral_loss(z, levels_from_labelbatch(yt, num_classes=C, dtype=torch.float64))
    yt = torch.where(torch.tensor(MASK) == 1, yt, IGNORE_INDEX)
    return F.cross_entropy(z.reshape(-1, C), yt.reshape(-1), ignore_index=IGNORE_INDEX,
                           label_smoothing=opt.get("label_smoothing", 0.0))


def _optax_ref(kind, z, y, **opt):
    z = jnp.asarray(z, jnp.float32)
    if kind in ("binary", "multilabel"): return optax.sigmoid_binary_cross_entropy(z, jnp.asarray(y, jnp.float32)).mean()
    if kind == "multiclass":
        t = optax.smooth_labels(jax.nn.one_hot(y, C), opt.get("label_smoothing", 0.0))
        return optax.softmax_cross_entropy(z, t).mean()
    if kind == "regression":
        d = z - jnp.asarray(y, jnp.float32)
        if opt["regression_loss"] == "mse": return (2 * optax.l2_loss(d)).mean()          # l2_loss is d²/2
        if opt["regression_loss"] == "mae": return jnp.abs(d).mean()
        return optax.huber_loss(z, jnp.asarray(y, jnp.float32), delta=opt["huber_delta"]).mean()
    valid = (jnp.asarray(y) != IGNORE_INDEX) & (jnp.asarray(MASK) == 1)
    eps = opt.get("label_smoothing", 0.0)
    ce = (optax.softmax_cross_entropy(z, optax.smooth_labels(jax.nn.one_hot(jnp.where(valid, y, 0), C), eps)) if eps
          else optax.softmax_cross_entropy_with_integer_labels(z, jnp.where(valid, y, 0)))
    return jnp.where(valid, ce, 0).sum() / valid.sum()


CASES = [("binary", {}), ("multiclass", {}), ("multiclass", dict(label_smoothing=0.1)), ("multilabel", {}),
         ("regression", dict(regression_loss="mse")), ("regression", dict(regression_loss="mae")),
         ("regression", dict(regression_loss="huber", huber_delta=0.7)), ("ordinal", {}), ("token", {}),
         ("token", dict(label_smoothing=0.2))]


@pytest.mark.parametrize("kind,opt", CASES, ids=[f"{k}-{'-'.join(map(str, o.values()))}" for k, o in CASES])
def test_loss_equals_reference(kind, opt):
    "Each loss on torch float64 equals torch's F.* (or coral-pytorch), and on JAX float32 equals optax, within 1e-6."
    z, y = _data(kind, np.random.default_rng(list(HEAD_KINDS).index(kind)))
    head = HeadConfig(kind, _num_labels(kind), **opt)
    mask = MASK if kind == "token" else None
    ours = task_loss(head, torch.tensor(z), torch.tensor(y), None if mask is None else torch.tensor(mask))
    _close(ours.detach(), _torch_ref(kind, z, y, **opt))
    if kind != "ordinal":
        zj = jnp.asarray(z, jnp.float32)
        ours_j = task_loss(head, zj, jnp.asarray(y), None if mask is None else jnp.asarray(mask))
        _close(ours_j, _optax_ref(kind, z, y, **opt), 2e-6)
    _close(task_loss(head, z, y, mask), ours.detach())        # numpy float64 too


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.5, None), (0.0, 0.8)])
def test_focal_loss_equals_float64_formula(gamma, alpha):
    "Focal loss against -α_t (1 - p_t)^γ log p_t computed directly in float64, in torch and JAX."
    z, y = _data("binary", np.random.default_rng(3), n=50)
    p = 1 / (1 + np.exp(-z))
    pt = np.where(y == 1, p, 1 - p)
    at = np.ones_like(z) if alpha is None else np.where(y == 1, alpha, 1 - alpha)
    ref = np.mean(-at * (1 - pt) ** gamma * np.log(pt))
    head = HeadConfig("binary", focal_gamma=gamma, focal_alpha=alpha)
    _close(task_loss(head, torch.tensor(z), torch.tensor(y)), ref, 1e-12)
    _close(task_loss(head, jnp.asarray(z, jnp.float32), jnp.asarray(y)), ref, 1e-6)


def _copy_torch_to_nnx(tmod, jmod):
    "Load torch module `tmod`'s state into NNX `jmod` by name (linear weight [out, in] -> kernel [in, out])."
    sd = {k: v.detach().numpy() for k, v in tmod.state_dict().items()}
    layout = _nnx_layout(jmod)
    assert sorted(n for _, n, _ in layout) == sorted(sd), (sorted(n for _, n, _ in layout), sorted(sd))
    state = nnx.state(jmod, nnx.Not(nnx.RngState))
    flat = dict(nnx.to_flat_state(state))
    for path, name, transpose in layout:
        flat[path].set_value(jnp.asarray(sd[name].T if transpose else sd[name]))
    nnx.update(jmod, state)


KINDS_POOL = [("binary", "mean"), ("multiclass", "max"), ("multilabel", "cls"), ("regression", "max"),
              ("ordinal", "mean"), ("ordinal", "max"), ("token", "cls")]     # every kind, every pooling


@pytest.mark.parametrize("kind,pooling", KINDS_POOL, ids=[f"{k}-{p}" for k, p in KINDS_POOL])
def test_torch_and_jax_heads_agree(kind, pooling):
    "Same weights, same hidden states: torch and JAX logits and losses agree within 1e-5; names convert."
    rng = np.random.default_rng(7)
    head = HeadConfig(kind, _num_labels(kind), pooling=pooling)
    torch.manual_seed(0)
    t = th.TaskHead(D, head, init_std=0.5)
    j = jh.TaskHead(D, head, init_std=0.5, rngs=nnx.Rngs(1))
    _copy_torch_to_nnx(t, j)
    assert sorted(nnx_state_numpy(j)) == sorted(t.state_dict())
    h = rng.normal(size=(B, L, D)).astype(np.float32)
    zt = t(torch.tensor(h), torch.tensor(MASK))
    zj = j(jnp.asarray(h), jnp.asarray(MASK))
    _close(zt.detach(), zj, 1e-5)
    _, y = _data(kind, rng)
    lt = task_loss(head, zt, torch.tensor(y), torch.tensor(MASK))
    lj = task_loss(head, zj, jnp.asarray(y), jnp.asarray(MASK))
    _close(lt.detach(), lj, 1e-5)
    lt.backward()                                            # and the gradients of the shared weights
    gj = nnx.grad(lambda m: task_loss(head, m(jnp.asarray(h), jnp.asarray(MASK)), jnp.asarray(y), jnp.asarray(MASK)))(j)
    _close(t.out.weight.grad.T, gj["out"]["kernel"][...], 1e-5)


@pytest.mark.slow
def test_full_models_convert_by_name():
    "MiniBERTForTask torch -> JAX by the usual name rule gives the same logits (pooler pooling, eval mode)."
    cfg = ModelConfig.preset("tiny", pooler=True)
    head = HeadConfig("multiclass", C, pooling="pooler")
    torch.manual_seed(0)
    t = th.MiniBERTForTask(cfg, head).eval()
    j = jh.MiniBERTForTask(cfg, head, rngs=nnx.Rngs(0))
    j.eval()
    _copy_torch_to_nnx(t, j)
    ids = np.random.default_rng(0).integers(5, cfg.vocab_size, (B, L))
    y = np.array([0, 3, 4])
    ot = t(torch.tensor(ids), torch.tensor(MASK), torch.tensor(y))
    oj = j(jnp.asarray(ids), jnp.asarray(MASK), jnp.asarray(y))
    _close(ot.logits.detach(), oj.logits, 1e-4)
    _close(ot.loss.detach(), oj.loss, 1e-4)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_pooling_ignores_pad_content(pooling):
    "NaN at pads: finite outputs (and torch gradients), equal to the outputs with zeros at pads, in both frameworks."
    h = np.random.default_rng(0).normal(size=(B, L, D))
    clean, dirty = h.copy(), h.copy()
    clean[MASK == 0], dirty[MASK == 0] = 0.0, np.nan
    ref = pool(clean, MASK, pooling)
    ht = torch.tensor(dirty, requires_grad=True)
    out_t = pool(ht, torch.tensor(MASK), pooling)
    out_t.sum().backward()
    assert torch.isfinite(out_t).all() and torch.isfinite(ht.grad).all()
    _close(out_t.detach(), ref, 1e-12)
    _close(pool(jnp.asarray(dirty, jnp.float32), jnp.asarray(MASK), pooling), ref, 1e-6)
    gj = jax.grad(lambda x: pool(x, jnp.asarray(MASK), pooling).sum())(jnp.asarray(dirty, jnp.float32))
    assert bool(jnp.isfinite(gj).all())


def test_task_metrics_equal_sklearn():
    "task_metrics on known data equals direct scikit-learn / scipy calls."
    from sklearn import metrics as M
    from scipy import stats
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, 300)
    z = rng.normal(size=(300, C)); z[np.arange(300), y] += 1.5
    p = scores("multiclass", z)
    m = task_metrics("single_label_classification", y, p)
    assert m["accuracy"] == pytest.approx(M.accuracy_score(y, p.argmax(1)))
    assert m["macro_f1"] == pytest.approx(M.f1_score(y, p.argmax(1), average="macro"))
    assert m["roc_auc"] == pytest.approx(M.roc_auc_score(y, p, multi_class="ovr"))
    ym = rng.integers(0, 2, (300, C)); pm = np.clip(ym * 0.4 + rng.uniform(0, 0.6, (300, C)), 0, 1)
    mm = task_metrics("multi_label_classification", ym, pm)
    assert mm["hamming_loss"] == pytest.approx(M.hamming_loss(ym, pm >= 0.5))
    assert mm["subset_accuracy"] == pytest.approx(M.accuracy_score(ym, pm >= 0.5))
    assert mm["roc_auc"] == pytest.approx(M.roc_auc_score(ym, pm))
    yr, pr = rng.normal(size=100), rng.normal(size=100)
    mr = task_metrics("regression", yr, pr)
    assert mr["mae"] == pytest.approx(M.mean_absolute_error(yr, pr))
    assert mr["spearman"] == pytest.approx(stats.spearmanr(yr, pr).statistic)
    yt = np.array([[0, 1, 2, IGNORE_INDEX], [4, 4, IGNORE_INDEX, IGNORE_INDEX]])
    pt = np.array([[0, 1, 1, 3], [4, 0, 2, 2]])
    mt = task_metrics("token", yt, pt)
    assert mt["accuracy"] == pytest.approx(3 / 5)           # 2 of 3 real tokens, then 1 of 2
    yo = np.array([0, 1, 2, 3, 4, 4]); co = np.array([[0.1] * 4, [0.9, 0.2, 0.1, 0.1], [0.9, 0.9, 0.4, 0.1],
                                                     [0.9, 0.8, 0.7, 0.2], [0.9, 0.9, 0.9, 0.6], [0.9, 0.9, 0.6, 0.4]])
    mo = task_metrics("ordinal", yo, co)                  # CORAL probabilities -> ranks 0, 1, 2, 3, 4, 3
    assert mo["mae"] == pytest.approx(1 / 6) and mo["kendall_tau"] == pytest.approx(stats.kendalltau(yo, [0, 1, 2, 3, 4, 3]).statistic)


def test_bootstrap_ci_is_deterministic_and_covers():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150); p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 150), 0, 1)
    from sklearn.metrics import roc_auc_score as auc
    v, lo, hi = bootstrap_ci(auc, y, p, n=200, seed=3)
    assert lo <= v <= hi and hi - lo > 0.01
    assert bootstrap_ci(auc, y, p, n=200, seed=3) == (v, lo, hi)
    assert bootstrap_ci(auc, y, p, n=200, seed=4) != (v, lo, hi)


def test_temperature_and_thresholds():
    rng = np.random.default_rng(2)
    z = rng.normal(size=2000); y = (rng.uniform(size=2000) < 1 / (1 + np.exp(-z))).astype(int)
    T = fit_temperature(4 * z, y)                            # binary logits four times too confident
    assert 3.4 < T < 4.6
    p0, p1 = 1 / (1 + np.exp(-4 * z)), 1 / (1 + np.exp(-4 * z / T))
    assert expected_calibration_error(p1, y) < expected_calibration_error(p0, y)
    ym = rng.integers(0, 2, (400, 3)); pm = np.clip(ym * 0.2 + rng.uniform(0, 0.5, (400, 3)), 0, 1)   # best below 0.5
    thr = tune_thresholds(pm, ym)
    from sklearn.metrics import f1_score
    for c in range(3):
        assert f1_score(ym[:, c], pm[:, c] >= thr[c]) >= f1_score(ym[:, c], pm[:, c] >= 0.5)
    assert task_metrics("multilabel", ym, pm, thr)["macro_f1"] > task_metrics("multilabel", ym, pm)["macro_f1"]


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="regression head must be numbers.*'2.5'"):
        task_loss(HeadConfig("regression", 1), np.zeros(2), np.array(["2.5", "x"]))
    with pytest.raises(ValueError, match="num_labels=5 hold class 5; allowed: 0..4"):
        task_loss(HeadConfig("multiclass", 5), torch.zeros(2, 5), torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="hold class 4; allowed: 0..3"):
        task_loss(HeadConfig("ordinal", 4), jnp.zeros((2, 3)), jnp.array([4, 0]))
    with pytest.raises(ValueError, match="'focal'.*allowed: binary, multiclass, multilabel, regression, ordinal, token"):
        HeadConfig("focal")
    with pytest.raises(ValueError, match="empty batch"):
        task_loss(HeadConfig("multiclass", 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"): pool(np.zeros((0, 4, 2)), None, "mean")
    with pytest.raises(ValueError, match="empty batch"): task_metrics("binary", [], [])
    with pytest.raises(ValueError, match="pooling='sum' is unknown"): pool(np.zeros((1, 4, 2)), None, "sum")


def test_metric_names_are_the_head_table():
    "task_metrics returns exactly the metrics HEAD_KINDS lists, for every kind (from its logits via `scores`)."
    rng = np.random.default_rng(5)
    for kind in HEAD_KINDS:
        z, y = _data(kind, rng, n=B if kind == "token" else 40)
        if kind == "multiclass": y = np.arange(40) % C                      # every class present: ROC-AUC defined
        if kind == "multilabel": y[:2] = [[0] * C, [1] * C]
        if kind == "token": y = np.where(MASK == 1, y, IGNORE_INDEX)
        assert sorted(task_metrics(kind, y, scores(kind, z))) == sorted(HEAD_KINDS[kind].metrics), kind
