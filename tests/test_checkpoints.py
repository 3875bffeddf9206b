"Checkpoint integrity and the loop's policies, on a scripted fake backend (no model: each test runs in milliseconds)."
import json, math, os, signal, stat, threading, warnings
from pathlib import Path
import numpy as np
import pytest
from minibert_lab import train as T
from minibert_lab.config import ExperimentConfig, ModelConfig, TrainConfig


class Loader:
    "An endless loader of one-row batches whose position is its state."
    def __init__(self, on_batch=None): self.i, self.on_batch = 0, on_batch
    def __iter__(self):
        while True:
            self.i += 1
            if self.on_batch: self.on_batch(self.i)
            yield {"attention_mask": np.ones((1, 4), np.int64), "i": self.i}
    def state_dict(self): return {"i": self.i}
    def load_state_dict(self, d): self.i = d["i"]


class Scripted:
    "A backend whose training loss and parameter `w` (also its validation loss) follow a script, batch by batch."
    rank = 0
    def __init__(self, losses, ws): self.losses, self.ws, self.s, self.w = list(losses), list(ws), 0, 1.0
    def train_step(self, micro):
        i = min(micro[0]["i"] - 1, len(self.losses) - 1)    # the n-th batch drawn (a restore moves on, as the data does)
        loss, self.w = self.losses[i], self.ws[i]
        self.s += 1
        return {"loss": loss, "grad_norm": 1.0, "lr": 1e-3}
    def eval_batch(self, batch): return self.w, 1, 0
    def nonfinite_state(self): return [] if math.isfinite(self.w) else ["w"]
    def save(self, folder): (folder / "w.json").write_text(json.dumps({"w": self.w, "s": self.s}))
    def load(self, folder):
        d = json.loads((folder / "w.json").read_text()); self.w, self.s = d["w"], d["s"]


def cfg(**train):
    return ExperimentConfig.preset("tiny").override({"train.log_every": 1, "train.warmup_steps": 0, **{f"train.{k}": v for k, v in train.items()}})


def saved_ws(out):
    return {p.name: json.loads((p / "w.json").read_text())["w"] for p in T.list_checkpoints(out)}


# ---- item 1: never seal a non-finite state; a non-finite validation loss triggers the policy ----

def test_nonfinite_state_is_never_sealed(tmp_path):
    "The loss is finite (computed before the update) but the update overflows: the checkpoint is refused."
    c = cfg(steps=6, save_every=1, eval_every=100)
    be = Scripted(losses=[5.0, 5.0, 5.0, 5.0], ws=[1.0, 2.0, math.inf, math.inf])
    with pytest.raises(T.NonFiniteLossError, match=r"non-finite parameters or optimizer state in 1 arrays \(w\) at step 3"):
        T.fit(be, c, Loader(), [{}], tmp_path, progress=False)
    assert saved_ws(tmp_path) == {"step_00000001": 1.0, "step_00000002": 2.0}


def test_nonfinite_state_restore_never_reloads_a_bad_checkpoint(tmp_path):
    c = cfg(steps=8, save_every=1, eval_every=100, on_nan="restore", keep_checkpoints=10)
    be = Scripted(losses=[5.0] * 8, ws=[1.0, 2.0, math.inf, 3.0, 4.0, 5.0, 6.0, 7.0])
    with pytest.warns(UserWarning, match="restoring step_00000002 \\(1/3\\)"):
        res = T.fit(be, c, Loader(), [{}], tmp_path, progress=False)
    assert res.step == 8 and all(math.isfinite(w) for w in saved_ws(tmp_path).values())


def test_nonfinite_validation_loss_triggers_the_policy(tmp_path):
    c = cfg(steps=6, save_every=100, eval_every=2)
    be = Scripted(losses=[5.0] * 6, ws=[1.0, 1.0, 1.0, math.nan, 1.0, 1.0])
    with pytest.raises(T.NonFiniteLossError, match="non-finite validation loss nan at step 4"):
        T.fit(be, c, Loader(), [{}], tmp_path, progress=False)
    assert all(math.isfinite(r["val_loss"]) for r in T.read_metrics(tmp_path) if "val_loss" in r)


# ---- item 5: a finite divergence is caught ----

def test_finite_divergence_is_caught(tmp_path):
    "The loss jumps from ~6 to thousands and stays there (finite): DivergenceError after DIVERGENCE_STEPS steps."
    c = cfg(steps=40, save_every=100, eval_every=100)
    be = Scripted(losses=[6.2, 6.1, 6.0] + [5425.0] * 37, ws=[1.0] * 40)
    with pytest.raises(T.DivergenceError, match=r"diverged .* at step 8"):
        T.fit(be, c, Loader(), [{}], tmp_path, progress=False)
    assert issubclass(T.DivergenceError, T.NonFiniteLossError)   # the CLI's NaN handling covers it
    assert 3 + T.DIVERGENCE_STEPS == 8


