"""A kind registered from user code is usable by name everywhere.

CONTRIBUTING.md's example registers two toy kinds at test time: `toy-sigmoid` (exact, with a parameter of its own)
and `toy-prf` (a feature map with random state and a target kernel). This file runs that very block, then the
whole conformance grid the built-in kinds pass on both: the float64 oracle in fp32 and fp64, bidirectional and
causal, plain, masked and packed; gradients; padding, packing and causality; torch == JAX modules; checkpoints and
torch <-> JAX conversion; configs and CLI overrides; the approximation study; and a benchmark sweep."""
import re
from pathlib import Path

import numpy as np
import pytest

from minibert_lab import kernels
from minibert_lab.config import ExperimentConfig, ModelConfig

import test_attention as ta_tests
import test_convert as conv_tests
import test_kernels as k_tests

ROOT = Path(__file__).resolve().parents[1]
TOYS = ("toy-sigmoid", "toy-prf")
FEATURE_TOYS = ("toy-prf",)


def contributing_example() -> str:
    "The first python block of CONTRIBUTING.md's 'Adding an attention kind' section."
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("## Adding an attention kind", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module", autouse=True)
def toy_kinds():
    "Register the toy kinds by running CONTRIBUTING's example; remove them afterwards."
    for name in TOYS: assert name not in kernels.KERNELS, name
    exec(compile(contributing_example(), "CONTRIBUTING.md", "exec"), {})
    yield
    for name in TOYS: kernels.unregister_kind(name)
    for cache in (ta_tests.pair, ta_tests.cond): cache.cache_clear()


def test_example_registers_both_kinds():
    assert set(TOYS) <= set(kernels.registered_kinds()) and not set(TOYS) & set(kernels.ATTENTION_TYPES)
    assert kernels.is_exact("toy-sigmoid") and not kernels.is_exact("toy-prf")
    assert kernels.kind_params("toy-sigmoid") == {"shift": 1.0}
    assert kernels.small_params("toy-prf") == {"num_features": 8}
    assert kernels.feature_dim("toy-prf", 8, num_features=5) == 5
    table = kernels.registry_table()
    assert set(TOYS) <= set(table.index) and table.loc["toy-prf", "target"] == "softmax"


def test_own_parameter_is_validated_everywhere():
    with pytest.raises(ValueError, match=r"shift.*'big'"): kernels.resolve_params("toy-sigmoid", dict(shift="big"))
    with pytest.raises(ValueError, match="not a parameter"): kernels.resolve_params("toy-prf", dict(shift=1.0))
    with pytest.raises(ValueError, match="not used by kind 'toy-prf'"):
        ModelConfig.preset("tiny", attention=dict(kind="toy-prf", params=dict(shift=2.0)))
    from minibert_lab.torch.attention import build_attention
    with pytest.raises(ValueError, match="num_features=0"): build_attention("toy-prf", 16, 2, num_features=0)


def test_config_cli_and_json_round_trip():
    e = ExperimentConfig.preset("tiny").override(["--model.attention.kind", "toy-sigmoid",
                                                   "--model.attention.params.shift", "0.25"])
    assert e.model.attention.kind_params() == {"shift": 0.25}
    assert ExperimentConfig.from_json(e.to_json()) == e
    kw = e.model.attention_kwargs()
    assert kw["shift"] == 0.25 and kw["rope"] is True


# ---------------------------------------------------------------- kernels: the oracle grid and its properties

@pytest.mark.parametrize("fw,masking", list(k_tests._grid()))
@pytest.mark.parametrize("causal", (False, True), ids=("bidir", "causal"))
@pytest.mark.parametrize("kind", TOYS)
def test_kernel_matches_oracle(kind, causal, masking, fw): k_tests.test_matches_oracle(kind, causal, masking, fw)


@pytest.mark.parametrize("kind", FEATURE_TOYS)
def test_kernel_chunk_size_does_not_matter(kind): k_tests.test_chunk_size_does_not_matter(kind)


@pytest.mark.parametrize("kind", TOYS)
@pytest.mark.parametrize("check", [k_tests.test_torch_gradcheck_float64, k_tests.test_jax_grad_vs_finite_differences,
                                   k_tests.test_padding_invariance, k_tests.test_packing_equals_separate_documents,
                                   k_tests.test_causal_no_future, k_tests.test_finite_at_scales_and_bf16],
                         ids=lambda f: getattr(f, "__name__", str(f)).removeprefix("test_"))
def test_kernel_properties(kind, check): check(kind)


# ---------------------------------------------------------------- modules: torch and JAX

@pytest.mark.parametrize("variant", ta_tests.VARIANTS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", TOYS)
def test_module_matches_reference_and_jax(kind, causal, variant):
    ta_tests.test_matches_reference_and_jax(kind, causal, variant)


@pytest.mark.parametrize("kind", TOYS)
@pytest.mark.parametrize("check", [ta_tests.test_output_attentions, ta_tests.test_causal_no_future,
                                   ta_tests.test_state_roundtrip, ta_tests.test_dropout_train_eval,
                                   ta_tests.test_finite_gradients, ta_tests.test_bf16],
                         ids=lambda f: getattr(f, "__name__", str(f)).removeprefix("test_"))
def test_module_properties(kind, check): check(kind)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", TOYS)
def test_module_padding_invariance(kind, causal): ta_tests.test_padding_invariance(kind, causal)


# ---------------------------------------------------------------- models, checkpoints, conversion

@pytest.mark.parametrize("kind", TOYS)
def test_model_logits_parity_and_conversion(kind): conv_tests.test_logits_parity_and_back("minibert", kind)


@pytest.mark.parametrize("kind", TOYS)
def test_model_checkpoint_round_trips(tmp_path, kind):
    conv_tests.test_checkpoint_round_trips(tmp_path, "neobert", kind)


# ---------------------------------------------------------------- studies and benchmarks

def test_reference_attention_uses_the_kinds_own_form():
    "The oracle of toy-sigmoid is its sigmoid, not any built-in formula: weights are sigmoid scores over row sums."
    (q, k, v), _, _, _ = kernels.random_inputs(B=1, H=1, L=5, D=4)
    _, w = kernels.reference_attention("toy-sigmoid", q, k, v, params=dict(shift=0.5))
    s = 1 / (1 + np.exp(-(np.einsum("bhid,bhjd->bhij", q, k) / 2 - 0.5)))
    np.testing.assert_allclose(w, s / s.sum(-1, keepdims=True), rtol=1e-12)


def test_approximation_error_of_a_user_kind():
    "toy-prf estimates the softmax kernel: more features, smaller error (mean of three draws)."
    small, large = (kernels.approximation_error("toy-prf", F, length=32, head_dim=8) for F in (8, 512))
    assert 0 < large < small
    with pytest.raises(ValueError, match="approximates no target"): kernels.approximation_error("toy-sigmoid", 8)


@pytest.mark.parametrize("kind", TOYS)
def test_bench_attention_sweep(kind):
    "One point of `minibert-lab bench attention` per framework: timed, with FLOPs from the kind's entry."
    from minibert_lab.bench import attention as bench_attention
    for framework in ("torch", "jax"):
        case = bench_attention.attention_case(kind, 16, framework, True, dim=16, heads=2)
        case.run()
        assert case.flops == 3 * (4 * 2 * 16 * 16 * 16 + 2 * kernels.kind_flops(kind, 16, 8))
        assert case.memory() > 0
