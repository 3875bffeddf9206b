"""Foreign inputs: folders that ask to run their own code, pathological text, bad rows, failed writes, and
property tests (hypothesis, fixed seed) that random bytes and malformed records give data or a `ValueError`,
never another exception. The default suite runs a small example budget; `-m slow` runs a larger one."""
import errno, io, json, re, shutil, sys, tempfile, time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import HealthCheck, event, given, settings, strategies as st

from minibert_lab.convert import save_pretrained
from minibert_lab.data import (CACHE_ENV, MAX_WORD_CHARS, encode_corpus, load_corpus, load_text_files, load_tokenizer,
                               train_tokenizer)
from minibert_lab.hf import from_hf, to_hf

FAST = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(FAST, max_examples=1000)
LONG_WORD = 200_000      # characters of the one-word "document"
LONG_WORD_LIMIT_S = 60   # a hang guard, not a benchmark: seconds here after the cap, minutes for 1 MB before it


# ---------------------------------------------------------------- fixtures: a tokenizer folder and a HF folder
@pytest.fixture(scope="module", autouse=True)
def isolated_caches(tmp_path_factory):
    "Our cache and the `datasets` cache in temporary folders (the fuzzers write many small files)."
    import datasets
    mp = pytest.MonkeyPatch()
    mp.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("mbl_cache")))
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))
    datasets.disable_progress_bars()
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(load_corpus("shakespeare", "validation")["text"][:40], vocab_size=200).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "bert"
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64)
    transformers.BertForMaskedLM(cfg).save_pretrained(d)
    return d


def copy_of(folder: Path, tmp: Path) -> Path:
    out = tmp / folder.name
    shutil.copytree(folder, out)
    return out


# ---------------------------------------------------------------- folders that ask to run their own code
def plant_custom_code(folder: Path, config_file: str, auto_map: dict, drop: str | None = None) -> Path:
    "Add `auto_map` to `config_file` and a Python file that leaves a marker if it is ever imported; the marker path."
    marker = folder / "RAN"
    f = folder / config_file
    cfg = json.loads(f.read_text()) if f.exists() else {}
    if drop: cfg.pop(drop, None)
    f.write_text(json.dumps({**cfg, "auto_map": auto_map}))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import PreTrainedTokenizerFast, BertForMaskedLM\n"
                                      "class Custom(PreTrainedTokenizerFast): pass\nclass CustomModel(BertForMaskedLM): pass\n")
    return marker


@pytest.mark.parametrize("config_file,drop", [("tokenizer_config.json", "tokenizer_class"),   # transformers would prompt
                                              ("tokenizer_config.json", None),                # it would load silently
                                              ("config.json", None)])
def test_tokenizer_folder_asking_for_custom_code_is_refused(tok_dir, tmp_path, monkeypatch, config_file, drop):
    folder = copy_of(tok_dir, tmp_path)
    marker = plant_custom_code(folder, config_file, {"AutoTokenizer": ["custom.Custom", "custom.Custom"]}, drop)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))   # even a "yes" at a prompt must not run it
    with pytest.raises(ValueError, match=rf"tokenizer folder '{folder}': {config_file} has an 'auto_map' entry"):
        load_tokenizer(folder)
    assert not marker.exists()


def test_hf_folder_asking_for_custom_code_is_refused(hf_dir, tmp_path, monkeypatch):
    folder = copy_of(hf_dir, tmp_path)
    marker = plant_custom_code(folder, "config.json", {"AutoModelForMaskedLM": "custom.CustomModel"})
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))
    with pytest.raises(ValueError, match=r"config.json' has an 'auto_map' entry"): from_hf(folder)
    assert not marker.exists()


# ---------------------------------------------------------------- a pathological word, bad rows, corrupt folders
def test_long_word_trains_quickly():
    "One 200k-character word among ordinary text: training cuts it at MAX_WORD_CHARS (minutes before the cap)."
    word = "".join(np.random.default_rng(0).choice(list("abcdefghij"), LONG_WORD))
    texts = load_corpus("shakespeare", "validation")["text"][:20] + [word]
    for kind, vocab in (("wordpiece", 300), ("bpe", 400)):
        t0 = time.perf_counter()
        tok = train_tokenizer(texts, kind, vocab)
        elapsed = time.perf_counter() - t0
        assert elapsed < LONG_WORD_LIMIT_S, (kind, elapsed)
        assert max(len(t.removeprefix("##").removeprefix("Ġ")) for t in tok.get_vocab()) <= MAX_WORD_CHARS
    assert tok.decode(tok(word)["input_ids"], skip_special_tokens=True) == word


