"""smoljax: SmolLM2 and SmolVLM2 as pure JAX functions over parameter pytrees.

    import smoljax
    config, params, tokenizer, _ = smoljax.load()            # SmolLM2-135M-Instruct by default
    logits = smoljax.forward(params, tokens, config)          # pure: jit, grad, vmap, shard
    result = smoljax.generate(params, config, [prompt_ids])   # one jitted decode loop

    vlm = smoljax.load("HuggingFaceTB/SmolVLM2-500M-Video-Instruct")   # SmolVLM2: images + text
    batch = vlm.processor(["<image>What animal is this?"], [["cat.jpg"]])
    result = smoljax.generate(vlm.params, vlm.config, batch.input_ids, pixel_values=batch.pixel_values,
                              pixel_attention_mask=batch.pixel_attention_mask)

Submodules are imported on first use, so `import smoljax` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    "load": "smoljax.checkpoints.loader",
    "save_pretrained": "smoljax.checkpoints.loader",
    "LoadedModel": "smoljax.checkpoints.loader",
    "LlamaConfig": "smoljax.config",
    "VLMConfig": "smoljax.config",
    "VisionConfig": "smoljax.config",
    "VLMProcessor": "smoljax.processor",
    "ImageProcessorConfig": "smoljax.processor",
    "vlm_specs": "smoljax.params",
    "model_specs": "smoljax.params",
    "preset": "smoljax.config",
    "PRESETS": "smoljax.config",
    "forward": "smoljax.models.smollm2",
    "generate": "smoljax.generation",
    "stream": "smoljax.generation",
    "GenerationResult": "smoljax.generation",
    "Sampler": "smoljax.sampling",
    "greedy": "smoljax.sampling",
    "init_params": "smoljax.params",
    "llama_specs": "smoljax.params",
    "abstract_params": "smoljax.params",
    "count_params": "smoljax.params",
    "Tokenizer": "smoljax.tokenizer",
    "KVCache": "smoljax.cache",
    "init_cache": "smoljax.cache",
    "attention": "smoljax.attention",
    "SmolJaxError": "smoljax.errors",
    "param_shardings": "smoljax.sharding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'smoljax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
