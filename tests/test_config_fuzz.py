"""Property-based tests (hypothesis): random JSON and random bytes through the config parsers and checkpoint
manifests give a config / a verdict or a `ValueError`, never another exception type."""
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from minibert_lab import train as T
from minibert_lab.config import AttentionConfig, ExperimentConfig, ModelConfig

EXAMPLES, SLOW_EXAMPLES = 60, 1000
SETTINGS = dict(derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=12), c, max_size=4)),
                           max_leaves=12)
keys = st.sampled_from(["model", "data", "train", "dim", "heads", "attention", "kind", "params", "num_features", "lr",
                        "steps", "vocab_size", "seq_len", "max_len", "epsilon", "normalize", "rope", "framework"])
config_like = st.recursive(scalars, lambda c: st.dictionaries(keys, c, max_size=5), max_leaves=15)


def _parse(value):
    for build in (ExperimentConfig.from_dict, ModelConfig.from_dict, AttentionConfig.from_dict):
        try: build(value)
        except ValueError: pass


@given(st.one_of(json_values, config_like))
@settings(max_examples=EXAMPLES, **SETTINGS)
def test_config_from_random_json_is_a_config_or_a_value_error(value): _parse(value)


@given(st.binary(max_size=200))
@settings(max_examples=EXAMPLES, **SETTINGS)
def test_config_from_random_bytes_is_a_value_error(tmp_path, data):
    p = tmp_path / "config.json"
    p.write_bytes(data)
    with pytest.raises(ValueError): ExperimentConfig.from_json(p)


@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
@settings(max_examples=EXAMPLES, **SETTINGS)
def test_random_manifest_is_a_verdict(tmp_path, data):
    "Any bytes in a checkpoint's manifest: `verify_checkpoint` returns a reason (or None), never raises."
    ck = tmp_path / "checkpoints" / "step_00000001"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / "w.json").write_text("{}")
    (ck / T.MANIFEST).write_bytes(data)
    reason = T.verify_checkpoint(ck)
    assert reason is None or isinstance(reason, str)


@pytest.mark.slow
@given(st.one_of(json_values, config_like))
@settings(max_examples=SLOW_EXAMPLES, **SETTINGS)
def test_config_from_random_json_many(value): _parse(value)