@pytest.mark.parametrize("value,shown", [("null", "None"), ("5", "5 \\(int\\)"), ('["a"]', "\\['a'\\] \\(list\\)")])
def test_jsonl_row_without_text_names_file_and_row(tmp_path, value, shown):
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"text": "one"}\n{"text": "two"}\n{"text": ' + value + '}\n')
    pattern = rf"data file '{f}', row 3: 'text' is {shown}"
    with pytest.raises(ValueError, match=pattern): load_text_files(f)
    with pytest.raises(ValueError, match=pattern): load_corpus(data_files=str(f), split="train")
    with pytest.raises(ValueError, match=pattern): load_tokenizer(data_files=str(f), vocab_size=40, cache=False)
    with pytest.raises(ValueError, match=pattern): list(load_text_files(f, streaming=True))


def test_corrupt_tokenizer_folder_names_folder_and_file(tok_dir, tmp_path):
    folder = copy_of(tok_dir, tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=rf"tokenizer folder '{folder}': tokenizer.json is not valid JSON"):
        load_tokenizer(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(ValueError, match=rf"tokenizer folder '{folder}' could not be loaded"): load_tokenizer(folder)


# ---------------------------------------------------------------- writes that fail
def test_full_disk_and_read_only_folder_name_the_folder(hf_dir, tmp_path, monkeypatch):
    import safetensors, safetensors.numpy
    import minibert_lab.hf
    from transformers import PreTrainedTokenizerFast
    model = from_hf(hf_dir)
    def full(*a, **k): raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    def denied(*a, **k): raise PermissionError(errno.EACCES, "Permission denied", "/somewhere")
    with monkeypatch.context() as mp:
        mp.setattr(safetensors.numpy, "save_file", full)      # our checkpoints (torch and JAX models alike)
        with pytest.raises(ValueError, match=rf"cannot save to '{tmp_path}/ck': no space left on device"):
            save_pretrained(model, tmp_path / "ck")
        mp.setattr(minibert_lab.hf, "save_file", full)          # Hugging Face folders
        with pytest.raises(ValueError, match=rf"cannot save to '{tmp_path}/hf': no space left on device"):
            to_hf(model, tmp_path / "hf")
    with monkeypatch.context() as mp:
        mp.setattr(tempfile, "mkdtemp", denied)
        with pytest.raises(ValueError, match=rf"cannot save to '{tmp_path}/ck': the folder is not writable"):
            save_pretrained(model, tmp_path / "ck")
    small = tmp_path / "small.jsonl"                          # the tokenizer and token caches
    small.write_text("".join(json.dumps({"text": f"to be or not to be, {i}"}) + "\n" for i in range(40)))
    with monkeypatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path / "cache"))
        mp.setattr(PreTrainedTokenizerFast, "save_pretrained", denied)
        with pytest.raises(ValueError, match=rf"cannot save to '{tmp_path}/cache/tokenizers': the folder is not writable"):
            load_tokenizer(data_files=str(small), vocab_size=40)
    tok = load_tokenizer(data_files=str(small), vocab_size=40, cache=False)
    with monkeypatch.context() as mp:
        mp.setenv(CACHE_ENV, str(tmp_path / "cache2"))
        mp.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
        with pytest.raises(ValueError, match=rf"cannot save to '{tmp_path}/cache2/tokens': no space left"):
            encode_corpus(tok, ["to be or not to be"])


# ---------------------------------------------------------------- property tests
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
jsonl_records = st.lists(st.one_of(json_values, st.fixed_dictionaries({"text": json_values}),
                                   st.fixed_dictionaries({"text": st.text(max_size=30)})), min_size=1, max_size=6)
csv_cells = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)


@st.composite
def data_files(draw):
    "A (file name, bytes) pair: random bytes under any extension, jsonl records with at most one bad one, or ragged csv."
    kind = draw(st.sampled_from(["bytes", "jsonl", "csv"]))
    if kind == "bytes":
        return draw(st.sampled_from(["f.jsonl", "f.csv", "f.txt"])), draw(st.binary(min_size=1, max_size=200))
    if kind == "jsonl":
        records = draw(st.lists(st.fixed_dictionaries({"text": st.text(max_size=30)}), min_size=1, max_size=6))
        lines = [json.dumps(r) for r in records]
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["none", "text value", "record", "truncate"]))
        if how == "text value": lines[i] = json.dumps({"text": draw(json_values)})
        elif how == "record": lines[i] = json.dumps(draw(json_values))
        elif how == "truncate": lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        return "f.jsonl", ("\n".join(lines) + "\n").encode("utf-8")
    header = draw(st.sampled_from(["text", "text,n", "n", ""]))
    rows = draw(st.lists(st.lists(csv_cells, min_size=1, max_size=3), min_size=1, max_size=5))
    return "f.csv", (header + "\n" + "\n".join(",".join(r) for r in rows) + "\n").encode("utf-8")