@pytest.mark.parametrize("field,value", [("lr", math.nan), ("lr", math.inf), ("grad_clip", math.nan),
                                         ("grad_clip", math.inf), ("weight_decay", math.inf)])
def test_train_config_rejects_nonfinite_numbers(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig.{field}={value!r} is invalid; allowed: a finite number"):
        TrainConfig(**{field: value})


def test_model_config_rejects_nonfinite_init_std():
    for v in (math.nan, math.inf):
        with pytest.raises(ValueError, match="ModelConfig.init_std=.* allowed: a finite number"):
            ModelConfig(init_std=v)
    with pytest.raises(ValueError, match="TrainConfig.lr=nan"):      # the CLI words reach the same check
        ExperimentConfig.preset("tiny").override(["--train.lr", "nan"])


# ---- item 2: a garbled manifest is an incomplete checkpoint ----

GARBLED = {
    "non-UTF-8 bytes": (b'\xff\xfe{"files": 1}', "not UTF-8"),
    "a JSON list": (b'[1, 2, 3]', "a JSON list, not an object"),
    "no size field": (b'{"step": 9, "files": {"w.json": {"sha256": "00"}}}', "entry 'w.json'"),
    "no files": (b'{"step": 9, "files": {}}', "non-empty mapping"),
    "not JSON": (b'{"step": 9, "fil', "not JSON"),
    "escaping path": (b'{"step": 9, "files": {"../x": {"size": 1, "sha256": "00"}}}', "outside the checkpoint"),
}


@pytest.mark.parametrize("case", list(GARBLED))
def test_garbled_manifest_is_skipped_with_a_warning(tmp_path, case):
    raw, why = GARBLED[case]
    T.write_checkpoint(tmp_path, 5, lambda f: (f / "w.json").write_text("{}"))
    bad = T.checkpoint_path(tmp_path, 9); bad.mkdir(); (bad / "w.json").write_text("{}")
    (bad / T.MANIFEST).write_bytes(raw)
    assert why in T.verify_checkpoint(bad)
    with pytest.warns(UserWarning, match=rf"skipping checkpoint .*step_00000009: .*{why}"):
        assert T.latest_checkpoint(tmp_path).name == "step_00000005"


# ---- item 3: pruning never deletes the newest verified checkpoint ----

def test_prune_keeps_good_checkpoints_behind_a_corrupt_newer_one(tmp_path):
    "keep=1 with a corrupt step 9 present: each new good checkpoint survives; older good ones are pruned."
    bad = T.checkpoint_path(tmp_path, 9); bad.mkdir(parents=True); (bad / T.MANIFEST).write_text("[]")
    for s in (4, 5, 6):
        T.write_checkpoint(tmp_path, s, lambda f: (f / "w.bin").write_bytes(b"x" * s), keep=1)
        names = [p.name for p in T.list_checkpoints(tmp_path)]
        assert names == [f"step_{s:08d}", "step_00000009"], names
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert T.latest_checkpoint(tmp_path).name == "step_00000006"


def test_prune_counts_only_verified_checkpoints(tmp_path):
    "keep=2: a truncated checkpoint does not count, so the two newest intact ones stay."
    for s in (1, 2, 3):
        T.write_checkpoint(tmp_path, s, lambda f: (f / "w.bin").write_bytes(b"x" * 8), keep=3)
    (T.checkpoint_path(tmp_path, 3) / "w.bin").write_bytes(b"x")          # step 3 truncated
    T.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in T.list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002", "step_00000003"]
    T.write_checkpoint(tmp_path, 4, lambda f: (f / "w.bin").write_bytes(b"x" * 8), keep=2)
    assert [p.name for p in T.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000004"]


# ---- item 7: every checkpoint file has the same mode ----

def test_checkpoint_files_share_one_mode(tmp_path):
    def write(f):
        (f / "a.txt").write_text("a")
        (f / "b.bin").write_bytes(b"b"); os.chmod(f / "b.bin", 0o600)      # like safetensors
    ck = T.write_checkpoint(tmp_path, 1, write)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ck.iterdir() if p.is_file() and p.name != T.MANIFEST}
    assert len(set(modes.values())) == 1 and modes["b.bin"] == T._file_mode(), modes
    assert T.verify_checkpoint(ck) is None


# ---- item 6: Ctrl-C, resuming a finished run, extending it ----

needs_main_thread = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                       reason="signal handlers need the main thread")


@needs_main_thread
def test_ctrl_c_saves_and_returns_interrupted(tmp_path, capsys):
    "SIGINT while drawing the batches of step 3: step 3 completes, is sealed, and fit returns interrupted=True."
    c = cfg(steps=20, save_every=10, eval_every=100)
    loader = Loader(on_batch=lambda i: signal.raise_signal(signal.SIGINT) if i == 3 else None)
    res = T.fit(Scripted([5.0] * 20, [1.0] * 20), c, loader, [{}], tmp_path, progress=False)
    assert res.interrupted and res.stopped == "interrupted" and res.step == 3
    assert res.checkpoint == T.checkpoint_path(tmp_path, 3) and T.verify_checkpoint(res.checkpoint) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted at step 3" in err[0] and "--resume" in err[0] and "step_00000003" in err[0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler        # the handler is put back
    res = T.fit(Scripted([5.0] * 20, [1.0] * 20), c, Loader(), [{}], tmp_path, resume=True, progress=False)
    assert res.step == 20 and not res.interrupted