def outcome(e: ValueError) -> str:
    "A short label of an error for hypothesis' statistics (paths removed)."
    return "ValueError: " + re.sub(r"'?/tmp/[^' ]*'?", "<path>", str(e))[:40]


def data_or_value_error(name: str, content: bytes, streaming: bool):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / name
        f.write_bytes(content)
        try:
            ds = load_text_files(f, streaming=streaming)
            texts = [r["text"] for r in ds] if streaming else list(ds["text"])
        except ValueError as e:
            return event(outcome(e))
        event("data")
        assert all(isinstance(t, str) for t in texts), texts


@FAST
@given(data_files(), st.booleans())
def test_data_files_give_data_or_value_error(file, streaming):
    data_or_value_error(*file, streaming)


@pytest.mark.slow
@SLOW
@given(data_files(), st.booleans())
def test_data_files_give_data_or_value_error_many(file, streaming):
    data_or_value_error(*file, streaming)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@st.composite
def tokenizer_damage(draw):
    "(file, new bytes): random bytes, a random JSON value, or a valid file with one top-level key replaced."
    name = draw(st.sampled_from(TOKENIZER_FILES))
    how = draw(st.sampled_from(["bytes", "json", "mutate"]))
    if how == "bytes": return name, draw(st.binary(max_size=200))
    if how == "json": return name, json.dumps(draw(json_values)).encode()
    return name, ("mutate", draw(st.text(max_size=3) | st.sampled_from(
        ["model", "normalizer", "pre_tokenizer", "added_tokens", "post_processor", "decoder", "mask_token",
         "pad_token", "tokenizer_class", "model_max_length", "unk_token"])), draw(json_values))


def tokenizer_or_value_error(tok_dir: Path, damage):
    from transformers import PreTrainedTokenizerFast
    name, new = damage
    with tempfile.TemporaryDirectory() as d:
        folder = copy_of(tok_dir, Path(d))
        f = folder / name
        if isinstance(new, tuple):
            obj = json.loads(f.read_text()) if f.is_file() and f.suffix == ".json" else {}
            obj[new[1]] = new[2]
            new = json.dumps(obj).encode()
        f.write_bytes(new)
        try: tok = load_tokenizer(folder)
        except ValueError as e: return event(outcome(e))
        event("tokenizer")
        assert isinstance(tok, PreTrainedTokenizerFast)


@FAST
@given(damage=tokenizer_damage())
def test_tokenizer_folder_gives_tokenizer_or_value_error(tok_dir, damage):
    tokenizer_or_value_error(tok_dir, damage)


@pytest.mark.slow
@SLOW
@given(damage=tokenizer_damage())
def test_tokenizer_folder_gives_tokenizer_or_value_error_many(tok_dir, damage):
    tokenizer_or_value_error(tok_dir, damage)


HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
           "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps", "hidden_dropout_prob",
           "attention_probs_dropout_prob", "initializer_range", "pad_token_id", "tie_word_embeddings", "model_type",
           "position_embedding_type")


@st.composite
def hf_config_damage(draw):
    "New config.json bytes: random bytes, a random JSON value, or the real config with keys replaced or removed."
    how = draw(st.sampled_from(["bytes", "json", "mutate", "mutate"]))
    if how == "bytes": return draw(st.binary(max_size=200))
    if how == "json": return json.dumps(draw(json_values)).encode()
    keys = draw(st.lists(st.sampled_from(HF_KEYS), min_size=1, max_size=3, unique=True))
    plausible = (st.integers(-3, 200) | st.floats(0, 1) | st.booleans() | st.just("<drop>")
                 | st.sampled_from(["gelu", "relu", "gelu_new", "tanh", "bert", "roberta", "absolute", "relative_key"]))
    return [(k, draw(plausible | st.none() | json_values)) for k in keys]


def model_or_value_error(hf_dir: Path, damage):
    with tempfile.TemporaryDirectory() as d:
        folder = copy_of(hf_dir, Path(d))
        if isinstance(damage, list):
            cfg = json.loads((folder / "config.json").read_text())
            for k, v in damage:
                if v == "<drop>": cfg.pop(k, None)
                else: cfg[k] = v
            damage = json.dumps(cfg).encode()
        (folder / "config.json").write_bytes(damage)
        try: model = from_hf(folder)
        except ValueError as e: return event(outcome(e))
        event("model")
        assert isinstance(model, torch.nn.Module)


@FAST
@given(damage=hf_config_damage())
def test_hf_config_gives_model_or_value_error(hf_dir, damage):
    model_or_value_error(hf_dir, damage)


@pytest.mark.slow
@SLOW
@given(damage=hf_config_damage())
def test_hf_config_gives_model_or_value_error_many(hf_dir, damage):
    model_or_value_error(hf_dir, damage)