@needs_main_thread
def test_second_ctrl_c_interrupts_at_once(tmp_path):
    c = cfg(steps=20, save_every=10, eval_every=100)
    def twice(i):
        if i == 3: signal.raise_signal(signal.SIGINT); signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        T.fit(Scripted([5.0] * 20, [1.0] * 20), c, Loader(on_batch=twice), [{}], tmp_path, progress=False)


def test_resume_of_finished_run_reports_no_nan(tmp_path):
    "Resuming a finished run does no step: throughput and final evaluation come from the saved run, never NaN."
    c = cfg(steps=4, save_every=2, eval_every=2)
    first = T.fit(Scripted([5.0] * 4, [1.0] * 4), c, Loader(), [{}], tmp_path, progress=False)
    again = T.fit(Scripted([5.0] * 4, [1.0] * 4), c, Loader(), [{}], tmp_path, resume=True, progress=False)
    assert again.step == 4 and again.train_tokens_per_s is not None and math.isfinite(again.train_tokens_per_s)
    assert again.train_tokens_per_s == pytest.approx(first.train_tokens_per_s)
    assert again.final_eval == first.final_eval
    one = T.fit(Scripted([5.0], [1.0]), cfg(steps=1), Loader(), [{}], tmp_path / "one", progress=False)
    assert one.train_tokens_per_s is not None and math.isfinite(one.train_tokens_per_s)   # a 1-step run times its step


def test_finished_run_can_be_extended(tmp_path):
    c = cfg(steps=4, save_every=2, eval_every=2)
    T.fit(Scripted([5.0] * 4, [1.0] * 4), c, Loader(), [{}], tmp_path, progress=False)
    with pytest.warns(UserWarning, match="train.steps changed from 4 to 7 .*schedule follows the new total"):
        res = T.fit(Scripted([5.0] * 8, [1.0] * 8), cfg(steps=7, save_every=2, eval_every=2), Loader(), [{}],
                    tmp_path, resume=True, progress=False)
    assert res.step == 7 and [r["step"] for r in T.read_metrics(tmp_path) if "loss" in r] == list(range(1, 8))
    assert ExperimentConfig.from_json(tmp_path / T.CONFIG_FILE).train.steps == 7


# ---- property: a kill at any file operation of a run, then a resume, ends where an uninterrupted run ends ----

from hypothesis import given, settings, strategies as st


class Killed(BaseException):
    "A simulated SIGKILL: not an `Exception`, so nothing in the loop can catch it and clean up."


KILL_RUN = dict(steps=6, save_every=2, eval_every=3, keep_checkpoints=2)
KILL_LOSSES, KILL_WS = [5.0 - 0.1 * i for i in range(12)], [1.0 + i for i in range(12)]


def _killing(fn, counter, at):
    def wrapped(*a, **k):
        counter[0] += 1
        if counter[0] == at: raise Killed()
        return fn(*a, **k)
    return wrapped


@given(at=st.integers(1, 12))          # the run makes 9 such operations: every kill point, and one past the end
@settings(max_examples=12, derandomize=True, deadline=None, database=None)
def test_random_kill_points_resume_to_the_same_run(tmp_path_factory, at):
    "Kill at the `at`-th file write, replace or backend save (inside or between checkpoints); resume; same final state."
    ref = tmp_path_factory.mktemp("ref")
    T.fit(Scripted(KILL_LOSSES, KILL_WS), cfg(**KILL_RUN), Loader(), [{}], ref, progress=False)
    out = tmp_path_factory.mktemp("killed")
    counter, real_replace, real_fsync = [0], os.replace, os.fsync
    be = Scripted(KILL_LOSSES, KILL_WS)
    be.save = _killing(be.save, counter, at)
    os.replace, os.fsync = _killing(real_replace, counter, at), _killing(real_fsync, counter, at)
    try: T.fit(be, cfg(**KILL_RUN), Loader(), [{}], out, progress=False)
    except Killed: pass
    finally: os.replace, os.fsync = real_replace, real_fsync
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # a half-written checkpoint is skipped with a warning
        res = T.fit(Scripted(KILL_LOSSES, KILL_WS), cfg(**KILL_RUN), Loader(), [{}], out, resume=True, progress=False)
    assert res.step == KILL_RUN["steps"]
    good = [p for p in T.list_checkpoints(out) if T.verify_checkpoint(p) is None]
    assert good and good[-1].name == "step_00000006"
    assert {p.name: json.loads((p / "w.json").read_text())["w"] for p in good}.items() >= {"step_00000006": saved_ws(ref)["step_00000006"]}.items()
